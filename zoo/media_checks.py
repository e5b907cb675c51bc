"""Checks of decoded media that decoders do not make: non-finite audio samples and truncated WAV files.

FFmpeg decodes a 32-bit float WAV holding NaN or Inf as is, and reads a WAV cut short as a shorter file
(the duration comes from the file size, not the header): both would reach training unnoticed.
"""
from __future__ import annotations

import os
import struct

import numpy as np


def nonfinite(samples: np.ndarray, start_s: float, sample_rate: int) -> str | None:
    """Why ``samples`` (read from ``start_s`` seconds on) cannot be used, or None when all are finite."""
    bad = np.flatnonzero(~np.isfinite(samples))
    if not bad.size:
        return None
    return (f"the audio holds {bad.size:,} non-finite samples (NaN or Inf), the first at "
            f"{start_s + bad[0] / sample_rate:.3f} s")


def wav_shortfall(path: str | os.PathLike) -> str | None:
    """Why a RIFF/WAVE file is truncated (its ``data`` chunk declares more bytes than the file holds), or None.
    A streamed WAV (data size 0 or 0xFFFFFFFF: unknown), RF64 and other containers are not checked."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:] != b"WAVE":
            return None
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            cid, n = struct.unpack("<4sI", f.read(8))
            if cid == b"data":
                have = size - pos - 8
                if n not in (0, 0xFFFFFFFF) and have < n:
                    return f"truncated WAV: its header declares {n:,} bytes of samples but the file holds {have:,}"
                return None
            pos += 8 + n + (n & 1)
    return None
