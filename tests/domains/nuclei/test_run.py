"""The nuclei job end to end through the CLI on a tiny configuration: fit, checkpoint contents,
validate / test from ``last``, predict outputs, and the notebook on the run folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from suite.cli import main
from tests.notebooks import assert_fresh, cell_outputs, run_notebook

TINY = {"embed_dim": 48, "depth": 2, "num_heads": 2, "window_size": 2, "global_attn_indexes": [1], "out_chans": 16}


def _args(root: Path) -> list[str]:
    return [
        "--config", "domains/nuclei.yaml",
        "--trainer.default_root_dir", str(root),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.log_every_n_steps", "1",
        "--model.init_args.img_size", "64",
        "--model.init_args.decoder_dim", "16",
        "--model.init_args.encoder", json.dumps(TINY),
        "--model.init_args.adapter.init_args.r", "4",
        "--data.init_args.n_tiles", "12",
        "--data.init_args.tiles_per_slide", "2",
        "--data.init_args.tile_size", "64",
        "--data.init_args.batch_size", "2",
    ]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("nuclei_run")
    mp = pytest.MonkeyPatch()
    mp.setenv("SUITE_DATA_DIR", str(root / "data"))
    cli = main(["fit", *_args(root), "--trainer.max_epochs", "2"])
    yield root, cli
    mp.undo()


def test_fit_logs_metrics_and_saves_mala(run):
    root, cli = run
    metrics = pd.read_csv(root / "logs" / "version_0" / "metrics.csv")
    val = metrics.dropna(subset=["val/bPQ"])
    assert len(val) == 2 and {"val/mPQ", "val/AJI", "val/Dice", "val/F1d", "val/PQ/neoplastic"} <= set(val.columns)
    assert np.isfinite(metrics["train/loss"].dropna()).all()
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    keys = set(ckpt["state_dict"])
    assert any(k.startswith("backbone.blocks.0.down.") for k in keys)  # MALA trains and is saved
    assert any("convs.0.bases" in k for k in keys) and any(k.startswith("hmf.") for k in keys)
    assert not any(".base_layer." in k or k.startswith("backbone.patch_embed") for k in keys)  # frozen SAM is not


def test_validate_from_last_checkpoint_reproduces_metrics(run):
    root, cli = run
    last_val = cli.model.last_val
    checker = main(["validate", *_args(root), "--ckpt_path", "last"])
    again = {k.split("/", 1)[1]: float(v) for k, v in checker.trainer.callback_metrics.items() if k.startswith("val/")}
    for key in ("bPQ", "mPQ", "AJI", "Dice", "F1d"):
        assert again[key] == pytest.approx(last_val[key], abs=1e-6), key
    tester = main(["test", *_args(root), "--ckpt_path", "last"])
    assert "test/bPQ" in tester.trainer.callback_metrics


def test_predict_writes_overlays_and_maps_then_notebook(run):
    root, _ = run
    main(["predict", *_args(root), "--ckpt_path", "last"])
    pred = root / "predictions"
    overlays = sorted(pred.glob("*_overlay.png"))
    assert overlays and len(overlays) == len(list(pred.glob("*_inst.npy"))) == len(list(pred.glob("*_type.npy")))
    inst = np.load(str(overlays[0]).replace("_overlay.png", "_inst.npy"))
    types = np.load(str(overlays[0]).replace("_overlay.png", "_type.npy"))
    assert inst.shape == types.shape == (64, 64) and set(np.unique(types)) <= set(range(6))
    from PIL import Image

    from domains.nuclei.postprocess import LEGEND_HEIGHT

    assert np.asarray(Image.open(overlays[0])).shape == (64 + LEGEND_HEIGHT, 64, 3)  # the tile above its class legend
    table = pd.read_csv(pred / "counts.csv")
    assert len(table) == len(overlays) and list(table.columns[:3]) == ["tile", "nuclei", "neoplastic"]
    first = table.set_index("tile").loc[overlays[0].name.replace("_overlay.png", "")]
    assert first["nuclei"] == len(np.unique(inst[inst > 0])) == first.iloc[1:].sum()
    nb = run_notebook("nuclei.ipynb", env={"NUCLEI_RUN": str(root)})
    text = cell_outputs(nb)
    assert "val/bPQ" in text and "neoplastic" in text and "nuclei" in text
    assert_fresh("nuclei.ipynb", nb)
    # the numbers the notebook prints are the run's: every epoch's validation metrics, the last epoch's per class,
    # and the predicted counts (each printed to 4 decimals or as an integer)
    import re

    printed = [float(x) for x in re.findall(r"-?\d+\.\d+|-?\d+", text)]
    val = pd.read_csv(root / "logs" / "version_0" / "metrics.csv").dropna(subset=["val/bPQ"]).groupby("epoch").last()
    expected = [v for k in ("val/bPQ", "val/mPQ", "val/AJI", "val/Dice") for v in val[k]]
    expected += [val[k].iloc[-1] for k in val.columns if k.startswith(("val/PQ/", "val/F1c/")) and np.isfinite(val[k].iloc[-1])]
    expected += table.head(8)["nuclei"].tolist()
    for v in expected:
        assert any(abs(p - round(float(v), 4)) < 5e-5 for p in printed), f"{v} is not among the notebook's numbers"


def test_predict_on_a_folder_of_plain_tiles(run, tmp_path):
    """Unlabelled PNG / JPG tiles of any size (here 64x64, 50x90 and 100x120) as the predict source."""
    from PIL import Image

    root, _ = run
    folder = tmp_path / "tiles"
    folder.mkdir()
    fold = np.load(next((root / "data").rglob("images.npy")))
    Image.fromarray(fold[0]).save(folder / "a.png")
    Image.fromarray(np.concatenate([fold[1], fold[2]], 1)[:50, :90]).save(folder / "b.jpg", quality=90)  # wider than high
    Image.fromarray(np.concatenate([np.concatenate([fold[2], fold[3]], 1)] * 2, 0)[:100, :120]).save(folder / "c.png")
    (folder / "notes.txt").write_text("not an image")
    main(["predict", *_args(root), "--ckpt_path", "last", "--data.init_args.predict_path", str(folder),
          "--data.init_args.stain_normalize", "macenko"])
    out = root / "predictions"
    for name, shape in (("a", (64, 64)), ("b", (50, 90)), ("c", (100, 120))):
        inst = np.load(out / f"{name}_inst.npy")
        assert inst.shape == shape
        picture = np.asarray(Image.open(out / f"{name}_overlay.png"))
        assert picture.shape[:2] == (shape[0] + 18, shape[1])
    a = np.asarray(Image.open(out / "a_overlay.png"))[:64]
    untouched = np.load(out / "a_inst.npy") == 0  # off the contours the overlay shows the original tile, not the normalised one
    np.testing.assert_array_equal(a[untouched], fold[0][untouched])
    assert sorted(pd.read_csv(out / "counts.csv")["tile"]) == ["a", "b", "c"]
