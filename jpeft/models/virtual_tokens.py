"""The reserved entry of a parameter tree for PEFT methods that add tokens, not weights.

Prompt tuning and prefix tuning change no weight: they add virtual tokens. Their parameters
live in one documented place of the tree, ``params["virtual_tokens"]``, which
:meth:`jpeft.models.DecoderLM.hidden_states` reads, so that the forward, the loss, the train
steps, evaluation and :func:`jpeft.generate` need no code of such a method; the method fills
this entry and nothing else:

* ``params["virtual_tokens"]["prompt"]``: ``[p, d]`` soft-prompt embeddings, prepended to the
  token embeddings of every sequence. They take positions ``0..p-1`` and the real tokens
  follow from ``p`` (as Hugging Face PEFT's prompt tuning, which prepends them to
  ``inputs_embeds``); their hidden states and logits are not returned, so outputs stay
  aligned with ``input_ids``. In generation they enter the KV cache with the prompt.
* ``params["virtual_tokens"]["prefix"]``: a :class:`KVPrefix` of ``[l, p, k, h]`` keys and
  values that every token attends to in every layer (prefix tuning). The real tokens'
  positions start at ``p``, as they do in Hugging Face PEFT, which passes the prefix as
  ``past_key_values``.

Each may be an array (a :class:`KVPrefix` of arrays or nodes) or a node whose dense value
(:func:`jpeft.nn.value`) is one, e.g. a prefix computed by a reparametrising MLP.

Example::

    params = {**params, "virtual_tokens": {"prompt": jpeft.tree.Trainable(embeddings)}}
    logits = model(params, input_ids)   # [b, t, v], the p virtual tokens' logits left out
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jpeft import adapter_bank, nn

ENTRY = "virtual_tokens"
"""The key of the reserved entry at the top of a parameter tree."""

KINDS = ("prompt", "prefix")


class KVPrefix(NamedTuple):
    """Per-layer keys and values that every query attends to (prefix tuning).

    Attributes:
      k, v: ``[l, p, k, h]`` for a prefix of ``p`` virtual tokens shared by every row, or
        ``[l, b, p, k, h]`` for one prefix per row.
    """

    k: jax.Array
    v: jax.Array


class Entry(NamedTuple):
    """The dense virtual tokens of a parameter tree (:func:`read`); None where absent.

    Attributes:
      prompt: the soft prompt ``[p, d]``, or ``[b, p, d]`` with one per row.
      prompt_valid: None (every virtual token real), or ``[p]`` / ``[b, p]`` False on the
        slots that hold none (the padding of stacked adapters, :mod:`jpeft.adapters`):
        they are masked out, and positions count the real ones only.
      prefix: the key/value prefix.
      prefix_valid: as `prompt_valid`, for the prefix's slots.
    """

    prompt: Any = None
    prompt_valid: Any = None
    prefix: KVPrefix | None = None
    prefix_valid: Any = None


def read(model: Any, params: Any, shapes_only: bool = False) -> Entry:
    """The :class:`Entry` of ``params[ENTRY]`` (shapes alone with `shapes_only`).

    Raises:
      ValueError: unknown entries or shapes that do not fit `model` (named in the message).
    """
    entry = params.get(ENTRY) if isinstance(params, Mapping) else None
    if not entry:
        return Entry()
    unknown = sorted(set(entry) - set(KINDS))
    if unknown:
        raise ValueError(f"params[{ENTRY!r}] has unknown entries {unknown}; expected {list(KINDS)}")
    dense = (lambda x: jax.eval_shape(nn.value, x)) if shapes_only else nn.value
    prompt = prompt_valid = valid = None
    if entry.get("prompt") is not None:
        prompt, prompt_valid = _with_validity(dense(entry["prompt"]))
    prefix = entry.get("prefix")
    if prefix is not None:
        prefix = prefix if isinstance(prefix, KVPrefix) else dense(prefix)
        prefix, valid = _with_validity(prefix)
        if not isinstance(prefix, KVPrefix):
            raise TypeError(
                f"params[{ENTRY!r}]['prefix'] must be a KVPrefix or a node whose value is one, "
                f"not {type(prefix).__name__}"
            )
        k, v = (dense(x) for x in prefix[:2])
        if valid is not None and valid.ndim == 2:  # [b, l, p, k, h] -> [l, b, p, k, h]
            k, v = (jax.ShapeDtypeStruct((x.shape[1], x.shape[0], *x.shape[2:]), x.dtype)
                    if shapes_only else jnp.swapaxes(x, 0, 1) for x in (k, v))  # fmt: skip
        prefix = KVPrefix(k, v)
    width = nn.shape(model.embedding(params))[-1]
    if prompt is not None and (prompt.ndim - _rows(prompt_valid) != 2 or prompt.shape[-1] != width):
        raise ValueError(f"the soft prompt has shape {tuple(prompt.shape)}; expected [p, {width}]")
    layer = (model.num_layers, model.num_kv_heads, model.head_dim)
    if prefix is not None and any(
        x.ndim - _rows(valid) != 4 or (x.shape[0], *x.shape[-2:]) != layer for x in prefix[:2]
    ):
        raise ValueError(
            f"the prefix keys/values have shapes {[tuple(x.shape) for x in prefix[:2]]}; "
            f"expected [{layer[0]}, p, {layer[1]}, {layer[2]}]"
        )
    return Entry(prompt, prompt_valid, prefix, valid)


def _with_validity(value: Any) -> tuple[Any, Any]:
    """``(value, valid)`` of a dense entry: a :class:`jpeft.adapter_bank.Masked` pair
    (stacked adapters) or a plain value (every virtual token real)."""
    if isinstance(value, adapter_bank.Masked):
        return value.value, value.valid
    return value, None


def _rows(valid: Any) -> int:
    """1 when `valid` has a batch axis (one entry per row), else 0."""
    return int(valid is not None and valid.ndim == 2)


def check_count(num_virtual_tokens: Any) -> None:
    """Raises ValueError unless `num_virtual_tokens` is a positive integer."""
    if not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
        raise ValueError(f"num_virtual_tokens must be at least 1, got {num_virtual_tokens}")


def prompt_length(model: Any, params: Any) -> int:
    """How many soft-prompt tokens `params` prepends to each sequence (the cache slots they
    take in generation)."""
    prompt = read(model, params, shapes_only=True).prompt
    return 0 if prompt is None else prompt.shape[-2]


def prepend(
    prompt: jax.Array, embeds: jax.Array, valid: jax.Array, prompt_valid: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """``[b, p + t, d]`` embeddings with the ``[p, d]`` (or ``[b, p, d]``) prompt before
    every row of ``embeds: [b, t, d]``, and the ``[b, p + t]`` validity mask, the prompt's
    from `prompt_valid` (``[p]`` or ``[b, p]``; None: all valid)."""
    batch, p = embeds.shape[0], prompt.shape[-2]
    prompt = jnp.broadcast_to(prompt.astype(embeds.dtype), (batch, p, prompt.shape[-1]))
    real = jnp.ones((p,), bool) if prompt_valid is None else prompt_valid
    real = jnp.broadcast_to(real, (batch, p))
    return jnp.concatenate([prompt, embeds], axis=1), jnp.concatenate([real, valid], axis=1)


def batched(prefix: KVPrefix, batch: int) -> KVPrefix:
    """The prefix with a batch axis, ``[l, b, p, k, h]`` (one shared prefix broadcast)."""
    if prefix.k.ndim == 5:
        return prefix
    return KVPrefix(
        *(jnp.broadcast_to(x[:, None], (x.shape[0], batch, *x.shape[1:])) for x in prefix)
    )


def validity(valid: jax.Array | None, batch: int, slots: int) -> jax.Array:
    """``[b, p]`` validity of `slots` virtual tokens from an :class:`Entry`'s (None: all)."""
    return jnp.broadcast_to(jnp.ones((slots,), bool) if valid is None else valid, (batch, slots))
