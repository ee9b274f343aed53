"""domains/food_cl.yaml end to end on its tiny.yaml stream: the cached backbone prerequisite, one fit per task
through the YAML's stages, resume between tasks, test and predict outputs on the last task, the
baseline YAMLs and the notebook."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from suite.cli import main as cli_main
from suite.stages import DONE
from tests.notebooks import assert_fresh, cell_outputs, run_notebook

ROOT = Path(__file__).resolve().parents[3]
DOMAIN = str(ROOT / "domains/food_cl.yaml")
TINY = str(ROOT / "domains/food_cl/tiny.yaml")  # 6 classes in tasks of 4 and 2, a tiny ViT and pretraining
QUIET = ["--trainer.precision", "32-true", "--trainer.log_every_n_steps", "1"]
VARIANTS = {  # file -> what it sets
    "sequential": {"adapters": "continue", "merge": "replace"}, "simplecil": {"adapter": None},
    "average": {"merge": "average"}, "ties": {"merge": "ties"}, "refresh": {"prototypes": "refresh"},
    "reference": {"merge_weights": "reference", "one_class": "train", "fresh_init": "per_task"},
}


def test_variants_compose_and_the_yaml_states_no_linked_value():
    domain = yaml.safe_load(Path(DOMAIN).read_text())
    assert not {"num_classes", "task", "classes_per_task", "num_tasks"} & set(domain["model"]["init_args"])
    pre = yaml.safe_load((ROOT / "domains/food_cl/pretrain.yaml").read_text())["model"]["init_args"]
    model = domain["model"]["init_args"]
    assert {k: pre[k] for k in ("backbone", "img_size", "backbone_kwargs")} == {k: model[k] for k in ("backbone", "img_size", "backbone_kwargs")}
    assert model["img_size"] == domain["data"]["init_args"]["image_size"]
    cli = cli_main(["--config", DOMAIN, "--config", TINY, "--model.init_args.init_from", "null"], run=False)
    assert cli.model.classes_per_task == cli.datamodule.classes_per_task == [4, 2]  # linked from the data
    assert cli.config.stages is None  # the tiny run is one fit of task 0
    tiny = yaml.safe_load(Path(TINY).read_text())["prerequisites"][0]
    assert {k: v for k, v in tiny.items() if k not in ("args",)} == domain["prerequisites"][0]  # the same prerequisite, smaller
    for name, expected in VARIANTS.items():
        cfg = cli.parser.parse_args(["--config", DOMAIN, "--config", str(ROOT / f"domains/food_cl/{name}.yaml")])
        m = cfg.model.init_args
        for key, value in expected.items():
            assert m[key] == value, (name, key)
    joint = cli.parser.parse_args(["--config", DOMAIN, "--config", str(ROOT / "domains/food_cl/joint.yaml")])
    assert joint.data.init_args.mode == "joint" and joint.stages is None and joint.model.init_args.merge == "replace"


@pytest.mark.slow
def test_the_yaml_runs_every_task_resumes_between_tasks_and_reports(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    domain_stages = yaml.safe_load(Path(DOMAIN).read_text())["stages"]  # tiny.yaml is one fit: put the stages back
    base = ["--config", DOMAIN, "--config", TINY, *QUIET, "--trainer.default_root_dir", str(root), "--stages", json.dumps(domain_stages)]
    first = [domain_stages[0], domain_stages[1] | {"repeat": 1}]  # start, task0 (an interrupted sequence)
    cli_main(["fit", *base, "--stages", json.dumps(first)])
    assert all((root / name / DONE).exists() for name in ("start", "task0")) and not (root / "task1").exists()
    t0 = torch.load(root / "task0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert t0["hyper_parameters"]["init_from"] == str(root / "start" / "checkpoints" / "last.ckpt")
    start = torch.load(root / "start" / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]["init_from"]
    assert "prerequisites/foundation-" in start  # the cached pretraining run
    assert int(t0["state_dict"]["tasks_learned"]) == 1 and int(t0["state_dict"]["merged_count"]) == 1

    calls = []
    real = cli_main

    def spy(args, *a, **k):
        roots = [args[i + 1] for i, arg in enumerate(args) if arg == "--trainer.default_root_dir"]
        calls.append((args[0], roots[-1]))  # the stage's own folder comes last
        return real(args, *a, **k)

    monkeypatch.setattr("suite.cli.main", spy)
    cli_main(["fit", *base])  # the whole sequence: the finished tasks are skipped
    assert calls == [("fit", str(root / "task1")), ("test", str(root / "task1"))]
    summary = json.loads((root / "stages.json").read_text())
    assert list(summary) == ["start", "task0", "task1"] and 0 <= summary["task1"]["test"]["test/acc"] <= 1
    t1 = torch.load(root / "task1" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert int(t1["tasks_learned"]) == 2 and int(t1["merged_count"]) == 2 and int(t1["merged_classes"]) == 6

    # test and predict on the last task, from the YAML alone
    out = cli_main(["test", *base, "--ckpt_path", "last"])
    metrics = out.trainer.callback_metrics
    ev = json.loads((root / "task1" / "evaluation.json").read_text())
    assert len(ev["acc_t"]) == 2 and ev["acc_t"][-1] == pytest.approx(float(metrics["test/acc"]))
    assert ev["seen"] == [4, 6] and len(ev["task_confusion"]) == 2 and sum(map(sum, ev["task_confusion"])) == 6 * 3
    for png in ("accuracy_per_task.png", "confusion_tasks.png"):
        assert (root / "task1" / png).stat().st_size > 10_000
    cli_main(["predict", *base, "--ckpt_path", "last"])
    rows = list(csv.DictReader(open(root / "task1" / "predictions" / "predictions.csv")))
    assert len(rows) == 6 * 3 and {r["label_task"] for r in rows} == {"0", "1"}
    names = {r["label_name"]: r["label_task"] for r in rows}
    assert all(names.get(r["pred_name"], r["pred_task"]) == r["pred_task"] for r in rows)  # a class's task is its own
    assert sum(int(r["correct"]) for r in rows) / len(rows) == pytest.approx(float(metrics["test/acc"]), abs=1e-6)

    nb = run_notebook("food_cl.ipynb", env={"FOOD_CL_RUN": str(root)})
    text = cell_outputs(nb)
    assert "A_T" in text and "images, accuracy" in text
    assert_fresh("food_cl.ipynb", nb)  # the committed outputs: no error, as many figures as now


@pytest.mark.slow
def test_a_task_resumed_mid_epoch_with_dropout_and_augmentation_ends_bit_identical(tmp_path):
    """Task 0 with adapter dropout and the training augmentation on (both draw from the global
    random generators), 4 steps, a checkpoint every 2: resumed from step 2, the adapters, head and
    DIME buffers end equal (tolerance 0) to the uninterrupted run's."""
    run = ["fit", "--config", DOMAIN, "--config", TINY, *QUIET, "--seed_everything", "0",
           "--model.init_args.adapter.init_args.dropout", "0.2", "--data.init_args.augment", "true",
           "--trainer.max_epochs", "1000", "--trainer.max_steps", "4", "--checkpoint.every_n_train_steps", "2",
           "--checkpoint.save_top_k", "-1"]
    cli_main([*run, "--trainer.default_root_dir", str(tmp_path / "straight")])
    (middle,) = (tmp_path / "straight" / "checkpoints").glob("*step=2.ckpt")
    cli_main([*run, "--trainer.default_root_dir", str(tmp_path / "resumed"), "--ckpt_path", str(middle)])
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 4 and a["state_dict"].keys() == b["state_dict"].keys()
    mid = torch.load(middle, weights_only=True)["state_dict"]
    assert any(not torch.equal(v, mid[k]) for k, v in a["state_dict"].items() if v.is_floating_point())
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, rtol=0, atol=0, msg=k)
