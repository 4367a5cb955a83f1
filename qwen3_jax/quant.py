"""8-bit training (`ModelConfig.quantization`): the one home of the quantization rules.

The layers' weight matmuls run in int8 or fp8, forward and backward, through qwix's quantized
training (`qwix.QtProvider`: fake-free, the dots take 8-bit operands and rescale the result);
the parameters, the optimizer state, checkpoints and HF exports stay float (nothing here touches
them). `intercepted(fn, quantization)` traces `fn` (the train or eval step, `train.build`) with
`jnp.einsum`, `lax.dot_general` and `lax.ragged_dot` routed through qwix, which quantizes the
matmuls made directly by the functions in `SITES` and passes every other one through unchanged:

  quantized   q/k/v and o projections (model/attention.py), the dense SwiGLU (model/layers.py),
              the experts in every form: blocked and capacity buffers (`swiglu_blocks`), sorted
              rows (`lax.ragged_dot`), dense (`experts_dense`), also inside expert parallelism
  kept float  attention scores and values (activation x activation), the router (fp32: routing
              decisions), router statistics and the combine, the embedding and the lm_head
              (logits into a softmax over 151,936 entries: not measured safe, left in bf16)

Types (as MaxText's `int8` / `fp8_full` recipes): int8 operands and int8 gradients; fp8 =
float8_e4m3fn operands, float8_e5m2 gradients (more range, less precision: gradients span more
decades than activations). Scaling: dynamic absmax, recomputed every step (no running stats),
int8 symmetric (absmax -> 127, `CALIBRATION`), fp8 absmax -> the type's max, per channel of every
non-contracted axis: activations per token ([B,T,D]·[D,F]: one scale per (b,t)),
weights per output channel (per (n,h) for q/k/v, per d for o, per f / d for the MLP; the blocked
experts per block and channel, i.e. per expert); the backward pass quantizes the incoming
gradient per token for the input gradient and per output channel (over all tokens) for the
weight gradient, and reuses the forward's quantized operands. The experts' matmuls go through
our custom VJPs built from qwix's pieces: the sorted rows (`ragged_dot_qt`: rows per token, the
stacked expert weights per output channel shared by the experts, as qwix's ragged_dot; on TPU
the weight gradient runs as megablox's tgmm) and the blocks (`blocked_qt`: the weight gradient
per output channel over all blocks' rows on all devices, not per block). Rows of an expert buffer that hold no assignment are zeroed (and their
gradients are zero) before any scale is taken (model/moe_compute.py `_live`), and a zero row is
left out of the weight gradient's scales, so padding never enters an absmax.

Sharded = one device: every scale is a maximum over the same elements on any mesh (GSPMD's
global view; inside expert parallelism's shard_map a pmax over the token axes), so the forward
quantizes to the same integers and an fsdp x expert step matches one device to fp32 round-off;
in the backward, tensor parallelism's reordered partial sums can move a value across a rounding
boundary (tests/test_quant_train.py: the measured gaps). Not yet global: `ragged_dot_qt`'s
weight-gradient scale under the ragged_all_to_all exchange (TPU) is a maximum over the rows the
device received, as qwix's ragged_dot has it (that shard_map is unchecked on TPU: no varying
axes to name for a pmax; XLA:CPU cannot run the exchange to compare).

TPU: megablox (a Pallas kernel) is not quantized by qwix, so with quantization `moe_impl='auto'`
resolves to ragged_dot on TPU (`moe_impl`), and an explicit 'megablox' is an error.
"""

from __future__ import annotations

import sys

import functools

import jax
import jax.numpy as jnp
import qwix
from qwix._src import interception  # qwix's scoped interception, as `qwix.quantize_model` applies it
from qwix._src.core import qarray
from qwix._src.core.dot_general import dot_general as qwix_dot_general
from qwix._src.core import ragged_dot as qragged

from qwen3_jax import sharding
from qwen3_jax.config import QUANTIZATIONS, ModelConfig
from qwen3_jax.model import attention, layers, moe_compute

# The functions whose own matmuls are quantized (code objects: a matmul counts when the nearest
# qwen3_jax frame that issues it is one of these).
SITES = frozenset(f.__code__ for f in (
    attention.Attention.qkv, attention.Attention.out, layers.MLP.__call__,
    moe_compute.swiglu_blocks, moe_compute.experts_dense, moe_compute._swiglu_h, moe_compute._down))
_PACKAGE = __file__.rsplit("/", 1)[0] + "/"

# 8-bit types per setting: (weights and activations, gradients)
QTYPES = {"int8": (jnp.int8, jnp.int8), "fp8": (jnp.float8_e4m3fn, jnp.float8_e5m2)}


def check(quantization) -> None:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"model_config.quantization={quantization!r} is not one of {QUANTIZATIONS}")


# qwix maps an int8 channel's absmax to 127.5 (its bound: iinfo.max + 0.5), so the channel's most
# negative element lands exactly on the tie -127.5 and rounds to -127 or -128 by the last bit of
# x / scale: one quantum on one element of every channel, decided by float round-off. Which way
# differs between two compilations of the same step (XLA divides in one program and multiplies by
# the reciprocal in another; measured: the one-device and 8-device quantized updates 1.2% apart,
# every channel's extreme element flipping). Calibrating at 127.5/127 times the absmax maps the
# absmax to 127 (symmetric int8, AQT's and MaxText's range): no tie, the same integers everywhere.
CALIBRATION = {"int8": f"absmax,{127.5 / 127!r}", "fp8": "absmax"}  # fp8: the absmax maps to 448, no tie


def rule(quantization: str) -> qwix.QtRule:
    """qwix's rule for `quantization` ('int8' / 'fp8'): dynamic absmax, per channel (see above)."""
    check(quantization)
    fwd, bwd = QTYPES[quantization]
    cal = CALIBRATION[quantization]
    return qwix.QtRule(weight_qtype=fwd, act_qtype=fwd, bwd_qtype=bwd, weight_calibration_method=cal,
                       act_calibration_method=cal, bwd_calibration_method=cal)


def _site():
    """The code object of the nearest qwen3_jax frame (the function that issued the matmul)."""
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if code.co_filename.startswith(_PACKAGE) and code.co_filename != __file__:
            return code
        frame = frame.f_back
    return None


class SiteProvider(qwix.QtProvider):
    """qwix's quantized training with the rule applied by call site (`SITES`) instead of module
    path: our layers are rebuilt from flat params inside the step, and one module (attention,
    MoE) holds both weight matmuls and activation-only ones (scores, router statistics)."""

    def _get_current_rule_and_op_id(self, op_name, *, only_rule=False, repeated_call=False):
        rule_ = self._rules[0] if _site() in SITES else None
        return rule_, (None if only_rule else f"{op_name}0")  # op ids name static-scale stats: none here

    def einsum(self, einsum_str, *operands, **kwargs):
        if einsum_str in BLOCKED and not kwargs.get("preferred_element_type") and _site() in SITES:
            rule_, _ = self._get_current_rule_and_op_id("einsum", only_rule=True)
            lhs, rhs = _alike(operands)
            return blocked_qt(lhs, rhs, (rule_.act_qtype, rule_.bwd_qtype, rule_.act_calibration_method),
                              tuple(sorted(_vma(lhs) | _vma(rhs))))
        return super().einsum(einsum_str, *_alike(operands), **kwargs)

    def dot_general(self, lhs, rhs, *args, **kwargs):
        return super().dot_general(*_alike((lhs, rhs)), *args, **kwargs)

    def ragged_dot(self, lhs, rhs, group_sizes, *args, **kwargs):
        rule_, _ = self._get_current_rule_and_op_id("ragged_dot", only_rule=True)
        if rule_ is None or args or any(v is not None for v in kwargs.values()):
            return super().ragged_dot(*_alike((lhs, rhs)), group_sizes, *args, **kwargs)
        lhs, rhs = _alike((lhs, rhs))
        return ragged_dot_qt(lhs, rhs, group_sizes, (rule_.act_qtype, rule_.bwd_qtype, rule_.act_calibration_method),
                             "tgmm" if _tgmm_ok(lhs.shape[1], rhs.shape[2]) else None)


def _vma(x) -> frozenset:
    aval = jax.typeof(x)  # jax 0.10: aval.vma; later: aval.manual_axis_type.varying
    return frozenset(getattr(aval, "vma", None) or getattr(getattr(aval, "manual_axis_type", None), "varying", ()))


def _alike(operands):
    """Inside shard_map (expert parallelism), the operands of a quantized matmul made varying over
    the same mesh axes: qwix's custom VJP must return each gradient with its operand's type, and
    a weight's gradient varies over the token axes (its pvary's transpose sums it over them, as
    for an unquantized matmul). Outside shard_map, and for matmuls not quantized, unchanged."""
    union = frozenset().union(*map(_vma, operands))
    if not union or _site() not in SITES:
        return operands
    return tuple(jax.lax.pcast(x, tuple(sorted(union - _vma(x))), to="varying") if union - _vma(x) else x
                 for x in operands)


# -- the experts' grouped matmul (sorted rows, `lax.ragged_dot`) ----------------------------------------
# qwix's own quantized ragged_dot, with two changes: its calibration (`CALIBRATION`; qwix's is fixed
# at the int8 tie), and the weight gradient. That gradient (a ragged contraction over the rows) is
# what XLA:TPU lowers to a masked dense matmul over every local expert x every buffer row (235B
# stage 1, int8, v5p-1024: 25x the model's FLOPs). On TPU it runs as megablox's tgmm (Pallas, the
# groups' tiles only) over the same 8-bit values held in bf16 (exact: int8, e4m3 and e5m2 values
# are bf16 values; products and f32 sums as the MXU forms them), at the bf16 rate; elsewhere as
# qwix's 8-bit ragged_dot_general. Scales as qwix: rows per token, the stacked expert weights per
# output channel shared by the experts, the incoming gradient per row (input gradient) and per
# output channel over the rows (weight gradient).

def _how(qtype, axes, calibration):
    return qarray.HowToQuantize(qtype=qtype, channelwise_axes=axes, calibration_method=calibration)


def _tile(n: int, pref: int = 512) -> int:
    """The largest power-of-two share of `pref` that divides n (megablox's tiles)."""
    t = min(pref, n)
    while n % t:
        t //= 2
    return max(t, 1)


def _tgmm_ok(k: int, n: int) -> bool:
    """The weight gradient through megablox's tgmm: TPU, and dims of 128-multiples (its tiles)."""
    ctx = sharding.active()
    return ctx is not None and ctx.platform == "tpu" and moe_compute.megablox_ok(k, n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def ragged_dot_qt(lhs_MK, rhs_GKN, group_sizes_G, types, wgrad: str | None = None):
    """lax.ragged_dot(lhs, rhs, group_sizes) with 8-bit operands; `types` = (operand qtype,
    gradient qtype, calibration); `wgrad`: the weight gradient through megablox's tgmm ('tgmm',
    TPU; 'tgmm_interpret': the Pallas interpreter, tests) or qwix's ragged_dot_general (None)."""
    return _ragged_fwd(lhs_MK, rhs_GKN, group_sizes_G, types, wgrad)[0]


def _ragged_fwd(lhs_MK, rhs_GKN, group_sizes_G, types, wgrad):
    qtype, _, cal = types
    q_lhs = qarray.quantize(lhs_MK, _how(qtype, [0], cal))  # per row
    q_rhs = qarray.quantize(rhs_GKN, _how(qtype, [2], cal))  # per output channel
    out_MN = qragged.ragged_dot(q_lhs, q_rhs, group_sizes_G).astype(lhs_MK.dtype)
    return out_MN, (q_lhs, q_rhs, group_sizes_G)  # the scales keep the operands' dtypes


def _ragged_bwd(types, wgrad, res, g_MN):
    _, gtype, cal = types
    q_lhs, q_rhs, group_sizes_G = res
    # input gradient [M,K] = g · rhs^T per group: rhs's scale moved onto g, g quantized per row
    g_q = qarray.quantize(g_MN * q_rhs.scale[:, 0], _how(gtype, [0], cal))
    d_lhs = qragged.ragged_dot(g_q, q_rhs.qvalue.swapaxes(1, 2), group_sizes_G)
    # weight gradient [G,K,N] = lhs^T · g over each group's rows: lhs's row scale moved onto g,
    # g quantized per output channel. A zero row (padding) has scale 1 (qwix's default for an
    # all-zero channel) and adds nothing to the gradient: its g is left out of the column maxima
    # (else one padding row's g, 1/scale times too large, sets the scale: measured 25% error)
    row_scale_M1 = jnp.where(jnp.any(q_lhs.qvalue != 0, axis=1, keepdims=True), q_lhs.scale, 0)
    g_q = qarray.quantize(g_MN * row_scale_M1, _how(gtype, [1], cal))
    if wgrad is not None:
        from jax.experimental.pallas.ops.tpu.megablox.gmm import tgmm as tgmm_kernel  # optional: TPU-only Pallas kernel

        M, K = q_lhs.shape
        N = g_q.shape[1]
        tiles = (_tile(M), _tile(K), _tile(N))
        d_rhs = tgmm_kernel(q_lhs.qvalue.astype(jnp.bfloat16).T, g_q.qvalue.astype(jnp.bfloat16), group_sizes_G,
                            jnp.float32, tiles, interpret=wgrad == "tgmm_interpret") * g_q.scale[None]
        want = _vma(q_rhs.qvalue) - _vma(d_rhs)  # a Pallas output carries no varying-axes type
        d_rhs = jax.lax.pcast(d_rhs, tuple(sorted(want)), to="varying") if want else d_rhs
    else:
        dnums = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(((0,), (0,)), ((), ())),
                                                  lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
        d_rhs = qragged.ragged_dot_general(q_lhs.qvalue, g_q, group_sizes_G, dimension_numbers=dnums)
    return d_lhs.astype(q_lhs.scale.dtype), d_rhs.astype(q_rhs.scale.dtype), None


ragged_dot_qt.defvjp(_ragged_fwd, _ragged_bwd)


# -- the blocked experts' matmuls (moe_compute.swiglu_blocks: a batch of blocks of C rows) -------------
# qwix scales their weight gradient per block and output channel, and a block holds the rows of the
# tokens one device has: the scales differ between one device and an expert-parallel mesh by
# construction (measured: the expert weights' update 0.9% apart). Here that gradient is scaled per
# output channel over every row of every block, on every device of the token axes (a pmax inside
# expert parallelism's shard_map): the same set of rows whatever the mesh, and the granularity
# qwix's ragged_dot gives the sorted-rows form. Forward and input gradient as qwix: rows per token,
# weights per block and output channel (= per expert), the incoming gradient per row.
BLOCKED = ("gcd,gdf->gcf", "gcf,gfd->gcd")  # [G,C,K] x [G,K,N] -> [G,C,N]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def blocked_qt(lhs_GCK, rhs_GKN, types, token_axes: tuple = ()):
    """einsum('gck,gkn->gcn') with 8-bit operands; `token_axes`: the mesh axes the rows are split
    over inside shard_map (the weight gradient's scales are maxima over them too)."""
    return _blocked_fwd(lhs_GCK, rhs_GKN, types, token_axes)[0]


_BATCHED = (((2,), (1,)), ((0,), (0,)))


def _blocked_fwd(lhs_GCK, rhs_GKN, types, token_axes):
    qtype, _, cal = types
    q_lhs = qarray.quantize(lhs_GCK, _how(qtype, [0, 1], cal))  # per row
    q_rhs = qarray.quantize(rhs_GKN, _how(qtype, [0, 2], cal))  # per block and output channel
    out = qwix_dot_general(q_lhs, q_rhs, _BATCHED).astype(lhs_GCK.dtype)
    return out, (q_lhs, q_rhs)


def _blocked_bwd(types, token_axes, res, g_GCN):
    _, gtype, cal = types
    q_lhs, q_rhs = res
    # input gradient [G,C,K] = g · rhs^T: rhs's scale moved onto g, g quantized per row
    g_q = qarray.quantize(g_GCN * q_rhs.scale, _how(gtype, [0, 1], cal))
    d_lhs = qwix_dot_general(g_q, q_rhs.qvalue, (((2,), (2,)), ((0,), (0,))))
    # weight gradient [G,K,N] = lhs^T · g per block: lhs's row scale moved onto g (zero rows, e.g.
    # padding, out of the maxima), one scale per output channel over all blocks and devices
    row_scale = jnp.where(jnp.any(q_lhs.qvalue != 0, axis=2, keepdims=True), q_lhs.scale, 0)
    g_GCN = g_GCN * row_scale
    absmax_11N = jnp.max(jnp.abs(g_GCN), axis=(0, 1), keepdims=True)
    if token_axes:
        absmax_11N = jax.lax.pmax(absmax_11N, token_axes)
    how = _how(gtype, [2], cal)
    absmax_11N = qarray.calibrate(absmax_11N, how)  # the rule's calibration (int8: its 127.5/127 factor)
    scale, _ = qarray.compute_scale_zero_point(absmax_11N, gtype)
    g_q = qarray.quantize_with_scale_zero_point(g_GCN, gtype, scale, None)
    d_rhs = qwix_dot_general(q_lhs.qvalue, g_q, (((1,), (1,)), ((0,), (0,))))
    return d_lhs.astype(q_lhs.scale.dtype), d_rhs.astype(q_rhs.scale.dtype)


blocked_qt.defvjp(_blocked_fwd, _blocked_bwd)


def intercepted(fn, quantization: str | None):
    """`fn` traced with the quantized matmuls of `quantization` (None: `fn` itself)."""
    check(quantization)
    if quantization is None:
        return fn
    provider = SiteProvider([rule(quantization)])
    return interception.wrap_func_intercepted(
        fn, lambda: interception.Interceptor(mapping=provider.get_intercept_map(), id=id(provider)),
        disable_jit=False)


def moe_impl(cfg: ModelConfig, platform: str) -> str:
    """The expert form to run under quantization: 'auto' on TPU -> ragged_dot (qwix quantizes
    `lax.ragged_dot`, not the megablox Pallas kernel); an explicit megablox is refused."""
    if cfg.quantization is None or not cfg.is_moe:
        return cfg.moe_impl
    if cfg.moe_impl == "megablox":
        raise ValueError(f"model_config.moe_impl='megablox' cannot run quantized "
                         f"(model_config.quantization={cfg.quantization!r}): use 'auto' or 'ragged_dot'")
    return "ragged_dot" if cfg.moe_impl == "auto" and platform == "tpu" else cfg.moe_impl

