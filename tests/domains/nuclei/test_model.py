"""Nuclei model parts: MALA, the SAM encoder factory with an official-layout checkpoint, the
HMF / BGMR / adapter switches and the post-processing on known outputs."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from domains.nuclei.adapters import MALA, DynamicDepthwiseConv
from domains.nuclei.model import NucleiSAM
from suite.adapters import LoRA, inject
from suite.backbones.sam import config_from_state, sam_image_encoder

ROOT = Path(__file__).resolve().parents[3]

TINY = {"embed_dim": 48, "depth": 2, "num_heads": 2, "window_size": 2, "global_attn_indexes": [1], "out_chans": 16}


def _block(dim=48):
    from segment_anything.modeling.image_encoder import Block

    torch.manual_seed(0)
    return Block(dim, num_heads=2, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=2,
                 input_size=(4, 4))


def test_mala_starts_as_the_frozen_block_and_trains_alone():
    model = nn.Module()
    model.blocks = nn.ModuleList([_block(), _block()])
    x = torch.randn(2, 4, 4, 48)
    ref = model.blocks[1](model.blocks[0](x))
    report = inject(model, MALA(r=8, kernel_sizes=[3, 5]))
    assert report.adapted == ["blocks.0", "blocks.1"]
    torch.testing.assert_close(model.blocks[1](model.blocks[0](x)), ref, rtol=0, atol=0)  # zero-init up-projection
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".base_layer." not in n for n in trainable)
    assert any("convs.1.bases" in n for n in trainable) and any("router" in n for n in trainable)


def test_dynamic_conv_equals_per_sample_convolution():
    torch.manual_seed(0)
    conv = DynamicDepthwiseConv(channels=6, kernel_size=5, num_bases=3)
    h = torch.randn(4, 6, 7, 9)
    mix = torch.softmax(torch.randn(4, 3), -1)
    out = conv(h, mix)
    for b in range(4):  # reference: mix the kernel for sample b, one ordinary depthwise conv
        kernel = (mix[b, :, None, None, None, None] * conv.bases).sum(0)
        ref = F.conv2d(h[b : b + 1], kernel, padding=2, groups=6)
        torch.testing.assert_close(out[b : b + 1], ref, rtol=1e-5, atol=1e-5)


def test_mala_mixture_is_per_image():
    model = nn.Module()
    model.blocks = nn.ModuleList([_block()])
    inject(model, MALA(r=8))
    mala = model.blocks[0]
    with torch.no_grad():
        for p in (mala.router.weight, mala.up.weight):
            p.normal_(0, 0.5)
    a, b, c = torch.randn(3, 1, 4, 4, 48).unbind(0)
    out_ab = mala(torch.cat([a, b]))
    out_ac = mala(torch.cat([a, c]))
    torch.testing.assert_close(out_ab[0], out_ac[0], rtol=1e-5, atol=1e-5)  # no leak across the batch
    h = mala.down(mala.base_layer(torch.cat([a, b]))).permute(0, 3, 1, 2)
    mix = torch.softmax(mala.router(h.mean((2, 3))), -1)
    assert not torch.allclose(mix[0], mix[1])


def test_mala_rejects_non_block_targets():
    model = nn.Module()
    model.blocks = nn.ModuleList([_block()])
    with pytest.raises(TypeError, match="MALA wraps ViT blocks"):
        inject(model, MALA(targets=["qkv"]))


@pytest.fixture(scope="module")
def sam_checkpoint(tmp_path_factory):
    """A small ImageEncoderViT saved like the official SAM files: a flat dict with image_encoder.* keys."""
    from segment_anything.modeling import ImageEncoderViT

    torch.manual_seed(1)
    enc = ImageEncoderViT(img_size=64, patch_size=8, embed_dim=48, depth=2, num_heads=2, out_chans=16, window_size=4,
                          global_attn_indexes=(1,), use_rel_pos=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    with torch.no_grad():  # SAM zero-initialises these; give them content so resizing is visible
        enc.pos_embed.normal_()
        for blk in enc.blocks:
            blk.attn.rel_pos_h.normal_()
            blk.attn.rel_pos_w.normal_()
    state = {f"image_encoder.{k}": v for k, v in enc.state_dict().items()}
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 16)  # the rest of a Sam checkpoint
    path = tmp_path_factory.mktemp("sam") / "sam_vit_tiny.pth"
    torch.save(state, path)
    return path, enc


def test_sam_checkpoint_same_size_reproduces_the_encoder(sam_checkpoint):
    path, enc = sam_checkpoint
    model, config = sam_image_encoder(path, img_size=64)
    assert (config.embed_dim, config.depth, config.num_heads, config.patch_size) == (48, 2, 2, 8)
    assert (config.window_size, tuple(config.global_attn_indexes), config.out_chans) == (4, (1,), 16)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model(x), enc(x), rtol=0, atol=0)


def test_sam_checkpoint_position_embeddings_interpolated(sam_checkpoint):
    path, enc = sam_checkpoint
    model, config = sam_image_encoder(path, img_size=32)  # 8x8 -> 4x4 tokens
    ref_abs = F.interpolate(enc.pos_embed.detach().permute(0, 3, 1, 2), size=(4, 4), mode="bicubic",
                            align_corners=False, antialias=True).permute(0, 2, 3, 1)
    torch.testing.assert_close(model.pos_embed.detach(), ref_abs)
    g = enc.blocks[1].attn.rel_pos_h.detach()  # global block: 15 -> 7 entries, linearly
    ref_rel = F.interpolate(g.t()[None], size=7, mode="linear", align_corners=False)[0].t()
    torch.testing.assert_close(model.blocks[1].attn.rel_pos_h.detach(), ref_rel)
    torch.testing.assert_close(model.blocks[0].attn.rel_pos_h, enc.blocks[0].attn.rel_pos_h)  # window unchanged
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, enc.blocks[0].attn.qkv.weight)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 16, 4, 4)


def test_sam_checkpoint_errors(tmp_path):
    bad = tmp_path / "not_sam.pth"
    torch.save({"prompt_encoder.x": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match=r"not_sam\.pth.*image_encoder\.patch_embed"):
        sam_image_encoder(bad)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        sam_image_encoder(tmp_path / "missing.pth")
    assert config_from_state  # imported API


def test_nuclei_model_honours_a_sam_checkpoint(sam_checkpoint):
    path, enc = sam_checkpoint
    model = NucleiSAM(checkpoint=str(path), img_size=64, decoder_dim=16, adapter=MALA(r=4))
    assert model.encoder_config.embed_dim == 48
    torch.testing.assert_close(model.backbone.blocks[0].base_layer.attn.qkv.weight, enc.blocks[0].attn.qkv.weight)
    out = model(torch.rand(2, 3, 64, 64) * 255)
    assert out["nucleus_prediction"].shape == (2, 2, 64, 64) and out["type_prediction"].shape == (2, 6, 64, 64)
    with pytest.raises(ValueError, match="encoder shapes the random encoder"):  # not silently ignored
        NucleiSAM(checkpoint=str(path), encoder=TINY, img_size=64)


@pytest.mark.parametrize(
    "kw, adapted, has_boundary",
    [
        ({"adapter": None, "hmf": False, "bgmr": False}, 0, False),
        ({"adapter": LoRA(r=2, targets=["qkv"]), "hmf": True, "bgmr": False}, 2, False),
        ({"adapter": MALA(r=4), "hmf": True, "bgmr": True}, 2, True),
    ],
)
def test_switches(kw, adapted, has_boundary):
    model = NucleiSAM(encoder=TINY, img_size=64, decoder_dim=16, **kw)
    assert len(model.report.adapted) == adapted
    frozen_encoder = [n for n, p in model.backbone.named_parameters() if p.requires_grad and "base_layer" in n]
    assert not frozen_encoder
    assert (model.hmf is not None) == kw["hmf"]
    x = torch.rand(2, 3, 64, 64) * 255
    out = model(x)
    assert ("boundary" in out) == has_boundary
    if has_boundary:  # zero-initialised refinement: refined logits equal the coarse ones at start
        feats = model.decoder(model.encode((x - model.pixel_mean) / model.pixel_std), (x - model.pixel_mean) / model.pixel_std)
        torch.testing.assert_close(out["nucleus_prediction"], model.np_head(feats))
    batch = {"image": x, "inst_map": torch.zeros(2, 64, 64, dtype=torch.long), "type_map": torch.zeros(2, 64, 64, dtype=torch.long),
             "hv": torch.zeros(2, 2, 64, 64), "boundary": torch.zeros(2, 64, 64)}
    batch["inst_map"][:, 10:20, 10:20] = 1
    batch["type_map"][:, 10:20, 10:20] = 2
    losses = model.compute_losses(batch)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"]) and ("boundary" in losses) == has_boundary


def test_boundary_map_stays_at_decoder_resolution_with_pooled_contours():
    """output_stride 2: HoVer-Net maps are upsampled to the tile, the boundary map is not; its
    target is the contour map max-pooled to that grid, so a 1-px contour still lands on it."""
    model = NucleiSAM(encoder=TINY, img_size=64, decoder_dim=16, adapter=None, hmf=False, bgmr=True,
                      output_stride=2, postprocess={"use_boundary": True})
    x = torch.rand(2, 3, 64, 64) * 255
    out = model(x)
    assert out["nucleus_prediction"].shape == (2, 2, 64, 64) and out["boundary"].shape == (2, 1, 32, 32)
    contour = torch.zeros(2, 64, 64)
    contour[:, 11, 10:30] = 1  # odd row: bilinear downsampling to 32 px would halve it
    batch = {"image": x, "inst_map": torch.zeros(2, 64, 64, dtype=torch.long),
             "type_map": torch.zeros(2, 64, 64, dtype=torch.long), "hv": torch.zeros(2, 2, 64, 64), "boundary": contour}
    with torch.no_grad():
        losses = model.compute_losses(batch)
        pooled = torch.zeros(2, 1, 32, 32)
        pooled[:, 0, 5, 5:15] = 1
        torch.testing.assert_close(losses["boundary"], model.boundary_loss(model(x)["boundary"], pooled))
        instances = model.predict_instances(out)  # the watershed reads the boundary upsampled to the tile
    assert len(instances) == 2 and instances[0][0].shape == (64, 64)

def _yaml_postprocess() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "domains" / "nuclei.yaml").read_text())["model"]["init_args"]["postprocess"]


@pytest.mark.parametrize("settings", ["hovernet", "yaml"])
def test_postprocess_recovers_instances_from_perfect_outputs(settings):
    from domains.nuclei.data import hover_maps
    from domains.nuclei.metrics import panoptic_quality
    from domains.nuclei.postprocess import config_for, hovernet_instances, instance_types

    # HoVer-Net's 40x settings, and the default YAML's (chosen on generated validation tiles): both split touching nuclei
    config = config_for(40, _yaml_postprocess() if settings == "yaml" else None)

    yy, xx = np.mgrid[:64, :64]
    inst = np.zeros((64, 64), np.int32)
    for i, (r, c, rad) in enumerate([(15, 15, 7), (15, 28, 7), (45, 40, 9), (50, 12, 5)], start=1):
        inst[(yy - r) ** 2 + (xx - c) ** 2 <= rad**2] = i  # nuclei 1 and 2 touch
    types = np.where(inst > 0, np.array([0, 1, 2, 3, 5])[inst], 0)
    fg = (inst > 0).astype(np.float32)
    logits = np.stack([1 - 2 * fg, 2 * fg - 1]) * 4
    pred = hovernet_instances(logits, hover_maps(inst), config=config)
    assert len(np.unique(pred[pred > 0])) == 4  # the touching pair is split
    assert panoptic_quality(inst, pred)[0] > 0.85
    pred_types = instance_types(pred, np.eye(6)[types].transpose(2, 0, 1))
    np.testing.assert_array_equal(pred_types[inst == 3], 3)
    # flat h/v maps (an untrained head): components, not an error
    assert hovernet_instances(logits, np.zeros((2, 64, 64), np.float32)).max() == 3
    # BGMR's boundary joined to the border (postprocess.use_boundary): the true contours keep 4 nuclei
    from skimage.segmentation import find_boundaries

    with_boundary = hovernet_instances(logits, hover_maps(inst), find_boundaries(inst, mode="inner").astype(np.float32), config)
    assert len(np.unique(with_boundary[with_boundary > 0])) == 4


def test_without_stem_the_decoder_sees_sam_features_only():
    model = NucleiSAM(encoder=TINY, img_size=64, decoder_dim=16, adapter=None, hmf=False, bgmr=True, stem=False)
    assert len(model.decoder.stem) == 0
    x = torch.rand(1, 3, 64, 64) * 255
    tokens = model.encode((x - model.pixel_mean) / model.pixel_std)
    # the decoder's output depends on the image only through the tokens: any image with these tokens decodes alike
    torch.testing.assert_close(model.decoder(tokens, x), model.decoder(tokens, torch.zeros_like(x)))
    with_stem = NucleiSAM(encoder=TINY, img_size=64, decoder_dim=16, adapter=None, hmf=False, bgmr=True)
    assert not torch.allclose(with_stem.decoder(tokens, x), with_stem.decoder(tokens, torch.zeros_like(x)))


def test_boundary_branch_is_multi_context():
    from domains.nuclei.model import BoundaryBranch

    branch = BoundaryBranch(12)
    assert [b[0].dilation for b in branch.branches] == [(1, 1), (2, 2), (4, 4)]
    assert branch(torch.randn(2, 12, 20, 20)).shape == (2, 1, 20, 20)


def test_postprocessing_follows_the_data_magnification():
    model = NucleiSAM(encoder=TINY, img_size=64, decoder_dim=16)
    assert (model.post_config(40).sobel_kernel_size, model.post_config(40).marker_threshold) == (21, 0.4)  # HoVer-Net
    assert (model.post_config(20).sobel_kernel_size, model.post_config(20).marker_threshold) == (11, 0.5)  # CellViT
    tuned = NucleiSAM(encoder=TINY, img_size=64, decoder_dim=16, postprocess={"marker_threshold": 0.3})
    assert (tuned.post_config(40).sobel_kernel_size, tuned.post_config(40).marker_threshold) == (21, 0.3)
    with pytest.raises(ValueError, match="no post-processing for 10x"):
        model.post_config(10)
    with pytest.raises(TypeError):
        NucleiSAM(encoder=TINY, img_size=64, decoder_dim=16, postprocess={"sobel": 3})


@pytest.mark.parametrize("stride", [1, 2])
def test_tiles_of_any_size_go_through_the_sliding_window(stride):
    model = NucleiSAM(encoder=TINY, img_size=64, decoder_dim=16, output_stride=stride).eval()
    x = torch.rand(1, 3, 64, 64) * 255
    with torch.no_grad():
        direct = model.infer(x)
        big = model.infer(torch.cat([torch.cat([x, x], -1)] * 2, -2)[..., :100, :120])
        small = model.infer(x[..., :40, :50])
    assert big["nucleus_prediction"].shape == (1, 2, 100, 120) and small["type_prediction"].shape == (1, 6, 40, 50)
    # one window exactly covering the tile is the plain forward pass
    torch.testing.assert_close(direct["nucleus_prediction"], model(x)["nucleus_prediction"])
    inst, types = model.predict_instances(big, 40)[0]
    assert inst.shape == types.shape == (100, 120)


def test_model_refuses_data_with_another_number_of_classes():
    from types import SimpleNamespace

    model = NucleiSAM(encoder=TINY, img_size=64, decoder_dim=16, num_types=5)
    model._trainer = SimpleNamespace(datamodule=SimpleNamespace(num_types=4, class_names=("a", "b", "c", "d")))
    with pytest.raises(ValueError, match="data has 4 nucleus classes .* --model.init_args.num_types 4"):
        model.setup("fit")
    four = NucleiSAM(encoder=TINY, img_size=64, decoder_dim=16, num_types=4)
    four._trainer = model._trainer
    four.setup("fit")
    assert four.class_names == ("a", "b", "c", "d")


def test_postprocess_is_the_same_inside_bf16_autocast():
    """Validation under bf16-mixed runs the watershed inside autocast; MONAI's torch steps must stay fp32."""
    from domains.nuclei.data import hover_maps
    from domains.nuclei.postprocess import hovernet_instances, instance_types

    yy, xx = np.mgrid[:64, :64]
    inst = np.zeros((64, 64), np.int32)
    for i, (r, c, rad) in enumerate([(15, 15, 7), (15, 28, 7), (45, 40, 9)], start=1):
        inst[(yy - r) ** 2 + (xx - c) ** 2 <= rad**2] = i
    fg = (inst > 0).astype(np.float32)
    logits, hv = np.stack([1 - 2 * fg, 2 * fg - 1]) * 4, hover_maps(inst)
    type_logits = np.eye(4, dtype=np.float32)[np.where(inst > 0, inst, 0)].transpose(2, 0, 1)
    reference = hovernet_instances(logits, hv)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = hovernet_instances(logits, hv)
        types = instance_types(pred, type_logits)
    np.testing.assert_array_equal(pred, reference)
    np.testing.assert_array_equal(types, instance_types(reference, type_logits))


def test_choose_postprocess_scores_every_setting_and_returns_the_best():
    from scipy import ndimage as ndi

    from domains.nuclei.data import hover_maps
    from domains.nuclei.metrics import panoptic_quality
    from domains.nuclei.postprocess import PostProcessConfig, choose_postprocess, hovernet_instances

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    outputs, truths = [], []
    for _ in range(3):  # touching discs; the h/v maps blurred as a network's come out
        inst = np.zeros((64, 64), np.int32)
        for i, (r, c) in enumerate(rng.uniform(10, 54, (5, 2)), start=1):
            inst[((yy - r) ** 2 + (xx - c) ** 2 <= rng.uniform(5, 9) ** 2) & (inst == 0)] = i
        fg = (inst > 0).astype(np.float32)
        hv = ndi.gaussian_filter(hover_maps(inst), (0, 1.5, 1.5))
        outputs.append((np.stack([1 - 2 * fg, 2 * fg - 1]) * 4, hv, None))
        truths.append(inst)
    outputs.append((np.stack([np.ones((64, 64)), -np.ones((64, 64))]), np.zeros((2, 64, 64)), None))
    truths.append(np.zeros((64, 64), np.int32))  # a tile without nuclei: skipped, as PanNuke's bPQ does
    grid = {"marker_threshold": (0.3, 0.4, 0.5, 0.6), "marker_radius": (1, 2)}
    best, results = choose_postprocess(outputs, truths, grid)
    assert [r[0] for r in results] == [{"marker_threshold": t, "marker_radius": m} for t in (0.3, 0.4, 0.5, 0.6) for m in (1, 2)]
    for settings, score in results:  # each score is the mean bPQ of the tiles with nuclei, scored directly
        config = PostProcessConfig(**settings)
        direct = np.mean([panoptic_quality(t, hovernet_instances(o[0], o[1], None, config))[0] for o, t in zip(outputs[:3], truths[:3])])
        assert score == pytest.approx(direct, abs=1e-12)
    assert best == max(results, key=lambda r: r[1])[0]
    assert max(r[1] for r in results) > 0.8 > min(r[1] for r in results)  # the settings matter on blurred maps
    with pytest.raises(ValueError, match="sobel"):
        choose_postprocess(outputs, truths, {"sobel": (3,)})
    with pytest.raises(ValueError, match="one truth per output"):
        choose_postprocess(outputs, truths[:2])
