"""Model configuration: one frozen dataclass and the published Qwen3 presets.

Field names follow the paper's vocabulary rather than Hugging Face's; `qwen3_jax.hf`
translates to and from `config.json`. Everything a model file needs to know lives here:
the model code reads no flags and no gin.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from qwen3_jax import errors

ATTENTION_IMPLS = ("reference", "chunked", "splash", "cudnn", "auto")
# MoE expert computation (qwen3_jax.model.moe_compute): auto = megablox on TPU, blocked on GPU
# and CPU
MOE_IMPLS = ("auto", "dense", "ragged_dot", "blocked", "megablox")
# 8-bit training of the weight matmuls through qwix (qwen3_jax.quant: which matmuls, the scaling)
QUANTIZATIONS = (None, "int8", "fp8")
MOE_IMPL_RENAMES = {"ragged": "ragged_dot"}  # old value -> new: still accepted, with a warning
# Per-layer rematerialisation (qwen3_jax.model.transformer.remat_policy says what each saves):
# none / full / XLA's dot policies, save_* = keep these named tensors in HBM, offload_* = keep
# them in host memory (TPU pinned_host), recompute the rest in the backward pass. auto = the
# fewest-FLOPs policy that fits the devices' memory (for a TPU slice: among those within 2% of the
# fastest predicted step), chosen by compiling the candidates (qwen3_jax.remat_search: at startup
# by train.build, for a slice by launch/aot_compile.py).
# Tensors a layer names with `jax.ad_checkpoint.checkpoint_name` (per token, bf16 at Qwen3 sizes):
#   qkv_proj  q, k, v projections before QK-norm and RoPE        (N+2K)·H   (model/attention.py)
#   context   attention output [B,T,N,H]; splash also names its log-sum-exp with it   N·H
#   out_proj  o_proj output, the attention block's residual update  D
#   mlp_wi    dense SwiGLU gate and up projections                  2·F        (model/layers.py)
#   moe_wi    the experts' gate and up projections, per assignment  2·k·F      (model/moe_compute.py)
#             (dropless expert parallelism: of the first moe_saved_rows·N·k rows of the
#             worst-case receive buffer; the rest are always recomputed, model/moe_ep.py)
# A policy keeps (in HBM) or offloads (to host memory) the named tensors and recomputes the rest
# of the layer in the backward pass; the layer input (the scan carry) is always kept. Keeping
# moe_wi saves recomputing 2 of the experts' 3 matmuls (the down projection's output is still
# recomputed: the router weights' gradient needs it).
REMAT_NAMES = {  # policy -> (names kept in HBM, names offloaded to host memory)
    "save_qkv_proj": (("qkv_proj",), ()),
    "save_attn": (("qkv_proj", "context"), ()),
    "save_attn_out": (("qkv_proj", "context", "out_proj"), ()),
    "save_mlp": (("mlp_wi",), ()),
    "save_attn_mlp": (("qkv_proj", "context", "out_proj", "mlp_wi"), ()),
    "save_moe": (("moe_wi",), ()),
    "save_attn_moe": (("qkv_proj", "context", "out_proj", "moe_wi"), ()),
    "offload_context": ((), ("context",)),
    "offload_attn": ((), ("qkv_proj", "context", "out_proj")),
    "offload_attn_mlp": ((), ("qkv_proj", "context", "out_proj", "mlp_wi")),
    "save_moe_offload_attn": (("moe_wi",), ("qkv_proj", "context", "out_proj")),
}
REMAT_POLICIES = ("auto", "none", "full", "dots", "dots_no_batch", *REMAT_NAMES)


def remat_keeps(policy: str, name: str) -> bool:
    """Whether `policy` keeps (in HBM or host memory) the tensors named `name`."""
    return name in sum(REMAT_NAMES.get(policy, ((), ())), ())


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN context extension (transformers' `rope_type: yarn`)."""

    factor: float
    original_max_position_embeddings: int
    attention_factor: float | None = None  # None: 0.1 * ln(factor) + 1 (YaRN paper)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    rope_type: str = "yarn"

    def __post_init__(self):
        if self.rope_type != "yarn":
            raise ValueError(f"rope_scaling.rope_type={self.rope_type!r} is not supported (only 'yarn')")
        if self.factor <= 0:
            raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of one Qwen3 model (dense when `num_experts == 0`)."""

    name: str = "custom"
    vocab_size: int = 151_936
    d_model: int = 1024
    num_layers: int = 28
    num_heads: int = 16
    num_kv_heads: int = 8
    head_dim: int = 128  # independent of d_model / num_heads
    ffn_dim: int = 3072  # dense SwiGLU width (dense layers of MoE models too)
    # Mixture of experts.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_ffn_dim: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.001
    # Embeddings and positions.
    tie_embeddings: bool = False
    rope_theta: float = 1_000_000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 40_960
    rms_eps: float = 1e-6
    initializer_range: float = 0.02
    # Numerics and implementation choices (not part of the architecture).
    param_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    # auto: splash on TPU, cuDNN on GPU (bf16/fp16), reference up to 256 tokens, chunked beyond,
    # resolved for the mesh the step is traced for (qwen3_jax.model.attention_ops.resolve_impl)
    attention_impl: str = "auto"
    # tile of the chunked and splash kernels; None: each kernel's own (attention_ops.DEFAULT_BLOCK)
    attention_block: int | None = None
    # splash only: one backward kernel for dK, dV and dQ (scores recomputed once, not twice:
    # attention FLOPs with full remat 1.5x instead of 1.83x the model's count), at the cost of
    # up to 16 unreduced dQ copies of the layer's queries alive in its backward pass (AOT of
    # 235b-a22b at 32K with it: benchmarks/aot_reports/235b_s3.json, flops_ratio_*)
    splash_fused_bwd: bool = True
    moe_impl: str = "auto"
    # auto: resolved by train.build before the step is traced (on a CPU: 'none' whenever it fits
    # the host's RAM). Remat only matters under differentiation: a model traced outside build
    # runs forward (inference, evaluation) with 'auto' as is, and differentiating it is an error
    # (qwen3_jax.model.transformer.remat_policy)
    remat: str = "auto"
    # expert parallelism, dropless, under a remat policy that keeps `moe_wi`: the receive buffer is
    # sized for the worst case (every token of the expert group on this device), so the policy keeps
    # the experts' gate/up outputs of its first ceil(moe_saved_rows · N·k) sorted rows (N·k = what
    # a device receives on average); the rows past them, there only when routing sends a device
    # more, are computed apart and recomputed in the backward pass (qwen3_jax.model.moe_ep)
    moe_saved_rows: float = 1.25
    scan_layers: bool = True
    # None (bf16/fp32 matmuls), 'int8' or 'fp8': the layers' weight matmuls (attention projections,
    # dense MLP, experts) run in 8 bits forward and backward, params stay float (qwen3_jax.quant)
    quantization: str | None = None

    def __post_init__(self):
        if isinstance(self.mlp_only_layers, list):
            object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if self.moe_impl in MOE_IMPL_RENAMES:  # downstream sees only the new name
            errors.renamed("model_config.moe_impl", self.moe_impl, MOE_IMPL_RENAMES[self.moe_impl])
            object.__setattr__(self, "moe_impl", MOE_IMPL_RENAMES[self.moe_impl])
        positive = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_dim")
        for key in positive:
            if getattr(self, key) <= 0:
                raise ValueError(f"ModelConfig.{key} must be > 0, got {getattr(self, key)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even for rotary embeddings")
        if self.num_experts:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ValueError(
                    f"ModelConfig.num_experts_per_tok={self.num_experts_per_tok} must be in 1..{self.num_experts}"
                )
            if self.moe_ffn_dim <= 0:
                raise ValueError(f"ModelConfig.moe_ffn_dim must be > 0 for MoE, got {self.moe_ffn_dim}")
            if self.decoder_sparse_step <= 0:
                raise ValueError(f"ModelConfig.decoder_sparse_step must be > 0, got {self.decoder_sparse_step}")
        if self.moe_saved_rows <= 0:
            raise ValueError(f"ModelConfig.moe_saved_rows must be > 0, got {self.moe_saved_rows}")
        if self.attention_block is not None and self.attention_block <= 0:
            raise ValueError(f"ModelConfig.attention_block must be > 0 or None, got {self.attention_block}")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"ModelConfig.mlp_only_layers has indices outside 0..{self.num_layers - 1}: {bad}")
        for key, allowed in (
            ("quantization", QUANTIZATIONS),
            ("attention_impl", ATTENTION_IMPLS),
            ("moe_impl", MOE_IMPLS),
            ("remat", REMAT_POLICIES),
        ):
            if getattr(self, key) not in allowed:
                raise ValueError(f"ModelConfig.{key}={getattr(self, key)!r} is not one of {allowed}")

    # -- derived ---------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, i: int) -> bool:
        """Qwen3-MoE's rule: MoE unless listed in mlp_only_layers, every decoder_sparse_step-th."""
        return (
            self.num_experts > 0
            and i not in self.mlp_only_layers
            and (i + 1) % self.decoder_sparse_step == 0
        )

    @property
    def num_moe_layers(self) -> int:
        return sum(n for moe, _, n in self.layer_runs() if moe)

    def layer_runs(self) -> list[tuple[bool, int, int]]:
        """Consecutive layers of one kind, as (is_moe, first_layer, count).

        Each run is one stack of parameters with a leading `layers` axis, applied by one
        scan. The published presets are a single run.
        """
        runs: list[tuple[bool, int, int]] = []
        for i in range(self.num_layers):
            kind = self.is_moe_layer(i)
            if runs and runs[-1][0] == kind:
                runs[-1] = (kind, runs[-1][1], runs[-1][2] + 1)
            else:
                runs.append((kind, i, 1))
        return runs

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mlp_only_layers"] = list(self.mlp_only_layers)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys: {unknown}")
        return cls(**d)


_QWEN3_COMMON = dict(vocab_size=151_936, head_dim=128, rope_theta=1_000_000.0, max_position_embeddings=40_960)

PRESETS: dict[str, ModelConfig] = {
    c.name: c
    for c in [
        ModelConfig(name="qwen3-0.6b", num_layers=28, d_model=1024, num_heads=16, num_kv_heads=8,
                    ffn_dim=3072, tie_embeddings=True, **_QWEN3_COMMON),
        ModelConfig(name="qwen3-1.7b", num_layers=28, d_model=2048, num_heads=16, num_kv_heads=8,
                    ffn_dim=6144, tie_embeddings=True, **_QWEN3_COMMON),
        ModelConfig(name="qwen3-4b", num_layers=36, d_model=2560, num_heads=32, num_kv_heads=8,
                    ffn_dim=9728, tie_embeddings=True, **_QWEN3_COMMON),
        ModelConfig(name="qwen3-8b", num_layers=36, d_model=4096, num_heads=32, num_kv_heads=8,
                    ffn_dim=12288, **_QWEN3_COMMON),
        ModelConfig(name="qwen3-14b", num_layers=40, d_model=5120, num_heads=40, num_kv_heads=8,
                    ffn_dim=17408, **_QWEN3_COMMON),
        ModelConfig(name="qwen3-32b", num_layers=64, d_model=5120, num_heads=64, num_kv_heads=8,
                    ffn_dim=25600, **_QWEN3_COMMON),
        ModelConfig(name="qwen3-30b-a3b", num_layers=48, d_model=2048, num_heads=32, num_kv_heads=4,
                    ffn_dim=6144, num_experts=128, num_experts_per_tok=8, moe_ffn_dim=768,
                    **_QWEN3_COMMON),
        ModelConfig(name="qwen3-235b-a22b", num_layers=94, d_model=4096, num_heads=64, num_kv_heads=4,
                    ffn_dim=12288, num_experts=128, num_experts_per_tok=8, moe_ffn_dim=1536,
                    **_QWEN3_COMMON),
        # Small shapes for tests and CPU runs.
        ModelConfig(name="tiny-dense", vocab_size=512, num_layers=2, d_model=64, num_heads=4,
                    num_kv_heads=2, head_dim=16, ffn_dim=128, rope_theta=10_000.0,
                    max_position_embeddings=4096),
        ModelConfig(name="tiny-moe", vocab_size=512, num_layers=2, d_model=64, num_heads=4,
                    num_kv_heads=2, head_dim=16, ffn_dim=128, num_experts=8, num_experts_per_tok=2,
                    moe_ffn_dim=32, rope_theta=10_000.0, max_position_embeddings=4096),
        ModelConfig(name="small-moe", vocab_size=4096, num_layers=4, d_model=128, num_heads=4,
                    num_kv_heads=2, head_dim=32, ffn_dim=384, num_experts=8, num_experts_per_tok=2,
                    moe_ffn_dim=128, rope_theta=10_000.0, max_position_embeddings=32_768,
                    tie_embeddings=True),
    ]
}


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """A preset by name, with field overrides."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
