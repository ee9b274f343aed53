"""Calorimetry benchmark: the FM4CAL lifecycle vs from-scratch models per class and full fine-tuning.

    python benchmarks/calorimetry.py [--seeds 0 1 2] [--pretrain-epochs 15] [--stage-epochs 10]

On generated showers (the embedded GFlash-style generator, 800 per class, 70/15/15 split), for
every seed:

- lifecycle (PEFT): pretrain W+Ta photons -> +Pb photons (expert cloned from W) -> +W electrons
  (rsLoRA r=8 on q/k/v/out, electron heads, expert) -> +Ta electrons -> +Pb electrons (experts);
  after every stage all known classes are evaluated, and the earlier classes' logits on their
  test showers *and* their sampled showers (same sampling seed) are compared with torch.equal;
- from scratch: one separate model per new class, trained on that class alone for the same
  number of epochs as its lifecycle stage (the cost PEFT avoids: a whole model per class);
- full fine-tuning for the new particle: from the +Pb model, W electrons with every weight
  trainable (no LoRA), same epochs; then the photon classes are re-evaluated.

Metrics per (material, particle) on the test split: NLL per hit (teacher forcing) and, for
showers generated at the test showers' incident energies (temperature 1), the mean separation
power over the observables and profiles and a logistic-regression AUC on the observables
(0.5 = indistinguishable). Mean +- std over seeds. Trainable parameters per stage.

Budget: 3 seeds take ~20 min on 2 busy cores (one intra-op thread, which is faster than two on a
shared machine); the goal is < 45 min.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from domains.calorimetry.data import CaloShowerData, collate_showers  # noqa: E402
from domains.calorimetry.metrics import compare  # noqa: E402
from domains.calorimetry.model import CaloShowerModel  # noqa: E402

ALL = ["W_photon", "Ta_photon", "Pb_photon", "W_electron", "Ta_electron", "Pb_electron"]
STAGES = [("+Pb photon", "Pb_photon"), ("+W electron", "W_electron"), ("+Ta electron", "Ta_electron"), ("+Pb electron", "Pb_electron")]
MODEL = dict(grid=[8, 6, 6], energy_bins=64, threshold_mev=50.0, e_max_mev=1.2e5, width=64, depth=2, heads=4, ffn_mult=2,
             lora_r=8, lora_alpha=8.0, max_hits=128)
DATA = dict(grid=[8, 6, 6], layer_mm=10.0, cell_mm=7.0, n_per_class=800, threshold_mev=50.0, max_hits=128, batch_size=32)


def optimizer(params):
    return torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)


def fit(model: CaloShowerModel, classes: list[str], epochs: int, seed: int, ckpt: Path) -> float:
    L.seed_everything(seed, verbose=False)
    dm = CaloShowerData(classes=classes, seed=0, **DATA)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    t = time.time()
    trainer.fit(model, dm)
    trainer.save_checkpoint(ckpt)
    return time.time() - t


def test_batches(classes: list[str]) -> dict[str, dict]:
    dm = CaloShowerData(classes=classes, seed=0, **DATA)
    dm.setup()
    ds = dm.splits["test"]
    return {c: collate_showers([ds[i] for i in range(len(ds)) if ds.items[i][3] == c]) for c in classes}


@torch.no_grad()
def evaluate(model: CaloShowerModel, batches: dict[str, dict], classes: list[str]) -> tuple[dict, dict]:
    """Per class: metrics, and (logits, sampled tokens) for the no-forgetting comparison."""
    model.eval()
    out, witness = {}, {}
    for cls in classes:
        b = batches[cls]
        s_logits, e_logits, _, _ = model.logits(b)
        nll = float(model.token_nll(b)["per_sample"].mean())
        tokens = model.generate(b["incident_energy"], b["label"], generator=torch.Generator().manual_seed(7))
        gen = model.tokenizer.dense(*tokens, torch.Generator().manual_seed(8)).numpy()
        ref = model.reference_showers(b).numpy()
        inc = b["incident_energy"].numpy()
        m = compare(ref, gen, inc, inc, model.geometry())
        out[cls] = {"nll": nll, "sep": m["sep_mean"], "auc": m["auc"]}
        witness[cls] = (torch.cat([s_logits, e_logits], -1), tokens)
    return out, witness


def identical(before: dict, after: dict) -> bool:
    return all(torch.equal(before[c][0], after[c][0]) and all(torch.equal(x, y) for x, y in zip(before[c][1], after[c][1])) for c in before)


def run_seed(seed: int, work: Path, batches: dict, pre_epochs: int, stage_epochs: int) -> list[dict]:
    rows = []
    ckpt = work / f"s{seed}_pretrain.ckpt"
    model = CaloShowerModel(**MODEL, classes=["W_photon", "Ta_photon"], backbone_seed=seed, optimizer=optimizer)
    secs = fit(model, ["W_photon", "Ta_photon"], pre_epochs, seed, ckpt)
    metrics, witness = evaluate(model, batches, model.backbone.classes)
    rows += [dict(method="lifecycle", stage="pretrain W+Ta photon", cls=c, trainable=model.report.trainable,
                  total=model.report.total, same=None, secs=secs, **metrics[c]) for c in metrics]
    prev = ckpt
    after_pb = None
    for name, new in STAGES:
        ckpt = work / f"s{seed}_{new}.ckpt"
        model = CaloShowerModel(**MODEL, init_from=str(prev), add_class=new, closest_expert="W", backbone_seed=seed, optimizer=optimizer)
        secs = fit(model, [new], stage_epochs, seed, ckpt)
        metrics, now = evaluate(model, batches, model.backbone.classes)
        same = identical(witness, {c: now[c] for c in witness})
        rows += [dict(method="lifecycle", stage=name, cls=c, trainable=model.report.trainable, total=model.report.total,
                      same=same if c != new else None, secs=secs, **metrics[c]) for c in metrics]
        witness, prev = now, ckpt
        if new == "Pb_photon":
            after_pb = (ckpt, {c: now[c] for c in now})
        # the baseline: a separate model trained on this class alone
        scratch = CaloShowerModel(**MODEL, classes=[new], backbone_seed=seed, optimizer=optimizer)
        secs = fit(scratch, [new], stage_epochs, seed, work / f"s{seed}_scratch_{new}.ckpt")
        m, _ = evaluate(scratch, batches, [new])
        rows.append(dict(method="from scratch", stage=name, cls=new, trainable=scratch.report.trainable,
                         total=scratch.report.total, same=None, secs=secs, **m[new]))
    # full fine-tuning for the new particle, from the +Pb model
    full = CaloShowerModel(**MODEL, init_from=str(after_pb[0]), add_class="W_electron", closest_expert="W",
                           finetune="full", backbone_seed=seed, optimizer=optimizer)
    secs = fit(full, ["W_electron"], stage_epochs, seed, work / f"s{seed}_full.ckpt")
    metrics, now = evaluate(full, batches, full.backbone.classes)
    same = identical(after_pb[1], {c: now[c] for c in after_pb[1]})
    rows += [dict(method="full fine-tune", stage="+W electron", cls=c, trainable=full.report.trainable, total=full.report.total,
                  same=same if c != "W_electron" else None, secs=secs, **metrics[c]) for c in metrics]
    return rows


def table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys((r["method"], r["stage"], r["cls"]) for r in rows))
    lines = [
        "| method | stage | class | NLL / hit | sep. power (mean) | AUC | trainable params | old classes bit-identical |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v: f"{np.mean(v):.3f} ± {np.std(v):.3f}"  # noqa: E731
    for key in keys:
        rs = [r for r in rows if (r["method"], r["stage"], r["cls"]) == key]
        same = [r["same"] for r in rs]
        mark = "n/a (new)" if same[0] is None else ("yes" if all(same) else f"no ({sum(not s for s in same)}/{len(same)} seeds)")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {fmt([r['nll'] for r in rs])} | {fmt([r['sep'] for r in rs])} | "
                     f"{fmt([r['auc'] for r in rs])} | {rs[0]['trainable']:,} / {rs[0]['total']:,} | {mark} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """New-class quality side by side (ratios in one run) and the parameter cost."""
    out = ["| new class | lifecycle sep / scratch sep | lifecycle NLL - scratch NLL | lifecycle trainable / scratch trainable |", "|---|---|---|---|"]
    for name, new in STAGES:
        life = [r for r in rows if r["method"] == "lifecycle" and r["stage"] == name and r["cls"] == new]
        scr = [r for r in rows if r["method"] == "from scratch" and r["stage"] == name]
        ratio = [a["sep"] / b["sep"] for a, b in zip(life, scr)]
        dnll = [a["nll"] - b["nll"] for a, b in zip(life, scr)]
        out.append(f"| {new} | {np.mean(ratio):.2f} ± {np.std(ratio):.2f} | {np.mean(dnll):+.3f} ± {np.std(dnll):.3f} | "
                   f"{life[0]['trainable'] / scr[0]['trainable']:.3f} |")
    final = max(r["total"] for r in rows if r["method"] == "lifecycle")
    scratch_total = sum({r["stage"]: r["total"] for r in rows if r["method"] == "from scratch"}.values())
    first_total = next(r["total"] for r in rows if r["stage"] == "pretrain W+Ta photon")
    out.append("")
    out.append(f"One lifecycle model serves all 6 classes with {final:,} parameters; separate models would need "
               f"{first_total:,} (pretrained W+Ta) + {scratch_total:,} (4 new classes) = {first_total + scratch_total:,}.")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--pretrain-epochs", type=int, default=15)
    ap.add_argument("--stage-epochs", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.time()
    batches = test_batches(ALL)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            rows += run_seed(seed, Path(tmp), batches, args.pretrain_epochs, args.stage_epochs)
            print(f"seed {seed} done after {time.time() - start:.0f} s", file=sys.stderr, flush=True)
    n_test = {c: len(b["label"]) for c, b in batches.items()}
    print(f"# Calorimetry lifecycle benchmark ({datetime.date.today().isoformat()})\n")
    print(f"Command: `python benchmarks/calorimetry.py --seeds {' '.join(map(str, args.seeds))} "
          f"--pretrain-epochs {args.pretrain_epochs} --stage-epochs {args.stage_epochs}`; "
          f"{len(args.seeds)} seeds, mean ± std; test showers per class: {n_test}; wall {time.time() - start:.0f} s "
          f"on {torch.get_num_threads()} thread(s).\n")
    print(table(rows))
    print("\n## New classes: lifecycle vs a separate from-scratch model (same epochs on the class)\n")
    print(summary(rows))


if __name__ == "__main__":
    main()
