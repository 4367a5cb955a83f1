"""Entry points checked by value: the tokenizer CLI, train.z_loss, train.keep_last / keep_every,
the logged metrics (tokens/s, TFLOP/s, MFU, eval loss), and `make demo` in miniature."""

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from qwen3_jax import configurables
from qwen3_jax.params import flatten, model_from_flat, nest
from qwen3_jax import checkpoint
from qwen3_jax.train import loop as loop_lib
from qwen3_jax.train.metrics import flops_per_token
from train_utils import xla_flags

ROOT = Path(__file__).resolve().parents[1]
BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1))


def _smoke(data_dir, *bindings):
    """cpu_smoke.gin (the tiny MoE on the built-in corpus) with `bindings`, as launch/train.py reads it."""
    configurables.parse_gin(["cpu_smoke.gin"], [
        f"stage_mixture.builtin_dir='{data_dir}'", "stage_mixture.spm_vocab_size=512", "train.sample_every=0",
        "train.async_checkpoint=False", *bindings])
    return configurables.run_config()


def _full_logits(cfg, params, batch):
    """[B,T,V] logits of one plain forward (jitted: op by op it takes minutes on a busy box)."""
    fwd = jax.jit(lambda p, t, pos, seg: model_from_flat(cfg, flatten(p))(t, pos, seg))
    return fwd(params, batch["tokens"], batch["positions"], batch["segment_ids"])


def _mean_nll(logits, batch):
    lg = np.asarray(logits, np.float64)
    logp = lg - (np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) + lg.max(-1, keepdims=True))
    tgt = np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    return -float((tgt * batch["loss_mask"]).sum()), float(batch["loss_mask"].sum())


# -- the tokenizer CLI ------------------------------------------------------------------------------

def test_tokenizer_cli_trains_encodes_and_is_idempotent(tmp_path):
    from data_pipeline.text_tokenizer import load_tokenizer

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "data_pipeline.text_tokenizer", *map(str, args)], cwd=ROOT,
                              env=_env(), capture_output=True, text=True, timeout=300)

    out = tmp_path / "spm"
    r = cli("train-spm", "--out", out, "--vocab-size", 600, "--max-chars", 300_000)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{out / 'spm.model'} (vocab 600)"), r.stdout
    tok = load_tokenizer(str(out / "spm.model"))
    text = "def f(x):\n    return x + 1  # 日本"
    r = cli("encode", "--tokenizer", out / "spm.model", text)
    assert r.returncode == 0 and json.loads(r.stdout) == tok.encode(text) and tok.decode(tok.encode(text)) == text
    mtime = (out / "spm.model").stat().st_mtime_ns
    r = cli("train-spm", "--out", out, "--vocab-size", 600)  # already there: kept, not retrained
    assert r.returncode == 0 and (out / "spm.model").stat().st_mtime_ns == mtime
    r = cli("encode", "Hello world")  # the default: the real Qwen3 tokenizer
    assert r.returncode == 0 and json.loads(r.stdout) == [9707, 1879], r.stdout + r.stderr
    r = cli("train-spm")
    assert r.returncode == 2 and "--out" in r.stderr


# -- one short run: checkpoints kept, metric values, eval loss --------------------------------------

@pytest.fixture(scope="module")
def short_run(data_dir, tmp_path_factory):
    """cpu_smoke for 8 steps, a checkpoint every step, keep_last 2 / keep_every 4, eval at step 8
    on 2 held-out batches, z-loss 1e-2 with loss pieces of 16 positions; the device's peak FLOP/s
    stated as 1e12 so MFU is logged on a CPU."""
    work = tmp_path_factory.mktemp("short") / "run"
    model, tc = _smoke(data_dir, "STEPS=8", "SEQ_LEN=64", "BATCH_SIZE=4", "CHECKPOINT_EVERY=1", "train.keep_last=2",
                       "train.keep_every=4", "train.eval_every=8", "train.eval_batches=2", "train.log_every=1",
                       "train.z_loss=1e-2", "train.loss_chunk=16")
    assert (tc.keep_last, tc.keep_every, tc.z_loss, tc.loss_chunk) == (2, 4, 1e-2, 16)
    orig = loop_lib.peak_flops
    loop_lib.peak_flops = lambda kind: 1e12
    try:
        out = loop_lib.train(work, model, tc, devices=jax.devices()[:1])
    finally:
        loop_lib.peak_flops = orig
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    return {"work": work, "model": model, "tc": tc, "out": out, "rows": rows}


def test_z_loss_adds_its_hand_computed_term_to_the_loss(short_run):
    """train.z_loss = z (through gin into the built step): at step 1 (the initial parameters, the
    first batch) the loss the step differentiates exceeds LM + aux by z · mean over loss tokens of
    logsumexp(logits)^2, with the logits from a separate full forward; the LM loss is that
    forward's mean NLL."""
    from qwen3_jax.train.step import init_params

    model, tc, rows = short_run["model"], short_run["tc"], short_run["rows"]
    m = rows[0]
    assert (m["split"], m["step"]) == ("train", 1)
    params = jax.jit(lambda: init_params(model, tc.seed))()  # what the run started from (same seed)
    batch = {k: v for k, v in next(tc.make_data(seq_len=tc.seq_len, global_batch_size=tc.batch_size,
                                                seed=tc.seed)).items() if k in BATCH_KEYS}
    logits = np.asarray(_full_logits(model, params, batch), np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    mask = batch["loss_mask"]
    want_z = tc.z_loss * float((lse ** 2 * mask).sum() / mask.sum())
    nll, n = _mean_nll(logits, batch)
    assert want_z > 1e-3 and m["z_loss"] == pytest.approx(want_z, rel=1e-5)
    assert m["lm_loss"] == pytest.approx(nll / n, rel=1e-5)
    assert m["loss"] - m["lm_loss"] - model.router_aux_loss_coef * m["aux_loss"] == pytest.approx(want_z, rel=1e-4)


def test_keep_last_and_keep_every_choose_the_steps_on_disk(short_run):
    ckpts = short_run["work"] / "checkpoints"
    steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert steps == [4, 7, 8]  # the last 2, and every multiple of 4
    assert checkpoint.latest_step(ckpts) == 8 and short_run["out"]["step"] == 8


def test_logged_throughput_and_mfu_follow_tokens_and_flops(short_run):
    model, tc, rows = short_run["model"], short_run["tc"], short_run["rows"]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == list(range(1, 9))
    fpt = flops_per_token(model, tc.seq_len)
    tokens = tc.batch_size * tc.seq_len
    it = tc.make_data(seq_len=tc.seq_len, global_batch_size=tc.batch_size, seed=tc.seed)
    for r in train_rows:
        assert r["step_time_s"] > 0
        assert r["tokens_per_s"] * r["step_time_s"] == pytest.approx(tokens, rel=1e-9)
        assert r["tflops_per_device"] * 1e12 == pytest.approx(fpt * r["tokens_per_s"], rel=1e-9)  # 1 device
        assert r["mfu"] == pytest.approx(r["tflops_per_device"] * 1e12 / 1e12, rel=1e-9)
        assert r["tokens"] == float(next(it)["loss_mask"].sum())  # the loss tokens of that step's batch
    assert fpt > 0  # the count itself: tests/test_metrics.py, against a hand count


def test_eval_loss_is_the_mean_loss_on_the_eval_batches(short_run):
    model, tc, rows = short_run["model"], short_run["tc"], short_run["rows"]
    (ev,) = [r for r in rows if r["split"] == "eval"]
    assert ev["step"] == 8
    _, flat, step, _ = checkpoint.restore_params_numpy(short_run["work"])
    assert step == 8
    it = tc.make_eval_data(seq_len=tc.seq_len, global_batch_size=tc.batch_size, seed=tc.seed)
    nll = n = 0.0
    for _ in range(tc.eval_batches):
        batch = {k: v for k, v in next(it).items() if k in BATCH_KEYS}
        a, b = _mean_nll(_full_logits(model, nest(flat), batch), batch)
        nll, n = nll + a, n + b
    assert ev["tokens"] == n and ev["loss"] == pytest.approx(nll / n, rel=1e-5)


# -- make demo, in miniature ------------------------------------------------------------------------

@pytest.mark.slow
def test_demo_quick_runs_the_three_stages_exports_and_agrees_with_transformers(data_dir, tmp_path):
    r = subprocess.run([sys.executable, "launch/demo.py", "--quick", "--workdir", str(tmp_path / "demo"),
                        "--data_dir", str(data_dir)], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    for s, steps in (("stage1", 3), ("stage2", 2), ("stage3", 2)):
        assert checkpoint.latest_step(tmp_path / "demo" / s / "checkpoints") == steps
    assert "initialised parameters from" in r.stdout and "rope_theta 10000 -> 1e+06" in r.stdout
    hf = tmp_path / "demo" / "hf"
    assert (hf / "config.json").exists() and list(hf.glob("*.safetensors"))
    assert "[transformers] loads the export; first 16 greedy tokens agree with ours" in r.stdout
    for s in ("after stage1, greedy", "after stage3, greedy", "after stage3, temperature 0.7"):
        assert re.search(rf"--- {re.escape(s)}[^\n]* ---\nimport sys\nimport os", r.stdout), r.stdout[-3000:]
    assert "demo finished" in r.stdout and "What to expect from a few minutes on a CPU" in r.stdout
    for s in ("2", "3"):
        m = re.search(rf"held-out after stage {s}: code ([\d.]+), docs ([\d.]+), pooled ([\d.]+) bits/byte",
                      r.stdout)
        assert m and all(0 < float(x) < 16 for x in m.groups()), r.stdout[-3000:]
        held = json.loads((tmp_path / "demo" / f"heldout_stage{s}.json").read_text())["heldout"]
        assert set(held) == {"code", "docs"} and abs(held["code"]["bits_per_byte"] - float(m.group(1))) < 1e-3
    png = (tmp_path / "demo" / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert re.search(r"stage3: training loss, mean of its first 10 steps [\d.]+ -> last 10 [\d.]+", r.stdout), \
        r.stdout[-3000:]
