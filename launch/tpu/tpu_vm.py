"""TPU VM slices for qwen3-jax: create (queued resource), install, train, logs, delete.

  python launch/tpu/tpu_vm.py --name qwen3 --zone us-east5-a --project P --accelerator v5p-1024 create
  python launch/tpu/tpu_vm.py --name qwen3 ... install            # copy this checkout, pip install .[tpu]
  python launch/tpu/tpu_vm.py --name qwen3 ... train -- --gin stage1.gin --gin_param ...
  python launch/tpu/tpu_vm.py --name qwen3 ... logs | stop | delete
  add --num_slices N for multi-slice (nodes NAME-0 .. NAME-{N-1}), --dry-run to print the gcloud
  commands instead of running them.

`install` copies the files git tracks in this checkout (as they are in the working tree, edits
included; `git add` a new file to ship it) to ~/qwen3-jax on every worker: no run folders, data
or virtual environments. `train` starts launch/train.py with the same arguments on every worker
of every slice, detached, each writing logs/train-<slice>-<worker>.log on its VM (`logs` tails them
all); it refuses to start a second one on a worker where one is running. jax.distributed finds its
peers from the TPU VM environment; multi-slice runs get the MEGASCALE_* variables from the queued
resource. The run folder (WORKDIR, PREVIOUS_STAGE) and the prepared data (DATA_ROOT) must be on a
bucket every worker reads and writes (gs://...); `train` warns when the gin files it is given
leave one of them on a local path. `stop` sends SIGTERM only (never SIGKILL): the hosts agree on
a step, save it and exit 0 (docs/tpu.md, "Preemption and restarts").
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REMOTE_DIR = "qwen3-jax"
TRAIN_PATTERN = "[l]aunch/train.py"  # the bracket keeps pkill/pgrep from matching the shell that runs them
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


def checkout_files() -> list[str]:
    """The files git tracks in this checkout that exist in the working tree (no runs/, data/, hf/,
    .venv: those are either ignored or untracked)."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached"], check=True,
                             capture_output=True).stdout.decode()
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"install copies the files git tracks; {ROOT} is not a git checkout ({e})") from None
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


def install(g: Gcloud, args) -> None:
    """Copies this checkout's tracked files to ~/qwen3-jax on every worker and installs it there."""
    files = checkout_files()
    with tempfile.TemporaryDirectory(prefix="qwen3-jax-install-") as tmp:
        tarball = os.path.join(tmp, f"{REMOTE_DIR}.tar.gz")
        if g.dry:
            print(f"# pack {len(files)} tracked files of {ROOT} into {tarball}")
        else:
            with tarfile.open(tarball, "w:gz") as tar:
                for f in files:
                    tar.add(ROOT / f, arcname=f)
        for node in nodes(args):
            g("compute", "tpus", "tpu-vm", "scp", "--worker=all", tarball, f"{node}:~/{REMOTE_DIR}.tar.gz")
    ssh_all(g, args, f"mkdir -p ~/{REMOTE_DIR} && tar -xzf ~/{REMOTE_DIR}.tar.gz -C ~/{REMOTE_DIR} && "
                     f"rm ~/{REMOTE_DIR}.tar.gz && cd ~/{REMOTE_DIR} && python3 -m pip install -q -U pip && "
                     f"python3 -m pip install -q -e '.[tpu]' && python3 -c 'import jax; print(jax.device_count())'")


def local_paths(train_args: list[str]) -> list[str]:
    """The run paths (WORKDIR, PREVIOUS_STAGE, DATA_ROOT) the given launch/train.py arguments leave
    on a worker's own disk, as 'NAME=value'; [] when none does or this checkout cannot tell (it
    resolves the gin files as train.py will, which needs qwen3_jax importable here)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--gin", action="append", default=[])
    p.add_argument("--gin_param", action="append", default=[])
    p.add_argument("--workdir", default=None)
    known, _ = p.parse_known_args(train_args)
    try:
        sys.path.insert(0, str(ROOT))
        from qwen3_jax import configurables  # optional: the other subcommands run without the library

        configurables.parse_gin(known.gin, known.gin_param)
        values = {"WORKDIR": known.workdir or configurables.query("%WORKDIR"),
                  "PREVIOUS_STAGE": configurables.query("%PREVIOUS_STAGE"),
                  "DATA_ROOT": configurables.query("%DATA_ROOT")}
    except Exception:  # noqa: BLE001 - not installed here, or a bad configuration train.py will name
        return []
    return [f"{k}={v!r}" for k, v in values.items()
            if isinstance(v, str) and "://" not in v and not v.startswith("builtin:")]


def train(g: Gcloud, args) -> None:
    local = local_paths(args.rest)
    if local:
        print(f"WARNING: {', '.join(local)} is a path on each worker's own disk: every host would see a "
              f"different folder (checkpoints, the lock, the data). Put it on a bucket, e.g. "
              f"--gin_param WORKDIR=\"'gs://BUCKET/runs/stage1'\" (docs/tpu.md)", file=sys.stderr, flush=True)
    train_args = shlex.join(args.rest)
    # pgrep/pkill -f also see the shell running this command (its text names train.py): skip it ($$).
    ssh_all(g, args, f"cd ~/{REMOTE_DIR} && mkdir -p logs && "
                     f"if pgrep -f '{TRAIN_PATTERN}' | grep -qvx \"$$\"; then "
                     f"echo \"$(hostname): launch/train.py is already running here; stop it first\" >&2; exit 1; fi; "
                     f"nohup python3 launch/train.py {train_args} "
                     f"> logs/train-{{SLICE}}-$(hostname).log 2>&1 < /dev/null &")


def logs(g: Gcloud, args) -> None:
    ssh_all(g, args, f"tail -n {args.lines} ~/{REMOTE_DIR}/logs/train-*.log")


def stop(g: Gcloud, args) -> None:
    """SIGTERM to launch/train.py on every worker: the hosts stop at the same step, save it and exit
    0. Only SIGTERM: a SIGKILL before the save is committed would lose the steps since the last
    checkpoint."""
    ssh_all(g, args, f"pkill -TERM -f '{TRAIN_PATTERN}' || true")


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
    try:
        COMMANDS[args.command](Gcloud(args), args)
    except subprocess.CalledProcessError as e:
        print(f"error: {shlex.join(e.cmd)} exited with {e.returncode}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
