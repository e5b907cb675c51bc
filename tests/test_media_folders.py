"""The media folder datasets ``video_folder``, ``audio_folder`` and ``av_folder`` on files written here."""
from __future__ import annotations

import wave

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from registry.kinds import DATASETS
from zoo.data.errors import DataError, DataWarning
from zoo.data.media_folders import AudioFolder, AVFolder, VideoFolder
from zoo.media import write_mp4, write_wav

SRC_FPS, SRC_SR = 8, 16000


def ramp_video(t: int = 12, h: int = 20, w: int = 28) -> np.ndarray:
    """uint8 (T, H, W, 3): frame k is a flat grey of level 20 * k; the right half is white (to see the crop)."""
    v = np.broadcast_to((np.arange(t) * 20).astype(np.uint8)[:, None, None, None], (t, h, w, 3)).copy()
    v[:, :, w // 2:] = 255
    return v


def step_audio(seconds: float, onset: float, sr: int = SRC_SR) -> np.ndarray:
    """A 1 kHz tone that is silent before ``onset`` seconds and loud (0.5) after."""
    t = np.arange(round(seconds * sr)) / sr
    return (0.5 * np.sin(2 * np.pi * 1000 * t) * (t >= onset)).astype(np.float32)


def params(tag: str, root, **kw):
    base = {"video_folder": {"frames": 4, "fps": 4.0, "size": 16},
            "audio_folder": {"sample_rate": 8000, "duration_s": 0.25},
            "av_folder": {"frames": 4, "fps": 8.0, "size": 16, "sample_rate": 8000}}[tag]
    return DATASETS.get(tag).Params.model_validate({"type": tag, "root": str(root), "num_classes": 2, **base, **kw})


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """root/a/{0,1}.mp4 and root/b/0.mp4: 12 frames at 8 fps (1.5 s), sound from 0.75 s on."""
    root = tmp_path_factory.mktemp("videos")
    for cls, n in (("a", 2), ("b", 1)):
        for i in range(n):
            write_mp4(root / cls / f"{i}.mp4", ramp_video(), SRC_FPS, step_audio(1.5, 0.75), SRC_SR)
    return root


@pytest.fixture(scope="module")
def sounds(tmp_path_factory):
    """root/a/long.wav (0.5 s, 16 kHz), root/b/short.wav (0.1 s) and root/b/stereo.wav (L = x, R = 0)."""
    root = tmp_path_factory.mktemp("sounds")
    (root / "a").mkdir(), (root / "b").mkdir()
    write_wav(root / "a" / "long.wav", np.linspace(-0.5, 0.5, 8000, dtype=np.float32), SRC_SR)
    write_wav(root / "b" / "short.wav", np.full(1600, 0.25, np.float32), SRC_SR)
    x = np.full(4000, 0.5)
    with wave.open(str(root / "b" / "stereo.wav"), "wb") as w:
        w.setnchannels(2), w.setsampwidth(2), w.setframerate(SRC_SR)
        w.writeframes((np.stack([x, 0 * x], 1) * 32767).round().astype("<i2").tobytes())
    return root


def test_video_folder(videos):
    ds = VideoFolder(params("video_folder", videos))
    assert len(ds) == 3 and ds.classes == ["a", "b"] and ds.num_classes == 2
    assert ds.sample_shape() == (3, 4, 16, 16) and ds.stream_rates() == {"video": 4.0}
    xs, ys = zip(*(ds[i] for i in range(3)))
    assert list(ys) == [0, 0, 1]
    for x in xs:
        assert x.shape == (3, 4, 16, 16) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
        grey = (x[0, :, :, 0] + 1) * 127.5  # left edge: the ramp; frames 1 / 4 s apart = 2 source frames
        assert torch.allclose(grey.diff(dim=0), torch.full((3, 16), 40.0), atol=4)
        assert (x[:, :, :, -1] > 0.95).all()  # the crop keeps the centre: the white right half is inside
    assert all(torch.equal(ds[i][0], xs[i]) for i in range(3))  # deterministic
    again = VideoFolder(params("video_folder", videos))
    assert torch.equal(again[1][0], xs[1])
    others = [VideoFolder(params("video_folder", videos, seed=s))[0][0] for s in range(1, 4)]
    assert any(not torch.equal(o, xs[0]) for o in others)  # the seed moves the windows
    grey = VideoFolder(params("video_folder", videos, channels=1, size=8))[0][0]
    assert grey.shape == (1, 4, 8, 8)
    ev = VideoFolder(params("video_folder", videos), split="eval")
    assert len(ev) == 3 and ev.root == ds.root


def test_audio_folder(sounds):
    ds = AudioFolder(params("audio_folder", sounds))
    assert [p.rsplit("/", 1)[-1] for p, _ in ds.samples] == ["long.wav", "short.wav", "stereo.wav"]
    assert ds.sample_shape() == (1, 2000) and ds.stream_rates() == {"audio": 8000}
    (ramp, y0), (short, y1), (stereo, y2) = ds[0], ds[1], ds[2]
    assert (y0, y1, y2) == (0, 1, 1)
    for x in (ramp, short, stereo):
        assert x.shape == (1, 2000) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    slope = ramp[0, 100:-100].diff().mean().item()  # 16 kHz -> 8 kHz: twice the per-sample step
    assert slope == pytest.approx(2 / 8000, rel=0.02)
    assert short[0, 50:750].sub(0.25).abs().max() < 0.01 and (short[0, 820:] == 0).all()  # 0.1 s, zero-padded
    assert stereo[0, 50:-50].sub(0.25).abs().max() < 0.01  # mean of L = 0.5 and R = 0
    assert torch.equal(ds[0][0], ramp) and torch.equal(AudioFolder(params("audio_folder", sounds))[0][0], ramp)
    starts = {AudioFolder(params("audio_folder", sounds, seed=s))[0][0][0, 0].item() for s in range(6)}
    assert len(starts) > 1  # random windows over the 0.5 s file


def test_av_folder_same_window(videos):
    ds = AVFolder(params("av_folder", videos))
    assert ds.sample_shape() == {"video": (3, 4, 16, 16), "audio": (1, 4000)}
    assert ds.stream_rates() == {"video": 8.0, "audio": 8000}
    seen = set()
    for seed in range(8):
        x, y = AVFolder(params("av_folder", videos, seed=seed))[2]
        assert y == 1 and x["video"].shape == (3, 4, 16, 16) and x["audio"].shape == (1, 4000)
        level = ((x["video"][0, :, 8, 0] + 1) * 127.5 / 20).round()  # source frame index of each frame
        t0 = level[0].item() / SRC_FPS  # window start, to within half a frame
        loud = x["audio"][0].reshape(4, 1000).abs().amax(dim=1) > 0.25  # sound per frame span
        expect = (t0 + np.arange(4) / SRC_FPS) >= 0.75
        mismatch = (loud != torch.from_numpy(expect)).sum().item()
        assert mismatch <= 1, (seed, level, loud)  # only the frame at the onset may differ
        seen.add(int(expect.sum()))
    assert seen - {0, 4}  # some window straddles the onset


def test_probe_errors_stop_and_skip(tmp_path, videos):
    root = tmp_path / "r"
    for cls in ("a", "b"):
        write_mp4(root / cls / "ok.mp4", ramp_video(), SRC_FPS, step_audio(1.5, 0.0), SRC_SR)
    (root / "a" / "junk.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, np.uint8).tobytes())
    write_mp4(root / "b" / "silent.mp4", ramp_video(), SRC_FPS)
    write_mp4(root / "b" / "short.mp4", ramp_video(t=2), SRC_FPS, step_audio(0.25, 0.0), SRC_SR)
    (root / "b" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"(?s)junk\.mp4.*notes\.txt|notes\.txt"):
        VideoFolder(params("video_folder", root))
    (root / "b" / "notes.txt").unlink()
    with pytest.raises(DataError, match=r"(?s)junk\.mp4: cannot be opened.*short\.mp4: is 0\.250 s long") as e:
        VideoFolder(params("video_folder", root))
    assert "silent.mp4" not in str(e.value)  # video_folder does not need sound
    with pytest.raises(DataError, match=r"silent\.mp4: has no audio track"):
        AVFolder(params("av_folder", root))
    with pytest.warns(DataWarning) as record:
        ds = AVFolder(params("av_folder", root, on_error="skip"))
    assert sorted(str(w.message).split(": ")[1].rsplit("/", 1)[-1] for w in record) == \
        ["junk.mp4", "short.mp4", "silent.mp4"]
    assert len(ds) == 2 and sorted(ds.bad) == sorted(str(root / p) for p in ("a/junk.mp4", "b/short.mp4",
                                                                              "b/silent.mp4"))
    assert ds[1][1] == 1 and ds[1][0]["audio"].abs().max() > 0.1


def test_decode_error_while_loading(tmp_path):
    root = tmp_path / "r"
    for cls in ("a", "b"):
        write_mp4(root / cls / "ok.mp4", ramp_video(), SRC_FPS)
    ds = VideoFolder(params("video_folder", root))
    skipping = VideoFolder(params("video_folder", root, on_error="skip"))
    (root / "a" / "ok.mp4").write_bytes(b"\0" * 100)  # broken after the probe
    with pytest.raises(DataError, match=r"video_folder: .*a/ok\.mp4"):
        ds[0]
    with pytest.warns(DataWarning, match=r"a/ok\.mp4"):
        x, y = skipping[0]
    assert y == 1 and str(root / "a" / "ok.mp4") in skipping.bad


def test_params_validation(tmp_path):
    with pytest.raises(ValidationError):
        params("video_folder", tmp_path, frames=0)
    with pytest.raises(ValidationError):
        params("audio_folder", tmp_path, on_error="ignore")
    with pytest.raises(ValidationError):
        params("av_folder", tmp_path, sample_rate=10)
    assert params("audio_folder", tmp_path, extensions=["WAV"]).extensions == (".wav",)
    with pytest.raises(DataError, match="does not exist"):
        AudioFolder(params("audio_folder", tmp_path / "nowhere"))
