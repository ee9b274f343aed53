"""One lifecycle for every domain: init_from (recursive, key lists), prerequisites (cached by the
resolved config), linked settings, stages inside a config, adapter specs a module never injects."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from suite.adapters import LoRA, save_adapters
from suite.cli import main
from suite.module import AdaptedModule, CheckpointMismatchError
from suite.prerequisites import Prerequisite, cache_folder, resolve, run_prerequisite
from suite.stages import DONE
from tests.suite.test_cli import TOY
from tests.toy import ToyData, ToyViT

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def _yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _toy(tmp_path: Path, **extra) -> Path:
    cfg = json.loads(json.dumps(TOY)) | extra
    return _yaml(tmp_path / "toy.yaml", cfg)


def _fit(cfg: Path, root: Path, *args: str):
    return main(["fit", "--config", str(cfg), "--trainer.default_root_dir", str(root), *QUIET, *args])


# --- init_from -------------------------------------------------------------------------------------
def test_init_from_rebuilds_recursively_and_extends(tmp_path: Path) -> None:
    """probe (head only) -> lora (head + LoRA) -> more (a second fit of the LoRA model): each stage's
    checkpoint holds only what it trained, yet the last one rebuilds the whole chain."""
    cfg = _toy(tmp_path)
    probe = _fit(cfg, tmp_path / "probe", "--model.init_args.adapter", "null").trainer.checkpoint_callback.last_model_path
    lora = _fit(cfg, tmp_path / "lora", "--model.init_args.init_from", probe)
    lora_ckpt = lora.trainer.checkpoint_callback.last_model_path
    assert torch.load(lora_ckpt, weights_only=True)["hyper_parameters"]["init_from"] == probe
    more = _fit(cfg, tmp_path / "more", "--model.init_args.init_from", lora_ckpt)
    # the third stage started from the second's LoRA tensors and head (then trained on)
    second = torch.load(lora_ckpt, weights_only=True)["state_dict"]
    rebuilt = ToyViT(adapter=LoRA(r=4, alpha=8, targets=["qkv"]), init_from=lora_ckpt)
    for key, value in second.items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    assert not torch.equal(more.model.head.weight, rebuilt.head.weight)  # and trained on


def test_init_from_an_adapters_folder_and_mismatches_are_listed(tmp_path: Path) -> None:
    a = ToyViT(adapter=LoRA(r=4, targets=["qkv"]))
    with torch.no_grad():
        for p in a.parameters():
            if p.requires_grad:
                p.add_(0.01)
    folder = save_adapters(a.backbone, tmp_path / "adapters")  # adapters live where adapt() put them
    b = ToyViT(adapter=LoRA(r=4, targets=["qkv"]), init_from=str(folder))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(b.backbone(x), a.backbone(x))
    probe = tmp_path / "probe.ckpt"
    torch.save({"state_dict": {"head.weight": torch.zeros(4, 64), "extra.weight": torch.zeros(2)},
                "hyper_parameters": {"_class_path": "tests.toy.ToyViT", "adapter": None}}, probe)
    with pytest.raises(CheckpointMismatchError) as err:
        ToyViT(adapter=None, init_from=str(probe))
    msg = str(err.value)
    assert "unexpected keys (1): extra.weight" in msg and "missing keys (1): head.bias" in msg
    with pytest.raises(FileNotFoundError, match="prerequisite"):
        ToyViT(init_from="foundation")


def test_a_module_that_forgets_its_init_from_or_adapter_fails_before_any_work(tmp_path: Path) -> None:
    class Forgetful(ToyViT):
        def load_init_from(self):  # a domain that never starts from its earlier stage
            return None

    class NoInject(AdaptedModule):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.backbone = torch.nn.Linear(2, 2)

    import lightning as L

    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(RuntimeError, match="never loaded it"):
        trainer.fit(Forgetful(init_from=str(tmp_path)), ToyData())
    with pytest.raises(RuntimeError, match="never injected it"):
        trainer.fit(NoInject(adapter=LoRA(targets=["x"])), ToyData())


def test_a_spec_the_domain_never_injects_is_refused_with_what_it_does_instead() -> None:
    from domains.calorimetry.model import CaloShowerModel

    with pytest.raises(ValueError, match="grows by stages instead: add_class adds an expert"):
        CaloShowerModel(grid=[2, 2, 2], width=16, depth=1, heads=2, adapter=LoRA(targets=["qkv"]))


# --- prerequisites -----------------------------------------------------------------------------------
def test_prerequisite_runs_once_per_resolved_config(tmp_path: Path, monkeypatch) -> None:
    pre = _yaml(tmp_path / "pre.yaml", json.loads(json.dumps(TOY)) | {"trainer": TOY["trainer"] | {"enable_progress_bar": False}})
    prereq = Prerequisite(name="pretrained", configs=[str(pre)], into="model.init_args.init_from",
                          link={"data.init_args.img_size": "data.init_args.img_size"})
    cfg = {"prerequisites": [prereq.__dict__], "model": {"init_args": {"init_from": "pretrained"}}, "data": {"init_args": {"img_size": 32}}}
    done = resolve(cfg)
    path = Path(cfg["model"]["init_args"]["init_from"])
    assert done == {"model.init_args.init_from": str(path)} and path.is_file()
    record = json.loads((path.parents[1] / "prerequisite.json").read_text())
    assert record["linked"] == {"data": {"init_args": {"img_size": 32}}}
    calls = []
    monkeypatch.setattr("suite.cli.main", lambda *a, **k: calls.append(a))
    assert run_prerequisite(prereq, {"data.init_args.img_size": 32}) == path and calls == []  # cached
    # the key follows the resolved config: a linked value, an edited setting; not a comment
    same = cache_folder(prereq, {"data.init_args.img_size": 32})
    assert same == path.parents[1]
    assert cache_folder(prereq, {"data.init_args.img_size": 16}) != same
    pre.write_text("# a comment\n" + pre.read_text())
    assert cache_folder(prereq, {"data.init_args.img_size": 32}) == same
    assert cache_folder(Prerequisite(**(prereq.__dict__ | {"args": ["--model.init_args.adapter.init_args.r", "8"]})),
                        {"data.init_args.img_size": 32}) != same
    # a real value in `into` is kept
    given = {"prerequisites": [prereq.__dict__], "model": {"init_args": {"init_from": "/my/ckpt"}}}
    assert resolve(given) == {} and given["model"]["init_args"]["init_from"] == "/my/ckpt"


def test_the_cli_resolves_prerequisites_before_building_the_model(tmp_path: Path) -> None:
    pre = _yaml(tmp_path / "pre.yaml", json.loads(json.dumps(TOY)))
    cfg = _toy(tmp_path, prerequisites=[{"name": "pretrained", "configs": [str(pre)], "into": "model.init_args.init_from",
                                         "args": ["--model.init_args.adapter", "null"]}])
    cli = _fit(cfg, tmp_path / "run", "--model.init_args.init_from", "pretrained")
    saved = yaml.safe_load(next((tmp_path / "run" / "logs").glob("version_*/config.yaml")).read_text())
    assert "prerequisites/pretrained-" in saved["model"]["init_args"]["init_from"]
    assert cli.model.init_from == saved["model"]["init_args"]["init_from"]


# --- linked settings ----------------------------------------------------------------------------------
def test_values_shared_by_data_and_model_are_set_once_in_the_data(tmp_path: Path) -> None:
    cli = main(["--config", str(_toy(tmp_path)), "--data.init_args.num_classes", "3", "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert cli.datamodule.num_classes == 3 and cli.model.head.out_features == 3
    cli = main(["--config", "domains/forecasting.yaml", "--data.init_args.lookback", "48", "--data.init_args.horizon", "24",
                "--model.init_args.backbone", "tiny", "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert (cli.model.lookback, cli.model.horizon) == (48, 24)
    for yaml_file in Path("domains").glob("*.yaml"):  # no domain states a linked value in its model section
        model = yaml.safe_load(yaml_file.read_text())["model"].get("init_args", {})
        assert not {"lookback", "horizon", "grid", "threshold_mev", "num_classes"} & set(model), yaml_file


# --- stages inside a config ------------------------------------------------------------------------------
def test_a_bare_fit_runs_the_stages_of_a_config_and_resumes_between_them(tmp_path: Path, monkeypatch) -> None:
    stages = [{"name": "probe", "args": ["--model.init_args.adapter", "null"]},
              {"name": "t{i}", "repeat": 2, "init_from": "previous", "test": True}]
    cfg = _toy(tmp_path, stages=stages)
    root = tmp_path / "runs"
    cli = _fit(cfg, root)
    assert sorted(cli.stage_results["stages"]) == ["probe", "t0", "t1"]
    assert (root / "t1" / DONE).exists() and "test/loss" in cli.stage_results["stages"]["t1"]["test"]
    t1 = torch.load(root / "t1" / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert t1["init_from"] == str(root / "t0" / "checkpoints" / "last.ckpt")
    assert cli.trainer is not None and cli.model.init_from == t1["init_from"]  # the last stage stands for the run
    # a rerun skips finished stages; a stage interrupted after its checkpoint resumes from it
    (root / "t1" / DONE).unlink()
    fits = []
    real = main

    def spy(args, *a, **k):
        fits.append(args)
        return real(args, *a, **k)

    monkeypatch.setattr("suite.cli.main", spy)
    _fit(cfg, root)
    assert [a[0] for a in fits] == ["fit", "test"] and "--ckpt_path" in fits[0]
    assert str(root / "t1") in fits[0]
    # with every stage finished, a rerun fits nothing and says so (no run stands for it)
    fits.clear()
    again = _fit(cfg, root)
    assert fits == [] and again.trainer is None and sorted(again.stage_results["stages"]) == ["probe", "t0", "t1"]
    # test on the config runs on the last stage's checkpoint
    fits.clear()
    out = main(["test", "--config", str(cfg), "--trainer.default_root_dir", str(root), *QUIET, "--ckpt_path", "last"])
    assert fits[0][fits[0].index("--ckpt_path") + 1] == str(root / "t1" / "checkpoints" / "last.ckpt")
    assert "test/loss" in out.trainer.callback_metrics


def test_stage_lists_are_checked_before_anything_runs(tmp_path: Path) -> None:
    from suite.stages import expand_stages

    with pytest.raises(ValueError, match="'previous' but is the first stage"):
        expand_stages([{"name": "a", "init_from": "previous"}])
    with pytest.raises(ValueError, match="unknown fields"):
        expand_stages([{"name": "a", "epochs": 3}])
    with pytest.raises(ValueError, match="not a positive count"):
        expand_stages([{"name": "t{i}", "repeat": "data.init_args.num_tasks"}], config={})
    assert [s["name"] for s in expand_stages([{"name": "t{i}", "repeat": 3, "args": ["--x", "{i}"]}])] == ["t0", "t1", "t2"]


# --- the adapter layer imports without side effects ---------------------------------------------------------
def test_importing_the_adapter_layer_sets_no_jsonargparse_settings() -> None:
    """Specs are dataclasses, which jsonargparse reads field by field unless subclasses are enabled for
    them; the LightningModule layer enables that (so ``Module.load_from_checkpoint`` rebuilds a CLI
    checkpoint's ``class_path: ...MALA`` adapter without the CLI imported), the adapter layer alone must not."""
    code = ("from jsonargparse._common import is_subclasses_disabled; import suite.adapters as a; "
            "before = is_subclasses_disabled(a.AdapterSpec); import suite.module; "
            "print(before, is_subclasses_disabled(a.AdapterSpec))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False"]


def test_a_stage_list_that_cannot_run_is_a_usage_error(tmp_path: Path) -> None:
    cfg = _toy(tmp_path, stages=[{"name": "a"}, {"name": "b", "init_from": "a"}])
    with pytest.raises(SystemExit) as exit_:
        _fit(cfg, tmp_path / "runs", "--ckpt_path", "last")
    assert exit_.value.code == 2
    with pytest.raises(SystemExit):
        main(["test", "--config", str(cfg), "--trainer.default_root_dir", str(tmp_path / "none"), "--ckpt_path", "last"])
    assert not (tmp_path / "runs").exists()
