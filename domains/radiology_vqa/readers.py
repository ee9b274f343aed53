"""Readers of radiology VQA data: LLaVA conversations, VQA-RAD, SLAKE and MIMIC-CXR-JPG (with a
demographics sidecar), into one record type; bad input raises :class:`RadiologyDataError`.

Formats read as published (checked against the official loaders / descriptions named in
``data/README.md``):

* **LLaVA conversations** (Liu et al. 2023; LLaVA-Med, LLaVA-Rad): a JSON list or JSONL of
  ``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt",
  "value": ...}, ...]}``; turns alternate human / gpt, the first human turn holds one ``<image>``
  (moved to the front, as LLaVA's ``preprocess_multimodal`` does). Optional fields the reference
  code's JSONs carry: ``gender``, ``anchor_age``, ``anchor_age_group`` (0/1/2), ``race_major``,
  ``subject_id``, ``study_id``, ``answer_type``, ``question_type``.
* **VQA-RAD** (Lau et al. 2018, ``VQA_RAD Dataset Public.json``): entries with ``image_name``,
  ``question``, ``answer`` (string or number), ``answer_type`` (``CLOSED`` / ``OPEN``, sometimes
  with stray spaces or lower case), ``question_type``; images in ``VQA_RAD Image Folder/``.
* **SLAKE** (Liu et al. 2021, ``train.json`` / ``validation.json`` / ``test.json``): entries with
  ``img_id``, ``img_name`` (``xmlab<id>/source.jpg`` under ``imgs/``), ``question``, ``answer``,
  ``answer_type``, ``q_lang`` (``en`` / ``zh``: one language is read), ``content_type``.
* **MIMIC-CXR-JPG 2.0.0** (Johnson et al. 2019): ``files/p<first two digits>/p<subject_id>/
  s<study_id>/<dicom_id>.jpg``, ``mimic-cxr-2.0.0-metadata.csv[.gz]`` (``dicom_id, subject_id,
  study_id, ViewPosition, ...``), ``mimic-cxr-2.0.0-chexpert.csv[.gz]`` (CheXpert labeler: 1.0,
  0.0, -1.0 uncertain, blank), optional ``mimic-cxr-2.0.0-split.csv[.gz]`` (``train / validate /
  test``), reports ``files/pXX/pXXXXXXXX/sXXXXXXXX.txt`` (MIMIC-CXR), and a demographics sidecar
  CSV keyed by ``subject_id`` (optionally ``study_id``) with ``gender``, ``anchor_age`` or
  ``age``, and ``race`` (MIMIC-IV strings). Labels join on (subject_id, study_id) and "No
  Finding" = 1 turns blanks into negatives, as torchxrayvision's ``MIMIC_Dataset`` does;
  uncertain labels are unknown (NaN) and no question is asked about them.

A record's patient is ``subject_id`` where the format has one, else its image (VQA-RAD, SLAKE).
Unknown demographics are '' (kept, not dropped: the reference's loaders drop such rows silently).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from suite.data import DataFormatError

from .questions import FINDINGS, questions_for_study
from .synth import AGE_BANDS, ATTRIBUTES, age_band

IMAGE_TOKEN = "<image>"
_MISSING = object()


class RadiologyDataError(DataFormatError):
    """Bad input: the message names the file, the field and the form expected (the suite's
    :class:`~suite.data.DataFormatError`, so callers catch one error type for every domain)."""

    def __init__(self, file: str | Path, field: str, expected: str, got: Any = _MISSING, where: str = "") -> None:
        at = f" ({where})" if where else ""
        seen = "" if got is _MISSING else f", got {got!r}"
        super().__init__(f"{file}{at}", field, f"expected {expected}{seen}")
        self.path = str(file)


@dataclass
class VQARecord:
    """One question about one image, with the image's patient, demographics and finding labels."""

    id: str
    image: Path
    question: str
    answer: str
    question_type: str  # "closed" or "open"
    topic: str  # what is asked: a finding, "view", VQA-RAD's question_type, SLAKE's content_type
    patient_id: str
    messages: list[dict[str, str]]
    groups: dict[str, str] = field(default_factory=dict)  # attribute -> group ("" = unknown)
    findings: dict[str, float] = field(default_factory=dict)  # finding -> 1 / 0 / NaN


# ---------------------------------------------------------------------------------------------
# demographics
RACE_PREFIXES = (("WHITE", "White"), ("BLACK", "Black"), ("ASIAN", "Asian"), ("HISPANIC", "Hispanic"),
                 ("SOUTH AMERICAN", "Hispanic"), ("AMERICAN INDIAN", "Other"), ("NATIVE HAWAIIAN", "Other"),
                 ("MULTIPLE", "Other"), ("PORTUGUESE", "White"), ("OTHER", "Other"))
RACE_UNKNOWN = ("UNKNOWN", "UNABLE TO OBTAIN", "PATIENT DECLINED TO ANSWER", "DECLINED / UNABLE TO OBTAIN", "")


def _blank(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def sex_group(v: Any, file: str | Path, field: str = "gender", where: str = "") -> str:
    """male / female from M, F, male, female, man, woman (any case); '' when blank."""
    if _blank(v):
        return ""
    s = str(v).strip().lower()
    if s in ("m", "male", "man"):
        return "male"
    if s in ("f", "female", "woman", "w"):
        return "female"
    raise RadiologyDataError(file, field, "M / F / male / female (or blank for unknown)", v, where)


def race_group(v: Any, file: str | Path, field: str = "race", where: str = "") -> str:
    """MIMIC-IV race strings (and the reference's race_major) -> Asian / Black / Hispanic / White / Other."""
    if _blank(v):
        return ""
    s = " ".join(str(v).strip().upper().split())
    if s in RACE_UNKNOWN:
        return ""
    for prefix, group in RACE_PREFIXES:
        if s.startswith(prefix):
            return group
    raise RadiologyDataError(file, field, "a MIMIC-IV race string (WHITE..., BLACK/AFRICAN AMERICAN, ASIAN..., "
                             "HISPANIC/LATINO..., OTHER, UNKNOWN, ...)", v, where)


def age_group(age: Any, band: Any, file: str | Path, where: str = "") -> str:
    """Age band from an age in years, else from the reference's anchor_age_group (0/1/2); '' when blank."""
    if not _blank(age):
        try:
            years = float(age)
        except (TypeError, ValueError):
            raise RadiologyDataError(file, "anchor_age", "an age in years", age, where) from None
        if not 0 <= years <= 120:
            raise RadiologyDataError(file, "anchor_age", "an age in years between 0 and 120", age, where)
        return age_band(years)
    if _blank(band):
        return ""
    names = {"0": AGE_BANDS[0], "1": AGE_BANDS[1], "2": AGE_BANDS[2], "young": AGE_BANDS[0], "middle": AGE_BANDS[1],
             "old": AGE_BANDS[2], **{b: b for b in AGE_BANDS}}
    key = str(int(band)) if isinstance(band, (int, float)) and float(band).is_integer() else str(band).strip().lower()
    if key not in names:
        raise RadiologyDataError(file, "anchor_age_group", f"0, 1, 2 or one of {list(AGE_BANDS)}", band, where)
    return names[key]


# ---------------------------------------------------------------------------------------------
# QA readers
def _load_json_list(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl" or not text.lstrip().startswith("["):
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
    except json.JSONDecodeError as err:
        raise RadiologyDataError(path, "(file)", "a JSON list of objects or JSON lines", f"invalid JSON: {err}") from None
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise RadiologyDataError(path, "(file)", "a JSON list of objects or JSON lines, one object each")
    return data


def _require(entry: dict, keys: Sequence[str], path: Path, where: str) -> None:
    for k in keys:
        if k not in entry:
            raise RadiologyDataError(path, k, "present", where=where)


def _image(folder: Path, name: str, path: Path, field: str, where: str) -> Path:
    if not isinstance(name, str) or not name:
        raise RadiologyDataError(path, field, "an image path relative to the image folder", name, where)
    p = folder / name
    if not p.is_file():
        raise RadiologyDataError(path, field, f"an image file under {folder}", name, where)
    return p


def _answer_type(v: Any, answer: str, path: Path, where: str) -> str:
    if _blank(v):  # LLaVA JSONs rarely say: yes/no answers are closed, the rest open
        return "closed" if answer.strip().lower() in ("yes", "no") else "open"
    s = str(v).strip().upper()
    if s not in ("CLOSED", "OPEN"):
        raise RadiologyDataError(path, "answer_type", "CLOSED or OPEN", v, where)
    return s.lower()


def _qa_messages(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{IMAGE_TOKEN}\n{question}"}, {"role": "assistant", "content": answer}]


def read_llava(path: str | Path, image_folder: str | Path | None = None) -> list[VQARecord]:
    """LLaVA conversation JSON / JSONL -> records (question and answer: the first human / gpt turn)."""
    path = Path(path)
    folder = Path(image_folder) if image_folder else path.parent
    out = []
    for i, e in enumerate(_load_json_list(path)):
        where = f"entry {i}"
        _require(e, ("id", "image", "conversations"), path, where)
        conv = e["conversations"]
        if not isinstance(conv, list) or len(conv) < 2 or len(conv) % 2:
            raise RadiologyDataError(path, "conversations", "an even number (>= 2) of alternating human / gpt turns",
                                     f"{len(conv) if isinstance(conv, list) else conv!r} turns", where)
        messages = []
        for t, turn in enumerate(conv):
            want = "human" if t % 2 == 0 else "gpt"
            if not isinstance(turn, dict) or turn.get("from") != want or not isinstance(turn.get("value"), str):
                raise RadiologyDataError(path, f"conversations[{t}]", f'{{"from": "{want}", "value": <text>}}', turn, where)
            messages.append({"role": "user" if want == "human" else "assistant", "content": turn["value"]})
        first = messages[0]["content"]
        if first.count(IMAGE_TOKEN) != 1 or any(IMAGE_TOKEN in m["content"] for m in messages[1:]):
            raise RadiologyDataError(path, "conversations[0].value",
                                     f"exactly one {IMAGE_TOKEN} placeholder, in the first human turn", first, where)
        question = first.replace(IMAGE_TOKEN, "").strip()
        messages[0]["content"] = f"{IMAGE_TOKEN}\n{question}"
        answer = messages[1]["content"].strip()
        groups = {"age": age_group(e.get("anchor_age", e.get("age")), e.get("anchor_age_group"), path, where),
                  "sex": sex_group(e.get("gender", e.get("sex")), path, "gender", where),
                  "race": race_group(e.get("race_major", e.get("race")), path, "race_major", where)}
        findings = e.get("findings") or {}
        if not isinstance(findings, dict) or set(findings) - set(FINDINGS):
            raise RadiologyDataError(path, "findings", f"an object with keys among {list(FINDINGS)}", findings, where)
        image = _image(folder, e["image"], path, "image", where)
        out.append(VQARecord(
            id=str(e["id"]), image=image, question=question, answer=answer,
            question_type=_answer_type(e.get("answer_type"), answer, path, where), topic=str(e.get("question_type", "")),
            patient_id=str(e.get("subject_id", e["image"])), messages=messages, groups=groups,
            findings={f: float(findings.get(f, float("nan"))) for f in FINDINGS}))
    return out


def read_vqa_rad(path: str | Path, image_folder: str | Path | None = None) -> list[VQARecord]:
    """VQA-RAD ``VQA_RAD Dataset Public.json`` (or a train/test file of the same entries)."""
    path = Path(path)
    folder = Path(image_folder) if image_folder else next(
        (p for p in (path.parent / "VQA_RAD Image Folder", path.parent / "images") if p.is_dir()), path.parent)
    out = []
    for i, e in enumerate(_load_json_list(path)):
        where = f"entry {i}"
        _require(e, ("image_name", "question", "answer", "answer_type"), path, where)
        if not isinstance(e["question"], str) or not isinstance(e["answer"], (str, int, float)):
            raise RadiologyDataError(path, "question / answer", "a question string and a string or number answer",
                                     e["answer"], where)
        answer, question = str(e["answer"]).strip(), e["question"].strip()
        out.append(VQARecord(
            id=str(e.get("qid", i)), image=_image(folder, e["image_name"], path, "image_name", where), question=question,
            answer=answer, question_type=_answer_type(e["answer_type"], answer, path, where),
            topic=str(e.get("question_type", "")).strip(), patient_id=str(e["image_name"]),
            messages=_qa_messages(question, answer),
            groups={a: "" for a in ATTRIBUTES}, findings={f: float("nan") for f in FINDINGS}))
    return out


def read_slake(path: str | Path, image_folder: str | Path | None = None, lang: str = "en") -> list[VQARecord]:
    """SLAKE ``train.json`` / ``validation.json`` / ``test.json``; questions in ``lang`` only."""
    path = Path(path)
    folder = Path(image_folder) if image_folder else (path.parent / "imgs" if (path.parent / "imgs").is_dir() else path.parent)
    out = []
    for i, e in enumerate(_load_json_list(path)):
        where = f"entry {i}"
        _require(e, ("img_name", "question", "answer", "answer_type", "q_lang"), path, where)
        if e["q_lang"] not in ("en", "zh"):
            raise RadiologyDataError(path, "q_lang", "en or zh", e["q_lang"], where)
        if e["q_lang"] != lang:
            continue
        answer, question = str(e["answer"]).strip(), str(e["question"]).strip()
        out.append(VQARecord(
            id=str(e.get("qid", i)), image=_image(folder, e["img_name"], path, "img_name", where), question=question,
            answer=answer, question_type=_answer_type(e["answer_type"], answer, path, where),
            topic=str(e.get("content_type", "")), patient_id=str(e.get("img_id", Path(e["img_name"]).parent)),
            messages=_qa_messages(question, answer),
            groups={a: "" for a in ATTRIBUTES}, findings={f: float("nan") for f in FINDINGS}))
    return out


# ---------------------------------------------------------------------------------------------
# MIMIC-CXR-JPG
def _csv(root: Path, name: str | Path, required: Sequence[str], optional: bool = False) -> pd.DataFrame | None:
    p = Path(name) if Path(name).is_absolute() else root / name
    if not p.is_file() and Path(f"{p}.gz").is_file():
        p = Path(f"{p}.gz")
    if not p.is_file():
        if optional:
            return None
        raise FileNotFoundError(f"{p}: not found (expected the MIMIC-CXR-JPG file {Path(name).name}[.gz])")
    df = pd.read_csv(p)
    for c in required:
        if c not in df.columns:
            raise RadiologyDataError(p, c, f"a column (have {list(df.columns)})")
    df.attrs["path"] = str(p)
    return df


def _label(values: pd.DataFrame) -> pd.Series:
    """CheXpert labels of one finding from one or more columns: 1 if any is 1, 0 if any is 0, else NaN."""
    pos, neg = (values == 1).any(axis=1), (values == 0).any(axis=1)
    return pd.Series(np.where(pos, 1.0, np.where(neg, 0.0, np.nan)), index=values.index)


CHEXPERT_OF = {"cardiomegaly": ("Cardiomegaly",), "effusion": ("Pleural Effusion",),
               "opacity": ("Lung Opacity", "Consolidation", "Pneumonia"), "pneumothorax": ("Pneumothorax",)}


def read_mimic_cxr(root: str | Path, demographics: str | Path | None = None, views: Sequence[str] = ("PA", "AP"),
                   metadata: str = "mimic-cxr-2.0.0-metadata.csv", chexpert: str = "mimic-cxr-2.0.0-chexpert.csv",
                   split: str = "mimic-cxr-2.0.0-split.csv") -> pd.DataFrame:
    """One row per image of the chosen views: ids, path, view, findings (1/0/NaN), groups, split, report."""
    root = Path(root)
    meta = _csv(root, metadata, ("dicom_id", "subject_id", "study_id", "ViewPosition"))
    meta = meta[meta["ViewPosition"].isin(list(views))].copy()
    if meta.empty:
        raise RadiologyDataError(meta.attrs["path"], "ViewPosition", f"some images with a view in {list(views)}")
    labels = _csv(root, chexpert, ("subject_id", "study_id"))
    missing = [c for cols in CHEXPERT_OF.values() for c in cols if c not in labels.columns]
    if len(missing) == sum(len(c) for c in CHEXPERT_OF.values()):
        raise RadiologyDataError(labels.attrs["path"], "Cardiomegaly, Pleural Effusion, Lung Opacity, Pneumothorax",
                                 "CheXpert labeler columns")
    for c in missing:
        labels[c] = np.nan
    healthy = labels.get("No Finding", pd.Series(np.nan, index=labels.index)) == 1
    for f, cols in CHEXPERT_OF.items():
        block = labels[list(cols)].where(~healthy.to_numpy()[:, None] | labels[list(cols)].notna(), 0.0)
        labels[f] = _label(block)
    df = meta.merge(labels[["subject_id", "study_id", *FINDINGS]], on=["subject_id", "study_id"], how="left")
    s = df["subject_id"].astype(str)
    df["path"] = [root / f"files/p{a[:2]}/p{a}/s{b}/{c}.jpg" for a, b, c in zip(s, df["study_id"], df["dicom_id"])]
    absent = [str(p) for p in df["path"] if not p.is_file()]
    if absent:
        raise FileNotFoundError(f"{len(absent)} images listed in {meta.attrs['path']} are missing under {root}/files "
                                f"(expected files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg), e.g. {absent[:3]}")
    df["report"] = [root / f"files/p{a[:2]}/p{a}/s{b}.txt" for a, b in zip(s, df["study_id"])]
    splits = _csv(root, split, ("dicom_id", "split"), optional=True)
    if splits is not None:
        bad = sorted(set(splits["split"]) - {"train", "validate", "test"})
        if bad:
            raise RadiologyDataError(splits.attrs["path"], "split", "train, validate or test", bad[0])
        df = df.merge(splits[["dicom_id", "split"]], on="dicom_id", how="left")
        df["split"] = df["split"].replace({"validate": "val"})
    groups = {a: [""] * len(df) for a in ATTRIBUTES}
    if demographics is not None:
        groups = _demographics(Path(demographics), df)
    for a, g in groups.items():
        df[a] = g
    return df.reset_index(drop=True)


def _demographics(path: Path, images: pd.DataFrame) -> dict[str, list[str]]:
    """Groups per image from a sidecar keyed by subject_id (and study_id when it has that column)."""
    demo = _csv(path.parent, path.name, ("subject_id",))
    for need in (("gender", "sex"), ("anchor_age", "age"), ("race", "ethnicity")):
        if not any(c in demo.columns for c in need):
            raise RadiologyDataError(path, " or ".join(need), f"a column (have {list(demo.columns)})")
    keys = ["subject_id", "study_id"] if "study_id" in demo.columns else ["subject_id"]
    if demo.duplicated(keys).any():
        raise RadiologyDataError(path, "+".join(keys), "unique rows", demo[demo.duplicated(keys)][keys].iloc[0].tolist())
    joined = images[keys].merge(demo, on=keys, how="left", indicator=True)
    if (joined["_merge"] != "both").any():
        lost = joined[joined["_merge"] != "both"][keys].drop_duplicates()
        raise RadiologyDataError(path, "+".join(keys), f"a row for every image's {'/'.join(keys)} ({len(lost)} missing)",
                                 lost.iloc[0].tolist())
    sex_col = "gender" if "gender" in demo.columns else "sex"
    age_col = "anchor_age" if "anchor_age" in demo.columns else "age"
    race_col = "race" if "race" in demo.columns else "ethnicity"
    where = lambda i: f"subject {joined['subject_id'].iloc[i]}"  # noqa: E731
    return {"age": [age_group(v, None, path, where(i)) for i, v in enumerate(joined[age_col])],
            "sex": [sex_group(v, path, sex_col, where(i)) for i, v in enumerate(joined[sex_col])],
            "race": [race_group(v, path, race_col, where(i)) for i, v in enumerate(joined[race_col])]}


def mimic_vqa_records(images: pd.DataFrame, qa_file: str | Path | None = None, root: str | Path | None = None,
                      seed: int = 0) -> list[VQARecord]:
    """VQA records of MIMIC images: from a LLaVA JSON whose ``image`` paths are under ``root``, or
    templated from the CheXpert labels (one closed question per known finding, view, abnormality)."""
    rows = images.to_dict("records")
    by_path = {str(r["path"]): r for r in rows}
    out = []
    if qa_file is not None:
        root = Path(root) if root is not None else Path(qa_file).parent
        for rec in read_llava(qa_file, root):
            row = by_path.get(str(rec.image))
            if row is None:
                raise RadiologyDataError(qa_file, "image", "an image of the MIMIC-CXR-JPG metadata (chosen views)",
                                         str(rec.image))
            rec.patient_id = str(row["subject_id"])
            rec.groups = {a: row[a] or rec.groups.get(a, "") for a in ATTRIBUTES}
            rec.findings = {f: float(row[f]) for f in FINDINGS}
            out.append(rec)
        return out
    for i, row in enumerate(images.itertuples()):
        rng = np.random.default_rng([seed, i])
        findings = {f: float(getattr(row, f)) for f in FINDINGS}
        for k, qa in enumerate(questions_for_study(rng, findings, row.ViewPosition)):
            out.append(VQARecord(
                id=f"{row.dicom_id}-{k}", image=row.path, question=qa["question"], answer=qa["answer"],
                question_type=qa["answer_type"].lower(), topic=qa["question_type"], patient_id=str(row.subject_id),
                messages=_qa_messages(qa["question"], qa["answer"]), groups={a: getattr(row, a) for a in ATTRIBUTES},
                findings=findings))
    return out
