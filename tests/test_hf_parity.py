"""Logits of our model against transformers (the reference), fp32 on CPU."""

import jax.numpy as jnp
import numpy as np
import pytest

import qwen3_jax
from hf_utils import hf_config, hf_logits, random_hf_model, rel_err

TOL = 1e-4  # relative to the largest |logit|

CASES = {
    "dense-gqa-untied": dict(),
    "dense-tied": dict(tie_word_embeddings=True),
    "dense-mha": dict(num_key_value_heads=4),
    "dense-mqa": dict(num_key_value_heads=1),
    "dense-headdim-ne-d/heads": dict(head_dim=16, hidden_size=24, num_attention_heads=6, num_key_value_heads=3),
    "moe-norm-topk": dict(num_experts=8, norm_topk_prob=True),
    "moe-no-norm-topk": dict(num_experts=8, norm_topk_prob=False),
    "moe-sparse-step-2": dict(num_experts=8, decoder_sparse_step=2, num_hidden_layers=4),
    "moe-mlp-only-layers": dict(num_experts=8, mlp_only_layers=[0, 2], num_hidden_layers=4, norm_topk_prob=True),
    "moe-topk-half-tied": dict(num_experts=4, num_experts_per_tok=2, tie_word_embeddings=True),
    "moe-mqa-big-topk": dict(num_experts=6, num_experts_per_tok=3, num_key_value_heads=1),
}


@pytest.fixture(scope="module")
def ids():
    return np.random.RandomState(0).randint(0, 97, size=(2, 19)).astype(np.int32)


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(name, ids, tmp_path):
    ref_model = random_hf_model(hf_config(**CASES[name]), seed=len(name))
    ref_model.save_pretrained(tmp_path / "hf")
    ref = hf_logits(ref_model, ids)
    impls = ["ragged_dot", "dense"] if "num_experts" in CASES[name] else ["ragged_dot"]
    for impl in impls:
        ours = qwen3_jax.load_hf(tmp_path / "hf", dtype="float32", moe_impl=impl)
        got = np.asarray(ours(jnp.asarray(ids)))
        assert got.shape == ref.shape
        assert rel_err(got, ref) <= TOL, (name, impl, rel_err(got, ref))


@pytest.mark.parametrize("scan,remat", [(False, "none"), (True, "dots")])
def test_layer_loop_and_remat_variants(scan, remat, ids, tmp_path):
    ref_model = random_hf_model(hf_config(num_experts=8, decoder_sparse_step=2, num_hidden_layers=4), seed=3)
    ref_model.save_pretrained(tmp_path / "hf")
    ours = qwen3_jax.load_hf(tmp_path / "hf", scan_layers=scan, remat=remat)
    assert rel_err(ours(jnp.asarray(ids)), hf_logits(ref_model, ids)) <= TOL


def test_packed_row_equals_documents_alone(tmp_path):
    """Three documents packed in one row, with padding: each equals its own unpacked run."""
    ref_model = random_hf_model(hf_config(num_experts=8), seed=5)
    ref_model.save_pretrained(tmp_path / "hf")
    model = qwen3_jax.load_hf(tmp_path / "hf")
    rng = np.random.RandomState(1)
    lengths = [7, 11, 5]
    docs = [rng.randint(0, 97, size=n).astype(np.int32) for n in lengths]
    pad = 3
    tokens = np.concatenate(docs + [np.zeros(pad, np.int32)])[None]
    segs = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(pad)])[None].astype(np.int32)
    pos = np.concatenate([np.arange(n) for n in lengths] + [np.arange(pad)])[None].astype(np.int32)
    packed = np.asarray(model(jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(segs)))
    start = 0
    for doc in docs:
        alone = np.asarray(model(jnp.asarray(doc[None])))
        np.testing.assert_allclose(packed[0, start:start + len(doc)], alone[0], rtol=0, atol=1e-5 * np.abs(alone).max())
        assert rel_err(packed[0, start:start + len(doc)], hf_logits(ref_model, doc[None])[0]) <= TOL
        start += len(doc)


@pytest.mark.parametrize("padding", [False, True])
def test_router_stats_match_transformers_router_outputs(padding, tmp_path):
    """Per MoE layer, our counts and probability sums are transformers' router outputs (softmax,
    top-k of its router logits, padding excluded), and the per-layer load-balancing loss taken from
    them is E·Σ f·p per layer, averaged. (transformers' own aux_loss pools the layers first: a
    different objective, not used for training here; see qwen3_jax.model.moe.load_balancing_loss.)"""
    from qwen3_jax.model.moe import load_balancing_loss
    import torch

    cfg = hf_config(num_experts=8, num_experts_per_tok=2, num_hidden_layers=4, mlp_only_layers=[1])
    ref_model = random_hf_model(cfg, seed=11)
    ref_model.save_pretrained(tmp_path / "hf")
    ids = np.random.RandomState(2).randint(0, 97, size=(3, 16)).astype(np.int32)
    mask = np.ones_like(ids)
    if padding:
        mask[0, 10:] = 0
        mask[2, 4:] = 0
    with torch.no_grad():
        out = ref_model(torch.tensor(ids), attention_mask=torch.tensor(mask), output_router_logits=True)
    model = qwen3_jax.load_hf(tmp_path / "hf")
    _, stats = model(jnp.asarray(ids), segment_ids_BT=jnp.asarray(mask), return_stats=True)
    assert stats["counts"].shape == (3, 3, 8)  # 3 MoE layers (layer 1 is dense)
    m = mask.reshape(-1).astype(np.float32)
    per_layer = []
    for layer, logits in enumerate(out.router_logits):
        probs = torch.softmax(logits.float(), -1).numpy().reshape(3, 16, 8)
        top = np.argsort(-probs, -1)[..., :2]
        counts = np.stack([np.bincount(top[b][mask[b] > 0].reshape(-1), minlength=8) for b in range(3)])
        prob_sum = (probs * mask[..., None]).sum(1)
        np.testing.assert_allclose(np.asarray(stats["counts"][layer]), counts)
        np.testing.assert_allclose(np.asarray(stats["prob_sum"][layer]), prob_sum, rtol=1e-5, atol=1e-5)
        per_layer.append(8 * np.sum(counts.sum(0) / m.sum() * prob_sum.sum(0) / m.sum()))
    ours = load_balancing_loss(stats["counts"], stats["prob_sum"], stats["tokens"], 8, scope="batch")
    np.testing.assert_allclose(float(ours), np.mean(per_layer), rtol=1e-5)
    # the per-sequence scope is a different number on a skewed batch
    seq = load_balancing_loss(stats["counts"], stats["prob_sum"], stats["tokens"], 8, scope="sequence")
    assert abs(float(seq) - float(ours)) > 1e-4
