"""``AdaptedModule``: the LightningModule every domain subclasses.

It owns a frozen backbone, an adapter spec and trainable heads, and gives every domain the same
lifecycle: inject adapters, optimise only what trains, report parameter counts, stop on a
non-finite loss, run data-dependent adapter initialisation before the first step, keep
checkpoints to trainable state, and shard for FSDP2.

A domain writes::

    class MyModule(AdaptedModule):
        def __init__(self, depth: int = 4, **kw):
            super().__init__(**kw)               # adapter, optimizer, init_from, ... are ours
            with self.seeded():                 # frozen weights are rebuilt identically on load
                self.backbone = build_backbone(depth)
            self.head = nn.Linear(...)
            self.adapt()                         # inject(self.backbone, adapter), freeze the rest
            self.load_init_from()                # start from an earlier stage, if init_from is given

        def compute_losses(self, batch) -> dict[str, Tensor]:   # must hold "loss"
            ...

Starting from an earlier stage is one mechanism for every domain: ``init_from`` names a suite
Lightning checkpoint (or a ``save_adapters`` folder); :meth:`AdaptedModule.load_init_from`
rebuilds that stage from the checkpoint's own hyperparameters (recursively, when it too started
from another), loads its state, and hands it to :meth:`AdaptedModule.extend_from`, the one hook a
domain overrides to extend the model (add an expert, a class head, merge adapters).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import warnings
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from jsonargparse import set_parsing_settings

from suite.adapters import AdapterReport, AdapterSpec, adapter_layers, inject, load_adapters, parameter_report
from suite.adapters.core import spec_from_config

# Specs are dataclasses, which jsonargparse reads field by field unless told otherwise. Enabling
# subclasses lets a YAML choose any method with ``class_path: suite.adapters.MiCA``, and lets
# ``SomeModule.load_from_checkpoint`` rebuild a model from a CLI checkpoint's hyperparameters (they
# hold such class paths) without the CLI imported. Set here, with the LightningModule that parses
# them, not in the adapter layer, which imports without side effects.
set_parsing_settings(subclasses_enabled=[AdapterSpec])

# Checkpoints deliberately omit frozen base weights and on_load_checkpoint verifies the keys
# itself, so Lightning's list of "missing" frozen keys is noise.
warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in the checkpoint")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the run stops instead of corrupting the adapters."""


class CheckpointMismatchError(ValueError):
    """A checkpoint (or earlier stage) does not fit the model; the message lists the offending keys."""


class BackboneMismatchError(CheckpointMismatchError, RuntimeError):
    """The checkpoint's keys fit, but its adapters were trained on another frozen backbone."""


def _mismatch(source: str, missing: list[str], unexpected: list[str], misshaped: list[str]) -> CheckpointMismatchError:
    lines = [f"{source} does not fit this model (was it written with another domain, backbone, adapter or model config?)"]
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if keys:
            lines.append(f"  {label} keys ({len(keys)}): " + ", ".join(keys[:12]) + (" ..." if len(keys) > 12 else ""))
    return CheckpointMismatchError("\n".join(lines))


def _unwrapped(key: str) -> str:
    """A state-dict key with adapter wrapping removed (``qkv.base_layer.weight`` -> ``qkv.weight``)."""
    return key.replace(".base_layer.", ".")


def read_checkpoint(path: str | Path) -> Any:
    """A checkpoint file (``weights_only``), or an FSDP2 run's sharded folder read whole
    (:func:`suite.strategies.consolidate_checkpoint`), so a later stage starts from either."""
    from suite.strategies import consolidate_checkpoint, is_sharded_checkpoint

    if is_sharded_checkpoint(path):
        return consolidate_checkpoint(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def rebuild_stage(path: str | Path, default_class: type | None = None) -> "AdaptedModule":
    """The model of an earlier stage from its checkpoint alone.

    The class comes from the checkpoint's ``_class_path`` (LightningCLI writes it; ``default_class``
    otherwise) and is built from the checkpoint's hyperparameters, so a stage that itself started
    from another rebuilds that one first (recursively, through its own ``init_from``). Then the
    saved keys are checked (:meth:`AdaptedModule.on_load_checkpoint`) and loaded.

    A module-level function on purpose: Lightning collects hyperparameters from the chain of
    ``__init__`` frames above ``save_hyperparameters``, which must not reach the caller's.
    """
    path = Path(path)
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointMismatchError(f"{path}: field 'state_dict' missing: expected a suite Lightning checkpoint (last.ckpt)")
    hp = dict(ckpt.get("hyper_parameters") or {})
    class_path = hp.pop("_class_path", None)
    if class_path:
        module_name, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module_name), name)
    elif default_class is not None:
        cls = default_class
    else:
        raise CheckpointMismatchError(f"{path}: field 'hyper_parameters._class_path' missing: cannot tell which model wrote it")
    if not (isinstance(cls, type) and issubclass(cls, AdaptedModule)):
        raise CheckpointMismatchError(f"{path} was written by {class_path}, which is not a suite AdaptedModule")
    for name, r in ((ckpt.get("suite") or {}).get("resolved") or {}).items():  # e.g. backbone: auto -> what it meant then
        if hp.get(name) == r["given"]:
            hp[name] = r["resolved"]
    known = set().union(*(inspect.signature(c.__init__).parameters for c in cls.__mro__ if issubclass(c, AdaptedModule)))
    earlier = cls(**{k: v for k, v in hp.items() if k in known - {"self", "kwargs"}})
    earlier.on_load_checkpoint(ckpt)  # every trainable key present, none unknown, frozen-base fingerprint matches
    earlier.load_state_dict(ckpt["state_dict"], strict=False)  # strict=False: frozen weights are not saved
    return earlier


def _default_optimizer(params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)


class AdaptedModule(L.LightningModule):
    """Backbone + adapters + heads with the shared PEFT lifecycle.

    Args:
        adapter: the adapter spec injected into ``self.backbone`` by :meth:`adapt`; ``None``
            freezes the backbone and trains only the heads (a linear probe).
        optimizer: built over trainable parameters only (default AdamW, lr 1e-3).
        scheduler: optional learning-rate scheduler, stepped every optimiser step (``scheduler_interval``).
        aux_loss_weight: weight of the adapters' auxiliary losses (e.g. router balance).
        backbone_seed: seed for randomly initialised frozen weights, so a rebuilt module has
            the same frozen backbone the saved adapters were trained on.
        init_from: an earlier stage to start from: a suite Lightning checkpoint (``last.ckpt``) or
            a ``save_adapters`` folder (see :meth:`load_init_from`).
    """

    #: set by a subclass that never injects an adapter spec: what it does instead (a spec is then refused)
    adapter_note: ClassVar[str] = ""
    #: under bf16-mixed, frozen base weights are stored in bf16 (suite.precision); a subclass whose
    #: guarantees need the fp32 values (bit-identical outputs of frozen parts) sets this
    keep_frozen_fp32: ClassVar[bool] = False

    def __init__(
        self,
        adapter: AdapterSpec | None = None,
        optimizer: OptimizerCallable = _default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        aux_loss_weight: float = 0.01,
        backbone_seed: int = 0,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(adapter, dict):  # as stored in checkpoint hyperparameters
            adapter = spec_from_config(adapter)
        if adapter is not None and self.adapter_note:
            raise ValueError(f"{type(self).__name__} does not take an adapter spec ({type(adapter).__name__} given): {self.adapter_note}")
        # every __init__ argument of the domain subclass is recorded (Lightning walks the
        # __init__ frames); the spec is kept in class_path/init_args form so checkpoints load
        # with weights_only=True and through LightningCLI's instantiator; the optimiser
        # factories live in the run's config.yaml
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.hparams["adapter"] = adapter.to_config() if adapter is not None else None
        if init_from is not None and Path(init_from).exists():
            init_from = str(Path(init_from).resolve())
            self.hparams["init_from"] = init_from  # so later stages find it from any directory
        self.init_from = init_from
        self._adapted = adapter is None  # a spec must be injected by adapt() before the model runs
        self._started = init_from is None
        self.adapter = adapter
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.aux_loss_weight = aux_loss_weight
        self.backbone_seed = backbone_seed
        self.report: AdapterReport | None = None
        self.resolved: dict[str, dict[str, Any]] = {}
        self._fingerprint: str | None = None
        self._batch_idx = -1
        # checkpoints hold trainable state only; on_load_checkpoint checks the keys itself
        self.strict_loading = False

    # --- building ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def seeded(self, seed: int | None = None) -> Iterator[None]:
        """Run a block with the global RNG seeded by ``backbone_seed``, then restore the RNG."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.backbone_seed if seed is None else seed)
            yield

    def adapt(self, target: nn.Module | None = None) -> AdapterReport:
        """Inject ``self.adapter`` into ``target`` (default ``self.backbone``) and freeze the rest of it."""
        target = self.backbone if target is None else target
        if self.adapter is None:
            target.requires_grad_(False)
            self.report = parameter_report(self, "heads only")
        else:
            inject(target, self.adapter)
            self.report = parameter_report(self, self.adapter.method)
        self._adapted = True
        object.__setattr__(self, "adapter_target", target)  # not a submodule: where adapters-folder init_from loads
        return self.report

    def record_resolved(self, name: str, given: Any, resolved: Any) -> None:
        """Note that argument ``name`` was given as ``given`` (e.g. ``backbone: auto``) and meant
        ``resolved`` on this machine. Checkpoints keep it, and ``test`` / ``predict`` / ``validate``
        / resume with ``--ckpt_path`` rebuild what was trained even where ``given`` would now
        resolve to something else (say, after installing a pretrained LM)."""
        if given != resolved:
            self.resolved[name] = {"given": given, "resolved": resolved}

    # --- starting from an earlier stage -----------------------------------------------------
    def load_init_from(self) -> "AdaptedModule | None":
        """Start from ``init_from``; call it once the model is built (usually after :meth:`adapt`).

        * a suite Lightning checkpoint: the earlier stage is rebuilt from it (:func:`rebuild_stage`,
          recursively through its own ``init_from``) and passed to :meth:`extend_from`;
        * a ``save_adapters`` folder (saved from the module :meth:`adapt` injected into, e.g.
          ``save_adapters(model.backbone, path)``): its adapters are loaded there.

        Returns the rebuilt earlier stage (``None`` for a folder or without ``init_from``).
        """
        self._started = True
        if self.init_from is None:
            return None
        from suite.strategies import is_sharded_checkpoint

        path = Path(self.init_from)
        if path.is_dir() and not is_sharded_checkpoint(path):
            load_adapters(getattr(self, "adapter_target", self), path)
            return None
        if not (path.is_file() or is_sharded_checkpoint(path)):
            raise FileNotFoundError(
                f"init_from={self.init_from!r} is neither a checkpoint file nor a save_adapters folder. If it names a "
                "prerequisite (e.g. a pretraining run), start through `python -m suite` or "
                "suite.prerequisites.run_prerequisite, which build it and pass its checkpoint"
            )
        return self.load_checkpoint_file(path)

    def load_checkpoint_file(self, path: Path) -> "AdaptedModule | None":
        """Start from a checkpoint file: rebuild the earlier stage and :meth:`extend_from` it.

        A domain whose users bring checkpoints in a foreign format (a reference implementation's
        ``.pth``) overrides this to read them, and defers to it for suite checkpoints.
        """
        earlier = rebuild_stage(path, type(self))
        self.extend_from(earlier)
        return earlier

    def extend_from(self, earlier: "AdaptedModule") -> None:
        """Take the earlier stage's state; override to extend the model afterwards.

        Default: copy every tensor of ``earlier`` into this model (keys matched through adapter
        wrapping, so a stage that adds LoRA starts from the previous stage's weights). Adapters new
        in this model may be absent from ``earlier``; any other missing, unexpected or mis-shaped
        key is a :class:`CheckpointMismatchError` that lists them.
        """
        self.load_matching_state(earlier.state_dict(), f"init_from {self.init_from}")

    def load_matching_state(self, state: dict[str, torch.Tensor], source: str, only: str | None = None) -> None:
        """Load ``state`` whose keys may differ from ours by adapter wrapping; see :meth:`extend_from`.

        ``only``: a key prefix (``"backbone."``): load that part of the model alone, e.g. the
        backbone of a pretraining run whose heads belong to another task.
        """
        own = {k: v for k, v in self.state_dict().items() if only is None or k.startswith(only)}
        by_unwrapped = {_unwrapped(k): k for k in own}
        new_adapter = {f"{n}.{k}" for n, layer in adapter_layers(self) for k in layer.adapter_state_dict()}
        mapped: dict[str, torch.Tensor] = {}
        unexpected, misshaped = [], []
        for key, value in state.items():
            target = key if key in own else by_unwrapped.get(_unwrapped(key))
            if target is None:
                unexpected.append(key)
            elif own[target].shape != value.shape:
                misshaped.append(f"{key}: saved {tuple(value.shape)}, model {tuple(own[target].shape)}")
            else:
                mapped[target] = value
        missing = sorted(k for k in own if k not in mapped and k not in new_adapter)
        if missing or unexpected or misshaped:
            raise _mismatch(source, missing, sorted(unexpected), sorted(misshaped))
        self.load_state_dict(mapped, strict=False)

    # --- the domain's part ------------------------------------------------------------------
    def compute_losses(self, batch: Any) -> dict[str, torch.Tensor]:
        """Return named losses for ``batch``; ``"loss"`` is optimised. Domains implement this."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute_losses(batch)")

    # --- training loop ----------------------------------------------------------------------
    def aux_losses(self) -> dict[str, torch.Tensor]:
        """Auxiliary losses from the last forward of every module that exposes ``aux_loss()``."""
        out = {}
        for name, mod in self.named_modules():
            fn = getattr(mod, "aux_loss", None)
            if callable(fn):
                value = fn()
                if value is not None:
                    out[name] = value
        return out

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        losses = dict(self.compute_losses(batch))
        aux = self.aux_losses()
        if aux:
            losses["aux"] = torch.stack([v.float() for v in aux.values()]).sum()
            losses["loss"] = losses["loss"] + self.aux_loss_weight * losses["aux"]
        bs = _batch_size(batch)
        for k, v in losses.items():
            self.log(f"train/{k}", v.detach(), prog_bar=k == "loss", batch_size=bs)
        return losses["loss"]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        losses = self.compute_losses(batch)
        bs = _batch_size(batch)
        for k, v in losses.items():
            self.log(f"val/{k}", v.detach(), prog_bar=k == "loss", sync_dist=True, batch_size=bs)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        losses = self.compute_losses(batch)
        bs = _batch_size(batch)
        for k, v in losses.items():
            self.log(f"test/{k}", v.detach(), sync_dist=True, batch_size=bs)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batch_idx = batch_idx

    def on_before_backward(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss).all():
            raise NonFiniteLossError(
                f"training loss is {loss.item()} at global step {self.global_step} "
                f"(epoch {self.current_epoch}, batch {self._batch_idx}); stopping. "
                "Lower the learning rate, check the inputs of this batch for NaN/inf, or use fp32."
            )

    #: when ``scheduler`` steps: after every optimiser "step" or every "epoch" (a subclass may set it per instance)
    scheduler_interval: str = "step"

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def param_groups(self) -> list[nn.Parameter] | list[dict[str, Any]]:
        """What the optimiser receives: the trainable parameters, or groups of them with their own
        settings (override, e.g. a freshly initialised head at its own learning rate)."""
        return self.trainable_parameters()

    def configure_optimizers(self) -> Any:
        params = self.param_groups()
        if not params:
            raise RuntimeError(f"{type(self).__name__} has no trainable parameters: check the adapter targets")
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = {"scheduler": self.scheduler_factory(optimizer), "interval": self.scheduler_interval}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def calibration_batches(self) -> Iterable[Any] | None:
        """Batches for data-dependent adapter init (CG-LoRA); default: the training loader."""
        trainer = self._trainer
        if trainer is None or trainer.datamodule is None:
            return None
        return trainer.datamodule.train_dataloader()

    def on_fit_start(self) -> None:
        if any(layer.needs_init() for _, layer in adapter_layers(self)):  # not on resume: no loader built for nothing
            from suite.adapters import init_adapters  # only methods with calibration define it

            init_adapters(self, self.calibration_batches(), lambda b: self.compute_losses(_to(b, self.device))["loss"])
        # counted again (calibration or a subclass may have changed what trains); the label a
        # subclass gave its report in __init__ (e.g. the fine-tuning method or the stage) is kept
        method = self.report.method if self.report is not None else (self.adapter.method if self.adapter else "heads only")
        self.report = parameter_report(self, method)
        rank_zero_info(
            f"Parameters: total {self.report.total:,} | trainable {self.report.trainable:,} "
            f"({self.report.percent:.3f} %) | adapted layers {len(self.report.adapted)}"
        )
        if self.logger is not None:
            self.logger.log_hyperparams(
                {"params/total": self.report.total, "params/trainable": self.report.trainable,
                 "params/percent": self.report.percent}
            )

    # --- checkpoints: trainable state only --------------------------------------------------
    def _frozen_parameter_names(self) -> set[str]:
        """Frozen parameters outside adapters (the base weights a checkpoint need not carry)."""
        owned = {
            f"{name}.{k}" for name, layer in adapter_layers(self) for k in layer.adapter_state_dict()
        }
        return {n for n, p in self.named_parameters(remove_duplicate=False) if not p.requires_grad and n not in owned}

    def backbone_fingerprint(self) -> str | None:
        """sha256 over the frozen base weights; saved with adapters, checked when they are loaded."""
        if self._fingerprint is None:
            if any(layer.merged for _, layer in adapter_layers(self)):
                return None  # merged weights are not the base weights
            from suite.quant import is_nf4, nf4_state_bytes

            frozen = self._frozen_parameter_names()
            h = hashlib.sha256()
            for name, p in sorted(self.named_parameters(remove_duplicate=False)):
                if name not in frozen:
                    continue
                if is_nf4(p):  # a 4-bit base (QLoRA): its codes and scales identify it
                    h.update(name.encode())
                    h.update(nf4_state_bytes(p))
                    continue
                if type(p.data) is not torch.Tensor:  # sharded DTensor: no cheap global view
                    return None
                h.update(name.encode())
                h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        frozen = self._frozen_parameter_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
        checkpoint["suite"] = {
            "frozen_keys_dropped": len(frozen),
            "backbone_fingerprint": self.backbone_fingerprint(),
            "resolved": dict(self.resolved),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict", {})
        own = set(self.state_dict())
        expected = own - self._frozen_parameter_names()
        own_state = self.state_dict()
        unexpected = sorted(set(state) - own)
        missing = sorted(expected - set(state))
        misshaped = sorted(f"{k}: saved {tuple(v.shape)}, model {tuple(own_state[k].shape)}" for k, v in state.items()
                           if k in own_state and hasattr(v, "shape") and v.shape != own_state[k].shape)
        if unexpected or missing or misshaped:
            raise _mismatch("the checkpoint", missing, unexpected, misshaped)
        saved = checkpoint.get("suite", {}).get("backbone_fingerprint")
        current = self.backbone_fingerprint()
        if saved and current and saved != current:
            raise BackboneMismatchError(
                f"the frozen backbone differs from the one these adapters were trained on "
                f"(fingerprint {current} != {saved}). Use the same backbone checkpoint and backbone_seed."
            )

    def _store_frozen_for(self, precision: Any) -> None:
        """bf16 training stores the frozen base in bf16; another precision gets fp32 frozen weights back."""
        from suite.precision import LOW_PRECISION, is_bf16, store_frozen

        frozen = self._frozen_parameter_names()
        if is_bf16(precision) and not self.keep_frozen_fp32:
            self.backbone_fingerprint()  # of the weights as built, before they are stored in bf16
            n = store_frozen(self, torch.bfloat16, frozen)
            if n:
                rank_zero_info(f"bf16: {n} frozen weight tensors stored in bf16; adapters, heads and optimiser state stay fp32")
        elif any(p.dtype in LOW_PRECISION for n, p in self.named_parameters() if n in frozen):
            rank_zero_info(f"precision {precision}: frozen weights stored in bf16 by an earlier bf16 run are used in fp32")
            store_frozen(self, torch.float32, frozen)

    def _attention_for(self, precision: Any) -> None:
        """timm attention as explicit products under bf16 on CPU (see :func:`suite.precision.explicit_attention_on_cpu_bf16`)."""
        from suite.precision import explicit_attention_on_cpu_bf16

        device = self.trainer.strategy.root_device.type if self._trainer is not None else self.device.type
        n = explicit_attention_on_cpu_bf16(self, precision, device)
        if n:
            rank_zero_info(f"bf16 on CPU: {n} timm attention layers use explicit products (the CPU SDPA kernel is slower in bf16)")

    # --- FSDP2 ------------------------------------------------------------------------------
    #: extra methods of this module that run the model outside the step methods (a metric or a
    #: sampler called from a hook): under FSDP2 each gathers the parameters as ``forward`` does.
    #: ``training_step`` / ``validation_step`` / ``test_step`` / ``predict_step`` always do.
    fsdp_methods: ClassVar[tuple[str, ...]] = ()
    _STEP_METHODS: ClassVar[tuple[str, ...]] = ("training_step", "validation_step", "test_step", "predict_step")

    def fsdp_units(self) -> list[nn.Module]:
        """Modules sharded as FSDP2 units of their own, innermost first; the rest is the root unit.

        Default: every adapter layer (its trainable weights carry gradients and optimiser state
        in a unit of their own), then the blocks: each entry of every ``nn.ModuleList`` or
        ``nn.Sequential`` whose entries are composite modules of one class (a stack of
        transformer blocks, which their parent calls one by one), outside adapter layers and
        earlier blocks. Mixed sequences (a conv + norm + activation stem whose weights a model
        may read itself) stay in the root. A unit's parameters are gathered only while its own
        ``forward`` runs, so a domain whose code calls a block's methods directly, or reads its
        weights, overrides this to return fewer modules.

        Left out on purpose (they stay in the enclosing block or in the root unit): a candidate
        that shares parameters with a module outside it (a LoRA layer whose frozen base is also
        called on its own, tied embeddings), since FSDP2 gives a parameter to one unit only and
        gathers it only inside that unit's forward.
        """
        adapters = [layer for _, layer in adapter_layers(self)]
        inside = {id(m) for layer in adapters for m in layer.modules()}
        blocks: list[nn.Module] = []

        def visit(module: nn.Module) -> None:
            for child in module.children():
                if id(child) in inside:
                    continue
                entries = list(child) if isinstance(child, (nn.ModuleList, nn.Sequential)) else []
                if entries and len({type(e) for e in entries}) == 1 and next(entries[0].children(), None) is not None:
                    for entry in entries:  # a stack of blocks of one kind
                        if id(entry) not in inside:
                            blocks.append(entry)
                            inside.update(id(m) for m in entry.modules())
                else:
                    visit(child)

        visit(self)
        return [*adapters, *blocks]

    def configure_model(self) -> None:
        # called before every fit / validate / test / predict, so a module that was built wrongly fails before any work
        if not self._adapted:
            raise RuntimeError(f"{type(self).__name__} was given adapter {type(self.adapter).__name__} but never injected it: "
                               "call self.adapt() in __init__, or set adapter_note to refuse specs")
        if not self._started:
            raise RuntimeError(f"{type(self).__name__} was given init_from={self.init_from!r} but never loaded it: "
                               "call self.load_init_from() at the end of __init__")
        from torch.distributed.fsdp import FSDPModule

        if isinstance(self, FSDPModule):  # sharded by an earlier fit / test in this process
            return
        precision = self.trainer.precision if self._trainer is not None else None
        self._store_frozen_for(precision)
        self._attention_for(precision)
        mesh = getattr(self, "device_mesh", None)
        if mesh is None:
            return
        self.backbone_fingerprint()  # of the full frozen weights: once sharded there is no cheap global view
        self._shard(mesh["data_parallel"])

    def _shard(self, mesh: Any) -> None:
        """FSDP2: :meth:`fsdp_units` as units (innermost first), then this module as the root unit.

        The root holds every parameter no unit took (embeddings, heads, norms, small convs) and
        gathers them for the whole of each step method and :attr:`fsdp_methods`, so a domain
        may read them anywhere in its step code (a positional embedding added by hand, a head
        called through a method) and trainable ones among them still have their gradients
        reduced (FSDP2 reduces gradients of the parameters its units manage only).
        """
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        from suite.precision import is_bf16

        # bf16 training: gather parameters in bf16 for compute, reduce gradients in fp32 (the
        # optimiser's master weights and state stay fp32, as under DDP + autocast)
        kw: dict[str, Any] = {"mesh": mesh}
        root_kw: dict[str, Any] = {"mesh": mesh}
        if is_bf16(self.trainer.precision):
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            # the root's "inputs" are the batch: its floats (targets, energies) keep their dtype,
            # as autocast leaves them
            root_kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                                        cast_forward_inputs=False)
        paths: dict[int, list[str]] = {}
        for name, p in self.named_parameters(remove_duplicate=False):
            paths.setdefault(id(p), []).append(name)
        names = {id(m): n for n, m in self.named_modules()}
        units: dict[int, nn.Module] = {}  # chosen before any is sharded (sharding replaces the parameters)
        for unit in self.fsdp_units():
            own = list(unit.parameters())
            if id(unit) in units or unit is self or not own:
                continue
            prefix = names.get(id(unit), "") + "."
            if any(not path.startswith(prefix) for p in own for path in paths[id(p)]):
                continue  # shared with a module outside it: left to the enclosing unit (see fsdp_units)
            units[id(unit)] = unit
        if "mp_policy" in kw:
            # BatchNorm is not autocast: it needs its weights in the dtype of its fp32 running
            # statistics (as without FSDP2, where bf16 storage leaves norms in fp32), so each one
            # outside the chosen units becomes a unit that gathers in its own dtype
            inner = {id(m) for u in units.values() for m in u.modules()}
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in inner and any(True for _ in m.parameters()):
                    units[id(m)] = m
            norm_kw = {"mesh": mesh, "mp_policy": MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)}
        for unit in units.values():
            batch_norm = isinstance(unit, nn.modules.batchnorm._BatchNorm) and "mp_policy" in kw
            fully_shard(unit, reshard_after_forward=True, **(norm_kw if batch_norm else kw))
        fully_shard(self, **root_kw)
        # the root's forward runs inside its step methods, whose gathered parameters stay until
        # the backward: its outputs need no pre-backward hook, so a view among them is harmless
        warnings.filterwarnings("ignore", message=rf"FSDP2-wrapped module \({type(self).__name__}\) returned a view tensor")
        for method in (*self._STEP_METHODS, *self.fsdp_methods):
            if getattr(type(self), method, None) is not getattr(L.LightningModule, method, None):
                register_fsdp_forward_method(self, method)
        # the root is the first unit to run forward; fixed now, so a hook that calls a block
        # directly (say, features in on_fit_start) before the first step does not claim it
        self._get_fsdp_state()._lazy_init()

    def fsdp_reshard(self) -> None:
        """Under FSDP2, free every gathered parameter and put the sharded ones back in place.

        A method in :attr:`fsdp_methods` leaves the root's parameters gathered (FSDP2 keeps a
        root's parameters after forward, for the backward that usually follows); a hook that
        assigns to parameters calls this first (:func:`suite.strategies.assign_`). No-op
        without FSDP2.
        """
        from suite.strategies import force_reshard, fsdp_units_of

        for unit in fsdp_units_of(self):
            force_reshard(unit)


def _batch_size(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0].shape[0]
    if isinstance(batch, dict):
        for v in batch.values():
            if isinstance(v, torch.Tensor) and v.ndim:
                return v.shape[0]
    return None


def _to(batch: Any, device: torch.device) -> Any:
    from lightning.fabric.utilities.apply_func import move_data_to_device

    return move_data_to_device(batch, device)
