"""Processes killed with SIGKILL in the middle of a checkpoint save (run by test_kill.py).

A save's file system calls made from Python (``os.mkdir``, ``os.makedirs``, ``os.rename``,
``os.replace``, ``os.unlink``, ``os.rmdir`` and ``open`` for writing) are counted, and the
process sends itself SIGKILL instead of making the n-th one: the folder is left exactly as
a crash at that moment leaves it. Orbax writes the array bytes from C++ (tensorstore), where
no Python call is seen; kills after a random delay land there.

Usage:
  python tests/kill_worker.py adapter ROOT DELAYS
  python tests/kill_worker.py train_state ROOT DELAYS
      A first checkpoint is saved into ROOT/template. For n = 1, 2, ... until a save
      completes, a copy of it, ROOT/event<n>, gets a second checkpoint from a forked child
      killed before the n-th call of that save; then in DELAYS more copies (ROOT/timed<i>)
      a child is killed from outside a random time into the save. ROOT/<name>.json says how
      each child ended, ROOT/<name>.event before which call it was killed.
  python tests/kill_worker.py cli FUNCTION CALL MATCH ARGS...
      ``jpeft ARGS...``, killed in the CALL-th call of FUNCTION (save_train_state or
      save_adapter) before its first file system call whose description holds MATCH.
"""

from __future__ import annotations

import builtins
import json
import os
import random
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

_CALLS = ("mkdir", "makedirs", "rename", "replace", "unlink", "rmdir")


class _KillSwitch:
    """Counts the file system calls while armed (those whose description holds `match`);
    SIGKILLs this process before call `at`, saying which in the JSON file `log`."""

    def __init__(self, at: int, log: Path | None = None, match: str = ""):
        self.at, self.log, self.match, self.count, self.armed = at, log, match, 0, False
        self._open = builtins.open
        for name in _CALLS:
            setattr(os, name, self._counted(name, getattr(os, name)))
        builtins.open = self._counted_open

    def _event(self, what: str) -> None:
        if not self.armed or self.match not in what:
            return
        self.count += 1
        if self.count == self.at:
            if self.log is not None:
                with self._open(self.log, "w") as file:
                    json.dump({"killed_before": what}, file)
            os.kill(os.getpid(), signal.SIGKILL)

    def _counted(self, name, real):
        def call(path, *args, **kwargs):
            self._event(f"{name} {os.fspath(path)}")
            return real(path, *args, **kwargs)

        return call

    def _counted_open(self, file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            self._event(f"open({mode!r}) {os.fspath(file)}")
        return self._open(file, mode, *args, **kwargs)


def _trees(seed: int):
    """A small LoRA tree and an optimizer-like state over it, values set by `seed` (NumPy:
    no JAX computation, so that a child spends its time saving)."""
    import numpy as np

    from jpeft import lora

    rng = np.random.default_rng(seed)

    def weight():
        a, b = rng.standard_normal((8, 4), np.float32), rng.standard_normal((4, 16), np.float32)
        return lora.LoraWeight(w=np.ones((8, 16), np.float32), a=a, b=b, scale=np.float32(2.0))

    params = {"layers": {"q_proj": {"weight": weight()}, "v_proj": {"weight": weight()}}}
    opt_state = {
        "count": np.int32(seed),
        "mu": rng.standard_normal((3, 8), np.float32),
        "nu": rng.standard_normal((3, 8), np.float32),
    }
    return params, opt_state


def _save(kind: str, folder: Path, seed: int) -> None:
    """Checkpoint number `seed` into `folder`: an adapter, or the train state of step
    ``seed + 1`` (keeping one step, so that a save also deletes the step before)."""
    import numpy as np

    from jpeft import checkpoint, train_state

    params, opt_state = _trees(seed)
    if kind == "adapter":
        checkpoint.save_adapter(params, folder, config={"seed": seed})
    else:
        train_state.save_train_state(
            folder,
            seed + 1,
            params=params,
            opt_state=opt_state,
            data_position=seed,
            rng=np.array([0, seed], np.uint32),
            keep=1,
        )


def _fork(folder: Path, work) -> tuple[int, int]:
    """Runs `work()` in a forked child; ``(pid, fd)``: the fd reads one byte once `work`
    is about to start its save and the duration of the save when it ends."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            work(write)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    os.close(write)
    return pid, read


def _run_child(kind: str, folder: Path, kill_at: int | None, delay: float | None) -> dict:
    """A child that saves checkpoint 1 into `folder` (holding checkpoint 0), killed before
    the `kill_at`-th call or `delay` seconds in: ``{"outcome": "killed" | "finished"}``,
    with the save's duration when it finished."""

    def work(ready: int) -> None:
        switch = _KillSwitch(kill_at or 0, folder.with_suffix(".event"))
        _trees(1)  # imports and NumPy work before the clock starts
        os.write(ready, b"1")
        started = time.perf_counter()
        switch.armed = kill_at is not None
        _save(kind, folder, 1)
        switch.armed = False
        os.write(ready, f"{time.perf_counter() - started}".encode())

    pid, read = _fork(folder, work)
    os.read(read, 1)
    if delay is not None:
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
    duration = os.read(read, 64)
    os.close(read)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return {"outcome": "killed"}
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return {"outcome": "finished", "seconds": float(duration)}
    raise RuntimeError(f"the child saving into {folder} ended with status {status}")


def _sweep(kind: str, root: Path, timed: int) -> None:
    """The children of the module docstring. Nothing here starts JAX's backends, so each
    child starts its own after the fork."""
    import jpeft.checkpoint  # noqa: F401  (imports made once, before the forks)
    import jpeft.train_state  # noqa: F401

    root.mkdir(parents=True, exist_ok=True)
    template = root / "template"
    pid, read = _fork(template, lambda ready: _save(kind, template, 0))
    _, status = os.waitpid(pid, 0)
    os.close(read)
    if status != 0:
        raise RuntimeError(f"the first save into {template} failed with status {status}")

    def run(name: str, kill_at: int | None, delay: float | None) -> dict:
        shutil.copytree(template, root / name)
        result = _run_child(kind, root / name, kill_at, delay)
        (root / f"{name}.json").write_text(json.dumps(result))
        return result

    n, result = 0, {"outcome": "killed"}
    while result["outcome"] == "killed":
        n += 1
        result = run(f"event{n:03d}", n, None)
    rng = random.Random(0)
    for i in range(timed):
        run(f"timed{i:03d}", None, rng.uniform(0, result["seconds"]))


def _cli(function: str, call: int, match: str, argv: list[str]) -> int:
    """``jpeft argv``, killed before the first file system call holding `match` in the
    `call`-th call of `function` (``save_train_state`` or ``save_adapter``)."""
    from jpeft import checkpoint, cli, train_state

    module = train_state if function == "save_train_state" else checkpoint
    switch = _KillSwitch(1, match=match)
    real, calls = getattr(module, function), []

    def counted(*args, **kwargs):
        calls.append(1)
        switch.armed = len(calls) == call
        try:
            return real(*args, **kwargs)
        finally:
            switch.armed = False

    setattr(module, function, counted)
    return cli.main(argv)


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    if mode == "cli":
        sys.exit(_cli(rest[0], int(rest[1]), rest[2], rest[3:]))
    _sweep(mode, Path(rest[0]), int(rest[1]))
