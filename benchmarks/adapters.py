"""Adapter benchmark: suite.adapters against Hugging Face PEFT, side by side in one process.

Model: timm ``vit_small_patch16_224`` (random weights, 10-class head trained too), batch 16,
rank 8 on ``qkv`` + ``attn.proj`` (24 layers). Every ratio is measured in the same process with
the configurations alternating inside each repeat, and reported as mean +- std of the per-repeat
ratios; peak RSS comes from a fresh subprocess per configuration (two train steps each).

Times are CPU seconds of the process (``time.process_time``) with one intra-op thread by default
(``--threads``). The machine this runs on is shared: two wall-clock runs on 2 threads under load
averages of 5-8 gave train-step ratios of 0.86 and 0.98 and init times with std above the mean,
because every small op waits for the second thread to be scheduled. CPU time of one thread
measures the work itself and repeats to a few percent; on an idle machine wall-clock ratios on
2 threads follow it (the work is the same GEMMs).

Rows and goals (from the adapter issue):
- train step ours / PEFT LoRA                                   <= 0.95
- peak RSS of a train step, ours / PEFT                         <= 1.0
- merged inference / base                                       <= 1.01;  unmerged / base <= 1.05
- FourierMoE step / LoRA step at equal trainable parameters    <= 1.5
  (+ the FourierMoE forward choice: dense per-expert matrices / spectral path)
- CG-LoRA init / PEFT LoRA-GA init, same model and calibration batches (2 x 8 images)  <= 0.5
- MiCA init / PEFT MiCA init                                     (reported)

Budget: about 8 minutes of one core (a ViT-S train step at batch 16 is ~8 CPU seconds); wall
time grows with the machine's load, which the output prints.

    python benchmarks/adapters.py [--repeats 3] > benchmarks/results/adapters.md
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from suite.adapters import CGLoRA, FourierMoE, LoRA, MiCA, adapter_layers, init_adapters, inject, merge  # noqa: E402

TARGETS = ["qkv", "attn.proj"]
BATCH, RANK, ALPHA = 16, 8, 16
# 4 experts x 40 x 24 complex coefficients + a 4 x 384 router per layer: 225,034 trainable
# parameters in the whole model, exactly LoRA r=8's count (checked at run time)
FMOE = dict(experts=4, top_k=2, rows=40, cols=24)


MODEL = "vit_small_patch16_224"


def build() -> torch.nn.Module:
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return timm.create_model(MODEL, pretrained=False, num_classes=10)


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 224, 224, generator=g), torch.randint(0, 10, (n,), generator=g)


def peft_lora(model: torch.nn.Module, **kw) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, **kw))


def trainer(model: torch.nn.Module, batch) -> Callable[[], None]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x, y = batch
    model.train()

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def timed(fn: Callable[[], object]) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def alternate(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run every configuration once per repeat, in turn, after ``warmup`` untimed rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            out[k].append(timed(fn))
    return out


def ratio(times: dict[str, list[float]], a: str, b: str) -> tuple[float, float]:
    r = [x / y for x, y in zip(times[a], times[b])]
    return statistics.mean(r), statistics.stdev(r) if len(r) > 1 else 0.0


def ms(v: list[float]) -> str:
    return f"{statistics.mean(v):.2f} ± {statistics.stdev(v) if len(v) > 1 else 0:.2f} s"


def rss_child(kind: str) -> None:
    """Subprocess entry: peak RSS of building + two train steps of one configuration."""

    def vmrss() -> float:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    import peft  # noqa: F401  (both processes carry the same imports; the difference is the adapters)

    model = build()
    if kind == "ours":
        inject(model, LoRA(r=RANK, alpha=ALPHA, targets=TARGETS, modules_to_save=["head"]))
    else:
        model = peft_lora(model, modules_to_save=["head"])
    before = vmrss()
    step = trainer(model, data(BATCH, 1))
    step()
    step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"before_mb": before, "peak_mb": peak}))


def rss(kind: str) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--rss", kind, "--model", MODEL, "--batch", str(BATCH), "--threads", str(torch.get_num_threads())]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    global MODEL, BATCH
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rss", choices=["ours", "peft"])
    ap.add_argument("--model", default=MODEL, help="smaller timm ViTs (vit_tiny_patch16_224) for a quick check only")
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (see the docstring for why 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    MODEL, BATCH = args.model, args.batch
    if args.rss:
        return rss_child(args.rss)
    t_start = time.time()
    load0 = os.getloadavg()
    rows: list[tuple[str, str, str, str, str, str]] = []  # name, ours, reference, ratio, goal, met
    notes: list[str] = []

    def row(name: str, ours: str, ref: str, r: tuple[float, float], goal: float | None, why: str = "") -> None:
        met = "—" if goal is None else ("yes" if r[0] <= goal else "**no**")
        rows.append((name, ours, ref, f"{r[0]:.3f} ± {r[1]:.3f}", "—" if goal is None else f"≤ {goal}", met))
        if met == "**no**" and why:
            notes.append(f"- *{name}*: {why}")

    # --- peak RSS, fresh processes (first, before this process grows) -------------------------
    mem = {k: [rss(k)] for k in ("ours", "peft")}  # peak RSS is reproducible to a few MB: one process each
    peak = {k: [m["peak_mb"] for m in v] for k, v in mem.items()}
    grow = {k: [m["peak_mb"] - m["before_mb"] for m in v] for k, v in mem.items()}

    # --- train steps: ours vs PEFT LoRA, FourierMoE at equal parameters ------------------------
    batch = data(BATCH, 1)
    base = build()
    ours = copy.deepcopy(base)
    rep_ours = inject(ours, LoRA(r=RANK, alpha=ALPHA, targets=TARGETS, modules_to_save=["head"]))
    theirs = peft_lora(copy.deepcopy(base), modules_to_save=["head"])
    fmoe = copy.deepcopy(base)
    rep_fmoe = inject(fmoe, FourierMoE(targets=TARGETS, modules_to_save=["head"], **FMOE))
    if MODEL == "vit_small_patch16_224":
        assert rep_fmoe.trainable == rep_ours.trainable, (rep_fmoe.trainable, rep_ours.trainable)
    n_peft = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    train = alternate(
        {"ours": trainer(ours, batch), "peft": trainer(theirs, batch), "fmoe": trainer(fmoe, batch)}, args.repeats
    )
    dense = copy.deepcopy(fmoe)
    for _, layer in adapter_layers(dense):
        layer.impl = "dense"
    choice = alternate({"spectral": trainer(fmoe, batch), "dense": trainer(dense, batch)}, max(2, args.repeats - 1))
    del dense

    # --- inference: base / merged / unmerged ----------------------------------------------------
    merged = copy.deepcopy(ours)
    merge(merged)
    x = batch[0]
    infer = {}
    for name, m in (("base", base), ("merged", merged), ("unmerged", ours), ("peft", theirs)):
        m.eval()
        infer[name] = lambda m=m: m(x)
    with torch.no_grad():  # a forward is ~1/3 of a step: more repeats for the same precision
        inf = alternate(infer, 4 * args.repeats)
    del merged, theirs, fmoe

    # --- data-dependent inits: CG-LoRA vs PEFT LoRA-GA; MiCA vs PEFT MiCA ----------------------
    calib = [data(8, 100 + i) for i in range(2)]

    # each returns the CPU time of the initialisation alone (building the model is not timed)
    def cg(**kw) -> float:
        m = build()

        def init() -> None:
            inject(m, CGLoRA(r=RANK, alpha=ALPHA, targets=TARGETS, calibration_batches=len(calib), **kw))
            init_adapters(m, calib, lambda b: F.cross_entropy(m(b[0]), b[1]))

        return timed(init)

    def loraga() -> float:
        from peft import LoraConfig, LoraGAConfig, get_peft_model, preprocess_loraga

        m = build()

        def init() -> None:
            cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())

            def train_step() -> None:
                for xb, yb in calib:
                    F.cross_entropy(m(xb), yb).backward()

            preprocess_loraga(m, cfg, train_step)
            get_peft_model(m, cfg)

        return timed(init)

    def mica_ours() -> float:
        m = build()
        return timed(lambda: inject(m, MiCA(r=RANK, alpha=ALPHA, targets=TARGETS)))

    def mica_peft() -> float:
        m = build()
        return timed(lambda: peft_lora(m, init_lora_weights="mica"))

    inits: dict[str, list[float]] = {k: [] for k in ("cg", "cg256", "loraga", "mica", "mica_peft")}
    runs = {"cg": cg, "cg256": lambda: cg(factor_tokens=256), "loraga": loraga, "mica": mica_ours, "mica_peft": mica_peft}
    for rep in range(3):  # a warm-up round, then two timed ones (each CG-LoRA / LoRA-GA init is a few passes)
        for k, fn in runs.items():
            t = fn()
            if rep:  # the first round warms up
                inits[k].append(t)

    # --- the table --------------------------------------------------------------------------------
    row(
        "train step, LoRA r=8 (ours / PEFT)", ms(train["ours"]), ms(train["peft"]), ratio(train, "ours", "peft"), 0.95,
        "the adapter math is the same as PEFT's; the gain comes only from the fused Linear (three fewer output-sized "
        "passes per adapted layer), about 6 % of a ViT-S step, so repeat-to-repeat noise can cross the line.",
    )
    rp = (statistics.mean(peak["ours"]) / statistics.mean(peak["peft"]), 0.0)
    row(
        "peak RSS of 2 train steps, fresh process (ours / PEFT)",
        f"{statistics.mean(peak['ours']):.0f} MB (+{statistics.mean(grow['ours']):.0f} in training)",
        f"{statistics.mean(peak['peft']):.0f} MB (+{statistics.mean(grow['peft']):.0f} in training)",
        rp, 1.0,
    )
    same = "a merged model runs exactly the base model's products (each adapter layer forwards to its base layer); the excess is measurement noise (see the ± column)."
    row("inference, merged / base", ms(inf["merged"]), ms(inf["base"]), ratio(inf, "merged", "base"), 1.01, same)
    row(
        "inference, unmerged / base", ms(inf["unmerged"]), ms(inf["base"]), ratio(inf, "unmerged", "base"), 1.05,
        "without gradients each adapted Linear runs one product with W + dW (dW costs d_out*d_in*r); anything above "
        "that is noise.",
    )
    row("inference, PEFT unmerged / base (reference)", ms(inf["peft"]), ms(inf["base"]), ratio(inf, "peft", "base"), None)
    row(
        f"train step, FourierMoE / LoRA ({rep_fmoe.trainable:,} trainable each)",
        ms(train["fmoe"]), ms(train["ours"]), ratio(train, "fmoe", "ours"), 1.5,
        "at equal parameters FourierMoE reads 2*E*cols input and writes 2*E*rows output frequencies per token "
        "(an effective width of ~100-200 against LoRA's r=8), plus an rfft, an irfft and the router.",
    )
    row("FourierMoE forward choice: dense per-expert dW / spectral", ms(choice["dense"]), ms(choice["spectral"]), ratio(choice, "dense", "spectral"), None)
    cg_why = (
        "both make the same forward and backward passes over the same calibration batches, and G is exactly the "
        "target-weight gradient LoRA-GA computes; CG-LoRA then also accumulates the K-FAC factors (S alone costs "
        "d_out^2 per token, 3x the qkv weight gradient) and factorises them, while PEFT 0.21's LoRA-GA needs only a "
        "randomized rank-4r SVD. At equal data ~1.0 is therefore the floor; factor_tokens subsamples the factors to "
        "approach it. The paper's 0.51 is for RoBERTa-base against its LoRA-GA baseline; which implementation "
        "it timed is not stated in what we could read."
    )
    row("CG-LoRA init / PEFT LoRA-GA init (2 batches x 8 images)", ms(inits["cg"]), ms(inits["loraga"]), ratio(inits, "cg", "loraga"), 0.5, cg_why)
    row(
        "CG-LoRA init, factor_tokens=256 / PEFT LoRA-GA", ms(inits["cg256"]), ms(inits["loraga"]), ratio(inits, "cg256", "loraga"), 0.5,
        "as above.",
    )
    row("MiCA init / PEFT MiCA init", ms(inits["mica"]), ms(inits["mica_peft"]), ratio(inits, "mica", "mica_peft"), None)

    import peft
    import timm

    print("# Adapter benchmark: suite.adapters vs Hugging Face PEFT\n")
    flags = ("" if MODEL == "vit_small_patch16_224" else f" --model {MODEL}") + ("" if BATCH == 16 else f" --batch {BATCH}")
    flags += "" if args.threads == 1 else f" --threads {args.threads}"
    print(f"Command: `python benchmarks/adapters.py --repeats {args.repeats}{flags}`  ")
    print(f"Date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; wall {time.time() - t_start:.0f} s  ")
    print(
        f"Machine: {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} intra-op thread(s); times are process CPU seconds), "
        f"peft {peft.__version__}, timm {timm.__version__}; load average {load0[0]:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end  "
    )
    print(
        f"Model: {MODEL}, batch {BATCH}, r={RANK} on {TARGETS} + head; trainable: ours "
        f"{rep_ours.trainable:,}, PEFT {n_peft:,}. Ratios: mean ± std of per-repeat ratios over alternating repeats "
        f"({args.repeats} of train steps, {4 * args.repeats} of inference, {max(2, args.repeats - 1)} of the FourierMoE "
        "choice, 2 of each init).\n"
    )
    print("| measurement | ours | reference | ratio | goal | met |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(
        "\nThe FourierMoE choice row is the measurement behind its forward: building and applying E dense "
        "d_out x d_in updates per step against the spectral path (rfft, per-expert products, irfft). MiCA: both "
        "run one fp32 SVD per adapted layer."
    )
    if notes:
        print("\n## Goals missed\n")
        print("\n".join(notes))


if __name__ == "__main__":
    main()
