"""jpeft.matmul: narrow-dtype products accumulated in float32, forward and backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft import matmul

BF16 = jnp.bfloat16


def _operands(dtype, m=24, k=40, n=16, seed=0):
    kx, kw, kg = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (3, m // 3, k)).astype(dtype)
    w = jax.random.normal(kw, (k, n)).astype(dtype)
    g = jax.random.normal(kg, (3, m // 3, n)).astype(dtype)
    return x, w, g


def test_float32_is_the_plain_product_bitwise():
    x, w, g = _operands(jnp.float32)
    got = jax.jit(matmul.matmul)(x, w)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.jit(jnp.matmul)(x, w)))
    grads = jax.grad(lambda x, w: jnp.sum(matmul.matmul(x, w) * g), argnums=(0, 1))(x, w)
    plain = jax.grad(lambda x, w: jnp.sum((x @ w) * g), argnums=(0, 1))(x, w)
    for got, want in zip(grads, plain):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("dtype", [BF16, jnp.float16])
def test_narrow_products_and_gradients_are_float32_sums_rounded_once(dtype):
    """Forward, dx and dw equal the float32 products of the same narrow values, rounded once
    to the narrow dtype: within one unit in the last place of that dtype (2⁻⁷ relative for
    bfloat16, 2⁻¹⁰ for float16; the float32 sums may differ in order)."""
    x, w, g = _operands(dtype)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    y, vjp = jax.vjp(jax.jit(matmul.matmul), x, w)
    d_x, d_w = vjp(g)
    assert y.dtype == d_x.dtype == d_w.dtype == dtype
    rows = f32(x).reshape(-1, x.shape[-1])
    want_y = (rows @ f32(w)).reshape(y.shape)
    want_dx = (f32(g).reshape(-1, g.shape[-1]) @ f32(w).T).reshape(x.shape)
    want_dw = rows.T @ f32(g).reshape(-1, g.shape[-1])
    ulp = float(jnp.finfo(dtype).eps)
    for got, want in [(y, want_y), (d_x, want_dx), (d_w, want_dw)]:
        np.testing.assert_allclose(f32(got), want, rtol=ulp, atol=ulp * np.abs(want).max())


def test_sums_are_not_rounded_as_they_go():
    """4096 ones sum to 4096 in float32; a bfloat16 running sum stops at 256 (256 + 1 rounds
    to 256), in the product and in both gradients."""
    ones = jnp.ones((2, 4096), BF16)
    column = jnp.ones((4096, 2), BF16)
    y, vjp = jax.vjp(matmul.matmul, ones, column)
    assert np.all(np.asarray(y, np.float32) == 4096)
    tall = jnp.ones((4096, 2), BF16)
    _, vjp_tall = jax.vjp(matmul.matmul, tall, jnp.ones((2, 4096), BF16))
    d_x, _ = vjp_tall(jnp.ones((4096, 4096), BF16))
    assert np.all(np.asarray(d_x, np.float32) == 4096)
    _, d_w = vjp(jnp.ones((2, 2), BF16))
    assert np.all(np.asarray(d_w, np.float32) == 2)
    _, d_w_tall = vjp_tall(jnp.ones((4096, 4096), BF16))
    assert np.all(np.asarray(d_w_tall, np.float32) == 4096)


@pytest.mark.parametrize("dtype", [jnp.float32, BF16])
def test_transposed_product_and_gradients(dtype):
    """``x @ tableᵀ`` (a tied output head) and its gradients equal the float32 products of
    the same values, within one unit in the last place for bfloat16 operands."""
    kx, kw, kg = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (2, 6, 40)).astype(dtype)
    table = jax.random.normal(kw, (20, 40)).astype(dtype)
    g = jax.random.normal(kg, (2, 6, 20)).astype(dtype)
    y, vjp = jax.vjp(matmul.matmul_transposed, x, table)
    d_x, d_table = vjp(g)
    f32 = lambda t: np.asarray(t, np.float32)  # noqa: E731
    rows, g_rows = f32(x).reshape(-1, 40), f32(g).reshape(-1, 20)
    want = [
        (rows @ f32(table).T).reshape(y.shape),
        (g_rows @ f32(table)).reshape(x.shape),
        g_rows.T @ rows,
    ]
    ulp = float(jnp.finfo(dtype).eps) if dtype != jnp.float32 else 1e-6
    for got, expected in zip([y, d_x, d_table], want):
        assert got.dtype == dtype
        np.testing.assert_allclose(f32(got), expected, rtol=ulp, atol=ulp * np.abs(expected).max())


def test_stacked_weights_take_the_plain_product():
    """A weight with leading axes (a bank of adapters) is left to ``@``."""
    x = jnp.ones((2, 3, 8), BF16)
    w = jnp.ones((2, 8, 4), BF16)
    np.testing.assert_array_equal(np.asarray(matmul.matmul(x, w)), np.asarray(x @ w))
