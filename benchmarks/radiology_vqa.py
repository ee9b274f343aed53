"""Fair radiology VQA: FairLLaVA against plain LoRA, group-balanced resampling and group DRO, over
seeds, with one FairLLaVA row in both bf16-mixed and 32-true.

    python benchmarks/radiology_vqa.py [--seeds 0 1 2] [--patients 400] [--projector-steps 60]
        [--steps 200] [--real-table nih|priors] [--out benchmarks/results/radiology_vqa.md]

Every method is a YAML composition of domains/radiology_vqa.yaml (FairLLaVA) with one file of
domains/radiology_vqa/ (lora, resample, group_dro), on one generated cohort (``--patients``
patients, ``--real-table`` pinned, so the set does not depend on what is installed; nih: age, sex,
projection and findings of real NIH ChestX-ray14 patients, read from torchxrayvision) whose
training split confounds sex with cardiomegaly (bias strength 0.8; validation and test are
unconfounded). Per seed, the projector stage runs once and every method's LoRA stage starts from
it; all share the cached CLIP tower (the ``clip`` prerequisite, pretrained once on this cohort's
training pairs), the LoRA (r=64, alpha=128), the optimiser (AdamW 1e-4, cosine, 3 % warmup), the
batch (6 x 2) and the number of optimiser steps. The weights after the last step are scored on
the test split (never used for selection), by greedy decoding.

Columns: trainable parameters; closed accuracy; open token F1; for sex (the planted attribute)
worst-group accuracy, max gap, equity-scaled accuracy, demographic-parity and equalised-odds
differences and the largest per-group ECE; the sex gap on the cardiomegaly questions alone (where
the bias acts); and the mutual information (nats) between the image-token states at the model's
mid layer and age / sex / race, by one probe for every model: a fresh linear CLUB estimator fitted
on the validation images' states and evaluated on the test images' (metrics.py / fairness.py).
Mean +- std over seeds; the FairLLaVA - LoRA differences are paired per seed.

bf16 "where available": the CPU's flags are read (AMX-BF16 or AVX512-BF16); without them every row
runs in 32-true and the table says so.

Budget of the full run, estimated from per-step costs (~0.5 s of CPU per LoRA micro-batch of 6,
~3 s per 6 decoded answers, one torch thread), not measured end to end: ~45 min on 2 idle CPU
cores for the CLIP pretraining (first run only), 3 projector stages of 60 steps, 13 LoRA stages
of 200 steps of 12 answers and 13 test decodings of ~600 answers. ``--methods``, ``--no-fp32-row``
and smaller ``--patients`` / ``--steps`` reduce it; the table's header repeats the command and
the measured wall and CPU time.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from domains.radiology_vqa.data import RadiologyVQAData, VQACollate  # noqa: E402
from domains.radiology_vqa.fairness import probe_mi  # noqa: E402
from domains.radiology_vqa.metrics import fairness_summary  # noqa: E402
from domains.radiology_vqa.model import RadiologyVLM  # noqa: E402
from suite.prerequisites import resolve as resolve_prerequisites  # noqa: E402

#: row name -> the file composed after domains/radiology_vqa.yaml (None: FairLLaVA itself)
METHODS: dict[str, str | None] = {"LoRA": "lora", "FairLLaVA": None, "resampling": "resample", "group DRO": "group_dro"}
ATTRIBUTES = ("age", "sex", "race")


def cpu_has_bf16() -> bool:
    """Native bf16 matrix units (AMX-BF16 or AVX512-BF16) on this CPU, read from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and "class_path" not in v else copy.deepcopy(v)
    return out


def method_config(variant: str | None, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(model init_args, data init_args, trainer) of domains/radiology_vqa.yaml + a variant file + this
    benchmark's cohort, the CLIP prerequisite resolved (pretrained once per cohort, then cached)."""
    cfg = yaml.safe_load((ROOT / "domains/radiology_vqa.yaml").read_text())
    if variant:
        cfg = _merge(cfg, yaml.safe_load((ROOT / f"domains/radiology_vqa/{variant}.yaml").read_text()))
    cfg["data"]["init_args"] |= {"n_patients": args.patients, "real_table": args.real_table}
    resolve_prerequisites(cfg)
    model, data = dict(cfg["model"]["init_args"]), dict(cfg["data"]["init_args"])
    opt = model.pop("optimizer")
    opt_cls = getattr(torch.optim, opt["class_path"].rsplit(".", 1)[1])
    model["optimizer_args"] = (opt_cls, dict(opt.get("init_args", {})))
    from suite.adapters.core import spec_from_config

    model["adapter"] = spec_from_config(model["adapter"])
    return model, data, cfg["trainer"]


def build(model_args: dict[str, Any], dm: RadiologyVQAData, **over: Any) -> RadiologyVLM:
    args = dict(model_args) | over
    cls, kw = args.pop("optimizer_args")
    kw = kw | ({"lr": args.pop("lr")} if "lr" in args else {})
    args["optimizer"] = lambda params, _c=cls, _k=kw: _c(params, **_k)
    return RadiologyVLM(**args, attribute_classes=dm.attribute_classes, num_groups=dm.num_groups)


def fit(model: RadiologyVLM, dm: RadiologyVQAData, steps: int, accumulate: int, precision: str, root: Path) -> tuple[float, L.Trainer]:
    trainer = L.Trainer(max_steps=steps, max_epochs=-1, accumulate_grad_batches=accumulate, precision=precision,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=root, accelerator="cpu", devices=1)
    t = time.time()
    trainer.fit(model, dm)
    return time.time() - t, trainer


def _loader(model: RadiologyVLM, dm: RadiologyVQAData, split: str) -> Any:
    return dm.loader(split, collate_fn=VQACollate(model.chat), batch_size=32)


def evaluate(model: RadiologyVLM, dm: RadiologyVQAData, precision: str, bias_finding: str) -> dict[str, Any]:
    """Test-split answers -> fairness metrics, and the MI probe (validation images fit, test images score)."""
    model.eval()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision.startswith("bf16"))
    records, states = [], {}
    with torch.no_grad(), autocast:
        for batch in _loader(model, dm, "test"):
            records += model.answer(batch)
        for split in ("val", "test"):
            zs, labels, seen = [], [], set()
            for batch in _loader(model, dm, split):
                first = [i for i, p in enumerate(batch["image_path"]) if p not in seen]  # one question per image
                seen |= {batch["image_path"][i] for i in first}
                if not first:
                    continue
                sub = _rows(batch, first)
                zs.append(model.image_states(sub))
                labels.append(torch.stack([sub["group_ids"][a] for a in ATTRIBUTES], 1))
            z, a = torch.cat(zs), torch.cat(labels)
            n = z.shape[1]  # every image token of an image is a sample with that image's groups
            states[split] = (z.reshape(-1, z.shape[-1]), a.repeat_interleave(n, 0))
    summary = fairness_summary(records, ATTRIBUTES, n_boot=200)
    focus = fairness_summary([r for r in records if r["topic"] == bias_finding], ATTRIBUTES, n_boot=0)
    k = dm.attribute_classes
    mi = {attr: probe_mi(states["val"][0], states["val"][1][:, j], states["test"][0], states["test"][1][:, j], k[attr])
          for j, attr in enumerate(ATTRIBUTES)}
    sex = summary["sex"]
    return {"closed_acc": summary["closed_acc"], "open_f1": summary["open_f1"], "worst": sex["worst"], "gap": sex["gap"],
            "equity": sex["equity_scaled_acc"], "dp": sex.get("dp_diff", np.nan), "eo": sex.get("eo_diff", np.nan),
            "ece": max(sex.get("ece", {"": np.nan}).values()), "focus_gap": focus["sex"]["gap"],
            "age_gap": summary["age"]["gap"], **{f"mi_{a}": v for a, v in mi.items()}, "n_test": len(records)}


def _rows(batch: dict[str, Any], rows: list[int]) -> dict[str, Any]:
    def pick(v: Any) -> Any:
        if torch.is_tensor(v):
            return v[rows]
        if isinstance(v, list):
            return [v[i] for i in rows]
        if isinstance(v, dict):
            return {k: pick(x) for k, x in v.items()}
        return v
    return {k: pick(v) for k, v in batch.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--patients", type=int, default=400)
    ap.add_argument("--projector-steps", type=int, default=60)
    ap.add_argument("--steps", type=int, default=200, help="optimiser steps of the LoRA stage (batch 6 x 2)")
    ap.add_argument("--real-table", default="nih", choices=["nih", "priors"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--no-fp32-row", action="store_true", help="skip the 32-true FairLLaVA row (saves one LoRA stage per seed)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prior-only", action="store_true", help="print the closed-answer prior line of the table only")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start, cpu0 = time.time(), time.process_time()
    root = Path(os.environ.get("TMPDIR", "/tmp")) / "radiology-vqa-bench"
    low = "bf16-mixed" if cpu_has_bf16() else "32-true"
    configs = {m: method_config(METHODS[m], args) for m in args.methods}
    base_model, base_data, trainer_cfg = method_config(None, args)
    accumulate = int(trainer_cfg.get("accumulate_grad_batches", 1))
    dm = RadiologyVQAData(**base_data)
    dm.setup()
    print(f"[{time.time() - start:6.0f}s] CLIP and cohort ready: {dm.split_sizes}", file=sys.stderr, flush=True)
    prior = answer_prior(dm)
    if args.prior_only:
        return print(prior)
    fp32_row = low != "32-true" and "FairLLaVA" in args.methods and not args.no_fp32_row
    rows = [(m, low) for m in args.methods] + ([("FairLLaVA", "32-true")] if fp32_row else [])
    results: dict[tuple[str, str], list[dict[str, Any]]] = {r: [] for r in rows}
    params: dict[str, int] = {}
    for seed in args.seeds:
        L.seed_everything(seed, verbose=False)
        stage1 = build(base_model, dm, stage="projector", adapter=None, lr=1e-3)
        secs, trainer = fit(stage1, dm, args.projector_steps, accumulate, low, root)
        ckpt = root / f"projector-seed{seed}.ckpt"
        trainer.save_checkpoint(ckpt)  # trainable state + hyperparameters: every method's LoRA stage starts here
        print(f"[{time.time() - start:6.0f}s] seed {seed} projector stage ({secs:.0f}s)", file=sys.stderr, flush=True)
        for method, prec in rows:
            model_args, data_args, _ = configs[method]
            data = RadiologyVQAData(**data_args)
            L.seed_everything(seed, verbose=False)
            model = build(model_args, data, stage="lora", init_from=str(ckpt))
            params[method] = model.report.trainable
            secs, _ = fit(model, data, args.steps, accumulate, prec, root)
            res = evaluate(model, data, prec, data.synth.bias_finding) | {"secs": secs}
            results[(method, prec)].append(res)
            print(f"[{time.time() - start:6.0f}s] seed {seed} {method} {prec}: acc {res['closed_acc']:.3f} gap {res['gap']:.3f} "
                  f"cardiomegaly gap {res['focus_gap']:.3f} MI sex {res['mi_sex']:.3f} ({secs:.0f}s)", file=sys.stderr, flush=True)
            if args.out:  # rows kept as the run goes
                args.out.write_text(render(results, params, args, low, time.time() - start, time.process_time() - cpu0, partial=True,
                                           prior=prior))
    report = render(results, params, args, low, time.time() - start, time.process_time() - cpu0, prior=prior)
    print(report)
    if args.out:
        args.out.write_text(report)


COLUMNS = [("closed_acc", "closed acc"), ("open_f1", "open F1"), ("worst", "worst group (sex)"), ("gap", "max gap (sex)"),
           ("focus_gap", "max gap, cardiomegaly Qs (sex)"), ("equity", "equity-scaled acc (sex)"), ("dp", "DP diff (sex)"),
           ("eo", "EO diff (sex)"), ("ece", "max group ECE (sex)"), ("age_gap", "max gap (age)"),
           ("mi_age", "MI age"), ("mi_sex", "MI sex"), ("mi_race", "MI race")]


def _ms(values: list[float], scale: float = 100.0) -> str:
    v = np.asarray(values, dtype=float)
    return f"{scale * np.nanmean(v):.1f} ± {scale * np.nanstd(v):.1f}"


def answer_prior(dm: RadiologyVQAData) -> str:
    """The closed-answer prior as a table line: the training split's most frequent closed answer and
    the test accuracy of always giving it (overall and on the planted finding's questions). A
    method at or below it has not learnt to read the images."""
    import collections

    def closed(split: str) -> list[dict[str, Any]]:
        ds = dm.splits[split]
        return [item for item in (ds[i] for i in range(len(ds))) if item["question_type"] == "closed"]

    train, test = closed("train"), closed("test")
    majority = collections.Counter(item["answer"] for item in train).most_common(1)[0][0]
    focus = [item for item in test if item["topic"] == dm.synth.bias_finding]
    acc = 100 * np.mean([item["answer"] == majority for item in test])
    focus_acc = 100 * np.mean([item["answer"] == majority for item in focus]) if focus else float("nan")
    return (f"Answer prior: always answering {majority!r} (the training split's most frequent closed answer) scores "
            f"{acc:.1f} % closed accuracy on the {len(test)} closed test questions ({focus_acc:.1f} % on the "
            f"{len(focus)} {dm.synth.bias_finding} questions). A method at or below it answers from the prior, not the image.")


def render(results: dict, params: dict, args: argparse.Namespace, low: str, seconds: float, cpu: float,
           partial: bool = False, prior: str = "") -> str:
    n = min((len(v) for v in results.values()), default=0)
    lines = ["# Fair radiology VQA: FairLLaVA vs baselines", "",
             *(["**Partial: the run has not finished.**", ""] if partial else []),
             f"`python benchmarks/radiology_vqa.py --seeds {' '.join(map(str, args.seeds))} --patients {args.patients} "
             f"--projector-steps {args.projector_steps} --steps {args.steps} --real-table {args.real_table} "
             f"--methods {' '.join(repr(m) if ' ' in m else m for m in args.methods)}{' --no-fp32-row' if args.no_fp32_row else ''}`",
             f"({datetime.date.today().isoformat()}, {seconds / 60:.1f} min wall, {cpu / 60:.1f} min CPU, torch threads {args.threads}; "
             f"bf16 {'available' if low != '32-true' else 'not available: every row is 32-true'})", "",
             f"Test split, mean ± std over {n} seeds; accuracies, gaps, F1 and ECE in %, MI in millinats (CLUB probe on "
             "the mid-layer image-token states, fitted on validation images, scored on test images).", "",
             "| method | precision | trainable params | " + " | ".join(c for _, c in COLUMNS) + " | s / LoRA stage |",
             "|---|---|---|" + "---|" * len(COLUMNS) + "---|"]
    for (m, prec), runs in results.items():
        if not runs:
            continue
        cells = [_ms([r[k] for r in runs], 1000.0 if k.startswith("mi_") else 100.0) for k, _ in COLUMNS]
        lines.append(f"| {m} | {prec} | {params.get(m, 0):,} | " + " | ".join(cells) + f" | {np.mean([r['secs'] for r in runs]):.0f} |")
    fair, base = results.get(("FairLLaVA", low), []), results.get(("LoRA", low), [])
    k = min(len(fair), len(base))
    if k:
        lines += ["", f"FairLLaVA - LoRA, paired per seed ({low}, mean ± standard error over {k} seeds):", ""]
        for key, label, scale in (("closed_acc", "closed accuracy (points)", 100), ("gap", "max gap, sex (points)", 100),
                                  ("focus_gap", "max gap on cardiomegaly questions, sex (points)", 100),
                                  ("mi_sex", "MI sex (millinats)", 1000), ("mi_age", "MI age (millinats)", 1000)):
            d = scale * np.array([f[key] - b[key] for f, b in zip(fair[:k], base[:k])])
            se = d.std(ddof=1) / np.sqrt(k) if k > 1 else float("nan")
            lines.append(f"- {label}: {d.mean():+.1f} ± {se:.1f}")
        acc = 100 * np.mean([f["closed_acc"] - b["closed_acc"] for f, b in zip(fair[:k], base[:k])])
        gap = np.mean([f["gap"] - b["gap"] for f, b in zip(fair[:k], base[:k])])
        mi = np.mean([f["mi_sex"] + f["mi_age"] - b["mi_sex"] - b["mi_age"] for f, b in zip(fair[:k], base[:k])])
        met = abs(acc) <= 1.0 and gap < 0 and mi < 0
        lines += ["", f"Goal (lower sex gap than LoRA at equal accuracy within 1 point, and a lower MI estimate): "
                  f"**{'met' if met else 'not met'}** (accuracy {acc:+.1f} points, gap {100 * gap:+.1f} points, "
                  f"MI age + sex {1000 * mi:+.1f} millinats)."]
    if prior:
        lines += ["", prior]
    fp32, bf16 = results.get(("FairLLaVA", "32-true"), []), results.get(("FairLLaVA", "bf16-mixed"), [])
    if fp32 and bf16:
        t = np.mean([r["secs"] for r in bf16]) / np.mean([r["secs"] for r in fp32])
        lines += ["", f"bf16-mixed / 32-true LoRA-stage time, FairLLaVA: {t:.2f}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
