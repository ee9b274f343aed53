"""Nuclei ablation on the generated held-out (test) split: classical baseline vs SAM variants.

Rows: Otsu + distance-transform watershed (untrained); frozen SAM encoder + heads; LoRA; MALA;
MALA + HMF; MALA + HMF + BGMR (the full method). Every trained row runs the embedded default
(``domains/nuclei.yaml``: same tiles, epochs, optimiser and schedule; only the switches differ)
for 3 seeds; the table gives mean +- std of bPQ / mPQ / AJI on the test split, trainable
parameters and training seconds.

Budget: ~45 min on 2 CPU cores. The 15 trained runs go to two worker processes with one thread
each (two single-thread runs side by side use both cores and, unlike two-thread runs, do not
collapse when other programs share the CPU). Seconds are wall time per run under that sharing.

    python benchmarks/nuclei.py                  # full table -> stdout (markdown)
    python benchmarks/nuclei.py --epochs 2 --seeds 1 --rows mala_hmf_bgmr   # quick look
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ROWS: dict[str, tuple[str, list[str]]] = {
    "classical": ("Otsu + distance-transform watershed (untrained)", []),
    "frozen": ("frozen SAM encoder + heads", ["--model.init_args.adapter", "null", "--model.init_args.hmf", "false",
                                              "--model.init_args.bgmr", "false"]),
    "lora": ("LoRA r=8 on qkv", ["--config", "domains/nuclei/lora.yaml", "--model.init_args.hmf", "false",
                                 "--model.init_args.bgmr", "false"]),
    "mala": ("MALA", ["--model.init_args.hmf", "false", "--model.init_args.bgmr", "false"]),
    "mala_hmf": ("MALA + HMF", ["--model.init_args.bgmr", "false"]),
    "mala_hmf_bgmr": ("MALA + HMF + BGMR (full)", []),
}


def run_trained(row: str, seed: int, epochs: int | None) -> dict[str, float]:
    """Fit one configuration in this process (one thread) and score the test split."""
    import torch

    torch.set_num_threads(1)
    from suite.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        args = ["fit", "--config", "domains/nuclei.yaml", *ROWS[row][1], "--seed_everything", str(seed),
                "--data.init_args.seed", str(seed), "--trainer.default_root_dir", tmp,
                "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                "--trainer.check_val_every_n_epoch", "1000"]  # the table scores the test split only
        if epochs:
            args += ["--trainer.max_epochs", str(epochs)]
        start = time.time()
        cli = main(args)
        seconds = time.time() - start
        cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
        m = {k.split("/", 1)[1]: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/")}
    return {"bPQ": m["bPQ"], "mPQ": m["mPQ"], "AJI": m["AJI"], "trainable": cli.model.report.trainable, "seconds": seconds}


def run_classical() -> dict[str, float]:
    """Otsu + watershed on the same test tiles; every nucleus gets the training set's commonest class."""
    from domains.nuclei.data import NucleiData
    from domains.nuclei.metrics import NucleiMetrics
    from domains.nuclei.postprocess import otsu_watershed

    dm = NucleiData()
    dm.setup("test")
    train = dm.splits["train"]
    counts = np.bincount(np.concatenate([np.ravel(train.maps(i)[1]) for i in range(len(train))]), minlength=6)
    common = int(np.argmax(counts[1:]) + 1)
    metrics = NucleiMetrics()
    start = time.time()
    test = dm.splits["test"]
    for i in range(len(test)):
        item = test[i]
        inst = otsu_watershed(item["image"].permute(1, 2, 0).byte().numpy())
        metrics.update(item["inst_map"].numpy(), item["type_map"].numpy(), inst, np.where(inst > 0, common, 0), item["tissue"])
    m = metrics.compute()
    return {"bPQ": m["bPQ"], "mPQ": m["mPQ"], "AJI": m["AJI"], "trainable": 0, "seconds": time.time() - start}


def _fmt(values: list[float], digits: int = 3) -> str:
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="override the YAML's max_epochs for every row alike")
    parser.add_argument("--rows", nargs="*", default=list(ROWS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write raw results here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.chdir(ROOT)
    start = time.time()
    classical = run_classical()  # also builds the generated set once, before workers race to build it
    jobs = [(row, seed) for row in args.rows if row != "classical" for seed in range(args.seeds)]
    results: dict[str, list[dict[str, float]]] = {row: [] for row in args.rows}
    if "classical" in args.rows:
        results["classical"].append(classical)
    with ProcessPoolExecutor(args.workers) as pool:
        futures = {pool.submit(run_trained, row, seed, args.epochs): (row, seed) for row, seed in jobs}
        for fut, (row, seed) in futures.items():
            results[row].append(fut.result())
            print(f"# done {row} seed {seed}: {results[row][-1]}", file=sys.stderr, flush=True)
    total = time.time() - start
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    lines = [
        f"Nuclei ablation, generated held-out test split, {args.seeds} seeds (mean ± std); "
        f"{datetime.date.today().isoformat()}, total {total / 60:.1f} min",
        "",
        "| row | bPQ | mPQ | AJI | trainable params | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for row in args.rows:
        r = results[row]
        lines.append(
            f"| {ROWS[row][0]} | {_fmt([x['bPQ'] for x in r])} | {_fmt([x['mPQ'] for x in r])} | "
            f"{_fmt([x['AJI'] for x in r])} | {int(r[0]['trainable']):,} | {np.mean([x['seconds'] for x in r]):.0f} |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
