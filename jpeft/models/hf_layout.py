"""The one description of how a model's parameters map to Hugging Face's names and layouts.

Each model lists its parameters once (:meth:`jpeft.models.DecoderLM.hf_layout`: HF name,
tree path, stacked layers, transposed or not, HF shape); reading a checkpoint into a tree,
writing a tree back for transformers, and the bitsandbytes 4-bit format
(:mod:`jpeft.qlora`) all follow that list, so no names or transposes are restated.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import tree
from jpeft.hf import checkpoints


class HFEntry(NamedTuple):
    """Where one Hugging Face parameter lives in a jpeft tree (see :meth:`DecoderLM.hf_layout`).

    Attributes:
      name: the HF name; for a stacked parameter it holds ``{}`` for the layer index
        (``model.layers.{}.self_attn.q_proj.weight``).
      path: the jpeft tree path.
      layers: the layer indices of a stacked parameter (``[l]`` leading axis in the tree),
        None for the others.
      transposed: True where jpeft stores the transpose of HF's layout (``[in, out]``
        linear weights against torch's ``[out, in]``).
      shape: the HF shape of one layer's tensor.
    """

    name: str
    path: tuple[str, ...]
    layers: range | None
    transposed: bool
    shape: tuple[int, ...]


def _layout_view(array: np.ndarray, transposed: bool) -> np.ndarray:
    return np.swapaxes(array, -1, -2) if transposed else array


def _host_dtype(array_dtype: np.dtype, dtype: Any) -> np.dtype:
    """`dtype` for a floating array (bfloat16 too, which numpy sees as void), else the
    array's own."""
    floating = np.issubdtype(array_dtype, np.floating) or array_dtype.kind == "V"
    return np.dtype(dtype) if floating else array_dtype


def to_jax(array: np.ndarray, transposed: bool, dtype: Any) -> jax.Array:
    """An HF-layout numpy array as a jpeft leaf: transposed where the layout says so, and a
    floating array (bfloat16 too, which numpy sees as void) cast to `dtype`, as
    :func:`jax.numpy.asarray` would cast it, but through :func:`jax.device_put` (which,
    unlike :func:`jax.numpy.asarray`, compiles no copy program for each shape). JAX may adopt
    an aligned, contiguous `array`'s memory: pass an array of the caller's own (the
    checkpoint readers read into fresh buffers and copy what would view a file). A view
    to transpose or an array to convert is copied first (:func:`_copy`), into memory from
    ``malloc``: most calls convert one layer, whose memory the next one reuses."""
    view = _layout_view(np.asarray(array), transposed)
    host_dtype = _host_dtype(view.dtype, dtype)
    if view.flags.c_contiguous and view.dtype == host_dtype:
        return jax.device_put(view)
    out = np.empty(view.shape, host_dtype)
    _copy(out, view)
    return jax.device_put(out)


def read(
    model: Any,
    tensors: Mapping[str, np.ndarray],
    *,
    dtype: Any = jnp.float32,
    source: str = "",
    transform: Callable[[tuple[str, ...], jax.Array], Any] | None = None,
) -> dict:
    """Builds the jpeft parameter tree from HF-named, HF-layout arrays.

    Checks that every parameter is present with its expected shape; ignores buffers that
    are not parameters and a tied output head stored twice. `transform(path, array)`,
    when given, replaces each parameter as soon as it is built (e.g. quantises it), so
    that the whole float tree never exists at once; a stacked parameter is transformed one
    layer at a time, as a ``[1, ...]`` stack of one, and the results are stacked (so the
    transform must treat layers apart and keep the leading axis, as
    :func:`jpeft.quant.nf4.quantize` does). `tensors` may be lazy (anything with ``shape``
    that :func:`numpy.asarray` reads), and is then read one layer at a time.

    Raises:
      CheckpointError: a missing or unexpected tensor, or a shape mismatch (naming the
        tensor, both shapes and `source`).
    """
    layout = model.hf_layout()
    expected = {
        entry.name.format(i): entry.shape
        for entry in layout
        for i in (entry.layers if entry.layers is not None else [None])
    }
    present = {name for name in tensors if not model.is_hf_extra(name)}
    where = f" in {source}" if source else ""
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    if missing or unexpected:
        raise checkpoints.CheckpointError(
            f"checkpoint{where} does not fit a {model.config.model_type} model with this "
            f"config: missing {_few(missing)}, unexpected {_few(unexpected, tensors)}"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise checkpoints.CheckpointError(
                f"tensor {_few([name], tensors)}{where} has shape {tuple(tensors[name].shape)}, "
                f"expected {tuple(shape)} from the config"
            )
    params: dict = {}
    for entry in layout:
        if entry.layers is None:
            leaf = to_jax(np.asarray(tensors[entry.name]), entry.transposed, dtype)
            leaf = leaf if transform is None else transform(entry.path, leaf)
        else:
            leaf = _read_stacked(entry, tensors, dtype, transform)
        tree.set_path(params, entry.path, leaf)
    return params


def _read_stacked(
    entry: HFEntry,
    tensors: Mapping[str, np.ndarray],
    dtype: Any,
    transform: Callable[[tuple[str, ...], jax.Array], Any] | None,
) -> Any:
    """A stacked parameter built one layer at a time: each layer is read, converted (and
    transformed, as a ``[1, ...]`` stack of one) and copied into its slot of a host stack
    (:func:`_host_array`), which becomes the device array without a copy on a CPU, so the
    host holds the result plus one layer, never a second stack. No program is compiled for
    it: building the stack on the device compiled two per leaf shape, 30 for SmolLM2 in 4
    bits (loading it 3.4 -> 2.5 s, its float32 load 1.8 -> 0.9 s). The copies into the
    stack transpose in blocks on two threads (:func:`_copy`): a Llama-1B's float32 load
    6.2-7.4 -> 5.1-6.2 s (alternating runs, 2-core AMD EPYC Zen 4)."""
    count, stacked = len(entry.layers), None
    for slot, i in enumerate(entry.layers):
        array = np.asarray(tensors[entry.name.format(i)])
        if transform is None:
            if stacked is None:
                shape = (count, *_layout_view(array, entry.transposed).shape)
                stacked = _host_array(shape, _host_dtype(array.dtype, dtype))
            _copy(stacked[slot, ...], _layout_view(array, entry.transposed))
            continue
        layer = transform(entry.path, to_jax(array[None], entry.transposed, dtype))
        if stacked is None:
            stacked = jax.tree.map(lambda x: _host_array((count, *x.shape[1:]), x.dtype), layer)
        jax.tree.map(lambda s, x: _copy(s[slot, ...], np.asarray(x)[0]), stacked, layer)
    return jax.tree.map(jax.device_put, stacked)


_TILE = 256
"""Rows and columns of the blocks :func:`_copy` moves at once: a transposed block of
256 x 256 float32 values (256 KiB) is read and written within the core's L2 cache."""

_COPY_THREADS = 2
"""Threads that share a big copy (numpy releases the GIL while it copies): on a VM most of
a load's time is the first touch of the stack's fresh pages, which two threads halve."""


def _copy(out: np.ndarray, values: np.ndarray) -> None:
    """``out[...] = values`` (converting its dtype to `out`'s), in blocks of
    :data:`_TILE` rows and columns shared by :data:`_COPY_THREADS` threads, so a transposed
    view is read a cache-sized block at a time and `out`'s untouched pages are faulted in
    by two cores. For a Llama-1B MLP weight (46 MB, transposed into fresh memory) it takes
    34 ms, against 107 ms for numpy's one assignment and 57 ms for a copy by
    :func:`jax.device_put` (2-core AMD EPYC Zen 4)."""
    if out.ndim < 2 or out.size < _TILE * _TILE * _COPY_THREADS:
        out[...] = values
        return
    rows = out.shape[-2]
    bounds = [rows * k // _COPY_THREADS for k in range(_COPY_THREADS + 1)]
    threads = [
        threading.Thread(target=_copy_rows, args=(out, values, begin, end))
        for begin, end in zip(bounds[1:-1], bounds[2:])
    ]
    for thread in threads:
        thread.start()
    _copy_rows(out, values, bounds[0], bounds[1])
    for thread in threads:
        thread.join()


def _copy_rows(out: np.ndarray, source: np.ndarray, begin: int, end: int) -> None:
    """``out[..., begin:end, :] = source[..., begin:end, :]``, a block at a time."""
    for row in range(begin, end, _TILE):
        rows = slice(row, min(row + _TILE, end))
        for column in range(0, out.shape[-1], _TILE):
            columns = slice(column, column + _TILE)
            out[..., rows, columns] = source[..., rows, columns]


def _host_array(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An array that :func:`jax.device_put` on a CPU takes without a copy: fresh anonymous
    memory (page-aligned; numpy aligns to 16 bytes), zero until written. Its pages are
    first touched by the copies into it (:func:`_copy`), on two threads."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    if size == 0 or not hasattr(mmap, "MAP_ANONYMOUS"):  # Windows: a copy, then
        return np.zeros(shape, dtype)
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(memory, dtype).reshape(shape)


def write(model: Any, params: dict) -> dict[str, np.ndarray]:
    """HF-named, HF-layout numpy arrays of a plain tree (the inverse of
    :func:`read`), ready for ``safetensors`` and transformers."""
    out: dict[str, np.ndarray] = {}
    for entry in model.hf_layout():
        leaf = tree.get_path(params, entry.path)
        if not isinstance(leaf, (jax.Array, np.ndarray)):
            raise TypeError(
                f"{'.'.join(entry.path)} is a {type(leaf).__name__}, not an array: merge "
                "adapters into the base (e.g. jpeft.lora.merge) before exporting"
            )
        array = np.asarray(leaf)
        if entry.transposed:
            array = np.swapaxes(array, -1, -2)
        # contiguous copies: safetensors.numpy writes views wrongly
        if entry.layers is None:
            out[entry.name] = np.ascontiguousarray(array)
        else:
            for i in entry.layers:
                out[entry.name.format(i)] = np.ascontiguousarray(array[i])
    return out


def _few(names: list[str], tensors: dict | None = None, limit: int = 5) -> str:
    """Up to `limit` of `names`, each with the file that holds it where `tensors` tells
    (the tensors of :func:`jpeft.hf.checkpoints.read_folder` know their file)."""
    if not names:
        return "none"
    files = {n: getattr(tensors[n], "filename", None) for n in names} if tensors else {}
    shown = ", ".join(f"{n} (in {files[n]})" if files.get(n) else n for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
