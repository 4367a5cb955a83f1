"""Sharded loss and gradients equal the single-device run (fp32, 8 fake CPU devices), dropless
expert parallelism under any routing skew, and the global-batch load-balancing loss."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3_jax import sharding
from qwen3_jax.config import get_config
from qwen3_jax.model import create_model
from qwen3_jax.model import moe as moe_lib
from qwen3_jax.model import moe_ep
from qwen3_jax.params import flat_params, model_from_flat, param_specs
from qwen3_jax.sharding import MeshConfig

RTOL, ATOL = 1e-5, 1e-6  # fp32: only the summation order differs
B, T = 8, 16


def _cfg(name, **kw):
    return get_config(name, compute_dtype="float32", **kw)


def _batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    seg = jnp.asarray(np.where(np.arange(T) < T - 3, 1, 0)[None].repeat(B, 0), jnp.int32)  # some padding
    return {"tokens": tokens, "targets": jnp.roll(tokens, -1, 1), "segment_ids": seg,
            "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))}


def _loss(cfg, flat, batch):
    logits, stats = model_from_flat(cfg, flat)(batch["tokens"], batch["positions"], batch["segment_ids"],
                                               return_stats=True)
    lse = jax.nn.logsumexp(logits, -1)
    tgt = jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    mask = (batch["segment_ids"] > 0).astype(jnp.float32)
    ce = jnp.sum((lse - tgt) * mask) / jnp.sum(mask)
    if cfg.is_moe:
        ce = ce + 0.01 * moe_lib.load_balancing_loss(stats["counts"], stats["prob_sum"], stats["tokens"],
                                                     cfg.num_experts)
    return ce


@functools.lru_cache(maxsize=None)
def _reference(name, impl):
    cfg = _cfg(name, moe_impl=impl)
    flat = flat_params(create_model(cfg, 0))
    batch = _batch(cfg)
    loss, grads = jax.jit(jax.value_and_grad(functools.partial(_loss, cfg)))(flat, batch)
    return cfg, flat, batch, loss, grads


def _sharded(cfg, flat, batch, mesh_cfg, **ctx):
    mesh = sharding.make_mesh(mesh_cfg)
    psh = sharding.param_shardings(param_specs(cfg), mesh)
    bsh = sharding.batch_sharding(mesh)
    with sharding.use_rules(mesh, **ctx):
        fn = jax.jit(jax.value_and_grad(functools.partial(_loss, cfg)), in_shardings=(psh, bsh),
                     out_shardings=(None, psh))
        return fn(flat, batch)


def _assert_close(loss, grads, ref_loss, ref_grads):
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=RTOL)
    for k in ref_grads:
        np.testing.assert_allclose(np.asarray(grads[k]), np.asarray(ref_grads[k]), rtol=RTOL, atol=ATOL, err_msg=k)


MOE_MESHES = {
    "fsdp8": MeshConfig(ici_fsdp=8),
    "fsdp4_tp2": MeshConfig(ici_fsdp=4, ici_tensor=2),
    "ep2_fsdp4": MeshConfig(ici_fsdp=4, ici_expert=2),
    "ep4_fsdp2": MeshConfig(ici_fsdp=2, ici_expert=4),
    "ep8": MeshConfig(ici_fsdp=1, ici_expert=8),
    "tp2_ep4": MeshConfig(ici_fsdp=1, ici_expert=4, ici_tensor=2),
    "data2_ep2_tp2": MeshConfig(ici_data=2, ici_fsdp=1, ici_expert=2, ici_tensor=2),
}


@pytest.mark.parametrize("mesh_name", list(MOE_MESHES))
def test_moe_loss_and_grads_match_single_device(mesh_name):
    cfg, flat, batch, ref_loss, ref_grads = _reference("tiny-moe", "dense")
    loss, grads = _sharded(cfg, flat, batch, MOE_MESHES[mesh_name], moe_exchange="gather")
    _assert_close(loss, grads, ref_loss, ref_grads)


def test_moe_ragged_local_matmul_matches():
    cfg, flat, batch, ref_loss, ref_grads = _reference("tiny-moe", "ragged")
    loss, grads = _sharded(cfg, flat, batch, MOE_MESHES["ep4_fsdp2"], moe_exchange="gather")
    _assert_close(loss, grads, ref_loss, ref_grads)


@pytest.mark.parametrize("mesh_name", ["fsdp8", "fsdp4_tp2", "data2_ep2_tp2"])
def test_dense_loss_and_grads_match_single_device(mesh_name):
    cfg, flat, batch, ref_loss, ref_grads = _reference("tiny-dense", "dense")
    loss, grads = _sharded(cfg, flat, batch, MOE_MESHES[mesh_name])
    _assert_close(loss, grads, ref_loss, ref_grads)


# -- dropless under skew, capacity mode ---------------------------------------------------------------

def _expert_inputs(E=8, D=16, F=8, N=64, k=2, seed=0):
    r = np.random.default_rng(seed)
    x = jnp.asarray(r.normal(size=(N, D)), jnp.float32)
    w = jnp.asarray(r.uniform(0.1, 1.0, size=(N, k)), jnp.float32)
    gate, up = (jnp.asarray(r.normal(size=(E, D, F)) * 0.3, jnp.float32) for _ in range(2))
    down = jnp.asarray(r.normal(size=(E, F, D)) * 0.3, jnp.float32)
    return x, w, gate, up, down


def _run_ep(mesh_cfg, x, w, ids, gate, up, down, form="dense", capacity_factor=None):
    mesh = sharding.make_mesh(mesh_cfg)
    with sharding.use_rules(mesh, moe_exchange="gather", capacity_factor=capacity_factor):
        ctx = sharding.expert_parallel()
        return jax.jit(lambda *a: moe_ep.experts_parallel(*a, ctx=ctx, form=form))(
            x[None], w[None], ids[None], gate, up, down)[0]


@pytest.mark.parametrize("skew", ["one_expert", "one_device", "random"])
@pytest.mark.parametrize("form", ["dense", "ragged"])
def test_dropless_for_any_skew(skew, form):
    x, w, gate, up, down = _expert_inputs()
    N, k = w.shape
    ids = {"one_expert": np.zeros((N, k)) + np.arange(k) * 0,  # every assignment to expert 0
           "one_device": np.stack([np.zeros(N), np.ones(N)], 1),  # experts 0 and 1 (device 0 at EP=4)
           "random": np.random.default_rng(1).integers(0, 8, (N, k))}[skew]
    ids = jnp.asarray(ids, jnp.int32)
    want = moe_lib.experts_dense(x[None], w[None], ids[None], gate, up, down)[0]
    for mesh_cfg in (MeshConfig(ici_fsdp=1, ici_expert=8), MeshConfig(ici_fsdp=2, ici_expert=4)):
        got = _run_ep(mesh_cfg, x, w, ids, gate, up, down, form=form)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_capacity_factor_drops_overflow_in_token_order():
    x, w, gate, up, down = _expert_inputs()
    N, k = w.shape
    ids = jnp.asarray(np.stack([np.zeros(N), np.random.default_rng(2).integers(1, 8, N)], 1), jnp.int32)
    mesh_cfg = MeshConfig(ici_fsdp=2, ici_expert=4)
    per_dev = N // 8
    cap = moe_ep.capacity_per_source(per_dev, k, 8, 2.0)
    # reference: drop on each device's token block exactly as documented, then dense experts
    ids_ref, w_ref = [], []
    for d in range(8):
        i, ww = moe_ep.apply_capacity(ids[d * per_dev:(d + 1) * per_dev], w[d * per_dev:(d + 1) * per_dev], 8, cap)
        ids_ref.append(i)
        w_ref.append(ww)
    ids_ref, w_ref = jnp.concatenate(ids_ref), jnp.concatenate(w_ref)
    assert int(jnp.sum(ids_ref == 8)) > 0  # expert 0 overflowed
    ids_safe = jnp.where(ids_ref == 8, 0, ids_ref)
    want = moe_lib.experts_dense(x[None], w_ref[None], ids_safe[None], gate, up, down)[0]
    got = _run_ep(mesh_cfg, x, w, ids, gate, up, down, capacity_factor=2.0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    dropless = _run_ep(mesh_cfg, x, w, ids, gate, up, down)
    assert not np.allclose(np.asarray(dropless), np.asarray(got))


def test_zero_router_sends_every_token_to_two_experts_no_loss():
    cfg, flat, batch, _, _ = _reference("tiny-moe", "dense")
    flat = {k: (jnp.zeros_like(v) if k.endswith("mlp/router") else v) for k, v in flat.items()}
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(functools.partial(_loss, cfg)))(flat, batch)
    loss, grads = _sharded(cfg, flat, batch, MOE_MESHES["ep8"], moe_exchange="gather")
    _assert_close(loss, grads, ref_loss, ref_grads)


# -- global-batch load balancing --------------------------------------------------------------------

def _aux_micro_batched(cfg, flat, batch, n, scope):
    """Sum of per-micro-batch aux terms as a train step with n strided micro-batches sees them."""
    from qwen3_jax.train.checkpoint import nest

    params = nest(flat)
    mbs = {k: jnp.swapaxes(v.reshape(-1, n, *v.shape[1:]), 0, 1) for k, v in batch.items()}
    if scope == "global":
        counts, tokens = moe_ep.global_router_counts(cfg, params, batch, n)
    total = 0.0
    for i in range(n):
        mb = {k: v[i] for k, v in mbs.items()}
        _, st = model_from_flat(cfg, flat)(mb["tokens"], mb["positions"], mb["segment_ids"], return_stats=True)
        if scope == "global":
            total = total + moe_ep.global_aux_share(counts, tokens, st["prob_sum"], cfg.num_experts)
        else:
            total = total + moe_lib.load_balancing_loss(st["counts"], st["prob_sum"], st["tokens"],
                                                        cfg.num_experts) / n
    return total


def _aux_full(cfg, flat, batch):
    _, st = model_from_flat(cfg, flat)(batch["tokens"], batch["positions"], batch["segment_ids"],
                                       return_stats=True)
    return moe_lib.load_balancing_loss(st["counts"], st["prob_sum"], st["tokens"], cfg.num_experts)


def test_global_aux_loss_micro_batched_sharded_equals_full_batch():
    cfg, flat, batch, _, _ = _reference("tiny-moe", "dense")
    want, want_g = jax.jit(jax.value_and_grad(functools.partial(_aux_full, cfg)))(flat, batch)
    mesh = sharding.make_mesh(MOE_MESHES["ep4_fsdp2"])
    psh = sharding.param_shardings(param_specs(cfg), mesh)
    bsh = sharding.batch_sharding(mesh)
    with sharding.use_rules(mesh, moe_exchange="gather"):
        f = jax.jit(jax.value_and_grad(lambda p, b: _aux_micro_batched(cfg, p, b, 2, "global")),
                    in_shardings=(psh, bsh), out_shardings=(None, psh))
        got, got_g = f(flat, batch)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    for k in want_g:
        np.testing.assert_allclose(np.asarray(got_g[k]), np.asarray(want_g[k]), rtol=1e-5, atol=1e-8, err_msg=k)
    # micro-batch scope: the mean of per-micro-batch losses, each with its own f: larger than the
    # global one (fewer tokens per f estimate → more apparent imbalance), not equal to it
    micro = jax.jit(lambda p, b: _aux_micro_batched(cfg, p, b, 2, "micro_batch"))(flat, batch)
    assert float(micro) > float(want) + 1e-4


def test_train_step_global_aux_micro_batched_sharded_equals_one_pass():
    """make_train_step: 2 micro-batches on FSDP x EP give the 1-pass global aux loss and update."""
    import optax

    from qwen3_jax.train.checkpoint import flatten
    from qwen3_jax.train.step import init_state, make_train_step

    cfg = _cfg("tiny-moe", moe_impl="dense", router_aux_loss_coef=0.1)
    opt = optax.sgd(1.0)
    state = init_state(cfg, opt, 0)
    batch = dict(_batch(cfg), loss_mask=(_batch(cfg)["segment_ids"] > 0).astype(jnp.int32))
    ref_state, ref_m = jax.jit(make_train_step(cfg, opt, micro_batches=1))(state, batch)
    mesh = sharding.make_mesh(MOE_MESHES["ep4_fsdp2"])
    ssh = sharding.tree_shardings(state, param_specs(cfg), mesh)
    bsh = sharding.batch_sharding(mesh)
    with sharding.use_rules(mesh, moe_exchange="gather"):
        step = jax.jit(make_train_step(cfg, opt, micro_batches=2), in_shardings=(ssh, bsh), out_shardings=(ssh, None))
        new_state, m = step(state, batch)
        _, m_micro = jax.jit(make_train_step(cfg, opt, micro_batches=2, aux_scope="micro_batch"),
                             in_shardings=(ssh, bsh), out_shardings=(ssh, None))(state, batch)
    np.testing.assert_allclose(float(m["aux_loss"]), float(ref_m["aux_loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m["loss"]), float(ref_m["loss"]), rtol=1e-5)
    got, want = flatten(new_state.params), flatten(ref_state.params)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    assert float(m_micro["aux_loss"]) > float(ref_m["aux_loss"]) + 1e-4


def test_megablox_grouped_matmuls_match_ragged_dot():
    """The TPU kernel path (megablox gmm/tgmm, here in Pallas interpret mode on CPU): values and
    gradients equal lax.ragged_dot's, with rows past the groups' sum (the dropless buffer's empty
    tail) giving 0 and no gradient."""
    import jax
    import jax.numpy as jnp

    from qwen3_jax.model import moe_ep

    R, D, F, G = 256, 128, 128, 2
    ks = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(ks[0], (R, D), jnp.float32)
    gate, up = (jax.random.normal(k, (G, D, F), jnp.float32) / D ** 0.5 for k in ks[1:3])
    down = jax.random.normal(ks[3], (G, F, D), jnp.float32) / F ** 0.5
    sizes = jnp.array([100, 60], jnp.int32)  # 96 empty rows at the end

    def loss(kernel, *w):
        return jnp.sum(moe_ep._grouped(x, sizes, *w, kernel) ** 2)

    ref, ref_g = jax.value_and_grad(lambda *w: loss("ragged_dot", *w), argnums=(0, 1, 2))(gate, up, down)
    got, got_g = jax.value_and_grad(lambda *w: loss("megablox_interpret", *w), argnums=(0, 1, 2))(gate, up, down)
    np.testing.assert_allclose(got, ref, rtol=2e-5)
    for a, b in zip(got_g, ref_g):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    assert bool(jnp.all(moe_ep._grouped(x, sizes, gate, up, down, "megablox_interpret")[160:] == 0))
