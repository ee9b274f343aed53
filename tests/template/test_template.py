"""The template domain through the CLI, as docs/extending.md tells a domain team to test theirs:
reader and generator, fit (prerequisite + stages), test and predict on the last stage."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from suite.cli import main
from suite.data import DataFormatError
from tests.template.data import TemplateData, generate, read_samples, write_samples

YAML = str(Path(__file__).with_name("template.yaml"))


def test_reader_roundtrip_and_bad_files(tmp_path: Path) -> None:
    ids, groups, labels, x = generate(12, 3, 4, seed=1)
    write_samples(tmp_path / "s.csv", ids, groups, labels, x)
    got = read_samples(tmp_path / "s.csv")
    assert list(got[0]) == ids and np.array_equal(got[2], labels) and np.allclose(got[3], x, atol=1e-6)
    bad = tmp_path / "bad.csv"
    bad.write_text((tmp_path / "s.csv").read_text().replace("id,group", "idx,group"))
    with pytest.raises(DataFormatError, match=r"bad.csv: field 'id': missing"):
        read_samples(bad)
    bad.write_text((tmp_path / "s.csv").read_text().replace(f"{x[2, 1]:.6f}", "nan", 1))
    with pytest.raises(DataFormatError, match=r"row 3 holds NaN"):
        read_samples(bad)


@pytest.mark.slow
def test_fit_runs_the_prerequisite_and_stages_then_test_and_predict_use_the_last_stage(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    fit = main(["fit", "--config", YAML, "--trainer.default_root_dir", str(root)])
    assert sorted(fit.stage_results["stages"]) == ["lora", "probe"]
    probe = torch.load(root / "probe" / "checkpoints" / "last.ckpt", weights_only=True)
    assert "prerequisites/pretrained-" in probe["hyper_parameters"]["init_from"]  # built once, cached
    assert fit.stage_results["stages"]["lora"]["test"]["test/acc"] > 0.6  # 3 well separated classes
    test = main(["test", "--config", YAML, "--trainer.default_root_dir", str(root), "--ckpt_path", "last"])
    assert test.trainer.callback_metrics["test/acc"] == pytest.approx(fit.stage_results["stages"]["lora"]["test"]["test/acc"])
    main(["predict", "--config", YAML, "--trainer.default_root_dir", str(root), "--ckpt_path", "last"])
    rows = list(csv.DictReader(open(root / "lora" / "predictions" / "predictions.csv")))
    dm = TemplateData()
    dm.setup()
    assert len(rows) == len(dm.splits["test"])  # predict reads the test split when there is no predict split
    acc = np.mean([r["label"] == r["pred"] for r in rows])
    assert acc == pytest.approx(float(test.trainer.callback_metrics["test/acc"]), abs=1e-6)
