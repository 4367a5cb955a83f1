"""launch/expert_report.py and qwen3_jax.expert_report: the load heatmap, the per-domain
routing table and its Jensen-Shannon divergence."""

from __future__ import annotations

import json
import math
import shutil
import struct

import numpy as np
import pytest
from train_utils import ROOT, load_script, run, tiny_args

from qwen3_jax import expert_report as er
from qwen3_jax.errors import ReportError

REPORT = str(ROOT / "launch" / "expert_report.py")


def _launcher():
    return load_script(REPORT, "expert_report_launch")


# -- Jensen-Shannon divergence ----------------------------------------------------------------------

def test_js_divergence_matches_hand_computation():
    assert er.js_divergence([0.25, 0.25, 0.5], [1, 1, 2]) == pytest.approx(0.0, abs=1e-12)  # counts normalise
    assert er.js_divergence([1, 0, 0, 0], [0, 0, 3, 1]) == pytest.approx(1.0)  # disjoint supports
    # p = (1, 0), q = (1/2, 1/2): m = (3/4, 1/4); JS = H(m) - (H(p) + H(q)) / 2 = H(m) - 1/2 (bits)
    h_m = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert er.js_divergence([2, 0], [1, 1]) == pytest.approx(h_m - 0.5, abs=1e-12)
    assert er.js_divergence([1, 0], [1, 1]) == pytest.approx(0.311278124459, abs=1e-9)
    a, b = [0.1, 0.6, 0.3], [0.5, 0.2, 0.3]
    assert er.js_divergence(a, b) == pytest.approx(er.js_divergence(b, a))  # symmetric
    with pytest.raises(ReportError):
        er.js_divergence([1, 0], [1, 0, 0])
    with pytest.raises(ReportError):
        er.js_divergence([0, 0], [1, 0])


def test_specialization_summarises_layers_and_pairs():
    code = np.array([[10, 0, 0, 0], [5, 5, 5, 5]])
    docs = np.array([[0, 0, 4, 4], [5, 5, 5, 5]])
    rep = er.specialization({"code": code, "docs": docs}, layer_ids=[1, 3], top=2)
    assert [r["layer"] for r in rep["layers"]] == [1, 3]
    assert rep["layers"][0]["js"]["code|docs"] == pytest.approx(1.0)
    assert rep["layers"][1]["js"]["code|docs"] == pytest.approx(0.0)
    assert rep["score"] == pytest.approx(0.5)
    top = rep["layers"][0]["domains"]["code"]
    assert top["top"][0] == [0, 1.0] and top["load"] == pytest.approx(4.0) and top["entropy"] == pytest.approx(0.0)
    assert rep["layers"][1]["domains"]["docs"]["entropy"] == pytest.approx(1.0)
    assert "specialization score" in er.format_table(rep)
    with pytest.raises(ReportError):
        er.specialization({"code": code, "docs": docs[:1]})


def test_read_expert_counts_last_steps_and_resumed_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "split": "train", "loss": 1.0, "expert_counts": [[s, 1.0], [1.0, 1.0]]} for s in (1, 2, 3)]
    lines.insert(2, {"step": 2, "split": "eval", "loss": 2.0})
    lines.append({"step": 3, "split": "train", "expert_counts": [[30.0, 10.0], [0.0, 4.0]]})  # resumed: wins
    path.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"step": 4, "spl')  # cut by a crash
    steps, counts = er.read_expert_counts(path, last=2)
    assert steps == [2, 3] and counts.shape == (2, 2, 2)
    np.testing.assert_allclose(counts[1], [[30, 10], [0, 4]])
    sh = er.shares(counts.sum(0))
    np.testing.assert_allclose(sh.sum(-1), 1.0)
    np.testing.assert_allclose(er.layer_loads(sh), [2 * 32 / 43, 2 * 5 / 6])
    (tmp_path / "dense.jsonl").write_text(json.dumps({"step": 1, "split": "train", "loss": 1.0}) + "\n")
    with pytest.raises(ReportError, match="dense.jsonl"):
        er.read_expert_counts(tmp_path / "dense.jsonl")
    with pytest.raises(ReportError, match="nothing.jsonl"):
        er.read_expert_counts(tmp_path / "nothing.jsonl")


# -- the command on a short training run ------------------------------------------------------------

@pytest.fixture(scope="module")
def moe_run(data_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("moe_report") / "run"
    r = run(tiny_args(data_dir, work, steps=4, every=4))
    assert r.returncode == 0, r.stderr[-3000:]
    return work


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_writes_heatmap_and_domain_table(moe_run, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "load.png"
    # No --data: the code and docs folders the run trained on, from its config.gin.
    r = run([REPORT, str(moe_run), "--last", "3", "--out", str(out), "--tokens", "1000", "--seq_len", "64",
             "--batch_size", "4"])
    assert r.returncode == 0, r.stderr[-3000:]
    w, h = _png_size(out)
    inches = er.heatmap_inches(2, 8)  # tiny-moe: 2 MoE layers, 8 experts
    assert (w, h) == (round(inches[0] * er.HEATMAP_DPI), round(inches[1] * er.HEATMAP_DPI))
    import matplotlib.image

    pixels = matplotlib.image.imread(str(out))
    assert pixels.std() > 0.05  # not a blank canvas

    rep = json.loads(out.with_suffix(".json").read_text())
    assert rep["steps"] == [2, 4] and rep["logged_steps"] == 3
    shares_LE = np.asarray(rep["load_shares"])
    assert shares_LE.shape == (2, 8)
    np.testing.assert_allclose(shares_LE.sum(-1), 1.0, rtol=1e-6)
    assert 1.0 <= rep["worst_layer"]["load"] <= 4.0 and rep["top_k"] == 2  # E/k: every token picks one expert
    assert rep["tokens"] == {"code": 1000, "docs": 1000}  # exactly --tokens, the rest masked as padding
    spec = rep["specialization"]
    assert spec["domains"] == ["code", "docs"] and len(spec["layers"]) == 2
    for layer in spec["layers"]:
        assert 0.0 <= layer["js"]["code|docs"] <= 1.0
        for d in ("code", "docs"):
            assert sum(layer["domains"][d]["shares"]) == pytest.approx(1.0)
    assert 0.0 <= spec["score"] <= 1.0
    assert "JS code|docs" in r.stdout and "specialization score" in r.stdout
    assert f"max {rep['worst_layer']['load']:.2f}" in r.stdout and "1 = even, 4 = collapsed" in r.stdout


def test_a_folder_of_runs_gets_one_report_per_run(moe_run, tmp_path, capsys):
    """`expert_report.py runs/demo`: the demo's top folder, whose stage folders are the runs."""
    pytest.importorskip("matplotlib")
    for stage in ("stage1", "stage2"):
        (tmp_path / stage).mkdir()
        for name in ("metrics.jsonl", "model_config.json"):
            shutil.copy(moe_run / name, tmp_path / stage / name)
    (tmp_path / "data").mkdir()  # not a run: skipped
    main = _launcher().main
    assert main([str(tmp_path), "--skip_domains", "--last", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("=== ") == 2 and out.count("1 = even, 4 = collapsed") == 2, out
    assert all((tmp_path / s / "expert_load.png").is_file() for s in ("stage1", "stage2"))
    assert main([str(tmp_path), "--skip_domains", "--out", str(tmp_path / "x.png")]) == 2
    assert "holds 2 runs (stage1, stage2)" in capsys.readouterr().err
    assert main([str(tmp_path / "data")]) == 2
    assert "no run folder inside it has one" in capsys.readouterr().err


def test_report_errors_name_the_value(moe_run, tmp_path, capsys):
    main = _launcher().main
    assert main([str(tmp_path / "missing")]) == 2
    assert "missing does not exist" in capsys.readouterr().err
    assert main([str(moe_run), "--data", f"code={tmp_path}"]) == 2
    assert f"{tmp_path} is not a prepared dataset" in capsys.readouterr().err
    assert main([str(moe_run), "--tokens", "0"]) == 2
    assert "--tokens 0" in capsys.readouterr().err
    assert main([str(moe_run), "--out", str(tmp_path / "no" / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text(json.dumps({"step": 1, "split": "train", "loss": 1.0}) + "\n")
    assert main([str(empty)]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err
