"""The MoE expert-computation forms (qwen3_jax.model.moe_compute) give the dense reference's values
and gradients (fp32) under any routing: random, skewed, experts left empty, every assignment to
one expert, assignments to no expert (id = E); `auto` picks per backend."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3_jax.config import MOE_IMPLS, get_config
from qwen3_jax.model import moe_compute

E, D, F, N, K = 8, 16, 8, 48, 3
XLA_OPTS = {"xla_backend_optimization_level": 0}  # LLVM -O0: these programs are tiny, compiling dominates


def _weights(seed=0, d=D, f=F):
    r = np.random.default_rng(seed)
    gate, up = (jnp.asarray(r.normal(size=(E, d, f)) * 0.3, jnp.float32) for _ in range(2))
    down = jnp.asarray(r.normal(size=(E, f, d)) * 0.3, jnp.float32)
    return gate, up, down


def _routing(kind, seed=0, n=N, k=K):
    """[n,k] expert ids (distinct per token where the kind allows) for one routing pattern."""
    r = np.random.default_rng(seed)
    if kind == "random":
        return np.argsort(r.normal(size=(n, E)), 1)[:, :k]
    if kind == "skewed":  # slot 0 always expert 3, the rest mostly experts 4 and 5
        rest = np.where(r.uniform(size=(n, k - 1)) < 0.8, 4 + (np.arange(k - 1) % 2), r.integers(0, E, (n, k - 1)))
        return np.concatenate([np.full((n, 1), 3), rest], 1)
    if kind == "empty_experts":  # experts 0, 2, 5, 7 get nothing
        return r.choice([1, 3, 4, 6], size=(n, k))
    if kind == "one_expert":  # every assignment of every token to expert 6
        return np.full((n, k), 6)
    if kind == "dropped":  # a third of the assignments to no expert (id E), the rest random
        ids = r.integers(0, E, (n, k))
        return np.where(r.uniform(size=(n, k)) < 0.33, E, ids)
    raise ValueError(kind)


ROUTINGS = ("random", "skewed", "empty_experts", "one_expert", "dropped")


def _reference_np(x, w, ids, gate, up, down):
    """Token by token, straight from the definition (float64)."""
    x, w, gate, up, down = (np.asarray(a, np.float64) for a in (x, w, gate, up, down))
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[n, j]
            if e < E:
                g, u = x[n] @ gate[e], x[n] @ up[e]
                out[n] += w[n, j] * ((g / (1 + np.exp(-g))) * u) @ down[e]
    return out


@functools.lru_cache(maxsize=None)
def _value_and_grad(impl, block=None):
    fn = {"dense": moe_compute.experts_dense, "ragged_dot": moe_compute.experts_sorted,
          "blocked": functools.partial(moe_compute.experts_blocked, **({"block": block} if block else {}))}[impl]

    def loss(x, w, gate, up, down, ids, probe):
        y = fn(x, w, ids, gate, up, down)
        return jnp.sum(y * probe), y

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True), compiler_options=XLA_OPTS)


@pytest.mark.parametrize("routing", ROUTINGS)
def test_forms_equal_the_reference_values_and_grads(routing):
    r = np.random.default_rng(1)
    x = jnp.asarray(r.normal(size=(N, D)), jnp.float32)
    w = jnp.asarray(r.uniform(0.1, 1.0, size=(N, K)), jnp.float32)
    probe = jnp.asarray(r.normal(size=(N, D)), jnp.float32)  # a loss whose gradient is not 2y
    ids = jnp.asarray(_routing(routing), jnp.int32)
    params = _weights()
    want_y = _reference_np(x, w, np.asarray(ids), *params)
    (_, ref_y), ref_g = _value_and_grad("dense")(x, w, *params, ids, probe)
    np.testing.assert_allclose(ref_y, want_y, rtol=1e-5, atol=1e-5)
    # blocked: the default block (capped at a fair share, 18 rows here), blocks of 4 and 7 rows
    # (several per expert; the all-to-one routing fills ceil(N·K/C) of them)
    for impl, block in (("ragged_dot", None), ("blocked", None), ("blocked", 4), ("blocked", 7)):
        (_, y), g = _value_and_grad(impl, block)(x, w, *params, ids, probe)
        np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5, err_msg=f"{impl} {block} values")
        for name, a, b in zip(("x", "w", "gate", "up", "down"), g, ref_g):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"{impl} {block} d{name}")
    if routing == "empty_experts":  # no gradient into the experts nobody chose
        unused = [e for e in range(E) if not np.any(np.asarray(ids) == e)]
        assert unused and all(float(jnp.abs(ref_g[2][e]).max()) == 0 for e in unused)
    if routing == "dropped":  # nor into the weights of assignments to no expert
        assert np.all(np.asarray(ref_g[1])[np.asarray(ids) == E] == 0)


@pytest.mark.parametrize("block", [1, 4, 5, 16])
@pytest.mark.parametrize("routing", ROUTINGS)
def test_block_layout_places_every_assignment_once(routing, block):
    """Each valid assignment gets its own buffer row inside a block of its expert, within the
    static bound G = ceil(A/C) + E; rows no assignment took point at A; dropped ones at R."""
    ids = _routing(routing, seed=2).reshape(-1)
    A = ids.size
    pos, src, eid, G = (np.asarray(a) if not isinstance(a, int) else a
                        for a in jax.jit(moe_compute.block_layout, static_argnums=(1, 2))(jnp.asarray(ids), E, block))
    assert G == -(-A // block) + E and src.shape == (G * block,) and eid.shape == (G,)
    valid = ids < E
    assert np.all(pos[~valid] == G * block)
    p = pos[valid]
    assert len(set(p.tolist())) == p.size and p.max() < G * block
    np.testing.assert_array_equal(src[p], np.nonzero(valid)[0])
    np.testing.assert_array_equal(eid[p // block], ids[valid])
    assert np.sum(src < A) == valid.sum() and np.all(src[src != A] < A)
    # inside an expert's blocks, assignments keep their order (dropless, stable)
    for e in range(E):
        assert np.all(np.diff(pos[ids == e]) == 1)


def test_auto_picks_per_backend_and_names_are_checked():
    r = moe_compute.resolve_impl
    assert r("auto", "cpu", 512, 256) == "blocked"
    # XLA:GPU expands ragged_dot into a masked copy of the rows per expert (bench_gpu.py --moe)
    assert r("auto", "gpu", 512, 256) == "blocked" and r("auto", "cuda", 512, 256) == "blocked"
    assert r("auto", "tpu", 512, 256) == "megablox"
    assert r("auto", "tpu", 64, 32) == "ragged_dot"  # megablox tiles need 128-multiples
    assert r("auto", "tpu", 512, 256, sharded=True) == "ragged_dot"  # GSPMD would not split a Pallas call
    for impl in ("dense", "ragged_dot", "blocked", "megablox"):
        assert r(impl, "cpu", 512, 256) == impl
    assert set(MOE_IMPLS) == {"auto", "dense", "ragged_dot", "blocked", "megablox"}
    assert get_config("tiny-moe").replace(moe_impl="auto").moe_impl == "auto"
    with pytest.raises(ValueError, match="moe_impl='sparse'"):
        get_config("tiny-moe", moe_impl="sparse")
    with pytest.raises(ValueError, match="moe_impl"):
        r("sparse", "cpu", 512, 256)


@pytest.mark.slow
def test_model_auto_equals_dense_and_is_blocked_on_cpu():
    """The tiny MoE model's loss and parameter gradients are the same with dense and auto
    experts (ragged inside the model: tests/test_sharding_ep.py); on CPU auto traces the blocked
    form: the dense form's [tokens, experts, ffn] product is not in its jaxpr, the blocked form's
    per-block expert weights [G, D, F] are."""
    from qwen3_jax.model import create_model
    from qwen3_jax.params import flat_params, model_from_flat

    base = get_config("tiny-moe", compute_dtype="float32", remat="none")
    flat = flat_params(create_model(base.replace(moe_impl="dense"), 0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, base.vocab_size, (2, 24)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(24, dtype=jnp.int32), (2, 24))

    def loss(impl, flat):
        logits = model_from_flat(base.replace(moe_impl=impl), flat)(tokens, pos)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

    ref, ref_g = jax.jit(jax.value_and_grad(functools.partial(loss, "dense")), compiler_options=XLA_OPTS)(flat)
    for impl in ("auto",):
        got, got_g = jax.jit(jax.value_and_grad(functools.partial(loss, impl)), compiler_options=XLA_OPTS)(flat)
        np.testing.assert_allclose(got, ref, rtol=1e-6, err_msg=impl)
        for k in ref_g:
            np.testing.assert_allclose(got_g[k], ref_g[k], rtol=1e-5, atol=1e-6, err_msg=f"{impl} {k}")
    E, F = base.num_experts, base.moe_ffn_dim

    def shapes(impl):  # every intermediate's shape, in the scanned / rematerialised sub-jaxprs too
        def walk(jaxpr):
            for eqn in jaxpr.eqns:
                yield from (tuple(v.aval.shape) for v in eqn.outvars)
                for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                    yield from walk(sub)
        return set(walk(jax.make_jaxpr(functools.partial(loss, impl))(flat).jaxpr))

    tokens_n = tokens.size
    C = moe_compute.block_rows(tokens_n * base.num_experts_per_tok, E)
    G = -(-tokens_n * base.num_experts_per_tok // C) + E
    dense, auto = shapes("dense"), shapes("auto")
    assert (tokens_n, E, F) in dense and (G, base.d_model, F) not in dense
    assert (tokens_n, E, F) not in auto and (G, base.d_model, F) in auto


def test_blocked_decoding_sizes():
    """Fewer assignments than experts (one decoding step): blocks of one row, G = A + E, and the
    same values and gradients as the dense form."""
    assert moe_compute.block_rows(2 * K, E) == 1 and moe_compute.block_rows(4096 * 4, 16) == moe_compute.BLOCK_ROWS
    r = np.random.default_rng(5)
    x = jnp.asarray(r.normal(size=(2, D)), jnp.float32)
    w = jnp.asarray(r.uniform(0.1, 1.0, size=(2, K)), jnp.float32)
    probe = jnp.asarray(r.normal(size=(2, D)), jnp.float32)
    ids = jnp.asarray([[7, 0, 3], [3, 5, 7]], jnp.int32)
    (_, ref_y), ref_g = _value_and_grad("dense")(x, w, *_weights(), ids, probe)
    (_, y), g = _value_and_grad("blocked")(x, w, *_weights(), ids, probe)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, ref_g):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
