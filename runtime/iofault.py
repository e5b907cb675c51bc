"""One-line messages for write faults: a full disk, a file past the size limit (EFBIG), a read-only or missing
directory, a name too long for the file system. ``WRITE_ERRORS`` are what a write can raise (safetensors
raises its own error type, without the file name); :func:`write_fault` names the path and the reason."""
from __future__ import annotations

import errno
from pathlib import Path

from safetensors import SafetensorError

WRITE_ERRORS = (OSError, SafetensorError)


def reason(e: BaseException) -> str:
    """What went wrong, without the path: ``File too large (os error 27)``, ``No space left on device``."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return str(e).rpartition("I/O error: ")[2] or str(e)


def write_fault(e: BaseException, where: str | Path) -> str:
    """``"PATH: reason"``: the file the error names, else ``where`` (the file or directory being written)."""
    return f"{getattr(e, 'filename', None) or where}: {reason(e)}"


def named(e: BaseException, path: str | Path) -> OSError:
    """``e`` as an OSError naming ``path`` (to raise when the writer's own error does not)."""
    code = e.errno if isinstance(e, OSError) and e.errno else errno.EIO
    return OSError(code, reason(e), str(path))


class UnusableDir(Exception):
    """An output directory that cannot be created or written; the message names it and says why."""


def make_dir(path: Path, what: str) -> None:
    """``mkdir -p path``; :class:`UnusableDir` (one line) when it is a file, read-only, too long a name, ..."""
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise UnusableDir(f"{path}: cannot use it as the {what}: it is a file, not a directory")
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # read-only, a file on the way, a name too long (exists() raises that one too)
        raise UnusableDir(f"{path}: cannot use it as the {what} ({e.strerror or e})") from None
