"""Point-cloud data: the embedded procedural corpus or a real dataset, and few-shot episodes.

``PointCloudData`` serves three purposes with one interface:

- ``purpose: pretrain`` - the unlabelled corpus for masked-autoencoder pretraining (procedural:
  by default only classes that no few-shot episode uses, ``pretrain_classes``);
- ``purpose: classify`` with ``n_way``/``k_shot`` - one N-way K-shot episode: the support set
  trains, ``n_query`` test clouds per class are the test (query) set, ``n_val`` other test clouds
  per class validate, and ``unlabelled`` further train clouds of the episode's classes feed the
  semi-supervised variant;
- ``purpose: classify`` with ``n_way: null`` - ordinary supervised classification.

Batches are dicts ``{"points": (B, N, 3), "label": (B,), "index": (B,)}``; with unlabelled clouds
the training batch is ``{"labelled": ..., "unlabelled": ...}`` (Lightning's CombinedLoader).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from suite.data import SuiteDataModule, cached, generated_dir, split_by_group

from . import readers
from .synth import FEW_SHOT_CLASSES, PRETRAIN_CLASSES, make_corpus

#: the few-shot protocols of Point-BERT / Point-MAE (N-way K-shot), each over 10 seeded episodes
FEW_SHOT_SETTINGS: dict[str, tuple[int, int]] = {"5w10s": (5, 10), "5w20s": (5, 20), "10w10s": (10, 10), "10w20s": (10, 20)}

Source = Literal["procedural", "modelnet_off", "modelnet_h5", "modelnet_txt", "scanobjectnn_h5"]
#: procedural pretraining corpora: the pretraining-only classes (default; the few-shot classes are
#: never reconstructed, as Point-MAE pretrains on ShapeNet and is tested on ModelNet), the few-shot
#: classes themselves (other instances), or both
PRETRAIN_SETS: dict[str, list[str]] = {
    "disjoint": list(PRETRAIN_CLASSES),
    "few_shot": list(FEW_SHOT_CLASSES),
    "all": list(PRETRAIN_CLASSES) + list(FEW_SHOT_CLASSES),
}
#: bump when the procedural generator's output for the same settings changes (cache key)
CORPUS_VERSION = 2


@dataclass
class Episode:
    """Indices of one N-way K-shot episode. Episode label ``i`` is original class ``classes[i]``."""

    classes: np.ndarray
    support: np.ndarray  # into the train pool, k_shot per class
    query: np.ndarray  # into the test pool, n_query per class
    val: np.ndarray  # into the test pool, disjoint from query
    unlabelled: np.ndarray  # into the train pool, disjoint from support


def sample_episode(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    n_way: int,
    k_shot: int,
    episode: int,
    seed: int = 0,
    n_query: int = 20,
    n_val: int = 0,
    n_unlabelled: int = 0,
) -> Episode:
    """Draw episode ``episode`` (a pure function of its arguments): ``n_way`` classes among those
    with enough clouds, ``k_shot`` support and ``n_unlabelled`` extra clouds in total from the train
    pool, ``n_query`` + ``n_val`` per class from the test pool."""
    rng = np.random.default_rng([seed, n_way, k_shot, episode])
    tr_count = np.bincount(train_labels, minlength=test_labels.max(initial=0) + 1)
    te_count = np.bincount(test_labels, minlength=len(tr_count))
    tr_count = np.pad(tr_count, (0, len(te_count) - len(tr_count)))
    extra = -(-n_unlabelled // n_way)  # unlabelled clouds per class, rounded up
    eligible = np.flatnonzero((tr_count >= k_shot + extra) & (te_count >= n_query + n_val))
    if len(eligible) < n_way:
        raise ValueError(
            f"{n_way}-way {k_shot}-shot needs {n_way} classes with >= {k_shot + extra} train and "
            f">= {n_query + n_val} test clouds; only {len(eligible)} qualify (train counts {tr_count.tolist()}, "
            f"test counts {te_count.tolist()}). Lower n_query / n_val / unlabelled or use more data."
        )
    classes = np.sort(rng.choice(eligible, n_way, replace=False))
    support, query, val, unlabelled = [], [], [], []
    for c in classes:
        tr = rng.permutation(np.flatnonzero(train_labels == c))
        te = rng.permutation(np.flatnonzero(test_labels == c))
        support.append(tr[:k_shot])
        unlabelled.append(tr[k_shot : k_shot + extra])
        query.append(te[:n_query])
        val.append(te[n_query : n_query + n_val])
    unl = rng.permutation(np.concatenate(unlabelled))[:n_unlabelled]
    return Episode(classes, np.concatenate(support), np.concatenate(query), np.concatenate(val), np.sort(unl))


def few_shot_episodes(setting: str, train_labels: np.ndarray, test_labels: np.ndarray, n_episodes: int = 10, seed: int = 0, **kwargs: Any) -> list[Episode]:
    """The ``n_episodes`` seeded episodes of a setting such as ``"5w10s"``."""
    if setting not in FEW_SHOT_SETTINGS:
        raise ValueError(f"unknown few-shot setting {setting!r}; choose from {list(FEW_SHOT_SETTINGS)}")
    n_way, k_shot = FEW_SHOT_SETTINGS[setting]
    return [sample_episode(train_labels, test_labels, n_way, k_shot, e, seed, **kwargs) for e in range(n_episodes)]


class CloudDataset(Dataset):
    """Clouds with labels (``-1`` marks an unlabelled cloud) and their index in the source pool."""

    def __init__(self, points: np.ndarray, labels: np.ndarray, index: np.ndarray) -> None:
        self.points, self.labels, self.index = points, labels, index

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"points": torch.from_numpy(self.points[i]), "label": int(self.labels[i]), "index": int(self.index[i])}


class PointCloudData(SuiteDataModule):
    """Procedural (default) or real point clouds, as a pretraining corpus, an episode or a full task.

    Args:
        source: ``procedural`` (generated, cached in data/generated/pointcloud) or a real format.
        root: dataset folder for real formats (for ``scanobjectnn_h5`` the split folder holding
            ``training_objectdataset<h5_suffix>.h5`` and ``test_objectdataset<h5_suffix>.h5``).
        num_category: ``modelnet_txt``: 40 (default) or 10, which ``modelnet<N>_*.txt`` lists to
            read; other real sources: the class count the data must have (checked), or null.
        pretrain_classes: procedural ``purpose: pretrain`` corpus: ``disjoint`` (the 12
            pretraining-only classes), ``few_shot`` (the 15 episode classes) or ``all``.
        variant: procedural only: ``clean`` (ModelNet-like) or ``scan`` (ScanObjectNN-like, occluded).
        num_points: points per cloud (real data is farthest-point-sampled down to it).
        purpose: ``pretrain`` (unlabelled corpus) or ``classify``.
        n_way, k_shot, episode: the few-shot episode; ``n_way: null`` trains on the whole train split.
        n_query, n_val: test clouds per class for the query (test) and validation sets.
        unlabelled: extra unlabelled train clouds of the episode's classes (semi-supervised MCFT).
        pretrain_per_class, train_per_class, test_per_class: procedural corpus sizes.
        h5_suffix: ``scanobjectnn_h5`` variant: ``_augmentedrot_scale75`` (PB_T50_RS, default),
            ``_augmentedrot``, ``_augmented25rot``, ``_augmented25_norot``, or ``""`` (OBJ_BG in
            ``main_split/``, OBJ_ONLY in ``main_split_nobg/``).
    """

    def __init__(
        self,
        source: Source = "procedural",
        root: str | None = None,
        variant: Literal["clean", "scan"] = "clean",
        num_points: int = 512,
        purpose: Literal["pretrain", "classify"] = "classify",
        n_way: int | None = 5,
        k_shot: int | None = 10,
        episode: int = 0,
        n_query: int = 20,
        n_val: int = 10,
        unlabelled: int = 0,
        pretrain_per_class: int = 100,
        train_per_class: int = 60,
        test_per_class: int = 40,
        h5_suffix: str = "_augmentedrot_scale75",
        num_category: int | None = None,
        pretrain_classes: Literal["disjoint", "few_shot", "all"] = "disjoint",
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        if source != "procedural" and root is None:
            raise ValueError(f"source={source!r} needs data.root (the dataset folder); see domains/pointcloud/README.md")
        if (n_way is None) != (k_shot is None):
            raise ValueError("set both n_way and k_shot for a few-shot episode, or neither for full training")
        if pretrain_classes not in PRETRAIN_SETS:
            raise ValueError(f"pretrain_classes must be one of {list(PRETRAIN_SETS)}, got {pretrain_classes!r}")
        if source == "modelnet_txt" and num_category not in (None, 10, 40):
            raise ValueError(f"num_category must be 10 or 40 for modelnet_txt (modelnet<N>_*.txt), got {num_category}")
        self.source, self.root, self.variant, self.num_points = source, root, variant, num_points
        self.purpose, self.n_way, self.k_shot, self.episode = purpose, n_way, k_shot, episode
        self.n_query, self.n_val, self.unlabelled = n_query, n_val, unlabelled
        self.per_class = {"pretrain": pretrain_per_class, "train": train_per_class, "test": test_per_class}
        self.h5_suffix, self.num_category, self.pretrain_classes = h5_suffix, num_category, pretrain_classes
        self.class_names: list[str] = list(FEW_SHOT_CLASSES) if source == "procedural" else []
        self.ids: dict[str, list[str]] = {}

    # --- pools ------------------------------------------------------------------------------------
    def pool(self, split: Literal["pretrain", "train", "test"]) -> readers.PointSet:
        """The whole ``split`` of the source (cached as .npz under data/generated/pointcloud)."""
        if self.source == "procedural":
            n, seeds = self.per_class[split], {"pretrain": 101, "train": 202, "test": 303}
            classes = PRETRAIN_SETS[self.pretrain_classes] if split == "pretrain" else list(FEW_SHOT_CLASSES)
            tag = hashlib.sha256(f"v{CORPUS_VERSION}|{','.join(classes)}".encode()).hexdigest()[:8]
            key = f"{self.variant}-{split}-{n}x{self.num_points}-{tag}"

            def build(tmp: Path) -> None:
                points, labels = make_corpus(n, self.num_points, seeds[split], self.variant, classes)
                with open(tmp, "wb") as f:
                    np.savez(f, points=points, labels=labels)

            with np.load(cached(generated_dir("pointcloud") / f"{key}.npz", build)) as z:
                points, labels = z["points"], z["labels"]
            return readers.PointSet(points, labels, classes, [f"{key}:{i}" for i in range(len(points))])
        real_split = "train" if split == "pretrain" else split
        spec = f"v{readers.READER_VERSION}|{self.source}|{_listing(self.root)}|{real_split}|{self.num_points}|{self.h5_suffix}|{self.num_category}"
        if self.source == "modelnet_off":  # the one reader that draws points at random (seeded surface sampling)
            spec += f"|seed{self.seed}"
        key = hashlib.sha256(spec.encode()).hexdigest()[:16]

        def build_real(tmp: Path) -> None:
            s = self._read_real(real_split)
            with open(tmp, "wb") as f:
                np.savez(f, points=s.points, labels=s.labels, names=np.array(s.class_names), ids=np.array(s.ids))

        with np.load(cached(generated_dir("pointcloud") / f"{self.source}-{key}.npz", build_real)) as z:
            return readers.PointSet(z["points"], z["labels"], z["names"].tolist(), z["ids"].tolist())

    def _read_real(self, split: str) -> readers.PointSet:
        root = Path(self.root)
        if self.source == "modelnet_off":
            s = readers.read_modelnet_off(root, split, self.num_points, self.seed)
        elif self.source == "modelnet_h5":
            s = readers.read_modelnet_h5(root, split, self.num_points)
        elif self.source == "modelnet_txt":
            return readers.read_modelnet_txt(root, split, self.num_points, self.num_category or 40)
        elif self.source == "scanobjectnn_h5":
            name = "training" if split == "train" else "test"
            s = readers.read_scanobjectnn_h5(root / f"{name}_objectdataset{self.h5_suffix}.h5", self.num_points)
        else:
            raise ValueError(f"unknown data source {self.source!r}")
        if self.num_category is not None and len(s.class_names) != self.num_category:
            raise ValueError(f"data.num_category={self.num_category} but {root} ({self.source}) has {len(s.class_names)} classes "
                             f"({', '.join(s.class_names[:5])}, ...); for ModelNet10 meshes point data.root at ModelNet10/")
        return s

    @property
    def num_classes(self) -> int:
        return self.n_way if self.n_way is not None else len(self.class_names)

    # --- splits -----------------------------------------------------------------------------------
    def _add(self, name: str, s: readers.PointSet, idx: np.ndarray, labels: np.ndarray) -> None:
        self.splits[name] = CloudDataset(s.points[idx], labels, idx)
        self.ids[name] = [s.ids[i] for i in idx]
        self.record_split(name, self.ids[name])

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if self.purpose == "pretrain":
            s = self.pool("pretrain")
            parts = split_by_group(np.arange(len(s.points)), {"train": 0.95, "val": 0.05}, self.seed)
            for name, idx in parts.items():
                self._add(name, s, idx, s.labels[idx])
            return
        train, test = self.pool("train"), self.pool("test")
        if train.class_names != test.class_names:  # one class list per dataset, or labels would not mean the same
            raise ValueError(f"{self.source} at {self.root}: the train and test splits list different classes "
                             f"({train.class_names} vs {test.class_names})")
        self.class_names = train.class_names
        if self.n_way is None:
            parts = split_by_group(np.arange(len(train.points)), {"train": 0.9, "val": 0.1}, self.seed)
            for name, idx in parts.items():
                self._add(name, train, idx, train.labels[idx])
            self._add("test", test, np.arange(len(test.points)), test.labels)
            return
        ep = sample_episode(train.labels, test.labels, self.n_way, self.k_shot, self.episode, self.seed, self.n_query, self.n_val, self.unlabelled)
        remap = np.full(max(train.labels.max(), test.labels.max()) + 1, -1)
        remap[ep.classes] = np.arange(self.n_way)
        self.class_names = [train.class_names[c] for c in ep.classes]
        self._add("train", train, ep.support, remap[train.labels[ep.support]])
        self._add("test", test, ep.query, remap[test.labels[ep.query]])
        if self.n_val:
            self._add("val", test, ep.val, remap[test.labels[ep.val]])
        if self.unlabelled:
            self._add("unlabelled", train, ep.unlabelled, np.full(len(ep.unlabelled), -1))

    def train_dataloader(self) -> DataLoader | dict[str, DataLoader]:
        labelled = self.loader("train", shuffle=True, drop_last=len(self.splits["train"]) > self.batch_size)
        if "unlabelled" not in self.splits:
            return labelled
        return {"labelled": labelled, "unlabelled": self.loader("unlabelled", shuffle=True)}

    def val_dataloader(self) -> DataLoader | list:
        return self.loader("val") if "val" in self.splits else []


def _listing(root: str | None) -> str:
    """Names, sizes and modification times of every file under ``root``: the real-data cache key
    changes with the data (a file replaced by one of the same size included)."""
    entries = []
    for dirpath, _, files in os.walk(root or "."):
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            entries.append(f"{os.path.relpath(os.path.join(dirpath, f), root)}:{st.st_size}:{st.st_mtime_ns}")
    return f"{os.path.abspath(root or '.')}|" + hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()
