"""Runs over many processes (hosts): joining them into one JAX run, and reading arrays back.

A multi-process run starts the same program on every process. Each one first calls
:func:`initialize_distributed`; from then on :func:`jax.devices` lists every process's
devices, so a :func:`jpeft.parallel.make_mesh` mesh spans them all and the sharded step
of :mod:`jpeft.parallel` computes over all of them. Each process feeds its own rows
(:func:`jpeft.parallel.shard_batch`), and :func:`to_host` gathers the results to every
process, e.g. for process 0 to save them.

Example::

    distributed.initialize_distributed()      # JPEFT_COORDINATOR etc. from the environment
    mesh = parallel.make_mesh()               # every process's devices
    ...                                       # place, step, as in jpeft.parallel
    params = distributed.to_host(jpeft.combine(trainable, frozen))
    if jax.process_index() == 0:
        jpeft.save_adapter(params, "out/adapter")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

ENV_COORDINATOR = "JPEFT_COORDINATOR"
"""The environment variable :func:`initialize_distributed` reads the coordinator from."""
ENV_NUM_PROCESSES = "JPEFT_NUM_PROCESSES"
"""The environment variable :func:`initialize_distributed` reads the process count from."""
ENV_PROCESS_ID = "JPEFT_PROCESS_ID"
"""The environment variable :func:`initialize_distributed` reads this process's index from."""
_ENV = {
    "coordinator": ENV_COORDINATOR,
    "num_processes": ENV_NUM_PROCESSES,
    "process_id": ENV_PROCESS_ID,
}


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    *,
    cpu_collectives: str | None = "gloo",
) -> None:
    """Joins this process to a multi-process JAX run (:func:`jax.distributed.initialize`).

    Each setting comes from its argument, else from the environment (``JPEFT_COORDINATOR``,
    ``JPEFT_NUM_PROCESSES``, ``JPEFT_PROCESS_ID``). Give all three or none: with none,
    JAX detects the cluster itself (Slurm, Open MPI, Kubernetes, Cloud TPU, or its own
    ``JAX_COORDINATOR_ADDRESS``…). Call it on every process before any other JAX work.
    The coordinator (process 0) listens on all interfaces unless
    ``JAX_COORDINATOR_BIND_ADDRESS`` says otherwise.

    Args:
      coordinator: ``host:port`` of process 0's coordination service.
      num_processes: the number of processes.
      process_id: this process's index, ``0 <= process_id < num_processes``.
      local_device_ids: the local devices this process uses (default: all).
      cpu_collectives: the CPU collectives implementation set before initialising
        (``jax_cpu_collectives_implementation``; ``"gloo"`` lets CPU devices of different
        processes compute together), or None to leave JAX's setting.

    Raises:
      ValueError: only some of the three settings given, or a malformed value (naming the
        argument or environment variable it came from).

    Example::

      # on each of two machines; or JPEFT_COORDINATOR=10.0.0.1:1234 JPEFT_NUM_PROCESSES=2
      # JPEFT_PROCESS_ID=<i> in the environment and no arguments
      distributed.initialize_distributed("10.0.0.1:1234", num_processes=2, process_id=i)
      mesh = parallel.make_mesh()           # every process's devices
    """
    arguments = {
        "coordinator": coordinator,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    settings = {name: _setting(name, value) for name, value in arguments.items()}
    missing = [name for name, setting in settings.items() if setting is None]
    if 0 < len(missing) < len(settings):
        have = ", ".join(
            f"{name}={setting[0]!r} (from {setting[1]})"
            for name, setting in settings.items()
            if setting is not None
        )
        lacking = ", ".join(f"{name} (argument or {_ENV[name]})" for name in missing)
        raise ValueError(
            f"multi-process set-up is half specified: got {have} but no {lacking}; give all "
            "three, or none to let JAX detect the cluster"
        )
    if not missing:
        _check_settings(settings)
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    value = {name: None if setting is None else setting[0] for name, setting in settings.items()}
    jax.distributed.initialize(
        coordinator_address=value["coordinator"],
        num_processes=value["num_processes"],
        process_id=value["process_id"],
        local_device_ids=local_device_ids,
    )


def to_host(params: Any) -> Any:
    """NumPy copies of a tree's arrays, on every process, e.g. to save them.

    A fully replicated array is read from a local copy; an array sharded across processes
    is gathered (:func:`jax.experimental.multihost_utils.process_allgather`), which is a
    collective: in a multi-process run call this on every process.

    Example::

      params = distributed.to_host(jpeft.combine(trainable, frozen))
      if jax.process_index() == 0:
          jpeft.save_adapter(params, "out/adapter")
    """

    def fetch(x: Any) -> Any:
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(fetch, params)


# ---------------------------------------------------------------------------- private


def _setting(name: str, value: Any) -> tuple[Any, str] | None:
    """``(value, where it came from)`` of a distributed setting, or None if unset."""
    if value is not None:
        return value, "argument"
    env = _ENV[name]
    text = os.environ.get(env, "").strip()
    if not text:
        return None
    if name == "coordinator":
        return text, env
    try:
        return int(text), env
    except ValueError:
        raise ValueError(f"{env} must be an integer, got {text!r}") from None


def _check_settings(settings: dict[str, tuple[Any, str]]) -> None:
    (coordinator, coordinator_from) = settings["coordinator"]
    (count, count_from) = settings["num_processes"]
    (index, index_from) = settings["process_id"]
    host, _, port = str(coordinator).rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(
            f"coordinator (from {coordinator_from}) must be 'host:port', got {coordinator!r}"
        )
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"num_processes (from {count_from}) must be at least 1, got {count!r}")
    if not isinstance(index, int) or not 0 <= index < count:
        raise ValueError(f"process_id (from {index_from}) must be in [0, {count}), got {index!r}")
