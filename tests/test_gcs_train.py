"""Run folders on a bucket: launch/train.py with `--workdir gs://...` against a real GCS API server
(fake-gcs-server, tests/gcs_server.py), as a TPU user runs it: SIGKILL resume bit-identical to an
uninterrupted run, a corrupt newest checkpoint and an unfinished save in the bucket, the lock as a
precondition object (refused while held, taken over when stale), the stage 1 -> 2 handoff."""

import json
import os
import random
import signal
import socket
import time

import numpy as np
import pytest

from qwen3_jax import storage
from qwen3_jax import checkpoint
from train_utils import ROOT, run, signal_at_step, tiny_args

COMMON = ("train.eval_every=0", "train.sample_every=0")


def _args(data_dir, work, *extra, **kw):
    return tiny_args(data_dir, work, *COMMON, *extra, async_ckpt=True, **kw)


def _params(work):
    _, flat, step, _ = checkpoint.restore_params_numpy(work)
    return step, flat


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _train_steps(work) -> list[int]:
    rows = [json.loads(line) for line in (storage.path(work) / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r["split"] == "train"]


@pytest.fixture(scope="module")
def bucket_ref(data_dir, gcs_server):
    """An uninterrupted 12-step run in a bucket (checkpoints 4, 8, 12)."""
    work = gcs_server.bucket() + "/ref"
    r = run(_args(data_dir, work))
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (ROOT / "gs:").exists()  # nothing went to a local folder named after the URL
    return work, _params(work)[1]


def test_sigkill_resume_on_a_bucket_is_bit_identical(data_dir, gcs_bucket, bucket_ref):
    work = gcs_bucket + "/killed"
    seed = int(os.environ.get("FAULT_SEED", random.randrange(10**6)))
    kill_at = random.Random(seed).randint(5, 11)
    p = signal_at_step(_args(data_dir, work), kill_at, signal.SIGKILL)
    p.wait(timeout=300)
    assert p.returncode == -signal.SIGKILL, f"FAULT_SEED={seed}"
    committed = checkpoint.latest_step(storage.path(work) / "checkpoints")  # an async commit may not have made it
    r = run(_args(data_dir, work))
    assert r.returncode == 0, (seed, r.stdout + r.stderr)
    if committed is not None:
        assert f"resumed from {work}/checkpoints/{committed}" in r.stdout, (seed, r.stdout + r.stderr)
    step, params = _params(work)
    assert step == 12 and _same(params, bucket_ref[1]), f"kill at {kill_at} (FAULT_SEED={seed})"
    assert _train_steps(work) == list(range(1, 13))  # metrics.jsonl in the bucket, each step once
    names = set(storage.list_files(work))
    assert {"model_config.json", "config.gin", "operative_config.gin"} <= names
    assert any(n.startswith("tensorboard/events.out.tfevents") for n in names)
    assert "train.lock" not in names and not (ROOT / "gs:").exists()


def test_corrupt_newest_checkpoint_and_unfinished_save_in_a_bucket(data_dir, gcs_bucket, bucket_ref):
    """Step 12's largest params object truncated, step 8 without its commit file (an unfinished
    save on an object store): 8 is cleaned, 12 moved to skipped_checkpoints/, resume from 4."""
    src, work = storage.path(bucket_ref[0]), storage.path(gcs_bucket + "/w")
    for rel in storage.list_files(src):
        (work / rel).write_bytes((src / rel).read_bytes())
    ckpts = work / "checkpoints"
    big = max((r for r in storage.list_files(ckpts / "12" / "params") if "/d/" in f"/{r}"),
              key=lambda r: len((ckpts / "12" / "params" / r).read_bytes()))
    (ckpts / "12" / "params" / big).write_bytes((ckpts / "12" / "params" / big).read_bytes()[:7])
    (ckpts / "8" / "commit_success.txt").unlink()
    r = run(_args(data_dir, work))
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "Traceback" not in out, out
    assert f"removed {ckpts / '8'} (a checkpoint save interrupted before its commit)" in r.stdout, out
    assert f"skipping checkpoint step 12 in {ckpts}: unreadable (" in r.stderr, out
    assert f"resumed from {ckpts / '4'}" in r.stdout, out
    skipped = {n.split("/")[0].split("-")[0] for n in storage.list_files(work / "skipped_checkpoints")}
    assert skipped == {"12"}
    step, params = _params(work)
    assert step == 12 and _same(params, bucket_ref[1])


def test_lock_object_refuses_a_second_run_and_is_taken_over_when_stale(data_dir, gcs_bucket):
    work = storage.path(gcs_bucket + "/locked")
    live = {"host": "tpu-vm-7", "pid": 1234, "start": time.time(), "beat": time.time()}
    (work / "train.lock").write_text(json.dumps(live))
    r = run(_args(data_dir, work, steps=2, every=2))
    assert r.returncode == 1, r.stdout + r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: workdir {work} is in use by another training run (pid 1234 on tpu-vm-7"), last
    assert json.loads((work / "train.lock").read_text()) == live and not (work / "checkpoints").exists()

    dead = {**live, "start": time.time() - 7200, "beat": time.time() - 3600}  # a preempted VM's lock
    (work / "train.lock").write_text(json.dumps(dead))
    r = run(_args(data_dir, work, steps=2, every=2))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "taking over the stale workdir lock" in r.stderr and "no heartbeat for 36" in r.stderr
    assert not (work / "train.lock").exists()


def test_create_exclusive_is_decided_by_the_server(gcs_bucket):
    """The lock's precondition itself: of two creators, the second is refused by the server."""
    created = storage.path(gcs_bucket) / "x.lock"
    assert storage.create_exclusive(created, json.dumps({"host": socket.gethostname()}))
    assert not storage.create_exclusive(created, "second")
    assert json.loads(created.read_text())["host"] == socket.gethostname()


def test_stage1_to_stage2_handoff_with_both_run_folders_in_a_bucket(data_dir, gcs_bucket):
    s1, s2 = gcs_bucket + "/stage1", gcs_bucket + "/stage2"
    gin = lambda stage: ("--gin", f"{stage}.gin", "--gin", "model/tiny-moe.gin")  # noqa: E731
    base = [f"stage_mixture.builtin_dir='{data_dir}'", "stage_mixture.spm_vocab_size=512", "SEQ_LEN=64",
            "BATCH_SIZE=4", "train.async_checkpoint=False", "train.eval_every=0", "train.sample_every=0"]
    params = lambda *p: [a for b in [*base, *p] for a in ("--gin_param", b)]  # noqa: E731
    train = str(ROOT / "launch" / "train.py")
    r1 = run([train, *gin("stage1"), "--workdir", s1, *params("STEPS=3", "CHECKPOINT_EVERY=3")])
    assert r1.returncode == 0, r1.stdout + r1.stderr
    r2 = run([train, *gin("stage2"), "--workdir", s2, *params("STEPS=2", "CHECKPOINT_EVERY=2",
                                                              f"train.init_from='{s1}'")])
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert f"initialised parameters from {s1}/checkpoints/3" in r2.stdout, r2.stdout
    assert _train_steps(s2) == [1, 2] and _params(s2)[0] == 2
