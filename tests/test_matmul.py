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


def test_float32_input_reads_a_narrow_weight_narrow():
    """A float32 ``x`` with a bfloat16 weight: the product of ``x`` rounded to bfloat16 and
    the weight, summed and returned in float32, as is ``x``'s gradient (of the cotangent
    rounded to bfloat16); the weight's gradient is bfloat16, and the weight is never widened
    to a float32 copy."""
    x, _, g = _operands(jnp.float32)
    w = _operands(BF16)[1]
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    rounded = lambda a: f32(jnp.asarray(a).astype(BF16))  # noqa: E731
    y, vjp = jax.vjp(matmul.matmul, x, w)
    d_x, d_w = vjp(g)
    assert (y.dtype, d_x.dtype, d_w.dtype) == (jnp.float32, jnp.float32, BF16)
    rows, g_rows = rounded(x).reshape(-1, x.shape[-1]), rounded(g).reshape(-1, g.shape[-1])
    np.testing.assert_allclose(f32(y), (rows @ f32(w)).reshape(y.shape), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(f32(d_x), (g_rows @ f32(w).T).reshape(x.shape), rtol=1e-6,
                               atol=1e-5)
    want_dw = rows.T @ g_rows
    ulp = float(jnp.finfo(BF16).eps)
    np.testing.assert_allclose(f32(d_w), want_dw, rtol=ulp, atol=ulp * np.abs(want_dw).max())
    forward = str(jax.make_jaxpr(matmul.matmul)(x, w))
    assert "f32[40,16]" not in forward and "bf16[40,16]" in forward


def test_stacked_weights_take_the_plain_product():
    """A weight with leading axes (a bank of adapters) is left to ``@``."""
    x = jnp.ones((2, 3, 8), BF16)
    w = jnp.ones((2, 8, 4), BF16)
    np.testing.assert_array_equal(np.asarray(matmul.matmul(x, w)), np.asarray(x @ w))


def test_bfloat16_llama_is_as_close_to_float32_as_torch_bfloat16(tmp_path):
    """A bfloat16 Llama through jpeft's products (float32 sums, rounded once) is at least
    about as close to the float32 model as transformers' bfloat16 run of the same weights:
    its logits within 1.5x of torch's distance (0.089 against 0.092 seen), and its LoRA
    factors' gradients within 5% (relative, whole-tree norm) of the float32 gradients (3.4%
    seen, as with bfloat16 products rounded by XLA itself: bfloat16 activations between the
    products, weights of standard deviation 0.2)."""
    import hf_models
    import torch
    import transformers

    import jpeft
    from jpeft import lora

    hf = hf_models.make("llama", tmp_path, initializer_range=0.2)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 97, (2, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    reference = hf_models.hf_logits(hf, ids, mask)
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    with torch.no_grad():
        torch_logits = hf16.eval()(input_ids=torch.tensor(ids)).logits.float().numpy()
    torch_error = np.abs(torch_logits - reference).max()

    model, base = jpeft.models.from_pretrained(tmp_path, dtype=BF16)
    logits = np.asarray(jax.jit(model)(base, ids), np.float32)
    assert np.abs(logits - reference).max() <= 1.5 * torch_error

    def adapted(dtype):  # A and B random: every factor has a gradient
        params = jpeft.models.from_pretrained(tmp_path, dtype=dtype)[1]
        return lora.apply(params, rank=4, targets="all-linear", key=jax.random.key(0),
                          init_lora_weights=False)

    low = adapted(BF16)

    cotangent = jax.random.normal(jax.random.key(4), reference.shape)

    def gradients(params):
        trainable, frozen = jpeft.split(params)
        loss = lambda t: jnp.sum(model(jpeft.combine(t, frozen), ids) * cotangent)  # noqa: E731
        return jax.jit(jax.grad(loss))(trainable)

    high = gradients(adapted(jnp.float32))
    got = gradients(low)
    norm = lambda tree: float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float32)))  # noqa: E731
                                          for x in jax.tree.leaves(tree))))
    difference = jax.tree.map(lambda a, b: a.astype(jnp.float32) - b, got, high)
    assert norm(difference) <= 0.05 * norm(high)


def test_float32_activations_over_a_bfloat16_base(tmp_path):
    """``activation_dtype="float32"`` over a bfloat16 base and LoRA: float32 logits, closer
    to the float32 computation of the same (bfloat16) weights than bfloat16 activations
    are, and so are the factors' gradients; only the products' inputs are rounded. Seen
    over three seeds: logits 0.45-0.59x of bfloat16 activations' distance, gradients
    0.47-0.55x; asserted at most 0.75x."""
    import dataclasses

    import hf_models

    import jpeft
    from jpeft import lora

    hf_models.make("llama", tmp_path, initializer_range=0.2)
    ids = np.random.default_rng(0).integers(0, 97, (2, 12)).astype(np.int32)
    model, base = jpeft.models.from_pretrained(tmp_path, dtype=BF16)
    params = lora.apply(base, rank=4, targets="all-linear", key=jax.random.key(0),
                        init_lora_weights=False)  # A and B random: every factor has a gradient
    widened = jax.tree.map(lambda a: a.astype(jnp.float32) if a.dtype == BF16 else a, params)
    wide = dataclasses.replace(model, activation_dtype="float32")
    assert wide.activation_dtype == jnp.float32
    reference = np.asarray(jax.jit(model)(widened, ids))
    cotangent = jax.random.normal(jax.random.key(4), reference.shape)

    def gradients(m, params):
        trainable, frozen = jpeft.split(params)
        def loss(t):
            return jnp.sum(m(jpeft.combine(t, frozen), ids).astype(jnp.float32) * cotangent)
        return jax.jit(jax.grad(loss))(trainable)

    def norm(tree):
        return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float32)))
                                 for x in jax.tree.leaves(tree))))

    high = gradients(model, widened)
    logits_error, gradient_error = {}, {}
    for name, m in [("bfloat16", model), ("float32", wide)]:
        logits = jax.jit(m)(params, ids)
        assert logits.dtype == name
        logits_error[name] = np.abs(np.asarray(logits, np.float32) - reference).max()
        difference = jax.tree.map(lambda a, b: a - b, gradients(m, params), high)
        gradient_error[name] = norm(difference) / norm(high)
    assert logits_error["float32"] <= 0.75 * logits_error["bfloat16"]
    assert gradient_error["float32"] <= 0.75 * gradient_error["bfloat16"]


def test_activation_dtype_must_be_a_float_dtype(tmp_path):
    import dataclasses

    import hf_models

    import jpeft

    hf_models.make("llama", tmp_path)
    model, _ = jpeft.models.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="activation_dtype must be a float dtype, got int32"):
        dataclasses.replace(model, activation_dtype="int32")
    with pytest.raises(TypeError):
        dataclasses.replace(model, activation_dtype="floaty")
