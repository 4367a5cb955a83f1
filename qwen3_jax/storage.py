"""Where a run's files live: local folders and object stores (`gs://...`) behind one path type.

Every path a run, a converter or the data tools open goes through `path()`, an `etils.epath.Path`
(orbax's own path type; `gs://` is served by gcsfs). The few operations an object store does not
have as a file system does (create-if-absent, append, atomic replace, folder moves) live here,
each with the local and the object-store form side by side, so no other module needs to know
which one it has.

Object stores differ from a local disk in three ways that matter to a run:
  * writing an object is atomic (a reader sees the old object or the new one), so an atomic file
    write is one upload; a folder cannot be renamed, so completeness is a marker written last
    (orbax's `commit_success.txt`; our data shards' `.json`);
  * create-if-absent is a generation precondition (`ifGenerationMatch=0`), the form of O_EXCL the
    workdir lock uses;
  * there is no append: `AppendLog` keeps the lines and rewrites the object, at most every
    `flush_s` seconds and always at `flush()` / `close()`.

Emulators: with `STORAGE_EMULATOR_HOST` set (the variable Google's clients read), gcsfs talks to
that server; `use_emulator_if_set()` (run when this module is imported) points tensorstore's `gcs`
kvstore (`TENSORSTORE_GCS_HTTP_URL`) and Google's C++ storage client inside ArrayRecord
(`CLOUD_STORAGE_EMULATOR_ENDPOINT`) at it too, and turns off gcsfs's zonal-bucket probe, which
asks a gRPC API the emulators do not serve (a 60 s timeout per bucket).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from typing import Callable, Iterator, Union

import fsspec.config
from etils import epath
from etils.epath import backend

PathLike = Union[str, os.PathLike]


def use_emulator_if_set() -> str | None:
    """Points every storage client at `STORAGE_EMULATOR_HOST` when it is set; returns it."""
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if host:
        url = host if "://" in host else f"http://{host}"
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
        os.environ.setdefault("CLOUD_STORAGE_EMULATOR_ENDPOINT", url)  # Google's C++ client (ArrayRecord)
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    return host


use_emulator_if_set()


def _no_listing_cache() -> None:
    """gcsfs caches folder listings for the life of the process by default. A run folder is
    written by many hosts and read across runs (resume, stage handoff), so a cached listing goes
    stale: every listing asks the server (fsspec's per-protocol defaults, before any instance)."""

    for proto in ("gs", "gcs"):
        fsspec.config.conf.setdefault(proto, {})["use_listings_cache"] = False


_no_listing_cache()


def path(p: PathLike) -> epath.Path:
    """`p` as an epath.Path: a local path (made absolute) or an object-store URL, never mangled."""
    if isinstance(p, epath.Path) and is_remote(p):
        return p
    s = os.fspath(p)
    if is_remote(s):
        return epath.Path(s)
    return epath.Path(os.path.abspath(os.path.expanduser(s)))


def is_remote(p: PathLike) -> bool:
    """True for an object-store URL (`gs://`, `s3://`, ...), False for a local path."""
    return "://" in os.fspath(p)


def _fs(p: epath.Path):
    """The fsspec file system serving a remote path: the very instance epath (and so orbax) uses,
    so a listing cached by one is invalidated for the other."""

    return backend.fsspec_backend.fs(os.fspath(p))


def umask() -> int:
    """The process umask, read without changing it where /proc allows."""
    try:
        for line in open("/proc/self/status").read().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def write_text(p: PathLike, text: str) -> None:
    write_bytes(p, text.encode())


def write_bytes(p: PathLike, data: bytes) -> None:
    """Writes `p` atomically: readers see the old content or the new, never a part (local: a
    temporary file beside it, then a rename; object store: one upload)."""
    p = path(p)
    if is_remote(p):
        p.write_bytes(data)
        return
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.tmp-", dir=os.fspath(p.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, os.fspath(p))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def create_exclusive(p: PathLike, text: str) -> bool:
    """Creates `p` holding `text` only if it does not exist; False when it exists (local: O_EXCL;
    object store: the `ifGenerationMatch=0` precondition, decided by the server)."""
    p = path(p)
    if is_remote(p):
        try:
            _fs(p).pipe_file(os.fspath(p), text.encode(), mode="create")
        except FileExistsError:
            return False
        return True
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(os.fspath(p), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return True


def remove_tree(p: PathLike) -> None:
    """Removes a folder (or prefix) and everything under it; missing is fine."""
    p = path(p)
    if is_remote(p):
        if p.exists():
            p.rmtree()
        return
    shutil.rmtree(os.fspath(p), ignore_errors=True)


def move_tree(src: PathLike, dst: PathLike, *, last: str | None = None) -> None:
    """Moves folder `src` to `dst`. Local: one rename. Object store: every object copied, then the
    sources deleted, `last` (a marker such as orbax's `commit_success.txt`) deleted first, so an
    interrupted move leaves the source incomplete (cleaned as unfinished) and the copy whole."""
    src, dst = path(src), path(dst)
    if not is_remote(src):
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(os.fspath(src), os.fspath(dst))
        return
    fs = _fs(src)
    files = list_files(src)
    for rel in files:
        fs.copy(os.fspath(src / rel), os.fspath(dst / rel))
    for rel in sorted(files, key=lambda r: r != last):  # the marker first
        fs.rm_file(os.fspath(src / rel))
    fs.invalidate_cache()


def upload_tree(local_dir: PathLike, dst: PathLike, *, last: str | None = None) -> None:
    """Copies a local folder's files under `dst` (local or remote); `last` (a file name in the
    folder's top level) is written after all the others, as the folder's completion marker."""
    local_dir, dst = os.fspath(local_dir), path(dst)
    names = []
    for dirpath, _, filenames in os.walk(local_dir):
        for name in filenames:
            names.append(os.path.relpath(os.path.join(dirpath, name), local_dir))
    names.sort(key=lambda n: n == last)
    for rel in names:
        target = dst / rel
        if not is_remote(target):
            target.parent.mkdir(parents=True, exist_ok=True)
        with open(os.path.join(local_dir, rel), "rb") as f:
            target.write_bytes(f.read())


def forget_listings(p: PathLike) -> None:
    """Drops this process's cached listings of a bucket (after another process changed it)."""
    if is_remote(p):
        _fs(path(p)).invalidate_cache()


def list_files(p: PathLike) -> list[str]:
    """Every file under folder `p`, as paths relative to it, sorted (one listing call on a bucket)."""
    p = path(p)
    if is_remote(p):
        base = os.fspath(p).split("://", 1)[1].rstrip("/") + "/"
        return sorted(f[len(base):] for f in _fs(p).find(os.fspath(p)) if f.startswith(base))
    root = os.fspath(p)
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


@contextlib.contextmanager
def staged(p: PathLike, include: Callable[[str], bool] | None = None) -> Iterator[epath.Path]:
    """`p` as a local path, for libraries that read only local files (safetensors, tokenizers,
    sentencepiece): `p` itself when local; a remote file, or a remote folder's files (the top-level
    names `include` accepts, all by default, and everything below them), downloaded one by one into
    a temporary folder that is removed on exit."""
    p = path(p)
    if not is_remote(p):
        yield p
        return
    with tempfile.TemporaryDirectory(prefix="qwen3-staged-") as tmp:
        local = epath.Path(tmp) / p.name
        if not p.is_dir():
            _fs(p).get_file(os.fspath(p), os.fspath(local))
            yield local
            return
        local.mkdir()
        for rel in list_files(p):
            if include is None or include(rel.split("/", 1)[0]):
                (local / rel).parent.mkdir(parents=True, exist_ok=True)
                _fs(p).get_file(os.fspath(p / rel), os.fspath(local / rel))
        yield local


class AppendLog:
    """A text file that grows by whole lines (metrics.jsonl). Local: appended and flushed per
    line. Object store (no append): the object's lines are read at open, kept, and the object is
    rewritten at most every `flush_s` seconds and at every `flush()` / `close()`."""

    def __init__(self, p: PathLike, flush_s: float = 10.0):
        self.path = path(p)
        self.remote = is_remote(self.path)
        self.flush_s = flush_s
        self._last_flush = 0.0
        self._dirty = False
        if self.remote:
            self._lines = self.path.read_text() if self.path.exists() else ""
            self._file = None
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(os.fspath(self.path), "a")

    def write(self, text: str) -> None:
        if self._file is not None:
            self._file.write(text)
            self._file.flush()
            return
        self._lines += text
        self._dirty = True
        if time.time() - self._last_flush >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        elif self._dirty:
            self.path.write_text(self._lines)
            self._dirty, self._last_flush = False, time.time()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        else:
            self.flush()


