"""Prefix tuning (Li & Liang, 2021): trained keys and values of ``p`` virtual tokens that
every token attends to in every layer, Hugging Face PEFT's ``PrefixTuningConfig``.

The prefix is a :class:`Prefix` node in the tree's reserved entry,
``params["virtual_tokens"]["prefix"]`` (:mod:`jpeft.models.virtual_tokens`): its value is a
:class:`jpeft.models.KVPrefix` of ``[l, p, k, h]`` keys and values (``k`` key/value heads of
size ``h``: with grouped-query attention the prefix has the key/value heads, as PEFT sizes
it). As in PEFT, which passes the prefix as ``past_key_values``, the real tokens' positions
start at ``p``, and nothing folds into the weights.

PEFT's parameters, and so jpeft's:

* without `prefix_projection`: ``E: [p, l·2·k·h]``, the keys and values themselves
  (row ``i`` holds, per layer, the key then the value of virtual token ``i``);
* with it: ``E: [p, k·h]`` and a two-layer MLP, ``E ↦ tanh(E @ W1 + b1) @ W2 + b2`` of
  width `encoder_hidden_size`, whose output is laid out as above.

``E ~ N(0, 1)`` and the MLP as ``torch.nn.Linear`` initialises it (``U(±1/√fan_in)``);
``init_weights="zero"`` zeroes ``E`` (or, with the MLP, its last layer). PEFT saves the
computed keys and values, ``prompt_embeddings: [p, l·2·k·h]``, whatever the
parametrisation; a projected prefix therefore exports, and imports back, as its values.

Example::

    params = jpeft.prefix_tuning.apply(params, model=model, num_virtual_tokens=20,
                                       key=jax.random.key(0))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import methods, nn, tree
from jpeft.models import virtual_tokens


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrefixTuningConfig:
    """Prefix-tuning settings with Hugging Face PEFT's field names.

    Attributes:
      num_virtual_tokens: ``p``, the prefix length.
      prefix_projection: reparametrise the prefix through a two-layer MLP.
      encoder_hidden_size: the MLP's width (None: the key/value width ``k·h``, as PEFT).
      init_weights: None (random) or ``"zero"``.
    """

    num_virtual_tokens: int = dataclasses.field(
        default=20,
        metadata={"help": "number of virtual tokens in the prefix", "flag": "--num-virtual-tokens"},
    )
    prefix_projection: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "reparametrise the prefix through a two-layer MLP",
            "flag": "--prefix-projection",
        },
    )
    encoder_hidden_size: int | None = dataclasses.field(
        default=None,
        metadata={
            "help": "the MLP's width (default: the key/value width)",
            "flag": "--encoder-hidden-size",
        },
    )
    init_weights: str | None = None

    def __post_init__(self):
        virtual_tokens.check_count(self.num_virtual_tokens)
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None or 'zero', got {self.init_weights!r}")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            raise ValueError(
                f"encoder_hidden_size must be positive, got {self.encoder_hidden_size}"
            )


@tree.node
class Prefix(tree.Node):
    """A trained key/value prefix, an entry of its own in the tree.

    Attributes:
      embedding: ``[p, l·2·k·h]`` (the keys and values), or ``[p, k·h]`` with the MLP.
      w1, b1, w2, b2: the MLP, ``[k·h, e]``, ``[e]``, ``[e, l·2·k·h]``, ``[l·2·k·h]``; None
        without `prefix_projection`.
      num_layers, num_kv_heads, head_dim: ``l``, ``k`` and ``h``.
    """

    embedding: jax.Array
    w1: jax.Array | None = None
    b1: jax.Array | None = None
    w2: jax.Array | None = None
    b2: jax.Array | None = None
    num_layers: int = tree.static(0)
    num_kv_heads: int = tree.static(0)
    head_dim: int = tree.static(0)

    kind: ClassVar[str] = "prefix_tuning"
    trainable_fields: ClassVar[tuple[str, ...]] = ("embedding", "w1", "b1", "w2", "b2")
    standalone: ClassVar[bool] = True

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.shape[0]

    def flat(self) -> jax.Array:
        """``[p, l·2·k·h]`` float32: the keys and values as PEFT stores them."""
        e = self.embedding.astype(jnp.float32)
        if self.w1 is None:
            return e
        return jnp.tanh(e @ self.w1 + self.b1) @ self.w2 + self.b2


@nn.register("value", Prefix)
def _key_values(node: Prefix) -> virtual_tokens.KVPrefix:
    """``[p, l·2·k·h]`` -> keys and values ``[l, p, k, h]`` each."""
    p = node.embedding.shape[0]
    kv = node.flat().reshape(p, node.num_layers, 2, node.num_kv_heads, node.head_dim)
    kv = jnp.transpose(kv, (2, 1, 0, 3, 4))  # [2, l, p, k, h]
    return virtual_tokens.KVPrefix(kv[0], kv[1])


def apply(
    params: dict,
    *,
    model: Any,
    key: jax.Array,
    config: PrefixTuningConfig | None = None,
    **options: Any,
) -> dict:
    """Adds a key/value prefix to a parameter tree.

    Args:
      params: the base model's tree (without a prefix).
      model: its jpeft model (for the layer count and the key/value heads).
      key: PRNG key for the initialisation.
      config: a full :class:`PrefixTuningConfig`, or its fields as `options`.

    Returns:
      `params` with ``params["virtual_tokens"]["prefix"]`` a :class:`Prefix`.

    Raises:
      ValueError: bad options, or a tree that already has a prefix.
    """
    if config is None:
        config = PrefixTuningConfig(**options)
    elif options:
        raise ValueError("pass either config or its fields as options, not both")
    entry = dict(params.get(virtual_tokens.ENTRY) or {})
    if "prefix" in entry:
        raise ValueError(f"params[{virtual_tokens.ENTRY!r}] already has a prefix")
    p, layers = config.num_virtual_tokens, model.num_layers
    width = model.num_kv_heads * model.head_dim
    out = layers * 2 * width
    shape = dict(num_layers=layers, num_kv_heads=model.num_kv_heads, head_dim=model.head_dim)
    keys = jax.random.split(key, 5)
    zero = config.init_weights == "zero"
    if not config.prefix_projection:
        embedding = jnp.zeros((p, out)) if zero else jax.random.normal(keys[0], (p, out))
        node = Prefix(embedding=embedding, **shape)
    else:
        hidden = config.encoder_hidden_size or width
        w1, b1 = _linear_init(keys[1], keys[2], width, hidden)
        w2, b2 = _linear_init(keys[3], keys[4], hidden, out)
        if zero:
            w2, b2 = jnp.zeros_like(w2), jnp.zeros_like(b2)
        embedding = jax.random.normal(keys[0], (p, width))
        node = Prefix(embedding=embedding, w1=w1, b1=b1, w2=w2, b2=b2, **shape)
    return {**params, virtual_tokens.ENTRY: {**entry, "prefix": node}}


def _linear_init(key_w, key_b, fan_in: int, fan_out: int) -> tuple[jax.Array, jax.Array]:
    """``torch.nn.Linear``'s initialisation, ``U(±1/√fan_in)`` for the weight and bias."""
    bound = 1 / math.sqrt(fan_in)
    w = jax.random.uniform(key_w, (fan_in, fan_out), jnp.float32, -bound, bound)
    return w, jax.random.uniform(key_b, (fan_out,), jnp.float32, -bound, bound)


def _to_peft(params: dict) -> tuple[dict, dict[str, np.ndarray]] | None:
    """PEFT's ``adapter_config.json`` fields and tensors of the prefix, if any."""
    node = (params.get(virtual_tokens.ENTRY) or {}).get("prefix")
    if not isinstance(node, Prefix):
        return None
    width = node.num_kv_heads * node.head_dim
    config = {
        "peft_type": "PREFIX_TUNING",
        "num_virtual_tokens": int(node.embedding.shape[0]),
        "num_layers": node.num_layers,
        "num_attention_heads": node.num_kv_heads,  # PEFT's sizes for grouped-query attention
        "token_dim": width,
        "num_transformer_submodules": 1,
        "prefix_projection": node.w1 is not None,
        "encoder_hidden_size": width if node.w1 is None else int(node.w1.shape[1]),
    }
    return config, {"prompt_embeddings": np.asarray(node.flat(), np.float32)}


def _from_peft(base_params: dict, config: dict, tensors: dict[str, np.ndarray]) -> dict:
    """The tree of a PEFT prefix-tuning adapter (its saved keys and values)."""
    try:
        p, layers = int(config["num_virtual_tokens"]), int(config["num_layers"])
        heads, width = int(config["num_attention_heads"]), int(config["token_dim"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"a prefix-tuning config needs {err} as an integer") from err
    embedding = np.asarray(tensors["prompt_embeddings"], np.float32)
    expected = (p, 2 * layers * width)
    if config.get("num_transformer_submodules", 1) != 1 or embedding.shape != expected:
        raise ValueError(
            f"prompt_embeddings has shape {embedding.shape}; num_virtual_tokens={p}, "
            f"num_layers={layers} and token_dim={width} make it {expected}"
        )
    if width % heads:
        raise ValueError(f"token_dim {width} does not split into {heads} heads")
    node = Prefix(
        embedding=embedding, num_layers=layers, num_kv_heads=heads, head_dim=width // heads
    )
    entry = {**(base_params.get(virtual_tokens.ENTRY) or {}), "prefix": node}
    return {**base_params, virtual_tokens.ENTRY: entry}


methods.register(
    methods.Method(
        name="prefix",
        title="prefix tuning",
        config_class=PrefixTuningConfig,
        apply=apply,
        peft_type="PREFIX_TUNING",
        identity_at_init=False,
        to_peft=_to_peft,
        from_peft=_from_peft,
    )
)
