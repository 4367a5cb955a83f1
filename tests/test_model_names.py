"""Names that say what they mean, and settings that are not silent: moe_impl's renamed value
('ragged' -> 'ragged_dot', still accepted with a warning), remat='auto' outside train.build
(forward passes run, differentiating says build resolves it), `MoE.output_only` (the block's
output without router statistics) and the one attention core the KV-cache decode shares with
the reference kernel."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen3_jax import errors
from qwen3_jax.config import MOE_IMPL_RENAMES, MOE_IMPLS, ModelConfig, get_config
from qwen3_jax.model import attention_ops, create_model, moe_compute
from qwen3_jax.model.transformer import remat_policy


@pytest.fixture
def fresh_warnings(monkeypatch):
    """errors.renamed logs once per process: forget what it has told."""
    monkeypatch.setattr(errors, "_told", set())


def test_old_moe_impl_is_accepted_with_a_warning_and_becomes_the_new_one(fresh_warnings, caplog):
    assert "ragged_dot" in MOE_IMPLS and "ragged" not in MOE_IMPLS and MOE_IMPL_RENAMES == {"ragged": "ragged_dot"}
    with caplog.at_level(logging.WARNING, logger="qwen3_jax"):
        cfg = get_config("tiny-moe", moe_impl="ragged")
        again = ModelConfig.from_dict(dict(cfg.to_dict(), moe_impl="ragged"))  # an old saved config
    assert cfg.moe_impl == again.moe_impl == "ragged_dot" and cfg.to_dict()["moe_impl"] == "ragged_dot"
    told = [r.getMessage() for r in caplog.records]
    assert len(told) == 1 and "model_config.moe_impl" in told[0] and "'ragged_dot'" in told[0]
    assert cfg == get_config("tiny-moe", moe_impl="ragged_dot")  # downstream sees only the new name
    assert moe_compute.resolve_impl(cfg.moe_impl, "tpu", 512, 256) == "ragged_dot"
    with pytest.raises(ValueError, match="moe_impl='sparse' is not one of"):
        get_config("tiny-moe", moe_impl="sparse")


def test_old_moe_impl_computes_what_the_new_one_does():
    cfg = get_config("tiny-moe", compute_dtype="float32", moe_impl="dense")
    model = create_model(cfg, 0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 8)), jnp.int32)
    want = model(tokens)
    for impl in ("ragged", "ragged_dot"):
        graph, state = nnx.split(create_model(cfg.replace(moe_impl=impl), 0))
        np.testing.assert_allclose(nnx.merge(graph, state)(tokens), want, rtol=1e-5, atol=1e-5, err_msg=impl)


def _loss_fn(cfg):
    graph, state = nnx.split(create_model(cfg, 0))
    tokens = jnp.zeros((1, 8), jnp.int32)
    return (lambda st: jnp.sum(nnx.merge(graph, st)(tokens))), state


@pytest.mark.parametrize("scan", [True, False])
def test_remat_auto_runs_forward_and_refuses_to_be_differentiated(scan):
    """'auto' is train.build's to resolve. A model built outside it with the default runs forward
    (inference, evaluation: remat does nothing there) exactly as 'full' does; differentiating it
    names the setting instead of silently checkpointing as 'full'."""
    cfg = get_config("tiny-moe", compute_dtype="float32", scan_layers=scan)
    assert cfg.remat == "auto"
    loss, state = _loss_fn(cfg)
    full_loss, _ = _loss_fn(cfg.replace(remat="full"))
    assert float(jax.jit(loss)(state)) == float(jax.jit(full_loss)(state))
    with pytest.raises(ValueError, match=r"model_config.remat='auto'.*qwen3_jax.train.build"):
        jax.grad(loss)(state)
    jax.grad(full_loss)(state)  # a resolved policy differentiates
    with pytest.raises(ValueError, match="'auto' is resolved by qwen3_jax.train.build"):
        remat_policy("auto")
    assert remat_policy("none") is None and remat_policy("full") is not None


def test_remat_auto_under_a_gradient_that_does_not_reach_the_model():
    """A frozen model's forward inside another function's gradient (a teacher) is not
    differentiated: its checkpoint policy is never consulted."""
    loss, state = _loss_fn(get_config("tiny-dense", compute_dtype="float32"))
    g = jax.grad(lambda s: s * jax.lax.stop_gradient(loss(state)))(2.0)
    assert np.isfinite(float(g))


def test_moe_output_only_is_the_called_blocks_output():
    from qwen3_jax.model.moe import MoE

    cfg = get_config("tiny-moe", compute_dtype="float32", moe_impl="blocked")
    block = MoE(cfg, nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 6, cfg.d_model)), jnp.float32)
    y, stats = block(x, jnp.ones((2, 6), bool))
    np.testing.assert_array_equal(block.output_only(x), y)
    assert set(stats) == {"counts", "prob_sum", "z_sum"} and not hasattr(block, "forward")


def test_decode_attention_is_the_reference_core_under_a_mask():
    """The KV-cache decode's attention (`masked_attention`, mask [B,T,S]) and the reference kernel
    (causal + document mask from segment ids) are one computation: the last query against the
    whole sequence under the reference mask's last row gives the reference's last output."""
    B, T, N, K, H = 2, 12, 4, 2, 8
    r = np.random.default_rng(2)
    q, k, v = (jnp.asarray(r.normal(size=(B, T, n, H)), jnp.float32) for n in (N, K, K))
    seg = jnp.asarray(np.where(np.arange(T) < 5, 1, 2)[None].repeat(B, 0), jnp.int32)
    ref = attention_ops.reference_attention(q, k, v, seg)
    mask_BTS = (seg[:, :, None] == seg[:, None, :]) & (jnp.arange(T)[:, None] >= jnp.arange(T)[None, :])
    last = attention_ops.masked_attention(q[:, -1:], k, v, mask_BTS[:, -1:])
    np.testing.assert_allclose(last, ref[:, -1:], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(attention_ops.masked_attention(q, k, v, mask_BTS), ref, rtol=1e-6, atol=1e-6)
    from qwen3_jax.model import attention

    assert not hasattr(attention, "cached_attention")


def test_generator_takes_the_old_exchange_name_and_rejects_unknown_ones(fresh_warnings, caplog):
    from qwen3_jax.inference.engine import Generator
    from qwen3_jax.params import flat_params

    cfg = get_config("tiny-dense", compute_dtype="float32")
    flat = flat_params(create_model(cfg, 0))
    with caplog.at_level(logging.WARNING, logger="qwen3_jax"):
        assert Generator(cfg, flat, moe_exchange="ragged").moe_exchange == "ragged_all_to_all"
    assert any("'ragged' is now called 'ragged_all_to_all'" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="moe_exchange='sideways' is not one of"):
        Generator(cfg, flat, moe_exchange="sideways")
