"""Orbax checkpoints of the adapter alone.

An adapter checkpoint is a folder holding only what :func:`jpeft.tree.extract` returns (the
adapter nodes without their base weight, e.g. LoRA factors and scales, and
:class:`jpeft.tree.Trainable` weights),
megabytes rather than the gigabytes of the model::

    adapter/
      jpeft_adapter.json       format version, the user's config, and per entry: its tree
                               path, node type, static fields, array shapes, dtypes and
                               SHA-256 digests
      jpeft_arrays_<id>/       the arrays, an Orbax checkpoint of a nested dict

A load checks every array against its digest, so a damaged file ends in a
:class:`CheckpointError` rather than an adapter with silently different values (folders
written before digests were recorded load unchecked).

The JSON file is the commit point. A save writes a new arrays folder beside the old one,
then replaces ``jpeft_adapter.json`` with one :func:`os.replace` (atomic) and only then
deletes the old arrays folder, so a save that crashes at any moment leaves the previous
checkpoint at that path loadable and unchanged. Other files in the folder are left alone.
The resumable state of a training run is saved by :mod:`jpeft.train_state`.

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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import orbax_arrays, tree
from jpeft.hf import checkpoints

CheckpointError = checkpoints.CheckpointError
"""A checkpoint folder or file is missing, corrupt or does not fit (a ``ValueError``)."""

FORMAT_VERSION = 1
"""Version of the adapter layout this module writes and reads."""

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
        checkpointer.save(directory / arrays_name, orbax_arrays.nest(arrays))
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
      ``static`` fields and ``arrays`` (name to ``{"shape", "dtype", "sha256"}``; folders
      saved before digests were recorded have none).

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
                f"{path}: entry {orbax_arrays.dotted(entry['path'])}: {err.args[0]} (is the "
                "module that defines it imported?)"
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
        file (in shape, dtype or digest), or an adapter that does not fit `base_params`
        (naming the path and both shapes).

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
        orbax_arrays.check_stored(stored, expected, str(arrays_dir), str(directory / METADATA_FILE))
        target = {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in expected.items()}
        try:
            arrays = checkpointer.restore(arrays_dir, orbax_arrays.nest(target))
        except Exception as err:  # as above: a damaged array file fails in many ways
            raise CheckpointError(f"{arrays_dir} cannot be read by Orbax: {err}") from err
    _check_digests(metadata, arrays, arrays_dir)

    adapter: dict = {}
    for entry in metadata["entries"]:
        keys = tuple(map(str, entry["path"]))
        fields = {name: tree.get_path(arrays, (*keys, name)) for name in entry["arrays"]}
        tree.set_path(adapter, tuple(entry["path"]), _node(entry, fields, directory))
    try:
        return tree.attach(base_params, adapter)
    except ValueError as err:
        raise CheckpointError(f"the adapter in {directory} does not fit the base: {err}") from err


def describe_adapter(directory: str | os.PathLike) -> dict:
    """What an adapter folder holds, from its JSON file alone (no array is read).

    Returns:
      ``format_version``, ``config`` (as saved), ``parameters`` (the trainable count, as
      :func:`jpeft.tree.count_parameters` gives it for the loaded adapter) and ``entries``:
      per node its dotted ``path``, ``kind``, ``arrays`` (name to ``{"shape", "dtype"}``),
      ``static`` fields and trainable ``parameters``.

    Raises:
      CheckpointError: as :func:`read_adapter_metadata`.
    """
    directory = Path(directory)
    metadata = read_adapter_metadata(directory)
    entries = []
    for entry in metadata["entries"]:
        shapes = {
            name: jax.ShapeDtypeStruct(*_shape_dtype(spec))
            for name, spec in entry["arrays"].items()
        }
        entries.append(
            {
                "path": orbax_arrays.dotted(entry["path"]),
                "kind": entry["type"],
                "arrays": {
                    name: {"shape": spec["shape"], "dtype": spec["dtype"]}
                    for name, spec in entry["arrays"].items()
                },
                "static": entry["static"],
                "parameters": _node(entry, shapes, directory).parameter_count()[0],
            }
        )
    return {
        "format_version": metadata["format_version"],
        "parameters": sum(e["parameters"] for e in entries),
        "config": metadata["config"],
        "entries": entries,
    }


def _node(entry: dict, fields: dict[str, Any], directory: Path) -> tree.Node:
    """The node an entry of the JSON file describes, with `fields` as its arrays (and no
    base weight)."""
    static = {k: tuple(v) if isinstance(v, list) else v for k, v in entry["static"].items()}
    cls = tree.node_type(entry["type"])
    values = dict.fromkeys(field.name for field in dataclasses.fields(cls))
    try:
        return cls(**{**values, **fields, **static})
    except TypeError as err:
        raise CheckpointError(
            f"{directory / METADATA_FILE}: entry {orbax_arrays.dotted(entry['path'])} does "
            f"not fit a {cls.__name__}: {err}"
        ) from err


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
            name: {
                "shape": list(jnp.shape(x)),
                "dtype": jnp.dtype(jnp.result_type(x)).name,
                "sha256": checkpoints.digest(np.asarray(x)),
            }
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
            raise TypeError(
                f"entry {orbax_arrays.dotted(entry['path'])}: bad type or static fields"
            )
        for spec in entry["arrays"].values():
            _shape_dtype(spec)
            if not isinstance(spec.get("sha256", ""), str):
                raise TypeError(f"entry {orbax_arrays.dotted(entry['path'])}: bad digest")


def _check_digests(metadata: dict, arrays: dict, arrays_dir: Path) -> None:
    """Raises a CheckpointError naming the first restored array whose bytes differ from the
    digest recorded at save time."""
    for entry in metadata["entries"]:
        for name, spec in entry["arrays"].items():
            keys = (*map(str, entry["path"]), name)
            value = np.asarray(tree.get_path(arrays, keys))
            if "sha256" in spec and checkpoints.digest(value) != spec["sha256"]:
                raise CheckpointError(
                    f"{arrays_dir} is corrupt: array {orbax_arrays.dotted(keys)} differs from "
                    f"the digest in {METADATA_FILE}"
                )


def _shape_dtype(spec: dict) -> tuple[tuple[int, ...], np.dtype]:
    return tuple(int(n) for n in spec["shape"]), jnp.dtype(spec["dtype"])


def _fsync_directory(directory: Path) -> None:
    """Makes a rename inside `directory` durable across a power loss."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _local_checkpointer() -> Any:
    """An Orbax checkpointer that involves this process alone, so that one process of a
    multi-process run (usually process 0, with host arrays from ``distributed.to_host``) can
    save or read an adapter without waiting for the others."""
    ocp = orbax_arrays.orbax_checkpoint()
    this_process = ocp.options.MultiprocessingOptions(
        primary_host=jax.process_index(), active_processes={jax.process_index()}
    )
    return ocp.StandardCheckpointer(multiprocessing_options=this_process)
