"""Expert parallelism's choices: which exchange and which local expert form run on each platform
(`moe_ep.plan`: moe_impl='auto' resolves per platform as on one device, blocked on GPU, and an
explicit form is honoured), the exchange's renamed value ('ragged' -> 'ragged_all_to_all'), and
the ragged_all_to_all exchange's received rows through every form (`moe_ep.local_rows`): the same
values and gradients, with or without the saved-rows split."""

import contextlib
import functools
import io
import logging
import re

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3_jax import errors, sharding
from qwen3_jax.model import moe_compute, moe_ep
from qwen3_jax.sharding import MeshConfig

XLA_OPTS = {"xla_backend_optimization_level": 0}


@pytest.fixture
def fresh_warnings(monkeypatch):
    """errors.renamed logs once per process: forget what it has told."""
    monkeypatch.setattr(errors, "_told", set())


def test_plan_resolves_auto_per_platform_and_honours_an_explicit_form():
    # qwen3-30b-a3b's expert shapes (d_model 2048, expert ffn 768), and a tiny one
    assert moe_ep.plan("auto", "auto", "gpu", 2048, 768) == ("ragged_all_to_all", "blocked")
    assert moe_ep.plan("auto", "auto", "cuda", 2048, 768) == ("ragged_all_to_all", "blocked")
    assert moe_ep.plan("auto", "auto", "tpu", 2048, 768) == ("ragged_all_to_all", "megablox")
    assert moe_ep.plan("auto", "auto", "tpu", 64, 32) == ("ragged_all_to_all", "ragged_dot")
    assert moe_ep.plan("auto", "auto", "cpu", 2048, 768) == ("gather", "blocked")
    for form in ("dense", "ragged_dot", "blocked", "megablox"):
        for platform in ("gpu", "tpu", "cpu"):
            assert moe_ep.plan("auto", form, platform, 2048, 768)[1] == form, (form, platform)
    assert moe_ep.plan("gather", "auto", "gpu", 2048, 768) == ("gather", "blocked")
    with pytest.raises(ValueError, match="moe_exchange='sideways' is not one of"):
        moe_ep.plan("sideways", "auto", "gpu", 2048, 768)
    with pytest.raises(ValueError, match="moe_impl='sparse'"):
        moe_ep.plan("auto", "sparse", "gpu", 2048, 768)


def test_old_exchange_name_is_accepted_with_a_warning(fresh_warnings, caplog):
    assert moe_ep.EXCHANGES == ("auto", "gather", "ragged_all_to_all")
    assert moe_ep.EXCHANGE_RENAMES == {"ragged": "ragged_all_to_all"}
    with caplog.at_level(logging.WARNING, logger="qwen3_jax"):
        assert moe_ep.canonical_exchange("ragged") == "ragged_all_to_all"
        assert moe_ep.canonical_exchange("ragged") == "ragged_all_to_all"  # told once
    told = [r.getMessage() for r in caplog.records]
    assert len(told) == 1 and "train.moe_exchange" in told[0] and "'ragged_all_to_all'" in told[0]
    for value in ("auto", "gather", "ragged_all_to_all", "sideways"):  # anything else: unchanged
        assert moe_ep.canonical_exchange(value) == value
    assert moe_ep.resolve_exchange("ragged", "tpu") == "ragged_all_to_all"
    assert moe_ep.resolve_exchange("ragged", "cpu") == "ragged_all_to_all"  # explicit: not 'auto'


def _primitives(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn.primitive.name
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _primitives(sub)


def _traced_on(platform, monkeypatch, exchange="auto", form="auto"):
    """The primitives of experts_parallel traced for `platform` (the Context's platform replaced:
    tracing needs no such device) on 8 fake devices, expert axis 8."""
    monkeypatch.setattr(sharding.Context, "platform", property(lambda self: platform))
    mesh = sharding.make_mesh(MeshConfig(ici_fsdp=1, ici_expert=8))
    E, D, F, N, k = 8, 16, 8, 64, 2
    x = jnp.zeros((1, N, D), jnp.float32)
    w = jnp.ones((1, N, k), jnp.float32)
    ids = jnp.zeros((1, N, k), jnp.int32)
    gate = up = jnp.zeros((E, D, F), jnp.float32)
    down = jnp.zeros((E, F, D), jnp.float32)
    with sharding.use_rules(mesh, moe_exchange=exchange):
        ctx = sharding.expert_parallel()
        jaxpr = jax.make_jaxpr(functools.partial(moe_ep.experts_parallel, ctx=ctx, form=form))(
            x, w, ids, gate, up, down)
    return set(_primitives(jaxpr.jaxpr))


def test_auto_on_gpu_runs_the_blocked_form_not_ragged_dot(monkeypatch, fresh_warnings, caplog):
    """The silent path this replaces: under expert parallelism on a GPU the received rows went
    through lax.ragged_dot whatever moe_impl said (XLA:GPU expands it into a masked copy of the
    rows per expert). Now auto is the blocked form there, ragged_dot only when asked for; the old
    exchange name traces the same program as the new one."""
    gpu = _traced_on("gpu", monkeypatch)
    assert "ragged_all_to_all" in gpu and "ragged_dot_general" not in gpu and "ragged_dot" not in gpu
    asked = _traced_on("gpu", monkeypatch, form="ragged_dot")
    assert "ragged_all_to_all" in asked and ({"ragged_dot_general", "ragged_dot"} & asked)
    with caplog.at_level(logging.WARNING, logger="qwen3_jax"):
        old = _traced_on("gpu", monkeypatch, exchange="ragged")
    assert old == _traced_on("gpu", monkeypatch, exchange="ragged_all_to_all") == gpu
    assert any("'ragged' is now called 'ragged_all_to_all'" in r.getMessage() for r in caplog.records)
    cpu = _traced_on("cpu", monkeypatch)  # auto on CPU: the gather exchange (XLA:CPU cannot run the other)
    assert "ragged_all_to_all" not in cpu and "all_gather" in cpu


# -- the received rows through every form ---------------------------------------------------------

def _buffer_case(seed=0, X=4, E_loc=2, D=16, F=8, rows=40):
    """A receive buffer of `rows` rows from X sources, (source, local expert)-major, the rows past
    the received ones zero (as the exchange leaves them)."""
    r = np.random.default_rng(seed)
    recv_XE = r.integers(0, 4, (X, E_loc)).astype(np.int32)
    recv_XE[1, 0] = 0  # a source sending nothing to an expert
    live = int(recv_XE.sum())
    assert live < rows
    buf = np.zeros((rows, D), np.float32)
    buf[:live] = r.normal(size=(live, D))
    gate, up = (jnp.asarray(r.normal(size=(E_loc, D, F)) * 0.3, jnp.float32) for _ in range(2))
    down = jnp.asarray(r.normal(size=(E_loc, F, D)) * 0.3, jnp.float32)
    probe = jnp.asarray(r.normal(size=(rows, D)), jnp.float32)
    return jnp.asarray(recv_XE), jnp.asarray(buf), (gate, up, down), probe, live


@functools.lru_cache(maxsize=None)
def _local_rows_grad(form, keep):
    def loss(buf, recv_XE, probe, *w):
        y = moe_ep.local_rows(buf, recv_XE, *w, form, keep)
        return jnp.sum(y * probe), y

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 3, 4, 5), has_aux=True), compiler_options=XLA_OPTS)


def test_local_rows_every_form_equal_the_reference():
    recv_XE, buf, w, probe, live = _buffer_case()
    ids = np.asarray(moe_ep.buffer_experts(recv_XE, buf.shape[0]))
    E_loc = w[0].shape[0]
    assert np.all(ids[live:] == E_loc) and np.all(ids[:live] < E_loc)
    want = moe_compute.experts_dense(buf, jnp.ones((buf.shape[0], 1)), jnp.asarray(ids)[:, None], *w)
    (_, ref), ref_g = _local_rows_grad("ragged_dot", None)(buf, recv_XE, probe, *w)
    np.testing.assert_allclose(ref, want, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(ref)[live:] == 0)
    for form in ("dense", "blocked", "ragged_dot"):
        for keep in (None, 3, live, 1000):  # the saved-rows split inside a group, at the live rows, past all
            (_, y), g = _local_rows_grad(form, keep)(buf, recv_XE, probe, *w)
            np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5, err_msg=f"{form} {keep}")
            for a, b in zip(g, ref_g):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"{form} {keep} grads")


def _saved_moe_wi_elements(fn, *args):
    """Elements of the residuals named `moe_wi` that a save-moe_wi policy keeps for fn's backward."""
    policy = jax.checkpoint_policies.save_only_these_names("moe_wi")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(jax.checkpoint(fn, policy=policy), *args)
    shapes = re.findall(r"\w+\[([\d,]*)\] named 'moe_wi'", out.getvalue())
    assert shapes, out.getvalue()
    return sum(int(np.prod([int(d) for d in s.split(",")])) for s in shapes)


def test_blocked_keep_rows_names_only_the_blocks_that_hold_them():
    """experts_blocked(keep_rows): the policy that keeps `moe_wi` keeps the gate/up outputs of the
    ceil(keep/C) + E blocks that can hold the first keep_rows assignments, not of all G blocks
    (the worst-case buffer of expert parallelism); the rest is recomputed."""
    R, D, F, E = 512, 16, 8, 2
    r = np.random.default_rng(3)
    x = jnp.asarray(r.normal(size=(R, D)), jnp.float32)
    ids = jnp.asarray(np.where(np.arange(R) < 100, r.integers(0, E, R), E)[:, None], jnp.int32)
    w = jnp.ones((R, 1), jnp.float32)
    gate, up = (jnp.asarray(r.normal(size=(E, D, F)), jnp.float32) for _ in range(2))
    down = jnp.asarray(r.normal(size=(E, F, D)), jnp.float32)
    C = moe_compute.block_rows(R, E)
    G = -(-R // C) + E

    def blocked(keep):
        return lambda x, g, u, d: jnp.sum(moe_compute.experts_blocked(x, w, ids, g, u, d, keep_rows=keep))

    assert _saved_moe_wi_elements(blocked(None), x, gate, up, down) == 2 * G * C * F
    keep = 120
    assert _saved_moe_wi_elements(blocked(keep), x, gate, up, down) == 2 * (-(-keep // C) + E) * C * F
    np.testing.assert_allclose(jax.grad(blocked(keep))(x, gate, up, down), jax.grad(blocked(None))(x, gate, up, down),
                               rtol=1e-5, atol=1e-5)


def test_shared_pieces_on_numbers_worked_by_hand():
    ids = jnp.array([2, 0, 2, 3, 0, 2], jnp.int32)  # 3 = no expert (E = 3)
    np.testing.assert_array_equal(moe_compute.expert_ranks(ids, 3), [0, 0, 1, 0, 1, 2])
    order, sizes = moe_compute.sort_by_expert(ids, 3)
    np.testing.assert_array_equal(order, [1, 4, 0, 2, 5, 3])
    np.testing.assert_array_equal(sizes, [2, 0, 3])
    np.testing.assert_array_equal(moe_compute.exclusive_cumsum(jnp.array([2, 0, 3])), [0, 2, 2])
    keep, rest = moe_compute.split_groups(jnp.array([2, 0, 3], jnp.int32), 3)
    np.testing.assert_array_equal(keep, [2, 0, 1])
    np.testing.assert_array_equal(rest, [0, 0, 2])
    # the capacity drop and the padded-buffer slots use the same ranks
    ids_Nk = ids.reshape(3, 2)
    kept, weights = moe_ep.apply_capacity(ids_Nk, jnp.ones((3, 2)), 3, cap=2)
    np.testing.assert_array_equal(kept.reshape(-1), [2, 0, 2, 3, 0, 3])  # expert 2's third assignment dropped
    np.testing.assert_array_equal(weights.reshape(-1), [1, 1, 1, 1, 1, 0])
