"""Hosts that agree: launch/train.py as 2 processes x 4 fake CPU devices (jax.distributed on
localhost, gloo), the run folder in a bucket (fake-gcs-server), as a TPU slice runs it.

* A SIGTERM that reaches process 1 only (a maintenance notice reaches one host first): both
  processes save the same step and exit 0 within seconds; the rerun ends bit-identical to an
  uninterrupted 2-process run.
* A checkpoint that one process cannot read (fault injection): both skip it and restore the same
  older step.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from qwen3_jax import storage
from qwen3_jax import checkpoint
from qwen3_jax.train.faults import UNREADABLE
from train_utils import ROOT, env, free_port, run_pair, tiny_args

MESH = ("make_dataset.data_shards=2", "MeshConfig.ici_fsdp=2", "MeshConfig.ici_expert=4", "train.eval_every=0",
        "train.sample_every=0")


def _args(data_dir, work, *extra, steps=12):
    return tiny_args(data_dir, work, *MESH, *extra, steps=steps, batch=8)


def _pair_args(data_dir, work, *extra, steps=12):
    return lambda i, port: [sys.executable, *_args(data_dir, work, *extra, steps=steps), "--coordinator",
                            f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i)]


def _params(work):
    _, flat, step, _ = checkpoint.restore_params_numpy(work)
    return step, flat


def _train_steps(work):
    rows = [json.loads(line) for line in (storage.path(work) / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r["split"] == "train"]


@pytest.fixture(scope="module")
def pair_ref(data_dir, gcs_server):
    """An uninterrupted 2-process 12-step run in a bucket (checkpoints 4, 8, 12)."""
    work = gcs_server.bucket() + "/ref"
    procs, logs = run_pair(_pair_args(data_dir, work), env(4))
    assert all(p.returncode == 0 for p in procs), "\n\n".join(log[-3000:] for log in logs)
    return work, _params(work)[1]


def _start_pair(make_args, tmp_path):
    """Both processes started, their output going to files (read while they run)."""
    port = free_port()
    logs = [tmp_path / f"p{i}.log" for i in range(2)]
    procs = [subprocess.Popen(make_args(i, port), env=env(4), cwd=ROOT, stdout=open(logs[i], "w"),
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    return procs, logs


@pytest.mark.slow
def test_sigterm_to_one_host_stops_both_at_the_same_step_and_resumes_exactly(data_dir, gcs_bucket, pair_ref,
                                                                              tmp_path):
    work = gcs_bucket + "/preempted"
    seed = int(os.environ.get("FAULT_SEED", random.randrange(10**6)))
    at = random.Random(seed).randint(2, 9)
    procs, logs = _start_pair(_pair_args(data_dir, work), tmp_path)
    deadline = time.time() + 400
    while f"step {at}/12" not in logs[0].read_text() and time.time() < deadline and procs[0].poll() is None:
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)  # process 1 only
    t_signal = time.time()
    for p in procs:
        p.wait(timeout=120)
    exits = [time.time() - t_signal]
    texts = [log.read_text() for log in logs]
    out = "\n\n".join(t[-3000:] for t in texts)
    assert [p.returncode for p in procs] == [0, 0], (seed, at, out)
    saved = [int(t.split("SIGTERM: saved step ")[1].split()[0]) for t in texts]
    assert saved[0] == saved[1] and at <= saved[0] <= 12, (seed, at, out)
    assert all("preemption sync point" in t for t in texts), out
    assert checkpoint.latest_step(storage.path(work) / "checkpoints") == saved[0]
    print(f"SIGTERM to process 1 at step {at}: both saved step {saved[0]}, both exited {exits[0]:.1f} s after "
          f"the signal")

    procs, rerun = run_pair(_pair_args(data_dir, work), env(4))
    assert all(p.returncode == 0 for p in procs), "\n\n".join(log[-3000:] for log in rerun)
    assert f"resumed from {work}/checkpoints/{saved[0]}" in rerun[0]
    step, params = _params(work)
    assert step == 12 and params.keys() == pair_ref[1].keys()
    for k in params:
        np.testing.assert_array_equal(params[k], pair_ref[1][k], err_msg=k)
    assert _train_steps(work) == list(range(1, 13))


@pytest.mark.slow
def test_checkpoint_unreadable_on_one_host_is_skipped_by_both(data_dir, gcs_bucket, pair_ref):
    """Step 12 of a copy of the reference run cannot be read by process 1 (QWEN3_FAULT_UNREADABLE):
    process 0 reads it fine, yet both skip it, restore step 8 and train on to 14."""
    src, work = storage.path(pair_ref[0]), storage.path(gcs_bucket + "/w")
    for rel in storage.list_files(src):
        (work / rel).write_bytes((src / rel).read_bytes())
    e = {**env(4), UNREADABLE: "12:1"}
    procs, logs = run_pair(_pair_args(data_dir, work, steps=14), e)
    out = "\n\n".join(log[-3000:] for log in logs)
    assert all(p.returncode == 0 for p in procs), out
    assert "skipping checkpoint step 12" in logs[0] and "unreadable on process(es) 1" in logs[0], out
    assert "[fault] process 1: checkpoint step 12 unreadable" in logs[1], out
    for log in logs:
        assert f"resumed from {work}/checkpoints/8" in log, out
    assert {n.split("/")[0].split("-")[0] for n in storage.list_files(work / "skipped_checkpoints")} == {"12"}
    assert _params(work)[0] == 14
