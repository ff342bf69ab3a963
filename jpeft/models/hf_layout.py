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


def to_host(array: np.ndarray, transposed: bool, dtype: Any) -> np.ndarray:
    """An HF-layout numpy array in jpeft's layout, on the host: transposed where the layout
    says so (a view), and floating arrays (bfloat16 too, which numpy sees as void) cast to
    `dtype`, as :func:`jax.numpy.asarray` would cast them."""
    array = np.swapaxes(array, -1, -2) if transposed else array
    if np.issubdtype(array.dtype, np.floating) or array.dtype.kind == "V":
        return np.asarray(array, dtype=dtype)
    return np.asarray(array)


def to_jax(array: np.ndarray, transposed: bool, dtype: Any) -> jax.Array:
    """:func:`to_host`'s array as a jpeft leaf, through :func:`jax.device_put` (not
    :func:`jax.numpy.asarray`, which compiles a copy program for each shape). JAX may adopt
    an aligned, contiguous `array`'s memory: pass an array of the caller's own (the
    checkpoint readers read into fresh buffers and copy what would view a file)."""
    return jax.device_put(to_host(array, transposed, dtype))


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
    (:func:`_zeroed_stack`), which becomes the device array without a copy on a CPU, so the
    host holds the result plus one layer, never a second stack. No program is compiled for
    it: building the stack on the device compiled two per leaf shape, 30 for SmolLM2 in 4
    bits (loading it 3.4 -> 2.5 s, its float32 load 1.8 -> 0.9 s; a Llama-1B in float32
    about as before, 6.0 s; 2-core AMD EPYC Zen 4, alternating runs)."""
    stacked = None
    for slot, i in enumerate(entry.layers):
        array = np.asarray(tensors[entry.name.format(i)])
        if transform is None:
            layer = to_host(array, entry.transposed, dtype)[None]
        else:
            layer = transform(entry.path, to_jax(array[None], entry.transposed, dtype))
        if stacked is None:
            count = len(entry.layers)
            stacked = jax.tree.map(lambda x: _zeroed_stack((count, *x.shape[1:]), x.dtype), layer)
        jax.tree.map(lambda s, x: _put(s, slot, np.asarray(x)[0]), stacked, layer)
    return jax.tree.map(jax.device_put, stacked)


def _put(stack: np.ndarray, slot: int, values: np.ndarray) -> None:
    """``stack[slot] = values``, a transposed view made contiguous by :func:`jax.device_put`
    first: numpy copies one walking its source a column at a time (a Llama-1B MLP weight,
    46 MB: 81 ms against JAX's 40 ms, 2-core AMD EPYC Zen 4)."""
    stack[slot] = values if values.flags.c_contiguous else np.asarray(jax.device_put(values))


def _zeroed_stack(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A zeroed host array that :func:`jax.device_put` on a CPU takes without a copy (its
    data page-aligned; numpy aligns to 16 bytes), its pages touched by two threads: on a VM
    first-touching fresh memory is what costs (one thread: 0.5-0.8 GB/s on a 2-core AMD EPYC
    Zen 4 VM, where a 1B model then loaded 1.2-1.8x slower than into XLA's stacks)."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    if size == 0 or not hasattr(mmap, "MAP_ANONYMOUS"):  # Windows: a copy, then
        return np.zeros(shape, dtype)
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    out = np.frombuffer(memory, np.uint8)
    half = size // 2
    thread = threading.Thread(target=out[:half].fill, args=(0,))
    thread.start()
    out[half:].fill(0)
    thread.join()
    return out.view(dtype).reshape(shape)


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
