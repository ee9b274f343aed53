"""The adapter contract every method honours.

An :class:`AdapterSpec` is a small dataclass that says *which* layers to adapt and *how*;
``spec.wrap(name, layer)`` returns an :class:`AdapterLayer` that owns the frozen
``base_layer`` and adds a delta. Everything generic (matching names, freezing, saving,
merging) is written once in ``suite/adapters/core.py`` against this contract, so a new
method is one file with a spec and a layer.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import torch
from torch import nn

_REGEX_CHARS = set("^$*+?[]()|\\{}")


#: ``targets="all-linear"`` (as in PEFT): every ``nn.Linear`` except the model's output layer
ALL_LINEAR = "all-linear"


def name_matches(name: str, pattern: str) -> bool:
    """True if ``pattern`` is ``name`` itself, a dotted suffix of it, or a regex matching it fully.

    A pattern is read as a regex only when it holds a regex metacharacter other than ``.``,
    because dotted module paths such as ``blocks.0.attn.qkv`` are the common case.
    """
    if name == pattern or name.endswith("." + pattern):
        return True
    if _REGEX_CHARS & set(pattern):
        return re.fullmatch(pattern, name) is not None
    return False


def matches_any(name: str, patterns: list[str] | tuple[str, ...] | str) -> bool:
    """``patterns`` as a list (names, suffixes or regexes, see :func:`name_matches`) or, as PEFT
    reads a single string, one regex that must match the whole name."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name_matches(name, p) for p in patterns)


@dataclass
class AdapterSpec:
    """Which layers to adapt (``targets`` minus ``exclude``) and which modules train fully.

    Subclasses add the method's hyperparameters and implement :meth:`wrap`.
    """

    targets: list[str] | str = field(default_factory=list)
    exclude: list[str] | str = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)

    #: the method's short name, used in parameter reports and run records
    method: ClassVar[str] = ""
    #: True when the method needs calibration data before training (see ``init_adapters``)
    needs_calibration: ClassVar[bool] = False
    #: True when ``export_peft`` can write this method in the Hugging Face PEFT format
    peft_exportable: ClassVar[bool] = False
    #: fields that only choose how the adapter starts: trained weights loaded over it make them moot
    start_fields: ClassVar[frozenset[str]] = frozenset()

    def wrap(self, name: str, layer: nn.Module) -> "AdapterLayer":
        """Return the adapter layer that replaces ``layer`` (found at ``name``)."""
        raise NotImplementedError

    def selects(self, name: str, module: nn.Module | None = None) -> bool:
        """True if the layer ``name`` (``module``, needed for ``targets="all-linear"``) is adapted."""
        if self.targets == ALL_LINEAR:
            chosen = isinstance(module, nn.Linear)
        else:
            chosen = matches_any(name, self.targets)
        return chosen and not matches_any(name, self.exclude)

    def fields(self) -> dict[str, Any]:
        """The spec's fields as JSON-ready values (tuples become lists so the round-trip is exact)."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def to_config(self) -> dict[str, Any]:
        """``{"class_path", "init_args"}``: the one form a spec is written in (YAML, checkpoint
        hyperparameters, ``adapters.json``), so any method, a domain's included, is found by import path."""
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": self.fields()}


class AdapterLayer(nn.Module):
    """A frozen ``base_layer`` plus a trainable delta.

    Subclasses implement ``forward`` and :meth:`delta_weight` (when the method has a weight
    delta), and may override :meth:`aux_loss` (e.g. a router's balance loss).
    """

    def __init__(self, base_layer: nn.Module, spec: AdapterSpec) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.spec = spec
        self.merged = False

    def __getattr__(self, name: str) -> Any:
        # a drop-in replacement: models read attributes of the layer they built (open_clip reads
        # mlp.c_fc.weight.dtype, MultiheadAttention callers read batch_first); delegate to the base
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    # --- the contract -------------------------------------------------------------------
    def adapter_params(self) -> list[str]:
        """Names (relative to this layer) of the parameters the method trains."""
        return [n for n, _ in self.named_parameters() if not n.startswith("base_layer.")]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything the method owns (trained parameters and frozen buffers), not the base."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base_layer.")}

    def delta_weight(self) -> torch.Tensor | None:
        """The update that :meth:`merge` adds to ``base_layer.weight``; ``None`` if not mergeable."""
        return None

    def aux_loss(self) -> torch.Tensor | None:
        """An auxiliary loss from the last forward (e.g. router load balance), or ``None``."""
        return None

    # --- data-dependent initialisation (specs with needs_calibration; see init_adapters) -----
    def needs_init(self) -> bool:
        """True while a data-dependent initialisation is still due (its ``initialised`` buffer is unset)."""
        flag = getattr(self, "initialised", None)
        return self.spec.needs_calibration and (flag is None or not bool(flag))

    def begin_calibration(self) -> None:
        """Start recording: from now on ``forward`` keeps (input, output) pairs for the statistics."""
        raise NotImplementedError(f"{type(self).__name__} has no data-dependent initialisation")

    def calibration_outputs(self) -> list[torch.Tensor]:
        """Outputs recorded since the last call; ``init_adapters`` differentiates the loss w.r.t. them."""
        raise NotImplementedError

    def accumulate_calibration(self, grads: list[torch.Tensor | None]) -> None:
        """Fold one batch (recorded inputs + loss gradients w.r.t. the outputs) into the statistics."""
        raise NotImplementedError

    def finish_calibration(self, n_batches: int) -> None:
        """Compute the initial adapter from the statistics and set ``initialised``."""
        raise NotImplementedError

    def end_calibration(self) -> None:
        """Drop recording state (always called, also after an error)."""

    # --- merging, written once against delta_weight() ---------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Fold the delta into the base weight: ``W + delta`` computed in fp32, rounded once to W's dtype.

        A low-precision weight (bf16, fp16) cannot be recovered from the rounded sum, so its
        original is kept until :meth:`unmerge`, which restores it bit for bit (the class of bug
        PEFT's merges in half precision had: ``W += delta`` in bf16, then ``W -= delta``, does not
        return W). An fp32 weight is restored to fp32 round-off and costs no copy.
        """
        if self.merged:
            return
        w = self.base_layer.weight
        delta = self._checked_delta()
        if w.dtype in (torch.float32, torch.float64):
            w.add_(delta.to(w.dtype))
        else:
            self._unmerged_weight = w.detach().clone()
            w.copy_((w.float() + delta.float()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.base_layer.weight
        original = self.__dict__.pop("_unmerged_weight", None)
        if original is not None:
            w.copy_(original)
        else:
            w.sub_(self._checked_delta().to(w.dtype))
        self.merged = False

    def _checked_delta(self) -> torch.Tensor:
        delta = self.delta_weight()
        if delta is None:
            raise NotImplementedError(f"{type(self).__name__} has no weight delta and cannot be merged")
        return delta

    def extra_repr(self) -> str:
        return f"method={self.spec.method}, merged={self.merged}"


def require_linear(spec: AdapterSpec, name: str, layer: nn.Module) -> nn.Linear:
    """``layer`` if it is an ``nn.Linear``, else a clear error for methods that adapt Linear layers only."""
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"{type(spec).__name__} adapts nn.Linear only; {name!r} is {type(layer).__name__}. Narrow `targets`.")
    return layer


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """(name, layer) for every adapter layer in ``model``, outermost first."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module
