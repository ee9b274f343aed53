"""`python -m suite`: subcommands, composable configs, run records, clear config errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from suite.cli import main

ROOT = Path(__file__).resolve().parents[2]

TOY = {
    "seed_everything": 7,
    "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "enable_progress_bar": False,
                "enable_model_summary": False},
    "model": {"class_path": "tests.toy.ToyViT",
              "init_args": {"adapter": {"class_path": "suite.adapters.LoRA",
                                        "init_args": {"r": 4, "alpha": 8, "targets": ["qkv"]}}}},
    "data": {"class_path": "tests.toy.ToyData", "init_args": {"n": 32}},
}


@pytest.fixture
def toy_yaml(tmp_path: Path) -> Path:
    cfg = json.loads(json.dumps(TOY))
    cfg["trainer"]["default_root_dir"] = str(tmp_path / "run")
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_module_entry_point_lists_the_subcommands() -> None:
    out = subprocess.run([sys.executable, "-m", "suite", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for sub in ("fit", "validate", "test", "predict"):
        assert sub in out.stdout


def test_configs_compose_domain_then_trainer_then_adapter(toy_yaml: Path, tmp_path: Path, capsys) -> None:
    adapter = tmp_path / "rslora.yaml"
    adapter.write_text(yaml.safe_dump({"model": {"init_args": {"adapter": {"init_args": {"rslora": True, "r": 16}}}}}))
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(toy_yaml), "--config", str(ROOT / "configs/trainer/ddp.yaml"),
              "--config", str(adapter), "--print_config"])
    assert exit_.value.code == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["trainer"]["strategy"]["class_path"].endswith("DDPStrategy")
    spec = cfg["model"]["init_args"]["adapter"]["init_args"]
    assert (spec["rslora"], spec["r"], spec["targets"]) == (True, 16, ["qkv"])  # domain targets kept
    assert cfg["seed_everything"] == 7


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--trainer.max_epoch", "3"], "max_epoch"),                       # unknown key
        (["--trainer.max_epochs", "many"], "max_epochs"),                 # wrong type
        (["--model.init_args.adapter.init_args.rank", "4"], "rank"),      # unknown adapter field
        (["--model.init_args.adapter.init_args.targets", "[]"], "LoRA.targets is empty"),  # typed right, refused by the class
    ],
)
def test_bad_config_fails_with_a_message_naming_the_key(toy_yaml: Path, args: list[str], needle: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(toy_yaml), *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and needle in err and "Traceback" not in err


def test_unknown_key_in_a_yaml_file_is_reported(toy_yaml: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"init_args": {"num_clases": 3}}}))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(toy_yaml), "--config", str(bad)])
    assert "num_clases" in capsys.readouterr().err


def test_run_folder_records_config_seed_versions_and_split_hashes_and_resumes(toy_yaml: Path, tmp_path: Path) -> None:
    main(["fit", "--config", str(toy_yaml)])
    run = tmp_path / "run"
    log = run / "logs" / "version_0"
    record = json.loads((log / "run.json").read_text())
    assert record["seed"] == 7
    assert set(record["split_hashes"]) == {"train", "val"} and all(len(h) == 16 for h in record["split_hashes"].values())
    assert record["packages"]["torch"] and record["packages"]["lightning"]
    assert record["parameters"]["trainable"] > 0 and record["parameters"]["method"] == "lora"
    saved = yaml.safe_load((log / "config.yaml").read_text())
    assert saved["model"]["init_args"]["adapter"]["init_args"]["targets"] == ["qkv"]
    assert (log / "metrics.csv").exists()
    assert (run / "checkpoints" / "last.ckpt").exists()

    # `--ckpt_path last` resumes (one more epoch) and `test --ckpt_path last` evaluates it
    cli = main(["fit", "--config", str(toy_yaml), "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    assert cli.trainer.current_epoch == 2 and cli.trainer.global_step == 2 * 3
    cli = main(["test", "--config", str(toy_yaml), "--ckpt_path", "last"])
    assert "test/loss" in cli.trainer.callback_metrics
    assert json.loads((run / "logs" / "version_2" / "run.json").read_text())["stage"] == "test"


def test_cli_runs_ddp_with_two_cpu_processes_and_records_the_run(toy_yaml: Path, tmp_path: Path) -> None:
    cli = main(["fit", "--config", str(toy_yaml), "--trainer.strategy", "ddp_fork", "--trainer.devices", "2"])
    assert cli.trainer.world_size == 2
    record = json.loads((tmp_path / "run" / "logs" / "version_0" / "run.json").read_text())
    assert record["world_size"] == 2 and record["strategy"] == "DDPStrategy"
