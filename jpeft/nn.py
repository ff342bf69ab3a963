"""Pure array operations shared by jpeft's models.

Every weight-consuming op (`linear`, `embed`, `attend`, `residual`, and `value` for weights
used elementwise such as biases and norm scales) dispatches on the type of its weight: a plain
array is used as is, while a registered node (a LoRA node, an NF4 node, ...)
supplies its own rule. This is how PEFT methods plug into the models without editing them:
a method registers a rule for its node type with :func:`register`, and the model code stays
the same.

Shapes use one set of letters throughout:
  b batch, t query tokens, s key slots, d hidden, n query heads, k key/value heads,
  h head dim, v vocabulary, l layers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import matmul

_RULES: dict[tuple[str, type], Callable[..., jax.Array]] = {}
_OPS = ("linear", "embed", "attend", "residual", "value", "bias")


def register(op: str, node_type: type) -> Callable[[Callable], Callable]:
    """Registers how `op` computes with a weight of `node_type`.

    Args:
      op: one of ``"linear"`` (``x @ w``), ``"embed"`` (row lookup), ``"attend"``
        (``x @ table.T``, a tied output head), ``"residual"`` (a sublayer's output
        projection added to the residual stream, :func:`residual`), ``"value"`` (the
        dense array itself) or ``"bias"`` (the bias a module whose weight is the node
        adds, :func:`module_bias`).
      node_type: the pytree node class that stands in for a weight array.

    Returns:
      A decorator that records the rule ``fn(x, node) -> y`` (``fn(node) -> array`` for
      ``"value"``, ``fn(h, x, node, bias) -> h'`` for ``"residual"``, ``fn(bias, node) ->
      bias`` for ``"bias"``) and returns it unchanged.

    Example::

      @nn.register("linear", LoraWeight)
      def _lora_linear(x, node): ...
    """
    if op not in _OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {_OPS}")

    def decorator(fn):
        _RULES[(op, node_type)] = fn
        return fn

    return decorator


def has_rule(op: str, w: Any) -> bool:
    """Whether a rule for `op` is registered for the type of `w`."""
    return (op, type(w)) in _RULES


def _rule(op: str, w: Any) -> Callable | None:
    """The rule of `op` for `w`'s type; None for an array (the op's own default). A node
    with a ``value`` rule but none for `op` computes `op` on its dense value.

    Raises:
      TypeError: `w` is neither an array nor of a type with a rule (named in the message).
    """
    rule = _RULES.get((op, type(w)))
    if rule is not None or isinstance(w, (jax.Array, np.ndarray, np.generic, int, float)):
        return rule
    dense = _RULES.get(("value", type(w)))
    if dense is None:
        raise TypeError(
            f"jpeft.nn.{op} got a {type(w).__name__}, which is not an array and has no "
            f"{op!r} or 'value' rule; register one with jpeft.nn.register"
        )
    op_on_array = _OP_FUNCTIONS[op]
    return lambda *args: op_on_array(*args[:-1], dense(args[-1]))


def value(w: Any) -> Any:
    """The dense array a weight stands for (a plain array is returned as is)."""
    rule = _rule("value", w)
    return rule(w) if rule is not None else w


def shape(w: Any) -> tuple[int, ...]:
    """The shape of the dense array a weight stands for, without computing it.

    A node with no ``value`` rule that wraps a base weight (its ``base_field``, see
    :mod:`jpeft.tree`) has its base's shape: such a node changes what a layer computes
    around the weight (a bottleneck adapter, :func:`residual`), not the weight itself.
    """
    base_field = getattr(w, "base_field", None)
    if base_field is not None and not has_rule("value", w):
        return shape(getattr(w, base_field))
    return jax.eval_shape(value, w).shape


def linear(x: jax.Array, w: Any, bias: jax.Array | None = None) -> jax.Array:
    """``x @ w + bias`` for ``x: [..., in]`` and a weight ``w: [in, out]`` (or a node).

    The result is in ``x``'s dtype (the activations'); the product reads both operands in
    the narrower of their dtypes (:func:`jpeft.matmul.product_dtype`), cast inside the
    jitted computation, never in the parameter tree.
    """
    rule = _rule("linear", w)
    y = rule(x, w) if rule is not None else matmul.matmul(x, w)
    if bias is not None:
        y = y + module_bias(bias, w).astype(y.dtype)
    return y


def residual(h: jax.Array, x: jax.Array, w: Any, bias: jax.Array | None = None) -> jax.Array:
    """``h + linear(x, w, bias)``: a sublayer's output projection added to the residual
    stream ``h: [..., d]``, for ``x: [..., in]`` and ``w: [in, d]`` (or a node).

    Models call it where a block adds a sublayer's output to its input (the attention
    output projection and the MLP's last linear of a pre-norm block), so that a node on the
    projection's weight may change the whole step, with both the sublayer's output ``o``
    and the block's input ``h`` in sight: a bottleneck adapter computes
    ``h + o + A(o)`` or ``h + o + A(h)`` (:mod:`jpeft.bottleneck`). Any other weight,
    array or node, gives ``h + o``.
    """
    rule = _RULES.get(("residual", type(w)))
    if rule is not None:
        return rule(h, x, w, bias)
    return h + linear(x, w, bias)


def module_bias(bias: Any, w: Any) -> jax.Array:
    """The bias that a module whose weight is `w` adds: ``value(bias)``, unless `w`'s node
    changes it (a ``"bias"`` rule: IA3 scales a module's output, its bias included).
    :func:`jpeft.tree.materialize` folds the same rule into the bias when merging."""
    rule = _RULES.get(("bias", type(w)))
    return value(bias) if rule is None else rule(value(bias), w)


def embed(ids: jax.Array, table: Any, dtype: Any = None) -> jax.Array:
    """Rows of ``table: [v, d]`` for integer ``ids: [...]``, giving ``[..., d]``."""
    rule = _rule("embed", table)
    out = rule(ids, table) if rule is not None else jnp.take(table, ids, axis=0)
    return out if dtype is None else out.astype(dtype)


def attend(x: jax.Array, table: Any) -> jax.Array:
    """``x @ table.T`` for ``x: [..., d]`` and ``table: [v, d]``: a tied output head.

    On CPU a float32 product is computed as ``(table @ x.T).T``: written as ``x @ table.T``,
    XLA:CPU keeps a transposed copy of the whole table alive through the chunked loss
    (113 MiB of temporaries for SmolLM2's 49152 x 576 table; bench/README.md); this form
    reads the table as it is stored and transposes only the ``[v, tokens]`` product. A
    product in a narrower dtype takes :func:`jpeft.matmul.matmul_transposed` (float32 sums,
    one product contracting both last axes).
    """
    rule = _rule("attend", table)
    if rule is not None:
        return rule(x, table)
    narrow_product = matmul.narrow(matmul.product_dtype(x.dtype, table.dtype))
    if jax.default_backend() != "cpu" or narrow_product:
        return matmul.matmul_transposed(x, table)
    table = table.astype(x.dtype)
    rows = x.reshape(-1, x.shape[-1])
    return (table @ rows.T).T.reshape(*x.shape[:-1], table.shape[0])


def output_head(hidden: jax.Array, weight: Any, tied: bool) -> jax.Array:
    """Logits ``[..., v]`` of final hidden states ``[..., d]``: through the ``[v, d]``
    embedding table when the head is `tied` to it (:func:`attend`), else through the
    ``[d, v]`` head weight (:func:`linear`)."""
    return attend(hidden, weight) if tied else linear(hidden, weight)


_OP_FUNCTIONS = {"linear": linear, "embed": embed, "attend": attend}


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Root-mean-square norm as Llama computes it: the reduction in float32,
    ``weight * (x / sqrt(mean(x²) + eps))`` cast back to ``x``'s dtype before the scale."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return value(weight).astype(x.dtype) * normed.astype(x.dtype)


def layer_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis, computed in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    normed = (x32 - mean) * jax.lax.rsqrt(var + eps)
    scale, shift = value(weight).astype(jnp.float32), value(bias).astype(jnp.float32)
    return (normed * scale + shift).astype(x.dtype)


def gelu_new(x: jax.Array) -> jax.Array:
    """GPT-2's tanh approximation of GELU."""
    return jax.nn.gelu(x, approximate=True)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": gelu_new,
    "gelu_pytorch_tanh": gelu_new,
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation function called `name` in Hugging Face configs."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# ----------------------------------------------------------------------------- rotary embedding


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeParameters:
    """Rotary embedding settings, with the field names of transformers' ``rope_parameters``.

    Supported ``rope_type`` values: ``"default"``, ``"linear"`` (positions divided by
    ``factor``) and ``"llama3"`` (frequency-dependent scaling of Llama 3.1).
    """

    rope_type: str = "default"
    rope_theta: float = 10000.0
    factor: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    _TYPES = ("default", "linear", "llama3")

    def __post_init__(self):
        if self.rope_type not in self._TYPES:
            raise ValueError(
                f"unsupported rope_type {self.rope_type!r}; expected one of {self._TYPES}"
            )
        needed = {
            "default": (),
            "linear": ("factor",),
            "llama3": (
                "factor",
                "low_freq_factor",
                "high_freq_factor",
                "original_max_position_embeddings",
            ),
        }[self.rope_type]
        missing = [name for name in needed if getattr(self, name) is None]
        if missing:
            raise ValueError(f"rope_type {self.rope_type!r} needs {missing} in rope_parameters")

    @classmethod
    def from_hf(cls, config: dict) -> RopeParameters:
        """From a config.json dict: transformers 5 ``rope_parameters`` or the older
        ``rope_theta`` + ``rope_scaling`` pair."""
        params = config.get("rope_parameters")
        if params is None:
            params = dict(config.get("rope_scaling") or {})
            params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
        params = dict(params)
        params["rope_type"] = params.pop("type", None) or params.get("rope_type", "default")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(
                f"unsupported partial_rotary_factor {params['partial_rotary_factor']}; expected 1.0"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        ignored = {"partial_rotary_factor", "attention_factor"}
        unknown = set(params) - known - ignored
        if unknown:
            raise ValueError(
                f"unsupported rope_parameters fields {sorted(unknown)} for rope_type "
                f"{params['rope_type']!r}"
            )
        return cls(**{k: v for k, v in params.items() if k in known})

    def inverse_frequencies(self, head_dim: int) -> np.ndarray:
        """``[h / 2]`` float32 inverse frequencies, computed as transformers does."""
        exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
        inv_freq = (1.0 / np.power(np.float32(self.rope_theta), exponents)).astype(np.float32)
        if self.rope_type == "linear":
            return (inv_freq / np.float32(self.factor)).astype(np.float32)
        if self.rope_type == "llama3":
            return _llama3_scaled(inv_freq, self)
        return inv_freq


def _llama3_scaled(inv_freq: np.ndarray, p: RopeParameters) -> np.ndarray:
    """Llama 3.1 scaling: long wavelengths divided by `factor`, short ones kept, and a smooth
    interpolation between the two bands."""
    low_freq_wavelen = p.original_max_position_embeddings / p.low_freq_factor
    high_freq_wavelen = p.original_max_position_embeddings / p.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / p.factor, inv_freq)
    smooth = (p.original_max_position_embeddings / wavelen - p.low_freq_factor) / (
        p.high_freq_factor - p.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / p.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates ``x: [b, t, heads, h]`` by ``positions: [b, t]`` (the half-split layout of
    Hugging Face Llama: ``x·cos + rotate_half(x)·sin``), angles in float32."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [b, t, h/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


# ----------------------------------------------------------------------------- attention


def attention_mask(
    query_slots: jax.Array,
    key_valid: jax.Array,
    window: jax.Array | int | None = None,
    segments: jax.Array | None = None,
) -> jax.Array:
    """Boolean ``[b, 1, t, s]`` mask: causal over slots, padding removed, optional window.

    Args:
      query_slots: ``[t]`` the slot each query token occupies in the key sequence.
      key_valid: ``[b, s]`` True where a key slot holds a real (non-padding) token.
      window: attend only to the last `window` slots (sliding-window attention), or None.
      segments: ``[b, s]`` example ids of packed sequences (queries and keys share slots):
        tokens attend only within their own example.
    """
    key_slots = jnp.arange(key_valid.shape[1])
    allowed = key_slots[None, :] <= query_slots[:, None]  # [t, s]
    if window is not None:
        allowed &= query_slots[:, None] - key_slots[None, :] < window
    mask = allowed[None] & key_valid[:, None, :]
    if segments is not None:
        mask &= segments[:, :, None] == segments[:, None, :]
    return mask[:, None]


_CAUSAL_BLOCK = 128
"""Query rows per block of the CPU attention's causal block skipping. Smaller blocks skip
more of the masked triangle and keep each block's logits small; with the written-out
gradient of :func:`_softmax_attention`, one layer's forward and backward at 1x2048 took
270 ms with blocks of 512, 242 with 256, 221-235 with 128 and 221 with 64 (2-core AMD EPYC
Zen 4), and 4x256 17.0 ms with 128 against 19.4 with 512 and 20.5 with 64."""


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    scale: float,
    *,
    causal_offset: int | None = None,
) -> jax.Array:
    """Grouped-query attention ``softmax(q·kᵀ·scale + mask)·v``.

    On GPU this is :func:`jax.nn.dot_product_attention` (cuDNN flash attention where
    available). Elsewhere (CPU) it is :func:`_grouped_attention`, the same maths with the
    query groups of each key/value head laid out as one matrix, which XLA:CPU runs about
    twice as fast, and the softmax's gradient written out as flash attention does; and,
    when the caller knows the mask is causal (`causal_offset`), query blocks of
    :data:`_CAUSAL_BLOCK` rows skip the key slots that no query of the block can see, which
    halves the work of long sequences. A query that sees no key (left padding) gets the
    mean of its block's values: finite and meaningless, as anywhere else.

    Args:
      q: ``[b, t, n, h]``; k, v: ``[b, s, k, h]`` with ``n`` a multiple of ``k``.
      mask: boolean ``[b, 1, t, s]``.
      causal_offset: a promise that query ``i`` may attend to no key slot past
        ``i + causal_offset`` (0 for plain causal self-attention, the prefix length with a
        key/value prefix), or None (no promise: e.g. a KV cache at a traced length).

    Returns:
      ``[b, t, n, h]``.
    """
    if jax.default_backend() != "cpu":  # GPU (cuDNN where it applies), TPU: XLA's own kernel
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)
    steps = q.shape[1]
    if causal_offset is None or steps <= _CAUSAL_BLOCK:
        return _grouped_attention(q, k, v, mask, scale)
    blocks = []
    for start in range(0, steps, _CAUSAL_BLOCK):
        stop = min(start + _CAUSAL_BLOCK, steps)
        keys = min(stop + causal_offset, k.shape[1])
        blocks.append(
            _grouped_attention(
                q[:, start:stop], k[:, :keys], v[:, :keys], mask[:, :, start:stop, :keys], scale
            )
        )
    return jnp.concatenate(blocks, axis=1)


def _grouped_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float
) -> jax.Array:
    """Attention with the ``g = n / k`` query heads sharing a key/value head stacked along
    the query axis: ``[b, k, g·t, h] @ [b, k, h, s]``, one batched matmul per key/value
    head, logits and softmax in float32 (as :func:`jax.nn.dot_product_attention`)."""
    batch, steps, heads, dim = q.shape
    slots, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    qg = q.reshape(batch, steps, kv_heads, groups, dim).transpose(0, 2, 3, 1, 4)
    qg = qg.reshape(batch, kv_heads, groups * steps, dim)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    mask = jnp.broadcast_to(mask[:, :, None], (batch, 1, groups, steps, slots))
    mask = mask.reshape(batch, 1, groups * steps, slots)
    out = _softmax_attention(qg, kt, vt, mask, jnp.float32(scale))
    out = out.reshape(batch, kv_heads, groups, steps, dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, steps, heads, dim)


_MASKED = -0.7 * float(np.finfo(np.float32).max)


def _masked_logits(qg, kt, mask, scale):
    """Scaled logits ``[b, k, q, s]`` in float32, ``-0.7·max`` where `mask` is False."""
    logits = jnp.einsum("bkqh,bksh->bkqs", qg, kt, preferred_element_type=jnp.float32)
    return jnp.where(mask, logits * scale, _MASKED)


@jax.custom_vjp
def _softmax_attention(qg, kt, vt, mask, scale):
    """``softmax(qg·ktᵀ·scale, masked)·vt`` over ``[b, k, q, h]`` queries and ``[b, k, s, h]``
    keys and values, with the gradient written out (:func:`_softmax_attention_bwd`)."""
    return _softmax_attention_fwd(qg, kt, vt, mask, scale)[0]


def _softmax_attention_fwd(qg, kt, vt, mask, scale):
    logits = _masked_logits(qg, kt, mask, scale)
    top = jnp.max(logits, axis=-1, keepdims=True)
    weights = jnp.exp(logits - top)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    probs = (weights / total).astype(vt.dtype)
    out = jnp.einsum("bkqs,bksh->bkqh", probs, vt)
    return out, (qg, kt, vt, mask, scale, out, top, total)


def _softmax_attention_bwd(residuals, d_out):
    """The softmax's gradient as flash attention writes it: ``dS = P ∘ (dP − D)`` with
    ``D = rowsum(dO ∘ O)``, from the row maxima and sums saved by the forward pass. Left
    to autodiff, ``D`` is ``rowsum(dP ∘ P)``, a reduction over the key axis that XLA:CPU
    fuses into the ``dP`` matmul's library call, where it ran at 10 GFLOP/s
    (bench/README.md)."""
    qg, kt, vt, mask, scale, out, top, total = residuals
    logits = _masked_logits(qg, kt, mask, scale)
    # not exp(logits - log-sum-exp): a query that sees no key has top = -0.7·max, which
    # absorbs log(total) in float32, and its probabilities must stay 1 / s, not 1
    probs = jnp.exp(logits - top) / total
    d_vt = jnp.einsum("bkqs,bkqh->bksh", probs.astype(d_out.dtype), d_out)
    d_probs = jnp.einsum("bkqh,bksh->bkqs", d_out, vt, preferred_element_type=jnp.float32)
    rows = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    # masked logits are constants (a query that sees no key has probabilities 1 / s there)
    d_logits = jnp.where(mask, probs * (d_probs - rows) * scale, 0.0).astype(qg.dtype)
    d_qg = jnp.einsum("bkqs,bksh->bkqh", d_logits, kt)
    d_kt = jnp.einsum("bkqs,bkqh->bksh", d_logits, qg)
    d_mask = np.zeros(mask.shape, jax.dtypes.float0)
    return d_qg, d_kt, d_vt, d_mask, jnp.zeros_like(scale)


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)
