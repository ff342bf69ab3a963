"""The decoder-only language model skeleton that every jpeft model fills in.

A model is a frozen dataclass holding its config; its parameters are a separate nested-dict
tree keyed by Hugging Face module names. The layers' parameters are stacked along a leading
``[l]`` axis under the layers' module path (``model.layers`` for Llama, ``transformer.h`` for
GPT-2), so ``params["model"]["layers"]["self_attn"]["q_proj"]["weight"]`` is ``[l, d, n·h]``
and stands for HF's ``model.layers.{i}.self_attn.q_proj.weight`` for every ``i``. The layers
run under :func:`jax.lax.scan` (one compiled layer, whatever the depth) with
:func:`jax.checkpoint` and a chosen remat policy; a tree whose layers are a list of
per-layer trees (:meth:`DecoderLM.with_layers_apart`) runs them one after another instead,
which KV-cached decoding on CPU uses (:mod:`jpeft.generation`).

Linear weights are stored ``[in, out]`` (``y = x @ w``), the transpose of torch's ``Linear``;
GPT-2's ``Conv1D`` already stores ``[in, out]``. :meth:`DecoderLM.from_hf_state_dict` and
:meth:`DecoderLM.to_hf_state_dict` are the one place where names are stacked and unstacked
and weights transposed.

A subclass provides the embedding, the two halves of a block around attention, the final
norm and the head, and the HF parameter shapes; the skeleton does the rest: positions from
the padding mask, the KV cache, a per-layer key/value prefix, masks and the layer scan.
"""

from __future__ import annotations

import abc
import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jpeft import adapter_bank, nn, targets, tree
from jpeft.models import hf_layout, virtual_tokens
from jpeft.models.hf_layout import HFEntry
from jpeft.models.virtual_tokens import KVPrefix

FULL_ATTENTION = np.iinfo(np.int32).max
"""The attention window of a layer without sliding window (:meth:`DecoderLM.layer_windows`)."""


class KVCache(NamedTuple):
    """Keys and values of the tokens seen so far, for incremental decoding.

    Attributes:
      k, v: ``[l, b, s, k, h]`` per-layer keys and values for ``s`` slots, or lists of the
        ``l`` layers' ``[b, s, k, h]`` (:meth:`apart`, for layers apart).
      valid: ``[b, s]`` True where a slot holds a real token (not padding, not yet empty).
      length: ``[]`` int32, how many slots are filled (the same for every row).
      next_position: ``[b]`` int32, the position id the next real token of each row gets.
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    length: jax.Array
    next_position: jax.Array

    def apart(self) -> KVCache:
        """This cache with each layer's keys and values an array of its own, to decode
        with the layers apart (:meth:`DecoderLM.with_layers_apart`): each step then updates
        each layer's arrays in place, where a stacked cache would be sliced and restacked."""
        return self._replace(k=list(self.k), v=list(self.v))


SAVED_ACTIVATIONS: dict[str, tuple[str, ...]] = {
    "save_mlp": ("mlp_hidden",),
    "save_matmuls": ("qkv", "attention", "residual", "mlp_hidden"),
}
"""jpeft's own layer remat policies: the named activations each one keeps for the backward
pass (everything else is recomputed from the layer's input). The models name ``qkv`` (the
projected queries, keys and values), ``attention`` (the attention output, before the output
projection), ``residual`` (the stream after attention) and ``mlp_hidden`` (the MLP's
up/gate projections) with :func:`jax.ad_checkpoint.checkpoint_name`.

Per token and layer of SmolLM2-135M in float32, ``save_mlp`` keeps 12 KiB and ``save_matmuls``
20 KiB; on a 2-core CPU each took about 12% off the layers' backward pass (bench/README.md).
"""


def remat_policy(name: str) -> Callable:
    """The layer remat policy called `name`: one of :data:`SAVED_ACTIVATIONS` or a policy
    of :mod:`jax.checkpoint_policies` that takes no arguments."""
    if name in SAVED_ACTIVATIONS:
        return jax.checkpoint_policies.save_only_these_names(*SAVED_ACTIVATIONS[name])
    if name not in _ARGUMENT_FREE_JAX_POLICIES:
        raise ValueError(
            f"unknown remat policy {name!r}; expected one of "
            f"{sorted(SAVED_ACTIVATIONS) + sorted(_ARGUMENT_FREE_JAX_POLICIES)} or None"
        )
    return getattr(jax.checkpoint_policies, name)


_ARGUMENT_FREE_JAX_POLICIES = (
    "everything_saveable",
    "nothing_saveable",
    "dots_saveable",
    "checkpoint_dots",
    "dots_with_no_batch_dims_saveable",
    "checkpoint_dots_with_no_batch_dims",
)


@dataclasses.dataclass(frozen=True)
class DecoderLM(abc.ABC):
    """Base class of jpeft's causal language models (see the module docstring).

    Attributes:
      config: the model's frozen config dataclass (HF field names).
      remat: the layer remat policy: a name of :data:`SAVED_ACTIVATIONS` or of
        :mod:`jax.checkpoint_policies`, or None (also spelled ``"none"``: keep every
        activation, fastest, and the most memory). The default, ``nothing_saveable``, keeps only each layer's input.
      activation_dtype: the dtype of the residual stream and of everything computed between
        the products (norms, RoPE, attention, the loss's logits), or None for the embedding
        table's. ``"float32"`` over a bfloat16 frozen base keeps every activation in float32
        while each product still reads its weight, and its input rounded, in bfloat16
        (:mod:`jpeft.matmul`), closer to float32 compute. On a 2-core AMD EPYC Zen 4 it
        trained SmolLM2's LoRA 4% faster than bfloat16 activations, and 12% faster with
        ``remat="save_matmuls"``, which float32 residuals make pay (bench/README.md), for
        twice the activation memory and more.
    """

    config: Any
    remat: str | None = "nothing_saveable"
    activation_dtype: Any = None

    layers_path: ClassVar[tuple[str, ...]]
    """Where the stacked layers live in the tree, e.g. ``("model", "layers")``."""
    embed_path: ClassVar[tuple[str, ...]]
    """The token embedding table's module path."""
    head_path: ClassVar[tuple[str, ...]] = ("lm_head",)
    """The output projection's module path (absent from the tree when tied)."""
    attention_output_path: ClassVar[tuple[str, ...]]
    """The attention output projection's module path within a layer, e.g.
    ``("self_attn", "o_proj")``: :meth:`_finish_block` adds it to the residual stream
    with :func:`jpeft.nn.residual` (where bottleneck adapters hook in)."""
    mlp_output_path: ClassVar[tuple[str, ...]]
    """The MLP's last linear's module path within a layer, e.g. ``("mlp", "down_proj")``,
    added to the residual stream with :func:`jpeft.nn.residual` too."""
    _hf_ignored: ClassVar[tuple[str, ...]] = ()
    """Regexes of checkpoint buffers that are not parameters (e.g. rotary inv_freq)."""

    def __post_init__(self):
        if self.remat == "none":  # the command line's and config files' word for None
            object.__setattr__(self, "remat", None)
        if self.remat is not None:
            remat_policy(self.remat)  # fails now, naming the policies, not when traced
        if self.activation_dtype is not None:
            dtype = jnp.dtype(self.activation_dtype)
            if not jnp.issubdtype(dtype, jnp.floating):
                raise ValueError(f"activation_dtype must be a float dtype, got {dtype.name}")
            object.__setattr__(self, "activation_dtype", dtype)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "layers_path" in cls.__dict__:
            targets.STACKED_LAYER_PATHS.add(cls.layers_path)

    # ------------------------------------------------------------------ subclass interface

    @property
    @abc.abstractmethod
    def num_layers(self) -> int:
        """Number of decoder layers."""

    @property
    @abc.abstractmethod
    def num_kv_heads(self) -> int:
        """Number of key/value heads."""

    @property
    @abc.abstractmethod
    def head_dim(self) -> int:
        """Size of one attention head."""

    @property
    def attention_scale(self) -> float:
        """The factor applied to ``q·kᵀ`` before the softmax."""
        return self.head_dim**-0.5

    @property
    def tied(self) -> bool:
        return bool(self.config.tie_word_embeddings)

    @property
    def learned_positions(self) -> int | None:
        """How many positions a learned position table holds (GPT-2's ``n_positions``), or
        None for rotary positions, which have no table to run out of."""
        return None

    def _check_positions(self, slots: int, kv_prefix: KVPrefix | None) -> None:
        """Refuses sequences (or caches) whose positions, after a prefix's, would run past a
        learned position table: JAX would clamp the index and compute silently wrong."""
        prefix = 0 if kv_prefix is None else kv_prefix.k.shape[2]
        limit = self.learned_positions
        if limit is not None and prefix + slots > limit:
            virtual = f"{prefix} prefix tokens and " if prefix else ""
            raise ValueError(
                f"{type(self).__name__} has {limit} learned positions; {virtual}{slots} "
                "tokens (soft-prompt tokens included, and every slot of a cache) need "
                f"{prefix + slots}"
            )

    def layer_windows(self) -> np.ndarray:
        """``[l]`` int32 sliding-window size of each layer (int32 max for full attention)."""
        return np.full((self.num_layers,), FULL_ATTENTION, np.int32)

    @abc.abstractmethod
    def _embed(self, params: dict, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        """Input embeddings ``[b, t, d]`` for ids or already-embedded ``tokens``."""

    @abc.abstractmethod
    def _qkv(self, layer: dict, h: jax.Array, positions: jax.Array):
        """The block up to attention: ``q [b, t, n, h]``, ``k, v [b, t, k, h]``."""

    @abc.abstractmethod
    def _finish_block(self, layer: dict, h: jax.Array, attn: jax.Array) -> jax.Array:
        """The block after attention, given the block input and ``attn [b, t, n, h]``."""

    @abc.abstractmethod
    def _final_norm(self, params: dict, h: jax.Array) -> jax.Array:
        """The norm after the last layer."""

    @abc.abstractmethod
    def hf_shapes(self) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
        """HF-layout shapes: ``(global {name: shape}, per-layer {suffix: shape})``."""

    @abc.abstractmethod
    def _hf_transposed(self, suffix: str) -> bool:
        """Whether the HF tensor named `suffix` is stored transposed relative to jpeft."""

    # ------------------------------------------------------------------ forward

    def __call__(
        self,
        params: dict,
        input_ids: jax.Array | None = None,
        *,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        inputs_embeds: jax.Array | None = None,
        kv_prefix: KVPrefix | None = None,
        segment_ids: jax.Array | None = None,
        adapter_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Logits ``[b, t, v]`` for ``input_ids: [b, t]`` (or ``inputs_embeds: [b, t, d]``).

        Args:
          params: the parameter tree (adapter nodes allowed wherever a weight is).
          attention_mask: ``[b, t]``, 1 for real tokens and 0 for (left) padding.
          positions: ``[b, t]`` position ids; by default counted over real tokens only, so
            a left-padded row gets the same positions as the unpadded one.
          kv_prefix: per-layer keys and values every token attends to.
          segment_ids: ``[b, t]`` example ids for padding-free packing: each token attends
            only within its example, and positions restart at each example.
          adapter_ids: with several adapters stacked in `params` (:mod:`jpeft.adapters`):
            the adapter of every row, ``int32 [b]`` (-1: none), or one for all (a scalar).
        """
        if adapter_ids is not None:
            params = adapter_bank.route(params, adapter_ids)
        hidden, _ = self.hidden_states(
            params,
            input_ids,
            attention_mask=attention_mask,
            positions=positions,
            inputs_embeds=inputs_embeds,
            kv_prefix=kv_prefix,
            segment_ids=segment_ids,
        )
        return self.logits(params, hidden)

    def logits(self, params: dict, hidden: jax.Array) -> jax.Array:
        """The output head: ``[..., d]`` final hidden states to ``[..., v]`` logits."""
        return nn.output_head(hidden, self.head_weight(params), self.tied)

    def embedding(self, params: dict) -> Any:
        """The ``[v, d]`` token embedding table (an array or a parameter node)."""
        return tree.get_path(params, self.embed_path)["weight"]

    def head_weight(self, params: dict) -> Any:
        """The output head's weight: the ``[v, d]`` embedding table when tied, else the
        ``[d, v]`` head (an array or a parameter node)."""
        return tree.get_path(params, self.embed_path if self.tied else self.head_path)["weight"]

    def hidden_states(
        self,
        params: dict,
        input_ids: jax.Array | None = None,
        *,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        inputs_embeds: jax.Array | None = None,
        kv_prefix: KVPrefix | None = None,
        cache: KVCache | None = None,
        segment_ids: jax.Array | None = None,
        continues: bool = False,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final (normed) hidden states ``[b, t, d]`` and the updated cache.

        With a `cache`, the ``t`` new tokens are written at slots ``[length, length + t)``
        and attend to every valid slot before them; the returned cache holds them. The
        virtual tokens of ``params["virtual_tokens"]`` (:mod:`jpeft.models.virtual_tokens`)
        are applied here; ``continues=True`` says that the tokens continue a sequence already in
        the cache (decoding), so that its soft prompt, cached by the first call, is not
        prepended again.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        prompt, prompt_valid, prefix, prefix_valid = virtual_tokens.read(self, params)
        if prefix is not None:
            if kv_prefix is not None:
                raise ValueError(f"pass kv_prefix or a prefix in params[{virtual_tokens.ENTRY!r}]")
            kv_prefix = prefix
        if continues:
            prompt = None
        if segment_ids is not None and (cache is not None or kv_prefix is not None):
            raise ValueError("segment_ids (packing) cannot be combined with a cache or prefix")
        tokens = input_ids if input_ids is not None else inputs_embeds
        batch, steps = tokens.shape[:2]
        new_valid = (
            jnp.ones((batch, steps), bool)
            if attention_mask is None
            else jnp.asarray(attention_mask).astype(bool)
        )
        if kv_prefix is not None:
            kv_prefix = virtual_tokens.batched(kv_prefix, batch)
            prefix_valid = virtual_tokens.validity(prefix_valid, batch, kv_prefix.k.shape[2])
        virtual = 0 if prompt is None else prompt.shape[-2]
        if prompt is not None:
            if segment_ids is not None or positions is not None:
                raise ValueError(
                    "a soft prompt (params['virtual_tokens']['prompt']) cannot be combined "
                    "with segment_ids (packing) or explicit positions"
                )
            embeds = tokens if tokens.ndim == 3 else nn.embed(tokens, self.embedding(params))
            tokens, new_valid = virtual_tokens.prepend(prompt, embeds, new_valid, prompt_valid)
            steps += virtual
        self._check_positions(steps if cache is None else cache.valid.shape[1], kv_prefix)
        start = jnp.zeros((batch,), jnp.int32) if cache is None else cache.next_position
        if kv_prefix is not None:  # the prefix holds positions 0..p-1, as in HF PEFT
            start = start + prefix_valid.sum(-1, dtype=jnp.int32)
        if positions is None and segment_ids is not None:
            positions = _positions_within_segments(segment_ids)
        elif positions is None:
            counted = jnp.cumsum(new_valid.astype(jnp.int32), axis=-1) - 1
            positions = start[:, None] + jnp.maximum(counted, 0)
        h = self._embed(params, tokens, positions)
        if self.activation_dtype is not None:
            h = h.astype(self.activation_dtype)

        if cache is None:
            query_slots = jnp.arange(steps)
            key_valid = new_valid
            cache_k = cache_v = None
        else:
            query_slots = cache.length + jnp.arange(steps)
            key_valid = jax.lax.dynamic_update_slice(cache.valid, new_valid, (0, cache.length))
            cache_k, cache_v = cache.k, cache.v
        mask_valid = key_valid
        if kv_prefix is not None:
            prefix_len = kv_prefix.k.shape[2]
            mask_valid = jnp.concatenate([prefix_valid, key_valid], 1)
            query_slots = query_slots + prefix_len
        scale = self.attention_scale
        # Without a cache, query i sees no key slot past i (+ the prefix): the attention
        # may skip those blocks (a cache's length is traced, so no promise there).
        causal_offset = (
            None if cache is not None else (0 if kv_prefix is None else kv_prefix.k.shape[2])
        )

        def body(h, xs):
            layer, layer_k, layer_v, prefix_k, prefix_v, window = xs
            q, k, v = (checkpoint_name(x, "qkv") for x in self._qkv(layer, h, positions))
            if layer_k is not None:
                layer_k = jax.lax.dynamic_update_slice(
                    layer_k, k.astype(layer_k.dtype), (0, cache.length, 0, 0)
                )
                layer_v = jax.lax.dynamic_update_slice(
                    layer_v, v.astype(layer_v.dtype), (0, cache.length, 0, 0)
                )
                k, v = layer_k.astype(q.dtype), layer_v.astype(q.dtype)
            if prefix_k is not None:
                k = jnp.concatenate([prefix_k.astype(k.dtype), k], axis=1)
                v = jnp.concatenate([prefix_v.astype(v.dtype), v], axis=1)
            mask = nn.attention_mask(query_slots, mask_valid, window, segment_ids)
            attn = nn.dot_product_attention(q, k, v, mask, scale, causal_offset=causal_offset)
            attn = checkpoint_name(attn, "attention")
            return self._finish_block(layer, h, attn), (layer_k, layer_v)

        if self.remat is not None:
            body = jax.checkpoint(body, policy=remat_policy(self.remat), prevent_cse=False)
        layers = tree.get_path(params, self.layers_path)
        xs = (
            layers,
            cache_k,
            cache_v,
            None if kv_prefix is None else kv_prefix.k,
            None if kv_prefix is None else kv_prefix.v,
            jnp.asarray(self.layer_windows()),
        )
        run = _one_after_another if isinstance(layers, list) else jax.lax.scan
        h, (new_k, new_v) = run(body, h, xs)
        if isinstance(new_k, list) and not isinstance(cache_k, list):
            new_k, new_v = jnp.stack(new_k), jnp.stack(new_v)
        h = self._final_norm(params, h)[:, virtual:]
        if cache is None:
            return h, None
        next_position = start + new_valid.sum(-1, dtype=jnp.int32)
        if kv_prefix is not None:  # positions are counted apart from the prefix
            next_position = next_position - prefix_valid.sum(-1, dtype=jnp.int32)
        new_cache = KVCache(
            k=new_k,
            v=new_v,
            valid=key_valid,
            length=cache.length + steps,
            next_position=next_position,
        )
        return h, new_cache

    def with_layers_apart(self, params: dict) -> dict:
        """`params` with the stacked layers replaced by a list of per-layer trees (each
        array sliced at its layer, so one more copy of the layers' weights), which
        :meth:`hidden_states` runs unrolled instead of in a scan.

        Inside a scan, XLA:CPU copies each layer's slice of a stacked weight out before
        its matmul, and gathers the rows' adapters of a mixed batch out of the stacked
        slots again, at every call: for KV-cached decoding, one call per new token, that
        is the whole model's weights copied per token. Sliced once before the decoding
        loop, the layers' weights are read where they lie.
        """
        layers = tree.get_path(params, self.layers_path)
        if isinstance(layers, list):
            return params
        apart = [jax.tree.map(lambda x, i=i: x[i], layers) for i in range(self.num_layers)]
        params = tree.copy_dicts(params)
        tree.set_path(params, self.layers_path, apart)
        return params

    def init_cache(self, batch: int, max_length: int, dtype: Any = jnp.float32) -> KVCache:
        """An empty cache for `batch` rows and `max_length` slots."""
        shape = (self.num_layers, batch, max_length, self.num_kv_heads, self.head_dim)
        return KVCache(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch, max_length), bool),
            length=jnp.zeros((), jnp.int32),
            next_position=jnp.zeros((batch,), jnp.int32),
        )

    # ------------------------------------------------------------------ HF layout

    def hf_layout(self) -> list[HFEntry]:
        """Every HF parameter of this model and where it lives in the tree: the one
        description that loading, saving and the bitsandbytes 4-bit format all follow."""
        global_shapes, layer_shapes = self.hf_shapes()
        entries = [
            HFEntry(name, tuple(name.split(".")), None, self._hf_transposed(name), shape)
            for name, shape in global_shapes.items()
        ]
        prefix = ".".join(self.layers_path)
        entries += [
            HFEntry(
                f"{prefix}.{{}}.{suffix}",
                self.layers_path + tuple(suffix.split(".")),
                range(self.num_layers),
                self._hf_transposed(suffix),
                shape,
            )
            for suffix, shape in layer_shapes.items()
        ]
        return entries

    def is_hf_extra(self, name: str) -> bool:
        """Whether an HF tensor that is not a parameter of :meth:`hf_layout` may be ignored:
        a buffer (rotary frequencies, attention masks) or a tied head stored twice."""
        return any(re.search(p, name) for p in self._hf_ignored) or (
            self.tied and name == ".".join(self.head_path) + ".weight"
        )

    def from_hf_state_dict(
        self,
        tensors: Mapping[str, np.ndarray],
        *,
        dtype: Any = jnp.float32,
        source: str = "",
        transform: Callable[[tuple[str, ...], jax.Array], Any] | None = None,
    ) -> dict:
        """The jpeft parameter tree of HF-named, HF-layout arrays (see
        :func:`jpeft.models.hf_layout.read`)."""
        return hf_layout.read(self, tensors, dtype=dtype, source=source, transform=transform)

    def to_hf_state_dict(self, params: dict) -> dict[str, np.ndarray]:
        """HF-named, HF-layout numpy arrays of a plain tree (see
        :func:`jpeft.models.hf_layout.write`)."""
        return hf_layout.write(self, params)


def _one_after_another(body: Callable, h: jax.Array, xs: tuple) -> tuple[jax.Array, Any]:
    """:func:`jax.lax.scan` of `body` for `xs` whose first entry is a list of per-layer
    trees and the rest per-layer lists or stacked ``[l, ...]`` arrays (or None), unrolled;
    the outputs come back as per-layer lists."""
    layers, *rest = xs
    outputs = []
    for i, layer in enumerate(layers):
        h, out = body(h, (layer, *(None if x is None else x[i] for x in rest)))
        outputs.append(out)
    return h, jax.tree.map(lambda *ys: list(ys), *outputs)


def _positions_within_segments(segment_ids: jax.Array) -> jax.Array:
    """``[b, t]`` index of each token within its run of equal segment ids."""
    index = jnp.broadcast_to(jnp.arange(segment_ids.shape[1]), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1
    )
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
