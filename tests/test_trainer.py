"""The training loop: Ctrl-C and resume give the run that was never stopped, bitwise; stale
train states, finished runs, the learning-rate schedule and bad settings."""

from __future__ import annotations

import json
import signal

import hf_models
import jax
import numpy as np
import pytest

import jpeft
from jpeft import checkpoint, data, lora, train, train_state, trainer

CONFIG = trainer.TrainConfig(
    learning_rate=1e-2,
    warmup_steps=2,
    batch_size=4,
    grad_accum=2,
    max_steps=6,
    save_every=2,
    eval_every=3,
    bucket=16,
    seed=3,
)


pytestmark = pytest.mark.usefixtures("private_compilation_cache")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny llama with LoRA (with dropout, so that the PRNG state matters), and examples."""
    folder = tmp_path_factory.mktemp("llama")
    hf_models.make("llama", folder)
    model, base = jpeft.models.from_pretrained(folder)
    params = lora.apply(
        base,
        rank=4,
        targets=["q_proj", "v_proj", "down_proj"],
        lora_dropout=0.1,
        key=jax.random.key(0),
    )
    rng = np.random.default_rng(0)
    examples = []
    for _ in range(28):
        ids = rng.integers(3, 97, size=int(rng.integers(4, 20))).tolist()
        labels = [train.IGNORE_INDEX] * 2 + ids[2:]  # a "prompt" of two tokens
        examples.append(data.Example(ids, labels))
    return model, params, examples[:24], examples[24:]


def _stop_during_call(monkeypatch, call: int, how: str) -> None:
    """Makes the `call`-th train step (1-based) see a Ctrl-C: a real SIGINT sent while the
    step runs, or a KeyboardInterrupt raised before the step starts."""
    real = train.make_train_step

    def make(*args, **kwargs):
        step = real(*args, **kwargs)
        calls = []

        def counted(*step_args):
            calls.append(1)
            if len(calls) == call:
                if how == "signal":
                    signal.raise_signal(signal.SIGINT)
                else:
                    raise KeyboardInterrupt
            return step(*step_args)

        return counted

    monkeypatch.setattr(train, "make_train_step", make)


def _adapter_arrays(params):
    return {
        "/".join(map(str, (*k, f))): np.asarray(getattr(v, f))
        for k, v in jpeft.tree.iter_nodes(lora.extract(params))
        for f in ("a", "b", "scale")
    }


def _metrics(folder):
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in lines]


def test_interrupted_and_resumed_runs_equal_the_run_never_stopped(setup, tmp_path, monkeypatch):
    model, params, examples, held_out = setup
    run = dict(config=CONFIG, eval_examples=held_out, pad_id=0, progress=False)
    straight = trainer.fit(model, params, examples, tmp_path / "straight", **run)
    straight_arrays, straight_metrics = _adapter_arrays(straight), _metrics(tmp_path / "straight")
    assert [m["step"] for m in straight_metrics] == [1, 2, 3, 4, 5, 6]
    assert [m["step"] for m in straight_metrics if "eval_loss" in m] == [3, 6]
    initial = _adapter_arrays(params)  # still usable: fit does not consume its input
    assert all(
        not np.array_equal(straight_arrays[k], initial[k])
        for k in straight_arrays
        if k.endswith("/b")
    )  # it trained

    # Ctrl-C during step 3: the step finishes, then its state is saved (step 3 is not a
    # periodic save). A KeyboardInterrupt raised inside step 3 keeps step 2's state.
    folder = tmp_path / "stopped"
    for how, stopped_at in (("signal", 3), ("raise", 2)):
        _stop_during_call(monkeypatch, 3, how)
        with pytest.raises(KeyboardInterrupt):
            trainer.fit(model, params, examples, folder, **run)
        monkeypatch.undo()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert train_state.latest_step(folder / "checkpoints") == stopped_at, how
        assert [m["step"] for m in _metrics(folder)] == list(range(1, stopped_at + 1))

        resumed = trainer.fit(model, params, examples, folder, resume=True, **run)
        assert _metrics(folder) == straight_metrics, how
        resumed_arrays = _adapter_arrays(resumed)
        assert resumed_arrays.keys() == straight_arrays.keys()
        for name, value in straight_arrays.items():
            np.testing.assert_array_equal(resumed_arrays[name], value, err_msg=f"{how} {name}")
        # The next (fresh) run in this folder replaces these train states, whose newer
        # steps would otherwise make its saves fail.

    # Resuming a finished run does nothing (and does not fail on its existing last save).
    again = trainer.fit(model, params, examples, folder, resume=True, **run)
    for name, value in _adapter_arrays(again).items():
        np.testing.assert_array_equal(value, straight_arrays[name])
    saved = checkpoint.load_adapter(_base(params), folder / "adapter")
    for name, value in _adapter_arrays(saved).items():
        np.testing.assert_array_equal(value, straight_arrays[name])


def _base(params):
    """The base tree under the LoRA nodes."""
    return jax.tree.map(
        lambda x: x.w if isinstance(x, lora.LoraWeight) else x,
        params,
        is_leaf=lambda x: isinstance(x, lora.LoraWeight),
    )


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_learning_rate_warms_up_then_decays(schedule):
    # Adam's first updates on a constant gradient are -lr_t * sign: they trace the schedule.
    config = trainer.TrainConfig(learning_rate=0.3, warmup_steps=3, schedule=schedule)
    optimizer = config.optimizer(total_steps=8)
    x = {"w": np.zeros(1, np.float32)}
    state = optimizer.init(x)
    rates = []
    for _ in range(8):
        updates, state = optimizer.update({"w": np.ones(1, np.float32)}, state, x)
        rates.append(-float(updates["w"][0]))
    np.testing.assert_allclose(rates[:4], [0.0, 0.1, 0.2, 0.3], rtol=1e-4, atol=1e-7)
    after = np.array(rates[3:])
    if schedule == "constant":
        np.testing.assert_allclose(after, 0.3, rtol=1e-4)
    else:
        assert np.all(np.diff(after) < 0) and after[-1] < 0.1
        if schedule == "linear":
            np.testing.assert_allclose(np.diff(after), -0.06, rtol=1e-3)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(schedule="exponential"), "schedule must be one of"),
        (dict(batch_size=0), "batch_size must be at least 1"),
        (dict(learning_rate=0.0), "learning_rate must be positive"),
    ],
)
def test_bad_settings_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        trainer.TrainConfig(**options)


def test_packing_needs_max_steps(setup, tmp_path):
    model, params, examples, _ = setup
    with pytest.raises(ValueError, match="set max_steps when packing"):
        trainer.fit(
            model, params, examples, tmp_path, progress=False, config=trainer.TrainConfig(pack=True)
        )


def test_loss_plot_has_train_and_eval_curves(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(
        "".join(
            json.dumps(
                {"step": i, "loss": 3.0 / i, **({"eval_loss": 3.5 / i} if i % 2 == 0 else {})}
            )
            + "\n"
            for i in range(1, 7)
        )
    )
    plotted = trainer.plot_losses(metrics, tmp_path / "loss.png")
    # The series read back from the figure's lines: every step's loss, the eval every 2nd.
    assert plotted["train"] == ([1, 2, 3, 4, 5, 6], [3.0 / i for i in range(1, 7)])
    assert plotted["eval"] == ([2, 4, 6], [3.5 / i for i in (2, 4, 6)])
    import matplotlib.image

    image = matplotlib.image.imread(tmp_path / "loss.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
