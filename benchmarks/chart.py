"""The README's bar chart of step throughput: img/s per variant with the ratio to HF eager, one panel
per model and batch on one shared axis from 0, drawn with Pillow alone (no plotting library).
``benchmarks/report.py --png`` and ``ingest.py`` draw it from ``bench_step`` results.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def run_label(rep: dict[str, Any]) -> str:
    """``<commit> [(dirty)], <date and time>`` of one report (the time tells two runs of a commit apart)."""
    env = rep.get("env", {})
    git = env.get("git") or {}
    dirty = {True: " (dirty)", False: ""}.get(git.get("dirty"), " (dirty: unknown)")
    return (
        f"commit {str(git.get('commit', '?'))[:10]}{dirty}, {str(env.get('date_utc', '?'))[:16].replace('T', ' ')} UTC"
    )


def ticks(top: float) -> list[float]:
    """Round tick values from 0 to at least ``top`` (4-8 of them)."""
    step = 10 ** math.floor(math.log10(max(top, 1e-9)))
    for mult in (1, 2, 5, 10):
        if top / (step * mult) <= 7:
            step *= mult
            break
    return [i * step for i in range(int(math.ceil(top / step)) + 1)]


def bar_chart(reports: Sequence[dict[str, Any]], path: str | Path, width: int = 1100) -> Path | None:
    """Horizontal bars of img/s per variant, one panel per (model, batch); ratio to HF eager on each bar.

    Every panel shares one img/s axis from 0 (drawn under each panel), so bars compare across
    panels too; a panel names its own run (commit, date) when the panels come from more than one.
    Returns the path, or None when no report has timed variants.
    """
    from PIL import Image, ImageDraw

    panels = []
    for rep in reports:
        if rep.get("benchmark") != "bench_step":
            continue
        dev = rep.get("env", {}).get("device", {}).get("name", "?")
        for s in rep.get("settings", []):
            rows = [(n, v) for n, v in s.get("variants", {}).items() if v.get("img_s")]
            if rows:
                panels.append((f"{s['model']}, batch {s['batch']}, {dev}", rows, rep))
    if not panels:
        return None

    runs = list(dict.fromkeys(run_label(rep) for _, _, rep in panels))
    row_h, head_h, axis_h, pad, label_w = 26, 34, 22, 16, 190
    height = pad + 30 + sum(head_h + row_h * len(rows) + axis_h + pad for _, rows, _ in panels)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    title_font, font, small = _font(18), _font(14), _font(12)
    title = "MAE training step, img/s (higher is better); " + (
        runs[0] if len(runs) == 1 else f"{len(runs)} runs, each panel names its own"
    )
    if not all(rep.get("timings_meaningful", False) for _, _, rep in panels):
        title += "  [SMOKE RUN: not a measurement]"
    draw.text((pad, pad), title, fill="black", font=title_font)
    y = pad + 30
    bar_x0, bar_x1 = pad + label_w, width - pad - 170
    marks = ticks(max(v["img_s"] for _, rows, _ in panels for _, v in rows))
    top = marks[-1]

    def x_of(value: float) -> int:
        return bar_x0 + int((bar_x1 - bar_x0) * value / top)

    for heading, rows, rep in panels:
        draw.text((pad, y + 8), heading + ("" if len(runs) == 1 else f"; {run_label(rep)}"), fill="black", font=font)
        y += head_h
        for t in marks[1:]:  # grid first, bars over it
            draw.line([x_of(t), y, x_of(t), y + row_h * len(rows) + 2], fill=(220, 220, 220))
        for name, v in rows:
            failed = v.get("check", {}).get("ok") is False
            if failed:
                color = (214, 39, 40)
            elif name.startswith("hf_"):
                color = (150, 150, 150)
            else:
                color = (255, 127, 14) if name == "fm_fast" else (31, 119, 180)
            draw.text((pad, y + 5), name, fill="black", font=font)
            x1 = max(bar_x0 + 2, x_of(v["img_s"]))
            draw.rectangle([bar_x0, y + 3, x1, y + row_h - 5], fill=color)
            ratio = v.get("speedup_vs_hf_eager")
            label = f"{v['img_s']:.0f}" + (f"  x{ratio:.2f}" if ratio else "")
            if failed:
                label += "  CHECK FAILED"
            draw.text((x1 + 6, y + 5), label, fill="black", font=font)
            y += row_h
        draw.line([bar_x0, y + 2, bar_x1, y + 2], fill="black")
        for t in marks:
            draw.line([x_of(t), y + 2, x_of(t), y + 6], fill="black")
            draw.text((x_of(t) - 8, y + 6), f"{t:g}", fill="black", font=small)
        y += axis_h + pad
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
