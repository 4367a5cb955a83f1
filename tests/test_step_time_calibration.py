"""The step-time calibration (qwen3_jax/step_time.py, benchmarks/bench_step_time.py): the fitted
shares in the code are the fit of the committed points, no prediction beats the chip's best
published MFU, the AOT report says what is measured and what is modelled, and the remat choice
follows the calibrated time. Fast: committed JSON only, no compiles."""

import copy
import json
import re
import sys
from pathlib import Path

import pytest

from qwen3_jax import aot, remat_search, step_time

ROOT = Path(__file__).resolve().parents[1]
CAL = json.loads((ROOT / "benchmarks" / "aot_reports" / "step_time_calibration.json").read_text())
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_step_time  # noqa: E402


def test_the_fit_of_the_committed_points_is_the_calibration_in_the_code():
    fitted = step_time.calibrations(CAL["points"])
    assert set(fitted) == set(step_time.CALIBRATION) == set(step_time.CAPS)
    for fam, c in fitted.items():
        assert c == step_time.CALIBRATION[fam], fam
        saved = CAL["calibration"][fam]
        assert (c.compute, c.hbm, c.low, c.high, list(c.points)) == \
            (saved["compute"], saved["hbm"], saved["low"], saved["high"], saved["points"])
    # every measured chip family has points, and each point is predicted from the others too
    assert {p["family"] for p in CAL["points"]} == {"h200", "v5p", "v6e"}
    loo = step_time.leave_one_out(CAL["points"])
    for r in CAL["table"]:
        assert r["loo_s"] == pytest.approx(loo[r["case"]], rel=1e-9)


def test_the_points_are_read_from_their_committed_sources():
    """bench_step_time recomputes each point from its report and source (the GPU's JSON, the
    published figure) exactly as committed."""
    for p in bench_step_time.POINTS:
        saved = next(x for x in CAL["points"] if x["name"] == p["name"])
        now = bench_step_time.point_inputs(p)
        assert now["measured_s"] == pytest.approx(saved["measured_s"], rel=1e-12)
        assert now["terms"] == pytest.approx(saved["terms"], rel=1e-12)


def test_no_calibrated_prediction_beats_the_best_published_mfu():
    for r in CAL["table"]:
        cap = CAL["calibration"][r["chip"]]["cap_mfu"]
        assert r["after_mfu"] <= cap + 1e-12 and r["after_low_s"] <= r["after_s"] <= r["after_high_s"]
    for fam, c in step_time.CALIBRATION.items():
        peak = step_time.CHIPS[fam].peak_flops
        # a step at the peak with no memory traffic: the old model's 100%, capped now
        t = step_time.estimate(step_time.CHIPS[fam], flops=peak, model_flops=peak, hbm_bytes=0.0, ici_wire_bytes=0.0)
        assert t["predicted_mfu"] == pytest.approx(1.0)
        cal = step_time.calibrate(fam, t, peak)
        assert cal["capped"] == (c.compute > c.cap_mfu)  # at the fitted share, unless that beats the cap
        assert max(cal["predicted_mfu"], cal["mfu_high"], cal["mfu_low"]) <= c.cap_mfu + 1e-12
    for s in CAL["slices"].values():
        for r in s["rows"]:
            if r.get("predicted_mfu"):
                assert r["predicted_mfu"] <= step_time.CAPS["v5p"][0] + 1e-12


def test_the_calibration_lowers_the_errors():
    before = [abs(r["error_before"]) for r in CAL["table"]]
    after = [abs(r["error_after"]) for r in CAL["table"]]
    assert sum(after) < sum(before) / 2 and max(after) < max(before)
    # the old model put these dense steps above 70% MFU; measured they are not
    assert any(r["before_mfu"] > 0.9 for r in CAL["table"])


def test_aot_report_says_what_is_measured_and_what_is_modelled():
    r = json.loads((ROOT / "benchmarks" / "aot_reports" / "8b.json").read_text())
    terms = step_time.report_terms(r)
    r["step_time"] = {**r["step_time"], "calibrated": step_time.calibrate("v5p", terms, r["model_flops_per_chip"])}
    text = aot.format_report(r)
    assert "MEASURED (read from the compiled program" in text and "HBM traffic" in text
    modelled = text[text.index("MODELLED"):]
    c = step_time.CALIBRATION["v5p"]
    assert "calibrated" in modelled and f"compute at {c.compute:.0%} of peak" in modelled
    assert all(p in modelled for p in c.points) and "leave-one-out error" in modelled
    assert f"{c.cap_mfu:.1%} MFU" in modelled and "bound (every unit at its peak" in modelled
    assert r["step_time"]["calibrated"]["predicted_mfu"] < 0.75 < r["step_time"]["predicted_mfu"]


def test_step_time_fields_carry_the_calibration_and_the_labels():
    """aot.step_time_fields on a tiny hand HLO for a v5p slice: the uncalibrated terms, the
    calibrated point and range, and the list of fields read from the program."""
    from test_step_time import _HLO
    from qwen3_jax.config import get_config

    head = {"libtpu_topology": "v5p:2x2x1", "topology": "v5p-8", "num_slices": 1, "chips": 4}
    f = aot.step_time_fields(head, get_config("tiny-dense"), _HLO, 1, 1e12, 0.9e12, {})
    st = f["step_time"]
    assert st["calibrated"]["family"] == "v5p" and "modelled, not measured" in st["label"]
    assert "flops_per_chip" in st["measured_from_program"]
    assert st["calibrated"]["estimate_s"] > st["estimate_s"]  # below the peak rates


def test_search_and_the_slice_files_follow_the_calibrated_time():
    """The committed searches re-ranked by the calibrated time (from the stored rows) give the
    committed JSON's choices, and each slice file sets that policy and names the runner-up."""
    for name, saved in CAL["slices"].items():
        now = bench_step_time.rerank(name)
        assert (now["choice"], now["runner_up"]) == (saved["choice"], saved["runner_up"]), name
        gin = (ROOT / saved["slice"]).read_text()
        assert re.search(rf"^model_config\.remat = '{saved['choice']}'$", gin, re.M), saved["slice"]
        if saved["runner_up"]:
            assert f"runner-up {saved['runner_up']}" in gin, saved["slice"]


def test_rank_uses_the_calibrated_time_not_flops_alone():
    """Two fitting policies: fewer FLOPs but more HBM traffic loses once the HBM term is what the
    calibrated model says binds; the same rows without a calibrated time go by FLOPs."""
    peak = step_time.CHIPS["v5p"].peak_flops
    base = {"compiled": True, "fits": True, "peak_gib": 50.0, "host_gib": 0.0}
    few = dict(base, policy="save_attn_moe", flops_per_chip=1.0 * peak, flops_ratio=1.1,
               terms={"compute_s": 1.0, "hbm_s": 5.3, "ici_s": 0.0, "dcn_s": 0.0, "host_offload_s": 0.0})
    many = dict(base, policy="save_attn_out", flops_per_chip=1.1 * peak, flops_ratio=1.2,
                terms={"compute_s": 1.1, "hbm_s": 4.5, "ici_s": 0.0, "dcn_s": 0.0, "host_offload_s": 0.0})
    rows = [remat_search.recalibrated(r, {}, "v5p") for r in (few, many)]
    assert rows[1]["estimate_s"] < rows[0]["estimate_s"]
    assert remat_search.rank(rows) == ("save_attn_out", "save_attn_moe")
    bare = [dict(copy.deepcopy(r), estimate_s=None) for r in rows]
    assert remat_search.rank(bare) == ("save_attn_moe", "save_attn_out")
