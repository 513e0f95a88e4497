"""Tables and a bar chart from the benchmarks' JSON: a markdown table per setting, a PNG for the README.

Reads ``bench_step`` results (the step benchmark) in full; ``bench_kernels`` results get a short
table; anything else is listed by name. The chart draws img/s per variant with the ratio to HF eager,
one panel per model and batch, with Pillow alone (no plotting library).

    python -m benchmarks.report step_b.json step_l.json --md table.md --png step.png
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    from benchmarks.chart import bar_chart
except ModuleNotFoundError:  # run as a script: the repo root is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.chart import bar_chart


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (committed reports name no home folder)."""
    try:
        return str(path.resolve().relative_to(Path(__file__).resolve().parent.parent))
    except ValueError:
        return str(path)


def load(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """The JSON reports at ``paths``; a missing or unreadable file is reported as such, not raised."""
    out = []
    for p in paths:
        try:
            if str(p).endswith(".jsonl"):  # the trainer's metrics.jsonl
                lines = Path(p).read_text().splitlines()
                rep = {"benchmark": "train_metrics", "rows": [json.loads(line) for line in lines if line.strip()]}
            else:
                rep = json.loads(Path(p).read_text())
        except (OSError, json.JSONDecodeError) as e:
            rep = {"benchmark": "unreadable", "error": f"{type(e).__name__}: {e}"}
        rep["_path"] = _shown(Path(p))
        out.append(rep)
    return out


def _f(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def _provenance(rep: dict[str, Any]) -> str:
    """GPU, versions, commit and date of a report (bench_step's ``env`` schema, or bench_kernels' flat one)."""
    env = rep.get("env", {})
    dev = env.get("device", {})
    flat = not isinstance(dev, dict)
    if flat:  # bench_kernels: flat keys; older files have the driver in nvidia-smi's text only
        found = re.search(r"Driver Version:\s*([\d.]+)", str(env.get("nvidia_smi", "")))
        dev = {"name": dev, "cuda_runtime": env.get("cuda"), "driver": env.get("driver") or (found and found[1])}
    git = env.get("git") or {"commit": env.get("git_commit"), "dirty": env.get("git_dirty")}
    if not isinstance(git, dict):
        git = {"commit": env.get("git_commit"), "dirty": env.get("git_dirty")}
    dirty = {True: " (dirty)", False: ""}.get(git.get("dirty"), " (dirty: unknown)")
    versions = env.get("versions") or {"torch_runtime": env.get("torch"), "triton": env.get("triton")}
    return (
        f"{dev.get('name', '?')}, driver {dev.get('driver') or '?'}, CUDA {dev.get('cuda_runtime', '?')}, "
        f"torch {versions.get('torch_runtime', '?')}, triton {versions.get('triton', '?')}"
        + ("" if flat else f", transformers {versions.get('transformers', '?')}")
        + f"; commit {str(git.get('commit', '?'))[:12]}{dirty}; {env.get('date_utc', '?')}"
    )


def step_markdown(rep: dict[str, Any]) -> str:
    """One table per (model, batch) of a ``bench_step`` report."""
    lines = []
    ceil = rep.get("ceilings", {})
    gemm, copy = ceil.get("gemm", {}), ceil.get("copy", {})
    sheet = ceil.get("datasheet_bf16_tflops")
    lines.append(f"**Training step** ({rep.get('step', '')}); {_provenance(rep)}")
    if not rep.get("timings_meaningful", False):
        lines.append("")
        lines.append("_Harness smoke run (tiny model or CPU): the numbers below are not measurements._")
    lines.append("")
    lines.append(
        f"Same-run ceilings: {gemm.get('dtype', '?')} GEMM {gemm.get('n', '?')}³ "
        f"{_f(gemm.get('tflops'), '.1f')} TFLOP/s; device copy {_f(copy.get('gbps'), '.0f')} GB/s; "
        f"datasheet dense bf16 {_f(sheet, '.0f')} TFLOP/s (H100 SXM: {ceil.get('h100_sxm_bf16_tflops', 989.4)})."
    )
    for s in rep.get("settings", []):
        flops = s.get("flops_per_image", {})
        lines.append("")
        lines.append(
            f"`{s['model']}`, batch {s['batch']}, {_f(flops.get('train', 0) / 1e9, '.4g')} GFLOP/image "
            f"(useful work, fwd+bwd), status {s.get('status')}"
        )
        lines.append("")
        lines.append(
            "| variant | batch | img/s | × HF eager | × HF compile | step ms median [p10–p90] | peak GiB "
            "| mem × HF eager | MFU (GEMM) | MFU (datasheet) | compile s | check |"
        )
        lines.append("|" + "---|" * 12)
        skipped: dict[str, list[str]] = {}
        for name, v in s.get("variants", {}).items():
            if not v.get("img_s") and "check" not in v:  # neither timed nor checked
                why = f"{v.get('status')}: {v.get('reason', '')[:160]}"
                skipped.setdefault(why, []).append(f"`{name}`")
                continue
            st = v.get("step_ms")
            step = f"{st['median']:.1f} [{st['p10']:.1f}–{st['p90']:.1f}]" if st else f"not timed ({v.get('status')})"
            chk = v.get("check")
            chk_s = "–" if chk is None else ("ok" if chk["ok"] else f"**FAIL** (pred {chk['pred_rel_err']:.1e})")
            mem = v.get("memory", {})
            lines.append(
                f"| `{name}` | {v.get('batch')} | {_f(v.get('img_s'), '.0f')} "
                f"| {_f(v.get('speedup_vs_hf_eager'), '.2f')} | {_f(v.get('speedup_vs_hf_compile'), '.2f')} "
                f"| {step} | {_f(mem.get('peak_gib'), '.1f')} "
                f"| {_f(v.get('memory_vs_hf_eager'), '.2f')} | {_pct(v.get('mfu_vs_measured_gemm'))} "
                f"| {_pct(v.get('mfu_vs_datasheet'))} | {_f(v.get('compile_s'), '.0f')} | {chk_s} |"
            )
        if skipped:
            lines.append("")
            lines.append("Not timed: " + "; ".join(f"{', '.join(names)} ({why})" for why, names in skipped.items()))
        fm = s.get("variants", {}).get("fm_fast", {})
        if fm.get("best_hf_compile") not in (None, "hf_compile"):
            lines.append("")
            lines.append(
                f"Against the fastest HF compiled step (`{fm['best_hf_compile']}`, an SDPA kernel forced): "
                f"`fm_fast` ×{fm['speedup_vs_best_hf_compile']:.2f}."
            )
        profiled = {
            n: v["profile"] for n, v in s.get("variants", {}).items() if "kernel_ms_per_step" in v.get("profile", {})
        }
        if profiled:
            try:
                from benchmarks.profile_step import markdown as profile_line
            except ModuleNotFoundError:  # run as a script: the repo root is not on sys.path
                sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
                from benchmarks.profile_step import markdown as profile_line

            lines.append("")
            lines.append("Where the step goes (`--profile`):")
            lines.extend(f"- {profile_line(n, p)}" for n, p in profiled.items())
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def kernels_markdown(rep: dict[str, Any]) -> str:
    """A short table of a ``bench_kernels`` report (fwd+bwd rows)."""
    copy = rep.get("copy", {})
    head = f"**Kernels** ({_provenance(rep)}); copy {_f(copy.get('gbps'), '.0f')} GB/s"
    measured = copy.get("measured") or {}
    if len(measured) > 1:
        head += " (" + ", ".join(f"{k} {v['gbps']:.0f}" for k, v in measured.items()) + f": the {copy.get('kind')} one)"
    if "event_timed_gbps" in copy:
        head += (
            f" (the % of copy's basis; cross-checks: event-timed {copy['event_timed_gbps']:.0f} GB/s, "
            f"a {copy['op_size_bytes'] >> 20} MiB copy {copy['op_size_gbps']:.0f} GB/s)"
        )
    lines = [head, ""]
    lines.append("| model | op | phase | triton ms | GB/s | % copy | × compiled | × eager | call ms (host) | timer |")
    lines.append("|" + "---|" * 10)
    for r in rep.get("results", []):
        t = r.get("triton") or {}
        lines.append(
            f"| {r.get('model')} | {r.get('op')} | {r.get('phase')} | {_f(t.get('ms'), '.4f')} "
            f"| {_f(t.get('gbps'), '.0f')} | {_f(t.get('pct_of_copy'), '.0f')} "
            f"| {_f(r.get('speedup_vs_compiled'), '.2f')} | {_f(r.get('speedup_vs_eager'), '.2f')} "
            f"| {_f(t.get('call_ms'), '.4f')} | {t.get('timer', '–')} |"
        )
    for r in rep.get("launch_alternatives", []):
        t = r.get("triton") or {}
        knobs = ", ".join(f"{k} {v}" for k, v in (r.get("knobs") or {}).items())
        rule = ", ".join(f"{k} {v}" for k, v in (r.get("rule_knobs") or {}).items())
        lines.append(
            f"\n{r.get('op')} fwd+bwd ({r.get('model')}) with {knobs} ({r.get('about')}): "
            f"{_f(t.get('ms'), '.4f')} ms, {_f(t.get('pct_of_copy'), '.0f')}% of copy, "
            f"{_f(r.get('speedup_vs_rule'), '.2f')}x the launch rule's ({rule})"
        )
    return "\n".join(lines)


def data_row_name(row: dict[str, Any]) -> str:
    """A ``bench_data`` row's name: ``dali (plain, hw 0.9)`` for DALI with decoder options, else the backend."""
    o = row.get("dali_options")
    if not o:
        return str(row.get("backend"))
    parts = ["fancy" if o.get("jpeg_fancy_upsampling", True) else "plain"]
    if "hw_decoder_load" in o:
        parts.append(f"hw {o['hw_decoder_load']:g}")
    return f"{row.get('backend')} ({', '.join(parts)})"


def _host_feed_note(row: dict[str, Any]) -> str:
    """DALI's host-side feed alone (bytes, header, crop draws on the training thread), when measured."""
    if row.get("host_feed_img_per_s") is None:
        return ""
    note = f"host feed alone {row['host_feed_img_per_s']:.0f} img/s ({row['host_feed_us_per_img']:.0f} µs/img"
    cpu = row.get("host_feed_thread_cpu_us_per_img")  # from 2026-11-28 on
    return note + (f", {cpu:.0f} µs/img on the training thread)" if cpu is not None else ")")


def data_markdown(rep: dict[str, Any]) -> str:
    """A short table of a ``bench_data`` report: img/s per loader backend."""
    lines = [
        f"**Data** ({_provenance(rep)})",
        "",
        "| backend | workers | device | img/s | note |",
        "|---|---|---|---|---|",
    ]
    for r in rep.get("results", []):
        lines.append(
            f"| {data_row_name(r)} | {r.get('workers', '–')} | {r.get('device', '–')} "
            f"| {_f(r.get('img_per_s'), '.0f')} | {r.get('skipped', '')}{_host_feed_note(r)} |"
        )
    if rep.get("dali_over_best_torch") is not None:
        lines += ["", f"DALI / best torch loader: {rep['dali_over_best_torch']:.2f}x"]
    return "\n".join(lines)


def _sweep_cell(r: dict[str, Any]) -> str:
    """A swept configuration in a table cell: rows x warps, then the knobs that differ from plain."""
    return (
        f"{r['rows']}x{r['warps']}"
        + (f", {r['columns']} cols" if r.get("columns") else "")
        + (f", {r['stages']} stages" if (r.get("stages") or 1) > 1 else "")
        + (f", {r['order']} order" if r.get("order", "image") != "image" else "")
    )


def sweep_markdown(rep: dict[str, Any]) -> str:
    """Per op: the launch rule's fwd+bwd time against the fastest configuration swept."""
    lines = [
        f"**Kernel launch configurations** (fwd+bwd, rows per program x warps, columns per program "
        f"where the op tiles its width, the loss's tile order); {_provenance(rep)}",
        "",
        "| op | rule | rule ms | % of copy | fastest | fastest ms | % of copy | rule / fastest |",
        "|" + "---|" * 8,
    ]
    by_op: dict[str, list[dict[str, Any]]] = {}
    for row in rep.get("rows", []):
        if row.get("fwd+bwd"):
            by_op.setdefault(row["op"], []).append(row)
    for op, rows in by_op.items():
        rule = next((r for r in rows if r.get("default")), None)
        best = min(rows, key=lambda r: r["fwd+bwd"]["ms"])
        if rule is None:
            continue
        lines.append(
            f"| {op} | {_sweep_cell(rule)} | {rule['fwd+bwd']['ms']:.4f} | {rule['fwd+bwd']['pct_of_copy']:.0f}% "
            f"| {_sweep_cell(best)} | {best['fwd+bwd']['ms']:.4f} | {best['fwd+bwd']['pct_of_copy']:.0f}% "
            f"| {rule['fwd+bwd']['ms'] / best['fwd+bwd']['ms']:.2f} |"
        )
    # One configuration serves both passes; the fastest of each pass alone says whether one each
    # would pay: their sum against the fastest single configuration's fwd+bwd.
    split = []
    for op, rows in by_op.items():
        phased = [r for r in rows if r.get("fwd") and r.get("bwd")]
        if not phased:
            continue
        best = min(rows, key=lambda r: r["fwd+bwd"]["ms"])
        f = min(phased, key=lambda r: r["fwd"]["ms"])
        b = min(phased, key=lambda r: r["bwd"]["ms"])
        both = f["fwd"]["ms"] + b["bwd"]["ms"]
        split.append(
            f"| {op} | {_sweep_cell(f)} | {f['fwd']['ms']:.4f} | {f['fwd']['pct_of_copy']:.0f}% "
            f"| {_sweep_cell(b)} | {b['bwd']['ms']:.4f} | {b['bwd']['pct_of_copy']:.0f}% "
            f"| {both:.4f} | {best['fwd+bwd']['ms'] / both:.2f} |"
        )
    if split:
        lines += [
            "",
            "Each pass's fastest configuration (one configuration per pass, if the launcher took two):",
            "",
            "| op | fastest fwd | ms | % of copy | fastest bwd | ms | % of copy | sum ms | fastest fwd+bwd / sum |",
            "|" + "---|" * 9,
            *split,
        ]
    return "\n".join(lines)


def train_markdown(rep: dict[str, Any], reports: Sequence[dict[str, Any]]) -> str:
    """The trainer's img/s (``metrics.jsonl``) against the step harness's ``fm_fast`` in the same run.

    The first log interval holds the compile and is left out; the rest are the loop's steady speed.
    """
    rows = [r for r in rep.get("rows", []) if r.get("img_s")]
    steady = [r["img_s"] for r in rows[1:]]
    head = f"**Trainer** (`python -m fastmae.train`, `{rep.get('_path', '')}`"
    config = next((r["config"] for r in rep.get("rows", []) if isinstance(r.get("config"), dict)), None)
    ran = (config or {}).get("resolved", {}).get("environment")
    if ran:  # what the run's config.json says it ran on
        git = ran.get("git") or {}
        dirty = {True: " (dirty)", False: ""}.get(git.get("dirty"), "")
        head += (
            f"; {config.get('preset', '?')}, batch {config.get('batch_size', '?')}; {ran.get('device_name', '?')}, "
            f"torch {ran.get('torch', '?')}; commit {str(git.get('commit', '?'))[:12]}{dirty}"
        )
    head += ")"
    if not steady:
        return f"{head}: fewer than two log intervals with img/s ({len(rows)}), nothing to compare"
    steady.sort()
    median = steady[len(steady) // 2]
    text = f"{head}: median {median:.0f} img/s over {len(steady)} log intervals (the first, with the compile, left out)"
    peaks = [r["max_mem_gib"] for r in rows if r.get("max_mem_gib") is not None]
    if peaks:
        text += f", peak allocated {max(peaks):.2f} GiB"
    harness = [
        (s.get("model"), v)
        for r in reports
        if r.get("benchmark") == "bench_step"
        for s in r.get("settings", [])
        for name, v in s.get("variants", {}).items()
        if name == "fm_fast" and v.get("img_s")
    ]
    # device.sh puts the run's resolved config first: compare with the harness on the same model and
    # batch. Without it, only a single harness setting is unambiguous.
    if config is not None:
        model = str(config.get("preset", "")).removeprefix("mae_")
        harness = [(m, v) for m, v in harness if m == model and v.get("batch") == config.get("batch_size")]
    elif len(harness) > 1:
        return (
            text
            + f"; the file does not say which model it trained, so it is not compared with the harness's {len(harness)} `fm_fast` settings"
        )
    for model, v in harness:
        text += f"; {median / v['img_s']:.3f}x the harness's `fm_fast` ({model}, batch {v.get('batch')}: {v['img_s']:.0f} img/s)"
    return text


# The memory probe counts compiled fastmae on its reference path; every compiled fast variant maps there.
_PROBE_VARIANT = {
    "fm_fast": "fm_compile",
    "fm_fast_gelu": "fm_compile_gelu",
    "fm_fast_selective": "fm_compile_selective",
    "fm_fast_full_ac": "fm_compile_full",
}


_PROBE_SUFFIX = {"none": "", "gelu": "_gelu", "selective": "_selective", "full": "_full"}


def _probe_name(
    step_variant: str, probe: dict[str, Any], resolved_ac: str | None = None, residual: str | None = None
) -> str | None:
    """The memory probe's variant that counts ``step_variant``; ``resolved_ac`` is the checkpointing
    the run recorded for it (what ``auto`` became) and ``residual`` its residual dtype, which decide
    for compiled fast variants."""
    if step_variant in probe:
        return step_variant
    if step_variant.startswith("fm_fast") and resolved_ac in _PROBE_SUFFIX:
        name = "fm_compile" + _PROBE_SUFFIX[resolved_ac] + ("_bf16res" if residual == "autocast" else "")
    else:  # a run from before the resolved value was recorded: the names say it
        name = _PROBE_VARIANT.get(step_variant) or ("fm_compile" if step_variant.startswith("fm_fast") else None)
    return name if name in probe else None


def memory_check_markdown(step_rep: dict[str, Any], probe_rep: dict[str, Any]) -> str:
    """Measured in-step memory rise against ``memory_probe.py``'s CPU count (activations + grads)."""
    lines = [
        f"**Memory: measured vs counted on CPU** (`{probe_rep.get('_path', '')}`): the step's largest rise of "
        "allocated memory against the probe's activations at the same batch + the gradients (4 bytes a parameter)."
    ]
    rows = []
    for s in step_rep.get("settings", []):
        probe = probe_rep.get("models", {}).get(s.get("model"), {})
        for name, v in s.get("variants", {}).items():
            rise = v.get("memory", {}).get("step_rise_bytes")
            pname = _probe_name(
                name, probe.get("variants", {}), v.get("activation_checkpointing"), v.get("residual_dtype")
            )
            if rise is None or pname is None or not isinstance(s.get("batch"), int):
                continue
            pv = probe["variants"][pname]
            grads = 4 * s.get("params", 0)
            predicted = pv["per_image_bytes"] * s["batch"] + pv["const_bytes"] + grads
            rows.append(
                f"| `{s['model']}` | `{name}` | `{pname}` | {s['batch']} | {rise / 2**30:.2f} "
                f"| {predicted / 2**30:.2f} | {rise / predicted:.2f} |"
            )
    if not rows:
        return lines[0] + " No variant with a measured peak and a counted one."
    lines += ["", "| model | variant | counted as | batch | measured GiB | counted GiB | ratio |", "|" + "---|" * 7]
    return "\n".join(lines + rows)


def public(report: Any) -> Any:
    """A bench_step report without its internal keys (``_``-prefixed)."""
    if isinstance(report, dict):
        return {k: public(v) for k, v in report.items() if not k.startswith("_")}
    if isinstance(report, list):
        return [public(v) for v in report]
    return report


def console_summary(rec: dict[str, Any]) -> str:
    """A bench_step setting's result, a line per variant, as the run prints it."""
    lines = [f"== {rec['model']} batch {rec['batch']}"]
    for n, vr in rec["variants"].items():
        if vr.get("img_s"):
            chk = {True: "ok", False: "FAILED", None: "-"}[vr.get("check", {}).get("ok")]
            speedup, compile_s = vr.get("speedup_vs_hf_eager"), vr.get("compile_s")
            lines.append(
                f"{n:>24}: batch {vr['batch']:5d} {vr['img_s']:9.1f} img/s  step {vr['step_ms']['median']:8.2f} ms"
                f"  x{speedup if speedup is not None else float('nan'):.2f} hf_eager"
                f"  compile {'-' if compile_s is None else f'{compile_s:.1f} s'}  check {chk}"
            )
        else:
            lines.append(f"{n:>24}: {vr['status']} {vr.get('reason', '')}")
    return "\n".join(lines)


def attention_markdown(report: dict[str, Any]) -> str:
    """bench_attention: a row per attention call and implementation; × sdpa is against what fastmae runs."""
    lines = [f"**Attention calls** ({_provenance(report)})", ""]
    if report.get("smoke"):
        lines += ["_Smoke run (tiny shapes, or CPU): the numbers below are not measurements._", ""]
    lines += [
        "| model | part | B×H×N×Dh | impl | fwd ms | fwd+bwd ms | TFLOP/s (fwd+bwd) | % of copy (fwd+bwd) "
        "| × sdpa | kernels |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    host_timed = False
    for row in report["results"]:
        base = row["impls"].get("sdpa", {}).get("fwd+bwd", {}).get("ms")
        shape = f"{row['B']}×{row['H']}×{row['N']}×{row['Dh']}"
        for name, rec in row["impls"].items():
            if rec.get("status") != "done":
                lines.append(
                    f"| {row['model']} | {row['part']} | {shape} | {name} | – | – | – | – | – | {rec.get('reason', '')} |"
                )
                continue
            fb = rec["fwd+bwd"]
            ratio = f"{base / fb['ms']:.2f}" if base else "–"
            kern = ", ".join(k[:40] for k in rec["kernels"][:2])
            pct = f"{fb['pct_of_copy']:.0f}" if "pct_of_copy" in fb else "–"
            fwd_ms, fb_ms = (
                f"{rec[p]['ms']:.3f}{HOST_MARK if _host_timed(rec[p]) else ''}" for p in ("fwd", "fwd+bwd")
            )
            host_timed = host_timed or _host_timed(rec["fwd"]) or _host_timed(fb)
            lines.append(
                f"| {row['model']} | {row['part']} | {shape} | {name} | {fwd_ms} | {fb_ms} "
                f"| {fb['tflops']:.0f} | {pct} | {ratio} | {kern} |"
            )
    if host_timed:
        lines += ["", HOST_NOTE]
    best = attention_best(report)
    if best:
        lines += ["", "Fastest forward + backward per call, against sdpa (among the rows timed as sdpa's):"]
        for b in best:
            lines.append(
                f"- {b['model']} {b['part']}: `{b['impl']}` {b['ms']:.3f} ms vs sdpa {b['sdpa_ms']:.3f} ms; "
                f"x {b['calls_per_step']} calls a step = {b['step_ms_saved']:+.2f} ms of the step"
                + (f" ({HOST_MARK} host-timed: not a GPU-time comparison)" if b["host_timed"] else "")
            )
    return "\n".join(lines)


HOST_MARK = "†"
HOST_NOTE = (
    f"{HOST_MARK} timed by CUDA events around calls from the host, launch overhead in: the CUDA graph "
    "capture failed (``graph_error`` in the JSON); not comparable with the rows timed in a graph."
)


def _host_timed(timing: dict[str, Any]) -> bool:
    """A CUDA timing that fell back from the CUDA graph to events around host calls."""
    return timing.get("timer") == "do_bench"


def attention_best(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per attention call: the fastest implementation by fwd+bwd time, what it saves a step against
    sdpa (``calls_per_step`` x the difference; rows from before that field was recorded are left out)."""
    out = []
    for row in report.get("results", []):
        impls = {k: v for k, v in row.get("impls", {}).items() if v.get("status") == "done"}
        if "sdpa" not in impls or "calls_per_step" not in row:
            continue
        # a CUDA-graph time and a host-timed one do not compare: only rows timed as sdpa's
        timer = impls["sdpa"]["fwd+bwd"].get("timer")
        done = {k: v["fwd+bwd"]["ms"] for k, v in impls.items() if v["fwd+bwd"].get("timer") == timer}
        impl = min(done, key=done.get)
        out.append(
            {
                "model": row["model"],
                "part": row["part"],
                "impl": impl,
                "ms": done[impl],
                "sdpa_ms": done["sdpa"],
                "calls_per_step": row["calls_per_step"],
                "step_ms_saved": row["calls_per_step"] * (done["sdpa"] - done[impl]),
                "host_timed": _host_timed(impls["sdpa"]["fwd+bwd"]),
            }
        )
    return out


def markdown(reports: Sequence[dict[str, Any]]) -> str:
    """Markdown for each report: the step benchmark's tables in full, short ones for the others."""
    parts = []
    for rep in reports:
        kind = rep.get("benchmark")
        try:
            if kind == "bench_step":
                parts.append(step_markdown(rep))
            elif kind == "bench_kernels":
                parts.append(kernels_markdown(rep))
            elif kind == "bench_data":
                parts.append(data_markdown(rep))
            elif kind == "train_metrics":
                parts.append(train_markdown(rep, reports))
            elif kind == "bench_attention":
                parts.append(attention_markdown(rep))
            elif kind == "sweep_kernels":
                parts.append(sweep_markdown(rep))
            elif kind == "memory_probe":
                steps = [r for r in reports if r.get("benchmark") == "bench_step"]
                parts.extend(memory_check_markdown(r, rep) for r in steps)
                if not steps:
                    parts.append(f"**Memory probe** `{rep.get('_path', '')}`: no step benchmark to compare with")
            else:
                what = rep.get("error") or ", ".join(sorted(k for k in rep if not k.startswith("_")))[:300]
                parts.append(f"**{kind or 'unknown'}** `{rep.get('_path', '')}`: {what}")
        except (KeyError, TypeError, AttributeError, ValueError) as e:  # a schema changed: say so, go on
            parts.append(f"**{kind}** `{rep.get('_path', '')}`: cannot summarise ({type(e).__name__}: {e})")
    return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="+", help="results files (missing ones are reported, not fatal)")
    p.add_argument("--md", type=Path, help="write the markdown here (it is printed either way)")
    p.add_argument("--png", type=Path, help="write the bar chart here")
    args = p.parse_args(argv)
    reports = load(args.json)
    text = markdown(reports)
    print(text)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(text + "\n")
    if args.png:
        done = bar_chart(reports, args.png)
        print(f"chart: {done}" if done else "chart: no timed variants, none drawn", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
