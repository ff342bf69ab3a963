"""The one description of how a model's parameters map to Hugging Face's names and layouts.

Each model lists its parameters once (:meth:`jpeft.models.DecoderLM.hf_layout`: HF name,
tree path, stacked layers, transposed or not, HF shape); reading a checkpoint into a tree,
writing a tree back for transformers, and the bitsandbytes 4-bit format
(:mod:`jpeft.qlora`) all follow that list, so no names or transposes are restated.
"""

from __future__ import annotations

import functools
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


def to_jax(array: np.ndarray, transposed: bool, dtype: Any) -> jax.Array:
    """An HF-layout numpy array as a jpeft leaf: transposed where the layout says so, and
    floating arrays (bfloat16 too, which numpy sees as void) cast to `dtype`."""
    array = np.swapaxes(array, -1, -2) if transposed else array
    if np.issubdtype(array.dtype, np.floating) or array.dtype.kind == "V":
        return jnp.asarray(array, dtype=dtype)
    return jnp.asarray(array)


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
    transformed, as a ``[1, ...]`` stack of one) and written into its slot of the stacked
    result in place, so the host holds the result plus one layer, never a second stack."""
    stacked = None
    for i in entry.layers:
        layer = to_jax(np.asarray(tensors[entry.name.format(i)])[None], entry.transposed, dtype)
        if transform is not None:
            layer = transform(entry.path, layer)
        if stacked is None:
            count = len(entry.layers)
            stacked = jax.tree.map(lambda x: jnp.zeros((count, *x.shape[1:]), x.dtype), layer)
        stacked = jax.tree.map(functools.partial(_put_layer, index=i), stacked, layer)
    return stacked


@functools.partial(jax.jit, donate_argnums=0)
def _put_layer(stacked: jax.Array, layer: jax.Array, index: jax.Array) -> jax.Array:
    """`stacked` with ``stacked[index] = layer[0]``, updated in place (donated)."""
    return jax.lax.dynamic_update_slice_in_dim(stacked, layer, index, 0)


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
