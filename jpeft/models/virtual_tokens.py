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

from jpeft import nn

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


def read(model: Any, params: Any, shapes_only: bool = False) -> tuple[Any, KVPrefix | None]:
    """The dense soft prompt ``[p, d]`` and prefix (``[l, p, k, h]``) of ``params[ENTRY]``,
    None for each one absent (shapes alone with `shapes_only`).

    Raises:
      ValueError: unknown entries or shapes that do not fit `model` (named in the message).
    """
    entry = params.get(ENTRY) if isinstance(params, Mapping) else None
    if not entry:
        return None, None
    unknown = sorted(set(entry) - set(KINDS))
    if unknown:
        raise ValueError(f"params[{ENTRY!r}] has unknown entries {unknown}; expected {list(KINDS)}")
    dense = (lambda x: jax.eval_shape(nn.value, x)) if shapes_only else nn.value
    prompt = None if entry.get("prompt") is None else dense(entry["prompt"])
    prefix = entry.get("prefix")
    if prefix is not None:
        prefix = prefix if isinstance(prefix, KVPrefix) else dense(prefix)
        if not isinstance(prefix, KVPrefix):
            raise TypeError(
                f"params[{ENTRY!r}]['prefix'] must be a KVPrefix or a node whose value is one, "
                f"not {type(prefix).__name__}"
            )
        prefix = KVPrefix(*(dense(x) for x in prefix))
    width = nn.shape(model.embedding(params))[-1]
    if prompt is not None and (prompt.ndim != 2 or prompt.shape[1] != width):
        raise ValueError(f"the soft prompt has shape {tuple(prompt.shape)}; expected [p, {width}]")
    layer = (model.num_layers, model.num_kv_heads, model.head_dim)
    if prefix is not None and any(
        x.ndim != 4 or (x.shape[0], *x.shape[2:]) != layer for x in prefix
    ):
        raise ValueError(
            f"the prefix keys/values have shapes {[tuple(x.shape) for x in prefix]}; "
            f"expected [{layer[0]}, p, {layer[1]}, {layer[2]}]"
        )
    return prompt, prefix


def check_count(num_virtual_tokens: Any) -> None:
    """Raises ValueError unless `num_virtual_tokens` is a positive integer."""
    if not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
        raise ValueError(f"num_virtual_tokens must be at least 1, got {num_virtual_tokens}")


def prompt_length(model: Any, params: Any) -> int:
    """How many soft-prompt tokens `params` prepends to each sequence (the cache slots they
    take in generation)."""
    prompt, _ = read(model, params, shapes_only=True)
    return 0 if prompt is None else prompt.shape[0]


def prepend(prompt: jax.Array, embeds: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``[b, p + t, d]`` embeddings with the ``[p, d]`` prompt before every row of
    ``embeds: [b, t, d]``, and the ``[b, p + t]`` validity mask with the prompt valid."""
    batch = embeds.shape[0]
    prompt = jnp.broadcast_to(prompt.astype(embeds.dtype), (batch, *prompt.shape))
    ones = jnp.ones((batch, prompt.shape[1]), bool)
    return jnp.concatenate([prompt, embeds], axis=1), jnp.concatenate([ones, valid], axis=1)


def batched(prefix: KVPrefix, batch: int) -> KVPrefix:
    """The prefix with a batch axis, ``[l, b, p, k, h]`` (one shared prefix broadcast)."""
    if prefix.k.ndim == 5:
        return prefix
    return KVPrefix(
        *(jnp.broadcast_to(x[:, None], (x.shape[0], batch, *x.shape[1:])) for x in prefix)
    )
