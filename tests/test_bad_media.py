"""Damaged audio is named, skipped per ``on_error`` and counted (issue 14 item 11): float WAVs holding NaN or
Inf, and a WAV cut short, are never clamped or zero-padded into training data."""
from __future__ import annotations

import json
import struct
import warnings

import numpy as np
import pytest

from registry.kinds import DATASETS
from zoo.data.errors import DataError, DataWarning
from zoo.data.media_folders import AudioFolder
from zoo.media import probe_media, read_audio, write_wav

SR = 4000


def float_wav(path, x: np.ndarray, sr: int = SR) -> None:
    """A 32-bit float PCM WAV (the format that can hold NaN and Inf)."""
    data = np.asarray(x, "<f4").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE" + b"fmt "
                     + struct.pack("<IHHIIHH", 16, 3, 1, sr, sr * 4, 4, 32) + b"data" + struct.pack("<I", len(data))
                     + data)


def tone(seconds: float = 1.0, f: float = 440.0) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * f * np.arange(round(seconds * SR)) / SR)).astype(np.float32)


def folder(root, bad: str | None) -> None:
    """root/a/{0,1}.wav and root/b/0.wav, 1 s tones; ``bad`` ("nan", "inf", "trunc") damages root/a/0.wav."""
    for cls, n in (("a", 2), ("b", 1)):
        for i in range(n):
            float_wav(root / cls / f"{i}.wav", tone(f=300.0 + 200 * i + (cls == "b") * 500))
    x = tone()
    if bad in ("nan", "inf"):
        x[1000:1100] = np.nan if bad == "nan" else np.inf
        float_wav(root / "a" / "0.wav", x)
    elif bad == "trunc":
        raw = (root / "a" / "0.wav").read_bytes()
        (root / "a" / "0.wav").write_bytes(raw[: len(raw) // 2])


def params(root, **kw):
    return DATASETS.get("audio_folder").Params.model_validate(
        {"type": "audio_folder", "root": str(root), "num_classes": 2, "sample_rate": SR, "duration_s": 1.0, **kw})


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_samples_are_named_not_clamped(tmp_path, bad):
    folder(tmp_path, bad)
    with pytest.raises(DataError, match=r"a/0\.wav: the audio holds 100 non-finite samples .* 0\.250 s"):
        read_audio(tmp_path / "a" / "0.wav")
    ds = AudioFolder(params(tmp_path))  # the probe reads headers only: found when decoded
    with pytest.raises(DataError, match=r"audio_folder: .*a/0\.wav: the audio holds .*set on_error: skip"):
        ds[0]
    skipping = AudioFolder(params(tmp_path, on_error="skip"))
    assert skipping.skipped_samples == 0
    with pytest.warns(DataWarning, match=r"skipping .*a/0\.wav: .*non-finite"):
        x, y = skipping[0]
    assert np.isfinite(x.numpy()).all() and y == 0 and skipping.skipped_samples == 1
    skipping[0], skipping[1]  # the bad file is known now: passed over without a second warning, still counted
    assert skipping.skipped_samples == 2


def test_truncated_wav_is_bad_not_zero_padded(tmp_path):
    folder(tmp_path, "trunc")
    with pytest.raises(DataError, match=r"a/0\.wav: truncated WAV: its header declares 16,000 bytes"):
        probe_media(tmp_path / "a" / "0.wav")
    with pytest.raises(DataError, match=r"(?s)bad files .*a/0\.wav: truncated WAV"):
        AudioFolder(params(tmp_path))
    with pytest.warns(DataWarning, match=r"a/0\.wav: truncated WAV"):
        ds = AudioFolder(params(tmp_path, on_error="skip"))
    assert len(ds) == 2
    short = tmp_path / "short.wav"  # a whole file shorter than the window stays fine (zero-padded, documented)
    write_wav(short, tone(0.1), SR)
    assert probe_media(short).audio_duration_s == pytest.approx(0.1)


def test_loader_workers_name_the_file_and_share_the_count(tmp_path):
    """A worker's DataError arrives without the worker's traceback; its skips add to the main count."""
    from torch.utils.data import DataLoader

    folder(tmp_path, "nan")
    with pytest.raises(DataError) as e:
        list(DataLoader(AudioFolder(params(tmp_path)), batch_size=1, num_workers=1))
    assert str(e.value).startswith("audio_folder: ") and "a/0.wav: the audio holds" in str(e.value)
    assert "Traceback" not in str(e.value)
    ds = AudioFolder(params(tmp_path, on_error="skip"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(list(DataLoader(ds, batch_size=1, num_workers=1))) == 3
    assert ds.skipped_samples == 1


def run_spec(tmp_path, on_error: str) -> str:
    raw = {"version": 1, "name": "bad_media", "modality": {"type": "audio", "patch": 4},
           "data": {"type": "audio_folder", "root": str(tmp_path / "data"), "num_classes": 2, "sample_rate": SR,
                    "duration_s": 1.0, "on_error": on_error},
           "autoencoder": {"type": "spectrogram", "n_fft": 128, "hop": 50, "power": 0.5, "scale": 8.0},
           "backbone": {"type": "mmdit", "hidden": 32, "heads": 2, "double_blocks": 1, "single_blocks": 1},
           "objective": {"type": "flow_matching"}, "solver": {"type": "euler", "steps": 2},
           "train": {"steps": 2, "batch_size": 3, "checkpoint_every": 2},
           "sample": {"n": 2}, "eval": {"at_end": False}, "log": {"every": 1, "progress": False}}
    p = tmp_path / "spec.json"
    p.write_text(json.dumps(raw))
    return str(p)


@pytest.mark.slow  # trains through the CLI
def test_a_run_names_the_nan_file_and_counts_the_skips(tmp_path, capsys):
    from runtime import run as run_cli
    from runtime.tracking import read_jsonl

    folder(tmp_path / "data", "nan")
    assert run_cli.main([run_spec(tmp_path, "stop"), "--out", str(tmp_path / "stop")]) == 2
    assert "a/0.wav: the audio holds 100 non-finite samples" in capsys.readouterr().err
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert run_cli.main([run_spec(tmp_path, "skip"), "--out", str(tmp_path / "skip")]) == 0
    assert any("a/0.wav" in str(w.message) and "non-finite" in str(w.message) for w in record)
    rows = [r for r in read_jsonl(tmp_path / "skip" / "metrics.jsonl") if "loss" in r]
    assert [r["skipped_steps"] for r in rows] == [0, 0]  # no step trains on NaN any more
    assert rows[-1]["skipped_samples"] >= 1
