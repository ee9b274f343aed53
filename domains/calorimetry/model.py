"""FM4CAL (arXiv 2603.28804): an autoregressive shower model that grows by experts and LoRA.

The network (``network.py``) is a causal transformer over energy-ordered hits, each a voxel
token plus an energy token, with one feed-forward expert per class (``<material>_<particle>``)
behind a label-masked router and heads per particle: ours (``architecture: ours``) or the
reference's ``ECAL_GPT`` (``architecture: fm4cal``). This module is its Lightning side: the
losses, the lifecycle of extensions, generation (``network.py``), and the shower metrics (ours
and the reference's, ``metrics.py``).

The lifecycle (each step one YAML of ``domains/calorimetry/lifecycle.yaml``):

1. pretrain on W and Ta photons (everything trains);
2. add Pb photons: a new expert per block cloned from ``closest_expert`` (Ta, the reference's
   choice); only it trains;
3. add electrons: rsLoRA on attention q/k/v/out used by electron rows only, electron heads
   copied from the photon heads, and a new expert (from W photons); only those train;
4. add Ta electrons (expert from W electrons) and Pb electrons (from Ta electrons).

No forgetting is exact: every old class takes the same arithmetic on the same tensors as before
(its own expert, the frozen attention, its own heads), so its outputs are bit-identical. The
module checks this with ``torch.equal`` when it extends and again at the end of each fit.

Each stage's ``init_from`` is the previous stage's ``last.ckpt``. A checkpoint holds only what
that stage trained, so the shared lifecycle (``AdaptedModule.load_init_from``) first rebuilds the
previous stage from *its* checkpoint (whose hyperparameters name its own ``init_from``,
recursively) and this model's :meth:`CaloShowerModel.extend_from` then extends it; ``test
--ckpt_path`` on a later stage therefore works from the stage checkpoints alone.

Reference bugs fixed: ``fine_tune.py`` imported a non-existent ``models/losses.py`` (every
stage here is importable from YAML, tested); the new router row was copied from the *last*
expert instead of the closest (see ``suite.adapters.moe``); de-tokenisation one bin too high
and hard-coded Ta/Pb electron hit shifts (see ``data.py``); ``F.mse`` (no such function) in
the MoE balance loss, and experts sized for the config's six classes while pretraining on two
(our experts are one per trained class, added one at a time). The reference's PiSSA helper
sliced columns of V (``V[:, :r]``) where the top-r right singular vectors are rows of V^T
(``Vh[:r]``) from ``torch.linalg.svd``; we do not use PiSSA: our LoRA starts from B = 0 with a
Kaiming-uniform A (PEFT's default), which needs no SVD, so that mistake cannot arise.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from suite.adapters import LoRA
from suite.adapters.core import parameter_report
from suite.module import AdaptedModule

from .data import Geometry, ShowerTokenizer, parse_class, write_calochallenge
from .metrics import compare, reference_metrics
from .network import ARCHITECTURES, PROJECTIONS, REFERENCE_SAMPLING, Sampling, draw

#: hyperparameters that fix the architecture; a stage must use its init_from's values
ARCHITECTURE = ("architecture", "grid", "energy_bins", "energy_spacing", "threshold_mev", "e_max_mev", "width", "depth",
                "heads", "ffn_mult", "rope_theta", "backbone_seed")
#: sampling presets: ours (constraints on) and FM4CAL's (see network.py)
SAMPLING_PRESETS = {"ours": Sampling(), "reference": REFERENCE_SAMPLING}


class CaloShowerModel(AdaptedModule):
    """The FM4CAL shower model and its lifecycle stages (see the module docstring).

    Args:
        architecture: ``"ours"`` or ``"fm4cal"`` (the reference's network; see ``network.py``).
        grid: voxels per (layer, a, b), linked from the data (``data.init_args.grid``). Reference: 30 x 30 x 30.
        energy_bins, energy_spacing, threshold_mev, e_max_mev: deposit bins (``"log"`` or the
            reference's ``"linear"``) from the readout threshold (linked from
            ``data.init_args.threshold_mev``: the lowest deposit that is a hit) to e_max.
        width, depth, heads, ffn_mult: transformer size (CPU default 64 / 2 / 4 / 2; reference
            256 / 3 / 8 / 2, its depth counting the cross-attention block).
        rope_theta: rotary base (1000 as in the reference: sequences are short).
        classes: pretraining classes (with ``init_from`` the checkpoint's classes are used).
        add_class: this stage's new class, e.g. ``Pb_photon``; needs ``init_from``.
        closest_expert: class (``W_photon``) or material (``W``: same particle if known, else the
            base particle) whose expert the new one is cloned from.
        lora_r, lora_alpha: rsLoRA (scale alpha / sqrt(r)) for a new particle. Reference r=128, alpha=32.
        finetune: ``"peft"`` (the lifecycle) or ``"full"`` (baseline: new class heads and expert,
            no LoRA, and *every* weight trains; forgetting is then possible and measured).
        head_weight_decay: weight decay of the particle heads in their own optimiser group, the
            rest at the optimiser's own (the reference fine-tunes with 0.1 on its heads, 0 else).
        max_hits: longest generated shower.
        sampling: generation options (:class:`~domains.calorimetry.network.Sampling` fields),
            optionally ``preset: reference`` (FM4CAL's: dynamic temperature, stop on either end
            token, no constraints) with overrides; default ours (constraints on).
        init_from: the previous stage's checkpoint (the stage runner passes it; an AdaptedModule argument).
        output_dir: where ``predict`` writes, per class, ``<class>_generated.hdf5`` and
            ``<class>_reference.hdf5`` (CaloChallenge layout) and two PNGs (default
            ``<default_root_dir>/predictions``).
    """

    #: the no-forgetting check compares old classes' outputs bit for bit with their fp32 values
    keep_frozen_fp32 = True
    #: FSDP2 (AdaptedModule.fsdp_units): the blocks are units, everything else (embeddings, heads,
    #: whose methods the model calls directly) is the root unit; ``logits`` also runs from hooks
    #: (the no-forgetting probe in on_fit_end), so it gathers the parameters as a step does. The
    #: rsLoRA layers share their frozen base with the base particle's path, so they stay inside
    #: their block's unit.
    fsdp_methods = ("logits",)
    adapter_note = ("the shower model grows by stages instead: add_class adds an expert per block cloned from "
                    "closest_expert and, for a new particle, rsLoRA on attention (lora_r, lora_alpha)")

    def __init__(
        self,
        architecture: str = "ours",
        grid: list[int] = [8, 6, 6],  # noqa: B006 - jsonargparse reads literal defaults
        energy_bins: int = 64,
        energy_spacing: str = "log",
        threshold_mev: float = 50.0,
        e_max_mev: float = 1.2e5,  # above the hottest voxel of a 100 GeV shower
        width: int = 64,
        depth: int = 2,
        heads: int = 4,
        ffn_mult: int = 2,
        dropout: float = 0.0,
        rope_theta: float = 1000.0,
        classes: list[str] = ["W_photon", "Ta_photon"],  # noqa: B006
        add_class: str | None = None,
        closest_expert: str | None = None,
        lora_r: int = 8,
        lora_alpha: float = 8.0,  # 8 / sqrt(8) = 2.83, the reference's 32 / sqrt(128)
        finetune: str = "peft",
        head_weight_decay: float | None = None,
        max_hits: int = 128,
        sampling: dict[str, Any] | None = None,
        output_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if finetune not in ("peft", "full"):
            raise ValueError(f"finetune must be 'peft' or 'full', got {finetune!r}")
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {sorted(ARCHITECTURES)}, got {architecture!r}")
        self.tokenizer = ShowerTokenizer(int(np.prod(grid)), threshold_mev, e_max_mev, energy_bins, energy_spacing)
        self.grid = tuple(grid)
        self.max_hits, self.sampling = max_hits, self._sampling(sampling)
        self.head_weight_decay = head_weight_decay
        self.scheduler_interval = "epoch"  # a scheduler's milestones are epochs (the reference's MultiStepLR)
        self.output_dir = output_dir
        self.add_class, self.closest_expert, self.finetune = add_class, closest_expert, finetune
        self.lora_r, self.lora_alpha = lora_r, lora_alpha
        self.added: list[str] = []
        self.old_classes: list[str] = []
        self._probe: torch.Tensor | None = None
        if self.init_from is None:
            if add_class is not None:
                raise ValueError("add_class extends an earlier stage: also give init_from=<its last.ckpt>")
            particles = {parse_class(c)[1] for c in classes}
            if len(particles) != 1:
                raise ValueError(f"pretraining classes must share one particle (the base), got {classes}")
            with self.seeded():
                self.backbone = ARCHITECTURES[architecture](self.tokenizer, self.grid, width, depth, heads, ffn_mult,
                                                            list(classes), particles.pop(), rope_theta, dropout)
            self.stage = "pretrain"
        self.load_init_from()  # a later stage: rebuild the earlier one and extend it (extend_from)
        self.report = parameter_report(self, self.stage)

    @staticmethod
    def _sampling(options: dict[str, Any] | None) -> Sampling:
        options = dict(options or {})
        preset = options.pop("preset", "ours")
        if preset not in SAMPLING_PRESETS:
            raise ValueError(f"sampling preset must be one of {sorted(SAMPLING_PRESETS)}, got {preset!r}")
        if "temperature_range" in options:
            options["temperature_range"] = tuple(options["temperature_range"])
        try:
            return dataclasses.replace(SAMPLING_PRESETS[preset], **options)
        except TypeError as e:
            raise ValueError(f"sampling: {e}; the options are {[f.name for f in dataclasses.fields(Sampling)]} and preset") from e

    def param_groups(self) -> list[dict[str, Any]] | list[torch.nn.Parameter]:
        """With ``head_weight_decay``: the particle heads in a group of their own with that decay."""
        params = self.trainable_parameters()
        if self.head_weight_decay is None:
            return params
        heads = {id(p) for p in self.backbone.heads.parameters()}
        groups = [{"params": [p for p in params if id(p) in heads], "weight_decay": self.head_weight_decay},
                  {"params": [p for p in params if id(p) not in heads]}]
        return [g for g in groups if g["params"]]

    # --- lifecycle: extend the earlier stage --------------------------------------------------
    def extend_from(self, earlier: "CaloShowerModel") -> None:
        """Take the earlier stage's network and, with ``add_class``, grow it by that class."""
        diff = {k: (self.hparams[k], earlier.hparams.get(k)) for k in ARCHITECTURE if self.hparams[k] != earlier.hparams.get(k)}
        if diff:
            raise ValueError(f"architecture differs from init_from {self.init_from} (this, checkpoint): {diff}")
        self.backbone = earlier.backbone
        self.added = list(earlier.added)
        self.stage = f"add {self.add_class}" if self.add_class else "continue"
        self.old_classes = list(self.backbone.classes)
        self._probe = self._probe_outputs(self.old_classes)
        if self.add_class is None:
            self.backbone.requires_grad_(False)
            return
        source = self._resolve_source(self.add_class, self.closest_expert)
        peft = self.finetune == "peft"
        lora = LoRA(r=self.lora_r, alpha=self.lora_alpha, rslora=True, targets=list(PROJECTIONS)) if peft else None
        with self.seeded(self.backbone_seed + len(self.backbone.classes)):
            self.added += self.backbone.add_class(self.add_class, source, lora)
        if not peft:
            self.backbone.requires_grad_(True)
        elif not self.outputs_unchanged():
            raise RuntimeError(f"adding {self.add_class} changed the outputs of {self.old_classes}; this is a bug")

    # --- lifecycle helpers --------------------------------------------------------------------
    def _resolve_source(self, new: str, closest: str | None) -> str:
        known = self.backbone.classes
        if new in known:
            raise ValueError(f"class {new!r} already exists ({known})")
        if closest is None:
            raise ValueError(f"adding {new}: set closest_expert (a class or material among {known})")
        if closest in known:
            return closest
        _, particle = parse_class(new)
        base = parse_class(known[0])[1]
        for cand in (f"{closest}_{particle}", f"{closest}_{base}"):
            if cand in known:
                return cand
        raise ValueError(f"closest_expert {closest!r} matches no known class in {known}")

    @torch.no_grad()
    def _probe_outputs(self, classes: list[str]) -> torch.Tensor | None:
        """Logits of a fixed random batch of ``classes`` (eval mode): the no-forgetting witness."""
        if not classes:
            return None
        g = torch.Generator().manual_seed(1234)
        labels = [c for c in classes for _ in range(2)]
        n, tok = len(labels), self.tokenizer
        dev = next(self.backbone.parameters()).device
        probe = {
            "voxels": torch.randint(0, tok.n_voxels, (n, 12), generator=g).to(dev),
            "energies": tok.energies(torch.randint(1, tok.n_bins + 1, (n, 12), generator=g)).to(dev),
            "n_hits": torch.full((n,), 12, device=dev),
            "incident_energy": torch.exp(torch.empty(n).uniform_(math.log(1e4), math.log(1e5), generator=g)).to(dev),
            "label": labels,
        }
        was = self.training
        self.eval()
        s_logits, e_logits, _, _ = self.logits(probe)
        self.fsdp_reshard()  # FSDP2: no gathered copy left behind by a call outside a step
        self.train(was)
        return torch.cat([s_logits, e_logits], -1).cpu()

    def outputs_unchanged(self) -> bool | None:
        """True if the old classes' outputs are bit-identical to those before this stage (None: no old classes)."""
        if self._probe is None:
            return None
        return torch.equal(self._probe_outputs(self.old_classes), self._probe)

    def route(self, labels: list[str]) -> tuple[torch.Tensor, list[str]]:
        """Class names -> expert label ids and particles, with a clear error for unknown classes."""
        return self.backbone.blocks[0].moe.label_ids(labels), [parse_class(c)[1] for c in labels]

    # --- training ---------------------------------------------------------------------------
    def _sequences(self, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        tok = self.tokenizer
        voxels, n = batch["voxels"], batch["n_hits"]
        space = tok.space_tokens(voxels)
        energy = tok.energy_tokens(batch["energies"], voxels >= 0)
        rows = torch.arange(len(n), device=n.device)
        s_tgt = F.pad(space, (0, 1), value=tok.space_pad)
        s_tgt[rows, n] = tok.space_end
        e_tgt = F.pad(energy, (0, 1), value=tok.energy_pad)
        e_tgt[rows, n] = tok.energy_end  # as the reference: the energy head learns the end too (stop_on="either")
        return space, energy, s_tgt, e_tgt

    def logits(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Space and energy logits (B, L + 1, vocab) with their targets (teacher forcing)."""
        space, energy, s_tgt, e_tgt = self._sequences(batch)
        ids, particles = self.route(batch["label"])
        net = self.backbone
        h = net.hidden(space, energy, batch["incident_energy"], ids.to(space.device), particles)
        s_logits = net.per_particle(particles, lambda hd: hd.space_logits(h))
        e_logits = net.per_particle(particles, lambda hd: hd.energy_logits(h, s_tgt))
        return s_logits, e_logits, s_tgt, e_tgt

    def token_nll(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Per-token NLL of the space and energy targets (B, L + 1; 0 where ignored) and per-sample NLL per hit."""
        s_logits, e_logits, s_tgt, e_tgt = self.logits(batch)
        tok = self.tokenizer
        nll_s = F.cross_entropy(s_logits.transpose(1, 2), s_tgt, ignore_index=tok.space_pad, reduction="none")
        nll_e = F.cross_entropy(e_logits.transpose(1, 2), e_tgt, ignore_index=tok.energy_pad, reduction="none")
        return {
            "space": nll_s, "energy": nll_e,
            "n_space": (s_tgt != tok.space_pad).sum(), "n_energy": (e_tgt != tok.energy_pad).sum(),
            "per_sample": (nll_s.sum(1) + nll_e.sum(1)) / (batch["n_hits"] + 1),
        }

    def compute_losses(self, batch: dict[str, Any], nll: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Mean NLL per space token plus mean NLL per energy token (``nll``: :meth:`token_nll` of ``batch``, if computed)."""
        nll = self.token_nll(batch) if nll is None else nll
        space = nll["space"].sum() / nll["n_space"]
        energy = nll["energy"].sum() / nll["n_energy"].clamp_min(1)
        return {"loss": space + energy, "nll_space": space, "nll_energy": energy}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        nll = self.token_nll(batch)
        n = len(batch["label"])
        self.log("val/loss", self.compute_losses(batch, nll)["loss"], prog_bar=True, batch_size=n, sync_dist=True)
        self._log_per_class("val", batch["label"], nll["per_sample"])

    def _log_per_class(self, split: str, labels: list[str], per_sample: torch.Tensor) -> None:
        for cls in dict.fromkeys(labels):
            rows = torch.tensor([c == cls for c in labels], device=per_sample.device)
            self.log(f"{split}/{cls}/nll", per_sample[rows].mean(), batch_size=int(rows.sum()), sync_dist=True)

    # --- generation -------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, incident_mev: torch.Tensor, labels: list[str], temperature: float | None = None,
                 max_hits: int | None = None, generator: torch.Generator | None = None,
                 sampling: Sampling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample showers autoregressively: (space, energy) token sequences (B, <= max_hits + 1).

        Keys and values of earlier hits are cached, so each step costs one position, not the sequence.
        Each step draws the voxel, then its energy, with ``sampling`` (default: the model's; a
        ``temperature`` given here overrides its temperature). Start and pad tokens are never
        drawn and a sequence ends by ``max_hits``; with ``unique_voxels`` a voxel is hit at most
        once, with ``monotone_energy`` energies do not rise, and with ``stop_on="either"`` an
        energy end token also ends the sequence (the reference's rule).
        """
        net, tok = self.backbone, self.tokenizer
        cfg = self.sampling if sampling is None else sampling
        if temperature is not None:
            cfg = dataclasses.replace(cfg, temperature=temperature, dynamic_temperature=False)
        max_hits = self.max_hits if max_hits is None else max_hits
        dev = incident_mev.device
        ids, particles = self.route(labels)
        ids = ids.to(dev)
        b = len(labels)
        rows = torch.arange(b, device=dev)
        space = torch.zeros(b, 0, dtype=torch.long, device=dev)
        energy = torch.zeros(b, 0, dtype=torch.long, device=dev)
        banned = torch.zeros(b, tok.space_vocab, dtype=torch.bool, device=dev)
        banned[:, [tok.START, tok.space_pad]] = True
        e_allowed = torch.arange(tok.energy_vocab, device=dev)
        e_special = (e_allowed == tok.START) | (e_allowed == tok.energy_pad) | ((e_allowed == tok.energy_end) & (cfg.stop_on == "space"))
        ceiling = torch.full((b,), tok.n_bins, device=dev)
        done = torch.zeros(b, dtype=torch.bool, device=dev)

        caches: list[dict] = [{} for _ in net.blocks]
        x = net.embed_condition(incident_mev)
        for step in range(max_hits + 1):
            h = net.run(x, ids, particles, caches)[:, -1]
            s_logits = net.per_particle(particles, lambda hd: hd.space_logits(h)).masked_fill(banned, -math.inf)
            if step == max_hits:
                s_logits = torch.full_like(s_logits, -math.inf).index_fill_(1, torch.tensor([tok.space_end], device=dev), 0.0)
            s = torch.where(done, tok.space_pad, draw(s_logits, cfg, step, max_hits + 1, generator))
            # energies above the last one are barred (monotone); the end token stays allowed under stop_on="either"
            e_mask = e_special[None] | (cfg.monotone_energy & (e_allowed[None] > ceiling[:, None]) & (e_allowed[None] != tok.energy_end))
            e_logits = net.per_particle(particles, lambda hd: hd.energy_logits(h, s)).masked_fill(e_mask, -math.inf)
            e = draw(e_logits, cfg, step, max_hits + 1, generator)
            ends = ~done & ((s == tok.space_end) | (e == tok.energy_end))
            s = torch.where(ends, tok.space_end, s)
            is_hit = ~done & ~ends
            e = torch.where(is_hit, e, tok.energy_pad)
            if cfg.unique_voxels:
                banned[rows[is_hit], s[is_hit]] = True
            ceiling = torch.where(is_hit, e, ceiling)
            done |= ends
            space, energy = torch.cat([space, s[:, None]], 1), torch.cat([energy, e[:, None]], 1)
            if done.all():
                break
            x = net.embed_hits(s[:, None], e[:, None])
        return space, energy

    def generate_showers(self, incident_mev: torch.Tensor, labels: list[str], generator: torch.Generator | None = None) -> torch.Tensor:
        """Generated voxel energies (B, n_voxels) [MeV], deposits drawn within their energy bins."""
        space, energy = self.generate(incident_mev, labels, generator=generator)
        return self.tokenizer.dense(space, energy, generator)

    def reference_showers(self, batch: dict[str, Any]) -> torch.Tensor:
        """The batch's own showers as voxel energies (B, n_voxels) [MeV]."""
        v = batch["voxels"]
        out = torch.zeros(v.shape[0], self.tokenizer.n_voxels, device=v.device)
        keep = v >= 0
        return out.index_put_((keep.nonzero(as_tuple=True)[0], v[keep]), batch["energies"][keep].float(), accumulate=True)

    # --- evaluation ---------------------------------------------------------------------------
    def geometry(self) -> Geometry:
        dm = self._trainer.datamodule if self._trainer is not None else None
        return getattr(dm, "geometry", None) or Geometry(self.grid)

    def setup(self, stage: str) -> None:
        # grid and threshold are linked from the data (suite.cli), so only the classes can disagree
        dm = self.trainer.datamodule
        if dm is None:
            return
        unknown = sorted(set(getattr(dm, "classes", []) + getattr(dm, "eval_classes", [])) - set(self.backbone.classes))
        if unknown:
            raise ValueError(f"data classes {unknown} unknown to the model ({self.backbone.classes}); add them with add_class")

    def on_test_epoch_start(self) -> None:
        self._collected: dict[str, dict[str, list]] = {}
        self._generators: dict[str, torch.Generator] = {}

    def _collect(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        # each class is sampled on its own rows with its own seeded generator, so an old class's
        # generated showers do not depend on which other classes share the test set
        labels = batch["label"]
        gen = torch.zeros(len(labels), self.tokenizer.n_voxels, device=self.device)
        for cls in dict.fromkeys(labels):
            rows = torch.tensor([i for i, c in enumerate(labels) if c == cls], device=self.device)
            g = self._generators.setdefault(cls, torch.Generator(device=self.device).manual_seed(zlib.crc32(cls.encode())))
            gen[rows] = self.generate_showers(batch["incident_energy"][rows], [cls] * len(rows), g)
        ref = self.reference_showers(batch)
        for i, cls in enumerate(batch["label"]):
            d = self._collected.setdefault(cls, {"gen": [], "ref": [], "inc": []})
            d["gen"].append(gen[i].cpu().numpy())
            d["ref"].append(ref[i].cpu().numpy())
            d["inc"].append(float(batch["incident_energy"][i]))
        return {"generated": gen, "reference": ref}

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        nll = self.token_nll(batch)
        self.log("test/loss", self.compute_losses(batch, nll)["loss"], batch_size=len(batch["label"]), sync_dist=True)
        self._log_per_class("test", batch["label"], nll["per_sample"])
        self._collect(batch)

    def class_metrics(self) -> dict[str, dict[str, float]]:
        """Separation power / KL per observable and classifier AUC for every collected class."""
        out = {}
        for cls, d in self._collected.items():
            inc = np.asarray(d["inc"])
            out[cls] = compare(np.stack(d["ref"]), np.stack(d["gen"]), inc, inc, self.geometry())
        return out

    def reference_class_metrics(self) -> dict[str, dict[str, float]]:
        """FM4CAL's W1 and quantile KL per observable for every collected class (10 quantile bins:
        our test sets hold ~100 showers per class, the reference's 10,000)."""
        geo = self.geometry()
        return {cls: reference_metrics(np.stack(d["ref"]), np.stack(d["gen"]), geo, n_bins=10) for cls, d in self._collected.items()}

    def on_test_epoch_end(self) -> None:
        for cls, m in self.class_metrics().items():
            for k in ("sep_mean", "kl_mean", "auc", "sep/e_ratio", "sep/n_hits", "sep/longitudinal", "sep/lateral"):
                self.log(f"test/{cls}/{k}", m[k])
        for cls, m in self.reference_class_metrics().items():
            for k in ("kl_mean", "w1/energy_sum", "w1/n_hits", "w1/cog_z", "kl/cell_energy"):
                self.log(f"test/{cls}/fm4cal/{k}", m[k])
        unchanged = self.outputs_unchanged()
        if unchanged is not None:
            self.log("test/no_forgetting", float(unchanged))

    def on_predict_epoch_start(self) -> None:
        self.on_test_epoch_start()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._collect(batch)

    def on_predict_epoch_end(self) -> None:
        from .metrics import layer_images, observable_histograms

        root = Path(self.output_dir or Path(self.trainer.default_root_dir) / "predictions")
        root.mkdir(parents=True, exist_ok=True)
        geo = self.geometry()
        for cls, d in self._collected.items():
            gen, ref, inc = np.stack(d["gen"]), np.stack(d["ref"]), np.asarray(d["inc"])
            material, particle = parse_class(cls)
            attrs = {"material": material, "particle": particle}
            write_calochallenge(root / f"{cls}_generated.hdf5", inc, gen, attrs)
            write_calochallenge(root / f"{cls}_reference.hdf5", inc, ref, attrs)
            layer_images(ref, gen, geo, root / f"{cls}_layers.png", cls)
            observable_histograms(ref, gen, inc, inc, geo, root / f"{cls}_observables.png", cls)
        rank_zero_info(f"calorimetry: generated showers and plots for {sorted(self._collected)} in {root}")

    # --- reporting --------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        super().on_fit_start()
        rank_zero_info(f"calorimetry stage '{self.stage}': classes {self.backbone.classes}; added so far: {self.added}")

    def on_fit_end(self) -> None:
        unchanged = self.outputs_unchanged()
        self.no_forgetting = unchanged
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")}
        lines = [f"calorimetry '{self.stage}': trainable {self.report.trainable:,} / {self.report.total:,} parameters"]
        if unchanged is not None:
            lines.append(f"old classes {self.old_classes} bit-identical after training: {unchanged}")
        lines += [f"  {k:<28} {v:.4f}" for k, v in sorted(metrics.items())]
        rank_zero_info("\n".join(lines))
