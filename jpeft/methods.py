"""The registry of PEFT methods: what ``jpeft train --method`` and the contract tests choose among.

A method is one file: a config dataclass with Hugging Face PEFT's field names, an ``apply``
function that adds the method's nodes to a parameter tree, the node classes themselves
(their protocol is in :mod:`jpeft.tree`) and, where PEFT has the method, its conversion to
and from PEFT's adapter files (:mod:`jpeft.hf.peft_format` calls it). The file registers the
method once::

    methods.register(methods.Method(
        name="lora", title="LoRA", config_class=LoraConfig, apply=apply, peft_type="LORA"))

Nothing else names it: the command line builds ``jpeft train``'s method options from the
config's fields (those with ``metadata["help"]``, see :mod:`jpeft.cli.options`), and the
checkpoints, training and generation go through the node protocol.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

# The modules of the methods jpeft ships; importing one registers its method.
_BUILTIN_MODULES = (
    "jpeft.lora",
    "jpeft.prompt_tuning",
    "jpeft.prefix_tuning",
    "jpeft.bottleneck",
    "jpeft.ia3",
)
_METHODS: dict[str, Method] = {}


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered PEFT method.

    Attributes:
      name: the registry name (``--method NAME``; recorded in adapter metadata).
      title: the method's name in help texts and messages, e.g. ``"LoRA"``.
      config_class: its config dataclass (keyword-only fields with HF PEFT's names and
        defaults); the fields with ``metadata["help"]`` are ``jpeft train`` options.
      apply: ``apply(params, *, config, key, model) -> params`` with the method's nodes
        added (`model`: the jpeft model of `params`, for methods that need its shape).
      peft_type: Hugging Face PEFT's ``peft_type`` for the method, or None where peft has
        none.
      identity_at_init: whether the adapted model starts equal to the base (LoRA's zero
        ``B``); methods that add virtual tokens do not.
      to_peft: ``to_peft(params) -> (config fields, tensors)`` for PEFT's
        ``adapter_config.json`` and ``adapter_model.safetensors``, or None when `params`
        hold none of this method's nodes; None: exported by :mod:`jpeft.hf.peft_format`
        itself (LoRA) or not at all.
      from_peft: ``from_peft(base_params, config, tensors) -> params``, the inverse
        (raising ValueError on files that do not fit).
    """

    name: str
    title: str
    config_class: type
    apply: Callable[..., Any]
    peft_type: str | None = None
    identity_at_init: bool = True
    to_peft: Callable[[Any], tuple[dict, dict] | None] | None = None
    from_peft: Callable[[Any, dict, dict], Any] | None = None

    def adapter_config(self, config: Any, **extra: Any) -> dict[str, Any]:
        """The JSON-ready description of an adapter made with `config`, stored with it."""
        fields = _jsonable(dataclasses.asdict(config))
        return {"method": self.name, "peft_type": self.peft_type, **extra, **fields}


def register(method: Method) -> Method:
    """Adds `method` to the registry (again under the same name replaces nothing else).

    Raises:
      ValueError: another method already has that name.
    """
    known = _METHODS.get(method.name)
    if known is not None and known.config_class is not method.config_class:
        raise ValueError(f"method name {method.name!r} is taken by {known.title}")
    _METHODS[method.name] = method
    return method


def names() -> tuple[str, ...]:
    """The names of every registered method, the built-in ones included."""
    _import_builtin()
    return tuple(sorted(_METHODS))


def get(name: str) -> Method:
    """The method registered under `name`.

    Raises:
      ValueError: no such method (the message lists the registered ones).
    """
    _import_builtin()
    if name not in _METHODS:
        raise ValueError(f"unknown PEFT method {name!r}; registered: {', '.join(names())}")
    return _METHODS[name]


def all_methods() -> tuple[Method, ...]:
    """Every registered method, the built-in ones included, by name."""
    return tuple(get(name) for name in names())


def with_peft_type(peft_type: str) -> Method | None:
    """The registered method with PEFT's `peft_type` (e.g. ``"PROMPT_TUNING"``), if any."""
    _import_builtin()
    return next((m for m in _METHODS.values() if m.peft_type == peft_type), None)


def _import_builtin() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
