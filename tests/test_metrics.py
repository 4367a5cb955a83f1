"""The model FLOP counter and the failed-save path."""

import errno

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3_jax import create_model, get_config
from qwen3_jax.train.metrics import cpu_stage_note, flops_per_token, matmul_flops_per_s, peak_flops


def independent_count(name: str, T: int) -> float:
    """Training FLOPs per token written out by hand from the architecture table (the presets in qwen3_jax/config.py)."""
    c = get_config(name)
    D, L, N, K, H, V = c.d_model, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size
    attn_proj = D * N * H * 2 + D * K * H * 2  # q, o and k, v
    if c.is_moe:
        ffn = 3 * D * c.moe_ffn_dim * c.num_experts_per_tok + D * c.num_experts  # top-k experts + router
    else:
        ffn = 3 * D * c.ffn_dim
    forward = 2 * (L * (attn_proj + ffn) + D * V) + L * 2 * T * N * H  # causal: half of 4·T·N·H
    return 3 * forward


@pytest.mark.parametrize("name", ["qwen3-8b", "qwen3-0.6b", "qwen3-30b-a3b", "qwen3-235b-a22b"])
def test_flop_counter_matches_independent_count(name):
    assert flops_per_token(get_config(name), 4096) == pytest.approx(independent_count(name, 4096), rel=1e-12)


def test_flop_counter_matches_xla_for_a_dense_forward():
    # scan_layers=False: XLA counts a while-loop body once, not once per layer
    cfg = get_config("tiny-dense", compute_dtype="float32", remat="none", vocab_size=2048, d_model=128, ffn_dim=384,
                     scan_layers=False)
    model = create_model(cfg)
    B, T = 2, 128
    tokens = jnp.zeros((B, T), jnp.int32)
    from flax import nnx

    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    cost = fwd.lower(state, tokens).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    ours = flops_per_token(cfg, T, training=False, causal=False) * B * T  # XLA computes the full score matrix
    assert cost["flops"] == pytest.approx(ours, rel=0.05)


def test_peak_flops_table():
    assert peak_flops("TPU v5p") == 459e12 and peak_flops("TPU v6 lite") == 918e12
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("cpu") is None


def test_failed_save_keeps_previous_checkpoint(tmp_path, capsys):
    from qwen3_jax import checkpoint as ckpt
    from qwen3_jax.train.config import OptimConfig
    from qwen3_jax.train.optim import make_optimizer
    from qwen3_jax.train.run_checkpoints import RunCheckpoints
    from qwen3_jax.train.step import init_state

    cfg = get_config("tiny-dense")
    opt, _ = make_optimizer(OptimConfig(), 10)
    state = init_state(cfg, opt)

    class Data:  # what the data checkpoint handler needs of an iterator
        def get_state(self):
            return {"fingerprint": "x", "data_shards": 1, "shards": {"0": {"pos": 1}}}

    ckpts = RunCheckpoints(tmp_path / "checkpoints", keep_last=3, keep_every=None, enable_async=False)
    ckpts.save(1, state, Data(), cfg, {})
    ckpts.wait()
    assert ckpts.failure_message() is None

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    ckpts.mgr.save = disk_full
    ckpts.save(2, state, Data(), cfg, {})  # reported, training would go on
    err = capsys.readouterr().err
    assert "checkpoint save at step 2 failed" in err and "No space left" in err and "is step 1" in err
    msg = ckpts.failure_message()
    assert "failed at step(s) 2" in msg and "last complete checkpoint is step 1" in msg
    ckpts.close()
    _, flat, step, _ = ckpt.restore_params_numpy(tmp_path)
    assert step == 1 and np.array_equal(flat["final_norm/scale"], np.asarray(state.params["final_norm"]["scale"]))


def test_cpu_stage_note_is_a_floor_from_the_measured_matmul_rate():
    cfg = get_config("small-moe")
    fpt = flops_per_token(cfg, 4096)
    note = cpu_stage_note("runs/stage1", 1000, 16 * 4096, fpt, 50e9)
    hours = 1000 * 16 * 4096 * fpt / 50e9 / 3600
    assert note.startswith("NOTE: runs/stage1 is a TPU job") and f"at least {hours:,.0f} hours" in note
    assert cpu_stage_note("runs/smoke", 20, 512, fpt, 50e9) is None  # minutes: no note
    rate = matmul_flops_per_s(jax.devices("cpu")[0], n=256, reps=2)
    assert 1e8 < rate < 1e14
