"""Every stage file combines with every model file (and the slice files), and names real values."""

import re
from pathlib import Path

import gin
import pytest

from qwen3_jax import aot
from qwen3_jax.configurables import model_config, parse_gin, run_config

ROOT = Path(__file__).resolve().parents[1]

MODELS = sorted(p.stem for p in (ROOT / "configs" / "model").glob("*.gin"))
STAGES = ["stage1", "stage2", "stage3", "stage4", "cpu_smoke"]


@pytest.fixture(autouse=True)
def _clear():
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("model", MODELS)
def test_stage_and_model_files_combine(stage, model):
    parse_gin([f"{stage}.gin", f"model/{model}.gin"], [])
    cfg, tc = run_config()
    assert cfg.name == model
    for macro in ("STEPS", "SEQ_LEN", "BATCH_SIZE", "CHECKPOINT_EVERY", "WORKDIR"):
        assert gin.query_parameter(f"%{macro}") is not None
    assert cfg.rope_theta == (1e6 if stage in ("stage3", "stage4") else 1e4)
    if stage == "stage4":  # 128K: YaRN x4 over stage 3's 32K window (Qwen3's published extension)
        assert tc.seq_len == 131072 and cfg.rope_scaling.factor * cfg.rope_scaling.original_max_position_embeddings == 131072
    if stage == "stage3":
        assert gin.query_parameter("%SEQ_LEN") == 32768 == tc.seq_len
    assert cfg.attention_impl == "auto"  # every stage: splash on TPU, chunked on CPU beyond 256 tokens
    assert tc.steps == gin.query_parameter("%STEPS") and tc.optim.schedule.kind in ("wsd", "cosine")
    if model.startswith("qwen3-"):
        assert cfg.compute_dtype == "bfloat16" and cfg.remat == "auto"  # small-moe's CPU overrides are gone


@pytest.mark.parametrize("slice_file", sorted(p.name for p in (ROOT / "configs" / "slices").glob("*.gin")))
def test_slice_files_parse(slice_file):
    model = "qwen3-" + slice_file.split("qwen3-")[1].split("-v5p")[0]
    stage = next((s for s in ("stage3", "stage4") if s in slice_file), "stage1")
    parse_gin([f"{stage}.gin", f"model/{model}.gin", f"slices/{slice_file}"], [])
    assert model_config().name == model
    if stage == "stage4":  # 128K rows: at least 2M tokens a step, the sequence split over `context`
        assert gin.query_parameter("%BATCH_SIZE") * 131072 >= 2 ** 21 and run_config()[1].mesh.ici_context > 1
    else:
        assert gin.query_parameter("%BATCH_SIZE") >= 256
    # one data shard per host (v5p: 4 chips a host), each with a whole number of rows, so the
    # batches and the saved data position do not change when the run resumes on fewer hosts
    hosts = aot.parse_topology(re.search(r"v5p-\d+", slice_file).group(0))["chips"] // 4
    shards = gin.query_parameter("%DATA_SHARDS")
    assert shards == hosts and gin.query_parameter("%BATCH_SIZE") % shards == 0
