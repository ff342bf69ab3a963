"""Tests for `jpeft.hf.gguf.read_gguf`, with transformers' own GGUF loader as the reference."""

import gc
import re

import gguf
import jax
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType

import jpeft
from jpeft.hf.gguf import read_gguf


def _write(path, arch, metadata, tensors):
    """Write a GGUF file: `metadata` maps GGUFWriter `add_*` suffixes to values, `tensors` maps
    names to arrays or `(raw bytes, GGML type)` pairs."""
    writer = gguf.GGUFWriter(str(path), arch)
    for method, value in metadata.items():
        getattr(writer, f"add_{method}")(value)
    for name, tensor in tensors.items():
        if isinstance(tensor, tuple):
            writer.add_tensor(name, tensor[0], raw_shape=tensor[0].shape, raw_dtype=tensor[1])
        else:
            writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _permute(weight, n_head, n_head_kv):
    """llama.cpp's `LlamaModel.permute`: HF rotate-half rows to ggml's interleaved RoPE rows."""
    if n_head != n_head_kv:
        n_head = n_head_kv
    rows = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, 2, rows, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _convert(model, arch, path):
    """Write `model` as llama.cpp's convert_hf_to_gguf.py would, alternating F32 and Q8_0 matrices.

    Returns the HF names that were stored exactly (F32)."""
    cfg = model.config
    if arch == "gpt2":
        layers = cfg.n_layer
        metadata = {
            "context_length": cfg.n_positions, "embedding_length": cfg.n_embd,
            "feed_forward_length": 4 * cfg.n_embd, "block_count": layers,
            "head_count": cfg.n_head, "layer_norm_eps": cfg.layer_norm_epsilon,
        }
    else:
        layers = cfg.num_hidden_layers
        metadata = {
            "context_length": cfg.max_position_embeddings, "embedding_length": cfg.hidden_size,
            "feed_forward_length": cfg.intermediate_size, "block_count": layers,
            "head_count": cfg.num_attention_heads, "head_count_kv": cfg.num_key_value_heads,
            "rope_freq_base": cfg.rope_parameters["rope_theta"],
            "layer_norm_rms_eps": cfg.rms_norm_eps, "vocab_size": cfg.vocab_size,
            "rope_dimension_count": cfg.hidden_size // cfg.num_attention_heads,
        }
        if arch == "qwen3":
            metadata |= {"key_length": cfg.head_dim, "value_length": cfg.head_dim}
    metadata |= {
        "token_list": [f"t{i}" for i in range(cfg.vocab_size)],
        "bos_token_id": 1, "eos_token_id": 2,
    }
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], layers)
    tensors, exact = {}, set()
    for hf_name, value in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        base, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        value = value.numpy()
        if arch == "llama" and ".attn_q." in name:
            value = _permute(value, cfg.num_attention_heads, cfg.num_attention_heads)
        if arch == "llama" and ".attn_k." in name:
            value = _permute(value, cfg.num_attention_heads, cfg.num_key_value_heads)
        if arch == "gpt2" and hf_name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            value = value.T
        value = np.ascontiguousarray(value)
        if value.ndim == 2 and len(tensors) % 2:
            tensors[name] = (gguf.quants.quantize(value, GGMLQuantizationType.Q8_0),
                             GGMLQuantizationType.Q8_0)
        else:
            tensors[name] = value
            exact.add(hf_name)
        if arch == "gpt2" and name == "token_embd.weight":  # the converter's untied copy
            tensors["output.weight"] = tensors[name]
            if hf_name in exact:
                exact.add("lm_head.weight")
    _write(path, arch, metadata, tensors)
    return exact


def _assert_matches_transformers(config, state, model):
    """Every tensor equals the transformers-loaded one exactly; config values agree."""
    reference = model.state_dict()
    tied = config["tie_word_embeddings"]
    assert set(state) == set(reference) - ({"lm_head.weight"} if tied else set())
    for name, value in state.items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, reference[name].numpy(), err_msg=name)
    expected = model.config.to_dict()
    if expected.get("n_inner", 0) is None:  # transformers' GGUF loader leaves GPT-2's at 4 * n_embd
        expected["n_inner"] = 4 * expected["n_embd"]
    for key, value in config.items():
        if key != "architectures":  # transformers' GGUF loader leaves it unset
            assert expected[key] == value, key


def test_smollm2_matches_transformers(smollm2_file, smollm2_transformers):
    config, state = read_gguf(smollm2_file)
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 100000.0}
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_transformers)
    _assert_matches_transformers(config, state, model)


_TINY = {
    "llama": transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "qwen2": transformers.Qwen2Config(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    # transformers' GGUF loader ignores qwen3 head_dim, so use Qwen3Config's default of 128
    "qwen3": transformers.Qwen3Config(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=128, tie_word_embeddings=True),
    # it also ignores gpt2's context length, so n_positions stays GPT2Config's 1024
    "gpt2": transformers.GPT2Config(
        vocab_size=64, n_embd=64, n_layer=1, n_head=4, bos_token_id=1, eos_token_id=2),
}


@pytest.mark.parametrize("arch", sorted(_TINY))
def test_converted_model_round_trips(arch, tmp_path):
    """A model written like llama.cpp's converter reads back in HF layout, as transformers does."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_TINY[arch])
    exact = _convert(model, arch, tmp_path / "tiny.gguf")
    config, state = read_gguf(tmp_path / "tiny.gguf")
    original = model.state_dict()
    for name, value in state.items():
        tolerance = 0 if name in exact else 2e-3  # Q8_0 error on weights of scale 0.02
        np.testing.assert_allclose(value, original[name].numpy(), rtol=0, atol=tolerance)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    _assert_matches_transformers(config, state, loaded)


@pytest.mark.parametrize("arch", sorted(_TINY))
def test_loaded_parameters_keep_no_part_of_the_file(arch, tmp_path):
    """The loaded tree owns its memory: no parameter aliases the reader's memory map (JAX
    adopted a float32 norm's view of it, which kept the whole file mapped and resident
    for as long as the parameters lived)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_TINY[arch])
    _convert(model, arch, tmp_path / "tiny.gguf")
    path = str((tmp_path / "tiny.gguf").resolve())
    _, params = jpeft.models.from_pretrained(tmp_path / "tiny.gguf")
    gc.collect()
    with open("/proc/self/maps") as maps:
        assert [line for line in maps if line.rstrip().endswith(path)] == []
    assert jax.tree.leaves(params)


def _llama_file(path, tensors, arch="llama"):
    metadata = {
        "context_length": 32, "embedding_length": 32, "feed_forward_length": 64,
        "block_count": 1, "head_count": 2, "layer_norm_rms_eps": 1e-5,
    }
    _write(path, arch, metadata, {"token_embd.weight": np.zeros((8, 32), np.float32)} | tensors)


def test_unsupported_quant_type_names_tensor_and_type(tmp_path):
    qtype = GGMLQuantizationType.Q8_1
    with pytest.raises(NotImplementedError):  # keep the test honest if gguf gains Q8_1 support
        gguf.quants.dequantize(np.zeros(gguf.GGML_QUANT_SIZES[qtype][1], np.uint8), qtype)
    raw = np.zeros((32, 32 // 32 * gguf.GGML_QUANT_SIZES[qtype][1]), np.uint8)
    _llama_file(tmp_path / "q.gguf", {"blk.0.attn_q.weight": (raw, qtype)})
    with pytest.raises(ValueError, match=r"'blk\.0\.attn_q\.weight'.*Q8_1.*Q4_K") as info:
        read_gguf(tmp_path / "q.gguf")
    assert str(tmp_path / "q.gguf") in str(info.value)


def test_truncated_missing_and_non_gguf_files_name_the_path(tmp_path):
    whole = tmp_path / "whole.gguf"
    _llama_file(whole, {"blk.0.attn_norm.weight": np.ones(32, np.float32)})
    data = whole.read_bytes()
    read_gguf(whole)  # the intact file reads
    for size in (2, 40, len(data) // 2, len(data) - 8):
        truncated = tmp_path / f"truncated{size}.gguf"
        truncated.write_bytes(data[:size])
        reason = f"{re.escape(str(truncated))}: (truncated|not a GGUF)"
        with pytest.raises(ValueError, match=reason):
            read_gguf(truncated)
    text = tmp_path / "model.gguf"
    text.write_text("definitely not a model")
    with pytest.raises(ValueError, match=f"{re.escape(str(text))}: not a GGUF file"):
        read_gguf(text)
    with pytest.raises(ValueError, match="cannot open"):
        read_gguf(tmp_path / "missing.gguf")


def test_unsupported_architecture_is_named(tmp_path):
    _llama_file(tmp_path / "phi.gguf", {}, arch="phi2")
    with pytest.raises(ValueError, match=r"'phi2'.*\['gpt2', 'llama', 'qwen2', 'qwen3'\]"):
        read_gguf(tmp_path / "phi.gguf")


def test_yarn_rope_scaling_is_refused_when_read(tmp_path):
    metadata = {
        "context_length": 32, "embedding_length": 32, "feed_forward_length": 64,
        "block_count": 1, "head_count": 2, "layer_norm_rms_eps": 1e-5,
        "rope_scaling_type": gguf.RopeScalingType.YARN, "rope_scaling_factor": 4.0,
    }
    path = tmp_path / "yarn.gguf"
    _write(path, "llama", metadata, {"token_embd.weight": np.zeros((8, 32), np.float32)})
    with pytest.raises(ValueError, match=r"yarn.gguf: GGUF rope scaling type 'yarn' is not"):
        read_gguf(path)


def test_dequantized_in_blocks_as_gguf_dequantizes_whole(smollm2_file):
    """Every tensor of the real file, dequantised a block of rows at a time, equals
    ``gguf.quants.dequantize`` of the whole tensor, value for value."""
    from gguf.quants import dequantize

    from jpeft.hf.gguf import _dequantize, open_reader

    for tensor in open_reader(smollm2_file).tensors:
        whole = np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32)
        shape = tuple(reversed(tensor.shape.tolist()))
        np.testing.assert_array_equal(_dequantize(tensor), whole.reshape(shape), tensor.name)


def test_open_reader_parses_as_gguf_reader_does(smollm2_file):
    """jpeft's reader (gguf's, over a plain view of the file's memory map) gives every
    header field and every tensor's bytes of the real SmolLM2 file exactly as
    ``gguf.GGUFReader`` does."""
    from jpeft.hf.gguf import open_reader

    ours, theirs = open_reader(smollm2_file), gguf.GGUFReader(smollm2_file)
    assert list(ours.fields) == list(theirs.fields)
    for name, field in theirs.fields.items():
        assert field.types == ours.fields[name].types, name
        assert field.data == ours.fields[name].data, name
        assert len(field.parts) == len(ours.fields[name].parts), name
        for mine, want in zip(ours.fields[name].parts, field.parts, strict=True):
            np.testing.assert_array_equal(mine, want, err_msg=name)
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, want in zip(ours.tensors, theirs.tensors, strict=True):
        assert (mine.tensor_type, mine.data_offset) == (want.tensor_type, want.data_offset)
        np.testing.assert_array_equal(mine.data, want.data, err_msg=want.name)
