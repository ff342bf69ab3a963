"""Path-keyed helpers over parameter trees: adapter nodes, trainable masks, split/combine.

A parameter tree is nested dicts of arrays keyed by Hugging Face module names. PEFT methods
replace some weights by small pytree *nodes* (subclasses of :class:`Node`): a LoRA node holds
the frozen weight and the trainable factors, a :class:`Trainable` node marks a whole weight
as trained (``modules_to_save``, trainable biases). A node names which of its fields train;
everything else is frozen. From that one fact come the optax mask, the split of the tree into
a trainable and a frozen half at the jit boundary, and the parameter counts.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import nn


class Node:
    """Base of pytree nodes that stand in for a weight array in a parameter tree.

    Subclasses are dataclasses registered with :func:`jax.tree_util.register_dataclass`
    (see :func:`node`) and list in `trainable_fields` which of their fields hold trainable
    arrays. A node may wrap another node (LoRA over an NF4 weight is QLoRA).
    """

    trainable_fields: ClassVar[tuple[str, ...]] = ()

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

    trainable_fields: ClassVar[tuple[str, ...]] = ("w",)

    def parameter_count(self) -> tuple[int, int]:
        size = int(np.prod(self.w.shape))
        return size, size * (2 if self.copied else 1)


nn.register("linear", Trainable)(lambda x, node: nn.linear(x, node.w))
nn.register("embed", Trainable)(lambda ids, node: nn.embed(ids, node.w))
nn.register("attend", Trainable)(lambda x, node: nn.attend(x, node.w))
nn.register("value", Trainable)(lambda node: nn.value(node.w))


def _is_node(x: Any) -> bool:
    return isinstance(x, Node)


def materialize(params: Any) -> Any:
    """Replaces every node by the dense array it stands for (:func:`jpeft.nn.value`)."""
    return jax.tree.map(
        lambda x: nn.value(x) if isinstance(x, Node) else x, params, is_leaf=_is_node
    )


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
        if field.name in value.trainable_fields:
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
    """Gives every node with input dropout (a ``dropout_key`` field and ``dropout > 0``)
    fresh PRNG keys, one per layer, derived from `key` and the node's path. Call it inside
    the training step; trees without it run without dropout (inference)."""

    def fill(path: str, value: Any) -> Any:
        if getattr(value, "dropout", 0) <= 0 or not hasattr(value, "dropout_key"):
            return value
        node_key = jax.random.fold_in(key, zlib.crc32(path.encode()))
        layers = jnp.shape(value.scale)
        keys = jax.random.split(node_key, int(np.prod(layers))).reshape(layers)
        return dataclasses.replace(value, dropout_key=keys)

    return map_nodes(fill, params)
