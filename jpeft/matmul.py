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

Float32 operands take the plain product: nothing here changes float32 compute.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` for ``x: [..., in]`` and ``w: [in, out]``, in ``x``'s dtype (`w` is cast
    to it); accumulated in float32 when that dtype is narrower."""
    w = w.astype(x.dtype)
    if not narrow(x.dtype) or w.ndim != 2:
        return x @ w
    return _over_rows(x, w, 0)


def matmul_transposed(x: jax.Array, table: jax.Array) -> jax.Array:
    """``x @ tableᵀ`` for ``x: [..., d]`` and ``table: [v, d]`` (a tied output head), one
    product contracting both last axes, in ``x``'s dtype; accumulated in float32 when that
    dtype is narrower. Float32 operands take ``x @ table.T``."""
    table = table.astype(x.dtype)
    if not narrow(x.dtype) or table.ndim != 2:
        return x @ jnp.swapaxes(table, -1, -2)
    return _over_rows(x, table, 1)


def narrow(dtype) -> bool:
    """Whether `dtype` is a float dtype narrower than float32 (bfloat16, float16)."""
    return jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32


def _over_rows(x: jax.Array, w: jax.Array, contract: int) -> jax.Array:
    """:func:`_dot` of ``x: [..., k]``'s rows with the 2-D `w` (`contract`: the axis of `w`
    holding ``k``), rounded to ``x``'s dtype, ``[..., n]``."""
    out = _dot(x.reshape(-1, x.shape[-1]), w, contract).astype(x.dtype)
    return out.reshape(*x.shape[:-1], w.shape[1 - contract])


def _product(a: jax.Array, b: jax.Array, a_axis: int, b_axis: int) -> jax.Array:
    """``a`` and ``b`` (both 2-D) contracted over ``a_axis`` and ``b_axis``, summed and
    returned in float32."""
    dimensions = (((a_axis,), (b_axis,)), ((), ()))
    return jax.lax.dot_general(a, b, dimensions, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dot(a: jax.Array, b: jax.Array, contract: int) -> jax.Array:
    """The float32 product of ``a: [m, k]`` and ``b``, ``[k, n]`` (`contract` 0) or
    ``[n, k]`` (`contract` 1): ``[m, n]``."""
    return _product(a, b, 1, contract)


def _dot_fwd(a, b, contract):
    return _product(a, b, 1, contract), (a, b)


def _dot_bwd(contract, residuals, g):
    a, b = residuals
    g = g.astype(a.dtype)
    d_a = _product(g, b, 1, 1 - contract)  # g's n against b's n axis: [m, k]
    # over the m axis: [k, n] = aᵀ g, or [n, k] = gᵀ a
    d_b = _product(a, g, 0, 0) if contract == 0 else _product(g, a, 0, 0)
    return d_a.astype(a.dtype), d_b.astype(b.dtype)


_dot.defvjp(_dot_fwd, _dot_bwd)
