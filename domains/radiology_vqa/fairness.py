"""FairLLaVA's mutual-information penalty (CLUB) and the fairness baselines (resampling, group DRO).

**FairLLaVA** (arXiv 2603.26008; reference code ``llava/model/fairness.py`` and
``language_model/llava_llama.py`` of bhosalems/FairLLaVA, ``debiasing_method="mi_club"``,
``fairness_stage="debias"``):

* z: one mid-layer LM hidden state (``hidden_states[int(len(hidden_states) * 0.5)]``, the
  embedding output counted as entry 0, as the reference does) at one image-token position drawn
  uniformly per sample, L2-normalised (:func:`mid_layer`, :func:`sample_image_token`).
* One CLUB estimator per attribute (Cheng et al. 2020, "CLUB: A Contrastive Log-ratio Upper Bound
  of Mutual Information"): a linear classifier q(a|z) (:class:`CLUBCategorical`), and
  MI_a = mean_i log q(a_i|z_i) - mean_{i != j} log q(a_j|z_i).
* loss = w_ce CE + lambda_fair (sum_a lambda_a sqrt(MI_a^2 + 1e-6) + w_club sum_a CE(q(z.detach()), a))
  (:func:`fairllava_loss`): the estimator's parameters are detached in the MI term (its gradient
  reaches only the LM), z is detached in the estimator's own fitting loss. The reference's
  MIMIC-CXR config: age 0.6, sex 0.1, race 0.2, w_ce = w_club = lambda_fair = 1, depth 0.5.

What CLUB estimates: with q equal to the true posterior p(a|z), the population value is
I(A; Z) + E_z KL(p(a) || p(a|z)) >= I(A; Z), equal to it (zero) when A and Z are independent; a
fitted q gives a value near that (tested against the closed form of a Gaussian channel).

**Differences from the reference code** (each deliberate; bugs fixed are marked *fix*):

1. Token sampling takes an explicit ``torch.Generator`` (reproducible, resumable); the reference
   draws ``torch.multinomial`` from the global RNG.
2. *fix*: a sample without image tokens raises; the reference (``_select_mi_mask``) silently falls
   back to every attended token, text and padding-free prompt included, for the whole batch.
3. The negative term is computed from label counts, O(B K): mean_{j != i} log q(a_j|z_i) =
   (sum_k n_k log q(k|z_i) - log q(a_i|z_i)) / (N - 1); the reference builds a B x B x K tensor.
   Same value (tested against the direct double sum).
4. *fix*: with fewer than two labelled samples MI is 0; the reference divides by n(n-1) + 1e-12, so
   a batch of one returns mean log q(a|z) < 0 and sqrt(MI^2) then penalises the estimator's
   confidence instead of any dependence.
5. Negatives can be gathered across DDP ranks (labels only: the negative pairs (z_i, a_j) need the
   other ranks' labels, not their states, so no gradient crosses ranks); the reference uses the
   per-GPU batch (6), which makes the estimate noisy.
6. *fix*: unknown attribute values are -1 and skipped in that attribute's terms; the reference maps
   an unknown sex to class 3 of a 2-class head (an index error on GPU; its collator's comment
   says it "should never get 3") and unknown race to class 7 of its 8 silently.
7. The estimator runs in fp32 (log-softmax of bf16 logits loses the small MI differences); the
   reference casts the whole model, estimators included, to bf16.
8. *fix* (trainer): with label smoothing the reference trainer adds the *detached*, unscaled
   ``loss_mi_total`` to the smoothed loss, so the fairness term has no gradient and lambda_fair is
   ignored; here the loss is one expression.
9. The reference's default ``target_dem`` is ["race", "gender", "race", "handedness"] (race twice,
   age missing); its shipped MIMIC-CXR config sets ["age", "gender", "race"], which we follow.
10. The reference asserts training mode in the fairness branch (an evaluation pass with the term
    on crashes); :func:`fairllava_loss` is a pure function and the model turns it off in validation.
11. The reference can also pool over text or all tokens (``mi_token_mode``, dropping BOS / EOS by
    position, which assumes right padding); its configs use image tokens. Here the mask passed to
    :func:`sample_image_token` decides, so another token set is another mask.

**Baselines**: group-balanced resampling (:func:`group_balanced_weights`,
:class:`GroupBalancedSampler`) and group DRO (:class:`GroupDRO`, Sagawa et al. 2020, ICLR,
"Distributionally Robust Neural Networks for Group Shifts": exponentiated-gradient group weights,
with its optional generalisation adjustment C / sqrt(n_g)). Written here because torch has no
group-DRO loss and its ``WeightedRandomSampler`` has no epoch seed (resumed runs must redraw the
same batches).
"""

from __future__ import annotations

from typing import Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils.data import Sampler


# ---------------------------------------------------------------------------------------------
# z: a mid-layer state at a random image token
def mid_layer(hidden_states: Sequence[torch.Tensor], depth: float = 0.5) -> torch.Tensor:
    """``hidden_states[int(len * depth)]`` of a Hugging Face tuple (entry 0 = embedding output)."""
    if not 0.0 <= depth < 1.0:
        raise ValueError(f"depth must lie in [0, 1), got {depth}")
    return hidden_states[int(len(hidden_states) * depth)]


def sample_image_token(hidden: torch.Tensor, image_mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One image-token state per sample, uniformly among its image tokens, L2-normalised: (B, D).

    ``hidden`` (B, T, D); ``image_mask`` (B, T) true at image-token positions. The draw uses
    ``generator`` (a CPU generator; the indices are moved to ``hidden``'s device).
    """
    if hidden.shape[:2] != image_mask.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and image_mask {tuple(image_mask.shape)} disagree on (B, T)")
    mask = image_mask.bool().cpu()
    counts = mask.sum(1)
    if (counts == 0).any():
        raise ValueError(f"samples {torch.nonzero(counts == 0).flatten().tolist()} have no image token (image_mask all false)")
    pick = (torch.rand(len(counts), generator=generator) * counts).long().clamp_max(counts - 1)  # k-th image token
    pos = (mask.cumsum(1) == (pick + 1)[:, None]) & mask
    index = pos.float().argmax(1).to(hidden.device)
    z = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]
    return F.normalize(z.float(), dim=-1, eps=1e-8)


# ---------------------------------------------------------------------------------------------
# CLUB
def gather_labels(a: torch.Tensor) -> torch.Tensor:
    """All ranks' labels concatenated (padding with -1 for unequal batches); ``a`` itself without DDP."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return a
    n = torch.tensor([a.numel()], device=a.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.full((longest,), -1, dtype=a.dtype, device=a.device)
    padded[: a.numel()] = a
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat(out)


class CLUBCategorical(nn.Module):
    """CLUB upper bound of I(A; Z) for a categorical A and a vector Z, with q(a|z) a linear
    classifier (or a one-hidden-layer MLP when ``hidden`` is set, as the reference allows)."""

    def __init__(self, dim: int, num_classes: int, hidden: int | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.q = nn.Linear(dim, num_classes) if hidden is None else nn.Sequential(
            nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def log_q(self, z: torch.Tensor, detach_params: bool = False) -> torch.Tensor:
        """log q(k | z) for every class k: (B, K), in fp32 (also under autocast, see difference 7)."""
        with torch.autocast(z.device.type, enabled=False):
            if detach_params:  # the estimator as a constant: the gradient reaches z only
                params = {n: p.detach().float() for n, p in self.q.named_parameters()}
                logits = functional_call(self.q, params, (z.float(),))
            else:
                logits = self.q(z.float())
        return logits.float().log_softmax(-1)

    def mi(self, z: torch.Tensor, a: torch.Tensor, detach_params: bool = False, gather: bool = False) -> torch.Tensor:
        """MI estimate: mean_i log q(a_i|z_i) - mean_{i != j} log q(a_j|z_i); labels -1 are skipped.

        With ``gather`` the negatives a_j run over every DDP rank's labels (a no-op without DDP);
        averaged over ranks by DDP's gradient averaging this is the estimate of the global batch.
        """
        valid = a >= 0
        pool = gather_labels(a) if gather else a
        pool = pool[pool >= 0]
        if pool.numel() < 2 or not valid.any():
            return z.sum() * 0.0  # undefined with fewer than two samples (see difference 4)
        logp = self.log_q(z[valid], detach_params)
        own = logp.gather(1, a[valid, None]).squeeze(1)
        counts = torch.bincount(pool, minlength=self.num_classes).to(logp)
        with torch.autocast(z.device.type, enabled=False):  # autocast would run this product in bf16
            negative = (logp @ counts - own) / (pool.numel() - 1)
        return own.mean() - negative.mean()

    def learning_loss(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Fitting loss of q: CE(q(z), a) over labelled samples (call with z.detach())."""
        valid = a >= 0
        if not valid.any():
            return z.sum() * 0.0
        return F.nll_loss(self.log_q(z[valid]), a[valid])


def fairllava_loss(ce: torch.Tensor, z: torch.Tensor, labels: Mapping[str, torch.Tensor],
                   estimators: Mapping[str, CLUBCategorical], weights: Mapping[str, float], w_ce: float = 1.0,
                   lambda_fair: float = 1.0, w_club: float = 1.0, gather: bool = False,
                   eps: float = 1e-6) -> dict[str, torch.Tensor]:
    """w_ce CE + lambda_fair (sum_a lambda_a sqrt(MI_a^2 + eps) + w_club sum_a CE(q_a(z.detach()), a)).

    Returns ``loss`` and its parts (``ce``, ``mi_penalty``, ``club_fit``, ``mi/<a>``, ``club/<a>``),
    parts detached for logging. An attribute with weight 0 contributes its estimator fit only (as
    in the reference, where the MI term is skipped for lambda_a <= 0).
    """
    missing = set(estimators) - set(labels) or set(estimators) - set(weights)
    if missing:
        raise KeyError(f"attributes {sorted(missing)} have an estimator but no labels or weight")
    penalty, fit, out = z.new_zeros(()), z.new_zeros(()), {}
    for name, est in estimators.items():
        a = labels[name].to(z.device).long()
        mi = est.mi(z, a, detach_params=True, gather=gather)
        if weights[name] > 0:
            penalty = penalty + weights[name] * torch.sqrt(mi * mi + eps)
        club = est.learning_loss(z.detach(), a)
        fit = fit + club
        out[f"mi/{name}"], out[f"club/{name}"] = mi.detach(), club.detach()
    loss = w_ce * ce + lambda_fair * (penalty + w_club * fit)
    return {"loss": loss, "ce": ce.detach(), "mi_penalty": penalty.detach(), "club_fit": fit.detach(), **out}


def probe_mi(z_fit: torch.Tensor, a_fit: torch.Tensor, z_eval: torch.Tensor, a_eval: torch.Tensor, num_classes: int,
             l2: float = 1e-2, max_iter: int = 200, seed: int = 0) -> float:
    """A CLUB estimate from a fresh linear q(a|z) fitted (L-BFGS, ridge ``l2`` on the weights) on
    (``z_fit``, ``a_fit``) and evaluated on held-out (``z_eval``, ``a_eval``): the same measurement for
    every model, whether or not it trained CLUB heads of its own. Labels -1 are skipped."""
    keep = a_fit >= 0
    z_fit, a_fit = z_fit[keep].float(), a_fit[keep].long()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        est = CLUBCategorical(z_fit.shape[1], num_classes)
    opt = torch.optim.LBFGS(est.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = est.learning_loss(z_fit, a_fit) + l2 * est.q.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float(est.mi(z_eval.float(), a_eval.long()))


# ---------------------------------------------------------------------------------------------
# baselines
def group_balanced_weights(groups: torch.Tensor) -> torch.Tensor:
    """Sampling weight 1 / (G n_g) per item, so each of the G present groups draws equal mass.
    Items of unknown group (-1) get weight 0: they are never drawn."""
    groups = torch.as_tensor(groups).long()
    known = groups >= 0
    if not known.any():
        raise ValueError("no item has a known group: group-balanced resampling needs group labels")
    counts = torch.bincount(groups[known])
    present = int((counts > 0).sum())
    w = torch.zeros(len(groups), dtype=torch.float64)
    w[known] = 1.0 / (present * counts[groups[known]].double())
    return w


class GroupBalancedSampler(Sampler[int]):
    """Draws ``num_samples`` (default: the dataset size) indices with replacement by ``weights``;
    the order depends on (seed, epoch) only, like ``suite.data.EpochSeededSampler``."""

    def __init__(self, weights: torch.Tensor, num_samples: int | None = None, seed: int = 0) -> None:
        self.weights, self.seed, self.epoch = torch.as_tensor(weights, dtype=torch.float64), seed, 0
        self.num_samples = num_samples or len(self.weights)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.multinomial(self.weights, self.num_samples, replacement=True, generator=g).tolist())

    def __len__(self) -> int:
        return self.num_samples


class GroupDRO(nn.Module):
    """Online group DRO (Sagawa et al. 2020, Algorithm 1): q_g <- q_g exp(eta (L_g + C / sqrt(n_g))),
    renormalised, then loss = sum_g q_g L_g. A group absent from a batch has L_g = 0 there, as in the
    authors' code. Under DDP the group losses that update
    q are summed over ranks, so q stays identical everywhere; q is a buffer (saved in checkpoints)."""

    def __init__(self, num_groups: int, step_size: float = 0.01, adjustment: float = 0.0,
                 group_counts: Sequence[int] | None = None) -> None:
        super().__init__()
        self.step_size, self.adjustment = step_size, adjustment
        self.register_buffer("q", torch.full((num_groups,), 1.0 / num_groups))
        counts = torch.as_tensor(group_counts if group_counts is not None else [1] * num_groups, dtype=torch.float32)
        self.register_buffer("adjust", adjustment / counts.clamp_min(1).sqrt(), persistent=False)

    def group_losses(self, losses: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean loss and item count per group in this batch (items of group -1 are skipped)."""
        valid = groups >= 0
        g, item = groups[valid].long(), losses[valid]
        total = torch.zeros_like(self.q, dtype=losses.dtype).index_add(0, g, item)
        count = torch.zeros_like(self.q, dtype=losses.dtype).index_add(0, g, torch.ones_like(item))
        return total / count.clamp_min(1), count

    def forward(self, losses: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(robust loss, group mean losses) from per-item losses (B,) and group ids (B,)."""
        mean, count = self.group_losses(losses, groups)
        if self.training:
            with torch.no_grad():
                total, n = mean.detach() * count, count.clone()
                if dist.is_available() and dist.is_initialized():
                    dist.all_reduce(total)
                    dist.all_reduce(n)
                step = total / n.clamp_min(1) + self.adjust.to(total)
                q = self.q * torch.exp(self.step_size * step.to(self.q))
                self.q.copy_(q / q.sum())
        return (self.q.to(mean) * mean).sum(), mean.detach()
