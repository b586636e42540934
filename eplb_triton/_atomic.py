"""Replacing files so that a reader, or a crash, finds the old content or the new one, never a part."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def _write_temporary(target: Path, data: bytes, pending: list[tuple[Path, Path, Path]], path: Path) -> None:
    """Write ``data`` to a new file beside ``target`` (recorded in ``pending`` first), fsynced and closed."""
    # O_EXCL: never reuse a file someone else made; 0o666 lets the umask decide, as for any new file.
    tmp = target.with_name(f".{target.name[:200]}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    pending.append((tmp, target, path))
    try:
        if target.exists():  # a replaced file keeps its permissions
            os.chmod(tmp, target.stat().st_mode & 0o7777)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_folder(folder: Path) -> None:
    """Make a rename durable (POSIX); where folders cannot be opened this is a no-op."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def replace_files(files: dict[Path, bytes]) -> None:
    """Write every ``{path: data}``, each file whole or not at all.

    Every file is first written to a temporary file in its own folder and fsynced; only when all of
    them are written are they moved into place with ``os.replace`` (atomic on POSIX and Windows).
    On a failure the temporary files are removed and the files not yet replaced keep their previous
    content. A symbolic link is written through: its target is replaced.

    Raises:
        OSError: naming the path it could not write.
    """
    pending: list[tuple[Path, Path, Path]] = []  # (temporary, target, path as given) not moved into place yet
    path = Path()
    try:
        for path, data in files.items():
            _write_temporary(Path(os.path.realpath(path)), data, pending, path)
        while pending:
            tmp, target, path = pending[0]
            os.replace(tmp, target)
            pending.pop(0)
            _sync_folder(target.parent)
    except OSError as exc:  # the temporary file's name would only confuse
        raise OSError(exc.errno, exc.strerror or str(exc), os.fspath(path)) from exc
    finally:
        for tmp, _, _ in pending:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
