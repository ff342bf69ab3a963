"""Many named adapters over one base: switched, hot-swapped and mixed per example, compiled once.

:func:`stack` puts several adapters (any methods, ranks and targets) onto one base tree. At
each adapted module, the adapters' nodes of one kind are stacked into a :class:`Bank`: their
arrays gain an adapter axis (after the layer axis of stacked layers), ranks and other inner
sizes are padded with zeros to the largest (exact: a zero column of ``A`` and row of ``B``
add nothing), and an adapter that leaves the module alone gets an *identity slot* there
(:meth:`jpeft.tree.Node.identity`: e.g. a zero LoRA update, IA3 ones), so that the module's
targets are the union of all adapters'. Banks of different kinds at one module nest (LoRA
over IA3 over the base weight). Each bank holds an ``index``: one adapter for the whole
batch (a scalar) or one per example (``[b]``), ``-1`` for none (the base alone).

Because the index is an array, a jitted forward, loss, train step or :func:`jpeft.generate`
compiles once for all adapters: :func:`set_adapter`, :func:`disable`, :func:`swap` (a new
adapter into an existing slot) and :func:`delete` change arrays, never the program. With an
index per example (``model(params, ids, adapter_ids=ids_of_rows)``), each bank gathers its
rows' adapters and runs the method's own rule under :func:`jax.vmap` over the batch: LoRA
becomes one batched product ``einsum('btd,bdr->btr')`` with gathered factors, IA3 a gathered
vector, a bottleneck adapter gathered weights, prompt and prefix tuning gathered virtual
tokens (padded to the longest, the padding masked out of attention and positions), with no
loop over adapters. The base weights are shared by all rows.

Example::

    multi = jpeft.adapters.load(params, {"sql": "out/sql", "poem": "hf/poem"})
    ids = jpeft.adapters.adapter_ids(multi, ["sql", "poem", None])     # None: the base
    logits = model(multi.params, input_ids, adapter_ids=ids)           # one program
    multi = jpeft.adapters.swap(multi, "poem", "out/poem-v2")          # no recompilation
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import adapter_bank, tree
from jpeft.adapter_bank import Bank, TokenBank, route

# ----------------------------------------------------------------------------- the set


@dataclasses.dataclass(frozen=True)
class AdapterSet:
    """Named adapters over one base.

    Attributes:
      params: the base tree with :class:`Bank` nodes: pass it to the model, the loss, a
        train step or :func:`jpeft.generate` (a jit argument).
      names: the name in each slot, None for a free slot.
      shapes: per slot, the adapter as it was stacked (:func:`jpeft.tree.extract` form,
        arrays as :class:`jax.ShapeDtypeStruct`), to take it out unpadded; None when free.
    """

    params: Any
    names: tuple[str | None, ...]
    shapes: tuple[Any, ...]

    def slot(self, name: str) -> int:
        """The slot of adapter `name`.

        Raises:
          KeyError: no adapter of that name (the message lists the loaded ones).
        """
        if name not in self.names:
            loaded = [n for n in self.names if n is not None]
            raise KeyError(f"no adapter named {name!r}; loaded: {loaded}")
        return self.names.index(name)


def stack(base_params: Any, adapters: Mapping[str, Any], *, slots: int | None = None) -> AdapterSet:
    """Stacks named adapters over one base into an :class:`AdapterSet`.

    Args:
      base_params: the base tree (plain, or quantised: any node without a ``kind``).
      adapters: name -> a parameter tree over the same base with one adapter's nodes (as a
        method's ``apply``, :func:`jpeft.load_adapter` or :func:`jpeft.hf.import_peft` give).
      slots: the number of slots (at least ``len(adapters)``; free ones take adapters later
        with :func:`swap`, without recompiling). Default: one per adapter.

    Returns:
      The set, the first adapter active for the whole batch.

    Raises:
      ValueError: an adapter that does not fit the base (naming the adapter, the module and
        both shapes), slots too few, or adapters whose nodes of one kind differ in a static
        option that changes the computation (e.g. two bottleneck adapters of different
        configurations at one module).
    """
    names = tuple(adapters)
    if not names:
        raise ValueError("stack needs at least one adapter")
    slots = len(names) if slots is None else slots
    if slots < len(names):
        raise ValueError(f"{len(names)} adapters do not fit {slots} slots")
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter names must be non-empty strings, got {name!r}")
    extracted = [_own_nodes(base_params, name, adapters[name]) for name in names]
    extracted += [{}] * (slots - len(names))
    params = _build(base_params, extracted)
    shapes = tuple(_shapes(e) if e else None for e in extracted)
    multi = AdapterSet(params, names + (None,) * (slots - len(names)), shapes)
    return set_adapter(multi, names[0])


def load(
    base_params: Any, folders: Mapping[str, str | os.PathLike], *, slots: int | None = None
) -> AdapterSet:
    """:func:`stack` of adapters read from folders: jpeft adapters, Hugging Face PEFT
    adapters or AdapterHub adapters (name -> folder)."""
    return stack(base_params, {n: read(base_params, f) for n, f in folders.items()}, slots=slots)


def read(base_params: Any, folder: str | os.PathLike) -> Any:
    """`base_params` with the adapter of a jpeft, Hugging Face PEFT or AdapterHub folder
    (or of a ``jpeft train`` output folder)."""
    from jpeft import checkpoint
    from jpeft.hf import adapterhub, peft_format

    kind, path = folder_format(folder)
    if kind == "hf":
        return peft_format.import_peft(base_params, path)
    if kind == "adapterhub":
        return adapterhub.import_adapterhub(base_params, path)
    return checkpoint.load_adapter(base_params, path)


def folder_format(folder: str | os.PathLike) -> tuple[str, Path]:
    """``("hf" | "adapterhub" | "jpeft", folder)`` of an adapter folder (or of a
    ``jpeft train`` output, whose adapter is in ``adapter/``).

    Raises:
      FileNotFoundError: no such folder.
      ValueError: a folder holding none of the three formats.
    """
    from jpeft import checkpoint
    from jpeft.hf import adapterhub, peft_format

    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter folder {path} does not exist")
    if any((path / n).is_file() for n in (adapterhub.SAFETENSORS_FILE, adapterhub.TORCH_FILE)):
        return "adapterhub", path  # AdapterHub names its config as PEFT does
    if (path / peft_format.CONFIG_FILE).is_file():
        return "hf", path
    if (path / checkpoint.METADATA_FILE).is_file():
        return "jpeft", path
    if (path / "adapter" / checkpoint.METADATA_FILE).is_file():
        return "jpeft", path / "adapter"
    raise ValueError(
        f"{path} is neither a jpeft adapter ({checkpoint.METADATA_FILE}) nor a Hugging Face "
        f"PEFT or AdapterHub adapter ({peft_format.CONFIG_FILE})"
    )


def names(multi: AdapterSet) -> tuple[str, ...]:
    """The loaded adapters' names, in slot order."""
    return tuple(n for n in multi.names if n is not None)


def adapter_ids(multi: AdapterSet, rows: Sequence[str | None]) -> np.ndarray:
    """``int32 [b]`` slot indices for the adapter name of each example (None: the base).

    Raises:
      KeyError: an unknown name (the message names it and lists the loaded ones).
    """
    return np.asarray([-1 if n is None else multi.slot(n) for n in rows], np.int32)


def set_adapter(multi: AdapterSet, name: str) -> AdapterSet:
    """The set with adapter `name` active for every example."""
    return dataclasses.replace(multi, params=route(multi.params, np.int32(multi.slot(name))))


def disable(multi: AdapterSet) -> AdapterSet:
    """The set computing as the base alone (e.g. a reference model), in the same program."""
    return dataclasses.replace(multi, params=route(multi.params, np.int32(-1)))


def swap(
    multi: AdapterSet, name: str, adapter: Any, *, slot: str | int | None = None
) -> AdapterSet:
    """Hot-swap: puts an adapter into a slot of the set without changing the program.

    Args:
      multi: the set.
      name: the name the adapter takes.
      adapter: a parameter tree over the set's base with the adapter's nodes, or a folder
        (jpeft, Hugging Face PEFT or AdapterHub).
      slot: the slot to fill, by name or number; default: the slot of `name` if loaded,
        else the first free one.

    Raises:
      ValueError: no free slot, or an adapter that does not fit the slot's banks: a module
        no other adapter of the set adapts, a kind or option not stacked there, or a rank
        above the padded one (restack with :func:`stack`, which compiles once more).
    """
    if isinstance(adapter, (str, os.PathLike)):
        adapter = read(_base_of(multi.params), adapter)
    index = _slot_to_fill(multi, name, slot)
    nodes = _own_nodes(_base_of(multi.params), name, adapter)
    params = _fill(multi.params, index, nodes, name)
    names = list(multi.names)
    names[index] = name
    shapes = list(multi.shapes)
    shapes[index] = _shapes(nodes)
    return dataclasses.replace(multi, params=params, names=tuple(names), shapes=tuple(shapes))


def delete(multi: AdapterSet, name: str) -> AdapterSet:
    """The set with adapter `name` removed: its slot is free (identity everywhere)."""
    index = multi.slot(name)
    params = _fill(multi.params, index, {}, name)
    names = list(multi.names)
    names[index] = None
    shapes = list(multi.shapes)
    shapes[index] = None
    return dataclasses.replace(multi, params=params, names=tuple(names), shapes=tuple(shapes))


def extract(multi: AdapterSet, name: str) -> Any:
    """Adapter `name` alone over the base, as it was stacked (its own ranks and targets):
    ready for :func:`jpeft.save_adapter`, :func:`jpeft.hf.export_peft` or a method's merge."""
    index = multi.slot(name)
    base = _base_of(multi.params)
    nodes = {}
    for keys, shape in multi.shapes[index].items():
        bank = _bank_of(multi.params, keys, shape)
        axis = 0 if isinstance(bank, TokenBank) else bank.lead_now
        taken = jax.tree.map(lambda s, a=axis: jnp.take(s, index, axis=a), bank.slots)
        leaves = [
            x[tuple(slice(0, n) for n in want.shape)]
            for x, want in zip(jax.tree.leaves(taken), jax.tree.leaves(shape), strict=True)
        ]
        nodes[keys] = jax.tree.unflatten(jax.tree.structure(shape), leaves)
    adapter: dict = {}
    for keys, node in nodes.items():
        tree.set_path(adapter, keys, node)
    return tree.attach(base, adapter)


# ----------------------------------------------------------------------------- building


def _own_nodes(base_params: Any, name: str, params: Any) -> dict[tuple, tree.Node]:
    """The adapter nodes of `params` by path, checked against the base."""
    found = tree.extract(params)
    nodes = dict(tree.iter_nodes(found))
    if any(isinstance(n, (Bank, TokenBank)) for _, n in tree.iter_nodes(params)):
        raise ValueError(f"adapter {name!r} is already a stack of adapters")
    try:
        tree.attach(base_params, found)
    except ValueError as err:
        raise ValueError(f"adapter {name!r} does not fit the base: {err}") from None
    if not nodes:
        raise ValueError(f"adapter {name!r} has no adapter nodes")
    return nodes


def _build(base_params: Any, adapters: list[dict[tuple, tree.Node]]) -> Any:
    paths: dict[tuple, None] = {}
    for nodes in adapters:
        paths.update(dict.fromkeys(nodes))
    params = tree.copy_dicts(base_params)
    for keys in paths:
        column = [nodes.get(keys) for nodes in adapters]
        if any(n is not None and n.standalone for n in column):
            tree.set_path(params, keys, adapter_bank.make_token_bank(keys, column))
            continue
        w = tree.get_path(params, keys)
        groups: dict[Any, None] = {}
        for node in column:
            if node is not None:
                groups[jax.tree.structure(node)] = None
        # Nodes that replace the weight whole (modules_to_save) go innermost, so that
        # another kind's update applies over them.
        order = sorted(groups, key=lambda s: _template(column, s).base_field is not None)
        for structure in order:
            members = [n if n is not None and jax.tree.structure(n) == structure else None
                       for n in column]  # fmt: skip
            w = adapter_bank.make_bank(keys, w, members)
        tree.set_path(params, keys, w)
    return params


def _template(column: list, structure: Any) -> tree.Node:
    return next(n for n in column if n is not None and jax.tree.structure(n) == structure)


def _base_of(params: Any) -> Any:
    """The base tree under a set's banks (token banks dropped)."""

    def strip(w: Any) -> Any:
        return adapter_bank.plain_base(w) if not isinstance(w, TokenBank) else None

    stripped = jax.tree.map(strip, params, is_leaf=lambda x: isinstance(x, tree.Node))
    return _drop_none(stripped)


def _drop_none(params: Any) -> Any:
    if not isinstance(params, dict):
        return params
    kept = {k: _drop_none(v) for k, v in params.items() if v is not None}
    return {k: v for k, v in kept.items() if not (isinstance(v, dict) and not v)}


def _shapes(nodes: dict[tuple, tree.Node]) -> dict[tuple, Any]:
    return {keys: jax.eval_shape(lambda n=node: n) for keys, node in nodes.items()}


def _bank_of(params: Any, keys: tuple, shape: Any) -> Any:
    """The bank at `keys` holding nodes of `shape`'s structure."""
    w = tree.get_path(params, keys)
    structure = jax.tree.structure(shape)
    while isinstance(w, (Bank, TokenBank)):
        if jax.tree.structure(adapter_bank.slot_shapes(w)) == structure:
            return w
        w = getattr(w, "base", None)
    raise ValueError(f"no bank at {'.'.join(map(str, keys))} holds a {type(shape).__name__}")


def _slot_to_fill(multi: AdapterSet, name: str, slot: str | int | None) -> int:
    if isinstance(slot, int):
        if not 0 <= slot < len(multi.names):
            raise ValueError(f"slot {slot} is out of range: the set has {len(multi.names)}")
        return slot
    if isinstance(slot, str):
        return multi.slot(slot)
    if name in multi.names:
        return multi.names.index(name)
    if None not in multi.names:
        raise ValueError(
            f"no free slot for adapter {name!r}: all {len(multi.names)} are taken; delete one, "
            "name a slot, or stack with more slots"
        )
    return multi.names.index(None)


def _fill(params: Any, index: int, nodes: dict[tuple, tree.Node], name: str) -> Any:
    """`params` with slot `index` of every bank holding `nodes` (identity where absent)."""
    placed: set[tuple] = set()

    def refill(keys: tuple, w: Any) -> Any:
        if isinstance(w, TokenBank):
            node = nodes.get(keys)
            if node is not None:
                placed.add(keys)
            template = adapter_bank.slot_shapes(w)
            value = jax.tree.map(jnp.zeros_like, template) if node is None else node
            slots = adapter_bank.put_slot(
                w.slots, adapter_bank.fit_slot(value, template, keys, name), index, 0
            )
            count = 0 if node is None else node.num_virtual_tokens
            return dataclasses.replace(w, slots=slots, lengths=w.lengths.at[index].set(count))
        if not isinstance(w, Bank):
            return w
        base = refill(keys, w.base)
        template = adapter_bank.slot_shapes(w)
        node = nodes.get(keys)
        fits = node is not None and jax.tree.structure(node) == jax.tree.structure(template)
        if fits:
            placed.add(keys)
            value = adapter_bank.fit_slot(node, template, keys, name)
        else:
            value = w.off
        slots = adapter_bank.put_slot(w.slots, value, index, w.lead_now)
        present = adapter_bank.put_slot(w.present, jnp.asarray(fits), index, w.lead_now)
        return dataclasses.replace(w, base=base, slots=slots, present=present)

    out = tree.copy_dicts(params)
    for keys, w in tree.iter_nodes(params):
        if isinstance(w, (Bank, TokenBank)):
            tree.set_path(out, keys, refill(keys, w))
    missing = [keys for keys in nodes if keys not in placed]
    if missing:
        raise ValueError(
            f"adapter {name!r} does not fit the set: no slot for its "
            f"{type(nodes[missing[0]]).__name__} at {'.'.join(map(str, missing[0]))}; "
            "stack the adapters again (one more compilation)"
        )
    return out
