"""On-policy distillation (qwen3_jax.train.onpolicy): the prompts each row gives, the student's
rollout against the inference engine's own generation, the batch the step trains on (loss on
the sampled tokens up to the end of text), and a run through launch/train.py that resumes
bit-identically after SIGKILL."""

import json
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3_jax import get_config
from qwen3_jax.inference import Generator, SamplingConfig
from qwen3_jax.model import create_model
from qwen3_jax.params import flat_params, nest
from qwen3_jax import checkpoint
from qwen3_jax.train import onpolicy
from qwen3_jax.train.build import build
from qwen3_jax.train.config import OptimConfig, ScheduleConfig, TrainConfig
from qwen3_jax.errors import TrainingError
from qwen3_jax.train.distill import load_teacher_params
from train_utils import popen, run, tiny_args

STUDENT = get_config("tiny-dense", compute_dtype="float32", remat="none")
TEACHER = get_config("tiny-moe", compute_dtype="float32", moe_impl="dense", remat="none", num_layers=3)


def _teacher_dir(tmp_path, seed=7):
    root = tmp_path / "teacher"
    checkpoint.save_params(root, 5, flat_params(create_model(TEACHER, seed)), TEACHER, {"note": "test teacher"})
    return root


def _prompt_rows():
    """Rows as the data pipeline makes them: [first document | next | padding]."""
    tokens = np.arange(1, 1 + 4 * 12, dtype=np.int32).reshape(4, 12)
    seg = np.array([[1] * 5 + [2] * 7,        # prompt: 5 tokens
                    [1] * 12,                 # prompt: the first 8 (P)
                    [3, 3] + [4] * 10,        # another first segment id: 2 tokens
                    [0] * 12], np.int32)      # an empty row
    return tokens, seg


def test_prompts_are_each_rows_first_document_left_aligned():
    tokens, seg = _prompt_rows()
    prompt_BP, start_B = jax.device_get(onpolicy.left_aligned_prompts(jnp.asarray(tokens), jnp.asarray(seg), 8))
    assert start_B.tolist() == [3, 0, 6, 8]
    assert prompt_BP[0].tolist() == [0, 0, 0, 1, 2, 3, 4, 5]
    assert prompt_BP[1].tolist() == tokens[1, :8].tolist()
    assert prompt_BP[2].tolist() == [0] * 6 + [25, 26]
    assert prompt_BP[3].tolist() == [0] * 8


def test_greedy_rollout_is_the_generators_continuation_and_the_batch_scores_only_it():
    cfg = STUDENT
    params = flat_params(create_model(cfg, 3))
    tokens, seg = _prompt_rows()
    P, N = 8, 9
    ro = onpolicy.Rollout(P, N, SamplingConfig(temperature=0.0))
    prompts = [list(tokens[0, :5]), list(tokens[1, :8]), list(tokens[2, :2])]
    ref = Generator(cfg, params).generate(prompts, max_new_tokens=N)  # tested against transformers elsewhere
    eos = ref[0].tokens[4]  # row 0's fifth sampled token ends its completion
    out = jax.device_get(onpolicy.rollout_batch(cfg, ro, nest(params), {"tokens": tokens, "segment_ids": seg},
                                                jax.random.key(0), jnp.int32(eos)))
    T = ro.seq_len
    assert T == P + N - 1 and all(v.shape == (4, T) for v in out.values())
    for b, g in enumerate(ref):
        start = P - len(prompts[b])
        assert out["tokens"][b, P:].tolist() == g.tokens[:N - 1]  # inputs: the prompt, then the samples
        assert out["targets"][b, P - 1:].tolist() == g.tokens  # every sampled token is a target
        assert out["segment_ids"][b].tolist() == [0] * start + [1] * (T - start)
        assert out["positions"][b, start:].tolist() == list(range(T - start))
        first_eos = g.tokens.index(eos) if eos in g.tokens else N - 1
        expected = [0] * (P - 1) + [1] * (first_eos + 1) + [0] * (N - 1 - first_eos)
        assert out["loss_mask"][b].tolist() == expected, b
    assert out["loss_mask"][0].sum() == 5
    assert out["loss_mask"][3].sum() == 0  # no prompt: nothing is scored


def test_onpolicy_program_samples_then_runs_the_distillation_step(tmp_path):
    tc = TrainConfig(steps=4, seq_len=24, batch_size=4, checkpoint_every=4, loss_chunk=8,
                     teacher=str(_teacher_dir(tmp_path)), kd_alpha=1.0, kd_divergence="reverse",
                     onpolicy_prompt_len=8, spike_factor=None,
                     optim=OptimConfig(schedule=ScheduleConfig(peak_lr=1e-3, warmup_steps=1)))
    prog = build(STUDENT, tc, jax.devices()[:2])
    assert prog.abstract_prompts["tokens"].shape == (4, 8) and prog.lower_rollout() is not None
    teacher = load_teacher_params(prog.distill)
    state = prog.init_state()
    tokens, seg = _prompt_rows()
    prompts = {"tokens": tokens[:, :8], "segment_ids": seg[:, :8]}
    a = prog.rollout(state.params, prompts, np.int32(1), np.int32(-1))
    b = prog.rollout(state.params, prompts, np.int32(1), np.int32(-1))
    c = prog.rollout(state.params, prompts, np.int32(2), np.int32(-1))
    assert np.array_equal(a["tokens"], b["tokens"])  # the key is a function of (seed, step)
    assert not np.array_equal(a["tokens"], c["tokens"])
    mask = np.asarray(a["loss_mask"])
    assert mask.sum() == 3 * (24 - 8 + 1)  # three rows with a prompt, every sampled token scored
    _, m = prog.step(state, a, teacher)
    assert float(m["tokens"]) == mask.sum() and float(m["kd_loss"]) > 0 and np.isfinite(float(m["loss"]))
    from qwen3_jax import aot  # the AOT tool's report covers the rollout program too

    report = aot.compile_report(prog, aot.parse_topology("cpu", 1))
    assert report["rollout"]["prompt_len"] == 8 and report["rollout"]["completion_len"] == 17
    assert report["rollout"]["fits"] and report["rollout"]["bytes_per_chip_peak"] > 0
    with pytest.raises(TrainingError, match="train.onpolicy_prompt_len=24 must be an integer in 1..SEQ_LEN-1"):
        build(STUDENT, tc.replace(onpolicy_prompt_len=24), jax.devices()[:1])
    with pytest.raises(TrainingError, match="needs a teacher"):
        build(STUDENT, tc.replace(teacher=None), jax.devices()[:1])


@pytest.mark.slow
def test_onpolicy_run_through_train_py_resumes_bit_identically_after_sigkill(data_dir, tmp_path):
    teacher = _teacher_dir(tmp_path)
    cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}

    def args(work):
        return tiny_args(data_dir, work, f"TEACHER='{teacher}'", "PREVIOUS_STAGE=None", "PROMPT_LEN=16",
                         "model_config.preset='tiny-dense'", "train.eval_every=0",
                         gin=("distill_onpolicy.gin", "model/tiny-moe.gin"), steps=6, seq_len=48, every=2)

    full = run(args(tmp_path / "full"), extra_env=cache)
    assert full.returncode == 0, full.stderr[-3000:]
    assert "on-policy: the student samples 33 tokens after prompts of up to 16 tokens" in full.stdout
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [x for x in rows if x.get("split") == "train"]
    assert [x["step"] for x in train_rows] == list(range(1, 7))
    assert all(x["kd_loss"] > 0 and 0 < x["tokens"] <= 4 * 33 for x in train_rows)
    assert checkpoint.read_meta(tmp_path / "full" / "checkpoints", 6)["onpolicy"]["prompt_len"] == 16

    work = tmp_path / "killed"
    p = popen(args(work), extra_env=cache)
    for line in p.stdout:  # killed once step 4 has been reported: checkpoint 2 (maybe 4) is on disk
        if line.startswith("step 4/"):
            p.send_signal(signal.SIGKILL)
            break
    p.wait(timeout=300)
    assert p.returncode == -signal.SIGKILL
    resumed = run(args(work), extra_env=cache)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
    _, a, _, _ = checkpoint.restore_params_numpy(tmp_path / "full")
    _, b, _, _ = checkpoint.restore_params_numpy(work)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
