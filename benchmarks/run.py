"""One harness, one report: ``python -m benchmarks.run [--quick] [--only NAME ...]``.

Each benchmark module exposes ``run(quick: bool) -> dict`` and measures itself against a
baseline in the same process, on the same machine, so the ratios are comparable across hosts.
Results go to ``benchmarks/results/<date>-<host>.json`` and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import socket
import sys
import time
import traceback
from pathlib import Path

BENCHMARKS = ["extraction", "metrics", "training", "sampling", "scale", "quality"]
RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import torch

    info = {
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return info


def _rows(name: str, result: dict, prefix: str = "") -> list[tuple[str, str, str]]:
    """Flatten a result dict into (benchmark, key, value) rows for the markdown table."""
    rows = []
    for key, value in result.items():
        label = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(_rows(name, value, f"{label}."))
        elif isinstance(value, float):
            rows.append((name, label, f"{value:.4g}"))
        elif isinstance(value, (int, str, bool)) or value is None:
            rows.append((name, label, str(value)))
    return rows


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"Benchmarks {report['date']} on `{m['host']}` ({m['cpus']} CPUs, "
        f"{m.get('memory_gib', '?')} GiB, GPU: {m['cuda'] or 'none'}; torch {m['torch']}; "
        f"{'quick' if report['quick'] else 'full'} run)",
        "",
        "| benchmark | measure | value |",
        "| --- | --- | --- |",
    ]
    for name, result in report["results"].items():
        for bench, key, value in _rows(name, result):
            lines.append(f"| {bench} | {key} | {value} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller inputs (≤ 10 min on 2 cores)")
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS, help="run only these benchmarks")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    args = parser.parse_args(argv)

    report = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "quick": args.quick, "machine": machine(), "results": {}}
    failed = []
    for name in args.only or BENCHMARKS:
        print(f"== benchmark {name} ({'quick' if args.quick else 'full'})", flush=True)
        start = time.perf_counter()
        try:
            result = importlib.import_module(f"benchmarks.{name}").run(quick=args.quick)
        except Exception as exc:  # one broken benchmark must not hide the others' numbers
            traceback.print_exc()
            result = {"error": f"{type(exc).__name__}: {exc}"}
            failed.append(name)
        result["wall_s"] = round(time.perf_counter() - start, 2)
        report["results"][name] = result
        print(json.dumps(result, indent=2, default=str), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{report['date'][:10]}-{report['machine']['host']}{'-quick' if args.quick else ''}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out / stem}.json and .md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
