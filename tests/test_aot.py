"""AOT compile for TPU topologies on this CPU box (libtpu's topology description)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))
import aot_compile  # noqa: E402

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -e .[test])")


@pytest.mark.parametrize("name,libtpu_name,chips", [
    ("v5p-1024", "v5p:8x8x8", 512), ("v5p-8", "v5p:2x2x1", 4), ("v4-128", "v4:4x4x4", 64),
    ("v5e-256", "v5e:16x16", 256), ("v5litepod-16", "v5e:4x4", 16), ("v6e-256", "v6e:16x16", 256),
    ("v6e-8", "v6e:2x4", 8), ("v5p:4x4x8", "v5p:4x4x8", 128),
])
def test_parse_topology(name, libtpu_name, chips):
    t = aot_compile.parse_topology(name)
    assert (t["libtpu_name"], t["chips"]) == (libtpu_name, chips)


@pytest.mark.parametrize("bad", ["v5p-7", "v7x-64", "tpu", "v5e-3"])
def test_parse_topology_rejects(bad):
    with pytest.raises(ValueError):
        aot_compile.parse_topology(bad)


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, str(ROOT / "launch" / "aot_compile.py"), *args], env=env,
                          capture_output=True, text=True, timeout=600)


@needs_libtpu
def test_aot_tiny_moe_expert_parallel_ragged(tmp_path):
    """Compiles the real train step with the ragged_all_to_all expert exchange (EP=4 x FSDP=2)."""
    report = tmp_path / "r.json"
    r = _run("--preset", "tiny-moe", "--topology", "v5p-16", "--mesh", "fsdp=2,expert=4", "--seq_len", "128",
             "--global_batch", "16", "--micro_batches", "2", "--attention_impl", "reference", "--report", str(report))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads(report.read_text())
    for key in ("chips", "tokens_per_step", "flops_per_chip", "bytes_per_chip_peak", "hbm_bytes_per_chip", "fits"):
        assert key in rep
    assert rep["chips"] == 8 and rep["tokens_per_step"] == 16 * 128 and rep["fits"]
    assert rep["mesh"] == {"data": 1, "fsdp": 2, "expert": 4, "tensor": 1}
    assert "ragged-all-to-all" in rep["collectives"]
    assert 0.5 < rep["flops_ratio_compiled_to_model"] < 3.0
    assert "FITS" in r.stdout


@needs_libtpu
def test_aot_exits_nonzero_when_it_does_not_fit(tmp_path):
    r = _run("--preset", "tiny-dense", "--topology", "v5e-4", "--mesh", "fsdp=4", "--seq_len", "64",
             "--global_batch", "4", "--attention_impl", "reference", "--hbm_gib", "0.000001",
             "--report", str(tmp_path / "r.json"))
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "DOES NOT FIT" in r.stdout
    assert json.loads((tmp_path / "r.json").read_text())["fits"] is False
