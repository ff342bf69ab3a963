"""LoRA's ``adapter_config.json``: peft's ``LoraConfig`` fields to and from jpeft's.

On export (:func:`jpeft.hf.peft_format.export_peft`) jpeft writes the smallest config that
reproduces its nodes exactly: the most common rank and α as ``r``/``lora_alpha``, the rest
as ``rank_pattern``/``alpha_pattern``, and target names made unambiguous (``attn.c_proj``
rather than ``c_proj`` when only one of GPT-2's two ``c_proj`` layers is adapted). On
import, a config becomes a :class:`jpeft.lora.LoraConfig`, and options jpeft does not
implement are refused by name.
"""

from __future__ import annotations

import collections
import re
from pathlib import Path
from typing import Any

from jpeft import lora
from jpeft import targets as targeting
from jpeft.hf.checkpoints import CheckpointError

PEFT_FORMAT_VERSION = "0.21.2"  # the peft release whose LoraConfig fields are written

# peft LoraConfig fields that change the model in ways jpeft does not implement, with the
# value that means "off".
_UNSUPPORTED = {
    "lora_bias": False,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "use_bdlora": None,
    "use_qalora": False,
    "megatron_config": None,
    "velora_config": None,
    "monteclora_config": None,
    "kasa_config": None,
    "ensure_weight_tying": False,
}
# init_lora_weights values whose saved adapter is relative to a modified base model.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "eva", "orthogonal", "mica", "lora_ga")


def lora_config(config: dict, path: Path) -> lora.LoraConfig:
    if config["peft_type"] != "LORA":
        raise CheckpointError(
            f"{path}: peft_type {config['peft_type']!r} is not implemented by jpeft's importer "
            "(it reads LORA adapters)"
        )
    for field, off in _UNSUPPORTED.items():
        if config.get(field, off) not in (off, {}, [], None) and config.get(field) != off:
            raise CheckpointError(f"{path}: {field}={config[field]!r} is not supported by jpeft")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise CheckpointError(
            f"{path}: init_lora_weights={init!r} saves an adapter relative to a modified base "
            "model; convert it to plain LoRA with peft first"
        )
    target = config.get("target_modules")
    try:
        return lora.LoraConfig(
            r=int(config.get("r", 8)),
            lora_alpha=config.get("lora_alpha", 8),
            target_modules=sorted(target) if isinstance(target, list) else target,
            exclude_modules=config.get("exclude_modules"),
            lora_dropout=float(config.get("lora_dropout") or 0.0),
            bias=config.get("bias", "none"),
            use_rslora=bool(config.get("use_rslora", False)),
            use_dora=bool(config.get("use_dora", False)),
            layers_to_transform=config.get("layers_to_transform"),
            layers_pattern=config.get("layers_pattern"),
            rank_pattern=dict(config.get("rank_pattern") or {}),
            alpha_pattern=dict(config.get("alpha_pattern") or {}),
            modules_to_save=config.get("modules_to_save"),
        )
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: {err}") from err


def select_exactly(adapted, all_modules, layer_sets):
    """``(target_modules, layers_to_transform)`` that select exactly the adapted layers.

    Args:
      adapted: ``(module, node)`` pairs, each node's ``layers`` its adapted layers (None:
        all of them).
      all_modules: every module of the tree (:func:`jpeft.targets.modules`).
      layer_sets: the set of the nodes' ``layers``; ``{None}`` where the config has no
        ``layers_to_transform`` (IA3's): layers are then chosen by a regex when needed.

    Returns:
      Short module names (dotted suffixes, unambiguous) with a ``layers_to_transform``
      list or None, or a regex matching the adapted layers' names exactly, with None.
    """
    chosen = {
        (tuple(m.path), i)
        for m, node in adapted
        for i in (node.layers if node.layers is not None else range(len(m.names)))
    }
    names = sorted({_unambiguous_suffix(m, all_modules, adapted) for m, _ in adapted})
    (layers,) = layer_sets if len(layer_sets) == 1 else (("varies",),)
    if layers != ("varies",):
        layers_list = None if layers is None else list(layers)
        selected = {
            (tuple(m.path), i)
            for m in all_modules
            for i, n in enumerate(m.names)
            if targeting.name_matches(n, names, layers_to_transform=layers_list)
        }
        if selected == chosen:
            return names, layers_list
    exact = sorted(
        n
        for m, node in adapted
        for i, n in enumerate(m.names)
        if node.layers is None or i in node.layers
    )
    return "(" + "|".join(re.escape(n) for n in exact) + ")", None


def _unambiguous_suffix(module, all_modules, adapted) -> str:
    """The shortest dotted suffix of the module's name that matches no other module kind."""
    adapted_paths = {tuple(m.path) for m, _ in adapted}
    parts = module.names[0].split(".")
    for size in range(1, len(parts) + 1):
        suffix = ".".join(parts[-size:])
        clash = any(
            tuple(m.path) not in adapted_paths
            and any(n == suffix or n.endswith("." + suffix) for n in m.names)
            for m in all_modules
        )
        if not clash:
            return suffix
    return module.names[0]


def most_common_with_exceptions(values: dict[str, Any], adapted, all_modules):
    """The most common value, and a pattern dict for the names that differ from it."""
    common = collections.Counter(values.values()).most_common(1)[0][0]
    pattern = {}
    for module, _ in adapted:
        differing = [n for n in module.names if n in values and values[n] != common]
        if not differing:
            continue
        kinds = {values[n] for n in module.names if n in values}
        if len(kinds) == 1 and all(n in values for n in module.names):
            pattern[re.escape(_unambiguous_suffix(module, all_modules, adapted))] = kinds.pop()
        else:
            pattern.update({re.escape(n): values[n] for n in differing})
    return common, pattern


def number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def peft_defaults() -> dict[str, Any]:
    """Every field peft 0.21.2's ``LoraConfig.to_dict()`` writes, at its default."""
    return {
        "alora_invocation_tokens": None,
        "alpha_pattern": {},
        "arrow_config": None,
        "auto_mapping": None,
        "base_model_name_or_path": None,
        "bias": "none",
        "corda_config": None,
        "ensure_weight_tying": False,
        "eva_config": None,
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "kasa_config": None,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": 8,
        "lora_bias": False,
        "lora_dropout": 0.0,
        "lora_ga_config": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "monteclora_config": None,
        "peft_type": "LORA",
        "peft_version": PEFT_FORMAT_VERSION,
        "qalora_group_size": 16,
        "r": 8,
        "rank_pattern": {},
        "revision": None,
        "target_modules": None,
        "target_parameters": None,
        "task_type": None,
        "trainable_token_indices": None,
        "use_bdlora": None,
        "use_dora": False,
        "use_qalora": False,
        "use_rslora": False,
        "velora_config": None,
    }
