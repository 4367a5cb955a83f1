"""The training loop: resume or initialise, step, log, evaluate, checkpoint, stop cleanly.

`train()` is gin-configurable; `launch/train.py` parses the gin files and calls it. Everything
it needs to resume — parameters, optimizer, counters, RNG, the data iterator's position and
the model config — is written together in one orbax checkpoint (layout: qwen3_jax.train.checkpoint).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp

from data_pipeline.checkpointing import DataRestore, DataSave
from data_pipeline.pipeline import BATCH_KEYS, to_global
from qwen3_jax import sharding
from qwen3_jax.config import ModelConfig, get_config
from qwen3_jax.params import param_specs
from qwen3_jax.train import checkpoint as ckpt
from qwen3_jax.train.metrics import MetricsWriter, flops_per_token, peak_flops
from qwen3_jax.train.optim import make_optimizer
from qwen3_jax.train.step import TrainState, init_state, make_eval_step, make_train_step

log = logging.getLogger("qwen3_jax.train")

OPT_STATE, TRAIN_STATE, DATA = "opt_state", "train_state", "data"


class TrainingError(RuntimeError):
    """A run that cannot start or cannot go on; the message says why."""


@gin.configurable
def model_config(preset: str = gin.REQUIRED, *, rope_theta: float | None = None, attention_impl: str | None = None,
                 overrides: dict[str, Any] | None = None, backend: str | None = None) -> ModelConfig:
    """The model of a run: a preset, the stage's RoPE base and attention, and other field overrides.

    attention_impl="auto" picks the memory-efficient kernel for the backend: splash on TPU,
    chunked elsewhere (`backend` defaults to jax.default_backend(); the AOT tool passes "tpu").
    """
    kw = dict(overrides or {})
    if rope_theta is not None:
        kw["rope_theta"] = float(rope_theta)
    if attention_impl == "auto":
        attention_impl = "splash" if (backend or jax.default_backend()) == "tpu" else "chunked"
    if attention_impl is not None:
        kw["attention_impl"] = attention_impl
    try:
        return get_config(preset, **kw)
    except (KeyError, TypeError, ValueError) as e:
        raise TrainingError(f"model_config: {e}") from None


# Fields a later stage may change when it starts from an earlier stage's parameters.
STAGE_MUTABLE = {"name", "rope_theta", "rope_scaling", "max_position_embeddings", "param_dtype", "compute_dtype",
                 "attention_impl", "attention_block", "splash_fused_bwd", "moe_impl", "remat", "scan_layers",
                 "router_aux_loss_coef"}


def _check_same_architecture(prev: ModelConfig, cfg: ModelConfig, where: str) -> None:
    diff = {f.name for f in dataclasses.fields(ModelConfig)
            if getattr(prev, f.name) != getattr(cfg, f.name)} - STAGE_MUTABLE
    if diff:
        pairs = ", ".join(f"{k}: {getattr(prev, k)!r} -> {getattr(cfg, k)!r}" for k in sorted(diff))
        raise TrainingError(f"{where} has a different architecture ({pairs})")


class _Preemption:
    """SIGTERM (the preemption notice) sets a flag; the loop saves and exits 0."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._old or signal.SIG_DFL)


gin.external_configurable(sharding.MeshConfig, "MeshConfig")


def validate(*, steps, seq_len, batch_size, micro_batches, checkpoint_every, cfg: ModelConfig, init_from, mesh):
    """Bad values fail here, before anything is compiled, naming the value."""
    for name, v in (("STEPS", steps), ("SEQ_LEN", seq_len), ("BATCH_SIZE", batch_size),
                    ("CHECKPOINT_EVERY", checkpoint_every), ("micro_batches", micro_batches)):
        if not isinstance(v, int) or v <= 0:
            raise TrainingError(f"{name} must be a positive integer, got {v!r}")
    if batch_size % micro_batches:
        raise TrainingError(f"BATCH_SIZE={batch_size} is not divisible by micro_batches={micro_batches}")
    shards = sharding.batch_shards(mesh)
    if (batch_size // micro_batches) % shards:
        raise TrainingError(f"BATCH_SIZE={batch_size} / micro_batches={micro_batches} is not divisible by the "
                            f"{shards} batch shards of the mesh {dict(mesh.shape)}")
    if batch_size % jax.process_count():
        raise TrainingError(f"BATCH_SIZE={batch_size} is not divisible by {jax.process_count()} processes")
    if seq_len > cfg.max_position_embeddings and cfg.rope_scaling is None:
        raise TrainingError(f"SEQ_LEN={seq_len} exceeds the model's max_position_embeddings="
                            f"{cfg.max_position_embeddings}")
    if cfg.attention_impl == "splash" and seq_len % 128:
        raise TrainingError(f"SEQ_LEN={seq_len} must be a multiple of 128 for splash attention")
    if init_from is not None:
        try:
            root, _ = ckpt.checkpoint_root(init_from)
        except FileNotFoundError as e:
            raise TrainingError(f"init_from: previous stage checkpoint not found: {e}") from None
        if ckpt.latest_step(root) is None:
            raise TrainingError(f"init_from: {init_from} has no complete checkpoint")


def _save(mgr, step: int, state: TrainState, data_it, cfg: ModelConfig, meta: dict) -> bool:
    """Saves one checkpoint; on failure says so and keeps the previous one."""
    try:
        mgr.save(step, args=ocp.args.Composite(**{
            ckpt.PARAMS: ocp.args.StandardSave(state.params),
            OPT_STATE: ocp.args.StandardSave(state.opt_state),
            TRAIN_STATE: ocp.args.StandardSave({"step": state.step, "rng": state.rng,
                                                "nonfinite_in_a_row": state.nonfinite_in_a_row,
                                                "nonfinite_total": state.nonfinite_total}),
            DATA: DataSave(data_it),  # one small JSON file per data shard
            ckpt.MODEL_CONFIG: ocp.args.JsonSave(cfg.to_dict()),
            ckpt.META: ocp.args.JsonSave({"step": step, **meta}),
        }), force=True)
        return True
    except Exception as e:  # noqa: BLE001 - any storage failure: report, keep going
        prev = mgr.latest_step()
        print(f"WARNING: checkpoint save at step {step} failed ({type(e).__name__}: {e}); "
              f"the last complete checkpoint (step {prev}) is intact", file=sys.stderr, flush=True)
        return False


def _restore(mgr, step: int, abstract: TrainState) -> TrainState:
    counters = {"step": abstract.step, "rng": abstract.rng, "nonfinite_in_a_row": abstract.nonfinite_in_a_row,
                "nonfinite_total": abstract.nonfinite_total}
    got = mgr.restore(step, args=ocp.args.Composite(**{
        ckpt.PARAMS: ocp.args.StandardRestore(abstract.params),
        OPT_STATE: ocp.args.StandardRestore(abstract.opt_state),
        TRAIN_STATE: ocp.args.StandardRestore(counters),
    }))
    t = got[TRAIN_STATE]
    return TrainState(params=got[ckpt.PARAMS], opt_state=got[OPT_STATE], step=t["step"], rng=t["rng"],
                      nonfinite_in_a_row=t["nonfinite_in_a_row"], nonfinite_total=t["nonfinite_total"])


def _restore_data(mgr, step: int, data_it, on_mismatch: str, remake):
    """The data iterator at the checkpoint's position; see `train(data_state_mismatch=...)`."""
    try:
        mgr.restore(step, args=ocp.args.Composite(**{DATA: DataRestore(data_it)}))
        return data_it
    except (ValueError, KeyError, FileNotFoundError) as e:
        if on_mismatch != "restart":
            raise TrainingError(f"the data position saved at step {step} does not fit this data pipeline ({e}). "
                                f"If the data, batch size or make_dataset.data_shards changed on purpose, set "
                                f"train.data_state_mismatch='restart' to continue with freshly shuffled data") from None
        print(f"WARNING: data position of step {step} not restorable ({e}); continuing with data reshuffled "
              f"(seed offset {step})", file=sys.stderr, flush=True)
        return remake(step)


def _params_from(path: str, cfg: ModelConfig, abstract_params) -> Any:
    """Parameters of another run's latest checkpoint (stage handoff), onto this run's shardings."""
    root, step = ckpt.checkpoint_root(path)
    step = step if step is not None else ckpt.latest_step(root)
    prev = ckpt.read_model_config(root, step)
    _check_same_architecture(prev, cfg, f"init_from checkpoint {root}/{step}")
    with ckpt.manager(root, create=False) as mgr:
        params = mgr.restore(step, args=ocp.args.Composite(**{
            ckpt.PARAMS: ocp.args.StandardRestore(abstract_params)}))[ckpt.PARAMS]
    print(f"initialised parameters from {root}/{step} ({prev.name}, rope_theta {prev.rope_theta:g} -> "
          f"{cfg.rope_theta:g})", flush=True)
    return params


@gin.configurable
def train(workdir: str, *, steps: int = gin.REQUIRED, seq_len: int = gin.REQUIRED, batch_size: int = gin.REQUIRED,
          checkpoint_every: int = gin.REQUIRED, make_data=gin.REQUIRED, make_eval_data=None, eval_every: int = 0,
          eval_batches: int = 4, micro_batches: int = 1, z_loss: float = 0.0, aux_loss_coef: float | None = None,
          aux_scope: str = "global", seed: int = 0, init_from: str | None = None, keep_last: int = 3,
          keep_every: int | None = None, log_every: int = 10, max_nonfinite_in_a_row: int = 5,
          async_checkpoint: bool = True, mesh: sharding.MeshConfig | None = None, moe_exchange: str = "auto",
          capacity_factor: float | None = None, loss_chunk: int | None = 2048, data_state_mismatch: str = "error",
          stop_after: int | None = None) -> dict:
    """Trains to `steps` optimizer steps (resuming from `workdir` when it has a checkpoint).

    make_data(seq_len=, global_batch_size=, seed=) -> per-host batch iterator with get_state/set_state.
    init_from: a previous stage's workdir or checkpoint; its parameters start this run when the
      workdir has no checkpoint yet (optimizer and data start fresh).
    mesh: ICI/DCN sizes of the data, fsdp, expert, tensor axes (default: FSDP over all devices);
      parameters, optimizer state and activations follow `qwen3_jax.sharding`'s rules.
    moe_exchange / capacity_factor: expert-parallel token exchange and optional capacity (dropless).
    loss_chunk: positions per piece of the output-head + cross-entropy computation (the full
      [B,T,V] logits are never materialised); None = all at once.
    data_state_mismatch: "error" (default) when a checkpoint's data position does not fit the
      pipeline (other data, batch size or data shards); "restart": warn and reshuffle instead.
      The position carries over to another process count when make_dataset.data_shards is set
      to a multiple of both (the default, one shard per process, ties it to the process count).
    stop_after: stop (with a checkpoint) after this many steps of this invocation — for tests.
    Returns a summary dict (final step, last metrics).
    """
    workdir_p = Path(workdir)
    cfg = model_config()
    try:
        mesh_cfg = mesh or sharding.MeshConfig()
        mesh = sharding.make_mesh(mesh_cfg)
        sharding.check_shardable(param_specs(cfg), mesh)
    except ValueError as e:
        raise TrainingError(f"mesh: {e}") from None
    validate(steps=steps, seq_len=seq_len, batch_size=batch_size, micro_batches=micro_batches,
             checkpoint_every=checkpoint_every, cfg=cfg, init_from=init_from, mesh=mesh)
    primary = jax.process_index() == 0
    if primary:
        workdir_p.mkdir(parents=True, exist_ok=True)
        (workdir_p / "model_config.json").write_text(cfg.to_json())

    optimizer, schedule = make_optimizer(steps)
    try:
        data_it = make_data(seq_len=seq_len, global_batch_size=batch_size, seed=seed)
    except (ValueError, FileNotFoundError) as e:
        raise TrainingError(f"data: {e}") from None
    abstract = jax.eval_shape(lambda: init_state(cfg, optimizer, seed))
    state_sh = sharding.tree_shardings(abstract, param_specs(cfg), mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
    batch_sh = sharding.batch_sharding(mesh)
    rules = dict(moe_exchange=moe_exchange, capacity_factor=capacity_factor)

    mgr = ckpt.manager(workdir_p / "checkpoints", max_to_keep=keep_last, keep_period=keep_every,
                       enable_async=async_checkpoint)
    start = mgr.latest_step()
    with sharding.use_rules(mesh, **rules):
        if start is not None:
            state = _restore(mgr, start, abstract)
            data_it = _restore_data(mgr, start, data_it, data_state_mismatch,
                                    lambda off: make_data(seq_len=seq_len, global_batch_size=batch_size,
                                                          seed=seed + off))
            print(f"resumed from {workdir_p / 'checkpoints' / str(start)}", flush=True)
        else:
            start = 0
            params = _params_from(init_from, cfg, abstract.params) if init_from else None
            init = jax.jit(lambda p: init_state(cfg, optimizer, seed, params=p), out_shardings=state_sh) \
                if params is not None else jax.jit(lambda: init_state(cfg, optimizer, seed), out_shardings=state_sh)
            state = init(params) if params is not None else init()
        step_fn = jax.jit(make_train_step(cfg, optimizer, micro_batches=micro_batches, z_loss=z_loss,
                                          loss_chunk=loss_chunk,
                                          aux_loss_coef=aux_loss_coef, aux_scope=aux_scope, schedule=schedule),
                          in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=0)
        eval_fn = (jax.jit(make_eval_step(cfg, loss_chunk), in_shardings=(state_sh.params, batch_sh))
                   if make_eval_data else None)

    if start >= steps:
        print(f"nothing to do: checkpoint step {start} >= STEPS={steps}", flush=True)
        mgr.close()
        return {"step": start, "metrics": {}}

    tokens_per_step = batch_size * seq_len
    fpt = flops_per_token(cfg, seq_len)
    peak = peak_flops(jax.devices()[0].device_kind)
    writer = MetricsWriter(workdir_p, steps, log_every=log_every, enabled=primary)
    meta = {"seq_len": seq_len, "batch_size": batch_size, "model": cfg.name}
    print(f"training {cfg.name} ({'MoE' if cfg.is_moe else 'dense'}) on {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s), mesh {dict(mesh.shape)}: steps {start}->{steps}, "
          f"{tokens_per_step:,} tokens/step, {fpt / 1e9:.3f} GFLOP/token", flush=True)

    last: dict[str, float] = {}
    step = start
    t_prev = time.time()
    with _Preemption() as preempt:
        while step < steps:
            batch = next(data_it)
            with sharding.use_rules(mesh, **rules):
                state, metrics = step_fn(state, _global_batch(batch, batch_sh))
            step += 1
            metrics = jax.device_get(metrics)
            now = time.time()
            dt, t_prev = now - t_prev, now
            metrics["step_time_s"] = dt
            metrics["tokens_per_s"] = tokens_per_step / dt
            metrics["tflops_per_device"] = fpt * tokens_per_step / dt / jax.device_count() / 1e12
            if peak:
                metrics["mfu"] = metrics["tflops_per_device"] * 1e12 / peak
            writer.write(step, metrics)
            last = {k: float(np.asarray(v).max()) for k, v in metrics.items()}
            if int(state.nonfinite_in_a_row) >= max_nonfinite_in_a_row:
                mgr.wait_until_finished()
                mgr.close()
                writer.close()
                raise TrainingError(f"{max_nonfinite_in_a_row} non-finite steps in a row at step {step} "
                                    f"(loss {metrics['loss']}, grad norm {metrics['grad_norm']}); stopped. "
                                    f"The last good checkpoint is step {mgr.latest_step()}")
            if eval_fn is not None and eval_every and step % eval_every == 0:
                with sharding.use_rules(mesh, **rules):
                    ev = _evaluate(eval_fn, state.params, make_eval_data, seq_len, batch_size, seed, eval_batches,
                                   batch_sh)
                writer.write(step, ev, prefix="eval")
            stopping = preempt.requested or step == steps or (stop_after is not None and step - start >= stop_after)
            if step % checkpoint_every == 0 or stopping:
                _save(mgr, step, state, data_it, cfg, meta)
            if stopping:
                break
    try:
        mgr.wait_until_finished()
    except Exception as e:  # noqa: BLE001
        print(f"WARNING: finishing the last checkpoint failed ({e}); the last complete checkpoint is step "
              f"{mgr.latest_step()}", file=sys.stderr, flush=True)
    mgr.close()
    writer.close()
    if preempt.requested:
        print(f"SIGTERM: saved step {step} and stopped; rerun the same command to resume", flush=True)
    return {"step": step, "metrics": last}


def _global_batch(batch, batch_sh) -> dict:
    """This host's numpy batch -> the step's global arrays (the keys the step reads)."""
    return to_global({k: batch[k] for k in BATCH_KEYS}, batch_sh.mesh, batch_sh.spec)


def _evaluate(eval_fn, params, make_eval_data, seq_len, batch_size, seed, n_batches, batch_sh) -> dict:
    """Mean loss over the first `n_batches` of the held-out data (the same batches every time)."""
    it = make_eval_data(seq_len=seq_len, global_batch_size=batch_size, seed=seed)
    nll = tokens = 0.0
    for _ in range(n_batches):
        try:
            batch = next(it)
        except StopIteration:
            break
        out = jax.device_get(eval_fn(params, _global_batch(batch, batch_sh)))
        nll += float(out["nll_sum"])
        tokens += float(out["tokens"])
    return {"loss": nll / max(tokens, 1.0), "tokens": tokens}
