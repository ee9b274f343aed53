"""Food data for class-incremental learning under dual imbalance: the protocol and the DataModule.

The step-imbalance protocol (DIME, after the reference's ``get_exp_imbalance``): C classes in a
seeded order are cut into T tasks whose sizes follow rho^(t/(T-1)) (rho = 0.01: the first task in
the unshuffled list is 100x the last), normalised to C with at least one class per task; the
task sizes are then shuffled by the seed. Within the tasks, class sizes are long-tailed (the
source's own tail, e.g. Food-101-LT's ``train_lt.txt`` or the generator's, or an exponential tail
applied here to a balanced source), and test sets are balanced.

Labels are *incremental* class ids: position in the seeded class order, so task t holds the
contiguous ids ``offsets[t] .. offsets[t+1]-1``. A task's train split holds its own classes; its
val and test splits hold every class seen so far (A_t is measured on them).

Batches: ``{"image": (B, 3, S, S) float, "label": (B,) incremental id, "task": (B,) task of the
class, "index": (B,), "id": list of file paths relative to the data root}``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from suite.data import SuiteDataModule, cached, generated_dir

from .readers import (
    DatasetFormatError,
    ImageList,
    check_same_classes,
    read_food101,
    read_image_folder,
    read_image_list,
)
from .synth import GENERATOR_VERSION, generate_food101, generate_pretrain

__all__ = ["DatasetFormatError", "FoodCLData", "FoodImages", "TaskProtocol", "balance_classes", "long_tail_subsample",
           "make_protocol", "step_imbalanced_sizes"]


# ------------------------------------------------------------------------------------------------
# the protocol
def step_imbalanced_sizes(num_classes: int, num_tasks: int, rho: float = 0.01, seed: int | None = 0) -> list[int]:
    """Classes per task: proportional to rho^(t/(T-1)), at least 1 each, summing to ``num_classes``.

    As the reference: one class per task is set aside, the rest is split by the normalised
    ratios and rounded, the rounding error is settled on the largest tasks first, and the sizes
    are shuffled by ``seed`` (``None`` keeps them in decreasing order). Fixed: T = 1 (the
    reference divides by T - 1) gives one task with every class.
    """
    if num_tasks < 1 or num_classes < num_tasks:
        raise ValueError(f"need 1 <= num_tasks <= num_classes, got {num_tasks} tasks for {num_classes} classes")
    if not 0 < rho <= 1:
        raise ValueError(f"task imbalance rho must be in (0, 1], got {rho}")
    t = np.arange(num_tasks)
    ratio = rho ** (t / max(num_tasks - 1, 1))
    ratio /= ratio.sum()
    rest = num_classes - num_tasks
    sizes = np.rint(ratio * rest).astype(np.int64)
    diff = rest - int(sizes.sum())
    order = np.argsort(-sizes, kind="stable")
    for i in range(abs(diff)):
        sizes[order[i % num_tasks]] += np.sign(diff)
    sizes += 1
    if seed is not None:
        sizes = np.random.default_rng([seed, 1]).permutation(sizes)
    return sizes.tolist()


@dataclass(frozen=True)
class TaskProtocol:
    """Class order and task sizes; incremental id i is original class ``class_order[i]``."""

    class_order: np.ndarray
    classes_per_task: list[int]

    @property
    def num_tasks(self) -> int:
        return len(self.classes_per_task)

    @property
    def num_classes(self) -> int:
        return len(self.class_order)

    @property
    def offsets(self) -> np.ndarray:
        """offsets[t] = first incremental id of task t; offsets[T] = C."""
        return np.concatenate([[0], np.cumsum(self.classes_per_task)])

    def task_classes(self, task: int) -> range:
        return range(int(self.offsets[task]), int(self.offsets[task + 1]))

    def seen_classes(self, task: int) -> int:
        """Number of classes learned after task ``task`` (the classes of tasks 0..task)."""
        return int(self.offsets[task + 1])

    @property
    def task_of_class(self) -> np.ndarray:
        """Task of each incremental id."""
        return np.repeat(np.arange(self.num_tasks), self.classes_per_task)

    def to_incremental(self, labels: np.ndarray) -> np.ndarray:
        """Original class ids -> incremental ids."""
        inverse = np.empty(self.num_classes, dtype=np.int64)
        inverse[self.class_order] = np.arange(self.num_classes)
        return inverse[labels]


def make_protocol(num_classes: int, num_tasks: int, rho: float = 0.01, seed: int = 0) -> TaskProtocol:
    """The seeded class order and step-imbalanced task sizes (see :func:`step_imbalanced_sizes`)."""
    order = np.random.default_rng([seed, 0]).permutation(num_classes)
    return TaskProtocol(order, step_imbalanced_sizes(num_classes, num_tasks, rho, seed))


def long_tail_subsample(labels: np.ndarray, imbalance: float, seed: int = 0) -> np.ndarray:
    """Indices keeping n_max * imbalance^(rank/(C-1)) images of each class (Cui et al., CVPR 2019).

    n_max is the largest class; a class's rank comes from a seeded permutation; a class never keeps
    more images than it has, nor fewer than one. The kept images are a seeded random subset.
    """
    if not 0 < imbalance <= 1:
        raise ValueError(f"long-tail imbalance must be in (0, 1], got {imbalance}")
    counts = np.bincount(labels)
    rng = np.random.default_rng([seed, 2])
    rank = rng.permutation(len(counts))
    target = np.maximum(np.rint(counts.max() * imbalance ** (rank / max(len(counts) - 1, 1))), 1).astype(int)
    keep = [rng.permutation(np.flatnonzero(labels == c))[: min(target[c], counts[c])] for c in range(len(counts))]
    return np.sort(np.concatenate(keep))


def balance_classes(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Indices keeping the same number of images (the smallest class's) of every class present."""
    present = np.unique(labels)
    n = min(int((labels == c).sum()) for c in present)
    rng = np.random.default_rng([seed, 3])
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:n] for c in present]))


# ------------------------------------------------------------------------------------------------
class FoodImages(Dataset):
    """Images of an :class:`ImageList` with incremental labels and their tasks, decoded with PIL."""

    def __init__(self, images: ImageList, labels: np.ndarray, tasks: np.ndarray, transform: Any, cache: bool = False) -> None:
        self.images, self.labels, self.tasks, self.transform, self.cache = images, labels, tasks, transform, cache
        self._decoded: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.images)

    @property
    def ids(self) -> list[str]:
        return self.images.files

    def decode(self, i: int) -> torch.Tensor:
        """(3, H, W) uint8 of image ``i``; an unreadable file is an error naming it (never replaced)."""
        if i in self._decoded:
            return self._decoded[i]
        from PIL import Image, UnidentifiedImageError

        path = self.images.path(i)
        try:
            with Image.open(path) as im:
                array = np.asarray(im.convert("RGB"))
        except (OSError, UnidentifiedImageError) as err:
            raise DatasetFormatError(f"{path}: cannot be decoded as an image ({err}); listed in {self.images.source}") from err
        image = torch.from_numpy(array.copy()).permute(2, 0, 1)
        if self.cache:
            self._decoded[i] = image
        return image

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.transform(self.decode(i)), "label": int(self.labels[i]), "task": int(self.tasks[i]),
                "index": i, "id": self.images.files[i]}


def _transforms(size: int, train: bool, mean: Sequence[float], std: Sequence[float]) -> Any:
    from torchvision.transforms import v2

    if train:  # the reference's RandomResizedCrop + flip, with a smaller scale range for small images
        geometry = [v2.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    else:
        geometry = [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    return v2.Compose([*geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


Source = Literal["generated", "food101", "list", "imagefolder"]
Mode = Literal["continual", "joint", "pretrain"]


class FoodCLData(SuiteDataModule):
    """Food images under the step-imbalance protocol, one task at a time.

    Args:
        source: ``generated`` (default; written once to ``data/generated/food_cl``), ``food101``
            (``path`` = the folder with ``images/`` and ``meta/``), ``list`` (``train_list``,
            ``test_list`` [, ``val_list``] of ``<path> <label>`` lines, paths relative to ``path``
            or to each list's folder) or ``imagefolder`` (``path`` with ``train/``, ``test/`` [, ``val/``]).
        mode: ``continual`` (task ``task`` of the protocol), ``joint`` (every class at once: the
            upper bound) or ``pretrain`` (the pretraining classes, disjoint from the continual ones:
            the generated pretraining pool, or the ImageFolder tree ``pretrain_path``).
        task, num_tasks, task_imbalance: the task index, T and rho of the protocol.
        protocol_seed: seeds the class order and the task sizes (fixed while ``seed`` varies batches).
        long_tail: apply an exponential long tail with this n_min/n_max ratio to the training
            images of a balanced source (``None``: keep the source's sizes).
        balance_eval: subsample val/test to the same number of images per class (with a warning)
            when the source's are not balanced.
        image_size, augment, mean, std: input resolution, training augmentation, normalisation
            (0.5/0.5: timm's in21k ViTs).
        generated_classes, pretrain_classes, train_max, train_min, val_per_class,
        test_per_class, pretrain_per_class, generator_seed: the generated sets.
        pretrain_setting: how the generated pretraining dishes are photographed (``studio``: another
            domain than the continual ``restaurant`` photos; see ``synth.render_batch``).
        cache_images: keep decoded images in memory (``None``: only for generated sets).
    """

    def __init__(
        self,
        source: Source = "generated",
        path: str | None = None,
        train_list: str | None = None,
        val_list: str | None = None,
        test_list: str | None = None,
        pretrain_path: str | None = None,
        mode: Mode = "continual",
        task: int = 0,
        num_tasks: int = 5,
        task_imbalance: float = 0.01,
        protocol_seed: int = 0,
        long_tail: float | None = None,
        balance_eval: bool = True,
        image_size: int = 32,
        augment: bool = True,
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.5, 0.5, 0.5),
        generated_classes: int = 50,
        pretrain_classes: int = 32,
        train_max: int = 200,
        train_min: int = 5,
        val_per_class: int = 5,
        test_per_class: int = 20,
        pretrain_per_class: int = 48,
        pretrain_setting: Literal["studio", "restaurant"] = "studio",
        generator_seed: int = 0,
        cache_images: bool | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        if source not in ("generated", "food101", "list", "imagefolder"):
            raise ValueError(f"source must be generated, food101, list or imagefolder, got {source!r}")
        if mode not in ("continual", "joint", "pretrain"):
            raise ValueError(f"mode must be continual, joint or pretrain, got {mode!r}")
        if source in ("food101", "imagefolder") and not path:
            raise ValueError(f"source={source!r} needs `path` (the dataset folder)")
        if source == "list" and not (train_list and test_list):
            raise ValueError("source='list' needs `train_list` and `test_list` (files of '<path> <label>' lines)")
        if not 0 <= task < num_tasks:
            raise ValueError(f"task must be in 0..num_tasks-1 = 0..{num_tasks - 1}, got {task}")
        self.source, self.path, self.mode = source, path, mode
        self.lists = {"train": train_list, "val": val_list, "test": test_list}
        self.pretrain_path = pretrain_path
        self.task, self.num_tasks, self.task_imbalance, self.protocol_seed = task, num_tasks, task_imbalance, protocol_seed
        self.long_tail, self.balance_eval = long_tail, balance_eval
        self.image_size, self.augment, self.mean, self.std = image_size, augment, tuple(mean), tuple(std)
        self.generated = dict(n_classes=generated_classes, size=image_size, train_max=train_max, train_min=train_min,
                              n_val=val_per_class, n_test=test_per_class, seed=generator_seed)
        self.generated_pretrain = dict(n_classes=pretrain_classes, size=image_size, n_train=pretrain_per_class,
                                       n_val=max(pretrain_per_class // 4, 1), seed=generator_seed, setting=pretrain_setting)
        generated = source == "generated" or (mode == "pretrain" and not pretrain_path)
        self.cache_images = generated if cache_images is None else cache_images

    # ----- the data, read lazily (num_classes is read when the CLI instantiates the model) --------
    def generated_root(self, pool: Literal["continual", "pretrain"] = "continual") -> Path:
        if pool == "continual":
            g = self.generated
            name = (f"food101_v{GENERATOR_VERSION}_c{g['n_classes']}_s{g['size']}_tr{g['train_max']}-{g['train_min']}"
                    f"_va{g['n_val']}_te{g['n_test']}_seed{g['seed']}")
            return cached(generated_dir("food_cl") / name, lambda tmp: generate_food101(tmp, **g))
        g = self.generated_pretrain
        name = (f"pretrain_v{GENERATOR_VERSION}_c{g['n_classes']}_s{g['size']}_tr{g['n_train']}_va{g['n_val']}_seed{g['seed']}"
                f"_{g['setting']}")
        return cached(generated_dir("food_cl") / name, lambda tmp: generate_pretrain(tmp, **g))

    @cached_property
    def raw_splits(self) -> dict[str, ImageList]:
        """The source's splits with original labels (train long-tailed, val/test balanced where asked)."""
        if self.mode == "pretrain":
            root = Path(self.pretrain_path) if self.pretrain_path else self.generated_root("pretrain")
            splits = {"train": read_image_folder(root / "train")}
            if (root / "val").is_dir():
                splits["val"] = read_image_folder(root / "val", splits["train"].classes)
            return splits
        if self.source in ("generated", "food101"):
            splits = read_food101(self.generated_root() if self.source == "generated" else self.path)
        elif self.source == "imagefolder":
            root = Path(self.path)
            splits = {"train": read_image_folder(root / "train")}
            for name in ("val", "test"):
                if name == "test" or (root / name).is_dir():
                    splits[name] = read_image_folder(root / name, splits["train"].classes)
        else:
            splits = {n: read_image_list(f, self.path) for n, f in self.lists.items() if f}
            names = max((s.classes for s in splits.values()), key=len)
            for s in splits.values():
                s.classes = names  # one class list for all splits (the longest; labels index it)
        if self.long_tail is not None:
            keep = long_tail_subsample(splits["train"].labels, self.long_tail, self.protocol_seed)
            splits["train"] = splits["train"].subset(keep)
        check_same_classes(splits.items())
        for name in ("val", "test"):
            counts = splits[name].counts() if name in splits else None
            if counts is not None and self.balance_eval and counts.min() != counts.max():
                warnings.warn(f"{splits[name].source}: {name} images per class range {counts.min()}..{counts.max()}; "
                              f"keeping {counts.min()} per class so the {name} set is balanced", stacklevel=2)
                splits[name] = splits[name].subset(balance_classes(splits[name].labels, self.protocol_seed))
        return splits

    @cached_property
    def protocol(self) -> TaskProtocol:
        """The class order and task sizes (one task holding every class in ``pretrain`` mode)."""
        n = len(self.raw_splits["train"].classes)
        if self.mode == "pretrain":
            return TaskProtocol(np.arange(n), [n])
        return make_protocol(n, self.num_tasks, self.task_imbalance, self.protocol_seed)

    @property
    def num_classes(self) -> int:
        """All classes of the stream (the continual classes; the pretraining classes in ``pretrain`` mode)."""
        if "protocol" not in self.__dict__:  # generated sets: known without generating them
            if self.mode == "pretrain" and not self.pretrain_path:
                return self.generated_pretrain["n_classes"]
            if self.mode != "pretrain" and self.source == "generated":
                return self.generated["n_classes"]
        return self.protocol.num_classes

    @property
    def classes_per_task(self) -> list[int]:
        """Classes of each fit of the stream: the protocol's tasks (``continual``), one fit of every
        class (``joint``, the upper bound) or of every pretraining class (``pretrain``).
        ``task_of_class`` keeps the protocol's tasks in every mode (for per-task reports)."""
        if self.mode == "joint":
            return [self.num_classes]
        return list(self.protocol.classes_per_task)

    @property
    def task_offset(self) -> int:
        """First incremental id of the current task (task-local label = label - task_offset)."""
        return 0 if self.mode != "continual" else int(self.protocol.offsets[self.task])

    @property
    def task_classes(self) -> range:
        """Incremental ids the current task trains on (every class in ``joint`` / ``pretrain`` mode)."""
        return self.protocol.task_classes(self.task) if self.mode == "continual" else range(self.num_classes)

    @property
    def seen_classes(self) -> int:
        """Classes evaluated after the current task (0..seen_classes-1)."""
        return self.protocol.seen_classes(self.task) if self.mode == "continual" else self.num_classes

    @property
    def class_names(self) -> list[str]:
        """Class names by incremental id."""
        names = self.raw_splits["train"].classes
        return [names[c] for c in self.protocol.class_order]

    @property
    def task_of_class(self) -> np.ndarray:
        return self.protocol.task_of_class

    @property
    def class_counts(self) -> np.ndarray:
        """Training images per incremental id (Balanced Softmax priors; head/medium/tail groups)."""
        return self.raw_splits["train"].counts()[self.protocol.class_order]

    @property
    def task_class_counts(self) -> np.ndarray:
        """Training images of the current task's classes, in task-local order."""
        r = self.task_classes
        return self.class_counts[r.start : r.stop]

    # ----- splits -----------------------------------------------------------------------------
    def _dataset(self, split: str, classes: range, train: bool) -> FoodImages:
        images = self.raw_splits[split]
        inc = self.protocol.to_incremental(images.labels)
        keep = np.flatnonzero((inc >= classes.start) & (inc < classes.stop))
        sub = images.subset(keep)
        transform = _transforms(self.image_size, train and self.augment, self.mean, self.std)
        return FoodImages(sub, inc[keep], self.protocol.task_of_class[inc[keep]], transform, self.cache_images)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        seen = range(0, self.seen_classes)
        raw = self.raw_splits
        self.splits["train"] = self._dataset("train", self.task_classes, train=True)
        if "test" in raw:
            self.splits["test"] = self._dataset("test", seen, train=False)
        if "val" in raw:
            self.splits["val"] = self._dataset("val", seen, train=False)
        else:
            fallback = "test" if "test" in raw else "training"
            warnings.warn(f"{raw['train'].source}: no validation split; validating on the {fallback} images", stacklevel=2)
            self.splits["val"] = self.splits["test"] if "test" in raw else self._dataset("train", seen, train=False)
        self.splits.setdefault("test", self.splits["val"])
        for name, ds in self.splits.items():
            self.record_split(name, ds.ids)
        self.record_split("protocol", [f"{i}:{n}:task{t}" for i, (n, t) in enumerate(zip(self.class_names, self.task_of_class))])

    def prototype_dataloader(self, tasks: Sequence[int] | None = None) -> DataLoader:
        """Training images of ``tasks`` (default: the current one), without augmentation, in order.

        For class prototypes: the current task's after a merge, or every seen task's to refresh old
        prototypes (which needs the old data, so it is an option, not the exemplar-free default).
        In ``joint`` and ``pretrain`` mode: every class of the fit.
        """
        if self.mode != "continual":  # one fit of every class: its prototypes are every class's
            parts = [self._dataset("train", self.task_classes, train=False)]
        else:
            tasks = [self.task] if tasks is None else list(tasks)
            offsets = self.protocol.offsets
            parts = [self._dataset("train", range(int(offsets[t]), int(offsets[t + 1])), train=False) for t in tasks]
        ds = parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
