"""Reading Hugging Face checkpoints from local disk: ``config.json`` and safetensors.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each
tensor name to ``{"dtype", "shape", "data_offsets"}``, then the raw bytes. jpeft reads it
itself (one tensor at a time, when it is needed; bfloat16 through ``ml_dtypes``) so that a
truncated or foreign file gives an error naming the file and the problem rather than a
failure deep inside a reader.

The format carries no checksum, so a flipped bit in tensor data reads as another valid
number. Files that jpeft writes (:func:`write_safetensors`: merged models, PEFT exports,
4-bit checkpoints) therefore carry a SHA-256 digest of every tensor in the header's
``__metadata__`` (key ``jpeft.sha256``, a JSON object from tensor name to hex digest),
which the reader checks; other readers (transformers, peft) ignore the extra key.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np


class CheckpointError(ValueError):
    """A checkpoint file or folder is missing, corrupt or does not fit the model."""


_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_DIGESTS_KEY = "jpeft.sha256"


def digest(array: np.ndarray) -> str:
    """The SHA-256 hex digest of an array's bytes in C order (its shape and dtype are
    checked separately by every reader)."""
    return hashlib.sha256(np.asarray(array, order="C").reshape(-1).view(np.uint8)).hexdigest()


def write_safetensors(tensors: dict[str, np.ndarray], path: str | os.PathLike) -> None:
    """Writes `tensors` as a safetensors file that transformers and peft read (``format``
    ``pt``), with the digest of each tensor in its metadata for :func:`read_safetensors`."""
    import safetensors.numpy

    tensors = {name: np.asarray(array, order="C") for name, array in tensors.items()}
    digests = json.dumps({name: digest(array) for name, array in tensors.items()})
    metadata = {"format": "pt", _DIGESTS_KEY: digests}
    safetensors.numpy.save_file(tensors, str(path), metadata=metadata)


def read_config(folder: str | os.PathLike) -> dict:
    """The ``config.json`` of a local model folder, as a dict."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json; expected a Hugging Face model folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err


def safetensors_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of a model folder: the shards named by
    ``model.safetensors.index.json`` if there is one, else every ``*.safetensors`` file."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index: {err}") from err
        files = [folder / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index} names shards that are not in {folder}: {absent}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        other = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        hint = f" (found {other}: re-save the model with safe_serialization)" if other else ""
        raise CheckpointError(f"no *.safetensors weights in {folder}{hint}")
    return files


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file as numpy arrays (read into memory).

    Raises:
      CheckpointError: a missing, truncated or corrupt file, including a tensor whose bytes
        differ from the digest a jpeft-written file records.
    """
    return {name: np.asarray(tensor) for name, tensor in _iter_safetensors(Path(path))}


def read_safetensors_header(path: str | os.PathLike) -> dict[str, tuple[list[int], str]]:
    """Each tensor's ``(shape, dtype)`` in a safetensors file (dtype as the file names it,
    e.g. ``"F32"``), from its header alone.

    Raises:
      CheckpointError: a missing, truncated or corrupt file.
    """
    header, _, _ = _read_header(Path(path))
    try:
        return {name: (list(info["shape"]), str(info["dtype"])) for name, info in header.items()}
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{path} has a malformed safetensors header: {err}") from err


def _read_header(path: Path) -> tuple[dict, int, dict[str, str] | None]:
    """The JSON header of a safetensors file (without ``__metadata__``), the offset of its
    data, and the tensor digests its metadata records (None in files jpeft did not write)."""
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CheckpointError(
                f"{path} is truncated or not a safetensors file: its header claims "
                f"{header_len} bytes but the file has {size}"
            )
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path} has a corrupt safetensors header: {err}") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header: not a JSON object")
    return header, 8 + header_len, _digests(header.pop("__metadata__", None), path)


def _digests(metadata: object, path: Path) -> dict[str, str] | None:
    if not isinstance(metadata, dict) or _DIGESTS_KEY not in metadata:
        return None
    try:
        digests = json.loads(metadata[_DIGESTS_KEY])
    except (TypeError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} has corrupt tensor digests in its metadata: {err}") from err
    if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
        raise CheckpointError(f"{path} has corrupt tensor digests in its metadata")
    return digests


class SafetensorsTensor:
    """One tensor of a safetensors file, read from disk each time numpy asks for it.

    Reading copies the bytes with ``readinto`` into a fresh array: no memory map stays
    open, so the file's pages never count in the process's resident memory beside the
    arrays built from them (a memory-mapped 1B float32 checkpoint kept 4.4 GB of file pages
    resident while it was copied into the parameter tree). A tensor with a recorded digest
    is checked on every read.

    Attributes:
      name, shape, dtype, ndim: as the file's header gives them.
      filename: the file that holds the tensor (error messages name it).
    """

    def __init__(
        self,
        path: Path,
        name: str,
        shape: tuple[int, ...],
        dtype: np.dtype,
        offset: int,
        digest: str | None,
    ):
        self.filename, self.name, self.shape, self.dtype = path, name, shape, dtype
        self.ndim = len(shape)
        self._offset, self._digest = offset, digest

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = np.empty(self.shape, self.dtype)
        view = memoryview(array.reshape(-1).view(np.uint8))
        with open(self.filename, "rb") as f:
            f.seek(self._offset)
            got = f.readinto(view) if len(view) else 0
        if got != len(view):
            raise CheckpointError(
                f"{self.filename} is truncated: tensor {self.name!r} is cut short"
            )
        if self._digest is not None and digest(array) != self._digest:
            raise CheckpointError(
                f"{self.filename} is corrupt: the bytes of tensor {self.name!r} differ from "
                "the digest recorded when jpeft wrote the file"
            )
        return array if dtype is None else array.astype(dtype, copy=False)


def _iter_safetensors(path: Path) -> Iterator[tuple[str, SafetensorsTensor]]:
    """The tensors of one file, checked against its header and size; none is read yet."""
    header, data_start, digests = _read_header(path)
    if digests is not None and set(digests) != set(header):
        raise CheckpointError(f"{path}: the tensors of its header and of its digests differ")
    size = path.stat().st_size
    for name, info in header.items():
        try:
            dtype = np.dtype(_DTYPES[info["dtype"]])
            shape = tuple(int(n) for n in info["shape"])
            begin, end = info["data_offsets"]
            if any(n < 0 for n in shape):
                raise ValueError(f"negative dimension in {shape}")
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed entry {info}") from err
        if (
            not all(isinstance(x, int) for x in (begin, end))
            or end - begin != int(np.prod(shape)) * dtype.itemsize
            or not 0 <= begin <= end
        ):
            raise CheckpointError(f"{path}: tensor {name!r} has offsets that do not fit its shape")
        if data_start + end > size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name!r} ends at byte {data_start + end} "
                f"but the file has {size}"
            )
        digest_ = None if digests is None else digests[name]
        yield name, SafetensorsTensor(path, name, shape, dtype, data_start + begin, digest_)


def read_folder(folder: str | os.PathLike) -> tuple[dict, dict[str, SafetensorsTensor]]:
    """``(config dict, {HF name: tensor})`` of a local Hugging Face model folder; each
    tensor is read when :func:`numpy.asarray` asks for it (:class:`SafetensorsTensor`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder")
    config = read_config(folder)
    tensors: dict[str, SafetensorsTensor] = {}
    for file in safetensors_files(folder):
        for name, array in _iter_safetensors(file):
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} appears in more than one shard ({file})")
            tensors[name] = array
    return config, tensors
