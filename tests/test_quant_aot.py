"""8-bit training in the AOT report for TPU slices (libtpu's topology description on this box):
8-bit dots for the experts and the dense layers in the compiled v5p program, their share of the
matmul FLOPs, the step time at v5p's int8 rate, and a NOTE where the chip has no unit (fp8 on v5p)."""

import json
import re

import pytest

from qwen3_jax import aot, step_time
from qwen3_jax.config import get_config
from qwen3_jax.hlo_stats import hlo_flops
from qwen3_jax.sharding import MeshConfig
from qwen3_jax.train.build import build
from qwen3_jax.train.config import TrainConfig
from test_aot import _run, needs_libtpu


def _program(quantization, topology="v5p-16"):
    cfg = get_config("small-moe", quantization=quantization, remat="full")
    tc = TrainConfig(steps=1, seq_len=256, batch_size=16, checkpoint_every=1, mesh=MeshConfig(ici_expert=4))
    return build(cfg, tc, aot.topology_devices(aot.parse_topology(topology)))


@needs_libtpu
def test_fp8_on_v5p_is_noted_int8_is_not_and_experts_leave_megablox():
    fp8, int8 = _program("fp8"), _program("int8")
    assert any("has no fast 'fp8'" in n or "has no fast fp8" in n for n in aot.notes(fp8)), aot.notes(fp8)
    assert not any("fast" in n for n in aot.notes(int8))
    assert int8.model.moe_impl == "ragged_dot"  # qwix quantizes lax.ragged_dot, not the megablox kernel
    assert step_time.eight_bit_rate("v5p", "int8") == 2 * step_time.CHIPS["v5p"].peak_flops


@needs_libtpu
@pytest.mark.slow
def test_aot_v5p_int8_has_8bit_dots_for_experts_and_dense_layers(tmp_path):
    report, hlo = tmp_path / "r.json", tmp_path / "step.hlo"
    r = _run("--gin", "stage1.gin", "--gin_param", "MeshConfig.ici_expert=4", "--gin_param", "BATCH_SIZE=16",
             "--gin_param", "SEQ_LEN=256", "--remat", "full", "--topology", "v5p-16",
             "--gin_param", "model_config.quantization='int8'", "--report", str(report), "--hlo_dump", str(hlo))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep, text = json.loads(report.read_text()), hlo.read_text()
    # 8-bit operands: the experts' grouped matmuls (ragged dot kernels) and the attention projections
    experts = [l for l in text.splitlines() if re.search(r"%ragged-dot\S* = s32\[", l)]
    assert experts and all("s8[" in l for l in experts)
    # the experts' weight gradient: megablox's tgmm (the groups' rows only), not the masked dense
    # matmul over every local expert x buffer row XLA:TPU makes of ragged_dot's (it was 2.07x the
    # model's FLOPs here, with windowed-einsum loops counted twice; bf16 with megablox: 1.21x)
    assert re.search(r"%tgmm\S* = f32\[", text) and "ragged_dot_general" not in "".join(
        l for l in text.splitlines() if " convolution(" in l)
    assert rep["flops_ratio_compiled_to_model"] < 1.3, rep["flops_ratio_compiled_to_model"]
    q_proj = [l for l in text.splitlines() if "btd,dnh->btnh" in l and re.search(r"= s32\[\S+ (convolution|dot)\(", l)]
    assert q_proj, "no int8 q projection"
    # 8-bit: the dense layers and the experts' forward and input gradient; the experts' weight
    # gradient (tgmm) and the lm_head run in bf16 (measured 43%)
    assert rep["quantization"] == "int8" and 0.35 < rep["eight_bit_flops_share"] <= 1.0
    assert "8-bit (int8) matmuls:" in r.stdout
    counted = hlo_flops(text, ragged_rows=rep["expected_expert_rows_per_device"])
    assert counted["eight_bit"] / counted["total"] == pytest.approx(rep["eight_bit_flops_share"])
    # the compute term at v5p's int8 rate: shorter than the same FLOPs at the bf16 rate
    st = rep["step_time"]
    assert st["compute_s"] < rep["flops_per_chip"] / step_time.CHIPS["v5p"].peak_flops


# XLA:TPU's bidirectional windowed einsum (an all-gather overlapped with the matmul), as in the
# int8 v5p-16 program: the loop's counter goes 0, 2 (< 4) and each trip does two chunks' dots.
_WINDOWED_HLO = """HloModule jit_step, num_partitions=8

%windowed_dot_general_body_ag (p: (f32[8,16], f32[16,32], f32[8,32], u32[])) -> (f32[8,16], f32[16,32], f32[8,32], u32[]) {
  %p = (f32[8,16], f32[16,32], f32[8,32], u32[]) parameter(0)
  %x = f32[8,16]{1,0} get-tuple-element(%p), index=0
  %w = f32[16,32]{1,0} get-tuple-element(%p), index=1
  %i = u32[] get-tuple-element(%p), index=3
  %d0 = f32[8,32]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %d1 = f32[8,32]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %s = f32[8,32]{1,0} add(%d0, %d1)
  %two = u32[] constant(2)
  %n = u32[] add(%i, %two)
  ROOT %t = (f32[8,16], f32[16,32], f32[8,32], u32[]) tuple(%x, %w, %s, %n)
}

%windowed_dot_general_cond_ag (p: (f32[8,16], f32[16,32], f32[8,32], u32[])) -> pred[] {
  %p = (f32[8,16], f32[16,32], f32[8,32], u32[]) parameter(0)
  %four = u32[] constant(4)
  %i = u32[] get-tuple-element(%p), index=3
  ROOT %lt = pred[] compare(%i, %four), direction=LT
}

ENTRY %main (x: f32[8,16], w: f32[16,32]) -> f32[8,32] {
  %x = f32[8,16]{1,0} parameter(0)
  %w = f32[16,32]{1,0} parameter(1)
  %z = f32[8,32]{1,0} constant(0)
  %zero = u32[] constant(0)
  %init = (f32[8,16], f32[16,32], f32[8,32], u32[]) tuple(%x, %w, %z, %zero)
  %loop = (f32[8,16], f32[16,32], f32[8,32], u32[]) while(%init), condition=%windowed_dot_general_cond_ag, body=%windowed_dot_general_body_ag
  ROOT %out = f32[8,32]{1,0} get-tuple-element(%loop), index=2
}
"""


def test_windowed_einsum_loop_counts_its_trips_not_its_counter_bound():
    """The counter adds 2 per trip: 2 trips x 2 dots, not 4 x 2 (what the int8 programs' dense
    layers were counted at before: 2.07x the model's FLOPs on v5p-16, 1.21x now, as bf16)."""
    flops = hlo_flops(_WINDOWED_HLO)
    assert flops["dot"] == 2 * 2 * (2 * 8 * 32 * 16)
