"""A persistent cache of compiled XLA programs, so that a second ``jpeft`` run skips them.

XLA:CPU compiles a training step in 1-3 s (SmolLM2-135M on a 2-core AMD EPYC); JAX can keep
compiled programs on disk (``jax_compilation_cache_dir``) and load one in a fraction of that
when the next process asks for the same program: the QLoRA step's lower + compile went
3.42 -> 0.64 s on a second launch. The ``jpeft`` command line turns it on (:func:`enable`);
the library leaves JAX's configuration to its caller.

A compiled CPU program holds the instructions of the CPU it was compiled for, so the
default folder is one per jaxlib version and CPU kind (:func:`default_directory`): a home
folder shared by several machines never hands one machine another's programs. Some CPUs
reject even their own cached programs (XLA's loader finds the compile-time tuning flags
``+prefer-no-gather``/``+prefer-no-scatter`` missing from the host's features, jax issue
38445), which would print loader errors and recompile on every run: :func:`enable` first
checks, once per folder, that a program it compiles loads back, and keeps the cache off
where it does not.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
from jax.experimental.compilation_cache import compilation_cache

ENV_VARIABLE = "JPEFT_COMPILE_CACHE"
"""A folder for the cache, or ``off``; the ``--compile-cache`` option overrides it."""

MIN_COMPILE_SECONDS = 0.2
"""Programs that compile faster than this are not stored (JAX's default is 1 s, which
leaves out the eval loss and the generation programs of a small model)."""

MAX_BYTES = 1 << 30
"""The cache's size limit: JAX evicts the least recently used programs beyond it (a
SmolLM2 training step takes about 200 KB)."""

_VERDICT = "loads-here"
"""The file, in the cache folder, that records whether this CPU loads its cached programs."""

_log = logging.getLogger(__name__)


def default_directory() -> Path:
    """``$XDG_CACHE_HOME/jpeft/xla/<jaxlib version>-<CPU fingerprint>`` (``~/.cache`` when
    ``XDG_CACHE_HOME`` is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jpeft" / "xla" / f"jaxlib-{jaxlib.__version__}-{_cpu_fingerprint()}"


def _cpu_fingerprint() -> str:
    """A short hash of the CPU's model and instruction-set flags (``/proc/cpuinfo`` on
    Linux, :func:`platform.processor` elsewhere)."""
    description = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            fields = dict(map(str.strip, line.split(":", 1)) for line in f if ":" in line)
        description += [fields.get("model name", ""), fields.get("flags", "")]
    except OSError:
        pass
    return hashlib.sha256("\n".join(description).encode()).hexdigest()[:16]


def enable(directory: str | os.PathLike | None = None) -> Path | None:
    """Turns JAX's persistent compilation cache on for this process and returns its folder,
    or returns None and leaves it off.

    Args:
      directory: the cache folder, ``"off"``, or None for :data:`ENV_VARIABLE`, else
        :func:`default_directory`. Where JAX's own ``jax_compilation_cache_dir`` is set
        already (``JAX_COMPILATION_CACHE_DIR``), that folder is kept as it is.

    The cache stays off where the folder cannot be written, or where this CPU does not
    load the programs it caches (checked once per folder, see the module docstring);
    either is logged, never raised: a run without the cache is only slower.
    """
    if directory is None:
        directory = os.environ.get(ENV_VARIABLE) or None
    if str(directory).lower() == "off":
        return None
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    folder = Path(directory) if directory is not None else default_directory()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        usable = _loads_here(folder)
    except OSError as err:
        _log.warning("compiled programs are not cached: %s", err)
        return None
    if not usable:
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    compilation_cache.reset_cache()  # JAX decides at its first compile whether to use one
    return folder


_PROBE = """
import jax, jax.numpy as jnp
from jax.experimental import serialize_executable as s
x = jnp.ones((4, 4), jnp.float32)
compiled = jax.jit(lambda a: jnp.tanh(a) @ a).lower(x).compile()
loaded = s.deserialize_and_load(*s.serialize(compiled))
assert jnp.array_equal(loaded(x), compiled(x)), "the loaded program computed something else"
"""
"""Compiles a program, serializes it as the cache does and loads it back: in a process of
its own, which a loader crash cannot take down and whose JAX backend is not this one's
(a multi-host run must start ``jax.distributed`` before its first computation)."""


def _loads_here(folder: Path) -> bool:
    """Whether a program compiled here loads back from its serialized form (:data:`_PROBE`);
    the answer is kept in `folder` (:data:`_VERDICT`), so that only a folder's first run
    asks."""
    verdict = folder / _VERDICT
    if verdict.is_file():
        return verdict.read_text(encoding="utf-8").startswith("yes")
    probe = subprocess.run(
        [sys.executable, "-c", _PROBE],
        capture_output=True,
        text=True,
        env={**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"},  # on a GPU: a little
    )
    usable = probe.returncode == 0
    if not usable:
        lines = [line for line in probe.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {probe.returncode}"
        _log.warning(
            "compiled programs are not cached: XLA does not load its own cached programs on "
            "this machine (%s); delete %s to check again",
            reason,
            verdict,
        )
    verdict.write_text("yes\n" if usable else f"no\n{probe.stderr}", encoding="utf-8")
    return usable
