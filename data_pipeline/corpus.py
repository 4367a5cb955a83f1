"""Raw inputs → a deterministic stream of records, decoded (and validated) separately.

Inputs (`expand_inputs`): files or globs of jsonl (plain / .gz / .zst), parquet and plain
text (one document per file), and built-in corpora that exist on every machine:

  builtin:python-stdlib        the running Python's standard library: its .py sources
                               (code) and its docs (pydoc topics = the language/library
                               reference, plus each module's docstrings)
  builtin:python-stdlib-code   only the sources;  builtin:python-stdlib-docs  only the docs

Reading is split in two so the expensive part runs in worker processes: `iter_raw(input)`
yields cheap `Raw` records in a fixed order (one per jsonl line / parquet row / file);
`decode(raw, text_key)` turns one into text or a skip reason. `count(input)` counts records
without decoding (line counting for jsonl, metadata for parquet), which gives the shard plan
and the progress bar's total. A file that cannot be read whole (truncated or corrupt .gz/.zst,
unreadable parquet, a text file that is not UTF-8) raises `CorpusError` naming it: `count` reads
every compressed/text file to the end, so a bad file is found before anything is written.

Input files and globs may be on a bucket (`gs://b/raw/*.jsonl.zst`): they are read through
`qwen3_jax.storage` (gcsfs; see qwen3_jax.storage.path), streamed like local files.

The built-in corpus, prepared for training runs on demand (`stage_mixture`), is cached under
`BUILTIN_CACHE_DIR`, apart from the folders users name with --out.
"""
from __future__ import annotations

import ast
import collections
import contextlib
import functools
import glob
import gzip
import io
import json
import os
import sysconfig
import zlib
from typing import Iterator, NamedTuple

import pyarrow
import pyarrow.parquet as pq
import zstandard

from qwen3_jax import storage

BUILTINS = ("builtin:python-stdlib", "builtin:python-stdlib-code", "builtin:python-stdlib-docs")
SKIP_REASONS = ("malformed_json", "missing_text", "invalid_utf8", "empty")
_EXCLUDE_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
# where training runs prepare the built-in corpus (stage_mixture.builtin_dir); not a user --out folder
BUILTIN_CACHE_DIR = os.path.join("runs", "cache", "stdlib-corpus")


class CorpusError(ValueError):
    """An input file that cannot be read (truncated/corrupt compression, not UTF-8, unreadable)."""

    def __init__(self, path: str, reason: str, fix: str = "repair or remove the file"):
        super().__init__(f"{path}: {reason}; {fix}, or pass --skip-bad-files to leave it out")
        self.path, self.reason = path, reason

    def __reduce__(self):  # raised in worker processes too
        return type(self), (self.path, self.reason)


class Raw(NamedTuple):
    source: str      # file (or builtin name)
    line: int        # 1-based line (jsonl) / row (parquet) / file number (text, builtin)
    kind: str        # "json" (bytes of one jsonl line), "bytes" (a whole text file), "text", "pydoc", "none"
    payload: object


class Decoded(NamedTuple):
    text: str | None
    reason: str | None   # one of SKIP_REASONS when text is None
    detail: str = ""


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_sources() -> list[str]:
    """Sorted .py files of the standard library, without tests and third-party packages."""
    root = stdlib_dir()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDE_DIRS)
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return sorted(out)


def expand_inputs(inputs: list[str]) -> list[str]:
    """Globs expanded (sorted), builtins kept; order of arguments preserved; missing → error."""
    out: list[str] = []
    for spec in inputs:
        if spec.startswith("builtin:"):
            if spec not in BUILTINS:
                raise ValueError(f"unknown built-in corpus {spec!r}; known: {', '.join(BUILTINS)}")
            out.append(spec)
            continue
        matches = _matches(spec)
        if not matches:
            raise FileNotFoundError(f"no input file matches {spec!r}")
        out.extend(matches)
    return out


def _matches(spec: str) -> list[str]:
    """The files a path or glob names (local or on a bucket), sorted."""
    if not storage.is_remote(spec):
        matches = sorted(glob.glob(spec)) if glob.has_magic(spec) else [spec]
        return [m for m in matches if os.path.isfile(m)]
    if not glob.has_magic(spec):
        return [spec] if storage.path(spec).is_file() else []
    parts = spec.split("/")
    k = next(i for i, part in enumerate(parts) if glob.has_magic(part))  # > 2: gs://bucket/...
    root = "/".join(parts[:k])
    return sorted(os.fspath(m) for m in storage.path(root).glob("/".join(parts[k:])) if m.is_file())


def _fmt(path: str) -> str:
    p = path[:-3] if path.endswith(".gz") else path[:-4] if path.endswith(".zst") else path
    if p.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if p.endswith(".parquet"):
        return "parquet"
    return "text"


class _Chunks(io.RawIOBase):
    """A read-only binary stream over an iterator of byte chunks (for line iteration)."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks, self._buf = chunks, b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buf:
            self._buf = next(self._chunks, b"")
            if not self._buf:
                return 0
        n = min(len(b), len(self._buf))
        b[:n], self._buf = self._buf[:n], self._buf[n:]
        return n


def _zstd_chunks(path: str) -> Iterator[bytes]:
    """Decompressed bytes of a (multi-frame) .zst file; a frame cut short raises (zstandard's
    stream_reader silently stops at the cut)."""
    dctx, frame = zstandard.ZstdDecompressor(), None
    with _open_raw(path) as f:
        while data := f.read(1 << 18):
            while data:
                frame = frame or dctx.decompressobj()
                if out := frame.decompress(data):
                    yield out
                data, frame = (frame.unused_data, None) if frame.eof else (b"", frame)
    if frame is not None:
        raise EOFError("the zstd stream ends inside a frame")


def _open_raw(path: str):
    """The file's bytes as stored (local or on a bucket)."""
    return storage.path(path).open("rb") if storage.is_remote(path) else open(path, "rb")


def _open_binary(path: str):
    """The file's decompressed bytes (.gz, .zst or plain)."""
    if path.endswith(".gz"):
        raw = _open_raw(path)
        f = gzip.GzipFile(fileobj=raw, mode="rb")
        f.myfileobj = raw  # GzipFile closes the file it holds here (as when it opens one itself)
        return f
    if path.endswith(".zst"):
        return io.BufferedReader(_Chunks(_zstd_chunks(path)), 1 << 20)
    return _open_raw(path)


@contextlib.contextmanager
def _parquet(path: str):
    """The open pyarrow ParquetFile (from the path when local, else through a bucket file object)."""
    if not storage.is_remote(path):
        yield pq.ParquetFile(path)
        return
    with _open_raw(path) as f:
        yield pq.ParquetFile(f)


def _read_errors() -> tuple[type[BaseException], ...]:
    errs: tuple = (OSError, EOFError, zlib.error)  # gzip.BadGzipFile is an OSError
    try:
        errs += (zstandard.ZstdError,)
    except ImportError:
        pass
    try:
        errs += (pyarrow.ArrowException,)
    except ImportError:
        pass
    return errs


def _bad_file(path: str, e: BaseException, where: str = "") -> CorpusError:
    what = "truncated" if isinstance(e, EOFError) else "unreadable"
    return CorpusError(path, f"{what}{where} ({type(e).__name__}: {e})")


def _pydoc_topics() -> list[tuple[str, str]]:
    try:
        from pydoc_data.topics import topics  # late: a large module only the built-in corpus reads
    except ImportError:
        return []
    return sorted(topics.items())


def count(spec: str) -> int:
    """Number of records `iter_raw(spec)` yields, without decoding them. A file that cannot be
    read to the end (or a text file that is not UTF-8) raises CorpusError naming it."""
    if spec.startswith("builtin:"):
        return _count_builtin(spec)
    try:
        return _count_file(spec)
    except CorpusError:
        raise
    except _read_errors() as e:
        raise _bad_file(spec, e) from None


def builtin_bytes(spec: str) -> int:
    """About how much a built-in corpus costs to read: the bytes of the sources it parses."""
    size = sum(os.path.getsize(p) for p in stdlib_sources())
    return size * (2 if spec == "builtin:python-stdlib" else 1)


def _count_builtin(spec: str) -> int:
    n = 0
    if spec != "builtin:python-stdlib-docs":
        n += len(stdlib_sources())
    if spec != "builtin:python-stdlib-code":
        n += len(_pydoc_topics()) + len(stdlib_sources())
    return n


def _count_file(spec: str) -> int:
    fmt = _fmt(spec)
    if fmt == "parquet":
        with _parquet(spec) as pf:
            return pf.metadata.num_rows
    if fmt == "text":
        with _open_binary(spec) as f:
            data = f.read()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CorpusError(spec, f"not UTF-8 text (byte {e.start}: {data[e.start:e.start + 4]!r})",
                              "convert it to UTF-8 (iconv -t utf-8)") from None
        return 1
    n, last = 0, b"\n"
    with _open_binary(spec) as f:
        while chunk := f.read(1 << 22):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


def iter_raw(spec: str, text_key: str = "text", start: int = 0) -> Iterator[Raw]:
    """Records of one input, in a fixed order; the first `start` records are skipped cheaply.
    A read error raises CorpusError naming the file and the record it stopped at."""
    if spec.startswith("builtin:"):
        yield from _iter_builtin(spec, start)
        return
    k = start
    try:
        for raw in _iter_file(spec, text_key, start):
            k = raw.line
            yield raw
    except _read_errors() as e:
        raise _bad_file(spec, e, f" (after record {k})") from None


def _iter_builtin(spec: str, start: int) -> Iterator[Raw]:
    k = 0
    if spec != "builtin:python-stdlib-docs":
        for path in stdlib_sources():
            k += 1
            if k > start:
                yield Raw(spec, k, "file", path)
    if spec != "builtin:python-stdlib-code":
        for name, text in _pydoc_topics():
            k += 1
            if k > start:
                yield Raw(spec, k, "text", f"pydoc topic {name}\n\n{text}")
        for path in stdlib_sources():
            k += 1
            if k > start:
                yield Raw(spec, k, "pydoc", path)


def _iter_file(spec: str, text_key: str, start: int) -> Iterator[Raw]:
    fmt = _fmt(spec)
    if fmt == "text":
        if start < 1:
            yield Raw(spec, 1, "file", spec)
    elif fmt == "jsonl":
        with _open_binary(spec) as f:
            for k, line in enumerate(f, 1):
                if k > start:
                    yield Raw(spec, k, "json", line)
    else:
        with _parquet(spec) as pf:
            yield from _iter_parquet(spec, pf, text_key, start)


def _iter_parquet(spec: str, pf, text_key: str, start: int) -> Iterator[Raw]:
    """Rows of an open parquet file as Raw records (the text column only)."""
    if text_key not in pf.schema_arrow.names:
        for k in range(start + 1, pf.metadata.num_rows + 1):
            yield Raw(spec, k, "none", None)
        return
    k = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[text_key]):
        col = batch.column(0)
        if k + len(col) <= start:
            k += len(col)
            continue
        for v in col.to_pylist():
            k += 1
            if k > start:
                yield Raw(spec, k, "text" if isinstance(v, str) else "none", v)


_BLOCKS = (ast.stmt, ast.excepthandler, ast.match_case)


def _walk_blocks(tree: ast.AST) -> Iterator[ast.AST]:
    """ast.walk's nodes (breadth first, the same order) that are statements or hold statements:
    expressions never contain a statement, so leaving them out keeps every definition (3x faster)."""
    todo = collections.deque([tree])
    while todo:
        node = todo.popleft()
        for field in node._fields:
            value = getattr(node, field, None)
            if isinstance(value, list):
                todo.extend(x for x in value if isinstance(x, _BLOCKS))
        yield node


@functools.lru_cache(maxsize=1024)  # the stdlib's modules: the QA stages and the write stage decode each
def _docstrings(path: str, text: str) -> str:
    """A module's docstrings (module, classes, functions) as one natural-language document (parsing
    is most of the built-in corpus's decoding: kept per process, for the next stage's read)."""
    tree = ast.parse(text)
    parts = []
    mod = os.path.relpath(path, stdlib_dir())[:-3].replace(os.sep, ".").removesuffix(".__init__")
    for node in _walk_blocks(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                title = mod if isinstance(node, ast.Module) else f"{mod}.{node.name}"
                parts.append(f"{title}\n\n{doc}")
    return "\n\n\n".join(parts)


def decode(raw: Raw, text_key: str = "text") -> Decoded:
    """Raw record → text, or the reason it is skipped (malformed_json, missing_text, invalid_utf8, empty)."""
    kind, payload = raw.kind, raw.payload
    text: object
    try:
        if kind == "json":
            try:
                s = payload.decode("utf-8")
            except UnicodeDecodeError as e:
                return Decoded(None, "invalid_utf8", str(e))
            if not s.strip():
                return Decoded(None, "empty", "blank line")
            try:
                obj = json.loads(s)
            except ValueError as e:
                return Decoded(None, "malformed_json", str(e))
            if not isinstance(obj, dict) or not isinstance(obj.get(text_key), str):
                return Decoded(None, "missing_text", f"no string field {text_key!r}")
            text = obj[text_key]
        elif kind in ("file", "pydoc"):
            try:
                with _open_binary(payload) as f:
                    data = f.read()
            except _read_errors() as e:
                raise _bad_file(payload, e) from None
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                return Decoded(None, "invalid_utf8", str(e))
            if kind == "pydoc":
                try:
                    text = _docstrings(payload, text)
                except SyntaxError as e:
                    return Decoded(None, "empty", f"unparsable: {e}")
        elif kind == "text":
            text = payload
        else:
            return Decoded(None, "missing_text", f"no string field {text_key!r}")
        text.encode("utf-8")  # lone surrogates (e.g. "\ud800" escapes in JSON) are not valid UTF-8
    except UnicodeEncodeError as e:
        return Decoded(None, "invalid_utf8", str(e))
    if not text.strip():
        return Decoded(None, "empty", "empty document")
    return Decoded(text, None)


def first_keys(spec: str) -> list[str] | None:
    """The field names of a jsonl input's first JSON object, or a parquet input's columns (None
    for other inputs or when there is none): what --text-key could have been."""
    try:
        if spec.startswith("builtin:") or _fmt(spec) == "text":
            return None
        if _fmt(spec) == "parquet":
            with _parquet(spec) as pf:
                return list(pf.schema_arrow.names)
        for raw in _iter_file(spec, "", 0):
            if raw.line > 100:  # no JSON object near the start: nothing to suggest
                return None
            try:
                obj = json.loads(raw.payload)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return list(obj)
    except _read_errors():
        return None
    return None


def iter_records(inputs: list[str], text_key: str = "text") -> Iterator[Decoded]:
    """Decoded documents of all inputs in order (single process; for small jobs and spm training)."""
    for spec in expand_inputs(inputs):
        for raw in iter_raw(spec, text_key):
            yield decode(raw, text_key)


def iter_range(inputs: list[str], counts: list[int], start: int, stop: int,
               text_key: str = "text") -> Iterator[tuple[int, Raw]]:
    """Records [start, stop) of the inputs taken together (`counts`: records per input, as `count`
    gives them), each with its global index: the records of one shard."""
    base = 0
    for spec, n in zip(inputs, counts):
        if base + n > start and base < stop:
            for k, raw in enumerate(iter_raw(spec, text_key, max(0, start - base))):
                i = max(start, base) + k
                if i >= stop or i >= base + n:
                    break
                yield i, raw
        base += n
        if base >= stop:
            return
