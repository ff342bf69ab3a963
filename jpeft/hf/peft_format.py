"""Hugging Face PEFT adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors``.

The format (peft 0.21, ``get_peft_model_state_dict``):

- keys are ``base_model.model.<HF module name>.lora_A.weight`` ``[r, in]`` and
  ``...lora_B.weight`` ``[out, r]`` (jpeft's ``a [in, r]`` and ``b [r, out]`` transposed, for
  Linear and GPT-2 Conv1D alike); DoRA (``use_dora: true``) adds
  ``...lora_magnitude_vector`` ``[out]`` (jpeft's ``magnitude``); trained biases are
  ``<module>.base_layer.bias`` on adapted modules and ``<module>.bias`` elsewhere;
  ``modules_to_save`` weights are ``<module>.weight``;
- tensors are float32 with safetensors metadata ``{"format": "pt"}`` (jpeft adds each
  tensor's digest, checked on import: :func:`jpeft.hf.checkpoints.write_safetensors`);
- the config is peft's ``LoraConfig.to_dict()``, sorted, with ``inference_mode: true``.

Methods other than LoRA convert themselves (:class:`jpeft.methods.Method`'s ``to_peft`` and
``from_peft``, e.g. prompt and prefix tuning's ``prompt_embeddings``, IA3's ``ia3_l``); this
module writes and reads their folders the same way, choosing the method by ``peft_type`` on
import, and adds the ``modules_to_save`` weights of any method itself.

LoRA's config, to and from :class:`jpeft.lora.LoraConfig`, is :mod:`jpeft.hf.peft_lora_config`.
"""

from __future__ import annotations

import collections
import collections.abc
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import dora, lora, methods, tree
from jpeft import targets as targeting
from jpeft.hf import peft_lora_config
from jpeft.hf.checkpoints import CheckpointError, read_safetensors, write_safetensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # of every module's key in a PEFT adapter file
PEFT_FORMAT_VERSION = "0.21.2"  # the peft release whose LoraConfig fields are written


def export_peft(
    params: dict,
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    adapter_name: str = "default",
    task_type: str | None = "CAUSAL_LM",
) -> Path:
    """Writes the adapter of `params` as a Hugging Face PEFT adapter folder.

    Args:
      params: a tree with :class:`jpeft.lora.LoraWeight` nodes, or all of them
        :class:`jpeft.dora.DoraWeight` (and optional trained biases or ``modules_to_save``
        weights), or the adapter of another method PEFT has (a soft prompt, a prefix, IA3
        vectors, with optional ``modules_to_save`` weights).
      out_dir: the folder to write; a non-default `adapter_name` goes in a sub-folder, as
        ``PeftModel.save_pretrained`` does.
      base_model_name_or_path: recorded in the config for ``PeftModel.from_pretrained``.
      task_type: peft's ``task_type``.

    Returns:
      The folder holding the two files.

    Raises:
      ValueError: the tree holds no adapter PEFT can read, or LoRA nodes that one config
        cannot describe (different dropouts, rsLoRA or DoRA on some nodes only).
    """
    folder = Path(out_dir) if adapter_name == "default" else Path(out_dir) / adapter_name
    common = {
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "peft_version": peft_lora_config.PEFT_FORMAT_VERSION,
        "revision": None,
        "task_type": task_type,
    }
    adapted, trained = _adapter_entries(params)
    found = {m.title: m.to_peft(params) for m in methods.all_methods() if m.to_peft is not None}
    found = {title: x for title, x in found.items() if x is not None}
    if len(found) + bool(adapted) > 1:
        held = sorted(found) + (["LoRA"] if adapted else [])
        raise ValueError(
            f"params hold adapters of {held}; a PEFT adapter folder holds one method: "
            "export each from a tree of its own"
        )
    if found:
        ((title, (config, tensors)),) = found.items()
        tensors = dict(tensors)
        modules_to_save, bias_modes = _add_trained(tensors, trained, lora_modules=set())
        if bias_modes:
            raise ValueError(f"a {title} PEFT adapter has no place for trained biases")
        return _write(
            folder, {**common, "modules_to_save": modules_to_save or None, **config}, tensors
        )
    if not adapted:
        raise ValueError(
            "params hold no adapter to export (apply jpeft.lora, jpeft.prompt_tuning, "
            "jpeft.prefix_tuning or jpeft.ia3 first; bottleneck adapters, which PEFT does not "
            "have, go to AdapterHub's format with jpeft.hf.export_adapterhub)"
        )
    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    dropouts, rslora, use_dora, layer_sets = set(), set(), set(), set()
    for module, node in adapted:
        layers = node.layers if node.layers is not None else range(len(module.names))
        a, b = np.asarray(node.a, np.float32), np.asarray(node.b, np.float32)
        magnitude = _magnitude(node)
        node_alphas = np.asarray(node.alphas(), np.float64).reshape(-1)
        for i in layers:
            name = module.names[i]
            index = (i,) if module.stacked else ()
            tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a[index].T)
            tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b[index].T)
            if magnitude is not None:
                tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = magnitude[index]
            ranks[name] = node.rank
            alphas[name] = float(node_alphas[i if module.stacked else 0])
        dropouts.add(node.dropout)
        rslora.add(node.rslora)
        use_dora.add(magnitude is not None)
        layer_sets.add(None if node.layers is None else tuple(node.layers))
    if len(dropouts) > 1 or len(rslora) > 1 or len(use_dora) > 1:
        raise ValueError(
            "adapters with different lora_dropout, use_rslora or use_dora cannot share one "
            "adapter_config.json"
        )
    lora_modules = {".".join(map(str, m.path)) for m, _ in adapted}
    modules_to_save, bias_modes = _add_trained(tensors, trained, lora_modules)
    all_modules = targeting.modules(params)
    target_modules, layers_to_transform = peft_lora_config.select_exactly(
        adapted, all_modules, layer_sets
    )
    r, rank_pattern = peft_lora_config.most_common_with_exceptions(ranks, adapted, all_modules)
    alpha, alpha_pattern = peft_lora_config.most_common_with_exceptions(
        alphas, adapted, all_modules
    )
    config = peft_lora_config.peft_defaults()
    config.update(
        r=r,
        lora_alpha=peft_lora_config.number(alpha),
        rank_pattern=rank_pattern,
        alpha_pattern={k: peft_lora_config.number(v) for k, v in alpha_pattern.items()},
        target_modules=target_modules,
        layers_to_transform=layers_to_transform,
        lora_dropout=dropouts.pop(),
        use_rslora=rslora.pop(),
        use_dora=use_dora.pop(),
        bias="all" if "all" in bias_modes else ("lora_only" if bias_modes else "none"),
        modules_to_save=modules_to_save or None,
        fan_in_fan_out=fan_in_fan_out(m for m, _ in adapted),
        **common,
    )
    return _write(folder, config, tensors)


def _add_trained(tensors: dict, trained, lora_modules: set[str]) -> tuple[list[str], set[str]]:
    """Adds the weights trained in full to `tensors` under PEFT's keys; returns the
    ``modules_to_save`` names and the bias modes (``"all"``, ``"lora_only"``) they imply."""
    modules_to_save, bias_modes = [], set()
    for module, leaf, node in trained:
        key, value = ".".join(map(str, module.path)), node.w
        for name in module.names:
            if leaf == "bias" and not node.copied:
                layer_name = f"{name}.base_layer.bias" if key in lora_modules else f"{name}.bias"
                tensors[PREFIX + layer_name] = _layer(value, module, name)
                bias_modes.add("lora_only" if key in lora_modules else "all")
            else:
                array = _layer(value, module, name)
                flip = leaf == module.weight_key and _torch_linear(module)
                tensors[f"{PREFIX}{name}.{leaf}"] = np.ascontiguousarray(array.T) if flip else array
        if node.copied and module.short_name not in modules_to_save:
            modules_to_save.append(module.short_name)
    return modules_to_save, bias_modes


def fan_in_fan_out(modules) -> bool:
    """PEFT's ``fan_in_fan_out`` for adapted `modules` (:class:`jpeft.targets.Module`): True
    where they are GPT-2's ``Conv1D`` layers, which store their weight ``[in, out]``."""
    return any(_conv1d(m) for m in modules)


def _conv1d(module: targeting.Module) -> bool:
    return module.short_name in ("c_attn", "c_proj", "c_fc")


def _torch_linear(module: targeting.Module) -> bool:
    """Whether PEFT holds `module`'s weight as torch's ``Linear`` does, ``[out, in]``: the
    transpose of jpeft's (GPT-2's ``Conv1D`` and embedding tables are stored alike)."""
    return module.is_linear and not _conv1d(module)


def _write(folder: Path, config: dict, tensors: dict[str, np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_safetensors(tensors, folder / WEIGHTS_FILE)
    return folder


def import_peft(base_params: dict, adapter_dir: str | os.PathLike) -> dict:
    """Reads a Hugging Face PEFT adapter folder onto a base parameter tree: LoRA (and DoRA)
    here, another method by its :class:`jpeft.methods.Method`'s ``from_peft``.

    For LoRA, honours ``r``, ``lora_alpha``, ``use_rslora``, ``rank_pattern``, ``alpha_pattern``,
    ``target_modules`` (list or regex), ``exclude_modules``, ``layers_to_transform``,
    ``layers_pattern``, ``bias``, ``modules_to_save``, ``lora_dropout`` and ``use_dora``.

    Args:
      base_params: the base model's tree (from :func:`jpeft.models.from_pretrained`).
      adapter_dir: a folder with ``adapter_config.json`` and ``adapter_model.safetensors``.

    Returns:
      `base_params` with the adapter's nodes and trained weights.

    Raises:
      CheckpointError: a missing or malformed file, a PEFT type or option jpeft does not
        implement, keys that match no module of the base, missing keys or a shape mismatch;
        each message names the file.
    """
    folder = Path(adapter_dir)
    config = read_config(folder)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{folder} has no {WEIGHTS_FILE}")
    tensors = _Tensors(read_safetensors(weights_path), weights_path)
    method = methods.with_peft_type(config["peft_type"])
    if method is not None and method.from_peft is not None:
        params = _import_with(method, base_params, config, tensors)
    else:
        params = _import_lora(
            base_params, peft_lora_config.lora_config(config, folder / CONFIG_FILE), tensors
        )
    params = _fill_trained(params, tensors)
    tensors.check_all_read()
    return params


class _Tensors(collections.abc.Mapping):
    """The tensors of an adapter file, remembering which were read: every one must be."""

    def __init__(self, tensors: Any, path: Path):
        self._tensors, self.path, self._read = dict(tensors), path, set()

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._tensors:
            raise CheckpointError(f"{self.path} lacks {name} that its config implies")
        self._read.add(name)
        return self._tensors[name]

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Tensor `name` in float32, which must have `shape`."""
        value = self[name]
        if tuple(value.shape) != tuple(shape):
            raise CheckpointError(
                f"{self.path}: {name} has shape {tuple(value.shape)}, the base model needs "
                f"{tuple(shape)}"
            )
        return np.asarray(value, np.float32)

    def check_all_read(self) -> None:
        unused = sorted(set(self._tensors) - self._read)
        if unused:
            raise CheckpointError(
                f"{self.path} has keys that match no adapted module of the base: "
                f"{unused[:5]}{' ...' if len(unused) > 5 else ''}"
            )


def _import_lora(base_params: dict, config: lora.LoraConfig, tensors: _Tensors) -> dict:
    """`base_params` with the LoRA (or DoRA) nodes of `config`, their factors from `tensors`."""
    try:
        # The key only initialises factors that the file then overwrites.
        params = lora.apply(base_params, config=config, key=jax.random.key(0))
    except ValueError as err:
        raise CheckpointError(
            f"{tensors.path.parent / CONFIG_FILE} does not fit the base model: {err}"
        ) from err
    modules = {tuple(m.path): m for m in targeting.modules(params)}

    def fill(keys: tuple, value: Any) -> Any:
        if not isinstance(value, lora.LoraWeight):
            return value
        module = modules[tuple(keys[:-1])]
        a, b = np.array(value.a), np.array(value.b)
        magnitude = _magnitude(value)
        layers = value.layers if value.layers is not None else range(len(module.names))
        for i in layers:
            index = (i,) if module.stacked else ()
            name = PREFIX + module.names[i]
            a[index] = tensors.take(f"{name}.lora_A.weight", a[index].T.shape).T
            b[index] = tensors.take(f"{name}.lora_B.weight", b[index].T.shape).T
            if magnitude is not None:
                magnitude[index] = tensors.take(
                    f"{name}.lora_magnitude_vector", magnitude[index].shape
                )
        if magnitude is None:
            return _replace(value, a=a, b=b)
        return _replace(value, a=a, b=b, magnitude=magnitude)

    return _map_nodes(fill, params)


def _fill_trained(params: dict, tensors: _Tensors) -> dict:
    """`params` with the weights trained in full (:class:`jpeft.tree.Trainable`: biases,
    ``modules_to_save``) read from `tensors`."""
    modules = {tuple(m.path): m for m in targeting.modules(params)}

    def fill(keys: tuple, value: Any) -> Any:
        if not isinstance(value, tree.Trainable):
            return value
        module, leaf = modules[tuple(keys[:-1])], keys[-1]
        stacked = np.array(value.w)
        for i, name in enumerate(module.names):
            index = (i,) if module.stacked else ()
            candidates = [f"{PREFIX}{name}.{leaf}", f"{PREFIX}{name}.base_layer.{leaf}"]
            found = [c for c in candidates if c in tensors]
            if not found:
                raise CheckpointError(f"{tensors.path} lacks {candidates[0]}")
            if leaf == module.weight_key and _torch_linear(module):
                stacked[index] = tensors.take(found[0], stacked[index].T.shape).T
            else:
                stacked[index] = tensors.take(found[0], stacked[index].shape)
        return _replace(value, w=stacked.astype(np.asarray(value.w).dtype))

    return _map_nodes(fill, params)


def _map_nodes(fn, params: dict) -> dict:
    return jax.tree_util.tree_map_with_path(
        lambda p, x: fn(tree.path_keys(p), x), params, is_leaf=lambda x: isinstance(x, tree.Node)
    )


def _import_with(method, base_params: dict, config: dict, tensors: _Tensors) -> dict:
    """`method`'s own import of a PEFT adapter (the weights it trains in full are filled in
    by :func:`import_peft`), with its errors naming the file."""
    if config.get("modules_to_save") and not any(
        f.name == "modules_to_save" for f in dataclasses.fields(method.config_class)
    ):
        raise CheckpointError(
            f"{tensors.path.parent / CONFIG_FILE}: {method.title} has no modules_to_save"
        )
    try:
        return method.from_peft(base_params, config, tensors)
    except CheckpointError:
        raise
    except ValueError as err:
        raise CheckpointError(f"{tensors.path}: {err}") from err


def read_config(folder: str | os.PathLike) -> dict:
    """The parsed ``adapter_config.json`` of a PEFT adapter folder."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {CONFIG_FILE}; expected a PEFT adapter folder")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(config, dict) or "peft_type" not in config:
        raise CheckpointError(f"{path} has no peft_type; it is not a PEFT adapter config")
    return config


def _adapter_entries(params: dict):
    """``([(module, LoraWeight)], [(module, leaf name, Trainable)])`` of a tree."""
    by_path = {tuple(m.path): m for m in targeting.modules(params)}
    adapted, trained = [], []
    for keys, value in tree.iter_nodes(params):
        module = by_path.get(tuple(keys[:-1]))
        if isinstance(value, lora.LoraWeight):
            adapted.append((module, value))
        elif isinstance(value, tree.Trainable):
            trained.append((module, keys[-1], value))
    return adapted, trained


def _layer(value: Any, module: targeting.Module, name: str) -> np.ndarray:
    array = np.asarray(value, np.float32)
    if module.stacked:
        array = array[module.names.index(name)]
    return np.ascontiguousarray(array)


def _magnitude(node: lora.LoraWeight) -> np.ndarray | None:
    """A copy of a DoRA node's magnitude ``[..., out]`` in float32, None for plain LoRA."""
    if isinstance(node, dora.DoraWeight):
        return np.array(node.magnitude, np.float32)
    return None


def _replace(node: Any, **arrays: np.ndarray) -> Any:
    return dataclasses.replace(node, **{k: jnp.asarray(v) for k, v in arrays.items()})
