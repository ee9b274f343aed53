"""The domain YAML end to end on a tiny config: the CLIP prerequisite, both stages, test, predict's
answers and fairness report, the baselines a YAML away, and the notebook on the run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from domains.radiology_vqa.metrics import read_answers, write_report
from domains.radiology_vqa.synth import SynthConfig
from suite.cli import main as cli_main
from tests.notebooks import assert_fresh, cell_outputs, run_notebook

ROOT = Path(__file__).resolve().parents[3]
DOMAIN = str(ROOT / "domains/radiology_vqa.yaml")
BASELINES = {"lora": ("none", "erm", "none"), "resample": ("none", "erm", "group"), "group_dro": ("none", "group_dro", "none")}
TINY = str(ROOT / "domains/radiology_vqa/tiny.yaml")  # tiny CLIP (prerequisite of 2 steps), tiny LM, fallback tokenizer
FEW = ["--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1"]


def test_prerequisite_links_every_generator_argument():
    cfg = yaml.safe_load(Path(DOMAIN).read_text())
    (clip,) = cfg["prerequisites"]
    linked = {k.split(".")[-1] for k in clip["link"] if k.startswith("data.")}
    generator = set(SynthConfig.__dataclass_fields__) - {"size", "seed", "fractions"} | {"image_size", "generator_seed", "split_seed"}
    assert linked == generator  # the CLIP pretraining reads exactly the cohort the VQA model does
    assert clip["link"]["model.init_args.clip_config"] == "model.init_args.vision_config"
    assert cfg["model"]["init_args"]["vision_checkpoint"] == "clip"
    assert cfg["data"]["init_args"]["real_table"] in ("priors", "nih")  # pinned, never "auto"
    lora = cfg["model"]["init_args"]["adapter"]["init_args"]
    assert (lora["r"], lora["alpha"], lora["dropout"]) == (64, 128.0, 0.05)
    assert cfg["model"]["init_args"]["attribute_weights"] == {"age": 0.6, "sex": 0.1, "race": 0.2}
    (tiny,) = yaml.safe_load(Path(TINY).read_text())["prerequisites"]
    assert tiny["link"] == clip["link"] and tiny["configs"][0] == clip["configs"][0]  # the tiny run links the same


def test_baselines_are_a_yaml_away():
    for name, (fairness, objective, resample) in BASELINES.items():
        cli = cli_main(["--config", DOMAIN, "--config", TINY, "--config", str(ROOT / f"domains/radiology_vqa/{name}.yaml"),
                        "--model.init_args.vision_checkpoint", "null", "--stages", "null"], run=False)
        m, dm = cli.model, cli.datamodule
        assert (m.fairness, m.objective, dm.resample) == (fairness, objective, resample), name
        assert m.dro.q.numel() == dm.num_groups == 18 and m.attribute_classes == {"age": 3, "sex": 2, "race": 3}  # linked
        assert not any(p.requires_grad for p in m.club.parameters())
        assert any(p.requires_grad for n, p in m.named_parameters() if ".lora." in n)


def test_report_writes_answers_markdown_and_plot(tmp_path):
    rng = np.random.default_rng(0)
    records = []
    for i in range(80):
        sex = "female" if i % 2 else "male"
        truth = "yes" if rng.random() < 0.4 else "no"
        pred = truth if (sex == "male" or rng.random() < 0.6) else ("no" if truth == "yes" else "yes")
        records.append({"id": f"q{i:03d}", "patient_id": str(i // 2), "question": "Is there cardiomegaly?", "answer": truth,
                        "prediction": pred, "question_type": "closed", "topic": "cardiomegaly" if i % 4 < 2 else "effusion",
                        "groups": {"sex": sex, "age": "<45"}, "p_yes": float(pred == "yes")})
    records.append({"id": "q999", "patient_id": "99", "question": "What view?", "answer": "PA", "prediction": "PA",
                    "question_type": "open", "topic": "view", "groups": {"sex": "male", "age": "<45"}})
    summaries = write_report(records, ["sex", "age"], tmp_path, focus="cardiomegaly", n_boot=50)
    back = read_answers(tmp_path / "answers.jsonl")
    assert len(back) == 81 and back[0]["groups"] == {"sex": "male", "age": "<45"}  # the group fields, to re-audit
    male = np.mean([r["prediction"] == r["answer"] for r in records if r["groups"]["sex"] == "male" and r["question_type"] == "closed"])
    assert summaries["all"]["sex"]["closed_acc"]["male"] == pytest.approx(male) == 1.0
    assert summaries["all"]["sex"]["gap"] > 0.1 and "cardiomegaly" in summaries
    md = (tmp_path / "fairness.md").read_text()
    assert "| female |" in md and "Questions about cardiomegaly" in md
    assert (tmp_path / "fairness.png").stat().st_size > 5_000


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """``fit`` of domains/radiology_vqa.yaml + tiny.yaml: the CLIP prerequisite, both stages, test; then ``predict``."""
    root = tmp_path_factory.mktemp("radiology") / "run"
    args = ["--config", DOMAIN, "--config", TINY, *FEW, "--trainer.default_root_dir", str(root)]
    cli_main(["fit", *args])
    cli_main(["predict", *args, "--ckpt_path", "last"])
    return root


@pytest.mark.slow
def test_two_stages_test_and_predict(tiny_run):
    root = tiny_run
    stages = json.loads((root / "stages.json").read_text())
    assert set(stages) == {"projector", "lora"} and 0 <= stages["lora"]["test"]["test/closed_acc"] <= 1
    assert "test/sex/gap" in stages["lora"]["test"]
    first = torch.load(root / "projector/checkpoints/last.ckpt", weights_only=True)
    second = torch.load(root / "lora/checkpoints/last.ckpt", weights_only=True)
    assert first["hyper_parameters"]["vision_checkpoint"].endswith("checkpoints/last.ckpt")  # the cached CLIP run
    assert "prerequisites/clip-" in first["hyper_parameters"]["vision_checkpoint"]
    # stage 1 trains the projector only; group DRO's q is a buffer (saved, untouched without DRO)
    assert {k.split(".")[0] for k in first["state_dict"]} == {"projector", "dro"}
    assert torch.equal(first["state_dict"]["dro.q"], torch.full((18,), 1 / 18))
    assert {k.split(".")[0] for k in second["state_dict"]} >= {"projector", "club", "lm", "dro"}
    assert all(".lora." in k for k in second["state_dict"] if k.startswith("lm."))
    assert second["hyper_parameters"]["init_from"].endswith("projector/checkpoints/last.ckpt")
    answers = read_answers(root / "lora/predictions/answers.jsonl")
    assert len(answers) == 2 * 4 and all(set(r["groups"]) == {"age", "sex", "race"} for r in answers)
    assert all(Path(r["image_path"]).is_file() for r in answers)
    assert (root / "lora/predictions/fairness.png").is_file()
    assert "### sex" in (root / "lora/predictions/fairness.md").read_text()


@pytest.mark.slow
def test_notebook_runs_on_the_tiny_run(tiny_run):
    nb = run_notebook("radiology_vqa.ipynb", env={"RADIOLOGY_VQA_RUN": str(tiny_run)})
    out = cell_outputs(nb)
    assert "closed accuracy" in out and "max gap" in out
    figures = sum(1 for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {}))
    assert figures == 4  # losses, MI / gap over training, per-group bars with CIs, example radiographs
    assert_fresh("radiology_vqa.ipynb", nb)  # the committed outputs are not stale
