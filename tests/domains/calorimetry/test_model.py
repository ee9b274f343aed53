"""Calorimetry model: the no-forgetting guarantee across the whole lifecycle (torch.equal) for both
architectures, what each extension adds and trains, generation with our constraints and with the
reference's sampling, the reference recipe (optimiser groups, schedules) and expert choices, the
YAML lifecycle through the stage runner with ``test --ckpt_path`` on later stages, predict
outputs, and the notebook."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from domains.calorimetry.data import Geometry, collate_showers, read_calochallenge, shower_hits
from domains.calorimetry.model import CaloShowerModel
from domains.calorimetry.synth import simulate_showers
from suite.adapters.base import adapter_layers

ROOT = Path(__file__).resolve().parents[3]
TINY = dict(width=32, depth=1, heads=2, ffn_mult=2, energy_bins=32, max_hits=24)
GEO = Geometry((8, 6, 6), 10.0, 7.0)


def _batch(classes: list[str], per_class: int = 3, seed: int = 0) -> dict:
    items = []
    for i, cls in enumerate(classes):
        material, particle = cls.split("_")
        energies = np.linspace(15.0, 80.0, per_class)
        for e, shower in zip(energies, simulate_showers(material, particle, energies, GEO, seed=seed + i)):
            v, dep = shower_hits(shower, 50.0)
            items.append({"voxels": v[:40], "energies": dep[:40], "incident_energy": e * 1e3, "label": cls})
    return collate_showers(items)


def _train(model: CaloShowerModel, batch: dict, steps: int = 3) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3, weight_decay=0.01)
    for _ in range(steps):
        opt.zero_grad()
        model.compute_losses(batch)["loss"].backward()
        opt.step()


def _save(model: CaloShowerModel, path: Path) -> str:
    """A Lightning-format stage checkpoint (state_dict + hyper_parameters), trainable state only."""
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return str(path)


@torch.no_grad()
def _outputs(model: CaloShowerModel, batch: dict) -> torch.Tensor:
    model.eval()
    s, e, _, _ = model.logits(batch)
    return torch.cat([s, e], -1)


def _stage(tmp: Path, prev: CaloShowerModel, name: str, add: str, closest: str, **kw) -> CaloShowerModel:
    return CaloShowerModel(**TINY, init_from=_save(prev, tmp / f"{name}.ckpt"), add_class=add, closest_expert=closest, **kw)


@pytest.mark.parametrize("arch", ["ours", "fm4cal"])
def test_every_extension_keeps_old_outputs_bit_identical(tmp_path: Path, arch: str) -> None:
    """Pretrain -> +Pb (from Ta) -> +electrons (LoRA, heads, expert) -> +Ta electrons (from W
    electrons), training each stage; logits *and* sampled showers of every earlier class stay torch.equal."""
    old = _batch(["W_photon", "Ta_photon"])
    pretrain = CaloShowerModel(**TINY, architecture=arch)
    _train(pretrain, old)
    ref = _outputs(pretrain, old)
    gen_ref = pretrain.generate(old["incident_energy"], old["label"], generator=torch.Generator().manual_seed(5))

    pb = _stage(tmp_path, pretrain, "pretrain", "Pb_photon", "Ta", architecture=arch)
    moe = pb.backbone.blocks[0].moe
    ta_expert, pb_expert = (moe.experts[moe.label_experts(c)[0]] for c in ("Ta_photon", "Pb_photon"))
    assert all(torch.equal(a, b) for a, b in zip(pb_expert.parameters(), ta_expert.parameters()))  # the reference's closest
    _train(pb, _batch(["Pb_photon"]))
    assert torch.equal(_outputs(pb, old), ref)
    old_pb = _batch(["W_photon", "Ta_photon", "Pb_photon"])
    ref_pb = _outputs(pb, old_pb)

    el = _stage(tmp_path, pb, "add_pb", "W_electron", "W", lora_r=4, lora_alpha=4.0, architecture=arch)
    _train(el, _batch(["W_electron", "W_photon"]))  # mixed batches: photon rows take no LoRA
    assert torch.equal(_outputs(el, old_pb), ref_pb)
    old_el = _batch(["W_photon", "Pb_photon", "W_electron"])
    ref_el = _outputs(el, old_el)

    ta = _stage(tmp_path, el, "add_electron", "Ta_electron", "W", architecture=arch)
    _train(ta, _batch(["Ta_electron"]))
    assert torch.equal(_outputs(ta, old_el), ref_el)
    assert torch.equal(_outputs(ta, old), ref)
    assert ta.outputs_unchanged() is True
    gen = ta.generate(old["incident_energy"], old["label"], generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(gen, gen_ref))

    # `test --ckpt_path` on the last stage: rebuild from the stage checkpoints alone
    rebuilt = CaloShowerModel(**TINY, init_from=str(tmp_path / "add_electron.ckpt"), add_class="Ta_electron", closest_expert="W",
                              architecture=arch)
    ckpt_path = _save(ta, tmp_path / "ta.ckpt")
    ckpt = torch.load(ckpt_path, weights_only=True)
    rebuilt.on_load_checkpoint(ckpt)
    rebuilt.load_state_dict(ckpt["state_dict"], strict=False)
    everything = _batch(["W_photon", "Ta_photon", "Pb_photon", "W_electron", "Ta_electron"])
    assert torch.equal(_outputs(rebuilt, everything), _outputs(ta, everything))
    other = "fm4cal" if arch == "ours" else "ours"
    with pytest.raises(ValueError, match="architecture differs"):
        CaloShowerModel(**TINY, init_from=str(tmp_path / "add_electron.ckpt"), add_class="Pb_electron", closest_expert="Ta",
                        architecture=other)


def test_a_new_particle_gets_rslora_copied_heads_and_a_closest_expert(tmp_path: Path) -> None:
    pretrain = CaloShowerModel(**TINY)
    _train(pretrain, _batch(["W_photon", "Ta_photon"]), steps=2)
    el = _stage(tmp_path, pretrain, "pretrain", "W_electron", "W", lora_r=16, lora_alpha=8.0)
    layers = [layer for _, layer in adapter_layers(el)]
    attn = el.backbone.blocks[0].attn
    assert len(layers) == 4 and {n.split(".")[-1] for n, _ in adapter_layers(el)} == {"q", "k", "v", "out"}
    assert all(layer.spec.rslora and layer.spec.r == 16 and layer.spec.scaling == pytest.approx(8.0 / 4.0) for layer in layers)
    assert attn.lora["electron"]["q"].base_layer is attn.q  # shares the frozen base, adds a delta
    photon, electron = el.backbone.heads["photon"], el.backbone.heads["electron"]
    assert all(torch.equal(a, b) for a, b in zip(photon.state_dict().values(), electron.state_dict().values()))
    moe = el.backbone.blocks[0].moe
    w, ta, new = (moe.experts[moe.label_experts(c)[0]] for c in ("W_photon", "Ta_photon", "W_electron"))
    assert all(torch.equal(a, b) for a, b in zip(new.parameters(), w.parameters()))  # the closest: W,
    assert not all(torch.equal(a, b) for a, b in zip(new.parameters(), ta.parameters()))  # not the last
    trainable = {n for n, p in el.named_parameters() if p.requires_grad}
    lora = {f"{name}.{p}" for name, layer in adapter_layers(el) for p in layer.adapter_params()}
    assert lora and trainable == lora | {
        n for n, _ in el.named_parameters() if ".moe.experts.2." in n or n.startswith("backbone.heads.electron.")
    }
    el.compute_losses(_batch(["W_photon", "W_electron"]))["loss"].backward()
    assert all((p.grad is not None) == (n in trainable) for n, p in el.named_parameters())
    with pytest.raises(ValueError, match="already exists"):
        _stage(tmp_path, el, "el", "W_electron", "W")
    with pytest.raises(ValueError, match="matches no known class"):
        _stage(tmp_path, el, "el2", "Pb_electron", "Fe")


def test_full_finetuning_baseline_forgets_and_the_check_says_so(tmp_path: Path) -> None:
    pretrain = CaloShowerModel(**TINY)
    full = _stage(tmp_path, pretrain, "pretrain", "W_electron", "W", finetune="full")
    assert all(p.requires_grad for p in full.parameters()) and not list(adapter_layers(full))
    assert full.outputs_unchanged() is True
    _train(full, _batch(["W_electron"]), steps=1)
    assert full.outputs_unchanged() is False


def test_generation_respects_its_constraints() -> None:
    model = CaloShowerModel(**TINY)
    batch = _batch(["W_photon", "Ta_photon"], per_class=4)
    _train(model, batch, steps=5)
    model.eval()
    tok = model.tokenizer
    space, energy = model.generate(batch["incident_energy"], batch["label"], temperature=1.0,
                                   max_hits=24, generator=torch.Generator().manual_seed(0))
    assert space.shape[1] <= 25
    for s, e in zip(space, energy):
        hits = (s >= 1) & (s <= tok.n_voxels)
        n = int(hits.sum())
        assert hits[:n].all() and s[n] == tok.space_end  # hits, then the end token
        assert len(set(s[:n].tolist())) == n  # a voxel is hit at most once
        assert (e[:n] >= 1).all() and (e[:n] <= tok.n_bins).all() and (e[:n][1:] <= e[:n][:-1]).all()
    dense = tok.dense(space, energy)
    assert dense.shape == (8, GEO.n_voxels) and (dense >= 0).all()
    assert torch.equal((dense > 0).sum(1), ((space >= 1) & (space <= tok.n_voxels)).sum(1))
    greedy = [model.generate(batch["incident_energy"], batch["label"], temperature=0.0) for _ in range(2)]
    assert torch.equal(greedy[0][0], greedy[1][0])


def _biased(model: CaloShowerModel, voxel: int | None = None, energy_end: float = 0.0, energy_bins: tuple[int, ...] = ()) -> None:
    """Push the photon heads towards one voxel, the energy end token and some energy bins."""
    heads = model.backbone.heads["photon"]
    with torch.no_grad():
        if voxel is not None:
            heads.space.bias[voxel + 1] += 30.0
        heads.energy.bias[model.tokenizer.energy_end] += energy_end
        for t in energy_bins:
            heads.energy.bias[t] += 30.0


@pytest.mark.parametrize("arch", ["ours", "fm4cal"])
def test_generation_with_the_reference_sampling_drops_our_constraints(arch: str) -> None:
    tok_kw = dict(generator=torch.Generator().manual_seed(0), max_hits=12)
    inc, labels = torch.full((6,), 5e4), ["W_photon"] * 6
    ours = CaloShowerModel(**TINY, architecture=arch).eval()
    reference = CaloShowerModel(**TINY, architecture=arch, sampling={"preset": "reference"}).eval()
    assert reference.sampling.stop_on == "either" and reference.sampling.dynamic_temperature
    for model in (ours, reference):  # one voxel and the two extreme energy bins are favoured
        _biased(model, voxel=5, energy_bins=(1, model.tokenizer.n_bins))
    s, e = ours.generate(inc, labels, **tok_kw)
    hits = (s >= 1) & (s <= ours.tokenizer.n_voxels)
    assert all(len(set(row[m].tolist())) == int(m.sum()) for row, m in zip(s, hits))  # each voxel once
    assert all((row[m][1:] <= row[m][:-1]).all() for row, m in zip(e, hits))  # energies never rise
    s, e = reference.generate(inc, labels, **tok_kw)
    hits = (s >= 1) & (s <= reference.tokenizer.n_voxels)
    assert (s[hits] == 6).float().mean() > 0.9  # voxel 5 again and again
    assert any((row[m][1:] > row[m][:-1]).any() for row, m in zip(e, hits))  # energies rise and fall
    # the energy end token ends a sequence under stop_on="either" only
    for model in (ours, reference):
        _biased(model, energy_end=60.0)
    s, e = reference.generate(inc, labels, **tok_kw)
    assert s.shape[1] == 1 and (s[:, 0] == reference.tokenizer.space_end).all() and (e == reference.tokenizer.energy_pad).all()
    s, e = ours.generate(inc, labels, **tok_kw)
    assert s.shape[1] > 1 and not (e == ours.tokenizer.energy_end).any()
    top = CaloShowerModel(**TINY, sampling={"preset": "reference", "method": "top_k", "top_k": 3})
    assert top.sampling.method == "top_k" and top.sampling.top_k == 3 and top.sampling.stop_on == "either"
    with pytest.raises(ValueError, match="sampling: .*top_n.*the options are"):
        CaloShowerModel(**TINY, sampling={"top_n": 3})


def test_reference_recipe_puts_the_heads_in_their_own_decay_group(tmp_path: Path) -> None:
    pretrain = CaloShowerModel(**TINY)
    el = _stage(tmp_path, pretrain, "pretrain", "W_electron", "W", head_weight_decay=0.1,
                optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4, weight_decay=0.0),
                scheduler=lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [5, 10], 0.1))
    cfg = el.configure_optimizers()
    groups = cfg["optimizer"].param_groups
    heads = {id(p) for p in el.backbone.heads["electron"].parameters()}
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert {id(p) for p in groups[0]["params"]} == heads
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in el.parameters() if p.requires_grad}
    assert cfg["lr_scheduler"]["interval"] == "epoch"  # the reference's milestones count epochs
    pb = _stage(tmp_path, pretrain, "pretrain2", "Pb_photon", "Ta", head_weight_decay=0.1)
    assert len(pb.param_groups()) == 1  # a material stage trains no heads: one group


def test_stage_yamls_name_importable_classes_and_chain_correctly() -> None:
    """The reference's fine_tune.py imported a models/losses.py that does not exist; every class
    a calorimetry YAML names must import, and every stage must extend the one before it."""
    closest = {}
    for lifecycle in ("lifecycle.yaml", "lifecycle_reference.yaml"):
        closest[lifecycle] = _check_lifecycle(ROOT / "domains/calorimetry" / lifecycle)
    # the reference's closest experts: Pb photons from Ta photons, Ta electrons from W electrons, Pb electrons from Ta electrons
    assert closest["lifecycle.yaml"] == closest["lifecycle_reference.yaml"] == {
        "Pb_photon": "Ta", "W_electron": "W", "Ta_electron": "W", "Pb_electron": "Ta"}


def _check_lifecycle(path: Path) -> dict[str, str]:
    life = yaml.safe_load(path.read_text())
    names = [s["name"] for s in life["stages"]]
    known: set[str] = set()
    closest: dict[str, str] = {}
    for i, stage in enumerate(life["stages"]):
        assert stage.get("init_from") == (names[i - 1] if i else None)
        merged: dict = {}
        for cfg in stage["configs"]:
            doc = yaml.safe_load((ROOT / cfg).read_text())
            for section in ("model", "data"):
                merged.setdefault(section, {}).update(doc.get(section, {}).get("init_args", {}))
                if "class_path" in doc.get(section, {}):
                    module, _, cls = doc[section]["class_path"].rpartition(".")
                    assert hasattr(importlib.import_module(module), cls), doc[section]["class_path"]
        new = merged["model"].get("add_class")
        known |= set(merged["model"]["classes"]) if new is None else {new}
        assert set(merged["data"]["classes"]) == ({new} if new else set(merged["model"]["classes"]))
        assert set(merged["data"].get("eval_classes", merged["data"]["classes"])) == known
        if new:
            closest[new] = merged["model"]["closest_expert"]
    return closest


# --- the YAML lifecycle, end to end ---------------------------------------------------------------
CLI_TINY = [
    "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--data.init_args.n_per_class", "40", "--data.init_args.max_hits", "48", "--data.init_args.batch_size", "16",
    "--model.init_args.width", "32", "--model.init_args.depth", "1", "--model.init_args.heads", "2",
    "--model.init_args.max_hits", "32",
]


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory) -> Path:
    from suite.stages import run_stages

    root = tmp_path_factory.mktemp("calo_life")
    spec = yaml.safe_load((ROOT / "domains/calorimetry/lifecycle.yaml").read_text())
    spec["root"] = str(root)
    for stage in spec["stages"]:
        stage["test"] = stage["name"] in ("add_electron", "add_pb_electron")
    (root / "lifecycle.yaml").write_text(yaml.safe_dump(spec))
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        (root / "results.json").write_text(json.dumps(run_stages(root / "lifecycle.yaml", extra_args=CLI_TINY)))
    finally:
        os.chdir(cwd)
    return root


@pytest.mark.slow
def test_yaml_lifecycle_runs_and_later_stages_test_from_their_checkpoints(lifecycle: Path) -> None:
    results = json.loads((lifecycle / "results.json").read_text())
    assert list(results) == ["pretrain", "add_pb", "add_electron", "add_ta_electron", "add_pb_electron"]
    last = results["add_pb_electron"]["test"]  # `test --ckpt_path` rebuilt all five stages
    assert last["test/no_forgetting"] == 1.0 and results["add_electron"]["test"]["test/no_forgetting"] == 1.0
    for cls in ("W_photon", "Ta_photon", "Pb_photon", "W_electron", "Ta_electron", "Pb_electron"):
        assert np.isfinite(last[f"test/{cls}/nll"]) and 0.0 <= last[f"test/{cls}/sep_mean"] <= 1.0
    # classes known at +electron are scored identically two stages later: same logits, same samples
    earlier = results["add_electron"]["test"]
    for cls in ("W_photon", "Ta_photon", "Pb_photon", "W_electron"):
        for metric in ("nll", "sep_mean", "kl_mean", "auc"):
            assert last[f"test/{cls}/{metric}"] == earlier[f"test/{cls}/{metric}"], (cls, metric)
    pb = torch.load(lifecycle / "add_pb/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert pb and all(".moe.experts.2." in k for k in pb)  # only the new expert was trained and saved
    el = torch.load(lifecycle / "add_electron/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert any(".lora.electron." in k for k in el) and any("heads.electron" in k for k in el)


def _predict_add_electron(lifecycle: Path) -> Path:
    """``predict`` of the lifecycle's add_electron stage (once per module); its predictions folder."""
    from suite.cli import main

    stage = lifecycle / "add_electron"
    if not (stage / "predictions").is_dir():
        cwd = os.getcwd()
        os.chdir(ROOT)
        try:
            main(["predict", "--config", "domains/calorimetry.yaml", "--config", "domains/calorimetry/add_electron.yaml",
                  "--model.init_args.init_from", str(lifecycle / "add_pb/checkpoints/last.ckpt"),
                  "--trainer.default_root_dir", str(stage), *CLI_TINY, "--ckpt_path", str(stage / "checkpoints/last.ckpt")])
        finally:
            os.chdir(cwd)
    return stage / "predictions"


@pytest.mark.slow
def test_fit_alone_and_predict_write_hdf5_and_pngs(lifecycle: Path, tmp_path: Path) -> None:
    from suite.cli import main

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        cli = main(["fit", "--config", "domains/calorimetry.yaml", "--trainer.default_root_dir", str(tmp_path), *CLI_TINY])
        assert "val/W_photon/nll" in cli.trainer.callback_metrics
    finally:
        os.chdir(cwd)
    out = _predict_add_electron(lifecycle)
    for cls in ("W_photon", "Ta_photon", "Pb_photon", "W_electron"):
        inc, showers = read_calochallenge(out / f"{cls}_generated.hdf5", GEO.n_voxels)
        assert len(inc) == len(showers) > 0 and showers.sum() > 0
        with h5py.File(out / f"{cls}_generated.hdf5") as f:
            assert f["incident_energies"].shape == (len(inc), 1)
        assert (out / f"{cls}_layers.png").stat().st_size > 1000 and (out / f"{cls}_observables.png").stat().st_size > 1000


@pytest.mark.slow
def test_reference_recipe_yamls_run(tmp_path: Path) -> None:
    """RAdam + MultiStepLR [5, 10, 15, 20] to pretrain, AdamW 1e-4 with 0.1 decay on the heads +
    MultiStepLR [5, 10] to fine-tune, gradients clipped at 1, the fm4cal network: as composed from YAML."""
    from suite.cli import main

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        arch = ["--model.init_args.architecture", "fm4cal", "--model.init_args.depth", "2"]
        pre = main(["fit", "--config", "domains/calorimetry.yaml", "--config", "domains/calorimetry/reference_recipe.yaml",
                    "--trainer.default_root_dir", str(tmp_path / "pre"), *CLI_TINY, *arch])
        opt, sched = pre.trainer.optimizers[0], pre.trainer.lr_scheduler_configs[0]
        assert isinstance(opt, torch.optim.RAdam) and opt.defaults["lr"] == 1e-3 and pre.trainer.gradient_clip_val == 1.0
        assert sorted(sched.scheduler.milestones) == [5, 10, 15, 20] and sched.interval == "epoch"
        ft = main(["fit", "--config", "domains/calorimetry.yaml", "--config", "domains/calorimetry/add_electron.yaml",
                   "--config", "domains/calorimetry/reference_recipe_finetune.yaml", "--trainer.default_root_dir", str(tmp_path / "ft"),
                   "--model.init_args.init_from", str(tmp_path / "pre/checkpoints/last.ckpt"), *CLI_TINY, *arch,
                   "--data.init_args.eval_classes", "[W_photon, Ta_photon, W_electron]"])  # no Pb stage in between
    finally:
        os.chdir(cwd)
    groups = ft.trainer.optimizers[0].param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0] and all(g["initial_lr"] == 1e-4 for g in groups)
    assert sorted(ft.trainer.lr_scheduler_configs[0].scheduler.milestones) == [5, 10]
    assert ft.model.outputs_unchanged() is True and ft.model.hparams["architecture"] == "fm4cal"


@pytest.mark.slow
def test_notebook_reads_the_lifecycle_run(lifecycle: Path) -> None:
    from tests.notebooks import assert_fresh, cell_outputs, run_notebook

    _predict_add_electron(lifecycle)
    nb = run_notebook("calorimetry.ipynb", env={"CALO_RUN": str(lifecycle), "OMP_NUM_THREADS": "1"})
    text = cell_outputs(nb)
    assert "add_pb_electron" in text and "no_forgetting" in text
    assert "W_electron: " in text and "E_dep/E_inc generated" in text  # the showers of the predicted stage
    # the metrics table it prints holds the test metrics the stage runner recorded (3 decimals)
    stages = json.loads((lifecycle / "stages.json").read_text())
    table = {tuple(line.split()[:2]): line.split()[2:] for line in text.splitlines() if line.split()[:1] and line.split()[0] in stages}
    for stage, res in stages.items():
        for key in (k for k in res.get("test", {}) if k.endswith("/nll")):
            cls = key.split("/")[1]
            printed = table[(stage, cls)]
            assert printed[0] == f"{res['test'][key]:.3f}" and printed[1] == f"{res['test'][f'test/{cls}/sep_mean']:.3f}"
    assert_fresh("calorimetry.ipynb", nb)
