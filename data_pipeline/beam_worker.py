"""A worker process of prepare.py's local Beam runner: `python -m data_pipeline.beam_worker`.

Beam's SDK harness (apache_beam.runners.worker.sdk_worker_main), started by beam_run.run with
`exec` so this process is the main process's own child, plus three things Beam leaves out:
it ends when the main process ends, however that ends (SIGKILL included; Beam's worker would
wait on its gRPC channels); its logging stays off the terminal (the harness sends its records to
the main process, which keeps them quiet); and a normal exit leaves `exit-<pid>` in the control
folder, so the main process can tell a worker that finished from one that died.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time


def die_with_parent(parent: int) -> None:
    """Ends this process when process `parent` ends, however it ends (SIGKILL included)."""
    try:  # Linux: the kernel sends SIGKILL when the parent's thread that forked us exits
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch():  # everywhere (and should that thread end early): poll
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def main() -> None:
    die_with_parent(os.getppid())
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process: the processes are the parallelism
    root = logging.getLogger()
    root.addHandler(logging.NullHandler())  # no basicConfig to stderr (the harness adds its own handler)
    from apache_beam.runners.worker import sdk_worker_main  # heavy (~2 s): after the parent watch is up
    sdk_worker_main.main(sys.argv)
    ctl = os.environ.get("DATA_PIPELINE_CTL")
    if ctl and os.path.isdir(ctl):
        open(os.path.join(ctl, f"exit-{os.getpid()}"), "w").close()


if __name__ == "__main__":
    main()
