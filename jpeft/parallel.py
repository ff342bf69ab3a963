"""Training on many devices: meshes, sharding rules by path, a sharded and a pmap-ed step.

Every form below runs the step of :func:`jpeft.train.make_train_step` and computes the update
that one device computes on the whole (global) batch: the loss is summed over all tokens of
all devices and divided by the global token count, so gradients are averaged over tokens,
not over devices.

* :func:`make_sharded_train_step`: :func:`jax.jit` over a :func:`make_mesh` mesh with axes
  ``("data", "fsdp")``. Batch rows are split over both axes. The frozen base is sharded over
  ``"fsdp"`` (FSDP: each device stores ``1/fsdp`` of every large weight; XLA gathers a
  layer's weight where it is used) and replicated over ``"data"``. With ``fsdp=1`` this is
  plain data parallelism.
* :func:`make_pmap_train_step`: the same step under :func:`jax.pmap`, for code written with
  pmap; gradients, loss sums and token counts are summed with :func:`jax.lax.psum`.
* Many hosts: call :func:`jpeft.distributed.initialize_distributed` first on every
  process, then build the mesh over all processes' devices and feed each process's rows
  with :func:`shard_batch`.

Placement (:func:`train_specs`, applied by :func:`place` and inside the sharded step):

* a leaf whose dotted path (``model.layers.self_attn.q_proj.weight.w``) matches one of the
  user's `rules` gets that rule's :class:`~jax.sharding.PartitionSpec`;
* other frozen leaves follow the FSDP rule: an array of at least `min_shard_size` elements
  is split over ``"fsdp"`` along its largest dimension divisible by the ``"fsdp"`` size,
  never along the leading layer axis of stacked layers (that axis is scanned, so splitting
  it would gather every layer on every step); smaller or indivisible arrays are replicated;
* other trainable leaves (LoRA ``a``/``b``, trained biases) are replicated. They are a few
  megabytes: replicated, each layer's adapter is used without a gather, its gradient is one
  all-reduce, and every device applies the same update, so processes never drift apart;
* optimizer-state leaves that mirror a trainable leaf (Adam's ``mu``/``nu``: same path
  suffix and shape) follow that leaf's placement; counts and schedule states are replicated.

Example::

    mesh = parallel.make_mesh(fsdp=2)                # data = devices / 2
    trainable, frozen = jpeft.split(params)
    trainable, frozen, opt_state = parallel.place(
        mesh, trainable, frozen, optimizer.init(trainable))
    step = parallel.make_sharded_train_step(model, optimizer, mesh)
    for i, batch in enumerate(batches):
        batch = parallel.shard_batch(batch, mesh)
        trainable, opt_state, metrics = step(trainable, frozen, opt_state, batch,
                                             jax.random.key(i))
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jpeft import targets, train, tree

if TYPE_CHECKING:
    from jpeft.models.decoder import DecoderLM

DATA = "data"
"""The mesh axis that splits batch rows only."""
FSDP = "fsdp"
"""The mesh axis that splits batch rows and the frozen weights."""
BATCH_AXES = (DATA, FSDP)
"""Batch rows are split over both mesh axes."""
MIN_SHARD_SIZE = 2**16
"""Frozen arrays with fewer elements are replicated: gathering them costs more than storing
them (64 K float32 elements are 256 KiB)."""

Rules = Sequence[tuple[str, P]]
"""``(regex, spec)`` pairs; the first regex found (:func:`re.search`) in a leaf's dotted path
gives its spec."""


class TrainSpecs(NamedTuple):
    """PartitionSpec trees of the step's state, each shaped like the tree it places."""

    trainable: Any
    frozen: Any
    opt_state: Any


def make_mesh(
    data: int | None = None, fsdp: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A ``("data", "fsdp")`` device mesh.

    Both axes are :attr:`jax.sharding.AxisType.Auto`: XLA places the intermediate values
    and inserts the collectives, so the models need no sharding annotations.

    Args:
      data: devices along ``"data"``; defaults to ``len(devices) // fsdp``.
      fsdp: devices along ``"fsdp"``, which shard the frozen weights (1: data parallel).
      devices: the devices, by default :func:`jax.devices` (all processes' devices).

    Returns:
      The mesh.

    Raises:
      ValueError: `data` × `fsdp` is not the number of devices.

    Example::

      mesh = parallel.make_mesh(data=2, fsdp=2)   # 4 devices
    """
    devices = list(jax.devices() if devices is None else devices)
    count = len(devices)
    if fsdp < 1 or count % fsdp:
        raise ValueError(f"fsdp={fsdp} must be a positive divisor of the {count} devices")
    data = count // fsdp if data is None else data
    if data < 1 or data * fsdp != count:
        raise ValueError(
            f"data × fsdp = {data} × {fsdp} = {data * fsdp}, but there are {count} devices"
        )
    return jax.make_mesh(
        (data, fsdp), BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto), devices=devices
    )


def train_specs(
    mesh: Mesh | jax.sharding.AbstractMesh,
    trainable: Any,
    frozen: Any,
    opt_state: Any,
    *,
    rules: Rules = (),
    min_shard_size: int = MIN_SHARD_SIZE,
) -> TrainSpecs:
    """Where each leaf of the step's state lives (the rules of the module docstring).

    Only paths and shapes are read, so the arguments may be arrays, tracers or
    :class:`jax.ShapeDtypeStruct` trees.

    Args:
      mesh: the mesh (or an abstract mesh) with axes ``("data", "fsdp")``.
      trainable, frozen: the halves from :func:`jpeft.split`.
      opt_state: the optimizer state of `trainable`.
      rules: ``(regex, spec)`` overrides, tried in order on both halves, e.g.
        ``[(r"embed_tokens", P(FSDP, None))]``.
      min_shard_size: frozen arrays smaller than this are replicated by the FSDP rule.

    Returns:
      A :class:`TrainSpecs` of PartitionSpec trees (None where the tree has None).

    Raises:
      ValueError: a rule's spec does not fit the leaf it matches (rank, unknown axis, or a
        dimension not divisible by its mesh axes).

    Example::

      specs = parallel.train_specs(mesh, trainable, frozen, opt_state)
      specs.frozen["model"]["layers"]["mlp"]["up_proj"]["weight"]   # P(None, None, 'fsdp')
    """
    sizes = dict(mesh.shape)
    compiled = [(re.compile(pattern), spec) for pattern, spec in rules]

    def rule(default: Callable[[str, tuple[int, ...]], P]) -> Callable:
        def spec_of(path: tuple, leaf: Any) -> P:
            name = tree.path_str(path)
            shape = tuple(jnp.shape(leaf))
            for pattern, spec in compiled:
                if pattern.search(name):
                    _check_spec(spec, name, shape, sizes, pattern.pattern)
                    return spec
            return default(name, shape)

        return spec_of

    def fsdp(name: str, shape: tuple[int, ...]) -> P:
        return _fsdp_spec(name, shape, sizes[FSDP], min_shard_size)

    trainable_specs = jax.tree_util.tree_map_with_path(rule(lambda *_: P()), trainable)
    return TrainSpecs(
        trainable=trainable_specs,
        frozen=jax.tree_util.tree_map_with_path(rule(fsdp), frozen),
        opt_state=_follow(opt_state, trainable, trainable_specs),
    )


def place(
    mesh: Mesh,
    trainable: Any,
    frozen: Any,
    opt_state: Any,
    *,
    rules: Rules = (),
    min_shard_size: int = MIN_SHARD_SIZE,
) -> tuple[Any, Any, Any]:
    """Puts the step's state on the mesh as :func:`train_specs` says.

    Pass the same `rules` and `min_shard_size` to :func:`make_sharded_train_step`; the step
    keeps this placement. In a multi-process run every process passes the same values.

    Args:
      mesh: the mesh from :func:`make_mesh`.
      trainable, frozen, opt_state: as for :func:`train_specs`.
      rules, min_shard_size: as for :func:`train_specs`.

    Returns:
      ``(trainable, frozen, opt_state)`` as global :class:`jax.Array` trees; the trainable
      half and the optimizer state in new buffers, so the arguments stay valid after the
      step donates the results.

    Example::

      trainable, frozen, opt_state = parallel.place(
          mesh, trainable, frozen, optimizer.init(trainable))
    """
    specs = train_specs(
        mesh, trainable, frozen, opt_state, rules=rules, min_shard_size=min_shard_size
    )
    # The step donates the optimizer state, and device_put may let
    # a device's shard share the source buffer (even with may_alias=False in jax 0.10), so
    # these small trees are copied first: donating must not delete the caller's arrays.
    trainable, opt_state = jax.tree.map(jnp.copy, (trainable, opt_state))
    return jax.device_put((trainable, frozen, opt_state), _named(mesh, tuple(specs)))


def batch_sharding(mesh: Mesh, grad_accum: int = 1) -> NamedSharding:
    """How batch arrays ``[b, t]`` (``[grad_accum, b, t]`` with gradient accumulation) are
    split: rows over both mesh axes."""
    return NamedSharding(mesh, _batch_spec(grad_accum))


def shard_batch(batch: Any, mesh: Mesh, *, grad_accum: int = 1) -> Any:
    """Makes global batch arrays from this process's rows.

    Args:
      batch: a tree of host arrays ``[b, t]`` (``[grad_accum, b, t]``): the whole batch in
        a single-process run; in a multi-process run this process's consecutive share of
        the global batch (process ``i`` of ``n`` holds rows ``i·b … (i+1)·b - 1`` of the
        ``n·b`` global rows).
      mesh: the mesh.
      grad_accum: the step's gradient accumulation (the row axis is then the second).

    Returns:
      The tree of global arrays, rows split as :func:`batch_sharding` says.

    Raises:
      ValueError: the global row count is not divisible by the number of devices.

    Example::

      batch = parallel.shard_batch({"input_ids": ids, "attention_mask": mask}, mesh)
    """
    sharding = batch_sharding(mesh, grad_accum)
    row_axis = 0 if grad_accum == 1 else 1
    processes = len({device.process_index for device in mesh.devices.flat})

    def make(x: Any) -> jax.Array:
        x = np.asarray(x)
        rows = x.shape[row_axis] * processes
        if rows % mesh.size:
            raise ValueError(
                f"the global batch has {rows} rows ({x.shape[row_axis]} per process), not "
                f"divisible by the {mesh.size} devices of the mesh"
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(make, batch)


def make_sharded_train_step(
    model: DecoderLM,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    rules: Rules = (),
    min_shard_size: int = MIN_SHARD_SIZE,
    donate: bool = True,
    **options: Any,
) -> Callable:
    """The step of :func:`jpeft.train.make_train_step`, jitted over a mesh.

    Inside the step the state is constrained to :func:`train_specs` and the batch to
    :func:`batch_sharding`, and the new trainable half and optimizer state are returned in
    the same placement, so state placed with :func:`place` never moves and the step
    compiles once. XLA inserts the collectives: the gathers of FSDP-sharded weights and
    the all-reduces of loss sums, token counts and gradients.

    Args:
      model, optimizer: as for :func:`jpeft.train.make_train_step`.
      mesh: the mesh from :func:`make_mesh`.
      rules, min_shard_size: as for :func:`train_specs` (the same as given to :func:`place`).
      donate: as for :func:`jpeft.train.make_train_step`.
      **options: the fields of :class:`jpeft.train.StepOptions`.

    Returns:
      ``step(trainable, frozen, opt_state, batch, key) -> (trainable, opt_state, metrics)``;
      `batch` from :func:`shard_batch`, the metrics replicated.

    Example::

      step = parallel.make_sharded_train_step(model, optimizer, mesh)
      trainable, opt_state, metrics = step(trainable, frozen, opt_state,
                                           parallel.shard_batch(batch, mesh), key)
    """
    options = train.StepOptions(**options)
    body = train.train_step_fn(model, optimizer, options)
    batch_spec = _batch_spec(options.grad_accum)

    def step(trainable, frozen, opt_state, batch, key):
        specs = train_specs(
            mesh, trainable, frozen, opt_state, rules=rules, min_shard_size=min_shard_size
        )
        constrain = jax.lax.with_sharding_constraint
        trainable, frozen, opt_state = constrain(
            (trainable, frozen, opt_state), _named(mesh, tuple(specs))
        )
        batch = constrain(batch, NamedSharding(mesh, batch_spec))
        trainable, opt_state, metrics = body(trainable, frozen, opt_state, batch, key)
        trainable, opt_state = constrain(
            (trainable, opt_state), _named(mesh, (specs.trainable, specs.opt_state))
        )
        return trainable, opt_state, constrain(metrics, NamedSharding(mesh, P()))

    return jax.jit(step, donate_argnums=(2,) if donate else ())


def make_pmap_train_step(
    model: DecoderLM,
    optimizer: optax.GradientTransformation,
    *,
    axis_name: str = DATA,
    devices: Sequence[jax.Device] | None = None,
    **options: Any,
) -> Callable:
    """The step of :func:`jpeft.train.make_train_step` under :func:`jax.pmap`.

    Each device computes the loss sum, token count and gradient sums of its rows; these are
    summed over `axis_name` (:func:`jax.lax.psum`) before the division by the token count,
    so every device applies the update of the global batch. With dropout each device draws
    its own masks (the key is folded with the device index), so only dropout-free steps
    equal the single-device step exactly.

    New code should prefer :func:`make_sharded_train_step`: since JAX 0.8 :func:`jax.pmap`
    is in maintenance mode and is implemented with :func:`jax.jit` and
    :func:`jax.shard_map`.

    Args:
      model, optimizer: as for :func:`jpeft.train.make_train_step`.
      axis_name: the name of the mapped axis.
      devices: the devices to map over (default: all local devices; in a multi-process run
        the sums span every process's devices).
      **options: the fields of :class:`jpeft.train.StepOptions`.

    Returns:
      ``step(trainable, frozen, opt_state, batch, key) -> (trainable, opt_state, metrics)``.
      Batch arrays carry a leading device axis (``[devices, b, t]``, or
      ``[devices, grad_accum, b, t]``); the other arguments and every result have none
      (they are the same on every device).

    Example::

      step = parallel.make_pmap_train_step(model, optimizer)
      n = jax.local_device_count()
      batch = jax.tree.map(lambda x: x.reshape(n, -1, *x.shape[1:]), batch)
      trainable, opt_state, metrics = step(trainable, frozen, opt_state, batch, key)
    """
    body = train.train_step_fn(model, optimizer, train.StepOptions(**options), axis_name=axis_name)

    def step(trainable, frozen, opt_state, batch, key):
        key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
        return body(trainable, frozen, opt_state, batch, key)

    mapped = jax.pmap(
        step,
        axis_name=axis_name,
        in_axes=(None, None, None, 0, None),
        out_axes=None,
        devices=devices,
    )
    local = [
        device
        for device in (jax.local_devices() if devices is None else devices)
        if device.process_index == jax.process_index()
    ]

    def run(trainable, frozen, opt_state, batch, key):
        # pmap returns its results replicated over its devices; arguments placed there too
        # from the first call on keep the second call from compiling again.
        count = jax.tree.leaves(batch)[0].shape[0]
        replicated = NamedSharding(Mesh(np.array(local[:count]), (axis_name,)), P())
        trainable, frozen, opt_state, key = jax.device_put(
            (trainable, frozen, opt_state, key), replicated
        )
        return mapped(trainable, frozen, opt_state, batch, key)

    return run


# ---------------------------------------------------------------------------- private


def _batch_spec(grad_accum: int) -> P:
    return P(BATCH_AXES) if grad_accum == 1 else P(None, BATCH_AXES)


def _named(mesh: Mesh, specs: Any) -> Any:
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P)
    )


def _stacked(name: str) -> bool:
    return any(name.startswith(".".join(stack) + ".") for stack in targets.STACKED_LAYER_PATHS)


def _fsdp_spec(name: str, shape: tuple[int, ...], size: int, min_shard_size: int) -> P:
    if size == 1 or math.prod(shape) < min_shard_size:
        return P()
    first = 1 if _stacked(name) else 0
    dims = [d for d in range(first, len(shape)) if shape[d] % size == 0]
    if not dims:
        return P()
    dim = max(dims, key=lambda d: shape[d])  # the first of equally large dimensions
    return P(*([None] * dim), FSDP)


def _check_spec(
    spec: P, name: str, shape: tuple[int, ...], sizes: dict[str, int], pattern: str
) -> None:
    where = f"rule {pattern!r} gives {name} (shape {shape}) the spec {spec}"
    if len(spec) > len(shape):
        raise ValueError(f"{where}, which has more entries than the array has dimensions")
    for dim, axes in enumerate(spec):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        unknown = [axis for axis in axes if axis not in sizes]
        if unknown:
            raise ValueError(f"{where}, but the mesh has no axis {unknown[0]!r} ({list(sizes)})")
        parts = math.prod(sizes[axis] for axis in axes)
        if shape[dim] % parts:
            raise ValueError(
                f"{where}, but dimension {dim} ({shape[dim]}) is not divisible by {parts}"
            )


def _follow(opt_state: Any, trainable: Any, trainable_specs: Any) -> Any:
    """Specs of optimizer-state leaves: a leaf whose path ends with a trainable leaf's path
    and has its shape gets that leaf's spec; others are replicated."""
    index = {}
    leaves = jax.tree_util.tree_leaves_with_path(trainable)
    specs = jax.tree.leaves(trainable_specs, is_leaf=lambda x: isinstance(x, P))
    for (path, leaf), spec in zip(leaves, specs, strict=True):
        index[tree.path_keys(path)] = (tuple(jnp.shape(leaf)), spec)

    def spec_of(path: tuple, leaf: Any) -> P:
        keys = tree.path_keys(path)
        for start in range(len(keys)):
            shape, spec = index.get(keys[start:], (None, None))
            if shape == tuple(jnp.shape(leaf)):
                return spec
        return P()

    return jax.tree_util.tree_map_with_path(spec_of, opt_state)
