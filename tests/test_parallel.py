"""jpeft.parallel, jpeft.distributed: sharded, pmap-ed and multi-process training equal the
single-device step.

JAX fixes the number of CPU devices when its backend starts, and this pytest process has
already started it with one device, so the multi-device runs happen in subprocesses
(tests/multihost_worker.py) that write their results to tmp_path.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import multihost_worker
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import jpeft
from jpeft import checkpoint, distributed, lora, parallel

WORKER = Path(__file__).with_name("multihost_worker.py")
TOLERANCE = 1e-5
TIMEOUT_S = 240  # generous: these tests share two CPU cores with the rest of the suite


def _environment(**extra: str) -> dict[str, str]:
    """The workers' environment: no proxies (the coordinator is on loopback), no
    inherited JAX or jpeft multi-process settings but conftest's XLA optimisation level;
    an `XLA_FLAGS` in `extra` is added to that."""
    env = {
        k: v
        for k, v in os.environ.items()
        if "proxy" not in k.lower() and not k.startswith(("JAX_", "JPEFT_", "XLA_"))
    }
    env["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if f.startswith("--xla_backend_optimization_level")]
    env["XLA_FLAGS"] = " ".join([*flags, *extra.pop("XLA_FLAGS", "").split()])
    return {**env, **extra}


def _run(commands: list[list[str]], envs: list[dict], logs: list[Path]) -> None:
    """Runs the commands at once; fails (killing them all) if one fails or they take longer
    than TIMEOUT_S, showing each one's output."""
    procs = []
    try:
        for command, env, log in zip(commands, envs, logs, strict=True):
            with open(log, "w") as out:
                procs.append(
                    subprocess.Popen(
                        command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=WORKER.parent
                    )
                )
        deadline = time.monotonic() + TIMEOUT_S
        for proc in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        pytest.fail(f"workers still running after {TIMEOUT_S} s:\n{_tails(logs)}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if any(proc.returncode for proc in procs):
        pytest.fail(f"a worker failed ({[p.returncode for p in procs]}):\n{_tails(logs)}")


def _tails(logs: list[Path]) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text()[-4000:]}" for log in logs)


def _runs(npz: Path) -> dict[str, dict[str, np.ndarray]]:
    runs: dict[str, dict[str, np.ndarray]] = {}
    with np.load(npz) as data:
        for key in data.files:
            run, leaf = key.split("/", 1)
            runs.setdefault(run, {})[leaf] = data[key]
    return runs


def _assert_same(actual: dict, expected: dict, atol: float, what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for leaf in expected:
        np.testing.assert_allclose(
            actual[leaf], expected[leaf], rtol=0, atol=atol, err_msg=f"{what}: {leaf}"
        )


def test_sharded_and_pmap_steps_equal_single_device(tmp_path):
    _run(
        [[sys.executable, str(WORKER), "devices", str(tmp_path)]],
        [_environment()],
        [tmp_path / "devices.log"],
    )
    runs = _runs(tmp_path / "devices.npz")
    facts = json.loads((tmp_path / "devices.json").read_text())
    assert facts["devices"] == 4

    single = runs["single"]
    assert len(single) == 14  # a and b of the 7 linear layers ("all-linear")
    moved = max(np.abs(single[k] - runs["init"][k]).max() for k in single)
    assert moved > 100 * TOLERANCE  # the steps changed the adapter: equality means something
    for run in ("dp", "fsdp", "pmap"):
        _assert_same(runs[run], single, TOLERANCE, run)
        # losses and gradient norms: AdamW alone would hide a wrongly scaled gradient
        np.testing.assert_allclose(facts[run]["losses"], facts["single_losses"], rtol=1e-5)
        assert facts[run]["later_compiles"] == 0, run  # results keep the arguments' placement

    dp, fsdp = facts["dp"], facts["fsdp"]
    for run in (dp, fsdp):
        assert run["q_proj_a"] == [[2, 32, 4]]  # adapters replicated
        assert run["q_proj_a_mu"] == [[2, 32, 4]]  # Adam moments follow them
    # data parallel: weights replicated, 8 rows over 4 devices
    assert dp["q_proj_w"] == [[2, 32, 32]] and dp["embed"] == [[97, 32]]
    assert dp["batch"] == [[2, 12]]
    # FSDP over 2: one dimension halved (never the layer axis), the vocabulary (97) left
    # whole; gradient accumulation splits each micro-batch of 4 rows over 4 devices
    assert fsdp["q_proj_w"] == [[2, 16, 32]]
    assert fsdp["up_proj_w"] == [[2, 32, 24]]
    assert fsdp["embed"] == [[97, 16]]
    assert fsdp["norm"] == [[2, 16]]
    assert fsdp["batch"] == [[2, 1, 12]]
    assert facts["uneven_batch_error"] == (
        "the global batch has 6 rows (6 per process), not divisible by the 4 devices of the mesh"
    )


def test_two_processes_train_together_and_save_once(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    bind = {"JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}"}
    from_env = {
        "JPEFT_COORDINATOR": f"127.0.0.1:{port}",
        "JPEFT_NUM_PROCESSES": "2",
        "JPEFT_PROCESS_ID": "1",
    }
    _run(
        [[sys.executable, str(WORKER), "host", str(i), str(port), str(tmp_path)] for i in range(2)],
        [_environment(**bind), _environment(**from_env)],
        [tmp_path / "host0.log", tmp_path / "host1.log"],
    )
    first, second = _runs(tmp_path / "host0.npz"), _runs(tmp_path / "host1.npz")
    facts = [json.loads((tmp_path / f"host{i}.json").read_text()) for i in range(2)]
    for fact in facts:
        counts = fact["process_count"], fact["device_count"], fact["local_device_count"]
        assert counts == (2, 4, 2)
        assert fact["up_proj_w"] == [[2, 32, 24]]  # FSDP within each process
    assert facts[0]["losses"] == facts[1]["losses"]
    assert facts[0]["later_compiles"] == facts[1]["later_compiles"] == 0

    sharded = first["sharded"]
    for leaf, value in sharded.items():  # both processes hold the same adapter, bit for bit
        np.testing.assert_array_equal(second["sharded"][leaf], value, err_msg=leaf)
    _assert_same(sharded, first["single"], TOLERANCE, "two processes vs one device")
    np.testing.assert_allclose(facts[0]["losses"], facts[0]["single_losses"], rtol=1e-5)

    _, params = multihost_worker.base()
    restored = checkpoint.load_adapter(params, tmp_path / "adapter")
    saved = multihost_worker.flat(jpeft.split(restored)[0])
    assert saved.keys() == sharded.keys()
    for leaf, value in sharded.items():
        np.testing.assert_array_equal(saved[leaf], value, err_msg=leaf)
    assert checkpoint.read_adapter_metadata(tmp_path / "adapter")["config"] == {"r": 4}
    written = sorted(p.name for p in (tmp_path / "adapter").iterdir())  # one save, one folder
    assert len(written) == 2 and written[0] == checkpoint.METADATA_FILE, written
    assert written[1].startswith("jpeft_arrays_"), written


def _tiny_tree():
    w = jax.numpy.zeros((2, 8, 6))  # stacked [l, in, out]
    params = {
        "model": {
            "layers": {
                "self_attn": {"q_proj": {"weight": w}},
                "norm": {"weight": np.zeros((2, 8))},
            },
            "embed_tokens": {"weight": np.zeros((9, 4))},
        },
        "lm_head": {"weight": np.zeros((4, 9))},
    }
    params = lora.apply(params, rank=2, targets=["q_proj"], key=jax.random.key(0))
    trainable, frozen = jpeft.split(params)
    optimizer = optax.adamw(1e-3)
    return trainable, frozen, optimizer.init(trainable)


MESH = jax.sharding.AbstractMesh((2, 2), parallel.BATCH_AXES)


def test_fsdp_rule_shards_largest_divisible_dimension_after_the_layer_axis():
    trainable, frozen, opt_state = _tiny_tree()
    specs = parallel.train_specs(MESH, trainable, frozen, opt_state, min_shard_size=0)
    q = specs.frozen["model"]["layers"]["self_attn"]["q_proj"]["weight"]
    assert q.w == P(None, parallel.FSDP)  # [2, 8, 6]: 8 over the layer axis
    assert q.scale == P()  # [2]: only the layer axis
    assert specs.frozen["model"]["layers"]["norm"]["weight"] == P(None, parallel.FSDP)
    assert specs.frozen["model"]["embed_tokens"]["weight"] == P(None, parallel.FSDP)  # 9 odd
    assert specs.frozen["lm_head"]["weight"] == P(parallel.FSDP)  # [4, 9]
    adapter = specs.trainable["model"]["layers"]["self_attn"]["q_proj"]["weight"]
    assert (adapter.a, adapter.b) == (P(), P())  # replicated
    assert q.a is None and adapter.w is None  # each half keeps the other's Nones
    assert all(spec == P() for spec in jax.tree.leaves(specs.opt_state))

    big = parallel.train_specs(MESH, trainable, frozen, opt_state, min_shard_size=64)
    assert big.frozen["model"]["layers"]["self_attn"]["q_proj"]["weight"].w == P(
        None, parallel.FSDP
    )  # 96 elements
    assert big.frozen["lm_head"]["weight"] == P()  # 36 elements: replicated


def test_rules_override_both_halves_and_optimizer_state_follows():
    trainable, frozen, opt_state = _tiny_tree()
    rules = [(r"q_proj\.weight\.a$", P(None, parallel.FSDP)), (r"^lm_head", P(None, None))]
    specs = parallel.train_specs(MESH, trainable, frozen, opt_state, rules=rules, min_shard_size=0)
    assert specs.trainable["model"]["layers"]["self_attn"]["q_proj"]["weight"].a == P(
        None, parallel.FSDP
    )
    assert specs.frozen["lm_head"]["weight"] == P(None, None)
    adam = specs.opt_state[0]
    for moment in (adam.mu, adam.nu):
        node = moment["model"]["layers"]["self_attn"]["q_proj"]["weight"]
        assert (node.a, node.b) == (P(None, parallel.FSDP), P())
    assert adam.count == P()
    with pytest.raises(ValueError, match=r"embed_tokens.*dimension 0 \(9\) is not divisible by 4"):
        parallel.train_specs(
            MESH, trainable, frozen, opt_state, rules=[(r"embed_tokens", P(parallel.BATCH_AXES))]
        )
    with pytest.raises(ValueError, match="no axis 'model'"):
        parallel.train_specs(MESH, trainable, frozen, opt_state, rules=[("lm_head", P("model"))])
    with pytest.raises(ValueError, match="more entries than the array has dimensions"):
        parallel.train_specs(
            MESH, trainable, frozen, opt_state, rules=[("norm", P(None, None, None))]
        )


def test_make_mesh_checks_the_device_count():
    n = jax.device_count()
    mesh = parallel.make_mesh()
    assert dict(mesh.shape) == {"data": n, "fsdp": 1}
    assert parallel.make_mesh(data=1, fsdp=n).shape["fsdp"] == n
    with pytest.raises(ValueError, match=f"fsdp={n + 1} must be a positive divisor of the {n} "):
        parallel.make_mesh(fsdp=n + 1)
    with pytest.raises(
        ValueError, match=f"data × fsdp = {n + 1} × 1 = {n + 1}, but there are {n} "
    ):
        parallel.make_mesh(data=n + 1)


def test_shard_batch_places_rows_on_both_axes_and_to_host_copies():
    mesh = parallel.make_mesh()
    ids = np.arange(15, dtype=np.int32).reshape(3, 5)
    batch = parallel.shard_batch({"input_ids": ids}, mesh)
    assert batch["input_ids"].sharding == parallel.batch_sharding(mesh)
    assert parallel.batch_sharding(mesh, grad_accum=2).spec == P(None, parallel.BATCH_AXES)
    host = distributed.to_host({"ids": batch["input_ids"], "none": None})
    assert type(host["ids"]) is np.ndarray and host["none"] is None
    np.testing.assert_array_equal(host["ids"], ids)


@pytest.mark.parametrize(
    "arguments, env, message",
    [
        (
            {"coordinator": "127.0.0.1:1234"},
            {},
            r"got coordinator='127.0.0.1:1234' \(from argument\) but no num_processes "
            r"\(argument or JPEFT_NUM_PROCESSES\), process_id \(argument or JPEFT_PROCESS_ID\)",
        ),
        (
            {},
            {"JPEFT_PROCESS_ID": "1", "JPEFT_NUM_PROCESSES": "2"},
            r"process_id=1 \(from JPEFT_PROCESS_ID\).*but no coordinator",
        ),
        (
            {"num_processes": 2, "process_id": 0},
            {"JPEFT_COORDINATOR": "10.0.0.1"},
            r"coordinator \(from JPEFT_COORDINATOR\) must be 'host:port', got '10.0.0.1'",
        ),
        (
            {"coordinator": "h:1", "num_processes": 2, "process_id": 2},
            {},
            r"process_id \(from argument\) must be in \[0, 2\), got 2",
        ),
        (
            {"coordinator": "h:1", "num_processes": 0, "process_id": 0},
            {},
            r"num_processes \(from argument\) must be at least 1",
        ),
        (
            {"coordinator": "h:1", "process_id": 0},
            {"JPEFT_NUM_PROCESSES": "two"},
            r"JPEFT_NUM_PROCESSES must be an integer, got 'two'",
        ),
    ],
)
def test_initialize_distributed_rejects_incomplete_settings(monkeypatch, arguments, env, message):
    for name in (
        distributed.ENV_COORDINATOR,
        distributed.ENV_NUM_PROCESSES,
        distributed.ENV_PROCESS_ID,
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        distributed.initialize_distributed(**arguments)
    assert not jax.distributed.is_initialized()
