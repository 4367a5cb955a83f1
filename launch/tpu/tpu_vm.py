"""TPU VM slices for qwen3-jax: create (queued resource), install, train, logs, delete.

  python launch/tpu/tpu_vm.py --name qwen3 --zone us-east5-a --project P --accelerator v5p-1024 create
  python launch/tpu/tpu_vm.py --name qwen3 ... install            # copy this checkout, pip install .[tpu]
  python launch/tpu/tpu_vm.py --name qwen3 ... train -- --gin stage1.gin --gin_param ...
  python launch/tpu/tpu_vm.py --name qwen3 ... logs | stop | delete
  add --num_slices N for multi-slice (nodes NAME-0 .. NAME-{N-1}), --dry-run to print the gcloud
  commands instead of running them.

`train` starts launch/train.py with the same arguments on every worker of every slice, detached,
each writing logs/train-<slice>-<worker>.log on its VM (`logs` tails them all). jax.distributed
finds its peers from the TPU VM environment; multi-slice runs get the MEGASCALE_* variables from
the queued resource. Checkpoints and data must live on storage every worker sees (a gs:// bucket).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REMOTE_DIR = "qwen3-jax"
RUNTIME = {"v4": "tpu-ubuntu2204-base", "v5p": "v2-alpha-tpuv5", "v5e": "v2-alpha-tpuv5-lite",
           "v5litepod": "v2-alpha-tpuv5-lite", "v6e": "v2-alpha-tpuv6e"}


class Gcloud:
    def __init__(self, args):
        self.args, self.dry = args, args.dry_run

    def __call__(self, *cmd: str, capture: bool = False) -> str:
        full = ["gcloud", *cmd, f"--project={self.args.project}", f"--zone={self.args.zone}"]
        if self.dry:
            print(shlex.join(full))
            return "ACTIVE" if capture else ""
        print("+", shlex.join(full), file=sys.stderr, flush=True)
        res = subprocess.run(full, check=True, text=True, stdout=subprocess.PIPE if capture else None)
        return res.stdout.strip() if capture else ""


def nodes(args) -> list[str]:
    return [args.name] if args.num_slices == 1 else [f"{args.name}-{i}" for i in range(args.num_slices)]


def ssh_all(g: Gcloud, args, command: str) -> None:
    for i, node in enumerate(nodes(args)):
        g("compute", "tpus", "tpu-vm", "ssh", node, "--worker=all", f"--command={command.replace('{SLICE}', str(i))}")


def create(g: Gcloud, args) -> None:
    gen = args.accelerator.split("-")[0]
    cmd = ["compute", "tpus", "queued-resources", "create", args.name,
           f"--accelerator-type={args.accelerator}", f"--runtime-version={args.runtime or RUNTIME.get(gen, '')}"]
    cmd += [f"--node-id={args.name}"] if args.num_slices == 1 else [f"--node-count={args.num_slices}",
                                                                     f"--node-prefix={args.name}"]
    cmd += ["--spot"] if args.spot else []
    g(*cmd)
    deadline = time.time() + args.wait_minutes * 60
    while True:
        state = g("compute", "tpus", "queued-resources", "describe", args.name, "--format=value(state.state)",
                  capture=True)
        if state == "ACTIVE":
            print(f"{args.name}: ACTIVE", file=sys.stderr)
            return
        if state in ("FAILED", "SUSPENDED") or time.time() > deadline:
            raise SystemExit(f"queued resource {args.name} is {state or 'unknown'}; see `gcloud compute tpus "
                             f"queued-resources describe {args.name}`")
        time.sleep(30)


def install(g: Gcloud, args) -> None:
    """Copies this checkout (without runs/ and .git) to every worker and installs it."""
    for node in nodes(args):
        g("compute", "tpus", "tpu-vm", "scp", "--recurse", "--worker=all", str(ROOT), f"{node}:~/{REMOTE_DIR}")
    ssh_all(g, args, f"cd ~/{REMOTE_DIR} && rm -rf .git runs && python3 -m pip install -q -U pip && "
                     f"python3 -m pip install -q -e '.[tpu]' && python3 -c 'import jax; print(jax.device_count())'")


def train(g: Gcloud, args) -> None:
    train_args = shlex.join(args.rest)
    ssh_all(g, args, f"cd ~/{REMOTE_DIR} && mkdir -p logs && "
                     f"nohup python3 launch/train.py {train_args} "
                     f"> logs/train-{{SLICE}}-$(hostname).log 2>&1 < /dev/null &")


def logs(g: Gcloud, args) -> None:
    ssh_all(g, args, f"tail -n {args.lines} ~/{REMOTE_DIR}/logs/train-*.log")


def stop(g: Gcloud, args) -> None:
    """SIGTERM: train.py saves a checkpoint and exits 0."""
    ssh_all(g, args, "pkill -TERM -f launch/train.py || true")


def delete(g: Gcloud, args) -> None:
    g("compute", "tpus", "queued-resources", "delete", args.name, "--force", "--quiet")


COMMANDS = {"create": create, "install": install, "train": train, "logs": logs, "stop": stop, "delete": delete}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="queued resource / node name")
    p.add_argument("--project", required=True)
    p.add_argument("--zone", required=True)
    p.add_argument("--accelerator", default="v5p-8", help="e.g. v5p-1024, v6e-256, v5e-256, v4-128")
    p.add_argument("--num_slices", type=int, default=1)
    p.add_argument("--runtime", default=None, help="TPU VM runtime version (default per generation)")
    p.add_argument("--spot", action="store_true")
    p.add_argument("--wait_minutes", type=float, default=120)
    p.add_argument("--lines", type=int, default=20)
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true", help="print gcloud commands only")
    p.add_argument("command", choices=sorted(COMMANDS))
    p.add_argument("rest", nargs=argparse.REMAINDER, help="for train: the arguments of launch/train.py")
    args = p.parse_args(argv)
    if args.rest and args.rest[0] == "--":
        args.rest = args.rest[1:]
    if args.command == "train" and not args.rest:
        p.error("train needs launch/train.py arguments, e.g. train -- --gin stage1.gin")
    COMMANDS[args.command](Gcloud(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
