"""Fixed-seed training losses of every landed domain at two revisions, side by side.

A refactor of shared code must not change what the domains compute. This runs each domain's YAML
for a few fixed-seed steps in a git worktree of each revision (same generated data, one data cache)
and prints the per-step training losses; equal losses mean equal behaviour.

    python benchmarks/seed_parity.py <rev-before> <rev-after> [--steps 6]

Budget: ~10 min on 2 cores (four short fits per revision, plus the point-cloud foundation once per
revision). Last result: benchmarks/results/seed_parity.md.
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = {  # domain -> extra arguments that keep the run short (the same at both revisions)
    "nuclei": ["--data.init_args.n_tiles", "32"],
    "forecasting": [],
    "calorimetry": [],
    "pointcloud": [],
}


def losses(folder: Path) -> list[float]:
    for f in sorted(glob.glob(str(folder / "logs" / "version_*" / "metrics.csv"))):
        rows = list(csv.DictReader(open(f)))
        key = next((k for k in (rows[0] if rows else {}) if k.startswith("train/loss")), None)
        if key:
            return [float(r[key]) for r in rows if r.get(key)]
    return []


def run(rev: str, work: Path, data: Path, steps: int, precision: str) -> dict[str, list[float]]:
    tree = work / f"tree-{rev}"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(tree), rev], check=True)
    env = os.environ | {"SUITE_DATA_DIR": str(data), "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    out = {}
    try:
        for domain, extra in RUNS.items():
            root = work / rev / domain
            args = [sys.executable, "-m", "suite", "fit", "--config", f"domains/{domain}.yaml", *extra,
                    "--trainer.max_steps", str(steps), "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "0",
                    "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
                    "--trainer.precision", precision, "--trainer.default_root_dir", str(root)]
            subprocess.run(args, cwd=tree, env=env, check=True, capture_output=True)
            out[domain] = losses(root)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--precision", default="32-true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        a = run(args.before, work, work / "data", args.steps, args.precision)
        b = run(args.after, work, work / "data", args.steps, args.precision)
    lines = [f"# Fixed-seed training losses: {args.before} vs {args.after} ({args.steps} steps, {args.precision})", "",
             "| domain | step losses before | step losses after | equal |", "|---|---|---|---|"]
    for d in RUNS:
        fmt = lambda v: " ".join(f"{x:.6f}" for x in v)  # noqa: E731
        lines.append(f"| {d} | {fmt(a[d])} | {fmt(b[d])} | {'yes' if a[d] == b[d] and a[d] else 'NO'} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
