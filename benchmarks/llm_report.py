"""The markdown report of ``benchmarks/llm_adapters.py``: tables from the finished runs, then each
claim with its paired difference (mean over seeds of method minus reference, ± its standard error).

A claim "holds" when the difference favours the method by more than two standard errors; otherwise
it does not hold, and the line says whether the difference was within noise or the other way round.
"""

from __future__ import annotations

import datetime
import math
import os
import statistics
from typing import Any

PAPER_INIT = {"cg": (3.58, 510.0), "lora_ga": (7.01, 1.28 * 1024)}  # seconds, MiB (RoBERTa-base, CG-LoRA paper)


def _ms(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    if not values:
        return "—"
    v = [x * scale for x in values]
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{statistics.mean(v):.{digits}f} ± {sd:.{digits}f}"


def _mean(values: list[float]) -> float:
    return statistics.mean(values) if values else math.nan


def _lr(x: float) -> str:
    return f"{x:.0e}".replace("e-0", "e-")


def loss_at(row: dict, k: int) -> float:
    """Mean training loss over the 5 steps ending at step ``k`` (1-based)."""
    window = row["losses"][max(0, k - 5) : k]
    return statistics.mean(window) if window else math.nan


def checkpoints(steps: int) -> list[int]:
    return sorted({max(1, steps // 4), max(1, steps // 2), steps})


class Rows:
    """The runs at each (task, method)'s chosen learning rate, by seed."""

    def __init__(self, rows: list[dict], chosen: dict[tuple[str, str], float]) -> None:
        self.all, self.chosen = rows, chosen
        self.main: dict[tuple[str, str], dict[int, dict]] = {}
        for r in rows:
            if chosen.get((r["task"], r["method"])) == r["lr"]:
                self.main.setdefault((r["task"], r["method"]), {})[r["seed"]] = r

    def values(self, task: str, key: str, metric) -> list[float]:
        runs = self.main.get((task, key), {})
        f = metric if callable(metric) else (lambda r: r.get(metric, math.nan))
        return [f(r) for _, r in sorted(runs.items()) if not r.get("diverged")]

    def paired(self, task: str, a: str, b: str, metric, scale: float = 1.0) -> tuple[float, float, int]:
        """Mean and standard error over seeds of ``metric(a) - metric(b)`` (seeds both ran)."""
        ra, rb = self.main.get((task, a), {}), self.main.get((task, b), {})
        f = metric if callable(metric) else (lambda r: r[metric])
        d = [scale * (f(ra[s]) - f(rb[s])) for s in sorted(set(ra) & set(rb))
             if not ra[s].get("diverged") and not rb[s].get("diverged")]
        if not d:
            return math.nan, math.nan, 0
        se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else math.nan
        return statistics.mean(d), se, len(d)


    def paired_items(self, task: str, a: str, b: str, field: str, scale: float = 1.0) -> tuple[float, float, int]:
        """Mean and standard error of ``a``'s minus ``b``'s per-item score, items of every seed both ran pooled."""
        ra, rb = self.main.get((task, a), {}), self.main.get((task, b), {})
        d = [scale * (x - y) for s in sorted(set(ra) & set(rb)) if field in ra[s] and field in rb[s]
             for x, y in zip(ra[s][field], rb[s][field])]
        if len(d) < 2:
            return math.nan, math.nan, len(d)
        return statistics.mean(d), statistics.stdev(d) / math.sqrt(len(d)), len(d)


def verdict(mean: float, se: float, better: int) -> str:
    """``better`` = +1 when a larger difference favours the method, -1 when a smaller one does."""
    if math.isnan(mean):
        return "not measured"
    if not math.isnan(se) and better * mean > 2 * se:
        return "holds"
    if not math.isnan(se) and better * mean < -2 * se:
        return "does not hold (the other way round)"
    return "does not hold (within two standard errors)"


def _d(p: tuple[float, float, int], digits: int = 1) -> str:
    m, se, _ = p
    return "—" if math.isnan(m) else f"{m:+.{digits}f} ± {se:.{digits}f}"


def render(rows: list[dict], chosen: dict, ctx: Any, args: Any, config: str, wall: float, load: tuple[float, float]) -> str:
    import peft
    import torch
    import transformers

    from benchmarks.llm_adapters import CAL_BATCHES, CHAT_BATCH, CHAT_LEN, METHODS, MICA

    R = Rows(rows, chosen)
    info, base = ctx.info, ctx.info["base"]
    SPLIT, FACT_BATCH = info["split"], info["fact_batch"]
    fixed = getattr(args, "fixed_lr", False)
    cks = checkpoints(args.steps)
    cpu = sum(r.get("init_s", 0) + sum(r.get("losses", []) and [r["step_s"] * len(r["losses"])]) + r.get("eval_s", 0) for r in rows)
    out = [
        "# Adapter methods' own claims on a real pretrained LM (SmolLM2-135M-Instruct)\n",
        f"Command: `python benchmarks/llm_adapters.py --workers {args.workers}"
        + ("" if args.steps == 100 else f" --steps {args.steps}")
        + ("" if SPLIT == 22 else f" --blocks {30 - SPLIT}")
        + ("" if FACT_BATCH == 16 else f" --fact-batch {FACT_BATCH}")
        + ("" if info.get("per_kind", 24) == 24 else f" --facts-per-kind {info['per_kind']}")
        + ("" if not info.get("real_items") else f" --real-items {info['real_items']}")
        + ("" if info.get("text_convs", 300) == 300 else f" --text-convs {info['text_convs']}")
        + (" --fixed-lr" if fixed else "")
        + ("" if sorted(args.seeds) == [0, 1, 2] else " --seeds " + " ".join(map(str, args.seeds)))
        + ("" if list(args.methods) == list(METHODS) else " --methods " + " ".join(args.methods))
        + ("" if list(args.tasks) == ["facts", "chat"] else " --tasks " + " ".join(args.tasks)) + "`  ",
        f"Date: {datetime.datetime.now():%Y-%m-%d %H:%M}; wall {wall / 60:.0f} min; {len(rows)} runs, about "
        f"{(cpu + info.get('prepare_s', 0)) / 60:.0f} CPU minutes of one thread (the issue's budget: ~45 min on 2 cores)  ",
        f"Machine: {os.cpu_count()} CPUs, load average {load[0]:.1f} at start and {load[1]:.1f} at end; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}; {info['precision']} ({info['precision_reason']}); "
        f"times are process CPU seconds of one thread, memory the rise of a worker's peak RSS  ",
        f"Model: {info['source']}. Trained: blocks {SPLIT}-29 of 30 (q, k, v, o, gate, up, down in each); blocks 0-{SPLIT - 1}, "
        "the embedding and the final norm frozen for every method (their output computed once per sequence)  ",
        f"Training: {args.steps} steps, AdamW, 5 warm-up steps then cosine to 0, clip 1.0; facts {FACT_BATCH} questions "
        f"a step, chat {CHAT_BATCH} conversations of at most {CHAT_LEN} tokens; CG-LoRA and LoRA-GA calibrate on the first "
        f"{CAL_BATCHES} batches. Seeds {', '.join(map(str, sorted(args.seeds)))}: mean ± std over seeds  ",
    ]
    if "facts" in args.tasks:
        out.append(
            f"Facts: {info['n_facts']} invented facts per seed, {info['fact_train']} training questions (4 phrasings each); "
            f"test: 2 unseen phrasings per fact (exact match of the greedy reply; multiple choice against 3 distractors of the "
            f"same type, chance 25 %). Retention: the {info['real_kept']} of {info['real_total']} real-fact items the base model "
            f"answers correctly ({', '.join(f'{k} {v}' for k, v in info['real_by_relation'].items())}; items {info['real_hash']}); "
            f"perplexity of real replies in {info.get('text_convs', 300)} chatterbot-corpus conversations  "
        )
    if "chat" in args.tasks:
        out.append(f"Chat: chitchat-dataset conversations, {info['chat_sizes'][0]} for training ({info['chat_tokens']} labelled "
                   f"tokens, each seen once), {info['chat_sizes'][1]} validation, {info['chat_sizes'][2]} test; "
                   f"{info['chat_skipped']} skipped whose last exchange alone exceeds {CHAT_LEN} tokens  ")
    out.append(f"Settings hash {config}.\n")

    def lr_cell(task: str, key: str) -> str:
        lr = chosen.get((task, key))
        if lr is None:
            return "—"
        if fixed:
            return _lr(lr) + (" (2x LoRA's)" if key in MICA else " (fixed)")
        grid = METHODS[key].grid
        edge = key not in MICA and lr in (grid[0], grid[-1])
        return _lr(lr) + (" (authors' rule)" if key in MICA else "") + (" †" if edge else "")

    def common(task: str, key: str) -> list[str]:
        if not R.values(task, key, "trainable"):
            return [METHODS[key].label + " (not run: the budget ran out)", "—", lr_cell(task, key), "—", "—", "—"]
        return [
            METHODS[key].label,
            f"{statistics.mean(R.values(task, key, 'trainable')):,.0f}" if R.values(task, key, "trainable") else "—",
            lr_cell(task, key),
            _ms(R.values(task, key, "init_s"), digits=2),
            _ms(R.values(task, key, "step_s"), digits=3),
            _ms(R.values(task, key, "train_mb"), digits=0),
        ]

    def losses(task: str, key: str) -> list[str]:
        return [_ms(R.values(task, key, lambda r, k=k: loss_at(r, k)), digits=3) for k in cks]

    head = "| method | trainable | lr | init s | step s | train peak MB |"
    loss_head = " | ".join(f"loss @{k}" for k in cks)
    if "facts" in args.tasks:
        b = base["facts"]
        out += [
            "## Fact injection\n",
            "Test: paraphrases never trained on. Retention: real-fact multiple choice (100 % before training by construction) "
            "and perplexity of real English replies (lower is better). Losses: training loss, mean of the 5 steps ending there.\n",
            head + " fact EM % | fact MC % | retention % | text ppl | " + loss_head + " |",
            "|" + "---|" * (10 + len(cks)),
            f"| base model (no training) | 0 | — | — | — | — | {100 * b['test_em']:.1f} | {100 * b['test_mc']:.1f} | 100.0 | "
            f"{b['text_ppl']:.2f} |" + " — |" * len(cks),
        ]
        for key in args.methods:
            if "facts" in METHODS[key].tasks:
                out.append("| " + " | ".join(common("facts", key) + [
                    _ms(R.values("facts", key, "test_em"), 100), _ms(R.values("facts", key, "test_mc"), 100),
                    _ms(R.values("facts", key, "retention"), 100), _ms(R.values("facts", key, "text_ppl"), digits=2),
                ] + losses("facts", key)) + " |")
        out.append("")
    if "chat" in args.tasks:
        b = base["chat"]
        out += [
            "## Supervised chat\n",
            "Test: perplexity of the assistant turns of held-out conversations. Retention as above.\n",
            head + " chat ppl | retention % | text ppl | " + loss_head + " |",
            "|" + "---|" * (9 + len(cks)),
            f"| base model (no training) | 0 | — | — | — | — | {b['test_ppl']:.2f} | 100.0 | {b['text_ppl']:.2f} |" + " — |" * len(cks),
        ]
        for key in args.methods:
            if "chat" in METHODS[key].tasks:
                out.append("| " + " | ".join(common("chat", key) + [
                    _ms(R.values("chat", key, "test_ppl"), digits=2), _ms(R.values("chat", key, "retention"), 100),
                    _ms(R.values("chat", key, "text_ppl"), digits=2),
                ] + losses("chat", key)) + " |")
        out.append("")
    out.append("† the chosen learning rate is at an end of its grid.\n" if not fixed else
               "Learning rates are fixed, not selected (see the notes): each method's usual rate, MiCA at twice LoRA's.\n")

    # learning-rate grids
    if not fixed:
        out += ["## Learning-rate grids (seed 0, validation split)\n",
                "Facts: validation multiple-choice accuracy % (gold answers' mean log-likelihood); chat: validation perplexity. "
                "**Bold**: the rate used. MiCA uses its authors' rule (twice LoRA's choice), which is on its grid.\n",
                "| task | method | grid |", "|---|---|---|"]
        for task in args.tasks:
            for key in args.methods:
                if task not in METHODS[key].tasks:
                    continue
                cells = []
                for lr in METHODS[key].grid:
                    r = next((r for r in rows if r["task"] == task and r["method"] == key and r["seed"] == 0 and r["lr"] == lr), None)
                    if r is None:
                        s = "not run"
                    elif r.get("diverged"):
                        s = "diverged"
                    elif task == "facts":
                        s = f"{100 * r['val_mc']:.1f} ({r['val_gold']:.2f})"
                    else:
                        s = f"{r['val_ppl']:.2f}"
                    cell = f"{_lr(lr)}: {s}"
                    cells.append(f"**{cell}**" if chosen.get((task, key)) == lr else cell)
                out.append(f"| {task} | {METHODS[key].label} | " + "; ".join(cells) + " |")
        out.append("")

    # initialisation cost
    init_keys = [k for k in ("lora", "mica8", "cg_lora", "cg_lora_shift", "lora_ga") if k in args.methods]
    if init_keys:
        out += ["## Initialisation cost (all runs of a method; independent of the learning rate)\n",
                f"CG-LoRA and LoRA-GA: {CAL_BATCHES} calibration batches through blocks {SPLIT}-29 plus the factorisations; MiCA: one "
                "SVD per adapted layer. Paper (RoBERTa-base): CG-LoRA 3.58 s / 510 MiB, LoRA-GA 7.01 s / 1.28 GiB (ratio 0.51 / 0.39).\n",
                "| method | task | init CPU s | init peak rise MB |", "|---|---|---|---|"]
        for task in args.tasks:
            for key in init_keys:
                if task in METHODS[key].tasks:
                    rs = [r for r in rows if r["task"] == task and r["method"] == key]
                    out.append(f"| {METHODS[key].label} | {task} | {_ms([r['init_s'] for r in rs], digits=2)} | "
                               f"{_ms([r['init_mb'] for r in rs], digits=0)} |")
        out.append("")

    n_seeds = len(args.seeds)
    out += ["## Claims\n", "Method minus reference, mean ± standard error, paired two ways: over seeds (each seed's score; with "
            f"{n_seeds} seeds the SE has {n_seeds - 1} degree{'s' if n_seeds != 2 else ''} of freedom) and, for per-item scores "
            "(exact match, multiple choice, retention), over "
            "every test item of every seed (item-level; it does not see seed-to-seed training noise). A claim holds when the "
            "difference favours the method by more than two standard errors in every pairing shown; otherwise the verdict says "
            "whether it was within noise or the other way round.\n"]
    out += claims(R, rows, args, cks)
    out += ["", "## Reduced against the issue's design and the papers\n"] + [f"- {x}" for x in reductions(R, args, info, fixed)]
    return "\n".join(out) + "\n"


def reductions(R: Rows, args: Any, info: dict, fixed: bool) -> list[str]:
    """What this run did smaller than the full design (3 seeds, grids, both tasks, top 8 blocks, 100 x 16), each line a fact of the run."""
    from benchmarks.llm_adapters import METHODS, TASKS

    out = []
    if len(args.seeds) < 3:
        out.append(f"{len(args.seeds)} seeds ({', '.join(map(str, sorted(args.seeds)))}) instead of 3: standard errors rest on "
                   f"{len(args.seeds)} paired differences (one degree of freedom with 2), so only large effects can pass the two-SE test.")
    if fixed:
        out.append("No learning-rate grid: each method ran at one rate fixed in advance (LoRA, DoRA, CG-LoRA 1e-3; rsLoRA 3e-4, "
                   "its alpha/sqrt(r) scale being 2.8x LoRA's alpha/r; LoRA-GA 1e-4; FourierMoE 3e-3; full fine-tuning 3e-5; "
                   "MiCA 2e-3, twice LoRA's). A method whose best rate lies elsewhere is at a disadvantage here.")
    missing = [t for t in TASKS if t not in args.tasks]
    if missing:
        out.append(f"Task(s) not run: {', '.join(missing)} (the supervised chat task): the budget did not cover it; the CG-LoRA and "
                   "FourierMoE claims are judged on fact injection only.")
    split, steps, batch = info["split"], args.steps, info["fact_batch"]
    if split != 22:
        out.append(f"Adapted the top {30 - split} of 30 blocks ({split}-29, all seven Linear layers each) instead of the top 8; "
                   "full fine-tuning trains the same blocks; the whole LM stays in the forward pass.")
    if steps != 100 or batch != 16:
        out.append(f"{steps} steps of {batch} questions ({steps * batch} question presentations) instead of 100 of 16; the convergence "
                   f"checkpoints are steps {', '.join(map(str, checkpoints(steps)))} instead of the paper's 25 / 50 / 100.")
    if info.get("per_kind", 24) != 24:
        n = 4 * info["per_kind"]
        out.append(f"{n} invented facts per seed ({info['per_kind']} countries, {info['per_kind']} people) instead of 96.")
    if info.get("real_items"):
        out.append(f"Retention items: {info['real_items']} real-fact items drawn (seeded) from the {info.get('real_total_all', 498)} "
                   f"before checking the base model, of which it answers {info['real_kept']}.")
    if info.get("text_convs", 300) != 300:
        out.append(f"Retention perplexity on {info['text_convs']} chatterbot-corpus conversations instead of 300.")
    not_run = [METHODS[k].label for k in args.methods for t in args.tasks if t in METHODS[k].tasks and len(R.values(t, k, "trainable")) < len(args.seeds)]
    if not_run:
        out.append("Not (fully) run, the wall-clock budget having run out: " + ", ".join(not_run) + "; their claims read 'not measured'.")
    out.append("Paper scale: MiCA, CG-LoRA and FourierMoE report on 7B-class LMs or RoBERTa/LLaMA fine-tuning over thousands of "
               "steps; this is a 135M LM, a few hundred question presentations, one thread of a shared CPU.")
    return out


def claims(R: Rows, rows: list[dict], args: Any, cks: list[int]) -> list[str]:
    from benchmarks.llm_adapters import METHODS

    have = lambda task, *keys: task in args.tasks and all(k in args.methods and task in METHODS[k].tasks for k in keys)  # noqa: E731
    lines: list[str] = []

    def add(text: str, p: tuple[float, float, int], better: int, items: tuple[float, float, int] | None = None) -> None:
        """Seed-level paired difference; with ``items``, the item-level one too, and the claim holds only if both clear 2 SE."""
        v = verdict(p[0], p[1], better)
        if items is None:
            lines.append(f"- {text}: {_d(p)} (seeds): **{v}**.")
            return
        vi = verdict(items[0], items[1], better)
        short = lambda x: x.removeprefix("does not hold (").rstrip(")")  # noqa: E731
        if v == "not measured" or vi == "not measured" or v == vi:
            both = v
        elif "holds" in (v, vi):
            both = v if vi == "holds" else vi
        else:
            both = f"does not hold (seeds: {short(v)}; items: {short(vi)})"
        lines.append(f"- {text}: {_d(p)} over {p[2]} seeds, {_d(items)} over {items[2]} items: **{both}**.")

    def item(task: str, a: str, b: str, field: str) -> tuple[float, float, int]:
        return R.paired_items(task, a, b, field, 100)

    # 1. MiCA
    for mica in ("mica8", "mica4"):
        if not have("facts", mica, "lora"):
            continue
        lab = METHODS[mica].label
        em = R.paired("facts", mica, "lora", "test_em", 100)
        lora_em = _mean(R.values("facts", "lora", "test_em"))
        ratio = _mean(R.values("facts", mica, "test_em")) / lora_em if lora_em > 0 else math.nan
        share = _mean(R.values("facts", mica, "trainable")) / _mean(R.values("facts", "lora", "trainable"))
        add(f"MiCA claim, knowledge: {lab} − LoRA r=8, fact exact match on unseen paraphrases, points "
            f"({lab}/LoRA = {'n/a (LoRA 0)' if math.isnan(ratio) else f'{ratio:.2f}x'}, paper up to 5.9x; {100 * share:.0f} % of LoRA's parameters, paper 6-60 %)", em, +1,
            item("facts", mica, "lora", "test_em_items"))
        add(f"MiCA claim, knowledge: {lab} − LoRA r=8, fact multiple-choice accuracy, points", R.paired("facts", mica, "lora", "test_mc", 100), +1,
            item("facts", mica, "lora", "test_mc_items"))
        add(f"MiCA claim, less forgetting: {lab} − LoRA r=8, real-fact retention, points", R.paired("facts", mica, "lora", "retention", 100), +1,
            item("facts", mica, "lora", "retention_items"))
        add(f"MiCA claim, less forgetting: {lab} − LoRA r=8, held-out text perplexity", R.paired("facts", mica, "lora", "text_ppl"), -1)
        if have("facts", mica, "full"):
            add(f"MiCA claim, more than full fine-tuning: {lab} − full fine-tuning, fact exact match, points",
                R.paired("facts", mica, "full", "test_em", 100), +1, item("facts", mica, "full", "test_em_items"))

    # 2. CG-LoRA
    for cg in ("cg_lora", "cg_lora_shift"):
        for task in ("facts", "chat"):
            for ref in ("lora_ga", "lora"):
                if not have(task, cg, ref):
                    continue
                early = [R.paired(task, cg, ref, lambda r, k=k: loss_at(r, k)) for k in cks]
                txt = " / ".join(f"@{k} {_d(p, 3)}" for k, p in zip(cks, early))
                ok = [verdict(p[0], p[1], -1) == "holds" for p in early[:2]]
                v = "not measured" if any(math.isnan(p[0]) for p in early[:2]) else "holds" if all(ok) else ("does not hold (" + ", ".join(
                    f"@{k}: {verdict(p[0], p[1], -1).removeprefix('does not hold (').rstrip(')')}"
                    for k, p, good in zip(cks, early, ok) if not good) + ")")
                lines.append(f"- CG-LoRA claim, faster convergence ({task}): {METHODS[cg].label} − {METHODS[ref].label}, "
                             f"training loss {txt}: **{v}** (judged at the first two checkpoints).")
                if have(task, "full"):
                    def gap(r: dict, key: str = "") -> float:
                        full = R.main.get((task, "full"), {}).get(r["seed"])
                        if full is None or full.get("diverged"):
                            return math.nan
                        return statistics.mean(abs(loss_at(r, k) - loss_at(full, k)) for k in cks)
                    add(f"CG-LoRA claim, tracks full fine-tuning ({task}): |loss − full fine-tuning's loss| averaged over "
                        f"steps {', '.join(map(str, cks))}, {METHODS[cg].label} − {METHODS[ref].label}",
                        R.paired(task, cg, ref, gap), -1)
                final = ("test_em", 100, +1, "fact exact match, points") if task == "facts" else ("test_ppl", 1, -1, "chat perplexity")
                add(f"CG-LoRA, final metric ({task}): {METHODS[cg].label} − {METHODS[ref].label}, {final[3]}",
                    R.paired(task, cg, ref, final[0], final[1]), final[2],
                    item(task, cg, ref, "test_em_items") if task == "facts" else None)
    for task in args.tasks:
        if have(task, "cg_lora", "lora_ga"):
            for what, idx, field in (("time", 0, "init_s"), ("memory", 1, "init_mb")):
                p = R.paired(task, "cg_lora", "lora_ga", field)
                ratio = _mean(R.values(task, "cg_lora", field)) / _mean(R.values(task, "lora_ga", field))
                paper = PAPER_INIT["cg"][idx] / PAPER_INIT["lora_ga"][idx]
                lines.append(f"- CG-LoRA claim, cheaper init ({task}, {what}): CG-LoRA − LoRA-GA {_d(p, 2)} "
                             f"{'CPU s' if idx == 0 else 'MB'} (ratio {ratio:.2f}, paper {paper:.2f}): **{verdict(p[0], p[1], -1)}**.")

    # 3. FourierMoE
    for ref in ("lora", "fmoe1"):
        for task in ("facts", "chat"):
            if not have(task, "fmoe", ref):
                continue
            if task == "facts":
                add(f"FourierMoE claim ({task}): FourierMoE − {METHODS[ref].label}, fact exact match, points", R.paired(task, "fmoe", ref, "test_em", 100), +1, item(task, "fmoe", ref, "test_em_items"))
                add(f"FourierMoE claim ({task}): FourierMoE − {METHODS[ref].label}, fact multiple-choice accuracy, points", R.paired(task, "fmoe", ref, "test_mc", 100), +1, item(task, "fmoe", ref, "test_mc_items"))
            else:
                add(f"FourierMoE claim ({task}): FourierMoE − {METHODS[ref].label}, chat perplexity", R.paired(task, "fmoe", ref, "test_ppl"), -1)

    # 4. DoRA, rsLoRA beside LoRA
    for key, claim in (("dora", "DoRA (its paper: better than LoRA)"), ("rslora", "rsLoRA (its paper: better than LoRA, more so at high rank)")):
        for task in ("facts", "chat"):
            if not have(task, key, "lora"):
                continue
            if task == "facts":
                add(f"{claim} ({task}): {METHODS[key].label} − LoRA r=8, fact exact match, points", R.paired(task, key, "lora", "test_em", 100), +1, item(task, key, "lora", "test_em_items"))
            else:
                add(f"{claim} ({task}): {METHODS[key].label} − LoRA r=8, chat perplexity", R.paired(task, key, "lora", "test_ppl"), -1)
    return lines
