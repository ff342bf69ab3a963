"""jpeft's LoRA training step under several model settings, timed in turn in one process.

    python -m bench.interleaved bfloat16:bfloat16:nothing_saveable \\
        bfloat16:float32:save_mlp bfloat16:float32:save_matmuls

Each setting is ``WEIGHTS:ACTIVATIONS:REMAT`` (``from_pretrained``'s ``dtype``,
``DecoderLM.activation_dtype``, the layer remat policy or ``none``). The model (SmolLM2-135M
by default), the LoRA config (r=16, α=32, all seven linears), the batch and AdamW are those
of :mod:`bench.compare`. After one compiling step each, the settings take turns, two steps
at a time, for ``--rounds`` rounds: a shared VM's speed drifts by 10-20% within minutes, so
settings timed minutes apart in separate processes compare worse than settings timed side
by side. Prints the best and median seconds per step of each. No HF side: for a change to
jpeft, before against after; :mod:`bench.compare` sets jpeft against HF PEFT.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from bench import roofline, workers
from bench.compare import smollm2_path


def _setting(text: str) -> tuple[str, str, str]:
    parts = text.split(":")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected WEIGHTS:ACTIVATIONS:REMAT, got {text!r}")
    return parts[0], parts[1], parts[2]


def main(argv: list[str] | None = None) -> int:
    import jax
    import jax.numpy as jnp
    import optax

    import jpeft
    from jpeft import lora, train

    p = argparse.ArgumentParser(prog="python -m bench.interleaved", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("settings", nargs="+", type=_setting, help="WEIGHTS:ACTIVATIONS:REMAT")
    p.add_argument("--model", default=None, help="a .gguf file or HF folder (default: SmolLM2)")
    p.add_argument("--batch", type=int, default=4, help="rows (default: 4)")
    p.add_argument("--seq", type=int, default=256, help="tokens a row (default: 256)")
    p.add_argument("--rounds", type=int, default=4, help="turns of two steps (default: 4)")
    args = p.parse_args(argv)
    path = args.model or str(smollm2_path())
    runs = []
    for weights, activations, remat in args.settings:
        model, params = jpeft.models.from_pretrained(path, dtype=jnp.dtype(weights))
        model = dataclasses.replace(model, remat=remat, activation_dtype=activations)
        params = lora.apply(params, rank=16, alpha=32, targets=list(roofline.LLAMA_LINEARS),
                            lora_dropout=0.0, key=jax.random.key(0))  # fmt: skip
        trainable, frozen = jpeft.split(params)
        del params
        optimizer = optax.adamw(1e-4, weight_decay=0.01, eps=1e-8)
        step = train.make_train_step(model, optimizer, donate_trainable=True, max_grad_norm=1.0)
        ids = workers.make_batch(model.config.vocab_size, args.batch, args.seq, 0)
        state = [trainable, optimizer.init(trainable)]
        batch, key = {"input_ids": jnp.asarray(ids, jnp.int32)}, jax.random.key(1)

        def one_step(step=step, frozen=frozen, state=state, batch=batch, key=key) -> float:
            start = time.perf_counter()
            state[0], state[1], metrics = step(state[0], frozen, state[1], batch, key)
            jax.block_until_ready(state[0])
            return time.perf_counter() - start

        one_step()  # compiles
        runs.append((f"{weights}:{activations}:{remat}", one_step, []))
    for _ in range(args.rounds):
        for _, one_step, times in runs:
            times += [one_step(), one_step()]
    tokens = args.batch * args.seq
    for name, _, times in runs:
        best = min(times)
        print(f"{name:40s} best {best:.3f}  median {np.median(times):.3f} s/step  "
              f"{tokens / best:.1f} tokens/s")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
