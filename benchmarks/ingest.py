"""Right after a device run: its files into ``benchmarks/results/`` under dated names, plus the report.

The first H100 run's files were lost because copying them waited for other work. This makes the
copy one command, to run as soon as the device tool returns::

    python benchmarks/ingest.py <files_at>            # then: git add benchmarks/results && git commit

Each file keeps its name behind a ``<date>_<gpu>_`` prefix (``2026-11-28_h100_step_vit_base.json``);
the date and GPU come from the run's ``env.json``, else from the ``env`` block of its benchmark JSON
(else today and ``gpu``). The report (``report.py``'s markdown and bar chart) is written beside them
as ``<prefix>report.md`` / ``.png`` and covers every result with that prefix, so a second call on
the same day and GPU adds to the first's report. Result files already there are not overwritten
(``--force`` does); a second run of the same day and GPU at another commit takes ``--tag`` instead
(``--tag 5ac384b`` -> ``2026-11-27-5ac384b_h200_``), so the first run's files and report stay.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import sys
from pathlib import Path

try:
    from benchmarks import report
except ModuleNotFoundError:  # run as a script: the repo root is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import report

RESULTS = Path(__file__).resolve().parent / "results"
# What the result files are called on the device (device.sh, device_dali.sh); anything else is copied too.
REPORTED = (".json", ".jsonl")


def gpu_tag(name: str | None) -> str:
    """A short file-name tag for a device name: ``NVIDIA H100 80GB HBM3`` -> ``h100``; the PCIe and
    NVL cards, whose peaks differ from the SXM's, keep their form factor (``h100-pcie``, ``h200-nvl``)."""
    if not name:
        return "gpu"
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name)
    if not m:
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:24]
    form = re.search(r"\b(PCIe|NVL)\b", name, flags=re.IGNORECASE)
    return (m.group(1) + (f"-{form.group(1)}" if form else "")).lower()


def prefix_of(src: Path, tag: str | None = None) -> str:
    """``<date>_<gpu>_`` from the run's environment: device.sh's report (``env.json``, or
    ``<profile>_env.json`` for another profile), else the ``env`` block every benchmark JSON carries
    (a run that called one benchmark directly); ``tag`` goes after the date."""
    if tag is not None and not re.fullmatch(r"[A-Za-z0-9.]+", tag):
        raise SystemExit(f"ingest: --tag {tag!r}: letters, digits and dots only (it goes into file names)")
    date, gpu = datetime.date.today().isoformat(), "gpu"
    reports = sorted(src.glob("*env.json"), key=lambda p: p.name != "env.json")
    candidates = [*reports, *sorted(p for p in src.glob("*.json") if p not in reports)]
    for path in candidates:
        try:
            env = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        env = env if path in reports else env.get("env") if isinstance(env, dict) else None
        if not isinstance(env, dict) or not isinstance(env.get("device"), dict | str):
            continue
        date = str(env.get("date_utc", date))[:10]
        dev = env["device"]
        if isinstance(dev, str):  # bench_kernels' flat env: the device's name, a GPU when it ran on CUDA
            gpu = gpu_tag(dev if env.get("cuda") else "cpu")
        else:
            gpu = gpu_tag(dev.get("name") if dev.get("type") == "cuda" else "cpu")
        break
    return f"{date}{'-' + tag if tag else ''}_{gpu}_"


def ingest(src: Path, dest: Path = RESULTS, force: bool = False, tag: str | None = None) -> list[Path]:
    """Copy every file of ``src`` to ``dest`` with the run's prefix; write the report; return the new paths."""
    files = sorted(p for p in src.rglob("*") if p.is_file() and not p.name.endswith(".tmp"))
    if not files:
        raise SystemExit(f"ingest: no files under {src}")
    prefix = prefix_of(src, tag)
    dest.mkdir(parents=True, exist_ok=True)
    targets = [dest / (prefix + "_".join(f.relative_to(src).parts)) for f in files]
    clash = [t.name for t in targets if t.exists()]
    if clash and not force:  # checked before anything is copied: a refusal leaves dest as it was
        raise SystemExit(
            f"ingest: {', '.join(clash)} exist(s) in {dest} (a second run of the day: --tag <commit>; "
            "the same run again: --force overwrites)"
        )
    for f, target in zip(files, targets, strict=True):
        shutil.copyfile(f, target)
    return targets + write_report(dest, prefix)


def write_report(dest: Path, prefix: str) -> list[Path]:
    """``<prefix>report.md`` / ``.png`` over every result in ``dest`` with that prefix."""
    out: list[Path] = []
    # The report covers every result of this date and GPU, so a second call's files join the first's
    # (it is derived, so rewriting it loses nothing), plus the newest CPU activation count, against
    # which the report checks measured memory.
    reported = sorted(p for p in dest.glob(f"{prefix}*") if p.suffix in REPORTED and not p.name.endswith("env.json"))
    probes = sorted(dest.glob("*_cpu_activation_memory.json"))
    if reported and probes and not prefix.endswith("_cpu_"):
        reported.append(probes[-1])
    if reported:
        reports = report.load(reported)
        md = report.markdown(reports)
        (dest / f"{prefix}report.md").write_text(md + "\n")
        out.append(dest / f"{prefix}report.md")
        png = report.bar_chart(reports, dest / f"{prefix}report.png")
        if png:
            out.append(Path(png))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="the device tool's files_at folder (or any folder of result files)")
    p.add_argument("--dest", type=Path, default=RESULTS)
    p.add_argument("--force", action="store_true", help="overwrite files already in --dest")
    p.add_argument("--tag", help="after the date in the names, for a second run of the day (e.g. the commit)")
    args = p.parse_args(argv)
    for path in ingest(args.src, args.dest, args.force, args.tag):
        print(path)
    print(f"next: git add {args.dest} && git commit -m 'Results: <what ran, on which GPU>'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
