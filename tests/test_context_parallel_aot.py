"""Context parallelism compiled ahead of time for a TPU slice (launch/aot_compile.py, libtpu's
topology description): the stage-4 gin files at a small size, splash under the zig-zag layout."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -e .[test])")


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, str(ROOT / "launch" / "aot_compile.py"), "--gin", "stage4.gin", *args],
                          env=env, capture_output=True, text=True, timeout=600)


@needs_libtpu
@pytest.mark.slow
def test_aot_stage4_small_moe_context_parallel(tmp_path):
    """CP=2 x FSDP=2 x EP=2 on v5p-16 at 512 tokens (YaRN from stage4.gin): it compiles with splash,
    the K/V all-gathers over `context` in the program."""
    report = tmp_path / "r.json"
    r = _run("--mesh", "fsdp=2,context=2,expert=2", "--gin_param", "BATCH_SIZE=4", "--gin_param", "SEQ_LEN=512",
             "--remat", "full", "--topology", "v5p-16", "--report", str(report))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads(report.read_text())
    assert rep["mesh"] == {"data": 1, "fsdp": 2, "context": 2, "expert": 2, "tensor": 1}
    assert rep["seq_len"] == 512 and rep["attention_impl"] == "splash" and rep["fits"]
    assert rep["collectives"]["all-gather"]["count"] > 0 and "ragged-all-to-all" in rep["collectives"]
    assert rep["flops_breakdown_per_chip"]["attention_kernel"] > 0


@needs_libtpu
def test_aot_sequence_not_divisible_into_zigzag_chunks_is_one_line(tmp_path):
    r = _run("--mesh", "fsdp=2,context=2,expert=2", "--gin_param", "BATCH_SIZE=4", "--gin_param", "SEQ_LEN=258",
             "--remat", "full", "--topology", "v5p-16")
    assert r.returncode != 0
    assert "SEQ_LEN=258 is not divisible by 2 x MeshConfig context=2" in r.stdout + r.stderr
