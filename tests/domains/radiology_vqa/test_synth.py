"""The generator: determinism, the planted bias (present in training, absent in validation and
test, measured), patient-level splits, findings that show where they should, real tables."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from domains.radiology_vqa import synth
from domains.radiology_vqa.phantom import Exam, patient_anatomy, render
from domains.radiology_vqa.questions import FINDINGS, report_sections
from domains.radiology_vqa.synth import PRIORS, SynthConfig, build_cohort, generate_mimic

HAS_XRV = synth.xrv_data_dir() is not None


def _digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_set(tmp_path):
    cfg = SynthConfig(n_patients=8, size=32, real_table="priors")
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        generate_mimic(tmp_path / name, cfg)
    a = _digest(tmp_path / "a")
    assert a == _digest(tmp_path / "b") and len([k for k in a if k.endswith(".jpg")]) >= 8
    (tmp_path / "c").mkdir()
    generate_mimic(tmp_path / "c", SynthConfig(n_patients=8, size=32, real_table="priors", seed=1))
    c = _digest(tmp_path / "c")
    images = lambda d: {v for k, v in d.items() if k.endswith(".jpg")}  # noqa: E731
    assert not images(a) & images(c)  # no image in common (short reports may coincide)
    assert a["vqa.json"] != c["vqa.json"] and a["demographics.csv"] != c["demographics.csv"]


def _rates(cohort: pd.DataFrame, cfg: SynthConfig) -> dict[str, dict[str, float]]:
    """P(bias finding | group) - P(.. | others) and the same for the marker, per split."""
    attr = {"age": "age_band", "sex": "sex", "race": "race"}[cfg.bias_attribute]
    out = {}
    for split, part in cohort.groupby("split"):
        g = part[attr] == cfg.bias_group
        out[split] = {"finding": part.loc[g, cfg.bias_finding].mean() - part.loc[~g, cfg.bias_finding].mean(),
                      "marker": part.loc[g, "artefact"].mean() - part.loc[~g, "artefact"].mean(),
                      "marker_rate": part["artefact"].mean()}
    return out


NIH = pytest.param("nih", marks=pytest.mark.skipif(not HAS_XRV, reason="torchxrayvision is not installed"))


@pytest.mark.parametrize("table", ["priors", NIH])
def test_planted_bias_in_train_only(table):
    cfg = SynthConfig(n_patients=1500, real_table=table, bias_strength=0.7)
    r = _rates(build_cohort(cfg), cfg)
    # train: the finding follows the group with probability s on top of the natural rates
    assert r["train"]["finding"] > 0.6 and r["train"]["marker"] > 0.6
    # val / test (~ 500 studies each): no planted association; 4 standard errors ~ 0.18
    for split in ("val", "test"):
        assert abs(r[split]["finding"]) < 0.18 and abs(r[split]["marker"]) < 0.12
        assert r[split]["marker_rate"] == pytest.approx(cfg.artefact_rate, abs=0.05)
    unbiased = SynthConfig(n_patients=1500, real_table=table, bias_strength=0.0)
    assert abs(_rates(build_cohort(unbiased), unbiased)["train"]["marker"]) < 0.08


def test_bias_modes_and_other_attributes():
    cfg = SynthConfig(n_patients=1200, real_table="priors", bias_attribute="age", bias_group=">65",
                      bias_finding="effusion", bias_mode="prevalence", bias_strength=1.0)
    r = _rates(build_cohort(cfg), cfg)
    assert r["train"]["finding"] == pytest.approx(1.0) and abs(r["train"]["marker"]) < 0.08
    cfg = SynthConfig(n_patients=1200, real_table="priors", bias_attribute="race", bias_group="Black", bias_mode="artefact")
    r = _rates(build_cohort(cfg), cfg)
    assert abs(r["train"]["finding"]) < 0.12 and r["train"]["marker"] > 0.7
    with pytest.raises(ValueError, match="bias_group for sex must be one of"):
        SynthConfig(bias_group="old")


def test_splits_are_by_patient_and_cover_the_fractions():
    cohort = build_cohort(SynthConfig(n_patients=300, real_table="priors"))
    owners = cohort.groupby("subject_id")["split"].nunique()
    assert (owners == 1).all()
    shares = cohort["split"].value_counts(normalize=True)
    assert shares["train"] == pytest.approx(0.7, abs=0.05) and shares["test"] == pytest.approx(0.15, abs=0.05)
    assert cohort["study_id"].is_unique and cohort["dicom_id"].is_unique and cohort["subject_id"].between(1e7, 2e7 - 1).all()


def _region(img, rows, cols):
    n = img.shape[0]
    return img[int(rows[0] * n) : int(rows[1] * n), int(cols[0] * n) : int(cols[1] * n)].astype(float).mean()


@pytest.mark.parametrize("seed, sex", [(0, "male"), (1, "female"), (2, "male")])
def test_findings_show_where_they_should(seed, sex):
    # each finding has its own random stream and the noise field is shared, so the same patient and
    # exam with and without a finding differ only where the finding is
    def shot(view="PA", **kw):
        anatomy = patient_anatomy(np.random.default_rng(seed), 50, sex)
        return render(np.random.default_rng([seed, 1]), anatomy, Exam(view, **kw), 64)

    right_lung, left_lung = ((0.1, 0.6), (0.05, 0.45)), ((0.1, 0.6), (0.55, 0.95))
    base, g0 = shot()
    diff = lambda img, rows, cols: _region(img, rows, cols) - _region(base, rows, cols)  # noqa: E731
    big, g1 = shot(cardiomegaly=True)
    assert g0["ctr_true"] < 0.5 < g1["ctr_true"]
    assert diff(big, (0.45, 0.62), (0.6, 0.75)) > 12  # the heart's left border moves into the left lung field
    eff = shot(effusion="right")[0]
    assert diff(eff, (0.55, 0.68), (0.1, 0.35)) > 8 and abs(diff(eff, *left_lung)) < 1  # the right base whitens
    opac = shot(opacity=("left", "middle"))[0]
    assert diff(opac, (0.4, 0.55), (0.6, 0.8)) > 12 and abs(diff(opac, *right_lung)) < 1
    ptx, gp = shot(pneumothorax="right")
    assert gp["pneumothorax_px"] > 0.01 * 64 * 64
    assert diff(ptx, *right_lung) < -5 and abs(diff(ptx, *left_lung)) < 1  # air without lung: darker
    marked = shot(artefact=True)[0]
    assert diff(marked, (0.05, 0.1), (0.66, 0.9)) > 40 and diff(marked, *right_lung) == 0
    ap, ga = shot(view="AP")
    assert ga["ctr_projected"] == pytest.approx(1.15 * ga["ctr_true"], rel=1e-3)
    def noise(im):  # high-pass residual over the uniform upper abdomen
        im = im.astype(float)
        return (im - ndi.gaussian_filter(im, 1.5))[52:62, 22:42].std()

    assert noise(ap) > 1.2 * noise(base)  # a portable film: lower dose, no grid


def test_written_layout_and_truth(tmp_path):
    cfg = SynthConfig(n_patients=20, size=32, real_table="priors", bias_strength=1.0)
    generate_mimic(tmp_path, cfg)
    meta = pd.read_csv(tmp_path / "mimic-cxr-2.0.0-metadata.csv")
    labels = pd.read_csv(tmp_path / "mimic-cxr-2.0.0-chexpert.csv")
    truth = pd.read_csv(tmp_path / "truth.csv")
    split = pd.read_csv(tmp_path / "mimic-cxr-2.0.0-split.csv")
    assert set(split["split"]) <= {"train", "validate", "test"} and len(meta) == len(truth) == len(split)
    assert {"dicom_id", "subject_id", "study_id", "ViewPosition", "Rows", "Columns", "StudyDate"} <= set(meta.columns)
    merged = meta.merge(labels, on=["subject_id", "study_id"]).merge(truth, on="dicom_id")
    assert ((merged["Cardiomegaly"] == 1) == (merged["ctr_true"] > 0.5)).all()  # labels match the rendered heart
    assert ((merged["ViewPosition"] == "AP") == (merged["ctr_projected"] > merged["ctr_true"] + 1e-6)).all()
    report = (tmp_path / synth.study_path(meta.subject_id[0], meta.study_id[0])).with_suffix(".txt").read_text()
    assert "FINDINGS:" in report and "IMPRESSION:" in report and len(report_sections(report)) > 20
    vqa = json.loads((tmp_path / "vqa.json").read_text())
    assert {q["answer_type"] for q in vqa} == {"CLOSED", "OPEN"} and all((tmp_path / q["image"]).is_file() for q in vqa)
    info = json.loads((tmp_path / "generator.json").read_text())
    assert info["table"] == "priors" and info["config"]["bias_strength"] == 1.0


@pytest.mark.skipif(not HAS_XRV, reason="torchxrayvision is not installed")
def test_real_tables_and_the_stated_priors():
    nih = synth.read_table("nih")
    assert len(nih) > 100_000 and nih["age"].min() >= 18 and set(nih["view"]) == {"AP", "PA"}
    assert nih["cardiomegaly"].mean() == pytest.approx(0.025, abs=0.005)  # NIH's published 2.5 %
    estimate = synth.estimate_priors(nih, n=20000, seed=0)
    for key, values in PRIORS.items():  # the hard-coded fallback is what the table gives
        assert np.allclose(values, estimate[key], atol=0.002), key
    chx = synth.read_table("chexpert")
    assert set(chx.columns) == set(nih.columns) and (chx["view"] == "AP").mean() > 0.7
    masks = synth.lung_mask_pool(np.random.default_rng(0), 32, synth.xrv_data_dir(), n=4)
    assert len(masks) == 4 and all(set(np.unique(m)) == {0, 1, 2} for m in masks)


def test_real_table_needs_torchxrayvision(monkeypatch):
    monkeypatch.setattr(synth, "xrv_data_dir", lambda: None)
    assert SynthConfig().table() == "priors"
    with pytest.raises(FileNotFoundError, match="pip install --no-deps torchxrayvision"):
        SynthConfig(real_table="nih").table()
    assert FINDINGS == ("cardiomegaly", "effusion", "opacity", "pneumothorax")
