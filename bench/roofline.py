"""FLOPs of one LoRA training step, and a measured matmul ceiling of the machine.

Counted per step of ``T = batch · seq`` tokens for a Llama-family model with ``L`` layers,
hidden size ``d``, MLP size ``f``, ``n`` query heads and ``k`` key/value heads of size ``h``,
vocabulary ``V``, and LoRA of rank ``r`` on every one of the seven linears of each layer:

* frozen linears, ``P = L · (d·(n·h + 2·k·h) + n·h·d + 3·d·f)`` parameters: the forward pass
  costs ``2·P·T``; the backward pass needs the gradient with respect to each linear's input
  (``2·P·T``) but none with respect to the frozen weight, so ``4·P·T`` in all (full
  fine-tuning would add another ``2·P·T`` for weight gradients: the usual ``6·P·T``);
* LoRA, ``R = L · r · Σ(in + out)`` over the seven linears: forward ``2·R·T``, backward
  ``2·R·T`` for input gradients and ``2·R·T`` for the gradients of ``A`` and ``B``;
* the output head (``V·d``, tied or not, frozen): ``2·V·d·T`` forward + ``2·V·d·T`` backward;
* attention scores and mixing, counted over the full ``t × t`` matrix (both frameworks
  compute it whole and mask it): ``4·b·t²·n·h`` per layer forward, twice that backward.

That is the *model* FLOP count: the same work for every framework, used for the roofline
fraction of both. Rematerialisation executes more (a second forward of each layer, and of
the head under jpeft's checkpointed chunked loss); :func:`step_flops` reports that too as
``executed_jpeft`` for the remat policy in use, but the fraction is computed on the model
count, so a framework that recomputes is not credited for it.
"""

from __future__ import annotations

import time
from typing import Any

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def step_flops(dims: dict[str, int], batch: int, seq: int, rank: int, remat: str | None) -> dict:
    """FLOPs of one training step (see the module docstring).

    Args:
      dims: ``layers, hidden, intermediate, heads, kv_heads, head_dim, vocab``.
      batch, seq: the batch shape.
      rank: LoRA rank on all seven linears of every layer.
      remat: jpeft's remat policy name (None or ``"none"``: no recomputation of the layers).

    Returns:
      ``{"model": ..., "executed_jpeft": ..., "parts": {...}}`` in FLOPs.
    """
    layers, d, f = dims["layers"], dims["hidden"], dims["intermediate"]
    n, k, h, vocab = dims["heads"], dims["kv_heads"], dims["head_dim"], dims["vocab"]
    tokens = batch * seq
    shapes = {  # (in, out)
        "q_proj": (d, n * h),
        "k_proj": (d, k * h),
        "v_proj": (d, k * h),
        "o_proj": (n * h, d),
        "gate_proj": (d, f),
        "up_proj": (d, f),
        "down_proj": (f, d),
    }
    frozen = layers * sum(i * o for i, o in shapes.values())
    lora = layers * rank * sum(i + o for i, o in shapes.values())
    head = vocab * d
    attn_fwd = layers * 4 * batch * seq * seq * n * h
    parts = {
        "frozen_linears": 4 * frozen * tokens,
        "lora": 6 * lora * tokens,
        "head": 4 * head * tokens,
        "attention": 3 * attn_fwd,
    }
    model = sum(parts.values())
    # A recomputed forward: the whole layer for nothing_saveable, the non-matmul work only
    # for policies that save dot outputs (counted as zero matmul FLOPs), none without remat.
    layer_fwd = 2 * frozen * tokens + 2 * lora * tokens + attn_fwd
    if remat in (None, "none", "everything_saveable"):
        extra = 0
    elif remat in ("dots_saveable", "checkpoint_dots"):
        extra = 0
    elif remat in ("dots_with_no_batch_dims_saveable", "checkpoint_dots_with_no_batch_dims"):
        extra = attn_fwd  # batched attention dots are recomputed
    else:
        extra = layer_fwd
    extra += 2 * head * tokens  # the chunked loss recomputes each chunk's logits
    return {
        "model": model,
        "executed_jpeft": model + extra,
        "parts": parts,
        "frozen_params": frozen,
        "lora_params": lora,
        "head_params": head,
    }


def matmul_ceiling(
    framework: str,
    sizes: tuple[int, ...] = (512, 1024, 2048),
    repeats: int = 5,
    device: str = "cpu",
) -> dict:
    """Best float32 and bfloat16 matmul throughput of `framework` (``"jax"``, XLA:CPU, or
    ``"torch"``) on this machine, in GFLOP/s: ``2·n³`` FLOPs over the fastest of `repeats`
    timed ``n × n`` products per size. A size is skipped once a smaller one took over a
    second per product (bfloat16 can be that slow), so each dtype takes a few seconds.
    ``device="gpu"``: on JAX's default device (a GPU there) and on torch's ``cuda``.

    Returns:
      ``{"float32": {"gflops": best, "sizes": {n: gflops}}, "bfloat16": {...}}``.
    """
    import numpy as np

    rng = np.random.default_rng(0)
    if framework == "jax":
        import jax
        import jax.numpy as jnp

        from jpeft import matmul

        # jpeft's product: float32 sums of bfloat16 operands (torch's bfloat16 GEMMs also
        # sum in float32). A bare bfloat16 ``a @ b`` ran slower than float32 on XLA:CPU
        jitted = jax.jit(matmul.matmul)

        def setup(n, dtype):
            a, b = (jnp.asarray(rng.standard_normal((n, n)), dtype) for _ in range(2))
            return lambda: jitted(a, b).block_until_ready()

        dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    elif framework == "torch":
        import torch

        on = "cuda" if device == "gpu" else "cpu"
        wait = torch.cuda.synchronize if on == "cuda" else (lambda: None)

        def setup(n, dtype):
            a, b = (torch.randn(n, n, dtype=dtype, device=on) for _ in range(2))
            return lambda: (a @ b, wait())

        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    else:
        raise ValueError(f"framework={framework!r}; expected 'jax' or 'torch'")
    out: dict[str, Any] = {}
    for name, dtype in dtypes.items():
        by_size: dict[int, float] = {}
        for n in sizes:
            product = setup(n, dtype)
            product()  # compiles (JAX), warms the caches
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                product()
                best = min(best, time.perf_counter() - start)
            by_size[n] = 2 * n**3 / best / 1e9
            if best > 1.0:
                break
        out[name] = {"gflops": max(by_size.values()), "sizes": by_size}
    return out
