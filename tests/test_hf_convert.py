"""Import/export through the checkpoint layout, the fused expert layout, and bad input."""

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import qwen3_jax

from qwen3_jax.errors import HFConversionError
from qwen3_jax import hf
from hf_utils import hf_config, hf_logits, random_hf_model, rel_err

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "launch" / "convert_hf.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def read_all(folder: Path) -> dict:
    out = {}
    for f in folder.glob("*.safetensors"):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "moe"
    model = random_hf_model(hf_config(num_experts=4, norm_topk_prob=True, decoder_sparse_step=2, num_hidden_layers=4))
    model.save_pretrained(path)
    return path, model


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_import_export_is_bit_exact(moe_folder, tmp_path, dtype):
    src, _ = moe_folder
    if dtype == "bfloat16":  # the hub's dtype: fp32 master copy in between, bf16 again on the way out
        b = tmp_path / "bf16"
        b.mkdir()
        save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in read_all(src).items()}, str(b / "model.safetensors"))
        (b / "config.json").write_text((src / "config.json").read_text())
        src = b
    r = run_cli("import", "--hf", src, "--out", tmp_path / "ckpt")
    assert r.returncode == 0, r.stderr
    r = run_cli("export", "--checkpoint", tmp_path / "ckpt", "--out", tmp_path / "out", "--max-shard-gib", 1e-5)
    assert r.returncode == 0, r.stderr
    a, b = read_all(src), read_all(tmp_path / "out")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype == np.dtype(dtype if dtype == "float32" else ml_dtypes.bfloat16), k
        assert np.array_equal(a[k], b[k]), k
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # the tiny shard limit forced several shards
    assert set(index["weight_map"]) == set(a)


def test_transformers_loads_export_with_same_logits(moe_folder, tmp_path):
    src, ref_model = moe_folder
    from transformers import AutoModelForCausalLM
    import torch

    ours = qwen3_jax.load_hf(src)
    qwen3_jax.save_hf(ours, tmp_path / "exported")
    cfg = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"] and cfg["num_local_experts"] == 4
    assert "rope_parameters" in cfg
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.float32)
    ids = np.random.RandomState(4).randint(0, 97, (2, 9)).astype(np.int32)
    ref = hf_logits(ref_model, ids)
    assert np.array_equal(hf_logits(reloaded, ids), ref)
    assert rel_err(ours(jnp.asarray(ids)), ref) <= 1e-4


def test_import_accepts_fused_experts_and_legacy_keys(moe_folder, tmp_path):
    src, ref_model = moe_folder
    ours = qwen3_jax.load_hf(src)
    from qwen3_jax.params import flat_params

    flat = {k: np.asarray(v) for k, v in flat_params(ours).items()}
    fused = {e.hf: np.ascontiguousarray(hf.to_hf(e, [flat[n][e.index] for n in e.ours.split(",")]))
             for e in hf.tensor_map(ours.cfg, fused_experts=True)}
    assert any(k.endswith("experts.gate_up_proj") for k in fused)
    out = tmp_path / "fused"
    out.mkdir()
    save_file(fused, str(out / "model.safetensors"))
    legacy = json.loads((src / "config.json").read_text())
    legacy["num_experts"] = legacy.pop("num_local_experts")
    legacy["rope_theta"] = legacy.pop("rope_parameters")["rope_theta"]
    (out / "config.json").write_text(json.dumps(legacy))
    again = qwen3_jax.load_hf(out)
    ids = np.random.RandomState(5).randint(0, 97, (1, 12)).astype(np.int32)
    assert np.array_equal(np.asarray(again(jnp.asarray(ids))), np.asarray(ours(jnp.asarray(ids))))


def test_yarn_config_round_trips():
    cfg = qwen3_jax.get_config("tiny-dense", rope_scaling=qwen3_jax.RopeScaling(factor=4.0,
                                                                                 original_max_position_embeddings=64))
    d = hf.to_hf_config(cfg)
    assert d["rope_parameters"]["rope_type"] == "yarn"
    back = hf.from_hf_config(d, name=cfg.name, param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype)
    assert back.rope_scaling == cfg.rope_scaling and back.rope_theta == cfg.rope_theta
    legacy = dict(d, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
                  rope_theta=cfg.rope_theta)
    del legacy["rope_parameters"]
    assert hf.from_hf_config(legacy).rope_scaling.factor == 4.0


# -- bad input ------------------------------------------------------------------------------------

def _copy(src: Path, dst: Path, drop=None, reshape=None, config=None):
    dst.mkdir()
    tensors = read_all(src)
    if drop:
        del tensors[drop]
    if reshape:
        tensors[reshape] = tensors[reshape][:-1]
    save_file(tensors, str(dst / "model.safetensors"))
    d = json.loads((src / "config.json").read_text())
    d.update(config or {})
    (dst / "config.json").write_text(json.dumps(d))
    return dst


def test_missing_tensor_is_named(moe_folder, tmp_path):
    bad = _copy(moe_folder[0], tmp_path / "bad", drop="model.layers.1.mlp.experts.3.up_proj.weight")
    with pytest.raises(HFConversionError, match=r"missing tensor.*layers\.1\.mlp\.experts\.3\.up_proj"):
        qwen3_jax.load_hf(bad)


def test_wrong_shape_names_tensor_and_both_shapes(moe_folder, tmp_path):
    bad = _copy(moe_folder[0], tmp_path / "bad", reshape="model.layers.0.self_attn.k_proj.weight")
    with pytest.raises(HFConversionError, match=r"k_proj\.weight has shape \(15, 32\), expected \(16, 32\)"):
        qwen3_jax.load_hf(bad)


@pytest.mark.parametrize("change,message", [
    ({"model_type": "llama"}, r"model_type='llama' is not supported"),
    ({"use_sliding_window": True, "sliding_window": 128}, r"use_sliding_window=true is not supported"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, r"rope type 'dynamic'"),
    ({"num_attention_heads": 3}, r"num_heads=3 is not a multiple of num_kv_heads=2"),
])
def test_bad_config_values_are_named(moe_folder, tmp_path, change, message):
    bad = _copy(moe_folder[0], tmp_path / "bad", config=change)
    with pytest.raises(HFConversionError, match=message):
        qwen3_jax.load_hf(bad)


def test_cli_refuses_existing_target_and_reports_errors(moe_folder, tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    r = run_cli("import", "--hf", moe_folder[0], "--out", target)
    assert r.returncode == 2 and "exists and is not empty" in r.stderr and "Traceback" not in r.stderr
    assert (target / "keep.txt").read_text() == "precious"
    r = run_cli("import", "--hf", tmp_path / "nowhere", "--out", tmp_path / "x")
    assert r.returncode == 2 and "config.json" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()
    r = run_cli("export", "--checkpoint", tmp_path / "nowhere", "--out", tmp_path / "y")
    assert r.returncode == 2 and "does not exist" in r.stderr
