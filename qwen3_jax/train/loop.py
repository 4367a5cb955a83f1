"""The training loop: resume or initialise, step, log, evaluate, checkpoint, stop cleanly.

`train(workdir, model, tc)` takes plain configs (`ModelConfig`, `TrainConfig`); launch/train.py
fills them from the gin files. The step comes from `qwen3_jax.train.build`, the same builder the
AOT tool compiles. Everything a resume needs — parameters, optimizer, counters, RNG, the data
iterator's position and the model config — is written together in one orbax checkpoint
(layout: qwen3_jax.train.checkpoint).
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from data_pipeline.checkpointing import DataRestore, DataSave
from data_pipeline.pipeline import BATCH_KEYS, to_global
from qwen3_jax.config import ModelConfig
from qwen3_jax.train import checkpoint as ckpt
from qwen3_jax.train.build import Program, build, program_fingerprint
from qwen3_jax.train.config import TrainConfig, TrainingError
from qwen3_jax.train.metrics import MetricsWriter, flops_per_token, peak_flops
from qwen3_jax.train.samples import data_tokenizer, print_samples
from qwen3_jax.train.step import TrainState

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


def _save(mgr, step: int, state: TrainState, data_it, cfg: ModelConfig, meta: dict) -> bool:
    """Saves one checkpoint; on failure says so and keeps the previous one."""
    try:
        mgr.save(step, args=ocp.args.Composite(**{
            ckpt.PARAMS: ocp.args.StandardSave(state.params),
            ckpt.OPT_STATE: ocp.args.StandardSave(state.opt_state),
            ckpt.TRAIN_STATE: ocp.args.StandardSave(_counters(state)),
            ckpt.DATA: DataSave(data_it),  # one small JSON file per data shard
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
    counters = _counters(abstract)
    got = mgr.restore(step, args=ocp.args.Composite(**{
        ckpt.PARAMS: ocp.args.StandardRestore(abstract.params),
        ckpt.OPT_STATE: ocp.args.StandardRestore(abstract.opt_state),
        ckpt.TRAIN_STATE: ocp.args.StandardRestore(counters),
    }))
    t = got[ckpt.TRAIN_STATE]
    return TrainState(params=got[ckpt.PARAMS], opt_state=got[ckpt.OPT_STATE], step=t["step"], rng=t["rng"],
                      nonfinite_in_a_row=t["nonfinite_in_a_row"], nonfinite_total=t["nonfinite_total"],
                      moe=t.get("moe", {}))


def _counters(state: TrainState) -> dict:
    """The train_state item: counters, RNG and the MoE balancing state (counts, routing bias)."""
    out = {"step": state.step, "rng": state.rng, "nonfinite_in_a_row": state.nonfinite_in_a_row,
           "nonfinite_total": state.nonfinite_total}
    if state.moe:
        out["moe"] = state.moe
    return out


def _restore_data(mgr, step: int, data_it, on_mismatch: str, remake):
    """The data iterator at the checkpoint's position; see `train(data_state_mismatch=...)`."""
    try:
        mgr.restore(step, args=ocp.args.Composite(**{ckpt.DATA: DataRestore(data_it)}))
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


def train(workdir: str | Path, model: ModelConfig, tc: TrainConfig, *,
          devices: Sequence[Any] | None = None) -> dict:
    """Trains `model` to `tc.steps` optimizer steps, resuming from `workdir` when it has a
    checkpoint. Returns a summary dict (final step, last metrics, step program fingerprint)."""
    workdir_p = Path(workdir)
    if tc.make_data is None:
        raise TrainingError("train.make_data is not set: nothing to train on")
    program = build(model, tc, devices)
    if tc.init_from is not None:
        try:
            root, _ = ckpt.checkpoint_root(tc.init_from)
        except FileNotFoundError as e:
            raise TrainingError(f"train.init_from: previous stage checkpoint not found: {e}") from None
        if ckpt.latest_step(root) is None:
            raise TrainingError(f"train.init_from: {tc.init_from} has no complete checkpoint")
    primary = jax.process_index() == 0
    if primary:
        workdir_p.mkdir(parents=True, exist_ok=True)
        (workdir_p / "model_config.json").write_text(model.to_json())

    def make_data(seed_offset: int = 0):
        try:
            return tc.make_data(seq_len=tc.seq_len, global_batch_size=tc.batch_size, seed=tc.seed + seed_offset)
        except (ValueError, FileNotFoundError) as e:
            raise TrainingError(f"data: {e}") from None

    data_it = make_data()
    mgr = ckpt.manager(workdir_p / "checkpoints", max_to_keep=tc.keep_last, keep_period=tc.keep_every,
                       enable_async=tc.async_checkpoint)
    start = mgr.latest_step()
    if start is not None:
        state = _restore(mgr, start, program.abstract_state)
        data_it = _restore_data(mgr, start, data_it, tc.data_state_mismatch, make_data)
        print(f"resumed from {workdir_p / 'checkpoints' / str(start)}", flush=True)
    else:
        start = 0
        params = _params_from(tc.init_from, model, program.abstract_state.params) if tc.init_from else None
        state = program.init_state(params)
    if start >= tc.steps:
        print(f"nothing to do: checkpoint step {start} >= STEPS={tc.steps}", flush=True)
        mgr.close()
        return {"step": start, "metrics": {}}

    lowered = program.lower()
    fingerprint = program_fingerprint(lowered)
    step_fn = lowered.compile()
    tokens_per_step = tc.batch_size * tc.seq_len
    fpt = flops_per_token(model, tc.seq_len)
    devs = list(program.mesh.devices.flat)
    peak = peak_flops(devs[0].device_kind)
    writer = MetricsWriter(workdir_p, tc.steps, log_every=tc.log_every, enabled=primary)
    meta = {"seq_len": tc.seq_len, "batch_size": tc.batch_size, "model": model.name, "step_program": fingerprint,
            "router_bias": bool(model.is_moe and tc.router_bias_rate)}
    print(f"training {model.name} ({'MoE' if model.is_moe else 'dense'}) on {len(devs)} "
          f"{devs[0].platform} device(s), mesh {dict(program.mesh.shape)}, attention {program.attention}: "
          f"steps {start}->{tc.steps}, {tokens_per_step:,} tokens/step, {fpt / 1e9:.3f} GFLOP/token, "
          f"step program {fingerprint}", flush=True)

    last: dict[str, float] = {}
    step = start
    t_prev = time.time()
    with _Preemption() as preempt:
        while step < tc.steps:
            batch = next(data_it)
            state, metrics = step_fn(state, _global_batch(batch, program))
            step += 1
            metrics = jax.device_get(metrics)
            now = time.time()
            dt, t_prev = now - t_prev, now
            metrics["step_time_s"] = dt
            metrics["tokens_per_s"] = tokens_per_step / dt
            metrics["tflops_per_device"] = fpt * tokens_per_step / dt / len(devs) / 1e12
            if peak:
                metrics["mfu"] = metrics["tflops_per_device"] * 1e12 / peak
            writer.write(step, metrics)
            last = {k: float(np.asarray(v).max()) for k, v in metrics.items()}
            if int(state.nonfinite_in_a_row) >= tc.max_nonfinite_in_a_row:
                mgr.wait_until_finished()
                mgr.close()
                writer.close()
                raise TrainingError(f"{tc.max_nonfinite_in_a_row} non-finite steps in a row at step {step} "
                                    f"(loss {metrics['loss']}, grad norm {metrics['grad_norm']}); stopped. "
                                    f"The last good checkpoint is step {mgr.latest_step()}")
            if tc.make_eval_data is not None and tc.eval_every and step % tc.eval_every == 0:
                writer.write(step, _evaluate(program, state.params), prefix="eval")
            if tc.sample_every and tc.sample_prompts and step % tc.sample_every == 0:
                print_samples(model, state.params, program.mesh, tc.sample_tokenizer or data_tokenizer(data_it),
                              tc.sample_prompts, step, tc.sample_tokens, primary)
            stopping = (preempt.requested or step == tc.steps
                        or (tc.stop_after is not None and step - start >= tc.stop_after))
            if step % tc.checkpoint_every == 0 or stopping:
                _save(mgr, step, state, data_it, model, meta)
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
    return {"step": step, "metrics": last, "step_program": fingerprint}


def _global_batch(batch, program: Program) -> dict:
    """This host's numpy batch -> the step's global arrays (the keys the step reads)."""
    sh = program.batch_sharding
    return to_global({k: batch[k] for k in BATCH_KEYS}, sh.mesh, sh.spec)


def _evaluate(program: Program, params) -> dict:
    """Mean loss over the first `eval_batches` of the held-out data (the same batches every time)."""
    tc = program.train
    it = tc.make_eval_data(seq_len=tc.seq_len, global_batch_size=tc.batch_size, seed=tc.seed)
    nll = tokens = 0.0
    for _ in range(tc.eval_batches):
        try:
            batch = next(it)
        except StopIteration:
            break
        out = jax.device_get(program.eval_step(params, _global_batch(batch, program)))
        nll += float(out["nll_sum"])
        tokens += float(out["tokens"])
    return {"loss": nll / max(tokens, 1.0), "tokens": tokens}
