"""The command line's persistent cache of compiled programs (jpeft.compile_cache)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax

from jpeft import compile_cache

# Runs in a process of its own (enabling the cache changes JAX's global configuration):
# enables the cache in a folder, compiles one program and reports what the cache did.
_RUN = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp
    from jax import monitoring
    from jpeft import compile_cache

    compile_cache.MIN_COMPILE_SECONDS = 0.0  # store even this small program
    events = []
    monitoring.register_event_listener(lambda event, **_: events.append(event))
    folder = compile_cache.enable(sys.argv[1] if len(sys.argv) > 1 else None)
    value = jax.jit(lambda x: jnp.tanh(x) @ x)(jnp.full((8, 8), 0.5))
    print(json.dumps({
        "folder": str(folder),
        "hits": events.count("/jax/compilation_cache/cache_hits"),
        "misses": events.count("/jax/compilation_cache/cache_misses"),
        "value": float(value[0, 0]),
    }))
    """
)


def _run(folder=None, variable: str = "") -> dict:
    env = {**os.environ, "JPEFT_COMPILE_CACHE": variable, "JAX_COMPILATION_CACHE_DIR": ""}
    out = subprocess.run(
        [sys.executable, "-c", _RUN, *([] if folder is None else [str(folder)])],
        capture_output=True, text=True, env=env, check=True,
    )
    return json.loads(out.stdout.splitlines()[-1])


def test_a_second_process_loads_the_program_the_first_compiled(tmp_path):
    first, second = _run(tmp_path / "cache"), _run(tmp_path / "cache")
    assert first["folder"] == second["folder"] == str(tmp_path / "cache")
    assert first["hits"] == 0 and first["misses"] >= 1
    assert (second["hits"], second["misses"]) == (first["misses"], 0)
    assert second["value"] == first["value"]
    assert (tmp_path / "cache" / "loads-here").read_text().startswith("yes")


def test_off_and_a_folder_whose_programs_do_not_load_leave_the_cache_off(tmp_path):
    assert compile_cache.enable("off") is None
    (tmp_path / "loads-here").write_text("no\nearlier probe failed\n")
    assert compile_cache.enable(tmp_path) is None
    assert not jax.config.jax_compilation_cache_dir


def test_a_cpu_that_rejects_its_cached_programs_is_found_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(
        compile_cache, "_PROBE", "raise SystemExit('Target machine feature +x is not supported')"
    )
    assert compile_cache.enable(tmp_path) is None
    assert "+x is not supported" in caplog.text and "not cached" in caplog.text
    verdict = (tmp_path / "loads-here").read_text()
    assert verdict.startswith("no") and "+x is not supported" in verdict
    monkeypatch.setattr(compile_cache, "_PROBE", "raise SystemExit('probed twice')")
    assert compile_cache.enable(tmp_path) is None  # answered by the verdict, not a probe
    assert "probed twice" not in caplog.text


def test_an_unwritable_folder_runs_without_the_cache(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert compile_cache.enable(blocker / "cache") is None
    assert "not cached" in caplog.text
    assert not jax.config.jax_compilation_cache_dir


def test_jax_own_cache_folder_is_kept(tmp_path):
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    try:
        assert compile_cache.enable(tmp_path / "other") == tmp_path
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
    assert not (tmp_path / "other").exists()


def test_the_default_folder_is_per_jaxlib_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = compile_cache.default_directory()
    assert folder.parent == tmp_path / "jpeft" / "xla"
    assert folder.name == f"jaxlib-{jax.__version__}-{compile_cache._cpu_fingerprint()}"
    monkeypatch.setattr(compile_cache.platform, "machine", lambda: "another-cpu")
    assert compile_cache.default_directory() != folder


def test_the_environment_variable_names_the_folder_or_turns_it_off(tmp_path, monkeypatch):
    assert _run(variable=str(tmp_path / "cache"))["folder"] == str(tmp_path / "cache")
    monkeypatch.setenv(compile_cache.ENV_VARIABLE, "OFF")
    assert compile_cache.enable() is None
