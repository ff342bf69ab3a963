"""Worker processes for test_parallel.py (JAX fixes its CPU device count per process).

``python multihost_worker.py devices OUT``
    one process with 4 CPU devices: trains the tiny model STEPS steps on one device,
    data parallel (data=4), FSDP (data=2, fsdp=2, with gradient accumulation) and under
    pmap; writes each run's adapter to OUT/devices.npz and facts to OUT/devices.json.
``python multihost_worker.py host PROCESS_ID PORT OUT``
    one of two processes with 2 CPU devices each, joined over 127.0.0.1:PORT with gloo
    (process 0 configured by arguments, process 1 by JPEFT_* variables): trains data
    parallel across the processes and FSDP within each; process 0 saves the adapter
    once to OUT/adapter and trains on one device for reference; each process writes
    OUT/host<i>.npz and OUT/host<i>.json.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import jax

STEPS = 3
ROWS, LENGTH = 8, 12
MODEL_CONFIG = dict(
    model_type="llama",
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def base():
    """The tiny random Llama and its parameters (the same in every process)."""
    import numpy as np

    from jpeft import models

    model = models.from_config(MODEL_CONFIG)
    global_shapes, layer_shapes = model.hf_shapes()
    shapes = dict(global_shapes)
    for i in range(model.num_layers):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in layer_shapes.items()})
    rng = np.random.default_rng(0)
    tensors = {name: rng.normal(0, 0.2, shape).astype(np.float32) for name, shape in shapes.items()}
    return model, model.from_hf_state_dict(tensors)


def setup():
    """The tiny Llama with random LoRA factors on every linear layer (so that each step
    changes them), AdamW, and a batch whose rows hold different numbers of tokens (so that
    the devices' token counts differ)."""
    import numpy as np
    import optax

    from jpeft import lora

    model, params = base()
    params = lora.apply(
        params,
        rank=4,
        alpha=8,
        targets="all-linear",
        key=jax.random.key(0),
        init_lora_weights=False,
    )
    rng = np.random.default_rng(1)
    ids = rng.integers(0, MODEL_CONFIG["vocab_size"], (ROWS, LENGTH)).astype(np.int32)
    mask = np.ones_like(ids)
    for row, padding in enumerate([0, 5, 0, 9, 2, 0, 7, 1]):
        mask[row, :padding] = 0
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": np.where(mask > 0, ids, -100).astype(np.int32),
    }
    return model, params, optax.adamw(1e-3), batch


def flat(params) -> dict:
    """``{dotted path: numpy array}`` of a tree's leaves."""
    import numpy as np

    from jpeft import tree

    return {tree.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}


def shard_shapes(x) -> list:
    """The distinct shapes of an array's shards on this process's devices."""
    return sorted({tuple(s.data.shape) for s in x.addressable_shards})


class CompileCounter:
    """Counts XLA compilations inside ``with counter:``."""

    def __init__(self):
        self.count, self._active = 0, False
        jax.monitoring.register_event_duration_secs_listener(self._event)

    def _event(self, event: str, duration: float, **_) -> None:
        if self._active and event == "/jax/core/compile/backend_compile_duration":
            self.count += 1

    def __enter__(self):
        self._active = True

    def __exit__(self, *_):
        self._active = False


def train_steps(step, trainable, frozen, opt_state, batch):
    """Runs STEPS steps; returns the trainable half, the optimizer state, each step's loss
    and gradient norm, and the number of compilations after the first step."""
    from jpeft import distributed

    counter, losses = CompileCounter(), []
    for i in range(STEPS):
        with counter if i else contextlib.nullcontext():
            trainable, opt_state, metrics = step(
                trainable, frozen, opt_state, batch, jax.random.key(i)
            )
            losses.append([float(distributed.to_host(metrics[k])) for k in ("loss", "grad_norm")])
    return trainable, opt_state, losses, counter.count


def single_device(model, params, optimizer, batch) -> tuple[dict, list]:
    import jpeft
    from jpeft import train

    trainable, frozen = jpeft.split(params)
    step = train.make_train_step(model, optimizer, donate=False)
    trainable, _, losses, _ = train_steps(step, trainable, frozen, optimizer.init(trainable), batch)
    return flat(trainable), losses


def devices_main(out: Path) -> None:
    jax.config.update("jax_num_cpu_devices", 4)
    import numpy as np

    import jpeft
    from jpeft import parallel

    model, params, optimizer, batch = setup()
    init, _ = jpeft.split(params)
    runs, facts = {"init": flat(init)}, {"devices": jax.device_count()}
    runs["single"], facts["single_losses"] = single_device(model, params, optimizer, batch)

    for name, data, fsdp, grad_accum in [("dp", 4, 1, 1), ("fsdp", 2, 2, 2)]:
        mesh = parallel.make_mesh(data=data, fsdp=fsdp)
        trainable, frozen = jpeft.split(params)
        trainable, frozen, opt_state = parallel.place(
            mesh, trainable, frozen, optimizer.init(trainable), min_shard_size=0
        )
        step = parallel.make_sharded_train_step(
            model, optimizer, mesh, min_shard_size=0, grad_accum=grad_accum
        )
        rows = (
            {k: v.reshape(grad_accum, -1, LENGTH) for k, v in batch.items()}
            if grad_accum > 1
            else batch
        )
        sharded = parallel.shard_batch(rows, mesh, grad_accum=grad_accum)
        trained, opt_state, losses, compiles = train_steps(
            step, trainable, frozen, opt_state, sharded
        )
        runs[name] = flat(trained)
        layers = frozen["model"]["layers"]
        q_proj = trained["model"]["layers"]["self_attn"]["q_proj"]["weight"]
        q_proj_mu = opt_state[0].mu["model"]["layers"]["self_attn"]["q_proj"]["weight"]
        facts[name] = {
            "losses": losses,
            "later_compiles": compiles,
            "q_proj_w": shard_shapes(layers["self_attn"]["q_proj"]["weight"].w),
            "up_proj_w": shard_shapes(layers["mlp"]["up_proj"]["weight"].w),
            "embed": shard_shapes(frozen["model"]["embed_tokens"]["weight"]),
            "norm": shard_shapes(layers["input_layernorm"]["weight"]),
            "q_proj_a": shard_shapes(q_proj.a),
            "q_proj_a_mu": shard_shapes(q_proj_mu.a),
            "batch": shard_shapes(sharded["input_ids"]),
        }
    try:
        parallel.shard_batch({"input_ids": np.zeros((6, LENGTH), np.int32)}, mesh)
    except ValueError as err:
        facts["uneven_batch_error"] = str(err)

    trainable, frozen = jpeft.split(params)
    step = parallel.make_pmap_train_step(model, optimizer)
    per_device = jax.tree.map(lambda x: x.reshape(4, -1, LENGTH), batch)
    trained, _, losses, compiles = train_steps(
        step, trainable, frozen, optimizer.init(trainable), per_device
    )
    runs["pmap"] = flat(trained)
    facts["pmap"] = {"losses": losses, "later_compiles": compiles}

    np.savez(
        out / "devices.npz",
        **{f"{run}/{k}": v for run, leaves in runs.items() for k, v in leaves.items()},
    )
    (out / "devices.json").write_text(json.dumps(facts))


def host_main(process_id: int, port: int, out: Path) -> None:
    jax.config.update("jax_num_cpu_devices", 2)
    import numpy as np

    import jpeft
    from jpeft import checkpoint, distributed, parallel

    if process_id == 0:
        distributed.initialize_distributed(f"127.0.0.1:{port}", 2, 0)
    else:
        distributed.initialize_distributed()  # from JPEFT_COORDINATOR/_NUM_PROCESSES/_PROCESS_ID
    model, params, optimizer, batch = setup()
    mesh = parallel.make_mesh(fsdp=2)  # data=2 across the processes, fsdp=2 within each
    trainable, frozen = jpeft.split(params)
    trainable, frozen, opt_state = parallel.place(
        mesh, trainable, frozen, optimizer.init(trainable), min_shard_size=0
    )
    step = parallel.make_sharded_train_step(model, optimizer, mesh, min_shard_size=0)
    share = ROWS // jax.process_count()
    own_rows = {k: v[process_id * share : (process_id + 1) * share] for k, v in batch.items()}
    sharded = parallel.shard_batch(own_rows, mesh)
    trained, _, losses, compiles = train_steps(step, trainable, frozen, opt_state, sharded)
    host = distributed.to_host(jpeft.combine(trained, frozen))  # a collective: every process
    facts = {
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "losses": losses,
        "later_compiles": compiles,
        "up_proj_w": shard_shapes(frozen["model"]["layers"]["mlp"]["up_proj"]["weight"].w),
    }
    runs = {"sharded": flat(jpeft.split(host)[0])}
    if process_id == 0:
        checkpoint.save_adapter(host, out / "adapter", config={"r": 4})
        runs["single"], facts["single_losses"] = single_device(model, params, optimizer, batch)
    np.savez(
        out / f"host{process_id}.npz",
        **{f"{run}/{k}": v for run, leaves in runs.items() for k, v in leaves.items()},
    )
    (out / f"host{process_id}.json").write_text(json.dumps(facts))


if __name__ == "__main__":
    jax.config.update("jax_default_matmul_precision", "highest")
    mode, *args = sys.argv[1:]
    if mode == "devices":
        devices_main(Path(args[0]))
    else:
        host_main(int(args[0]), int(args[1]), Path(args[2]))
