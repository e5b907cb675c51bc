"""Media I/O (:mod:`zoo.media`): MP4 (H.264 + AAC), WAV, GIF, contact sheets."""
from __future__ import annotations

import io
import wave
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

from zoo.data.errors import DataError
from zoo.media import (MIN_SHOWN_PX, contact_sheet, gif_bytes, probe_media, read_audio, read_frames_at, read_media,
                       shown_scale, to_uint8_video, write_gif, write_mp4, write_png, write_wav)

FPS, SR = 8, 16000


def ramp_video(t: int = 10, h: int = 16, w: int = 24, c: int = 3) -> np.ndarray:
    """uint8 (T, H, W, C): frame k is a flat grey of level 25 * k (easy to recognise after compression)."""
    return np.broadcast_to((np.arange(t) * 25).astype(np.uint8)[:, None, None, None], (t, h, w, c)).copy()


def tone(seconds: float, sr: int = SR, hz: float = 440.0) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * hz * np.arange(round(seconds * sr)) / sr)).astype(np.float32)


def test_mp4_round_trip(tmp_path):
    video, audio = ramp_video(), tone(10 / FPS)
    path = write_mp4(tmp_path / "clip.mp4", video, FPS, audio, SR, scale=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]  # no temporary left behind
    with av.open(str(path)) as c:
        assert len(c.streams.video) == 1 and len(c.streams.audio) == 1
        vs, ast = c.streams.video[0], c.streams.audio[0]
        assert vs.codec_context.name == "h264" and vs.format.name == "yuv420p" and ast.codec_context.name == "aac"
        assert (vs.width, vs.height) == (48, 32) and ast.channels == 1
        assert float(vs.duration * vs.time_base) == pytest.approx(10 / FPS, abs=1e-6)
        assert float(ast.duration * ast.time_base) == pytest.approx(len(audio) / SR, abs=1024 / SR)
    clip = read_media(path)
    assert clip.frames.shape == (10, 32, 48, 3) and clip.frames.dtype == np.uint8 and clip.fps == FPS
    assert np.abs(clip.frames.mean(axis=(1, 2, 3)) - video.mean(axis=(1, 2, 3))).max() < 3
    assert clip.audio.dtype == np.float32 and clip.sample_rate == SR
    assert abs(len(clip.audio) - len(audio)) <= 1024 and clip.duration_s == pytest.approx(1.25, abs=1024 / SR)
    n = min(len(audio), len(clip.audio))
    assert np.abs(clip.audio[2048:n] - audio[2048:n]).max() < 0.02  # past the encoder's first frames


def test_mp4_odd_size_grey_and_windows(tmp_path):
    path = write_mp4(tmp_path / "g.mp4", ramp_video(h=9, w=13, c=1), FPS, tone(10 / FPS), SR)
    info = probe_media(path)
    assert (info.width, info.height, info.fps) == (14, 10, FPS) and info.has_audio
    clip = read_media(path, sample_rate=8000, start_s=0.5, end_s=1.0)
    assert clip.frames.shape == (4, 10, 14, 3) and len(clip.audio) == 4000 and clip.sample_rate == 8000
    assert np.abs(clip.frames[:, 0, 0, 0].astype(int) - [100, 125, 150, 175]).max() <= 3
    frames = read_frames_at(path, [0.06, 0.07, 0.9, 5.0])  # nearest frames 0, 1, 7 and the last one
    assert np.abs(frames[:, 0, 0, 0].astype(int) - [0, 25, 175, 225]).max() <= 3


def test_write_mp4_bad_input(tmp_path):
    with pytest.raises(ValueError, match="bad.mp4.*uint8"):
        write_mp4(tmp_path / "bad.mp4", np.zeros((2, 8, 8, 3), np.float32), FPS)
    with pytest.raises(ValueError, match="sample_rate"):
        write_mp4(tmp_path / "bad.mp4", ramp_video(2), FPS, tone(0.1))
    assert not list(tmp_path.iterdir())


def test_read_media_errors_name_the_file(tmp_path):
    silent = write_mp4(tmp_path / "silent.mp4", ramp_video(4), FPS)
    with pytest.raises(DataError, match="silent.mp4 has no audio track"):
        read_media(silent)
    assert read_media(silent, want_audio=False).audio is None
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match="junk.mp4"):
        read_media(junk)
    with pytest.raises(DataError, match="missing.wav"):
        read_audio(tmp_path / "missing.wav")


def test_wav_round_trip(tmp_path):
    audio = np.random.default_rng(0).uniform(-1, 1, 3000).astype(np.float32)
    path = write_wav(tmp_path / "a.wav", audio, 8000)
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, 8000, 3000)
    back, sr = read_audio(path)
    assert sr == 8000 and back.dtype == np.float32 and back.shape == (3000,)
    assert np.abs(back - audio).max() <= 0.5 / 32768 + 1e-7  # 16-bit quantisation
    half, sr = read_audio(path, sample_rate=4000)
    assert sr == 4000 and abs(len(half) - 1500) <= 1


def test_mp3_windows_match_full_decode(tmp_path):
    """A window read after a seek equals the same span of a full decode (MP3 needs a pre-roll)."""
    sr, path = 22050, tmp_path / "a.mp3"
    x = tone(1.5, sr, 330)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libmp3lame", rate=sr)
        s.layout = "stereo"
        for i in range(0, len(x), 1152):
            f = av.AudioFrame.from_ndarray(np.stack([x[i:i + 1152], 0 * x[i:i + 1152]]), format="fltp",
                                           layout="stereo")
            f.sample_rate, f.pts, f.time_base = sr, i, Fraction(1, sr)
            c.mux(s.encode(f))
        c.mux(s.encode(None))
    full, rate = read_audio(path, sample_rate=8000)
    assert rate == 8000 and abs(len(full) - 12000) <= 1 and np.abs(full).max() == pytest.approx(0.25, abs=0.02)
    for start in (0.5, 1.0):
        w = read_media(path, want_video=False, sample_rate=8000, start_s=start, end_s=start + 0.25).audio
        assert len(w) == 2000
        assert np.abs(w - full[round(start * 8000):][:2000]).max() < 0.03  # up to half a sample of phase


def test_gif(tmp_path):
    frames = ramp_video(t=5, h=6, w=7)
    path = write_gif(tmp_path / "a.gif", frames, fps=10, scale=3)
    for source in (path, io.BytesIO(gif_bytes(frames, fps=10, scale=3))):
        with Image.open(source) as im:
            assert im.n_frames == 5 and im.size == (21, 18) and im.info["loop"] == 0 and im.info["duration"] == 100
    with Image.open(io.BytesIO(gif_bytes(ramp_video(t=3, c=1), fps=4))) as im:
        assert im.n_frames == 3


def test_contact_sheet_and_uint8_video():
    x = torch.rand(2, 3, 12, 8, 10) * 2 - 1
    v = to_uint8_video(x)
    assert v.shape == (2, 12, 8, 10, 3) and v.dtype == np.uint8
    assert np.array_equal(v, ((x.permute(0, 2, 3, 4, 1) + 1) * 127.5).round().numpy().astype(np.uint8))
    assert to_uint8_video(torch.full((1, 1, 2, 4, 4), 3.0)).max() == 255
    with pytest.raises(ValueError, match="B, C, T, H, W"):
        to_uint8_video(torch.zeros(3, 12, 8, 10))
    sheet = contact_sheet(v, frames=4, scale=2)
    assert sheet.shape == (2 * 16 + 2, 4 * 20 + 3 * 2, 3) and sheet.dtype == np.uint8
    assert np.array_equal(sheet[:16, :20], v[0, 0].repeat(2, 0).repeat(2, 1))  # first frame, top left
    assert np.array_equal(sheet[18:34, -20:], v[1, -1].repeat(2, 0).repeat(2, 1))  # last frame, bottom right
    audio = np.stack([tone(0.5, 8000, 300), tone(0.5, 8000, 3000)])
    sheet = contact_sheet(v, audio, sample_rate=8000, frames=4, scale=2, labels=["a", "b"])
    spec_h = 16
    assert sheet.shape == (2 * (16 + 2 + spec_h) + 2, 86, 3)
    low, high = sheet[18:34].mean(axis=(1, 2)), sheet[54:70].mean(axis=(1, 2))
    assert low[-4:].mean() > low[:4].mean() and high[:8].mean() > low[:8].mean()  # 300 Hz low, 3 kHz higher
    with pytest.raises(ValueError, match="audios"):
        contact_sheet(v, audio[:1])


def test_poster_png_and_shown_scale(tmp_path):
    frame = np.random.default_rng(0).integers(0, 256, (16, 12, 1), dtype=np.uint8)
    path = write_png(tmp_path / "p.png", frame, scale=8)
    with Image.open(path) as im:
        assert im.size == (96, 128) and im.mode == "L"
        assert np.array_equal(np.asarray(im), frame[..., 0].repeat(8, 0).repeat(8, 1))  # nearest neighbour
    with pytest.raises(ValueError, match="uint8"):
        write_png(tmp_path / "q.png", frame.astype(np.float32))
    assert [shown_scale(16, 16), shown_scale(16, 24), shown_scale(100, 120), shown_scale(256, 256)] == [8, 8, 2, 1]
    assert MIN_SHOWN_PX == 128


def test_contact_sheet_default_shows_a_16px_clip_at_128px():
    v = to_uint8_video(torch.rand(3, 1, 8, 16, 16) * 2 - 1)
    sheet = contact_sheet(v, frames=8, labels=[0, 1, 2])
    assert sheet.shape == (3 * 128 + 2 * 2, 8 * 128 + 7 * 2, 3)
    assert np.array_equal(sheet[40:128, :128, 0], v[0, 0, ..., 0].repeat(8, 0).repeat(8, 1)[40:])  # below the label
    strips = contact_sheet(None, np.stack([tone(0.5, 8000), tone(0.5, 8000)]), sample_rate=8000)
    assert strips.shape == (2 * 64 + 2, 512, 3)  # audio alone keeps its scale 2
