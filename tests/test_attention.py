"""jpeft.nn.dot_product_attention on CPU (grouped heads, causal blocks, written-out
gradient) against jax.nn.dot_product_attention, values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft import nn

TOLERANCE = 2e-5  # float32, logits of unit-scale inputs summed over 64 dims


def _inputs(batch, steps, slots, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (batch, steps, 6, 16))
    k = jax.random.normal(keys[1], (batch, slots, 2, 16))
    v = jax.random.normal(keys[2], (batch, slots, 2, 16))
    return q, k, v


def _reference(q, k, v, mask, scale):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")


@pytest.mark.parametrize(
    "steps,prefix,left_pad",
    # 300, 260: several causal blocks; 12 with left padding: queries that see no key, whose
    # output the loss may still use (the last padding token predicts the first real one)
    [(7, 0, 0), (12, 0, 3), (300, 0, 0), (300, 0, 5), (260, 4, 0)],
)
def test_values_and_gradients_match_jax(steps, prefix, left_pad):
    slots = prefix + steps
    q, k, v = _inputs(2, steps, slots)
    valid = jnp.ones((2, slots), bool).at[1, prefix : prefix + left_pad].set(False)
    mask = nn.attention_mask(jnp.arange(steps) + prefix, valid)
    # A query that sees no key (a left-padding token) has a meaningless output: finite, but
    # in a causal block averaged over other keys than the reference's, so there it is left
    # out of the comparison.
    sees = mask[:, 0].any(-1)[:, :, None, None] | (steps <= nn._CAUSAL_BLOCK)  # [b, t, 1, 1]
    weights = jax.random.normal(jax.random.key(9), (2, steps, 6, 16)) * sees

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v) * weights)

    ours = lambda q, k, v: nn.dot_product_attention(  # noqa: E731
        q, k, v, mask, 0.25, causal_offset=prefix
    )
    theirs = lambda q, k, v: _reference(q, k, v, mask, 0.25)  # noqa: E731
    out = ours(q, k, v)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out * sees, theirs(q, k, v) * sees, atol=TOLERANCE)
    got = jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(lambda *a: loss(theirs, *a), argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=TOLERANCE, err_msg=name)
