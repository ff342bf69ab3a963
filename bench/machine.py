"""The machine under :mod:`bench.compare`: CPU model and ISA flags, the GEMM backend of each
framework, and ``--isa avx2``, the same AVX2 restriction for both frameworks, checked.

``--isa avx2`` sets, for the jpeft (JAX) processes, ``--xla_cpu_max_isa=AVX2`` in
``XLA_FLAGS``; for the torch processes ``ATEN_CPU_CAPABILITY=avx2`` (ATen's own kernels),
``ONEDNN_MAX_CPU_ISA=AVX2`` (oneDNN) and ``MKL_ENABLE_INSTRUCTIONS=AVX2`` (MKL, torch's
float32 GEMM). Each worker then records evidence that the restriction took effect:

* XLA: a small jitted function (``isa_check``: a matmul and an elementwise tail) is compiled
  with ``--xla_dump_to`` limited to that module; XLA:CPU dumps the object file of each kernel
  it generates, which ``objdump -d`` disassembles. Every AVX-512 instruction is EVEX-encoded
  (prefix byte ``0x62``, which is nothing else in 64-bit mode), so zero EVEX instructions
  means the generated code is AVX2 at most. Without the flag the same kernel has hundreds
  (AVX-512VL on ymm registers: XLA prefers 256-bit vectors, so counting ``zmm`` would not
  tell). The dots themselves run in library fusions (``__ynn_fusion`` etc.: precompiled
  kernels with their own CPU dispatch), which the dump cannot show: recorded as unverified.
* torch: ``torch.backends.cpu.get_cpu_capability()`` (ATen's dispatch); oneDNN's verbose
  ``isa:`` line and kernel name for a small convolution; MKL's verbose header, which names
  the ISA on Intel CPUs only (on others MKL's choice is recorded as unverified).
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

ISA_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_bf16",
    "avx512_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
ISAS = ("native", "avx2")
TORCH_AVX2_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}
XLA_AVX2_FLAG = "--xla_cpu_max_isa=AVX2"


def cpu_info(cpuinfo: str | None = None) -> dict:
    """CPU model name and which of :data:`ISA_FLAGS` it has, from `cpuinfo` (the text of
    ``/proc/cpuinfo``, read when None; its first processor's entry is used)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return {
        "model": fields.get("model name") or platform.processor() or "unknown",
        "flags": {flag: flag in flags for flag in ISA_FLAGS},
    }


def git_commit() -> str:
    """The checkout's short commit, with ``-dirty`` when tracked files differ from it, or
    ``unknown`` outside a git checkout (an installed wheel): every report names what it ran."""

    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True
        )

    try:
        head = git("rev-parse", "--short", "HEAD")
    except OSError:  # no git program
        return "unknown"
    if head.returncode:
        return "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head.stdout.strip() + ("-dirty" if dirty else "")


def machine_tag(model: str) -> str:
    """A file-name slug for the machine: CPU model and core count."""
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower().replace("(r)", ""))
    return f"{slug.replace('-processor', '').strip('-')}-{os.cpu_count()}c"


def worker_environments(isa: str, xla_flags: str) -> dict[str, dict[str, str]]:
    """Environment variables of the jpeft (``"jax"``) and torch (``"torch"``) processes.

    Args:
      isa: ``"native"`` (no restriction) or ``"avx2"``.
      xla_flags: XLA_FLAGS of the jpeft processes before the restriction is appended.
    """
    if isa not in ISAS:
        raise ValueError(f"isa={isa!r}; expected one of {ISAS}")
    if isa == "native":
        return {"jax": {"XLA_FLAGS": xla_flags} if xla_flags else {}, "torch": {}}
    return {
        "jax": {"XLA_FLAGS": f"{xla_flags} {XLA_AVX2_FLAG}".strip()},
        "torch": dict(TORCH_AVX2_ENV),
    }


# ----------------------------------------------------------------------------- JAX


def xla_dump_flags(folder: str) -> str:
    """The XLA_FLAGS that dump the kernels of :func:`jax_backend`'s check (and nothing else)."""
    return f"--xla_dump_to={folder} --xla_dump_hlo_module_re=isa_check"


def jax_backend(dump: str | None) -> dict:
    """jaxlib version, XLA_FLAGS, the libraries XLA:CPU hands dots to, and the ISA evidence.

    `dump` is the folder of :func:`xla_dump_flags`, which must have been in ``XLA_FLAGS``
    before JAX started (None: no evidence)."""
    import jax
    import jax.numpy as jnp
    import jaxlib

    flags = os.environ.get("XLA_FLAGS", "")
    if dump is not None:
        flags = flags.replace(xla_dump_flags(dump), "").strip()
    info: dict = {
        "jaxlib": jaxlib.__version__,
        "xla_flags": flags,
        "max_isa": next(iter(re.findall(r"--xla_cpu_max_isa=(\S+)", flags)), None),
        "onednn_flags": re.findall(r"--xla_cpu_\S*onednn\S*", flags),
        "xnnpack_flags": re.findall(r"--xla_cpu_\S*(?:xnn|ynn)\S*", flags),
    }
    if dump is None:
        return info

    def isa_check(a, b):  # the name selects the dumped module
        return jnp.tanh(a @ b) * 2.0 + a

    jax.jit(isa_check)(jnp.ones((64, 256)), jnp.ones((256, 256))).block_until_ready()
    hlo = "".join(p.read_text() for p in Path(dump).glob("*isa_check.cpu_after_optimizations.txt"))
    info["dot_libraries"] = sorted(set(re.findall(r'"kind":"(__\w+)"', hlo)))
    info["isa_evidence"] = _evex_count(sorted(Path(dump).glob("*isa_check*.o")))
    return info


def _evex_count(objects: list[Path]) -> dict:
    tool = shutil.which("objdump") or shutil.which("llvm-objdump")
    if not objects or tool is None:
        return {"method": "objdump of XLA's dumped kernels", "error": "no objects or no objdump"}
    total = evex = 0
    for obj in objects:
        text = subprocess.run([tool, "-d", str(obj)], capture_output=True, text=True).stdout
        codes = re.findall(r"^\s+[0-9a-f]+:\t([0-9a-f]{2}) ", text, re.M)
        total += len(codes)
        evex += codes.count("62")
    return {
        "method": "objdump -d of the kernels XLA generated for isa_check; EVEX = AVX-512",
        "kernels": len(objects),
        "instructions": total,
        "evex_instructions": evex,
    }


def xla_avx2_verified(backend: dict) -> bool | None:
    """True when XLA's generated kernels hold no AVX-512 instruction; None when unknown."""
    evidence = backend.get("isa_evidence") or {}
    if not evidence.get("instructions"):
        return None
    return evidence["evex_instructions"] == 0


# ----------------------------------------------------------------------------- torch


def _stdout_of(fn) -> str:
    """What `fn` writes to file descriptor 1 (oneDNN's and MKL's verbose output is C's)."""
    with tempfile.TemporaryFile(mode="w+") as f:
        saved = os.dup(1)
        os.dup2(f.fileno(), 1)
        try:
            fn()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        f.seek(0)
        return f.read()


def torch_backend() -> dict:
    """torch's GEMM backends and the ISA each one dispatches to, as far as it says."""
    import torch

    config = torch.__config__.show()

    def onednn():
        with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            torch.nn.functional.conv2d(torch.randn(2, 32, 32, 32), torch.randn(32, 32, 3, 3))

    def mkl():
        with torch.backends.mkl.verbose(torch.backends.mkl.VERBOSE_ON):
            torch.randn(64, 64) @ torch.randn(64, 64)

    dnn = _stdout_of(onednn)
    mkl_lines = [line for line in _stdout_of(mkl).splitlines() if line.startswith("MKL_VERBOSE")]
    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn_available": torch.backends.mkldnn.is_available(),
        "blas": next(iter(re.findall(r"BLAS_INFO=(\w+)", config)), None),
        "libraries": [
            line.strip(" -")
            for line in config.splitlines()
            if any(k in line for k in ("Math Kernel Library", "MKL-DNN", "OpenBLAS"))
        ],
        "env": {k: os.environ[k] for k in TORCH_AVX2_ENV if k in os.environ},
        "onednn_isa": next(iter(re.findall(r"isa:([^\n]+)", dnn)), None),
        "onednn_conv_kernel": next(iter(re.findall(r",convolution,([^,]+),", dnn)), None),
        "mkl_verbose": mkl_lines[0] if mkl_lines else None,
    }


def torch_avx2_checks(backend: dict) -> dict[str, bool | None]:
    """For each torch library: True (dispatches to AVX2), False (to more), None (unknown)."""

    def says(text: str | None) -> bool | None:
        if not text or "AVX" not in text:
            return None
        return "AVX2" in text and "512" not in text

    return {
        "aten": says(backend.get("cpu_capability")),
        "onednn": says(backend.get("onednn_isa")),
        "mkl": says(backend.get("mkl_verbose")),
    }


@contextlib.contextmanager
def xla_dump_env():
    """A temporary folder, with :func:`xla_dump_flags` appended to ``XLA_FLAGS`` (call it
    before JAX starts); yields the folder."""
    with tempfile.TemporaryDirectory(prefix="jpeft-isa-") as folder:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla_dump_flags(folder)}"
        yield folder


# ----------------------------------------------------------------------------- report


def _mark(ok: bool | None) -> str:
    return {True: "verified", False: "NOT in effect", None: "not verifiable"}[ok]


def render(report: dict) -> list[str]:
    """The Markdown lines on the machine: CPU, ISA, ceilings, backends, ISA checks."""
    cpu, isa = report["cpu_info"], report["isa"]
    flags = ", ".join(f for f, present in cpu["flags"].items() if present) or "none of note"
    c = report["framework_ceilings"]
    ceilings = " · ".join(
        f"{fw} f32 {_num(c.get(fw, {}).get('float32'))}, bf16 {_num(c.get(fw, {}).get('bfloat16'))}"
        for fw in ("jax", "torch")
    )
    lines = [
        f"### ISA: {'AVX2 (restricted with --isa avx2)' if isa == 'avx2' else 'native'}",
        "",
        f"CPU: {cpu['model']} ({report['cores']} cores), flags: {flags}.",
        f"Matmul ceilings in this run, GFLOP/s (best of before and after): {ceilings}.",
    ]
    jax_b, torch_b = report["backends"].get("jax"), report["backends"].get("torch")
    if jax_b:
        lines.append(
            f"JAX: jaxlib {jax_b['jaxlib']}, dots in {', '.join(jax_b.get('dot_libraries') or [])}"
            f" (XLA:CPU), XLA_FLAGS `{jax_b['xla_flags'] or '(none)'}`."
        )
    if torch_b:
        lines.append(
            f"torch {torch_b['torch']}: BLAS {torch_b['blas']}, ATen capability "
            f"{torch_b['cpu_capability']}, oneDNN ISA {torch_b['onednn_isa']} "
            f"(conv kernel {torch_b['onednn_conv_kernel']})."
        )
    if isa == "avx2":
        checks = [f"{', '.join(w)}: {f}" for f, w in report["isa_checks"].items()]
        lines.append("AVX2 restriction: " + "; ".join(checks) + ".")
    return lines + [""]


def isa_checks(results: list[tuple[str, dict]]) -> dict[str, list[str]]:
    """Whether the AVX2 restriction took effect, from named worker results: each finding,
    with the workers it holds for."""
    found: dict[str, list[str]] = {}
    for name, result in results:
        if (finding := _isa_check(result)) is not None:
            found.setdefault(finding, []).append(name)
    return found


def _isa_check(result: dict) -> str | None:
    if "jax_backend" in result:
        b = result["jax_backend"]
        e = b.get("isa_evidence", {})
        return (
            f"XLA kernels {_mark(xla_avx2_verified(b))} "
            f"({e.get('evex_instructions', '?')} AVX-512 of {e.get('instructions', '?')} "
            f"instructions), library dots {', '.join(b.get('dot_libraries') or ['-'])} "
            f"not verifiable"
        )
    if "torch_backend" in result:
        checks = torch_avx2_checks(result["torch_backend"])
        return ", ".join(f"{k} {_mark(v)}" for k, v in checks.items())
    return None


def _num(value) -> str:
    return "-" if value is None else f"{value:.0f}"
