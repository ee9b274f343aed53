"""Tiny seeded backbones for the adapter test matrix (timm style: one contract, many models).

Each :class:`Backbone` builds a small random model of a real family, an example input and the
layer names each kind of method targets there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn


@dataclass(frozen=True)
class Backbone:
    name: str
    build_fn: Callable[[], nn.Module]
    inputs_fn: Callable[[], Any]
    run: Callable[[nn.Module, Any], torch.Tensor]
    linear: tuple[str, ...]  # nn.Linear targets (every method)
    extra: tuple[str, ...]  # Conv2d / Embedding / MultiheadAttention targets (the LoRA family)
    qkv: tuple[str, ...] | None  # fused q/k/v projections, if the model has them
    conv: tuple[str, ...] = ()  # Conv2d targets (DoRA supports Linear and Conv2d)

    def build(self, seed: int = 0) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.build_fn().eval()

    def inputs(self) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            return self.inputs_fn()


def _timm_vit() -> nn.Module:
    import timm

    return timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32)


def _sam_encoder() -> nn.Module:
    from segment_anything.modeling import ImageEncoderViT

    return ImageEncoderViT(
        img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0, out_chans=32,
        window_size=2, global_attn_indexes=(1,), use_rel_pos=True,
    )


def _open_clip_text() -> nn.Module:
    # open_clip's text tower class (nn.MultiheadAttention blocks), shrunk from its smallest config
    from open_clip.transformer import TextTransformer

    return TextTransformer(context_length=16, vocab_size=100, width=32, heads=2, layers=2, output_dim=16)


def _open_clip() -> nn.Module:
    # the whole model from suite.backbones.clip (both towers; a small vocabulary, no tokenizer needed)
    from suite.backbones.clip import build_clip

    return build_clip("tiny", config={"text_cfg": {"vocab_size": 100, "context_length": 8}}).model


def _clip_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand(2, 3, 32, 32), torch.randint(1, 100, (2, 8))


def _clip_towers(model: nn.Module, x: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Vision tokens and pooled embedding (through suite's tower view) and the text embedding, in one tensor."""
    from suite.backbones.clip import ClipVisionTower

    images, ids = x
    pcfg = model.visual.preprocess_cfg
    vision = ClipVisionTower(model.visual, pcfg["mean"], pcfg["std"])(images)
    return torch.cat([vision.tokens.flatten(1), vision.pooled, model.encode_text(ids)], dim=1)


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )
    return LlamaForCausalLM(cfg)


def _call(model: nn.Module, x: Any) -> torch.Tensor:
    return model(x)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


BACKBONES = {
    "timm_vit": Backbone(
        "timm_vit", _timm_vit, lambda: torch.randn(2, 3, 32, 32), _call,
        linear=("qkv", "attn.proj"), extra=("patch_embed.proj",), qkv=("qkv",), conv=("patch_embed.proj",),
    ),
    "sam_encoder": Backbone(
        "sam_encoder", _sam_encoder, lambda: torch.randn(1, 3, 64, 64), _call,
        linear=("qkv", "attn.proj"), extra=("neck.0", "neck.2"), qkv=("qkv",), conv=("neck.0", "neck.2"),
    ),
    "open_clip_text": Backbone(
        "open_clip_text", _open_clip_text, lambda: torch.randint(1, 100, (2, 16)), _call,
        linear=("c_fc", "c_proj"), extra=("attn", "token_embedding"), qkv=("attn",),
    ),
    "open_clip": Backbone(  # both towers at once: ViT (conv1, attn, MLP) and text transformer
        "open_clip", _open_clip, _clip_inputs, _clip_towers,
        linear=("c_fc", "c_proj"), extra=("attn", "conv1", "token_embedding"), qkv=("attn",), conv=("conv1",),
    ),
    "llama": Backbone(
        "llama", _llama, lambda: torch.randint(0, 100, (2, 8)), _logits,
        linear=("q_proj", "v_proj"), extra=("embed_tokens",), qkv=None,
    ),
}


def train_steps(model: nn.Module, bb: Backbone, x: Any, steps: int = 3, lr: float = 0.01) -> None:
    """A few Adam steps on a synthetic loss so every adapter tensor moves away from its init."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    for _ in range(steps):
        loss = bb.run(model, x).float().pow(2).mean()
        # read each aux_loss() once: MixtureOfExperts hands its balance loss out a single time
        aux = [a for m in model.modules() if hasattr(m, "aux_loss") and (a := m.aux_loss()) is not None]
        loss = loss + 0.01 * sum(aux) if aux else loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
