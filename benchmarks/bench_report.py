"""Benchmark results as committed JSON, and the tables printed from them.

Every benchmark that reports a measurement writes one JSON file (benchmarks/reports/ by default):
the date, the machine, the command line, the raw per-run numbers and a `benchmark` field naming
the script whose `markdown(report)` prints its table. `--from_json FILE` on that script prints the
table again without running anything.

README.md and docs/*.md keep such tables between markers,

  <!-- table: benchmarks/reports/vs_maxtext.json -->
  ...the printer's output...
  <!-- /table -->

and tests/test_bench_tables.py checks that each marked table is what the printer makes of the
committed JSON. After a rerun, `python benchmarks/bench_report.py --update` rewrites them.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "benchmarks" / "reports"
DOCS = ("README.md", "docs/tpu.md")
MARKED = re.compile(r"(<!-- table: (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def machine() -> dict:
    """What ran the benchmark: CPU model and count, memory, OS, Python, and the repository commit."""
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine())
    mem = next((int(line.split()[1]) / 2 ** 20 for line in _read("/proc/meminfo").splitlines()
                if line.startswith("MemTotal")), None)
    commit = _git("rev-parse", "--short", "HEAD").strip()
    changed = _git("status", "--porcelain", "--untracked-files=no").splitlines()
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1) if mem else None,
            "os": platform.platform(), "python": platform.python_version(), "commit": commit or None,
            "uncommitted_changes": [line[3:] for line in changed], "load_average_at_start": list(os.getloadavg())}


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def header(benchmark: str) -> dict:
    """The fields every report starts with."""
    return {"benchmark": benchmark, "date": datetime.date.today().isoformat(),
            "command": " ".join(shlex.quote(a) for a in ["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
            "machine": machine()}


def write(path: str | Path, report: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(path)
    return path


def load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def measure_or_print(args, measure, markdown) -> int:
    """A benchmark's ending: with `--from_json FILE` print that report and run nothing; otherwise
    `measure(args)`, write the report to `args.json` and print it."""
    if args.from_json:
        print(markdown(load(args.from_json)), end="")
        return 0
    report = measure(args)
    path = write(args.json, report)
    print(markdown(report), end="")
    print(f"(results: {path})")
    return 0


def provenance(report: dict) -> str:
    """One line: when, where and how the numbers were made (or where they were copied from)."""
    m = report.get("machine") or {}
    where = m.get("description") or ", ".join(str(x) for x in (m.get("cpu"), m.get("cores") and f"{m['cores']} cores")
                                              if x)
    line = f"Measured {report.get('date', '?')}" + (f" on {where}" if where else "")
    if report.get("transcribed_from"):
        line += f"; transcribed from {report['transcribed_from']}"
    if report.get("command"):
        line += f"; `{report['command']}`"
    return line


def printer(report: dict):
    """The `markdown(report)` function of the benchmark that wrote `report`."""
    name = report["benchmark"]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.markdown


def render(json_path: str | Path) -> str:
    """The table the JSON file's own benchmark prints, as it stands between a pair of markers."""
    report = load(ROOT / json_path)
    return printer(report)(report).rstrip("\n") + "\n"


def marked_tables(text: str) -> list[tuple[str, str]]:
    """(JSON path, table body) for each marked table of a markdown text."""
    return [(m["path"], m["body"]) for m in MARKED.finditer(text)]


def update(text: str) -> str:
    """`text` with each marked table replaced by what its JSON prints now."""
    return MARKED.sub(lambda m: m.group(1) + render(m["path"]) + m.group(4), text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="rewrite (or check) the marked measurement tables of the docs")
    p.add_argument("--update", action="store_true", help="rewrite the tables in place")
    args = p.parse_args(argv)
    stale = []
    for doc in DOCS:
        path = ROOT / doc
        text = path.read_text()
        new = update(text)
        if new != text:
            stale.append(doc)
            if args.update:
                path.write_text(new)
    verb = "rewrote" if args.update else "stale"
    print(f"{verb}: {', '.join(stale)}" if stale else "all marked tables match their JSON")
    return 1 if stale and not args.update else 0


if __name__ == "__main__":
    sys.exit(main())
