"""jpeft.host_memory: the compiler's freed memory is returned after each compilation inside
the context, and only there."""

from __future__ import annotations

import ctypes.util
import sys

import jax
import jax.numpy as jnp
import pytest

from jpeft import host_memory


def test_each_compile_inside_the_context_releases_memory_once(monkeypatch):
    released = []
    monkeypatch.setattr(host_memory, "release_free_memory", lambda: released.append(1))
    x = jnp.ones(7)
    triple = jax.jit(lambda v: v * 3 + 1)
    with host_memory.released_after_compiles():
        triple(x).block_until_ready()
        assert len(released) == 1
        triple(x).block_until_ready()  # compiled already
        assert len(released) == 1
        jax.jit(lambda v: v - 2)(x).block_until_ready()
        assert len(released) == 2
    jax.jit(lambda v: v - 5)(x).block_until_ready()
    assert len(released) == 2  # outside: nothing


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None,
    reason="malloc_trim is glibc's",
)
def test_release_trims_where_glibc_is():
    assert host_memory.release_free_memory() is True
