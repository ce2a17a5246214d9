"""Atomic file and folder writes: a reader sees the old version or the complete new one, never half.

Everything we write (configs, checkpoints, exported models) goes through a temporary name in the same
folder and is then renamed into place; ``os.replace`` of a file and ``os.rename`` of a fresh folder
are atomic on POSIX file systems. Durable too: the data is fsynced before the rename and the folder holding the
new name after it, so a power loss right after a write leaves the old version or the new one, not an empty file.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Iterator, Union

from shardtune.errors import ConfigError

PathLike = Union[str, Path]
TMP_MARKER = ".tmp-"


def atomic_write_text(path: PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_MARKER}{uuid.uuid4().hex[:8]}-{path.name}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: PathLike) -> None:
    """Make a folder's entries (new files, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: PathLike) -> None:
    """fsync every file under ``folder`` and every folder in it (before the tree is renamed into place)."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(root)


@contextlib.contextmanager
def atomic_directory(final: PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``final`` (an older ``final`` is removed
    only after the new one is complete). On error the temporary folder is deleted and ``final`` is kept."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{TMP_MARKER}{uuid.uuid4().hex[:8]}-{final.name}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_tree(tmp)  # the writers (safetensors, save_pretrained) do not fsync
    replace_directory(tmp, final)


def current_umask() -> int:
    """The process's umask, read without changing it (Linux: /proc; elsewhere set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(folder: Path) -> None:
    """Give every file and folder under ``folder`` the mode the user's umask asks for (0644 / 0755 under umask
    022). Some writers (safetensors, for one) create their files 0600, which other users of a shared model folder
    cannot read."""
    mask = current_umask()
    for path in [Path(folder), *Path(folder).rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def replace_directory(src: Path, final: Path) -> None:
    """Move a complete folder ``src`` to ``final`` (its files given the umask's modes first: :func:`honour_umask`),
    replacing an existing ``final`` with no moment in which
    ``final`` is missing: on Linux the two are swapped in one atomic ``renameat2(RENAME_EXCHANGE)``; where
    that is unavailable, the old folder is renamed aside first (a short window)."""
    src, final = Path(src), Path(final)
    honour_umask(src)
    if not final.exists():
        os.rename(src, final)
        fsync_dir(final.parent)
        return
    if _exchange(src, final):
        old = src  # after the swap, src holds the previous final
    else:
        old = final.with_name(f"{TMP_MARKER}old-{uuid.uuid4().hex[:8]}-{final.name}")
        os.rename(final, old)
        os.rename(src, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 with RENAME_EXCHANGE). False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange)
    return rc == 0


@contextlib.contextmanager
def remove_new_files_on_error(folder: PathLike, errors=(Exception,)) -> Iterator[None]:
    """If the block raises one of ``errors``, delete what it created under ``folder`` (``folder`` itself
    when it did not exist before), so that a run rejected for bad input leaves the folder as it found it."""
    folder = Path(folder)
    before = set(folder.rglob("*")) if folder.exists() else None
    try:
        yield
    except errors:
        if before is None:
            shutil.rmtree(folder, ignore_errors=True)
        elif folder.exists():
            for path in sorted(set(folder.rglob("*")) - before, reverse=True):  # children before parents
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        raise


def read_text(path: Path, flag: str) -> str:
    """A data or config file's text; anything but UTF-8 (a UTF-8 byte-order mark, as some Windows editors write,
    is fine) is one error line naming ``flag`` and the file."""
    try:
        data = path.read_bytes()
    except OSError as exc:  # permissions, a FIFO that went away, an I/O error
        raise ConfigError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        guess = " (it looks like UTF-16)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise ConfigError(f"{flag}: {path} is not UTF-8 text{guess}: byte 0x{data[exc.start]:02x} at offset "
                          f"{exc.start}; re-save the file as UTF-8") from None
