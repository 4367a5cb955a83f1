"""Training: learning, exact resume after SIGKILL/SIGTERM, stage handoff, config errors.
(Faults — corrupt checkpoints, full disk, spikes, SIGINT, async commits — are in test_faults_train.py.)"""

import json
import os
import random
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3_jax import get_config
from qwen3_jax import checkpoint
from qwen3_jax.train.config import LossConfig, OptimConfig, ScheduleConfig
from qwen3_jax.train.optim import make_optimizer
from qwen3_jax.train.step import init_state, make_train_step
from train_utils import popen, run, signal_at_step, tiny_args


def _batch(B=4, T=32, V=512, seed=0):
    rng = np.random.RandomState(seed)
    tok = rng.randint(0, V, (B, T)).astype(np.int32)
    seg = np.ones((B, T), np.int32)
    seg[:, T // 2:] = 2  # two documents per row
    pos = np.concatenate([np.arange(T // 2), np.arange(T - T // 2)])[None].repeat(B, 0).astype(np.int32)
    tgt = np.roll(tok, -1, 1)
    mask = np.ones((B, T), np.float32)
    mask[:, T // 2 - 1] = 0  # no target across the document boundary
    mask[:, -1] = 0
    return dict(tokens=tok, targets=tgt, loss_mask=mask, segment_ids=seg, positions=pos)


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_overfits_one_batch(preset):
    cfg = get_config(preset, compute_dtype="float32", moe_impl="dense", remat="none")
    opt, sched = make_optimizer(OptimConfig(schedule=ScheduleConfig(peak_lr=1e-2, warmup_steps=5)), 80)
    step = jax.jit(make_train_step(cfg, opt, schedule=sched))
    state = init_state(cfg, opt)
    batch = _batch()
    first = None
    for _ in range(80):
        state, m = step(state, batch)
        first = float(m["lm_loss"]) if first is None else first
    assert first > 5.0 and float(m["lm_loss"]) < 0.3, (first, float(m["lm_loss"]))


def test_micro_batches_give_the_full_batch_gradient():
    cfg = get_config("tiny-dense", compute_dtype="float32", remat="none")
    opt, _ = make_optimizer(OptimConfig(), 10)
    state = init_state(cfg, opt)
    batch = _batch(B=8)
    a, ma = jax.jit(make_train_step(cfg, opt))(state, batch)
    b, mb = jax.jit(make_train_step(cfg, opt, micro_batches=4))(state, batch)
    np.testing.assert_allclose(float(ma["lm_loss"]), float(mb["lm_loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(ma["grad_norm"]), float(mb["grad_norm"]), rtol=1e-5)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)


def test_nonfinite_step_is_skipped_and_counted():
    cfg = get_config("tiny-dense", compute_dtype="float32", remat="none")
    opt, _ = make_optimizer(OptimConfig(), 10)
    state = init_state(cfg, opt)
    bad = state.replace(params=jax.tree.map(lambda p: p, state.params))
    bad.params["final_norm"]["scale"] = bad.params["final_norm"]["scale"].at[0].set(jnp.nan)
    new, m = jax.jit(make_train_step(cfg, opt))(bad, _batch())
    assert not bool(m["finite"]) and int(new.guard["bad_in_a_row"]) == 1 and int(new.nonfinite_total) == 1
    for x, y in zip(jax.tree.leaves(new.params), jax.tree.leaves(bad.params)):
        assert np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
    ok, m = jax.jit(make_train_step(cfg, opt))(state, _batch())
    assert bool(m["finite"]) and int(ok.guard["bad_in_a_row"]) == 0


def _final_params(workdir):
    _, flat, step, _ = checkpoint.restore_params_numpy(workdir)
    return step, flat


def test_loss_falls_on_builtin_corpus(data_dir, tmp_path):
    r = run(tiny_args(data_dir, tmp_path / "run", "train.sample_every=30", steps=30, seq_len=128, batch=8, every=30))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[sample] step 30: 'import os" in r.stdout  # samples from the decoder during training
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [l["lm_loss"] for l in lines if l["split"] == "train"]
    assert len(losses) == 30
    assert losses[0] > 6.0 and np.mean(losses[-5:]) < 5.2, losses  # ln(512) = 6.24 at the start
    assert "tok/s" in r.stdout and "ETA" in r.stdout
    assert (tmp_path / "run" / "operative_config.gin").exists()
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """The uninterrupted 12-step one-device run the resume tests compare to: its final params."""
    work = tmp_path_factory.mktemp("train") / "ref"
    ref = run(tiny_args(data_dir, work))
    assert ref.returncode == 0, ref.stdout + ref.stderr
    ref_step, ref_params = _final_params(work)
    assert ref_step == 12
    return ref_params


def test_sigkill_and_sigterm_resume_bit_identical(data_dir, tmp_path, reference):
    ref_params = reference

    # SIGKILL at a seeded random step after the first checkpoint (FAULT_SEED=<n> reproduces), then
    # the same command again.
    work = tmp_path / "killed"
    seed = int(os.environ.get("FAULT_SEED", random.randrange(1 << 30)))
    kill_at = random.Random(seed).randint(5, 10)
    p = signal_at_step(tiny_args(data_dir, work), kill_at, signal.SIGKILL)
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, f"FAULT_SEED={seed}"
    r = run(tiny_args(data_dir, work))
    assert r.returncode == 0 and "resumed from" in r.stdout, (f"FAULT_SEED={seed}", r.stdout + r.stderr)
    step, params = _final_params(work)
    assert step == 12 and all(np.array_equal(params[k], ref_params[k]) for k in ref_params), \
        f"kill at {kill_at} (FAULT_SEED={seed})"

    # A rerun after completion changes nothing.
    r = run(tiny_args(data_dir, work))
    assert r.returncode == 0 and "nothing to do" in r.stdout
    assert all(np.array_equal(_final_params(work)[1][k], ref_params[k]) for k in ref_params)

    # SIGTERM: save, exit 0; the rerun finishes bit-identically.
    work = tmp_path / "terminated"
    p = popen(tiny_args(data_dir, work))
    for line in p.stdout:
        if line.startswith("step 6/"):
            p.send_signal(signal.SIGTERM)
            break
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 0 and "SIGTERM: saved step" in out, out
    saved = checkpoint.latest_step(work / "checkpoints")
    assert 6 <= saved < 12
    r = run(tiny_args(data_dir, work))
    assert r.returncode == 0, r.stdout + r.stderr
    step, params = _final_params(work)
    assert step == 12 and all(np.array_equal(params[k], ref_params[k]) for k in ref_params)


def test_full_stage_on_cpu_says_so_and_sigterm_stops_after_the_step_in_flight(data_dir, tmp_path):
    """`train.py --gin stage1.gin` on a CPU: before step 1 a NOTE that the stage is a TPU job with
    a time floor for this machine; the first progress line has an ETA; a SIGTERM that arrives while
    step N+1 runs (the line for step N is printed after it starts) saves step N+1 and exits 0 —
    the next step is not started."""
    work = tmp_path / "stage1"
    p = popen(tiny_args(data_dir, work, gin=("stage1.gin", "model/tiny-moe.gin"), steps=10 ** 6, seq_len=512,
                        batch=16, every=10 ** 6))
    before = []
    for line in p.stdout:
        before.append(line)
        if line.startswith("step 3/"):
            p.send_signal(signal.SIGTERM)
            break
    out = "".join(before) + p.communicate(timeout=120)[0]
    assert p.returncode == 0, out
    note = next(i for i, x in enumerate(before) if x.startswith("NOTE: ") and "is a TPU job" in x)
    first = next(i for i, x in enumerate(before) if x.startswith("step 1/"))
    assert note < first and "GFLOP/s (measured now)" in before[note] and "hours" in before[note], out
    assert "ETA ?" not in before[first], before[first]
    assert "SIGTERM: saved step 4 and stopped" in out, out
    assert checkpoint.latest_step(work / "checkpoints") == 4


def test_sharded_run_and_resume_on_another_mesh_match_one_device(data_dir, tmp_path, reference):
    """6 steps on 4 devices (fsdp 2 x expert 2, expert parallelism), then 6 more on 1 device,
    against 12 steps on 1 device."""
    ref_params = reference
    work = tmp_path / "sharded"
    r = run(tiny_args(data_dir, work, "MeshConfig.ici_expert=2", "train.stop_after=6"), devices=4)
    assert r.returncode == 0 and "'fsdp': 2, 'context': 1, 'expert': 2" in r.stdout, r.stdout + r.stderr
    assert checkpoint.latest_step(work / "checkpoints") == 6
    r = run(tiny_args(data_dir, work))
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stdout + r.stderr
    step, params = _final_params(work)
    assert step == 12
    for k in ref_params:
        np.testing.assert_allclose(params[k], ref_params[k], rtol=0, atol=2e-5, err_msg=k)


@pytest.mark.parametrize("param,message", [
    ("train.stepz=3", "stepz"),
    ("trian.steps=3", "trian"),
    ("BATCH_SIZE=6", "BATCH_SIZE=6 is not divisible by train.micro_batches=4"),
    ("PREVIOUS_STAGE='/nonexistent/stage1'", "/nonexistent/stage1"),
    ("STEPS=0", "STEPS must be a positive integer"),
])
def test_config_errors_fail_fast_and_name_the_value(data_dir, tmp_path, param, message):
    gin = ("stage2.gin",) if "PREVIOUS" in param else ("cpu_smoke.gin", "model/tiny-moe.gin")
    extra = ["train.micro_batches=4"] if "BATCH" in param else []
    r = run(tiny_args(data_dir, tmp_path / "w", *extra, param, gin=gin))
    assert r.returncode != 0 and message in r.stderr, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "w" / "checkpoints").exists() or not any((tmp_path / "w" / "checkpoints").iterdir())


def test_missing_gin_file_is_named(tmp_path):
    r = run([str(Path(__file__).resolve().parents[1] / "launch/train.py"), "--gin", "stage9.gin"])
    assert r.returncode == 2 and "stage9.gin" in r.stderr


def test_stops_after_n_nonfinite_steps_in_a_row(data_dir, tmp_path):
    # An absurd learning rate: the first update is finite, every later loss is not.
    r = run(tiny_args(data_dir, tmp_path / "w", "lr_schedule.peak_lr=1e30", "lr_schedule.warmup_steps=0",
                      "make_optimizer.clip_norm=None", "train.max_bad_in_a_row=3", steps=20, every=100))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "3 non-finite steps in a row" in r.stderr and "No checkpoint was written before the first bad step" \
        in r.stderr and "done:" not in r.stdout
    lines = [json.loads(l) for l in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert [l["finite"] for l in lines][-3:] == [0.0, 0.0, 0.0] and len(lines) < 20


@pytest.mark.parametrize("chunk", [16, 24])  # 64 positions: 4 pieces; 2 pieces of 24 + a remainder of 16
def test_chunked_output_head_loss_equals_full_logits(chunk):
    """Loss and gradients equal the full-logits computation, and no [B, T, V] logits exist in the
    chunked program, also when T is not a multiple of the chunk (it used to fall back to full logits)."""
    cfg = get_config("tiny-moe", compute_dtype="float32", moe_impl="dense", remat="none", tie_embeddings=True)
    opt, _ = make_optimizer(OptimConfig(), 10)
    state = init_state(cfg, opt)
    batch = _batch(B=2, T=64)
    from qwen3_jax.train.step import make_loss_fn

    full = jax.value_and_grad(make_loss_fn(cfg), has_aux=True)
    chunked = jax.value_and_grad(make_loss_fn(cfg, LossConfig(loss_chunk=chunk)), has_aux=True)
    (la, _), ga = jax.jit(full)(state.params, batch, 100.0)
    (lb, _), gb = jax.jit(chunked)(state.params, batch, 100.0)
    np.testing.assert_allclose(float(la), float(lb), rtol=1e-6)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)

    def has_full_logits(fn) -> bool:
        shapes = set()

        def walk(jaxpr):
            for eqn in jaxpr.eqns:
                shapes.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
                for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                    walk(sub)
        walk(jax.make_jaxpr(fn)(state.params, batch, 100.0).jaxpr)
        return (2, 64, cfg.vocab_size) in shapes

    assert has_full_logits(full) and not has_full_logits(chunked)


def test_resume_with_a_changed_data_pipeline_errors_or_restarts(data_dir, tmp_path):
    work = tmp_path / "w"
    r = run(tiny_args(data_dir, work, "train.stop_after=4"))
    assert r.returncode == 0, r.stdout + r.stderr
    changed = tiny_args(data_dir, work, "make_dataset.packing='first_fit'")
    r = run(changed)
    assert r.returncode == 1 and "data_state_mismatch='restart'" in r.stderr and "Traceback" not in r.stderr
    r = run(changed + ["--gin_param", "train.data_state_mismatch='restart'"])
    assert r.returncode == 0 and "reshuffled" in r.stderr, r.stdout + r.stderr
    assert _final_params(work)[0] == 12


def test_train_runs_from_plain_configs_without_gin(data_dir, tmp_path):
    """The library is usable without gin: dataclass configs and a data factory in, a trained
    checkpoint out."""
    import functools

    import gin

    from data_pipeline.pipeline import make_dataset
    from data_pipeline.prepare import prepare_builtin
    from qwen3_jax.train.config import TrainConfig
    from qwen3_jax.train.loop import train

    gin.clear_config()
    parts = prepare_builtin(str(data_dir / "spm512"), "spm", spm_vocab_size=512)  # prepared already: a no-op
    model = get_config("tiny-moe", compute_dtype="float32", moe_impl="dense", remat="none")
    tc = TrainConfig(steps=3, seq_len=32, batch_size=4, checkpoint_every=3, log_every=1, async_checkpoint=False,
                     make_data=functools.partial(make_dataset, parts["code"]),
                     optim=OptimConfig(schedule=ScheduleConfig(peak_lr=1e-3, warmup_steps=1)))
    out = train(tmp_path / "w", model, tc, devices=jax.devices()[:1])
    assert out["step"] == 3 and np.isfinite(out["metrics"]["loss"]) and len(out["step_program"]) == 16
    assert checkpoint.latest_step(tmp_path / "w" / "checkpoints") == 3
    assert gin.config_str() == ""  # nothing was configured through gin


def test_spike_guard_skips_only_after_a_full_window_of_good_steps():
    from qwen3_jax.train import spike_guard

    g = spike_guard.init_guard(3)
    f, t = jnp.array(False), jnp.array(True)
    for loss in (4.0, 3.0, 100.0):  # the window is not full yet: nothing is a spike
        spike = spike_guard.is_spike(g, loss, 1.0, 3.0)
        assert not bool(spike)
        g = spike_guard.update_guard(g, loss, 1.0, t, spike)
    assert int(g["count"]) == 3  # median of (4, 3, 100) = 4
    assert bool(spike_guard.is_spike(g, 12.5, 1.0, 3.0)) and not bool(spike_guard.is_spike(g, 11.9, 1.0, 3.0))
    assert bool(spike_guard.is_spike(g, 4.0, 3.5, 3.0))  # grad norm 3.5 > 3 x median 1
    bad = spike_guard.update_guard(g, 50.0, 1.0, t, jnp.array(True))
    bad = spike_guard.update_guard(bad, jnp.nan, 1.0, f, jnp.array(False))
    assert int(bad["bad_in_a_row"]) == 2 and int(bad["spikes_total"]) == 1
    assert np.array_equal(bad["loss"], g["loss"])  # skipped steps never enter the window
    assert not bool(spike_guard.is_spike(g, 1e9, 1e9, None))  # factor None: off
