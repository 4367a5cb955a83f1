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
decades than activations). Scaling: dynamic absmax, recomputed every step (no running stats), per
channel of every non-contracted axis: activations per token ([B,T,D]·[D,F]: one scale per (b,t)),
weights per output channel (per (n,h) for q/k/v, per d for o, per f / d for the MLP; the blocked
experts per block and channel, i.e. per expert); the backward pass quantizes the incoming
gradient per token for the input gradient and per output channel (over all tokens of the shard
group) for the weight gradient, and reuses the forward's quantized operands. qwix's ragged_dot
(the sorted-rows experts) scales rows per token and the stacked expert weights per output
channel shared by the experts. Rows of an expert buffer that hold no assignment are zeroed (and
their gradients are zero) before any scale is taken (model/moe_compute.py `_live`), so padding
never enters an absmax.

TPU: megablox (a Pallas kernel) is not quantized by qwix, so with quantization `moe_impl='auto'`
resolves to ragged_dot on TPU (`moe_impl`), and an explicit 'megablox' is an error.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import qwix
from qwix._src import interception  # qwix's scoped interception, as `qwix.quantize_model` applies it

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


def rule(quantization: str) -> qwix.QtRule:
    """qwix's rule for `quantization` ('int8' / 'fp8'): dynamic absmax, per channel (see above)."""
    check(quantization)
    fwd, bwd = QTYPES[quantization]
    return qwix.QtRule(weight_qtype=fwd, act_qtype=fwd, bwd_qtype=bwd, weight_calibration_method="absmax",
                       act_calibration_method="absmax", bwd_calibration_method="absmax")


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
        return super().einsum(einsum_str, *_alike(operands), **kwargs)

    def dot_general(self, lhs, rhs, *args, **kwargs):
        return super().dot_general(*_alike((lhs, rhs)), *args, **kwargs)

    def ragged_dot(self, lhs, rhs, *args, **kwargs):
        return super().ragged_dot(*_alike((lhs, rhs)), *args, **kwargs)


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

