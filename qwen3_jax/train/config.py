"""What a training run is, apart from the model: plain frozen dataclasses, usable without gin.

`launch/train.py` fills them from the gin files (`qwen3_jax.configurables` registers them under
the names the stage files use: `train.*`, `make_optimizer.*`, `lr_schedule.*`, `MeshConfig.*`);
tests and scripts build them directly. `qwen3_jax.train.build` turns (ModelConfig, TrainConfig,
devices) into the compiled step; the loop and the AOT tool both go through it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from qwen3_jax.errors import TrainingError
from qwen3_jax.inference.sampling import SamplingConfig
from qwen3_jax.model.moe import AUX_LAYER_REDUCE
from qwen3_jax.model.moe_ep import EXCHANGES as MOE_EXCHANGES
from qwen3_jax.model.moe_ep import canonical_exchange
from qwen3_jax.sharding import MeshConfig

SCHEDULES = ("cosine", "wsd", "constant")
AUX_SCOPES = ("global", "micro_batch", "sequence")
AUX_GLOBAL_COUNTS = ("exact", "running", "previous_step")
DATA_STATE_MISMATCH = ("error", "restart")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Learning rate per step (gin: `lr_schedule.*`).

    cosine: linear warmup to peak, cosine to min_lr_ratio * peak at the last step.
    wsd:    warmup, constant peak, then linear decay to min_lr_ratio * peak over the last
            `decay_fraction` of the steps (decay_fraction 0: constant after warmup).
    constant: warmup, then the peak.
    """

    kind: str = "cosine"
    peak_lr: float = 3e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.1


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW (no decay on norm scales) after global-norm clipping (gin: `make_optimizer.*`)."""

    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float | None = 1.0
    schedule: ScheduleConfig = ScheduleConfig()


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The training objective beyond the LM cross-entropy (`make_train_step`'s `loss_cfg`; gin sets
    these as `train.*`: TrainConfig extends it, `TrainConfig.loss` is its part). Meanings:
    TrainConfig's docstring and qwen3_jax.train.moe_balance."""

    loss_chunk: int | None = None  # positions per piece of the output head (None = one piece)
    z_loss: float = 0.0
    aux_loss_coef: float | None = None
    aux_scope: str = "global"
    aux_layer_reduce: str = "mean"
    aux_global_counts: str = "exact"
    router_z_loss: float = 0.0
    router_bias_rate: float = 0.0

    def validate(self) -> None:
        chunk = self.loss_chunk
        if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk <= 0):
            raise TrainingError(f"train.loss_chunk must be a positive integer or None, got {chunk!r}")
        for name, v, allowed in (("train.aux_scope", self.aux_scope, AUX_SCOPES),
                                 ("train.aux_layer_reduce", self.aux_layer_reduce, AUX_LAYER_REDUCE),
                                 ("train.aux_global_counts", self.aux_global_counts, AUX_GLOBAL_COUNTS)):
            if v not in allowed:
                raise TrainingError(f"{name}={v!r} is not one of {allowed}")


# TrainConfig fields renamed: old gin name -> new (the old one is still accepted, with a warning)
RENAMED_FIELDS = {"max_nonfinite_in_a_row": "max_bad_in_a_row"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig(LossConfig):
    """One run's settings (gin: `train.*`; the stage macros STEPS, SEQ_LEN, BATCH_SIZE, ...).

    make_data(seq_len=, global_batch_size=, seed=) -> this host's batch iterator with
      get_state/set_state (data_pipeline.pipeline.make_dataset); make_eval_data the same for the
      held-out documents (None: no eval loss). Not needed to build or compile the step.
    micro_batches: the global batch is split into this many strided micro-batches whose
      gradients are summed (same loss and gradients as one pass).
    loss_chunk: positions per piece of the output head + cross-entropy (the [B,T,V] logits are
      never materialised); None = all at once.
    MoE balancing (qwen3_jax.train.moe_balance has the formulas and the costs):
    aux_loss_coef: None = the model's router_aux_loss_coef. aux_scope: which tokens the per-layer
      load-balancing f counts: "global" (the whole global batch; Qwen3), "micro_batch", "sequence".
      aux_layer_reduce: "mean" over MoE layers (default) or "sum" (Megatron-LM).
      aux_global_counts (global scope, micro_batches > 1): "exact" (an extra forward-only routing
      pass), "running" (micro-batches 1..m, Megatron-LM) or "previous_step".
    router_z_loss: coefficient of ST-MoE's router z-loss (0 = off).
    router_bias_rate: aux-loss-free balancing (DeepSeek-V3): the per-expert selection bias moves by
      this much per step toward balance (0 = off); combinable with the loss.
    moe_exchange / capacity_factor: expert-parallel token exchange and capacity (None: dropless).
    mesh: ICI/DCN sizes of the data, fsdp, expert, tensor axes; parameters, optimizer state and
      activations follow `qwen3_jax.sharding`'s rules.
    init_from: a previous stage's workdir or checkpoint; its parameters start this run when the
      workdir has no checkpoint yet (optimizer and data start fresh).
    data_state_mismatch: "error" when a checkpoint's data position does not fit the pipeline,
      "restart": warn and reshuffle instead.
    stop_after: stop (with a checkpoint) after this many steps of this invocation.
    Skipped updates (qwen3_jax.train.spike_guard): a step whose loss or gradients are non-finite,
      or (spike_factor, None/0 = off) whose loss or grad norm exceeds spike_factor × the median of
      the last spike_window good steps, is skipped on device. max_bad_in_a_row skipped steps in a
      row (either kind; formerly max_nonfinite_in_a_row) roll back to the last checkpoint written
      before the first of them,
      data continuing after the bad batches (spike_rollback, at most max_rollbacks times per
      invocation), or stop naming that checkpoint.
    sample_every: print greedy continuations of `sample_prompts` (`sample_tokens` new tokens) from
      the current parameters every this many steps (0 = off; decoding costs a compile per call).
      sample_tokenizer: None = the tokenizer the training data was prepared with.
    """

    steps: int
    seq_len: int
    batch_size: int
    checkpoint_every: int
    make_data: Callable[..., Any] | None = None
    make_eval_data: Callable[..., Any] | None = None
    eval_every: int = 0
    eval_batches: int = 4
    micro_batches: int = 1
    loss_chunk: int | None = 2048  # the objective's other fields: LossConfig
    moe_exchange: str = "auto"
    capacity_factor: float | None = None
    mesh: MeshConfig = MeshConfig()
    optim: OptimConfig = OptimConfig()
    seed: int = 0
    init_from: str | None = None
    keep_last: int = 3
    keep_every: int | None = None
    log_every: int = 10
    max_bad_in_a_row: int = 5
    spike_factor: float | None = 5.0
    spike_window: int = 50
    spike_rollback: bool = True
    max_rollbacks: int = 3
    async_checkpoint: bool = True
    data_state_mismatch: str = "error"
    stop_after: int | None = None
    sample_every: int = 0
    sample_prompts: tuple[str, ...] = ()
    sample_tokens: int = 32
    sample_tokenizer: str | None = None
    # Distillation (qwen3_jax.train.distill, kd_loss): loss = (1 - kd_alpha)·LM + kd_alpha·τ²·KD.
    teacher: str | None = None  # HF folder, workdir or checkpoint; None = no teacher
    kd_alpha: float = 0.5
    kd_temperature: float = 1.0  # τ
    kd_topk: int | None = None  # None = the full vocabulary
    kd_divergence: str = "forward"  # forward KL(T‖S), reverse KL(S‖T) or jsd
    # On-policy distillation (qwen3_jax.train.onpolicy): the student samples SEQ_LEN - P + 1 tokens
    # after P-token prompts (the data, made with SEQ_LEN = P) and the teacher scores them. None = off.
    onpolicy_prompt_len: int | None = None  # P
    onpolicy_temperature: float = 1.0  # the student's sampler (0 = greedy)
    onpolicy_top_k: int = 0  # 0 = off
    onpolicy_top_p: float = 1.0  # 1 = off
    onpolicy_stop_at_eos: bool = True  # a completion ends at the data tokenizer's end-of-text id

    def __post_init__(self):
        # an old value of a renamed setting (moe_exchange='ragged') is read as its new name
        object.__setattr__(self, "moe_exchange", canonical_exchange(self.moe_exchange))

    def onpolicy_sampling(self):

        return SamplingConfig(temperature=self.onpolicy_temperature, top_k=self.onpolicy_top_k,
                              top_p=self.onpolicy_top_p)

    @property
    def data_seq_len(self) -> int:
        """The rows train.make_data is asked for: SEQ_LEN, or the prompt length on-policy."""
        return self.onpolicy_prompt_len or self.seq_len

    @property
    def loss(self) -> LossConfig:
        """The objective these settings describe (what `make_train_step` takes)."""
        return LossConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LossConfig)})

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        """Bad values fail here, before anything is built, naming the setting and the value."""
        for name, v in (("STEPS", self.steps), ("SEQ_LEN", self.seq_len), ("BATCH_SIZE", self.batch_size),
                        ("CHECKPOINT_EVERY", self.checkpoint_every), ("train.micro_batches", self.micro_batches),
                        ("train.log_every", self.log_every), ("train.spike_window", self.spike_window),
                        ("train.max_bad_in_a_row", self.max_bad_in_a_row)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise TrainingError(f"{name} must be a positive integer, got {v!r}")
        LossConfig.validate(self)
        for name, v, allowed in (("train.moe_exchange", self.moe_exchange, MOE_EXCHANGES),
                                 ("train.data_state_mismatch", self.data_state_mismatch, DATA_STATE_MISMATCH),
                                 ("lr_schedule.kind", self.optim.schedule.kind, SCHEDULES)):
            if v not in allowed:
                raise TrainingError(f"{name}={v!r} is not one of {allowed}")
        if self.spike_factor is not None and self.spike_factor != 0 and not self.spike_factor > 1:
            raise TrainingError(f"train.spike_factor must be > 1 (or None/0 = off), got {self.spike_factor!r}")
        if not isinstance(self.max_rollbacks, int) or self.max_rollbacks < 0:
            raise TrainingError(f"train.max_rollbacks must be a non-negative integer, got {self.max_rollbacks!r}")
        if self.onpolicy_prompt_len is not None:
            p = self.onpolicy_prompt_len
            if not isinstance(p, int) or isinstance(p, bool) or not 0 < p < self.seq_len:
                raise TrainingError(f"train.onpolicy_prompt_len={p!r} must be an integer in 1..SEQ_LEN-1 "
                                    f"(SEQ_LEN={self.seq_len}: prompt + completion)")
            if self.teacher is None:
                raise TrainingError("train.onpolicy_prompt_len is set but train.teacher is not: on-policy "
                                    "distillation needs a teacher (TEACHER)")
            try:
                self.onpolicy_sampling()
            except ValueError as e:
                raise TrainingError(f"train.onpolicy_*: {e}") from None
        if self.batch_size % self.micro_batches:
            raise TrainingError(f"BATCH_SIZE={self.batch_size} is not divisible by train.micro_batches="
                                f"{self.micro_batches}")
