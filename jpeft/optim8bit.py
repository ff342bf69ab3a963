"""8-bit AdamW as bitsandbytes defines it (``bnb.optim.AdamW8bit``, TRL's ``optim="adamw_8bit"``),
as an optax :class:`~optax.GradientTransformation`.

Format. For each leaf with at least `min_8bit_size` elements, each moment is stored
blockwise in 8 bits: ``codes`` (uint8, the leaf's shape) index a 256-entry dynamic map, and
``absmax`` (float32, one per `block_size` consecutive elements of the row-major flattened
leaf; the last block may be short) scales it, so a moment element is
``map[codes] * absmax[block]``. The first moment uses the signed map, the second the unsigned
one (:func:`dynamic_map`). Each step dequantises both moments, updates them in float32,
updates the parameter, and re-quantises each block with its new absmax to the nearest code
(ties to the lower code). Smaller leaves keep float32 moments, as bitsandbytes does. The step
count and the learning rate are scalars; nothing else is kept.

The update is bitsandbytes' CPU kernel (``_optimizer_update_8bit_blockwise_cpu``)::

    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p * (1 - lr * weight_decay) - lr / (1 - b1**t) * m / (sqrt(v) / sqrt(1 - b2**t) + eps)

What differs from bitsandbytes. Rounding: values go to the nearest code after division by
the block's absmax, as bitsandbytes' GPU kernel (and its CPU kernel before 0.50) does;
bitsandbytes 0.50's CPU kernel instead multiplies by 1/absmax and looks the code up in 65536
even bins of [-1, 1], which sends values below ~3e-5 of the absmax up to ~1.5e-5 of it (the
tests run bitsandbytes' ``AdamW8bit`` on CPU: with that binned lookup swapped in, the codes
match it step for step; with nearest rounding the parameters stay within half a learning
rate of it over 50 steps). An all-zero block gets the code of 0 (bitsandbytes: code 0; both
dequantise to 0). The bias corrections are float32 (bitsandbytes: Python floats), and the
float32 path of small leaves uses the formula above (bitsandbytes' 32-bit kernel rearranges
it, equal up to rounding). jpeft stores weights ``(in, out)`` where PyTorch has
``(out, in)``, so the blocks of a transposed weight group other elements. bitsandbytes' GPU
kernel applies the weight decay after the step instead of before it. ``percentile_clipping``,
``max_unorm`` and paging, which ``AdamW8bit`` leaves off, are not implemented.

Memory (``jax.eval_shape`` of ``init`` over the trainable half of SmolLM2-135M with LoRA
r=16 on all linear layers and ``modules_to_save=["embed_tokens"]``, the tied output head,
33.2M trainable parameters): ``optax.adamw`` state 265.6 MB, :func:`adamw_8bit` state
67.4 MB.

Example::

    optimizer = jpeft.optim8bit.adamw_8bit(optax.cosine_decay_schedule(2e-4, 1000))
    opt_state = optimizer.init(trainable)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class Quantized8bit(NamedTuple):
    """One moment of one leaf in 8 bits: ``map[codes]`` times the absmax of its block."""

    codes: jax.Array  # uint8, the leaf's shape
    absmax: jax.Array  # float32, (number of blocks,)


class Adam8bitState(NamedTuple):
    """The state of :func:`adamw_8bit`: the step count and, per leaf, the first (`mu`) and
    second (`nu`) moments, each a :class:`Quantized8bit` or a float32 array."""

    count: jax.Array
    mu: Any
    nu: Any


def dynamic_map(signed: bool) -> np.ndarray:
    """bitsandbytes' 8-bit dynamic quantisation map (``create_dynamic_map(signed)`` with its
    defaults): 256 sorted float32 values in ``[-1, 1]`` (signed) or ``[0, 1]`` (unsigned).

    For exponents ``e = -6 .. 0``, the midpoints of evenly spaced fractions in ``[0.1, 1]``
    times ``10**e`` (``2**(e+6)`` of them, twice as many unsigned), their negatives when
    signed, then 0 and 1. Computed in float32 step by step as PyTorch does, so the values are
    bitsandbytes' to the bit.
    """
    f32 = np.float32
    values = [f32(0), f32(1)]
    for i in range(7):
        count = 2 ** (i + (0 if signed else 1)) + 1
        step = np.float64((f32(1) - f32(0.1)) / f32(count - 1))
        index = np.arange(count)
        # torch.linspace in float32: a fused multiply-add from the start for the first half,
        # from the end for the rest (float64 holds these products and sums exactly).
        from_end = index >= count // 2
        bounds = np.where(
            from_end,
            np.float64(f32(1)) - step * (count - 1 - index),
            np.float64(f32(0.1)) + step * index,
        ).astype(f32)
        means = f32(10.0 ** (i - 6)) * ((bounds[:-1] + bounds[1:]) / f32(2))
        values += [*means, *(-means if signed else [])]
    return np.sort(np.array(values, dtype=f32))


_SIGNED = dynamic_map(signed=True)
_UNSIGNED = dynamic_map(signed=False)


def _blocks(x: jax.Array, block_size: int) -> jax.Array:
    """`x` flattened row-major and zero-padded into rows of `block_size`."""
    flat = x.reshape(-1)
    return jnp.pad(flat, (0, -flat.size % block_size)).reshape(-1, block_size)


def quantize(x: jax.Array, code: np.ndarray, block_size: int) -> Quantized8bit:
    """`x` (float32) blockwise to the nearest entry of `code` after dividing each block by
    its absmax, ties to the lower entry, as bitsandbytes' ``quantize_blockwise``."""
    blocks = _blocks(x, block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    normed = blocks / jnp.where(absmax == 0, 1, absmax)[:, None]
    table = jnp.asarray(code)
    lower = jnp.clip(jnp.searchsorted(table, normed, side="right") - 1, 0, code.size - 2)
    closer_up = jnp.abs(normed - table[lower + 1]) < jnp.abs(normed - table[lower])
    index = (lower + closer_up).astype(jnp.uint8)
    return Quantized8bit(index.reshape(-1)[: x.size].reshape(x.shape), absmax)


def dequantize(q: Quantized8bit, code: np.ndarray, block_size: int) -> jax.Array:
    """The float32 values `q` stands for: ``code[codes]`` times the absmax of each block."""
    values = jnp.asarray(code)[_blocks(q.codes, block_size)] * q.absmax[:, None]
    return values.reshape(-1)[: q.codes.size].reshape(q.codes.shape)


def adamw_8bit(
    learning_rate: float | optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    *,
    block_size: int = 256,
    min_8bit_size: int = 4096,
) -> optax.GradientTransformation:
    """AdamW with its moments in 8 bits, bitsandbytes' ``AdamW8bit`` (defaults included).

    Args:
      learning_rate: a float or an optax schedule of the step count (0 at the first step).
      b1, b2, eps: Adam's moment decays and denominator epsilon.
      weight_decay: decoupled weight decay: each step multiplies the parameters by
        ``1 - lr * weight_decay``.
      block_size: elements per absmax block (bitsandbytes: 256).
      min_8bit_size: leaves with fewer elements keep float32 moments (bitsandbytes: 4096).

    Works on any pytree of float arrays, including :func:`jpeft.split`'s trainable half (its
    None leaves have no state). The update needs `params` when `weight_decay` is not 0.

    Raises:
      ValueError: a negative hyperparameter, a beta outside ``[0, 1)`` or a block size
        below 1.
    """
    if not 0 <= b1 < 1 or not 0 <= b2 < 1:
        raise ValueError(f"b1 and b2 must be in [0, 1), got {b1} and {b2}")
    if eps < 0 or weight_decay < 0:
        raise ValueError(f"eps and weight_decay must be at least 0, got {eps} and {weight_decay}")
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")

    def zeros(leaf: jax.Array) -> Any:
        if leaf.size < min_8bit_size:
            return jnp.zeros(leaf.shape, jnp.float32)
        blocks = -(-leaf.size // block_size)
        return Quantized8bit(jnp.zeros(leaf.shape, jnp.uint8), jnp.zeros(blocks, jnp.float32))

    def init(params: Any) -> Adam8bitState:
        return Adam8bitState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(zeros, params),
            nu=jax.tree.map(zeros, params),
        )

    def update(updates: Any, state: Adam8bitState, params: Any = None) -> tuple[Any, Any]:
        if params is None and weight_decay:
            raise ValueError("adamw_8bit needs the params in update() for its weight decay")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        t = (state.count + 1).astype(jnp.float32)
        correction1 = 1 - jnp.float32(b1) ** t
        correction2 = jnp.sqrt(1 - jnp.float32(b2) ** t)

        def leaf(g: jax.Array, p: jax.Array | None, m: Any, v: Any) -> tuple:
            quantized = isinstance(m, Quantized8bit)
            dtype = g.dtype if p is None else p.dtype
            if quantized:
                m, v = dequantize(m, _SIGNED, block_size), dequantize(v, _UNSIGNED, block_size)
            g = g.astype(jnp.float32)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            step = -(lr / correction1) * m / (jnp.sqrt(v) / correction2 + eps)
            if weight_decay:
                step = step - (lr * weight_decay) * p.astype(jnp.float32)
            if quantized:
                m, v = quantize(m, _SIGNED, block_size), quantize(v, _UNSIGNED, block_size)
            return step.astype(dtype), m, v

        if params is None:
            params = jax.tree.map(lambda _: None, updates)
        out = jax.tree.map(leaf, updates, params, state.mu, state.nu)
        pick = lambda i: jax.tree.map(lambda _, o: o[i], updates, out)  # noqa: E731
        return pick(0), Adam8bitState(optax.safe_increment(state.count), pick(1), pick(2))

    return optax.GradientTransformation(init, update)
