"""A maintenance notice that reaches one host: how long until every host has saved and exited.

Runs `launch/train.py --gin cpu_smoke.gin` as 2 processes x 4 fake CPU devices (jax.distributed
on localhost, the same command a TPU slice runs on each worker), waits until process 0 logs step
`--at`, sends SIGTERM to process 1 only, and records for each process the seconds from the signal
to its exit, its exit code and the step it saved. The run folder is local, or a bucket on a local
fake-gcs-server with `--bucket` (an emulator on localhost: no network latency). Each run's table
row is printed; the medians and spreads close the table.

    python benchmarks/bench_preemption.py --runs 3 [--bucket]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from train_utils import free_port  # noqa: E402


def _server():
    """A fake-gcs-server as the tests start it (tests/gcs_server.py) and one bucket: (GCS, URL)."""
    import gcs_server

    gcs = gcs_server.start()
    return gcs, gcs.bucket("bench")


def one_run(workdir: str, at: int, logdir: Path) -> dict:
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    logs = [logdir / f"p{i}.log" for i in range(2)]
    procs = [subprocess.Popen(
        [sys.executable, str(ROOT / "launch" / "train.py"), "--gin", "cpu_smoke.gin", "--workdir", workdir,
         "--gin_param", "STEPS=200", "--gin_param", "train.log_every=1", "--gin_param", "MeshConfig.ici_fsdp=8",
         "--gin_param", "make_dataset.data_shards=2", "--coordinator", f"127.0.0.1:{port}",
         "--num_processes", "2", "--process_id", str(i)],
        env=env, cwd=ROOT, stdout=open(logs[i], "w"), stderr=subprocess.STDOUT) for i in range(2)]
    while f"step {at}/" not in logs[0].read_text():
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a process ended before the signal:\n" + logs[0].read_text()[-2000:])
        time.sleep(0.05)
    t0 = time.time()
    procs[1].send_signal(signal.SIGTERM)
    exit_s = [None, None]
    while any(s is None for s in exit_s):
        for i, p in enumerate(procs):
            if exit_s[i] is None and p.poll() is not None:
                exit_s[i] = time.time() - t0
        if time.time() - t0 > 300:
            for p in procs:
                p.kill()
            raise RuntimeError("hung: still running 300 s after SIGTERM")
        time.sleep(0.02)
    saved = []
    for log in logs:
        text = log.read_text()
        saved.append(int(text.split("saved step ")[1].split()[0]) if "saved step " in text else None)
    return {"exit_s": exit_s, "codes": [p.returncode for p in procs], "saved": saved, "signal_at_step": at}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--at", type=int, default=10, help="signal process 1 once process 0 logs this step")
    p.add_argument("--bucket", action="store_true", help="run folder on a local fake-gcs-server bucket")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    gcs, bucket = _server() if args.bucket else (None, None)
    rows = []
    print("| run | where | signal at step | saved (p0, p1) | exit codes | p0 exit s | p1 exit s |")
    print("|---|---|---|---|---|---|---|")
    try:
        for r in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="bench-preempt-") as tmp:
                work = f"{bucket}/run{r}" if bucket else os.path.join(tmp, "run")
                row = one_run(work, args.at, Path(tmp))
            rows.append(row)
            print(f"| {r} | {'bucket' if bucket else 'local'} | {row['signal_at_step']} | {row['saved']} | "
                  f"{row['codes']} | {row['exit_s'][0]:.1f} | {row['exit_s'][1]:.1f} |", flush=True)
    finally:
        if gcs is not None:
            gcs.server.stop()
    last = [max(r["exit_s"]) for r in rows]
    agree = all(r["saved"][0] == r["saved"][1] and r["codes"] == [0, 0] for r in rows)
    print(f"\nlast exit after the signal: median {statistics.median(last):.1f} s (min {min(last):.1f}, "
          f"max {max(last):.1f}) over {len(rows)} runs; same saved step and exit 0 on both: {agree}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "bucket": bool(bucket)}, indent=1))
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
