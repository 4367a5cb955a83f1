"""launch/tpu/tpu_vm.py against a fake `gcloud` on PATH (records its arguments)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "tpu" / "tpu_vm.py"
FAKE = """#!/bin/sh
echo "$@" >> "$FAKE_GCLOUD_LOG"
case "$*" in *describe*) echo ACTIVE;; esac
"""
BASE = ["--name", "q3", "--project", "proj", "--zone", "us-east5-a", "--accelerator", "v5p-1024"]


def _run(tmp_path, *args):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "gcloud").write_text(FAKE)
    (bin_dir / "gcloud").chmod(0o755)
    log = tmp_path / "calls.log"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_GCLOUD_LOG=str(log))
    r = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout, (log.read_text().splitlines() if log.exists() else [])


def test_dry_run_prints_and_calls_nothing(tmp_path):
    out, calls = _run(tmp_path, *BASE, "--dry-run", "create")
    assert calls == []
    assert "gcloud compute tpus queued-resources create q3 --accelerator-type=v5p-1024" in out
    assert "--runtime-version=v2-alpha-tpuv5 --node-id=q3" in out


def test_create_waits_for_active(tmp_path):
    _, calls = _run(tmp_path, *BASE, "create")
    assert calls[0].startswith("compute tpus queued-resources create q3")
    assert "describe q3" in calls[1] and len(calls) == 2


def test_train_runs_same_args_on_every_worker_of_every_slice(tmp_path):
    _, calls = _run(tmp_path, *BASE, "--num_slices", "2", "train", "--", "--gin", "stage1.gin",
                    "--gin_param", "STEPS=10")
    assert len(calls) == 2
    for i, call in enumerate(calls):
        assert call.startswith(f"compute tpus tpu-vm ssh q3-{i} --worker=all")
        assert "launch/train.py --gin stage1.gin --gin_param STEPS=10" in call
        assert f"logs/train-{i}-$(hostname).log" in call


def test_multislice_create_install_logs_delete(tmp_path):
    out, calls = _run(tmp_path, *BASE, "--num_slices", "2", "--dry-run", "create")
    assert "--node-count=2 --node-prefix=q3" in out
    _, calls = _run(tmp_path, *BASE, "--num_slices", "2", "install")
    assert [c.split()[3] for c in calls] == ["scp", "scp", "ssh", "ssh"]
    assert "pip install -q -e '.[tpu]'" in calls[-1]
    _, calls = _run(tmp_path, *BASE, "logs")
    assert "tail -n 20" in calls[-1]
    _, calls = _run(tmp_path, *BASE, "delete")
    assert calls[-1].startswith("compute tpus queued-resources delete q3 --force --quiet")
