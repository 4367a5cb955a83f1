"""Checkpoint save and restore time: a local folder vs `gs://`, with sync and async checkpointing.

    JAX_PLATFORMS=cpu python benchmarks/bench_checkpoint_storage.py [--runs 5]
    python benchmarks/bench_checkpoint_storage.py --from_json   # print the saved report

The checkpoint is the `cpu_smoke.gin` run's (small MoE; parameters, optimizer state, counters,
spike guard, data position, model config, meta), written and read by the code training uses:
`qwen3_jax.train.run_checkpoints.RunCheckpoints` (`save`, `wait`, `restore_latest`) with the
run's `train.keep_last`, on the train state from `qwen3_jax.train.build` after one training step
(a fresh state's zero optimizer moments would compress to almost nothing) and the data position
of `train.make_data`'s iterator after that batch, as the training loop passes them.

Cases: {local, gs} x {sync, async}, each with its own run folder and manager; one untimed warm-up
save + restore per case, then `--runs` rounds, each round timing every case once (interleaved,
the order rotating from round to round; the machine may be shared). Per case and round:
  save   the time `save()` blocks the caller (async: until the arrays are copied off the device);
  commit `save()` + `wait()`: until the step is committed (local: the temporary folder renamed;
         gs: `commit_success.txt` written last);
  restore `restore_latest()` as a resume does it (list steps, check the newest, read the model
         config, read every item onto the train state's shardings), arrays ready.
From the third timed round on, a save also deletes the oldest step (keep_last 3), as a long run's
saves do: part of `commit` (inside `save` when sync); on gs:// one request per object.
Printed: min / median / max seconds, the last step's size and file count (orbax's OCDBT data files
vary in number with write timing, not with the storage), and gs/local ratios of the
medians (in brackets: the widest spread, min gs / max local .. max gs / min local).

The gs:// numbers are fake-gcs-server (the emulator tests/gcs_server.py runs) on localhost: no
network latency or bandwidth limit, so they measure our and orbax's overhead on the object-store
code path (HTTP requests per object, a commit file instead of a rename), not real GCS. Local reads
come from the page cache. Orbax's "Waiting for previous save to complete took N seconds" warning
counts our explicit `wait()` (the previous case's commit), not a stall of `save()`.
Results: benchmarks/storage_reports/checkpoint_storage.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REPORT = ROOT / "benchmarks" / "storage_reports" / "checkpoint_storage.json"
CASES = ("local-sync", "local-async", "gs-sync", "gs-async")
METRICS = ("save", "commit", "restore")
MIB = 1024 ** 2


def start_emulator():
    """fake-gcs-server as the tests start it (tests/gcs_server.py); returns (GCS, gs:// URL of a
    new bucket). Before qwen3_jax.storage is imported."""
    sys.path.insert(0, str(ROOT / "tests"))
    import gcs_server
    sys.path.remove(str(ROOT / "tests"))

    gcs = gcs_server.start()
    return gcs, gcs.bucket("bench")


def cpu_model() -> str:
    """platform.processor() is empty on most Linux machines: the model name from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def setup():
    """(model, tc, program, state, data position, iterator) of the cpu_smoke run after one training
    step, as the loop has them at a save (after a step the optimizer's moments are no longer zeros,
    which compress to almost nothing)."""
    import jax

    from qwen3_jax import configurables
    from qwen3_jax.train.build import build
    from qwen3_jax.train.loop import _global_batch
    from qwen3_jax.train.prefetch import DataPosition

    configurables.parse_gin(["cpu_smoke.gin"], [])
    model, tc = configurables.run_config()
    program = build(model, tc)
    state = program.init_state(None)
    data_it = tc.make_data(seq_len=tc.data_seq_len, global_batch_size=tc.batch_size, seed=tc.seed)
    step_fn = program.compiled or (program.lowered or program.lower()).compile()
    state, _ = step_fn(state, _global_batch(next(data_it), program))
    jax.block_until_ready(state)
    return program.model, tc, program, state, DataPosition(data_it, data_it.get_state()), data_it


def timed_round(ck, step: int, state, pos, model, meta: dict, program, tc, check) -> dict:
    import jax

    t0 = time.perf_counter()
    ck.save(step, state, pos, model, meta)
    t1 = time.perf_counter()
    ck.wait()
    t2 = time.perf_counter()
    if ck.failures:
        raise RuntimeError(f"save failed: {ck.failures}")
    found = ck.restore_latest(program.abstract_state, tc.spike_window, check)
    jax.block_until_ready(found[1])
    t3 = time.perf_counter()
    if found[0] != step:
        raise RuntimeError(f"restored step {found[0]}, saved {step}")
    return {"save": t1 - t0, "commit": t2 - t0, "restore": t3 - t2}


def step_size(step_dir) -> tuple[float, int]:
    """(MiB, files) of one committed step; the size from a local folder, the count from any."""
    from qwen3_jax import storage

    files = storage.list_files(step_dir)
    if storage.is_remote(step_dir):
        return None, len(files)
    return sum(os.path.getsize(os.path.join(step_dir, f)) for f in files) / MIB, len(files)


def measure(runs: int, work: str) -> dict:
    gcs, bucket = start_emulator()
    try:
        from qwen3_jax import storage
        from qwen3_jax.train.loop import _check_same_architecture
        from qwen3_jax.train.run_checkpoints import RunCheckpoints

        t = time.perf_counter()
        model, tc, program, state, pos, data_it = setup()
        print(f"cpu_smoke state built and stepped once in {time.perf_counter() - t:.0f} s", flush=True)
        check = lambda prev, where: _check_same_architecture(prev, model, where)  # noqa: E731
        meta = {"seq_len": tc.seq_len, "batch_size": tc.batch_size, "model": model.name, "step_program": "bench"}
        roots = {c: storage.path(f"{work if c.startswith('local') else bucket}/{c}/checkpoints") for c in CASES}
        ckpts = {c: RunCheckpoints(roots[c], keep_last=tc.keep_last, keep_every=tc.keep_every,
                                   enable_async=c.endswith("async")) for c in CASES}
        for c in CASES:  # warm-up: orbax's first save and restore per manager, not timed
            timed_round(ckpts[c], 1, state, pos, model, meta, program, tc, check)
        times = {c: {m: [] for m in METRICS} for c in CASES}
        for r in range(runs):
            order = CASES[r % len(CASES):] + CASES[:r % len(CASES)]
            for c in order:
                one = timed_round(ckpts[c], r + 2, state, pos, model, meta, program, tc, check)
                for m in METRICS:
                    times[c][m].append(one[m])
            print(f"round {r + 1}/{runs}: " + "  ".join(
                f"{c} {times[c]['commit'][-1]:.2f}/{times[c]['restore'][-1]:.2f} s" for c in CASES), flush=True)
        sizes = {c: step_size(roots[c] / str(runs + 1)) for c in CASES}
        for ck in ckpts.values():
            ck.close()
        data_it.close()
    finally:
        gcs.server.stop()
    import jax

    local_mib = sizes["local-sync"][0]
    return {"model": model.name, "gin": "cpu_smoke.gin", "runs": runs, "keep_last": tc.keep_last,
            "state_mib": sum(x.nbytes for x in jax.tree.leaves(state)) / MIB,
            "machine": {"processor": platform.processor(), "cpu_model": cpu_model(), "machine": platform.machine(),
                        "cpus": os.cpu_count(), "jax_backend": jax.default_backend(),
                        "date": datetime.date.today().isoformat()},
            "note": "gs: fake-gcs-server on localhost (no network latency/bandwidth), not real GCS",
            "cases": {c: {"seconds": times[c], "size_mib": sizes[c][0] or local_mib, "files": sizes[c][1]}
                      for c in CASES}}


def table(rep: dict) -> str:
    m = rep["machine"]
    lines = [f"{rep['model']} ({rep['gin']}), train state {rep['state_mib']:.1f} MiB, {rep['runs']} runs, "
             f"keep_last {rep['keep_last']}; {m['processor'] or m.get('cpu_model') or m['machine']}, {m['cpus']} CPUs, "
             f"{m['jax_backend']}, {m['date']}",
             "gs:// = fake-gcs-server on localhost (no network): our overhead on the object-store path, not GCS",
             "",
             f"{'case':<12} {'save s (min/med/max)':>22} {'commit s (min/med/max)':>24} "
             f"{'restore s (min/med/max)':>25} {'MiB':>6} {'files':>6}"]
    for c in CASES:
        d = rep["cases"][c]
        cols = [" / ".join(f"{v:.2f}" for v in (min(s), statistics.median(s), max(s)))
                for s in (d["seconds"][k] for k in METRICS)]
        lines.append(f"{c:<12} {cols[0]:>22} {cols[1]:>24} {cols[2]:>25} {d['size_mib']:6.1f} {d['files']:6d}")
    lines.append("")
    for mode in ("sync", "async"):
        gs, loc = rep["cases"][f"gs-{mode}"]["seconds"], rep["cases"][f"local-{mode}"]["seconds"]
        parts = []
        for k in METRICS:
            ratio = statistics.median(gs[k]) / statistics.median(loc[k])
            parts.append(f"{k} {ratio:4.1f}x ({min(gs[k]) / max(loc[k]):.1f}-{max(gs[k]) / min(loc[k]):.1f})")
        lines.append(f"gs/local {mode:<5}: " + "   ".join(parts))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="timed rounds (each times every case once)")
    p.add_argument("--from_json", action="store_true", help=f"print the saved report ({REPORT.relative_to(ROOT)})")
    p.add_argument("--work", default=None, help="local scratch folder (default: a temporary one, removed)")
    p.add_argument("--out", default=str(REPORT), help="where the JSON report goes")
    args = p.parse_args(argv)
    if args.from_json:
        print(table(json.loads(REPORT.read_text())))
        return 0
    work = args.work or tempfile.mkdtemp(prefix="bench_ckpt_")
    try:
        rep = measure(args.runs, os.path.abspath(work))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    rep["command"] = " ".join(["python", "benchmarks/bench_checkpoint_storage.py", *(argv or sys.argv[1:])])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rep, indent=1))
    print(table(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
