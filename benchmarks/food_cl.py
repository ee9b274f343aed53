"""Food continual learning: DIME against its baselines, with and without the reference's behaviour.

    nice -n 5 python benchmarks/food_cl.py [--seeds 0 1 2] [--precisions bf16-mixed 32-true]
                                           [--epochs 5] [--work FOLDER] [--out benchmarks/results/food_cl.md]
    python benchmarks/food_cl.py --render benchmarks/results/food_cl.json   # rewrite the table from its JSON

Every method learns the same stream as ``domains/food_cl.yaml`` (50 generated dishes in 5
step-imbalanced tasks, long-tailed inside, from the same cached pretrained backbone), seeded per
run: ``--seeds`` sets the class order and task sizes (``protocol_seed``), the batches and the
adapters' initialisation. Scores are on the balanced test images of the classes seen so far
(A_t after each task), as mean +- std over the seeds:

* A_T (after the last task), the mean of A_t, DIME's weighted mean (w_t = classes seen at t /
  (C t / T)), forgetting (Chaudhry et al.), and per-class accuracy of head (> 100 training
  images), medium and tail (< 20) classes after the last task.

Methods (every row is a YAML of ``domains/food_cl/`` on top of the domain's):

* trained through the CLI, one fit per task (``python -m suite fit`` with the stages): DIME (in
  every precision of ``--precisions``, side by side), sequential fine-tuning, the joint upper
  bound (one fit of every class);
* replayed from DIME's own trained task stacks (a task's stack never sees the merged one, so
  every merge rule and prototype option applies to the same trained stacks; the replay runs the
  model's own ``finish_task`` and ``test``, and a replay of DIME itself is checked against the
  trained run): DIME with the reference's inverted weights, with refreshed prototypes, with both
  reference behaviours, plain averaging, TIES, and prototype-only SimpleCIL (no training at all).

Budget: with the defaults (3 seeds; DIME in bf16 and fp32, sequential and joint in the first
precision; the YAML's 5 epochs of batch 32 per task) about 45 min on one intra-op thread of an idle
machine (one trained stream is ~2 min of CPU time; the table gives the measured CPU times). Runs in
``--work`` are resumable: a stream whose stages are all done there is reused, not retrained (its
row then says "reused run"). On a shared machine one thread is faster
than two; ``--threads 2`` on an idle one. ``--epochs`` scales every trained row alike.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from domains.food_cl.adapters import AdaptFormer  # noqa: E402
from domains.food_cl.data import FoodCLData  # noqa: E402
from domains.food_cl.model import FoodDIME  # noqa: E402
from suite.cli import main as cli_main  # noqa: E402
from suite.module import rebuild_stage  # noqa: E402
from suite.precision import cpu_bf16_units, cpu_description, explicit_attention_on_cpu_bf16  # noqa: E402
from suite.prerequisites import resolve as resolve_prerequisites  # noqa: E402
from suite.stages import DONE  # noqa: E402

DOMAIN = ROOT / "domains/food_cl.yaml"
#: rows trained through the CLI: name -> variant YAML of domains/food_cl/ (None: DIME)
TRAINED = {"DIME": None, "sequential fine-tuning": "sequential", "joint (upper bound)": "joint"}
#: rows replayed from DIME's trained stacks: name -> model overrides
REPLAYED = {
    "DIME (replayed)": {},
    "DIME, reference weights": {"merge_weights": "reference"},
    "DIME, refreshed prototypes": {"prototypes": "refresh"},
    "DIME, reference weights + refreshed": {"merge_weights": "reference", "prototypes": "refresh"},
    "averaging merge": {"merge": "average"},
    "TIES merge": {"merge": "ties"},
    "SimpleCIL (prototypes only)": {"adapter": None},
}
#: non-oracle baselines DIME must beat
BASELINES = ("sequential fine-tuning", "averaging merge", "TIES merge", "SimpleCIL (prototypes only)")
METRICS = ("A_T", "A_mean", "A_weighted", "forgetting", "acc_head", "acc_medium", "acc_tail")


def _yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def foundation() -> str:
    """The cached pretrained backbone of domains/food_cl.yaml (pretrained once if absent)."""
    cfg = _yaml(DOMAIN)
    resolve_prerequisites(cfg)
    return cfg["model"]["init_args"]["init_from"]


def scores(evaluation: dict[str, Any]) -> dict[str, Any]:
    s = evaluation["scalars"]
    out = {"A_T": s["acc"], "A_mean": s["acc_mean"], "A_weighted": s["acc_weighted"], "forgetting": s["forgetting"],
           **{k: s[k] for k in ("acc_head", "acc_medium", "acc_tail")}}
    out = {k: (v * 100 if v is not None else float("nan")) for k, v in out.items()}
    out["curve"] = [a * 100 for a in evaluation["acc_t"]]
    out["diagonal"] = [row[t] * 100 for t, row in zip(evaluation["row_tasks"], evaluation["acc_matrix"])]
    out["last_row"] = [v * 100 if v is not None else float("nan") for v in evaluation["acc_matrix"][-1]]
    out["sizes"] = evaluation["classes_per_task"]
    return out


def run_cli(name: str, variant: str | None, seed: int, precision: str, epochs: int, init_from: str, root: Path) -> tuple[dict, float, float]:
    """One method's whole stream through ``python -m suite fit`` (+ test); returns (scores, CPU s, wall s)."""
    args = ["--config", str(DOMAIN)] + (["--config", str(ROOT / f"domains/food_cl/{variant}.yaml")] if variant else [])
    args += ["--trainer.default_root_dir", str(root), "--seed_everything", str(seed), "--trainer.precision", precision,
             "--trainer.max_epochs", str(epochs), "--data.init_args.protocol_seed", str(seed),
             "--model.init_args.adapter_seed", str(seed), "--model.init_args.init_from", init_from,
             "--trainer.enable_model_summary", "false"]
    finished = variant != "joint" and (root / f"task{_yaml(DOMAIN)['data']['init_args']['num_tasks'] - 1}" / DONE).exists()
    cpu, wall = time.process_time(), time.perf_counter()
    if not finished:  # (a fit whose stages are all done has no last run to return)
        cli_main(["fit", *args])
    if variant == "joint":  # one plain fit: test it
        cli_main(["test", *args, "--ckpt_path", str(root / "checkpoints" / "last.ckpt")])
        evaluation = root / "evaluation.json"
    else:
        evaluation = max(root.glob("task*/evaluation.json"), key=lambda p: int(p.parent.name[4:]))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    if finished:  # every stage was already done in --work (a reused run): its cost is not measured here
        cpu = wall = float("nan")
    print(f"[food_cl] {name} seed {seed} {precision}: {cpu:.0f} s CPU, {wall:.0f} s wall", flush=True)
    return scores(json.loads(evaluation.read_text())), cpu, wall


def model_args(seed: int) -> dict[str, Any]:
    m = copy.deepcopy(_yaml(DOMAIN)["model"]["init_args"])
    spec = m.pop("adapter")
    m.pop("optimizer"), m.pop("init_from")
    return m | {"adapter": AdaptFormer(**spec["init_args"]), "adapter_seed": seed}


def replay(overrides: dict[str, Any], trained_root: Path, seed: int, precision: str, init_from: str, root: Path) -> dict:
    """Merge and prototype DIME's trained task stacks with other settings, task by task, then test."""
    data_args = _yaml(DOMAIN)["data"]["init_args"] | {"protocol_seed": seed}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision.startswith("bf16"))
    previous: Any = rebuild_stage(init_from)  # the pretrained backbone
    num_tasks = data_args["num_tasks"]
    for task in range(num_tasks):
        dm = FoodCLData(**(data_args | {"task": task}))
        dm.setup()
        model = FoodDIME(**(model_args(seed) | overrides), num_classes=dm.num_classes, classes_per_task=dm.classes_per_task, task=task)
        model.extend_from(previous)
        explicit_attention_on_cpu_bf16(model, precision, "cpu")  # as a trained run's configure_model sets it
        if model.trains_adapter:  # the stack DIME trained for this task
            state = torch.load(trained_root / f"task{task}" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
            model.load_state_dict({k: v for k, v in state.items() if ".mlp.down." in k or ".mlp.up." in k}, strict=False)
        with autocast:
            model.finish_task(dm)
        previous = model
    trainer = L.Trainer(accelerator="cpu", precision=precision, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root)
    trainer.test(previous, dm, verbose=False)
    return scores(json.loads((root / "evaluation.json").read_text()))


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v == v]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(values: list[float]) -> str:
    m, s = mean_std(values)
    if m != m:
        return "-"
    return f"{m:.1f}" if len([v for v in values if v == v]) < 2 else f"{m:.1f} ± {s:.1f}"  # one seed: no spread to show


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--precisions", nargs="+", default=["bf16-mixed", "32-true"], help="DIME runs in each; the rest in the first")
    parser.add_argument("--epochs", type=int, default=None, help="per task (default: the YAML's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/food_cl.md"))
    parser.add_argument("--render", default=None, help="only rewrite --out from this results JSON (a finished run's)")
    args = parser.parse_args()
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        results = {n: {int(k): v for k, v in runs.items()} for n, runs in saved["per_seed"].items()}
        args.seeds, args.precisions, args.threads = saved["seeds"], saved["precisions"], saved["threads"]
        args.cpu = saved.get("cpu", "CPU not recorded")
        write_results(results, {n: [tuple(c) for c in v] for n, v in saved["cost"].items()}, args, saved["epochs"],
                      datetime.datetime.fromisoformat(saved["started"]), saved["total_wall"], Path(args.out))
        return
    torch.set_num_threads(args.threads)
    args.cpu = cpu_description()
    if any(p.startswith("bf16") for p in args.precisions):
        if not cpu_bf16_units() and not torch.cuda.is_available():
            print("[food_cl] no native bf16 here: fp32 only")
            args.precisions = [p for p in args.precisions if not p.startswith("bf16")] or ["32-true"]
    epochs = args.epochs or _yaml(DOMAIN)["trainer"]["max_epochs"]
    main_precision = args.precisions[0]
    work = Path(args.work or tempfile.mkdtemp(prefix="food_cl-bench-"))
    started, t0 = datetime.datetime.now(), time.perf_counter()
    init_from = foundation()
    results: dict[str, dict[int, dict]] = {}
    cost: dict[str, list[tuple[float, float]]] = {}
    for seed in args.seeds:
        for precision in args.precisions:
            name = "DIME" if precision == main_precision else f"DIME ({precision})"
            r, cpu, wall = run_cli(name, None, seed, precision, epochs, init_from, work / f"dime-{precision}-s{seed}")
            results.setdefault(name, {})[seed] = r | {"precision": precision}
            cost.setdefault(name, []).append((cpu, wall))
        for name, variant in TRAINED.items():
            if variant is None:
                continue
            r, cpu, wall = run_cli(name, variant, seed, main_precision, epochs, init_from, work / f"{variant}-s{seed}")
            results.setdefault(name, {})[seed] = r | {"precision": main_precision}
            cost.setdefault(name, []).append((cpu, wall))
        for name, overrides in REPLAYED.items():
            r = replay(overrides, work / f"dime-{main_precision}-s{seed}", seed, main_precision, init_from, work / f"replay-{len(results)}-s{seed}")
            results.setdefault(name, {})[seed] = r | {"precision": main_precision}
            print(f"[food_cl] {name} seed {seed}: A_T {r['A_T']:.1f}", flush=True)
    write_results(results, cost, args, epochs, started, time.perf_counter() - t0, Path(args.out))


def write_results(results: dict[str, dict[int, dict]], cost: dict[str, list[tuple[float, float]]], args: argparse.Namespace,
                  epochs: int, started: datetime.datetime, total_wall: float, out: Path) -> None:
    seeds = args.seeds
    col = lambda name, key: [results[name][s][key] for s in seeds if s in results[name]]  # noqa: E731
    replay_gap = max(abs(results["DIME (replayed)"][s]["A_T"] - results["DIME"][s]["A_T"]) for s in seeds)
    order = ["DIME", *[n for n in results if n.startswith("DIME (") and n != "DIME (replayed)"],
             "DIME, reference weights", "DIME, refreshed prototypes", "DIME, reference weights + refreshed",
             *BASELINES, "joint (upper bound)"]
    lines = [
        "# Food continual learning: DIME and its baselines",
        "",
        f"`python benchmarks/food_cl.py --seeds {' '.join(map(str, seeds))} --precisions {' '.join(args.precisions)}` "
        f"({started:%Y-%m-%d %H:%M}; {total_wall / 60:.0f} min wall on a shared 2-core machine, {args.threads} intra-op thread(s); {args.cpu}). "
        f"The stream of `domains/food_cl.yaml`: 50 generated dishes in 5 step-imbalanced tasks (rho 0.01), long-tailed "
        f"inside; {epochs} epochs per task, batch {_yaml(DOMAIN)['data']['init_args']['batch_size']}; seeds set the class order "
        "and task sizes, the batches and the adapters' initialisation. Accuracies in % on balanced test sets, mean ± std over "
        f"{len(seeds)} seeds.",
        "",
        "| method | precision | A_T | mean A_t | weighted mean | forgetting | head | medium | tail | CPU s / run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in order:
        if name not in results:
            continue
        precision = results[name][seeds[0]]["precision"]
        runs = cost.get(name)
        measured = [c for c, _ in runs or [] if c == c]
        cpu = f"{statistics.mean(measured):.0f}" if measured else "reused run" if runs else "replayed"
        lines.append(f"| {name} | {precision} | " + " | ".join(fmt(col(name, k)) for k in METRICS) + f" | {cpu} |")
    # the goal: DIME against the best non-oracle baseline, paired by seed
    lines += ["", "**Goal** (the paper's claim: DIME beats the best non-oracle baseline on A_T and the weighted mean by ~3 points):", ""]
    verdicts = []
    for key, label in (("A_T", "A_T"), ("A_weighted", "weighted mean")):
        best = max(BASELINES, key=lambda b: mean_std(col(b, key))[0])
        diff = [results["DIME"][s][key] - results[best][s][key] for s in seeds]
        m, sd = mean_std(diff)
        verdict = "met" if m >= 3 else "DIME ahead but by less than 3 points" if m >= 0.05 else "missed: DIME is not ahead"
        verdicts.append(verdict)
        lines.append(f"- {label}: DIME − {best} = {m:+.1f} ± {sd:.1f} points (paired by seed): **{verdict}**.")
    fix = [results["DIME"][s]["A_T"] - results["DIME, reference weights"][s]["A_T"] for s in seeds]
    refresh = [results["DIME, refreshed prototypes"][s]["A_T"] - results["DIME"][s]["A_T"] for s in seeds]
    lines += ["", f"- weight-inversion fix: A_T {mean_std(fix)[0]:+.1f} ± {mean_std(fix)[1]:.1f} points over the reference's weights.",
              f"- refreshed prototypes (needs old data): A_T {mean_std(refresh)[0]:+.1f} ± {mean_std(refresh)[1]:.1f} points over stale ones."]
    if len(args.precisions) > 1:
        other = f"DIME ({args.precisions[1]})"
        ratio = statistics.mean(c for c, _ in cost["DIME"]) / statistics.mean(c for c, _ in cost[other])
        gap = [results["DIME"][s]["A_T"] - results[other][s]["A_T"] for s in seeds]
        lines.append(f"- precision: DIME's CPU time {args.precisions[0]} / {args.precisions[1]} = {ratio:.2f}; "
                     f"A_T difference {mean_std(gap)[0]:+.1f} ± {mean_std(gap)[1]:.1f} points.")
    lines.append(f"- replay check: DIME replayed from its own trained stacks matches the trained run to {replay_gap:.2f} points of A_T.")
    # where the accuracy goes: each task's classes right after its task (the diagonal) and at the end
    lines += ["", "Accuracy on each task's classes right after that task (A_t's diagonal) and after the last task "
              f"(seed {seeds[0]}; task sizes {results['DIME'][seeds[0]].get('sizes', '')}):", "",
              "| method | right after its task | after the last task |", "|---|---|---|"]
    for name in ("DIME", "DIME, refreshed prototypes", "sequential fine-tuning", "SimpleCIL (prototypes only)"):
        r = results[name][seeds[0]]
        lines.append(f"| {name} | {' / '.join(f'{v:.0f}' for v in r['diagonal'])} | {' / '.join(f'{v:.0f}' for v in r['last_row'])} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    summary = [{"method": n, **{k: mean_std(col(n, k))[0] for k in METRICS}} for n in order if n in results]
    curves = {n: {"mean": [statistics.mean(v) for v in zip(*col(n, "curve"))]} for n in order
              if n in results and n != "joint (upper bound)"}
    out.with_suffix(".json").write_text(json.dumps({"summary": summary, "curves": curves, "seeds": seeds, "verdicts": verdicts,
                                                    "per_seed": results, "cost": cost, "precisions": args.precisions,
                                                    "threads": args.threads, "cpu": args.cpu, "epochs": epochs, "started": started.isoformat(),
                                                    "total_wall": total_wall}, indent=1, default=float))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
