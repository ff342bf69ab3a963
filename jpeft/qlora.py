"""QLoRA (Dettmers et al., 2023): LoRA over a frozen base stored in 4 bits.

QLoRA is a composition of two pure functions: :func:`quantize` replaces the chosen linear
weights by :class:`jpeft.quant.NF4Weight` nodes, and :func:`jpeft.lora.apply` wraps them in
LoRA nodes. A layer then computes

    y = x @ dequant(W₄) + s · ((x @ A) @ B)

with ``dequant(W₄)`` formed inside the jitted step, one layer at a time under the layer
scan, in the compute dtype (bitsandbytes' ``bnb_4bit_compute_dtype``); only ``A`` and ``B``
train. The 4-bit layout is bitsandbytes', so checkpoints move both ways between jpeft and
transformers + bitsandbytes (:func:`from_pretrained_4bit`, :func:`save_pretrained_4bit`).

Example::

    model, params = jpeft.qlora.from_pretrained(path)     # quantised while it loads
    # or: params = jpeft.qlora.quantize(params) on a tree already loaded
    params = jpeft.lora.apply(params, rank=16, targets="all-linear", key=jax.random.key(0))
    ...                                                   # train as with LoRA
    merged = jpeft.qlora.merge(params)                    # dense, compute dtype
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from jpeft import lora, models, nn, tree
from jpeft import targets as targeting
from jpeft.hf import checkpoints
from jpeft.models import decoder, hf_layout
from jpeft.quant import nf4

WEIGHTS_FILE = "model.safetensors"
_STATE_KEY = re.compile(r"^(?P<module>.+)\.weight\.quant_state\.bitsandbytes__(?:nf4|fp4)$")


def quantize(
    params: dict,
    *,
    targets: str | Sequence[str] | None = None,
    block_size: int = 64,
    double_quant: bool = True,
    quant_type: str = "nf4",
    compute_dtype: Any = jnp.bfloat16,
) -> dict:
    """Quantises the linear weights of a parameter tree to bitsandbytes 4-bit nodes.

    Each chosen weight ``[in, out]`` (or stacked ``[l, in, out]``, each layer quantised on
    its own) becomes an :class:`jpeft.quant.NF4Weight` (see :func:`jpeft.quant.nf4.quantize`):
    about ``0.5`` byte per parameter plus the block scales. Options are
    transformers' ``BitsAndBytesConfig`` ones.

    Args:
      params: a parameter tree (a jpeft model's, or any nested dict of ``weight`` arrays).
      targets: which modules, as LoRA's ``target_modules`` (names, a full-match regex or
        ``"all-linear"``); None: every linear layer except the output head (embeddings and
        norms are never quantised), as transformers does.
      block_size: elements per block (``64``; one of :data:`jpeft.quant.nf4.BLOCK_SIZES`).
      double_quant: quantise the block scales too (``bnb_4bit_use_double_quant``).
      quant_type: ``"nf4"`` or ``"fp4"`` (``bnb_4bit_quant_type``).
      compute_dtype: dtype of the matmuls with the dequantised weights
        (``bnb_4bit_compute_dtype``).

    Returns:
      The same tree with NF4 nodes in place of the chosen weights.

    Raises:
      ValueError: targets that match nothing or a non-linear module, a stacked module
        matched in some layers only, a weight that is already a node (quantise before
        applying LoRA), or an option bitsandbytes does not accept.

    Example::

      params = jpeft.qlora.quantize(params, targets=["q_proj", "v_proj"])
    """
    chosen = targeting.select(params, targeting.ALL_LINEAR if targets is None else targets)
    new = tree.copy_dicts(params)
    for module, layers in chosen:
        if len(layers) != len(module.names):
            raise ValueError(
                f"targets {targets!r} match layers {list(layers)} of the stacked module "
                f"{module.names[0]} (of {len(module.names)}); jpeft quantises whole stacked "
                "modules"
            )
        if isinstance(module.weight, tree.Node):
            raise ValueError(
                f"{module.names[0]} is already a {type(module.weight).__name__}; quantise the "
                "plain weights, then apply LoRA"
            )
        entry = tree.get_path(new, module.path)
        entry[module.weight_key] = nf4.quantize(
            module.weight,
            block_size=block_size,
            double_quant=double_quant,
            quant_type=quant_type,
            compute_dtype=compute_dtype,
        )
    return new


def from_pretrained(
    path: str | os.PathLike,
    *,
    targets: str | Sequence[str] | None = None,
    dtype: Any = jnp.float32,
    block_size: int = 64,
    double_quant: bool = True,
    quant_type: str = "nf4",
    compute_dtype: Any = jnp.bfloat16,
    **model_options: Any,
) -> tuple[decoder.DecoderLM, dict]:
    """Loads a float checkpoint (folder or GGUF, as :func:`jpeft.models.from_pretrained`)
    and quantises it while loading: each weight is quantised as soon as it is read, so the
    host holds the quantised model plus one float weight, never the whole float model (as
    transformers does with a ``BitsAndBytesConfig``).

    The result equals ``quantize(jpeft.models.from_pretrained(path, dtype=dtype)[1], ...)``.

    Args:
      path: the model folder or ``.gguf`` file.
      targets, block_size, double_quant, quant_type, compute_dtype: as :func:`quantize`.
      dtype: dtype of the weights before quantisation and of those left unquantised.
      **model_options: model fields such as ``remat``.

    Raises:
      ValueError: targets that match nothing, or as :func:`quantize`.
      CheckpointError: as :func:`jpeft.models.from_pretrained`.
    """
    wanted = targeting.ALL_LINEAR if targets is None else targets
    quantize_chosen = functools.partial(
        quantize,
        targets=targets,
        block_size=block_size,
        double_quant=double_quant,
        quant_type=quant_type,
        compute_dtype=compute_dtype,
    )
    quantised: list[tuple[str, ...]] = []

    def quantize_if_targeted(leaf_path: tuple[str, ...], leaf: jax.Array) -> Any:
        single: dict = {}
        tree.set_path(single, leaf_path, leaf)
        if not targeting.select(single, wanted, required=False):
            return leaf
        quantised.append(leaf_path)
        return tree.get_path(quantize_chosen(single), leaf_path)

    model, params = models.from_pretrained(
        path, dtype=dtype, transform=quantize_if_targeted, **model_options
    )
    if not quantised:
        targeting.select(params, wanted)  # raises, naming the modules of the tree
    return model, params


def merge(params: dict, *, requantize: bool = False, dtype: Any = None) -> dict:
    """Folds LoRA adapters into their dequantised 4-bit base: a tree for serving.

    For a LoRA node over an NF4 weight, the merged weight is

        W' = dequant(W₄) + s · A @ B

    summed in float32 and stored in `dtype`: exactly the function the adapter was trained
    with, up to the rounding of ``W'`` to `dtype`. Unadapted NF4 weights are dequantised,
    other adapters merged as :func:`jpeft.lora.merge` does (which, over NF4 bases, gives
    the same tree as ``merge(params)`` with the defaults).

    Merge into ``dequant(W₄)``, never into the original 16-bit weights ``W₁₆``: the adapter
    learnt to correct the base it saw, ``W₁₆ + q`` with ``q`` the quantisation error, so
    ``W₁₆ + s·A@B`` differs from the trained model by ``-q``. ``q`` is often much larger
    than the update ``s·A@B`` itself (unsloth-zoo PR#810 found it 10-150× per layer on
    Falcon-H1, whose merged 16-bit exports were broken by it; artidoro/qlora#28 and #254
    give the same advice). Re-quantising the merged weight (`requantize`, what PEFT's
    ``Linear4bit.merge`` does) adds a fresh quantisation error of the same size as ``q``,
    so its generations differ from the unmerged model's (peft#2321): prefer a 16-bit merge
    for serving, and re-quantise only to keep the 4-bit footprint.

    Args:
      params: a tree with LoRA nodes (over NF4 or plain weights) and/or NF4 nodes.
      requantize: quantise each merged NF4-based weight again with its node's settings,
        and leave unadapted NF4 weights quantised.
      dtype: dtype of merged and dequantised NF4-based weights; defaults to each NF4
        node's compute dtype.

    Returns:
      A tree of arrays (and of NF4 nodes with `requantize`).

    Example::

      served = jpeft.qlora.merge(params, dtype=jnp.bfloat16)
      jpeft.qlora.save_pretrained_4bit(model, jpeft.qlora.merge(params, requantize=True),
                                       "out/merged-4bit", config=config)
    """

    def fold(_: str, value: Any) -> Any:
        base = value.w if isinstance(value, lora.LoraWeight) else value
        if not isinstance(base, nf4.NF4Weight):
            return nn.value(value) if isinstance(value, tree.Node) else value
        if base is value and requantize:
            return value
        target = jnp.dtype(base.compute_dtype if dtype is None else dtype)
        merged = nn.value(base).astype(jnp.float32)
        if base is not value:
            delta = jnp.einsum("...ir,...ro->...io", value.a, value.b)
            merged = merged + delta * value.scale[..., None, None]
        merged = merged.astype(target)
        if not requantize:
            return merged
        return nf4.quantize(
            merged,
            block_size=base.block_size,
            double_quant=base.double_quant,
            quant_type=base.quant_type,
            compute_dtype=base.compute_dtype,
        )

    return tree.map_nodes(fold, params)


# ----------------------------------------------------------------------------- checkpoints


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
                node = nf4.from_bitsandbytes(
                    states[module], compute_dtype=compute_dtype, name=module
                )
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
                for key, array in nf4.to_bitsandbytes(node).items():
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
    safetensors.numpy.save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})


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
