"""to_global on a 4-device CPU mesh (subprocess: fake devices need XLA_FLAGS before jax starts) and gin configs."""
import os
import subprocess
import sys

import gin

from train_utils import xla_flags

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
    env = {**os.environ, "XLA_FLAGS": xla_flags(4), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": REPO}
    r = subprocess.run([sys.executable, "-c", SCRIPT, stdlib_data["docs"]], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_stage_files_read_their_mixtures(stdlib_data, tmp_path):
    """The stage files (the one home of the stage mixtures and buckets) build the data a training
    run reads from a DATA_ROOT of prepared folders: every mixture name, stage 3's length buckets
    scaled down by bindings as the demo does."""
    from qwen3_jax import configurables

    root = tmp_path / "data"
    root.mkdir()
    for name in ("web", "math", "multilingual", "reasoning"):
        os.symlink(stdlib_data["docs"], root / name)
    os.symlink(stdlib_data["code"], root / "code")
    small3 = ["SEQ_LEN=2048", "LONG_DOCS=(1024, 2048, 0.75)", "MEDIUM_DOCS=(256, 1024, 0.25)"]
    for stage, extra in (("stage1", ["SEQ_LEN=512"]), ("stage2", ["SEQ_LEN=512"]), ("stage3", small3)):
        configurables.parse_gin([f"{stage}.gin"], [f"DATA_ROOT='{root}'", *extra])
        _, tc = configurables.run_config()
        weights = configurables.query("stage_mixture.weights")
        it = tc.make_data(seq_len=tc.seq_len, global_batch_size=4, seed=0, process_index=0, process_count=1,
                          with_ids=True)
        b = next(it)
        assert b["tokens"].shape == (4, tc.seq_len) and (b["segment_ids"] > 0).mean() > 0.5
        assert {s.key.split("[")[0] for s in it.specs} == set(weights), stage
        if stage == "stage3":
            assert {s.length_range for s in it.specs} == {(1024, 2048), (256, 1024)}
        it.close()
    gin.clear_config()
