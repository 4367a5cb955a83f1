"""Context parallelism (qwen3_jax/model/context_parallel.py) on 8 fake CPU devices: the zig-zag
layout, CP attention against the reference kernel, and the whole train step (loss, gradients,
MoE balance counts) under CP × fsdp / expert against the one-device step, on packed rows."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qwen3_jax import sharding
from qwen3_jax.config import RopeScaling, get_config
from qwen3_jax.model import context_parallel as cp_lib
from qwen3_jax.model.attention_ops import reference_attention
from qwen3_jax.params import param_specs
from qwen3_jax.sharding import MeshConfig
from qwen3_jax.train.config import LossConfig
from qwen3_jax.train.step import init_state, make_train_step

RTOL, ATOL = 2e-5, 2e-6  # fp32: only the summation order differs
B, T = 8, 64


def packed_batch(vocab, seed=0):
    """Rows of several documents (positions restart, targets stay inside a document), padding at the end."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, (B, T)).astype(np.int32)
    seg = np.zeros((B, T), np.int32)
    pos = np.zeros((B, T), np.int32)
    for b in range(B):
        t, doc = 0, 1
        while t < T - 5:
            n = int(rng.integers(3, 30))
            n = min(n, T - 5 - t)
            seg[b, t:t + n], pos[b, t:t + n] = doc, np.arange(n)
            t, doc = t + n, doc + 1
    targets = np.roll(tokens, -1, 1)
    loss_mask = (seg > 0) & (np.roll(seg, -1, 1) == seg)
    return {k: jnp.asarray(v, jnp.int32) for k, v in
            dict(tokens=tokens, targets=targets, segment_ids=seg, positions=pos, loss_mask=loss_mask).items()}


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_zigzag_round_trip_and_balance(cp):
    x = jnp.arange(2 * T).reshape(2, T)
    z = cp_lib.to_zigzag(x, cp)
    np.testing.assert_array_equal(cp_lib.from_zigzag(z, cp), x)
    order = cp_lib.zigzag_order(T, cp)
    assert sorted(order.tolist()) == list(range(T)) and order.tolist() != list(range(T))
    # equal causal work: every shard's queries see the same number of (query, key) pairs
    work = [(order[r * T // cp:(r + 1) * T // cp] + 1).sum() for r in range(cp)]
    assert len(set(work)) == 1, work


def test_seq_len_not_divisible_names_the_setting():
    with pytest.raises(ValueError, match="SEQ_LEN=60 is not divisible by 2 x context=16"):
        cp_lib.zigzag_order(60, 8)


def test_attention_outside_the_zigzag_step_is_refused():
    """A forward traced under a context axis without the batch permuted (zigzag_batch) would mask
    by the wrong positions: refused, naming what to do."""
    mesh = sharding.make_mesh(MeshConfig(ici_fsdp=4, ici_context=2))
    x = jnp.zeros((B, T, 2, 8), jnp.float32)
    with sharding.use_rules(mesh), pytest.raises(ValueError, match="needs the batch in zig-zag order"):
        cp_lib.attention(x, x, x, impl="chunked")
    with sharding.use_rules(mesh):
        cp_lib.zigzag_batch({"tokens": jnp.zeros((B, T), jnp.int32)})
        assert cp_lib.attention(x, x, x, impl="chunked").shape == x.shape
    assert sharding.active() is None


@pytest.mark.parametrize("cp,block", [(2, 8), (4, 256)])
def test_cp_attention_matches_reference(cp, block):
    """Zig-zag queries against gathered keys = the reference kernel in the original order (GQA,
    segment ids), forward and gradients."""
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(B, T, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(B, T, 2, 8)), jnp.float32) for _ in range(2))
    seg = packed_batch(64)["segment_ids"]
    mesh = sharding.make_mesh(MeshConfig(ici_fsdp=8 // cp, ici_context=cp))

    def ref(q, k, v):
        return jnp.sum(jnp.sin(reference_attention(q, k, v, seg)))

    def cp_fn(q, k, v):
        with sharding.use_rules(mesh):
            z = [cp_lib.to_zigzag(a, cp) for a in (q, k, v, seg)]
            sharding.mark_zigzag()
            o = cp_lib.attention(*z, impl="chunked", block=block)
            return jnp.sum(jnp.sin(cp_lib.from_zigzag(o, cp)))

    want, want_g = jax.value_and_grad(ref, argnums=(0, 1, 2))(q, k, v)
    got, got_g = jax.jit(jax.value_and_grad(cp_fn, argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(got, want, rtol=RTOL)
    for a, b in zip(got_g, want_g):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("fused_bwd", [False, True])
def test_cp_splash_interpret_matches_reference(fused_bwd):
    """The TPU path: the Pallas splash kernel (interpreter) with zig-zag mask rows, q_seq_shards=2,
    on CP=2 devices against the reference kernel in the original order (forward and gradients)."""
    cp, T2 = 2, 512
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(1, T2, 2, 128)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(1, T2, 1, 128)), jnp.float32) for _ in range(2))
    seg = jnp.asarray(np.repeat([1, 2, 3], [200, 250, 62])[None], jnp.int32)
    mesh = sharding.make_mesh(MeshConfig(ici_fsdp=1, ici_context=cp), devices=jax.devices()[:cp])

    def cp_fn(q, k, v):
        with sharding.use_rules(mesh):
            z = [cp_lib.to_zigzag(a, cp) for a in (q, k, v, seg)]
            sharding.mark_zigzag()
            o = cp_lib.attention(*z, impl="splash", block=128, interpret=True, fused_bwd=fused_bwd)
            return jnp.sum(jnp.sin(cp_lib.from_zigzag(o, cp)))

    want, want_g = jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(reference_attention(*a, seg))), (0, 1, 2))(q, k, v)
    got, got_g = jax.jit(jax.value_and_grad(cp_fn, argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(got, want, rtol=RTOL)
    for a, b in zip(got_g, want_g):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


# -- the train step under CP = the one-device step -----------------------------------------------------

CASES = {  # name -> (model, MeshConfig kwargs): CP 2, 4 and 8; with fsdp and with expert parallelism
    # (dense CP=2 runs in tests/test_distill.py and tests/test_context_parallel_handoff.py)
    "dense_cp4_fsdp2_yarn": ("tiny-dense-yarn", dict(ici_fsdp=2, ici_context=4)),
    "moe_cp2_ep4": ("tiny-moe", dict(ici_fsdp=1, ici_context=2, ici_expert=4)),
    "moe_cp2_fsdp4": ("tiny-moe", dict(ici_fsdp=4, ici_context=2)),
    "moe_cp8": ("tiny-moe", dict(ici_fsdp=1, ici_context=8)),
}


def _cfg(name):
    yarn = name.endswith("-yarn")
    cfg = get_config(name.removesuffix("-yarn"), compute_dtype="float32", remat="none", attention_block=8,
                     attention_impl="chunked", router_aux_loss_coef=0.1)
    if yarn:  # positions beyond the original window: YaRN's scaled frequencies and attention factor
        cfg = cfg.replace(rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=16))
    return cfg


def _step(cfg, mesh=None):
    opt = optax.sgd(1.0)
    state = init_state(cfg, opt, 0)
    step = make_train_step(cfg, opt, LossConfig(z_loss=1e-3, router_z_loss=1e-3 if cfg.is_moe else 0.0),
                           micro_batches=2)
    batch = packed_batch(cfg.vocab_size)
    if mesh is None:
        return jax.jit(step)(state, batch)
    ssh = sharding.tree_shardings(state, param_specs(cfg), mesh)
    bsh = sharding.batch_sharding(mesh)

    def traced(s, b):
        with sharding.use_rules(mesh, moe_exchange="gather"):
            return step(s, b)

    return jax.jit(traced, in_shardings=(ssh, bsh), out_shardings=(ssh, None))(state, batch)


_REFS = {}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_train_step_under_cp_equals_one_device(case):
    model, mesh_kw = CASES[case]
    cfg = _cfg(model)
    if model not in _REFS:
        _REFS[model] = _step(cfg)
    ref_state, ref_m = _REFS[model]
    mesh = sharding.make_mesh(MeshConfig(**mesh_kw))
    assert mesh.shape["context"] == mesh_kw["ici_context"]
    state, m = _step(cfg, mesh)
    for key in ("loss", "lm_loss", "z_loss", "aux_loss", "grad_norm", "tokens"):
        np.testing.assert_allclose(float(m[key]), float(ref_m[key]), rtol=RTOL, err_msg=key)
    if cfg.is_moe:  # the balance counts of the global batch: every CP shard's tokens counted once
        np.testing.assert_array_equal(np.asarray(state.moe["counts"]), np.asarray(ref_state.moe["counts"]))
        assert float(np.asarray(state.moe["counts"]).sum()) > 0
    flat, ref_flat = jax.tree_util.tree_leaves_with_path(state.params), jax.tree.leaves(ref_state.params)
    for (path, a), b in zip(flat, ref_flat):  # sgd(1.0): new params = params - grads
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL, err_msg=jax.tree_util.keystr(path))
