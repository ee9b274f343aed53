"""Adapter benchmark: suite.adapters against Hugging Face PEFT, side by side in one process.

Model: timm ``vit_small_patch16_224`` (random weights, 10-class head trained too), batch 16,
rank 8 on ``qkv`` + ``attn.proj`` (24 layers). Every ratio is measured in the same process with
the configurations alternating inside each repeat, and reported as mean +- std of the per-repeat
ratios; peak RSS comes from a fresh subprocess per configuration (two train steps each).

Rows and goals (from the adapter issue):
- train step ours / PEFT LoRA                                   <= 0.95
- peak RSS of a train step, ours / PEFT                         <= 1.0
- merged inference / base                                       <= 1.01;  unmerged / base <= 1.05
- FourierMoE step / LoRA step at equal trainable parameters    <= 1.5
  (+ the FourierMoE forward choice: dense per-expert matrices / spectral path)
- CG-LoRA init / PEFT LoRA-GA init, same model and calibration batches (2 x 8 images)  <= 0.5
- MiCA init / PEFT MiCA init                                     (reported)

Budget: about 6 minutes on an idle 2-core machine (a ViT-S train step at batch 16 takes 4-8 s);
it prints the machine's load average, since on a shared machine every number stretches and the
many small ops of adapters suffer most from thread hand-offs.

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
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


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
    return f"{statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0:.3f} s"


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
    cmd = [sys.executable, __file__, "--rss", kind, "--model", MODEL, "--batch", str(BATCH)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    global MODEL, BATCH
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rss", choices=["ours", "peft"])
    ap.add_argument("--model", default=MODEL, help="smaller timm ViTs (vit_tiny_patch16_224) for a quick check only")
    ap.add_argument("--batch", type=int, default=BATCH)
    args = ap.parse_args()
    MODEL, BATCH = args.model, args.batch
    if args.rss:
        return rss_child(args.rss)
    t_start = time.time()
    load0 = os.getloadavg()
    rows: list[tuple[str, str, str, str, str, str]] = []  # name, ours, reference, ratio, goal, met

    def row(name: str, ours: str, ref: str, r: tuple[float, float], goal: float | None) -> None:
        met = "—" if goal is None else ("yes" if r[0] <= goal else "**no**")
        rows.append((name, ours, ref, f"{r[0]:.3f} ± {r[1]:.3f}", "—" if goal is None else f"≤ {goal}", met))

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
    with torch.no_grad():
        inf = alternate(infer, args.repeats + 1)
    del merged, theirs, fmoe

    # --- data-dependent inits: CG-LoRA vs PEFT LoRA-GA; MiCA vs PEFT MiCA ----------------------
    calib = [data(8, 100 + i) for i in range(2)]

    def cg(**kw) -> None:
        m = build()
        t = time.perf_counter()
        inject(m, CGLoRA(r=RANK, alpha=ALPHA, targets=TARGETS, calibration_batches=len(calib), **kw))
        init_adapters(m, calib, lambda b: F.cross_entropy(m(b[0]), b[1]))
        cg.t = time.perf_counter() - t

    def loraga() -> None:
        from peft import LoraConfig, LoraGAConfig, get_peft_model, preprocess_loraga

        m = build()
        t = time.perf_counter()
        cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())

        def train_step() -> None:
            for xb, yb in calib:
                F.cross_entropy(m(xb), yb).backward()

        preprocess_loraga(m, cfg, train_step)
        get_peft_model(m, cfg)
        loraga.t = time.perf_counter() - t

    def mica_ours() -> None:
        m = build()
        mica_ours.t = timed(lambda: inject(m, MiCA(r=RANK, alpha=ALPHA, targets=TARGETS)))

    def mica_peft() -> None:
        m = build()
        mica_peft.t = timed(lambda: peft_lora(m, init_lora_weights="mica"))

    inits: dict[str, list[float]] = {k: [] for k in ("cg", "cg256", "loraga", "mica", "mica_peft")}
    runs = {"cg": cg, "cg256": lambda: cg(factor_tokens=256), "loraga": loraga, "mica": mica_ours, "mica_peft": mica_peft}
    for rep in range(3):  # a warm-up round, then two timed ones (each CG-LoRA / LoRA-GA init is a few passes)
        for k, fn in runs.items():
            fn()
            if rep:  # the first round warms up
                inits[k].append((fn if k != "cg256" else cg).t)

    # --- the table --------------------------------------------------------------------------------
    row("train step, LoRA r=8 (ours / PEFT)", ms(train["ours"]), ms(train["peft"]), ratio(train, "ours", "peft"), 0.95)
    rp = (statistics.mean(peak["ours"]) / statistics.mean(peak["peft"]), 0.0)
    row(
        "peak RSS of 2 train steps, fresh process (ours / PEFT)",
        f"{statistics.mean(peak['ours']):.0f} MB (+{statistics.mean(grow['ours']):.0f} in training)",
        f"{statistics.mean(peak['peft']):.0f} MB (+{statistics.mean(grow['peft']):.0f} in training)",
        rp, 1.0,
    )
    row("inference, merged / base", ms(inf["merged"]), ms(inf["base"]), ratio(inf, "merged", "base"), 1.01)
    row("inference, unmerged / base", ms(inf["unmerged"]), ms(inf["base"]), ratio(inf, "unmerged", "base"), 1.05)
    row("inference, PEFT unmerged / base (reference)", ms(inf["peft"]), ms(inf["base"]), ratio(inf, "peft", "base"), None)
    row(
        f"train step, FourierMoE / LoRA ({rep_fmoe.trainable:,} trainable each)",
        ms(train["fmoe"]), ms(train["ours"]), ratio(train, "fmoe", "ours"), 1.5,
    )
    row("FourierMoE forward choice: dense per-expert dW / spectral", ms(choice["dense"]), ms(choice["spectral"]), ratio(choice, "dense", "spectral"), None)
    row("CG-LoRA init / PEFT LoRA-GA init (2 batches x 8 images)", ms(inits["cg"]), ms(inits["loraga"]), ratio(inits, "cg", "loraga"), 0.5)
    row("CG-LoRA init, factor_tokens=256 / PEFT LoRA-GA", ms(inits["cg256"]), ms(inits["loraga"]), ratio(inits, "cg256", "loraga"), 0.5)
    row("MiCA init / PEFT MiCA init", ms(inits["mica"]), ms(inits["mica_peft"]), ratio(inits, "mica", "mica_peft"), None)

    import peft
    import timm

    print("# Adapter benchmark: suite.adapters vs Hugging Face PEFT\n")
    print(f"Command: `python benchmarks/adapters.py --repeats {args.repeats}" + ("" if MODEL == "vit_small_patch16_224" else f" --model {MODEL}") + f"{'' if BATCH == 16 else f' --batch {BATCH}'}`  ")
    print(f"Date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; wall {time.time() - t_start:.0f} s  ")
    print(
        f"Machine: {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"peft {peft.__version__}, timm {timm.__version__}; load average {load0[0]:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end  "
    )
    print(
        f"Model: {MODEL}, batch {BATCH}, r={RANK} on {TARGETS} + head; trainable: ours "
        f"{rep_ours.trainable:,}, PEFT {n_peft:,}. Ratios: mean ± std over {args.repeats} alternating repeats.\n"
    )
    print("| measurement | ours | reference | ratio | goal | met |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
