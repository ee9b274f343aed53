"""MedAidLM on the generated consultations: SmolLM2-135M-Instruct zero-shot beside LoRA, DoRA, MiCA
and LoRA on an NF4 base; diagnosis accuracy, symptom recall, safety, advice accuracy, chrF / BLEU per
language and perplexity on doctor turns, each with and without the patient's pre-context;
trainable parameters, frozen-weight memory, peak memory and step time.

    python benchmarks/dialogue.py --jobs 2 --out /tmp/d.md                  # the table (benchmarks/results/dialogue.md)
    python benchmarks/dialogue.py --rows lora --seeds 0 --epochs 3          # the epochs ablation
    python benchmarks/dialogue.py --budget en_hi --rows lora --seeds 0      # the English + Hindi budget
    python benchmarks/dialogue.py --report --out /tmp/d.md                  # the table from the runs so far
    python benchmarks/dialogue.py --lm tiny --rows zero_shot lora --seeds 0 --fp32-rows --work /tmp/db --rows-json /tmp/db/rows.jsonl   # the script end to end

Every run is ``domains/dialogue.yaml`` with the budget overrides below, built through the suite CLI
and fitted and tested in a fresh process (so peak RSS is that run's own), so the table measures
what a user runs. Rows already in ``--rows-json`` are kept (the table can be built in several
sittings on a busy machine).

Budgets (``--budget``; 1 torch thread per run, process CPU time, which other jobs on shared cores do
not inflate the way they inflate wall time). Every run is scored on the same 24 test final turns (a
dialogue that has a pre-context once with it given and once withheld; one that has none, once), 6 English
self-played consultations, the perplexity of every test item and that of real held-out chitchat.

- ``en`` (the default): the default YAML's data size, 96 English consultations (24 steps of 4 an
  epoch; ``--epochs`` for more). A LoRA run is ~12 CPU-min in fp32 on an AVX2-only CPU (6 of them
  training, ~15 CPU-s a step) and ~9 in bf16 on an AVX512-BF16 one (5 training, ~11 CPU-s a step),
  ~6 GB peak RSS, so ``--jobs 2`` runs two at once on a 24 GB machine (DoRA peaks higher). The whole default
  table (zero-shot once, four adapter rows x 3 seeds) is ~170 CPU-min, ~1.5 h wall with ``--jobs 2``
  on 2 cores: over the ~45 min first planned, which one seed per adapter row (~65 CPU-min) meets.
- ``en_x4``: 384 English consultations (96 steps an epoch), the data-size ablation: ~4x ``en``'s
  training cost. Its split is drawn from 512 consultations, so its ~24 scored final turns are other
  consultations than ``en``'s, from the same generator.
- ``en_hi``: 48 consultations, each rendered in English and Hindi (96 items, the same 24 steps). A Hindi
  item is ~4x the SmolLM2 tokens of an English one, so a train step costs ~38 CPU-s against ~8, and a
  run ~22 CPU-min (15 of them training). At this budget no adapter closes a consultation
  (benchmarks/results/dialogue.md keeps those runs). The other five languages cost 2-9x English's
  tokens with SmolLM2's tokenizer.

Every row runs 3 seeds in the precision a run of the YAML would choose (``suite.precision``:
bf16-mixed where the CPU has bf16 matrix units, AMX-BF16 or AVX512-BF16; fp32 where it has none, as
on an AVX2-only CPU, where a bf16 matmul runs ~60x slower than an fp32 one). Where that is bf16, the
LoRA row runs once more in fp32 (the precision comparison). Seeds change the adapter start and the
data order, not the data.
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
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from suite.precision import BF16_MIXED, FP32, choose_precision, cpu_description  # noqa: E402

#: the training and test budgets (``--budget``; see the module docstring). ``en`` trains on the default
#: YAML's data (96 English consultations, one epoch); ``en_hi`` on 48 consultations rendered in
#: English and Hindi (96 items, the same 24 steps).
COMMON = ["--trainer.limit_val_batches", "0", "--model.init_args.eval_cases", "0", "--model.init_args.test_cases", "24", "--model.init_args.selfplay_cases", "0", "--model.init_args.predict_cases", "0"]
BUDGETS: dict[str, tuple[str, list[str]]] = {
    "en": ("96 English consultations", [
        "--data.init_args.languages", "[en]", "--data.init_args.n_dialogues", "128",
        "--data.init_args.fractions", "{train: 0.75, val: 0.03125, test: 0.21875}", "--model.init_args.max_length", "1024", *COMMON]),
    "en_x4": ("384 English consultations", [
        "--data.init_args.languages", "[en]", "--data.init_args.n_dialogues", "512",
        "--data.init_args.fractions", "{train: 0.75, val: 0.03125, test: 0.21875}", "--model.init_args.max_length", "1024", *COMMON]),
    "en_hi": ("48 consultations, each rendered in English and Hindi", [
        "--data.init_args.languages", "[en, hi]", "--data.init_args.n_dialogues", "80",
        "--data.init_args.fractions", "{train: 0.6, val: 0.05, test: 0.35}", "--model.init_args.max_length", "2048", *COMMON]),
}
SELFPLAY = 6  # English self-played consultations per run (symptom recall)
HELDOUT = 16  # real chitchat conversations for held-out perplexity (forgetting), when chitchat-dataset is installed

# row -> (label, extra arguments)
ROWS: dict[str, tuple[str, list[str]]] = {
    "zero_shot": ("base LM zero-shot (no training; the LM is named above the table)", []),
    "lora": ("LoRA r=16, alpha 32, all linear layers", []),
    "dora": ("DoRA r=16, alpha 32, all linear layers", ["--model.init_args.adapter.init_args.dora", "true"]),
    "mica": ("MiCA r=16, alpha 32, all linear layers", ["--model.init_args.adapter.class_path", "suite.adapters.MiCA",
                                                        "--model.init_args.adapter.init_args.r", "16",
                                                        "--model.init_args.adapter.init_args.alpha", "32"]),
    "lora_nf4": ("LoRA r=16 on an NF4 frozen base (QLoRA-style)", ["--model.init_args.quantize", "nf4"]),
    # the first 4 tokens of a doctor turn choose its act (ask a symptom, ask a profile field, close): ~20 % of the
    # English doctor tokens, so weight 4 gives them half the loss (MedAidLM.act_weight)
    "lora_act": ("LoRA r=16, act tokens weighted 4x", ["--model.init_args.act_weight", "4", "--model.init_args.act_tokens", "4"]),
}
COLUMNS = [  # (metric key, heading, digits)
    ("test/diagnosis_acc", "diagnosis acc, all scored final turns", 3),
    ("test/diagnosis_acc/mode=given", "diagnosis acc, pre-context given", 3),
    ("test/diagnosis_acc/mode=blind", "diagnosis acc, pre-context withheld", 3),
    ("test/diagnosis_acc/mode=none", "diagnosis acc, dialogue had no pre-context", 3),
    # how often the generated final turn closes at all (a diagnosis or "seek care now"), right or wrong: the decision
    # the diagnosis accuracy depends on (withheld: the reference doctor closes, but was told the profile the model was not)
    ("closed/mode=given", "closes, given", 3), ("closed/mode=blind", "closes, withheld", 3), ("closed/mode=none", "closes, no pre-context", 3),
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


def closed_by_mode(run_dir: Path) -> dict[str, float]:
    """``closed/mode=M``: the share of a run's generated test final turns (``generations/test-*.jsonl``)
    that close the consultation, by pre-context mode; {} if the run left none. A turn closes when it
    names a diagnosis or says to seek care now (``metrics.is_final``), or opens as the generator's
    diagnosis sentences do ("From what you describe, this is most likely ...") before a disease the
    knowledge base does not know ("... most likely asthma")."""
    from domains.dialogue.kb import load_kb, normalise
    from domains.dialogue.metrics import is_final

    openings: dict[str, list[str]] = {}  # per language: the diagnosis templates' text before {disease}

    def closes(text: str, lang: str) -> bool:
        if lang not in openings:
            openings[lang] = [o for t in kb.block(lang)["diagnosis"] if (o := normalise(t.split("{disease}")[0], lang))]
        return is_final(text, lang, kb) or any(o in normalise(text, lang) for o in openings[lang])

    files = sorted(Path(run_dir).glob("logs/version_*/generations/test-epoch*.jsonl"))
    if not files:
        return {}
    kb, by_mode = load_kb(), {}
    for line in files[-1].read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        by_mode.setdefault(r["pre_context_mode"], []).append(closes(r["final"], r["language"]))
    return {f"closed/mode={m}": sum(v) / len(v) for m, v in by_mode.items()}


def cli_args(row: str, seed: int, precision: str, run_dir: Path, lm: str = "auto", budget: str = "en", epochs: int = 1) -> list[str]:
    args = ["--config", str(ROOT / "domains" / "dialogue.yaml"), *BUDGETS[budget][1], "--trainer.max_epochs", str(epochs), *ROWS[row][1], "--model.init_args.backbone", lm, "--seed_everything", str(seed),
            "--data.init_args.seed", str(seed), "--model.init_args.backbone_seed", str(seed), "--trainer.precision", precision,
            "--trainer.default_root_dir", str(run_dir), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "4"]
    return args


def run_one(row: str, seed: int, precision: str, run_dir: Path, lm: str = "auto", budget: str = "en", epochs: int = 1) -> dict[str, Any]:
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
    cli = main(cli_args(row, seed, precision, run_dir, lm, budget, epochs), run=False)
    model, trainer, dm = cli.model, cli.trainer, cli.datamodule
    timer = StepTimer()
    trainer.callbacks.append(timer)
    if row != "zero_shot":  # zero-shot: LoRA's B = 0 start is the base model exactly
        trainer.fit(model, dm)
    fit_cpu = time.process_time() - t0[0]
    test = trainer.test(model, dm, verbose=False)[0]
    out: dict[str, Any] = {k: float(v) for k, v in test.items()}
    out.update(closed_by_mode(run_dir))
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
        # one length for every budget, so the held-out perplexity compares across budgets (2048: en_hi's)
        held.use_tokenizer(model.tokenizer, max(model.max_length, 2048))
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
        train_items=len(dm.splits["train"]), test_items=len(items), lm=model.lm_source, precision=str(trainer.precision), budget=budget,
        epochs=epochs, cpu=cpu_description(),
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
    order = [(row, p) for row in ROWS for p in (BF16_MIXED, FP32) if (row, p) in groups]
    # a metric no run measured (chrF hi in an English-only budget) is left out, not shown as a column of "-"
    columns = [c for c in COLUMNS if any(not math.isnan(r.get(c[0], math.nan)) for r in results)]
    head = ["method", "precision", "seeds"] + [c[1] for c in columns] + [
        "trainable params", "frozen Linear weights (MiB)", "all frozen weights (MiB)", "peak RSS (MB)", "train step (CPU s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, p in order:
        rs = groups[(row, p)]
        cells = [ROWS[row][0], "bf16" if p.startswith("bf16") else "fp32", str(len(rs))]
        cells += [fmt([r.get(k, math.nan) for r in rs], d) for k, _, d in columns]
        cells += [f"{int(rs[0]['trainable']):,}" if row != "zero_shot" else "0", fmt([r["frozen_linear_mib"] for r in rs], 1),
                  fmt([r["frozen_all_mib"] for r in rs], 1), fmt([r["peak_rss_mb"] for r in rs], 0),
                  fmt([r["step_cpu_s"] for r in rs], 2) if row != "zero_shot" else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def mean_of(results: list[dict[str, Any]], row: str, key: str, precision: str) -> float:
    vals = [r.get(key, math.nan) for r in results if r["row"] == row and r["precision_arg"] == precision]
    vals = [v for v in vals if not math.isnan(v)]
    return statistics.mean(vals) if vals else math.nan


def goals(results: list[dict[str, Any]], primary: str) -> list[str]:
    acc = "test/diagnosis_acc"
    lora, zero = mean_of(results, "lora", acc, primary), mean_of(results, "zero_shot", acc, primary)
    given = mean_of(results, "lora", "test/advice_acc/context_dependent/mode=given", primary)
    blind = mean_of(results, "lora", "test/advice_acc/context_dependent/mode=blind", primary)
    nf4, bf16 = mean_of(results, "lora_nf4", acc, primary), lora
    # the goal's denominator is the frozen Linear weights stored in bf16 (2 bytes each) whatever precision ran
    dense_bf16 = mean_of(results, "lora", "frozen_linear_mib", primary) * (1.0 if primary.startswith("bf16") else 0.5)
    mem = mean_of(results, "lora_nf4", "frozen_linear_mib", primary) / dense_bf16
    met = lambda ok: "met" if ok else "**missed**"  # noqa: E731
    return [
        f"- LoRA beats zero-shot on diagnosis accuracy by a wide margin (>= 0.3): LoRA {lora:.3f} vs zero-shot {zero:.3f} "
        f"(+{lora - zero:.3f}): {met(lora - zero >= 0.3)}.",
        f"- The pre-context improves advice accuracy where the advice depends on the profile: LoRA {given:.3f} with it vs "
        f"{blind:.3f} without (+{given - blind:.3f}): {met(given > blind)}.",
        f"- NF4 base within 1 point of the dense base (diagnosis accuracy, {primary}): {nf4:.3f} vs {bf16:.3f} ({100 * (nf4 - bf16):+.1f} "
        f"points): {met(abs(nf4 - bf16) <= 0.01)}; at {mem:.3f}x the dense frozen Linear weights stored in bf16 (goal <= 0.35): {met(mem <= 0.35)}."
        if any(r["row"] == "lora_nf4" for r in results) else "- NF4 base within 1 point of the dense base: not run (no lora_nf4 row).",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--fp32-rows", nargs="*", default=["lora"], help="rows also run in fp32 (first seed)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--budget", default="en", choices=list(BUDGETS), help="training and test data (BUDGETS)")
    ap.add_argument("--report", action="store_true", help="only build the table from --rows-json (runs nothing)")
    ap.add_argument("--epochs", type=int, default=1, help="training epochs (trainer.max_epochs)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once, one torch thread each (peak RSS a run in fp32, en: 6-11 GB, DoRA the most; en_hi: 13-22 GB, keep 1)")
    ap.add_argument("--rows-json", type=Path, default=None, help="results kept between sittings (default: WORK/rows.jsonl)")
    ap.add_argument("--work", type=Path, default=None, help="run folders (default: runs/dialogue_bench/BUDGET)")
    ap.add_argument("--lm", default="auto", help="the LM (model.init_args.backbone); 'tiny' checks the script end to end in minutes, its numbers mean nothing")
    ap.add_argument("--one", nargs=3, metavar=("ROW", "SEED", "PRECISION"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.work = args.work or ROOT / "runs" / "dialogue_bench" / (args.budget + (f"-e{args.epochs}" if args.epochs != 1 else ""))
    args.rows_json = args.rows_json or args.work / "rows.jsonl"
    if args.one:  # child process: one configuration, result as JSON on the last line
        row, seed, precision = args.one[0], int(args.one[1]), args.one[2]
        out = run_one(row, seed, precision, args.work / f"{row}-{precision}-s{seed}", args.lm, args.budget, args.epochs)
        print("RESULT " + json.dumps({"row": row, "seed": seed, "precision_arg": precision, **out}))
        return
    t_start, load0 = time.time(), os.getloadavg()
    args.rows_json.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in args.rows_json.read_text().splitlines()] if args.rows_json.is_file() else []
    # rows written before --budget / --epochs existed are en_hi, one epoch
    done = [d for d in done if d.get("budget", "en_hi") == args.budget and d.get("epochs", 1) == args.epochs]
    for d in done:  # rows written before the closing rates were recorded: from their run folders, where still here
        if not any(k.startswith("closed/") for k in d):
            d.update(closed_by_mode(args.work / f"{d['row']}-{d['precision_arg']}-s{d['seed']}"))
    # bf16-mixed where the CPU has bf16 matrix units, else fp32 (suite.precision, as a run of the YAML
    # chooses): without them a bf16 matmul runs ~60x slower than fp32 (AVX2-only AMD EPYC, torch 2.14.1)
    primary, why = choose_precision("cpu")
    if args.report and done:  # the table is of the runs in the file, whichever CPU made them
        primary = statistics.mode(d["precision_arg"] for d in done)
        why = f"the precision of most runs in {args.rows_json.name}"
    print(f"precision {primary}: {why}", flush=True)
    plan = [(row, s, primary) for row in args.rows for s in (args.seeds[:1] if row == "zero_shot" else args.seeds)]
    if primary != FP32:
        plan += [(row, args.seeds[0], FP32) for row in args.fp32_rows if row in args.rows]
    plan = [(r, s, p) for r, s, p in plan if not any(d["row"] == r and d["seed"] == s and d["precision_arg"] == p for d in done)]
    if args.report:
        plan = []

    def child(row: str, seed: int, precision: str) -> dict[str, Any]:
        print(f"[{dt.datetime.now():%H:%M}] {row} seed {seed} {precision}", flush=True)
        cmd = [sys.executable, __file__, "--one", row, str(seed), precision, "--work", str(args.work), "--lm", args.lm, "--budget", args.budget,
               "--epochs", str(args.epochs)]
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        line = next((x for x in reversed(res.stdout.splitlines()) if x.startswith("RESULT ")), None)
        if res.returncode or line is None:
            print(res.stdout[-3000:], res.stderr[-3000:], sep="\n")
            raise SystemExit(f"{row} seed {seed} {precision} failed (exit {res.returncode})")
        return json.loads(line[len("RESULT "):])

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        for fut in as_completed([pool.submit(child, *job) for job in plan]):
            rec = fut.result()
            done.append(rec)
            with open(args.rows_json, "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"    {rec['row']} seed {rec['seed']}: diagnosis acc {rec.get('test/diagnosis_acc', math.nan):.3f}, "
                  f"{rec['total_cpu_s']:.0f} CPU s, {rec['total_wall_s']:.0f} s wall", flush=True)
    results = [d for d in done if d["row"] in args.rows]
    cpu = sum(d["total_cpu_s"] for d in results)
    first = results[0] if results else {}
    data = BUDGETS[args.budget][0]
    lines = [
        f"# Dialogue benchmark: MedAidLM on the generated consultations ({data})\n",
        f"`python benchmarks/dialogue.py --budget {args.budget} --epochs {args.epochs} --out ...`, {dt.date.today()}; {cpu / 60:.0f} CPU-min over "
        f"all runs (1 torch thread each), "
        + (f"built from {args.rows_json.name} (--report); " if args.report else f"{args.jobs} at once, this sitting {(time.time() - t_start) / 60:.0f} min wall; ")
        + "load average "
        f"{load0[0]:.1f} at start and {os.getloadavg()[0]:.1f} at end; CPU: {first.get('cpu', cpu_description())}; precision {primary} ({why}).  ",
        f"LM: {first.get('lm', '-')}. Data: {first.get('train_items', '-')} training items ({data}, {args.epochs} epoch(s), batch 4), "
        f"{first.get('test_items', '-')} test items; every row is scored on the same 24 test final turns (a dialogue that has a "
        f"pre-context once with it given and once withheld; one that has none, once), {SELFPLAY} English self-played consultations, the perplexity of every test item and of "
        f"{HELDOUT} real chitchat conversations. Mean ± population std over seeds.\n",
        *table(results),
        "",
        "Goals:",
        *goals(results, primary),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
