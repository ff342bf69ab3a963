"""DoRA (Liu et al., 2024): weight-decomposed LoRA, Hugging Face PEFT's ``use_dora=True``.

DoRA splits the adapted weight ``W' = W + s·A@B`` (``W: [in, out]``) into a direction and a
trained magnitude ``m: [out]`` per output column::

    y = m / ‖W + s·A@B‖ ⊙ (x @ W + s · (x @ A) @ B)            (‖·‖: per column)

The column norm is treated as a constant (no gradient flows through it, as in the paper's
section 4.3 and in PEFT), and it is computed from the factors alone, never forming
``W + s·A@B``::

    ‖W_j + s(AB)_j‖² = ‖W_j‖² + 2s·(AᵀW)_j·B_j + s²·B_jᵀ(AᵀA)B_j

which needs an ``[r, out]`` and an ``[r, r]`` product (``AᵀW``, ``AᵀA``), not the
``[in, out]`` one of ``A@B``. It is computed inside each layer's forward from ``W`` as the
layer sees it (an NF4 ``W`` dequantised one layer at a time inside the layer scan, as for
QLoRA). With dropout ``x̃ = dropout(x)``
(training only) and ``f = m / ‖W + s·A@B‖``, the layer computes PEFT's form::

    y = x @ W + (f - 1) ⊙ (x̃ @ W) + f ⊙ s · (x̃ @ A) @ B

which is the product above when ``x̃ = x``. ``m`` starts at the column norms of the initial
``W + s·A@B`` (``f = 1``), so DoRA starts equal to the base when LoRA does.

Example::

    params = jpeft.lora.apply(params, rank=8, targets=["q_proj", "v_proj"], use_dora=True,
                              key=jax.random.key(0))
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jpeft import lora, nn, tree


@tree.node
class DoraWeight(lora.LoraWeight):
    """A :class:`jpeft.lora.LoraWeight` with a trained magnitude per output column.

    Attributes:
      magnitude: ``[..., out]`` float32, the column norms the adapted weight is scaled to
        (PEFT's ``lora_magnitude_vector``). Layers of a stacked weight that are not adapted
        (scale 0) keep their base weight exactly and their magnitude gets no gradient.
    """

    magnitude: jax.Array = None  # a default only because LoraWeight's last fields have one

    kind: ClassVar[str] = "dora"
    trainable_fields: ClassVar[tuple[str, ...]] = ("a", "b", "magnitude")

    def parameter_count(self) -> tuple[int, int]:
        """LoRA's counts plus ``out`` magnitudes per adapted layer (as PEFT counts them)."""
        adapter, total = super().parameter_count()
        magnitude = self.magnitude.size
        if self.layers is not None:
            magnitude = magnitude * len(self.layers) // self.a.shape[0]
        return adapter + magnitude, total + magnitude


def column_norms(node: lora.LoraWeight) -> jax.Array:
    """``[..., out]`` float32 ``‖W_j + s(AB)_j‖`` of every output column, from the factors
    (the module docstring's expansion). Works on a LoRA node too (:func:`decompose`)."""
    w = nn.value(node.w).astype(jnp.float32)
    a, b = node.a.astype(jnp.float32), node.b.astype(jnp.float32)
    s = jnp.asarray(node.scale, jnp.float32)[..., None]
    base = jnp.sum(w * w, axis=-2)
    cross = jnp.sum(jnp.einsum("...ir,...io->...ro", a, w) * b, axis=-2)
    gram = jnp.einsum("...ir,...is->...rs", a, a)
    square = jnp.sum(b * (gram @ b), axis=-2)
    # Rounding can take the expanded sum a little below 0 where a column nearly cancels.
    return jnp.sqrt(jnp.maximum(base + 2 * s * cross + s * s * square, 0.0))


def decompose(node: lora.LoraWeight) -> DoraWeight:
    """The DoRA node of a LoRA node, its magnitude the column norms of ``W + s·A@B`` (as PEFT
    initialises it)."""
    fields = {field.name: getattr(node, field.name) for field in dataclasses.fields(node)}
    return DoraWeight(**fields, magnitude=column_norms(node))


def _factor(node: DoraWeight) -> jax.Array:
    """``m / ‖W + s·A@B‖`` per column, 1 in layers that are not adapted; no gradient flows
    through the norm."""
    norms = jax.lax.stop_gradient(column_norms(node))
    adapted = (jnp.asarray(node.scale) != 0)[..., None]
    return jnp.where(adapted, node.magnitude / jnp.where(adapted, norms, 1.0), 1.0)


@nn.register("linear", DoraWeight)
def _linear(x: jax.Array, node: DoraWeight) -> jax.Array:
    factor = _factor(node).astype(x.dtype)
    y = nn.linear(x, node.w)
    dropped = lora.dropout_input(x, node)
    delta = lora.low_rank_update(dropped, node)
    base = y if dropped is x else nn.linear(dropped, node.w)
    return y + (factor - 1) * base + factor * delta


@nn.register("value", DoraWeight)
def _merged(node: DoraWeight) -> jax.Array:
    w = nn.value(node.w)
    merged = (w.astype(jnp.float32) + lora.delta_weight(node)) * _factor(node)[..., None, :]
    return merged.astype(w.dtype)
