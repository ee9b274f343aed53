"""pretrain -> MCFT from the YAML files, the cached foundation model, predict outputs, the YAML
variants and the notebook."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from suite.cli import main as cli_main
from suite.prerequisites import Prerequisite, cache_folder, linked_values, resolve, run_prerequisite
from suite.stages import run_stages
from tests.domains.pointcloud.test_model import TINY, TINY_DATA, data_dir, tiny_model  # noqa: F401 (fixture)
from tests.notebooks import assert_fresh, cell_outputs, run_notebook

ROOT = Path(__file__).resolve().parents[3]
VARIANTS = ["semi", "pruned", "full", "linear", "lora", "prompt"]
QUIET = {"max_epochs": 1, "limit_train_batches": 2, "enable_model_summary": False, "log_every_n_steps": 1}


def _write(path: Path, cfg: dict) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _tiny_configs(tmp_path: Path) -> tuple[str, str]:
    """Overrides that shrink domains/pointcloud/pretrain.yaml and domains/pointcloud.yaml."""
    pre = {"trainer": QUIET | {"limit_val_batches": 1}, "model": {"init_args": {"encoder": TINY, "decoder_heads": 4}},
           "data": {"init_args": TINY_DATA}}
    ft = {"trainer": QUIET | {"max_epochs": 2}, "model": {"init_args": {"encoder": TINY}},
          "data": {"init_args": TINY_DATA}}
    return _write(tmp_path / "tiny-pre.yaml", pre), _write(tmp_path / "tiny-ft.yaml", ft)


def test_yaml_encoders_agree_and_variants_parse():
    pre = yaml.safe_load((ROOT / "domains/pointcloud/pretrain.yaml").read_text())
    ft = yaml.safe_load((ROOT / "domains/pointcloud.yaml").read_text())
    assert pre["model"]["init_args"]["encoder"] == ft["model"]["init_args"]["encoder"]
    assert pre["data"]["init_args"]["num_points"] == ft["data"]["init_args"]["num_points"]
    base = str(ROOT / "domains/pointcloud.yaml")
    cli = cli_main(["--config", base, "--model.init_args.init_from", "null", "--model.init_args.encoder", json.dumps(TINY)], run=False)
    assert cli.model.num_classes == cli.datamodule.n_way == 5  # linked from the data, stated once
    expected = {  # variant -> (train_blocks, consistency_weight, prune_blocks, unlabelled)
        "semi": (2, 1.0, 0, 100), "pruned": (2, 1.0, 2, 0), "full": (-1, 0.0, 0, 0),
        "linear": (0, 0.0, 0, 0), "lora": (0, 0.0, 0, 0), "prompt": (0, 0.0, 0, 0),
    }
    for name in VARIANTS:  # every baseline / variant is a valid composition for the CLI
        cfg = cli.parser.parse_args(["--config", base, "--config", str(ROOT / f"domains/pointcloud/{name}.yaml")])
        m = cfg.model.init_args
        assert (m.train_blocks, m.consistency_weight, m.prune_blocks, cfg.data.init_args.unlabelled) == expected[name], name
    lora = cli.parser.parse_args(["--config", base, "--config", str(ROOT / "domains/pointcloud/lora.yaml")]).model.init_args.adapter
    assert lora.class_path == "suite.adapters.LoRA" and lora.init_args.r == 8
    prompt = cli.parser.parse_args(["--config", base, "--config", str(ROOT / "domains/pointcloud/prompt.yaml")])
    assert prompt.model.init_args.encoder.num_prompts == 8 and prompt.model.init_args.encoder.trans_dim == 96


def _foundation(tmp_path: Path, pretrain_yaml: str | None = None) -> tuple[Prerequisite, dict]:
    """The `foundation` prerequisite of domains/pointcloud.yaml, on a tiny pretraining config, and
    the values it links from a fine-tuning config with the tiny encoder."""
    ft = yaml.safe_load((ROOT / "domains/pointcloud.yaml").read_text())
    entry = ft["prerequisites"][0]
    assert entry["name"] == "foundation" and entry["into"] == "model.init_args.init_from"
    ft["model"]["init_args"]["encoder"] = dict(TINY)
    if pretrain_yaml is None:
        spec = yaml.safe_load((ROOT / "domains/pointcloud/pretrain.yaml").read_text())
        spec["trainer"] |= QUIET | {"limit_val_batches": 0}
        spec["model"]["init_args"]["decoder_heads"] = 4  # the tiny encoder is 64 wide: 6 heads do not divide it
        spec["data"]["init_args"] |= {k: v for k, v in TINY_DATA.items() if k != "num_points"}
        pretrain_yaml = _write(tmp_path / "pretrain.yaml", spec)
    prereq = Prerequisite(**(entry | {"configs": [pretrain_yaml]}))
    ft["prerequisites"] = [dict(prereq.__dict__)]
    return prereq, ft


def test_foundation_is_pretrained_once_and_reused(tmp_path, data_dir, monkeypatch):
    prereq, ft = _foundation(tmp_path)
    torch.manual_seed(123)
    resolve(ft)  # init_from: foundation -> the prerequisite's checkpoint, pretrained now
    path = ft["model"]["init_args"]["init_from"]
    after_pretraining = torch.rand(3)
    assert Path(path).is_file() and "prerequisites/foundation-" in path
    calls = []
    monkeypatch.setattr("suite.cli.main", lambda *a, **k: calls.append(a))
    torch.manual_seed(123)
    again = run_prerequisite(prereq, linked_values(ft, prereq))
    assert calls == [] and str(again) == path  # found in the cache
    assert torch.equal(torch.rand(3), after_pretraining)  # pretraining left the global RNG as it was
    first, second = tiny_model(init_from=path, train_blocks=1), tiny_model(init_from=path, train_blocks=1)
    assert torch.equal(first.backbone.encoder.first_conv[0].weight, second.backbone.encoder.first_conv[0].weight)
    pre_state = torch.load(path, weights_only=True)["state_dict"]
    assert torch.equal(second.backbone.blocks.blocks[0].attn.qkv.weight, pre_state["backbone.blocks.blocks.0.attn.qkv.weight"])
    with pytest.raises(FileNotFoundError, match="prerequisite"):  # the placeholder alone is not a checkpoint
        tiny_model(init_from="foundation")


def test_foundation_key_follows_settings_not_comments(tmp_path):
    prereq, ft = _foundation(tmp_path, str(ROOT / "domains/pointcloud/pretrain.yaml"))
    values = linked_values(ft, prereq)
    text = (ROOT / "domains/pointcloud/pretrain.yaml").read_text()

    def key(yaml_text: str, vals=values) -> str:
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.yaml"
        path.write_text(yaml_text)
        return cache_folder(Prerequisite(**(prereq.__dict__ | {"configs": [str(path)]})), vals).name

    base = key(text)
    assert key("# an edited comment\n" + text) == base
    assert key(text.replace("mask_ratio: 0.6", "mask_ratio: 0.5")) != base
    assert key(text, values | {"model.init_args.encoder.depth": 2}) != base
    # a fine-tuning-only setting (prompt tokens) is not linked: the same foundation serves prompt tuning
    ft["model"]["init_args"]["encoder"]["num_prompts"] = 8
    assert key(text, linked_values(ft, prereq)) == base


@pytest.mark.slow
def test_pretrain_then_mcft_stages_predict_and_notebook(tmp_path, data_dir):
    tiny_pre, tiny_ft = _tiny_configs(tmp_path)
    runs = tmp_path / "runs"
    spec = {"root": str(runs), "stages": [
        {"name": "pretrain", "configs": [str(ROOT / "domains/pointcloud/pretrain.yaml"), tiny_pre]},
        {"name": "mcft", "configs": [str(ROOT / "domains/pointcloud.yaml"), tiny_ft], "init_from": "pretrain", "test": True},
    ]}
    results = run_stages(_write(tmp_path / "stages.yaml", spec))
    assert 0.0 <= results["mcft"]["test"]["test/acc"] <= 1.0
    pre = torch.load(runs / "pretrain" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    ft = torch.load(runs / "mcft" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ft["hyper_parameters"]["init_from"].endswith("pretrain/checkpoints/last.ckpt")
    assert "backbone.blocks.blocks.0.attn.qkv.weight" in pre and "backbone.blocks.blocks.0.attn.qkv.weight" not in ft["state_dict"]

    cli_main(["predict", "--config", str(ROOT / "domains/pointcloud.yaml"), "--config", tiny_ft,
              "--model.init_args.init_from", str(runs / "pretrain" / "checkpoints" / "last.ckpt"),
              "--trainer.default_root_dir", str(runs / "mcft"), "--ckpt_path", str(runs / "mcft" / "checkpoints" / "last.ckpt")])
    rows = list(csv.DictReader(open(runs / "mcft" / "predictions" / "predictions.csv")))
    assert len(rows) == TINY_DATA["n_way"] * TINY_DATA["n_query"]
    assert {r["pred_name"] for r in rows} <= {r["label_name"] for r in rows}  # the episode's classes
    assert all(0 <= float(r["confidence"]) <= 1 for r in rows)
    assert (runs / "mcft" / "predictions" / "predictions.png").stat().st_size > 10_000

    nb = run_notebook("pointcloud.ipynb", env={"POINTCLOUD_RUN": str(runs / "mcft")})
    out = cell_outputs(nb)
    assert "val/acc" in out and "query accuracy" in out
    # the numbers it prints are the run's: the last validation accuracy and the query accuracy
    import re

    import pandas as pd

    fit_log = max((p.parent for p in (runs / "mcft" / "logs").glob("version_*/metrics.csv")
                   if json.loads((p.parent / "run.json").read_text())["stage"] == "fit"), key=lambda p: int(p.name.split("_")[1]))
    last_val = pd.read_csv(fit_log / "metrics.csv").dropna(subset=["val/acc"])["val/acc"].iloc[-1]
    assert float(re.search(r"final val/acc (\S+)", out).group(1)) == round(float(last_val), 4)
    query = sum(r["label"] == r["pred"] for r in rows) / len(rows)
    assert re.search(r"query accuracy (\S+) over (\d+) clouds", out).groups() == (f"{query:.4f}", str(len(rows)))
    assert_fresh("pointcloud.ipynb", nb)
