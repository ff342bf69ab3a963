"""QLoRA (Dettmers et al., 2023): LoRA over a frozen base stored in 4 bits.

QLoRA is a composition of two pure functions: :func:`quantize` replaces the chosen linear
weights by :class:`jpeft.quant.NF4Weight` nodes, and :func:`jpeft.lora.apply` wraps them in
LoRA nodes. A layer then computes

    y = x @ dequant(W₄) + s · ((x @ A) @ B)

with ``dequant(W₄)`` formed inside the jitted step, one layer at a time under the layer
scan, in the compute dtype (bitsandbytes' ``bnb_4bit_compute_dtype``); only ``A`` and ``B``
train (and DoRA's magnitude with ``use_dora=True``: QDoRA). The 4-bit layout is
bitsandbytes', so checkpoints move both ways between jpeft and transformers + bitsandbytes
(:mod:`jpeft.hf.bitsandbytes`).

Example::

    model, params = jpeft.qlora.from_pretrained(path)     # quantised while it loads
    # or: params = jpeft.qlora.quantize(params) on a tree already loaded
    params = jpeft.lora.apply(params, rank=16, targets="all-linear", key=jax.random.key(0))
    ...                                                   # train as with LoRA
    merged = jpeft.qlora.merge(params)                    # dense, compute dtype
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jpeft import lora, models, nn, tree
from jpeft import targets as targeting
from jpeft.models import decoder
from jpeft.quant import nf4


def quantize(
    params: dict,
    *,
    targets: str | Sequence[str] | None = None,
    block_size: int = 64,
    double_quant: bool = True,
    quant_type: str = "nf4",
    compute_dtype: Any = jnp.bfloat16,
) -> dict:
    """Quantises the linear weights of a parameter tree to bitsandbytes 4-bit nodes.

    Each chosen weight ``[in, out]`` (or stacked ``[l, in, out]``, each layer quantised on
    its own) becomes an :class:`jpeft.quant.NF4Weight` (see :func:`jpeft.quant.nf4.quantize`):
    about ``0.5`` byte per parameter plus the block scales. Options are
    transformers' ``BitsAndBytesConfig`` ones.

    Args:
      params: a parameter tree (a jpeft model's, or any nested dict of ``weight`` arrays).
      targets: which modules, as LoRA's ``target_modules`` (names, a full-match regex or
        ``"all-linear"``); None: every linear layer except the output head (embeddings and
        norms are never quantised), as transformers does.
      block_size: elements per block (``64``; one of :data:`jpeft.quant.nf4.BLOCK_SIZES`).
      double_quant: quantise the block scales too (``bnb_4bit_use_double_quant``).
      quant_type: ``"nf4"`` or ``"fp4"`` (``bnb_4bit_quant_type``).
      compute_dtype: dtype of the matmuls with the dequantised weights
        (``bnb_4bit_compute_dtype``).

    Returns:
      The same tree with NF4 nodes in place of the chosen weights.

    Raises:
      ValueError: targets that match nothing or a non-linear module, a stacked module
        matched in some layers only, a weight that is already a node (quantise before
        applying LoRA), or an option bitsandbytes does not accept.

    Example::

      params = jpeft.qlora.quantize(params, targets=["q_proj", "v_proj"])
    """
    chosen = targeting.select(params, targeting.ALL_LINEAR if targets is None else targets)
    new = tree.copy_dicts(params)
    for module, layers in chosen:
        if len(layers) != len(module.names):
            raise ValueError(
                f"targets {targets!r} match layers {list(layers)} of the stacked module "
                f"{module.names[0]} (of {len(module.names)}); jpeft quantises whole stacked "
                "modules"
            )
        if isinstance(module.weight, tree.Node):
            raise ValueError(
                f"{module.names[0]} is already a {type(module.weight).__name__}; quantise the "
                "plain weights, then apply LoRA"
            )
        entry = tree.get_path(new, module.path)
        entry[module.weight_key] = nf4.quantize(
            module.weight,
            block_size=block_size,
            double_quant=double_quant,
            quant_type=quant_type,
            compute_dtype=compute_dtype,
        )
    return new


def from_pretrained(
    path: str | os.PathLike,
    *,
    targets: str | Sequence[str] | None = None,
    dtype: Any = jnp.float32,
    block_size: int = 64,
    double_quant: bool = True,
    quant_type: str = "nf4",
    compute_dtype: Any = jnp.bfloat16,
    **model_options: Any,
) -> tuple[decoder.DecoderLM, dict]:
    """Loads a float checkpoint (folder or GGUF, as :func:`jpeft.models.from_pretrained`)
    and quantises it while loading: each weight is quantised as soon as it is read, so the
    host holds the quantised model plus one float weight, never the whole float model (as
    transformers does with a ``BitsAndBytesConfig``).

    The result equals ``quantize(jpeft.models.from_pretrained(path, dtype=dtype)[1], ...)``.

    Args:
      path: the model folder or ``.gguf`` file.
      targets, block_size, double_quant, quant_type, compute_dtype: as :func:`quantize`.
      dtype: dtype of the weights before quantisation and of those left unquantised.
      **model_options: model fields such as ``remat``.

    Raises:
      ValueError: targets that match nothing, or as :func:`quantize`.
      CheckpointError: as :func:`jpeft.models.from_pretrained`.
    """
    wanted = targeting.ALL_LINEAR if targets is None else targets
    quantize_chosen = functools.partial(
        quantize,
        targets=targets,
        block_size=block_size,
        double_quant=double_quant,
        quant_type=quant_type,
        compute_dtype=compute_dtype,
    )
    quantised: list[tuple[str, ...]] = []

    def quantize_if_targeted(leaf_path: tuple[str, ...], leaf: jax.Array) -> Any:
        single: dict = {}
        tree.set_path(single, leaf_path, leaf)
        if not targeting.select(single, wanted, required=False):
            return leaf
        quantised.append(leaf_path)
        return tree.get_path(quantize_chosen(single), leaf_path)

    model, params = models.from_pretrained(
        path, dtype=dtype, transform=quantize_if_targeted, **model_options
    )
    if not quantised:
        targeting.select(params, wanted)  # raises, naming the modules of the tree
    return model, params


def merge(params: dict, *, requantize: bool = False, dtype: Any = None) -> dict:
    """Folds LoRA adapters into their dequantised 4-bit base: a tree for serving.

    For a LoRA node over an NF4 weight, the merged weight is

        W' = dequant(W₄) + s · A @ B

    (for DoRA, QDoRA, each column of it rescaled to the magnitude: :mod:`jpeft.dora`),
    summed in float32 and stored in `dtype`: exactly the function the adapter was trained
    with, up to the rounding of ``W'`` to `dtype`. Unadapted NF4 weights are dequantised,
    other adapters merged as :func:`jpeft.lora.merge` does (which, over NF4 bases, gives
    the same tree as ``merge(params)`` with the defaults).

    Merge into ``dequant(W₄)``, never into the original 16-bit weights ``W₁₆``: the adapter
    learnt to correct the base it saw, ``W₁₆ + q`` with ``q`` the quantisation error, so
    ``W₁₆ + s·A@B`` differs from the trained model by ``-q``. ``q`` is often much larger
    than the update ``s·A@B`` itself (unsloth-zoo PR#810 found it 10-150× per layer on
    Falcon-H1, whose merged 16-bit exports were broken by it; artidoro/qlora#28 and #254
    give the same advice). Re-quantising the merged weight (`requantize`, what PEFT's
    ``Linear4bit.merge`` does) adds a fresh quantisation error of the same size as ``q``,
    so its generations differ from the unmerged model's (peft#2321): prefer a 16-bit merge
    for serving, and re-quantise only to keep the 4-bit footprint.

    Args:
      params: a tree with LoRA nodes (over NF4 or plain weights) and/or NF4 nodes.
      requantize: quantise each merged NF4-based weight again with its node's settings,
        and leave unadapted NF4 weights quantised.
      dtype: dtype of merged and dequantised NF4-based weights; defaults to each NF4
        node's compute dtype.

    Returns:
      A tree of arrays (and of NF4 nodes with `requantize`).

    Example::

      served = jpeft.qlora.merge(params, dtype=jnp.bfloat16)
      jpeft.hf.bitsandbytes.save_pretrained_4bit(model, jpeft.qlora.merge(params, requantize=True),
                                       "out/merged-4bit", config=config)
    """

    def fold(_: str, value: Any) -> Any:
        base = value.w if isinstance(value, lora.LoraWeight) else value
        if not isinstance(base, nf4.NF4Weight):
            return nn.value(value) if isinstance(value, tree.Node) else value
        if base is value and requantize:
            return value
        target = jnp.dtype(base.compute_dtype if dtype is None else dtype)
        merged = nn.value(base).astype(jnp.float32)
        if base is not value:  # the node's own rule folds it in (LoRA's or DoRA's), in float32
            merged = nn.value(dataclasses.replace(value, w=merged))
        merged = merged.astype(target)
        if not requantize:
            return merged
        return nf4.quantize(
            merged,
            block_size=base.block_size,
            double_quant=base.double_quant,
            quant_type=base.quant_type,
            compute_dtype=base.compute_dtype,
        )

    return tree.map_nodes(fold, params)
