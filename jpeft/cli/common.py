"""What several ``jpeft`` commands share: exit codes, usage errors, loading a model, its
tokenizer and an adapter of either format."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
DTYPES = ("float32", "bfloat16")


class UsageError(ValueError):
    """Bad input found by the command line itself (reported like every other bad input)."""


def existing(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path, or a usage error naming `what` when it does not exist."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{what} {path} does not exist")
    return path


def load_model(path: str | os.PathLike, dtype: str = "float32") -> tuple[Any, dict]:
    """``(model, params)`` of a model folder or GGUF file (:func:`jpeft.models.from_pretrained`)."""
    import jax.numpy as jnp

    from jpeft import models

    return models.from_pretrained(existing(path, "model"), dtype=jnp.dtype(dtype))


def load_tokenizer(path: Path, required: bool = True) -> Any:
    """The model's tokenizer; None when there is none and it is not `required`."""
    from jpeft import models

    try:
        return models.load_tokenizer(path)
    except Exception as err:  # transformers raises many types for a folder without one
        if not required:
            return None
        raise UsageError(f"cannot load a tokenizer from {path}: {err}") from None


def adapter_kind(path: str | os.PathLike) -> tuple[str, Path]:
    """``("hf" | "adapterhub" | "jpeft", folder)`` of an adapter folder (or of a
    ``jpeft train`` output)."""
    from jpeft import adapters

    try:
        return adapters.folder_format(existing(path, "adapter"))
    except ValueError as err:
        raise UsageError(str(err)) from None


def parse_named_adapter(spec: str) -> tuple[str | None, str]:
    """``("NAME", "DIR")`` from ``--adapter NAME=DIR``; ``(None, "DIR")`` from a folder alone.

    NAME is letters, digits, ``_``, ``-`` and ``.``; text whose part before ``=`` is not such a
    name, or which is an existing path as a whole, is a folder alone (folders may hold ``=``).

    Raises:
      UsageError: ``NAME=`` with no folder.
    """
    name, sep, folder = spec.partition("=")
    if not sep or os.path.exists(spec) or not re.fullmatch(r"[\w.-]+", name):
        return None, spec
    if not folder:
        raise UsageError(f"--adapter {spec}: expected NAME=DIR, with the adapter folder after '='")
    return name, folder


def named_adapters(specs: Sequence[str]) -> dict[str, str]:
    """``{name: folder}`` from ``--adapter`` values (``NAME=DIR`` or ``DIR``, in order); an
    unnamed folder is named after its last path component.

    Raises:
      UsageError: two adapters of one name.
    """
    named: dict[str, str] = {}
    for spec in specs:
        name, folder = parse_named_adapter(spec)
        name = name or Path(folder).name
        if name in named:
            raise UsageError(
                f"two adapters are named {name!r} ({named[name]} and {folder}): give each "
                "--adapter a name of its own, as NAME=DIR"
            )
        named[name] = folder
    return named


def with_adapter(base: dict, adapter: str | os.PathLike) -> dict:
    """`base` with the adapter of a jpeft, Hugging Face PEFT or AdapterHub folder on it."""
    from jpeft import adapters

    adapter_kind(adapter)  # a usage error for a folder of no known format
    return adapters.read(base, adapter)
