"""Run logging: scalars to ``metrics.jsonl`` and (optionally) TensorBoard; rank 0 only.

``run_dir/metrics.jsonl`` holds one JSON object per line, ``{"step": int, "<name>": value, ...}``.
Each line is written with a single ``os.write`` on an ``O_APPEND`` descriptor, so a process
killed at any moment leaves at most one missing or torn *last* line, never an interleaved one.

Non-finite floats are written as the JSON *strings* ``"nan"``, ``"inf"`` and ``"-inf"`` (plain
JSON has no NaN/Infinity; strings keep the difference between a NaN and an overflow, which
``null`` would lose). ``read_jsonl`` turns these three strings back into floats.

Resuming from a checkpoint at step ``k`` (``Tracker(..., resume_step=k)``) first rewrites the
jsonl file keeping only well-formed lines with ``step <= k`` (``truncate_jsonl``), and opens the
TensorBoard writer with ``purge_step=k + 1`` so TensorBoard hides the events the crashed run
wrote after the checkpoint. Either way the resumed run leaves no duplicate steps.

TensorBoard events go to ``run_dir/tb/``. Images and text only go to TensorBoard (no-ops when
``tensorboard=False``).
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Tracker", "read_jsonl", "truncate_jsonl", "show_zoo_log", "METRICS_FILE"]

METRICS_FILE = "metrics.jsonl"
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class _Stderr(logging.Handler):
    """Writes to the ``sys.stderr`` of the moment (a handler holding the stream would miss redirection)."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(self.format(record) + "\n")


def show_zoo_log() -> None:
    """Let the zoo's INFO lines (e.g. ``digit classifier: loaded PATH``) through to stderr, bare; idempotent."""
    log = logging.getLogger("zoo")
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        log.addHandler(_Stderr())
    log.setLevel(logging.INFO)


def _encode_value(v: Any) -> Any:
    """Scalar -> JSON value: bools and ints stay ints, everything else becomes a float;
    non-finite floats become "nan" / "inf" / "-inf"."""
    if hasattr(v, "item") and callable(v.item):  # torch / numpy scalars and 1-element tensors
        v = v.item()
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, numbers.Integral):
        return int(v)
    f = float(v)
    if math.isnan(f):
        return "nan"
    if math.isinf(f):
        return "inf" if f > 0 else "-inf"
    return f


def _decode_value(v: Any) -> Any:
    return _NONFINITE.get(v, v) if isinstance(v, str) else v


def _parse_line(raw: bytes) -> dict[str, Any] | None:
    """A well-formed metrics line is a JSON object with an int ``step``; else None."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("step"), int) or isinstance(obj["step"], bool):
        return None
    return obj


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All well-formed lines of a metrics file, in order, with "nan"/"inf"/"-inf" decoded to
    floats. A torn last line (crash mid-write) is skipped silently, other bad lines with a
    warning. A missing file gives ``[]``."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")
    out = []
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        obj = _parse_line(raw)
        if obj is None:
            if i != len(lines) - 1:  # the last piece is the only one without a newline
                warnings.warn(f"{path}:{i + 1}: skipping malformed line", stacklevel=2)
            continue
        out.append({k: _decode_value(v) for k, v in obj.items()})
    return out


def truncate_jsonl(path: Path, resume_step: int) -> int:
    """Atomically rewrite ``path`` keeping only well-formed lines with ``step <= resume_step``
    (a torn last line is dropped too). Returns the number of lines kept; a missing file is
    left missing and gives 0. Written to a temporary sibling, fsync'ed, then ``os.replace``."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept = []
    for raw in path.read_bytes().split(b"\n"):
        obj = _parse_line(raw) if raw.strip() else None
        if obj is not None and obj["step"] <= resume_step:
            kept.append(raw.strip() + b"\n")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(b"".join(kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return len(kept)


class Tracker:
    """Rank-0 metric sink.

    Args:
        run_dir: directory of the run; gets ``metrics.jsonl`` and ``tb/``.
        tensorboard: also write TensorBoard events.
        enabled: False on non-zero ranks: every method is then a no-op and nothing is created.
        resume_step: the step of the checkpoint being resumed (see module docstring).

    A fresh tracker (``resume_step=None``) on an existing run dir appends to its metrics file.
    Usable as a context manager (closes on exit).
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        tensorboard: bool,
        enabled: bool = True,
        resume_step: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._fd: int | None = None
        self._tb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        if resume_step is not None:
            truncate_jsonl(self.metrics_path, resume_step)
        self._fd = os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=purge)

    # --------------------------------------------------------------------------------- writing
    def scalars(self, step: int, values: dict[str, Any]) -> None:
        """Append ``{"step": step, **values}`` as one line and add each value to TensorBoard
        under its name. Values: Python/numpy/0-d torch numbers (call ``.item()`` before if you
        care where the device sync happens)."""
        if not self.enabled:
            return
        if "step" in values:
            raise ValueError('"step" is reserved; pass it as the step argument')
        enc = {k: _encode_value(v) for k, v in values.items()}
        line = json.dumps({"step": int(step), **enc}, allow_nan=False) + "\n"
        data = line.encode("utf-8")
        n = os.write(self._fd, data)
        while n < len(data):  # short writes only happen on full disks or signals
            n += os.write(self._fd, data[n:])
        if self._tb is not None:
            for k, v in enc.items():
                self._tb.add_scalar(k, _decode_value(v), int(step))

    def image(self, tag: str, step: int, img: np.ndarray) -> None:
        """Log one image: uint8 array ``(H, W, C)`` with C in {1, 3, 4}, or ``(H, W)``."""
        if not self.enabled or self._tb is None:
            return
        img = np.asarray(img)
        if img.dtype != np.uint8:
            raise TypeError(f"image must be uint8, got {img.dtype}")
        if img.ndim == 2:
            img = img[:, :, None]
        if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
            raise ValueError(f"image must be (H, W, C) with C in 1/3/4, got shape {img.shape}")
        self._tb.add_image(tag, img, int(step), dataformats="HWC")

    def audio(self, tag: str, step: int, wave: np.ndarray, sample_rate: int) -> None:
        """Log one mono clip: float array ``(L,)`` in [-1, 1]."""
        if not self.enabled or self._tb is None:
            return
        wave = np.clip(np.asarray(wave, dtype=np.float32).reshape(-1), -1.0, 1.0)
        self._tb.add_audio(tag, wave[None], int(step), sample_rate=int(sample_rate))

    def gif(self, tag: str, step: int, gif: bytes, height: int, width: int) -> None:
        """Log an animated GIF (its encoded bytes) as an image summary: TensorBoard's image panel plays it.
        (``SummaryWriter.add_video`` needs moviepy, which this stack lacks.)"""
        if not self.enabled or self._tb is None:
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        img = Summary.Image(height=int(height), width=int(width), colorspace=3, encoded_image_string=gif)
        self._tb._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=img)]), int(step))

    def text(self, tag: str, step: int, text: str) -> None:
        """Log a (markdown) string."""
        if not self.enabled or self._tb is None:
            return
        self._tb.add_text(tag, text, int(step))

    def flush(self) -> None:
        """Make everything logged so far durable (fsync jsonl, flush TensorBoard)."""
        if not self.enabled:
            return
        if self._fd is not None:
            os.fsync(self._fd)
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close; idempotent."""
        if not self.enabled:
            return
        if self._fd is not None:
            self.flush()
            os.close(self._fd)
            self._fd = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self.enabled = False

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
