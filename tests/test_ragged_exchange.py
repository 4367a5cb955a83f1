"""The expert-parallel ragged exchange (moe_ep's TPU/GPU default) checked by value on CPU.

XLA:CPU cannot run `jax.lax.ragged_all_to_all`, so the exchange is otherwise only compiled. Here
a numpy emulator of its documented semantics (`help(jax.lax.ragged_all_to_all)`) stands in: the
X devices of an expert group are X threads running moe_ep's own per-device body
(`_ragged_body`: sizes, offsets, exchange, grouped matmul, exchange back, un-sort) eagerly, whose
collectives meet at a barrier and are computed in numpy. The results must equal the gather
exchange's (compiled with shard_map on 8 fake CPU devices) for many routings: random, skewed,
experts left empty, every assignment to one expert, every token to one device's experts, and
with a capacity factor (dropped assignments)."""

import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3_jax import sharding
from qwen3_jax.model import moe_compute, moe_ep
from qwen3_jax.sharding import MeshConfig

E, D, F, K = 8, 16, 8, 2
TOKENS = 96  # over 8 batch shards: 12 per device
MESHES = {"ep8": MeshConfig(ici_fsdp=1, ici_expert=8), "ep4_fsdp2": MeshConfig(ici_fsdp=2, ici_expert=4),
          "ep2_fsdp4": MeshConfig(ici_fsdp=4, ici_expert=2)}
XLA_OPTS = {"xla_backend_optimization_level": 0}


# -- the emulator --------------------------------------------------------------------------------

def all_to_all_np(xs):
    """Tiled all_to_all over axis 0 (split and concatenate): device r gets chunk r of everyone's."""
    X = len(xs)
    return [np.concatenate([np.split(np.asarray(x), X)[r] for x in xs]) for r in range(X)]


def ragged_all_to_all_np(operands, outputs, input_offsets, send_sizes, output_offsets, recv_sizes):
    """jax.lax.ragged_all_to_all's documented semantics over the X devices of one axis (each
    argument a list over devices). Device s sends operand_s[in_s[i] : in_s[i] + send_s[i]] to
    device i // (K/X); it lands on the receiver at output_offsets_s[i], whose own recv_sizes (after
    an all_to_all, the documented constraint) must agree. Also rejected here: slices outside
    the arrays and two sources writing the same rows (undefined, and a bug in our offsets)."""
    X = len(operands)
    K = len(np.asarray(input_offsets[0]))
    per, left = divmod(K, X)
    assert not left and all(len(np.asarray(a)) == K for a in (*input_offsets, *send_sizes, *output_offsets,
                                                            *recv_sizes))
    ins, sends, outs, recvs = ([np.asarray(a) for a in arg]
                               for arg in (input_offsets, send_sizes, output_offsets, recv_sizes))
    for s, want in enumerate(all_to_all_np(recvs)):
        np.testing.assert_array_equal(sends[s], want, err_msg="send_sizes != all_to_all(recv_sizes)")
    results = [np.array(o, copy=True) for o in outputs]
    written = [np.zeros(len(o), bool) for o in outputs]
    for s in range(X):
        op = np.asarray(operands[s])
        for i in range(K):
            r, m = divmod(i, per)
            lo, n, at = int(ins[s][i]), int(sends[s][i]), int(outs[s][i])
            assert n == int(recvs[r][s * per + m]) and n >= 0
            assert 0 <= lo and lo + n <= len(op), f"device {s} sends rows {lo}:{lo + n} of {len(op)}"
            assert 0 <= at and at + n <= len(results[r]), f"device {s} writes rows {at}:{at + n} on {r}"
            assert not written[r][at:at + n].any(), f"overlapping writes on device {r}"
            written[r][at:at + n] = True
            results[r][at:at + n] = op[lo:lo + n]
    return results


class EmulatedGroup:
    """X threads, one per device of an expert group; each gets `rank(i)`, an object with the
    methods of moe_ep.LaxCollectives. A collective waits for all X, then each computes its own
    result from everyone's arguments in numpy."""

    def __init__(self, X):
        self.X = X
        self.barrier = threading.Barrier(X, timeout=120)
        self.slots = [None] * X

    def _meet(self, r, value, combine):
        self.slots[r] = value
        self.barrier.wait()
        out = combine(list(self.slots))
        self.barrier.wait()  # everyone has read the slots before they are reused
        return out

    def rank(self, r):
        group = self

        class Rank:
            def axis_size(self):
                return group.X

            def all_to_all(self, x):
                return jnp.asarray(group._meet(r, np.asarray(x), lambda xs: all_to_all_np(xs)[r]))

            def ragged_all_to_all(self, *args):
                args = tuple(np.asarray(a) for a in args)
                return jnp.asarray(group._meet(r, args, lambda all_: ragged_all_to_all_np(*zip(*all_))[r]))

        return Rank()

    def run(self, body, per_device_args):
        results, errors = [None] * self.X, []

        def worker(r):
            try:
                results[r] = body(*per_device_args[r], comm=self.rank(r))
            except BaseException as e:  # noqa: BLE001 (re-raised below)
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=worker, args=(r,)) for r in range(self.X)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


def test_emulator_reproduces_the_docstring_example():
    """The example in jax.lax.ragged_all_to_all's docstring (axis of size 2)."""
    got = ragged_all_to_all_np(
        operands=[np.array([1, 2, 2]), np.array([3, 4, 0])], outputs=[np.zeros(4, int), np.zeros(4, int)],
        input_offsets=[[0, 1], [0, 1]], send_sizes=[[1, 2], [1, 1]], output_offsets=[[0, 0], [1, 2]],
        recv_sizes=[[1, 1], [2, 1]])
    np.testing.assert_array_equal(got[0], [1, 3, 0, 0])
    np.testing.assert_array_equal(got[1], [2, 2, 4, 0])
    with pytest.raises(AssertionError, match="send_sizes"):  # sizes that disagree are caught
        ragged_all_to_all_np([np.zeros(3)] * 2, [np.zeros(4)] * 2, [[0, 1]] * 2, [[1, 2], [1, 1]],
                             [[0, 0], [1, 2]], [[1, 1], [1, 1]])


# -- the exchange against the gather path ------------------------------------------------------------

def _routing(kind, seed):
    r = np.random.default_rng(seed)
    if kind == "random":
        return np.argsort(r.normal(size=(TOKENS, E)), 1)[:, :K]
    if kind == "skewed":  # 80% of slot 0 to expert 5, slot 1 mostly expert 2
        return np.stack([np.where(r.uniform(size=TOKENS) < 0.8, 5, r.integers(0, E, TOKENS)),
                         np.where(r.uniform(size=TOKENS) < 0.7, 2, r.integers(0, E, TOKENS))], 1)
    if kind == "empty_experts":  # experts 0, 1, 4, 6, 7 never chosen
        return r.choice([2, 3, 5], size=(TOKENS, K))
    if kind == "one_expert":  # everything to expert 7 (the last device's)
        return np.full((TOKENS, K), 7)
    if kind == "one_device":  # experts 0 and 1: the first device at EP=4 and EP=8's first two
        return np.stack([np.zeros(TOKENS), np.ones(TOKENS)], 1)
    raise ValueError(kind)


ROUTINGS = ("random", "skewed", "empty_experts", "one_expert", "one_device")


def _inputs(seed=0):
    r = np.random.default_rng(seed)
    x = jnp.asarray(r.normal(size=(TOKENS, D)), jnp.float32)
    w = jnp.asarray(r.uniform(0.1, 1.0, size=(TOKENS, K)), jnp.float32)
    gate, up = (jnp.asarray(r.normal(size=(E, D, F)) * 0.3, jnp.float32) for _ in range(2))
    down = jnp.asarray(r.normal(size=(E, F, D)) * 0.3, jnp.float32)
    return x, w, gate, up, down


@functools.lru_cache(maxsize=None)
def _gather_fn(mesh_name, capacity_factor=None):
    mesh = sharding.make_mesh(MESHES[mesh_name])
    with sharding.use_rules(mesh, moe_exchange="gather", capacity_factor=capacity_factor):
        ctx = sharding.expert_parallel()
    return jax.jit(lambda x, w, ids, *p: moe_ep.experts_parallel(x[None], w[None], ids[None], *p, ctx=ctx,
                                                                 form="dense")[0],
                   compiler_options=XLA_OPTS)


def _emulated_ragged(mesh_name, x, w, ids, gate, up, down, capacity_factor=None, saved=None):
    """moe_ep's ragged exchange, device by device as experts_parallel lays it out: the batch is
    split over (fsdp, expert) in that order, each fsdp index an independent expert group."""
    cfg = MESHES[mesh_name]
    X, groups = cfg.ici_expert, cfg.ici_fsdp
    n = TOKENS // (X * groups)
    E_loc = E // X
    cap = moe_ep.capacity_per_source(n, K, E, capacity_factor)
    body = functools.partial(moe_ep._ragged_body, cap=cap, tensor_axes=(), saved=saved)
    out = []
    for g in range(groups):
        per_device = []
        for r in range(X):
            tok = slice((g * X + r) * n, (g * X + r + 1) * n)
            ids_r, w_r = moe_ep.apply_capacity(ids[tok], w[tok], E, cap)
            experts = slice(r * E_loc, (r + 1) * E_loc)
            per_device.append((x[tok], w_r, ids_r, gate[experts], up[experts], down[experts]))
        out += EmulatedGroup(X).run(body, per_device)
    return jnp.concatenate(out)


@pytest.mark.parametrize("routing", ROUTINGS)
def test_ragged_exchange_equals_gather_exchange_dropless(routing):
    x, w, gate, up, down = _inputs()
    ids = jnp.asarray(_routing(routing, 1), jnp.int32)
    want = moe_compute.experts_dense(x, w, ids, gate, up, down)
    for mesh_name in ("ep8", "ep4_fsdp2", "ep2_fsdp4"):
        gathered = _gather_fn(mesh_name)(x, w, ids, gate, up, down)
        np.testing.assert_allclose(gathered, want, rtol=1e-5, atol=1e-5, err_msg=f"gather {mesh_name}")
        got = _emulated_ragged(mesh_name, x, w, ids, gate, up, down)
        np.testing.assert_allclose(got, gathered, rtol=1e-5, atol=1e-5, err_msg=f"ragged {routing} {mesh_name}")


@pytest.mark.parametrize("routing", ["random", "skewed", "one_expert"])
def test_ragged_exchange_with_saved_rows_is_dropless(routing):
    """moe_saved_rows: the buffer's rows past ceil(saved·N·k) go through their own grouped
    matmuls. Below 1 (every device overflows it), at 1.25 (the skewed routings overflow) and at
    the worst case, the result is the gather exchange's: nothing is dropped."""
    x, w, gate, up, down = _inputs(5)
    ids = jnp.asarray(_routing(routing, 6), jnp.int32)
    gathered = _gather_fn("ep4_fsdp2")(x, w, ids, gate, up, down)
    for saved in (0.5, 1.25, 4.0):
        got = _emulated_ragged("ep4_fsdp2", x, w, ids, gate, up, down, saved=saved)
        np.testing.assert_allclose(got, gathered, rtol=1e-5, atol=1e-5, err_msg=f"saved {saved}")


@pytest.mark.parametrize("routing", ["random", "skewed", "one_expert"])
def test_ragged_exchange_equals_gather_exchange_with_capacity(routing):
    """capacity_factor=1: overflowing assignments are dropped on the sending device, the same ones
    in both exchanges; the buffers shrink to E·cap rows (every source's share still fits)."""
    x, w, gate, up, down = _inputs(3)
    ids = jnp.asarray(_routing(routing, 4), jnp.int32)
    gathered = _gather_fn("ep4_fsdp2", 1.0)(x, w, ids, gate, up, down)
    got = _emulated_ragged("ep4_fsdp2", x, w, ids, gate, up, down, capacity_factor=1.0)
    np.testing.assert_allclose(got, gathered, rtol=1e-5, atol=1e-5)
    if routing != "random":  # something was dropped: the dropless result differs
        dropless = moe_compute.experts_dense(x, w, ids, gate, up, down)
        assert not np.allclose(got, dropless, atol=1e-3)


def test_plan_pieces_on_a_small_case():
    """send_plan / recv_plan / buffer_order / unsort_combine on numbers worked by hand: 2 devices,
    2 local experts each, 3 tokens top-2 on device 0."""
    ids = jnp.array([[3, 0], [1, 3], [0, 2]], jnp.int32)  # assignments a = token·2 + slot
    order, sizes_XE, send, in_off = moe_ep.send_plan(ids, X=2, E_loc=2)
    np.testing.assert_array_equal(order, [1, 4, 2, 5, 0, 3])  # experts 0,0,1,2,3,3
    np.testing.assert_array_equal(sizes_XE, [[2, 1], [1, 2]])
    np.testing.assert_array_equal(send, [3, 3])
    np.testing.assert_array_equal(in_off, [0, 3])
    recv_XE = jnp.array([[1, 2], [0, 3]], jnp.int32)  # source 0: 1 row for my expert 0, 2 for 1; ...
    recv, recv_off = moe_ep.recv_plan(recv_XE)
    np.testing.assert_array_equal(recv, [3, 3])
    np.testing.assert_array_equal(recv_off, [0, 3])
    order_R, groups = moe_ep.buffer_order(recv_XE, rows=8)
    # buffer rows by local expert: 0 | 1 1 | 1 1 1 | unused unused
    np.testing.assert_array_equal(order_R, [0, 1, 2, 3, 4, 5, 6, 7])
    np.testing.assert_array_equal(groups, [1, 5])
    order_R, groups = moe_ep.buffer_order(jnp.array([[2, 1], [1, 0]], jnp.int32), rows=5)
    np.testing.assert_array_equal(order_R, [0, 1, 3, 2, 4])  # 0 0 1 | 0 | unused -> 0 0 0 1 unused
    np.testing.assert_array_equal(groups, [3, 1])
    ys = jnp.arange(6, dtype=jnp.float32)[:, None] * jnp.ones((1, 2))  # row i of the sorted layout = i
    w = jnp.array([[1.0, 10.0], [100.0, 1000.0], [1e4, 1e5]], jnp.float32)
    y = moe_ep.unsort_combine(ys, order, w)
    # token 0: assignments 0 (sorted row 4), 1 (row 0); token 1: 2 (row 2), 3 (row 5); token 2: 4 (row 1), 5 (row 3)
    np.testing.assert_allclose(y[:, 0], [4 * 1 + 0 * 10, 2 * 100 + 5 * 1000, 1 * 1e4 + 3 * 1e5])
