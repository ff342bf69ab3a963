"""AdapterHub's bottleneck-adapter folders (``adapters`` 1.x ``save_adapter``/``load_adapter``).

A folder holds:

- ``adapter_config.json``: ``{"config": {BnConfig fields}, "name", "model_type",
  "hidden_size", "model_class", "model_name", "version"}`` (not PEFT's schema, though the
  file has the same name);
- ``adapter.safetensors`` (``save_adapter(..., use_safetensors=True)``) or
  ``pytorch_adapter.bin`` (the default: a torch pickle, read only where torch is installed),
  with, for layer ``i``, placement module ``attention_adapters`` (``mh_adapter``) or
  ``output_adapters`` (``output_adapter``) and adapter name ``n``::

      <layers>.<i>.<module>.adapters.<n>.adapter_down.0.weight   [m, d]  (jpeft's D, transposed)
      <layers>.<i>.<module>.adapters.<n>.adapter_down.0.bias     [m]
      <layers>.<i>.<module>.adapters.<n>.adapter_up.weight       [d, m]  (jpeft's U, transposed)
      <layers>.<i>.<module>.adapters.<n>.adapter_up.bias         [d]
      <layers>.<i>.<module>.adapters.<n>.scaling                 [1] or [d] (learned scaling)

  where ``<layers>`` is the model's layer stack, ``model.layers`` (Llama) or
  ``transformer.h`` (GPT-2): the same as jpeft's ``layers_path``.

tests/fixtures/make_adapterhub_fixtures.py makes such folders with AdapterHub itself, and
checks that AdapterHub loads what :func:`export_adapterhub` writes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from jpeft import bottleneck, models, nn, tree
from jpeft.hf.checkpoints import CheckpointError, read_safetensors, write_safetensors

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter.safetensors"
TORCH_FILE = "pytorch_adapter.bin"
MODULES = {"mh_adapter": "attention_adapters", "output_adapter": "output_adapters"}
"""AdapterHub's module of each placement option, in a layer."""
_VERSION = "adapters.1.3.0"  # the release whose format is written
_MODEL_TYPES = ("llama", "gpt2")  # tried in turn to name the model family of an export
# BnConfig fields that only matter where an option jpeft refuses is on (phm_layer,
# inv_adapter), or only for a random init that the file's weights replace.
_IGNORED = frozenset(
    "factorized_phm_W shared_W_phm shared_phm_rule factorized_phm_rule phm_c_init "
    "phm_init_range learn_phm hypercomplex_nonlinearity phm_rank phm_bias phm_dim "
    "inv_adapter_reduction_factor init_weights_seed architecture".split()
)
_DROPPED = {"dropout": 0.0}  # acts in training only: an imported adapter trains on without it
# The node options one AdapterHub config sets for every adapter of the file.
_OPTIONS = (
    "non_linearity",
    "is_parallel",
    "original_ln_before",
    "original_ln_after",
    "residual_before_ln",
)


def import_adapterhub(base_params: dict, adapter_dir: str | os.PathLike, *, model=None) -> dict:
    """Reads an AdapterHub bottleneck adapter folder onto a base parameter tree.

    The adapter's ``dropout`` is dropped (it acts in training only, which jpeft's bottleneck
    adapters do not implement); every other option jpeft does not implement is refused.

    Args:
      base_params: the base model's tree (:func:`jpeft.models.from_pretrained`).
      adapter_dir: a folder written by AdapterHub's ``save_adapter`` (or
        :func:`export_adapterhub`).
      model: the base's jpeft model (or its class); by default the class of the file's
        ``model_type``.

    Returns:
      `base_params` with :class:`jpeft.bottleneck.BottleneckAdapter` nodes.

    Raises:
      CheckpointError: a missing or malformed file, an adapter that is not a bottleneck
        adapter or uses an option jpeft does not implement, a ``pytorch_adapter.bin``
        without torch installed, missing or unexpected tensors, or shapes that do not fit
        the base; each message names the file.
    """
    folder = Path(adapter_dir)
    meta = _read_meta(folder / CONFIG_FILE)
    config = _bn_config(meta["config"], folder / CONFIG_FILE)
    tensors, weights_path = _read_weights(folder)
    if model is None:
        try:
            model = models.model_class(meta.get("model_type"))
        except ValueError as err:
            raise CheckpointError(f"{folder / CONFIG_FILE}: {err}") from err
    used: set[str] = set()

    def take(key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in tensors:
            raise CheckpointError(f"{weights_path} lacks {key} that its config implies")
        value = np.asarray(tensors[key], np.float32)
        if value.shape != shape:
            raise CheckpointError(
                f"{weights_path}: {key} has shape {value.shape}, expected {shape}"
            )
        used.add(key)
        return value

    new = tree.copy_dicts(base_params)
    for option, path in bottleneck.placements(model, config).items():
        try:
            entry = tree.get_path(new, path)
        except (KeyError, TypeError):
            raise CheckpointError(f"{folder}: the base tree has no {'.'.join(path)}") from None
        layers, _, hidden = nn.shape(entry["weight"])
        units = max(1, int(hidden // config.reduction_factor))  # AdapterHub keeps >= 1 unit
        prefixes = [_prefix(model, i, option, meta["name"]) for i in range(layers)]
        arrays = {
            "down": [take(p + "adapter_down.0.weight", (units, hidden)).T for p in prefixes],
            "down_bias": [take(p + "adapter_down.0.bias", (units,)) for p in prefixes],
            "up": [take(p + "adapter_up.weight", (hidden, units)).T for p in prefixes],
            "up_bias": [take(p + "adapter_up.bias", (hidden,)) for p in prefixes],
        }
        if config.scaling in bottleneck.LEARNED_SCALINGS:
            size = 1 if config.scaling == "learned" else hidden
            arrays["learned_scaling"] = [take(p + "scaling", (size,)) for p in prefixes]
        stacked = {field: np.stack(values) for field, values in arrays.items()}
        entry["weight"] = bottleneck.make_node(entry["weight"], config, **stacked)
    unused = sorted(set(tensors) - used)
    if unused:
        raise CheckpointError(f"{weights_path} holds tensors its config does not imply: {unused}")
    return new


def export_adapterhub(
    params: dict,
    out_dir: str | os.PathLike,
    *,
    name: str = "bottleneck",
    model_type: str | None = None,
) -> Path:
    """Writes the bottleneck adapters of `params` as a folder that AdapterHub's
    ``load_adapter`` reads (``adapter_config.json`` and ``adapter.safetensors``).

    Args:
      params: a tree with :class:`jpeft.bottleneck.BottleneckAdapter` nodes (one config:
        the same options and width on every node).
      out_dir: the folder to write (created if missing).
      name: the adapter's name in AdapterHub.
      model_type: the ``model_type`` recorded; by default the first of ``llama`` and
        ``gpt2`` whose layout the nodes fit.

    Returns:
      The folder written.

    Raises:
      ValueError: no bottleneck adapter in `params`, nodes whose options or widths differ,
        or nodes where AdapterHub has no adapter.
    """
    nodes = {
        keys: x
        for keys, x in tree.iter_nodes(params)
        if isinstance(x, bottleneck.BottleneckAdapter)
    }
    if not nodes:
        raise ValueError("params hold no bottleneck adapter (apply jpeft.bottleneck first)")
    model_type, model = _model_of(set(nodes), model_type)
    placed = {option: nodes[path] for option, path in _node_paths(model).items() if path in nodes}
    config = _config_of(placed)
    tensors = {}
    for option, node in placed.items():
        for i in range(node.down.shape[0]):
            prefix = _prefix(model, i, option, name)
            tensors[prefix + "adapter_down.0.weight"] = np.asarray(node.down[i]).T
            tensors[prefix + "adapter_down.0.bias"] = np.asarray(node.down_bias[i])
            tensors[prefix + "adapter_up.weight"] = np.asarray(node.up[i]).T
            tensors[prefix + "adapter_up.bias"] = np.asarray(node.up_bias[i])
            if node.learned_scaling is not None:
                tensors[prefix + "scaling"] = np.asarray(node.learned_scaling[i])
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "config": json.loads(json.dumps(dataclasses.asdict(config))),  # tuples as lists
        "hidden_size": next(iter(placed.values())).up.shape[-1],
        "model_class": None,
        "model_name": "",
        "model_type": model_type,
        "name": name,
        "version": _VERSION,
    }
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    tensors = {k: v.astype(np.float32) for k, v in tensors.items()}
    write_safetensors(tensors, folder / SAFETENSORS_FILE)
    return folder


def _read_meta(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; expected an AdapterHub adapter folder")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict) or "name" not in meta:
        raise CheckpointError(
            f"{path} has no 'config' and 'name': not an AdapterHub adapter config (a PEFT "
            "adapter folder? read it with jpeft.hf.import_peft)"
        )
    return meta


def _bn_config(fields: dict, path: Path) -> bottleneck.BnConfig:
    """The :class:`jpeft.bottleneck.BnConfig` of an AdapterHub config dict."""
    if fields.get("architecture") not in (None, "bottleneck"):
        raise CheckpointError(
            f"{path} holds a {fields['architecture']!r} adapter; jpeft reads AdapterHub's "
            "bottleneck adapters only"
        )
    known = {f.name for f in dataclasses.fields(bottleneck.BnConfig)}
    unknown = set(fields) - known - _IGNORED
    if unknown:
        raise CheckpointError(f"{path}: BnConfig fields jpeft does not know: {sorted(unknown)}")
    try:
        return bottleneck.BnConfig(**{k: v for k, v in fields.items() if k in known} | _DROPPED)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from err


def _read_weights(folder: Path) -> tuple[dict[str, Any], Path]:
    """The tensors of the folder's weights file, and that file."""
    if (folder / SAFETENSORS_FILE).is_file():
        return read_safetensors(folder / SAFETENSORS_FILE), folder / SAFETENSORS_FILE
    path = folder / TORCH_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} has neither {SAFETENSORS_FILE} nor {TORCH_FILE}")
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path} is a torch pickle, and reading it needs torch, which is not installed: "
            "install torch, or save the adapter with save_adapter(..., use_safetensors=True)"
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds on a damaged pickle
        raise CheckpointError(f"{path} cannot be read: {type(err).__name__}: {err}") from err
    return {k: v.float().numpy() for k, v in state.items()}, path


def _prefix(model: Any, layer: int, option: str, name: str) -> str:
    """``model.layers.3.output_adapters.adapters.NAME.``: where AdapterHub keeps a layer's
    adapter of placement `option`."""
    return f"{'.'.join(model.layers_path)}.{layer}.{MODULES[option]}.adapters.{name}."


def _node_paths(model: Any) -> dict[str, tuple]:
    """``{option: tree keys of the weight its adapter wraps}`` for a model class."""
    return {option: path + ("weight",) for option, path in bottleneck.placements(model).items()}


def _model_of(keys: set[tuple], model_type: str | None) -> tuple[str, Any]:
    """``(model_type, model class)`` of the tree whose adapters sit at `keys`."""
    for candidate in (model_type,) if model_type else _MODEL_TYPES:
        model = models.model_class(candidate)
        if keys <= set(_node_paths(model).values()):
            return candidate, model
    raise ValueError(
        f"bottleneck adapters at {sorted('.'.join(map(str, k)) for k in keys)}: AdapterHub has "
        f"adapters only after a layer's attention and MLP ({', '.join(_MODEL_TYPES)} layouts)"
    )


def _config_of(placed: dict[str, bottleneck.BottleneckAdapter]) -> bottleneck.BnConfig:
    """The one :class:`jpeft.bottleneck.BnConfig` that the nodes of `placed` follow.

    Raises:
      ValueError: the nodes' options or widths differ.
    """

    def options(node: bottleneck.BottleneckAdapter) -> tuple:
        learned = None if node.learned_scaling is None else node.learned_scaling.shape[-1]
        return (*(getattr(node, f) for f in _OPTIONS), node.scaling, learned, node.down.shape[-1])

    first = next(iter(placed.values()))
    if any(options(node) != options(first) for node in placed.values()):
        raise ValueError(
            "AdapterHub's config is one for all adapters, but the bottleneck adapters of "
            f"params differ: { ({k: options(v) for k, v in placed.items()}) }"
        )
    hidden, units = first.up.shape[-1], first.down.shape[-1]
    scaling: float | str = first.scaling
    if first.learned_scaling is not None:
        scaling = "learned" if first.learned_scaling.shape[-1] == 1 else "channel"
    return bottleneck.BnConfig(
        **{f: getattr(first, f) for f in _OPTIONS},
        mh_adapter="mh_adapter" in placed,
        output_adapter="output_adapter" in placed,
        reduction_factor=_reduction_factor(hidden, units),
        scaling=scaling,
    )


def _reduction_factor(hidden: int, units: int) -> float:
    """A factor for which AdapterHub's ``int(hidden // factor)`` is `units`."""
    if hidden % units == 0:
        return hidden // units
    factor = hidden / units
    while int(hidden // factor) < units:  # hidden / units rounded up: floor lands below
        factor = math.nextafter(factor, 0)
    return factor
