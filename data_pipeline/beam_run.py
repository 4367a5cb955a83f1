"""prepare.py's pipelines on Apache Beam: the local runner, or any runner Beam knows.

`runner="local"` (prepare.py's default) is Beam's FnApiRunner, the engine of its DirectRunner,
named directly: the DirectRunner would first try to download the Prism runner. With workers <= 1
it runs the pipeline in this process; with N >= 2 it starts N worker processes
(`python -m data_pipeline.beam_worker`, Beam's SDK harness) and hands each stage's elements out
among them. Any other name (DataflowRunner, FlinkRunner, SparkRunner, PrismRunner, ...) goes to
Beam with the remaining command-line arguments as its pipeline options; such runners read and
write the inputs and --out themselves, so those must be on a bucket (gs://...).

Around a local run (`run`): a monitor thread prints a progress line every `progress_every` seconds
(documents and tokens the workers report in small files under a control folder, rates, ETA), ends
the run when a worker process dies (Beam's runner would wait for it forever), and a one-line error
a worker raised (`relay`) reaches the caller as `PrepareError` instead of a remote traceback.

Worker side: `tokenizer(spec)` loads a tokenizer once per process; `Progress` reports; `relay`
wraps a DoFn's work so a PrepareError / ValueError it raises is written for the main process.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import sys
import threading
import time
from typing import Callable

from data_pipeline.shard_writer import PrepareError
from data_pipeline.text_tokenizer import load_tokenizer

_root = logging.getLogger()
_quiet = logging.NullHandler()
# importing apache_beam logs a warning through the root logger (no apitools), which would also configure logging
_root.addHandler(_quiet)
try:
    import apache_beam as beam  # noqa: F401 - the modules that build pipelines import it from here
    from apache_beam.options.pipeline_options import PipelineOptions  # (inside the try: see above)
    from apache_beam.runners.portability.fn_api_runner import fn_runner  # (inside the try: see above)
    from apache_beam.transforms import environments  # (inside the try: see above)
finally:
    _root.removeHandler(_quiet)

LOCAL = "local"
CTL_ENV = "DATA_PIPELINE_CTL"  # the control folder, for worker processes (exit markers)
_TOKENIZERS: dict = {}


# --- worker side --------------------------------------------------------------------------------
def tokenizer(spec: str):
    """The tokenizer `spec` names, loaded once per process (the main process registers its own)."""
    tok = _TOKENIZERS.get(spec)
    if tok is None:
        tok = _TOKENIZERS[spec] = load_tokenizer(spec)
    if hasattr(tok, "speed_up"):  # the same ids, faster (text_tokenizer.HFTokenizer)
        tok.speed_up()
    return tok


def register_tokenizer(spec: str, tok) -> None:
    _TOKENIZERS[spec] = tok


class Progress:
    """Counts a worker's documents / tokens / bytes for one stage; written to the control folder
    at most once a second (and by flush())."""

    def __init__(self, ctl: str | None, stage: str):
        self.ctl, self.stage = ctl, stage
        self.counts = {"docs": 0, "tokens": 0, "bytes": 0}
        self._last = 0.0
        self._file = os.path.join(ctl, f"progress-{stage}-{os.getpid()}-{id(self)}.json") if ctl else None

    def add(self, docs: int = 0, tokens: int = 0, nbytes: int = 0) -> None:
        c = self.counts
        c["docs"] += docs
        c["tokens"] += tokens
        c["bytes"] += nbytes
        if self._file and time.monotonic() - self._last >= 1.0:
            self.flush()

    def flush(self) -> None:
        if not self._file or not os.path.isdir(self.ctl):
            return
        self._last = time.monotonic()
        tmp = f"{self._file}.tmp"
        with open(tmp, "w") as f:
            json.dump({**self.counts, "pid": os.getpid(), "cpu": time.process_time()}, f)
        os.replace(tmp, self._file)


def relay(ctl_of: Callable[[object], str | None]):
    """Decorates a DoFn method: a PrepareError or ValueError (corpus.CorpusError, ...) it raises is
    also written to the control folder (`ctl_of(self)`), whence `run` raises it as one line."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(self, *args, **kwargs):
            try:
                yield from fn(self, *args, **kwargs)
            except (PrepareError, ValueError) as e:
                ctl = ctl_of(self)
                if ctl and os.path.isdir(ctl):
                    with open(os.path.join(ctl, f"error-{os.getpid()}"), "w") as f:
                        f.write(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
                raise
        return inner
    return wrap


def crash_now(ctl: str | None) -> None:
    """Test hook: end the whole run as a killed job would (exit status 3), from any worker."""
    if ctl:
        open(os.path.join(ctl, "crash"), "w").close()
    os._exit(3)


# --- main side ----------------------------------------------------------------------------------
def run(build: Callable[[beam.Pipeline], None], *, runner: str = LOCAL, workers: int = 1,
        beam_args: list[str] | None = None, ctl: str | None = None, stages: dict[str, int] | None = None,
        progress_every: float | None = 10.0, died: str = "") -> None:
    """Builds the pipeline with `build(p)` and runs it to the end.

    Local runner: `workers` processes (<= 1: this one); `ctl` the control folder shared with
    them; a progress line every `progress_every` seconds (None: none) for each of `stages`
    ({stage: documents it will see}, as its DoFns report them to Progress); `died` the message
    when a worker process dies. Raises PrepareError with a worker's one-line error."""
    stages = stages or {}
    stage = "/".join(stages)
    local = runner == LOCAL
    if local:
        if beam_args:
            raise PrepareError(f"unrecognized arguments: {' '.join(beam_args)} (Beam pipeline options need a "
                               f"--runner other than {LOCAL})")
        opts = PipelineOptions(["--direct_num_workers", str(max(workers, 1))])
        if workers > 1:
            os.environ[CTL_ENV] = ctl or ""
            env = environments.SubprocessSDKEnvironment.from_command_string(
                f"exec {sys.executable} -m data_pipeline.beam_worker")
            pipeline_runner = fn_runner.FnApiRunner(default_environment=env)
        else:
            pipeline_runner = fn_runner.FnApiRunner()
    else:
        opts, pipeline_runner = PipelineOptions(["--runner", runner, *(beam_args or [])]), runner
    beam_logger = logging.getLogger("apache_beam")
    level = beam_logger.level
    beam_logger.setLevel(logging.CRITICAL)  # the local runner's INFO/WARNING chatter (and the workers' it relays)
    monitor = _Monitor(ctl, stages, progress_every, died, workers > 1) if local and ctl else None
    hook = threading.excepthook
    threading.excepthook = _quiet_thread  # Beam's gRPC threads when a worker dies: the monitor reports that
    try:
        p = beam.Pipeline(runner=pipeline_runner, options=opts)
        build(p)
        if monitor:
            monitor.start()
        p.run().wait_until_finish()
    except Exception as e:
        err = _worker_error(ctl)
        if err:
            raise PrepareError(err) from None
        if isinstance(e, (PrepareError, ValueError)):
            raise
        raise PrepareError(f"the {stage or 'Beam'} pipeline failed: "
                           f"{(str(e).strip().splitlines() or [type(e).__name__])[-1]}") from e
    finally:
        if monitor:
            monitor.stop()
        beam_logger.setLevel(level)
        threading.excepthook = hook


def _quiet_thread(args) -> None:
    """An exception that ends one of the runner's threads: the run's own outcome says what failed."""


def _worker_error(ctl: str | None) -> str | None:
    if not ctl or not os.path.isdir(ctl):
        return None
    for f in sorted(os.listdir(ctl)):
        if f.startswith("error-"):
            with open(os.path.join(ctl, f)) as fh:
                return fh.read().strip()
    return None


def _children(pid: int) -> dict[int, str]:
    """{pid: state} of the processes whose parent is `pid` and that run data_pipeline.beam_worker (Linux)."""
    out = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for p in entries:
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) != pid:
                continue
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if b"data_pipeline.beam_worker" in f.read():
                    out[int(p)] = fields[0]
        except (OSError, IndexError, ValueError):
            continue
    return out


class _Monitor(threading.Thread):
    """Progress lines, worker deaths and the crash test hook of one local run."""

    def __init__(self, ctl: str, stages: dict[str, int], every: float | None, died: str, watch: bool):
        super().__init__(daemon=True)
        self.ctl, self.stages, self.every, self.died, self.watch = ctl, stages, every, died, watch
        self._halt = threading.Event()
        self.t0 = {st: None for st in stages}  # when each stage's first progress was seen
        self.t_start = time.monotonic()

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(timeout=5)
        if self.every is not None:
            for st in self.stages:
                self._print(st, final=True)

    def run(self) -> None:
        seen: set[int] = set()
        last = time.monotonic()
        while not self._halt.wait(0.25):
            if os.path.exists(os.path.join(self.ctl, "crash")):
                os._exit(3)
            if self.watch:
                alive = _children(os.getpid())
                seen.update(alive)
                for pid in seen - {p for p, state in alive.items() if state != "Z"}:
                    if not os.path.exists(os.path.join(self.ctl, f"exit-{pid}")) and not self._halt.is_set():
                        self._abort()
            if self.every is not None and time.monotonic() - last >= self.every:
                last = time.monotonic()
                for st in self.stages:
                    self._print(st, final=False)

    def _abort(self) -> None:
        time.sleep(0.5)  # a worker that raised (error file) ends its process too
        if self._halt.is_set():
            return
        if os.path.exists(os.path.join(self.ctl, "crash")):  # the test hook's worker, not a death
            os._exit(3)
        err = _worker_error(self.ctl)
        print(f"prepare.py: error: {err or self.died or 'a worker process died'}", file=sys.stderr, flush=True)
        for pid in _children(os.getpid()):
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        os._exit(2)

    def counts(self, stage: str) -> dict:
        """The stage's documents, tokens and bytes so far, in total and per process ("processes":
        {pid: {docs, tokens, bytes, cpu: the process's CPU seconds at its last report}})."""
        total, procs, last = {"docs": 0, "tokens": 0, "bytes": 0}, {}, 0.0
        for f in os.listdir(self.ctl):
            if f.startswith(f"progress-{stage}-") and f.endswith(".json"):
                try:
                    with open(os.path.join(self.ctl, f)) as fh:
                        c = json.load(fh)
                    last = max(last, os.path.getmtime(os.path.join(self.ctl, f)))
                except (OSError, ValueError):
                    continue
                mine = procs.setdefault(c.get("pid", 0), {"docs": 0, "tokens": 0, "bytes": 0, "cpu": 0.0})
                for k in total:
                    total[k] += c[k]
                    mine[k] += c[k]
                mine["cpu"] = max(mine["cpu"], c.get("cpu", 0.0))
        return {**total, "processes": procs, "last": time.monotonic() - (time.time() - last) if last else None}

    def _print(self, stage: str, final: bool) -> None:
        c, total, now = self.counts(stage), self.stages[stage], time.monotonic()
        if c["docs"] and self.t0[stage] is None:
            self.t0[stage] = now - min(self.every or 0.0, now - self.t_start)  # it began within the last interval
        if self.t0[stage] is None or (not final and c["docs"] >= total) or (final and not c["docs"]):
            return
        end = c["last"] if final and c["last"] else now  # a finished stage: its last report, not the run's end
        el = max(end - self.t0[stage], 1e-9)
        rate = c["docs"] / el
        left = max(total - c["docs"], 0)
        eta = "done" if final or not left else (
            "ETA " + time.strftime("%H:%M:%S", time.gmtime(left / rate)) if rate else "ETA ?")
        tokens = f" · {c['tokens'] / el / 1e6:.2f}M tokens/s" if c["tokens"] else ""
        split = ""
        if final and len(c["processes"]) > 1:  # how the work was shared: documents, tokens, CPU seconds per worker
            split = " · per worker: " + ", ".join(
                f"{p['docs']:,} docs/" + (f"{p['tokens'] / 1e6:.2f}M tokens/" if p["tokens"] else "")
                + f"{p['cpu']:.1f} CPU s"
                for _, p in sorted(c["processes"].items()))
        print(f"prepare: {stage} {c['docs']:,}/{total:,} docs ({c['docs'] / max(total, 1):.0%}) · "
              f"{rate:,.0f} docs/s{tokens} · {c['bytes'] / el / 1e6:.1f} MB/s · {eta} ({el:.0f}s){split}",
              file=sys.stderr, flush=True)
