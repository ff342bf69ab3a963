"""``jpeft train`` on several devices and several processes trains the adapter of the
single-device run: two CPU devices in one process, and two processes joined over
127.0.0.1 with gloo (each feeding its half of every batch). One process writes the run's
files, and a multi-process run resumes from its train state to the same adapter."""

from __future__ import annotations

import json
import shutil
import socket
import sys

import cli_fixtures
import numpy as np
import pytest
from test_parallel import _environment, _run

import jpeft

TOLERANCE = 1e-5  # float32: the same update, summed over devices in another order
STEPS = 4

pytestmark = pytest.mark.xdist_group("test_cli_distributed")  # one reference run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return cli_fixtures.make_tiny_chat_model(tmp_path_factory.mktemp("tiny"))


def _train(tiny, out, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "jpeft", "train", str(tiny["model"]), "--data", str(tiny["data"]),
        "--out", str(out), "--rank", "4", "--targets", "all-linear", "--lr", "1e-2",
        "--batch-size", "4", "--max-steps", str(STEPS), "--save-every", "2", "--warmup-steps",
        "1", "--eval-split", "0.2", "--eval-every", "2", "--no-progress", *extra,
    ]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(tiny, out, *extra: str) -> None:
    port = str(_free_port())
    commands = [
        _train(
            tiny,
            out,
            "--coordinator",
            f"127.0.0.1:{port}",
            "--num-processes",
            "2",
            "--process-id",
            str(i),
            *extra,
        )  # fmt: skip
        for i in range(2)
    ]
    logs = [out.parent / f"{out.name}-{i}.log" for i in range(2)]
    _run(commands, [_environment()] * 2, logs)


def _adapter(tiny, out) -> dict[str, np.ndarray]:
    _, base = jpeft.models.from_pretrained(tiny["model"])
    params = jpeft.load_adapter(base, out / "adapter")
    return {
        f"{'.'.join(map(str, keys))}.{f}": np.asarray(getattr(node, f))
        for keys, node in jpeft.tree.iter_nodes(jpeft.tree.extract(params))
        for f in ("a", "b")
    }


def _assert_close(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=0, atol=TOLERANCE,
                                   err_msg=name)  # fmt: skip


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """The single-device run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    _run([_train(tiny, out)], [_environment()], [out.parent / "log"])
    return out


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_devices_in_one_process_train_the_single_device_adapter(tiny, reference, tmp_path):
    out = tmp_path / "run"
    env = _environment(XLA_FLAGS="--xla_force_host_platform_device_count=2")
    _run([_train(tiny, out)], [env], [tmp_path / "log"])
    _assert_close(_adapter(tiny, out), _adapter(tiny, reference))
    for got, want in zip(_metrics(out), _metrics(reference), strict=True):
        assert got["step"] == want["step"] and got["tokens"] == want["tokens"]
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
        if "eval_loss" in want:
            np.testing.assert_allclose(got["eval_loss"], want["eval_loss"], rtol=1e-5)


def test_two_processes_train_write_once_and_resume(tiny, reference, tmp_path):
    out = tmp_path / "run"
    _two_processes(tiny, out)
    _assert_close(_adapter(tiny, out), _adapter(tiny, reference))
    steps = [r["step"] for r in _metrics(out)]
    assert steps == list(range(1, STEPS + 1))  # one writer: every step logged once
    assert (out / "hf_adapter" / "adapter_config.json").is_file() and (out / "loss.png").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2", "4"]

    # As if the run had stopped after step 2: drop what came later, then resume.
    shutil.rmtree(out / "checkpoints" / "4")
    shutil.rmtree(out / "adapter")
    _two_processes(tiny, out, "--resume")
    _assert_close(_adapter(tiny, out), _adapter(tiny, reference))
    assert [r["step"] for r in _metrics(out)] == list(range(1, STEPS + 1))
    assert "resuming from step 2" in (tmp_path / "run-0.log").read_text()


def test_a_batch_that_does_not_split_over_the_devices_is_refused(tiny, tmp_path, monkeypatch):
    import jax

    monkeypatch.setattr(jax, "device_count", lambda: 3)  # as under 3 forced CPU devices
    code, _, stderr = cli_fixtures.run(*_train(tiny, tmp_path / "run")[3:])
    assert code == 2
    assert "batch_size 4 must be a multiple of the number of devices (3" in stderr


def test_distributed_flags_go_to_jpeft_distributed(tiny, tmp_path):
    args = ["train", tiny["model"], "--data", tiny["data"], "--out", tmp_path / "out"]
    # Half a multi-host set-up: jpeft.distributed names what is missing.
    code, _, stderr = cli_fixtures.run(*args, "--coordinator", "127.0.0.1:1234")
    assert code == 2 and stderr.startswith("jpeft: error: ") and "num_processes" in stderr
    assert "Traceback" not in stderr
