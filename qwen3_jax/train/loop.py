"""The training loop: resume or initialise, step, log, evaluate, checkpoint, stop cleanly.

`train(workdir, model, tc)` takes plain configs (`ModelConfig`, `TrainConfig`); launch/train.py
fills them from the gin files. The step comes from `qwen3_jax.train.build`, the same builder the
AOT tool compiles. Everything a resume needs — parameters, optimizer, counters, RNG, the data
iterator's position and the model config — is written together in one orbax checkpoint
(layout: qwen3_jax.checkpoint; saving, validated restore and fallback:
qwen3_jax.train.run_checkpoints).

The loop overlaps host and device: step s+1 is dispatched before step s's metrics are read, and
the next global batch is prepared in a thread (qwen3_jax.train.prefetch) while a step runs.
Checkpoints, evals and samples wait for their step as before. Skipped updates (non-finite or a
loss spike, qwen3_jax.train.spike_guard) are decided on device; too many in a row roll the run
back to the last checkpoint written before the first of them. SIGTERM and SIGINT save and stop;
one run per workdir (qwen3_jax.train.workdir_lock). The workdir may be local or a bucket
(qwen3_jax.storage).

With several processes (hosts), process 0 decides and the others follow (qwen3_jax.train.hosts):
the restore step (one any host cannot read is skipped by all), the remat policy and the data
position decision; process 0 alone writes the lock, metrics and model_config.json. A signal that
reaches one host stops all of them at the same step (JAX's preemption sync point): each saves
that step and exits.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import threading
import time
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from data_pipeline.pipeline import BATCH_KEYS, to_global
from data_pipeline.shards import ShardError
from data_pipeline.text_tokenizer import load_tokenizer
from qwen3_jax import checkpoint as ckpt
from qwen3_jax import hosts, storage
from qwen3_jax.config import ModelConfig
from qwen3_jax.errors import TrainingError
from qwen3_jax.evaluate import bits_per_byte, scored_bytes, token_byte_lengths
from qwen3_jax.hlo_stats import program_fingerprint
from qwen3_jax.train import distill, faults
from qwen3_jax.train.build import Program, build
from qwen3_jax.train.config import TrainConfig
from qwen3_jax.train.data import check_vocab
from qwen3_jax.train.metrics import (
    MetricsWriter,
    cpu_stage_note,
    flops_per_token,
    matmul_flops_per_s,
    peak_flops,
    truncate_metrics,
)
from qwen3_jax.train.prefetch import BatchPrefetcher
from qwen3_jax.train.run_checkpoints import RunCheckpoints, clean_unfinished, params_from
from qwen3_jax.train.samples import data_tokenizer, print_samples
from qwen3_jax.train.workdir_lock import WorkdirLock

# Fields a later stage may change when it starts from an earlier stage's parameters.
STAGE_MUTABLE = {"name", "rope_theta", "rope_scaling", "max_position_embeddings", "param_dtype", "compute_dtype",
                 "attention_impl", "attention_block", "splash_fused_bwd", "moe_impl", "remat", "moe_saved_rows",
                 "scan_layers", "router_aux_loss_coef"}


def _check_same_architecture(prev: ModelConfig, cfg: ModelConfig, where: str) -> None:
    diff = {f.name for f in dataclasses.fields(ModelConfig)
            if getattr(prev, f.name) != getattr(cfg, f.name)} - STAGE_MUTABLE
    if diff:
        pairs = ", ".join(f"{k}: {getattr(prev, k)!r} -> {getattr(cfg, k)!r}" for k in sorted(diff))
        raise TrainingError(f"{where} has a different architecture ({pairs})")


class _Signals:
    """SIGTERM (a preemption notice) and SIGINT (Ctrl-C) stop the run after saving a checkpoint.
    A second SIGINT interrupts at once (KeyboardInterrupt), without saving.

    One process: the signal sets `requested` and the loop stops after the current step. Several:
    SIGTERM is left to JAX's preemption notifier and a SIGINT is forwarded to it (`hosts`), so
    every host learns of it and `stop()` turns True on all of them at the same step."""

    def __init__(self):
        self.requested: str | None = None  # the signal this process received
        self.stopping = False  # every host stops after this step
        self._old: dict = {}
        self.preemption = hosts.PreemptionSync()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            sigs = (signal.SIGINT,) if self.preemption.enabled else (signal.SIGTERM, signal.SIGINT)
            for sig in sigs:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.requested == "SIGINT":
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        if signum == signal.SIGINT:
            print("SIGINT: saving a checkpoint after this step, then stopping (Ctrl-C again: stop without "
                  "saving)", file=sys.stderr, flush=True)
            if self.preemption.enabled:
                self.preemption.forward_sigint()

    def stop(self, counter: int) -> bool:
        """Called once per step with the data position: True when the run must save this step and
        stop (on every host)."""
        if self.preemption.enabled:
            if self.preemption.reached(counter):
                self.stopping = True
                self.requested = self.requested or "SIGTERM"
                print(f"preemption sync point (process {jax.process_index()}): every host saves this step and "
                      f"stops", flush=True)
        else:
            self.stopping = self.requested is not None
        return self.stopping

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


def train(workdir: storage.PathLike, model: ModelConfig, tc: TrainConfig, *,
          devices: Sequence[Any] | None = None) -> dict:
    """Trains `model` to `tc.steps` optimizer steps, resuming from `workdir`'s newest readable
    checkpoint. Returns a summary dict (final step, last metrics, step program fingerprint, and
    `interrupted`: "SIGTERM"/"SIGINT" when a signal stopped it). Raises TrainingError for anything
    that stops the run or leaves it incomplete (after saving what it can)."""
    workdir_p = storage.path(workdir)
    if tc.make_data is None:
        raise TrainingError("train.make_data is not set: nothing to train on")
    program = build(model, tc, devices)
    model = program.model  # remat='auto' resolved
    if tc.init_from is not None:
        try:
            root, _ = ckpt.checkpoint_root(tc.init_from)
        except FileNotFoundError as e:
            raise TrainingError(f"train.init_from: previous stage checkpoint not found: {e}") from None
        if ckpt.latest_step(root) is None:
            raise TrainingError(f"train.init_from: {tc.init_from} has no complete checkpoint")
    primary = jax.process_index() == 0
    faults.install()
    with WorkdirLock(workdir_p, enabled=primary), _Signals() as signals:
        return _Run(workdir_p, model, tc, program, primary, signals).run()


class _Run:
    """One invocation of train(): resume, compile, the overlapped step loop, rollback, stop."""

    def __init__(self, workdir: storage.epath.Path, model: ModelConfig, tc: TrainConfig, program: Program, primary: bool,
                 signals: _Signals):
        self.workdir, self.model, self.tc, self.program, self.primary = workdir, model, tc, program, primary
        self.signals = signals
        self.rollbacks = 0
        self.good_updates = 0
        self.nonfinite_at_good = 0  # nonfinite_total after the last applied update
        self.last: dict[str, float] = {}
        self.eval_bytes_V: Any = None  # [V] bytes per token id for the eval's bits per byte (None: left out)

    def make_data(self, seed_offset: int = 0):
        tc = self.tc
        try:
            return tc.make_data(seq_len=tc.data_seq_len, global_batch_size=tc.batch_size, seed=tc.seed + seed_offset)
        except (ValueError, FileNotFoundError) as e:
            raise TrainingError(f"data: {e}") from None

    def check_arch(self, prev: ModelConfig, where: str) -> None:
        _check_same_architecture(prev, self.model, where)

    def run(self) -> dict:
        tc, model, workdir = self.tc, self.model, self.workdir
        if self.primary:
            storage.write_text(workdir / "model_config.json", model.to_json())
        data_it = self.make_data()
        check_vocab(data_it, model.vocab_size)
        if tc.make_eval_data is not None:
            check_vocab(tc.make_eval_data(seq_len=tc.seq_len, global_batch_size=tc.batch_size, seed=tc.seed),
                        model.vocab_size, "train.make_eval_data")
        root = workdir / "checkpoints"
        if self.primary:
            clean_unfinished(root)
        self.ckpts = RunCheckpoints(root, keep_last=tc.keep_last, keep_every=tc.keep_every,
                                    enable_async=tc.async_checkpoint)
        try:
            return self._run(data_it)
        finally:
            self.ckpts.close()

    def _run(self, data_it) -> dict:
        tc, model, program, workdir = self.tc, self.model, self.program, self.workdir
        found = self.ckpts.restore_latest(program.abstract_state, tc.spike_window, self.check_arch)
        if found is not None:
            start, state = found
            data_it = self.ckpts.restore_data(start, data_it, tc.data_state_mismatch, self.make_data)
            print(f"resumed from {self.ckpts.root / str(start)}", flush=True)
        else:
            start = 0
            params = (params_from(tc.init_from, model, program.abstract_state.params, self.check_arch)
                      if tc.init_from else None)
            state = program.init_state(params)
        self.nonfinite_at_good = int(state.nonfinite_total)
        if self.primary:
            truncate_metrics(workdir, start)
        if start >= tc.steps:
            print(f"nothing to do: checkpoint step {start} >= STEPS={tc.steps}", flush=True)
            return {"step": start, "metrics": {}}
        warmup = tc.optim.schedule.warmup_steps
        if warmup > tc.steps:
            print(f"NOTE: lr_schedule.warmup_steps={warmup} > STEPS={tc.steps}: warmup clamped to {tc.steps} "
                  f"steps (the learning rate reaches its peak only at the last step)", flush=True)

        if tc.make_eval_data is not None and tc.eval_every:
            self.eval_bytes_V = eval_bytes_table(program, data_it, model.vocab_size)
        self.signals.preemption.register(start)  # a notice from here on stops every host at step start + 1
        t0 = time.time()
        lowered = program.lowered or program.lower()  # remat='auto': compiled by build()'s search
        fingerprint = program_fingerprint(lowered)
        step_fn = program.compiled or lowered.compile()
        compile_s = time.time() - t0 + (program.compile_s or 0.0)
        if self.signals.requested and not self.signals.preemption.enabled:
            print(f"{self.signals.requested}: stopped before the first step; nothing new to save", flush=True)
            return {"step": start, "metrics": {}, "step_program": fingerprint, "interrupted": self.signals.requested}
        self.tokens_per_step = tc.batch_size * tc.seq_len
        self.fpt = flops_per_token(model, tc.seq_len)
        self.devs = list(program.mesh.devices.flat)
        self.peak = peak_flops(self.devs[0].device_kind)
        self.writer = MetricsWriter(workdir, tc.steps, log_every=tc.log_every, enabled=self.primary)
        self.writer.first_line_extra = f" | compiled in {compile_s:.1f} s"
        if self.devs[0].platform == "cpu" and self.primary:
            note = cpu_stage_note(str(workdir), tc.steps - start, self.tokens_per_step, self.fpt,
                                  matmul_flops_per_s(self.devs[0]))
            if note:
                print(note, flush=True)
        self.meta = {"seq_len": tc.seq_len, "batch_size": tc.batch_size, "model": model.name,
                     "step_program": fingerprint, "router_bias": bool(model.is_moe and tc.router_bias_rate)}
        self.teacher_args = ()  # distillation hook: the frozen teacher's params, the step's third argument
        if program.distill is not None:
            self.teacher_args = (distill.load_teacher_params(program.distill),)
            self.meta.update(program.distill.meta())
            print(f"teacher {program.distill.source.path} ({program.distill.cfg.name}, "
                  f"{program.distill.cfg.compute_dtype}); {program.distill.kd}", flush=True)
        self.rollout = None  # on-policy hook: the student samples each step's batch (qwen3_jax.train.onpolicy)
        if program.rollout is not None:
            self.writer.kd_name = "on-policy KL"
            eos = onpolicy_eos_id(tc, data_it)
            self.rollout = lambda st, prompts, s: program.rollout(
                st.params, {k: prompts[k] for k in ("tokens", "segment_ids")}, np.int32(s), np.int32(eos))
            self.meta["onpolicy"] = {"prompt_len": tc.onpolicy_prompt_len, "eos_id": eos,
                                     "sampling": dataclasses.asdict(tc.onpolicy_sampling())}
            print(f"on-policy: the student samples {tc.seq_len - tc.onpolicy_prompt_len + 1} tokens after prompts of "
                  f"up to {tc.onpolicy_prompt_len} tokens ({tc.onpolicy_sampling()}, end-of-text id {eos})", flush=True)
        print(f"training {model.name} ({'MoE' if model.is_moe else 'dense'}) on {len(self.devs)} "
              f"{self.devs[0].platform} device(s), mesh {dict(program.mesh.shape)}, attention {program.attention}, "
              f"remat {model.remat}: "
              f"steps {start}->{tc.steps}, {self.tokens_per_step:,} tokens/step, {self.fpt / 1e9:.3f} GFLOP/token, "
              f"step program {fingerprint}", flush=True)
        prefetch = BatchPrefetcher(data_it, lambda b: _global_batch(b, program))
        try:
            step, error = self._loop(state, start, step_fn, prefetch)
        finally:
            prefetch.close()
            self.writer.close()
        self.ckpts.wait()
        errors = [e for e in (error, self.ckpts.failure_message()) if e]
        if self.writer.write_error:
            errors.append(f"metrics were not all written ({self.writer.write_error})")
        if not error and step > start and self.good_updates == 0:
            errors.append(f"every update of this run was skipped (steps {start + 1}-{step}: non-finite loss or "
                          f"gradients, or spikes); the parameters are still those of step {start}")
        if errors:
            raise TrainingError("; ".join(errors))
        if self.signals.requested:
            done = f"saved step {step}" if step > start else "nothing new to save"
            print(f"{self.signals.requested}: {done} and stopped; rerun the same command to resume", flush=True)
        return {"step": step, "metrics": self.last, "step_program": fingerprint,
                "interrupted": self.signals.requested}

    def _loop(self, state, start: int, step_fn, prefetch) -> tuple[int, str | None]:
        """The overlapped loop: the next batch is prepared, and step s's metrics are written, while
        a step runs; step s+1 is dispatched as soon as step s is done (not before: a SIGTERM that
        arrives during a step stops the run after that step). Returns (last step, error or None)."""
        tc, program = self.tc, self.program
        step, pending, self.t_prev = start, None, time.time()
        batches = start  # the data position, in batches (a rollback does not rewind it)
        data_error, saved = None, start
        signalled = False
        while step < tc.steps:
            try:
                batch, next_pos = prefetch.next()
            except ShardError as e:  # a damaged record found mid-run: keep what was trained, name it
                data_error = f"data: {e}"
                break
            if pending is not None:  # the next batch is ready: wait for the step in flight before the next starts,
                jax.block_until_ready(pending[1])  # so a signal that came during it stops the run here
            if self.signals.requested and not self.signals.preemption.enabled:
                signalled = True  # one process: save this step now (several hosts agree on a step below)
                break
            pos = next_pos
            batches += 1
            state = faults.perturb(state, step + 1)
            if self.rollout is not None:
                batch = self.rollout(state, batch, step + 1)
            state, metrics = step_fn(state, batch, *self.teacher_args)
            step += 1
            verdict = self._report(*pending) if pending is not None else None
            pending = (step, metrics)
            stopping = (self.signals.stop(batches) or step == tc.steps
                        or (tc.stop_after is not None and step - start >= tc.stop_after))
            evals = tc.make_eval_data is not None and tc.eval_every and step % tc.eval_every == 0
            samples = tc.sample_every and tc.sample_prompts and step % tc.sample_every == 0
            saving = step % tc.checkpoint_every == 0 or stopping
            if verdict is None and (stopping or evals or samples or saving):
                verdict, pending = self._report(*pending), None  # these wait for the step anyway
            if verdict is not None:
                rolled = self._rollback(*verdict, consumed=batches)
                if isinstance(rolled, str):
                    return step, rolled
                step, state = rolled
                pending = None
                continue
            if evals:
                self.writer.write(step, _evaluate(program, state.params, self.eval_bytes_V), prefix="eval")
            if samples:
                print_samples(self.model, state.params, program.mesh,
                              tc.sample_tokenizer or data_tokenizer(prefetch.data_it), tc.sample_prompts, step,
                              tc.sample_tokens, self.primary)
            if saving:
                self.ckpts.save(step, state, pos, self.model, self.meta)
                self.writer.flush()
                saved = step
            if stopping:
                break
        if pending is not None:
            verdict = self._report(*pending)
            if verdict is not None:
                return step, self._rollback(*verdict, consumed=batches, final=True)
        if (data_error or signalled) and step > saved:
            self.ckpts.save(step, state, pos, self.model, self.meta)
        return step, data_error

    def _report(self, step: int, metrics) -> tuple[int, int, dict] | None:
        """Reads one step's metrics (the device is already busy with the next step), writes them;
        returns (step, first bad step, metrics) when too many updates in a row were skipped."""
        metrics = jax.device_get(metrics)
        now = time.time()
        dt, self.t_prev = now - self.t_prev, now
        metrics["step_time_s"] = dt
        metrics["tokens_per_s"] = self.tokens_per_step / dt
        metrics["tflops_per_device"] = self.fpt * self.tokens_per_step / dt / len(self.devs) / 1e12
        if self.peak:
            metrics["mfu"] = metrics["tflops_per_device"] * 1e12 / self.peak
        self.writer.write(step, metrics)
        self.last = {k: float(np.asarray(v).max()) for k, v in metrics.items()}
        bad = int(metrics["bad_in_a_row"])
        self.good_updates += bad == 0
        if bad == 0:
            self.nonfinite_at_good = int(metrics["nonfinite_total"])
        if bad >= self.tc.max_bad_in_a_row:
            return step, step - bad + 1, metrics
        return None

    def _rollback(self, step: int, first_bad: int, m: dict, consumed: int, final: bool = False):
        """After too many skipped updates: (step, state) restored from the last checkpoint written
        before `first_bad`, or the error message when rollback is off, exhausted or impossible."""
        tc = self.tc
        self.ckpts.wait()
        n = step - first_bad + 1
        kind = "non-finite" if not bool(m["finite"]) else "spike"
        what = (f"{n} skipped steps in a row (steps {first_bad}-{step}, the last {kind}: loss {float(m['loss']):.4g}, "
                f"grad norm {float(m['grad_norm']):.4g}; {int(m['nonfinite_total'])} non-finite and "
                f"{int(m['spikes_total'])} spikes so far)")
        if int(m["nonfinite_total"]) - self.nonfinite_at_good >= n:  # every skipped step was non-finite
            what = f"{n} non-finite steps in a row (steps {first_bad}-{step}: loss {float(m['loss']):.4g})"
        good = [c for c in self.ckpts.steps() if c < first_bad]
        target = max(good) if good else None
        named = (f"the last good checkpoint is step {target} (written before the first bad step {first_bad})"
                 if target is not None else f"no checkpoint was written before the first bad step {first_bad}")
        why_not = ("train.spike_rollback=False" if not tc.spike_rollback else
                   f"{self.rollbacks} rollback(s) already, train.max_rollbacks={tc.max_rollbacks}"
                   if self.rollbacks >= tc.max_rollbacks else "nothing to roll back to" if target is None
                   else "the run ended" if final else None)
        if why_not is not None:
            return f"{what}; stopped ({why_not}). {named[0].upper()}{named[1:]}"
        for c in self.ckpts.steps():
            if c > target:
                self.ckpts.move_aside(c, "written during or after the bad steps")
        found = self.ckpts.restore_latest(self.program.abstract_state, tc.spike_window, self.check_arch,
                                          below=first_bad)
        if found is None:
            return f"{what}; stopped (no readable checkpoint before step {first_bad})"
        self.rollbacks += 1
        self.nonfinite_at_good = int(found[1].nonfinite_total)
        if self.primary:
            self.writer.rewind(found[0])
        self.t_prev = time.time()
        print(f"ROLLBACK {self.rollbacks}/{tc.max_rollbacks}: {what}; restored checkpoint step {found[0]} "
              f"(written before the first bad step {first_bad}); the data goes on after batch {consumed} (the "
              f"{consumed - found[0]} batches read since step {found[0]} are not repeated)",
              file=sys.stderr, flush=True)
        return found


def onpolicy_eos_id(tc: TrainConfig, data_it) -> int:
    """The id that ends a sampled completion: the data tokenizer's end-of-text (-1: none)."""
    if not tc.onpolicy_stop_at_eos:
        return -1

    try:
        return int(load_tokenizer(tc.sample_tokenizer or data_tokenizer(data_it)).eos_id)
    except (ValueError, OSError, KeyError) as e:
        raise TrainingError(f"train.onpolicy_stop_at_eos: no end-of-text id ({e}); set train.sample_tokenizer "
                            f"or train.onpolicy_stop_at_eos=False") from None


def _global_batch(batch, program: Program) -> dict:
    """This host's numpy batch -> the step's global arrays (the keys the step reads)."""
    sh = program.batch_sharding
    return to_global({k: batch[k] for k in BATCH_KEYS}, sh.mesh, sh.spec)


def _evaluate(program: Program, params, bytes_V=None) -> dict:
    """Mean loss over the first `eval_batches` of the held-out data (the same batches every time),
    and bits per byte when the data's tokenizer is known (`eval_bytes_table`; the formula is
    qwen3_jax.evaluate's, so the numbers compare with launch/evaluate.py's)."""

    tc = program.train
    it = tc.make_eval_data(seq_len=tc.seq_len, global_batch_size=tc.batch_size, seed=tc.seed)
    nll = tokens = 0.0
    nbytes = 0
    for _ in range(tc.eval_batches):
        try:
            batch = next(it)
        except StopIteration:
            break
        out = jax.device_get(program.eval_step(params, _global_batch(batch, program)))
        nll += float(out["nll_sum"])
        tokens += float(out["tokens"])
        if bytes_V is not None:
            nbytes += scored_bytes(bytes_V, batch)  # this host's rows; summed over hosts below
    out = {"loss": nll / max(tokens, 1.0), "tokens": tokens}
    if bytes_V is not None:
        if jax.process_count() > 1:
            nbytes = int(np.sum(multihost_utils.process_allgather(np.int64(nbytes))))
        out["bits_per_byte"] = bits_per_byte(nll, nbytes)
    return out


def eval_bytes_table(program: Program, data_it, vocab_size: int):
    """[V] bytes per token id of the data's tokenizer, or None (the eval then has no bits per byte)."""

    try:
        name = program.train.sample_tokenizer or data_tokenizer(data_it)
        return token_byte_lengths(load_tokenizer(name), vocab_size)
    except (ValueError, OSError, KeyError) as e:
        print(f"eval: no bits per byte ({e})", flush=True)
        return None
