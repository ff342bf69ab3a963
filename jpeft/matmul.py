"""Matrix products in a narrow float dtype (bfloat16, float16) accumulated in float32.

``x @ w`` with both operands in bfloat16 asks for a bfloat16 product, which XLA:CPU computes
by converting both operands to float32 for its float32 GEMM: 160 GFLOP/s on a 2-core AMD
EPYC Zen 4 with the conversions, below float32's own 210. Asked for a float32 result
(``preferred_element_type``), the same bfloat16 operands run at 380-410 GFLOP/s there, on
the CPU's bfloat16 dot instructions, summed in float32 as torch's bfloat16 GEMMs are. The
products below do that and round their result to the operands' dtype once.

Left to autodiff, the backward products would ask for bfloat16 results again, and
``g @ wᵀ`` written with a transposed weight ran at 150-200 GFLOP/s where the same product
stated as one ``dot_general`` contracting both operands' last axes ran at 380-400; so the
gradient is written out (:func:`_dot_bwd`). Products contracting both operands' first axes
(a weight's own gradient, ``xᵀ g``) still take the float32 path.

A float32 ``x`` with a narrow weight (float32 activations over a bfloat16 frozen base,
:attr:`jpeft.models.decoder.DecoderLM.activation_dtype`) takes the same product: ``x`` is
rounded to the weight's dtype inside it, and the result and ``x``'s gradient stay float32.
The weight is never widened to float32, which would both slow the product and keep a wide
copy of it. So a product runs in the narrower of its operands' dtypes (:func:`product_dtype`)
and returns ``x``'s dtype.

Float32 operands take the plain product: nothing here changes float32 compute.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` for ``x: [..., in]`` and ``w: [in, out]``, in ``x``'s dtype, its operands
    in :func:`product_dtype`; accumulated in float32 when that dtype is narrower."""
    dtype = product_dtype(x.dtype, w.dtype)
    if not narrow(dtype) or w.ndim != 2:
        return x @ w.astype(x.dtype)
    return _over_rows(x, w, 0, dtype)


def matmul_transposed(x: jax.Array, table: jax.Array) -> jax.Array:
    """``x @ tableᵀ`` for ``x: [..., d]`` and ``table: [v, d]`` (a tied output head), one
    product contracting both last axes, as :func:`matmul`. Float32 operands take
    ``x @ table.T``."""
    dtype = product_dtype(x.dtype, table.dtype)
    if not narrow(dtype) or table.ndim != 2:
        return x @ jnp.swapaxes(table.astype(x.dtype), -1, -2)
    return _over_rows(x, table, 1, dtype)


def narrow(dtype) -> bool:
    """Whether `dtype` is a float dtype narrower than float32 (bfloat16, float16)."""
    return jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32


def product_dtype(x_dtype, w_dtype) -> jnp.dtype:
    """The dtype a product of ``x`` and a weight ``w`` reads both operands in: ``x``'s,
    unless only the weight's is :func:`narrow` (a narrow frozen base under wider
    activations), then the weight's."""
    if narrow(w_dtype) and not narrow(x_dtype):
        return jnp.dtype(w_dtype)
    return jnp.dtype(x_dtype)


def _over_rows(x: jax.Array, w: jax.Array, contract: int, dtype) -> jax.Array:
    """:func:`_dot` of ``x: [..., k]``'s rows with the 2-D `w` (`contract`: the axis of `w`
    holding ``k``) in `dtype`, returned in ``x``'s dtype, ``[..., n]``."""
    dtypes = (jnp.dtype(dtype), x.dtype, w.dtype)
    out = _dot(x.reshape(-1, x.shape[-1]), w, contract, dtypes).astype(x.dtype)
    return out.reshape(*x.shape[:-1], w.shape[1 - contract])


def _product(a: jax.Array, b: jax.Array, a_axis: int, b_axis: int) -> jax.Array:
    """``a`` and ``b`` (both 2-D) contracted over ``a_axis`` and ``b_axis``, summed and
    returned in float32."""
    dimensions = (((a_axis,), (b_axis,)), ((), ()))
    return jax.lax.dot_general(a, b, dimensions, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dot(a: jax.Array, b: jax.Array, contract: int, dtypes: tuple) -> jax.Array:
    """The float32 product of ``a: [m, k]`` and ``b``, ``[k, n]`` (`contract` 0) or
    ``[n, k]`` (`contract` 1), both read in ``dtypes[0]``: ``[m, n]``. ``dtypes[1:]`` are
    ``a``'s and ``b``'s own dtypes, which their gradients are returned in."""
    return _dot_fwd(a, b, contract, dtypes)[0]


def _dot_fwd(a, b, contract, dtypes):
    a, b = a.astype(dtypes[0]), b.astype(dtypes[0])
    return _product(a, b, 1, contract), (a, b)


def _dot_bwd(contract, dtypes, residuals, g):
    a, b = residuals  # read in dtypes[0]
    g = g.astype(dtypes[0])
    d_a = _product(g, b, 1, 1 - contract)  # g's n against b's n axis: [m, k]
    # over the m axis: [k, n] = aᵀ g, or [n, k] = gᵀ a
    d_b = _product(a, g, 0, 0) if contract == 0 else _product(g, a, 0, 0)
    return d_a.astype(dtypes[1]), d_b.astype(dtypes[2])


_dot.defvjp(_dot_fwd, _dot_bwd)
