"""The benchmark's machine records and ``--isa avx2`` (no timing: nothing is measured)."""

from __future__ import annotations

from bench import compare, gpu, machine
from jpeft import cli

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni amx_tile amx_bf16

processor\t: 1
model name\t: ignored: the first processor's entry counts
flags\t\t: fpu
"""


def test_cpu_info_parses_model_and_isa_flags():
    info = machine.cpu_info(CPUINFO)
    assert info["model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert info["flags"] == {
        "avx2": True,
        "fma": True,
        "avx512f": True,
        "avx512_bf16": False,
        "avx512_vnni": True,
        "amx_tile": True,
        "amx_bf16": True,
        "amx_int8": False,
    }
    assert machine.cpu_info("")["flags"]["avx2"] is False
    assert machine.machine_tag(info["model"]).startswith("intel-xeon-platinum-8480")


def test_isa_avx2_restricts_both_workers():
    envs = machine.worker_environments("avx2", "--xla_cpu_use_xnnpack=false")
    assert envs["jax"] == {"XLA_FLAGS": "--xla_cpu_use_xnnpack=false --xla_cpu_max_isa=AVX2"}
    assert envs["torch"] == {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    }
    assert machine.worker_environments("avx2", "")["jax"] == {"XLA_FLAGS": "--xla_cpu_max_isa=AVX2"}
    assert machine.worker_environments("native", "") == {"jax": {}, "torch": {}}
    assert machine.worker_environments("native", "--a")["jax"] == {"XLA_FLAGS": "--a"}
    args = compare.build_parser().parse_args(["--isa", "avx2", "--variants", "lora"])
    assert (args.isa, args.variants) == ("avx2", ["lora"])


def test_isa_checks_report_only_what_the_evidence_shows():
    jax_result = {
        "jax_backend": {
            "isa_evidence": {"instructions": 1642, "evex_instructions": 0},
            "dot_libraries": ["__ynn_fusion"],
        }
    }
    torch_ok = {"torch_backend": {"cpu_capability": "AVX2", "onednn_isa": "Intel AVX2"}}
    torch_not = {
        "torch_backend": {
            "cpu_capability": "AVX512",
            "onednn_isa": "Intel AVX-512 with Intel DL Boost",
            "mkl_verbose": "MKL_VERBOSE oneMKL 2024.0 ... Intel(R) Architecture processors",
        }
    }
    found = machine.isa_checks(
        [("jpeft lora", jax_result), ("hf lora", torch_ok), ("hf long", torch_not), ("x", {})]
    )
    assert found == {
        "XLA kernels verified (0 AVX-512 of 1642 instructions), library dots __ynn_fusion "
        "not verifiable": ["jpeft lora"],
        "aten verified, onednn verified, mkl not verifiable": ["hf lora"],
        "aten NOT in effect, onednn NOT in effect, mkl not verifiable": ["hf long"],
    }
    assert machine.xla_avx2_verified({"isa_evidence": {"error": "no objdump"}}) is None


def test_jpeft_bench_help_lists_the_options_of_bench_compare(capsys):
    assert cli.main(["bench", "--help"]) == 0
    text = capsys.readouterr().out
    for action in compare.build_parser()._actions:
        for flag in action.option_strings:
            assert flag in text


def test_reports_name_the_commit_and_whether_the_tree_was_dirty(tmp_path, monkeypatch):
    import shutil
    import subprocess

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    shutil.copytree(machine.Path(machine.__file__).parent, tmp_path / "bench")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True, text=True
    ).stdout.strip()
    monkeypatch.setattr(machine, "__file__", str(tmp_path / "bench" / "machine.py"))
    assert machine.git_commit() == head
    (tmp_path / "bench" / "machine.py").write_text("# changed\n")
    assert machine.git_commit() == f"{head}-dirty"
    plain = tmp_path.parent / f"{tmp_path.name}-plain"  # an installed copy: no git around it
    plain.mkdir()
    monkeypatch.setattr(machine, "__file__", str(plain / "machine.py"))
    assert machine.git_commit() == "unknown"


def test_a_gpu_run_refuses_a_machine_without_one():
    """``--device gpu`` on this CPU machine: each worker names what it cannot see rather
    than measuring the CPU and calling it a GPU figure; a CPU run checks nothing."""
    import pytest

    for framework, missing in (("jax", "JAX's backend is 'cpu'"), ("torch", "cuda")):
        with pytest.raises(RuntimeError, match=missing):
            gpu.check_device(framework, {"device": "gpu"})
        gpu.check_device(framework, {"device": "cpu"})
        assert gpu.device_record(framework, {"device": "cpu"}) == {}
    assert gpu.torch_device({"device": "gpu"}) == "cuda"
    assert gpu.torch_device({}) == "cpu"


def test_a_gpu_report_tables_each_frameworks_device_memory():
    report = {
        "device": "gpu",
        "ceiling_dtype": "bfloat16",
        "variants": {
            "lora": {
                "shape": "4x256",
                "runs": {
                    "jpeft": {"device_name": "NVIDIA H100", "device_peak_mb": 1000.0},
                    "hf_peft": {"device_name": "NVIDIA H100", "device_peak_mb": 4000.0},
                },
            },
            "long": {"shape": "1x2048", "runs": {"jpeft": {"device_peak_mb": 900.0}}},
        },
    }
    lines = gpu.render(report)
    assert "Device: NVIDIA H100; the ceiling is the bfloat16 matmul one." in lines
    assert "| lora 4x256 | 1000 | 4000 | **0.25x** |" in lines
    assert "| long 1x2048 | 900 | - | **-** |" in lines
    assert gpu.render({**report, "device": "cpu"}) == []


def test_interleaved_times_each_setting_in_turn(tmp_path, capsys):
    import hf_models

    from bench import interleaved

    hf_models.make("llama", tmp_path)
    settings = ["float32:float32:nothing_saveable", "bfloat16:float32:save_matmuls"]
    argv = [*settings, "--model", str(tmp_path), "--batch", "2", "--seq", "8", "--rounds", "1"]
    assert interleaved.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == settings
    assert all(line.endswith("tokens/s") for line in lines)


def test_report_table_of_a_committed_run():
    """The Markdown of the float32-activations run (bench/results, 2026-12-07): jpeft's
    ratios to HF PEFT per variant, and the jpeft options it ran with."""
    import json
    from pathlib import Path

    from bench import report_table

    stem = Path(__file__).parent.parent / "bench/results/20261207-122519_amd-epyc-2c_smollm2"
    report = json.loads(Path(f"{stem}_bf16-f32-activations.json").read_text())
    table = report_table.render(report)
    assert "| lora | **jpeft / HF** | **0.99x** | 1.01x | **0.66x** |" in table
    assert "| qlora | **jpeft / HF** | **1.10x** | 0.91x | **0.49x** |" in table
    assert "frozen base `bfloat16`, activations `float32`, remat `save_matmuls`" in table
