"""Foreign models: a Flax linen and a Flax NNX transformer fine-tuned through jpeft.wrap."""

from __future__ import annotations

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jpeft
from jpeft import lora

VOCAB, DIM, HEADS, SEQ = 31, 16, 2, 8


class LinenBlock(linen.Module):
    @linen.compact
    def __call__(self, x):
        h = linen.LayerNorm()(x)
        q, k, v = (linen.Dense(DIM, name=n)(h) for n in ("query", "key", "value"))
        scores = jnp.einsum("btd,bsd->bts", q, k) / np.sqrt(DIM)
        causal = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
        attn = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
        x = x + linen.Dense(DIM, name="out")(jnp.einsum("bts,bsd->btd", attn, v))
        return x + linen.Dense(DIM, name="mlp")(jax.nn.gelu(linen.LayerNorm()(x)))


class LinenLM(linen.Module):
    @linen.compact
    def __call__(self, ids):
        x = linen.Embed(VOCAB, DIM)(ids)
        x = LinenBlock()(LinenBlock()(x))
        return linen.Dense(VOCAB, name="head")(x)


class NnxLM(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
        self.query = nnx.Linear(DIM, DIM, rngs=rngs)
        self.value = nnx.Linear(DIM, DIM, rngs=rngs)
        self.head = nnx.Linear(DIM, VOCAB, rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids)
        causal = jnp.tril(jnp.ones((ids.shape[1], ids.shape[1]), bool))
        scores = jnp.where(causal, jnp.einsum("btd,bsd->bts", self.query(x), x), -1e9)
        x = x + jnp.einsum("bts,bsd->btd", jax.nn.softmax(scores, -1), self.value(x))
        return self.head(x)


def _ids():
    return jax.random.randint(jax.random.key(7), (4, SEQ), 0, VOCAB)


def _fine_tune(forward, params, steps=20):
    """Adapter-only training on one batch; checks the contract along the way."""
    ids = _ids()
    trainable, frozen = jpeft.split(params)
    optimizer = optax.adam(3e-2)
    opt_state = optimizer.init(trainable)

    def loss(t):
        logits = forward(jpeft.combine(t, frozen), ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    @jax.jit
    def step(t, s):
        value, grads = jax.value_and_grad(loss)(t)
        updates, s = optimizer.update(grads, s, t)
        return optax.apply_updates(t, updates), s, value

    frozen_before = jax.tree.map(np.array, frozen)
    losses = []
    for _ in range(steps):
        trainable, opt_state, value = step(trainable, opt_state)
        losses.append(float(value))
    assert step._cache_size() == 1
    assert losses[-1] < 0.9 * losses[0], losses
    for before, after in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(np.asarray(after), before)
    return jpeft.combine(trainable, frozen)


def test_linen_model_fine_tunes_with_lora():
    model = LinenLM()
    params = model.init(jax.random.key(0), _ids())["params"]
    forward = jpeft.wrap(lambda p, ids: model.apply({"params": p}, ids))
    adapted = lora.apply(params, rank=4, targets=["query", "value"], key=jax.random.key(1))
    assert len(jax.tree.leaves(jpeft.split(adapted)[0])) == 8  # a, b of 2 targets x 2 blocks
    np.testing.assert_array_equal(forward(adapted, _ids()), forward(params, _ids()))
    trained = _fine_tune(forward, adapted)
    merged = lora.merge(trained)
    np.testing.assert_allclose(
        model.apply({"params": merged}, _ids()), forward(trained, _ids()), atol=1e-5
    )


def test_nnx_model_fine_tunes_with_lora():
    graphdef, state = nnx.split(NnxLM(nnx.Rngs(0)))
    params = nnx.to_pure_dict(state)

    def apply_fn(pure, ids):
        new_state = jax.tree.map(lambda x: x, state)
        nnx.replace_by_pure_dict(new_state, pure)
        return nnx.merge(graphdef, new_state)(ids)

    forward = jpeft.wrap(apply_fn)
    adapted = lora.apply(params, rank=4, targets="all-linear", key=jax.random.key(1))
    # "all-linear" takes every Linear but not the embedding; "head" is not an HF output
    # head name, so it is adapted too, as peft would adapt a Linear called "head".
    assert set(jpeft.tree.path_str(p).split(".")[0]
               for p, _ in jax.tree_util.tree_leaves_with_path(jpeft.split(adapted)[0])) == {
        "query", "value", "head"}
    _fine_tune(forward, adapted)
