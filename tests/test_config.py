import json
import subprocess
import sys
from pathlib import Path

import pytest

from qwen3_jax.config import ModelConfig, get_config
from qwen3_jax.params import count_params, param_specs

# Published totals (Qwen3 technical report / model cards), exact.
PUBLISHED = {
    "qwen3-0.6b": (596_049_920, None), "qwen3-1.7b": (1_720_574_976, None), "qwen3-4b": (4_022_468_096, None),
    "qwen3-8b": (8_190_735_360, None), "qwen3-14b": (14_768_307_200, None), "qwen3-32b": (32_762_123_264, None),
    "qwen3-30b-a3b": (30_532_122_624, 3_353_032_704), "qwen3-235b-a22b": (235_093_634_560, 22_190_763_520),
}
ROUNDED = {"qwen3-0.6b": "0.596", "qwen3-1.7b": "1.721", "qwen3-4b": "4.022", "qwen3-8b": "8.191",
           "qwen3-14b": "14.768", "qwen3-32b": "32.762", "qwen3-30b-a3b": "30.532", "qwen3-235b-a22b": "235.094"}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_counts_equal_published(name):
    counts = count_params(get_config(name))
    total, active = PUBLISHED[name]
    assert counts["total_params"] == total
    assert f"{total / 1e9:.3f}" == ROUNDED[name]
    assert counts["active_params"] == (active if active else total)


def test_model_info_cli_json():
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "launch/model_info.py"), "--model", "qwen3-235b-a22b", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["total_params"] == 235_093_634_560 and d["active_params"] == 22_190_763_520
    assert d["non_embedding_params"] == 235_093_634_560 - 2 * 151_936 * 4096


def test_every_parameter_has_logical_axes():
    for name in ("tiny-moe", "qwen3-235b-a22b"):
        for key, spec in param_specs(get_config(name)).items():
            assert len(spec.axes) == len(spec.shape), key
            if key.startswith("stacks/"):
                assert spec.axes[0] == "layers", key


def test_layer_runs_follow_sparse_step_and_mlp_only_layers():
    cfg = get_config("tiny-moe", num_layers=6, decoder_sparse_step=2, mlp_only_layers=(3,))
    assert [cfg.is_moe_layer(i) for i in range(6)] == [False, True, False, False, False, True]
    assert cfg.layer_runs() == [(False, 0, 1), (True, 1, 1), (False, 2, 3), (True, 5, 1)]


@pytest.mark.parametrize("bad,msg", [
    (dict(num_heads=6, num_kv_heads=4), "num_heads=6 is not a multiple of num_kv_heads=4"),
    (dict(attention_impl="flash"), "attention_impl='flash'"),
    (dict(num_experts=4, num_experts_per_tok=5, moe_ffn_dim=8), "num_experts_per_tok=5"),
    (dict(mlp_only_layers=(7,)), r"mlp_only_layers has indices outside"),
])
def test_bad_config_values(bad, msg):
    with pytest.raises(ValueError, match=msg):
        get_config("tiny-dense", **bad)


def test_config_dict_round_trip():
    cfg = get_config("qwen3-30b-a3b", mlp_only_layers=(0, 5))
    assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg
