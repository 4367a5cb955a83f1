"""Measurement tables come from committed JSON: each table marked in README.md / docs is exactly
what its benchmark prints from the JSON file the marker names (a stale table fails here; fix it
with `python benchmarks/bench_report.py --update`), every committed report prints, and the
benchmarks' docstrings hold no measurements. Also the summary bench_vs_maxtext.py draws from its
runs, on made-up numbers. Reads JSON only; runs no benchmark."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "benchmarks" / "reports"
# the benchmarks whose docstrings must not report measurements (their tables live in reports/)
CLEAN_DOCSTRINGS = ("bench_vs_maxtext", "bench_moe_impl", "bench_distill", "bench_train", "bench_attention",
                    "bench_generate", "bench_convert", "bench_data", "bench_moe_balance")


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = load("bench_report")
vs = load("bench_vs_maxtext")


def marked():
    return [(doc, path, body) for doc in report.DOCS
            for path, body in report.marked_tables((ROOT / doc).read_text())]


@pytest.mark.parametrize("doc,path,body", marked(), ids=lambda x: str(x)[:40])
def test_marked_table_matches_its_json(doc, path, body):
    assert (ROOT / path).is_file(), f"{doc}: the marked table names {path}, which is not committed"
    assert body == report.render(path), (f"{doc}: the table from {path} is stale; run "
                                         "`python benchmarks/bench_report.py --update`")


def test_some_table_is_marked():
    assert any(path.endswith("vs_maxtext.json") for _, path, _ in marked())


def test_markers_pair_up():
    for doc in report.DOCS:
        text = (ROOT / doc).read_text()
        assert text.count("<!-- table: ") == text.count("<!-- /table -->") == len(report.marked_tables(text)), doc


@pytest.mark.parametrize("path", sorted(REPORTS.glob("*.json")), ids=lambda p: p.name)
def test_every_report_prints(path, capsys):
    data = json.loads(path.read_text())
    assert data.get("date") and data.get("machine") and data.get("benchmark")
    assert data.get("command") or data.get("transcribed_from"), "a report says how it was made"
    table = report.render(path.relative_to(ROOT))
    assert table.startswith(f"Measured {data['date']}") and "\n|---" in table
    load(data["benchmark"]).main(["--from_json", str(path)])  # the script's own --from_json prints the same
    assert capsys.readouterr().out == table


@pytest.mark.parametrize("name", CLEAN_DOCSTRINGS)
def test_docstrings_report_no_measurements(name):
    doc = ast.get_docstring(ast.parse((ROOT / "benchmarks" / f"{name}.py").read_text())) or ""
    assert not re.search(r"^\s*\|.*\d\.\d+.*\|", doc, re.M), f"{name}: a measured table in the docstring"
    assert not re.search(r"\bMeasured\b.*\d{4}-\d\d-\d\d", doc), f"{name}: a dated measurement in the docstring"
    assert not re.search(r"\d+(\.\d+)? ?(ms|s/step)\b", doc), f"{name}: a timing in the docstring"


# -- bench_vs_maxtext's protocol and summary on made-up numbers ----------------------------------

def test_summary_of_separated_sides():
    s = vs.summarise(ours=[10.0, 11.0, 10.5], theirs=[13.0, 12.0, 14.0])
    assert s["ours"] == {"min": 10.0, "median": 10.5, "max": 11.0, "n": 3}
    assert s["maxtext"] == {"min": 12.0, "median": 13.0, "max": 14.0, "n": 3}
    assert s["ratio"] == pytest.approx(13.0 / 10.5)
    # per-round ratios 1.3, 12/11, 14/10.5
    assert s["round_ratio_min"] == pytest.approx(12 / 11)
    assert s["round_ratio_max"] == pytest.approx(14 / 10.5)
    assert s["resolved"]


def test_overlapping_ranges_are_not_resolved():
    s = vs.summarise(ours=[10.0, 12.5, 11.0], theirs=[12.0, 13.0, 11.5])  # 12.5 > 11.5: the ranges overlap
    assert not s["resolved"]
    assert vs.summarise([12.0, 13.0], [10.0, 11.0])["resolved"]  # apart either way round
    assert vs.summarise([12.0, 13.0], [10.0, 11.0])["ratio"] < 1
    assert not vs.summarise([10.0, 11.0], [11.0, 12.0])["resolved"]  # touching counts as overlap


def test_summary_needs_paired_runs():
    with pytest.raises(ValueError):
        vs.summarise([10.0, 11.0], [12.0])


MAXTEXT_LOG = """I1231 23:59:00.000000 1 train.py:1] compiling
I1231 23:59:50.500000 1 metric_logger.py:265] completed step: 0, seconds: 0.431, loss: 10.4
I1231 23:59:51.000000 1 metric_logger.py:265] completed step: 1, seconds: 1.426, loss: 10.3
W1231 23:59:52.000000 1 other.py:1] a warning between two steps
I1231 23:59:59.000000 1 metric_logger.py:265] completed step: 2, seconds: 50.500, loss: 10.2
I0101 00:00:09.000000 1 metric_logger.py:265] completed step: 3, seconds: 0.500, loss: 10.1
I0101 00:00:21.000000 1 metric_logger.py:265] completed step: 4, seconds: 8.000, loss: 10.0
"""


def test_maxtext_steps_timed_from_log_line_gaps():
    stamps, seconds = vs.maxtext_log(MAXTEXT_LOG)
    assert seconds == [0.431, 1.426, 50.5, 0.5, 8.0]
    # device time of step i = gap between the lines of steps i-1 and i (midnight crossed at step 3)
    assert vs.maxtext_timed(stamps, warmup=1, timed=4) == pytest.approx([0.5, 8.0, 10.0, 12.0])
    assert vs.maxtext_timed(stamps, warmup=2, timed=2) == pytest.approx([8.0, 10.0])
    # MaxText's own figure is two steps late: its entry for step 4 is step 2's time
    assert seconds[2 + vs.MAXTEXT_SECONDS_LAG] == pytest.approx(vs.maxtext_timed(stamps, 2, 1)[0])
    with pytest.raises(ValueError):
        vs.maxtext_timed(stamps, warmup=2, timed=4)  # only 5 steps logged
    with pytest.raises(ValueError):
        vs.maxtext_timed(stamps, warmup=0, timed=2)  # step 0 has no line before it


def made_up_report(ours: list[float], theirs: list[float], extra_runs=()) -> dict:
    runs = [dict(side="ours", round=i, step_s=v) for i, v in enumerate(ours)]
    runs += [dict(side="maxtext", round=i, step_s=v) for i, v in enumerate(theirs)]
    return {"benchmark": "bench_vs_maxtext", "date": "2026-01-01", "machine": {"description": "a test box"},
            "command": "made up", "protocol": {"warmup": 2, "timed": 4, "timed_steps": "2-5"},
            "cases": [{"case": "dense", "setting": "matched", "runs": runs + list(extra_runs)},
                      {"case": "moe", "setting": "matched", "runs": []}]}


def test_table_pairs_rounds_and_flags_overlap():
    unfinished = [dict(side="ours", round=3, step_s=9.0)]  # a round MaxText never ran: left out
    table = vs.markdown(made_up_report([10.0, 10.4, 10.2], [10.3, 10.2, 10.6], unfinished))
    assert "| dense | matched | 3 | 10.00 / 10.20 / 10.40 | 10.20 / 10.30 / 10.60 | 1.01x [0.98, 1.04] | " \
           "not resolved |" in table
    assert "| moe | matched | 0 | - | - | - | - |" in table
    # the ranges overlap, yet MaxText was slower in every round: said, still "not resolved"
    table = vs.markdown(made_up_report([10.0, 12.0, 11.0], [10.5, 12.5, 11.2]))
    assert "| 1.02x [1.02, 1.05] | not resolved (every round > 1) |" in table
    table = vs.markdown(made_up_report([10.0, 10.4, 10.2], [11.0, 11.5, 11.2]))
    assert "| 1.10x [1.10, 1.11] | yes |" in table
