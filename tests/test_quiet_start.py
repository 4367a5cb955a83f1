"""A CPU machine with libtpu installed (the [test] extra pulls it for AOT compiles) starts our code
without libtpu's probe for TPU hostnames printing errors: qwen3_jax tells JAX it is a CPU machine
when there is no accelerator device (issue 29), and a JAX_PLATFORMS the user set wins."""

import importlib.util
import os
import subprocess
import sys

from train_utils import ROOT

PROBE = "import qwen3_jax.model, jax; print(jax.devices()[0].platform)"


def _run(extra_env: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    return subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env={**env, **extra_env}, capture_output=True,
                          text=True, timeout=300)


def test_cpu_start_prints_no_tpu_probe_errors():
    assert importlib.util.find_spec("libtpu") is not None, "the [test] extra installs libtpu: this test needs it"
    r = _run({})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "cpu"
    assert "E0000" not in r.stderr and "libtpu" not in r.stderr and "TPU_WORKER_HOSTNAMES" not in r.stderr, r.stderr


def test_jax_imported_first_still_stays_on_cpu():
    """Launch scripts import jax before qwen3_jax: its config has already read the environment."""
    probe = "import jax; import qwen3_jax; from jax._src import config; print(config.jax_platforms.value)"
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "cpu", (r.stdout, r.stderr[-500:])


def test_jax_platforms_set_by_the_user_is_kept():
    r = _run({"JAX_PLATFORMS": "cpu,tpu"})  # asks for the probe: its noise (or failure) is the user's choice
    assert "TPU" in r.stderr or "tpu" in r.stderr or r.returncode != 0, (r.returncode, r.stderr[-500:])
