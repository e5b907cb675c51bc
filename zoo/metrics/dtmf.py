"""Signal tools for the ``bouncing_digits_av`` metrics: DTMF decoding, burst onsets, glyph tracking.

Plain functions over numpy arrays or torch tensors (computed in float64 on the CPU):

* :func:`goertzel_power` -- power of a signal at given frequencies (single-bin DFT, the quantity the
  Goertzel recursion computes), normalised so a sinusoid of amplitude ``A`` reads ``A**2``;
* :func:`decode_digit` -- the keypad digit of the strongest DTMF row + column tones, or None;
* :func:`burst_onsets` -- start times of tone bursts (short-window energy, relative threshold);
* :func:`video_track` / :func:`video_bounces` -- the glyph's centroid per frame and the times where its x
  or y velocity reverses (wall bounces), refined to sub-frame accuracy assuming constant speed.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from zoo.data.bouncing_av import DTMF_COLS, DTMF_KEYS, DTMF_ROWS

_DIGIT_OF_KEY = {rc: d for d, rc in DTMF_KEYS.items()}


def _as_f64(x) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().cpu().to(torch.float64)
    return torch.from_numpy(np.array(x, dtype=np.float64))


def _as_1d(audio, name: str) -> np.ndarray:
    a = _as_f64(audio).numpy()
    if a.ndim == 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 1:
        raise ValueError(f"{name}: expected audio of shape (L,) or (1, L), got {tuple(a.shape)}")
    return a


def goertzel_power(x, sample_rate: float, freqs: Sequence[float], window: bool = False):
    """Power of ``x (..., L)`` at each of ``freqs`` (Hz) -> ``(..., F)`` (numpy in -> numpy out).

    ``P = (2 |sum_n w[n] x[n] exp(-2 pi i f n / sr)| / sum_n w[n])**2`` with ``w`` = 1 (``window=False``, the
    classic Goertzel bin) or a Hann window: a sinusoid of amplitude ``A`` at ``f`` reads ``~A**2``.
    """
    xt = _as_f64(x)
    L = xt.shape[-1]
    if L == 0:
        raise ValueError("goertzel_power: empty signal")
    n = torch.arange(L, dtype=torch.float64)
    w = torch.ones(L, dtype=torch.float64)
    if window and L > 2:
        w = torch.hann_window(L, periodic=False, dtype=torch.float64)
    omega = 2 * math.pi * torch.as_tensor(list(freqs), dtype=torch.float64) / sample_rate
    phase = n[:, None] * omega[None]  # (L, F)
    xw = xt * w
    re, im = xw @ torch.cos(phase), xw @ torch.sin(phase)
    p = (re.square() + im.square()) * (2.0 / w.sum()) ** 2
    if not isinstance(x, Tensor):
        return p.numpy()
    return p.to(x.dtype) if x.is_floating_point() else p


def _frames(a: np.ndarray, n: int, hop: int) -> np.ndarray:
    """``(L,)`` -> ``(N, n)`` overlapping frames (the tail frame is zero-padded)."""
    if len(a) <= n:
        return np.pad(a, (0, n - len(a)))[None]
    count = math.ceil((len(a) - n) / hop) + 1
    a = np.pad(a, (0, (count - 1) * hop + n - len(a)))
    return np.lib.stride_tricks.sliding_window_view(a, n)[::hop][:count]


def decode_digit(audio, sample_rate: float, frame_s: float = 0.04, active: float = 0.25,
                 min_tone_ratio: float = 0.3, min_rms: float = 1e-3) -> int | None:
    """The DTMF digit of ``audio (L,)`` (or ``(1, L)``), or None when there is no tone.

    The clip is cut into Hann-windowed frames of ``frame_s`` (half overlap); frames whose DTMF power is at
    least ``active`` x the strongest frame's are the bursts; their powers are summed and the strongest row
    and column frequency give the digit. None when the clip is quieter than ``min_rms``, when the DTMF
    power is below ``min_tone_ratio`` of those frames' energy (noise, silence), or for '*' / '#'.
    """
    a = _as_1d(audio, "decode_digit")
    if not np.isfinite(a).all() or len(a) == 0 or np.sqrt(np.mean(a * a)) < min_rms:
        return None
    n = max(8, round(frame_s * sample_rate))
    fr = _frames(a, n, max(1, n // 2))
    p = goertzel_power(fr, sample_rate, (*DTMF_ROWS, *DTMF_COLS), window=True)  # (N, 7)
    w = np.hanning(n) if n > 2 else np.ones(n)
    energy = 2 * (fr * fr) @ w / w.sum()  # (N,), a sinusoid of amplitude A reads A**2
    nr = len(DTMF_ROWS)
    tone = p[:, :nr].max(1) + p[:, nr:].max(1)
    if tone.max() <= 0:
        return None
    sel = tone >= active * tone.max()
    total = p[sel].sum(0)
    r, c = int(total[:nr].argmax()), int(total[nr:].argmax())
    if total[r] + total[nr + c] < min_tone_ratio * energy[sel].sum():
        return None
    return _DIGIT_OF_KEY.get((r, c))


def burst_onsets(audio, sample_rate: float, win_s: float = 0.002, rel_threshold: float = 0.25,
                 min_gap_s: float = 0.05, min_len_s: float = 0.01, min_rms: float = 0.01,
                 min_contrast: float = 4.0) -> list[float]:
    """Start times (seconds) of the sound bursts of ``audio (L,)`` (or ``(1, L)``).

    Energy envelope = ``audio**2`` averaged over a centred ``win_s`` window. Floor / peak = its 5th / 99.5th
    percentiles; bursts are runs above ``floor + rel_threshold * (peak - floor)`` lasting ``min_len_s``;
    each onset is moved back to where the envelope leaves the floor (``+ 2 %`` of the range, at most 20 ms
    back). Onsets closer than ``min_gap_s`` to the previous one are dropped. Empty when the peak is below
    ``min_rms**2`` or less than ``min_contrast`` x the floor (silence, or sound without bursts).
    """
    a = _as_1d(audio, "burst_onsets")
    if not np.isfinite(a).all() or len(a) < 2:
        return []
    n = max(1, round(win_s * sample_rate))
    c = np.concatenate([[0.0], np.cumsum(a * a)])
    lo = np.clip(np.arange(len(a)) - n // 2, 0, len(a))
    hi = np.clip(lo + n, 0, len(a))
    env = (c[hi] - c[lo]) / np.maximum(hi - lo, 1)
    floor, peak = np.percentile(env, 5), np.percentile(env, 99.5)
    if peak < min_rms ** 2 or peak < min_contrast * floor:
        return []
    above = env > floor + rel_threshold * (peak - floor)
    edges = np.flatnonzero(np.diff(above.astype(np.int8), prepend=0, append=0))
    starts, ends = edges[::2], edges[1::2]
    low = floor + 0.02 * (peak - floor)
    back = round(0.02 * sample_rate)
    out: list[float] = []
    prev_end = 0
    for s, e in zip(starts, ends):
        if e - s < min_len_s * sample_rate:
            continue
        j, stop = s, max(prev_end, s - back)
        while j > stop and env[j - 1] > low:
            j -= 1
        t = j / sample_rate
        if not out or t - out[-1] >= min_gap_s:
            out.append(t)
        prev_end = e
    return out


def video_track(video, floor: float = 0.05, noise_cut: float = 3.0) -> np.ndarray:
    """Glyph centroid per frame: ``video (C, T, H, W)`` in [-1, 1] -> ``(T, 2)`` float64 ``(x, y)`` in pixels
    (pixel ``i`` spans ``[i, i + 1]``); NaN for a frame without foreground.

    Foreground weight ``d = sum_c |x - median_c|`` (the per-clip, per-channel median is the background level)
    minus the larger of ``floor`` x the frame's largest ``d`` and ``noise_cut`` x its median ``d`` (the noise
    level: the background covers most of a frame), clipped at 0.
    """
    v = _as_f64(video)
    if v.ndim != 4:
        raise ValueError(f"video_track: expected video (C, T, H, W), got {tuple(v.shape)}")
    med = v.flatten(1).median(1).values
    d = (v - med[:, None, None, None]).abs().sum(0)  # (T, H, W)
    flat = d.flatten(1)
    cut = torch.maximum(floor * flat.amax(1), noise_cut * flat.median(1).values)  # (T,)
    w = (d - cut[:, None, None]).clamp_min(0)
    mass = w.sum((1, 2))
    ys = torch.arange(v.shape[2], dtype=torch.float64) + 0.5
    xs = torch.arange(v.shape[3], dtype=torch.float64) + 0.5
    cx = (w.sum(1) * xs).sum(1) / mass
    cy = (w.sum(2) * ys).sum(1) / mass
    out = torch.stack([cx, cy], 1)
    out[mass <= 0] = float("nan")
    return out.numpy()


def _fill_nan(p: np.ndarray) -> np.ndarray | None:
    ok = np.isfinite(p)
    if ok.sum() < 3:
        return None
    idx = np.arange(len(p))
    return np.interp(idx, idx[ok], p[ok])


def axis_reversals(p: np.ndarray, min_speed: float = 0.05, deadzone: float = 0.3) -> list[float]:
    """Reversal times, in frames, of a 1-d track ``p (T,)``.

    Velocities are frame differences; those below ``deadzone`` x the median speed ``u`` count as no
    direction. Between two velocity intervals ``j < k`` of opposite directions ``s, -s``, constant speed
    gives the reversal time ``(j + k + 1) / 2 + s (p[k + 1] - p[j]) / (2 u)`` (clamped to ``[j, k + 1]``).
    Empty when ``u < min_speed`` pixels per frame.
    """
    v = np.diff(p)
    if len(v) < 2:
        return []
    u = float(np.median(np.abs(v)))
    if u < min_speed:
        return []
    sign = np.where(np.abs(v) > deadzone * u, np.sign(v), 0.0)
    out, prev = [], None
    for k in np.flatnonzero(sign):
        if prev is not None and sign[k] != sign[prev]:
            tb = (prev + k + 1) / 2 + sign[prev] * (p[k + 1] - p[prev]) / (2 * u)
            out.append(float(min(max(tb, prev), k + 1)))
        prev = k
    return out


def video_bounces(video, fps: float, floor: float = 0.05, min_speed: float = 0.05,
                  deadzone: float = 0.3) -> list[float]:
    """Wall bounces of the glyph in ``video (C, T, H, W)`` in [-1, 1], in seconds (sorted).

    The x and y tracks of :func:`video_track` are searched separately with :func:`axis_reversals`;
    frame ``f`` is at time ``f / fps``.
    """
    track = video_track(video, floor)
    out: list[float] = []
    for ax in range(2):
        p = _fill_nan(track[:, ax])
        if p is not None:
            out += [t / fps for t in axis_reversals(p, min_speed, deadzone)]
    return sorted(out)
