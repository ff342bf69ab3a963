"""The reserved entry for methods that are not weights (`params["virtual_tokens"]`): a soft
prompt and a key/value prefix, filled by hand here, against transformers doing what Hugging
Face PEFT does with them (prompt: `inputs_embeds` with the prompt prepended and the mask
extended; prefix: `past_key_values` holding the prefix); and the loss, a train step and
`generate` taking them with no code of their own.
"""

from __future__ import annotations

import contract
import hf_models
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

import jpeft
from jpeft import tree
from jpeft.generation import generate_tokens
from jpeft.models import KVPrefix, virtual_tokens

HF_PARITY_ATOL = 1e-4  # float32 both sides; observed ~1e-7 (see test_models.py)
SELF_ATOL = 1e-5  # jpeft against jpeft through the KV cache
P = 3  # virtual tokens
VOCAB = 97


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = hf_models.make(request.param, folder, initializer_range=contract.INIT_STD)
    model, params = jpeft.models.from_pretrained(folder)
    return hf, model, params


def _inputs(seed=0, shape=(2, 7)):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, shape).astype(np.int32)
    mask = np.ones(shape, np.int32)
    mask[1, :2] = 0  # a left-padded row
    return ids, mask


def _prompt(model, params, seed=1):
    width = jpeft.nn.shape(model.embedding(params))[-1]
    return jax.random.normal(jax.random.key(seed), (P, width)) * 0.5


def _prefix(model, seed=2):
    shape = (model.num_layers, P, model.num_kv_heads, model.head_dim)
    k, v = jax.random.split(jax.random.key(seed))
    return KVPrefix(jax.random.normal(k, shape), jax.random.normal(v, shape))


def _with(params, **entry):
    return {**params, virtual_tokens.ENTRY: entry}


def test_soft_prompt_matches_transformers_with_prepended_embeddings(tiny):
    hf, model, params = tiny
    ids, mask = _inputs()
    prompt = _prompt(model, params)
    got = model(_with(params, prompt=tree.Trainable(prompt)), ids, attention_mask=mask)
    assert got.shape == (*ids.shape, VOCAB)  # aligned with input_ids

    embeds = hf.get_input_embeddings()(torch.tensor(ids, dtype=torch.long))
    prompts = torch.tensor(np.asarray(prompt))[None].expand(ids.shape[0], -1, -1)
    full_mask = np.concatenate([np.ones((ids.shape[0], P), np.int32), mask], 1)
    positions = torch.tensor(np.maximum(full_mask.cumsum(-1) - 1, 0))
    with torch.no_grad():
        out = hf(
            inputs_embeds=torch.cat([prompts, embeds], 1),
            attention_mask=torch.tensor(full_mask),
            position_ids=positions,
        )
    want = out.logits[:, P:].numpy()
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(got)[real], want[real], atol=HF_PARITY_ATOL)
    plain = model(params, ids, attention_mask=mask)
    assert np.abs(np.asarray(plain)[real] - want[real]).max() > 100 * HF_PARITY_ATOL


def test_prefix_matches_transformers_with_past_key_values(tiny):
    hf, model, params = tiny
    ids, mask = _inputs()
    prefix = _prefix(model)
    got = model(_with(params, prefix=prefix), ids, attention_mask=mask)

    batch = ids.shape[0]
    legacy = tuple(
        tuple(
            torch.tensor(np.asarray(x[i])).transpose(0, 1)[None].expand(batch, -1, -1, -1)
            for x in prefix
        )
        for i in range(model.num_layers)
    )
    full_mask = np.concatenate([np.ones((batch, P), np.int32), mask], 1)
    positions = torch.tensor(P + np.maximum(mask.cumsum(-1) - 1, 0))  # HF PEFT: from p on
    with torch.no_grad():
        out = hf(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(full_mask),
            position_ids=positions,
            cache=transformers.DynamicCache(legacy),
        )
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(got)[real], out.logits.numpy()[real], atol=HF_PARITY_ATOL)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_loss_and_train_step_take_the_entry_unchanged(tiny, kind):
    _, model, params = tiny
    ids, mask = _inputs(seed=3)
    entry = (
        {"prompt": tree.Trainable(_prompt(model, params))}
        if kind == "prompt"
        else {"prefix": KVPrefix(*(tree.Trainable(x) for x in _prefix(model)))}
    )
    adapted = _with(params, **entry)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": np.where(mask > 0, ids, -100)}
    trainable, frozen = jpeft.split(adapted)
    assert [x.shape for x in jax.tree.leaves(trainable)] == [
        x.w.shape for x in jax.tree.leaves(entry, is_leaf=lambda n: isinstance(n, tree.Node))
    ]
    trained, _, step = contract.overfit(model, adapted, batch)
    trainable, frozen = jpeft.split(trained)  # one more step, for its metrics
    opt_state = optax.adam(contract.OVERFIT_LEARNING_RATE).init(trainable)
    *_, metrics = step(trainable, frozen, opt_state, batch, jax.random.key(0))
    assert int(metrics["tokens"]) == int(mask[:, 1:].sum())  # virtual tokens carry no labels


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_generate_with_the_entry_equals_the_uncached_forward(tiny, kind):
    _, model, params = tiny
    entry = {"prompt": _prompt(model, params)} if kind == "prompt" else {"prefix": _prefix(model)}
    adapted = _with(params, **entry)
    ids, mask = _inputs(seed=4, shape=(2, 5))
    new = 4
    tokens = np.asarray(generate_tokens(model, adapted, ids, mask, max_new_tokens=new))
    assert tokens.shape == (2, new)
    seq, seq_mask = ids, mask
    for i in range(new):  # greedy decoding by re-running the whole sequence, no cache
        logits = model(adapted, seq, attention_mask=seq_mask)
        nxt = np.asarray(jnp.argmax(logits[:, -1], -1), np.int32)
        np.testing.assert_array_equal(tokens[:, i], nxt)
        seq = np.concatenate([seq, nxt[:, None]], 1)
        seq_mask = np.concatenate([seq_mask, np.ones((2, 1), np.int32)], 1)
    plain = np.asarray(generate_tokens(model, params, ids, mask, max_new_tokens=new))
    assert (plain != tokens).any()  # the entry changes what is generated


def test_bad_entries_fail_clearly(tiny):
    _, model, params = tiny
    ids, mask = _inputs()
    prompt = _prompt(model, params)
    with pytest.raises(ValueError, match=r"unknown entries \['prompts'\]"):
        model(_with(params, prompts=prompt), ids)
    with pytest.raises(ValueError, match=r"soft prompt has shape \(3, 5\); expected \[p, "):
        model(_with(params, prompt=prompt[:, :5]), ids)
    with pytest.raises(ValueError, match=r"prefix keys/values have shapes"):
        model(_with(params, prefix=KVPrefix(*(x[:, :, :1] for x in _prefix(model)))), ids)
    with pytest.raises(ValueError, match="cannot be combined with segment_ids"):
        model(_with(params, prompt=prompt), ids, segment_ids=np.zeros_like(ids))
    with pytest.raises(ValueError, match="segment_ids .packing. cannot be combined"):
        model(_with(params, prefix=_prefix(model)), ids, segment_ids=np.zeros_like(ids))
