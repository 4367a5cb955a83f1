"""to_global on a 4-device CPU mesh (subprocess: fake devices need XLA_FLAGS before jax starts) and gin configs."""
import os
import subprocess
import sys

import gin
import numpy as np

from data_pipeline.pipeline import make_dataset

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

SCRIPT = r"""
import sys, numpy as np, jax
from jax.sharding import PartitionSpec as P
from data_pipeline.pipeline import make_dataset, to_global
assert jax.device_count() == 4
mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
it = make_dataset(sys.argv[1], seq_len=128, global_batch_size=4, with_ids=True)  # jax.process_* defaults
b = next(it)
g = to_global(b, mesh, P("data", None))
for k, v in b.items():
    assert g[k].shape == v.shape and g[k].dtype == v.dtype, k
    np.testing.assert_array_equal(np.asarray(g[k]), v)
assert g["tokens"].sharding.spec == P("data", None)
assert len(g["tokens"].addressable_shards) == 4 and g["tokens"].addressable_shards[0].data.shape == (2, 128)
print("ok")
"""


def test_to_global_on_mesh(stdlib_data):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": REPO}
    r = subprocess.run([sys.executable, "-c", SCRIPT, stdlib_data["docs"]], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_gin_configs(stdlib_data):
    root = os.path.dirname(stdlib_data["code"])
    for stage in ("stage1", "stage2", "stage3"):
        gin.clear_config()
        gin.parse_config_file(os.path.join(REPO, "configs", "data", f"{stage}.gin"))
        assert "make_dataset.seq_len" in gin.config_str()
    for name in ("cpu_demo", "cpu_demo_stage3"):
        gin.clear_config()
        gin.parse_config_files_and_bindings([os.path.join(REPO, "configs", "data", f"{name}.gin")],
                                            [f"Mixture.root = '{root}'", "make_dataset.global_batch_size = 4"])
        it = make_dataset(process_index=0, process_count=1, with_ids=True)
        b = next(it)
        assert b["tokens"].shape == (4, it.seq_len) and {s.key.split("[")[0] for s in it.specs} == {"code", "docs"}
        assert (b["segment_ids"] > 0).mean() > 0.5
        if name == "cpu_demo_stage3":
            assert all(s.length_range in ((1024, 2048), (256, 1024)) for s in it.specs)
    gin.clear_config()
