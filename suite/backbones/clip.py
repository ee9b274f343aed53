"""open_clip models as backbones, and contrastive pretraining of them (no CLIP weights can be downloaded here).

    parts = build_clip("tiny")                                 # 32-px ViT + 2-layer text transformer, random
    parts = build_clip("ViT-B-32", checkpoint="/weights/open_clip_vit_b32.safetensors")
    out = parts.vision(images)            # images (B, 3, H, W) in [0, 1] -> out.tokens (B, N, width), out.pooled (B, embed_dim)
    text = parts.text(["a chest radiograph", ...])           # (B, embed_dim)

The model is open_clip's own (``open_clip.create_model(..., pretrained=None)``) built as
``CustomTextCLIP``, so the image tower (``model.visual``) and the text tower (``model.text``) are
separate modules that adapters target by name: both use ``nn.MultiheadAttention`` and ``Linear``
layers (``attn``, ``mlp.c_fc``, ``mlp.c_proj``), which the shared LoRA layer adapts. A named config
(``ViT-B-32``, ...) or ``"tiny"`` is deep-merged with ``config`` overrides. User checkpoints are
open_clip state dicts (``.pt`` / ``.pth`` / ``.bin``, read with ``torch.load(weights_only=True)``),
``.safetensors`` files or a ``ClipPretrain`` Lightning checkpoint; the flat text layout of
open_clip's ``CLIP`` class is converted with open_clip's own ``convert_to_custom_text_state_dict``,
and any key mismatch is an error listing the missing, unexpected and mis-shaped keys.

:class:`ClipPretrain` trains the model contrastively with open_clip's ``ClipLoss`` on batches
``{"image": (B, 3, H, W) in [0, 1], "text": list[str]}`` and logs zero-shot retrieval accuracy on
the validation pairs; a domain declares it as a prerequisite and starts from its checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from suite.adapters import parameter_report
from suite.module import AdaptedModule

TINY = "tiny"
#: a CLIP small enough for CI that still has every part of ViT-B-32 (class token, patch conv,
#: pre/post LayerNorms, projections); the text tower keeps open_clip's 49,408-token BPE vocabulary
TINY_CLIP: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2, "mlp_ratio": 2.0},
}
_CHECKPOINT_PREFIXES = ("module.", "backbone.")  # DDP wrapping; a suite Lightning checkpoint (ClipPretrain)


def normalize_images(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...], size: tuple[int, int]) -> Tensor:
    """Images (B, 3, H, W) in [0, 1] -> the normalised input of a tower of resolution ``size``."""
    if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != tuple(size):
        raise ValueError(f"expected images (B, 3, {size[0]}, {size[1]}) in [0, 1], got {tuple(images.shape)}")
    return (images - images.new_tensor(mean).view(1, 3, 1, 1)) / images.new_tensor(std).view(1, 3, 1, 1)


class ClipVisionOutput(NamedTuple):
    tokens: Tensor  # (B, N, width): patch tokens of ``feature_layer`` (class token removed)
    pooled: Tensor  # (B, embed_dim): the projected CLIP image embedding (not L2-normalised)


class ClipVisionTower(nn.Module):
    """open_clip's ``VisionTransformer`` with input normalisation and token outputs.

    Takes images in [0, 1] and normalises them with the model's mean / std. ``feature_layer`` picks
    the block whose tokens are returned (-1: the last, after ``ln_post``; LLaVA-style models use
    -2, taken without the final norm).
    """

    def __init__(self, visual: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], feature_layer: int = -1) -> None:
        super().__init__()
        if not hasattr(visual, "forward_intermediates") or not hasattr(visual, "transformer"):
            raise TypeError(f"ClipVisionTower needs open_clip's VisionTransformer, got {type(visual).__name__} (timm/ResNet towers are not supported)")
        layers = len(visual.transformer.resblocks)
        if not -layers <= feature_layer < layers:
            raise ValueError(f"feature_layer={feature_layer} is outside the tower's {layers} blocks")
        self.visual = visual
        self.mean, self.std = tuple(mean), tuple(std)
        self.feature_layer = feature_layer % layers
        self.image_size = tuple(visual.image_size)

    @property
    def width(self) -> int:
        return self.visual.transformer.width

    @property
    def num_tokens(self) -> int:
        return math.prod(self.visual.grid_size)

    def normalize(self, images: Tensor) -> Tensor:
        return normalize_images(images, self.mean, self.std, self.image_size)

    def forward(self, images: Tensor) -> ClipVisionOutput:
        last = self.feature_layer == len(self.visual.transformer.resblocks) - 1
        out = self.visual.forward_intermediates(
            self.normalize(images), indices=[self.feature_layer], output_fmt="NLC", normalize_intermediates=last
        )
        return ClipVisionOutput(out["image_intermediates"][0], out["image_features"])


class ClipTextTower(nn.Module):
    """open_clip's ``TextTransformer``, taking strings (tokenised with the model's tokenizer) or token ids."""

    def __init__(self, text: nn.Module, tokenizer: Callable[..., Tensor] | None) -> None:
        super().__init__()
        self.text = text
        self.tokenizer = tokenizer

    def tokenize(self, texts: list[str]) -> Tensor:
        if self.tokenizer is None:
            raise ValueError("this text tower has no tokenizer (its vocab_size differs from open_clip's 49,408): pass token ids")
        return self.tokenizer(list(texts))

    def forward(self, texts: list[str] | Tensor) -> Tensor:
        ids = texts if isinstance(texts, Tensor) else self.tokenize(texts)
        device = self.text.token_embedding.weight.device
        return self.text(ids.to(device))


@dataclass
class ClipParts:
    """An open_clip model and views of it that share its weights."""

    model: nn.Module  # open_clip CustomTextCLIP: .visual, .text, .logit_scale
    vision: ClipVisionTower
    text: ClipTextTower
    preprocess: Callable[[Any], Tensor]  # PIL image -> (3, H, W) in [0, 1] (the tower normalises)
    tokenizer: Callable[..., Tensor] | None  # list[str] -> (B, context_length) token ids
    source: str  # one line saying what was built / loaded, for logs and run records


def clip_config(name: str = TINY, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model config of ``name`` (``"tiny"`` or an open_clip config name) deep-merged with ``config``."""
    import open_clip

    if name == TINY:
        base = copy.deepcopy(TINY_CLIP)
    else:
        base = open_clip.get_model_config(name)
        if base is None:
            raise ValueError(f"unknown open_clip config {name!r}; use 'tiny' or one of open_clip.list_models(), e.g. 'ViT-B-32'")
        base = copy.deepcopy(base)
    for key, value in (config or {}).items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    if "timm_model_name" in base.get("vision_cfg", {}) or "hf_model_name" in base.get("text_cfg", {}):
        raise ValueError(f"open_clip config {name!r} uses a timm or Hugging Face tower; only open_clip's own ViT + text transformer are supported")
    return base


def build_clip(
    name: str = TINY,
    config: dict[str, Any] | None = None,
    checkpoint: str | Path | None = None,
    feature_layer: int = -1,
) -> ClipParts:
    """Build an open_clip model (random, or from ``checkpoint``) and its towers.

    Random weights come from torch's global RNG: build inside ``AdaptedModule.seeded()`` to rebuild
    them identically.
    """
    import open_clip
    from open_clip.transform import image_transform

    cfg = clip_config(name, config)
    quiet = _DropMessage("No pretrained weights loaded")  # open_clip warns on every random build; we say so in `source`
    logging.getLogger().addFilter(quiet)
    try:  # any built-in name works as the base: every config key is replaced by ours
        model = open_clip.create_model("ViT-B-32", pretrained=None, force_custom_text=True, **cfg)
    finally:
        logging.getLogger().removeFilter(quiet)
    source = f"open_clip {name} (random init)"
    if checkpoint is not None:
        load_clip_checkpoint(model, checkpoint)
        source = f"open_clip {name} from {checkpoint}"
    pcfg = model.visual.preprocess_cfg
    text_cfg = cfg["text_cfg"]
    tokenizer = None
    if text_cfg.get("vocab_size", 49408) == 49408:  # open_clip's SimpleTokenizer (bundled BPE vocabulary)
        tokenizer = open_clip.SimpleTokenizer(context_length=text_cfg.get("context_length", 77))
    preprocess = image_transform(model.visual.image_size, is_train=False, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                                 resize_mode=pcfg.get("resize_mode"), interpolation=pcfg.get("interpolation"))
    vision = ClipVisionTower(model.visual, pcfg["mean"], pcfg["std"], feature_layer)
    return ClipParts(model, vision, ClipTextTower(model.text, tokenizer), preprocess, tokenizer, source)


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a checkpoint file (safetensors, or ``torch.load(weights_only=True)``), unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP checkpoint {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickled code (a TorchScript archive, a pickled module) is refused
            raise ValueError(f"{path}: not a weights-only checkpoint ({err}); save model.state_dict() or use safetensors") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # open_clip training checkpoints and Lightning checkpoints
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (or a dict whose 'state_dict' is one)")
    for prefix in _CHECKPOINT_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_clip_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load an open_clip checkpoint into ``model`` strictly; a mismatch lists the keys."""
    from open_clip.model import convert_to_custom_text_state_dict

    state = convert_to_custom_text_state_dict(read_state_dict(path))  # no-op for the custom-text layout
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshaped = sorted(f"{k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)}" for k in set(own) & set(state)
                       if state[k].shape != own[k].shape)
    if missing or unexpected or misshaped:
        lines = [f"CLIP checkpoint {path} does not fit the model config (check the config name and overrides):"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if keys:
                lines.append(f"  {label} ({len(keys)}): " + ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else ""))
        raise ValueError("\n".join(lines))
    model.load_state_dict(state)


def _text_ids(texts: list[str]) -> Tensor:
    """A stable integer per caption (identical captions count as the same answer in retrieval)."""
    return torch.tensor([int.from_bytes(hashlib.sha1(t.encode()).digest()[:7], "big") for t in texts])


def retrieval_accuracy(image_emb: Tensor, text_emb: Tensor, text_ids: Tensor) -> dict[str, Tensor]:
    """Zero-shot top-1 retrieval over N held-out pairs, image->text and text->image, and chance level.

    A retrieved item counts as correct when its caption equals the query's (repeated captions are
    the same answer), so chance is the mean share of pairs carrying the query's caption.
    """
    sim = F.normalize(image_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1).T
    same = text_ids[:, None] == text_ids[None, :]
    rows = torch.arange(len(text_ids), device=sim.device)
    return {
        "i2t_top1": same[rows, sim.argmax(1)].float().mean(),
        "t2i_top1": same[sim.argmax(0), rows].float().mean(),
        "chance": same.float().mean(1).mean(),
    }


class ClipPretrain(AdaptedModule):
    """Contrastive (CLIP) training of an open_clip model on (image, caption) pairs.

    Args:
        clip: open_clip config name (``"tiny"``, ``"ViT-B-32"``, ...).
        clip_config: overrides deep-merged into that config (e.g. ``{"vision_cfg": {"image_size": 64}}``).
        checkpoint: an open_clip state dict / safetensors file to start from.
        towers: the towers trained fully when no adapter is given (both by default); with an
            ``adapter`` (e.g. LoRA on ``attn``, ``c_fc``, ``c_proj``) the adapters train instead.
            ``logit_scale`` trains either way and is clamped to ln(100) after each step, as in
            open_clip's training loop.
    """

    def __init__(
        self,
        clip: str = TINY,
        clip_config: dict[str, Any] | None = None,
        checkpoint: str | None = None,
        towers: tuple[str, ...] = ("vision", "text"),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        towers = list(towers)
        if not towers or set(towers) - {"vision", "text"}:
            raise ValueError(f"towers must be a non-empty subset of ['vision', 'text'], got {towers}")
        with self.seeded():
            parts = build_clip(clip, clip_config, checkpoint)
        if parts.tokenizer is None:
            raise ValueError("ClipPretrain tokenises captions with open_clip's tokenizer: keep text_cfg.vocab_size at 49408")
        self.backbone = parts.model
        self.tokenizer = parts.tokenizer
        self.image_stats = (parts.vision.mean, parts.vision.std, parts.vision.image_size)
        if self.adapter is not None:
            self.adapt()
        else:
            self.backbone.requires_grad_(False)
            for t in towers:
                getattr(self.backbone, "visual" if t == "vision" else "text").requires_grad_(True)
        self.backbone.logit_scale.requires_grad_(True)
        self.report = parameter_report(self, self.adapter.method if self.adapter else "full: " + "+".join(towers))
        self._val: list[tuple[Tensor, Tensor, Tensor]] = []
        self.load_init_from()

    def setup(self, stage: str) -> None:
        from open_clip.loss import ClipLoss

        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.trainer.global_rank if self._trainer is not None else 0
        # under DDP every rank contrasts its pairs with the whole global batch (gradients flow through the gather)
        self.loss_fn = ClipLoss(gather_with_grad=world > 1, rank=rank, world_size=world)

    def embed(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        images = normalize_images(batch["image"], *self.image_stats)
        ids = self.tokenizer(list(batch["text"])).to(images.device)
        return self.backbone.encode_image(images, normalize=True), self.backbone.encode_text(ids, normalize=True)

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        if not hasattr(self, "loss_fn"):
            self.setup("fit")
        img, txt = self.embed(batch)
        scale = self.backbone.logit_scale.exp()
        return {"loss": self.loss_fn(img, txt, scale), "logit_scale": scale.detach()}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            self.backbone.logit_scale.clamp_(0, math.log(100))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        img, txt = self.embed(batch)  # once: the loss and the retrieval both use these
        scale = self.backbone.logit_scale.exp()
        bs = img.shape[0]
        self.log("val/loss", self.loss_fn(img, txt, scale), prog_bar=True, sync_dist=True, batch_size=bs)
        self.log("val/logit_scale", scale, sync_dist=True, batch_size=bs)
        self._val.append((img.detach(), txt.detach(), _text_ids(list(batch["text"])).to(img.device)))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        img, txt, ids = (torch.cat(x) for x in zip(*self._val))
        self._val.clear()
        if self.trainer.world_size > 1:  # retrieval over every rank's held-out pairs (the same on every rank)
            img, txt, ids = (self.all_gather(x).flatten(0, 1) for x in (img, txt, ids))
        for k, v in retrieval_accuracy(img, txt, ids).items():
            self.log(f"val/retrieval_{k}", v)

