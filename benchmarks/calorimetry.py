"""Calorimetry benchmark: the FM4CAL lifecycle with our network and the reference's, in bf16-mixed
and 32-true, with our recipe and the reference's, against from-scratch models and full fine-tuning.

    python benchmarks/calorimetry.py [--seeds 0 1 2] [--pretrain-epochs 15] [--stage-epochs 10] [--width 128]

On generated showers (the embedded GFlash-style generator, 800 per class, 70/15/15 split), for
every seed, each lifecycle pretrains W+Ta photons, then adds Pb photons (expert cloned from Ta),
W electrons (rsLoRA r=8 on q/k/v/out, electron heads, expert from W photons), Ta electrons (from
W electrons) and Pb electrons (from Ta electrons):

- ``ours``: our network (``architecture: ours``), our recipe (AdamW 2e-3, constant), bf16-mixed
  and, beside it, the same in 32-true;
- ``fm4cal``: the reference's network (``architecture: fm4cal``) at the same width, depth and heads
  and the same budget (bf16-mixed, our recipe), generated with our sampling and with the
  reference's (``sampling: {preset: reference}``: dynamic temperature, stop on either end token,
  no constraints);
- ``ours, reference recipe``: RAdam 1e-3 + MultiStepLR [5, 10, 15, 20] to pretrain, AdamW 1e-4
  with 0.1 decay on heads + MultiStepLR [5, 10] per stage, gradients clipped at 1 (bf16-mixed);
- ``from scratch``: one separate model per new class, trained on that class alone for the same
  epochs as its lifecycle stage; ``full fine-tune``: W electrons from the +Pb model with every
  weight trainable (bf16-mixed).

Metrics per class on its test split (120 showers), for showers generated at the test showers'
incident energies: NLL per hit (teacher forcing), our mean separation power and logistic AUC
(0.5 = indistinguishable), and FM4CAL's metrics (cells above 0.1 MeV): the mean quantile KL over
its 8 observables (10 quantile bins: 12 reference showers per bin) and W1 of the energy sum,
number of hits and centre of gravity in depth. No forgetting: after every later stage an earlier
class's test logits must be torch.equal to those when it was added, and at the last stage its
sampled showers (same sampling seed) too. Mean +- std over seeds.

Budget: ~45 min on 2 CPU cores without other load, one intra-op thread (faster than two on a
shared machine): 3 seeds for our lifecycle with its baselines and for the fm4cal one, the first 2
for the 32-true and reference-recipe lifecycles (paired with the same seeds of ours in bf16).
bf16-mixed pays for the wider model (128 wide, 3 blocks, 8 heads, as fast as the former 64 x 2
in fp32). On a shared machine it takes longer; the results' header states the wall time and load.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from domains.calorimetry.data import CaloShowerData, collate_showers  # noqa: E402
from domains.calorimetry.metrics import compare, reference_metrics  # noqa: E402
from domains.calorimetry.model import CaloShowerModel  # noqa: E402
from domains.calorimetry.network import REFERENCE_SAMPLING  # noqa: E402

ALL = ["W_photon", "Ta_photon", "Pb_photon", "W_electron", "Ta_electron", "Pb_electron"]
#: (stage, new class, closest expert): the reference's choices
STAGES = [("+Pb photon", "Pb_photon", "Ta"), ("+W electron", "W_electron", "W"), ("+Ta electron", "Ta_electron", "W"),
          ("+Pb electron", "Pb_electron", "Ta")]
DATA = dict(grid=[8, 6, 6], layer_mm=10.0, cell_mm=7.0, n_per_class=800, threshold_mev=50.0, max_hits=128, batch_size=32)
PRECISION = {"bf16": "bf16-mixed", "fp32": "32-true"}
REF_KEYS = ("kl_mean", "w1/energy_sum", "w1/n_hits", "w1/cog_z")


def model_args(args: argparse.Namespace, arch: str) -> dict[str, Any]:
    return dict(architecture=arch, grid=DATA["grid"], threshold_mev=DATA["threshold_mev"], energy_bins=64, e_max_mev=1.2e5,
                width=args.width, depth=args.depth, heads=args.heads, ffn_mult=2, lora_r=8, lora_alpha=8.0, max_hits=128)


def recipe(kind: str, stage: str) -> dict[str, Any]:
    """Optimiser, scheduler and head decay of our recipe or the reference's (pretrain / fine-tune)."""
    if kind == "ours":
        return dict(optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=0.0))
    if stage == "pretrain":
        return dict(optimizer=lambda p: torch.optim.RAdam(p, lr=1e-3),
                    scheduler=lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [5, 10, 15, 20], 0.1))
    return dict(optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4, weight_decay=0.0), head_weight_decay=0.1,
                scheduler=lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [5, 10], 0.1))


def fit(model: CaloShowerModel, classes: list[str], epochs: int, seed: int, ckpt: Path, precision: str, clip: bool) -> float:
    L.seed_everything(seed, verbose=False)
    dm = CaloShowerData(classes=classes, seed=0, **DATA)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        precision=PRECISION[precision], gradient_clip_val=1.0 if clip else None)
    t = time.time()
    trainer.fit(model, dm)
    trainer.save_checkpoint(ckpt, weights_only=False)  # the whole checkpoint (this only sets what is saved)
    return time.time() - t


def test_batches(limit: int | None = None) -> dict[str, dict]:
    dm = CaloShowerData(classes=ALL, seed=0, **DATA)
    dm.setup()
    ds = dm.splits["test"]
    return {c: collate_showers([ds[i] for i in range(len(ds)) if ds.items[i][3] == c][:limit]) for c in ALL}


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


@torch.no_grad()
def logits(model: CaloShowerModel, batch: dict, precision: str) -> torch.Tensor:
    model.eval()
    with autocast(precision):
        s, e, _, _ = model.logits(batch)
    return torch.cat([s, e], -1)


@torch.no_grad()
def tokens(model: CaloShowerModel, batch: dict, precision: str, sampling=None) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    with autocast(precision):
        return model.generate(batch["incident_energy"], batch["label"], generator=torch.Generator().manual_seed(7), sampling=sampling)


@torch.no_grad()
def evaluate(model: CaloShowerModel, batch: dict, precision: str, sampling=None) -> tuple[dict, tuple]:
    """Metrics of one class and the (logits, sampled tokens) witness of no forgetting."""
    model.eval()
    with autocast(precision):
        nll = float(model.token_nll(batch)["per_sample"].float().mean())
    tok = tokens(model, batch, precision, sampling)
    gen = model.tokenizer.dense(*tok, torch.Generator().manual_seed(8)).numpy()
    ref = model.reference_showers(batch).numpy()
    inc = batch["incident_energy"].numpy()
    ours = compare(ref, gen, inc, inc, GEO)
    theirs = reference_metrics(ref, gen, GEO, n_bins=10)
    row = {"nll": nll, "sep": ours["sep_mean"], "auc": ours["auc"], **{k: theirs[k] for k in REF_KEYS}, "ref_all": theirs}
    return row, (logits(model, batch, precision), tok)


def lifecycle(args: argparse.Namespace, seed: int, work: Path, batches: dict, arch: str, precision: str, kind: str,
              samplers: dict[str, Any], baselines: bool) -> list[dict]:
    """One lifecycle; each class is scored when it is added and checked for forgetting after."""
    tag = f"{arch}-{precision}-{kind}-{seed}"
    rows, witness, same = [], {}, {}
    common = dict(method=f"lifecycle ({arch}, {kind} recipe)", arch=arch, precision=precision, seed=seed)

    def score(model: CaloShowerModel, stage: str, cls: str, secs: float) -> None:
        for sname, sampling in samplers.items():
            m, w = evaluate(model, batches[cls], precision, sampling)
            if sname == "ours":
                witness[cls], same[cls] = w, True
            rows.append(dict(common, stage=stage, cls=cls, sampling=sname, trainable=model.report.trainable,
                             total=model.report.total, secs=secs, **m))

    ckpt = work / f"{tag}_pretrain.ckpt"
    model = CaloShowerModel(**model_args(args, arch), classes=ALL[:2], backbone_seed=seed, **recipe(kind, "pretrain"))
    secs = fit(model, ALL[:2], args.pretrain_epochs, seed, ckpt, precision, clip=kind == "reference")
    for cls in ALL[:2]:
        score(model, "pretrain W+Ta photon", cls, secs)
    after_pb = None
    for stage, new, closest in STAGES:
        prev, ckpt = ckpt, work / f"{tag}_{new}.ckpt"
        model = CaloShowerModel(**model_args(args, arch), init_from=str(prev), add_class=new, closest_expert=closest,
                                backbone_seed=seed, **recipe(kind, "stage"))
        secs = fit(model, [new], args.stage_epochs, seed, ckpt, precision, clip=kind == "reference")
        for cls in witness:  # earlier classes: the same logits as when they were added
            same[cls] &= torch.equal(logits(model, batches[cls], precision), witness[cls][0])
        score(model, stage, new, secs)
        if new == "Pb_photon":
            after_pb = ckpt
        if baselines:
            scratch = CaloShowerModel(**model_args(args, arch), classes=[new], backbone_seed=seed, **recipe(kind, "pretrain"))
            s_secs = fit(scratch, [new], args.stage_epochs, seed, work / f"{tag}_scratch_{new}.ckpt", precision, clip=False)
            m, _ = evaluate(scratch, batches[new], precision)
            rows.append(dict(common, method="from scratch", stage=stage, cls=new, sampling="ours", trainable=scratch.report.trainable,
                             total=scratch.report.total, secs=s_secs, **m))
    for cls in witness:  # at the last stage: the same sampled showers too
        same[cls] &= all(torch.equal(a, b) for a, b in zip(tokens(model, batches[cls], precision), witness[cls][1]))
    for r in rows:
        r.setdefault("same", same[r["cls"]] if r["method"].startswith("lifecycle") else None)
    if baselines:
        full = CaloShowerModel(**model_args(args, arch), init_from=str(after_pb), add_class="W_electron", closest_expert="W",
                               finetune="full", backbone_seed=seed, **recipe(kind, "stage"))
        secs = fit(full, ["W_electron"], args.stage_epochs, seed, work / f"{tag}_full.ckpt", precision, clip=False)
        for cls in ALL[:4]:
            m, w = evaluate(full, batches[cls], precision)
            changed = cls != "W_electron" and not torch.equal(w[0], witness[cls][0])
            rows.append(dict(common, method="full fine-tune", stage="+W electron", cls=cls, sampling="ours", trainable=full.report.trainable,
                             total=full.report.total, secs=secs, same=None if cls == "W_electron" else not changed, **m))
    return rows


RUNS = [  # (arch, precision, recipe, samplers, baselines, seeds at most): the comparisons with ours-bf16 run 2 seeds
    ("ours", "bf16", "ours", ("ours",), True, 3),
    ("fm4cal", "bf16", "ours", ("ours", "reference"), False, 3),
    ("ours", "fp32", "ours", ("ours",), False, 2),
    ("ours", "bf16", "reference", ("ours",), False, 2),
]


def fmt(values: list[float], digits: int = 3) -> str:
    v = np.asarray(values, dtype=np.float64)
    return f"{np.nanmean(v):.{digits}f} ± {np.nanstd(v):.{digits}f}"


def main_table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys((r["method"], r["precision"], r["sampling"], r["stage"], r["cls"]) for r in rows))
    out = ["| method | precision | sampling | stage | class | NLL / hit | sep. power | AUC | FM4CAL KL (mean) | W1 E sum [MeV] | "
           "W1 hits | W1 CoG z [layer] | trainable / total | fit s | earlier classes bit-identical |", "|" + "---|" * 15]
    for key in keys:
        rs = [r for r in rows if (r["method"], r["precision"], r["sampling"], r["stage"], r["cls"]) == key]
        same = [r["same"] for r in rs]
        mark = "n/a" if same[0] is None else ("yes" if all(same) else f"no ({sum(not s for s in same)}/{len(same)} seeds)")
        out.append(f"| {key[0]} | {PRECISION[key[1]]} | {key[2]} | {key[3]} | {key[4]} | {fmt([r['nll'] for r in rs])} | "
                   f"{fmt([r['sep'] for r in rs])} | {fmt([r['auc'] for r in rs])} | {fmt([r['kl_mean'] for r in rs], 2)} | "
                   f"{fmt([r['w1/energy_sum'] for r in rs], 0)} | {fmt([r['w1/n_hits'] for r in rs], 1)} | "
                   f"{fmt([r['w1/cog_z'] for r in rs], 3)} | {rs[0]['trainable']:,} / {rs[0]['total']:,} | "
                   f"{np.mean([r['secs'] for r in rs]):.0f} | {mark} |")
    return "\n".join(out)


def summary(rows: list[dict]) -> str:
    """Per setup, averaged over the six classes: the head-to-head of architectures, precisions and recipes."""
    sel = [r for r in rows if r["method"].startswith("lifecycle")]
    setups = list(dict.fromkeys((r["method"], r["precision"], r["sampling"]) for r in sel))
    out = ["| setup | precision | sampling | NLL / hit | sep. power | AUC | FM4CAL KL (mean) | fit s (5 stages) |",
           "|---|---|---|---|---|---|---|---|"]
    fit_s = {}
    for s in setups:
        rs = [r for r in sel if (r["method"], r["precision"], r["sampling"]) == s]
        seeds = sorted({r["seed"] for r in rs})
        per = {k: [np.mean([r[k] for r in rs if r["seed"] == sd]) for sd in seeds] for k in ("nll", "sep", "auc", "kl_mean")}
        fit_s[s] = [sum({r["stage"]: r["secs"] for r in rs if r["seed"] == sd}.values()) for sd in seeds]
        out.append(f"| {s[0]} | {PRECISION[s[1]]} | {s[2]} | {fmt(per['nll'])} | {fmt(per['sep'])} | {fmt(per['auc'])} | "
                   f"{fmt(per['kl_mean'], 2)} | {fmt(fit_s[s], 0)} |")
    for s in setups:
        other = (s[0], "fp32", s[2])
        if s[1] == "bf16" and other in fit_s:
            ratio = [a / b for a, b in zip(fit_s[s], fit_s[other])]
            out.append(f"\n{s[0]}: fit time bf16-mixed / 32-true = {fmt(ratio, 2)} (paired by seed).")
    return "\n".join(out)


def reference_table(rows: list[dict], all_metrics: dict) -> str:
    """FM4CAL's metric per observable for the main lifecycle (ours, bf16), mean over seeds."""
    names = ("cell_energy", "energy_sum", "n_hits", "cog_x", "cog_y", "cog_z", "longitudinal", "radial")
    out = ["| class | " + " | ".join(f"W1 / KL {n}" for n in names) + " |", "|---|" + "---|" * len(names)]
    for cls in ALL:
        ms = all_metrics.get(cls, [])
        if not ms:
            continue
        cells = [f"{np.nanmean([m[f'w1/{n}'] for m in ms]):.3g} / {np.nanmean([m[f'kl/{n}'] for m in ms]):.2f}" for n in names]
        out.append(f"| {cls} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--pretrain-epochs", type=int, default=15)
    ap.add_argument("--stage-epochs", type=int, default=10)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--runs", type=int, nargs="+", default=list(range(len(RUNS))), help="indices into RUNS")
    ap.add_argument("--test-showers", type=int, default=None, help="fewer test showers per class (a quick look; the table uses all)")
    ap.add_argument("--rows-json", help="write the rows here after every lifecycle")
    ap.add_argument("--from-json", help="print the tables from rows written by --rows-json instead of running")
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    global GEO
    GEO = CaloShowerData(**DATA).geometry
    start, load0 = time.time(), os.getloadavg()[0]
    batches = test_batches(args.test_showers)
    rows: list[dict] = []
    per_observable: dict[str, list[dict]] = {}
    jobs = [(seed, RUNS[i]) for n, seed in enumerate(args.seeds) for i in args.runs if n < RUNS[i][5]]
    n_test = len(batches["W_photon"]["label"])
    if args.from_json:  # the tables of a finished (or interrupted) run, with its own settings and timing
        saved = json.loads(Path(args.from_json).read_text())
        rows, jobs = saved["rows"], []
        for k, v in saved["args"].items():
            setattr(args, k, v)
    with tempfile.TemporaryDirectory() as tmp:
        for seed, (arch, precision, kind, samplers, baselines, _) in tqdm(jobs, desc="lifecycles", file=sys.stderr):
            sampler_cfg = {s: (REFERENCE_SAMPLING if s == "reference" else None) for s in samplers}
            rows += lifecycle(args, seed, Path(tmp), batches, arch, precision, kind, sampler_cfg, baselines)
            print(f"seed {seed} {arch} {precision} {kind}: done after {time.time() - start:.0f} s", file=sys.stderr, flush=True)
            if args.rows_json:  # kept as the run goes, so an interrupted run still has its rows
                settings = {k: getattr(args, k) for k in ("seeds", "pretrain_epochs", "stage_epochs", "width", "depth", "heads")}
                Path(args.rows_json).write_text(json.dumps({"args": settings, "wall": time.time() - start, "n_test": n_test,
                                                            "load": [load0, os.getloadavg()[0]], "rows": rows}))
    for r in rows:  # FM4CAL's metrics per observable for the main setup
        if r["method"] == "lifecycle (ours, ours recipe)" and r["precision"] == "bf16":
            per_observable.setdefault(r["cls"], []).append(r["ref_all"])
    wall, load1 = time.time() - start, os.getloadavg()[0]
    if args.from_json:
        wall, (load0, load1), n_test = saved["wall"], saved["load"], saved["n_test"]
    print(f"# Calorimetry lifecycle benchmark ({datetime.date.today().isoformat()})\n")
    ran = {}
    for r in rows:  # the seeds each setup actually ran (a run stopped early reports what it has)
        ran.setdefault(f"{r['method'].removeprefix('lifecycle ')} {PRECISION[r['precision']]}", set()).add(r["seed"])
    seeds_note = "; ".join(f"{k}: {sorted(v)}" for k, v in ran.items())
    print(f"Command: `python benchmarks/calorimetry.py --seeds {' '.join(map(str, args.seeds))} --pretrain-epochs {args.pretrain_epochs} "
          f"--stage-epochs {args.stage_epochs} --width {args.width} --depth {args.depth} --heads {args.heads}`; "
          f"seeds per setup: {seeds_note}; mean ± std; "
          f"test showers per class: {n_test}; "
          f"wall {wall / 60:.1f} min on {torch.get_num_threads()} intra-op thread (load average {load0:.1f} at start, "
          f"{load1:.1f} at the end, on 2 cores). Budget: ~45 min on 2 idle cores.\n")
    print("## Per setup (mean over the six classes, each scored when added)\n")
    print(summary(rows))
    print("\n## Per class\n")
    print(main_table(rows))
    if per_observable:
        print("\n## FM4CAL's metrics per observable (lifecycle, ours, bf16-mixed; W1 in MeV, hits, mm, layers; KL on 10 quantile bins)\n")
        print(reference_table(rows, per_observable))


if __name__ == "__main__":
    main()
