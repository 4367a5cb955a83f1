"""Model FLOPs, MFU, and where metrics go: console progress line, metrics.jsonl, TensorBoard.

The workdir may be local or a bucket (qwen3_jax.storage): metrics.jsonl is an `AppendLog` (on a
bucket rewritten at most every 10 s and at each checkpoint), TensorBoard events are written to a
local folder and copied under `<workdir>/tensorboard/` at the same moments."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Mapping

import jax
import numpy as np

from qwen3_jax import storage
from qwen3_jax.config import ModelConfig
from qwen3_jax.params import param_specs

# Dense bf16 peak FLOP/s per chip/GPU (vendor figures).
PEAK_FLOPS = {
    "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v5": 459e12,
    "tpu v6 lite": 918e12, "tpu v6e": 918e12, "h100": 989e12, "h200": 989e12,
}


def peak_flops(device_kind: str) -> float | None:
    """Peak bf16 FLOP/s for a `jax.Device.device_kind`, None when unknown (e.g. CPU)."""
    kind = device_kind.lower()
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key in kind:
            return PEAK_FLOPS[key]
    return None


def matmul_flops_per_s(device, n: int = 1024, reps: int = 3) -> float:
    """The device's measured float32 matmul rate (best of `reps` n x n x n products, after one to
    compile): a few tenths of a second on a CPU."""

    a = jax.device_put(np.ones((n, n), np.float32), device)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        mm(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def cpu_stage_note(name: str, steps: int, tokens_per_step: int, flops_per_tok: float,
                   matmul_flops_per_s: float, min_hours: float = 1.0) -> str | None:
    """On a CPU, the line said before step 1 when the stage is a TPU job: its model FLOPs over this
    CPU's measured matmul rate, a floor on the time here (the step does more than matmuls at their
    best rate: it took 3-10x that floor on the 2-core test box). None when the floor is under
    `min_hours`."""

    floor_h = steps * tokens_per_step * flops_per_tok / matmul_flops_per_s / 3600
    if floor_h < min_hours:
        return None
    return (f"NOTE: {name} is a TPU job: {steps:,} steps x {tokens_per_step:,} tokens = "
            f"{steps * tokens_per_step * flops_per_tok:.2e} model FLOPs; this CPU multiplies at "
            f"{matmul_flops_per_s / 1e9:.0f} GFLOP/s (measured now), so here it takes at least {floor_h:,.0f} hours "
            f"(the progress line's ETA, from step 1 on, is measured). On a CPU run `make demo` or --gin cpu_smoke.gin, "
            f"or scale STEPS / SEQ_LEN / BATCH_SIZE down; on a slice see launch/tpu/ and configs/slices/.")


def flops_per_token(cfg: ModelConfig, seq_len: int, *, training: bool = True, causal: bool = True) -> float:
    """Model FLOPs per token (2 per multiply-add; ×3 for forward + backward when training).

    Matmul weights touched per token — attention projections, the router, the top-k experts or the
    dense MLP, and the output head (the input embedding is a gather and costs nothing) — plus
    attention scores and values: 2·2·T·N·H per layer forward, halved when causal (only the
    lower triangle is needed). Counted from the model's parameter shapes, like the param counts.
    """

    matmul = 0
    for key, spec in param_specs(cfg).items():
        n = math.prod(spec.shape)
        if key == "embed/embedding":
            matmul += n if cfg.tie_embeddings else 0  # tied: the same matrix is the output head
        elif "norm" in key:
            continue
        elif "experts" in spec.axes:
            matmul += n * cfg.num_experts_per_tok // cfg.num_experts
        else:
            matmul += n
    attn = cfg.num_layers * 4 * seq_len * cfg.num_heads * cfg.head_dim * (0.5 if causal else 1.0)
    forward = 2 * matmul + attn
    return 3 * forward if training else forward


def truncate_metrics(workdir: storage.PathLike, step: int) -> int:
    """Keeps the lines of metrics.jsonl up to `step` (a resume or rollback to `step` writes the later
    steps again, so no step appears twice); the lines taken out are appended to
    metrics.rolled_back.jsonl, never dropped. Returns how many were moved."""
    path = storage.path(workdir) / "metrics.jsonl"
    if not path.exists():
        return 0
    keep, moved = [], []
    for line in path.read_text().splitlines(keepends=True):
        try:
            ok = int(json.loads(line)["step"]) <= step and line.endswith("\n")
        except (ValueError, KeyError, TypeError):
            ok = False  # a line cut short by a kill
        (keep if ok else moved).append(line if line.endswith("\n") else line + "\n")
    if moved:
        rolled = storage.AppendLog(path.with_name("metrics.rolled_back.jsonl"))
        rolled.write("".join(moved))
        rolled.close()
        storage.write_text(path, "".join(keep))
        print(f"metrics.jsonl: moved {len(moved)} line(s) after step {step} to metrics.rolled_back.jsonl "
              f"(those steps run again)", flush=True)
    return len(moved)


def _summary_writer():
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch whenever it
    is installed (1.5-2.7 s of every run's start, for torch tensors we never log); torch is optional
    to it, and we write numpy scalars only. A process that already imported torch keeps it."""

    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter  # optional: late, so that torch is not imported (above)
        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError: tensorboardX's no-torch path
    try:
        from tensorboardX import SummaryWriter  # optional: as above
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class _TensorBoard:
    """TensorBoard event files under `<workdir>/tensorboard`: written there directly on a local
    disk; on a bucket written to a local folder and copied up at each `flush()` (tensorboardX's own
    GCS writer needs google-cloud-storage internals it does not keep up with)."""

    def __init__(self, workdir: storage.PathLike):
        self.target = storage.path(workdir) / "tensorboard"
        self.local = tempfile.mkdtemp(prefix="qwen3-jax-tb-") if storage.is_remote(self.target) else None
        self.writer = _summary_writer()(self.local or os.fspath(self.target))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        if self.local is not None:
            self.writer.flush()
            storage.upload_tree(self.local, self.target)

    def close(self) -> None:
        self.writer.close()
        if self.local is not None:
            storage.upload_tree(self.local, self.target)
            shutil.rmtree(self.local, ignore_errors=True)


class MetricsWriter:
    """Writes each step's scalars to metrics.jsonl and TensorBoard, and a progress line to stdout
    (the first step of a run, then every `log_every` steps, and the last)."""

    def __init__(self, workdir: storage.PathLike, total_steps: int, *, log_every: int = 10, enabled: bool = True):
        self.workdir = storage.path(workdir)
        self.total_steps, self.log_every, self.enabled = total_steps, log_every, enabled
        self._logged_first = False
        self.write_error: str | None = None
        self.first_line_extra = ""  # appended to the first progress line (e.g. the compile time)
        self.kd_name = "kd"  # the distillation term's name on the console ("on-policy KL" when on-policy)
        self._jsonl = None
        self._tb = None
        if enabled:
            self._jsonl = storage.AppendLog(self.workdir / "metrics.jsonl")
            self._tb = _TensorBoard(self.workdir)
        self._t0 = time.time()
        self._first_step: int | None = None

    def write(self, step: int, metrics: Mapping[str, Any], *, prefix: str = "train") -> None:
        flat: dict[str, float] = {}
        tables: dict[str, list] = {}
        for k, v in metrics.items():
            a = np.asarray(v)
            if a.ndim == 0:
                flat[k] = float(a)
            elif a.ndim == 2:  # [layers, experts] counts: whole in metrics.jsonl (launch/expert_report.py)
                tables[k] = a.tolist()
            else:  # per-layer series (expert load): the worst layer, and each layer on TensorBoard
                agg = a.min() if k.endswith(("_min", "_entropy")) else a.max()
                flat[k] = float(agg)
                if self._tb is not None:
                    for i, x in enumerate(a.reshape(-1)):
                        self._tb.add_scalar(f"{prefix}/{k}/layer{i:03d}", float(x), step)
        if self._jsonl is not None:
            try:
                self._jsonl.write(json.dumps({"step": step, "split": prefix, "time": time.time(), **flat, **tables})
                                  + "\n")
            except OSError as e:  # e.g. a full disk: say so once, keep training
                if self.write_error is None:
                    self.write_error = f"{self.workdir / 'metrics.jsonl'}: {e}"
                    print(f"WARNING: writing metrics failed at step {step} ({self.write_error})", flush=True)
        if self._tb is not None:
            for k, x in flat.items():
                self._tb.add_scalar(f"{prefix}/{k}", x, step)
        if prefix == "train" and self.enabled and (step % self.log_every == 0 or step == self.total_steps
                                                   or not self._logged_first):
            line = self.progress_line(step, flat)
            if not self._logged_first:
                line += self.first_line_extra
            self._logged_first = True
            print(line, flush=True)
        elif prefix != "train" and self.enabled:
            print(f"[{prefix}] step {step}: " + " ".join(f"{k} {v:.4g}" for k, v in flat.items()), flush=True)

    def flush(self) -> None:
        """Makes everything written so far visible in the workdir (on a bucket: uploads it); called
        at each checkpoint."""
        try:
            for f in (self._jsonl, self._tb):
                if f is not None:
                    f.flush()
        except OSError as e:
            if self.write_error is None:
                self.write_error = f"{self.workdir}: {e}"
                print(f"WARNING: writing metrics failed ({e})", flush=True)

    def rewind(self, step: int) -> None:
        """After a rollback to `step`: metrics.jsonl keeps the lines up to it (see truncate_metrics)."""
        if self._jsonl is not None:
            self._jsonl.close()
            truncate_metrics(self.workdir, step)
            self._jsonl = storage.AppendLog(self.workdir / "metrics.jsonl")

    def progress_line(self, step: int, m: Mapping[str, float]) -> str:
        if self._first_step is None:
            self._first_step, self._t0 = step, time.time()
        done = step - self._first_step
        rate = done / max(time.time() - self._t0, 1e-9) if done else 1 / m.get("step_time_s", math.inf)
        eta = (self.total_steps - step) / rate if rate else float("nan")
        eta_s = "?" if math.isnan(eta) else time.strftime("%H:%M:%S", time.gmtime(eta))
        parts = [f"step {step}/{self.total_steps}", f"loss {m.get('loss', float('nan')):.4f}"]
        if "kd_loss" in m:  # distilling: the loss is (1-a)·LM + a·KD; both terms, and top-1 agreement
            parts.append(f"lm {m.get('lm_loss', float('nan')):.4f}")
            parts.append(f"{self.kd_name} {m['kd_loss']:.4f}")
            parts.append(f"top-1 agree {100 * m.get('kd_top1_agree', float('nan')):.0f}%")
        if m.get("aux_loss"):
            parts.append(f"aux {m['aux_loss']:.4f}")
        if m.get("skipped"):
            parts.append("UPDATE SKIPPED (" + ("spike" if m.get("spike") else "non-finite") + ")")
        parts += [f"gnorm {m.get('grad_norm', 0):.3f}", f"lr {m.get('lr', 0):.2e}",
                  f"{m.get('tokens_per_s', 0):,.0f} tok/s"]
        if m.get("mfu") is not None and "mfu" in m:
            parts.append(f"MFU {100 * m['mfu']:.1f}%")
        if "expert_load_max" in m:
            parts.append(f"expert load max {m['expert_load_max']:.2f}")
        parts.append(f"ETA {eta_s}")
        return " | ".join(parts)

    def close(self) -> None:
        for f in (self._jsonl, self._tb):
            try:
                if f is not None:
                    f.close()
            except OSError as e:  # e.g. a full disk: the lines written so far are kept
                if self.write_error is None:
                    self.write_error = f"{self.workdir}: {e}"
                    print(f"WARNING: closing the metrics files failed ({e})", flush=True)
