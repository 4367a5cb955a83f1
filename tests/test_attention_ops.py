"""Attention kernels against the dense reference: values, gradients, masks, memory."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3_jax.model import attention_ops as ops


def _qkv(B, T, N, K, H, dtype=jnp.float32, seed=0):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(kq, (B, T, N, H), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, T, K, H), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, T, K, H), jnp.float32).astype(dtype)
    return q, k, v


def _packed(B, T, seed=0, pad=True):
    """Rows of several documents of random lengths (ids 1, 2, ...), trailing padding (0)."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(1, T), size=min(4, T - 1), replace=False))
        end = T - int(rng.integers(1, max(2, T // 5))) if pad else T
        seg[b, :end] = np.searchsorted(cuts, np.arange(end), side="right")[:end] + 1
    return jnp.asarray(seg)


def _loss(fn, seg):
    # A loss with a non-trivial cotangent for every output element.
    def loss(q, k, v):
        o = fn(q, k, v, seg).astype(jnp.float32)
        w = jnp.sin(jnp.arange(o.size, dtype=jnp.float32)).reshape(o.shape)
        return (o * w).sum()
    return loss


def _compare(q, k, v, seg, block, atol, grads=True):
    # jitted: op by op, the chunked kernel's loops dispatch hundreds of small computations
    ref = lambda q, k, v, s: ops.reference_attention(q, k, v, s)
    chk = lambda q, k, v, s: ops.chunked_attention(q, k, v, s, block=block)
    o_ref, o_chk = jax.jit(ref)(q, k, v, seg), jax.jit(chk)(q, k, v, seg)
    assert o_chk.shape == o_ref.shape and o_chk.dtype == o_ref.dtype
    np.testing.assert_allclose(np.asarray(o_chk, np.float32), np.asarray(o_ref, np.float32), atol=atol, rtol=atol)
    if grads:
        g_ref = jax.jit(jax.grad(_loss(ref, seg), argnums=(0, 1, 2)))(q, k, v)
        g_chk = jax.jit(jax.grad(_loss(chk, seg), argnums=(0, 1, 2)))(q, k, v)
        for name, a, b in zip("qkv", g_chk, g_ref):
            assert a.dtype == b.dtype, name
            scale = float(jnp.abs(b.astype(jnp.float32)).max())
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                       atol=atol * scale, rtol=atol, err_msg=f"d{name}")


# (B, T, N, K, H, block): GQA, MHA, MQA; T divisible by the block, not, odd, shorter than it.
SHAPES = [
    (2, 64, 4, 2, 16, 16),   # GQA, 4 tiles
    (2, 37, 4, 4, 8, 16),    # MHA, odd length, padded to 48
    (1, 50, 6, 1, 16, 8),    # MQA, 7 tiles with a partial last one
    (2, 24, 4, 2, 16, 512),  # block far larger than T: one tile
]


@pytest.mark.parametrize("B,T,N,K,H,block", SHAPES)
@pytest.mark.parametrize("segments", ["none", "packed"])
def test_chunked_matches_reference(B, T, N, K, H, block, segments):
    q, k, v = _qkv(B, T, N, K, H)
    seg = None if segments == "none" else _packed(B, T, seed=T, pad=B == 2)  # B=1: no padding
    _compare(q, k, v, seg, block, atol=2e-5)


def test_chunked_unsorted_segment_ids():
    """Skipping uses min/max of tile ids but is exact for ids that are not sorted."""
    B, T = 2, 48
    q, k, v = _qkv(B, T, 4, 2, 8, seed=1)
    seg = jnp.asarray(np.random.default_rng(3).integers(0, 3, size=(B, T)), jnp.int32)
    seg = seg.at[:, 16:24].set(7).at[:, 32:40].set(7)  # a document interrupted by others
    _compare(q, k, v, seg, block=8, atol=2e-5)


def test_chunked_padding_only_attends_padding():
    B, T, N, H = 1, 32, 2, 8
    q, k, v = _qkv(B, T, N, N, H, seed=2)
    seg = jnp.asarray([[1] * 20 + [0] * 12])
    o = ops.chunked_attention(q, k, v, seg, block=8)
    # The first padding token attends only to itself: its output is its own value.
    np.testing.assert_allclose(o[0, 20], v[0, 20], atol=1e-6)
    # Changing padding keys does not change any real token's output.
    o2 = ops.chunked_attention(q, k.at[:, 20:].set(9.0), v.at[:, 20:].set(-9.0), seg, block=8)
    np.testing.assert_allclose(o2[:, :20], o[:, :20], atol=1e-6)
    assert np.isfinite(np.asarray(o)).all()


def test_chunked_bf16():
    B, T, N, K, H = 2, 80, 4, 2, 32
    q, k, v = _qkv(B, T, N, K, H, dtype=jnp.bfloat16, seed=4)
    seg = _packed(B, T, seed=5)
    _compare(q, k, v, seg, block=32, atol=3e-2)
    # and the bf16 result is close to the fp32 truth
    o32 = ops.reference_attention(*(x.astype(jnp.float32) for x in (q, k, v)), seg)
    o16 = ops.chunked_attention(q, k, v, seg, block=32).astype(jnp.float32)
    assert float(jnp.abs(o16 - o32).max()) < 3e-2


def test_reference_matches_xla_dot_product_attention():
    """An independent implementation checks the reference (and so the masks) itself."""
    B, T, N, K, H = 2, 40, 4, 2, 16
    q, k, v = _qkv(B, T, N, K, H, seed=6)
    seg = _packed(B, T, seed=7)
    mask = (seg[:, :, None] == seg[:, None, :])[:, None]
    o = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="xla")
    np.testing.assert_allclose(ops.reference_attention(q, k, v, seg), o, atol=2e-5, rtol=2e-5)
    o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    np.testing.assert_allclose(ops.attention(q, k, v, impl="chunked", block=16), o, atol=2e-5, rtol=2e-5)


def _shapes_in(jaxpr):
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield getattr(var.aval, "shape", ())
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _shapes_in(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _shapes_in(sub)


def test_chunked_memory_is_linear_in_length():
    """At T=4096 neither the forward nor the backward holds anything close to a T x T array."""
    B, T, N, K, H, block = 1, 4096, 8, 4, 64, 512
    args = [jax.ShapeDtypeStruct((B, T, N, H), jnp.float32), jax.ShapeDtypeStruct((B, T, K, H), jnp.float32),
            jax.ShapeDtypeStruct((B, T, K, H), jnp.float32), jax.ShapeDtypeStruct((B, T), jnp.int32)]
    scores_bytes = T * T * N * 4  # one fp32 score matrix for all heads: 512 MiB

    def temp_bytes(attn):
        loss = lambda q, k, v, s: attn(q, k, v, s).sum()
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        largest = max(int(np.prod(s)) for s in _shapes_in(jax.make_jaxpr(grad)(*args).jaxpr))
        return grad.lower(*args).compile().memory_analysis().temp_size_in_bytes, largest

    chunked_temp, chunked_largest = temp_bytes(lambda q, k, v, s: ops.chunked_attention(q, k, v, s, block=block))
    reference_temp, reference_largest = temp_bytes(ops.reference_attention)
    assert reference_temp > scores_bytes  # the check can tell the difference
    assert reference_largest >= T * T * N
    assert chunked_temp < scores_bytes / 4, chunked_temp
    assert chunked_largest <= max(T * N * H, N * block * block), chunked_largest


def test_chunked_in_model_matches_reference():
    from qwen3_jax import create_model, get_config

    cfg = get_config("tiny-dense", compute_dtype="float32")
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 40), 0, cfg.vocab_size)
    seg = _packed(2, 40, seed=8)
    s = np.asarray(seg)
    starts = np.concatenate([np.ones((2, 1), bool), s[:, 1:] != s[:, :-1]], axis=1)
    first = np.maximum.accumulate(np.where(starts, np.arange(40), 0), axis=1)
    pos = jnp.asarray(np.arange(40) - first)  # positions restart in every document
    outs = {}
    for impl in ("reference", "chunked"):
        model = create_model(cfg.replace(attention_impl=impl, attention_block=16), seed=0)
        outs[impl] = model(tokens, pos, seg)
    np.testing.assert_allclose(outs["chunked"], outs["reference"], atol=1e-4, rtol=1e-4)


# -- dispatcher, platform errors, accelerator paths ------------------------------------------------

def test_dispatcher():
    q, k, v = _qkv(1, 16, 2, 1, 8)
    np.testing.assert_allclose(ops.attention(q, k, v, impl="chunked", block=4),
                               ops.attention(q, k, v, impl="reference"), atol=1e-5)
    assert ops.resolve_impl("auto", 256, jnp.float32) == "reference"
    assert ops.resolve_impl("auto", 512, jnp.float32) == "chunked"
    assert ops.resolve_impl("auto", 8192, jnp.bfloat16) == "chunked"
    # block None: each kernel's own tile (chunked 256); the result does not depend on it
    q, k, v = _qkv(1, 600, 2, 1, 8)
    np.testing.assert_allclose(ops.attention(q, k, v, impl="chunked"),
                               ops.attention(q, k, v, impl="chunked", block=ops.DEFAULT_BLOCK["chunked"]), atol=0)
    np.testing.assert_allclose(ops.attention(q, k, v, impl="chunked"), ops.attention(q, k, v, impl="reference"),
                               atol=1e-5)
    with pytest.raises(ValueError, match="unknown attention impl"):
        ops.attention(q, k, v, impl="nope")
    with pytest.raises(ValueError, match="self-attention"):
        ops.chunked_attention(q, k[:, :8], v[:, :8])


@pytest.mark.parametrize("impl,match", [("splash", "TPU"), ("cudnn", "GPU")])
def test_accelerator_impls_name_the_backend(impl, match):
    q, k, v = _qkv(1, 16, 2, 1, 8)
    with pytest.raises(RuntimeError, match=f"(?s){match}.*'cpu'"):
        ops.attention(q, k, v, impl=impl)


def test_cudnn_segment_runs():
    seg = jnp.asarray([[1, 1, 2, 2, 2, 0], [5, 5, 5, 5, 5, 5], [1, 2, 3, 4, 5, 6]], jnp.int32)
    offsets, lengths, fits = ops._segment_runs(seg, 4)
    np.testing.assert_array_equal(offsets[:2], [[0, 2, 5, -1, -1], [0, -1, -1, -1, -1]])
    np.testing.assert_array_equal(lengths[:2], [[2, 3, 1, -1], [6, -1, -1, -1]])
    np.testing.assert_array_equal(fits, [True, True, False])


@pytest.mark.parametrize("fused_bwd", [False, True])
def test_splash_interpret_matches_reference(fused_bwd):
    """The Pallas kernel itself, run by the Pallas interpreter on CPU (forward and gradients;
    the two-kernel backward and the fused one)."""
    B, T, N, K, H = 1, 200, 4, 2, 128  # T pads to 256 = two 128-token tiles
    q, k, v = _qkv(B, T, N, K, H, seed=9)
    seg = _packed(B, T, seed=10)
    splash = lambda q, k, v, s: ops.splash_attention(q, k, v, s, block=128, interpret=True,  # noqa: E731
                                                     fused_bwd=fused_bwd)
    np.testing.assert_allclose(splash(q, k, v, seg), ops.reference_attention(q, k, v, seg), atol=2e-5)
    g_ref = jax.grad(_loss(ops.reference_attention, seg), argnums=(0, 1, 2))(q, k, v)
    g_spl = jax.grad(_loss(splash, seg), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_spl, g_ref):
        np.testing.assert_allclose(a, b, atol=2e-4 * float(jnp.abs(b).max()))


def test_fused_bwd_kv_block_caps_the_unreduced_dq_copies():
    assert ops._fused_bwd_kv_block(4096, 512) == 512  # 8 copies
    assert ops._fused_bwd_kv_block(32768, 512) == 2048  # 16 copies, not 64
    assert ops._fused_bwd_kv_block(512 * 24, 512) == 1024  # 12 copies: 24 blocks, 2 per kv block
    assert ops._fused_bwd_kv_block(512 * 17, 512) == 512 * 17  # a prime count of blocks: one kv block


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
@pytest.mark.parametrize("fused_bwd", [False, True])
def test_splash_compiles_for_tpu_sharded(monkeypatch, fused_bwd):
    """Ahead-of-time compile of forward + backward for a v5e 2x2 slice, batch and heads sharded;
    the AOT tool's FLOP counter reads the kernels: forward 4, backward 8 (dK,dV) + 6 (dQ), or 10
    fused, per causal half of B·N·T·S·H."""
    # libtpu takes a machine-wide lock file by default; other processes compiling for TPU at the
    # same time (parallel test runs) would make this fail.
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec as P

    from qwen3_jax import sharding

    devices = np.array(topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices)
    mesh = jax.sharding.Mesh(devices.reshape(2, 2), ("data", "tensor"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)
    B, T, N, K, H = 4, 2048, 8, 4, 128

    def loss(q, k, v, seg):
        with sharding.use_rules(mesh):
            return ops.attention(q, k, v, seg, impl="splash", block=512,
                                 fused_bwd=fused_bwd).astype(jnp.float32).sum()

    qkv = NamedSharding(mesh, P("data", None, "tensor", None))
    args = [jax.ShapeDtypeStruct((B, T, n, H), jnp.bfloat16, sharding=qkv) for n in (N, K, K)]
    args.append(jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=NamedSharding(mesh, P("data", None))))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
    hlo = compiled.as_text()
    assert "tpu_custom_call" in hlo  # the Pallas kernels, not an XLA fallback
    assert "all-gather" not in hlo  # each device works on its own rows and heads
    assert compiled.memory_analysis().temp_size_in_bytes < B * T * T * N * 2 // 4
    from qwen3_jax import hlo_stats

    per_device = (B // 2) * (N // 2) * T * T * H * 0.5
    assert hlo_stats.hlo_flops(hlo)["attention_kernel"] == (14 if fused_bwd else 18) * per_device
