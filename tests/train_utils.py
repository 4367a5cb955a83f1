"""Running launch/train.py in a subprocess on the built-in corpus, for the training tests."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "launch" / "train.py")

# LLVM -O0 for every CPU program the suite compiles, in the test processes (conftest.py) and in the
# subprocesses they start: the suite's models are tiny, so compiling dominates (test_handoff: 64 s at
# the default -O2, 38 s at -O0). Only LLVM's code generation changes; XLA's HLO passes (fusion,
# SPMD partitioning, buffer assignment, memory analysis) are the ones users run.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a CPU process of the suite with `devices` fake devices."""
    return f"--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}"


def tiny_args(data_dir, workdir, *extra_params, gin=("cpu_smoke.gin", "model/tiny-moe.gin"), steps=12,
              seq_len=64, batch=4, every=4, async_ckpt=False):
    """launch/train.py arguments for a tiny run; `async_ckpt=True` keeps the default (async) checkpoints."""
    args = [TRAIN, "--workdir", str(workdir)]
    for g in gin:
        args += ["--gin", g]
    params = [f"STEPS={steps}", f"SEQ_LEN={seq_len}", f"BATCH_SIZE={batch}", f"CHECKPOINT_EVERY={every}",
              f"stage_mixture.builtin_dir='{data_dir}'", "stage_mixture.spm_vocab_size=512",
              "train.log_every=1", *([] if async_ckpt else ["train.async_checkpoint=False"]), *extra_params]
    for p in params:
        args += ["--gin_param", p]
    return args


def load_script(path: str | Path, name: str):
    """A launch/ or benchmarks/ script imported as a module (its main() and helpers, no subprocess)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def env(devices: int = 1, extra_env: dict | None = None):
    """The subprocess environment: CPU with `devices` devices; one-device runs share the session's
    persistent compilation cache (conftest.py), so a program compiled by one test's run is loaded,
    not recompiled, by the next (the executable is the same; nothing else changes)."""
    e = dict(os.environ)
    e["JAX_PLATFORMS"] = "cpu"
    e["XLA_FLAGS"] = xla_flags(devices)
    if devices == 1 and os.environ.get("QWEN3_TEST_COMPILE_CACHE"):
        e.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["QWEN3_TEST_COMPILE_CACHE"])
        e.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    e.update(extra_env or {})
    return e


def run(args, timeout=600, devices: int = 1, extra_env: dict | None = None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env=env(devices, extra_env), cwd=ROOT)


def popen(args, extra_env: dict | None = None):
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env(1, extra_env), cwd=ROOT)


def signal_at_step(args, step: int, sig, extra_env: dict | None = None) -> subprocess.Popen:
    """Starts a run (`popen(args, extra_env)`) and sends it `sig` once it logs `step {step}/`; the
    process is returned still running (its remaining output unread)."""
    p = popen(args, extra_env)
    for line in p.stdout:
        if line.startswith(f"step {step}/"):
            p.send_signal(sig)
            break
    return p


BIND_ERRORS = ("address already in use", "failed to add port", "failed to bind", "eaddrinuse")


def free_port():
    """A port that nothing listens on now, outside the kernel's ephemeral range (so an outgoing
    connection of another process, gloo's included, cannot take it between this check and the
    coordinator's bind; another test picking the same port is caught by `run_pair`'s retry)."""
    lo, hi = 32768, 60999
    try:
        lo, hi = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    except (OSError, ValueError):
        pass
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, lo) if lo > 11000 else rng.randrange(hi + 1, 65536)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port found")


def run_pair(make_args, env, timeout=600, tries=3):
    """Starts processes 0 and 1 with a fresh coordinator port (make_args(pid, port) -> argv); if the
    coordinator could not bind the port (taken between the check and the bind), retries on another
    port. Returns (processes, logs)."""
    for attempt in range(tries):
        port = free_port()
        procs = [subprocess.Popen(make_args(i, port), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for i in range(2)]
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
        failed = any(p.returncode for p in procs)
        if not (failed and any(e in log.lower() for log in logs for e in BIND_ERRORS)) or attempt == tries - 1:
            return procs, logs
