"""Sample files of a run (:mod:`runtime.media_out`): posters beside the MP4s, previews scaled to >= 128 px a clip,
per-clip readings as JSON, and the real held-out clips picked for the same labels."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import zoo  # noqa: F401  (registers the built-ins)
from registry.kinds import DATASETS
from runtime.media_out import real_indices, write_clip_readings, write_samples
from zoo.media import probe_media, to_uint8_video


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """10 random clips of 8 frames of 16x16 grey with 1 s of 4 kHz audio, labels 0..9, written as a run would."""
    g = torch.Generator().manual_seed(0)
    samples = {"video": torch.rand(10, 1, 8, 16, 16, generator=g) * 2 - 1,
               "audio": (torch.rand(10, 1, 4000, generator=g) * 2 - 1) * 0.5}
    out = tmp_path_factory.mktemp("samples")
    return samples, write_samples(samples, torch.arange(10), {"video": 8, "audio": 4000}, out, "step_00000003",
                                  nrow=10)


def test_each_mp4_has_a_poster_of_its_first_frame(written):
    samples, w = written
    assert len(w.mp4) == len(w.posters) == len(w.wav) == 10
    first = to_uint8_video(samples["video"])[:, 0, ..., 0]  # (B, H, W)
    for i, (mp4, poster) in enumerate(zip(w.mp4, w.posters)):
        assert poster == mp4.with_suffix(".png") and poster.parent == w.clip_dir
        with Image.open(poster) as im:
            assert im.size == (128, 128)
            assert np.array_equal(np.asarray(im.convert("L")), first[i].repeat(8, 0).repeat(8, 1))
    info = probe_media(w.mp4[0])
    assert (info.width, info.height) == (128, 128) and info.has_audio


def test_gif_and_contact_sheet_show_a_16px_clip_at_128px(written):
    _, w = written
    with Image.open(w.gif) as im:  # 10 clips in 2 balanced rows of 5, each cell (16 + 2 px pad) x 8
        assert im.size == ((5 * 18 + 2) * 8, (2 * 18 + 2) * 8) and im.n_frames > 1
    with Image.open(w.sheet) as im:  # 8 frames of 128 px per row (2 px gaps), a 64 px spectrogram under each
        assert im.size == (8 * 128 + 7 * 2, 10 * (128 + 2 + 64) + 9 * 2)


def test_clip_readings_json_one_clip_a_line(written):
    _, w = written
    rows = [{"video_digit": i, "audio_digit": None, "sync_ms": 1.5, "consistent": True, "frame_digits": [i] * 8,
             "finite": True} for i in range(10)]
    path = write_clip_readings(rows, w)
    assert path == w.clip_dir / "clips.json"
    clips = json.loads(path.read_text())["clips"]
    assert [c["file"] for c in clips] == [p.stem for p in w.mp4] and clips[3]["label"] == 3
    assert clips[3]["video_digit"] == 3 and clips[3]["audio_digit"] is None
    assert len(path.read_text().splitlines()) == 12
    with pytest.raises(ValueError, match="9 readings for 10 clips"):
        write_clip_readings(rows[:9], w)


def test_real_indices_follow_the_labels():
    ds = DATASETS.build(DATASETS.get("bouncing_digits_av").Params(type="bouncing_digits_av", preset="tiny",
                                                                     streams=["video"]), split="eval")
    idx = real_indices(ds, [3, 3, 7, 0])
    assert idx == [3, 13, 7, 0] and [int(ds[i][1]) for i in idx] == [3, 3, 7, 0]
    assert real_indices(ds, [None, None]) == [0, 1]

    class Odd:  # labels that do not follow i % 10: found by scanning; a label found nowhere is left out
        def __len__(self) -> int:
            return 30

        def __getitem__(self, i: int):
            return torch.zeros(1), (i // 3) % 5

    assert real_indices(Odd(), [4, 4, 9, 0]) == [12, 13, 0]
