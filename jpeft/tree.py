"""Path-keyed helpers over parameter trees: the adapter node protocol, masks, split/combine.

A parameter tree is nested dicts of arrays keyed by Hugging Face module names. PEFT methods
replace some weights by small pytree *nodes* (subclasses of :class:`Node`): a LoRA node holds
the frozen weight and the trainable factors, a :class:`Trainable` node marks a whole weight
as trained (``modules_to_save``, trainable biases), an NF4 node stands for a frozen weight.

A node class declares, in one place, everything the rest of jpeft needs to know of it:

* ``kind``: its registry name, for adapter nodes (saved in checkpoints; None for a node
  that only stands in for a frozen weight, such as NF4);
* ``trainable_fields``: which fields train (the optax mask, :func:`split`, the counts);
* ``base_field``: the field holding the base weight it adapts, dropped by :func:`extract`
  and filled again by :func:`attach` (None: the node replaces the weight whole);
* ``standalone``: True for a node that is an entry of its own rather than a stand-in for a
  base weight (the virtual tokens of prompt and prefix tuning): :func:`attach` adds it where
  the base has nothing, and it never folds into the weights;
* ``frozen_fields``: fields that never train, not even the trainable fields of a node they
  hold (the identity slot of :class:`jpeft.adapters.Bank`);
* ``rng_field`` and :meth:`Node.rng_shape`: where per-layer PRNG keys go in a training step
  (:func:`with_rng`), e.g. for dropout;
* :meth:`Node.identity`: the node's arrays set so that it computes exactly as its base
  weight, for the slots of :mod:`jpeft.adapters` whose adapter leaves a module alone;
* :meth:`Node.adapted_shape` and :meth:`Node.parameter_count`;
* how it computes: rules registered with :func:`jpeft.nn.register` (``linear``, ``embed``,
  ``attend``, ``residual``, ``value``, and ``bias`` for a node that changes its module's
  bias). A node without a ``value`` rule does not fold into the weights, and
  :func:`materialize` (every method's ``merge``) refuses it with an error naming it.

Nothing in checkpoints, training or the CLI names a method: they go through this protocol.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import nn

_KINDS: dict[str, type] = {}


class Node:
    """Base of pytree nodes that stand in for a weight array in a parameter tree.

    Subclasses are dataclasses registered with :func:`jax.tree_util.register_dataclass`
    (see :func:`node`) and declare the class attributes below (see the module docstring).
    A node may wrap another node (LoRA over an NF4 weight is QLoRA).

    Example::

      @tree.node
      class ChannelScale(tree.Node):   # y = (x @ w) * s
          w: Any
          s: jax.Array
          kind = "channel_scale"
          trainable_fields = ("s",)
          base_field = "w"

          def adapted_shape(self):
              return (*self.s.shape[:-1], -1, self.s.shape[-1])   # -1: any fan-in

      nn.register("linear", ChannelScale)(lambda x, n: nn.linear(x, n.w) * n.s)
    """

    kind: ClassVar[str | None] = None
    trainable_fields: ClassVar[tuple[str, ...]] = ()
    base_field: ClassVar[str | None] = None
    rng_field: ClassVar[str | None] = None
    standalone: ClassVar[bool] = False
    frozen_fields: ClassVar[tuple[str, ...]] = ()
    switch_fields: ClassVar[tuple[str, ...] | None] = None
    """Fields whose :meth:`identity` values alone make the node compute exactly as its base
    and send no gradient to its other fields, whatever those hold (LoRA: ``scale``, 0), or
    None (all fields). A bank (:mod:`jpeft.adapter_bank`) turns a slot off through these
    fields only, instead of replacing every array of the slot."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if kind is not None:
            known = _KINDS.get(kind)
            if known is not None and known.__qualname__ != cls.__qualname__:
                raise ValueError(f"node kind {kind!r} is taken by {known.__qualname__}")
            _KINDS[kind] = cls

    def rng_shape(self) -> tuple[int, ...] | None:
        """The shape of the PRNG keys this node takes in a training step (one per layer of a
        stacked weight), or None when it takes none (e.g. dropout 0)."""
        return None

    def identity(self, base: Any) -> Node:
        """A node of the same structure (base field None) that computes exactly as `base`,
        the weight it adapts, with no update: e.g. LoRA with zero factors, IA3 with ones.

        Raises:
          ValueError: the method (or this configuration of it) has no such setting.
        """
        raise ValueError(f"{type(self).__name__} has no identity setting")

    def adapted_shape(self) -> tuple[int, ...]:
        """The shape of the weight this node adapts, from its own fields (-1 where any size
        fits); :func:`attach` checks the base weight against it."""
        return tuple(nn.shape(getattr(self, self.base_field or "w")))

    def parameter_count(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts of this node, as Hugging Face PEFT counts
        them for the equivalent module."""
        trainable = total = 0
        for field in dataclasses.fields(self):
            if field.metadata.get("static"):
                continue
            count = count_parameters(getattr(self, field.name))[1]
            total += count
            if field.name in self.trainable_fields:
                trainable += count
        return trainable, total


def node(cls: type) -> type:
    """Class decorator: a frozen dataclass registered as a pytree node whose fields marked
    ``dataclasses.field(metadata={"static": True})`` are static metadata."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = dataclasses.fields(cls)
    return jax.tree_util.register_dataclass(
        cls,
        data_fields=[f.name for f in fields if not f.metadata.get("static")],
        meta_fields=[f.name for f in fields if f.metadata.get("static")],
    )


def static(default: Any = dataclasses.MISSING) -> Any:
    """A static (non-array, hashed) dataclass field of a :class:`Node`."""
    return dataclasses.field(default=default, metadata={"static": True})


@node
class Trainable(Node):
    """A weight trained in full (Hugging Face PEFT's ``modules_to_save``, or biases with
    ``bias="all"``/``"lora_only"``). Computes exactly like the array it wraps.

    Attributes:
      w: the weight (any shape).
      copied: True when Hugging Face PEFT would keep a frozen copy of the original module
        beside the trained one (``modules_to_save``); it counts that copy in "all params".
    """

    w: jax.Array
    copied: bool = static(False)

    kind: ClassVar[str] = "trainable"
    trainable_fields: ClassVar[tuple[str, ...]] = ("w",)

    def parameter_count(self) -> tuple[int, int]:
        size = int(np.prod(self.w.shape))
        return size, size * (2 if self.copied else 1)

    def identity(self, base: Any) -> Trainable:
        return Trainable(jnp.asarray(nn.value(base), self.w.dtype), copied=self.copied)


nn.register("linear", Trainable)(lambda x, node: nn.linear(x, node.w))
nn.register("embed", Trainable)(lambda ids, node: nn.embed(ids, node.w))
nn.register("attend", Trainable)(lambda x, node: nn.attend(x, node.w))
nn.register("value", Trainable)(lambda node: nn.value(node.w))


def _is_node(x: Any) -> bool:
    return isinstance(x, Node)


def node_type(kind: str) -> type:
    """The node class registered under `kind`.

    Raises:
      KeyError: no node class has that kind (the message lists the known ones).
    """
    if kind not in _KINDS:
        raise KeyError(f"unknown adapter node kind {kind!r}; known: {sorted(_KINDS)}")
    return _KINDS[kind]


def folds(node: Node) -> bool:
    """Whether `node` folds into a dense weight (:func:`materialize`): it has a ``value``
    rule and is not a standalone entry."""
    return not node.standalone and nn.has_rule("value", node)


def materialize(params: Any) -> Any:
    """Replaces every node by the dense array it stands for (:func:`jpeft.nn.value`), and
    the bias beside a weight node with a ``bias`` rule by the bias that module adds
    (:func:`jpeft.nn.module_bias`: IA3 scales ``x @ W + b`` as a whole).

    Raises:
      TypeError: a node with no dense value (a method that does not fold into the weights),
        named in the message.
    """

    def dense(x: Any) -> Any:
        if isinstance(x, Node) and not folds(x):
            raise TypeError(
                f"{type(x).__name__} ({x.kind or 'a weight stand-in'}) does not fold into "
                "the base weights: merge is not supported for this method"
            )
        return nn.value(x) if isinstance(x, Node) else x

    return jax.tree.map(dense, _fold_biases(params), is_leaf=_is_node)


def _fold_biases(params: Any) -> Any:
    """`params` with each module's ``bias`` replaced by :func:`jpeft.nn.module_bias` where
    its weight (``weight``, or Flax's ``kernel``) is a node with a ``bias`` rule."""
    if not isinstance(params, dict):
        return params
    out = {key: _fold_biases(value) for key, value in params.items()}
    weight = out.get("weight", out.get("kernel"))
    if out.get("bias") is not None and nn.has_rule("bias", weight):
        out["bias"] = nn.module_bias(out["bias"], weight)
    return out


def extract(params: Any) -> dict:
    """The adapter alone: a tree holding only the adapter nodes (those with a ``kind``),
    each without its base weight and PRNG keys. Small enough to save."""
    out: dict = {}
    for keys, value in iter_nodes(params):
        if isinstance(value, Node) and value.kind is not None:
            drop = {name: None for name in (value.base_field, value.rng_field) if name}
            set_path(out, keys, dataclasses.replace(value, **drop))
    return out


def attach(base_params: Any, adapter: dict) -> Any:
    """Puts an adapter from :func:`extract` back onto a base tree.

    Raises:
      ValueError: an adapter entry with no counterpart in the base, or a shape mismatch
        (naming the path and both shapes).
    """
    new = copy_dicts(base_params)
    for keys, value in iter_nodes(adapter):
        path = ".".join(map(str, keys))
        if not isinstance(value, Node):
            raise TypeError(f"adapter entry {path} is a {type(value).__name__}, not a node")
        if value.standalone:
            set_path(new, keys, value)
            continue
        try:
            base = get_path(new, keys)
        except (KeyError, TypeError):
            raise ValueError(f"adapter entry {path} has no counterpart in the base tree") from None
        base_shape = tuple(nn.shape(base))
        want = tuple(value.adapted_shape())
        fits = len(want) == len(base_shape) and all(
            w in (-1, b) for w, b in zip(want, base_shape, strict=True)
        )
        if not fits:
            raise ValueError(
                f"adapter entry {path} fits a weight of shape {want}, but the base has {base_shape}"
            )
        if value.base_field is not None:
            value = dataclasses.replace(value, **{value.base_field: base})
        set_path(new, keys, value)
    return new


def copy_dicts(params: Any) -> Any:
    """A copy of the dict spine of a tree (arrays and nodes shared), safe to assign into."""
    if isinstance(params, dict):
        return {k: copy_dicts(v) for k, v in params.items()}
    return params


def get_path(params: Any, keys: Sequence) -> Any:
    """``params[k0][k1]...`` for the keys of a path."""
    for key in keys:
        params = params[key]
    return params


def set_path(params: dict, keys: Sequence, value: Any) -> None:
    """``params[k0][k1]... = value``, creating the dicts on the way."""
    for key in keys[:-1]:
        params = params.setdefault(key, {})
    params[keys[-1]] = value


def path_keys(path: tuple) -> tuple:
    """The plain keys (dict keys, attribute names, indices) of a :mod:`jax.tree_util` path."""
    keys = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                keys.append(getattr(entry, attr))
                break
    return tuple(keys)


def path_str(path: tuple) -> str:
    """``"model.layers.self_attn.q_proj.weight"`` for a :mod:`jax.tree_util` key path."""
    return ".".join(str(key) for key in path_keys(path))


def map_nodes(fn: Callable[[str, Any], Any], params: Any) -> Any:
    """Maps ``fn(path, value)`` over the arrays and adapter nodes of a tree (a node is
    passed whole, not its leaves)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: fn(path_str(p), x), params, is_leaf=_is_node
    )


def iter_nodes(params: Any) -> Iterator[tuple[tuple, Any]]:
    """``(keys, value)`` for each array and adapter node of a tree, in tree order."""
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_node)[0]
    for path, value in leaves:
        yield path_keys(path), value


def _node_mask(value: Any) -> Any:
    if not isinstance(value, Node):
        return jax.tree.map(lambda _: False, value)
    changes = {}
    for field in dataclasses.fields(value):
        if field.metadata.get("static"):
            continue
        child = getattr(value, field.name)
        if field.name in value.frozen_fields:
            changes[field.name] = jax.tree.map(lambda _: False, child)
        elif field.name in value.trainable_fields:
            changes[field.name] = jax.tree.map(lambda _: True, child)
        else:
            changes[field.name] = _node_mask(child)
    return dataclasses.replace(value, **changes)


def trainable_mask(params: Any) -> Any:
    """A tree of the same structure with True on trainable leaves and False elsewhere,
    for :func:`optax.masked` or :func:`optax.multi_transform` (with labels from it)."""
    return jax.tree.map(_node_mask, params, is_leaf=_is_node)


def split(params: Any) -> tuple[Any, Any]:
    """``(trainable, frozen)``: two trees of the same structure, each with None where the
    other has a leaf. Differentiate and optimise `trainable`; pass `frozen` alongside.

    Example::

      trainable, frozen = jpeft.split(params)
      grads = jax.grad(lambda t: loss(jpeft.combine(t, frozen)))(trainable)
    """
    mask = trainable_mask(params)
    trainable = jax.tree.map(lambda m, x: x if m else None, mask, params)
    frozen = jax.tree.map(lambda m, x: None if m else x, mask, params)
    return trainable, frozen


def combine(trainable: Any, frozen: Any) -> Any:
    """The inverse of :func:`split`."""
    return jax.tree.map(
        lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None
    )


def count_parameters(params: Any) -> tuple[int, int]:
    """``(trainable, all)`` parameter counts, the numbers Hugging Face PEFT's
    ``get_nb_trainable_parameters`` reports for the equivalent model."""
    trainable = total = 0
    for _, value in iter_nodes(params):
        if isinstance(value, Node):
            t, a = value.parameter_count()
        elif value is None:
            continue
        else:
            t, a = 0, int(np.prod(jnp.shape(value)))
        trainable += t
        total += a
    return trainable, total


def print_trainable_parameters(params: Any) -> None:
    """Prints Hugging Face PEFT's line:
    ``trainable params: X || all params: Y || trainable%: Z``."""
    trainable, total = count_parameters(params)
    print(
        f"trainable params: {trainable:,d} || all params: {total:,d} || "
        f"trainable%: {100 * trainable / total:.4f}"
    )


def with_rng(params: Any, key: jax.Array) -> Any:
    """Gives every node that takes PRNG keys (:meth:`Node.rng_shape`, e.g. LoRA with
    dropout) fresh keys in its ``rng_field``, derived from `key` and the node's path. Call
    it inside the training step; trees without it run without randomness (inference)."""

    def fill(path: str, value: Any) -> Any:
        if not isinstance(value, Node):
            return value
        inner = getattr(value, value.base_field) if value.base_field else None
        if isinstance(inner, Node):  # e.g. a bank of IA3 vectors over a bank of LoRA factors
            value = dataclasses.replace(
                value, **{value.base_field: fill(f"{path}/{value.base_field}", inner)}
            )
        shape = value.rng_shape()
        if shape is None:
            return value
        node_key = jax.random.fold_in(key, zlib.crc32(path.encode()))
        keys = jax.random.split(node_key, int(np.prod(shape))).reshape(shape)
        return dataclasses.replace(value, **{value.rng_field: keys})

    return map_nodes(fill, params)
