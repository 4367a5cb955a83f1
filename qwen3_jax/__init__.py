"""qwen3-jax: pretraining the Qwen3 family in JAX / Flax NNX.

The package's names (`get_config`, `create_model`, `load_hf`, ...) load on first use, so tools
that need only a light module (the data tools use `qwen3_jax.storage`) do not import jax.
"""

import glob
import importlib
import os
import sys


def _cpu_unless_accelerator() -> None:
    """On a machine with no accelerator device, tell JAX so before it starts: otherwise an installed
    libtpu (the AOT compiler, `[tpu]` / `[test]` extras) is probed at every start and prints
    INVALID_ARGUMENT lines about TPU hostnames. A JAX_PLATFORMS the user set is left alone, and a
    TPU VM (/dev/accel*, /dev/vfio) or an NVIDIA GPU (/dev/nvidia*) keeps JAX's own choice."""
    if "JAX_PLATFORMS" in os.environ:
        return
    if any(glob.glob(p) for p in ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*")):
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported before us (launch scripts do): its config has read the environment
        sys.modules["jax"].config.update("jax_platforms", "cpu")


_cpu_unless_accelerator()

_EXPORTS = {
    "PRESETS": "qwen3_jax.config", "ModelConfig": "qwen3_jax.config", "RopeScaling": "qwen3_jax.config",
    "get_config": "qwen3_jax.config", "Qwen3": "qwen3_jax.model", "abstract_model": "qwen3_jax.model",
    "create_model": "qwen3_jax.model", "load_hf": "qwen3_jax.hf", "save_hf": "qwen3_jax.hf",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qwen3_jax' has no attribute {name!r}")

