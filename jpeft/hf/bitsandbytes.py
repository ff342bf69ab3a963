"""bitsandbytes 4-bit checkpoints, read and written byte for byte.

One weight: :func:`to_bitsandbytes` / :func:`from_bitsandbytes` turn a
:class:`jpeft.quant.NF4Weight` into a bitsandbytes ``Linear4bit``'s state-dict entries and
back. A model: :func:`from_pretrained_4bit` loads a transformers + bitsandbytes 4-bit folder
(e.g. a Hub ``*-bnb-4bit`` model) straight into NF4 nodes, and :func:`save_pretrained_4bit`
writes one that transformers loads as ``Linear4bit`` modules with the same bytes. Both follow
the model's one HF layout (:meth:`jpeft.models.DecoderLM.hf_layout`).

Example::

    model, params = jpeft.hf.bitsandbytes.from_pretrained_4bit("SmolLM2-135M-bnb-4bit")
    jpeft.hf.bitsandbytes.save_pretrained_4bit(model, params, "out/bnb", config=config)
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import models, tree
from jpeft import targets as targeting
from jpeft.hf import checkpoints
from jpeft.models import decoder, hf_layout
from jpeft.quant import nf4

WEIGHTS_FILE = "model.safetensors"
_STATE_KEY = re.compile(r"^(?P<module>.+)\.weight\.quant_state\.bitsandbytes__(?:nf4|fp4)$")


def from_pretrained_4bit(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    compute_dtype: Any = None,
    **model_options: Any,
) -> tuple[decoder.DecoderLM, dict]:
    """Loads a bitsandbytes 4-bit checkpoint folder (e.g. a Hub ``*-bnb-4bit`` model) with
    its quantised weights straight into NF4 nodes: no dequantise/requantise round.

    The folder holds ``config.json`` with a bitsandbytes ``quantization_config`` and
    safetensors where each quantised module ``M`` has ``M.weight`` (packed codes),
    ``M.weight.absmax``, ``M.weight.quant_map``, with double quantisation
    ``M.weight.nested_absmax`` and ``M.weight.nested_quant_map``, and
    ``M.weight.quant_state.bitsandbytes__nf4`` (the JSON of the remaining fields).

    Args:
      path: the folder (as transformers' ``save_pretrained`` writes it).
      dtype: dtype of the weights that are not quantised (embeddings, norms, head).
      compute_dtype: overrides the checkpoint's ``bnb_4bit_compute_dtype`` (whose default,
        when unset, is each weight's stored dtype).
      **model_options: model fields such as ``remat``.

    Returns:
      ``(model, params)`` with :class:`jpeft.quant.NF4Weight` nodes, stacked per layer.

    Raises:
      CheckpointError: a folder that is not a bitsandbytes 4-bit checkpoint of a supported
        model, missing, unexpected or mis-shaped tensors, a corrupt quant_state, or a
        stacked module quantised in some layers only or with different settings.
    """
    path = Path(path)
    config, tensors = checkpoints.read_folder(path)
    settings = _quantization_config(config, path)
    if compute_dtype is None:
        compute_dtype = settings.get("bnb_4bit_compute_dtype")
    model = models.from_config(config, **model_options)
    states, dense = _split_quantised(tensors)
    used: set[str] = set()

    def load(name: str, shape: tuple[int, ...], transposed: bool) -> Any:
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in states:
            used.add(module)
            try:
                node = from_bitsandbytes(states[module], compute_dtype=compute_dtype, name=module)
            except ValueError as err:
                raise checkpoints.CheckpointError(f"{path}: {err}") from None
            want = tuple(reversed(shape)) if transposed else tuple(shape)  # jpeft [in, out]
            if node.shape != want:
                raise checkpoints.CheckpointError(
                    f"{path}: {module} is quantised with shape {list(reversed(node.shape))} "
                    f"[out, in], but the config gives {list(reversed(want))}"
                )
            return node
        if name not in dense:
            raise checkpoints.CheckpointError(f"{path} lacks the tensor {name}")
        used.add(name)
        if tuple(dense[name].shape) != tuple(shape):
            raise checkpoints.CheckpointError(
                f"tensor {name} in {path} has shape {tuple(dense[name].shape)}, expected "
                f"{tuple(shape)} from the config"
            )
        return dense[name]

    params: dict = {}
    for hf_name, path_keys, layers, transposed, shape in model.hf_layout():
        if layers is None:
            value = load(hf_name, shape, transposed)
        else:
            value = _stack(
                [load(hf_name.format(i), shape, transposed) for i in layers],
                hf_name.format("*"),
                path,
            )
        if not isinstance(value, nf4.NF4Weight):
            value = hf_layout.to_jax(value, transposed, dtype)
        tree.set_path(params, path_keys, value)
    unexpected = sorted(
        (set(states) - used)
        | {name for name in dense if name not in used and not model.is_hf_extra(name)}
    )
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise checkpoints.CheckpointError(
            f"{path} has tensors that a {config.get('model_type')} model with this config does "
            f"not use: {unexpected[:5]}{more}"
        )
    return model, params


def save_pretrained_4bit(
    model: decoder.DecoderLM, params: dict, folder: str | os.PathLike, *, config: dict
) -> None:
    """Writes a tree with NF4 nodes as a transformers + bitsandbytes 4-bit checkpoint.

    ``folder/config.json`` is `config` with a bitsandbytes ``quantization_config`` (quant
    type, double quantisation and compute dtype of the nodes, and the linear modules left
    unquantised as ``llm_int8_skip_modules``); ``folder/model.safetensors`` holds each
    quantised module's entries in bitsandbytes' layout (see
    :func:`jpeft.quant.nf4.to_bitsandbytes`) and every other weight in Hugging Face's
    layout. ``AutoModelForCausalLM.from_pretrained(folder)`` loads it as ``Linear4bit``
    modules with the same bytes, and :func:`from_pretrained_4bit` loads it back exactly.

    Args:
      model: the model the tree belongs to.
      params: its tree, with arrays and :class:`jpeft.quant.NF4Weight` nodes only (merge
        adapters first, e.g. ``merge(params, requantize=True)``).
      folder: the output folder (created if needed).
      config: the model's ``config.json`` dict (e.g.
        :func:`jpeft.hf.checkpoints.read_config` of the folder it was loaded from).

    Raises:
      ValueError: a tree with other nodes (adapters), no NF4 node, or NF4 nodes whose
        quant type, double quantisation or compute dtype differ (one
        ``quantization_config`` describes them all).
    """
    tensors: dict[str, np.ndarray] = {}
    nodes: list[nf4.NF4Weight] = []
    for hf_name, path_keys, layers, transposed, _ in model.hf_layout():
        value = tree.get_path(params, path_keys)
        if isinstance(value, tree.Node) and not isinstance(value, nf4.NF4Weight):
            raise ValueError(
                f"{'.'.join(path_keys)} is a {type(value).__name__}: merge adapters first "
                "(jpeft.qlora.merge(params, requantize=True) keeps the base in 4 bits)"
            )
        for i in [None] if layers is None else layers:
            hf = hf_name if i is None else hf_name.format(i)
            if isinstance(value, nf4.NF4Weight):
                node = value if i is None else jax.tree.map(lambda a, i=i: a[i], value)
                nodes.append(node)
                module = hf.removesuffix(".weight")
                for key, array in to_bitsandbytes(node).items():
                    tensors[f"{module}.{key}"] = array
            else:
                array = np.asarray(value if i is None else value[i])
                if transposed:
                    array = np.swapaxes(array, -1, -2)
                tensors[hf] = np.ascontiguousarray(array)
    settings = {(n.quant_type, n.double_quant, n.compute_dtype.name) for n in nodes}
    if len(settings) != 1:
        raise ValueError(
            "save_pretrained_4bit needs NF4 nodes that share quant_type, double_quant and "
            f"compute_dtype (one quantization_config), found {sorted(settings) or 'none'}"
        )
    ((quant_type, double_quant, compute_dtype),) = settings
    linear = [
        name
        for module in targeting.modules(params)
        if not isinstance(module.weight, nf4.NF4Weight) and module.is_linear
        for name in module.names
    ]
    head = ".".join(model.head_path)
    config = dict(config)
    config["quantization_config"] = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": sorted(set(linear) | {head}),
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    checkpoints.write_safetensors(tensors, folder / WEIGHTS_FILE)


def _quantization_config(config: dict, path: Path) -> dict:
    settings = config.get("quantization_config")
    if not isinstance(settings, dict):
        raise checkpoints.CheckpointError(
            f"{path}/config.json has no quantization_config: not a bitsandbytes 4-bit "
            "checkpoint (load a plain one with jpeft.models.from_pretrained)"
        )
    method = settings.get("quant_method")
    if method != "bitsandbytes" or not settings.get("load_in_4bit"):
        raise checkpoints.CheckpointError(
            f"{path}: quantization_config is quant_method {method!r} with load_in_4bit "
            f"{settings.get('load_in_4bit')!r}; expected 'bitsandbytes' with load_in_4bit true"
        )
    return settings


def _split_quantised(
    tensors: dict[str, np.ndarray],
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """``({module: {"weight...": array}}, {name: array})``: the bitsandbytes entries of each
    quantised module (those with a ``weight.quant_state.*`` entry), and the other tensors."""
    states: dict[str, dict[str, np.ndarray]] = {
        match["module"]: {} for match in map(_STATE_KEY.match, tensors) if match
    }
    dense = {}
    for name, array in tensors.items():
        module, _, rest = name.rpartition(".weight")
        if module in states:
            states[module]["weight" + rest] = array
        else:
            dense[name] = array
    return states, dense


def _stack(values: list[Any], name: str, path: Path) -> Any:
    """One stacked entry from per-layer arrays or per-layer NF4 nodes."""
    quantised = [isinstance(v, nf4.NF4Weight) for v in values]
    if not any(quantised):
        return np.stack(values)
    if not all(quantised):
        raise checkpoints.CheckpointError(
            f"{path}: {name} is quantised in layers "
            f"{[i for i, q in enumerate(quantised) if q]} only; jpeft stacks layers and needs "
            "all of them quantised or none"
        )
    if len({jax.tree.structure(v) for v in values}) != 1:
        raise checkpoints.CheckpointError(
            f"{path}: the layers of {name} are quantised with different settings "
            "(block size, quant type, dtype or double quantisation); jpeft stacks them and "
            "needs one"
        )
    return jax.tree.map(lambda *arrays: jnp.stack(arrays), *values)


def to_bitsandbytes(node: nf4.NF4Weight) -> dict[str, np.ndarray]:
    """The state-dict entries of a bitsandbytes ``Linear4bit`` weight (without bias).

    Keys are relative to the module: ``weight`` (``[(in·out + 1) // 2, 1]`` uint8),
    ``weight.absmax``, ``weight.quant_map``, with double quantisation
    ``weight.nested_absmax`` and ``weight.nested_quant_map``, and
    ``weight.quant_state.bitsandbytes__<quant_type>``: the JSON of the non-tensor fields
    as uint8 bytes (``quant_type``, ``blocksize``, ``dtype``, ``shape`` ``[out, in]`` and
    the ``nested_*`` fields).

    Args:
      node: a single (not stacked) :class:`NF4Weight`.

    Returns:
      ``{key: numpy array}``, ready to prefix with the module name and save.

    Raises:
      ValueError: a stacked node (write each layer on its own).
    """
    if jnp.ndim(node.codes) != 1:
        raise ValueError(
            "to_bitsandbytes takes one layer's weight, got a node stacked over "
            f"{jnp.shape(node.codes)[:-1]}"
        )
    fan_in, fan_out = node.shape
    state = {
        "quant_type": node.quant_type,
        "blocksize": node.block_size,
        "dtype": node.dtype.name,
        "shape": [fan_out, fan_in],
    }
    out = {
        "weight": np.asarray(node.codes).reshape(-1, 1),
        "weight.absmax": np.asarray(node.absmax),
        "weight.quant_map": nf4.TABLES[node.quant_type].copy(),
    }
    if node.double_quant:
        out["weight.nested_absmax"] = np.asarray(node.nested_absmax)
        out["weight.nested_quant_map"] = np.asarray(node.nested_map)
        state.update(
            nested_blocksize=nf4.NESTED_BLOCK_SIZE,
            nested_dtype="float32",
            nested_offset=float(node.nested_offset),
        )
    out[f"weight.quant_state.bitsandbytes__{node.quant_type}"] = np.frombuffer(
        json.dumps(state).encode(), np.uint8
    ).copy()
    return out


def from_bitsandbytes(
    tensors: Mapping[str, Any], *, compute_dtype: Any = None, name: str = "weight"
) -> nf4.NF4Weight:
    """An :class:`NF4Weight` from a bitsandbytes ``Linear4bit``'s state-dict entries, with
    no dequantise/requantise round.

    Args:
      tensors: the entries :func:`to_bitsandbytes` describes, as numpy arrays or torch
        tensors' ``.numpy()`` (a ``weight`` stored in another ``quant_storage`` dtype is
        read as its bytes).
      compute_dtype: the compute dtype; defaults to the stored ``dtype``.
      name: the module name, for error messages.

    Returns:
      A single (not stacked) :class:`NF4Weight` holding the stored bytes as they are.

    Raises:
      ValueError: a missing or unexpected entry, a quant_state that is not valid JSON or
        lacks a field, unsupported settings, or arrays whose sizes do not fit the shape.
    """
    keys = set(tensors)
    state_keys = [k for k in keys if k.startswith("weight.quant_state.")]
    if len(state_keys) != 1:
        raise ValueError(
            f"{name}: expected exactly one weight.quant_state.bitsandbytes__<nf4|fp4> entry, "
            f"found {sorted(state_keys)}"
        )
    (state_key,) = state_keys
    state = _read_state(np.asarray(tensors[state_key]), f"{name}.{state_key}")
    quant_type = state["quant_type"]
    if state_key != f"weight.quant_state.bitsandbytes__{quant_type}":
        raise ValueError(
            f"{name}: {state_key} holds quant_type {quant_type!r}, which its name contradicts"
        )
    block_size = state["blocksize"]
    nf4.check_options(block_size, quant_type)
    dtype = nf4.float_dtype(state["dtype"], f"{name}: quant_state dtype")
    out_features, in_features = _shape(state["shape"], name)
    nested = "nested_offset" in state
    expected = {"weight", "weight.absmax", "weight.quant_map", state_key}
    if nested:
        expected |= {"weight.nested_absmax", "weight.nested_quant_map"}
    if keys != expected:
        raise ValueError(
            f"{name}: bitsandbytes entries {sorted(keys)} do not match a "
            f"{'double-' if nested else ''}quantised weight, expected {sorted(expected)}"
        )
    n = in_features * out_features
    blocks = math.ceil(n / block_size)
    codes = np.ascontiguousarray(tensors["weight"]).view(np.uint8).reshape(-1)
    quant_map = np.asarray(tensors["weight.quant_map"], np.float32)
    if quant_map.shape != (16,) or not np.array_equal(quant_map, nf4.TABLES[quant_type]):
        raise ValueError(f"{name}: weight.quant_map is not bitsandbytes' {quant_type} table")
    arrays = {
        "codes": _sized(codes, (n + 1) // 2, np.uint8, f"{name}.weight"),
        "absmax": _sized(
            tensors["weight.absmax"],
            blocks,
            np.uint8 if nested else np.float32,
            f"{name}.weight.absmax",
        ),
    }
    if nested:
        if state.get("nested_blocksize") != nf4.NESTED_BLOCK_SIZE:
            raise ValueError(
                f"{name}: nested_blocksize {state.get('nested_blocksize')!r} is not supported; "
                f"expected {nf4.NESTED_BLOCK_SIZE}, the value bitsandbytes writes"
            )
        if state.get("nested_dtype") != "float32":
            raise ValueError(
                f"{name}: nested_dtype {state.get('nested_dtype')!r} is not supported; "
                "expected 'float32'"
            )
        arrays["nested_absmax"] = _sized(
            tensors["weight.nested_absmax"],
            math.ceil(blocks / nf4.NESTED_BLOCK_SIZE),
            np.float32,
            f"{name}.weight.nested_absmax",
        )
        arrays["nested_map"] = _sized(
            tensors["weight.nested_quant_map"],
            256,
            np.float32,
            f"{name}.weight.nested_quant_map",
        )
        try:
            arrays["nested_offset"] = np.float32(state["nested_offset"])
        except (TypeError, ValueError):
            raise ValueError(
                f"{name}: nested_offset {state['nested_offset']!r} is not a number"
            ) from None
    return nf4.NF4Weight(
        shape=(in_features, out_features),
        block_size=block_size,
        quant_type=quant_type,
        dtype=dtype,
        compute_dtype=nf4.float_dtype(dtype if compute_dtype is None else compute_dtype),
        **{k: jnp.asarray(v) for k, v in arrays.items()},
    )


def _read_state(raw: np.ndarray, where: str) -> dict:
    try:
        state = json.loads(raw.astype(np.uint8).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{where} is not valid quant_state JSON: {err}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{where} is not a JSON object: {state!r}")
    missing = [k for k in ("quant_type", "blocksize", "dtype", "shape") if k not in state]
    if missing:
        raise ValueError(f"{where} lacks the quant_state fields {missing}")
    return state


def _shape(shape: Any, name: str) -> tuple[int, int]:
    if (
        not isinstance(shape, (list, tuple))
        or len(shape) != 2
        or not all(isinstance(d, int) and d > 0 for d in shape)
    ):
        raise ValueError(f"{name}: quant_state shape {shape!r} is not [out_features, in_features]")
    return shape[0], shape[1]


def _sized(array: Any, size: int, dtype: Any, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.size != size or array.dtype != dtype:
        raise ValueError(
            f"{name} has {array.size} {array.dtype} elements, expected {size} {np.dtype(dtype)} "
            "for the quant_state shape and blocksize"
        )
    return array.reshape(-1)
