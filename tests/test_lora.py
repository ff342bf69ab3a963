"""LoRA: the method contract, HF PEFT parity (counts, targets, forward maths), options."""

from __future__ import annotations

import contextlib
import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest

import contract
import hf_models
import jpeft
from jpeft import lora

# float32, same factors: only summation order differs (seen up to 1.04e-5 on an AVX-512 EPYC,
# where torch and XLA sum logits of size ~10 in different orders)
PEFT_LOGITS_TOLERANCE = 2e-5


@pytest.fixture(scope="module", params=["llama", "gpt2", "qwen2"])
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = hf_models.make(request.param, folder, initializer_range=contract.INIT_STD)
    model, params = jpeft.models.from_pretrained(folder)
    return request.param, hf, model, params


@pytest.mark.parametrize("options", [
    # The default config runs in test_methods.py (every registered method's contract).
    {"use_rslora": True, "lora_alpha": 16},
    {"lora_dropout": 0.1, "target_modules": "all-linear"},
    {"layers_to_transform": [1], "bias": "all"},
])
def test_contract(tiny, options, tmp_path):
    kind, _, model, params = tiny
    if kind == "qwen2" and "bias" not in options:
        pytest.skip("Qwen2 differs from Llama by its q/k/v biases: the bias case covers it")
    options = dict(options)
    if kind == "gpt2" and options.get("target_modules") is None:
        options["target_modules"] = ["c_attn", "c_proj"]
    config = lora.LoraConfig(r=4, **options)

    def add(p, key):
        return lora.apply(p, config=config, key=key)

    names = [".a", ".b"] + ([".w"] if config.bias != "none" else [])
    contract.check_all(model, params, add, lora.merge, contract.batch(97), names, tmp_path)


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


@pytest.mark.parametrize("options", [
    {},
    {"target_modules": "all-linear", "r": 2},
    {"target_modules": r".*\.(k_proj|c_fc)", "bias": "lora_only"},
    {"layers_to_transform": [0], "rank_pattern": {"v_proj": 3}, "alpha_pattern": {"q_proj": 4}},
    {"modules_to_save": ["lm_head"], "target_modules": ["q_proj"], "exclude_modules": ["nothing"]},
    {"bias": "all", "exclude_modules": r".*\.1\..*"},
    {"layers_to_transform": [1], "layers_pattern": "layers", "target_modules": ["q_proj"]},
    {"layers_to_transform": [0], "layers_pattern": ["blocks", "layers"], "r": 3},
])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_trainable_parameter_line_matches_peft(kind, options, tmp_path):
    if kind == "qwen2" and options.get("modules_to_save"):
        options = {**options, "modules_to_save": ["embed_tokens"]}  # qwen2 here ties lm_head
    hf = hf_models.make(kind, tmp_path / "hf")
    model, params = jpeft.models.from_pretrained(tmp_path / "hf")
    config = peft.LoraConfig(r=options.pop("r", 4), lora_alpha=8, **options)
    peft_model = peft.get_peft_model(hf, config)
    ours = lora.apply(params, config=_ours(config), key=jax.random.key(0))
    assert _jpeft_line(ours) == _peft_line(peft_model)


@pytest.mark.parametrize("targets", [["c_attn"], "all-linear", ["c_proj"]])
def test_gpt2_trainable_parameter_line(targets, tmp_path):
    hf = hf_models.make("gpt2", tmp_path)
    model, params = jpeft.models.from_pretrained(tmp_path)
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=4, target_modules=targets))
    ours = lora.apply(params, rank=4, targets=targets, key=jax.random.key(0))
    assert _jpeft_line(ours) == _peft_line(peft_model)


def _ours(config: peft.LoraConfig) -> lora.LoraConfig:
    """The jpeft config for a peft config (only the fields these tests use)."""
    target = config.target_modules
    return lora.LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        target_modules=tuple(sorted(target)) if isinstance(target, set) else target,
        exclude_modules=config.exclude_modules,
        bias=config.bias,
        use_rslora=config.use_rslora,
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
        rank_pattern=config.rank_pattern,
        alpha_pattern=config.alpha_pattern,
        modules_to_save=tuple(config.modules_to_save) if config.modules_to_save else None,
    )


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_matches_peft_with_the_same_factors(tiny, use_rslora, tmp_path):
    """PEFT's LoRA with random (non-identity) factors, copied into jpeft: same logits."""
    kind, _, model, params = tiny
    hf = hf_models.make(kind, tmp_path, initializer_range=contract.INIT_STD)
    targets = ["c_attn", "c_fc"] if kind == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=targets, use_rslora=use_rslora,
                             init_lora_weights=False, layers_to_transform=[1])
    peft_model = peft.get_peft_model(hf, config).eval()
    ours = lora.apply(params, config=_ours(config), key=jax.random.key(0))
    state = peft_model.state_dict()

    def copy(keys, node):
        name = ".".join(map(str, keys[:-1]))  # e.g. model.layers.self_attn.q_proj
        prefix, _, rest = name.partition(".layers." if kind != "gpt2" else ".h.")
        a, b = np.array(node.a), np.array(node.b)
        for i in node.layers:
            hf_name = f"base_model.model.{prefix}.{'layers' if kind != 'gpt2' else 'h'}.{i}.{rest}"
            a[i] = state[f"{hf_name}.lora_A.default.weight"].numpy().T
            b[i] = state[f"{hf_name}.lora_B.default.weight"].numpy().T
        return dataclasses.replace(node, a=jnp.asarray(a), b=jnp.asarray(b))

    ours = jax.tree_util.tree_map_with_path(
        lambda p, x: copy(jpeft.tree.path_keys(p), x) if isinstance(x, lora.LoraWeight) else x,
        ours, is_leaf=lambda x: isinstance(x, lora.LoraWeight))
    data = contract.batch(97)
    expected = hf_models.hf_logits(peft_model, data["input_ids"], data["attention_mask"])
    out = np.asarray(model(ours, data["input_ids"], attention_mask=data["attention_mask"]))
    valid = data["attention_mask"].astype(bool)
    np.testing.assert_allclose(out[valid], expected[valid], atol=PEFT_LOGITS_TOLERANCE)


def test_initialisation_follows_peft():
    w = jnp.zeros((4, 256, 64))
    params = {"model": {"layers": {"self_attn": {"q_proj": {"weight": w}}}}}
    node = lora.apply(params, rank=8, targets=["q_proj"], key=jax.random.key(1))[
        "model"]["layers"]["self_attn"]["q_proj"]["weight"]
    bound = 1 / np.sqrt(256)  # kaiming_uniform(a=√5) on lora_A [r, in]
    assert float(jnp.abs(node.a).max()) <= bound
    assert float(jnp.abs(node.a).max()) > 0.9 * bound
    assert not jnp.any(node.b)
    gauss = lora.apply(params, rank=8, targets=["q_proj"], key=jax.random.key(1),
                       init_lora_weights="gaussian")["model"]["layers"]["self_attn"]["q_proj"]
    assert abs(float(jnp.std(gauss["weight"].a)) - 1 / 8) < 0.01  # std 1/r, not 1/√r


def test_apply_traces_to_the_same_factors():
    """lora.apply under a trace (jax.jit, jax.eval_shape: sharded initialisation, memory
    planning) gives the factors it gives eagerly (its random draw is cut on the host only
    when the draw is concrete)."""
    params = {"model": {"layers": {"self_attn": {
        "q_proj": {"weight": jnp.ones((2, 16, 16))}, "v_proj": {"weight": jnp.ones((2, 16, 8))},
    }}}}

    def adapt(p):
        return lora.apply(p, rank=4, targets=["q_proj", "v_proj"], key=jax.random.key(5),
                          init_lora_weights=False)

    eager, traced = adapt(params), jax.jit(adapt)(params)
    shapes = jax.eval_shape(adapt, params)
    for mine, want, shape in zip(jax.tree.leaves(traced), jax.tree.leaves(eager),
                                 jax.tree.leaves(shapes), strict=True):
        np.testing.assert_allclose(np.asarray(mine), np.asarray(want), rtol=1e-6)
        assert mine.shape == shape.shape


def test_dropout_only_with_a_key(tiny):
    _, _, model, params = tiny
    targets = ["c_attn"] if tiny[0] == "gpt2" else ["q_proj"]
    adapted = lora.apply(params, rank=4, targets=targets, key=jax.random.key(0),
                         init_lora_weights=False, lora_dropout=0.5)
    data = contract.batch(97)
    plain = model(adapted, data["input_ids"])
    again = model(adapted, data["input_ids"])
    noisy = model(jpeft.tree.with_rng(adapted, jax.random.key(3)), data["input_ids"])
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(again))
    assert float(jnp.abs(noisy - plain).max()) > 1e-4


def test_targets_that_match_nothing_name_close_modules(tiny):
    _, _, _, params = tiny
    with pytest.raises(ValueError, match="match no module.*close names"):
        lora.apply(params, targets=["q_prj"], key=jax.random.key(0))
    with pytest.raises(ValueError, match="not a linear layer"):
        lora.apply(params, targets=["embed_tokens", "wte"], key=jax.random.key(0))


def test_unsupported_options_fail_loudly():
    with pytest.raises(ValueError, match="init_lora_weights"):
        lora.LoraConfig(init_lora_weights="pissa")
    with pytest.raises(ValueError, match="bias"):
        lora.LoraConfig(bias="some")
    with pytest.raises(ValueError, match=r"fan_in_fan_out=True is not needed in jpeft"):
        lora.LoraConfig(fan_in_fan_out=True)
    with pytest.raises(TypeError, match="key"):  # required: no silent default seed
        lora.apply({"w": {"weight": jnp.zeros((2, 2))}}, targets=["w"])


def test_configs_are_hashable_and_equal_configs_hash_alike():
    one = lora.LoraConfig(r=4, rank_pattern={"q_proj": 8}, alpha_pattern={"v_proj": 2.0})
    same = lora.LoraConfig(r=4, rank_pattern={"q_proj": 8}, alpha_pattern={"v_proj": 2.0})
    other = lora.LoraConfig(r=4, rank_pattern={"q_proj": 16})
    assert hash(one) == hash(same) and one == same
    assert len({one, same, other}) == 2


def test_extract_attach_round_trip(tiny):
    _, _, model, params = tiny
    adapted = lora.apply(params, rank=4, targets="all-linear", key=jax.random.key(0),
                         init_lora_weights=False, bias="all")
    adapter = lora.extract(adapted)
    assert jpeft.count_parameters(adapter)[0] == jpeft.count_parameters(adapted)[0]
    back = lora.attach(params, adapter)
    ids = contract.batch(97)["input_ids"]
    np.testing.assert_array_equal(np.asarray(model(back, ids)), np.asarray(model(adapted, ids)))


def test_frozen_base_in_bfloat16_trains_float32_adapters(tmp_path):
    hf_models.make("llama", tmp_path, initializer_range=contract.INIT_STD)
    model, params = jpeft.models.from_pretrained(tmp_path, dtype=jnp.bfloat16)
    adapted = lora.apply(params, rank=4, targets="all-linear", key=jax.random.key(0))
    trained, _, _ = contract.overfit(model, adapted, contract.batch(97))
    trainable, frozen = jpeft.split(trained)
    assert {x.dtype for x in jax.tree.leaves(trainable)} == {jnp.dtype(jnp.float32)}
    assert jnp.dtype(jnp.bfloat16) in {x.dtype for x in jax.tree.leaves(frozen)}


def test_mask_labels_an_optax_multi_transform(tiny):
    import optax

    _, _, _, params = tiny
    targets = ["c_attn"] if tiny[0] == "gpt2" else ["q_proj"]
    adapted = lora.apply(params, rank=4, targets=targets, key=jax.random.key(0))
    mask = jpeft.trainable_mask(adapted)
    assert sum(jax.tree.leaves(mask)) == 2
    labels = jax.tree.map(lambda m: "train" if m else "freeze", mask)
    opt = optax.multi_transform({"train": optax.sgd(1.0), "freeze": optax.set_to_zero()}, labels)
    grads = jax.tree.map(jnp.ones_like, adapted)
    updates, _ = opt.update(grads, opt.init(adapted), adapted)
    new = optax.apply_updates(adapted, updates)
    for m, old, upd in zip(jax.tree.leaves(mask), jax.tree.leaves(adapted), jax.tree.leaves(new)):
        assert m != bool(np.array_equal(np.asarray(old), np.asarray(upd)))


def test_real_model_lora_step_lowers_loss(smollm2_file):
    model, params = jpeft.models.from_pretrained(smollm2_file, dtype=jnp.bfloat16)
    tok = jpeft.models.load_tokenizer(smollm2_file)
    text = "The secret password of the jpeft project is purple-otter-42. " * 3
    ids = np.asarray(tok([text])["input_ids"], np.int32)
    data = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    adapted = lora.apply(params, rank=8, targets=["q_proj", "v_proj"], key=jax.random.key(0))
    _, losses, _ = contract.run_steps(model, adapted, data, steps=4, learning_rate=3e-3)
    assert losses[-1] < 0.8 * losses[0], losses  # seen 0.75 after 4 steps

