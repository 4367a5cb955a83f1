"""Distillation (qwen3_jax.train.distill): the teacher in the step — frozen, outside the train
state, vocabulary checked before compile — the step's KD loss against full logits, and a tiny
end-to-end run through launch/train.py with configs/distill_offpolicy.gin."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3_jax import get_config
from qwen3_jax.params import flat_params, flatten, param_specs
from qwen3_jax.model import create_model
from qwen3_jax import checkpoint
from qwen3_jax.train.build import build
from qwen3_jax.train.config import OptimConfig, ScheduleConfig, TrainConfig
from qwen3_jax.errors import TrainingError
from qwen3_jax.train.distill import load_teacher_params
from train_utils import run, tiny_args

STUDENT = get_config("tiny-dense", compute_dtype="float32", remat="none")
TEACHER = get_config("tiny-moe", compute_dtype="float32", moe_impl="dense", remat="none", num_layers=3)


def _teacher_dir(tmp_path, cfg=TEACHER, seed=7):
    root = tmp_path / f"teacher-{cfg.vocab_size}"
    checkpoint.save_params(root, 5, flat_params(create_model(cfg, seed)), cfg, {"note": "test teacher"})
    return root


def _tc(teacher, **kw):
    base = dict(steps=4, seq_len=32, batch_size=4, checkpoint_every=4, loss_chunk=8, teacher=str(teacher),
                kd_alpha=0.6, kd_temperature=2.0, spike_factor=None,
                optim=OptimConfig(schedule=ScheduleConfig(peak_lr=1e-3, warmup_steps=1)))
    return TrainConfig(**{**base, **kw})


def _batch(B=4, T=32, V=512, seed=0):
    rng = np.random.RandomState(seed)
    tok = rng.randint(0, V, (B, T)).astype(np.int32)
    seg = np.ones((B, T), np.int32)
    seg[:, T // 2:] = 2
    pos = np.concatenate([np.arange(T // 2), np.arange(T - T // 2)])[None].repeat(B, 0).astype(np.int32)
    mask = np.ones((B, T), np.float32)
    mask[:, T // 2 - 1] = 0
    mask[:, -1] = 0
    return dict(tokens=tok, targets=np.roll(tok, -1, 1), segment_ids=seg, positions=pos, loss_mask=mask)


def test_vocabulary_mismatch_fails_before_compile_naming_both_sizes(tmp_path):
    teacher = _teacher_dir(tmp_path, TEACHER.replace(vocab_size=640))
    with pytest.raises(TrainingError, match=r"teacher's vocabulary has 640 rows, the student's \(tiny-dense\) 512"):
        build(STUDENT, _tc(teacher), jax.devices()[:1])
    with pytest.raises(TrainingError, match="train.teacher='.*nowhere'"):
        build(STUDENT, _tc(tmp_path / "nowhere"), jax.devices()[:1])
    with pytest.raises(TrainingError, match="train.kd_topk=9999 exceeds"):
        build(STUDENT, _tc(_teacher_dir(tmp_path), kd_topk=9999), jax.devices()[:1])


@pytest.mark.parametrize("micro_batches, topk", [(1, None), (2, 7)])
def test_step_loss_equals_full_logits_reference_and_teacher_stays_outside_the_state(tmp_path, micro_batches, topk):
    teacher_dir = _teacher_dir(tmp_path)
    tc = _tc(teacher_dir, micro_batches=micro_batches, kd_topk=topk)
    prog = build(STUDENT, tc, jax.devices()[:1])
    plain = build(STUDENT, tc.replace(teacher=None), jax.devices()[:1])
    # the teacher is not in the train state: same tree as a run without a teacher, student keys only
    assert jax.tree.structure(prog.abstract_state) == jax.tree.structure(plain.abstract_state)
    assert set(flatten(prog.abstract_state.params)) == set(flatten(plain.abstract_state.params))
    n_state = sum(x.size for x in jax.tree.leaves(prog.abstract_state))
    assert n_state == sum(x.size for x in jax.tree.leaves(plain.abstract_state))
    teacher = load_teacher_params(prog.distill)
    t_flat = flatten(teacher)
    assert set(t_flat) == set(param_specs(TEACHER)) and len(t_flat) > len(flatten(plain.abstract_state.params))
    state = prog.init_state()
    params0 = jax.tree.map(np.asarray, state.params)
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    new_state, m = prog.step(state, batch, teacher)

    # reference: both models' full [B,T,V] logits, the formula written out
    from qwen3_jax.params import model_from_flat
    def logits(cfg):
        return jax.jit(lambda p, b: model_from_flat(cfg, p)(b["tokens"], b["positions"], b["segment_ids"]))

    s_logits = logits(STUDENT)(flatten(params0), batch)
    t_logits = logits(TEACHER)(jax.tree.map(np.asarray, t_flat), batch)
    mask = batch["loss_mask"]
    tau = tc.kd_temperature
    logp_s = jax.nn.log_softmax(s_logits, -1)
    nll = -jnp.take_along_axis(logp_s, batch["targets"][..., None], -1)[..., 0]
    ls_tau = jax.nn.log_softmax(s_logits / tau, -1)
    if topk:
        vals, ids = jax.lax.top_k(t_logits, topk)
        lt = jax.nn.log_softmax(vals / tau, -1)
        kl = jnp.sum(jnp.exp(lt) * (lt - jnp.take_along_axis(ls_tau, ids, -1)), -1)
    else:
        lt = jax.nn.log_softmax(t_logits / tau, -1)
        kl = jnp.sum(jnp.exp(lt) * (lt - ls_tau), -1)
    lm = float(jnp.sum(nll * mask) / mask.sum())
    kd = float(jnp.sum(kl * mask) / mask.sum())
    agree = float(jnp.sum((jnp.argmax(s_logits, -1) == jnp.argmax(t_logits, -1)) * mask) / mask.sum())
    assert float(m["lm_loss"]) == pytest.approx(lm, rel=1e-5)
    assert float(m["kd_loss"]) == pytest.approx(kd, rel=1e-4) and kd > 1e-3
    assert float(m["kd_top1_agree"]) == pytest.approx(agree, abs=1e-6)
    alpha = tc.kd_alpha
    assert float(m["loss"]) == pytest.approx((1 - alpha) * lm + alpha * tau ** 2 * kd, rel=1e-5)
    # the student moved; the teacher (an argument, not donated, not returned) did not
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(params0), jax.tree.leaves(new_state.params)))
    for k, v in flatten(teacher).items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(t_flat[k]))


def test_gradient_of_the_kd_term_reaches_only_the_student(tmp_path):
    """With α = 1 the update comes from KD alone; the optimizer state mirrors the student's params."""
    prog = build(STUDENT, _tc(_teacher_dir(tmp_path), kd_alpha=1.0), jax.devices()[:1])
    opt_leaves = {x.shape for x in jax.tree.leaves(prog.abstract_state.opt_state)}
    teacher_only = {x.shape for x in jax.tree.leaves(prog.distill.abstract_params)} - {
        x.shape for x in jax.tree.leaves(prog.abstract_state.params)}
    assert teacher_only and not (teacher_only & opt_leaves)


@pytest.mark.slow
def test_end_to_end_offpolicy_run_through_train_py(data_dir, tmp_path):
    teacher_dir = _teacher_dir(tmp_path)
    work = tmp_path / "student"
    args = tiny_args(data_dir, work, f"TEACHER='{teacher_dir}'", "model_config.preset='tiny-dense'",
                     "train.kd_topk=16", gin=("distill_offpolicy.gin", "model/tiny-moe.gin"), steps=4, every=4)
    r = run(args)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    train_rows = [x for x in rows if x.get("split", "train") == "train" and "kd_loss" in x]
    assert len(train_rows) == 4
    for x in train_rows:
        assert x["kd_loss"] > 0 and 0 <= x["kd_top1_agree"] <= 1 and x["lm_loss"] > 0
    root = work / "checkpoints"
    meta = checkpoint.read_meta(root, 4)
    assert meta["teacher"]["path"] == str((teacher_dir / "5").absolute()) and meta["teacher"]["kd_topk"] == 16
    cfg, flat, _, _ = checkpoint.restore_params_numpy(work)
    assert cfg.name == "tiny-dense" and not any("expert" in k or "router" in k for k in flat)
    assert "teacher" in r.stdout


def test_missing_teacher_macro_is_named(data_dir, tmp_path):
    r = run(tiny_args(data_dir, tmp_path / "w", gin=("distill_offpolicy.gin",), steps=2))
    assert r.returncode != 0 and "TEACHER" in r.stderr, r.stderr[-2000:]


def test_hf_folder_teacher_loads_in_the_compute_dtype_on_the_students_shardings(tmp_path):
    from qwen3_jax.hf import save_hf
    from qwen3_jax.train.distill import find_teacher

    model = create_model(TEACHER, 7)
    hf_dir = save_hf(model, tmp_path / "hf", dtype="float32")
    ckpt_dir = _teacher_dir(tmp_path, seed=7)
    assert find_teacher(hf_dir).kind == "hf" and find_teacher(ckpt_dir).kind == "checkpoint"
    student = STUDENT.replace(compute_dtype="bfloat16")
    devices = jax.devices()[:2]  # fsdp over 2 devices: the teacher follows the same logical-axis rules
    from_hf = build(student, _tc(hf_dir), devices)
    from_ckpt = build(student, _tc(ckpt_dir), devices)
    a, b = load_teacher_params(from_hf.distill), load_teacher_params(from_ckpt.distill)
    for k, x in flatten(a).items():
        assert x.dtype == jnp.bfloat16 and flatten(b)[k].dtype == jnp.bfloat16, k
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(flatten(b)[k], np.float32))
    student_embed = from_hf.state_shardings.params["embed"]["embedding"]
    assert a["embed"]["embedding"].sharding.spec == student_embed.spec and len(student_embed.device_set) == 2


@pytest.mark.parametrize("model", ["", "model/qwen3-0.6b.gin", "model/small-moe.gin"])
def test_offpolicy_stage_file_parses_with_a_model_file(model):
    from qwen3_jax import configurables

    configurables.parse_gin(["distill_offpolicy.gin"] + ([model] if model else []), ["TEACHER='/some/teacher'"])
    cfg, tc = configurables.run_config()
    assert tc.teacher == "/some/teacher" and tc.kd_divergence == "forward" and 0 < tc.kd_alpha <= 1
    assert cfg.vocab_size == (151_936 if "qwen3" in model else 4096)
    assert cfg.name == (model.split("/")[-1][:-4] if model else "tiny-dense")


@pytest.mark.slow
def test_teacher_runs_under_the_students_context_parallelism(tmp_path):
    """CP=2 x fsdp=2 on 4 devices: the teacher's forward runs on the same zig-zag-ordered, split
    sequence as the student (model/context_parallel.py), and the step's losses, top-1 agreement
    and update equal the one-device step's."""
    from qwen3_jax.sharding import MeshConfig

    tc = _tc(_teacher_dir(tmp_path))
    batch = _batch()
    results = []
    for mesh, devices in ((MeshConfig(), jax.devices()[:1]), (MeshConfig(ici_fsdp=2, ici_context=2), jax.devices()[:4])):
        prog = build(STUDENT, tc.replace(mesh=mesh), devices)
        new_state, m = prog.step(prog.init_state(), batch, load_teacher_params(prog.distill))
        results.append((dict(prog.mesh.shape), m, flatten(jax.tree.map(np.asarray, new_state.params))))
    (mesh1, m1, p1), (mesh4, m4, p4) = results
    assert mesh4["context"] == 2 and mesh1["context"] == 1
    for key in ("loss", "lm_loss", "kd_loss", "kd_top1_agree", "grad_norm"):
        assert float(m4[key]) == pytest.approx(float(m1[key]), rel=2e-5), key
    for k in p1:  # Adam's first step is ~lr * sign(g): round-off in a tiny g moves it by up to 1% of lr
        np.testing.assert_allclose(p4[k], p1[k], rtol=2e-5, atol=1e-5, err_msg=k)
