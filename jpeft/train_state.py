"""Resumable training state, saved per step with Orbax.

The state is the trainable half of the parameters, the optimizer state, the step, the
position in the data and the PRNG key. Each step is saved with :class:`orbax.checkpoint.
CheckpointManager`, which writes the step to a temporary folder and renames it into place,
and keeps the newest few steps::

    run/
      <step>/
        arrays/     the trainable half under "params" and the optimizer state under
                    "opt_state", an Orbax checkpoint of a nested dict
        meta/       JSON: format version, step, data position and the PRNG key

Example::

    trainable, frozen = jpeft.split(params)
    train_state.save_train_state("out/run", 100, params=trainable, opt_state=opt_state,
                                 data_position=position, rng=rng)
    trainable, opt_state, step, position, rng = train_state.restore_train_state(
        "out/run", params=trainable, opt_state_like=optimizer.init(trainable))
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import orbax_arrays, tree
from jpeft.hf.checkpoints import CheckpointError

FORMAT_VERSION = 1
"""Version of the train-state layout this module writes and reads."""


class TrainState(NamedTuple):
    """Everything needed to resume training where it stopped.

    Attributes:
      params: the parameter tree (the same kind of tree as the `params` given to
        :func:`restore_train_state`: full, or the trainable half from :func:`jpeft.split`).
      opt_state: the optimizer state over the trainable half.
      step: the number of steps taken.
      data_position: where the data stream resumes (e.g. examples or batches consumed).
      rng: the PRNG key to continue from.
    """

    params: Any
    opt_state: Any
    step: int
    data_position: int
    rng: jax.Array


def save_train_state(
    directory: str | os.PathLike,
    step: int,
    *,
    params: Any,
    opt_state: Any,
    data_position: int,
    rng: jax.Array,
    keep: int = 3,
) -> None:
    """Saves the training state at `step` into ``directory/<step>``, keeping the newest `keep`.

    Only the trainable half of `params` is written: the frozen base is not part of the state.

    Args:
      directory: the run's checkpoint folder (created if missing).
      step: the number of steps taken; the step folder's name.
      params: the full parameter tree or its trainable half (from :func:`jpeft.split`).
      opt_state: the optimizer state (``optimizer.init(trainable)``, updated).
      data_position: where the data stream resumes.
      rng: the PRNG key to continue from (a typed key or a legacy ``uint32`` key).
      keep: how many of the newest step folders to keep; older ones are deleted.

    Raises:
      CheckpointError: `directory` already holds `step` or a later one.

    Example::

      trainable, frozen = jpeft.split(params)
      for step in range(start, steps):
          trainable, opt_state, metrics = train_step(trainable, frozen, opt_state, ...)
          if (step + 1) % 100 == 0:
              train_state.save_train_state("out/run", step + 1, params=trainable,
                                           opt_state=opt_state, data_position=position, rng=rng)
    """
    arrays = {**_flat(tree.split(params)[0], "params"), **_flat(opt_state, "opt_state")}
    typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
    meta = {
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "data_position": int(data_position),
        "rng_impl": str(jax.random.key_impl(rng)) if typed else None,
        "rng_data": np.asarray(jax.random.key_data(rng) if typed else rng).tolist(),
    }
    directory = Path(directory).absolute()
    ocp = orbax_arrays.orbax_checkpoint()
    directory.mkdir(parents=True, exist_ok=True)  # Orbax creates none for one process
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=False, multiprocessing_options=_this_process()
    )
    with ocp.CheckpointManager(directory, options=options) as manager:
        saved = manager.save(
            int(step),
            args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(orbax_arrays.nest(arrays)),
                meta=ocp.args.JsonSave(meta),
            ),
        )
        manager.wait_until_finished()
        if not saved:  # Orbax skips, silently, any step not newer than the latest.
            raise CheckpointError(
                f"step {step} was not saved: {directory} already holds step "
                f"{manager.latest_step()}; save a run resumed from an older step elsewhere"
            )


def latest_step(directory: str | os.PathLike) -> int | None:
    """The newest step saved by :func:`save_train_state` in `directory`, or None if none."""
    directory = Path(directory).absolute()
    if not directory.is_dir():
        return None
    with _reader(directory) as manager:
        return manager.latest_step()


def restore_train_state(
    directory: str | os.PathLike, *, params: Any, opt_state_like: Any, step: int | None = None
) -> TrainState:
    """Restores the training state saved by :func:`save_train_state`.

    Args:
      directory: the run's checkpoint folder.
      params: a tree of the same structure as the one saved, e.g. the base with the same
        adapter freshly applied (full tree or trainable half); its trainable leaves are
        replaced, its frozen leaves kept. Restored arrays take the shardings of its leaves.
      opt_state_like: a freshly initialised optimizer state (``optimizer.init(trainable)``),
        giving the structure, shapes and shardings to restore into.
      step: the step to restore; the newest by default.

    Returns:
      A :class:`TrainState` ``(params, opt_state, step, data_position, rng)``.

    Raises:
      CheckpointError: no such folder or step, or stored arrays that do not match the
        structure, shapes or dtypes of `params` and `opt_state_like` (naming the array).

    Example::

      params = jpeft.lora.apply(base_params, rank=8, targets=["q_proj", "v_proj"], key=key)
      trainable, frozen = jpeft.split(params)
      if train_state.latest_step("out/run") is not None:
          trainable, opt_state, start, position, rng = train_state.restore_train_state(
              "out/run", params=trainable, opt_state_like=optimizer.init(trainable))
    """
    directory = Path(directory).absolute()
    if not directory.is_dir():
        raise CheckpointError(f"train state folder {directory} does not exist")
    trainable, frozen = tree.split(params)
    like = {**_flat(trainable, "params"), **_flat(opt_state_like, "opt_state")}
    expected = {k: (tuple(jnp.shape(x)), jnp.dtype(jnp.result_type(x))) for k, x in like.items()}
    ocp = orbax_arrays.orbax_checkpoint()
    with _reader(directory) as manager:
        step = manager.latest_step() if step is None else step
        if step is None or step not in manager.all_steps():
            raise CheckpointError(
                f"{directory} holds no train state for step {step}; steps saved: "
                f"{manager.all_steps()}"
            )
        step_dir = directory / str(step)
        orbax_arrays.check_stored(
            manager.item_metadata(step)["arrays"],
            expected,
            str(step_dir),
            "the params and opt_state_like given to restore_train_state",
        )
        target = orbax_arrays.nest({keys: _abstract(x) for keys, x in like.items()})
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                arrays=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
        )
    meta = restored.meta
    _check_format(meta, step_dir)
    arrays = restored.arrays
    rng = jnp.asarray(meta["rng_data"], jnp.uint32)
    if meta["rng_impl"] is not None:
        rng = jax.random.wrap_key_data(rng, impl=meta["rng_impl"])
    return TrainState(
        params=tree.combine(_unflatten(trainable, arrays.get("params", {})), frozen),
        opt_state=_unflatten(opt_state_like, arrays.get("opt_state", {})),
        step=meta["step"],
        data_position=meta["data_position"],
        rng=rng,
    )


def describe(directory: str | os.PathLike) -> dict:
    """What a folder of train states holds, read from Orbax metadata: no array is restored.

    Args:
      directory: the run's checkpoint folder, written by :func:`save_train_state`.

    Returns:
      A dict with ``steps`` (the steps saved, oldest first), ``latest_step``, and of the
      latest step its ``data_position`` and ``arrays``: each stored array's dotted name
      (``params.model.layers.self_attn.q_proj.weight.a``, ``opt_state.0.mu.…``) to its
      ``(shape, dtype)``, the shape a list of ints and the dtype a NumPy dtype name.

    Raises:
      CheckpointError: a missing folder, one with no step saved, or a latest step that
        Orbax cannot read or that is not a jpeft train state of this format version.

    Example::

      info = train_state.describe("out/run/checkpoints")
      info["latest_step"], info["arrays"]["params.lm_head.weight"]   # 300, ([64, 256], 'float32')
    """
    directory = Path(directory).absolute()
    if not directory.is_dir():
        raise CheckpointError(f"train state folder {directory} does not exist")
    ocp = orbax_arrays.orbax_checkpoint()
    with _reader(directory) as manager:
        steps = sorted(manager.all_steps())
        if not steps:
            raise CheckpointError(f"{directory} holds no train state")
        latest = steps[-1]
        step_dir = directory / str(latest)
        try:
            stored = manager.item_metadata(latest)["arrays"]
            restored = manager.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as err:  # Orbax raises many kinds on a damaged folder.
            raise CheckpointError(
                f"{step_dir} cannot be read as a jpeft train state: {err}"
            ) from err
    meta = restored.meta
    _check_format(meta, step_dir)
    arrays = {
        tree.path_str(path): (list(m.shape), str(np.dtype(m.dtype)))
        for path, m in jax.tree_util.tree_flatten_with_path(stored)[0]
    }
    return {
        "steps": steps,
        "latest_step": latest,
        "data_position": meta["data_position"],
        "arrays": arrays,
    }


def _reader(directory: Path) -> Any:
    """A CheckpointManager that reads the steps saved in `directory` and creates nothing."""
    ocp = orbax_arrays.orbax_checkpoint()
    handlers = {"arrays": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    options = ocp.CheckpointManagerOptions(create=False, multiprocessing_options=_this_process())
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def _this_process() -> Any:
    """Orbax options that involve this process alone: in a multi-process run one process
    saves (host arrays, from :func:`jpeft.distributed.to_host`) and each reads for itself,
    into arrays on its own devices."""
    ocp = orbax_arrays.orbax_checkpoint()
    index = jax.process_index()
    return ocp.options.MultiprocessingOptions(primary_host=index, active_processes={index})


def _check_format(meta: dict, step_dir: Path) -> None:
    """Raises a CheckpointError if a step's JSON `meta` is not of this format version."""
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{step_dir} has train state format version {meta.get('format_version')!r}; this "
            f"jpeft reads version {FORMAT_VERSION}"
        )


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
    """A restore target for `x`: its shape and dtype, and its sharding if it has one."""
    return jax.ShapeDtypeStruct(
        jnp.shape(x), jnp.result_type(x), sharding=getattr(x, "sharding", None)
    )


def _flat(pytree: Any, prefix: str) -> dict[tuple[str, ...], Any]:
    """The leaves of a pytree keyed by `prefix` and their path (as strings); None subtrees
    have no leaves and vanish."""
    return {
        (prefix, *map(str, tree.path_keys(path))): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(pytree)[0]
    }


def _unflatten(like: Any, nested: dict) -> Any:
    """The pytree of `like`'s structure whose leaves are taken from `nested` by path."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    return jax.tree_util.tree_unflatten(
        treedef, [tree.get_path(nested, tuple(map(str, tree.path_keys(p)))) for p, _ in paths]
    )
