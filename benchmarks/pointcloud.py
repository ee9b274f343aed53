"""Few-shot point-cloud classification: MCFT and its variants against the usual baselines.

    python benchmarks/pointcloud.py [--settings 5w10s 5w20s 10w10s 10w20s] [--episodes 10]
                                    [--steps 20] [--corpus clean|scan] [--out benchmarks/results/pointcloud.md]

Every row is a YAML composition of domains/pointcloud.yaml (MCFT) with one file of
domains/pointcloud/ (semi, pruned, full, linear, lora, prompt), all starting from the same cached
foundation encoder (Point-MAE pretraining, domains/pointcloud/pretrain.yaml; built first if
absent). For each setting (N-way K-shot) and each of the seeded episodes, every method trains for
the same number of optimiser steps (batch 16; MCFT-semi adds 16 unlabelled clouds per step) and
is scored on the episode's query set (20 test clouds per class, never used for selection: the
weights after the last step are scored). Accuracy is mean +- std over episodes; the episodes are
shared by all methods, so differences are also given per episode (paired).

All methods share the head (a linear layer on BatchNorm-standardised features, started at the
support set's class prototypes) and its learning rate (0.01). The encoder learning rate of each
method is the best of {3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 5e-4} on the validation clouds (other test
clouds than the queries) of 5w10s episodes 0-2: 1e-4 for MCFT (and its variants) and LoRA,
3e-6 for full fine-tuning (the grid is in domains/pointcloud/README.md).

Beside each method: trainable parameters, parameters at inference, FLOPs per cloud (exact, from
torch's FlopCounterMode) and measured inference latency (batch of 32, median of 9 rounds in which
the methods take turns; still noisy on a shared machine, the FLOPs are not). LoRA is measured as trained (not merged into the weights);
suite.adapters' LoRA layers fold the update into the weight on the fly when that is cheaper (as
at batch 32), so its FLOPs are close to the base model's while its parameters are not.

Budget: the defaults (4 settings x 10 episodes x 6 methods = 240 fits of 20 steps) are sized for
~45 min on 2 busy CPU cores, one intra-op thread (faster than two on a shared machine);
--settings / --episodes / --steps shrink it alike for every row.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from domains.pointcloud.data import FEW_SHOT_SETTINGS, PointCloudData  # noqa: E402
from domains.pointcloud.model import PointCloudClassifier  # noqa: E402
from suite.prerequisites import resolve as resolve_prerequisites  # noqa: E402

#: row name -> the file composed after domains/pointcloud.yaml (None: MCFT itself)
METHODS: dict[str, str | None] = {
    "MCFT": None,
    "MCFT-semi": "semi",
    "MCFT-pruned": "pruned",
    "full fine-tuning": "full",
    "linear probe": "linear",
    "LoRA": "lora",
    "prompt tuning": "prompt",
}
BASELINES = ("full fine-tuning", "linear probe", "LoRA", "prompt tuning")
PEFT = ("LoRA", "prompt tuning")


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and "class_path" not in v else copy.deepcopy(v)
    return out


def method_config(variant: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model init_args, data init_args) of domains/pointcloud.yaml composed with a variant file."""
    cfg = yaml.safe_load((ROOT / "domains/pointcloud.yaml").read_text())
    if variant:
        cfg = _merge(cfg, yaml.safe_load((ROOT / f"domains/pointcloud/{variant}.yaml").read_text()))
    resolve_prerequisites(cfg)  # init_from: foundation -> the cached pretraining run (built once if absent)
    model, data = dict(cfg["model"]["init_args"]), dict(cfg["data"]["init_args"])
    opt = model.pop("optimizer")
    opt_cls = getattr(torch.optim, opt["class_path"].rsplit(".", 1)[1])
    model["optimizer"] = lambda params, _c=opt_cls, _a=opt.get("init_args", {}): _c(params, **_a)
    return model, data


def fit_episode(variant: str | None, setting: str, episode: int, steps: int, root: Path, corpus: str = "clean") -> tuple[float, PointCloudClassifier]:
    n_way, k_shot = FEW_SHOT_SETTINGS[setting]
    model_args, data_args = method_config(variant)
    data_args |= {"n_way": n_way, "k_shot": k_shot, "episode": episode, "n_val": 0, "variant": corpus}
    L.seed_everything(episode, verbose=False)  # adapter initialisation and loader workers
    model = PointCloudClassifier(**(model_args | {"num_classes": n_way}))
    trainer = L.Trainer(
        max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=root, accelerator="cpu",
    )
    dm = PointCloudData(**data_args)
    trainer.fit(model, dm)
    acc = trainer.test(model, dm, verbose=False)[0]["test/acc"]
    return float(acc), model


def _clouds(n_points: int) -> torch.Tensor:
    return torch.rand(32, n_points, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1


def inference_flops(model: PointCloudClassifier, n_points: int) -> tuple[int, float]:
    """(parameters, GFLOPs per cloud) of the deployed model at batch 32."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(_clouds(n_points))
    return sum(p.numel() for p in model.parameters()), fc.get_total_flops() / 32 / 1e9


def inference_latency(models: dict[str, PointCloudClassifier], n_points: int, rounds: int = 9) -> dict[str, float]:
    """Median ms per cloud (batch 32), the methods interleaved round by round so that the load of
    a shared machine hits them alike."""
    pts, times = _clouds(n_points), {m: [] for m in models}
    with torch.no_grad():
        for m in models.values():
            m.eval()(pts)  # warm-up
        for _ in range(rounds):
            for name, m in models.items():
                t = time.perf_counter()
                m(pts)
                times[name].append(time.perf_counter() - t)
    return {name: 1e3 * statistics.median(t) / 32 for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settings", nargs="+", default=list(FEW_SHOT_SETTINGS), choices=list(FEW_SHOT_SETTINGS))
    ap.add_argument("--episodes", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "prompt tuning"], choices=list(METHODS))
    ap.add_argument("--corpus", default="clean", choices=["clean", "scan"], help="ModelNet-like or ScanObjectNN-like (occluded) clouds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    root = Path(os.environ.get("TMPDIR", "/tmp")) / "pointcloud-bench"
    acc: dict[str, dict[str, list[float]]] = {m: {s: [] for s in args.settings} for m in args.methods}
    cost: dict[str, tuple] = {}
    deployed: dict[str, PointCloudClassifier] = {}
    n_points = method_config(None)[1]["num_points"]
    for setting in args.settings:
        for episode in range(args.episodes):
            for method in args.methods:
                t = time.time()
                a, model = fit_episode(METHODS[method], setting, episode, args.steps, root, args.corpus)
                acc[method][setting].append(a)
                if method not in cost:
                    cost[method] = (model.report.trainable, *inference_flops(model, n_points), float("nan"))
                    deployed[method] = model
                print(f"[{time.time() - start:7.0f}s] {setting} ep{episode} {method}: acc {a:.3f} ({time.time() - t:.1f}s)", file=sys.stderr, flush=True)
            if args.out:  # a partial table survives an interrupted run
                args.out.write_text(render(acc, cost, args, time.time() - start, partial=True))
    for method, ms in inference_latency(deployed, n_points).items():
        cost[method] = (*cost[method][:3], ms)
    report = render(acc, cost, args, time.time() - start)
    print(report)
    if args.out:
        args.out.write_text(report)


def _ms(values: list[float]) -> str:
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}"


def render(acc: dict, cost: dict, args: argparse.Namespace, seconds: float, partial: bool = False) -> str:
    settings = [s for s in args.settings if all(acc[m][s] for m in acc)]
    lines = [
        "# Few-shot point-cloud classification: MCFT vs baselines", "",
        *(["**Partial: the run has not finished.**", ""] if partial else []),
        f"`python benchmarks/pointcloud.py --settings {' '.join(args.settings)} --episodes {args.episodes} --steps {args.steps} --corpus {args.corpus}`",
        f"({datetime.date.today().isoformat()}, {seconds / 60:.1f} min on this machine, torch threads {args.threads})", "",
        f"Query accuracy (%), mean ± std over {min(len(v) for s in settings for v in (acc[m][s] for m in acc)) if settings else 0} "
        f"seeded episodes; every method {args.steps} optimiser steps "
        f"from the same pretrained encoder; procedural {'ModelNet-like' if args.corpus == 'clean' else 'ScanObjectNN-like (single-view, occluded)'} "
        "clouds of 256 points; the encoder was pretrained on the ModelNet-like corpus.", "",
        "| method | trainable params | params at inference | GFLOPs / cloud | latency ms / cloud | " + " | ".join(settings) + " |",
        "|---|---|---|---|---|" + "---|" * len(settings),
    ]
    for m in acc:
        trainable, total, gflops, ms = cost[m]
        lines.append(f"| {m} | {trainable:,} | {total:,} | {gflops:.3f} | {ms:.2f} | " + " | ".join(_ms(acc[m][s]) for s in settings) + " |")
    groups = {
        "the best baseline": [b for b in BASELINES if b in acc],
        "the best PEFT baseline (LoRA, prompt tuning: the paper's prior methods)": [b for b in PEFT if b in acc],
    }
    for title, group in groups.items():
        if not group:
            continue
        lines += ["", f"Gain over {title} of each setting, percentage points: mean paired per-episode difference "
                  "± its standard error (the baseline chosen by mean):", "",
                  "| method | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
        for m in [m for m in acc if m.startswith("MCFT")]:
            cells = [f"{v:+.1f} ± {se:.1f} (vs {b})" for b, v, se in (_paired(acc, m, s, group) for s in settings)]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", *claims(acc, settings, groups)]
    return "\n".join(lines) + "\n"


def _paired(acc: dict, method: str, setting: str, group: list[str]) -> tuple[str, float, float]:
    """(best baseline by mean, mean paired gain over it, standard error), in points."""
    best = max(group, key=lambda b: np.mean(acc[b][setting]))
    d = 100 * (np.array(acc[method][setting]) - np.array(acc[best][setting]))
    return best, float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")


def claims(acc: dict, settings: list[str], groups: dict[str, list[str]]) -> list[str]:
    """The paper's two headline numbers against this run's, in words, for each baseline group."""
    out = []
    five = [s for s in settings if s.startswith("5w")]
    for title, group in groups.items():
        if not group:
            continue
        if "MCFT" in acc and five:
            g = [(s, *_paired(acc, "MCFT", s, group)[1:]) for s in five]
            verdict = "holds" if min(v for _, v, _ in g) >= 3.3 else "does not hold"
            out.append(f"- Paper: MCFT +3.3 % at 5-shot. Here, 5-way gains over {title}: "
                       + ", ".join(f"{s} {v:+.1f} ± {se:.1f}" for s, v, se in g) + f" points: the claim {verdict} on this data.")
        if "MCFT-semi" in acc and settings:
            best = max(settings, key=lambda s: _paired(acc, "MCFT-semi", s, group)[1])
            _, v, se = _paired(acc, "MCFT-semi", best, group)
            verdict = "holds" if v >= 6.1 else "does not hold"
            out.append(f"- Paper: up to +6.1 % with semi-supervision. Here, MCFT-semi's largest gain over {title}: "
                       f"{v:+.1f} ± {se:.1f} points ({best}): the claim {verdict} on this data.")
    return out


if __name__ == "__main__":
    main()
