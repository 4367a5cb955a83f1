"""Helpers shared by the Hugging Face parity tests: tiny random transformers models."""

from __future__ import annotations

import numpy as np


def hf_config(**kw):
    """A tiny transformers Qwen3 / Qwen3-MoE config; MoE when `num_experts` is given."""
    from transformers import Qwen3Config, Qwen3MoeConfig

    base = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=512, rope_theta=10000.0,
                tie_word_embeddings=False)
    base.update(kw)
    if "num_experts" in base:
        base.setdefault("moe_intermediate_size", 16)
        base.setdefault("num_experts_per_tok", 2)
        return Qwen3MoeConfig(**base)
    return Qwen3Config(**base)


def random_hf_model(config, seed: int = 0):
    """A transformers model with every parameter random (norm scales around 1), in fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    return model.eval()


def hf_logits(model, ids: np.ndarray, **kw) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids), **kw).logits.numpy()


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def random_flat(cfg, seed: int = 0) -> dict:
    """Our flat parameters for `cfg`, random (norm scales around 1), fp32 numpy."""
    from qwen3_jax.params import param_specs

    rng = np.random.RandomState(seed)
    out = {}
    for k, spec in sorted(param_specs(cfg).items()):
        noise = rng.standard_normal(spec.shape).astype(np.float32)
        out[k] = 1.0 + 0.2 * noise if k.endswith("scale") else 0.15 * noise
    return out
