"""The step-time estimate's arithmetic on hand examples (qwen3_jax/step_time.py)."""

import pytest

from qwen3_jax import step_time

CHIP = step_time.Chip(peak_flops=100.0, hbm_bytes_per_s=10.0, ici_bidir_bytes_per_s=20.0, dcn_bytes_per_s=1.0,
                      host_bytes_per_s=5.0, host_ram_bytes=None, source="hand")


def test_estimate_hand_example():
    t = step_time.estimate(CHIP, flops=200.0, model_flops=150.0, hbm_bytes=30.0, ici_wire_bytes=25.0,
                           dcn_wire_bytes=0.5, offload_bytes=5.0)
    # compute 200/100 = 2 s, HBM 30/10 = 3 s, ICI 25/(20/2) = 2.5 s, DCN 0.5/1 = 0.5 s, host 2*5/5 = 2 s
    assert (t["compute_s"], t["hbm_s"], t["ici_s"], t["dcn_s"], t["host_offload_s"]) == (2.0, 3.0, 2.5, 0.5, 2.0)
    assert t["lower_bound_s"] == 3.0
    # core = max(2, 3) = 3; transfers 5 s, of which 0.9 * 3 = 2.7 hide behind the core
    assert t["estimate_s"] == pytest.approx(3.0 + 5.0 - 2.7)
    assert t["predicted_mfu"] == pytest.approx(150.0 / (5.3 * 100.0))
    assert t["predicted_mfu_upper"] == pytest.approx(150.0 / (3.0 * 100.0))


def test_transfers_hidden_behind_compute():
    t = step_time.estimate(CHIP, flops=1000.0, model_flops=800.0, hbm_bytes=10.0, ici_wire_bytes=10.0)
    assert t["estimate_s"] == t["lower_bound_s"] == t["compute_s"] == 10.0
    assert t["predicted_mfu"] == pytest.approx(0.8)


def test_wire_bytes():
    coll = {"all-gather": {"count": 2, "bytes": 100.0, "wire_bytes": 90.0},
            "ragged-all-to-all": {"count": 1, "bytes": 800.0, "wire_bytes": 700.0, "bytes_expected": 200.0}}
    assert step_time.ici_wire_bytes(coll) == 90.0 + 700.0 * 200.0 / 800.0
    assert step_time.dcn_wire_bytes(400.0, 4, 2) == 2 * 1 / 2 * 100.0
    assert step_time.dcn_wire_bytes(400.0, 4, 1) == 0.0


def test_chip_figures():
    v5p = step_time.chip_for("v5p:8x8x8")
    assert (v5p.peak_flops, v5p.hbm_bytes_per_s, v5p.ici_bidir_bytes_per_s) == (459e12, 2765e9, 1200e9)
    assert step_time.chip_for("v5e:16x16") is step_time.CHIPS["v5e"]
    assert step_time.chip_for("host (8 cpu devices)") is None
    # device kinds too: the GPU of the measured runs and TPU kinds as jax names them
    h200 = step_time.chip_for("NVIDIA H200")
    assert (h200.peak_flops, h200.hbm_bytes_per_s) == (989e12, 4.8e12)
    assert [step_time.family(k) for k in ("TPU v5", "TPU v5 lite", "TPU v6 lite", "v5litepod:4x4")] == \
        ["v5p", "v5e", "v6e", "v5e"]


# A while loop of 3 trips: a fusion reading one [4,8] f32 slice of a stacked [3,4,8] buffer, a
# fusion writing one [4,8] slice into another in place, and an add; the entry copies x once.
_HLO = """HloModule m, num_partitions=1

%fused_slice (p0: f32[3,4,8], p1: s32[]) -> f32[4,8] {
  %p0 = f32[3,4,8]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %z = s32[] constant(0)
  %ds = f32[1,4,8]{2,1,0} dynamic-slice(%p0, %p1, %z, %z), dynamic_slice_sizes={1,4,8}
  ROOT %b = f32[4,8]{1,0} bitcast(%ds)
}

%fused_update (p0.1: f32[3,4,8], p1.1: f32[4,8], p2.1: s32[]) -> f32[3,4,8] {
  %p0.1 = f32[3,4,8]{2,1,0} parameter(0)
  %p1.1 = f32[4,8]{1,0} parameter(1)
  %p2.1 = s32[] parameter(2)
  %z.1 = s32[] constant(0)
  %r = f32[1,4,8]{2,1,0} bitcast(%p1.1)
  ROOT %dus = f32[3,4,8]{2,1,0} dynamic-update-slice(%p0.1, %r, %p2.1, %z.1, %z.1)
}

%body (t: (s32[], f32[4,8], f32[3,4,8], f32[3,4,8])) -> (s32[], f32[4,8], f32[3,4,8], f32[3,4,8]) {
  %t = (s32[], f32[4,8]{1,0}, f32[3,4,8]{2,1,0}, f32[3,4,8]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = f32[4,8]{1,0} get-tuple-element(%t), index=1
  %w = f32[3,4,8]{2,1,0} get-tuple-element(%t), index=2
  %acc = f32[3,4,8]{2,1,0} get-tuple-element(%t), index=3
  %sl = f32[4,8]{1,0} fusion(%w, %i), kind=kLoop, calls=%fused_slice
  %y = f32[4,8]{1,0} add(%x, %sl)
  %acc2 = f32[3,4,8]{2,1,0} fusion(%acc, %y, %i), kind=kLoop, calls=%fused_update
  %one = s32[] constant(1)
  %i2 = s32[] add(%i, %one)
  ROOT %out = (s32[], f32[4,8]{1,0}, f32[3,4,8]{2,1,0}, f32[3,4,8]{2,1,0}) tuple(%i2, %y, %w, %acc2)
}

%cond (t.1: (s32[], f32[4,8], f32[3,4,8], f32[3,4,8])) -> pred[] {
  %t.1 = (s32[], f32[4,8]{1,0}, f32[3,4,8]{2,1,0}, f32[3,4,8]{2,1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%t.1), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i.1, %n), direction=LT
}

ENTRY %main (x0: f32[4,8], w0: f32[3,4,8], a0: f32[3,4,8]) -> f32[4,8] {
  %x0 = f32[4,8]{1,0} parameter(0)
  %w0 = f32[3,4,8]{2,1,0} parameter(1)
  %a0 = f32[3,4,8]{2,1,0} parameter(2)
  %c = f32[4,8]{1,0} copy(%x0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[4,8]{1,0}, f32[3,4,8]{2,1,0}, f32[3,4,8]{2,1,0}) tuple(%zero, %c, %w0, %a0)
  %loop = (s32[], f32[4,8]{1,0}, f32[3,4,8]{2,1,0}, f32[3,4,8]{2,1,0}) while(%init), condition=%cond, body=%body
  ROOT %res = f32[4,8]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_hbm_bytes_hand_hlo():
    """Per trip: the slice fusion reads 128 B of the stack and writes 128 B (not the 384 B stack),
    the add reads 2 x 128 and writes 128, the update fusion writes one 128 B slice in place and
    reads the 128 B update, the counter add 12 B; the entry copy 256 B. Loops x 3."""
    slice_, add, update, counter = 128 + 4 + 128, 3 * 128, 128 + 128 + 4, 12
    assert step_time.hbm_bytes(_HLO) == 3 * (slice_ + add + update + counter) + 2 * 128


def test_offload_bytes_hand_hlo():
    hlo = _HLO.replace("%c = f32[4,8]{1,0} copy(%x0)", "%c = f32[4,8]{1,0:S(5)} copy(%x0)")
    assert step_time.offload_bytes(hlo) == 128
    assert step_time.offload_bytes(_HLO) == 0


def test_hbm_bytes_slices_read_through_a_nested_fusion():
    """XLA:TPU often slices the scan's stacked buffer inside a nested fusion: still the slice."""
    nested = _HLO.replace("""%fused_slice (p0: f32[3,4,8], p1: s32[]) -> f32[4,8] {
  %p0 = f32[3,4,8]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %z = s32[] constant(0)
  %ds = f32[1,4,8]{2,1,0} dynamic-slice(%p0, %p1, %z, %z), dynamic_slice_sizes={1,4,8}
  ROOT %b = f32[4,8]{1,0} bitcast(%ds)
}""", """%inner (q0: f32[3,4,8], q1: s32[]) -> f32[4,8] {
  %q0 = f32[3,4,8]{2,1,0} parameter(0)
  %q1 = s32[] parameter(1)
  %z = s32[] constant(0)
  %ds = f32[1,4,8]{2,1,0} dynamic-slice(%q0, %q1, %z, %z), dynamic_slice_sizes={1,4,8}
  ROOT %b = f32[4,8]{1,0} bitcast(%ds)
}

%fused_slice (p0: f32[3,4,8], p1: s32[]) -> f32[4,8] {
  %p0 = f32[3,4,8]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  ROOT %f = f32[4,8]{1,0} fusion(%p0, %p1), kind=kLoop, calls=%inner
}""")
    assert "%inner" in nested and step_time.hbm_bytes(nested) == step_time.hbm_bytes(_HLO)


def test_async_offload_slices_count_the_slice_on_each_side():
    """Remat offload in a layer scan: async dynamic-update-slices write each trip's [4,8] slice
    into a stacked host buffer (S(5)) and dynamic-slices read it back. HBM counts the 128 B
    slice once per op (the other side is the host), not the 384 B stack; the host offload counts
    the slices written (the estimate doubles it for the read back)."""
    host = "f32[3,4,8]{2,1,0:S(5)}"
    body_ops = f"""  %st = (({host}, f32[1,4,8]{{2,1,0}}, s32[], s32[], s32[]), {host}, u32[]) dynamic-update-slice-start(%acc, %r, %i, %z, %z)
  %acc2 = {host} dynamic-update-slice-done(%st)
  %rd = (({host}, s32[], s32[], s32[]), f32[1,4,8]{{2,1,0}}, u32[]) dynamic-slice-start(%acc2, %i, %z, %z), dynamic_slice_sizes={{1,4,8}}
  %back = f32[1,4,8]{{2,1,0}} dynamic-slice-done(%rd)
"""
    hlo = _HLO.replace("  %acc2 = f32[3,4,8]{2,1,0} fusion(%acc, %y, %i), kind=kLoop, calls=%fused_update\n",
                       "  %z = s32[] constant(0)\n  %r = f32[1,4,8]{2,1,0} bitcast(%y)\n" + body_ops)
    hlo = hlo.replace("f32[3,4,8]{2,1,0}) tuple(%i2", f"{host}) tuple(%i2")
    assert "dynamic-update-slice-start" in hlo
    base = step_time.hbm_bytes(_HLO) - 3 * (128 + 128 + 4)  # without the in-place update fusion
    assert step_time.hbm_bytes(hlo) == base + 3 * (128 + 128)
    assert step_time.offload_bytes(hlo) == 3 * 128
