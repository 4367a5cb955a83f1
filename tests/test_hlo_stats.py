"""qwen3_jax.hlo_stats on HLO text samples: collectives (async starts, trip counts), conv MACs."""

from qwen3_jax import hlo_stats


def test_conv_macs_counts_only_real_window_taps():
    # XLA:TPU's form of btd,dnh->btnh: heads as a window over a padded size-1 dim, one real tap each
    line = "window={size=1x32 pad=0_0x31_31 rhs_reversal=0x1}, dim_labels=0bf1_i1o0->0b1f"
    macs = hlo_stats._conv_macs(line, [4, 4096, 32, 128], [4, 4096, 2048, 1], [2048, 32, 128, 1])
    assert macs == 4 * 4096 * 32 * 128 * 2048
    # a batched matmul over 16 experts written with lhs dilation: again one tap per output
    line = "window={size=16 stride=15 lhs_dilate=16}, dim_labels=0fb_0io->0bf"
    macs = hlo_stats._conv_macs(line, [16, 768, 2048], [16, 4096, 768], [16, 4096, 2048])
    assert macs == 16 * 768 * 2048 * 4096


# Async collectives as newer libtpu writes them (the ragged line is shaped as in MaxText's 30b HLO
# under jax 0.12 / libtpu 0.0.50): the -start result is a tuple (operands, output(s), context).
_ASYNC_HLO = """HloModule jit_step, num_partitions=8

%body (p: (s32[], bf16[64,4,128])) -> (s32[], bf16[64,4,128]) {
  %ragged-all-to-all-start = ((bf16[16,4,128]{2,1,0:T(2,128)(2,1)}, bf16[64,4,128]{2,1,0}, s32[8]{0}, s32[8]{0}, s32[8]{0}, /*index=5*/s32[8]{0}), bf16[64,4,128]{2,1,0:T(2,128)(2,1)}, u32[]{:S(2)}, u32[]{:S(2)}) ragged-all-to-all-start(%a, %b, %c, %d, %e, /*index=5*/%f), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}
  %ragged-all-to-all-done = bf16[64,4,128]{2,1,0} ragged-all-to-all-done(%ragged-all-to-all-start)
}

%cond (p: (s32[], bf16[64,4,128])) -> pred[] {
  %c = s32[] constant(3)
}

ENTRY %main (x: bf16[64,4,128]) -> bf16[64,4,128] {
  %all-gather-start = ((f32[32,16]{1,0}, bf16[8]{0}), (f32[256,16]{1,0}, bf16[64]{0})) all-gather-start(%w, %v), replica_groups={}, dimensions={0}
  %all-gather-done = (f32[256,16]{1,0}, bf16[64]{0}) all-gather-done(%all-gather-start)
  %collective-permute-start = (bf16[1024]{0}, bf16[1024]{0}, u32[], u32[]) collective-permute-start(%x), source_target_pairs={{0,1}}
  %collective-permute-done = bf16[1024]{0} collective-permute-done(%collective-permute-start)
  %all-reduce-start = f32[100]{0} all-reduce-start(%g), replica_groups={}, to_apply=%add
  %all-reduce-done = f32[100]{0} all-reduce-done(%all-reduce-start)
  %w = (s32[], bf16[64,4,128]) while(%t), condition=%cond, body=%body
}
"""


def test_collective_summary_reads_async_starts_by_their_output():
    """An async collective counts once (its -start, not its -done), at its output's bytes: a
    ragged all-to-all not at its whole (operands, output, context) tuple (that over-counted ~9x),
    a two-operand all-gather at both outputs; inside the 3-trip while body 3 times."""
    s = hlo_stats.collective_summary(_ASYNC_HLO, ragged_rows=16)
    ragged = 64 * 4 * 128 * 2
    assert s["ragged-all-to-all"]["count"] == 3
    assert s["ragged-all-to-all"]["bytes"] == 3 * ragged
    assert s["ragged-all-to-all"]["wire_bytes"] == 3 * ragged * 3 / 4  # groups of 4
    assert s["ragged-all-to-all"]["bytes_expected"] == 3 * ragged * 16 / 64
    assert s["all-gather"] == {"count": 1, "bytes": 256 * 16 * 4 + 64 * 2,
                               "wire_bytes": (256 * 16 * 4 + 64 * 2) * 7 / 8}
    assert s["collective-permute"]["bytes"] == 1024 * 2
    assert s["all-reduce"]["bytes"] == 100 * 4
    assert hlo_stats._tuple_elements("(f32[2]{0}, (s32[1], u8[3]{0:T(128)}), /*index=2*/u32[])") == [
        "f32[2]{0}", "(s32[1], u8[3]{0:T(128)})", "u32[]"]
