"""The GPU side of ``bench.compare --device gpu``: where each framework computes, its peak
device memory, the matmul sizes that measure a GPU's ceiling, and the report's table of
device memory. ``bench/gpu.sh`` runs the comparison in bfloat16 on a GPU machine without
network access.

On a GPU both workers compute on device 0: jpeft through JAX's default backend (attention
through :func:`jax.nn.dot_product_attention`, cuDNN's fused kernel where it applies), HF
PEFT with the model moved to ``cuda`` (attention through torch's SDPA). A worker asked for
a GPU that its framework cannot see fails with that reason instead of measuring the CPU.
"""

from __future__ import annotations

DEVICES = ("cpu", "gpu")

# n x n products per dtype for the ceiling: a GPU needs larger ones to reach its peak.
CEILING_SIZES = {"cpu": (512, 1024, 2048), "gpu": (2048, 4096, 8192)}


def torch_device(spec: dict) -> str:
    """The torch device of a worker's spec: ``cuda`` for ``--device gpu``, else ``cpu``."""
    return "cuda" if spec.get("device") == "gpu" else "cpu"


def check_device(framework: str, spec: dict) -> None:
    """Raises when the spec asks for a GPU that `framework` (``jax``/``torch``) lacks."""
    if spec.get("device") != "gpu":
        return
    if framework == "jax":
        import jax

        if jax.default_backend() != "gpu":
            raise RuntimeError(f"--device gpu, but JAX's backend is {jax.default_backend()!r}")
    else:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("--device gpu, but torch.cuda.is_available() is False")


def device_record(framework: str, spec: dict) -> dict:
    """``{"device_name", "device_peak_mb"}`` of device 0 for a GPU run (nothing on CPU):
    JAX's allocator ``peak_bytes_in_use``, torch's ``max_memory_allocated``."""
    if spec.get("device") != "gpu":
        return {}
    if framework == "jax":
        import jax

        device = jax.devices()[0]
        peak = (device.memory_stats() or {}).get("peak_bytes_in_use")
        return {
            "device_name": device.device_kind,
            "device_peak_mb": None if peak is None else peak / 2**20,
        }
    import torch

    return {
        "device_name": torch.cuda.get_device_name(0),
        "device_peak_mb": torch.cuda.max_memory_allocated(0) / 2**20,
    }


def render(report: dict) -> list[str]:
    """The report's lines on device memory (none for a CPU run)."""
    if report.get("device") != "gpu":
        return []
    names = sorted(
        {
            r["device_name"]
            for entry in report["variants"].values()
            for r in entry["runs"].values()
            if r.get("device_name")
        }
    )
    lines = [
        "",
        f"Device: {', '.join(names) or 'unknown'}; the ceiling is the "
        f"{report.get('ceiling_dtype', 'float32')} matmul one.",
        "",
        "| variant | jpeft device peak MB | HF device peak MB | jpeft / HF |",
        "|---|---:|---:|---:|",
    ]
    for variant, entry in report["variants"].items():
        j, h = (entry["runs"].get(k) or {} for k in ("jpeft", "hf_peft"))
        jm, hm = j.get("device_peak_mb"), h.get("device_peak_mb")
        ratio = f"{jm / hm:.2f}x" if jm and hm else "-"
        lines.append(f"| {variant} {entry['shape']} | {_mb(jm)} | {_mb(hm)} | **{ratio}** |")
    return lines


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"
