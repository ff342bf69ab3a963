"""Many adapters over one base (jpeft.adapters): every method mixed in one batch equals each
row run alone with its adapter; switching, disabling, hot-swapping and deleting compile
nothing; each adapter's gradient comes from its own rows only; mixed LoRA batches equal
peft's ``adapter_names=`` forward and generate."""

from __future__ import annotations

import dataclasses
import functools

import contract
import hf_models
import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers

import jpeft
from jpeft import (
    adapter_bank,
    adapters,
    bottleneck,
    dora,
    ia3,
    lora,
    prefix_tuning,
    prompt_tuning,
    tree,
)
from jpeft.generation import generate_tokens

TOLERANCE = 1e-5  # float32, a row of a mixed batch against the same row alone (seen ~3e-6)
VOCAB = 97


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    hf_models.make("llama", folder, initializer_range=contract.INIT_STD)
    return folder, *jpeft.models.from_pretrained(folder)


def _moved(params, key, node_type, field, std=0.3):
    """`params` with `field` of every `node_type` node drawn at random (off its init)."""

    def move(path, x):
        if not isinstance(x, node_type):
            return x
        value = getattr(x, field)
        noise = std * jax.random.normal(jax.random.fold_in(key, len(path)), value.shape)
        return dataclasses.replace(x, **{field: noise})

    return tree.map_nodes(move, params)


def _lora(base, key, r, targets, **options):
    config = lora.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, **options)
    return _moved(lora.apply(base, config=config, key=key), key, lora.LoraWeight, "b")


@pytest.fixture(scope="module")
def every_method(tiny):
    """One adapter of each method (ranks and targets differ), all off their identity."""
    _, model, base = tiny
    key = jax.random.key(0)
    made = {
        "lora-r4": _lora(base, key, 4, ["q_proj", "v_proj"]),
        "lora-r8": _lora(base, jax.random.key(1), 8, ["q_proj", "o_proj", "down_proj"]),
        "dora": contract.scale_field(
            _lora(base, jax.random.key(2), 2, ["v_proj", "up_proj"], use_dora=True),
            key,
            dora.DoraWeight,
            "magnitude",
        ),
        "ia3": contract.scale_field(
            ia3.apply(base, model=model, config=ia3.IA3Config(), key=key),
            key,
            ia3.IA3Weight,
            "vector",
        ),
        "bottleneck": _moved(
            bottleneck.apply(base, model=model, key=key, config=bottleneck.SeqBnConfig()),
            key,
            bottleneck.BottleneckAdapter,
            "up",
        ),
        "prompt": prompt_tuning.apply(base, model=model, key=key, num_virtual_tokens=3),
        "prefix": prefix_tuning.apply(base, model=model, key=key, num_virtual_tokens=5),
        "prefix-mlp": prefix_tuning.apply(
            base,
            model=model,
            key=key,
            num_virtual_tokens=2,
            prefix_projection=True,
            encoder_hidden_size=16,
        ),  # fmt: skip
    }
    return made


def _data(rows: int, steps: int = 10, seed: int = 0):
    data = contract.batch(VOCAB, shape=(rows, steps), seed=seed)
    return data["input_ids"], data["attention_mask"]


def _alone(model, params, ids, mask):
    return np.asarray(model(params, ids, attention_mask=mask))


def _assert_rows_equal(mixed, alone, mask, what):
    """Logits of the real (unpadded) tokens agree; padding's are meaningless either way."""
    real = mask.astype(bool)
    err = np.abs(mixed - alone).max(axis=-1)[real].max()
    assert err < TOLERANCE, f"{what}: {err}"


def _without(made, *names):
    return {k: v for k, v in made.items() if k not in names}


def test_mixed_batch_rows_equal_each_adapter_alone(tiny, every_method):
    _, model, base = tiny
    # Prefix tuning with and without the MLP cannot share a bank (their trees differ).
    made = _without(every_method, "prefix-mlp")
    multi = adapters.stack(base, made)
    rows = [*made, None, "lora-r8", "prompt"]
    ids, mask = _data(len(rows))
    forward = jax.jit(lambda p, i, m, a: model(p, i, attention_mask=m, adapter_ids=a))
    mixed = np.asarray(forward(multi.params, ids, mask, adapters.adapter_ids(multi, rows)))
    for row, name in enumerate(rows):
        params = base if name is None else made[name]
        alone = _alone(model, params, ids[row : row + 1], mask[row : row + 1])
        _assert_rows_equal(mixed[row : row + 1], alone, mask[row : row + 1], name)


def test_prefix_with_projection_mixes_with_plain_adapters(tiny, every_method):
    _, model, base = tiny
    made = {k: every_method[k] for k in ("prefix-mlp", "lora-r4", "ia3")}
    multi = adapters.stack(base, made)
    rows = ["prefix-mlp", None, "lora-r4", "ia3", "prefix-mlp"]
    ids, mask = _data(len(rows), seed=1)
    mixed = np.asarray(
        model(multi.params, ids, attention_mask=mask, adapter_ids=adapters.adapter_ids(multi, rows))
    )
    for row, name in enumerate(rows):
        alone = _alone(model, base if name is None else made[name], ids[row:][:1], mask[row:][:1])
        _assert_rows_equal(mixed[row:][:1], alone, mask[row:][:1], name)


def test_switching_swapping_and_deleting_compile_nothing(tiny, every_method):
    _, model, base = tiny
    made = _without(every_method, "prefix-mlp", "lora-r8")
    multi = adapters.stack(base, made, slots=len(made) + 1)
    ids, mask = _data(2, seed=2)
    forward = jax.jit(lambda p, i, m: model(p, i, attention_mask=m))
    forward(multi.params, ids, mask)
    compiled = forward._cache_size()
    for name in made:
        out = np.asarray(forward(adapters.set_adapter(multi, name).params, ids, mask))
        _assert_rows_equal(out, _alone(model, made[name], ids, mask), mask, name)
    out = np.asarray(forward(adapters.disable(multi).params, ids, mask))
    _assert_rows_equal(out, _alone(model, base, ids, mask), mask, "disabled")
    # Hot-swap: a new LoRA (another rank, a subset of the targets) into the free slot, then
    # over an existing adapter's slot; then delete one.
    new = _lora(base, jax.random.key(7), 3, ["v_proj"])
    multi = adapters.swap(multi, "new", new)
    out = np.asarray(forward(adapters.set_adapter(multi, "new").params, ids, mask))
    _assert_rows_equal(out, _alone(model, new, ids, mask), mask, "swapped in")
    multi = adapters.swap(multi, "ia3-v2", new, slot="ia3")
    assert "ia3" not in adapters.names(multi)
    out = np.asarray(forward(adapters.set_adapter(multi, "ia3-v2").params, ids, mask))
    _assert_rows_equal(out, _alone(model, new, ids, mask), mask, "swapped over")
    multi = adapters.delete(multi, "prompt")
    assert "prompt" not in adapters.names(multi)
    out = np.asarray(forward(adapters.set_adapter(multi, "lora-r4").params, ids, mask))
    _assert_rows_equal(out, _alone(model, made["lora-r4"], ids, mask), mask, "after delete")
    assert forward._cache_size() == compiled


def test_mixed_generation_equals_each_row_alone(tiny, every_method):
    _, model, base = tiny
    made = _without(every_method, "prefix-mlp")
    multi = adapters.stack(base, made)
    rows = [*made, None]
    ids, mask = _data(len(rows), steps=6, seed=3)
    ids_of_rows = adapters.adapter_ids(multi, rows)
    mixed = np.asarray(
        generate_tokens(model, multi.params, ids, mask, max_new_tokens=6, adapter_ids=ids_of_rows)
    )
    for row, name in enumerate(rows):
        params = base if name is None else made[name]
        alone = generate_tokens(model, params, ids[row:][:1], mask[row:][:1], max_new_tokens=6)
        np.testing.assert_array_equal(mixed[row], np.asarray(alone)[0], err_msg=str(name))


def test_extract_gives_each_adapter_back_unpadded(tiny, every_method):
    _, _, base = tiny
    made = _without(every_method, "prefix-mlp")
    multi = adapters.stack(base, made)
    for name, params in made.items():
        want = dict(tree.iter_nodes(tree.extract(params)))
        got = dict(tree.iter_nodes(tree.extract(adapters.extract(multi, name))))
        assert got.keys() == want.keys(), name
        for keys, node in want.items():
            assert jax.tree.structure(got[keys]) == jax.tree.structure(node), (name, keys)
            for a, b in zip(jax.tree.leaves(got[keys]), jax.tree.leaves(node), strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def test_each_adapter_gets_the_gradient_of_its_own_rows(tiny, every_method):
    _, model, base = tiny
    made = {k: every_method[k] for k in ("lora-r4", "lora-r8", "ia3", "prompt", "bottleneck")}
    multi = adapters.stack(base, made)
    rows = ["lora-r4", "ia3", "prompt", "bottleneck", "lora-r8", None]
    ids, _ = _data(len(rows), seed=4)
    # Right padding, as jpeft.data pads: with left padding the last pad position predicts
    # the first real token from a fully masked query, whose (meaningless) output depends
    # on how many masked slots a row has, e.g. another row's virtual tokens.
    mask = np.ones_like(ids)
    mask[0, -3:] = mask[2, -2:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}

    def summed(trainable, frozen, batch):
        return jpeft.train.causal_lm_loss(model, jpeft.combine(trainable, frozen), batch)[0]

    trainable, frozen = jpeft.split(multi.params)
    mixed = jax.grad(summed)(
        trainable, frozen, {**batch, "adapter_ids": adapters.adapter_ids(multi, rows)}
    )
    for name, params in made.items():
        picked = np.asarray([r == name for r in rows])
        own = {k: v[picked] for k, v in batch.items()}
        alone_t, alone_f = jpeft.split(params)
        want = jax.grad(summed)(alone_t, alone_f, own)
        got_t, got_f = jpeft.split(adapters.extract(_as_params(multi, mixed), name))
        del got_f, alone_f
        pairs = zip(jax.tree.leaves(got_t), jax.tree.leaves(want), strict=True)
        for got, expected in pairs:
            np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4, err_msg=name)
    # A slot whose adapter leaves a module alone (lora-r4 at o_proj, lora-r8 at v_proj)
    # gets no gradient, though LoRA turns it off through its scale alone.
    absent = 0
    for bank, grads in zip(_banks(multi.params), _banks(mixed), strict=True):
        off = ~np.asarray(bank.present)  # [l, g]
        for leaf in jax.tree.leaves(grads.slots):
            absent += off.sum()
            assert not np.asarray(leaf)[off].any()
    assert absent > 0


def _banks(params):
    is_bank = lambda w: isinstance(w, adapter_bank.Bank)  # noqa: E731
    return [w for w in jax.tree.leaves(params, is_leaf=is_bank) if is_bank(w)]


def _as_params(multi, trainable_grads):
    """The set with its trainable arrays replaced by their gradients (to read them out per
    adapter with extract)."""
    _, frozen = jpeft.split(multi.params)
    return dataclasses.replace(multi, params=jpeft.combine(trainable_grads, frozen))


def test_a_train_step_trains_only_the_rows_adapters(tiny, every_method):
    _, model, base = tiny
    made = {k: every_method[k] for k in ("lora-r4", "ia3", "prompt")}
    multi = adapters.stack(base, made)
    ids, mask = _data(2, seed=5)
    batch = {"input_ids": ids, "attention_mask": mask}
    batch["adapter_ids"] = adapters.adapter_ids(multi, ["lora-r4", "prompt"])
    # Adam without weight decay: decay would shrink every slot, used in the batch or not.
    optimizer = optax.adam(1e-2)
    step = jpeft.train.make_train_step(model, optimizer, donate=False)
    trainable, frozen = jpeft.split(multi.params)
    state = optimizer.init(trainable)
    trainable, _, _ = step(trainable, frozen, state, batch, jax.random.key(0))
    trained = dataclasses.replace(multi, params=jpeft.combine(trainable, frozen))
    for name, changed in (("lora-r4", True), ("prompt", True), ("ia3", False)):
        before = jax.tree.leaves(jpeft.split(adapters.extract(multi, name))[0])
        after = jax.tree.leaves(jpeft.split(adapters.extract(trained, name))[0])
        moved = any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
        assert moved == changed, name


# ----------------------------------------------------------------------------- peft


def _peft_model(folder):
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    lora_config = functools.partial(peft.LoraConfig, init_lora_weights=False)
    configs = {
        "first": lora_config(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "second": lora_config(r=8, lora_alpha=4, target_modules=["k_proj", "v_proj", "down_proj"]),
        "third": lora_config(r=2, lora_alpha=2, target_modules=["o_proj"], use_rslora=True),
    }
    torch.manual_seed(0)
    model = peft.get_peft_model(hf, configs["first"], adapter_name="first")
    for name in ("second", "third"):
        model.add_adapter(name, configs[name])
    return model.eval()


def test_mixed_lora_batch_equals_peft_adapter_names(tiny, tmp_path):
    folder, model, base = tiny
    reference = _peft_model(folder)
    reference.save_pretrained(tmp_path)  # one sub-folder per adapter
    names = ("first", "second", "third")
    multi = adapters.load(base, {name: tmp_path / name for name in names})
    rows = ["first", "second", "third", None, "second"]
    peft_rows = [r or "__base__" for r in rows]
    ids, mask = _data(len(rows), steps=8, seed=6)
    ids_of_rows = adapters.adapter_ids(multi, rows)
    ours = np.asarray(model(multi.params, ids, attention_mask=mask, adapter_ids=ids_of_rows))
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        theirs = reference(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions), adapter_names=peft_rows,
        ).logits.numpy()  # fmt: skip
    _assert_rows_equal(ours, theirs, mask, "logits vs peft")
    new = 8
    ours = np.asarray(
        generate_tokens(model, multi.params, ids, mask, max_new_tokens=new, adapter_ids=ids_of_rows)
    )
    with torch.no_grad():
        out = reference.generate(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
            adapter_names=peft_rows, max_new_tokens=new, min_new_tokens=new, do_sample=False,
        )  # fmt: skip
    np.testing.assert_array_equal(ours, out[:, ids.shape[1] :].numpy())


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_refused_with_the_adapter_and_module_named(tiny, every_method, tmp_path):
    folder, model, base = tiny
    made = _without(every_method, "prefix-mlp")
    multi = adapters.stack(base, {k: made[k] for k in ("lora-r4", "ia3")})
    with pytest.raises(KeyError, match="'nope'.*loaded: \\['lora-r4', 'ia3'\\]"):
        adapters.adapter_ids(multi, ["lora-r4", "nope"])
    ids, mask = _data(2)
    with pytest.raises(ValueError, match="adapter id 5 is out of range: the set has 2 slots"):
        model(multi.params, ids, adapter_ids=np.array([0, 5], np.int32))
    with pytest.raises(ValueError, match="no free slot for adapter 'x'"):
        adapters.swap(multi, "x", made["lora-r4"])
    bigger = _lora(base, jax.random.key(3), 16, ["q_proj"])
    with pytest.raises(ValueError, match="'big'.*q_proj.*larger than the slot"):
        adapters.swap(multi, "big", bigger, slot="lora-r4")
    elsewhere = _lora(base, jax.random.key(3), 2, ["k_proj"])
    with pytest.raises(ValueError, match="'k'.*no slot for its LoraWeight at .*k_proj"):
        adapters.swap(multi, "k", elsewhere, slot="ia3")
    # An adapter made for another base: a wider model, and one with more layers.
    other = tmp_path / "other"
    hf_models.make("llama", other)
    config = transformers.LlamaConfig.from_pretrained(other)
    config.num_hidden_layers = 3
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "deeper")
    _, deeper = jpeft.models.from_pretrained(tmp_path / "deeper")
    foreign = _lora(deeper, jax.random.key(4), 4, ["q_proj"])
    with pytest.raises(ValueError, match="adapter 'deep' does not fit the base: .*q_proj"):
        adapters.stack(base, {"deep": foreign})
    with pytest.raises(ValueError, match="at least one adapter"):
        adapters.stack(base, {})
    with pytest.raises(ValueError, match="prefix_projection"):
        adapters.stack(base, {k: every_method[k] for k in ("prefix", "prefix-mlp")})
    with pytest.raises(ValueError, match="already a stack"):
        adapters.stack(base, {"again": multi.params})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        adapters.load(base, {"gone": tmp_path / "gone"})


def test_a_whole_batch_choice_merges_and_a_per_row_one_refuses(tiny, every_method):
    _, model, base = tiny
    made = {k: every_method[k] for k in ("lora-r4", "ia3")}
    multi = adapters.stack(base, made)
    merged = tree.materialize(adapters.set_adapter(multi, "ia3").params)
    want = tree.materialize(made["ia3"])
    for (_, a), (_, b) in zip(tree.iter_nodes(merged), tree.iter_nodes(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    per_row = adapters.route(multi.params, jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match="no single dense weight"):
        tree.materialize(per_row)


def test_lora_dropout_runs_inside_a_bank_in_training_only(tiny):
    _, model, base = tiny
    made = {
        "drop": _lora(base, jax.random.key(3), 4, ["q_proj", "v_proj"], lora_dropout=0.5),
        "other": _lora(base, jax.random.key(4), 4, ["q_proj", "v_proj"], lora_dropout=0.5),
    }
    multi = adapters.stack(base, made)
    ids, mask = _data(3, seed=6)
    batch = {"input_ids": ids, "attention_mask": mask}
    batch["adapter_ids"] = adapters.adapter_ids(multi, ["drop", "other", None])

    def row_losses(params):
        routed = adapter_bank.route(params, batch["adapter_ids"])
        logits = model(routed, ids, attention_mask=mask)
        return np.asarray(jnp.abs(logits).sum(axis=(1, 2)))

    plain = row_losses(multi.params)
    trained = [row_losses(tree.with_rng(multi.params, jax.random.key(k))) for k in (0, 1)]
    banks = _banks(tree.with_rng(multi.params, jax.random.key(0)))
    assert banks and all(bank.keys is not None for bank in banks)
    for dropped in trained:  # the adapters' rows see dropout; the row without one does not
        assert not np.allclose(dropped[:2], plain[:2], rtol=1e-4)
        np.testing.assert_allclose(dropped[2], plain[2], rtol=1e-6)
    assert not np.allclose(trained[0][:2], trained[1][:2], rtol=1e-4)  # fresh masks per key
    alone = np.asarray(jnp.abs(model(made["drop"], ids[:1], attention_mask=mask[:1])).sum())
    np.testing.assert_allclose(plain[0], alone, rtol=1e-5)  # inference: no dropout
