"""What several ``jpeft`` commands share: exit codes, usage errors, loading a model, its
tokenizer and an adapter of either format."""

from __future__ import annotations

import os
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


def with_adapter(base: dict, adapter: str | os.PathLike) -> dict:
    """`base` with the adapter of a jpeft, Hugging Face PEFT or AdapterHub folder on it."""
    from jpeft import adapters

    adapter_kind(adapter)  # a usage error for a folder of no known format
    return adapters.read(base, adapter)
