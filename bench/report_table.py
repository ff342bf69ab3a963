"""The Markdown report of :mod:`bench.compare`: the machine, then a row per variant and
framework (tokens/s, step time, memory, compile and start-up times, losses, the fraction of
the matmul ceiling) and jpeft's ratios to HF PEFT, then the options and the command."""

from __future__ import annotations

from bench import gpu, machine

_SHORT = {"float32": "f32", "bfloat16": "bf16"}


def _fmt(value, spec: str = ".1f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _ratio(a, b) -> str:
    return "-" if a is None or b is None or not b else f"{a / b:.2f}x"


def render(report: dict) -> str:
    """The Markdown table of a report (also printed)."""
    ceiling = report["ceiling_gflops"]
    lines = [
        *machine.render(report),
        f"Model: `{report['model']}` · "
        f"load average at start {report['loadavg_start'][0]:.2f}, at end "
        f"{report['loadavg_end'][0]:.2f} · {_SHORT[report.get('ceiling_dtype', 'float32')]} "
        f"matmul ceiling {ceiling:.0f} GFLOP/s "
        f"· {report['date']}",
        "",
        "| variant | framework | tokens/s | s/step (median) | peak RSS MB | RSS in steps MB "
        "| compile s | first step s | start to first step done s | loss 1st → last "
        "| model GFLOP/step | % of ceiling |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for variant, entry in report["variants"].items():
        runs, flops = entry["runs"], entry.get("flops")
        gflop = flops["model"] / 1e9 if flops else None
        for fw in ("jpeft", "hf_peft"):
            r = runs.get(fw)
            label = {"jpeft": "jpeft", "hf_peft": "HF PEFT"}[fw]
            if r is None:
                continue
            if not r.get("ok"):
                reason = r.get("error", "failed").splitlines()[0][:160].replace("|", "/")
                lines.append(f"| {variant} | {label} | not available: {reason} | | | | | | | | | |")
                continue
            frac = 100 * gflop / r["s_per_step"] / ceiling if gflop else None
            lines.append(
                f"| {variant} {entry['shape']} | {label} | {r['tokens_per_s']:.1f} "
                f"| {r['s_per_step']:.3f} | {r['peak_rss_mb']:.0f} "
                f"| {_fmt(r.get('train_peak_rss_mb'), '.0f')} | {_fmt(r.get('compile_s'), '.1f')} "
                f"| {r['first_step_s']:.2f} | {_fmt(r.get('ready_s'), '.1f')} "
                f"| {r['losses'][0]:.4f} → {r['losses'][-1]:.4f} "
                f"| {_fmt(gflop, '.0f')} | {_fmt(frac, '.1f')}% |"
            )
        j, h = runs.get("jpeft"), runs.get("hf_peft")
        if j and h and j.get("ok") and h.get("ok"):
            lines.append(
                f"| {variant} | **jpeft / HF** "
                f"| **{_ratio(j['tokens_per_s'], h['tokens_per_s'])}** "
                f"| {_ratio(j['s_per_step'], h['s_per_step'])} "
                f"| **{_ratio(j['peak_rss_mb'], h['peak_rss_mb'])}** "
                f"| {_ratio(j.get('train_peak_rss_mb'), h.get('train_peak_rss_mb'))} | | "
                f"| {_ratio(j.get('ready_s'), h.get('ready_s'))} | | | |"
            )
    if "qlora" in report["variants"] and "lora" in report["variants"]:
        q = report["variants"]["qlora"]["runs"].get("jpeft") or {}
        h = report["variants"]["lora"]["runs"].get("hf_peft") or {}
        if q.get("ok") and h.get("ok"):
            lines += [
                "",
                f"jpeft QLoRA peak RSS / HF PEFT LoRA peak RSS: "
                f"**{_ratio(q['peak_rss_mb'], h['peak_rss_mb'])}**",
            ]
    lines += gpu.render(report)
    opts = report["jpeft_options"]
    lines += [
        "",
        f"jpeft options: frozen base `{opts['dtype']}`, activations "
        f"`{opts.get('activations', opts['dtype'])}`, remat `{opts['remat']}`, "
        f"loss chunk {opts['chunk']} tokens, QLoRA compute `{opts['qlora_compute']}`, XLA_FLAGS "
        f"`{report['xla_flags'] or '(none)'}`. Steps: {report['warmup']} warm-up + "
        f"{report['steps']} timed (median), best of {report['repeats']} run(s) per framework.",
        f"Command: `{report['command']}` at commit `{report.get('commit', 'unknown')}`.",
    ]
    return "\n".join(lines)
