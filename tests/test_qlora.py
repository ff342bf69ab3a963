"""QLoRA: LoRA over NF4 bases (the method contract, merging, SmolLM2 training), PEFT's
parameter counts, and 4-bit checkpoints to and from transformers + bitsandbytes on CPU."""

from __future__ import annotations

import contextlib
import io
import json

import contract
import hf_models
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers

import jpeft
from jpeft import lora, qlora
from jpeft.hf import bitsandbytes as hf_bnb
from jpeft.hf import checkpoints
from jpeft.quant import nf4

# Logits of the same dequantised float32 weights in jpeft and in transformers +
# bitsandbytes: only the matmul summation order differs (as PEFT_LOGITS_TOLERANCE).
BNB_LOGITS_TOLERANCE = 1e-5
# A merged float32 tree vs the factored forward over the same dequantised base.
MERGE_TOLERANCE = contract.MERGE_TOLERANCE
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _bnb_config(**options) -> transformers.BitsAndBytesConfig:
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=options.get("quant_type", "nf4"),
        bnb_4bit_use_double_quant=options.get("double_quant", True),
        bnb_4bit_compute_dtype=torch.float32,
    )


def _load_bnb(folder, **options):
    """transformers + bitsandbytes 4-bit model on CPU, in train mode: bitsandbytes'
    ``Linear4bit`` then dequantises to float32 and multiplies on every CPU (in eval mode
    it repacks weights for a bfloat16 kernel, on AVX512-BF16 machines only)."""
    quantization = {"quantization_config": _bnb_config(**options)} if options else {}
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, device_map="cpu", dtype=torch.float32, **quantization
    ).train()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    hf_models.make("llama", folder, initializer_range=contract.INIT_STD)
    return jpeft.models.from_pretrained(folder)


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    """A tiny float32 Llama whose linear layers have whole 64-element blocks per row.

    bitsandbytes 0.50's native CPU ``dequantize_4bit`` reads rows shorter than a block
    (hidden size 32, say) in another block layout than its quantiser writes, so transformers
    on CPU would compute with wrong weights; real models' sizes are multiples of 64.
    """
    folder = tmp_path_factory.mktemp("llama64")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def _logits(model, params, data):
    return np.asarray(model(params, data["input_ids"], attention_mask=data["attention_mask"]))


def _valid(data):
    return data["attention_mask"].astype(bool)


def test_contract_with_an_nf4_base(tiny_llama, tmp_path):
    """The LoRA contract over a 4-bit base (QLoRA's setting: NF4, double quantisation, every
    linear adapted): identity at init, jit equals eager, gradients on the LoRA factors
    only, the NF4 base bitwise unchanged, one compile, save/load exact, merge equals the
    factored forward, and the loss falls."""
    model, params = tiny_llama
    base = qlora.quantize(params, compute_dtype=jnp.float32)
    config = lora.LoraConfig(r=4, target_modules="all-linear")

    def add(p, key):
        return lora.apply(p, config=config, key=key)

    trained = contract.check_all(
        model, base, add, lora.merge, contract.batch(97), [".a", ".b"], tmp_path / "adapter"
    )
    q_proj = trained["model"]["layers"]["self_attn"]["q_proj"]["weight"]
    assert isinstance(q_proj, lora.LoraWeight) and isinstance(q_proj.w, nf4.NF4Weight)


def test_quantize_defaults_to_every_linear_but_the_head(tiny_llama):
    _, params = tiny_llama
    quantised = qlora.quantize(params)
    layers = quantised["model"]["layers"]
    kinds = {
        name: type(layers[group][name]["weight"])
        for group in ("self_attn", "mlp")
        for name in layers[group]
    }
    assert kinds == {name: nf4.NF4Weight for name in _LINEARS}
    node = layers["mlp"]["down_proj"]["weight"]
    assert (node.shape, node.compute_dtype, node.block_size) == ((48, 32), jnp.bfloat16, 64)
    assert node.codes.shape[0] == 2 and node.nested_offset.shape == (2,)  # stacked layers
    for path in (("lm_head",), ("model", "embed_tokens"), ("model", "norm")):
        entry = quantised
        for key in path:
            entry = entry[key]
        assert isinstance(entry["weight"], jax.Array)
    assert not isinstance(layers["input_layernorm"]["weight"], nf4.NF4Weight)


@pytest.mark.parametrize("targets", [None, ["q_proj", "down_proj"]])
def test_quantising_while_loading_equals_quantising_after(tiny64, targets):
    """qlora.from_pretrained quantises each weight as it is read (the float model never
    exists whole) and gives bitwise the tree that quantize gives on the loaded model."""
    _, params = jpeft.models.from_pretrained(tiny64)
    expected = qlora.quantize(params, targets=targets, compute_dtype=jnp.float32)
    _, loaded = qlora.from_pretrained(tiny64, targets=targets, compute_dtype=jnp.float32)
    assert jax.tree.structure(loaded) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="match no module"):
        qlora.from_pretrained(tiny64, targets=["q_prj"])


def test_dequantisation_stays_inside_the_layer_scan(tiny_llama):
    """No dense copy of a stacked quantised weight is formed outside the scan: the forward's
    top-level jaxpr holds no float array of the stacked ``[l, in, out]`` size."""
    model, params = tiny_llama
    quantised = qlora.quantize(params, compute_dtype=jnp.float32)
    jaxpr = jax.make_jaxpr(lambda p: model(p, contract.batch(97)["input_ids"]))(quantised)
    stacked_sizes = {2 * 32 * 32, 2 * 32 * 16, 2 * 32 * 48}
    outside = contract.top_level_float_arrays(jaxpr, stacked_sizes)
    assert not outside, outside
    assert any(eqn.primitive.name == "scan" for eqn in jaxpr.eqns)


def test_merge_folds_into_the_dequantised_base(tiny_llama):
    """``qlora.merge`` equals the factored forward; merging the same adapter into the
    original float32 weights (unsloth-zoo#810) misses the quantisation error and does not."""
    model, params = tiny_llama
    data = contract.batch(97)
    quantised = qlora.quantize(params, compute_dtype=jnp.float32)
    adapted = lora.apply(
        quantised, rank=4, targets="all-linear", key=jax.random.key(0), init_lora_weights=False
    )
    out = _logits(model, adapted, data)

    merged = qlora.merge(adapted)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(merged))
    assert merged["model"]["layers"]["mlp"]["up_proj"]["weight"].dtype == jnp.float32
    merged_error = np.abs(_logits(model, merged, data) - out)[_valid(data)].max()
    assert merged_error < MERGE_TOLERANCE

    pristine = lora.merge(lora.attach(params, lora.extract(adapted)))
    pristine_error = np.abs(_logits(model, pristine, data) - out)[_valid(data)].max()
    assert pristine_error > 100 * merged_error, (pristine_error, merged_error)

    half = qlora.merge(adapted, dtype=jnp.bfloat16)
    assert half["model"]["layers"]["self_attn"]["q_proj"]["weight"].dtype == jnp.bfloat16
    assert half["lm_head"]["weight"].dtype == jnp.float32  # never quantised: untouched


def test_merge_can_requantise(tiny_llama):
    model, params = tiny_llama
    quantised = qlora.quantize(
        params, targets=["q_proj", "v_proj", "up_proj"], compute_dtype=jnp.float32, block_size=128
    )
    adapted = lora.apply(
        quantised, rank=4, targets=["q_proj"], key=jax.random.key(0), init_lora_weights=False
    )
    requantised = qlora.merge(adapted, requantize=True)
    layers = requantised["model"]["layers"]
    q_proj, v_proj = (
        layers["self_attn"]["q_proj"]["weight"],
        layers["self_attn"]["v_proj"]["weight"],
    )
    assert isinstance(q_proj, nf4.NF4Weight) and (q_proj.block_size, q_proj.double_quant) == (
        128,
        True,
    )
    assert v_proj is adapted["model"]["layers"]["self_attn"]["v_proj"]["weight"]  # unadapted
    dense = qlora.merge(adapted, dtype=jnp.float32)["model"]["layers"]["self_attn"]["q_proj"]
    expected = nf4.quantize(dense["weight"], block_size=128, compute_dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(q_proj.codes), np.asarray(expected.codes))
    assert isinstance(layers["self_attn"]["k_proj"]["weight"], jax.Array)


def _peft_line(model) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        model.print_trainable_parameters()
    return out.getvalue().strip()


def _jpeft_line(params) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jpeft.print_trainable_parameters(params)
    return out.getvalue().strip()


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_trainable_parameter_line_matches_peft_on_a_bitsandbytes_model(tiny64, targets):
    """transformers loads the model in 4 bits on CPU; PEFT counts each ``Params4bit`` as
    twice its packed bytes, and jpeft's NF4 nodes count the same."""
    hf = _load_bnb(tiny64, double_quant=True)
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=4, target_modules=targets))
    model, params = jpeft.models.from_pretrained(tiny64)
    ours = lora.apply(qlora.quantize(params), rank=4, targets=targets, key=jax.random.key(0))
    assert _jpeft_line(ours) == _peft_line(peft_model)


@pytest.mark.parametrize(
    "options",
    [
        {"double_quant": True},
        {"double_quant": False, "quant_type": "fp4"},
    ],
)
def test_bitsandbytes_checkpoint_round_trip(tiny64, tmp_path, options):
    """transformers quantises and saves; jpeft loads the bytes as they are, computes the
    same logits, and saves a folder that is the same file content, which transformers
    loads back to the same logits."""
    _load_bnb(tiny64, **options).save_pretrained(tmp_path / "bnb")
    data = contract.batch(97)
    reference = hf_models.hf_logits(
        _load_bnb(tmp_path / "bnb"), data["input_ids"], data["attention_mask"]
    )
    model, params = hf_bnb.from_pretrained_4bit(tmp_path / "bnb")
    saved = safetensors.numpy.load_file(str(tmp_path / "bnb" / "model.safetensors"))
    node = params["model"]["layers"]["mlp"]["down_proj"]["weight"]
    assert node.quant_type == options.get("quant_type", "nf4")
    for i in range(2):
        packed = saved[f"model.layers.{i}.mlp.down_proj.weight"]
        np.testing.assert_array_equal(np.asarray(node.codes[i]), packed.reshape(-1))
    out = _logits(model, params, data)
    np.testing.assert_allclose(
        out[_valid(data)], reference[_valid(data)], atol=BNB_LOGITS_TOLERANCE
    )

    config = checkpoints.read_config(tmp_path / "bnb")
    hf_bnb.save_pretrained_4bit(model, params, tmp_path / "jpeft", config=config)
    written = safetensors.numpy.load_file(str(tmp_path / "jpeft" / "model.safetensors"))
    assert written.keys() == saved.keys()
    for key, array in saved.items():
        np.testing.assert_array_equal(written[key], array, err_msg=key)
    again = hf_models.hf_logits(
        _load_bnb(tmp_path / "jpeft"), data["input_ids"], data["attention_mask"]
    )
    np.testing.assert_array_equal(again, reference)


def test_jpeft_quantised_model_loads_in_transformers(tiny64, tmp_path):
    """A model quantised by jpeft (only some modules), saved in bitsandbytes' format:
    transformers computes jpeft's logits, and the 4-bit codes are those transformers
    makes itself from the same float32 weights."""
    model, params = jpeft.models.from_pretrained(tiny64)
    quantised = qlora.quantize(params, targets=["q_proj", "down_proj"], compute_dtype=jnp.float32)
    config = checkpoints.read_config(tiny64)
    hf_bnb.save_pretrained_4bit(model, quantised, tmp_path, config=config)
    settings = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert settings["bnb_4bit_quant_type"] == "nf4" and settings["bnb_4bit_use_double_quant"]
    assert "model.layers.1.mlp.up_proj" in settings["llm_int8_skip_modules"]
    assert "model.layers.1.mlp.down_proj" not in settings["llm_int8_skip_modules"]

    data = contract.batch(97)
    hf = _load_bnb(tmp_path)
    assert type(hf.model.layers[1].mlp.down_proj).__name__ == "Linear4bit"
    assert type(hf.model.layers[1].mlp.up_proj).__name__ == "Linear"
    expected = hf_models.hf_logits(hf, data["input_ids"], data["attention_mask"])
    out = _logits(model, quantised, data)
    np.testing.assert_allclose(out[_valid(data)], expected[_valid(data)], atol=BNB_LOGITS_TOLERANCE)
    theirs = _load_bnb(tiny64, double_quant=True).model.layers[0].self_attn.q_proj.weight
    ours = quantised["model"]["layers"]["self_attn"]["q_proj"]["weight"].codes[0]
    np.testing.assert_array_equal(np.asarray(ours), theirs.data.numpy().reshape(-1))

    back_model, back = hf_bnb.from_pretrained_4bit(tmp_path)
    np.testing.assert_array_equal(_logits(back_model, back, data), out)


def test_a_qlora_adapter_saves_and_exports_without_its_4bit_base(tiny64, tmp_path):
    """LoRA trained over an NF4 base: the Orbax adapter and the HF PEFT export hold the
    factors only; both load back onto the quantised base bitwise, and peft computes jpeft's
    logits with the export over the same 4-bit base in transformers + bitsandbytes."""
    model, params = jpeft.models.from_pretrained(tiny64)
    quantised = qlora.quantize(params, compute_dtype=jnp.float32)
    adapted = lora.apply(quantised, rank=4, targets=["q_proj", "v_proj", "down_proj"],
                         key=jax.random.key(1), init_lora_weights=False)  # B != 0

    jpeft.save_adapter(adapted, tmp_path / "adapter")
    saved = jpeft.checkpoint.read_adapter_metadata(tmp_path / "adapter")
    assert {name for e in saved["entries"] for name in e["arrays"]} == {"a", "b", "scale"}
    loaded = jpeft.load_adapter(quantised, tmp_path / "adapter")
    assert jax.tree.structure(loaded) == jax.tree.structure(adapted)
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(adapted), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    folder = jpeft.hf.export_peft(adapted, tmp_path / "hf", base_model_name_or_path=str(tiny64))
    tensors = safetensors.numpy.load_file(str(folder / "adapter_model.safetensors"))
    assert all(".lora_A." in k or ".lora_B." in k for k in tensors)
    assert len(tensors) == 2 * 3 * 2  # A and B of three modules in two layers
    imported = jpeft.hf.import_peft(quantised, folder)
    for got, want in zip(jax.tree.leaves(imported), jax.tree.leaves(adapted), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    data = contract.batch(97)  # peft over the same 4-bit bytes, as bitsandbytes loads them
    config = checkpoints.read_config(tiny64)
    hf_bnb.save_pretrained_4bit(model, quantised, tmp_path / "base", config=config)
    # peft puts a loaded adapter's model in eval mode: back to train mode, as _load_bnb
    # does, or AVX512-BF16 CPUs run bitsandbytes' bfloat16 kernel (errors near 2e-3).
    hf = peft.PeftModel.from_pretrained(_load_bnb(tmp_path / "base"), folder).train()
    assert type(hf.base_model.model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    expected = hf_models.hf_logits(hf, data["input_ids"], data["attention_mask"])
    out = _logits(model, adapted, data)
    np.testing.assert_allclose(out[_valid(data)], expected[_valid(data)], atol=BNB_LOGITS_TOLERANCE)
    assert np.abs(out - _logits(model, quantised, data)).max() > 1e-3  # the adapter counts


def _rewrite(folder, edit):
    path = folder / "model.safetensors"
    tensors = dict(safetensors.numpy.load_file(str(path)))
    edit(tensors)
    safetensors.numpy.save_file(tensors, str(path), metadata={"format": "pt"})


def test_corrupt_4bit_checkpoints_fail_clearly(tiny64, tmp_path):
    model, params = jpeft.models.from_pretrained(tiny64)
    config = checkpoints.read_config(tiny64)
    key = "model.layers.1.self_attn.v_proj.weight.quant_state.bitsandbytes__nf4"

    def saved(name):
        hf_bnb.save_pretrained_4bit(model, qlora.quantize(params), tmp_path / name, config=config)
        return tmp_path / name

    folder = saved("json")
    _rewrite(folder, lambda t: t.__setitem__(key, t[key][:-9]))
    with pytest.raises(
        checkpoints.CheckpointError,
        match="v_proj.weight.quant_state.bitsandbytes__nf4 is not valid",
    ):
        hf_bnb.from_pretrained_4bit(folder)

    folder = saved("absmax")
    absmax = "model.layers.0.mlp.up_proj.weight.absmax"
    _rewrite(folder, lambda t: t.__setitem__(absmax, t[absmax][:-1]))
    with pytest.raises(checkpoints.CheckpointError, match="up_proj.weight.absmax has 127"):
        hf_bnb.from_pretrained_4bit(folder)

    def dense_gate_proj(tensors):  # layer 1's gate_proj stored unquantised
        for k in [k for k in tensors if k.startswith("model.layers.1.mlp.gate_proj.weight")]:
            del tensors[k]
        tensors["model.layers.1.mlp.gate_proj.weight"] = np.zeros((128, 64), np.float32)

    folder = saved("partial")
    _rewrite(folder, dense_gate_proj)
    with pytest.raises(checkpoints.CheckpointError, match=r"quantised in layers \[0\] only"):
        hf_bnb.from_pretrained_4bit(folder)

    with pytest.raises(checkpoints.CheckpointError, match="no quantization_config"):
        hf_bnb.from_pretrained_4bit(tiny64)
    folder = saved("method")
    config_path = folder / "config.json"
    broken = json.loads(config_path.read_text())
    broken["quantization_config"]["quant_method"] = "gptq"
    config_path.write_text(json.dumps(broken))
    with pytest.raises(checkpoints.CheckpointError, match="quant_method 'gptq'"):
        hf_bnb.from_pretrained_4bit(folder)


def test_bad_quantisation_requests_fail_clearly(tiny_llama, tmp_path):
    model, params = tiny_llama
    with pytest.raises(ValueError, match="block size 100 is not supported"):
        qlora.quantize(params, block_size=100)
    with pytest.raises(ValueError, match="not a linear layer"):
        qlora.quantize(params, targets=["embed_tokens"])
    with pytest.raises(ValueError, match=r"layers \[1\] of the stacked module"):
        qlora.quantize(params, targets=r"model\.layers\.1\.self_attn\.q_proj")
    quantised = qlora.quantize(params)
    with pytest.raises(ValueError, match="already a NF4Weight"):
        qlora.quantize(quantised)
    adapted = lora.apply(quantised, rank=2, key=jax.random.key(0))
    with pytest.raises(ValueError, match="LoraWeight: merge adapters first"):
        hf_bnb.save_pretrained_4bit(model, adapted, tmp_path, config={})
    mixed = qlora.quantize(params, targets=["q_proj"], quant_type="fp4")
    mixed = qlora.quantize(mixed, targets=["v_proj"])
    with pytest.raises(ValueError, match="share quant_type"):
        hf_bnb.save_pretrained_4bit(model, mixed, tmp_path, config={})


def test_smollm2_quantizes_to_4_bits_and_a_step_runs_over_it(smollm2_file):
    model, params = jpeft.models.from_pretrained(smollm2_file, dtype=jnp.bfloat16)
    quantised = qlora.quantize(params)  # every linear of the 30 layers, bfloat16 compute
    nodes = [x for _, x in jpeft.tree.iter_nodes(quantised) if isinstance(x, nf4.NF4Weight)]
    weights = sum(int(np.prod(n.codes.shape[:-1])) * n.shape[0] * n.shape[1] for n in nodes)
    stored = sum(x.nbytes for n in nodes for x in jax.tree.leaves(n))
    assert len(nodes) == 7 and 0.5 < stored / weights < 0.53  # 4.127 bits + nested maps

    tokenizer = jpeft.models.load_tokenizer(smollm2_file)
    text = "The secret password of the jpeft project is purple-otter-42. " * 3
    ids = np.asarray(tokenizer([text])["input_ids"], np.int32)
    data = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    adapted = lora.apply(quantised, rank=8, targets=["q_proj", "v_proj"], key=jax.random.key(0))
    # Two steps: bfloat16 compute over the NF4 base trains (test_cli_qlora trains SmolLM2
    # over NF4 through the CLI and generates with the adapter).
    _, losses, _ = contract.run_steps(model, adapted, data, steps=2, learning_rate=3e-3)
    assert losses[-1] < 0.95 * losses[0], losses  # seen 0.93 after 2 steps
