"""Orbax checkpoints of the adapter alone, and resumable training state.

An adapter checkpoint is a folder holding only what :func:`jpeft.tree.extract` returns (the
adapter nodes without their base weight, e.g. LoRA factors and scales, and
:class:`jpeft.tree.Trainable` weights),
megabytes rather than the gigabytes of the model::

    adapter/
      jpeft_adapter.json       format version, the user's config, and per entry: its tree
                               path, node type, static fields, array shapes and dtypes
      jpeft_arrays_<id>/       the arrays, an Orbax checkpoint of a nested dict

The JSON file is the commit point. A save writes a new arrays folder beside the old one,
then replaces ``jpeft_adapter.json`` with one :func:`os.replace` (atomic) and only then
deletes the old arrays folder, so a save that crashes at any moment leaves the previous
checkpoint at that path loadable and unchanged. Other files in the folder are left alone.

Training state (the trainable half of the parameters, the optimizer state, the step, the
position in the data and the PRNG key) is saved per step with :class:`orbax.checkpoint.
CheckpointManager`, which writes each step to a temporary folder and renames it into place,
and keeps the newest few steps.

Example::

    checkpoint.save_adapter(params, "out/adapter", config=dataclasses.asdict(lora_config))
    params = checkpoint.load_adapter(base_params, "out/adapter")
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import tree
from jpeft.hf import checkpoints

CheckpointError = checkpoints.CheckpointError
"""A checkpoint folder or file is missing, corrupt or does not fit (a ``ValueError``)."""

FORMAT_VERSION = 1
"""Version of the adapter and train-state layouts this module writes and reads."""

METADATA_FILE = "jpeft_adapter.json"
"""The file describing an adapter checkpoint."""

_ARRAYS_PREFIX = "jpeft_arrays_"
_ARRAYS_NAME = re.compile(rf"{_ARRAYS_PREFIX}[0-9a-f]+")


def save_adapter(params: Any, directory: str | os.PathLike, *, config: dict | None = None) -> None:
    """Saves the adapter of a parameter tree, without the base weights, to a folder.

    Args:
      params: a parameter tree with adapter nodes (e.g. from :func:`jpeft.lora.apply`).
      directory: the folder to write; created if missing. A previous adapter there is
        replaced atomically (see the module docstring); other files are kept.
      config: any JSON-serialisable dict stored with the adapter, e.g.
        ``dataclasses.asdict(lora_config)``; :func:`read_adapter_metadata` returns it.

    Raises:
      ValueError: `params` holds no adapter, or `config` is not JSON-serialisable.

    Example::

      params = jpeft.lora.apply(params, rank=8, targets=["q_proj", "v_proj"], key=key)
      ...  # train
      checkpoint.save_adapter(params, "out/adapter", config={"r": 8})
    """
    entries, arrays = [], {}
    for keys, node in tree.iter_nodes(tree.extract(params)):
        entry, fields = _describe(keys, node)
        entries.append(entry)
        for name, value in fields.items():
            arrays[(*map(str, keys), name)] = value
    if not entries:
        raise ValueError("params hold no adapter: no adapter node to save")
    arrays_name = f"{_ARRAYS_PREFIX}{uuid.uuid4().hex}"
    metadata = {
        "format_version": FORMAT_VERSION,
        "arrays": arrays_name,
        "config": config,
        "entries": entries,
    }
    try:
        json.dumps(config)
    except TypeError as err:
        raise ValueError(
            f"config must be JSON-serialisable (e.g. dataclasses.asdict(lora_config)): {err}"
        ) from err
    text = json.dumps(metadata, indent=2)

    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    with _local_checkpointer() as checkpointer:
        checkpointer.save(directory / arrays_name, _nest(arrays))
        checkpointer.wait_until_finished()
    # The temporary JSON file shares the arrays prefix, so a crash leaves nothing that the
    # sweep below misses.
    staged = directory / f"{arrays_name}.json"
    with open(staged, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(staged, directory / METADATA_FILE)
    _fsync_directory(directory)
    for stale in directory.glob(f"{_ARRAYS_PREFIX}*"):
        if stale.name == arrays_name:
            continue
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()


def read_adapter_metadata(directory: str | os.PathLike) -> dict:
    """The validated contents of an adapter checkpoint's ``jpeft_adapter.json``.

    Args:
      directory: a folder written by :func:`save_adapter`.

    Returns:
      A dict with ``format_version``, ``arrays`` (the arrays folder's name), ``config`` (as
      given to :func:`save_adapter`, or None) and ``entries``: per adapter entry its
      ``path`` (the tree keys), ``type`` (the node kind: ``"lora"``, ``"trainable"``, ...),
      ``static`` fields and ``arrays`` (name to ``{"shape", "dtype"}``).

    Raises:
      CheckpointError: a missing folder, a missing or corrupt JSON file, an unknown format
        version or node type.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"adapter folder {directory} does not exist")
    path = directory / METADATA_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{directory} has no {METADATA_FILE}; it is not an adapter saved by save_adapter"
        )
    try:
        metadata = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(metadata, dict) or "format_version" not in metadata:
        raise CheckpointError(f"{path} has no format_version; it is not a jpeft adapter file")
    if metadata["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {metadata['format_version']!r}; this jpeft reads "
            f"version {FORMAT_VERSION}"
        )
    try:
        _check_layout(metadata)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path} is malformed: {type(err).__name__}: {err}") from err
    for entry in metadata["entries"]:
        try:
            tree.node_type(entry["type"])
        except KeyError as err:
            raise CheckpointError(
                f"{path}: entry {_dotted(entry['path'])}: {err.args[0]} (is the module that "
                "defines it imported?)"
            ) from None
    return metadata


def load_adapter(base_params: Any, directory: str | os.PathLike) -> Any:
    """Loads an adapter saved by :func:`save_adapter` onto a base parameter tree.

    Args:
      base_params: the base model's parameter tree (without this adapter).
      directory: the adapter folder.

    Returns:
      `base_params` with the adapter's nodes in place of the weights they adapt, bitwise
      equal to the tree that was saved (dropout PRNG keys aside, which are never saved).

    Raises:
      CheckpointError: (a ``ValueError``) a missing folder, a missing or corrupt JSON file,
        an unknown format version or node type, stored arrays that disagree with the JSON
        file, or an adapter that does not fit `base_params` (naming the path and both
        shapes).

    Example::

      model, base_params = jpeft.models.from_pretrained("SmolLM2-135M-Instruct")
      params = checkpoint.load_adapter(base_params, "out/adapter")
    """
    directory = Path(directory).absolute()
    metadata = read_adapter_metadata(directory)
    arrays_dir = directory / metadata["arrays"]
    expected = {
        (*map(str, entry["path"]), name): _shape_dtype(spec)
        for entry in metadata["entries"]
        for name, spec in entry["arrays"].items()
    }
    if not arrays_dir.is_dir():
        raise CheckpointError(f"{arrays_dir}, named by {METADATA_FILE}, does not exist")
    with _local_checkpointer() as checkpointer:
        try:
            stored = checkpointer.metadata(arrays_dir).item_metadata
        except Exception as err:  # Orbax raises many kinds on a damaged folder.
            raise CheckpointError(f"{arrays_dir} cannot be read by Orbax: {err}") from err
        _check_stored(stored, expected, str(arrays_dir), str(directory / METADATA_FILE))
        target = {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in expected.items()}
        arrays = checkpointer.restore(arrays_dir, _nest(target))

    adapter: dict = {}
    for entry in metadata["entries"]:
        keys = tuple(map(str, entry["path"]))
        fields = {name: tree.get_path(arrays, (*keys, name)) for name in entry["arrays"]}
        static = {k: tuple(v) if isinstance(v, list) else v for k, v in entry["static"].items()}
        cls = tree.node_type(entry["type"])
        values = dict.fromkeys(field.name for field in dataclasses.fields(cls))
        try:
            node = cls(**{**values, **fields, **static})
        except TypeError as err:
            raise CheckpointError(
                f"{directory / METADATA_FILE}: entry {_dotted(entry['path'])} does not fit a "
                f"{cls.__name__}: {err}"
            ) from err
        tree.set_path(adapter, tuple(entry["path"]), node)
    try:
        return tree.attach(base_params, adapter)
    except ValueError as err:
        raise CheckpointError(f"the adapter in {directory} does not fit the base: {err}") from err


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
              checkpoint.save_train_state("out/run", step + 1, params=trainable,
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
    ocp = _orbax()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    with ocp.CheckpointManager(directory, options=options) as manager:
        saved = manager.save(
            int(step),
            args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(_nest(arrays)), meta=ocp.args.JsonSave(meta)
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
    ocp = _orbax()
    options = ocp.CheckpointManagerOptions(create=False)
    with ocp.CheckpointManager(directory, options=options) as manager:
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
      if checkpoint.latest_step("out/run") is not None:
          trainable, opt_state, start, position, rng = checkpoint.restore_train_state(
              "out/run", params=trainable, opt_state_like=optimizer.init(trainable))
    """
    directory = Path(directory).absolute()
    if not directory.is_dir():
        raise CheckpointError(f"train state folder {directory} does not exist")
    trainable, frozen = tree.split(params)
    like = {**_flat(trainable, "params"), **_flat(opt_state_like, "opt_state")}
    expected = {k: (tuple(jnp.shape(x)), jnp.dtype(jnp.result_type(x))) for k, x in like.items()}
    ocp = _orbax()
    handlers = {"arrays": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    options = ocp.CheckpointManagerOptions(create=False)
    with ocp.CheckpointManager(directory, options=options, item_handlers=handlers) as manager:
        step = manager.latest_step() if step is None else step
        if step is None or step not in manager.all_steps():
            raise CheckpointError(
                f"{directory} holds no train state for step {step}; steps saved: "
                f"{manager.all_steps()}"
            )
        step_dir = directory / str(step)
        _check_stored(
            manager.item_metadata(step)["arrays"],
            expected,
            str(step_dir),
            "the params and opt_state_like given to restore_train_state",
        )
        target = _nest({keys: _abstract(x) for keys, x in like.items()})
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                arrays=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
        )
    meta = restored.meta
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{step_dir} has train state format version {meta.get('format_version')!r}; this "
            f"jpeft reads version {FORMAT_VERSION}"
        )
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


def _describe(keys: tuple, node: tree.Node) -> tuple[dict, dict[str, Any]]:
    """The JSON entry of an extracted adapter node, and its arrays by field name."""
    static, arrays = {}, {}
    for field in dataclasses.fields(node):
        value = getattr(node, field.name)
        if field.metadata.get("static"):
            static[field.name] = value
        elif value is not None:
            arrays[field.name] = value
    entry = {
        "path": list(keys),
        "type": node.kind,
        "static": static,
        "arrays": {
            name: {"shape": list(jnp.shape(x)), "dtype": jnp.dtype(jnp.result_type(x)).name}
            for name, x in arrays.items()
        },
    }
    return entry, arrays


def _check_layout(metadata: dict) -> None:
    """Raises KeyError, TypeError or ValueError where `metadata` lacks a field or holds one
    of the wrong kind."""
    if not _ARRAYS_NAME.fullmatch(metadata["arrays"]):
        raise ValueError(f"bad arrays folder name {metadata['arrays']!r}")
    for entry in metadata["entries"]:
        if not entry["path"] or not all(isinstance(k, (str, int)) for k in entry["path"]):
            raise ValueError(f"bad entry path {entry['path']!r}")
        if not isinstance(entry["type"], str) or not isinstance(entry["static"], dict):
            raise TypeError(f"entry {_dotted(entry['path'])}: bad type or static fields")
        for spec in entry["arrays"].values():
            _shape_dtype(spec)


def _shape_dtype(spec: dict) -> tuple[tuple[int, ...], np.dtype]:
    return tuple(int(n) for n in spec["shape"]), jnp.dtype(spec["dtype"])


def _check_stored(stored: Any, expected: dict, stored_in: str, described_by: str) -> None:
    """Raises a CheckpointError naming the first array whose presence, shape or dtype in
    Orbax metadata `stored` differs from `expected` (keys to ``(shape, dtype)``)."""
    found = {
        tuple(map(str, tree.path_keys(path))): (tuple(m.shape), jnp.dtype(m.dtype))
        for path, m in jax.tree_util.tree_flatten_with_path(stored)[0]
    }
    for keys, (shape, dtype) in expected.items():
        if keys not in found:
            raise CheckpointError(
                f"{stored_in} has no array {_dotted(keys)}, which {described_by} expects"
            )
        if found[keys] != (shape, dtype):
            got_shape, got_dtype = found[keys]
            raise CheckpointError(
                f"{stored_in}: array {_dotted(keys)} is stored with shape {got_shape} and dtype "
                f"{got_dtype.name}, but {described_by} expects shape {shape} and dtype "
                f"{dtype.name}"
            )
    extra = sorted(_dotted(keys) for keys in found.keys() - expected.keys())
    if extra:
        raise CheckpointError(
            f"{stored_in} holds arrays that {described_by} does not expect: {extra[:5]}"
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


def _nest(flat: dict[tuple, Any]) -> dict:
    """``{("a", "b"): x}`` -> ``{"a": {"b": x}}``."""
    nested: dict = {}
    for keys, value in flat.items():
        tree.set_path(nested, keys, value)
    return nested


def _dotted(keys: Any) -> str:
    return ".".join(map(str, keys))


def _fsync_directory(directory: Path) -> None:
    """Makes a rename inside `directory` durable across a power loss."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _local_checkpointer() -> Any:
    """An Orbax checkpointer that involves this process alone, so that one process of a
    multi-process run (usually process 0, with host arrays from ``parallel.to_host``) can
    save or read an adapter without waiting for the others."""
    ocp = _orbax()
    this_process = ocp.options.MultiprocessingOptions(
        primary_host=jax.process_index(), active_processes={jax.process_index()}
    )
    return ocp.StandardCheckpointer(multiprocessing_options=this_process)


def _orbax() -> Any:
    """``orbax.checkpoint``, imported on first use: it adds about 30 MB to the resident memory
    of every process, and only checkpointing needs it."""
    import orbax.checkpoint

    return orbax.checkpoint
