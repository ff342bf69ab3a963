"""The measured processes of :mod:`bench.compare`: one framework per process, so that each
one's peak RSS is its own.

Each worker reads a JSON spec, trains ``warmup + steps`` steps on the shared batch and writes
a JSON result: per-step wall times, losses, load/setup/compile times and memory.

Memory is reported twice:
  * ``peak_rss_mb``: ``getrusage(RUSAGE_SELF).ru_maxrss``, the process' whole-life peak
    (loading included): the figure the comparison uses;
  * ``train_peak_rss_mb``: the peak resident set over the timed steps only (``VmHWM`` after
    resetting it through ``/proc/self/clear_refs`` once set-up is done), which shows what
    the training step itself holds.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import gpu, machine, roofline


def _rss_mb(field: str = "VmRSS") -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _settle() -> None:
    """Frees what set-up left behind, in both workers alike: Python garbage, then glibc's
    free heap pages (``malloc_trim``), which glibc otherwise keeps after loading a model."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _mark_setup_done(result: dict) -> None:
    """Records the set-up peak, then resets the peak so that the steps' own is measurable.
    (The reset also lowers ``ru_maxrss``: the whole-life peak is the larger of the two.)"""
    _settle()
    result["rss_after_setup_mb"] = _rss_mb()
    result["setup_peak_rss_mb"] = max(_maxrss_mb(), _rss_mb("VmHWM") or 0)
    result["peak_reset"] = _reset_peak()


def make_batch(vocab: int, batch: int, seq: int, seed: int) -> np.ndarray:
    """The shared batch of token ids: the same numbers in every process."""
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq), dtype=np.int64)


def _time_steps(run_step, spec: dict, result: dict, started: float):
    """Runs warm-up and timed steps; their wall times and losses. Records ``ready_s``: from
    `started` (the worker's start, before its imports) to the end of the first step."""
    times, losses = [], []
    for _ in range(spec["warmup"] + spec["steps"]):
        start = time.perf_counter()
        loss = run_step()
        times.append(time.perf_counter() - start)
        losses.append(loss)
        result.setdefault("ready_s", time.perf_counter() - started)
    result["first_step_s"] = times[0]
    return times, losses


def _finish(spec: dict, result: dict, times: list[float], losses: list[float]) -> dict:
    warm = spec["warmup"]
    timed = times[warm:]
    tokens = spec["batch"] * spec["seq"]
    median = float(np.median(timed))
    result.update(
        step_times=times,
        losses=losses,
        s_per_step=median,
        s_per_step_min=float(np.min(timed)),
        tokens_per_s=tokens / median,
        peak_rss_mb=max(_maxrss_mb(), result.get("setup_peak_rss_mb") or 0),
        train_peak_rss_mb=_rss_mb("VmHWM") if result.get("peak_reset") else None,
        loadavg_end=os.getloadavg(),
    )
    return result


# ----------------------------------------------------------------------------- jpeft


def run_jpeft(spec: dict) -> dict:
    t0 = time.perf_counter()
    import dataclasses
    import functools

    import jax
    import jax.numpy as jnp
    import optax

    import jpeft
    from jpeft import lora, train

    gpu.check_device("jax", spec)
    opts = spec["jpeft"]
    if opts["compile_cache"]:
        from jpeft import compile_cache

        compile_cache.enable(opts["compile_cache"])
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[opts["dtype"]]
    result: dict[str, Any] = {
        "framework": "jpeft",
        "versions": {"jax": jax.__version__, "jpeft": jpeft.__version__},
        "options": opts,
        "loadavg_start": os.getloadavg(),
    }
    if spec["variant"] == "qlora":
        from jpeft import qlora

        # Quantised while loading, one weight at a time (as transformers + bitsandbytes do).
        compute = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[opts["qlora_compute"]]
        model, params = qlora.from_pretrained(
            spec["model_path"], dtype=dtype, compute_dtype=compute
        )
    else:
        model, params = jpeft.models.from_pretrained(spec["model_path"], dtype=dtype)
    model = dataclasses.replace(model, remat=opts["remat"], activation_dtype=opts["activations"])
    result["load_s"] = time.perf_counter() - t0
    c = model.config
    result["dims"] = dict(
        layers=c.num_hidden_layers,
        hidden=c.hidden_size,
        intermediate=c.intermediate_size,
        heads=c.num_attention_heads,
        kv_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        vocab=c.vocab_size,
    )
    t1 = time.perf_counter()
    params = lora.apply(
        params,
        rank=spec["rank"],
        alpha=spec["alpha"],
        targets=list(roofline.LLAMA_LINEARS),
        lora_dropout=0.0,
        key=jax.random.key(spec["seed"]),
    )
    trainable, frozen = jpeft.split(params)
    del params
    counts = jpeft.count_parameters(jpeft.combine(trainable, frozen))
    result["trainable_params"], result["all_params"] = counts
    optimizer = optax.adamw(spec["lr"], weight_decay=spec["weight_decay"], eps=1e-8)
    opt_state = optimizer.init(trainable)
    loss_fn = functools.partial(train.causal_lm_loss, chunk_tokens=opts["chunk"])
    # `params` is gone, so nothing else holds the trainable buffers: donate them, as
    # `jpeft train` (trainer.fit) does
    step = train.make_train_step(
        model, optimizer, donate_trainable=True, max_grad_norm=1.0, loss=loss_fn
    )
    ids = make_batch(c.vocab_size, spec["batch"], spec["seq"], spec["seed"])
    result["batch_checksum"] = int(ids.sum())
    batch = {"input_ids": jnp.asarray(ids, jnp.int32)}
    key = jax.random.key(1)
    jax.block_until_ready((trainable, frozen, opt_state))
    result["setup_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    compiled = step.lower(trainable, frozen, opt_state, batch, key).compile()
    result["compile_s"] = time.perf_counter() - t2
    memory = compiled.memory_analysis()
    if memory is not None:
        result["xla_temp_mb"] = memory.temp_size_in_bytes / 2**20
        result["xla_argument_mb"] = memory.argument_size_in_bytes / 2**20
    _mark_setup_done(result)
    state = {"trainable": trainable, "opt_state": opt_state}
    del trainable, opt_state

    def run_step():
        state["trainable"], state["opt_state"], metrics = compiled(
            state["trainable"], frozen, state["opt_state"], batch, key
        )
        return float(metrics["loss"])  # waits for the step

    times, losses = _time_steps(run_step, spec, result, started=t0)
    result.update(gpu.device_record("jax", spec))
    return _finish(spec, result, times, losses)


# ----------------------------------------------------------------------------- HF PEFT


def _hf_load(spec: dict, quantization_config=None):
    import torch
    import transformers

    path = Path(spec["model_path"])
    kwargs: dict[str, Any] = {"dtype": getattr(torch, spec.get("hf_dtype", "float32"))}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if gpu.torch_device(spec) == "cuda":
        kwargs["device_map"] = {"": "cuda"}  # bitsandbytes quantises as it places
    if path.suffix == ".gguf":
        return transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, **kwargs
        )
    return transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)


def run_hf(spec: dict) -> dict:
    t0 = time.perf_counter()
    import peft
    import torch
    import transformers

    gpu.check_device("torch", spec)
    torch.manual_seed(spec["seed"])
    result: dict[str, Any] = {
        "framework": "hf_peft",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": os.getloadavg(),
    }
    quant = None
    if spec["variant"] == "qlora":
        import bitsandbytes

        result["versions"]["bitsandbytes"] = bitsandbytes.__version__
        compute = {"float32": torch.float32, "bfloat16": torch.bfloat16}[
            spec["jpeft"]["qlora_compute"]
        ]
        quant = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
    if quant is not None and spec.get("hf_qlora_path"):  # a GGUF, converted by the parent
        model = _hf_load({**spec, "model_path": spec["hf_qlora_path"]}, quant)
        result["loaded_from"] = "float32 safetensors folder converted from the GGUF"
    else:
        model = _hf_load(spec, quant)
    model.config.use_cache = False
    result["load_s"] = time.perf_counter() - t0
    hc = model.config
    heads = hc.num_attention_heads
    result["dims"] = dict(
        layers=hc.num_hidden_layers,
        hidden=hc.hidden_size,
        intermediate=hc.intermediate_size,
        heads=heads,
        kv_heads=hc.num_key_value_heads or heads,
        head_dim=getattr(hc, "head_dim", None) or hc.hidden_size // heads,
        vocab=hc.vocab_size,
    )
    result["attn_implementation"] = getattr(hc, "_attn_implementation", None)
    t1 = time.perf_counter()
    config = peft.LoraConfig(
        r=spec["rank"],
        lora_alpha=spec["alpha"],
        target_modules=list(roofline.LLAMA_LINEARS),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(model, config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    result["trainable_params"], result["all_params"] = model.get_nb_trainable_parameters()
    optimizer = torch.optim.AdamW(
        trainable, lr=spec["lr"], weight_decay=spec["weight_decay"], eps=1e-8
    )
    ids = make_batch(hc.vocab_size, spec["batch"], spec["seq"], spec["seed"])
    result["batch_checksum"] = int(ids.sum())
    input_ids = torch.from_numpy(ids).to(gpu.torch_device(spec))
    result["setup_s"] = time.perf_counter() - t1
    result["compile_s"] = None
    _mark_setup_done(result)

    def run_step():
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())  # waits for the step

    times, losses = _time_steps(run_step, spec, result, started=t0)
    result.update(gpu.device_record("torch", spec))
    return _finish(spec, result, times, losses)


# ----------------------------------------------------------------------------- others


def run_ceiling(spec: dict) -> dict:
    gpu.check_device(spec["framework"], spec)
    device = spec.get("device", "cpu")
    return {
        "framework": f"ceiling-{spec['framework']}",
        "variant": spec["variant"],
        "loadavg_start": os.getloadavg(),
        **roofline.matmul_ceiling(
            spec["framework"], sizes=gpu.CEILING_SIZES[device], device=device
        ),
        "peak_rss_mb": _maxrss_mb(),
    }


def run_prepare(spec: dict) -> dict:
    """Builds a random Llama (``tiny``, ``1b``, ``tinyllama`` or ``smollm2-shape``) with
    transformers into ``spec['folder']``."""
    import torch
    import transformers

    sizes = {
        "tiny": dict(
            vocab_size=1024,
            hidden_size=128,
            intermediate_size=344,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        # Llama-3.2-1B's shape (random weights; 1.24 B parameters).
        "1b": dict(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            rope_theta=500000.0,
        ),
        # SmolLM2-135M's shape (random weights; tied head), where the GGUF is not at hand.
        "smollm2-shape": dict(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            rope_theta=100000.0,
        ),
        # TinyLlama-1.1B's shape (random weights; 1.10 B parameters, untied head).
        "tinyllama": dict(
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            tie_word_embeddings=False,
        ),
    }[spec["size"]]
    torch.manual_seed(spec["seed"])
    config = transformers.LlamaConfig(
        **{"tie_word_embeddings": True, **sizes}, max_position_embeddings=4096
    )
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(spec["folder"])
    return {"framework": "prepare", "folder": spec["folder"]}


def run_convert(spec: dict) -> dict:
    """Writes a GGUF model as a float32 safetensors folder with transformers (which refuses
    to quantise while loading a GGUF: HF's QLoRA run loads this folder instead)."""
    import safetensors.torch

    model = _hf_load({"model_path": spec["gguf"]})
    folder = Path(spec["folder"])
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    # save_pretrained refuses a GGUF-loaded model: write the config and tensors directly.
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config, indent=1, default=str))
    safetensors.torch.save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return {"framework": "convert", "folder": spec["folder"]}


WORKERS = {
    "jpeft": run_jpeft,
    "hf": run_hf,
    "ceiling": run_ceiling,
    "prepare": run_prepare,
    "convert": run_convert,
}


def _framework(kind: str, spec: dict) -> str | None:
    """Which framework a worker measures (its backend and ISA are recorded), if any."""
    return {"jpeft": "jax", "hf": "torch", "ceiling": spec.get("framework")}.get(kind)


def main(kind: str, spec_path: str, result_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    framework = _framework(kind, spec)
    try:
        # oneDNN names its ISA on first use only: torch's check runs before the measurements.
        # XLA's dump flags go into XLA_FLAGS before JAX starts; its check runs after them.
        torch_backend = machine.torch_backend() if framework == "torch" else None
        with machine.xla_dump_env() if framework == "jax" else contextlib.nullcontext() as dump:
            result = WORKERS[kind](spec)
            if framework == "jax":
                result["jax_backend"] = machine.jax_backend(dump)
        if torch_backend is not None:
            result["torch_backend"] = torch_backend
        result["ok"] = True
    except Exception as error:  # reported in the table, not hidden
        import traceback

        result = {
            "framework": kind,
            "ok": False,
            "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc(),
            "peak_rss_mb": _maxrss_mb(),
        }
    Path(result_path).write_text(json.dumps(result, indent=1, default=str))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
