"""(IA)³ (Liu et al., 2022): learned vectors that rescale activations, Hugging Face PEFT's
``IA3Config``.

A targeted linear module ``y = x @ W + b`` (``W: [in, out]``) becomes an :class:`IA3Weight`
node holding ``W`` (frozen) and a trainable vector ``ℓ``:

    attention (keys, values; GPT-2's fused ``c_attn``):  y = (x @ W + b) ⊙ ℓ,   ℓ: [out]
    feedforward (the MLP's down projection):              y = (x ⊙ ℓ) @ W + b,   ℓ: [in]

as PEFT's ``IA3Layer`` computes them: the output scale covers the bias too. In a step the
weight is never rescaled (``(x @ W) ⊙ ℓ``, ``(x ⊙ ℓ) @ W``); :func:`merge` folds the vector
in, ``W ⊙ ℓ[None, :]`` and ``b ⊙ ℓ`` for an output scale, ``ℓ[:, None] ⊙ W`` for an input
scale (a bias after the product is unchanged). Which targets are feedforward is
`feedforward_modules`' choice.

``ℓ`` starts at ones, so the adapted model starts equal to the base (``init_ia3_weights=False``:
``ℓ ~ N(0, 1)``, as PEFT's ``torch.randn``). For a stacked weight ``[l, in, out]`` the vector is
``[l, out]`` (or ``[l, in]``); layers a regex or `exclude_modules` leave out keep a scale of
exactly one and get no gradient. PEFT's IA3 has no ``layers_to_transform``.

Example::

    params = jpeft.ia3.apply(params, model=model)   # Llama: k_proj, v_proj, down_proj (input)
    trainable, frozen = jpeft.split(params)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import lora, methods, nn, tree
from jpeft import targets as targeting
from jpeft.hf import peft_format, peft_lora_config

# PEFT's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING and
# TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING for jpeft's model types.
_FAMILY_DEFAULTS = {
    "llama": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "mistral": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "qwen2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "qwen3": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gpt2": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class IA3Config:
    """(IA)³ settings with Hugging Face PEFT's field names and defaults.

    Attributes:
      target_modules: module names (suffix match), a full-match regex, ``"all-linear"``, or
        None for the model family's defaults (Llama/Mistral ``k_proj``, ``v_proj``,
        ``down_proj``; Qwen2/3 ``q_proj``, ``v_proj``, ``down_proj``; GPT-2 ``c_attn``,
        ``mlp.c_proj``).
      feedforward_modules: the targets whose input is scaled rather than their output: a
        regex matched against the whole name, or names that a module's name ends with (a
        plain string suffix, as PEFT checks it); None for the model family's (the MLP's down
        projection). As names, they must be a subset of `target_modules`' names.
      exclude_modules: names or a regex never targeted.
      init_ia3_weights: True (ones: the identity) or False (standard normal, for tests).
      fan_in_fan_out: HF's flag for bases stored ``[in, out]`` (GPT-2's ``Conv1D``). jpeft
        stores every linear weight ``[in, out]`` and converts GPT-2 itself, so only False
        is accepted (True is an error rather than silently meaning nothing).
      modules_to_save: modules trained in full beside the adapter (e.g. ``["lm_head"]``).

    The fields with ``metadata["help"]`` are also ``jpeft train`` options (``--targets``,
    ``--feedforward``).
    """

    target_modules: str | tuple[str, ...] | None = dataclasses.field(
        default=None,
        metadata={
            "help": "modules to adapt: names separated by commas (k_proj,v_proj,down_proj; "
            "suffix match), 'all-linear', or a regex matched against the whole module name",
            "flag": "--targets",
            "parse": targeting.parse_names,
            "metavar": "NAMES|REGEX",
            "shown_default": "the model family's, k_proj,v_proj,down_proj for Llama",
        },
    )
    feedforward_modules: str | tuple[str, ...] | None = dataclasses.field(
        default=None,
        metadata={
            "help": "targets whose input is scaled instead of their output: names (a subset "
            "of --targets) or a regex",
            "flag": "--feedforward",
            "parse": targeting.parse_names,
            "metavar": "NAMES|REGEX",
            "shown_default": "the model family's, down_proj for Llama",
        },
    )
    exclude_modules: str | tuple[str, ...] | None = None
    init_ia3_weights: bool = True
    fan_in_fan_out: bool = False
    modules_to_save: tuple[str, ...] | None = None

    def __post_init__(self):
        targeting.freeze_name_lists(
            self, ("target_modules", "feedforward_modules", "exclude_modules", "modules_to_save")
        )
        targeting.refuse_fan_in_fan_out(self.fan_in_fan_out)
        if not isinstance(self.init_ia3_weights, bool):
            raise ValueError(
                f"init_ia3_weights must be True or False, got {self.init_ia3_weights!r}"
            )
        targets, feedforward = self.target_modules, self.feedforward_modules
        if isinstance(targets, tuple) and isinstance(feedforward, tuple):
            extra = sorted(set(feedforward) - set(targets))  # PEFT compares names, not matches
            if extra:
                raise ValueError(
                    f"feedforward_modules {extra} are not in target_modules {list(targets)}: "
                    "feedforward_modules must be a subset of target_modules"
                )


@tree.node
class IA3Weight(tree.Node):
    """A linear weight whose output (or, `feedforward`, input) is scaled by a learned vector.

    Attributes:
      w: the frozen base weight ``[..., in, out]`` (an array or another node, e.g. NF4).
      vector: ``[..., out]`` trainable (``[..., in]`` when `feedforward`): PEFT's ``ia3_l``.
      active: ``[...]`` bool, the adapted layers of a stacked weight (None: every layer); the
        others scale by exactly one.
      feedforward: scale the input instead of the output.
      layers: the adapted layers as indices (None: every layer, or not stacked).
    """

    w: Any
    vector: jax.Array
    active: jax.Array | None = None
    feedforward: bool = tree.static(False)
    layers: tuple[int, ...] | None = tree.static(None)

    kind: ClassVar[str] = "ia3"
    trainable_fields: ClassVar[tuple[str, ...]] = ("vector",)
    base_field: ClassVar[str] = "w"

    def adapted_shape(self) -> tuple[int, ...]:
        *lead, n = self.vector.shape
        return (*lead, n, -1) if self.feedforward else (*lead, -1, n)

    def identity(self, base: Any) -> IA3Weight:
        return dataclasses.replace(self, w=None, vector=jnp.ones_like(self.vector))

    def parameter_count(self) -> tuple[int, int]:
        adapter = self.vector.size
        if self.layers is not None:
            adapter = adapter * len(self.layers) // self.vector.shape[0]
        return adapter, tree.count_parameters(self.w)[1] + adapter


def _scale(node: IA3Weight) -> jax.Array:
    """``ℓ`` as the layers use it, ``[..., n]`` float32: one for layers left out."""
    vector = jnp.asarray(node.vector, jnp.float32)
    if node.active is None:
        return vector
    return jnp.where(node.active[..., None], vector, 1.0)


@nn.register("linear", IA3Weight)
def _linear(x: jax.Array, node: IA3Weight) -> jax.Array:
    factor = _scale(node).astype(x.dtype)
    if node.feedforward:
        return nn.linear(x * factor, node.w)
    return nn.linear(x, node.w) * factor


@nn.register("bias", IA3Weight)
def _bias(bias: jax.Array, node: IA3Weight) -> jax.Array:
    if node.feedforward:
        return bias
    return (bias.astype(jnp.float32) * _scale(node)).astype(bias.dtype)


@nn.register("value", IA3Weight)
def _merged(node: IA3Weight) -> jax.Array:
    w = nn.value(node.w)
    factor = _scale(node)
    factor = factor[..., :, None] if node.feedforward else factor[..., None, :]
    return (w.astype(jnp.float32) * factor).astype(w.dtype)


def apply(
    params: dict,
    *,
    model: Any = None,
    key: jax.Array | None = None,
    config: IA3Config | None = None,
    **options: Any,
) -> dict:
    """Adds (IA)³ vectors to the targeted linear weights of a parameter tree.

    Args:
      params: a parameter tree (jpeft model or any nested dict of ``[in, out]`` weights).
      model: the jpeft model of `params`, whose ``model_type`` gives the default
        `target_modules` and `feedforward_modules`; not needed when both are given.
      key: PRNG key for ``init_ia3_weights=False`` (ones need none).
      config: a full :class:`IA3Config`, or its fields as `options`.

    Returns:
      The same tree with :class:`IA3Weight` nodes in place of the targeted weights (and
      :class:`jpeft.tree.Trainable` wrappers for `modules_to_save`).

    Raises:
      ValueError: targets that match nothing (with close names), a model family without
        defaults, a stacked module whose layers are feedforward for some layers only,
        unsupported options.
    """
    if config is None:
        config = IA3Config(**options)
    elif options:
        raise ValueError("pass either config or its fields as options, not both")
    target_modules, feedforward_modules = _resolved(config, model)
    selected = targeting.select(
        params,
        target_modules,
        exclude_modules=config.exclude_modules,
        modules_to_save=config.modules_to_save,
    )
    if not config.init_ia3_weights and key is None:
        raise ValueError("init_ia3_weights=False draws the vectors at random: pass key=")
    keys = jax.random.split(key, len(selected)) if key is not None else [None] * len(selected)
    new = tree.copy_dicts(params)
    for (module, layers), module_key in zip(selected, keys, strict=True):
        entry = tree.get_path(new, module.path)
        kinds = {_is_feedforward(module.names[i], feedforward_modules) for i in layers}
        if len(kinds) > 1:
            raise ValueError(
                f"feedforward_modules {feedforward_modules!r} make some layers of "
                f"{module.names[0]} feedforward and others not; jpeft needs one kind per "
                "stacked module"
            )
        entry[module.weight_key] = _init_node(
            entry[module.weight_key], module, layers, kinds.pop(), config, module_key
        )
    if config.modules_to_save:
        lora.mark_modules_to_save(new, config.modules_to_save)
    return new


def _resolved(config: IA3Config, model: Any) -> tuple[Any, Any]:
    """``(target_modules, feedforward_modules)``, the model family's where not given."""
    targets, feedforward = config.target_modules, config.feedforward_modules
    if targets is not None and feedforward is not None:
        return targets, feedforward
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _FAMILY_DEFAULTS:
        missing = "target_modules" if targets is None else "feedforward_modules"
        raise ValueError(
            f"{missing} must be given: IA3 has defaults for model types "
            f"{sorted(_FAMILY_DEFAULTS)} (pass model=), got {model_type!r}"
        )
    default_targets, default_feedforward = _FAMILY_DEFAULTS[model_type]
    return (
        default_targets if targets is None else targets,
        default_feedforward if feedforward is None else feedforward,
    )


def _is_feedforward(name: str, feedforward_modules: str | tuple[str, ...]) -> bool:
    """Whether the HF module `name` is feedforward, as PEFT's ``IA3Model`` decides: a string
    is a full-match regex, names match where `name` ends with one (no dot needed)."""
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, name) is not None
    return any(name.endswith(suffix) for suffix in feedforward_modules)


def _init_node(
    weight: Any,
    module: targeting.Module,
    layers: tuple[int, ...],
    feedforward: bool,
    config: IA3Config,
    key: jax.Array | None,
) -> IA3Weight:
    if isinstance(weight, IA3Weight):
        raise ValueError(f"{module.names[0]} already has an IA3 vector")
    shape = nn.shape(weight)
    lead, (fan_in, fan_out) = shape[:-2], shape[-2:]
    size = (*lead, fan_in if feedforward else fan_out)
    if config.init_ia3_weights:
        vector = jnp.ones(size, jnp.float32)
    else:
        vector = jax.random.normal(key, size, jnp.float32)
    all_layers = not module.stacked or len(layers) == len(module.names)
    active = None
    if not all_layers:
        active = np.zeros(lead, bool)
        active[list(layers)] = True
    return IA3Weight(
        w=weight,
        vector=vector,
        active=None if active is None else jnp.asarray(active),
        feedforward=feedforward,
        layers=None if all_layers else tuple(layers),
    )


def merge(params: dict) -> dict:
    """Folds every vector into its weight (and an output scale into the bias too): a plain
    tree of arrays for serving, computed in float32 and stored in the weights' dtype."""
    return tree.materialize(params)


def _adapted(params: dict) -> list[tuple[targeting.Module, IA3Weight]]:
    by_path = {tuple(m.path): m for m in targeting.modules(params)}
    return [
        (by_path[tuple(keys[:-1])], node)
        for keys, node in tree.iter_nodes(params)
        if isinstance(node, IA3Weight)
    ]


def _layer_names(module: targeting.Module, node: IA3Weight) -> list[tuple[tuple, str]]:
    """``(index into the node's vector, HF name)`` of each adapted layer."""
    layers = node.layers if node.layers is not None else range(len(module.names))
    return [((i,) if module.stacked else (), module.names[i]) for i in layers]


def _to_peft(params: dict) -> tuple[dict, dict[str, np.ndarray]] | None:
    """PEFT's ``IA3Config`` fields and ``<module>.ia3_l`` tensors (``[out, 1]`` for an output
    scale, ``[1, in]`` for an input scale), if `params` hold IA3 vectors."""
    adapted = _adapted(params)
    if not adapted:
        return None
    tensors = {}
    for module, node in adapted:
        vector = np.asarray(node.vector, np.float32)
        for index, name in _layer_names(module, node):
            row = vector[index]
            row = row[None, :] if node.feedforward else row[:, None]
            tensors[f"{peft_format.PREFIX}{name}.ia3_l"] = np.ascontiguousarray(row)
    all_modules = targeting.modules(params)
    target_modules, _ = peft_lora_config.select_exactly(adapted, all_modules, {None})
    feedforward = {n for m, node in adapted if node.feedforward for _, n in _layer_names(m, node)}
    config = {
        "peft_type": "IA3",
        "target_modules": target_modules,
        "feedforward_modules": _feedforward_modules(adapted, target_modules, feedforward),
        "exclude_modules": None,
        "fan_in_fan_out": peft_format.fan_in_fan_out(m for m, _ in adapted),
        "init_ia3_weights": True,
    }
    return config, tensors


def _feedforward_modules(adapted, target_modules, feedforward: set[str]) -> list[str] | str:
    """`feedforward_modules` that PEFT reads as exactly the adapted layers named in
    `feedforward`: the target names that pick them out where that works, else a regex."""
    names = [n for m, node in adapted for _, n in _layer_names(m, node)]
    if not isinstance(target_modules, str):
        chosen = sorted(
            t for t in target_modules if any(targeting.name_matches(n, [t]) for n in feedforward)
        )
        if {n for n in names if _is_feedforward(n, tuple(chosen))} == feedforward:
            return chosen
    return "(" + "|".join(re.escape(n) for n in sorted(feedforward)) + ")"


def _from_peft(base_params: dict, config: dict, tensors: Any) -> dict:
    """The tree of a PEFT IA3 adapter (``<module>.ia3_l`` tensors)."""
    fields = {}
    for name in ("target_modules", "feedforward_modules"):
        value = config.get(name)
        if value is None:
            raise ValueError(f"an IA3 adapter config needs {name}, which this one lacks")
        fields[name] = sorted(value) if isinstance(value, list) else value
    ia3_config = IA3Config(
        **fields,
        exclude_modules=config.get("exclude_modules"),
        modules_to_save=config.get("modules_to_save"),
    )
    params = apply(base_params, config=ia3_config)
    for module, node in _adapted(params):
        vector = np.array(node.vector)
        for index, name in _layer_names(module, node):
            key = f"{peft_format.PREFIX}{name}.ia3_l"
            want = (1, vector.shape[-1]) if node.feedforward else (vector.shape[-1], 1)
            value = tensors[key]
            if tuple(value.shape) != want:
                raise ValueError(
                    f"{key} has shape {tuple(value.shape)}; the base model's "
                    f"{'input' if node.feedforward else 'output'} scale there is {want}"
                )
            vector[index] = np.asarray(value, np.float32).reshape(-1)
        entry = tree.get_path(params, module.path)  # apply's own copy of the dicts
        entry[module.weight_key] = dataclasses.replace(node, vector=jnp.asarray(vector))
    return params


methods.register(
    methods.Method(
        name="ia3",
        title="IA3",
        config_class=IA3Config,
        apply=apply,
        peft_type="IA3",
        to_peft=_to_peft,
        from_peft=_from_peft,
    )
)
