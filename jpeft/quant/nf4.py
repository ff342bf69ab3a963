"""4-bit NormalFloat (NF4) and FP4 weights, byte for byte as bitsandbytes stores them.

A linear weight ``W`` is quantised in blocks of ``B`` consecutive elements of torch's
row-major ``[out, in]`` layout (jpeft stores ``[in, out]``, so the blocks run along ``in``,
exactly as in a bitsandbytes ``Linear4bit``). For a block ``w``::

    absmax = max |w|                     (float32, one per block)
    q      = argmin_j |w / absmax - T[j]|  (4 bits; ties go to the lower entry)
    w'     = T[q] · absmax               (dequantised, float32, then cast to `dtype`)

with ``T`` the 16-entry NF4 table (normal quantiles, exact zero) or the FP4 table. Two
codes share a byte, the even element in the high nibble; an odd count is padded with the
code of 0.0. The last block of a size that ``B`` does not divide is shorter (and, as in
bitsandbytes, is scaled by dividing by its absmax rather than multiplying by the
reciprocal).

Double quantisation (QLoRA's "nested" statistics) stores ``absmax`` itself in 8 bits:
``c = mean(absmax)``, then ``absmax - c`` is blockwise-quantised with block size 256 on
bitsandbytes' signed dynamic map ``D`` (256 values in [-1, 1])::

    absmax' = D[q₂] · nested_absmax + c

which costs 4 + 8/B + 32/(256·B) bits per parameter (4.127 for ``B = 64``) instead of
4 + 32/B (4.5).

Quantisation runs as jitted JAX, one layer of a stacked ``[l, in, out]`` weight at a time;
dequantisation is plain ``jnp`` and so happens inside the jitted step that uses the weight
(inside the layer scan, one layer at a time). The codes and ``absmax`` equal
``bitsandbytes.functional.quantize_4bit`` bit for bit, and dequantising bitsandbytes' own
state (nested or not) equals ``dequantize_4bit`` exactly. The nested 8-bit codes of
double quantisation are exact nearest-neighbour here, while bitsandbytes' CPU kernel uses
an approximate lookup table (and sums the mean in another order), so jpeft's own nested
statistics can differ from bitsandbytes' by a few 8-bit codes.

Example::

    node = nf4.quantize(w)                    # w: [in, out] or [l, in, out]
    y = jpeft.nn.linear(x, node)              # x @ dequantize(node), inside jit
    w_hat = nf4.dequantize(node)              # [.., in, out] in node.dtype
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import matmul, nn, tree

BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
"""The block sizes bitsandbytes accepts for 4-bit quantisation."""
QUANT_TYPES = ("nf4", "fp4")
NESTED_BLOCK_SIZE = 256
"""The block size of double quantisation (fixed in bitsandbytes' ``quantize_4bit``)."""
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))
"""The weight dtypes bitsandbytes quantises (and the ``dtype`` a node dequantises to)."""

# bitsandbytes.functional.get_4bit_type("nf4"): create_normal_map(offset=0.9677083,
# use_extra_value=True), hard-coded there as here.
NF4_TABLE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
# get_4bit_type("fp4"): 1 sign, 2 exponent and 1 mantissa bit, in bit-pattern order,
# divided by the largest magnitude (12) in float32. Entry 8, "-0" there, is the integer
# -0, so +0.0.
FP4_TABLE = np.array(
    [0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3], np.float32
) / np.float32(12)
TABLES = {"nf4": NF4_TABLE, "fp4": FP4_TABLE}


def _torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=float32)`` bit for bit: each half is
    computed from its own end with a fused multiply-add (one rounding), emulated in
    float64."""
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(steps - 1))
    i = np.arange(steps)
    low = (step * i + np.float64(start32)).astype(np.float32)
    high = (np.float64(end32) - step * (steps - 1 - i)).astype(np.float32)
    return np.where(i < steps // 2, low, high)


def _dynamic_map() -> np.ndarray:
    """bitsandbytes' ``create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)``:
    for each decade ``10^(i-6)``, ``i < 7``, the ``2^i`` midpoints of an even split of
    [0.1, 1] and their negatives, plus 0 and 1; 256 sorted float32 values."""
    values = [0.0, 1.0]
    for i in range(7):
        edges = _torch_linspace(0.1, 1.0, 2**i + 1)
        means = (edges[:-1] + edges[1:]) / np.float32(2)
        scaled = np.float32(10.0 ** (i - 6)) * means  # a float32 product, as torch's
        values += [*scaled, *-scaled]
    return np.sort(np.array(values, np.float32))


DYNAMIC_MAP = _dynamic_map()
"""The 8-bit signed dynamic map of double quantisation (``nested_quant_map``)."""


def _bounds(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Midpoints between the sorted table entries, and the table index of each sorted
    entry: bitsandbytes' nearest-entry rule is ``order[bucketize(x, midpoints)]``."""
    order = np.argsort(table, kind="stable")
    ordered = table[order]
    return (ordered[:-1] + ordered[1:]) / np.float32(2), order.astype(np.uint8)


_BOUNDS = {name: _bounds(table) for name, table in TABLES.items()}
_DYNAMIC_BOUNDS = _bounds(DYNAMIC_MAP)[0]
# float32(1e-38), the floor bitsandbytes puts under the absmax of a short last block. It is
# subnormal, and XLA flushes subnormals to zero, so it is written as bits.
_ABSMAX_FLOOR_BITS = np.float32(1e-38).view(np.uint32)


@tree.node
class NF4Weight(tree.Node):
    """A frozen linear weight ``[..., in, out]`` stored in 4 bits as bitsandbytes stores it.

    Every array has the same leading axes ``[...]`` (``[l]`` for a stacked weight, none
    for a single one), so a layer scan slices one layer's weight at a time.

    Attributes:
      codes: ``[..., (in·out + 1) // 2]`` uint8, two 4-bit codes per byte over torch's
        row-major ``[out, in]`` layout (bitsandbytes' ``weight`` tensor, flattened).
      absmax: ``[..., blocks]`` the scale of each block of `block_size` elements: float32,
        or with double quantisation uint8 indices into `nested_map` (bitsandbytes'
        ``weight.absmax``).
      nested_absmax: ``[..., ceil(blocks / 256)]`` float32 scales of the 8-bit absmax
        codes, or None without double quantisation.
      nested_map: ``[..., 256]`` float32, the 8-bit code table of the absmax codes
        (bitsandbytes' ``nested_quant_map``, kept so that a checkpoint's own table is used
        exactly), or None.
      nested_offset: ``[...]`` float32, the mean subtracted before the 8-bit absmax
        quantisation, or None.
      shape: ``(in, out)``, the jpeft shape of one layer's weight.
      block_size: elements per block.
      quant_type: ``"nf4"`` or ``"fp4"``.
      dtype: the dtype the weight was quantised from, which dequantisation rounds to
        (bitsandbytes' ``quant_state.dtype``).
      compute_dtype: the dtype of the matmul in :func:`jpeft.nn.linear` and of
        :func:`jpeft.nn.value` (``bnb_4bit_compute_dtype``).
    """

    codes: jax.Array
    absmax: jax.Array
    shape: tuple[int, int] = tree.static()
    nested_absmax: jax.Array | None = None
    nested_map: jax.Array | None = None
    nested_offset: jax.Array | None = None
    block_size: int = tree.static(64)
    quant_type: str = tree.static("nf4")
    dtype: np.dtype = tree.static(np.dtype(np.float32))
    compute_dtype: np.dtype = tree.static(np.dtype(np.float32))

    trainable_fields: ClassVar[tuple[str, ...]] = ()

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def parameter_count(self) -> tuple[int, int]:
        """``(0, 2 · packed bytes)``: Hugging Face PEFT counts a bitsandbytes ``Params4bit``
        as twice its uint8 elements (``in·out``, plus one for an odd count)."""
        return 0, 2 * int(np.prod(jnp.shape(self.codes)))


def quantize(
    w: Any,
    *,
    block_size: int = 64,
    double_quant: bool = True,
    quant_type: str = "nf4",
    compute_dtype: Any = None,
) -> NF4Weight:
    """Quantises a linear weight to 4 bits exactly as ``bitsandbytes`` does.

    Equal, byte for byte, to ``bitsandbytes.functional.quantize_4bit(W.T, blocksize=...,
    quant_type=..., compress_statistics=double_quant)`` of the torch ``[out, in]`` weight,
    for each layer of a stacked weight separately (as bitsandbytes quantises each module);
    with `double_quant` the nested 8-bit statistics are exact nearest-neighbour codes (see
    the module docstring).

    Args:
      w: ``[in, out]`` or stacked ``[l, in, out]`` float16, bfloat16 or float32 weight.
      block_size: elements per block, one of :data:`BLOCK_SIZES`.
      double_quant: also quantise the block scales (``bnb_4bit_use_double_quant``).
      quant_type: ``"nf4"`` or ``"fp4"`` (``bnb_4bit_quant_type``).
      compute_dtype: dtype of the matmuls that use the weight; defaults to `w`'s dtype.

    Returns:
      An :class:`NF4Weight` whose arrays have `w`'s leading axes.

    Raises:
      ValueError: a block size bitsandbytes does not accept, an unknown quant type, a
        weight that is not a float16/bfloat16/float32 matrix (or stack of them), or a
        non-float compute dtype.

    Example::

      node = nf4.quantize(params["model"]["layers"]["mlp"]["up_proj"]["weight"])
    """
    check_options(block_size, quant_type)
    dtype = np.dtype(w.dtype if hasattr(w, "dtype") else np.asarray(w).dtype)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"cannot quantise a {dtype} weight: bitsandbytes 4-bit quantisation takes "
            f"{[str(d) for d in FLOAT_DTYPES]}"
        )
    shape = tuple(jnp.shape(w))
    if len(shape) < 2 or 0 in shape:
        raise ValueError(
            f"cannot quantise a weight of shape {shape}: expected [in, out] or [l, in, out]"
        )
    compute_dtype = float_dtype(dtype if compute_dtype is None else compute_dtype)
    lead, (fan_in, fan_out) = shape[:-2], shape[-2:]
    stacked = jnp.reshape(jnp.asarray(w), (-1, fan_in, fan_out))
    arrays = _quantize_stack(stacked, block_size, quant_type, double_quant)
    arrays = {k: jnp.reshape(v, (*lead, *v.shape[1:])) for k, v in arrays.items()}
    if double_quant:
        arrays["nested_map"] = jnp.broadcast_to(jnp.asarray(DYNAMIC_MAP), (*lead, 256))
    return NF4Weight(
        shape=(fan_in, fan_out),
        block_size=block_size,
        quant_type=quant_type,
        dtype=dtype,
        compute_dtype=compute_dtype,
        **arrays,
    )


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize_stack(
    w: jax.Array, block_size: int, quant_type: str, double_quant: bool
) -> dict[str, jax.Array]:
    """``[l, in, out]`` → each layer quantised in turn (``lax.map``: one layer's float32
    copy alive at a time)."""
    return jax.lax.map(
        functools.partial(
            _quantize_layer,
            block_size=block_size,
            quant_type=quant_type,
            double_quant=double_quant,
        ),
        w,
    )


def _quantize_layer(
    w: jax.Array, *, block_size: int, quant_type: str, double_quant: bool
) -> dict[str, jax.Array]:
    """bitsandbytes' ``quantize_4bit`` (default backend) of one ``[in, out]`` weight."""
    flat = w.T.reshape(-1).astype(jnp.float32)  # torch's row-major [out, in]
    scaled, absmax = _scale_blocks(flat, block_size)
    if scaled.shape[0] % 2:
        scaled = jnp.pad(scaled, (0, 1))  # the pad element is 0.0, not code 0
    bounds, order = _BOUNDS[quant_type]
    q = jnp.asarray(order)[_bucketize(scaled, bounds)]
    out = {"codes": (q[0::2] << 4) | q[1::2], "absmax": absmax}
    if double_quant:
        offset = jnp.mean(absmax)
        scaled2, nested_absmax = _scale_blocks(absmax - offset, NESTED_BLOCK_SIZE)
        out["absmax"] = _bucketize(scaled2, _DYNAMIC_BOUNDS)
        out["nested_absmax"] = nested_absmax
        out["nested_offset"] = offset
    return out


def _scale_blocks(x: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array]:
    """``(x / absmax of its block clipped to [-1, 1], absmax)`` for ``x: [n]``, with the
    arithmetic of bitsandbytes' default backend: full blocks multiply by the reciprocal of
    their absmax, a short last block divides by its absmax (floored at 1e-38), and an
    all-zero block scales to 0."""
    n = x.shape[0]
    full = n - n % block_size
    blocks = x[:full].reshape(-1, block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    inverse = jnp.where(absmax > 0, 1.0 / absmax, 0.0)
    scaled = jnp.clip(blocks * inverse[:, None], -1, 1).reshape(-1)
    if full < n:
        tail = x[full:]
        tail_max = jnp.max(jnp.abs(tail))
        tail_scaled = jnp.where(tail_max > 0, tail / tail_max, 0.0)
        floor = jax.lax.bitcast_convert_type(jnp.uint32(_ABSMAX_FLOOR_BITS), jnp.float32)
        absmax = jnp.concatenate([absmax, jnp.where(tail_max > 0, tail_max, floor)[None]])
        scaled = jnp.concatenate([scaled, jnp.clip(tail_scaled, -1, 1)])
    return scaled, absmax


def _bucketize(x: jax.Array, bounds: np.ndarray) -> jax.Array:
    """``torch.bucketize(x, bounds)``: the number of bounds strictly below each value
    (the nearest table entry, ties to the lower one), as uint8."""
    # compare_all: every value against all (at most 255) bounds, vectorised; the default
    # binary search runs as a loop of gathers, 30x slower on CPU for the 15 NF4 bounds
    return jnp.searchsorted(jnp.asarray(bounds), x, side="left", method="compare_all").astype(
        jnp.uint8
    )


@jax.jit
def dequantize(node: NF4Weight) -> jax.Array:
    """The weight a node stands for, as bitsandbytes' ``dequantize_4bit`` computes it.

    ``w = T[code] · absmax[block]`` in float32 (``absmax = D[q₂] · nested_absmax + c``
    with double quantisation), rounded to ``node.dtype`` and laid out ``[..., in, out]``.
    Pure ``jnp``: inside a jitted step it costs one layer's dense weight at a time.

    Args:
      node: an :class:`NF4Weight`, stacked or not.

    Returns:
      ``[..., in, out]`` in ``node.dtype``.
    """
    return jnp.swapaxes(_dequantized_rows(node), -1, -2)


def _dequantized_rows(node: NF4Weight) -> jax.Array:
    """:func:`dequantize` in bitsandbytes' own layout, ``[..., out, in]``."""
    fan_in, fan_out = node.shape
    n = fan_in * fan_out
    lead = node.codes.shape[:-1]
    nibbles = jnp.stack([node.codes >> 4, node.codes & 0xF], axis=-1)
    nibbles = nibbles.reshape(*lead, -1)[..., :n]
    values = jnp.asarray(TABLES[node.quant_type])[nibbles]  # [..., n] float32
    absmax = block_scales(node)  # [..., blocks]
    blocks = absmax.shape[-1]
    values = jnp.pad(values, [(0, 0)] * len(lead) + [(0, blocks * node.block_size - n)])
    w = values.reshape(*lead, blocks, node.block_size) * absmax[..., None]
    w = w.reshape(*lead, -1)[..., :n].astype(node.dtype)
    return w.reshape(*lead, fan_out, fan_in)


def block_scales(node: NF4Weight) -> jax.Array:
    """The float32 ``absmax`` of each block, ``[..., blocks]``: stored as is, or decoded from
    the nested 8-bit codes as ``nested_map[q₂] · nested_absmax + nested_offset``."""
    if not node.double_quant:
        return node.absmax
    blocks = node.absmax.shape[-1]
    codes = jnp.take_along_axis(node.nested_map, node.absmax.astype(jnp.int32), axis=-1)
    scales = jnp.repeat(node.nested_absmax, NESTED_BLOCK_SIZE, axis=-1)[..., :blocks]
    # bitsandbytes rounds the product before adding the offset. XLA would contract the two
    # into one fused multiply-add (a single rounding, off by an ulp in some blocks), even
    # across an optimization_barrier; a max with the lowest float32, the identity on finite
    # values, sits between them and prevents it.
    product = jnp.maximum(codes * scales, jnp.finfo(jnp.float32).min)
    return product + node.nested_offset[..., None]


@nn.register("value", NF4Weight)
def _value(node: NF4Weight) -> jax.Array:
    return dequantize(node).astype(node.compute_dtype)


@nn.register("linear", NF4Weight)
def _linear(x: jax.Array, node: NF4Weight) -> jax.Array:
    # As bitsandbytes' Linear4bit: the input cast to the compute dtype, the weight
    # dequantised to its dtype and cast to the compute dtype, the result cast back. The
    # product reads the weight in the ``[out, in]`` layout it is dequantised in: through
    # ``dequantize``'s transposed view, a SmolLM2 QLoRA step with bfloat16 compute took
    # 5.16 s against 3.65 (4x256, 2-core AMD EPYC Zen 4, bench/README.md)
    y = matmul.matmul_transposed(x.astype(node.compute_dtype), _dequantized_rows(node))
    return y.astype(x.dtype)


def check_options(block_size: Any, quant_type: Any) -> None:
    """Raises a ValueError naming a block size or quant type bitsandbytes does not take."""
    if block_size not in BLOCK_SIZES:
        raise ValueError(
            f"block size {block_size!r} is not supported; bitsandbytes takes {BLOCK_SIZES}"
        )
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type {quant_type!r} is not supported; expected {QUANT_TYPES}")


def float_dtype(dtype: Any, what: str = "compute_dtype") -> np.dtype:
    """`dtype` as a numpy dtype, if it is one bitsandbytes stores or computes in (float32,
    bfloat16, float16); else a ValueError naming `what`."""
    try:
        found = np.dtype(jnp.dtype(dtype))
    except TypeError:
        found = None
    if found not in FLOAT_DTYPES:
        raise ValueError(
            f"{what} {dtype!r} is not supported; expected one of {[d.name for d in FLOAT_DTYPES]}"
        )
    return found
