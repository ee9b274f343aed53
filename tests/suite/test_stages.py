"""suite.stages: a YAML list of fits, each starting from an earlier stage's checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from suite.stages import run_stages
from tests.suite.test_cli import TOY
from tests.toy import ToyViT


def _write(tmp_path: Path, stages: list[dict]) -> Path:
    base = tmp_path / "toy.yaml"
    base.write_text(yaml.safe_dump(TOY))
    for s in stages:
        s.setdefault("configs", [str(base)])
    spec = tmp_path / "stages.yaml"
    spec.write_text(yaml.safe_dump({"root": str(tmp_path / "runs"), "stages": stages}))
    return spec


def test_stages_run_in_order_and_chain_checkpoints(tmp_path: Path) -> None:
    spec = _write(tmp_path, [
        {"name": "probe", "args": ["--model.init_args.adapter", "null"]},
        {"name": "adapt", "init_from": "probe", "test": True},
    ])
    results = run_stages(spec)
    runs = tmp_path / "runs"
    assert json.loads((runs / "stages.json").read_text()) == results
    assert "test/loss" in results["adapt"]["test"]
    cfg = yaml.safe_load((runs / "adapt" / "logs" / "version_0" / "config.yaml").read_text())
    assert cfg["model"]["init_args"]["init_from"] == str(runs / "probe" / "checkpoints" / "last.ckpt")
    # the second stage starts from the first stage's trained head
    probe_head = torch.load(runs / "probe" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]["head.weight"]
    rebuilt = ToyViT(init_from=str(runs / "probe" / "checkpoints" / "last.ckpt"))
    assert torch.equal(rebuilt.head.weight, probe_head)


def test_root_given_on_the_command_line_wins_over_the_files(tmp_path: Path) -> None:
    from suite.stages import main

    spec = _write(tmp_path, [{"name": "only", "args": ["--model.init_args.adapter", "null"]}])
    main([str(spec), "--root", str(tmp_path / "elsewhere")])
    assert (tmp_path / "elsewhere" / "only" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "runs").exists()


def test_stage_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not an earlier stage"):
        run_stages(_write(tmp_path, [{"name": "a", "init_from": "b"}, {"name": "b"}]))
    with pytest.raises(ValueError, match="unknown fields"):
        run_stages(_write(tmp_path, [{"name": "a", "epochs": 3}]))


def test_every_stage_is_checked_before_the_first_one_runs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="stage 'b' has unknown fields"):
        run_stages(_write(tmp_path, [{"name": "a"}, {"name": "b", "epochs": 3}]))
    assert not (tmp_path / "runs").exists()  # stage 'a' did not train first
    with pytest.raises(ValueError, match=r"--only names unknown stages \['c'\]"):
        run_stages(_write(tmp_path, [{"name": "a"}, {"name": "b"}]), only=["c"])
