"""YaRN rotary scaling against transformers: inverse frequencies, attention factor, cos/sin, logits."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

from qwen3_jax import ModelConfig, RopeScaling  # noqa: E402
from qwen3_jax.model.layers import rope_cos_sin, rope_inv_freq  # noqa: E402

# (head_dim, rope_theta, yarn parameters as transformers' rope_parameters)
CASES = {
    "qwen3_factor4_32k": (128, 1_000_000.0, dict(factor=4.0, original_max_position_embeddings=32768)),
    "no_truncate": (128, 1_000_000.0, dict(factor=4.0, original_max_position_embeddings=32768, truncate=False)),
    "attention_factor": (128, 1_000_000.0, dict(factor=4.0, original_max_position_embeddings=32768,
                                                attention_factor=1.5)),
    "mscale": (64, 10_000.0, dict(factor=40.0, original_max_position_embeddings=4096, mscale=1.0,
                                  mscale_all_dim=0.707)),
    "only_mscale": (64, 10_000.0, dict(factor=8.0, original_max_position_embeddings=4096, mscale=0.9)),
    "betas": (64, 500_000.0, dict(factor=16.0, original_max_position_embeddings=8192, beta_fast=16.0,
                                  beta_slow=2.0, truncate=False)),
    "tiny_window": (16, 10_000.0, dict(factor=4.0, original_max_position_embeddings=64)),
}


def _hf_config(head_dim, theta, yarn):
    return transformers.Qwen3Config(
        hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
        max_position_embeddings=int(yarn["original_max_position_embeddings"] * max(yarn["factor"], 1)),
        rope_parameters={"rope_type": "yarn", "rope_theta": theta, **yarn})


def _our_config(head_dim, theta, yarn):
    return ModelConfig(head_dim=head_dim, num_heads=4, num_kv_heads=2, d_model=4 * head_dim,
                       rope_theta=theta, rope_scaling=RopeScaling(**yarn))


@pytest.mark.parametrize("case", CASES)
def test_inv_freq_and_attention_factor_match_transformers(case):
    head_dim, theta, yarn = CASES[case]
    hf_inv_freq, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](_hf_config(head_dim, theta, yarn), "cpu")
    inv_freq, factor = rope_inv_freq(_our_config(head_dim, theta, yarn))
    assert inv_freq.shape == (head_dim // 2,) and inv_freq.dtype == np.float32
    np.testing.assert_allclose(inv_freq, hf_inv_freq.numpy(), rtol=2.5e-7, atol=0)  # <= 2 ulp
    assert factor == pytest.approx(float(hf_factor), rel=1e-12)


def test_yarn_differs_from_plain_rope():
    """The comparison above is not vacuous: YaRN moves the low frequencies and scales cos/sin."""
    head_dim, theta, yarn = CASES["qwen3_factor4_32k"]
    plain, one = rope_inv_freq(ModelConfig(head_dim=head_dim, rope_theta=theta))
    scaled, factor = rope_inv_freq(_our_config(head_dim, theta, yarn))
    assert one == 1.0 and factor == pytest.approx(0.1 * np.log(4.0) + 1.0)
    np.testing.assert_allclose(scaled[:8], plain[:8], rtol=1e-6)  # fast rotations: extrapolated
    np.testing.assert_allclose(scaled[-4:], plain[-4:] / 4.0, rtol=1e-6)  # slow ones: interpolated
    assert ((scaled <= plain * (1 + 1e-6)) & (scaled >= plain / 4.0 * (1 - 1e-6))).all()


@pytest.mark.parametrize("case", ["qwen3_factor4_32k", "mscale", "tiny_window"])
def test_cos_sin_beyond_original_window_match_transformers(case):
    head_dim, theta, yarn = CASES[case]
    hf_cfg = _hf_config(head_dim, theta, yarn)
    rotary = transformers.models.qwen3.modeling_qwen3.Qwen3RotaryEmbedding(hf_cfg)
    orig = yarn["original_max_position_embeddings"]
    positions = np.array([[0, 1, 7, orig // 2, orig - 1, orig, 2 * orig + 3, 4 * orig - 1]], np.int64)
    x = torch.zeros(1, positions.shape[1], head_dim)
    hf_cos, hf_sin = rotary(x, torch.from_numpy(positions))
    cos, sin = rope_cos_sin(jnp.asarray(positions, jnp.int32), _our_config(head_dim, theta, yarn))
    half = head_dim // 2
    # fp32 angles reach ~1e5 rad; a 1-ulp difference in an inverse frequency moves the angle by
    # position * inv_freq * 2^-23, so the tolerance grows with the angle (<= 0.03 here).
    _, factor = rope_inv_freq(_our_config(head_dim, theta, yarn))
    angle = positions[..., None] * rotary.inv_freq.numpy()[None, None]
    tol = factor * (1e-6 + 4e-7 * angle)
    assert (np.abs(np.asarray(cos) - hf_cos[..., :half].numpy()) <= tol).all()
    assert (np.abs(np.asarray(sin) - hf_sin[..., :half].numpy()) <= tol).all()
    np.testing.assert_allclose(hf_cos[..., half:].numpy(), hf_cos[..., :half].numpy())  # rotate-half layout


def _has_load_hf():
    try:
        from qwen3_jax import hf
    except ImportError:
        return False
    return hasattr(hf, "load_hf")


@pytest.mark.skipif(not _has_load_hf(), reason="qwen3_jax.hf.load_hf is not available yet")
def test_yarn_logits_beyond_original_window_match_transformers(tmp_path):
    """A tiny YaRN Qwen3 saved by transformers, loaded by us: logits on 256 tokens (window 64)."""
    import qwen3_jax

    torch.manual_seed(0)
    hf_cfg = transformers.Qwen3Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                         "rope_theta": 10000.0},
        tie_word_embeddings=False, torch_dtype="float32")
    hf_model = transformers.Qwen3ForCausalLM(hf_cfg).eval()
    hf_model.save_pretrained(tmp_path)
    tokens = np.random.default_rng(0).integers(0, 128, size=(1, 256))
    with torch.no_grad():
        hf_logits = hf_model(torch.from_numpy(tokens)).logits.numpy()

    model = qwen3_jax.load_hf(tmp_path, dtype="float32")
    assert model.cfg.rope_scaling is not None and model.cfg.rope_scaling.factor == 4.0
    logits = np.asarray(model(jnp.asarray(tokens, jnp.int32)), np.float32)
    scale = np.abs(hf_logits).max()
    assert np.abs(logits - hf_logits).max() <= 1e-4 * scale
    # the same with the blockwise kernel (4 tiles of 64 tokens)
    chunked = qwen3_jax.load_hf(tmp_path, dtype="float32", attention_impl="chunked", attention_block=64)
    chunked_logits = np.asarray(chunked(jnp.asarray(tokens, jnp.int32)), np.float32)
    assert np.abs(chunked_logits - hf_logits).max() <= 1e-4 * scale
    # and the window matters: without YaRN the late positions disagree
    plain = qwen3_jax.load_hf(tmp_path, dtype="float32", rope_scaling=None)
    plain_logits = np.asarray(plain(jnp.asarray(tokens, jnp.int32)), np.float32)
    assert np.abs(plain_logits[:, 128:] - hf_logits[:, 128:]).max() > 1e-2 * scale
