"""Batched text generation with a KV cache, compiled end to end.

The prompt batch is left-padded to a length bucket, run once through the model to fill the
cache (prefill), then one token per step is decoded inside :func:`jax.lax.while_loop`, which
stops as soon as every row has produced an end-of-sequence token. The whole loop is one
jitted function: adapters in `params` are arguments, never constants, so switching adapters
does not recompile.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import adapter_bank
from jpeft.models import decoder, virtual_tokens

_BUCKET = 32  # prompt lengths are padded to a multiple of this, bounding recompilation


def generate(
    model: decoder.DecoderLM,
    params: dict,
    tokenizer: Any,
    prompts: str | Sequence[str] | Sequence[dict] | Sequence[Sequence[dict]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    adapter_ids: Any = None,
    layers_apart: bool | None = None,
) -> list[str]:
    """Generates a completion for each prompt.

    Args:
      model, params: a jpeft model and its parameter tree (adapter nodes allowed).
      tokenizer: a transformers tokenizer (e.g. from :func:`jpeft.models.load_tokenizer`).
      prompts: a string, a chat (a list of ``{"role", "content"}`` messages, rendered with
        the tokenizer's chat template and a generation prompt), or a list of either.
      max_new_tokens: the most tokens generated per prompt.
      temperature: 0 for greedy decoding; otherwise the softmax temperature for sampling.
      top_p: nucleus sampling: sample among the smallest set of tokens whose probability
        reaches `top_p` (1.0 keeps every token).
      seed: the sampling seed.
      adapter_ids: with several adapters stacked in `params` (:mod:`jpeft.adapters`): the
        adapter of each prompt, ``int32 [b]`` (-1: none; see
        :func:`jpeft.adapters.adapter_ids`), or one for all; the prompts run as one batch.
      layers_apart: decode with the layers' weights sliced apart once before the loop
        (:meth:`jpeft.models.decoder.DecoderLM.with_layers_apart`), the KV cache too:
        faster on CPU for batches of several prompts, at the cost of one more copy of the
        layers' weights while generating. None: on CPU, for two prompts or more and more
        than one new token.

    Returns:
      The decoded new text of each prompt, without the end-of-sequence token.

    Example::

      jpeft.generate(model, params, tok, [[{"role": "user", "content": "Hi!"}]])
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    input_ids, attention_mask = encode_prompts(tokenizer, prompts)
    tokens = generate_tokens(
        model,
        params,
        input_ids,
        attention_mask,
        max_new_tokens=max_new_tokens,
        eos_token_ids=_eos_ids(model, tokenizer),
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        adapter_ids=adapter_ids,
        layers_apart=layers_apart,
    )
    eos = set(_eos_ids(model, tokenizer))
    texts = []
    for row in np.asarray(tokens):
        ends = [i for i, token in enumerate(row) if token in eos]
        texts.append(
            tokenizer.decode(row[: ends[0] if ends else len(row)], skip_special_tokens=True)
        )
    return texts


def encode_prompts(tokenizer: Any, prompts) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ``(input_ids, attention_mask)``, both ``[b, t]`` with ``t`` a multiple
    of 32, for strings or chats (see :func:`generate`)."""
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict)):
        prompts = [prompts]
    rows = []
    for prompt in prompts:
        if isinstance(prompt, str):
            rows.append(tokenizer(prompt)["input_ids"])
        else:
            text = tokenizer.apply_chat_template(
                list(prompt), add_generation_prompt=True, tokenize=False
            )
            rows.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not rows or not all(rows):
        raise ValueError("every prompt must encode to at least one token")
    width = -(-max(len(r) for r in rows) // _BUCKET) * _BUCKET
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = np.full((len(rows), width), pad, np.int32)
    attention_mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = row
        attention_mask[i, width - len(row) :] = 1
    return input_ids, attention_mask


def _eos_ids(model: decoder.DecoderLM, tokenizer: Any) -> tuple[int, ...]:
    ids = model.config.eos_token_id
    ids = set(ids if isinstance(ids, tuple) else () if ids is None else (ids,))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))


def generate_tokens(
    model: decoder.DecoderLM,
    params: dict,
    input_ids: np.ndarray | jax.Array,
    attention_mask: np.ndarray | jax.Array,
    *,
    max_new_tokens: int,
    eos_token_ids: tuple[int, ...] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    adapter_ids: Any = None,
    layers_apart: bool | None = None,
) -> jax.Array:
    """The token-level loop of :func:`generate`: ``[b, max_new_tokens]`` new token ids.

    Rows that have ended are filled with their first end-of-sequence id.
    """
    if adapter_ids is not None:
        params = adapter_bank.route(params, adapter_ids)
    return _decode(
        model,
        params,
        jnp.asarray(input_ids, jnp.int32),
        jnp.asarray(attention_mask, jnp.int32),
        jax.random.key(seed),
        jnp.float32(max(temperature, 1e-6)),
        jnp.float32(top_p),
        max_new_tokens=max_new_tokens,
        eos_token_ids=tuple(eos_token_ids),
        greedy=temperature == 0,
        layers_apart=_layers_apart(layers_apart, max_new_tokens, np.shape(input_ids)[0]),
    )


@functools.partial(
    jax.jit,
    static_argnames=("model", "max_new_tokens", "eos_token_ids", "greedy", "layers_apart"),
)
def _decode(
    model,
    params,
    input_ids,
    attention_mask,
    key,
    temperature,
    top_p,
    *,
    max_new_tokens,
    eos_token_ids,
    greedy,
    layers_apart,
):
    batch, prompt_len = input_ids.shape
    slots = virtual_tokens.prompt_length(model, params) + prompt_len + max_new_tokens
    cache = model.init_cache(batch, slots, _compute_dtype(model, params))
    hidden, cache = model.hidden_states(
        params, input_ids, attention_mask=attention_mask, cache=cache
    )
    eos = jnp.asarray(eos_token_ids or (-1,), jnp.int32)
    filler = eos[0] if eos_token_ids else jnp.int32(0)

    def pick(hidden_last, key):
        logits = model.logits(params, hidden_last).astype(jnp.float32)
        if greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return _sample(logits / temperature, top_p, key)

    key, first_key = jax.random.split(key)
    token = pick(hidden[:, -1], first_key)
    out = jnp.full((batch, max_new_tokens), filler, jnp.int32).at[:, 0].set(token)
    done = jnp.isin(token, eos)
    if layers_apart:
        # The barrier keeps XLA from sinking the slices back into the loop.
        apart = (model.with_layers_apart(params), cache.apart())
        params, cache = jax.lax.optimization_barrier(apart)

    def cond(state):
        step, _, _, done, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, token, cache, done, out, key = state
        hidden, cache = model.hidden_states(params, token[:, None], cache=cache, continues=True)
        key, step_key = jax.random.split(key)
        token = jnp.where(done, filler, pick(hidden[:, -1], step_key))
        out = out.at[:, step].set(token)
        return step + 1, token, cache, done | jnp.isin(token, eos), out, key

    state = (jnp.int32(1), token, cache, done, out, key)
    return jax.lax.while_loop(cond, body, state)[4]


def _layers_apart(choice: bool | None, max_new_tokens: int, batch: int) -> bool:
    """Whether to decode with the layers apart: `choice`, or by default on CPU (where a layer
    scan copies each layer's weights out at every step) when there is a step to decode and
    more than one row. With one row the scan was faster (SmolLM2, LoRA r=16, 64 new
    tokens, interleaved in one process on a 2-core AMD EPYC Zen 4: batch 1 scan 34.4 vs
    apart 29.8 tokens/s, batch 8 111.9 vs 121.8; all linears 31.7 vs 28.8 and 91.5 vs
    118.2)."""
    if choice is None:
        return jax.default_backend() == "cpu" and max_new_tokens > 1 and batch > 1
    return bool(choice)


def _sample(logits: jax.Array, top_p: jax.Array, key: jax.Array) -> jax.Array:
    """Nucleus sampling from ``logits: [b, v]``: tokens outside the top-`top_p` mass are
    removed (the most likely token always stays)."""
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    sorted_logits = jnp.where(mass_before < top_p, sorted_logits, -jnp.inf)
    choice = jax.random.categorical(key, sorted_logits, axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def _compute_dtype(model: decoder.DecoderLM, params: dict) -> Any:
    table = model.embedding(params)
    return table.dtype if isinstance(table, jax.Array) else jnp.float32
