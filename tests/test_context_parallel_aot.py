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


@needs_libtpu
def test_slice_mesh_keeps_each_sequence_on_one_host():
    """On v5p-1024 (128 hosts x 4 chips) the topology-aware layout would put the 4 context shards of
    a sequence on 4 hosts; the mesh train.py and the AOT tool build keeps each on one host (a host's
    pipeline feeds whole rows), and a context wider than a host is refused naming the sizes."""
    code = ("from jax.experimental import topologies\n"
            "from qwen3_jax import sharding\n"
            "devs = topologies.get_topology_desc(topology_name='v5p:8x8x8', platform='tpu').devices\n"
            "mesh = sharding.make_mesh(sharding.MeshConfig(ici_fsdp=32, ici_context=4, ici_expert=4), devs)\n"
            "print('spans', sharding._context_spans_processes(mesh.devices), dict(mesh.shape)['context'])\n"
            "print('ids', len({d.id for d in mesh.devices.flat}))\n"
            "try:\n"
            "    sharding.make_mesh(sharding.MeshConfig(ici_fsdp=16, ici_context=8, ici_expert=4), devs)\n"
            "except ValueError as e:\n"
            "    print('refused', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "spans False 4" in r.stdout and "ids 512" in r.stdout
    assert "refused MeshConfig context=8: a sequence's devices must share a host" in r.stdout
