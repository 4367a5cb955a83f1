"""AOT compile for TPU topologies on this CPU box (libtpu's topology description)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwen3_jax import aot, hlo_stats, memory
from qwen3_jax.config import get_config

ROOT = Path(__file__).resolve().parents[1]

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -e .[test])")


@pytest.mark.parametrize("name,libtpu_name,chips", [
    ("v5p-1024", "v5p:8x8x8", 512), ("v5p-8", "v5p:2x2x1", 4), ("v4-128", "v4:4x4x4", 64),
    ("v5e-256", "v5e:16x16", 256), ("v5litepod-16", "v5e:4x4", 16), ("v6e-256", "v6e:16x16", 256),
    ("v6e-8", "v6e:2x4", 8), ("v5p:4x4x8", "v5p:4x4x8", 128),
])
def test_parse_topology(name, libtpu_name, chips):
    t = aot.parse_topology(name)
    assert (t["libtpu_name"], t["chips"]) == (libtpu_name, chips)


@pytest.mark.parametrize("name,wrap", [
    ("v5p-8", (False,) * 3), ("v5p-64", (False,) * 3), ("v5p-128", (True,) * 3), ("v5p-1024", (True,) * 3),
    ("v4-128", (True,) * 3), ("v5p:4x4x8", (True,) * 3), ("v5e-128", (False, True, False)),
    ("v6e-256", (True, True, False)), ("v6e-8", (False,) * 3),
])
def test_parse_topology_wraparound(name, wrap):
    """Wraparound links as the slices have them (whole 4x4x4 cubes; 2D: the 16-chip pod edge)."""
    assert aot.parse_topology(name)["wrap"] == wrap


@pytest.mark.parametrize("bad", ["v5p-7", "v9z-64", "tpu", "v5e-3"])
def test_parse_topology_rejects(bad):
    with pytest.raises(ValueError):
        aot.parse_topology(bad)


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, str(ROOT / "launch" / "aot_compile.py"), *args], env=env,
                          capture_output=True, text=True, timeout=600)


def test_hlo_flops_counts_scanned_matmuls_per_trip():
    """XLA's cost_analysis counts a while body once; the HLO count multiplies by the trip count."""
    import jax
    import jax.numpy as jnp

    def f(x_MK, w_LKK):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x_MK, w_LKK)[0]

    x = jax.ShapeDtypeStruct((64, 128), jnp.float32)
    w = jax.ShapeDtypeStruct((5, 128, 128), jnp.float32)
    text = jax.jit(f).lower(x, w).compile().as_text()
    assert hlo_stats.hlo_flops(text)["total"] == 5 * 2 * 64 * 128 * 128


def _fsdp_grad_collectives(devices) -> dict:
    """collective_summary of one FSDP weight's gradient (fp32 master, bf16 matmul) over all devices."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from qwen3_jax import sharding

    mesh = sharding.make_mesh(sharding.MeshConfig(), devices)
    w = jax.ShapeDtypeStruct((1024, 512), jnp.float32, sharding=NamedSharding(mesh, P("fsdp", None)))
    x = jax.ShapeDtypeStruct((64, 128, 1024), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp", None, None)))

    def loss(w, x):
        return jnp.mean(jnp.einsum("btd,df->btf", x, w.astype(x.dtype)).astype(jnp.float32) ** 2)

    text = jax.jit(jax.grad(loss), out_shardings=w.sharding).lower(w, x).compile().as_text()
    return hlo_stats.collective_summary(text)


@needs_libtpu
def test_collective_summary_names_libtpu_all_reduces_by_role():
    """FSDP over a v5p 4x4x4 described without wraparound links (libtpu's default description, an
    open mesh): libtpu writes the weight's all-gather as an all-reduce of a shard-padded buffer and
    the weight gradient's reduce-scatter as an all-reduce + dynamic-slice; the summary names both,
    at the full tensor's bytes."""
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(topology_name="v5p:4x4x4", platform="tpu").devices
    s = _fsdp_grad_collectives(devices)
    ar = s["all-reduce"]
    full = 1024 * 512 * 2  # the bf16 weight
    assert "all-gather" not in s
    assert ar["as_all_gather"] == {"count": 1, "bytes": full}
    assert ar["as_reduce_scatter"] == {"count": 1, "bytes": full}
    assert ar["wire_bytes"] == 2 * full * 2 * 63 / 64


@needs_libtpu
def test_topology_devices_are_a_torus_so_fsdp_all_gathers_stay_all_gathers():
    """v5p-128 is a 4x4x4 torus: topology_devices describes its wraparound links, and the FSDP
    weight's all-gather compiles to a real all-gather ((n-1)/n of the tensor on the wire, half of
    the all-reduce libtpu writes for an open mesh). The gradient stays an all-reduce + slice, as it
    does for MaxText's step."""
    devices = aot.topology_devices(aot.parse_topology("v5p-128"))
    s = _fsdp_grad_collectives(devices)
    full = 1024 * 512 * 2
    assert s["all-gather"] == {"count": 1, "bytes": full, "wire_bytes": full * 63 / 64}
    assert "as_all_gather" not in s["all-reduce"]
    assert s["all-reduce"]["as_reduce_scatter"] == {"count": 1, "bytes": full}


@needs_libtpu
def test_aot_small_moe_from_gin_expert_parallel(tmp_path):
    """The stage-1 gin files + bindings compile the real step with the ragged_all_to_all exchange and
    megablox grouped matmuls (EP=4 x FSDP=2). Compiled FLOPs counted from the HLO stay near the
    model's own count: full remat adds one forward (8/6 = 1.33) and the global-batch aux loss's
    routing pass over 2 micro-batches one more forward without the head (≈ +0.25); splash recomputes
    scores in its backward. Band: 1.3-1.8. All-experts compute (the weight gradient of lax.ragged_dot
    on XLA:TPU is a masked dense matmul over every local expert) would be ≥ 4x."""
    report = tmp_path / "r.json"
    r = _run("--gin", "stage1.gin", "--gin_param", "MeshConfig.ici_expert=4", "--gin_param", "BATCH_SIZE=16",
             "--gin_param", "SEQ_LEN=256", "--gin_param", "train.micro_batches=2", "--remat", "full",
             "--topology", "v5p-16", "--report", str(report))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads(report.read_text())
    assert rep["model"] == "small-moe" and rep["chips"] == 8 and rep["tokens_per_step"] == 16 * 256 and rep["fits"]
    assert rep["mesh"] == {"data": 1, "fsdp": 2, "context": 1, "expert": 4, "tensor": 1} and rep["micro_batches"] == 2
    assert rep["attention_impl"] == "splash" and "ragged-all-to-all" in rep["collectives"]
    assert 1.3 < rep["flops_ratio_compiled_to_model"] < 1.8, rep["flops_breakdown_per_chip"]
    fl = rep["flops_breakdown_per_chip"]
    assert fl["grouped_matmul"] > 0 and fl["attention_kernel"] > 0
    assert fl["grouped_matmul"] < fl["grouped_matmul_buffer"]  # real rows, not the dropless buffer
    assert "FITS" in r.stdout
    # step time: measured counts and modelled time labelled apart; the calibrated MFU under v5p's cap
    assert "MEASURED (read from the compiled program" in r.stdout and "MODELLED step time (calibrated)" in r.stdout
    cal = rep["step_time"]["calibrated"]
    assert cal["family"] == "v5p" and cal["low_s"] <= cal["estimate_s"] <= cal["high_s"]
    assert cal["predicted_mfu"] <= cal["cap_mfu"] and rep["step_time"]["estimate_s"] < cal["estimate_s"]
    # memory: the fits number is XLA's heap-simulated peak, arguments included
    assert rep["peak_source"] == "xla peak_memory_in_bytes" and set(memory.MEMORY_FIELDS) <= set(rep)
    live_io = rep["bytes_per_chip_arguments"] + rep["bytes_per_chip_output"] - rep["bytes_per_chip_alias"]
    assert rep["bytes_per_chip_peak"] == live_io + rep["bytes_per_chip_temp_at_peak"]


@needs_libtpu
def test_aot_keeping_the_experts_gate_up_saves_their_recompute(tmp_path):
    """Expert parallelism (EP=4 x FSDP=2, megablox): save_attn_moe keeps the experts' gate/up
    outputs of the first 1.25 x N·k rows of the dropless buffer, so the backward pass recomputes
    only their down projection: the grouped matmuls, counted at the N·k rows a device receives,
    come to 3 + 1/3 forward passes of the experts (forward 1, recompute 1/3, backward 2; full
    remat and save_attn_out: 4), and those over the rows past the saved part count none."""
    report = tmp_path / "r.json"
    r = _run("--gin", "stage1.gin", "--gin_param", "MeshConfig.ici_expert=4", "--gin_param", "BATCH_SIZE=16",
             "--gin_param", "SEQ_LEN=256", "--remat", "save_attn_moe", "--topology", "v5p-16", "--report", str(report))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads(report.read_text())
    cfg = get_config(rep["model"])
    rows = rep["expected_expert_rows_per_device"]
    assert rows == 16 * 256 * cfg.num_experts_per_tok / 8
    forward = 3 * 2 * rows * cfg.d_model * cfg.moe_ffn_dim * cfg.num_moe_layers
    assert rep["flops_breakdown_per_chip"]["grouped_matmul"] == pytest.approx((3 + 1 / 3) * forward, rel=1e-6)


@needs_libtpu
def test_aot_two_slices_data_parallel_over_dcn(tmp_path):
    """Multi-slice: two v5p-16 slices, the `data` axis across them (DCN), FSDP x EP inside each.
    The attention kernels count exactly forward + remat forward + fused backward (4 + 4 + 10 vs
    the model's 12 per causal T·S·H): the layer loops' trip counts are right although XLA peels
    the first iteration of the backward scan out of its loop (counter from 1 to 4)."""
    report = tmp_path / "r.json"
    r = _run("--gin", "stage1.gin", "--gin_param", "MeshConfig.ici_expert=4", "--gin_param", "MeshConfig.dcn_data=2",
             "--gin_param", "BATCH_SIZE=16", "--gin_param", "SEQ_LEN=256", "--remat", "full",
             "--topology", "v5p-16", "--num_slices", "2", "--report", str(report))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads(report.read_text())
    assert (rep["num_slices"], rep["chips"], rep["devices"], rep["fits"]) == (2, 16, 16, True)
    assert rep["mesh"] == {"data": 2, "fsdp": 2, "context": 1, "expert": 4, "tensor": 1}
    assert rep["splash_fused_bwd"] and rep["flops_ratio_attention"] == pytest.approx(18 / 12, rel=1e-3)


@needs_libtpu
def test_aot_exits_nonzero_when_it_does_not_fit(tmp_path):
    r = _run("--gin", "stage1.gin", "--gin_param", "model_config.preset='tiny-dense'", "--topology", "v5e-4",
             "--mesh", "fsdp=4", "--seq_len", "64",
             "--global_batch", "4", "--attention_impl", "reference", "--hbm_gib", "0.000001",
             "--report", str(tmp_path / "r.json"))
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "DOES NOT FIT" in r.stdout
    assert json.loads((tmp_path / "r.json").read_text())["fits"] is False
