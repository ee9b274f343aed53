"""Generic operations written once against the adapter contract: inject, freeze, merge, save, load."""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .base import ALL_LINEAR, AdapterLayer, AdapterSpec, adapter_layers, matches_any
from .moe import MixtureOfExperts

# deliberately not PEFT's file names: this format holds every method, PEFT's only the LoRA family
CONFIG_NAME = "adapters.json"
WEIGHTS_NAME = "adapters.safetensors"
FORMAT = "suite-adapters/2"  # /2: specs as class_path + init_args (/1 held a flat dict with a method name)

#: ``model.<_RECORD>`` lists every spec injected into a model, in order, with its layers
_RECORD = "_suite_adapters"


class AdapterLoadError(RuntimeError):
    """Saved adapter state does not fit the model; the message counts the offending keys of each kind and names up to 20."""


@dataclass
class AdapterReport:
    """Parameter counts after injection (the numbers papers quote as "trainable %")."""

    total: int
    trainable: int
    adapted: list[str] = field(default_factory=list)
    method: str = ""
    #: parameters that were trainable before an ``inject`` and were frozen by it
    frozen: list[str] = field(default_factory=list)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        froze = f"; froze {len(self.frozen)} previously trainable tensors" if self.frozen else ""
        return (
            f"{self.method or 'model'}: {self.trainable:,} trainable / {self.total:,} total "
            f"({self.percent:.3f} %) over {len(self.adapted)} adapted layers{froze}"
        )


def parameter_report(model: nn.Module, method: str = "") -> AdapterReport:
    """Count parameters once each (tied weights are shared, not double counted)."""
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return AdapterReport(total, trainable, [n for n, _ in adapter_layers(model)], method)


def spec_to_config(spec: AdapterSpec) -> dict[str, Any]:
    """``{"class_path", "init_args"}``: the one form specs are written in (see :meth:`AdapterSpec.to_config`)."""
    return spec.to_config()


def spec_from_config(config: dict[str, Any]) -> AdapterSpec:
    """Rebuild a spec from ``{"class_path", "init_args"}``, importing the class by its path, so a
    domain's method (``domains.nuclei.adapters.MALA``) is found without being imported first."""
    if not isinstance(config, dict) or "class_path" not in config:
        raise ValueError(f"an adapter spec is written as {{'class_path': ..., 'init_args': {{...}}}}, got {config!r}")
    module_name, _, cls_name = str(config["class_path"]).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name, None) if module_name else None
    except ImportError as err:
        raise ValueError(f"adapter class_path {config['class_path']!r}: cannot import {module_name!r} ({err})") from err
    if not (isinstance(cls, type) and issubclass(cls, AdapterSpec)):
        raise ValueError(f"adapter class_path {config['class_path']!r} is not an AdapterSpec")
    return cls(**config.get("init_args", {}))


def _adapter_owned(model: nn.Module) -> dict[int, nn.Parameter]:
    """Parameters of adapters already in ``model`` (adapter layers, mixtures of experts, saved modules)."""
    owned: dict[int, nn.Parameter] = {}
    for _, layer in adapter_layers(model):
        for p in _adapter_parameters(layer):
            owned[id(p)] = p
    for mod in model.modules():
        if isinstance(mod, MixtureOfExperts):
            owned.update((id(p), p) for p in mod.parameters())
    for name in _saved_modules(model):
        owned.update((id(p), p) for p in model.get_submodule(name).parameters())
    return owned


def _output_layer(model: nn.Module) -> nn.Module | None:
    """The model's output layer (Hugging Face ``get_output_embeddings``), which ``all-linear`` skips as PEFT does."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None


def inject(model: nn.Module, spec: AdapterSpec) -> AdapterReport:
    """Wrap every layer that ``spec`` selects and freeze the base weights; return the report.

    The rule (PEFT's, extended to stacked specs): ``inject`` freezes every parameter it does not
    own and enables only the parameters it adds (and ``spec.modules_to_save``). Parameters of
    adapters already in the model (earlier adapter layers, mixtures of experts, earlier
    ``modules_to_save``) keep their ``requires_grad``, frozen or not, so experts frozen on purpose
    by ``add_expert(freeze_existing=True)`` stay frozen. Layers inside an existing adapter (its
    ``base_layer``) are not re-wrapped. ``report.frozen`` names what this call froze.
    """
    if not spec.targets:
        raise ValueError(f"{type(spec).__name__}.targets is empty: name the layers to adapt (names, a regex or 'all-linear')")
    inside_adapter = {n for n, _ in adapter_layers(model)}
    output = _output_layer(model) if spec.targets == ALL_LINEAR else None
    selected = [
        (name, mod)
        for name, mod in model.named_modules()
        if name
        and mod is not output
        and spec.selects(name, mod)
        and not isinstance(mod, AdapterLayer)
        and not any(name.startswith(a + ".") for a in inside_adapter)
    ]
    selected = _resolve_attention_children(model, selected)
    if not selected:
        candidates = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding))]
        raise ValueError(
            f"{type(spec).__name__}(targets={spec.targets!r}, exclude={spec.exclude!r}) matched no module. "
            f"Some candidates: {candidates[:12]}"
        )
    kept = _adapter_owned(model)
    was_trainable = {id(p) for p in model.parameters() if p.requires_grad}
    for name, mod in selected:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, spec.wrap(name, mod).train(mod.training))  # new dropout etc. follow the model's mode
    new = {id(p) for name, _ in selected for p in _adapter_parameters(model.get_submodule(name))}
    if spec.modules_to_save:
        for name, mod in model.named_modules():
            if name and matches_any(name, spec.modules_to_save):
                new.update(id(p) for p in mod.parameters())
    frozen = []
    for name, p in model.named_parameters():
        if id(p) in new:
            p.requires_grad_(True)
        elif id(p) not in kept:
            if id(p) in was_trainable:
                frozen.append(name)
            p.requires_grad_(False)
    record = getattr(model, _RECORD, [])
    record.append({"spec": spec.to_config(), "method": spec.method, "layers": [n for n, _ in selected]})
    object.__setattr__(model, _RECORD, record)  # plain attribute, not a submodule
    report = parameter_report(model, spec.method)
    report.frozen = frozen
    return report


def _resolve_attention_children(model: nn.Module, selected: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Drop ``out_proj`` of a selected ``nn.MultiheadAttention`` (its adapter covers it); refuse it alone.

    ``nn.MultiheadAttention`` reads ``out_proj.weight`` directly and never calls ``out_proj.forward``,
    so an adapter wrapped around ``out_proj`` alone would silently do nothing.
    """
    names = {n for n, _ in selected}
    kept = []
    for name, mod in selected:
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, nn.MultiheadAttention):
            if parent_name in names:
                continue
            raise ValueError(
                f"{name!r} is the output projection inside nn.MultiheadAttention {parent_name!r}, which never "
                f"calls its forward, so an adapter there would do nothing. Target {parent_name!r} instead "
                "(LoRA/MiCA then adapt in_proj_weight and out_proj), or add this name to `exclude`."
            )
        kept.append((name, mod))
    return kept


def _adapter_parameters(layer: AdapterLayer) -> list[nn.Parameter]:
    names = set(layer.adapter_params())
    return [p for n, p in layer.named_parameters() if n in names]


def merge(model: nn.Module) -> None:
    """Fold every adapter delta into its base weight (inference then costs what the base costs)."""
    for _, layer in adapter_layers(model):
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge` exactly (to floating-point round-off)."""
    for _, layer in adapter_layers(model):
        layer.unmerge()


def _saved_modules(model: nn.Module) -> list[str]:
    patterns = [p for r in getattr(model, _RECORD, []) for p in r["spec"]["init_args"].get("modules_to_save", [])]
    names = [n for n, _ in model.named_modules() if n and patterns and matches_any(n, patterns)]
    # keep only outermost matches so nothing is saved twice
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors (not base weights) plus ``modules_to_save``, keyed by full module path."""
    state: dict[str, torch.Tensor] = {}
    for name, layer in adapter_layers(model):
        for k, v in layer.adapter_state_dict().items():
            state[f"{name}.{k}"] = v
    for name in _saved_modules(model):
        for k, v in model.get_submodule(name).state_dict().items():
            state.setdefault(f"{name}.{k}", v)
    return state


def save_adapters(model: nn.Module, path: str | Path) -> Path:
    """Write ``adapters.safetensors`` and ``adapters.json`` (adapter state only; see :func:`export_peft` for PEFT's format)."""
    record = getattr(model, _RECORD, None)
    if not record:
        raise ValueError("the model has no injected adapters to save; call suite.adapters.inject first")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    save_file(state, str(path / WEIGHTS_NAME), metadata={"format": FORMAT})
    (path / CONFIG_NAME).write_text(json.dumps({"format": FORMAT, "adapters": record}, indent=2))
    return path


#: spec fields a saved adapter may differ in from the model's: layer selection is checked through
#: the tensor keys, and dropout acts in training only (plus each method's ``start_fields``)
_LOAD_FREE_FIELDS = frozenset({"targets", "exclude", "modules_to_save", "dropout"})


def _check_saved_specs(cfg_file: Path, ours: list[dict], theirs: list[dict], strict: bool) -> None:
    """The model already has adapters: the saved ones must be the same methods with the same
    hyperparameters (alpha, rslora, top_k, ...), or the loaded tensors would compute something else."""
    if strict and len(ours) != len(theirs):
        raise AdapterLoadError(
            f"{cfg_file}: field 'adapters' holds {len(theirs)} adapter(s) ({[t['class_path'] for t in theirs]}), "
            f"the model has {len(ours)} ({[o['class_path'] for o in ours]})"
        )
    for i, (own, saved) in enumerate(zip(ours, theirs)):
        if own["class_path"] != saved["class_path"]:
            raise AdapterLoadError(f"{cfg_file}: field 'adapters[{i}].spec.class_path' is {saved['class_path']!r}, the model's adapter is {own['class_path']!r}")
        free = _LOAD_FREE_FIELDS | spec_from_config(own).start_fields
        a, b = own["init_args"], saved["init_args"]
        diff = [f"{k}: saved {b.get(k)!r}, model {a.get(k)!r}" for k in sorted((set(a) | set(b)) - free) if b.get(k) != a.get(k)]
        if diff:
            raise AdapterLoadError(f"{cfg_file}: field 'adapters[{i}].spec.init_args' does not match the model's adapter: " + "; ".join(diff))


def load_adapters(model: nn.Module, path: str | Path, strict: bool = True) -> AdapterReport:
    """Load adapters saved by :func:`save_adapters`, injecting them first if the model has none.

    A model that already has adapters must have the saved methods with the same hyperparameters
    (all spec fields but the layer selection, dropout and the fields that only choose the start).

    Raises :class:`AdapterLoadError` counting the missing, unexpected and mis-shaped keys (naming up to 20 of each).
    """
    path = Path(path)
    cfg_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: expected a folder written by suite.adapters.save_adapters")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise AdapterLoadError(f"{cfg_file}: not valid JSON ({err})") from err
    if cfg.get("format") != FORMAT:
        raise AdapterLoadError(f"{cfg_file}: field 'format' is {cfg.get('format')!r}, expected {FORMAT!r}")
    specs = []
    for i, entry in enumerate(cfg.get("adapters") or []):
        try:
            specs.append(spec_from_config(entry["spec"]))
        except (ValueError, TypeError, KeyError) as err:  # class_path that does not import, or fields it refuses
            raise AdapterLoadError(f"{cfg_file}: field 'adapters[{i}].spec': {err}") from err
    if not specs:
        raise AdapterLoadError(f"{cfg_file}: field 'adapters' is empty or missing: expected the list save_adapters writes")
    injected_here = not getattr(model, _RECORD, None)
    if injected_here:
        for spec in specs:
            inject(model, spec)
    saved = load_file(str(weights_file))
    own = adapter_state_dict(model)
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    misshaped = sorted(
        f"{k}: saved {tuple(saved[k].shape)}, model {tuple(own[k].shape)}"
        for k in set(own) & set(saved)
        if saved[k].shape != own[k].shape
    )
    if misshaped or (strict and (missing or unexpected)):
        lines = [f"adapters in {path} do not fit this model:"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if keys:
                lines.append(f"  {label} ({len(keys)}): " + ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else ""))
        raise AdapterLoadError("\n".join(lines))
    if not injected_here:  # the tensors fit; the hyperparameters that use them must match too
        _check_saved_specs(cfg_file, [r["spec"] for r in getattr(model, _RECORD)], [e["spec"] for e in cfg["adapters"]], strict)
    result = model.load_state_dict({k: saved[k] for k in own if k in saved}, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return parameter_report(model, "+".join(spec.method for spec in specs))


def init_adapters(
    model: nn.Module,
    batches: Iterable[Any] | None,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
) -> list[str]:
    """Run data-dependent initialisation (e.g. CG-LoRA) for every adapter layer that still needs it.

    Calls ``loss_fn(batch)`` on up to ``max(spec.calibration_batches)`` batches with the model in
    eval mode (no dropout, so the result is deterministic), differentiates the loss w.r.t. the
    outputs of the pending layers only (no parameter gradients are written), and lets each layer
    compute its factors in fp32. Layers whose persistent ``initialised`` buffer is set are skipped,
    so a resumed run (weights restored before ``on_fit_start``) is not re-initialised, and a second
    call is a no-op. ``loss_fn`` defaults to ``model.compute_losses(batch)["loss"]``.
    Returns the names of the layers it initialised.
    """
    pending = [(n, layer) for n, layer in adapter_layers(model) if layer.needs_init()]
    if not pending:
        return []
    names = [n for n, _ in pending]
    if loss_fn is None:
        compute = getattr(model, "compute_losses", None)
        if compute is None:
            raise ValueError("init_adapters needs loss_fn(batch) -> scalar loss (the model has no compute_losses)")
        loss_fn = lambda b: compute(b)["loss"]  # noqa: E731
    if batches is None:
        raise ValueError(
            f"adapter layers {names[:4]}{' ...' if len(names) > 4 else ''} need calibration batches: give the "
            "trainer a datamodule with a train_dataloader, or override AdaptedModule.calibration_batches()"
        )
    limit = max(int(getattr(layer.spec, "calibration_batches", 1)) for _, layer in pending)
    modes = [(m, m.training) for m in model.modules()]  # restored one by one: some submodules may stay in eval
    model.eval()
    seen = 0
    try:
        for _, layer in pending:
            layer.begin_calibration()
        with torch.enable_grad():
            for batch in batches:
                loss = loss_fn(batch)
                if loss.dim() != 0 or not torch.isfinite(loss):
                    raise ValueError(f"calibration batch {seen}: loss must be a finite scalar, got {loss}")
                outs = [layer.calibration_outputs() for _, layer in pending]
                flat = [y for o in outs for y in o]
                if not flat:
                    raise RuntimeError(f"the calibration loss does not run through the layers to initialise: {names[:4]}")
                grads = torch.autograd.grad(loss, flat, allow_unused=True)
                i = 0
                for (_, layer), o in zip(pending, outs):
                    layer.accumulate_calibration(list(grads[i : i + len(o)]))
                    i += len(o)
                seen += 1
                if seen >= limit:  # stop before fetching another batch (loaders may be expensive)
                    break
        if seen == 0:
            raise ValueError("init_adapters got an empty iterable of calibration batches")
        for _, layer in pending:
            layer.finish_calibration(seen)
    finally:
        for _, layer in pending:
            layer.end_calibration()
        for m, mode in modes:
            m.training = mode
    return names
