"""Radiology VQA data: the Dataset and its collate, and the DataModules (VQA items; image-report
pairs for CLIP pretraining) over the generated set, MIMIC-CXR-JPG, LLaVA JSON, VQA-RAD or SLAKE.

The readers (``readers.py``) turn every format into :class:`VQARecord` s; splits are by patient
(``suite.data.split_by_group``; MIMIC-CXR-JPG's official split file when present, which the
generated set carries); the reference code's HAM10000 conversion splits per question row, so one
image's questions land in several splits. VQA-RAD and SLAKE have no patient ids, so an image is
its own group there.
Unknown demographics keep group id -1: such items count overall but in no group, and the fairness
terms skip them. Tokenisation is not done here: :meth:`RadiologyVQAData.set_chat_encoder` plugs
the chat encoder (suite.chat) into the collate.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from suite.checkpoint import ResumableDataLoader
from suite.data import SuiteDataModule, cached, generated_dir, split_by_group

from .fairness import GroupBalancedSampler, group_balanced_weights
from .questions import FINDINGS, report_sections, report_text
from .readers import (  # noqa: F401  (re-exported: the readers are part of the data API)
    IMAGE_TOKEN,
    RadiologyDataError,
    VQARecord,
    mimic_vqa_records,
    read_llava,
    read_mimic_cxr,
    read_slake,
    read_vqa_rad,
)
from .synth import ATTRIBUTES, GENERATOR_VERSION, SynthConfig, generate_mimic


# ---------------------------------------------------------------------------------------------
# datasets
def load_image(path: Path, size: int) -> np.ndarray:
    """RGB uint8 (size, size, 3): grayscale replicated, resized square (bilinear)."""
    im = Image.open(path).convert("RGB")
    if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    return np.asarray(im)


class _Images:
    def __init__(self, size: int, cache: bool) -> None:
        self.size, self.cache, self.store = size, cache, {}

    def __call__(self, path: Path) -> torch.Tensor:
        arr = self.store.get(path)
        if arr is None:
            arr = load_image(path, self.size)
            if self.cache:
                self.store[path] = arr
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


class GroupCodes:
    """Group names <-> ids per attribute, and one combined id over ``balance_on`` (for resampling / DRO)."""

    def __init__(self, vocab: dict[str, tuple[str, ...]], balance_on: Sequence[str]) -> None:
        self.vocab, self.balance_on = vocab, tuple(balance_on)
        self.num_groups = int(np.prod([len(vocab[a]) for a in self.balance_on])) if self.balance_on else 1

    def ids(self, groups: dict[str, str]) -> dict[str, int]:
        return {a: self.vocab[a].index(groups[a]) if groups.get(a) else -1 for a in self.vocab}

    def combined(self, ids: dict[str, int]) -> int:
        g = 0
        for a in self.balance_on:
            if ids[a] < 0:
                return -1
            g = g * len(self.vocab[a]) + ids[a]
        return g

    def names(self) -> list[str]:
        """Name of each combined group, e.g. ``age=<45,sex=male``."""
        out = [""]
        for a in self.balance_on:
            out = [f"{p},{a}={v}".lstrip(",") for p in out for v in self.vocab[a]]
        return out


class RadiologyVQA(Dataset):
    """VQA items; see :meth:`__getitem__` for the schema."""

    def __init__(self, records: list[VQARecord], codes: GroupCodes, image_size: int = 64, cache_images: bool = True) -> None:
        self.records, self.codes, self.images = records, codes, _Images(image_size, cache_images)

    def __len__(self) -> int:
        return len(self.records)

    def group(self, i: int) -> int:
        return self.codes.combined(self.codes.ids(self.records[i].groups))

    def __getitem__(self, i: int) -> dict[str, Any]:
        """``image`` float (3, H, W) in [0, 1]; ``messages`` (user turn with ``<image>``, assistant
        answer); ``question``, ``answer``, ``question_type`` (closed / open), ``topic``; ``groups``
        (attribute -> name, '' unknown), ``group_ids`` (attribute -> id, -1 unknown), ``group``
        (combined id over ``balance_on``); ``findings`` float (4,) 1 / 0 / NaN in FINDINGS order;
        ``patient_id``, ``id``, ``image_path`` (the file read)."""
        r = self.records[i]
        ids = self.codes.ids(r.groups)
        return {"image": self.images(r.image), "messages": [dict(m) for m in r.messages], "question": r.question,
                "answer": r.answer, "question_type": r.question_type, "topic": r.topic, "groups": dict(r.groups),
                "group_ids": ids, "group": self.codes.combined(ids),
                "findings": torch.tensor([r.findings.get(f, float("nan")) for f in FINDINGS], dtype=torch.float32),
                "patient_id": r.patient_id, "id": r.id, "image_path": str(r.image)}


class VQACollate:
    """Stack images and metadata; ``encode`` (set by the model: suite.chat's chat encoder) turns the
    batch's messages into token tensors (input_ids, attention_mask, labels, ...) merged into the batch."""

    def __init__(self, encode: Callable[[list[list[dict[str, str]]]], dict[str, torch.Tensor]] | None = None) -> None:
        self.encode = encode

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {"image": torch.stack([it["image"] for it in items])}
        for k in ("messages", "question", "answer", "question_type", "topic", "patient_id", "id", "image_path"):
            batch[k] = [it[k] for it in items]
        batch["closed"] = torch.tensor([it["question_type"] == "closed" for it in items])
        batch["groups"] = {a: [it["groups"][a] for it in items] for a in items[0]["groups"]}
        batch["group_ids"] = {a: torch.tensor([it["group_ids"][a] for it in items]) for a in items[0]["group_ids"]}
        batch["group"] = torch.tensor([it["group"] for it in items])
        batch["findings"] = torch.stack([it["findings"] for it in items])
        if self.encode is not None:  # the chat encoding plugs in here
            batch.update(self.encode(batch["messages"]))
        return batch


class ReportPairs(Dataset):
    """(image, report) pairs, one per image, for contrastive pretraining: ``{"image", "text", "id"}``."""

    def __init__(self, paths: list[Path], texts: list[str], ids: list[str], image_size: int = 64,
                 cache_images: bool = True) -> None:
        self.paths, self.texts, self.ids, self.images = paths, texts, ids, _Images(image_size, cache_images)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images(self.paths[i]), "text": self.texts[i], "id": self.ids[i]}


# ---------------------------------------------------------------------------------------------
class RadiologyVQAData(SuiteDataModule):
    """Chest radiograph VQA from the generator (default), MIMIC-CXR-JPG, LLaVA JSON, VQA-RAD or SLAKE.

    Args:
        source: ``generated``, ``mimic``, ``llava``, ``vqa_rad`` or ``slake``.
        path: ``mimic``: the MIMIC-CXR-JPG root; otherwise a QA file (split by patient with
            ``fractions``) or split name -> file, e.g. ``{train: train.json, val: validation.json,
            test: test.json}``.
        image_folder: where QA files' image paths start (default: beside the file; SLAKE ``imgs/``,
            VQA-RAD ``VQA_RAD Image Folder/``).
        demographics: ``mimic``: the sidecar CSV (subject_id[, study_id], gender, anchor_age|age, race).
        qa_file: ``mimic``: a LLaVA JSON of questions about its images (default: templated from labels).
        n_patients, max_studies, image_size, generator_seed, real_table, lung_masks: the generated set
            (see ``synth.SynthConfig``); ``image_size`` also resizes real images.
        bias_attribute, bias_group, bias_finding, bias_strength, bias_mode, artefact_rate: the
            planted training bias of the generated set (``synth`` module docstring).
        attributes: demographic attributes carried per item (the fairness terms' labels).
        balance_on: attributes whose combinations define ``group`` (resampling, group DRO; default:
            ``attributes``).
        resample: ``none`` or ``group`` (group-balanced sampling of training items, with replacement).
        question_types: which answers to keep (``closed``, ``open``).
        fractions, split_seed: patient split of a single QA file or of MIMIC without a split file.
    """

    def __init__(self, source: str = "generated", path: str | dict[str, str] | None = None, image_folder: str | None = None,
                 demographics: str | None = None, qa_file: str | None = None, n_patients: int = 150, max_studies: int = 3,
                 image_size: int = 64, generator_seed: int = 0, real_table: str = "auto", lung_masks: bool = True,
                 bias_attribute: str = "sex", bias_group: str = "female", bias_finding: str = "cardiomegaly",
                 bias_strength: float = 0.8, bias_mode: str = "both", artefact_rate: float = 0.1,
                 attributes: Sequence[str] = ("age", "sex", "race"), balance_on: Sequence[str] | None = None,
                 resample: str = "none", question_types: Sequence[str] = ("closed", "open"),
                 fractions: dict[str, float] | None = None, split_seed: int = 0, cache_images: bool = True,
                 batch_size: int = 8, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        if source not in ("generated", "mimic", "llava", "vqa_rad", "slake"):
            raise ValueError(f"source must be generated, mimic, llava, vqa_rad or slake, got {source!r}")
        if source != "generated" and not path:
            raise ValueError(f"source={source!r} needs `path` (a folder for mimic, a QA file or split -> file otherwise)")
        if resample not in ("none", "group"):
            raise ValueError(f"resample must be 'none' or 'group', got {resample!r}")
        bad = [a for a in [*attributes, *(balance_on or ())] if a not in ATTRIBUTES]
        if bad or set(question_types) - {"closed", "open"}:
            raise ValueError(f"attributes / balance_on must be among {list(ATTRIBUTES)} and question_types among closed, open; "
                             f"got {list(attributes)}, {balance_on}, {list(question_types)}")
        self.source, self.path, self.image_folder = source, path, image_folder
        self.demographics, self.qa_file = demographics, qa_file
        self.synth = SynthConfig(n_patients=n_patients, max_studies=max_studies, size=image_size, seed=generator_seed,
                                 real_table=real_table, lung_masks=lung_masks, bias_attribute=bias_attribute,
                                 bias_group=bias_group, bias_finding=bias_finding, bias_strength=bias_strength,
                                 bias_mode=bias_mode, artefact_rate=artefact_rate)
        self.image_size, self.generator_seed, self.bias_strength = image_size, generator_seed, bias_strength
        self.attributes, self.resample = tuple(attributes), resample
        self.balance_on = tuple(balance_on) if balance_on is not None else self.attributes
        self.question_types, self.split_seed, self.cache_images = tuple(question_types), split_seed, cache_images
        self.fractions = fractions or {"train": 0.7, "val": 0.15, "test": 0.15}
        self.codes: GroupCodes | None = None
        self.encode: Callable | None = None

    # -- sources ----------------------------------------------------------------------------
    def generated_root(self) -> Path:
        """The generated set, built once under ``data/generated/radiology_vqa`` (keyed by its whole config)."""
        cfg = {**asdict(self.synth), "table": self.synth.table(), "version": GENERATOR_VERSION}
        key = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
        name = f"mimic_v{GENERATOR_VERSION}_n{self.synth.n_patients}_s{self.synth.size}_seed{self.synth.seed}_{key}"
        return cached(generated_dir("radiology_vqa") / name, lambda tmp: generate_mimic(tmp, self.synth))

    def mimic_images(self) -> tuple[pd.DataFrame, Path]:
        if self.source == "generated":
            root = self.generated_root()
            return read_mimic_cxr(root, root / "demographics.csv"), root
        root = Path(self.path)
        return read_mimic_cxr(root, self.demographics), root

    def _split_records(self) -> dict[str, list[VQARecord]]:
        if self.source in ("generated", "mimic"):
            images, root = self.mimic_images()
            qa = root / "vqa.json" if self.source == "generated" else self.qa_file
            records = mimic_vqa_records(images, qa, root, seed=self.split_seed)
            if "split" in images.columns and images["split"].notna().all():
                split_of = {str(p): s for p, s in zip(images["path"], images["split"])}
                return {s: [r for r in records if split_of[str(r.image)] == s] for s in ("train", "val", "test")}
            return self._by_patient(records)
        reader = {"llava": read_llava, "vqa_rad": read_vqa_rad, "slake": read_slake}[self.source]
        if isinstance(self.path, dict):
            return {name: reader(p, self.image_folder) for name, p in self.path.items()}
        return self._by_patient(reader(self.path, self.image_folder))

    def _by_patient(self, records: list[VQARecord]) -> dict[str, list[VQARecord]]:
        idx = split_by_group([r.patient_id for r in records], self.fractions, self.split_seed)
        return {name: [records[i] for i in ix] for name, ix in idx.items()}

    # -- setup ------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        parts = self._split_records()
        if "train" not in parts or "val" not in parts:
            raise ValueError(f"data.path needs train and val splits (or one file to split by patient), got {sorted(parts)}")
        parts = {k: [r for r in v if r.question_type in self.question_types] for k, v in parts.items()}
        if self.source == "generated":
            vocab = {a: ATTRIBUTES[a] for a in self.attributes}
        else:  # group names as they occur in the data, sorted, so ids agree across splits
            vocab = {a: tuple(sorted({r.groups.get(a, "") for v in parts.values() for r in v} - {""})) for a in self.attributes}
        self.codes = GroupCodes(vocab, self.balance_on)
        for name, recs in parts.items():
            for r in recs:
                r.groups = {a: r.groups.get(a, "") for a in self.attributes}
            self.splits[name] = RadiologyVQA(recs, self.codes, self.image_size, self.cache_images)
            self.record_split(name, [f"{r.patient_id}:{r.id}" for r in recs])
        if "test" not in self.splits:
            self.splits["test"] = self.splits["val"]
            self.record_split("test", [f"{r.patient_id}:{r.id}" for r in self.splits["val"].records])
        self.splits.setdefault("predict", self.splits["test"])

    @property
    def attribute_classes(self) -> dict[str, int]:
        """Number of groups per attribute (one CLUB classifier each), e.g. for a model argument
        linked at instantiation. Fixed for the generated set; real data is read (setup) to find them."""
        return {a: len(v) for a, v in self._codes().vocab.items()}

    @property
    def num_groups(self) -> int:
        """Number of combined groups over ``balance_on`` (group DRO's weights)."""
        return self._codes().num_groups

    def _codes(self) -> GroupCodes:
        if self.codes is None:
            if self.source == "generated":
                return GroupCodes({a: ATTRIBUTES[a] for a in self.attributes}, self.balance_on)
            self.setup()
        return self.codes

    def set_chat_encoder(self, encode: Callable[[list[list[dict[str, str]]]], dict[str, torch.Tensor]] | None) -> None:
        """Plug the chat encoder (messages -> token tensors) into every loader's collate."""
        self.encode = encode

    # -- loaders ----------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        collate = VQACollate(self.encode)
        if self.resample == "none":
            return self.loader("train", shuffle=True, collate_fn=collate)
        ds = self._split("train")
        weights = group_balanced_weights(torch.tensor([ds.group(i) for i in range(len(ds))]))
        # resumable like every suite training loader: a mid-epoch resume continues at the next batch
        return ResumableDataLoader(ds, batch_size=self.batch_size, sampler=GroupBalancedSampler(weights, seed=self.seed),
                                   num_workers=self.num_workers, persistent_workers=self.num_workers > 0, collate_fn=collate)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val", collate_fn=VQACollate(self.encode))

    def test_dataloader(self) -> DataLoader:
        return self.loader("test", collate_fn=VQACollate(self.encode))

    def predict_dataloader(self) -> DataLoader:
        return self.loader("predict", collate_fn=VQACollate(self.encode))


class RadiologyReportData(RadiologyVQAData):
    """(radiograph, report) pairs of the same sources (generated or MIMIC-CXR-JPG), one per image,
    for CLIP pretraining: batches ``{"image": float (B, 3, H, W) in [0, 1], "text": list[str], "id"}``.
    Text: FINDINGS + IMPRESSION of the study's report file, else a report templated from its labels."""

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if self.source not in ("generated", "mimic"):
            raise ValueError(f"report pairs need radiology reports: source must be generated or mimic, got {self.source!r}")
        images, _ = self.mimic_images()
        texts = []
        for i, row in enumerate(images.itertuples()):
            if Path(row.report).is_file():
                texts.append(report_sections(Path(row.report).read_text()))
            else:
                findings = {f: float(getattr(row, f)) for f in FINDINGS}
                rng = np.random.default_rng([self.split_seed, i])
                texts.append(report_sections(report_text(rng, findings, row.ViewPosition)))
        images = images.assign(text=texts)
        if "split" in images.columns and images["split"].notna().all():
            parts = {s: images[images["split"] == s] for s in ("train", "val", "test")}
        else:
            idx = split_by_group(images["subject_id"].to_numpy(), self.fractions, self.split_seed)
            parts = {s: images.iloc[ix] for s, ix in idx.items()}
        for name, part in parts.items():
            ids = [f"{s}:{d}" for s, d in zip(part["subject_id"], part["dicom_id"])]
            self.splits[name] = ReportPairs(list(part["path"]), list(part["text"]), ids, self.image_size, self.cache_images)
            self.record_split(name, ids)
        self.splits.setdefault("predict", self.splits["test"])

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.loader("predict")
