"""FairLLaVA (arXiv 2603.26008) on a LLaVA-style radiology assistant: a frozen open_clip ViT, an MLP
projector and a causal LM with LoRA, plus a CLUB mutual-information penalty between mid-layer
image-token states and the patients' demographics.

    python -m suite fit --config domains/radiology_vqa.yaml       # CLIP prerequisite, then both stages
    python -m suite test --config domains/radiology_vqa.yaml --ckpt_path last
    python -m suite predict --config domains/radiology_vqa.yaml --ckpt_path last   # answers + fairness report

**Network** (LLaVA-1.5 as LLaVA-Rad and the reference build it): images in [0, 1] -> open_clip ViT
(frozen; it applies CLIP's mean / std) -> patch tokens of block ``feature_layer`` (-2, LLaVA's
``mm_vision_select_layer``) -> each ``token_merge`` x ``token_merge`` patch block concatenated ->
LLaVA's ``mlp2x_gelu`` projector -> the N image positions that replace ``<image>`` in the user turn
-> causal LM (SmolLM2-135M-Instruct, a Hugging Face folder or the tiny random Llama).

**Stages** (``stage``; both inside domains/radiology_vqa.yaml):

* ``projector``: only the projector trains (LLaVA's feature alignment), next-token cross-entropy
  on the answers; no adapter, no method-specific term.
* ``lora``: LoRA on every Linear of the LM but ``lm_head`` (the reference: r=64, alpha=128,
  dropout 0.05), the projector keeps training (LLaVA-1.5's LoRA recipe), and the method:
  ``fairness="mi_club"`` is FairLLaVA (``fairness.fairllava_loss`` over z = the L2-normalised
  ``hidden_depth`` state at one image token per sample; the CLUB heads q(a|z), one per attribute,
  train outside the LoRA target); ``fairness="none"`` with ``objective="erm"`` is plain LoRA, with
  the data's ``resample: group`` group-balanced resampling, and ``objective="group_dro"`` is group
  DRO over the data's combined groups (per-sample loss: mean CE over that sample's answer tokens).
  The fairness term is off in validation, which logs the CLUB estimate without gradient.

**Differences from the reference code** (bhosalems/FairLLaVA; the CLUB / loss ones are listed in
``fairness.py``):

1. Backbones sized for a CPU: an open_clip ViT pretrained here on the generated (radiograph,
   report) pairs (the ``clip`` prerequisite) instead of BiomedCLIP-CXR-518; SmolLM2-135M (first
   ``lm_layers`` layers) instead of Vicuna-7B / LLaVA-Rad; 64-px images.
2. ``token_merge``: 2 x 2 neighbouring patch tokens are concatenated before the projector
   (Qwen2-VL's patch merger), 4x fewer LM positions; the reference feeds every patch token.
3. Stage 1 aligns the projector on the task's own answers; the reference starts from LLaVA-Rad's
   projector (aligned on report generation).
4. The chat template is ChatML without a system prompt (suite.chat), not Vicuna v1's.
5. The image-token draw uses a generator seeded by (seed, global step, micro-batch, rank), so a
   resumed run repeats it; the reference draws ``torch.multinomial`` from the global RNG.
6. The output layer runs at answer positions only (the same CE; the reference builds logits at
   every position of a 2,048-token context).
7. Under bf16 autocast the CLUB heads and the losses stay fp32; the reference casts the whole
   model (CLUB heads included) to bf16.
8. Evaluation decodes greedily (suite.generation); P(yes) for calibration is the first answer
   token's probability renormalised over the "yes" and "no" tokens.

**Reference bugs fixed here**:

* ``prepare_inputs_labels_for_multimodal`` returns an unbound ``image_mask`` for a text-only
  batch (it is assigned only in the KV-cache branch, so a batch without images raises
  UnboundLocalError); here a conversation without ``<image>`` gets no image positions, an
  all-false image mask, and no fairness term.
* the projector weights (``mm_projector.bin``) are read with ``torch.load`` without
  ``weights_only``, which unpickles arbitrary objects; here every checkpoint is read with
  ``weights_only=True`` or safetensors (suite.module, suite.backbones.clip).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from suite.adapters import parameter_report
from suite.backbones.causal_lm import build_causal_lm, resolve_causal_lm
from suite.backbones.clip import build_clip
from suite.chat import CHATML_TEMPLATE, IGNORE_INDEX, ChatCollator, encode_chat, encode_prompt, split_reply
from suite.generation import generate
from suite.module import AdaptedModule
from suite.strategies import every_rank

from .fairness import CLUBCategorical, GroupDRO, fairllava_loss, mid_layer, sample_image_token
from .metrics import closed_correct, fairness_summary
from .questions import CLOSED, NAMES, NO_FINDING, OPEN, report_text
from .readers import IMAGE_TOKEN
from .synth import ATTRIBUTES

#: FairLLaVA's MIMIC-CXR attribute weights (the reference's fairness_finetune_mimic_cxr_mi.json)
REFERENCE_WEIGHTS = {"age": 0.6, "sex": 0.1, "race": 0.2}


def bpe_corpus() -> list[str]:
    """What the fallback tokenizer is trained on: every question template, answer and report phrase."""
    import numpy as np

    texts = [q for qs in (*CLOSED.values(), *OPEN.values()) for q in qs] + list(NAMES.values()) + [NO_FINDING]
    texts += ["yes", "no", "PA", "AP", "right", "left", "both sides", "upper", "middle", "lower", "zone"]
    rng = np.random.default_rng(0)
    for k in range(64):  # reports over varied findings: the sentences the readers' reports hold
        findings = {f: float(rng.random() < 0.4) for f in NAMES}
        texts.append(report_text(rng, findings, "PA" if k % 2 else "AP", {"effusion": "right", "opacity": "left lower"}))
    return texts


class Projector(nn.Module):
    """Merge each k x k block of the (g x g) patch grid into one token, then LLaVA's mlp2x_gelu."""

    def __init__(self, vision_width: int, lm_width: int, grid: tuple[int, int], merge: int = 1) -> None:
        super().__init__()
        if grid[0] % merge or grid[1] % merge:
            raise ValueError(f"token_merge={merge} does not divide the vision tower's {grid[0]}x{grid[1]} patch grid")
        self.grid, self.merge = grid, merge
        self.mlp = nn.Sequential(nn.Linear(vision_width * merge * merge, lm_width), nn.GELU(), nn.Linear(lm_width, lm_width))

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1] // self.merge**2

    def forward(self, tokens: Tensor) -> Tensor:  # (B, g*g, w) -> (B, N, lm_width)
        b, _, w = tokens.shape
        (gh, gw), k = self.grid, self.merge
        x = tokens.reshape(b, gh // k, k, gw // k, k, w).permute(0, 1, 3, 2, 4, 5).reshape(b, -1, k * k * w)
        return self.mlp(x)


class ImageChatEncoder:
    """Conversations -> token batches with ``<image>`` expanded into ``num_tokens`` image positions.

    Returns ``input_ids`` / ``attention_mask`` / ``labels`` (right-padded, labels on the assistant
    turns only) / ``image_mask`` and the generation prompts ``prompt_ids`` / ``prompt_attention_mask``
    / ``prompt_image_mask`` (left-padded, up to ``<|im_start|>assistant\\n``). A plain object (no
    model inside), so data-loader workers can pickle it.
    """

    def __init__(self, tokenizer: Any, image_token_id: int, num_tokens: int) -> None:
        self.tokenizer, self.image_token_id, self.num_tokens = tokenizer, image_token_id, num_tokens
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def _expand(self, ids: list[int], labels: list[int], where: str) -> dict[str, list[int]]:
        at = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(at) > 1:
            raise ValueError(f"{where}: {len(at)} {IMAGE_TOKEN} markers; one image per conversation is supported")
        if at:
            i = at[0]
            ids = ids[:i] + [self.image_token_id] * self.num_tokens + ids[i + 1 :]
            labels = labels[:i] + [IGNORE_INDEX] * self.num_tokens + labels[i + 1 :]
        return {"input_ids": ids, "labels": labels}

    def __call__(self, conversations: Sequence[Sequence[dict[str, str]]]) -> dict[str, Tensor]:
        full, prompts = [], []
        for n, messages in enumerate(conversations):
            enc = encode_chat(self.tokenizer, messages)
            full.append(self._expand(enc.input_ids, enc.labels, f"conversation {n}"))
            prompt = encode_prompt(self.tokenizer, split_reply(messages)[0])
            prompts.append(self._expand(prompt.input_ids, prompt.labels, f"conversation {n}"))
        out = ChatCollator(self.pad_id)(full)
        left = ChatCollator(self.pad_id, padding_side="left")(prompts)
        out["image_mask"] = out["input_ids"] == self.image_token_id
        out.update(prompt_ids=left["input_ids"], prompt_attention_mask=left["attention_mask"],
                   prompt_image_mask=left["input_ids"] == self.image_token_id)
        return out


def _first_scores() -> Any:
    """A logits processor that keeps the scores of the first generated position (P(yes) for ECE)."""
    from transformers import LogitsProcessor

    class FirstScores(LogitsProcessor):
        first: Tensor | None = None

        def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
            if self.first is None:
                self.first = scores.detach().float()
            return scores

    return FirstScores()


class RadiologyVLM(AdaptedModule):
    """LLaVA-style VQA model with FairLLaVA's CLUB penalty (see the module docstring).

    Args:
        stage: ``projector`` (alignment: projector only) or ``lora`` (adapter + method).
        vision, vision_config, vision_checkpoint: open_clip config name, overrides, and weights
            (an open_clip state dict / safetensors / a ClipPretrain checkpoint; the YAML's ``clip``
            placeholder is the cached CLIP pretraining on the generated pairs).
        feature_layer, token_merge: which ViT block feeds the projector; k x k patch merging.
        lm, lm_layers, tokenizer: causal LM (``auto`` / ``smollm2`` / ``tiny`` / a folder), its first
            layers kept, and the tokenizer (default: the LM's own; the fallback BPE for ``tiny``).
        fairness: ``mi_club`` (FairLLaVA) or ``none``; attribute_weights (lambda_a), lambda_fair,
            w_ce, w_club, hidden_depth, gather_negatives: see ``fairness.fairllava_loss``.
        objective: ``erm`` or ``group_dro`` (dro_step_size: its eta).
        attribute_classes, num_groups: linked from the data (groups per attribute; combined groups).
        attention: the LM's attention implementation (``eager``: on ~40-token sequences it is faster
            on a CPU than torch's flash kernel, whose bf16 backward is slow there).
        warmup_ratio: cosine schedule with linear warmup over this share of the optimiser steps
            (used when no ``scheduler`` is given; ``None``: constant rate).
        max_new_tokens: answer length limit when decoding (test / predict).
    """

    def __init__(self, stage: str = "lora", vision: str = "tiny", vision_config: dict[str, Any] | None = None,
                 vision_checkpoint: str | None = None, feature_layer: int = -2, token_merge: int = 2, lm: str = "auto",
                 lm_layers: int | None = None, tokenizer: str | None = None, fairness: str = "mi_club",
                 attribute_weights: dict[str, float] | None = None, lambda_fair: float = 1.0, w_ce: float = 1.0,
                 w_club: float = 1.0, hidden_depth: float = 0.5, gather_negatives: bool = True, objective: str = "erm",
                 dro_step_size: float = 0.01, attribute_classes: dict[str, int] | None = None, num_groups: int = 1,
                 attention: str = "eager", warmup_ratio: float | None = 0.03, max_new_tokens: int = 24,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if stage not in ("projector", "lora"):
            raise ValueError(f"stage must be 'projector' or 'lora', got {stage!r}")
        if stage == "projector" and self.adapter is not None:
            raise ValueError("stage 'projector' trains the projector only: pass --model.init_args.adapter null "
                             "(the YAML's stages do); the adapter belongs to stage 'lora'")
        if fairness not in ("mi_club", "none") or objective not in ("erm", "group_dro"):
            raise ValueError(f"fairness must be 'mi_club' or 'none' and objective 'erm' or 'group_dro', got {fairness!r}, {objective!r}")
        self.stage, self.fairness, self.objective = stage, fairness, objective
        self.attribute_classes = dict(attribute_classes or {a: len(v) for a, v in ATTRIBUTES.items()})
        self.weights = dict(attribute_weights if attribute_weights is not None else REFERENCE_WEIGHTS)
        if set(self.weights) != set(self.attribute_classes):
            raise ValueError(f"attribute_weights names {sorted(self.weights)} but the data carries {sorted(self.attribute_classes)}")
        self.lambda_fair, self.w_ce, self.w_club, self.hidden_depth = lambda_fair, w_ce, w_club, hidden_depth
        self.gather_negatives, self.warmup_ratio, self.max_new_tokens = gather_negatives, warmup_ratio, max_new_tokens

        kind, _ = resolve_causal_lm(lm)
        if kind in ("smollm2", "tiny"):  # what `auto` meant here: test / predict / later stages rebuild this LM
            self.record_resolved("lm", lm, kind)
        with self.seeded():  # frozen random parts (tiny LM, random towers, frozen CLUB heads) rebuild identically
            self.tokenizer = _tokenizer(tokenizer, lm if kind != "tiny" else "bpe")
            vocab = len(self.tokenizer)  # before the image marker is added: its id is never embedded
            self.tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
            self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
            extra = {"vocab_size": vocab} if kind == "tiny" else {}
            self.lm = build_causal_lm(lm, num_layers=lm_layers, **extra).train()  # train mode: LoRA dropout acts
            self.lm.set_attn_implementation(attention)
            parts = build_clip(vision, vision_config, vision_checkpoint, feature_layer=feature_layer)
            self.vision = parts.vision
            width = self.lm.get_input_embeddings().embedding_dim
            self.projector = Projector(self.vision.width, width, tuple(self.vision.visual.grid_size), token_merge)
            self.club = nn.ModuleDict({a: CLUBCategorical(width, k) for a, k in self.attribute_classes.items()})
            self.dro = GroupDRO(num_groups, step_size=dro_step_size)
        self.sources = f"vision: {parts.source}; LM: {self.lm.suite_source}"
        self.chat = ImageChatEncoder(self.tokenizer, self.image_token_id, self.projector.num_tokens)
        self.yes_no = [self.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("yes", "no")]
        self.vision.requires_grad_(False).eval()
        self.adapt(self.lm)  # LoRA into the LM only (or freeze it): projector and CLUB heads are outside
        self.projector.requires_grad_(True)
        self.club.requires_grad_(stage == "lora" and fairness == "mi_club")
        method = "projector" if stage == "projector" else "+".join(
            [self.adapter.method if self.adapter else "frozen LM", "projector"] + (["CLUB heads"] if fairness == "mi_club" else []))
        self.report = parameter_report(self, method)
        self._eval_records: list[dict[str, Any]] = []
        self.load_init_from()

    # --- wiring ------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None:
            return
        size = getattr(dm, "image_size", None)
        if size is not None and (size, size) != tuple(self.vision.image_size):
            raise ValueError(f"data.init_args.image_size={size} but the vision tower takes {self.vision.image_size[0]}-px "
                             "images: set vision_config.vision_cfg.image_size to match")
        if hasattr(dm, "set_chat_encoder"):
            dm.set_chat_encoder(self.chat)

    def configure_callbacks(self) -> list[Any]:
        """``predict`` writes answers.jsonl and the fairness report (report.AnswerWriter)."""
        from .metrics import AnswerWriter

        return [AnswerWriter()]

    def configure_optimizers(self) -> Any:
        config = super().configure_optimizers()
        if self.scheduler_factory is not None or self.warmup_ratio is None:
            return config
        from transformers import get_cosine_schedule_with_warmup

        total = max(int(self.trainer.estimated_stepping_batches), 1)
        schedule = get_cosine_schedule_with_warmup(config, math.ceil(self.warmup_ratio * total), total)
        return {"optimizer": config, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # --- forward -----------------------------------------------------------------------------------
    def embed(self, images: Tensor, ids: Tensor, image_mask: Tensor) -> Tensor:
        """Token embeddings with the projected image tokens at the image positions."""
        emb = self.lm.get_input_embeddings()(ids.masked_fill(image_mask, self.chat.pad_id))
        rows = image_mask.any(1)
        if not rows.any():
            return emb
        with torch.no_grad():
            patches = self.vision(images[rows]).tokens
        feats = self.projector(patches)
        if int(image_mask.sum()) != feats.shape[0] * feats.shape[1]:
            raise ValueError(f"image positions ({int(image_mask.sum())}) do not match {feats.shape[0]} images x {feats.shape[1]} tokens")
        return emb.masked_scatter(image_mask[..., None], feats.to(emb.dtype))

    def decoder(self, embeds: Tensor, attention_mask: Tensor) -> Any:
        base = getattr(self.lm, self.lm.base_model_prefix)
        return base(inputs_embeds=embeds, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)

    def token_losses(self, hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(per-token CE at answer positions, their row index, logits at each row's first answer token)."""
        target = labels[:, 1:]
        keep = target != IGNORE_INDEX
        logits = self.lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
        losses = F.cross_entropy(logits, target[keep], reduction="none")
        rows = keep.nonzero()[:, 0]
        first = torch.ones_like(rows, dtype=torch.bool)
        first[1:] = rows[1:] != rows[:-1]
        return losses, rows, logits[first]

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        embeds = self.embed(batch["image"], batch["input_ids"], batch["image_mask"])
        out = self.decoder(embeds, batch["attention_mask"])
        losses, rows, first = self.token_losses(out.last_hidden_state, batch["labels"])
        ce = losses.mean()  # over every answer token of the batch, as the reference's CrossEntropyLoss
        self._last_first_logits = first.detach()
        result: dict[str, Tensor] = {"loss": ce}
        if self.stage == "lora" and self.objective == "group_dro":
            per_sample = torch.zeros(len(batch["labels"]), device=ce.device).index_add(0, rows, losses)
            per_sample = per_sample / torch.bincount(rows, minlength=len(per_sample)).clamp_min(1)
            robust, _ = self.dro(per_sample, batch["group"].to(ce.device))  # q moves in training only
            result = {"loss": robust if self.training else ce, "dro_loss": robust.detach()}
        if self.stage == "lora" and self.fairness == "mi_club":
            has = batch["image_mask"].any(1)  # text-only rows carry no image state
            hidden = mid_layer(out.hidden_states, self.hidden_depth)[has]
            z = sample_image_token(hidden, batch["image_mask"][has], self._draw_generator())
            labels = {a: batch["group_ids"][a].to(z.device)[has] for a in self.club}
            if self.training:
                result.update(fairllava_loss(result["loss"], z, labels, self.club, self.weights, self.w_ce,
                                             self.lambda_fair, self.w_club, gather=self.gather_negatives))
            else:  # the estimate only: the fairness term is off in validation and test
                result |= {f"mi/{a}": est.mi(z.detach(), labels[a]) for a, est in self.club.items()}
        result["ce"] = ce.detach()
        return result

    def _draw_generator(self) -> torch.Generator:
        """The image-token draw's generator: seeded by (seed, global step, micro-batch, rank) in
        training, (seed, batch) in evaluation, so a resumed run draws the same tokens."""
        rank = self.trainer.global_rank if self._trainer is not None else 0
        step, micro = (self.global_step, max(self._batch_idx, 0)) if self.training else (-1, self._eval_batch)
        seed = ((self.backbone_seed * 1_000_003 + step + 1) * 100_003 + micro) * 1_009 + rank
        return torch.Generator().manual_seed(seed % (2**63))

    # --- evaluation --------------------------------------------------------------------------------
    _eval_batch = 0

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_batch = batch_idx
        super().validation_step(batch, batch_idx)
        p_yes = self._p_yes(self._last_first_logits)
        self._eval_records += self._records(batch, ["yes" if p >= 0.5 else "no" for p in p_yes.tolist()], p_yes)

    def on_validation_epoch_end(self) -> None:
        self._log_summary("val", teacher_forced=True)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_batch = batch_idx
        super().test_step(batch, batch_idx)
        self._eval_records += self.answer(batch)

    def on_test_epoch_end(self) -> None:
        self._log_summary("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        return self.answer(batch)

    def _p_yes(self, first_logits: Tensor) -> Tensor:
        return first_logits[:, self.yes_no].float().softmax(-1)[:, 0].cpu()

    @torch.no_grad()
    def answer(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """Greedy answers to the batch's questions, as audit records (see :meth:`_records`)."""
        embeds = self.embed(batch["image"], batch["prompt_ids"], batch["prompt_image_mask"])
        first = _first_scores()
        out = generate(self.lm, self.tokenizer, inputs_embeds=embeds, attention_mask=batch["prompt_attention_mask"],
                       max_new_tokens=self.max_new_tokens, logits_processor=[first])
        return self._records(batch, [t.strip() for t in out.texts], self._p_yes(first.first))

    @torch.no_grad()
    def image_states(self, batch: dict[str, Any]) -> Tensor:
        """The L2-normalised ``hidden_depth`` states at every image position: (B, N, D), rows with an
        image only. Causal attention makes them a function of the image alone (it precedes the
        question), so one question per image is enough (the MI probe of the benchmark)."""
        embeds = self.embed(batch["image"], batch["input_ids"], batch["image_mask"])
        hidden = mid_layer(self.decoder(embeds, batch["attention_mask"]).hidden_states, self.hidden_depth)
        mask = batch["image_mask"][batch["image_mask"].any(1)]
        states = hidden[batch["image_mask"].any(1)][mask]
        return F.normalize(states.float(), dim=-1).reshape(len(mask), -1, hidden.shape[-1])

    def _records(self, batch: dict[str, Any], predictions: list[str], p_yes: Tensor) -> list[dict[str, Any]]:
        """One JSON-able record per item: ids, question, reference and predicted answer, groups, P(yes)."""
        out = []
        for i, pred in enumerate(predictions):
            closed = batch["question_type"][i] == "closed"
            r = {"id": batch["id"][i], "patient_id": batch["patient_id"][i], "image_path": batch["image_path"][i],
                 "question": batch["question"][i], "answer": batch["answer"][i], "prediction": pred,
                 "question_type": batch["question_type"][i], "topic": batch["topic"][i],
                 "groups": {a: batch["groups"][a][i] for a in batch["groups"]}}
            if closed and batch["answer"][i].strip().lower() in ("yes", "no"):
                r["p_yes"] = float(p_yes[i])
            if closed:
                r["correct"] = bool(closed_correct(pred, batch["answer"][i]))
            out.append(r)
        return out

    def _log_summary(self, split: str, teacher_forced: bool = False) -> None:
        records, self._eval_records = _gather(self._eval_records), []
        if teacher_forced:  # yes / no from the first answer token: only yes / no questions score
            records = [r for r in records if "p_yes" in r]
        if not records or self.trainer.sanity_checking:
            return
        summary = fairness_summary(records, list(self.attribute_classes), n_boot=0 if teacher_forced else 200)
        values = {"closed_acc": summary["closed_acc"]} if teacher_forced else {
            "closed_acc": summary["closed_acc"], "open_f1": summary["open_f1"]}
        for a in self.attribute_classes:
            if a in summary:
                values |= {f"{a}/gap": summary[a]["gap"], f"{a}/worst": summary[a]["worst"],
                           f"{a}/equity_scaled_acc": summary[a]["equity_scaled_acc"]}
                values |= {f"{a}/acc/{g}": v for g, v in summary[a]["closed_acc"].items()}
                if not teacher_forced:
                    values |= {f"{a}/{k}": summary[a][k] for k in ("dp_diff", "eo_diff") if k in summary[a]}
        for k, v in values.items():
            if v == v:  # NaN (e.g. no open questions) is not logged
                self.log(f"{split}/{k}", float(v))


def _tokenizer(source: str | None, default: str) -> Any:
    """The chat tokenizer, with the suite's ChatML template (no default system prompt)."""
    from suite.chat import chat_tokenizer

    tok = chat_tokenizer(source or default, corpus=bpe_corpus())
    tok.chat_template = CHATML_TEMPLATE
    return tok


def _gather(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's records (the same list on every rank); the records themselves without DDP."""
    return [r for part in every_rank(records) for r in part]

