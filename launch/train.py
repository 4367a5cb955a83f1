"""Train a Qwen3 model: `python launch/train.py --gin stage1.gin [--gin FILE ...] [--gin_param K=V ...]`.

A gin file name without a directory is looked up in configs/. Later files and --gin_param
override earlier ones. Rerunning the same command resumes from the workdir's newest readable
checkpoint. One run per workdir (train.lock names the holder).

Exit codes: 0 done (or SIGTERM: checkpoint saved, preempted); 1 the run stopped or is incomplete
(too many skipped steps, a checkpoint that could not be saved, data errors); 2 bad configuration;
130 interrupted by SIGINT/Ctrl-C (a checkpoint is saved first; Ctrl-C twice stops without saving).

On a TPU VM slice run it on every worker (launch/tpu/); `--coordinator` / `--num_processes` /
`--process_id` start jax.distributed explicitly (CPU clusters); on TPU VMs it is discovered.
"""

from __future__ import annotations

import argparse
import os
import sys

import gin
import jax

from qwen3_jax import configurables, storage
from qwen3_jax.errors import TrainingError
from qwen3_jax.train.loop import train
from qwen3_jax.train.workdir_lock import WorkdirLock


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    configurables.add_gin_flags(p)
    p.add_argument("--workdir", default=None, help="run folder (default: the gin macro WORKDIR)")
    p.add_argument("--coordinator", default=None, help="host:port of process 0 for jax.distributed")
    p.add_argument("--num_processes", type=int, default=None)
    p.add_argument("--process_id", type=int, default=None)
    args = p.parse_args(argv)
    if not args.gin:
        p.error("at least one --gin file is needed, e.g. --gin stage1.gin")

    if args.coordinator:
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
        jax.distributed.initialize(args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
    elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()

    try:
        model, tc = configurables.read_run(args.gin, args.gin_param)
    except TrainingError as e:
        print(f"error: bad configuration: {e}", file=sys.stderr)
        return 2
    workdir = args.workdir or configurables.query("%WORKDIR")
    primary = jax.process_index() == 0
    try:
        with WorkdirLock(workdir, enabled=primary):  # before anything is written into the workdir
            if primary:
                storage.write_text(storage.path(workdir) / "config.gin", gin.config_str())
            summary = train(workdir, model, tc)
            if primary:
                storage.write_text(storage.path(workdir) / "operative_config.gin", gin.operative_config_str())
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"error: interrupted (SIGINT twice): stopped without saving; rerun to resume from the last "
              f"checkpoint in {workdir}", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if summary.get("interrupted") == "SIGINT":
        print(f"interrupted: step {summary['step']} saved, workdir {workdir} (exit 130)", flush=True)
        return 130
    print(f"done: step {summary['step']}, workdir {workdir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
