"""The training loop behind ``jpeft train`` and the demo: schedule, eval, metrics, plots,
checkpoints, resume and Ctrl-C.

:func:`fit` drives :func:`jpeft.train.make_train_step` over :func:`jpeft.data.batches`. Every
`log_every` steps it appends a line to ``metrics.jsonl`` in the output folder; every
`eval_every` steps it measures the held-out loss; every `save_every` steps (and on Ctrl-C) it
saves a resumable train state under ``checkpoints/``; at the end it saves the adapter alone
(``adapter/``) and draws ``loss.png``. A run started again with ``resume=True`` continues
from the newest train state with the same data order, giving the same result as a run that
was never stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from jpeft import checkpoint, data, distributed, host_memory, optim8bit, train, train_state, tree

if TYPE_CHECKING:
    from jpeft.models.decoder import DecoderLM


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last saved train state is left intact."""


SCHEDULES = ("cosine", "linear", "constant")  # the decays after the warm-up
OPTIMIZERS = ("adamw", "adamw_8bit")  # optax.adamw; jpeft.optim8bit.adamw_8bit


def _option(default: Any, help: str, **cli: Any) -> Any:
    """A field with its ``jpeft train`` help and flag metadata (see :mod:`jpeft.cli.options`)."""
    return dataclasses.field(default=default, metadata={"help": help, **cli})


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimisation and bookkeeping settings of :func:`fit`; every field is also a
    ``jpeft train`` option (its ``metadata``)."""

    learning_rate: float = _option(2e-4, "peak learning rate of AdamW", flag="--lr")
    weight_decay: float = _option(0.0, "AdamW weight decay", metavar="WD")
    optim: str = _option(
        "adamw",
        "the optimizer: AdamW with float32 moments, or bitsandbytes' 8-bit AdamW (moments of "
        "leaves of 4096+ elements in 8 bits, blockwise: about 1/4 of the state's memory)",
        choices=OPTIMIZERS,
    )
    warmup_steps: int = _option(10, "steps of linear warm-up from 0 to --lr", metavar="N")
    schedule: str = _option(
        "cosine",
        "learning-rate decay after the warm-up",
        choices=SCHEDULES,
    )
    max_grad_norm: float | None = _option(
        1.0, "clip the global gradient norm to this; 'none' turns clipping off", metavar="NORM"
    )
    batch_size: int = _option(8, "examples per micro-batch", metavar="N")
    grad_accum: int = _option(
        1, "micro-batches per optimizer step (gradient accumulation)", metavar="N"
    )
    max_steps: int | None = _option(
        None,
        "optimizer steps to take (overrides --epochs; needed with --pack)",
        metavar="N",
        shown_default="--epochs passes over the data",
    )
    epochs: int = _option(1, "passes over the training data", metavar="N")
    bucket: int = _option(
        64,
        "pad lengths up to a multiple of this many tokens (bounds recompilation); with "
        "--pack, the packed row length",
        metavar="TOKENS",
    )
    pack: bool = _option(
        False, "pack several short examples into each row (attention does not cross examples)"
    )
    eval_every: int = _option(
        50, "measure the eval loss every N steps (and at the end)", metavar="N"
    )
    save_every: int = _option(
        100,
        "save a resumable train state every N steps (and at the end, and on Ctrl-C)",
        metavar="N",
    )
    log_every: int = _option(1, "append a line to metrics.jsonl every N steps", metavar="N")
    keep_checkpoints: int = _option(2, "newest train states kept in OUT/checkpoints", metavar="N")
    seed: int = _option(
        0, "seed of the adapter initialisation, the data order, dropout and --eval-split"
    )

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.optim not in OPTIMIZERS:
            raise ValueError(f"optim must be one of {OPTIMIZERS}, got {self.optim!r}")
        for name in (
            "batch_size",
            "grad_accum",
            "epochs",
            "bucket",
            "eval_every",
            "save_every",
            "log_every",
            "keep_checkpoints",
            "max_steps",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be at least 0, got {self.warmup_steps}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(
                f"max_grad_norm must be positive (or None: no clipping), got {self.max_grad_norm}"
            )
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")

    def optimizer(self, total_steps: int) -> optax.GradientTransformation:
        """AdamW (`optim`) with linear warm-up into the chosen decay."""
        warmup = min(self.warmup_steps, max(total_steps - 1, 0))
        decay_steps = max(total_steps - warmup, 1)
        after = {
            "cosine": optax.cosine_decay_schedule(self.learning_rate, decay_steps),
            "linear": optax.linear_schedule(self.learning_rate, 0.0, decay_steps),
            "constant": optax.constant_schedule(self.learning_rate),
        }[self.schedule]
        schedule = (
            optax.join_schedules(
                [optax.linear_schedule(0.0, self.learning_rate, warmup), after], [warmup]
            )
            if warmup
            else after
        )
        if self.optim == "adamw_8bit":
            return optim8bit.adamw_8bit(schedule, weight_decay=self.weight_decay)
        return optax.adamw(schedule, weight_decay=self.weight_decay)


@host_memory.released_after_compiles()  # what each compile freed, before its step runs
def fit(
    model: DecoderLM,
    params: dict,
    train_examples: Sequence[data.Example],
    out_dir: str | Path,
    *,
    config: TrainConfig = TrainConfig(),
    eval_examples: Sequence[data.Example] = (),
    pad_id: int = 0,
    resume: bool = False,
    adapter_config: dict | None = None,
    progress: bool = True,
) -> dict:
    """Trains the adapter of `params` and returns the trained tree.

    Args:
      model: the model.
      params: the tree with adapter nodes (e.g. from :func:`jpeft.lora.apply`).
      train_examples, eval_examples: from :func:`jpeft.data.tokenize`.
      out_dir: where metrics, checkpoints, the adapter and the loss plot go.
      config: the :class:`TrainConfig`.
      pad_id: the tokenizer's padding id.
      resume: continue from the newest train state in ``out_dir/checkpoints``.
      adapter_config: saved beside the adapter (e.g. the LoRA config as a dict).
      progress: show a progress bar.

    Raises:
      NonFiniteLossError: the loss became NaN or infinite (the last checkpoint is intact).
      KeyboardInterrupt: after saving a resumable train state. Ctrl-C is held until the
        step under way has finished, so the state saved is that of whole steps; a second
        Ctrl-C stops at once.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows_per_step = config.batch_size * config.grad_accum
    steps_per_epoch = max(len(train_examples) // rows_per_step, 1) if not config.pack else None
    total = config.max_steps or (steps_per_epoch or 0) * config.epochs
    if not total:
        raise ValueError(
            "set max_steps when packing (the number of packed rows is not known in advance)"
        )
    optimizer = config.optimizer(total)
    trainable, frozen = tree.split(params)
    trainable = jax.tree.map(jnp.copy, trainable)  # donated below; `params` stays usable
    opt_state = optimizer.init(trainable)
    rng = jax.random.key(config.seed)
    step, metrics_path = 0, out / "metrics.jsonl"
    state_dir = out / "checkpoints"
    writer = jax.process_index() == 0  # one process writes the run's files
    if resume and train_state.latest_step(state_dir) is not None:
        restored = train_state.restore_train_state(
            state_dir, params=trainable, opt_state_like=opt_state
        )
        trainable, opt_state, step, _, rng = restored
        if writer:
            _truncate_metrics(metrics_path, step)
        last_saved = step  # the step of the newest train state saved (None: none)
    else:  # a fresh run; an earlier run's train states here would make its saves fail
        last_saved = None
        if writer:
            metrics_path.unlink(missing_ok=True)
            shutil.rmtree(state_dir, ignore_errors=True)
    devices = _Devices(model, optimizer, config)
    trainable, frozen, opt_state = devices.place(trainable, frozen, opt_state)

    stream = data.batches(
        train_examples,
        config.batch_size,
        pad_id=pad_id,
        bucket=config.bucket,
        pack=config.pack,
        shuffle_seed=config.seed,
        epochs=None,
        start=step * config.grad_accum,
    )
    eval_batches = _eval_batches(eval_examples, config, pad_id)
    bar = _progress(total, step, progress and writer)

    def save(at: int) -> None:
        host_trainable, host_opt_state = distributed.to_host((trainable, opt_state))
        if writer:
            train_state.save_train_state(
                state_dir,
                at,
                params=host_trainable,
                opt_state=host_opt_state,
                data_position=at * config.grad_accum,
                rng=rng,
                keep=config.keep_checkpoints,
            )

    interrupt = _DeferredInterrupt()
    try:
        while step < total:
            batch = _next_batch(stream, config.grad_accum)
            next_rng, step_key = jax.random.split(rng)
            started = time.perf_counter()
            new_trainable, new_opt_state, metrics = devices.step(
                trainable, frozen, opt_state, batch, step_key
            )
            metrics = distributed.to_host(metrics)
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                kept = (
                    "no train state was saved"
                    if last_saved is None
                    else f"the train state saved at step {last_saved} in {state_dir} is intact"
                )
                raise NonFiniteLossError(
                    f"loss is {loss} at step {step + 1}; {kept} (try a lower learning rate)"
                )
            # The step is committed whole, so that an interrupt saves a consistent state.
            trainable, opt_state, rng, step = new_trainable, new_opt_state, next_rng, step + 1
            record = {
                "step": step,
                "loss": loss,
                "grad_norm": float(metrics["grad_norm"]),
                "tokens": int(metrics["tokens"]),
                "tokens_per_s": float(metrics["tokens"]) / (time.perf_counter() - started),
            }
            if eval_batches and (step % config.eval_every == 0 or step == total):
                record["eval_loss"] = _eval_loss(
                    model, tree.combine(trainable, frozen), eval_batches, devices.replicate
                )
            if writer and (step % config.log_every == 0 or "eval_loss" in record):
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if step % config.save_every == 0 and step < total:
                save(step)
                last_saved = step
            if interrupt.pressed:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        try:
            if step != last_saved:
                save(step)
        except Exception as err:  # e.g. buffers donated to a step cut short by a 2nd Ctrl-C
            bar.write(
                f"interrupted: the train state at step {step} could not be saved "
                f"({err}); the newest saved one is at step {last_saved}"
            )
            raise KeyboardInterrupt from None
        bar.write(
            f"interrupted: train state saved at step {step} in {state_dir}; "
            "run again with resume to continue"
        )
        raise
    finally:
        interrupt.restore()
        bar.close()
    if step != last_saved:  # a resumed run that had already finished is saved already
        save(step)
    params = devices.to_host(tree.combine(trainable, frozen))
    if writer:
        checkpoint.save_adapter(params, out / "adapter", config=adapter_config)
        plot_losses(metrics_path, out / "loss.png")
    return params


class _Devices:
    """Where the steps of :func:`fit` run: one device (:func:`jpeft.train.make_train_step`),
    or, when JAX sees several devices or processes, data parallel over all of them
    (:func:`jpeft.parallel.make_sharded_train_step` on a ``data`` mesh): every process
    computes the same global batch stream and feeds its own consecutive share of each
    batch's rows, and every device applies the update of the whole global batch."""

    def __init__(self, model: Any, optimizer: optax.GradientTransformation, config: TrainConfig):
        self.grad_accum = config.grad_accum
        options = dict(grad_accum=config.grad_accum, max_grad_norm=config.max_grad_norm)
        if jax.device_count() == 1:
            self.mesh = None
            self.step = train.make_train_step(model, optimizer, donate_trainable=True, **options)
            return
        from jpeft import parallel

        if config.batch_size % jax.device_count():
            raise ValueError(
                f"batch_size {config.batch_size} must be a multiple of the number of devices "
                f"({jax.device_count()} over {jax.process_count()} process(es)) to train "
                "data parallel"
            )
        self.mesh = parallel.make_mesh()
        self._parallel = parallel
        sharded = parallel.make_sharded_train_step(model, optimizer, self.mesh, **options)
        self.step = lambda t, f, o, batch, key: sharded(t, f, o, self._shard(batch), key)

    def place(self, trainable: Any, frozen: Any, opt_state: Any) -> tuple[Any, Any, Any]:
        if self.mesh is None:
            return trainable, frozen, opt_state
        # From host copies: arrays restored from a train state are committed to this
        # process's device, and JAX on CPU moves no committed array across processes.
        trainable, opt_state = jax.tree.map(np.asarray, (trainable, opt_state))
        return self._parallel.place(self.mesh, trainable, frozen, opt_state)

    def _shard(self, batch: dict) -> Any:
        """This process's rows of the global `batch`, as global arrays over the mesh."""
        axis = 0 if self.grad_accum == 1 else 1
        rows = next(iter(batch.values())).shape[axis] // jax.process_count()
        start = jax.process_index() * rows
        share = {k: np.take(v, range(start, start + rows), axis=axis) for k, v in batch.items()}
        return self._parallel.shard_batch(share, self.mesh, grad_accum=self.grad_accum)

    def replicate(self, batch: dict) -> Any:
        """An eval batch, whole on every device."""
        if self.mesh is None:
            return batch
        from jax.experimental import multihost_utils

        return multihost_utils.host_local_array_to_global_array(batch, self.mesh, P())

    def to_host(self, params: Any) -> Any:
        """The trained tree as host arrays where it is spread over devices (so that any
        one process can save or export it); as it is on one device."""
        return params if self.mesh is None else distributed.to_host(params)


class _DeferredInterrupt:
    """Holds a Ctrl-C (SIGINT) until the training loop checks `pressed` between steps; a
    second Ctrl-C raises KeyboardInterrupt at once. Only in the main thread, and only where
    SIGINT has Python's default handler (elsewhere Ctrl-C is left as it was)."""

    def __init__(self):
        self.pressed = False
        self._installed = (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        )
        if self._installed:
            signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True

    def restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self._installed = False


def _next_batch(stream, grad_accum: int) -> dict[str, np.ndarray]:
    if grad_accum == 1:
        return next(stream)
    micro = [next(stream) for _ in range(grad_accum)]
    width = max(b["input_ids"].shape[1] for b in micro)
    padded = [
        {
            k: np.pad(
                v,
                ((0, 0), (0, width - v.shape[1])),
                constant_values=train.IGNORE_INDEX if k == "labels" else 0,
            )
            for k, v in b.items()
        }
        for b in micro
    ]
    return {k: np.stack([b[k] for b in padded]) for k in padded[0]}


def _eval_batches(examples, config: TrainConfig, pad_id: int) -> list[dict]:
    if not examples:
        return []
    size = min(config.batch_size, len(examples))
    return list(
        data.batches(
            examples, size, pad_id=pad_id, bucket=config.bucket, shuffle_seed=None, epochs=1
        )
    )


def _eval_loss(model, params, batches, place) -> float:
    total = count = 0.0
    for batch in batches:
        loss_sum, tokens = distributed.to_host(_eval_sums(model, params, place(batch)))
        total, count = total + float(loss_sum), count + float(tokens)
    return total / max(count, 1.0)


_eval_sums = jax.jit(train.causal_lm_loss, static_argnums=0)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drops metric lines past `step` (written after the state a resume starts from)."""
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))


def _progress(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step")


def plot_losses(metrics_path: str | Path, png_path: str | Path) -> dict[str, tuple[list, list]]:
    """Draws train (and eval) loss against step from a ``metrics.jsonl`` file.

    Returns:
      The series drawn, read back from the figure: ``{"train": (steps, losses)}`` and, when
      there are eval losses, ``"eval"``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(ln) for ln in Path(metrics_path).read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train")
    evals = [r for r in records if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path)
    plotted = {
        line.get_label(): ([int(x) for x in line.get_xdata()], [float(y) for y in line.get_ydata()])
        for line in ax.get_lines()
    }
    plt.close(fig)
    return plotted
