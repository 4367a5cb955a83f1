"""Train a Qwen3 model: `python launch/train.py --gin stage1.gin [--gin FILE ...] [--gin_param K=V ...]`.

A gin file name without a directory is looked up in configs/. Later files and --gin_param
override earlier ones. Rerunning the same command resumes from the workdir's latest checkpoint;
SIGTERM saves a checkpoint and exits 0.

On a TPU VM slice run it on every worker (launch/tpu/); `--coordinator` / `--num_processes` /
`--process_id` start jax.distributed explicitly (CPU clusters); on TPU VMs it is discovered.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def resolve_gin_file(name: str) -> str:
    p = Path(name)
    if p.exists():
        return str(p)
    for cand in (CONFIGS / name, CONFIGS / f"{name}.gin"):
        if cand.exists():
            return str(cand)
    raise FileNotFoundError(f"gin file {name!r} not found (looked in . and {CONFIGS})")


def parse_gin(files: list[str], bindings: list[str]) -> None:
    import gin

    import qwen3_jax.train.data  # noqa: F401  (registers configurables)
    import qwen3_jax.train.loop  # noqa: F401
    import data_pipeline.pipeline  # noqa: F401

    import logging

    gin.add_config_file_search_path(str(CONFIGS))
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)  # gin logs every include it first tries relative to the cwd
    try:
        gin.parse_config_files_and_bindings([resolve_gin_file(f) for f in files], bindings, finalize_config=True)
    finally:
        root.setLevel(level)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gin", action="append", default=[], help="gin file (repeatable; later ones win)")
    p.add_argument("--gin_param", action="append", default=[], help="gin binding NAME=VALUE (repeatable)")
    p.add_argument("--workdir", default=None, help="run folder (default: the gin macro WORKDIR)")
    p.add_argument("--coordinator", default=None, help="host:port of process 0 for jax.distributed")
    p.add_argument("--num_processes", type=int, default=None)
    p.add_argument("--process_id", type=int, default=None)
    args = p.parse_args(argv)
    if not args.gin:
        p.error("at least one --gin file is needed, e.g. --gin stage1.gin")

    import jax

    if args.coordinator:
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
        jax.distributed.initialize(args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
    elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()

    import gin

    from qwen3_jax.train.loop import TrainingError, train

    try:
        parse_gin(args.gin, args.gin_param)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, KeyError, TypeError, SyntaxError) as e:
        msg = str(e).strip().splitlines()
        print("error: bad gin configuration: " + " ".join(msg[:3]), file=sys.stderr)
        return 2
    workdir = args.workdir or gin.query_parameter("%WORKDIR")
    try:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0:
            (Path(workdir) / "config.gin").write_text(gin.config_str())
        summary = train(workdir)
        if jax.process_index() == 0:
            (Path(workdir) / "operative_config.gin").write_text(gin.operative_config_str())
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"done: step {summary['step']}, workdir {workdir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
