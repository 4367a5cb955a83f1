"""Stage 3 -> stage 4 handoff with the real stage files (scaled down, tiny MoE): stage 4 runs under
context parallelism (CP=2 x FSDP=2 on 4 fake CPU devices) with YaRN, starts from stage 3's last
checkpoint's parameters, and its first step's loss is the one-device loss of the same batch."""

import json

import jax
import numpy as np
import pytest

from qwen3_jax import checkpoint, configurables
from qwen3_jax.params import flatten, nest
from qwen3_jax.train.config import LossConfig
from qwen3_jax.train.loop import train
from qwen3_jax.train.optim import make_optimizer
from qwen3_jax.train.step import init_state, make_loss_fn

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def _config(data_dir, stage, *bindings):
    configurables.parse_gin([f"{stage}.gin", "model/tiny-moe.gin"], [
        f"stage_mixture.builtin_dir='{data_dir}'", "stage_mixture.spm_vocab_size=512", "train.log_every=1",
        "train.async_checkpoint=False", "train.eval_every=0", *bindings])
    return configurables.run_config()


def _metrics(work):
    return {r["step"]: r for r in map(json.loads, (work / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"}


@pytest.mark.slow
def test_stage3_to_stage4_under_context_parallelism(data_dir, tmp_path):
    s3, s4 = tmp_path / "s3", tmp_path / "s4"
    model, tc = _config(data_dir, "stage3", "STEPS=1", "SEQ_LEN=128", "BATCH_SIZE=2", "CHECKPOINT_EVERY=1",
                        "LONG_DOCS=(64, 128, 0.75)", "MEDIUM_DOCS=(16, 64, 0.25)", "train.init_from=None")
    train(s3, model, tc, devices=jax.devices()[:1])
    _, p3, step, _ = checkpoint.restore_params_numpy(s3 / "checkpoints" / "1")
    assert step == 1

    # stage 4: 4x the length with YaRN x4 over stage 3's window, the sequence split over 2 devices
    model, tc = _config(data_dir, "stage4", "STEPS=1", "SEQ_LEN=512", "BATCH_SIZE=2", "CHECKPOINT_EVERY=1",
                        f"PREVIOUS_STAGE='{s3}'", "LONG_DOCS=(128, 512, 0.75)", "MEDIUM_DOCS=(16, 128, 0.25)",
                        "RopeScaling.original_max_position_embeddings=128", "MeshConfig.ici_context=2")
    assert model.rope_theta == 1e6 and model.rope_scaling.factor == 4.0 and tc.seq_len == 512
    assert tc.init_from == str(s3) and tc.mesh.ici_context == 2
    opt, _ = make_optimizer(tc.optim, tc.steps)
    fresh = init_state(model, opt, tc.seed, params=nest(p3))
    it = tc.make_data(seq_len=tc.seq_len, global_batch_size=tc.batch_size, seed=tc.seed)
    first = {k: v for k, v in next(it).items() if k in BATCH_KEYS}
    assert (first["segment_ids"].max(-1) > 1).any()  # packed: rows of several documents
    loss = jax.jit(make_loss_fn(model, LossConfig(loss_chunk=tc.loss_chunk)))  # one device, no CP
    want_lm = float(loss(fresh.params, first, np.float32(first["loss_mask"].sum()))[1][0])
    train(s4, model, tc, devices=jax.devices()[:4])

    assert _metrics(s4)[1]["lm_loss"] == pytest.approx(want_lm, rel=1e-5)
    cfg4 = json.loads((s4 / "model_config.json").read_text())
    assert cfg4["rope_scaling"]["factor"] == 4.0 and cfg4["rope_theta"] == 1e6
    _, p4, _, _ = checkpoint.restore_params_numpy(s4 / "checkpoints" / "1")
    assert sorted(p4) == sorted(flatten(fresh.params))
