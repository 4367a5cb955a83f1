"""KD losses (qwen3_jax.train.kd_loss): chunked == a straightforward full-logits reference, values
and gradients; top-k; the reverse-KL gradient against its closed form; the teacher side has no
gradient."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3_jax.train.kd_loss import KDConfig, token_terms

B, T, D, V = 2, 16, 8, 24


def _setup(seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    h = jax.random.normal(k[0], (B, T, D))
    ht = jax.random.normal(k[1], (B, T, D))
    w = jax.random.normal(k[2], (D, V)) * 0.7
    wt = jax.random.normal(k[3], (D, V)) * 1.3
    targets = jax.random.randint(k[4], (B, T), 0, V)
    return h, ht, w, wt, targets


def _reference(s_BTV, t_BTV, targets_BT, kd: KDConfig):
    """Full [B,T,V] logits, written out from the definitions."""
    tau = kd.temperature
    ps = jax.nn.softmax(s_BTV / tau, -1)
    pt = jax.nn.softmax(t_BTV / tau, -1)
    if kd.topk is not None:
        vals, ids = jax.lax.top_k(t_BTV, kd.topk)
        ptk = jax.nn.softmax(vals / tau, -1)
        psk = jnp.take_along_axis(ps, ids, -1)
        div = jnp.sum(ptk * (jnp.log(ptk) - jnp.log(psk)), -1)
    elif kd.divergence == "forward":
        div = jnp.sum(pt * (jnp.log(pt) - jnp.log(ps)), -1)
    elif kd.divergence == "reverse":
        div = jnp.sum(ps * (jnp.log(ps) - jnp.log(pt)), -1)
    else:
        m = 0.5 * (ps + pt)
        div = 0.5 * jnp.sum(pt * jnp.log(pt / m), -1) + 0.5 * jnp.sum(ps * jnp.log(ps / m), -1)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(s_BTV, -1), targets_BT[..., None], -1)[..., 0]
    agree = (jnp.argmax(s_BTV, -1) == jnp.argmax(t_BTV, -1)).astype(jnp.float32)
    return nll, div, agree


KDS = [KDConfig(divergence="forward", temperature=1.0), KDConfig(divergence="forward", temperature=2.0),
       KDConfig(divergence="reverse", temperature=1.5), KDConfig(divergence="jsd", temperature=1.0),
       KDConfig(divergence="forward", temperature=2.0, topk=5)]


@pytest.mark.parametrize("kd", KDS, ids=lambda k: f"{k.divergence}-t{k.temperature}-k{k.topk}")
@pytest.mark.parametrize("chunk", [None, 4])
def test_chunked_terms_and_grads_equal_full_logits_reference(kd, chunk):
    h, ht, w, wt, targets = _setup()
    mask = (jnp.arange(T)[None] < jnp.array([[T], [T - 5]])).astype(jnp.float32)

    def ours(w, h):
        out = token_terms(lambda x: x @ w, h, lambda x: x @ wt, ht, targets, kd, chunk)
        lm = jnp.sum((out["lse"] - out["target"]) * mask) / mask.sum()
        kdm = jnp.sum(out["kd"] * mask) / mask.sum()
        return dataclasses.replace(kd, alpha=0.3).mix(lm, kdm), out

    def ref(w, h):
        nll, div, agree = _reference(h @ w, ht @ wt, targets, kd)
        lm = jnp.sum(nll * mask) / mask.sum()
        kdm = jnp.sum(div * mask) / mask.sum()
        return 0.7 * lm + 0.3 * kd.temperature ** 2 * kdm, (nll, div, agree)

    (l1, out), g1 = jax.value_and_grad(ours, argnums=(0, 1), has_aux=True)(w, h)
    (l2, (nll, div, agree)), g2 = jax.value_and_grad(ref, argnums=(0, 1), has_aux=True)(w, h)
    np.testing.assert_allclose(out["lse"] - out["target"], nll, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["kd"], div, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(out["agree"], agree)
    assert float(jnp.min(out["kd"])) >= -1e-6 and float(jnp.max(out["kd"])) > 1e-2
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_mix_convention():
    kd = KDConfig(alpha=0.25, temperature=2.0)
    assert kd.mix(1.0, 1.0) == pytest.approx(0.75 + 0.25 * 4.0)
    assert KDConfig(alpha=1.0).mix(5.0, 2.0) == 2.0 and KDConfig(alpha=0.0).mix(5.0, 2.0) == 5.0


def test_topk_of_the_whole_vocabulary_is_the_forward_kl():
    h, ht, w, wt, targets = _setup(1)
    full = token_terms(lambda x: x @ w, h, lambda x: x @ wt, ht, targets, KDConfig(temperature=1.7), 4)
    topv = token_terms(lambda x: x @ w, h, lambda x: x @ wt, ht, targets, KDConfig(temperature=1.7, topk=V), 4)
    np.testing.assert_allclose(full["kd"], topv["kd"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_reverse_kl_gradient_on_two_tokens_matches_closed_form(tau):
    """V = 2: KL(p‖q) with p = softmax(z/τ): dKL/dz_i = p_i (log p_i/q_i - KL) / τ."""
    z = jnp.array([0.3, -1.1])
    q_logits = jnp.array([1.2, 0.4])
    kd = KDConfig(divergence="reverse", temperature=tau)

    def kl(z):
        out = token_terms(lambda x: x, z[None, None], lambda x: x, q_logits[None, None],
                          jnp.zeros((1, 1), jnp.int32), kd)
        return out["kd"][0, 0]

    p = np.exp(np.asarray(z) / tau) / np.exp(np.asarray(z) / tau).sum()
    q = np.exp(np.asarray(q_logits) / tau) / np.exp(np.asarray(q_logits) / tau).sum()
    value = float(np.sum(p * np.log(p / q)))
    grad = p * (np.log(p / q) - value) / tau
    assert float(kl(z)) == pytest.approx(value, rel=1e-4)
    np.testing.assert_allclose(jax.grad(kl)(z), grad, rtol=1e-5)
    # and the two-token closed form: d/dz_0 = -d/dz_1
    assert float(jax.grad(kl)(z).sum()) == pytest.approx(0.0, abs=1e-7)


def test_teacher_side_has_no_gradient():
    h, ht, w, wt, targets = _setup(2)

    def kd_mean(wt, ht):
        out = token_terms(lambda x: x @ w, h, lambda x: x @ wt, ht, targets, KDConfig(), 4)
        return jnp.mean(out["kd"])

    gw, gh = jax.grad(kd_mean, argnums=(0, 1))(wt, ht)
    assert float(jnp.abs(gw).max()) == 0.0 and float(jnp.abs(gh).max()) == 0.0
    assert float(kd_mean(wt, ht)) > 0


@pytest.mark.parametrize("kw, message", [
    (dict(alpha=1.5), "train.kd_alpha=1.5"), (dict(temperature=0.0), "train.kd_temperature=0.0"),
    (dict(topk=0), "train.kd_topk=0"), (dict(topk=3, divergence="reverse"), "train.kd_topk=3"),
    (dict(divergence="tv"), "'tv'"), (dict(topk=100), "exceeds the vocabulary (24)")])
def test_bad_settings_are_named(kw, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        KDConfig(**kw).validate(V)


def test_chunked_kd_never_makes_full_logits():
    """Compiled temp memory with chunks stays below one [B,T,V] fp32 buffer (V large)."""
    Bc, Tc, Dc, Vc = 2, 1024, 16, 8192
    h = jnp.ones((Bc, Tc, Dc))
    w = jnp.ones((Dc, Vc)) * 0.01
    targets = jnp.zeros((Bc, Tc), jnp.int32)

    def loss(w, chunk):
        out = token_terms(lambda x: x @ w, h, lambda x: x @ (w * 2), h, targets, KDConfig(), chunk)
        return jnp.mean(out["kd"] + out["lse"] - out["target"])

    full_bytes = Bc * Tc * Vc * 4
    mem = {c: jax.jit(jax.grad(loss), static_argnums=1).lower(w, c).compile().memory_analysis().temp_size_in_bytes
           for c in (None, 64)}
    assert mem[None] > 2 * full_bytes, mem
    assert mem[64] < full_bytes / 3, mem
    assert math.isfinite(float(loss(w, 64)))
