"""DoRA (``use_dora=True``): against the real `peft` in both directions (logits, merge,
trainable counts, gradients with the norm detached), QDoRA against peft over the same
bitsandbytes 4-bit base, the column norms from the factors (never forming ``W + s·A@B``
in a step), the contract, ``jpeft train --use-dora``, and bad input."""

from __future__ import annotations

import contextlib
import dataclasses
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
from cli_fixtures import make_tiny_chat_model, run
from test_qlora import _load_bnb, tiny64  # noqa: F401  (tiny64 is a fixture)

import jpeft
from jpeft import dora, lora, qlora, train
from jpeft.hf import bitsandbytes as hf_bnb
from jpeft.hf import checkpoints
from jpeft.quant import nf4

LOGITS_TOLERANCE = 1e-4  # float32, torch vs XLA summation order
MERGE_TOLERANCE = 1e-5  # float32: m/‖W + s·BA‖ ⊙ (W + s·BA) folded by peft vs jpeft
# float32 gradients of the same objective, torch vs XLA summation order: of each tensor's
# largest gradient (up to ~100 here, the objective sums 2328 weighted logits).
GRAD_RTOL = 1e-5
NORM_RTOL = 1e-5  # float32: the factored column norms against the formed matrix's


def _print_line(fn) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fn()
    return out.getvalue().strip()


def _peft_logits(peft_model, data):
    return hf_models.hf_logits(peft_model, data["input_ids"], data["attention_mask"])


def _logits(model, params, data) -> np.ndarray:
    return np.asarray(model(params, data["input_ids"], attention_mask=data["attention_mask"]))


def _moved(params, key):
    """`params` with every DoRA magnitude scaled by a random factor in [0.5, 1.5]: at
    initialisation ``m = ‖W + s·A@B‖``, where a wrong magnitude or norm would not show."""
    return contract.scale_field(params, key, dora.DoraWeight, "magnitude")


def _dora_nodes(params) -> list[dora.DoraWeight]:
    return [x for _, x in jpeft.tree.iter_nodes(params) if isinstance(x, dora.DoraWeight)]


@pytest.mark.parametrize("kind,options", [
    ("llama", {"rank": 2, "alpha": 6, "targets": "all-linear", "layers_to_transform": [1],
               "use_rslora": True}),
    ("gpt2", {"rank": 4, "targets": ["c_attn", "c_fc"], "bias": "lora_only"}),
])  # fmt: skip
def test_export_loads_in_peft_with_equal_logits_merge_and_counts(kind, options, tmp_path):
    hf_models.make(kind, tmp_path / "base", initializer_range=contract.INIT_STD)
    model, params = jpeft.models.from_pretrained(tmp_path / "base")
    adapted = lora.apply(
        params, key=jax.random.key(0), use_dora=True, init_lora_weights=False, **options
    )
    # Unadapted layers' magnitudes move too: they must be ignored, as peft has none there.
    adapted = _moved(adapted, jax.random.key(1))
    out = jpeft.hf.export_peft(adapted, tmp_path / "adapter")
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True

    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    peft_model = peft.PeftModel.from_pretrained(base, out, is_trainable=True).eval()
    state = peft.get_peft_model_state_dict(peft_model)
    saved = safetensors.numpy.load_file(out / "adapter_model.safetensors")
    assert set(state) == set(saved)  # no missing or unexpected keys
    assert any(k.endswith("lora_magnitude_vector") for k in saved)
    for key, value in saved.items():
        np.testing.assert_array_equal(state[key].numpy(), value, err_msg=key)
    data = contract.batch(97)
    valid = data["attention_mask"].astype(bool)
    ours = _logits(model, adapted, data)
    np.testing.assert_allclose(
        ours[valid], _peft_logits(peft_model, data)[valid], atol=LOGITS_TOLERANCE
    )
    assert np.abs(ours - _logits(model, params, data))[valid].max() > 1e-2  # DoRA counts
    peft_counts = _print_line(peft_model.print_trainable_parameters)
    assert _print_line(lambda: jpeft.print_trainable_parameters(adapted)) == peft_counts
    merged = peft_model.merge_and_unload().state_dict()
    for key, value in jpeft.models.to_hf_state_dict(model, lora.merge(adapted)).items():
        np.testing.assert_allclose(value, merged[key].numpy(), atol=MERGE_TOLERANCE, err_msg=key)


@pytest.mark.parametrize("kind,config", [
    ("llama", dict(r=3, lora_alpha=6, target_modules=["k_proj", "o_proj", "down_proj"])),
    ("gpt2", dict(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)),
])  # fmt: skip
def test_a_peft_dora_adapter_imports_with_equal_logits_and_round_trips(kind, config, tmp_path):
    hf = hf_models.make(kind, tmp_path / "base", initializer_range=contract.INIT_STD)
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(
        hf, peft.LoraConfig(init_lora_weights=False, use_dora=True, **config)
    )
    with torch.no_grad():  # magnitudes away from the column norms, non-zero B
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    peft_model.eval().save_pretrained(tmp_path / "peft")
    model, params = jpeft.models.from_pretrained(tmp_path / "base")
    ours = jpeft.hf.import_peft(params, tmp_path / "peft")
    nodes = [n for _, n in jpeft.tree.iter_nodes(lora.extract(ours))]
    assert nodes and all(isinstance(n, dora.DoraWeight) for n in nodes)
    data = contract.batch(97)
    valid = data["attention_mask"].astype(bool)
    np.testing.assert_allclose(
        _logits(model, ours, data)[valid],
        _peft_logits(peft_model, data)[valid],
        atol=LOGITS_TOLERANCE,
    )
    again = jpeft.hf.export_peft(ours, tmp_path / "again")
    before = safetensors.numpy.load_file(tmp_path / "peft" / "adapter_model.safetensors")
    after = safetensors.numpy.load_file(again / "adapter_model.safetensors")
    assert set(before) == set(after)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)


def test_gradients_equal_peft_with_the_norm_detached(tmp_path):
    """The same objective's gradients for A, B and m, in peft (training mode) and jpeft: a
    norm that let gradients through would change every one of them."""
    hf = hf_models.make("llama", tmp_path / "base", initializer_range=contract.INIT_STD)
    torch.manual_seed(2)
    config = dict(r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"])
    peft_model = peft.get_peft_model(
        hf, peft.LoraConfig(init_lora_weights=False, use_dora=True, **config)
    )
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "peft")
    model, params = jpeft.models.from_pretrained(tmp_path / "base")
    ours = jpeft.hf.import_peft(params, tmp_path / "peft")

    data = contract.batch(97)
    weights = np.random.default_rng(3).standard_normal((*data["input_ids"].shape, 97))
    weights = (weights * data["attention_mask"][..., None]).astype(np.float32)
    peft_model.train()
    logits = peft_model(
        input_ids=torch.tensor(data["input_ids"], dtype=torch.long),
        attention_mask=torch.tensor(data["attention_mask"]),
    ).logits
    (logits * torch.tensor(weights)).sum().backward()
    peft_grads = {n: p.grad.numpy() for n, p in peft_model.named_parameters() if p.requires_grad}

    trainable, frozen = jpeft.split(ours)

    def objective(t):
        out = model(
            jpeft.combine(t, frozen), data["input_ids"], attention_mask=data["attention_mask"]
        )
        return jnp.sum(out * weights)

    grads = jpeft.hf.export_peft(
        jpeft.combine(jax.grad(objective)(trainable), frozen), tmp_path / "grads"
    )
    ours_grads = safetensors.numpy.load_file(grads / "adapter_model.safetensors")
    assert len(ours_grads) == len(peft_grads) == 12  # A, B, m of 2 modules in 2 layers
    for name, grad in peft_grads.items():
        key = name.replace(".default", "").replace("magnitude_vector.weight", "magnitude_vector")
        atol = GRAD_RTOL * np.abs(grad).max()
        np.testing.assert_allclose(ours_grads[key], grad, atol=atol, err_msg=key)


@pytest.mark.parametrize("layers", [None, (1, 2)])
def test_column_norms_from_the_factors_equal_the_formed_matrix(layers):
    keys = jax.random.split(jax.random.key(0), 4)
    w = jax.random.normal(keys[0], (3, 24, 40))
    scale = jnp.asarray([0.0 if layers and i not in layers else 1.5 + i for i in range(3)])
    node = lora.LoraWeight(
        w=w,
        a=jax.random.normal(keys[1], (3, 24, 5)),
        b=jax.random.normal(keys[2], (3, 5, 40)),
        scale=scale,
        layers=layers,
    )
    formed = w + jnp.einsum("lir,lro->lio", node.a, node.b) * scale[:, None, None]
    np.testing.assert_allclose(
        dora.column_norms(node), jnp.linalg.norm(formed, axis=-2), rtol=NORM_RTOL
    )
    decomposed = dora.decompose(node)
    # At its initial magnitude DoRA computes what LoRA does, and unadapted layers stay W.
    x = jax.random.normal(keys[3], (7, 24))
    for i in range(3):
        layer = jax.tree.map(lambda v, i=i: v[i], decomposed)
        np.testing.assert_allclose(jpeft.nn.linear(x, layer), x @ formed[i], rtol=1e-4, atol=1e-4)


def test_dropout_reaches_the_base_correction_as_in_peft():
    """In training, PEFT feeds the dropped input to both the LoRA path and the magnitude's
    correction of the base output: jpeft's layer equals peft's ``DoraLinearLayer`` given the
    input jpeft dropped, with the base output of the input as it was."""
    keys = jax.random.split(jax.random.key(0), 5)
    node = dora.decompose(
        lora.LoraWeight(
            w=jax.random.normal(keys[0], (16, 12)),
            a=jax.random.normal(keys[1], (16, 3)),
            b=jax.random.normal(keys[2], (3, 12)),
            scale=jnp.asarray(0.5),
            dropout=0.5,
        )
    )
    node = dataclasses.replace(node, magnitude=node.magnitude * 1.3, dropout_key=keys[3])
    x = jax.random.normal(keys[4], (5, 16))
    dropped = lora.dropout_input(x, node)

    def linear(weight):  # a bias-free torch Linear computing x @ weight
        layer = torch.nn.Linear(*weight.shape, bias=False)
        layer.weight.data = torch.tensor(np.asarray(weight).T)
        return layer

    base, lora_a, lora_b = linear(node.w), linear(node.a), linear(node.b)
    magnitude = peft.tuners.lora.dora.DoraLinearLayer(fan_in_fan_out=False)
    magnitude.weight = torch.nn.Parameter(torch.tensor(np.asarray(node.magnitude)))
    with torch.no_grad():
        expected = base(torch.tensor(np.asarray(x))) + magnitude(
            torch.tensor(np.asarray(dropped)), lora_A=lora_a, lora_B=lora_b, scaling=0.5,
            base_layer=base, base_result=None,
        )  # fmt: skip
    ours = jpeft.nn.linear(x, node)
    np.testing.assert_allclose(ours, expected.numpy(), atol=1e-5)
    assert not np.array_equal(np.asarray(dropped), np.asarray(x))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    hf_models.make("llama", folder, initializer_range=contract.INIT_STD)
    return jpeft.models.from_pretrained(folder)


def test_contract(tiny_llama, tmp_path):
    model, params = tiny_llama
    config = lora.LoraConfig(r=4, target_modules="all-linear", use_dora=True)

    def add(p, key):
        return lora.apply(p, config=config, key=key)

    names = [".a", ".b", ".magnitude"]
    contract.check_all(model, params, add, lora.merge, contract.batch(97), names, tmp_path)


def _equations(jaxpr):
    """Every equation of `jaxpr` and of the jaxprs nested in it (scan, remat, pjit, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


def test_a_qdora_step_dequantises_per_layer_and_never_forms_w_plus_ab(tiny_llama):
    """In the gradient of the loss over a 4-bit base: no float array of a stacked
    ``[l, in, out]`` weight's size outside the layer scan (each layer is dequantised inside
    it, the column norms included), and no matrix product anywhere with a weight's
    ``[in, out]`` shape (the norms come from ``AᵀW`` and ``AᵀA``, not from ``W + s·A@B``)."""
    model, params = tiny_llama
    quantised = qlora.quantize(params, compute_dtype=jnp.float32)
    adapted = lora.apply(quantised, rank=4, targets="all-linear", use_dora=True,
                         key=jax.random.key(0))  # fmt: skip
    nodes = _dora_nodes(adapted)
    assert len(nodes) == 7 and all(isinstance(n.w, nf4.NF4Weight) for n in nodes)
    trainable, frozen = jpeft.split(adapted)
    data = contract.batch(97)

    def loss(t):
        total, count = train.causal_lm_loss(model, jpeft.combine(t, frozen), data)
        return total / count

    jaxpr = jax.make_jaxpr(jax.grad(loss))(trainable).jaxpr
    stacked_sizes = {n.w.codes.shape[0] * n.w.shape[0] * n.w.shape[1] for n in nodes}
    outside = contract.top_level_float_arrays(jaxpr, stacked_sizes)
    assert not outside, outside
    weight_shapes = {n.w.shape for n in nodes}
    products = [
        v.aval.shape
        for eqn in _equations(jaxpr)
        if eqn.primitive.name == "dot_general"
        for v in eqn.outvars
        if tuple(v.aval.shape[-2:]) in weight_shapes
    ]
    assert not products, products
    assert any(eqn.primitive.name == "scan" for eqn in jaxpr.eqns)


def test_qdora_equals_peft_over_the_same_bitsandbytes_4bit_base(tiny64, tmp_path):  # noqa: F811
    """DoRA over an NF4 base: the Orbax adapter and the HF PEFT export load back onto the
    4-bit base bitwise, peft over the same 4-bit bytes (transformers + bitsandbytes)
    computes jpeft's logits, and ``qlora.merge`` folds DoRA into the dequantised base."""
    model, params = jpeft.models.from_pretrained(tiny64)
    quantised = qlora.quantize(params, compute_dtype=jnp.float32)
    adapted = lora.apply(quantised, rank=4, targets=["q_proj", "v_proj", "down_proj"],
                         use_dora=True, init_lora_weights=False, key=jax.random.key(1))  # fmt: skip
    adapted = _moved(adapted, jax.random.key(2))
    assert all(isinstance(n.w, nf4.NF4Weight) for n in _dora_nodes(adapted))
    contract.check_save_load_round_trip(quantised, adapted, tmp_path / "adapter")
    folder = jpeft.hf.export_peft(adapted, tmp_path / "hf")
    imported = jpeft.hf.import_peft(quantised, folder)
    assert jax.tree.structure(imported) == jax.tree.structure(adapted)
    for got, want in zip(jax.tree.leaves(imported), jax.tree.leaves(adapted), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    data = contract.batch(97)
    valid = data["attention_mask"].astype(bool)
    hf_bnb.save_pretrained_4bit(
        model, quantised, tmp_path / "base", config=checkpoints.read_config(tiny64)
    )
    # from_pretrained leaves peft in eval mode, where bitsandbytes repacks the 4-bit weights
    # for a bfloat16 kernel on CPUs with AVX512-BF16 (see _load_bnb); train mode computes the
    # same function here (no dropout) in float32.
    hf = peft.PeftModel.from_pretrained(_load_bnb(tmp_path / "base"), folder).train()
    assert type(hf.base_model.model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    out = _logits(model, adapted, data)
    np.testing.assert_allclose(out[valid], _peft_logits(hf, data)[valid], atol=LOGITS_TOLERANCE)
    assert np.abs(out - _logits(model, quantised, data))[valid].max() > 1e-2  # DoRA counts

    merged = qlora.merge(adapted)
    assert not any(isinstance(x, jpeft.tree.Node) for _, x in jpeft.tree.iter_nodes(merged))
    merge_error = np.abs(_logits(model, merged, data) - out)[valid].max()
    assert merge_error < contract.MERGE_TOLERANCE, merge_error


def test_jpeft_train_use_dora_trains_saves_exports_inspects_and_generates(tmp_path):
    tiny = make_tiny_chat_model(tmp_path)
    code, text, _ = run("train", "--help")
    assert code == 0 and "--use-dora" in text and "DoRA" in text
    out = tmp_path / "run"
    code, _, stderr = run(
        "train", tiny["model"], "--data", tiny["data"], "--out", out, "--rank", "4",
        "--targets", "q_proj,v_proj", "--use-dora", "--lr", "3e-2", "--batch-size", "4",
        "--bucket", "64", "--max-steps", "3", "--no-progress",
    )  # fmt: skip
    assert code == 0, stderr

    model, base = jpeft.models.from_pretrained(tiny["model"])
    params = jpeft.load_adapter(base, out / "adapter")
    nodes = _dora_nodes(params)
    assert len(nodes) == 2
    for node in nodes:  # the magnitude trained: it started at the base's column norms
        base_norms = jnp.linalg.norm(node.w, axis=-2)
        assert float(jnp.abs(node.magnitude - base_norms).max()) > 1e-3

    config = json.loads((out / "hf_adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny["model"]).eval()
    peft_model = peft.PeftModel.from_pretrained(hf, out / "hf_adapter").eval()
    data = {"input_ids": np.array([[1, 5, 9, 13, 17]]), "attention_mask": np.ones((1, 5), int)}
    np.testing.assert_allclose(
        _logits(model, params, data), _peft_logits(peft_model, data), atol=LOGITS_TOLERANCE
    )

    code, stdout, stderr = run("inspect", out / "adapter", "--json")
    assert code == 0, stderr
    info = json.loads(stdout)
    assert info["parameters"] == jpeft.count_parameters(params)[0]
    q = next(e for e in info["entries"] if e["path"].endswith("q_proj.weight"))
    assert q["kind"] == "dora" and q["arrays"]["magnitude"]["shape"] == [2, 32]
    assert q["parameters"] == 2 * (32 * 4 + 4 * 32 + 32)  # A, B and m of two layers

    code, stdout, stderr = run(
        "generate", tiny["model"], "--adapter", out / "adapter", "--prompt", "where is the fox",
        "--max-new-tokens", "4",
    )  # fmt: skip
    assert code == 0 and stdout.strip(), stderr


def test_dora_adapters_that_do_not_fit_are_named(tiny_llama, tmp_path):
    model, params = tiny_llama
    adapted = lora.apply(params, rank=2, targets=["q_proj"], use_dora=True, key=jax.random.key(0))
    jpeft.save_adapter(adapted, tmp_path / "adapter")
    folder = jpeft.hf.export_peft(adapted, tmp_path / "hf")
    hf_models.make("gpt2", tmp_path / "other")
    _, other = jpeft.models.from_pretrained(tmp_path / "other")
    with pytest.raises(
        jpeft.CheckpointError,
        match=r"does not fit the base: adapter entry model\.layers\.self_attn\.q_proj\.weight "
        "has no counterpart",
    ):
        jpeft.load_adapter(other, tmp_path / "adapter")
    wide = jax.tree.map(lambda x: x, params)
    q = wide["model"]["layers"]["self_attn"]["q_proj"]
    q["weight"] = jnp.zeros((2, 32, 64))
    with pytest.raises(
        jpeft.CheckpointError,
        match=r"q_proj\.weight fits a weight of shape \(2, 32, 32\), but the base has "
        r"\(2, 32, 64\)",
    ):
        jpeft.load_adapter(wide, tmp_path / "adapter")
    with pytest.raises(
        jpeft.CheckpointError,
        match=r"layers\.0\.self_attn\.q_proj\.lora_B\.weight has shape \(32, 2\), the base "
        r"model needs \(64, 2\)",
    ):
        jpeft.hf.import_peft(wide, folder)

    weights = folder / "adapter_model.safetensors"
    tensors = safetensors.numpy.load_file(weights)
    magnitude = "base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector"
    safetensors.numpy.save_file({k: v for k, v in tensors.items() if k != magnitude}, weights)
    with pytest.raises(jpeft.CheckpointError, match=rf"lacks {magnitude} that its config"):
        jpeft.hf.import_peft(params, folder)
    safetensors.numpy.save_file(tensors, weights)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    with pytest.raises(jpeft.CheckpointError, match="match no adapted module.*magnitude_vector"):
        jpeft.hf.import_peft(params, folder)

    mixed = lora.apply(adapted, rank=2, targets=["v_proj"], key=jax.random.key(1))
    with pytest.raises(ValueError, match="use_rslora or use_dora cannot share one"):
        jpeft.hf.export_peft(mixed, tmp_path / "mixed")
