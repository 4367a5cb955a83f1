"""Writing folders atomically: build under a temporary name beside the target, rename at the end.

The new folder and its files get the modes a plain `mkdir` / `open` would give them (0755 / 0644
under the usual umask 022), not the 0700 / 0600 of a temporary folder. With `overwrite`, a writer
can say which entries of an existing target are its own (`owned`): the others are refused by name,
or, with `keep_others`, carried into the new folder unchanged (hard links, so nothing is copied).

An object store (`gs://`) has no folder rename, so there completeness is a marker file written
last (`last`, e.g. an HF folder's `config.json`): the writer's old entries go first (the marker
before the rest), then the folder built in a local temporary folder is uploaded, marker last. The
entries of others stay where they are. A writer whose own format marks completeness (orbax's
`commit_success.txt`) writes into the target itself instead (`stage_remote=False`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from etils import epath

from qwen3_jax import storage


def check_target(target: str | os.PathLike, overwrite: bool = False, *, owned: Callable[[str], bool] | None = None,
                 keep_others: bool = False) -> list[str]:
    """Refuses a target `atomic_dir` would refuse, before any work; returns the entries it would keep.

    A non-empty folder needs `overwrite`. With `owned`, entries it rejects are not replaced:
    kept when `keep_others`, otherwise refused by name. A file (not a folder) and a target whose
    nearest existing parent is not writable are refused too.
    """
    target = storage.path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is a file, not a folder (choose another output path)")
    if not storage.is_remote(target):
        _check_writable(target)
    entries = sorted(p.name for p in target.iterdir()) if target.is_dir() else []
    if not entries:
        return []
    if not overwrite:
        raise FileExistsError(f"{target} exists and is not empty (pass --overwrite to replace it)")
    others = [n for n in entries if owned is not None and not owned(n)]
    if others and not keep_others:
        more = f" (and {len(others) - 8} more)" if len(others) > 8 else ""
        raise FileExistsError(f"{target} holds {', '.join(others[:8])}{more}, which this command does not write: "
                              f"--overwrite replaces only its own output; move them away or choose another folder")
    return others


def _check_writable(target: epath.Path) -> None:
    """The nearest existing parent of a local `target` lets this process create it."""
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{parent}: not writable, cannot create {target}")


def _normalise_modes(root: Path) -> None:
    mask = storage.umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)


def _carry(src: Path, dst: Path) -> None:
    """`src` (a file, link or folder) appears at `dst` without copying data where hard links work."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(src, dst)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False, *, owned: Callable[[str], bool] | None = None,
               keep_others: bool = False, last: str | None = None, stage_remote: bool = True
               ) -> Iterator[Path | epath.Path]:
    """Yields a fresh temporary folder; on success it replaces `target`, on error it is removed.

    An existing non-empty `target` is refused unless `overwrite`; see `check_target` for `owned`
    and `keep_others` (the kept entries reappear in the new folder; the writer's own are replaced).
    A remote `target`: the yielded folder is local and is uploaded with `last` (a top-level file
    name, the folder's completion marker) written after everything else; with `stage_remote=False`
    the writer gets `target` itself, cleared of its own old entries, and marks completion itself.
    """
    keep = check_target(target, overwrite, owned=owned, keep_others=keep_others)
    if storage.is_remote(target):
        yield from _remote_dir(storage.path(target), set(keep), last, stage_remote)
        return
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _normalise_modes(tmp)
        for name in keep:
            if not (tmp / name).exists():
                _carry(target / name, tmp / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def _remote_dir(target: epath.Path, keep: set[str], last: str | None, stage: bool) -> Iterator[Path | epath.Path]:
    """`atomic_dir` for an object store (a generator body: yields the folder the writer fills)."""
    if not stage:
        clear_own_entries(target, keep, last)
        yield target
        return
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.tmp-") as tmp:
        yield Path(tmp)
        clear_own_entries(target, keep, last)
        storage.upload_tree(tmp, target, last=last)


def clear_own_entries(target: epath.Path, keep: set[str], last: str | None = None) -> None:
    """Removes every top-level entry of a (remote) folder except `keep`, the marker `last` first,
    so an interrupted replacement leaves a folder without its marker (incomplete), never a mix that
    looks complete."""
    if not target.is_dir():
        return
    names = sorted((p.name for p in target.iterdir() if p.name not in keep), key=lambda n: n != last)
    for name in names:
        entry = target / name
        if entry.is_dir():
            storage.remove_tree(entry)
        else:
            entry.unlink()
