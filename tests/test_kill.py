"""Processes killed with SIGKILL in the middle of a save, for real (tests/kill_worker.py):
before every file system call of the save in turn, and at random moments of it. What was
saved before still loads, bitwise, or the new save is there whole; the next save into the
folder works and leaves nothing of the killed one; and a ``jpeft train`` killed while it
saves resumes to the adapter of a run that was never killed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from kill_worker import _trees
from cli_fixtures import make_tiny_chat_model, run

import jpeft
from jpeft import checkpoint, lora, train_state, tree

WORKER = Path(__file__).with_name("kill_worker.py")
TIMED_KILLS = 8


def _worker(*args) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(WORKER), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    return result


def _sweep(kind: str, root: Path) -> list[tuple[Path, dict]]:
    """The folders the worker's children were killed in (or finished), oldest first."""
    result = _worker(kind, root, TIMED_KILLS)
    assert result.returncode == 0, result.stderr
    cases = []
    for name in sorted(p.stem for p in root.glob("*.json")):
        outcome = json.loads((root / f"{name}.json").read_text())
        event = root / f"{name}.event"
        if event.exists():
            outcome.update(json.loads(event.read_text()))
        cases.append((root / name, outcome))
    return cases


def _arrays(params) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree.split(params)[0])]


def _which(params, versions: list) -> int:
    """The index of the version in `versions` that `params` equals bitwise (-1: none)."""
    loaded = _arrays(params)
    for i, version in enumerate(versions):
        want = _arrays(version)
        if len(want) == len(loaded) and all(map(np.array_equal, want, loaded)):
            return i
    return -1


def _base():
    params, _ = _trees(0)
    return jax.tree.map(lambda x: x.w, params, is_leaf=lambda x: isinstance(x, lora.LoraWeight))


def _check_monotonic(cases, seen: list[int]) -> None:
    """Killed before call n: the old checkpoint up to the commit call, the new one after."""
    events = [s for (folder, _), s in zip(cases, seen, strict=True) if "event" in folder.name]
    assert events == sorted(events), events
    assert events[0] == 0 and events[-1] == 1, "the sweep never saw both checkpoints"


def test_an_adapter_save_killed_at_any_moment_leaves_one_whole_adapter(tmp_path):
    cases = _sweep("adapter", tmp_path)
    versions = [_trees(seed)[0] for seed in range(3)]
    base, seen = _base(), []
    for folder, outcome in cases:
        what = f"{folder.name}: {outcome}"
        loaded = checkpoint.load_adapter(base, folder)
        seen.append(_which(loaded, versions))
        assert seen[-1] in (0, 1), f"{what}: neither the old nor the new adapter"
        if outcome["outcome"] == "finished":
            assert seen[-1] == 1, what
        # The next save works and sweeps away what the killed one left.
        checkpoint.save_adapter(versions[2], folder)
        assert _which(checkpoint.load_adapter(base, folder), versions) == 2, what
        names = sorted(p.name for p in folder.iterdir())
        arrays = checkpoint.read_adapter_metadata(folder)["arrays"]
        assert names == sorted([checkpoint.METADATA_FILE, arrays]), f"{what}: {names}"
    assert len(cases) >= 20 + TIMED_KILLS  # one case per file system call of the save
    _check_monotonic(cases, seen)


def test_a_train_state_save_killed_at_any_moment_leaves_a_whole_step(tmp_path):
    cases = _sweep("train_state", tmp_path)
    versions = [_trees(seed) for seed in range(3)]
    like_params, like_opt = versions[0]
    seen = []
    for folder, outcome in cases:
        what = f"{folder.name}: {outcome}"
        restored = train_state.restore_train_state(
            folder, params=like_params, opt_state_like=like_opt
        )
        index = _which((restored.params, restored.opt_state), versions)
        seen.append(index)
        assert index in (0, 1), f"{what}: neither step's state"
        assert restored.step == index + 1 and restored.data_position == index, what
        assert train_state.latest_step(folder) == index + 1, what
        if outcome["outcome"] == "finished":
            assert index == 1, what
        # A resumed run saves its next step there.
        params, opt_state = versions[2]
        train_state.save_train_state(
            folder, 3, params=params, opt_state=opt_state, data_position=2, rng=restored.rng
        )
        again = train_state.restore_train_state(folder, params=like_params, opt_state_like=like_opt)
        assert again.step == 3, what
        assert _which((again.params, again.opt_state), versions) == 2, what
    _check_monotonic(cases, seen)


STEPS = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny"))


def _args(tiny, out) -> list[str]:
    return [
        "train", tiny["model"], "--data", tiny["data"], "--out", out, "--rank", "4",
        "--lr", "3e-2", "--batch-size", "4", "--max-steps", STEPS, "--save-every", "2",
        "--no-progress",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory):
    """The adapter of a run never killed."""
    out = tmp_path_factory.mktemp("straight") / "run"
    code, _, stderr = run(*_args(tiny, out))
    assert code == 0, stderr
    model, base = jpeft.models.from_pretrained(tiny["model"])
    return base, checkpoint.load_adapter(base, out / "adapter")


@pytest.mark.parametrize(
    "function, call, match, resumes_from",
    [
        ("save_train_state", 2, "rename", 2),  # the step-4 folder's commit
        ("save_train_state", 3, "unlink", 6),  # deleting step 2, after step 6 is committed
        ("save_adapter", 1, "replace", 6),  # the adapter's commit, after the last step
    ],
    ids=["step-commit", "step-cleanup", "adapter-commit"],
)
def test_a_killed_run_resumes_to_the_adapter_of_a_run_never_killed(
    function, call, match, resumes_from, straight, tiny, tmp_path
):
    out = tmp_path / "run"
    args = _args(tiny, out)
    killed = _worker("cli", function, call, match, *args)
    assert killed.returncode == -9, killed.stderr  # SIGKILL
    assert train_state.latest_step(out / "checkpoints") == resumes_from

    code, stdout, stderr = run(*args, "--resume")
    assert code == 0, stderr
    assert f"resuming from step {resumes_from}" in stdout
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    base, expected = straight
    resumed = checkpoint.load_adapter(base, out / "adapter")
    assert _which(resumed, [expected]) == 0, "the resumed run's adapter differs"
