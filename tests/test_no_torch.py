"""The main path needs no torch: torch is a test-only dependency (the parity references).

`make demo` checks the same thing for real in a venv without torch (CI runs it); this test
guards it inside the test venv, where torch is installed, by hiding torch from a subprocess.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_train_generate_merge_export_run_with_torch_unimportable(smollm2_file, tmp_path):
    worker = Path(__file__).with_name("no_torch_worker.py")
    data = ROOT / "data" / "people_json" / "train.jsonl"
    result = subprocess.run(
        [sys.executable, str(worker), str(smollm2_file), str(data), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "main path ran without torch" in result.stdout
    for made in (
        "run/adapter",
        "run/metrics.jsonl",
        "merged/config.json",
        "merged/model.safetensors",
        "merged/tokenizer.json",
        "hf/adapter_model.safetensors",
    ):
        assert (tmp_path / made).exists(), made
