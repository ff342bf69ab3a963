"""The bank: the adapters of one kind stacked at one module, and how it computes.

:mod:`jpeft.adapters` builds banks; this module is what the models see of them. A
:class:`Bank` stands in for a weight like any node (:mod:`jpeft.nn` dispatches on it): it
holds the base weight, the adapters' nodes stacked on a slot axis, an identity node for
"no adapter", and the index of the chosen slot (a scalar: one adapter for the batch) or of
each example's slot (``[b]``). A whole-batch choice gathers one slot and runs the method's
own rule; a per-example choice gathers ``[b, ...]`` slots and runs the rule under
:func:`jax.vmap` over the batch, the base weights shared: for LoRA that is one batched
product ``einsum('btd,bdr->btr')`` with each row's factors, never a loop over adapters. A
:class:`TokenBank` does the same for the virtual tokens of prompt and prefix tuning, whose
value carries the validity of each virtual token (:class:`Masked`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import nn, tree


class Masked(NamedTuple):
    """Virtual tokens with their validity: what a :class:`TokenBank` is worth.

    Attributes:
      value: the dense virtual tokens of the chosen adapter(s), with a leading ``[b]`` axis
        when the bank has an index per example.
      valid: ``[p]`` (or ``[b, p]``) True for real virtual tokens, False for the padding of
        an adapter with fewer of them (and for every slot of "no adapter").
    """

    value: Any
    valid: jax.Array


@tree.node
class Bank(tree.Node):
    """The adapters of one kind at one module, stacked, with the index of the active one(s).

    Attributes:
      base: the weight they adapt (an array, a node, or the bank of another kind).
      slots: the method's node without its base, each array ``[*lead, g, ...]`` for ``g``
        slots.
      off: the same node without the ``g`` axis, computing exactly as `base` (the identity
        of :meth:`jpeft.tree.Node.identity`), used where the index is -1 or names a slot
        whose adapter leaves this module alone. Never trained.
      present: ``bool [*lead, g]``, the slots whose adapter has a node here.
      index: ``int32 [*lead]``, or ``[*lead, b]`` per example; -1: no adapter.
      keys: PRNG keys shaped like `index`, set only inside a training step when the
        method takes them (LoRA's dropout): each example's adapter draws from its own.
      lead: how many leading axes (stacked layers) come before the slot axis.
      rows: whether `index` has an entry per example.
    """

    base: Any
    slots: Any
    off: Any
    present: jax.Array
    index: jax.Array
    keys: jax.Array | None = None
    lead: int = tree.static(0)
    rows: bool = tree.static(False)

    kind: ClassVar[str | None] = None  # not an adapter of its own: see extract()
    base_field: ClassVar[str] = "base"
    rng_field: ClassVar[str] = "keys"
    frozen_fields: ClassVar[tuple[str, ...]] = ("off",)

    def rng_shape(self) -> tuple[int, ...] | None:
        return tuple(self.index.shape) if self.slots.rng_shape() is not None else None

    def adapted_shape(self) -> tuple[int, ...]:
        return tuple(nn.shape(self.base))

    def parameter_count(self) -> tuple[int, int]:
        trainable, total = self.slots.parameter_count()
        return trainable, total + tree.count_parameters(self.base)[1]

    @property
    def size(self) -> int:
        """The number of slots ``g``."""
        return jax.tree.leaves(self.slots)[0].shape[self.lead_now]

    @property
    def lead_now(self) -> int:
        """The leading axes still on the arrays (none inside the layer scan)."""
        return self.index.ndim - (1 if self.rows else 0)


@tree.node
class TokenBank(tree.Node):
    """The virtual-token adapters (prompt or prefix tuning) of the reserved entry, stacked;
    its value is :class:`Masked` (see :mod:`jpeft.models.virtual_tokens`).

    Attributes:
      slots: the method's node, each array ``[g, ...]``, the virtual-token axis padded.
      lengths: ``int32 [g]`` the real virtual tokens of each slot (0: free).
      index: ``int32 []`` or ``[b]``; -1: no virtual tokens.
      rows: whether `index` has an entry per example.
    """

    slots: Any
    lengths: jax.Array
    index: jax.Array
    rows: bool = tree.static(False)

    kind: ClassVar[str | None] = None
    standalone: ClassVar[bool] = True

    def parameter_count(self) -> tuple[int, int]:
        return self.slots.parameter_count()

    @property
    def size(self) -> int:
        return self.lengths.shape[0]


def _pick(slots: Any, off: Any, present: jax.Array, index: jax.Array) -> Any:
    """The slot arrays of `index` (``[]`` or ``[b]``) from ``[g, ...]`` slots; `off`'s
    where the index is negative or its slot is not `present` (so that no gradient reaches
    the slot of an adapter that leaves the module alone). Only the node's
    ``switch_fields`` are replaced where a method declares them (LoRA's ``scale``): the
    other arrays are gathered as they are, with no select over their whole size."""
    safe = jnp.clip(index, 0, present.shape[0] - 1)
    use = (index >= 0) & present[safe]

    def take(slot: jax.Array) -> jax.Array:  # in bounds: no fill-value select over the copy
        return jnp.take(slot, safe, axis=0, mode="clip")

    def masked(slot: jax.Array, identity: jax.Array) -> jax.Array:
        chosen = take(slot)
        keep = use.reshape(use.shape + (1,) * identity.ndim)
        return jnp.where(keep, chosen, identity.astype(chosen.dtype))

    switch = slots.switch_fields
    if switch is None:
        return jax.tree.map(masked, slots, off)
    chosen = jax.tree.map(take, slots)
    return dataclasses.replace(
        chosen, **{f: jax.tree.map(masked, getattr(slots, f), getattr(off, f)) for f in switch}
    )


def _chosen(bank: Bank) -> Any:
    """The method node of the chosen adapter(s), its base still the bank's base."""
    pick = _pick
    for _ in range(bank.lead_now):  # outside the layer scan: one choice per layer
        pick = jax.vmap(pick)
    node = pick(bank.slots, bank.off, bank.present, bank.index)
    if bank.keys is not None:
        node = dataclasses.replace(node, **{node.rng_field: bank.keys})
    return node


def _per_row_chain(w: Any) -> Any:
    """For a bank with an index per example: the gathered ``[b, ...]`` slot arrays of it and
    of the banks it wraps, nested as ``(node, inner)``; None for anything else."""
    if isinstance(w, Bank) and w.rows:
        if w.lead_now:
            raise ValueError("a per-example adapter index applies inside the layer scan only")
        return (_chosen(w), _per_row_chain(w.base))
    return None


def _rebuilt(w: Any, chain: Any) -> Any:
    """`w` with each per-example bank replaced by its row's method node (inside vmap)."""
    if chain is None:
        return _resolved(w)
    node, inner = chain
    return _with_base(node, _rebuilt(w.base, inner))


def _resolved(w: Any) -> Any:
    """`w` with every whole-batch bank replaced by the chosen adapter's method node."""
    if isinstance(w, Bank):
        return _with_base(_chosen(w), _resolved(w.base))
    return w


def _with_base(node: tree.Node, base: Any) -> tree.Node:
    """`node` over `base`; a node that replaces its weight whole (``modules_to_save``)
    keeps its own."""
    if node.base_field is None:
        return node
    return dataclasses.replace(node, **{node.base_field: base})


def _row_wise(op: Any, bank: Bank, *batched: jax.Array, **fixed: Any) -> jax.Array:
    """``op(*batched, w, **fixed)`` with the weight of each example's adapter: the gathered
    slots and the batched inputs go through :func:`jax.vmap`, the base weights are shared."""
    chain = _per_row_chain(bank)

    def one(chain_row, *inputs):
        out = op(*(x[None] for x in inputs), _rebuilt(bank, chain_row), **fixed)
        return out[0]

    return jax.vmap(one)(chain, *batched)


def _dispatch(op_name: str):
    op = {"linear": nn.linear, "embed": nn.embed, "attend": nn.attend}[op_name]

    def rule(x: jax.Array, bank: Bank) -> jax.Array:
        if bank.rows:
            return _row_wise(op, bank, x)
        return op(x, _resolved(bank))

    return rule


for _op in ("linear", "embed", "attend"):
    nn.register(_op, Bank)(_dispatch(_op))


@nn.register("residual", Bank)
def _residual(h: jax.Array, x: jax.Array, bank: Bank, bias: Any) -> jax.Array:
    if bank.rows:
        return _row_wise(lambda h, x, w: nn.residual(h, x, w, bias), bank, h, x)
    return nn.residual(h, x, _resolved(bank), bias)


@nn.register("bias", Bank)
def _bias(bias: jax.Array, bank: Bank) -> jax.Array:
    if not bank.rows:
        return nn.module_bias(bias, _resolved(bank))
    # [b, out] biases, one per example, broadcast over the token axis of [b, t, out].
    chain = _per_row_chain(bank)
    per_row = jax.vmap(lambda c: nn.module_bias(bias, _rebuilt(bank, c)))(chain)
    return per_row[:, None]


@nn.register("value", Bank)
def _value(bank: Bank) -> jax.Array:
    if bank.rows:
        raise ValueError(
            "a bank with one adapter per example has no single dense weight; choose one "
            "adapter (jpeft.adapters.set_adapter) to merge"
        )
    return nn.value(_resolved(bank))


@nn.register("value", TokenBank)
def _tokens(bank: TokenBank) -> Masked:
    size = bank.size
    safe = jnp.clip(bank.index, 0, size - 1)
    chosen = jax.tree.map(lambda s: jnp.take(s, safe, axis=0, mode="clip"), bank.slots)
    value = jax.vmap(nn.value)(chosen) if bank.rows else nn.value(chosen)
    count = jnp.where(bank.index >= 0, bank.lengths[safe], 0)
    width = jax.tree.leaves(bank.slots)[0].shape[1]  # the padded virtual-token axis
    return Masked(value, jnp.arange(width) < count[..., None])


def route(params: Any, adapter_ids: Any) -> Any:
    """`params` with every bank's index set: a scalar (one adapter for all, -1 none) or
    ``[b]`` one per example. Trees without banks are returned as they are.

    Raises:
      ValueError: `adapter_ids` of another rank, or out of range (when concrete).
    """
    ids = jnp.asarray(adapter_ids, jnp.int32)
    if ids.ndim > 1:
        raise ValueError(f"adapter_ids must be a scalar or [batch], got shape {ids.shape}")

    def reroute(w: Any) -> Any:
        if isinstance(w, TokenBank):
            _check_range(adapter_ids, w.size)
            return dataclasses.replace(w, index=ids, rows=ids.ndim == 1)
        if not isinstance(w, Bank):
            return w
        _check_range(adapter_ids, w.size)
        lead = jax.tree.leaves(w.slots)[0].shape[: w.lead_now]
        index = jnp.broadcast_to(ids, (*lead, *ids.shape))
        keys = w.keys
        if keys is not None:  # one per layer again (a bank routed before), then per row
            keys = _keys_for(keys if keys.shape == lead else keys[..., 0], ids)
        return dataclasses.replace(
            w, base=reroute(w.base), index=index, keys=keys, rows=ids.ndim == 1
        )

    return jax.tree.map(reroute, params, is_leaf=lambda x: isinstance(x, tree.Node))


def _keys_for(keys: jax.Array, ids: jax.Array) -> jax.Array:
    """The keys of a bank given before its rows were chosen (:func:`jpeft.tree.with_rng`
    runs before the loss routes the batch), one per layer: per example now, each row's
    folded from its layer's key, so that rows draw independent dropout masks."""
    if ids.ndim == 0:
        return keys
    rows = jnp.arange(ids.shape[0])
    per_row = jax.vmap(lambda key: jax.vmap(lambda r: jax.random.fold_in(key, r))(rows))
    return per_row(keys.reshape(-1)).reshape(*keys.shape, ids.shape[0])


def _check_range(adapter_ids: Any, size: int) -> None:
    if isinstance(adapter_ids, jax.core.Tracer):
        return
    ids = np.asarray(adapter_ids)
    bad = ids[(ids < -1) | (ids >= size)]
    if bad.size:
        raise ValueError(
            f"adapter id {int(bad[0])} is out of range: the set has {size} slots "
            "(0..{}; -1 for none)".format(size - 1)
        )


def make_bank(keys: tuple, base: Any, members: list[tree.Node | None]) -> Bank:
    """A bank over `base` of one node structure; None members get the identity."""
    path = ".".join(map(str, keys))
    lead = len(nn.shape(base)) - 2
    padded = _padded([m for m in members if m is not None], path)
    template = padded[0]
    off = template.identity(plain_base(base))
    filled, it = [], iter(padded)
    for member in members:
        filled.append(off if member is None else next(it))
    slots = jax.tree.map(lambda *xs: jnp.stack(xs, axis=lead), *filled)
    lead_shape = tuple(nn.shape(base))[:lead]
    index = jnp.zeros(lead_shape, jnp.int32)
    present = jnp.broadcast_to(
        jnp.asarray([m is not None for m in members]), (*lead_shape, len(members))
    )
    return Bank(base=base, slots=slots, off=off, present=present, index=index, lead=lead)


def make_token_bank(keys: tuple, column: list[tree.Node | None]) -> TokenBank:
    path = ".".join(map(str, keys))
    present = [n for n in column if n is not None]
    if len({jax.tree.structure(n) for n in present}) > 1:
        raise ValueError(
            f"the adapters' {path} entries differ in kind or options (e.g. prefix tuning "
            "with and without prefix_projection) and cannot be stacked"
        )
    padded = _padded(present, path)
    free = jax.tree.map(jnp.zeros_like, padded[0])
    filled, it = [], iter(padded)
    lengths = []
    for node in column:
        filled.append(free if node is None else next(it))
        lengths.append(0 if node is None else node.num_virtual_tokens)
    slots = jax.tree.map(lambda *xs: jnp.stack(xs), *filled)
    return TokenBank(
        slots=slots, lengths=jnp.asarray(lengths, jnp.int32), index=jnp.zeros((), jnp.int32)
    )


def _padded(nodes: list[tree.Node], path: str) -> list[tree.Node]:
    """`nodes` with every array zero-padded at the end of each axis to the largest size
    (ranks, bottleneck widths, virtual tokens)."""
    columns = [jax.tree.leaves(n) for n in nodes]
    shapes = [[np.shape(x) for x in leaves] for leaves in columns]
    if len({tuple(len(s) for s in row) for row in shapes}) > 1:
        raise ValueError(f"the adapters' nodes at {path} have arrays of different ranks")
    widest = [tuple(np.max(col, axis=0)) for col in zip(*shapes, strict=True)]
    out = []
    for node, leaves in zip(nodes, columns, strict=True):
        grown = [
            jnp.pad(jnp.asarray(x), [(0, w - s) for s, w in zip(np.shape(x), want, strict=True)])
            for x, want in zip(leaves, widest, strict=True)
        ]
        out.append(jax.tree.unflatten(jax.tree.structure(node), grown))
    return out


def plain_base(w: Any) -> Any:
    """The weight a bank's identity sees: the base under every bank."""
    while isinstance(w, Bank):
        w = w.base
    return w


def slot_shapes(bank: Any) -> Any:
    axis = 0 if isinstance(bank, TokenBank) else bank.lead_now
    return jax.eval_shape(lambda s: jax.tree.map(lambda x: jnp.take(x, 0, axis=axis), s),
                          bank.slots)  # fmt: skip


def fit_slot(node: Any, template: Any, keys: tuple, name: str) -> Any:
    """`node`'s arrays zero-padded to the slot shapes of `template`."""
    leaves = []
    for x, want in zip(jax.tree.leaves(node), jax.tree.leaves(template), strict=True):
        if any(s > w for s, w in zip(np.shape(x), want.shape, strict=True)):
            raise ValueError(
                f"adapter {name!r} does not fit the set at {'.'.join(map(str, keys))}: an "
                f"array of shape {np.shape(x)} is larger than the slot's {want.shape} (a "
                "larger rank?); stack the adapters again (one more compilation)"
            )
        pad = [(0, w - s) for s, w in zip(np.shape(x), want.shape, strict=True)]
        leaves.append(jnp.pad(jnp.asarray(x, want.dtype), pad))
    return jax.tree.unflatten(jax.tree.structure(template), leaves)


def put_slot(slots: Any, value: Any, index: int, axis: int) -> Any:
    def put(stacked: jax.Array, x: jax.Array) -> jax.Array:
        where = (slice(None),) * axis + (index,)
        return stacked.at[where].set(jnp.asarray(x, stacked.dtype))

    return jax.tree.map(put, slots, value)
