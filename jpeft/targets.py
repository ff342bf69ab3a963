"""Which modules a PEFT method adapts, decided exactly as Hugging Face PEFT decides it.

Modules are named as in transformers (``model.layers.3.self_attn.q_proj``). In a jpeft tree
the layers are stacked, so one tree entry (``model.layers.self_attn.q_proj``, weight
``[l, in, out]``) stands for ``l`` HF modules; selection happens per HF name and the result
for a stacked entry is the tuple of selected layer indices.

Rules (``peft.tuners.tuners_utils.check_target_module_exists``):

- `exclude_modules` first: a list matches a name equal to an entry or ending in
  ``"." + entry``; a string is a regex that must match the whole name.
- A module named in `modules_to_save` is never targeted.
- `target_modules` as a string is a full-match regex; as a list, the same equal-or-suffix
  rule; ``"all-linear"`` is every linear layer except the output head.
- `layers_to_transform` (with a list of targets only) keeps layers whose index, the first
  numeric name segment (after `layers_pattern` when given), is listed.
- `rank_pattern` / `alpha_pattern` keys match ``(.*\\.)?(key)$``; the first key that matches
  wins.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Sequence
from typing import Any

from jpeft import nn

ALL_LINEAR = "all-linear"
STACKED_LAYER_PATHS: set[tuple[str, ...]] = set()
"""The tree paths under which layers are stacked along a leading axis, e.g.
``("model", "layers")`` (each jpeft model adds its own); selection expands that axis of the
weights there into per-layer HF names."""
_WEIGHT_KEYS = ("weight", "kernel")  # transformers / Flax names of a layer's weight
_EMBEDDINGS = ("embed_tokens", "wte", "wpe")
_OUTPUT_HEADS = ("lm_head",)
# transformers' TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, keyed by the layer stack.
_DEFAULT_TARGETS = {("model", "layers"): ("q_proj", "v_proj"), ("transformer", "h"): ("c_attn",)}


def freeze_name_lists(config: Any, fields: Sequence[str]) -> None:
    """Turns the list or set values of `fields` of a frozen config into tuples (sets
    sorted), so that configs hash and compare by value whatever the caller passed."""
    for name in fields:
        value = getattr(config, name)
        if isinstance(value, (list, set)):
            object.__setattr__(
                config, name, tuple(sorted(value) if isinstance(value, set) else value)
            )


def refuse_fan_in_fan_out(fan_in_fan_out: bool) -> None:
    """Raises ValueError for HF PEFT's ``fan_in_fan_out=True``, which jpeft never needs."""
    if fan_in_fan_out:
        raise ValueError(
            "fan_in_fan_out=True is not needed in jpeft: every linear weight is stored "
            "[in, out] already (GPT-2's Conv1D is converted when loading); leave it False"
        )


def parse_names(spec: str | Sequence[str]) -> str | tuple[str, ...]:
    """`target_modules` from text: ``q_proj,v_proj`` or ``q_proj`` (module names, matched by
    suffix), ``all-linear``, or anything else as a regex matched against the whole name.
    A sequence of names is taken as it is."""
    if not isinstance(spec, str):
        return tuple(str(name) for name in spec)
    spec = spec.strip()
    if spec == ALL_LINEAR:
        return spec
    if "," in spec or re.fullmatch(r"[\w.]+", spec):
        return tuple(name.strip() for name in spec.split(",") if name.strip())
    return spec


def parse_layers(spec: str | int | Sequence[int]) -> tuple[int, ...]:
    """`layers_to_transform` from text: ``0,1,2``, ``0-3`` (inclusive) or a mix, ``0-3,8``.
    An integer or a sequence of integers is taken as it is."""
    if isinstance(spec, int):
        return (spec,)
    if not isinstance(spec, str):
        return tuple(int(i) for i in spec)
    layers: list[int] = []
    for part in spec.split(","):
        first, _, last = part.strip().partition("-")
        layers.extend(range(int(first), int(last) + 1) if last else [int(first)])
    return tuple(layers)


@dataclasses.dataclass(frozen=True)
class Module:
    """A weight-holding entry of a parameter tree.

    Attributes:
      path: tree keys of the module (the dict holding ``"weight"`` or Flax's ``"kernel"``).
      names: the HF module name of each layer it stands for (one name if not stacked).
      stacked: whether the weight has a leading layer axis.
      weight: the module's weight (array or node).
    """

    path: tuple
    names: tuple[str, ...]
    stacked: bool
    weight_key: str
    weight: Any

    @property
    def short_name(self) -> str:
        return str(self.path[-1])

    @property
    def is_linear(self) -> bool:
        ndim = len(nn.shape(self.weight)) - self.stacked
        return ndim == 2 and self.short_name not in _EMBEDDINGS


def modules(params: dict) -> list[Module]:
    """Every dict with a ``"weight"`` (or ``"kernel"``) entry in the tree, with its HF
    name(s)."""
    found: list[Module] = []

    def walk(node: Any, path: tuple) -> None:
        if not isinstance(node, dict):
            return
        for weight_key in _WEIGHT_KEYS:
            if weight_key in node and not isinstance(node[weight_key], dict):
                found.append(_module(path, weight_key, node[weight_key]))
                break
        for key, child in node.items():
            walk(child, path + (key,))

    walk(params, ())
    return found


def _module(path: tuple, weight_key: str, weight: Any) -> Module:
    name = ".".join(map(str, path))
    for stack in STACKED_LAYER_PATHS:
        if path[: len(stack)] == stack and len(path) > len(stack):
            layers = nn.shape(weight)[0]
            rest = ".".join(map(str, path[len(stack) :]))
            prefix = ".".join(stack)
            names = tuple(f"{prefix}.{i}.{rest}" for i in range(layers))
            return Module(path, names, True, weight_key, weight)
    return Module(path, (name,), False, weight_key, weight)


def default_targets(params: dict) -> tuple[str, ...]:
    """transformers' default LoRA targets for the model family the tree belongs to."""
    for stack, targets in _DEFAULT_TARGETS.items():
        node = params
        for key in stack:
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            return targets
    raise ValueError("target_modules must be given for a tree that is not a jpeft model's")


def name_matches(
    name: str,
    target_modules: str | Sequence[str],
    *,
    exclude_modules: str | Sequence[str] | None = None,
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    modules_to_save: Sequence[str] | None = None,
) -> bool:
    """Whether the HF module `name` is targeted (see the module docstring)."""
    if exclude_modules:
        if isinstance(exclude_modules, str):
            if re.fullmatch(exclude_modules, name):
                return False
        elif _in_list(name, exclude_modules):
            return False
    if modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in modules_to_save):
        return False
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    if name in target_modules:
        return True
    if not _in_list(name, target_modules):
        return False
    if layers_to_transform is None or layers_to_transform == []:
        return True
    index = layer_index(name, layers_pattern)
    if index is None:
        return False
    if isinstance(layers_to_transform, int):
        return index == layers_to_transform
    return index in layers_to_transform


def _in_list(name: str, entries: Sequence[str]) -> bool:
    return name in entries or any(name.endswith(f".{entry}") for entry in entries)


def layer_index(name: str, layers_pattern: str | Sequence[str] | None = None) -> int | None:
    """The layer index in an HF module name: its first numeric segment (after one of
    `layers_pattern` when given)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match:
                break
    return int(match.group("idx")) if match else None


def pattern_value(pattern: dict[str, Any], name: str, default: Any) -> Any:
    """`rank_pattern`/`alpha_pattern` lookup: the value of the first key matching `name`."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def select(
    params: dict,
    target_modules: str | Sequence[str] | None,
    *,
    required: bool = True,
    **options: Any,
) -> list[tuple[Module, tuple[int, ...]]]:
    """The modules to adapt and, for each, the indices of its selected layers (``(0,)`` for
    a module that is not stacked).

    Args:
      params: the parameter tree.
      target_modules: names, a regex, ``"all-linear"`` or None (the model's defaults).
      required: raise when nothing matches (False: return an empty list).
      **options: `exclude_modules`, `layers_to_transform`, `layers_pattern`,
        `modules_to_save` (see :func:`name_matches`).

    Raises:
      ValueError: nothing matches (the message lists module names close to the targets),
        or a matched module is not a linear layer.
    """
    found = modules(params)
    if target_modules is None:
        target_modules = default_targets(params)
    if isinstance(target_modules, str) and target_modules == ALL_LINEAR:
        target_modules = sorted(
            {m.short_name for m in found if m.is_linear and m.short_name not in _OUTPUT_HEADS}
        )
    selected = []
    for module in found:
        hits = tuple(
            i
            for i, name in enumerate(module.names)
            if name_matches(name, target_modules, **options)
        )
        if not hits:
            continue
        if not module.is_linear:
            raise ValueError(
                f"target {module.names[0]} is not a linear layer (weight shape "
                f"{nn.shape(module.weight)}); jpeft's methods adapt linear layers"
            )
        selected.append((module, hits))
    if not selected and required:
        short = sorted({m.short_name for m in found})
        wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        close = sorted({c for w in wanted for c in difflib.get_close_matches(w, short, n=3)})
        raise ValueError(
            f"target_modules {target_modules!r} match no module of the tree"
            + (f" with these options {options}" if any(options.values()) else "")
            + f"; close names: {close or 'none'}; modules in the tree: {short}"
        )
    return selected
