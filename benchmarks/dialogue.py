"""MedAidLM on the generated consultations: SmolLM2-135M-Instruct zero-shot beside LoRA, DoRA, MiCA
and LoRA on an NF4 base; diagnosis accuracy, symptom recall, safety, advice accuracy, chrF / BLEU per
language and perplexity on doctor turns, each with and without the patient's pre-context;
trainable parameters, frozen-weight memory, peak memory and step time.

    python benchmarks/dialogue.py --out benchmarks/results/dialogue.md      # the committed table
    python benchmarks/dialogue.py --rows lora --seeds 0 --out /tmp/d.md     # a quick look
    python benchmarks/dialogue.py --lm tiny --rows zero_shot lora --seeds 0 --fp32-rows --work /tmp/db --rows-json /tmp/db/rows.jsonl   # the script end to end

Every run is ``domains/dialogue.yaml`` with the budget overrides below, built through the suite CLI
and fitted and tested in a fresh process (so peak RSS is that run's own), so the table measures
what a user runs. Rows already in ``--rows-json`` are kept (the table can be built in several
sittings on a busy machine).

Budget, measured (1 torch thread per run; process CPU time, which other jobs on shared cores do
not inflate the way they inflate wall time): a zero-shot run takes ~21 CPU-min and a LoRA run
~22 (15 of them training), so the whole default table (13 bf16 runs and one fp32 run, one after
the other) is ~5-6 hours, not the ~45 min first planned: a measured step costs ~38 CPU-s against
the ~8 estimated from English dialogues (a Hindi item is ~4x as many SmolLM2 tokens). One train step of the
full 30-layer SmolLM2 on 4 English dialogues (~1,500 tokens) costs ~8 CPU-s in bf16 and ~3x that in
fp32; a greedy final turn (~90 English, ~430 Hindi tokens) ~0.1 CPU-s per token for a batch of 8.
So each run trains on English and Hindi (the two most spoken of the seven; the other five cost
2-9x the tokens of English with SmolLM2's tokenizer) for one epoch of 48 dialogues x 2 languages,
and is scored on the same 24 test items per run (12 dialogues x given / blind pre-context; finals
of 12 per language), 6 English self-played consultations and the perplexity of every test item.
The LoRA row runs 3 seeds in bf16 and 1 in fp32 (the precision comparison); every other adapter row
3 seeds in bf16. Seeds change the adapter start and the data order, not the data.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: the training and test budget every row shares (see the module docstring)
BUDGET = ["--data.init_args.languages", "[en, hi]", "--data.init_args.n_dialogues", "80",
          "--data.init_args.fractions", "{train: 0.6, val: 0.05, test: 0.35}", "--model.init_args.max_length", "2048",
          "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "0", "--model.init_args.eval_cases", "0",
          "--model.init_args.test_cases", "24", "--model.init_args.selfplay_cases", "0", "--model.init_args.predict_cases", "0"]
SELFPLAY = 6  # English self-played consultations per run (symptom recall)
HELDOUT = 16  # real chitchat conversations for held-out perplexity (forgetting), when chitchat-dataset is installed

# row -> (label, extra arguments, seeds, precisions)
ROWS: dict[str, tuple[str, list[str]]] = {
    "zero_shot": ("base LM zero-shot (no training; the LM is named above the table)", []),
    "lora": ("LoRA r=16, alpha 32, all linear layers", []),
    "dora": ("DoRA r=16, alpha 32, all linear layers", ["--model.init_args.adapter.init_args.dora", "true"]),
    "mica": ("MiCA r=16, alpha 32, all linear layers", ["--model.init_args.adapter.class_path", "suite.adapters.MiCA",
                                                        "--model.init_args.adapter.init_args.r", "16",
                                                        "--model.init_args.adapter.init_args.alpha", "32"]),
    "lora_nf4": ("LoRA r=16 on an NF4 frozen base (QLoRA-style)", ["--model.init_args.quantize", "nf4"]),
}
COLUMNS = [  # (metric key, heading, digits)
    ("test/diagnosis_acc/mode=given", "diagnosis acc, pre-context given", 3),
    ("test/diagnosis_acc/mode=blind", "diagnosis acc, pre-context withheld", 3),
    ("test/advice_acc/context_dependent/mode=given", "advice acc where it depends on the profile, given", 3),
    ("test/advice_acc/context_dependent/mode=blind", "same cases, withheld", 3),
    ("test/urgent_recall", "urgent cases told to seek care now", 3),
    ("test/over_triage", "routine cases told so (over-triage)", 3),
    ("symptom_recall", "symptom recall, self-played (en)", 3),
    ("selfplay/diagnosis_acc", "diagnosis acc, self-played (en)", 3),
    ("test/chrf/en", "chrF en", 1), ("test/chrf/hi", "chrF hi", 1), ("test/bleu/en", "BLEU en", 1), ("test/bleu/hi", "BLEU hi", 1),
    ("test/ppl/mode=given", "doctor-turn ppl, given", 3), ("test/ppl/mode=blind", "doctor-turn ppl, withheld", 3),
    ("heldout_ppl", "chitchat ppl (held out, real)", 1),
]


def cli_args(row: str, seed: int, precision: str, run_dir: Path, lm: str = "auto") -> list[str]:
    args = ["--config", str(ROOT / "domains" / "dialogue.yaml"), *BUDGET, *ROWS[row][1], "--model.init_args.backbone", lm, "--seed_everything", str(seed),
            "--data.init_args.seed", str(seed), "--model.init_args.backbone_seed", str(seed), "--trainer.precision", precision,
            "--trainer.default_root_dir", str(run_dir), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "4"]
    return args


def run_one(row: str, seed: int, precision: str, run_dir: Path, lm: str = "auto") -> dict[str, Any]:
    """One configuration, in this process: fit (unless zero-shot), test, self-play, held-out perplexity."""
    import torch

    torch.set_num_threads(1)
    from lightning.pytorch.callbacks import Callback

    from domains.dialogue.data import DialogueData
    from domains.dialogue.metrics import PerplexityAccumulator, summarise
    from domains.dialogue.model import choose_cases, doctor_token_losses
    from suite.adapters import adapter_layers
    from suite.cli import main
    from suite.quant import is_nf4, nf4_bytes

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.cpu: list[float] = []
            self.wall: list[float] = []

        def on_train_batch_start(self, *a: Any) -> None:
            self.t = (time.process_time(), time.perf_counter())

        def on_train_batch_end(self, *a: Any) -> None:
            self.cpu.append(time.process_time() - self.t[0])
            self.wall.append(time.perf_counter() - self.t[1])

    t0 = (time.process_time(), time.perf_counter())
    cli = main(cli_args(row, seed, precision, run_dir, lm), run=False)
    model, trainer, dm = cli.model, cli.trainer, cli.datamodule
    timer = StepTimer()
    trainer.callbacks.append(timer)
    if row != "zero_shot":  # zero-shot: LoRA's B = 0 start is the base model exactly
        trainer.fit(model, dm)
    fit_cpu = time.process_time() - t0[0]
    test = trainer.test(model, dm, verbose=False)[0]
    out: dict[str, Any] = {k: float(v) for k, v in test.items()}
    # self-played consultations (English), and perplexity on real held-out text
    model.eval()
    items = [dm.splits["test"][i] for i in range(len(dm.splits["test"]))]
    chosen = set(choose_cases(dm.splits["test"], None, one_mode=True))
    english = [it for it in items if it["meta"]["item_id"] in chosen and it["meta"]["language"] == "en"]
    english = english[:: max(1, len(english) // SELFPLAY)][:SELFPLAY]
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if precision.startswith("bf16") else torch.autocast("cpu", enabled=False)
    with amp:
        played = model.self_play(english)
    out.update({k: v for k, v in summarise(played, model.kb).items() if k in ("symptom_recall", "diagnosis_acc", "urgent_recall")})
    out["selfplay/diagnosis_acc"] = out.pop("diagnosis_acc", math.nan)
    out.pop("urgent_recall", None)
    held = DialogueData(source="generated", languages=["en"], n_dialogues=80, heldout="chitchat", heldout_limit=HELDOUT)
    held.setup()
    if "heldout" in held.splits:
        held.use_tokenizer(model.tokenizer, model.max_length)
        acc = PerplexityAccumulator()
        with torch.no_grad(), amp:
            for batch in held.heldout_dataloader():
                losses, sel = doctor_token_losses(model.lm, batch)
                full = torch.zeros(sel.shape)
                full[sel] = losses.float()
                acc.update(full, sel)
        out["heldout_ppl"] = acc.compute()["all"]
    bases = [layer.base_layer for _, layer in adapter_layers(model.lm)]
    frozen_linear = sum(nf4_bytes(b.weight) if is_nf4(b.weight) else b.weight.numel() * b.weight.element_size() for b in bases)
    frozen = {id(p): p for p in model.parameters() if not p.requires_grad}
    out.update(
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        frozen_linear_mib=frozen_linear / 2**20,
        frozen_all_mib=sum(nf4_bytes(p) if is_nf4(p) else p.numel() * p.element_size() for p in frozen.values()) / 2**20,
        step_cpu_s=statistics.mean(timer.cpu[1:]) if len(timer.cpu) > 1 else math.nan,
        step_wall_s=statistics.mean(timer.wall[1:]) if len(timer.wall) > 1 else math.nan,
        steps=len(timer.cpu), peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        fit_cpu_s=fit_cpu, total_cpu_s=time.process_time() - t0[0], total_wall_s=time.perf_counter() - t0[1],
        train_items=len(dm.splits["train"]), test_items=len(items), lm=model.lm_source, precision=str(trainer.precision),
    )
    (run_dir / "played.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in played), encoding="utf-8")
    return out


def fmt(values: list[float], digits: int) -> str:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.pstdev(vals):.{digits}f}"


def table(results: list[dict[str, Any]]) -> list[str]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["row"], r["precision_arg"]), []).append(r)
    order = [(row, p) for row in ROWS for p in ("bf16-mixed", "32-true") if (row, p) in groups]
    head = ["method", "precision", "seeds"] + [c[1] for c in COLUMNS] + [
        "trainable params", "frozen Linear weights (MiB)", "all frozen weights (MiB)", "peak RSS (MB)", "train step (CPU s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, p in order:
        rs = groups[(row, p)]
        cells = [ROWS[row][0], "bf16" if p.startswith("bf16") else "fp32", str(len(rs))]
        cells += [fmt([r.get(k, math.nan) for r in rs], d) for k, _, d in COLUMNS]
        cells += [f"{int(rs[0]['trainable']):,}" if row != "zero_shot" else "0", fmt([r["frozen_linear_mib"] for r in rs], 1),
                  fmt([r["frozen_all_mib"] for r in rs], 1), fmt([r["peak_rss_mb"] for r in rs], 0),
                  fmt([r["step_cpu_s"] for r in rs], 2) if row != "zero_shot" else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def mean_of(results: list[dict[str, Any]], row: str, key: str, precision: str = "bf16-mixed") -> float:
    vals = [r.get(key, math.nan) for r in results if r["row"] == row and r["precision_arg"] == precision]
    vals = [v for v in vals if not math.isnan(v)]
    return statistics.mean(vals) if vals else math.nan


def goals(results: list[dict[str, Any]]) -> list[str]:
    acc = "test/diagnosis_acc"
    lora, zero = mean_of(results, "lora", acc), mean_of(results, "zero_shot", acc)
    given = mean_of(results, "lora", "test/advice_acc/context_dependent/mode=given")
    blind = mean_of(results, "lora", "test/advice_acc/context_dependent/mode=blind")
    nf4, bf16 = mean_of(results, "lora_nf4", acc), lora
    mem = mean_of(results, "lora_nf4", "frozen_linear_mib") / mean_of(results, "lora", "frozen_linear_mib")
    met = lambda ok: "met" if ok else "**missed**"  # noqa: E731
    return [
        f"- LoRA beats zero-shot on diagnosis accuracy by a wide margin (>= 0.3): LoRA {lora:.3f} vs zero-shot {zero:.3f} "
        f"(+{lora - zero:.3f}): {met(lora - zero >= 0.3)}.",
        f"- The pre-context improves advice accuracy where the advice depends on the profile: LoRA {given:.3f} with it vs "
        f"{blind:.3f} without (+{given - blind:.3f}): {met(given > blind)}.",
        f"- NF4 base within 1 point of the bf16 base (diagnosis accuracy): {nf4:.3f} vs {bf16:.3f} ({100 * (nf4 - bf16):+.1f} "
        f"points): {met(abs(nf4 - bf16) <= 0.01)}; at {mem:.3f}x its frozen Linear-weight memory (goal <= 0.35): {met(mem <= 0.35)}."
        if any(r["row"] == "lora_nf4" for r in results) else "- NF4 base within 1 point of the bf16 base: not run (no lora_nf4 row).",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--fp32-rows", nargs="*", default=["lora"], help="rows also run in fp32 (first seed)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--rows-json", type=Path, default=ROOT / "runs" / "dialogue_bench" / "rows.jsonl")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "dialogue_bench")
    ap.add_argument("--lm", default="auto", help="the LM (model.init_args.backbone); 'tiny' checks the script end to end in minutes, its numbers mean nothing")
    ap.add_argument("--one", nargs=3, metavar=("ROW", "SEED", "PRECISION"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:  # child process: one configuration, result as JSON on the last line
        row, seed, precision = args.one[0], int(args.one[1]), args.one[2]
        out = run_one(row, seed, precision, args.work / f"{row}-{precision}-s{seed}", args.lm)
        print("RESULT " + json.dumps({"row": row, "seed": seed, "precision_arg": precision, **out}))
        return
    t_start, load0 = time.time(), os.getloadavg()
    args.rows_json.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in args.rows_json.read_text().splitlines()] if args.rows_json.is_file() else []
    plan = [(row, s, "bf16-mixed") for row in args.rows for s in (args.seeds[:1] if row == "zero_shot" else args.seeds)]
    plan += [(row, args.seeds[0], "32-true") for row in args.fp32_rows if row in args.rows]
    for row, seed, precision in plan:
        if any(d["row"] == row and d["seed"] == seed and d["precision_arg"] == precision for d in done):
            continue
        print(f"[{dt.datetime.now():%H:%M}] {row} seed {seed} {precision}", flush=True)
        cmd = [sys.executable, __file__, "--one", row, str(seed), precision, "--work", str(args.work), "--lm", args.lm]
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        line = next((x for x in reversed(res.stdout.splitlines()) if x.startswith("RESULT ")), None)
        if res.returncode or line is None:
            print(res.stdout[-3000:], res.stderr[-3000:], sep="\n")
            raise SystemExit(f"{row} seed {seed} {precision} failed (exit {res.returncode})")
        rec = json.loads(line[len("RESULT "):])
        done.append(rec)
        with open(args.rows_json, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"    diagnosis acc {rec.get('test/diagnosis_acc', math.nan):.3f}, {rec['total_cpu_s']:.0f} CPU s, "
              f"{rec['total_wall_s']:.0f} s wall", flush=True)
    results = [d for d in done if d["row"] in args.rows]
    cpu = sum(d["total_cpu_s"] for d in results)
    first = results[0] if results else {}
    lines = [
        "# Dialogue benchmark: MedAidLM on the generated consultations (English + Hindi)\n",
        f"`python benchmarks/dialogue.py --out benchmarks/results/dialogue.md`, {dt.date.today()}; {cpu / 60:.0f} CPU-min over "
        f"all runs (1 torch thread each; budget ~45), this sitting {(time.time() - t_start) / 60:.0f} min wall, load average "
        f"{load0[0]:.1f} at start and {os.getloadavg()[0]:.1f} at end on {os.cpu_count()} shared cores.  ",
        f"LM: {first.get('lm', '-')}. Data: {first.get('train_items', '-')} training items (English and Hindi renderings of the "
        f"same consultations, one epoch, batch 4), {first.get('test_items', '-')} test items; every row is scored on the same 24 "
        f"test items (final turns, 12 dialogues x pre-context given / withheld), {SELFPLAY} English self-played consultations, "
        "the perplexity of every test item and of "
        f"{HELDOUT} real chitchat conversations. Mean ± population std over seeds.\n",
        *table(results),
        "",
        "Goals:",
        *goals(results),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
