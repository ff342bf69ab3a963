"""What the generation benchmarks share (:mod:`bench.generation`, :mod:`bench.multi_adapter`):
the bundled chat prompts, random LoRA adapters that both frameworks serve, peft's
``generate``, and interleaved timing of ``generate`` variants."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from bench.compare import ROOT

TASKS = ("people_json", "dates_iso", "review_sentiment")


def prompts(count: int) -> list:
    """The first user message of up to three held-out rows of each bundled task."""
    rows = [json.loads(line) for task in TASKS for line in
            (ROOT / "data" / task / "test.jsonl").read_text().splitlines()[:3]]  # fmt: skip
    return [row["messages"][:1] for row in rows[:count]]


def measure(variants: dict, spec: dict) -> dict:
    """Prefill and decode figures of each ``generate(new_tokens) -> [b, new_tokens]`` of
    `variants` (name -> generate), timed in interleaved rounds (every variant once per
    round, best of ``spec["repeats"]`` rounds): a shared VM's speed drifts by 10-20% within
    minutes, which would otherwise land on whichever variant ran during a slow spell.

    Prefill time is that of generating one token; decode tokens/s is ``b x new_tokens``
    over the time generating ``1 + new_tokens`` tokens takes beyond that; end-to-end
    tokens/s is ``b x (1 + new_tokens)`` over the whole call. Every variant is called once
    at each length before the rounds (jpeft compiles there; peft's first call is slower)."""
    new = spec["new_tokens"]
    times = {name: {1: [], 1 + new: []} for name in variants}
    tokens = {}
    for generate in variants.values():
        np.asarray(generate(1)), np.asarray(generate(1 + new))
    for _ in range(spec["repeats"]):
        for name, generate in variants.items():
            for length in (1, 1 + new):
                started = time.perf_counter()
                out = np.asarray(generate(length))  # waits (jax dispatches asynchronously)
                times[name][length].append(time.perf_counter() - started)
            tokens[name] = out
    results = {}
    for name in variants:
        prefill_s, total_s = min(times[name][1]), min(times[name][1 + new])
        rows = tokens[name].shape[0]
        results[name] = {
            "prefill_s": prefill_s,
            "decode_tokens_per_s": rows * new / (total_s - prefill_s),
            "end_to_end_tokens_per_s": rows * (1 + new) / total_s,
            "total_s": total_s,
            "tokens": tokens[name].tolist(),
        }
    return results


def random_lora(params: dict, config, seed: int) -> dict:
    """`params` with LoRA of `config` (``init_lora_weights=False``: random A and B), B scaled
    by 0.1: an update of a trained adapter's size, not one that drowns the base in noise."""
    import jax

    from jpeft import lora

    def small_b(node):
        return (
            dataclasses.replace(node, b=0.1 * node.b) if isinstance(node, lora.LoraWeight) else node
        )

    adapted = lora.apply(params, config=config, key=jax.random.key(seed))
    return jax.tree.map(small_b, adapted, is_leaf=lambda n: isinstance(n, lora.LoraWeight))


def peft_model(model_path: str, folders: list[Path]):
    """transformers' float32 model of the GGUF at `model_path` with the peft adapters in
    `folders` loaded as ``a0``, ``a1``, ... (``a0`` active)."""
    import peft
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        Path(model_path).parent, gguf_file=Path(model_path).name, dtype=torch.float32
    )
    model.eval()
    model = peft.PeftModel.from_pretrained(model, folders[0], adapter_name="a0")
    for i, folder in enumerate(folders[1:], start=1):
        model.load_adapter(folder, adapter_name=f"a{i}")
    model.set_adapter("a0")
    return model


def peft_generate(model, input_ids: np.ndarray, mask: np.ndarray, names=None):
    """``n -> [b, n]``: greedy ``model.generate`` of exactly `n` new tokens (no stop at the
    end of sequence), with ``adapter_names=names`` (a mixed batch) when given."""
    import torch

    input_ids = torch.tensor(input_ids, dtype=torch.long)
    mask = torch.tensor(mask, dtype=torch.long)

    def call(n):
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                do_sample=False, adapter_names=names, pad_token_id=0,
            )  # fmt: skip
        return out[:, input_ids.shape[1] :].numpy()

    return call


def versions(framework: str) -> dict:
    """The versions a worker of `framework` (``jpeft`` or ``peft``) ran with."""
    if framework == "jpeft":
        import jax

        import jpeft

        return {"jax": jax.__version__, "jpeft": jpeft.__version__}
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "threads": torch.get_num_threads()}  # fmt: skip


def same_rows(a: dict | None, b: dict | None, eos: tuple[int, ...] = ()) -> str:
    """How many rows of greedy tokens two results share, as ``k/n`` (``-`` if one is missing).

    Rows are compared up to the first `eos` token in either: with tokens forced past the
    end, jpeft emits the end token where the model wants it and peft's ``min_new_tokens``
    forbids it, so the two go different ways from there by design."""
    if not a or not b:
        return "-"
    same = 0
    pairs = list(zip(a["tokens"], b["tokens"], strict=True))
    for x, y in pairs:
        cut = next((i for i, t in enumerate(zip(x, y, strict=True)) if set(t) & set(eos)), len(x))
        same += x[:cut] == y[:cut]
    return f"{same}/{len(pairs)}"


def run_worker(workers: dict, worker_args: list[str]) -> int:
    """The worker side of a benchmark: ``KIND SPEC RESULT`` -> `workers`' KIND's JSON result."""
    kind, spec_path, result_path = worker_args
    result = workers[kind](json.loads(Path(spec_path).read_text()))
    Path(result_path).write_text(json.dumps({**result, "ok": True}))
    return 0


def run_frameworks(module: str, spec: dict, work: Path, processes: int = 1) -> dict:
    """Runs the ``jpeft`` then the ``peft`` worker of `module`, `processes` times in turn (each in
    a process of its own, peft serving what jpeft wrote to `work`); each framework's result
    with every variant's figures from its fastest process (by ``total_s``), or exits naming a
    failure. Alternating processes keeps a slow spell of the VM from landing on one side."""
    from bench.compare import _worker

    runs = {"jpeft": [], "peft": []}
    for _ in range(processes):
        for kind in runs:
            result = _worker(kind, spec, work, entry=(module, "--worker"))
            if not result.get("ok"):
                raise SystemExit(f"{kind} failed: {result.get('error')}")
            runs[kind].append(result)
    best = {}
    for kind, results in runs.items():
        best[kind] = dict(results[0], processes=len(results))
        for key, figures in results[0].items():
            if isinstance(figures, dict) and "total_s" in figures:
                best[kind][key] = min((r[key] for r in results), key=lambda f: f["total_s"])
    return best


def write_report(report: dict, out: str, name: str, render) -> Path:
    """Adds the machine, commit and date to `report`, writes it as
    ``out/<time>_<cpu>_<name>.{json,md}`` (the Markdown from ``render(report)``) and prints it."""
    import datetime as dt
    import os
    import platform

    from bench import machine

    report.update(
        cpu=machine.cpu_info()["model"], cores=os.cpu_count(), commit=machine.git_commit(),
        date=dt.datetime.now().isoformat(timespec="seconds"), python=platform.python_version(),
    )  # fmt: skip
    tag = machine.machine_tag(report["cpu"])
    stem = Path(out) / f"{dt.datetime.now():%Y%m%d-%H%M%S}_{tag}_{name}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    stem.with_suffix(".md").write_text(render(report))
    print(render(report))
    print(f"wrote {stem}.json and .md")
    return stem
