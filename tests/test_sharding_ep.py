"""Sharded loss and gradients equal the single-device run (fp32, 8 fake CPU devices), dropless
expert parallelism under any routing skew, and the global-batch load-balancing loss.

Nearly all the time here is XLA compiling, so each program is compiled once and shared: one
single-device reference per model (value and grads in one program, router statistics as its
aux output), one sharded program per (model, mesh) and one per train-step variant. They are
traced and lowered in the main thread and compiled ahead on two worker threads (`_Programs`;
XLA releases the GIL), overlapping each other and the cheap tests that run first.
"""

import contextlib
import functools
import io
import sys
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qwen3_jax import sharding
from qwen3_jax.config import get_config
from qwen3_jax.model import create_model
from qwen3_jax.model import moe as moe_lib
from qwen3_jax.model import moe_compute, moe_ep
from qwen3_jax.params import flat_params, flatten, model_from_flat, param_specs
from qwen3_jax.sharding import MeshConfig
from qwen3_jax.train.config import LossConfig
from qwen3_jax.train.step import init_state, make_train_step

RTOL, ATOL = 1e-5, 1e-6  # fp32: only the summation order differs
B, T = 8, 16
AUX_COEF = 0.1  # large enough that a wrong load-balancing gradient shows at RTOL/ATOL
MICRO = 2  # micro-batches of the train-step tests
# LLVM -O0 for these tiny programs: about half the compile time. The HLO passes (SPMD
# partitioner, shard_map's collectives) that these tests are about run as at the default level.
XLA_OPTS = {"xla_backend_optimization_level": 0}
COMPILE_THREADS = 2

MESHES = {
    "fsdp8": MeshConfig(ici_fsdp=8),
    "fsdp4_tp2": MeshConfig(ici_fsdp=4, ici_tensor=2),
    "ep2_fsdp4": MeshConfig(ici_fsdp=4, ici_expert=2),
    "ep4_fsdp2": MeshConfig(ici_fsdp=2, ici_expert=4),
    "ep8": MeshConfig(ici_fsdp=1, ici_expert=8),
    "tp2_ep4": MeshConfig(ici_fsdp=1, ici_expert=4, ici_tensor=2),
    "data2_ep2_tp2": MeshConfig(ici_data=2, ici_fsdp=1, ici_expert=2, ici_tensor=2),
}
# tiny-moe: mesh -> local expert form (ModelConfig.moe_impl). Without an `expert` axis the experts
# run under GSPMD; with one, inside moe_ep's shard_map. fsdp8 and ep2_fsdp4 run the blocked form
# (CPU's auto), ep4_fsdp2 the sort + ragged_dot form (against the same dense single-device
# reference: every form is exact).
MOE_CASES = {"fsdp8": "blocked", "fsdp4_tp2": "dense", "ep2_fsdp4": "blocked", "ep4_fsdp2": "ragged_dot",
             "ep8": "dense", "tp2_ep4": "dense", "data2_ep2_tp2": "dense"}
# tiny-dense: FSDP x TP splits every dense-MLP/attention dim; data x expert x tensor makes the
# expert axis a pure batch axis for a model without experts. (Pure FSDP: fsdp8 above.)
DENSE_MESHES = ("fsdp4_tp2", "data2_ep2_tp2")
STEP_MESH = "ep4_fsdp2"  # FSDP x EP for the micro-batched train step


def _cfg(name, impl="dense"):  # full remat: the policy train.build resolves 'auto' to is build's business
    return get_config(name, compute_dtype="float32", moe_impl=impl, router_aux_loss_coef=AUX_COEF, remat="full")


def _batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    seg = np.where(np.arange(T) < T - 3, 1, 0)[None].repeat(B, 0)
    seg[1, 4:] = 0  # rows with different token counts: per-micro-batch f differs from the global one
    seg = jnp.asarray(seg, jnp.int32)
    return {"tokens": tokens, "targets": jnp.roll(tokens, -1, 1), "segment_ids": seg,
            "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)),
            "loss_mask": (seg > 0).astype(jnp.int32)}


def _loss(cfg, flat, batch):
    """Masked mean CE + coef · full-batch load-balancing loss; aux output: that aux loss and the
    router statistics per sequence."""
    logits, stats = model_from_flat(cfg, flat)(batch["tokens"], batch["positions"], batch["segment_ids"],
                                               return_stats=True)
    lse = jax.nn.logsumexp(logits, -1)
    tgt = jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    mask = batch["loss_mask"].astype(jnp.float32)
    ce = jnp.sum((lse - tgt) * mask) / jnp.sum(mask)
    if not cfg.is_moe:
        return ce, {}
    aux = moe_lib.load_balancing_loss(stats["counts"], stats["prob_sum"], stats["tokens"], cfg.num_experts)
    return ce + cfg.router_aux_loss_coef * aux, dict(stats, aux=aux)


def _value_and_grad(cfg):
    return jax.value_and_grad(functools.partial(_loss, cfg), has_aux=True)


# -- programs: lowered here, compiled ahead on two threads ------------------------------------------

@functools.lru_cache(maxsize=None)
def _inputs(name):
    cfg = _cfg(name)
    return cfg, flat_params(create_model(cfg, 0)), _batch(cfg)


def _lower(key):
    kind, arg = key
    if kind == "ref":  # single device, no sharding rules
        cfg, flat, batch = _inputs(arg)
        return jax.jit(_value_and_grad(cfg)).lower(flat, batch)
    mesh = sharding.make_mesh(MESHES[STEP_MESH if kind == "step" else arg])
    bsh = sharding.batch_sharding(mesh)
    if kind == "step":  # arg: aux scope
        cfg, _, batch = _inputs("tiny-moe")
        opt = optax.sgd(1.0)
        state = init_state(cfg, opt, 0)
        ssh = sharding.tree_shardings(state, param_specs(cfg), mesh)
        with sharding.use_rules(mesh, moe_exchange="gather"):
            step = make_train_step(cfg, opt, LossConfig(aux_scope=arg), micro_batches=MICRO)
            return jax.jit(step, in_shardings=(ssh, bsh), out_shardings=(ssh, None)).lower(state, batch)
    cfg, flat, batch = _inputs("tiny-moe" if kind == "moe" else "tiny-dense")
    if kind == "moe":
        cfg = cfg.replace(moe_impl=MOE_CASES[arg])
    psh = sharding.param_shardings(param_specs(cfg), mesh)
    with sharding.use_rules(mesh, moe_exchange="gather"):
        fn = jax.jit(_value_and_grad(cfg), in_shardings=(psh, bsh), out_shardings=(None, psh))
        return fn.lower(flat, batch)


def _keys_for(item):
    """The programs one collected test of this module runs."""
    params = item.callspec.params if hasattr(item, "callspec") else {}
    name = item.originalname
    if name == "test_moe_loss_and_grads_match_single_device":
        return [("ref", "tiny-moe"), ("moe", params["mesh_name"])]
    if name == "test_dense_loss_and_grads_match_single_device":
        return [("ref", "tiny-dense"), ("dense", params["mesh_name"])]
    if name == "test_zero_router_sends_every_token_to_two_experts_no_loss":
        return [("ref", "tiny-moe"), ("moe", "ep8")]
    if name == "test_train_step_global_aux_micro_batched_sharded_equals_one_pass":
        return [("ref", "tiny-moe"), ("step", "global"), ("step", "micro_batch")]
    return []


class _Programs:
    def __init__(self, keys):
        self.pool = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="xla-compile")
        self.futures = {}
        for key in keys:
            self._submit(key)

    def _submit(self, key):
        if key not in self.futures:
            self.futures[key] = self.pool.submit(_lower(key).compile, XLA_OPTS)

    def run(self, key, *args):
        self._submit(key)
        compiled = self.futures[key].result()
        args = jax.device_put(args, compiled.input_shardings[0])
        return compiled(*args)


@pytest.fixture(scope="module", autouse=True)
def programs(request):
    """Starts compiling every program the selected tests of this module need, in test order."""
    me = sys.modules[__name__]
    keys = [k for item in request.session.items if getattr(item, "module", None) is me for k in _keys_for(item)]
    progs = _Programs(dict.fromkeys(keys))
    yield progs
    progs.pool.shutdown(wait=True, cancel_futures=True)


def _reference(programs, name):
    cfg, flat, batch = _inputs(name)
    (loss, extra), grads = programs.run(("ref", name), flat, batch)
    return cfg, flat, batch, loss, extra, grads


def _assert_close(loss, grads, ref_loss, ref_grads):
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=RTOL)
    assert set(grads) == set(ref_grads)
    for k in ref_grads:
        np.testing.assert_allclose(np.asarray(grads[k]), np.asarray(ref_grads[k]), rtol=RTOL, atol=ATOL, err_msg=k)


# -- dropless under skew, capacity mode (small direct calls of moe_ep.experts_parallel) ---------------

def _expert_inputs(E=8, D=16, F=8, N=64, k=2, seed=0):
    r = np.random.default_rng(seed)
    x = jnp.asarray(r.normal(size=(N, D)), jnp.float32)
    w = jnp.asarray(r.uniform(0.1, 1.0, size=(N, k)), jnp.float32)
    gate, up = (jnp.asarray(r.normal(size=(E, D, F)) * 0.3, jnp.float32) for _ in range(2))
    down = jnp.asarray(r.normal(size=(E, F, D)) * 0.3, jnp.float32)
    return x, w, gate, up, down


@functools.lru_cache(maxsize=None)
def _ep_fn(mesh_name, form="dense", capacity_factor=None):
    """One jitted expert-parallel call per (mesh, form, capacity); the routing is an input."""
    mesh = sharding.make_mesh(MESHES[mesh_name])
    with sharding.use_rules(mesh, moe_exchange="gather", capacity_factor=capacity_factor):
        ctx = sharding.expert_parallel()
    assert ctx is not None
    return jax.jit(lambda x, w, ids, *p: moe_ep.experts_parallel(x[None], w[None], ids[None], *p,
                                                                 ctx=ctx, form=form)[0],
                   compiler_options=XLA_OPTS)


@pytest.mark.parametrize("form", ["dense", "ragged_dot", "blocked"])
def test_dropless_for_any_skew(form):
    """EP=8 and FSDP x EP=4: every assignment reaches its expert, whatever the routing: all to one
    expert, all to one device's experts, random."""
    x, w, gate, up, down = _expert_inputs()
    N, k = w.shape
    skews = {"one_expert": np.zeros((N, k)),  # every assignment to expert 0
             "one_device": np.stack([np.zeros(N), np.ones(N)], 1),  # experts 0 and 1 (device 0 at EP=4)
             "random": np.random.default_rng(1).integers(0, 8, (N, k))}
    for skew, ids in skews.items():
        ids = jnp.asarray(ids, jnp.int32)
        want = moe_compute.experts_dense(x, w, ids, gate, up, down)
        for mesh_name in ("ep8", "ep4_fsdp2"):
            got = _ep_fn(mesh_name, form)(x, w, ids, gate, up, down)
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5,
                                       err_msg=f"{skew} {mesh_name}")


def test_capacity_factor_drops_overflow_in_token_order():
    x, w, gate, up, down = _expert_inputs()
    N, k = w.shape
    ids = jnp.asarray(np.stack([np.zeros(N), np.random.default_rng(2).integers(1, 8, N)], 1), jnp.int32)
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
    want = moe_compute.experts_dense(x, w_ref, ids_safe, gate, up, down)
    got = _ep_fn("ep4_fsdp2", "dense", 2.0)(x, w, ids, gate, up, down)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    dropless = _ep_fn("ep4_fsdp2", "dense")(x, w, ids, gate, up, down)
    assert not np.allclose(np.asarray(dropless), np.asarray(got))


def test_megablox_grouped_matmuls_match_ragged_dot():
    """The TPU kernel path (megablox gmm/tgmm, here in Pallas interpret mode on CPU): values and
    gradients equal lax.ragged_dot's, with rows past the groups' sum (the dropless buffer's empty
    tail) giving 0 and no gradient."""
    R, D, F, G = 256, 128, 128, 2
    ks = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(ks[0], (R, D), jnp.float32)
    gate, up = (jax.random.normal(k, (G, D, F), jnp.float32) / D ** 0.5 for k in ks[1:3])
    down = jax.random.normal(ks[3], (G, F, D), jnp.float32) / F ** 0.5
    sizes = jnp.array([100, 60], jnp.int32)  # 96 empty rows at the end

    @functools.partial(jax.jit, static_argnums=0, compiler_options=XLA_OPTS)
    def value_and_grad(kernel, *w):
        def loss(*w):
            y = moe_compute.grouped_swiglu(x, sizes, *w, kernel)
            return jnp.sum(y ** 2), y
        return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(*w)

    (ref, _), ref_g = value_and_grad("ragged_dot", gate, up, down)
    (got, y), got_g = value_and_grad("megablox_interpret", gate, up, down)
    np.testing.assert_allclose(got, ref, rtol=2e-5)
    for a, b in zip(got_g, ref_g):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    assert bool(jnp.all(y[160:] == 0))


@pytest.mark.parametrize("kernel", ["ragged_dot", "megablox_interpret"])
def test_grouped_swiglu_split_at_saved_rows_is_exact(kernel):
    """keep_rows (expert parallelism's named part of a worst-case buffer): the first keep_rows
    sorted rows and the rest are gathered and computed apart. Cut inside a group (rows in the
    rest) and past the live rows (the common case: none), values and gradients equal the unsplit
    computation's, also under a remat policy that keeps `moe_wi`; and that policy keeps the
    gate/up outputs of keep_rows rows, not of the buffer."""
    R, D, F, G = 256, 128, 256, 2
    ks = jax.random.split(jax.random.key(1), 5)
    x = jax.random.normal(ks[0], (R, D), jnp.float32)
    w = [jax.random.normal(k, (G, D, F), jnp.float32) / D ** 0.5 for k in ks[1:3]]
    w.append(jax.random.normal(ks[3], (G, F, D), jnp.float32) / F ** 0.5)
    sizes = jnp.array([100, 60], jnp.int32)
    order = jax.random.permutation(ks[4], R)
    live = np.asarray(order)[:160]  # x's rows inside the groups
    keep_policy = jax.checkpoint_policies.save_only_these_names("moe_wi")

    def f(keep, x, *w):
        return moe_compute.grouped_swiglu_gathered(x, order, sizes, *w, kernel, keep)

    @functools.partial(jax.jit, static_argnums=(0, 1), compiler_options=XLA_OPTS)
    def value_and_grad(keep, remat, x, *w):
        def loss(x, *w):
            g = functools.partial(f, keep)
            y = jax.checkpoint(g, policy=keep_policy)(x, *w) if remat else g(x, *w)
            return jnp.sum(jnp.sin(y))
        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(x, *w)

    ref, ref_g = value_and_grad(None, False, x, *w)
    for keep in (64, 200):
        for remat in (False, True):
            got, got_g = value_and_grad(keep, remat, x, *w)
            np.testing.assert_allclose(got, ref, rtol=2e-5, err_msg=f"keep {keep}")
            got_g, want_g = (got_g[0][live], *got_g[1:]), (ref_g[0][live], *ref_g[1:])
            for a, b in zip(got_g, want_g):
                np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5, err_msg=f"keep {keep} remat {remat}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(jax.checkpoint(lambda *w: jnp.sum(f(64, x, *w)), policy=keep_policy),
                                                *w)
    named = [line for line in out.getvalue().splitlines() if "named 'moe_wi'" in line]
    assert len(named) == 2 and all(f"[64,{F}]" in line for line in named), out.getvalue()


# -- whole model: sharded loss and gradients equal the single-device run ------------------------------

@pytest.mark.parametrize("mesh_name", list(MOE_CASES))
def test_moe_loss_and_grads_match_single_device(programs, mesh_name):
    cfg, flat, batch, ref_loss, _, ref_grads = _reference(programs, "tiny-moe")
    (loss, _), grads = programs.run(("moe", mesh_name), flat, batch)
    _assert_close(loss, grads, ref_loss, ref_grads)


@pytest.mark.parametrize("mesh_name", DENSE_MESHES)
def test_dense_loss_and_grads_match_single_device(programs, mesh_name):
    cfg, flat, batch, ref_loss, _, ref_grads = _reference(programs, "tiny-dense")
    (loss, _), grads = programs.run(("dense", mesh_name), flat, batch)
    _assert_close(loss, grads, ref_loss, ref_grads)


def test_zero_router_sends_every_token_to_two_experts_no_loss(programs):
    """Router weights 0: the top-2 ties send every token to experts 0 and 1, i.e. at EP=8 all of
    the batch's tokens to two of the eight devices, and none is lost (the programs of the ep8
    case and of the reference, run on other parameters)."""
    cfg, flat, batch, _, _, _ = _reference(programs, "tiny-moe")
    flat = {k: (jnp.zeros_like(v) if k.endswith("mlp/router") else v) for k, v in flat.items()}
    (ref_loss, ref_extra), ref_grads = programs.run(("ref", "tiny-moe"), flat, batch)
    counts = np.asarray(ref_extra["counts"]).sum((0, 1))
    assert counts[2:].sum() == 0 and counts[0] == counts[1] > 0
    (loss, _), grads = programs.run(("moe", "ep8"), flat, batch)
    _assert_close(loss, grads, ref_loss, ref_grads)


# -- global-batch load balancing --------------------------------------------------------------------

def test_train_step_global_aux_micro_batched_sharded_equals_one_pass(programs):
    """make_train_step with 2 micro-batches on FSDP x EP: the global-batch aux loss, the loss and
    the SGD update equal the single-device one-pass values (loss = CE + 0.1·aux on the full
    batch at once); with aux_scope="micro_batch" the aux loss is the mean of the micro-batches'
    own losses, which differs, and so does the router update (the comparison can fail)."""
    cfg, flat, batch, ref_loss, ref_extra, ref_grads = _reference(programs, "tiny-moe")
    state = init_state(cfg, optax.sgd(1.0), 0)
    new_state, m = programs.run(("step", "global"), state, batch)
    np.testing.assert_allclose(float(m["aux_loss"]), float(ref_extra["aux"]), rtol=1e-6)
    np.testing.assert_allclose(float(m["loss"]), float(ref_loss), rtol=RTOL)
    got = flatten(new_state.params)
    assert set(got) == set(flat)
    for k in flat:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(flat[k] - ref_grads[k]), rtol=RTOL, atol=ATOL,
                                   err_msg=k)

    micro_state, m_micro = programs.run(("step", "micro_batch"), state, batch)
    c, p, n = (np.asarray(ref_extra[k]) for k in ("counts", "prob_sum", "tokens"))
    want_micro = np.mean([moe_lib.load_balancing_loss(c[:, i::MICRO], p[:, i::MICRO], n[i::MICRO], cfg.num_experts)
                          for i in range(MICRO)])  # strided micro-batches, as split_micro_batches
    np.testing.assert_allclose(float(m_micro["aux_loss"]), want_micro, rtol=1e-6)
    assert float(m_micro["aux_loss"]) > float(ref_extra["aux"]) + 1e-4
    micro = flatten(micro_state.params)
    routers = [k for k in flat if k.endswith("mlp/router")]
    assert routers and not all(np.allclose(micro[k], got[k], rtol=RTOL, atol=ATOL) for k in routers)


def _shard_map_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "shard_map":
            yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _shard_map_eqns(sub)


def test_expert_weights_cross_the_shard_map_in_compute_dtype():
    """bf16 compute with fp32 master weights: the expert weights enter moe_ep's shard_map as bf16,
    so their FSDP all-gather and, in the backward pass, their gradients' reduction over the
    axes the weights' specs omit move bf16, not fp32 (AOT 30b-a3b on v5p-128: all-reduce wire
    bytes 44 -> 32 GiB per chip per step). Traced only, nothing compiled."""
    cfg = get_config("tiny-moe", compute_dtype="bfloat16", router_aux_loss_coef=AUX_COEF, remat="full")
    flat, batch = flat_params(create_model(cfg, 0)), _batch(cfg)
    assert flat[next(k for k in flat if k.endswith("gate"))].dtype == jnp.float32
    mesh = sharding.make_mesh(MESHES["ep4_fsdp2"])
    with sharding.use_rules(mesh, moe_exchange="gather"):
        jaxpr = jax.make_jaxpr(_value_and_grad(cfg))(flat, batch).jaxpr
    E, D, F = cfg.num_experts, cfg.d_model, cfg.moe_ffn_dim
    weight_shapes = {(E, D, F), (E, F, D)}
    maps = list(_shard_map_eqns(jaxpr))
    crossing = [(v.aval.shape, v.aval.dtype) for e in maps for v in [*e.invars, *e.outvars]
                if v.aval.shape in weight_shapes]
    # forward: gate, up, down in; backward (the transposed shard_map): their cotangents out
    assert len(crossing) >= 6, crossing
    assert {dt for _, dt in crossing} == {jnp.dtype(jnp.bfloat16)}, crossing
