"""Media I/O: MP4 (H.264 + AAC), WAV, GIF and contact sheets, with PyAV (bundled FFmpeg) and Pillow.

Layouts: a clip's frames are uint8 ``(T, H, W, C)``, C in {1, 3}; audio is float32 mono ``(L,)`` in [-1, 1].
The model's video tensors are channel-first float ``(B, C, T, H, W)`` in [-1, 1]; :func:`to_uint8_video`
converts them. Writers are atomic (a temporary name in the same folder, then ``os.replace``) and raise
``ValueError`` on bad arrays; readers raise :class:`DataError` naming the file, also for audio samples that
are NaN or Inf and for a WAV whose header declares more samples than the file holds.

Times are seconds from the start of the container (its earliest stream). AAC decoding pads the end of the
audio to whole 1024-sample frames; readers trim decoded audio to the stream's duration. Audio is mixed down
to mono as the mean of its channels (stereo: (L + R) / 2, so the level is kept and nothing clips; FFmpeg's
own stereo -> mono matrix adds the channels at 0.707 each, +3 dB for correlated channels).
"""
from __future__ import annotations

import io
import math
import numbers
import os
import secrets
import wave
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import av
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from zoo.data.errors import DataError
from zoo.media_checks import nonfinite, wav_shortfall

__all__ = ["MediaClip", "MediaInfo", "MIN_SHOWN_PX", "contact_sheet", "gif_bytes", "probe_media", "read_audio",
           "read_frames_at", "read_media", "shown_scale", "to_uint8_video", "write_gif", "write_mp4", "write_png",
           "write_wav"]

_AV_ERRORS = (av.FFmpegError, OSError, ValueError, EOFError)
MIN_SHOWN_PX = 128
"""Previews (GIF, contact sheet, poster) show a clip at least this many pixels on its shorter side."""
_AAC_FRAME = 1024
_AUDIO_PREROLL_S = 0.25  # audio seeks land this much early: MP3/AAC frames after a seek decode wrong


@dataclass
class MediaClip:
    """Decoded media: ``frames`` uint8 ``(T, H, W, 3)`` at ``fps``, ``audio`` float32 mono ``(L,)`` at
    ``sample_rate`` (each None when not read), ``duration_s`` of what was read."""

    frames: np.ndarray | None
    fps: float | None
    audio: np.ndarray | None
    sample_rate: int | None
    duration_s: float


@dataclass
class MediaInfo:
    """What :func:`probe_media` finds without decoding. Durations are seconds; a missing stream gives None."""

    path: str
    duration_s: float
    fps: float | None = None
    width: int | None = None
    height: int | None = None
    video_duration_s: float | None = None
    sample_rate: int | None = None
    channels: int | None = None
    audio_duration_s: float | None = None

    @property
    def has_video(self) -> bool:
        return self.fps is not None

    @property
    def has_audio(self) -> bool:
        return self.sample_rate is not None


# ------------------------------------------------------------------------------------------------ writing
def _atomic(path: str | os.PathLike, write, suffix: str) -> Path:
    """Run ``write(tmp_path)`` then move the file onto ``path`` (same folder, so the move is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.parent / f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp{suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _check_frames(video, what: str) -> np.ndarray:
    v = np.asarray(video)
    if v.dtype != np.uint8 or v.ndim != 4 or v.shape[-1] not in (1, 3) or 0 in v.shape:
        raise ValueError(f"{what}: expected uint8 frames (T, H, W, C) with C in {{1, 3}}, "
                         f"got {v.dtype} {tuple(v.shape)}")
    return v


def _check_audio(audio, what: str) -> np.ndarray:
    a = np.asarray(audio)
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{what}: expected float mono audio (L,), got {a.dtype} {tuple(a.shape)}")
    if not np.isfinite(a).all():
        raise ValueError(f"{what}: audio holds NaN or inf")
    return np.clip(a, -1.0, 1.0).astype(np.float32)


def _upscale(v: np.ndarray, scale: int, what: str) -> np.ndarray:
    if int(scale) != scale or scale < 1:
        raise ValueError(f"{what}: scale must be an integer >= 1, got {scale!r}")
    return v if scale == 1 else v.repeat(scale, axis=1).repeat(scale, axis=2)


def shown_scale(height: int, width: int, target: int = MIN_SHOWN_PX) -> int:
    """The smallest integer upscale that shows a ``height x width`` frame at >= ``target`` px on its shorter
    side (16 px -> 8; 1 for frames already that large)."""
    return max(1, math.ceil(target / max(1, min(height, width))))


_AAC_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)
"""Sample rates FFmpeg's AAC encoder accepts."""


def _resample_fft(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Band-limited resampling of ``(L,)`` float audio by zero-padding / truncating its spectrum."""
    n_out = int(round(len(audio) * target / rate))
    spec = np.fft.rfft(audio.astype(np.float64))
    out = np.fft.irfft(spec, n=n_out) * (n_out / len(audio))
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def write_mp4(path: str | os.PathLike, video, fps: float, audio=None, sample_rate: int | None = None,
              scale: int = 1) -> Path:
    """Write ``video`` uint8 ``(T, H, W, C)`` (C in {1, 3}) at ``fps`` and optional mono ``audio`` float32
    ``(L,)`` at ``sample_rate`` as a browser-playable MP4: H.264 (libx264, yuv420p, crf 18) + AAC.

    Frames are upscaled by the integer ``scale`` (nearest neighbour) and edge-padded to even sizes.
    The video stream lasts ``T / fps`` seconds, the audio ``L / sample_rate``. A sample rate the AAC encoder does
    not take (e.g. 4 kHz) is upsampled (band-limited) to the next one from 16 kHz. Returns ``path``.
    """
    what = f"write_mp4({str(path)!r})"
    v = _upscale(_check_frames(video, what), scale, what)
    if not (isinstance(fps, numbers.Real) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"{what}: fps must be a positive number, got {fps!r}")
    if audio is not None:
        audio = _check_audio(audio, what)
        if not isinstance(sample_rate, numbers.Integral) or sample_rate <= 0:
            raise ValueError(f"{what}: audio needs a positive integer sample_rate, got {sample_rate!r}")
        sample_rate = int(sample_rate)
        if sample_rate not in _AAC_RATES:  # e.g. 4 kHz: the AAC encoder refuses it; band-limited upsampling
            target = min(r for r in _AAC_RATES if r >= max(sample_rate, 16000)) if sample_rate <= 96000 else 96000
            audio, sample_rate = _resample_fft(audio, sample_rate, target), target
    if v.shape[-1] == 1:
        v = v.repeat(3, axis=-1)
    v = np.pad(v, ((0, 0), (0, v.shape[1] % 2), (0, v.shape[2] % 2), (0, 0)), mode="edge")
    rate = Fraction(fps).limit_denominator(1001)

    def write(tmp: str) -> None:
        with av.open(tmp, mode="w", format="mp4", options={"movflags": "+faststart"}) as c:
            vs = c.add_stream("libx264", rate=rate)
            vs.width, vs.height, vs.pix_fmt = v.shape[2], v.shape[1], "yuv420p"
            vs.options = {"crf": "18"}
            packets = []  # (time, stream, frame index / first sample), encoded in time order (interleaved)
            packets += [(i / rate, vs, i) for i in range(len(v))]
            if audio is not None:
                ast = c.add_stream("aac", rate=sample_rate)
                ast.layout = "mono"
                packets += [(Fraction(s, sample_rate), ast, s) for s in range(0, len(audio), _AAC_FRAME)]
            for _, stream, k in sorted(packets, key=lambda p: (p[0], p[1] is not vs)):
                if stream is vs:
                    frame = av.VideoFrame.from_ndarray(v[k], format="rgb24")
                    frame.pts, frame.time_base = k, 1 / rate
                else:
                    frame = av.AudioFrame.from_ndarray(audio[None, k:k + _AAC_FRAME], format="fltp", layout="mono")
                    frame.sample_rate, frame.pts, frame.time_base = sample_rate, k, Fraction(1, sample_rate)
                c.mux(stream.encode(frame))
            for stream in c.streams:
                c.mux(stream.encode(None))

    return _atomic(path, write, ".mp4")


def write_wav(path: str | os.PathLike, audio, sample_rate: int) -> Path:
    """Write mono float ``audio`` ``(L,)`` in [-1, 1] as 16-bit PCM WAV at ``sample_rate``. Returns ``path``."""
    what = f"write_wav({str(path)!r})"
    a = _check_audio(audio, what)
    if not isinstance(sample_rate, numbers.Integral) or sample_rate <= 0:
        raise ValueError(f"{what}: sample_rate must be a positive integer, got {sample_rate!r}")
    sample_rate = int(sample_rate)
    pcm = np.round(a * 32768.0).clip(-32768, 32767).astype("<i2").tobytes()  # FFmpeg reads s16 / 32768

    def write(tmp: str) -> None:
        with wave.open(tmp, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(sample_rate)
            w.writeframes(pcm)

    return _atomic(path, write, ".wav")


def write_png(path: str | os.PathLike, image, scale: int = 1) -> Path:
    """Write uint8 ``image`` ``(H, W, C)`` (C in {1, 3}) upscaled by the integer ``scale`` (nearest neighbour) as a
    PNG (atomic), e.g. a video's poster frame. Returns ``path``."""
    what = f"write_png({str(path)!r})"
    v = _upscale(_check_frames(np.asarray(image)[None], what), scale, what)[0]
    img = Image.fromarray(v[..., 0] if v.shape[-1] == 1 else v)
    return _atomic(path, lambda tmp: img.save(tmp, format="PNG"), ".png")


def _gif_frames(frames, fps: float, scale: int, what: str) -> tuple[list[Image.Image], int]:
    v = _upscale(_check_frames(frames, what), scale, what)
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"{what}: fps must be a positive number, got {fps!r}")
    images = [Image.fromarray(f[..., 0] if f.shape[-1] == 1 else f) for f in v]
    return images, max(10, round(1000 / fps))  # GIF delays are whole centiseconds


def gif_bytes(frames, fps: float, scale: int = 1) -> bytes:
    """An animated GIF (loops forever) of uint8 ``frames`` ``(T, H, W, C)`` at ``fps``, in memory.

    Pillow merges identical consecutive frames into one longer frame (the timing stays the same).
    """
    images, ms = _gif_frames(frames, fps, scale, "gif_bytes")
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=ms, loop=0)
    return buf.getvalue()


def write_gif(path: str | os.PathLike, frames, fps: float, scale: int = 1) -> Path:
    """Write :func:`gif_bytes` of ``frames`` uint8 ``(T, H, W, C)`` to ``path`` (atomic). Returns ``path``."""
    data = gif_bytes(frames, fps, scale)
    return _atomic(path, lambda tmp: Path(tmp).write_bytes(data), ".gif")


# ------------------------------------------------------------------------------------------------ reading
def _open(path: str | os.PathLike):
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    try:
        return av.open(str(p))
    except _AV_ERRORS as e:
        raise DataError(f"{p}: cannot be opened as media ({type(e).__name__}: {e})") from e


def _seconds(value, time_base) -> float | None:
    return None if value is None or time_base is None else float(value * time_base)


def _origin(c) -> float:
    return c.start_time / 1e6 if c.start_time is not None else 0.0


def _stream_end(c, stream) -> float:
    """End time of ``stream`` in seconds from the container origin (the container's end when unknown)."""
    dur = _seconds(stream.duration, stream.time_base)
    if dur is None:
        return (c.duration or 0) / 1e6
    return (_seconds(stream.start_time, stream.time_base) or 0.0) - _origin(c) + dur


def probe_media(path: str | os.PathLike) -> MediaInfo:
    """Open ``path`` and read its first video and audio stream headers (no decoding); a truncated WAV is
    refused. Raises DataError."""
    with _open(path) as c:
        if "wav" in c.format.name.split(","):
            why = wav_shortfall(path)
            if why:
                raise DataError(f"{path}: {why}")
        info = MediaInfo(str(path), duration_s=(c.duration or 0) / 1e6)
        if c.streams.video:
            vs = c.streams.video[0]
            rate = vs.average_rate or vs.guessed_rate or vs.base_rate
            if not rate or vs.codec_context is None or not vs.width:
                raise DataError(f"{path}: the video track has no usable frame rate, size or codec")
            info.fps, info.width, info.height = float(rate), vs.width, vs.height
            info.video_duration_s = _stream_end(c, vs)
        if c.streams.audio:
            ast = c.streams.audio[0]
            if not ast.sample_rate or ast.codec_context is None:
                raise DataError(f"{path}: the audio track has no usable sample rate or codec")
            info.sample_rate, info.channels = ast.sample_rate, ast.channels
            info.audio_duration_s = _stream_end(c, ast)
        info.duration_s = max([info.duration_s] + [d for d in (info.video_duration_s, info.audio_duration_s) if d])
        return info


def _audio_pass(c, stream, sr: int, start: float, stop: float, seek: bool) -> tuple[np.ndarray, float] | None:
    """Decode from ``start - _AUDIO_PREROLL_S`` (seeking) or from the beginning up to ``stop`` (0 = to the end):
    ``(mono float32 samples, time of the first one)``, or None when the seek cannot be trusted."""
    origin = _origin(c)
    if seek:
        c.seek(int((start - _AUDIO_PREROLL_S) / stream.time_base), stream=stream, backward=True, any_frame=False)
    resampler = av.AudioResampler(format="fltp", rate=sr)  # keeps the channels; mixed down below
    chunks, first = [], None
    for frame in c.decode(stream):
        t = None if frame.time is None else frame.time - origin
        if first is None:
            if seek and (t is None or t > start + 1.0 / sr):
                return None
            first = 0.0 if t is None else t
        if t is not None and stop > 0 and t >= stop:
            break
        chunks += [f.to_ndarray().mean(axis=0) for f in resampler.resample(frame)]
    chunks += [f.to_ndarray().mean(axis=0) for f in resampler.resample(None)]
    return (np.concatenate(chunks) if chunks else np.zeros(0, np.float32)), (first or 0.0)


def _decode_audio(path, start: float, end: float | None, sample_rate: int | None) -> tuple[np.ndarray, int]:
    """Mono float32 samples of ``[start, end)`` (clipped to the track) of the first audio track, and the rate."""
    for seek in ([True, False] if start > _AUDIO_PREROLL_S else [False]):
        with _open(path) as c:
            if not c.streams.audio:
                raise DataError(f"{path} has no audio track")
            stream = c.streams.audio[0]
            sr = int(sample_rate or stream.sample_rate)
            limit = _stream_end(c, stream)  # 0 when unknown
            stop = end if limit <= 0 else limit if end is None else min(end, limit)
            try:
                got = _audio_pass(c, stream, sr, start, stop or 0.0, seek)
            except _AV_ERRORS as e:
                if seek:
                    continue
                raise DataError(f"{path}: cannot decode the audio ({type(e).__name__}: {e})") from e
        if got is None:
            continue
        x, first = got
        a = round((start - first) * sr)
        if a < 0:  # the track starts after `start`
            x, a = np.concatenate([np.zeros(-a, np.float32), x]), 0
        n = round((stop - start) * sr) if stop else len(x) - a
        out = np.ascontiguousarray(x[a:a + max(n, 0)], dtype=np.float32)
        why = nonfinite(out, start, sr)  # a float WAV can hold NaN or Inf: clamping would hide it
        if why:
            raise DataError(f"{path}: {why}")
        return out, sr
    raise DataError(f"{path}: cannot decode the audio")  # not reached: the pass without seeking returns or raises


def _frames_pass(c, stream, times: Sequence[float], seek: bool) -> list | None:
    """The decoded frames nearest in time to each of the ascending ``times``; None when the seek overshot."""
    origin, rate = _origin(c), float(stream.average_rate or stream.guessed_rate or 1)
    if seek:
        c.seek(int(times[0] / stream.time_base), stream=stream, backward=True, any_frame=False)
    out, prev, prev_t, k = [], None, 0.0, 0
    for i, frame in enumerate(c.decode(stream)):
        t = frame.time - origin if frame.time is not None else i / rate
        if prev is None and seek and t > times[0] + 1e-6:
            return None
        while k < len(times) and prev is not None and times[k] - prev_t <= t - times[k]:
            out.append(prev)
            k += 1
        if k == len(times):
            break
        prev, prev_t = frame, t
    return out + [prev] * (len(times) - len(out)) if prev is not None else []


def read_frames_at(path: str | os.PathLike, times: Sequence[float]) -> np.ndarray:
    """Frames nearest in time to each of ``times`` (seconds, ascending): uint8 ``(len(times), H, W, 3)``.

    Seeks to the keyframe before ``times[0]`` and decodes forward; each source frame is converted once.
    """
    times = [float(t) for t in times]
    if not times or any(b < a for a, b in zip(times, times[1:])):
        raise ValueError(f"read_frames_at({str(path)!r}): times must be a non-empty ascending list")
    for seek in ([True, False] if times[0] > 0 else [False]):
        with _open(path) as c:
            if not c.streams.video:
                raise DataError(f"{path} has no video track")
            try:
                frames = _frames_pass(c, c.streams.video[0], times, seek)
                if frames == []:
                    raise DataError(f"{path}: the video track holds no frames")
                if frames is not None:
                    rgb: dict[int, np.ndarray] = {}
                    for f in frames:
                        if id(f) not in rgb:
                            rgb[id(f)] = f.to_ndarray(format="rgb24")
                    return np.stack([rgb[id(f)] for f in frames])
            except _AV_ERRORS as e:
                if not seek:
                    raise DataError(f"{path}: cannot decode the video ({type(e).__name__}: {e})") from e
    raise DataError(f"{path}: cannot decode the video")  # not reached: the pass without seeking returns or raises


def read_media(path: str | os.PathLike, *, want_video: bool = True, want_audio: bool = True,
               sample_rate: int | None = None, start_s: float = 0.0, end_s: float | None = None) -> MediaClip:
    """Decode ``[start_s, end_s)`` (default: all) of ``path``: frames uint8 ``(T, H, W, 3)`` and mono audio
    float32 ``(L,)``, resampled to ``sample_rate`` when given and trimmed to the audio stream's duration.
    Frames are those whose time is in the span; the audio starts at ``start_s`` to within half a sample.

    Raises DataError naming the file when it cannot be opened or decoded, or a wanted stream is missing.
    """
    if start_s < 0 or (end_s is not None and end_s < start_s):
        raise ValueError(f"read_media({str(path)!r}): need 0 <= start_s <= end_s, got {start_s}, {end_s}")
    frames = fps = audio = sr = None
    with _open(path) as c:
        for kind, wanted, streams in (("video", want_video, c.streams.video), ("audio", want_audio, c.streams.audio)):
            if wanted and not streams:
                raise DataError(f"{path} has no {kind} track")
        if want_video:
            vs, origin = c.streams.video[0], _origin(c)
            fps = float(vs.average_rate or vs.guessed_rate or vs.base_rate or 0) or None
            stop = end_s if end_s is not None else math.inf
            got = []
            try:
                if start_s > 0:
                    c.seek(int(start_s / vs.time_base), stream=vs, backward=True, any_frame=False)
                for i, frame in enumerate(c.decode(vs)):
                    t = frame.time - origin if frame.time is not None else i / (fps or 1)
                    if t >= stop:
                        break
                    if t >= start_s - 1e-6:
                        got.append(frame.to_ndarray(format="rgb24"))
            except _AV_ERRORS as e:
                raise DataError(f"{path}: cannot decode the video ({type(e).__name__}: {e})") from e
            frames = np.stack(got) if got else np.zeros((0, vs.height, vs.width, 3), np.uint8)
    if want_audio:
        audio, sr = _decode_audio(path, start_s, end_s, sample_rate)
    durations = [len(audio) / sr] if audio is not None else []
    if frames is not None and fps:
        durations.append(len(frames) / fps)
    return MediaClip(frames, fps, audio, sr, max(durations, default=0.0))


def read_audio(path: str | os.PathLike, sample_rate: int | None = None) -> tuple[np.ndarray, int]:
    """Decode the first audio track of any format FFmpeg reads: ``(float32 mono (L,), sample_rate)``,
    mixed down to mono and resampled to ``sample_rate`` when given. Raises DataError naming the file."""
    clip = read_media(path, want_video=False, want_audio=True, sample_rate=sample_rate)
    return clip.audio, clip.sample_rate


# ------------------------------------------------------------------------------------------------ sheets
def to_uint8_video(x: torch.Tensor) -> np.ndarray:
    """Float video ``(B, C, T, H, W)`` in [-1, 1] -> uint8 numpy ``(B, T, H, W, C)`` (rounded, clipped)."""
    if not isinstance(x, torch.Tensor) or x.ndim != 5 or x.shape[1] not in (1, 3):
        raise ValueError(f"to_uint8_video: expected a float tensor (B, C, T, H, W) with C in {{1, 3}}, "
                         f"got {getattr(x, 'shape', type(x))}")
    y = ((x.detach().float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
    return y.permute(0, 2, 3, 4, 1).cpu().numpy()


_CMAP = np.array([[0, 0, 4], [59, 15, 112], [140, 41, 129], [222, 73, 104], [254, 159, 109], [252, 253, 191]],
                 np.float32)  # magma-like anchors, dark -> bright


def _spectrogram(audio: np.ndarray, sample_rate: int | None, height: int, width: int) -> np.ndarray:
    """Log-magnitude STFT of ``audio`` (L,) as a colour strip uint8 ``(height, width, 3)``, low pitch at the bottom."""
    n_fft = 1 << max(4, round(math.log2(0.032 * sample_rate))) if sample_rate else 512
    n_fft = min(n_fft, 1 << max(4, int(math.log2(max(len(audio), 16)))))
    x = torch.from_numpy(np.pad(np.asarray(audio, dtype=np.float32), (0, max(0, n_fft - len(audio)))))
    spec = torch.stft(x, n_fft, hop_length=n_fft // 4, window=torch.hann_window(n_fft), return_complex=True).abs()
    db = 20 * torch.log10(spec.clamp_min(1e-5))
    top = db.max().clamp_min(-20.0)  # near-silence stays dark
    db = ((db - (top - 80.0)) / 80.0).clamp(0, 1).flip(0)  # 80 dB range, top row = Nyquist
    img = torch.nn.functional.interpolate(db[None, None], size=(height, width), mode="bilinear",
                                          align_corners=False)[0, 0].numpy()
    pos = img * (len(_CMAP) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_CMAP) - 2)
    rgb = _CMAP[lo] + (pos - lo)[..., None] * (_CMAP[lo + 1] - _CMAP[lo])
    return rgb.round().clip(0, 255).astype(np.uint8)


def contact_sheet(videos, audios=None, sample_rate: int | None = None, frames: int = 8, scale: int | None = None,
                  labels: Sequence[str] | None = None) -> np.ndarray:
    """One row per clip of uint8 ``videos`` ``(B, T, H, W, C)``: ``frames`` frames evenly spaced over the clip,
    upscaled by ``scale`` (default :func:`shown_scale`: >= 128 px a frame; 2 for the strips of audio alone), with
    the spectrogram of ``audios`` float32 ``(B, L)`` (when given) under the row; ``videos=None`` gives the
    spectrogram strips alone.

    Rows and frames are separated by 2-pixel gaps; ``labels`` (B strings) are drawn on each row's first frame.
    Returns uint8 ``(H', W', 3)``.
    """
    if videos is None:  # audio only: one spectrogram strip per clip
        if audios is None:
            raise ValueError("contact_sheet: needs videos, audios or both")
        a = np.asarray(audios, dtype=np.float32)
        if a.ndim != 2 or 0 in a.shape:
            raise ValueError(f"contact_sheet: expected audios (B, L), got {tuple(a.shape)}")
        scale = 2 if scale is None else scale
        b, fh, row_w, gap = a.shape[0], 0, 256 * scale, 2
    else:
        v = np.asarray(videos)
        if v.dtype != np.uint8 or v.ndim != 5 or v.shape[-1] not in (1, 3) or 0 in v.shape:
            raise ValueError(f"contact_sheet: expected uint8 videos (B, T, H, W, C) with C in {{1, 3}}, "
                             f"got {v.dtype} {tuple(v.shape)}")
        b, t, h, w, _ = v.shape
        scale = shown_scale(h, w) if scale is None else scale
        a = None if audios is None else np.asarray(audios, dtype=np.float32)
        if a is not None and (a.ndim != 2 or a.shape[0] != b or a.shape[1] == 0):
            raise ValueError(f"contact_sheet: expected audios (B={b}, L), got {tuple(a.shape)}")
        gap = 2
        fh, fw = h * scale, w * scale
        row_w = frames * fw + (frames - 1) * gap
    if frames < 1 or int(scale) != scale or scale < 1:
        raise ValueError(f"contact_sheet: need frames >= 1 and an integer scale >= 1, got {frames}, {scale}")
    if labels is not None and len(labels) != b:
        raise ValueError(f"contact_sheet: {len(labels)} labels for {b} clips")
    spec_h = (max(16, fh // 2) if fh else 32 * scale) if a is not None else 0
    top = fh + gap if (fh and a is not None) else fh
    row_h = top + spec_h
    sheet = np.full((b * row_h + (b - 1) * gap, row_w, 3), 24, np.uint8)
    for i in range(b):
        y = i * (row_h + gap)
        if videos is not None:
            clip = v[i].repeat(3, axis=-1) if v.shape[-1] == 1 else v[i]
            for j, k in enumerate(np.linspace(0, t - 1, frames).round().astype(int)):
                sheet[y:y + fh, j * (fw + gap):j * (fw + gap) + fw] = clip[k].repeat(scale, 0).repeat(scale, 1)
        if a is not None:
            sheet[y + top:y + row_h] = _spectrogram(a[i], sample_rate, spec_h, row_w)
    if labels is not None:
        img = Image.fromarray(sheet)
        draw, font = ImageDraw.Draw(img), ImageFont.load_default(size=max(11, fh // 8))
        for i, text in enumerate(labels):
            y = i * (row_h + gap)
            box = draw.textbbox((2, y + 1), str(text), font=font)
            draw.rectangle(box, fill=(0, 0, 0))
            draw.text((2, y + 1), str(text), fill=(255, 255, 255), font=font)
        sheet = np.asarray(img).copy()
    return sheet
