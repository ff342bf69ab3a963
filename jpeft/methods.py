"""The registry of PEFT methods: what ``jpeft train --method`` and the contract tests choose among.

A method is one file: a config dataclass with Hugging Face PEFT's field names, an ``apply``
function that adds the method's nodes to a parameter tree, and the node classes themselves
(their protocol is in :mod:`jpeft.tree`). The file registers the method once::

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
_BUILTIN_MODULES = ("jpeft.lora",)
_METHODS: dict[str, Method] = {}


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered PEFT method.

    Attributes:
      name: the registry name (``--method NAME``; recorded in adapter metadata).
      title: the method's name in help texts and messages, e.g. ``"LoRA"``.
      config_class: its config dataclass (keyword-only fields with HF PEFT's names and
        defaults); the fields with ``metadata["help"]`` are ``jpeft train`` options.
      apply: ``apply(params, *, config, key) -> params`` with the method's nodes added.
      peft_type: Hugging Face PEFT's ``peft_type`` for the method, or None where peft has
        none.
    """

    name: str
    title: str
    config_class: type
    apply: Callable[..., Any]
    peft_type: str | None = None

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


def _import_builtin() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
