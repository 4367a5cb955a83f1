"""Stage handoffs S1 -> S2 -> S3 with the real stage files (scaled down, tiny MoE): each stage
starts from exactly the previous stage's last checkpoint's parameters, with a fresh optimizer,
step counter, learning-rate schedule and data position."""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from qwen3_jax import configurables
from qwen3_jax.params import flatten, nest
from qwen3_jax.train import build as build_lib
from qwen3_jax import checkpoint
from qwen3_jax.train.loop import train
from qwen3_jax.train.optim import make_optimizer
from qwen3_jax.train.config import LossConfig
from qwen3_jax.train.step import init_state, make_loss_fn, make_train_step

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def _config(data_dir, stage, *bindings):
    """The model and run `launch/train.py --gin <stage>.gin --gin model/tiny-moe.gin` would train."""
    configurables.parse_gin([f"{stage}.gin", "model/tiny-moe.gin"], [
        f"stage_mixture.builtin_dir='{data_dir}'", "stage_mixture.spm_vocab_size=512", "train.log_every=1",
        "train.async_checkpoint=False", "train.eval_every=0", *bindings])
    return configurables.run_config()


def _metrics(work):
    return {r["step"]: r for r in map(json.loads, (work / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"}


def _ckpt_params(work, step):
    cfg, flat, got, _ = checkpoint.restore_params_numpy(work / "checkpoints" / str(step))
    assert got == step
    return cfg, flat


def _ckpt_opt_state(work, step, target):
    with checkpoint.manager(work / "checkpoints", create=False) as mgr:
        return mgr.restore(step, args=ocp.args.Composite(opt_state=ocp.args.StandardRestore(target)))["opt_state"]


def _data_position(work, step):
    return json.loads((work / "checkpoints" / str(step) / "data" / "shard_00000-of-00001.json").read_text())["grain"]


def _assert_tree_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) and jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def start_states(monkeypatch):
    """Every train state a run starts from (Program.init_state: a fresh run or a stage handoff)."""
    seen = []
    orig = build_lib.Program.init_state

    def spy(self, params=None):
        state = orig(self, params)
        seen.append(jax.tree.map(np.asarray, state))
        return state

    monkeypatch.setattr(build_lib.Program, "init_state", spy)
    return seen


@pytest.mark.slow
def test_stages_hand_over_exact_parameters_and_start_fresh(data_dir, tmp_path, start_states, capsys):
    """(The same handoffs through launch/train.py's command line, with their printed lines, run in
    tests/test_entry_points.py's `demo --quick`.)"""
    devices = jax.devices()[:1]
    s1, s2, s3 = tmp_path / "s1", tmp_path / "s2", tmp_path / "s3"

    # S1: 4 steps, checkpoints at 2 and 4 (the last one is what S2 starts from).
    model, tc = _config(data_dir, "stage1", "STEPS=4", "SEQ_LEN=64", "BATCH_SIZE=4", "CHECKPOINT_EVERY=2",
                        "lr_schedule.peak_lr=3e-3", "lr_schedule.warmup_steps=2")
    assert model.name == "tiny-moe" and tc.init_from is None
    train(s1, model, tc, devices=devices)
    _, p1 = _ckpt_params(s1, 4)
    assert not all(np.array_equal(p1[k], v) for k, v in _ckpt_params(s1, 2)[1].items())  # S1 trained on

    # S2 from S1. What a fresh start is, computed here independently of the loop: the optimizer
    # initialised on S1's parameters, the schedule at step 0, the first batch of a new iterator.
    model, tc = _config(data_dir, "stage2", "STEPS=2", "SEQ_LEN=64", "BATCH_SIZE=4", "CHECKPOINT_EVERY=1",
                        f"PREVIOUS_STAGE='{s1}'")
    assert tc.init_from == str(s1)
    opt, sched = make_optimizer(tc.optim, tc.steps)
    fresh = init_state(model, opt, tc.seed, params=nest(p1))
    it = tc.make_data(seq_len=tc.seq_len, global_batch_size=tc.batch_size, seed=tc.seed)
    first = {k: v for k, v in next(it).items() if k in BATCH_KEYS}
    position_after_first = json.loads(json.dumps(it.get_state()["shards"]["0"]))
    step = jax.jit(make_train_step(model, opt, tc.loss, schedule=sched))
    want, want_m = step(fresh, first)
    train(s2, model, tc, devices=devices)

    s1_start, s2_start = start_states[0], start_states[1]
    assert int(s1_start.step) == 0 and int(s2_start.step) == 0
    # the parameters S2 started from are S1's last checkpoint's, bit for bit ...
    start = flatten(s2_start.params)
    assert sorted(start) == sorted(p1)
    for k in p1:
        np.testing.assert_array_equal(start[k], p1[k], err_msg=k)
    # ... its optimizer state is a new one (moments zero, count 0), not S1's
    _assert_tree_equal(s2_start.opt_state, fresh.opt_state)
    s1_opt = _ckpt_opt_state(s1, 4, fresh.opt_state)
    counts = [int(x) for x in jax.tree.leaves(s1_opt) if np.ndim(x) == 0]
    assert counts and set(counts) == {4}  # (S1 had an optimizer state to carry over: 4 updates, moments > 0)
    assert all(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(s1_opt) if np.ndim(x) == 2)
    # ... and its first step is the independent one: same batch (a fresh data position), same LR
    # (the schedule restarted: warmup step 0), same loss, same moments and parameters after it.
    m2 = _metrics(s2)
    assert m2[1]["lr"] == pytest.approx(float(sched(0)), rel=1e-6) and float(sched(0)) < tc.optim.schedule.peak_lr
    assert m2[1]["lm_loss"] == pytest.approx(float(want_m["lm_loss"]), rel=1e-5)
    assert m2[1]["aux_loss"] == pytest.approx(float(want_m["aux_loss"]), rel=1e-4)
    assert _data_position(s2, 1) == position_after_first
    got_opt = _ckpt_opt_state(s2, 1, fresh.opt_state)
    for x, y in zip(jax.tree.leaves(got_opt), jax.tree.leaves(want.opt_state)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-9)
    _, p2_1 = _ckpt_params(s2, 1)
    for k, v in flatten(jax.tree.map(np.asarray, want.params)).items():
        np.testing.assert_allclose(p2_1[k], v, rtol=0, atol=1e-7, err_msg=k)
    cfg2, p2 = _ckpt_params(s2, 2)
    assert cfg2.rope_theta == 1e4

    # S3 from S2: 256 tokens, RoPE base 1M, length buckets scaled down.
    model, tc = _config(data_dir, "stage3", "STEPS=1", "SEQ_LEN=256", "BATCH_SIZE=2", "CHECKPOINT_EVERY=1",
                        f"PREVIOUS_STAGE='{s2}'", "LONG_DOCS=(128, 256, 0.75)", "MEDIUM_DOCS=(32, 128, 0.25)")
    assert model.rope_theta == 1e6
    opt, sched = make_optimizer(tc.optim, tc.steps)
    fresh = init_state(model, opt, tc.seed, params=nest(p2))
    it = tc.make_data(seq_len=tc.seq_len, global_batch_size=tc.batch_size, seed=tc.seed)
    first = {k: v for k, v in next(it).items() if k in BATCH_KEYS}
    loss = jax.jit(make_loss_fn(model, LossConfig(loss_chunk=tc.loss_chunk)))
    want_lm = float(loss(fresh.params, first, np.float32(first["loss_mask"].sum()))[1][0])
    train(s3, model, tc, devices=devices)
    s3_start = start_states[2]
    start = flatten(s3_start.params)
    for k in p2:
        np.testing.assert_array_equal(start[k], p2[k], err_msg=k)
    _assert_tree_equal(s3_start.opt_state, fresh.opt_state)
    assert int(s3_start.step) == 0
    out = capsys.readouterr().out
    assert f"initialised parameters from {s2 / 'checkpoints' / '2'}" in out and "rope_theta 10000 -> 1e+06" in out
    assert "attention reference" in out
    m3 = _metrics(s3)
    assert m3[1]["lm_loss"] == pytest.approx(want_lm, rel=1e-5)  # S2's parameters, RoPE 1M, a fresh batch
    cfg3 = json.loads((s3 / "model_config.json").read_text())
    assert cfg3["rope_theta"] == 1e6 and cfg3["attention_impl"] == "auto"  # auto: reference on CPU up to 1K tokens
