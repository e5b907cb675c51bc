"""Datasets: the procedural ``digits`` and the on-disk ``image_folder``."""
from __future__ import annotations

import pickle
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch
from PIL import Image

import zoo  # noqa: F401  (registers the built-ins)
from registry.kinds import DATASETS
from zoo.data.digits import Digits, DigitsDataParams, render_digit
from zoo.data.errors import DataError, DataWarning
from zoo.data.image_folder import ImageFolder, ImageFolderDataParams


def digits(split: str = "train", **kw) -> Digits:
    return Digits(DigitsDataParams(type="digits", **kw), split=split)


# ------------------------------------------------------------------------------------------------ digits
def test_digits_registered_with_tiny_preset():
    assert DATASETS.get("digits") is Digits
    p = DigitsDataParams(type="digits", preset="tiny")
    assert (p.size, p.channels, p.length) == (16, 1, 512)
    assert p.num_classes == 10 and p.sample_shape() == (1, 16, 16)
    ds = DATASETS.build(p, split="eval")
    assert isinstance(ds, Digits) and len(ds) == 512 and ds.sample_shape() == (1, 16, 16)


@pytest.mark.parametrize("bad", [
    {"scale": (0.9, 0.5)}, {"rotation": (-200.0, 0.0)}, {"noise": (-0.1, 0.1)}, {"channels": 2},
    {"size": 4}, {"num_workers": -1}, {"seed": -1}, {"colour": 1},
])
def test_digits_params_rejects(bad):
    with pytest.raises(pydantic.ValidationError):
        DigitsDataParams(type="digits", **bad)


def test_digits_deterministic_per_index():
    a, b = digits(size=16), digits(size=16)
    for i in (7, 3, 7, 1234):
        xa, ya = a[i]
        xb, yb = b[i]
        assert ya == yb and torch.equal(xa, xb)
    assert torch.equal(a[5][0], b[5][0])  # independent of access order
    assert torch.equal(a[-1][0], a[len(a) - 1][0])


def test_digits_seeds_and_splits_differ():
    base = digits(size=16)
    other_seed = digits(size=16, seed=1)
    ev = digits("eval", size=16)
    for i in range(20):
        assert not torch.equal(base[i][0], other_seed[i][0])
    train_imgs = {base[i][0].numpy().tobytes() for i in range(300)}
    eval_imgs = {ev[i][0].numpy().tobytes() for i in range(300)}
    assert len(train_imgs) == 300 and len(eval_imgs) == 300  # no repeats inside a split
    assert not train_imgs & eval_imgs  # disjoint splits


@pytest.mark.parametrize("size", [8, 16, 32, 48])
@pytest.mark.parametrize("channels", [1, 3])
def test_digits_shape_and_range(size, channels):
    ds = digits(size=size, channels=channels)
    for i in range(10):
        x, y = ds[i]
        assert x.shape == (channels, size, size) and x.dtype == torch.float32
        assert -1.0 <= x.min() and x.max() <= 1.0
        assert isinstance(y, int) and y == i % 10
        assert x.max() - x.min() > 0.6  # the digit stands out from the background


def test_digits_colour_and_grey():
    rgb = torch.stack([digits(channels=3)[i][0] for i in range(20)])
    assert (rgb[:, 0] - rgb[:, 1]).abs().mean() > 0.05  # coloured, not grey
    assert digits(channels=1)[0][0].shape[0] == 1


def test_digits_mostly_inside_frame():
    ds = digits(size=32, channels=1, noise=(0.0, 0.0))
    outside = []
    for i in range(50):
        x = ds[i][0][0]
        border = torch.cat([x[0], x[-1], x[:, 0], x[:, -1]])
        outside.append(((border - border.median()).abs() > 0.1).float().mean().item())
    assert np.mean(outside) < 0.05


def test_digits_class_balance_and_bounds():
    ds = digits(length=100)
    counts = Counter(ds[i][1] for i in range(len(ds)))
    assert counts == {k: 10 for k in range(10)}
    with pytest.raises(IndexError):
        ds[100]
    with pytest.raises(ValueError, match="split"):
        Digits(DigitsDataParams(type="digits"), split="test")


def test_digits_dataloader_and_pickle():
    ds = digits(split="eval", preset="tiny")
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=8)))
    assert x.shape == (8, 1, 16, 16) and y.tolist() == list(range(8))
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[3][0], ds[3][0])


def test_digits_render_time():
    """A 32x32 RGB sample renders in well under 2 ms (best of 3 rounds, robust to a busy machine)."""
    p = DigitsDataParams(type="digits", size=32, channels=3)
    render_digit(p, 0)  # warm the glyph cache
    best = min(_time_renders(p, 100) for _ in range(3))
    print(f"digits 32x32x3 render: {best * 1e3:.3f} ms/sample")
    assert best < 2e-3


def _time_renders(p: DigitsDataParams, n: int) -> float:
    t = time.perf_counter()
    for i in range(n):
        render_digit(p, i)
    return (time.perf_counter() - t) / n


# ------------------------------------------------------------------------------------------ image_folder
COLOURS = {"ant": (220, 20, 20), "bee": (20, 200, 20), "cat": (20, 20, 230)}


def _write(path: Path, colour, size=(40, 24), mode="RGB", fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, colour)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, format=fmt)


@pytest.fixture
def folder(tmp_path) -> Path:
    """root/{ant,bee,cat}/ with PNG, JPEG, RGBA, grey and upper-case-extension files."""
    root = tmp_path / "imgs"
    for name, colour in COLOURS.items():
        _write(root / name / "a.png", colour)
        _write(root / name / "b.jpg", colour, size=(30, 50))
        _write(root / name / "nested" / "c.PNG", colour, size=(20, 20), mode="RGBA")
    _write(root / "bee" / "d.jpeg", COLOURS["bee"], size=(64, 64))
    (root / "ant" / ".DS_Store").write_bytes(b"\x00junk")  # hidden files are ignored
    return root


def folder_params(root, **kw) -> ImageFolderDataParams:
    return ImageFolderDataParams(**{"type": "image_folder", "root": str(root), "num_classes": 3, "size": 16, **kw})


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_labels_shapes(folder, channels):
    ds = DATASETS.build(folder_params(folder, channels=channels))
    assert isinstance(ds, ImageFolder)
    assert ds.classes == ["ant", "bee", "cat"] and len(ds) == 10
    assert Counter(y for _, y in ds.samples) == {0: 3, 1: 4, 2: 3}
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (channels, 16, 16) and x.dtype == torch.float32
        assert -1.0 <= x.min() and x.max() <= 1.0
        if channels == 3:
            assert int(x.mean((1, 2)).argmax()) == y  # colour-coded classes: label matches content
    assert ds.sample_shape() == (channels, 16, 16)


def test_image_folder_center_crop(tmp_path):
    img = np.zeros((24, 48, 3), np.uint8)
    img[:, 12:36] = 255  # white centre square, black sides
    (tmp_path / "r" / "only").mkdir(parents=True)
    Image.fromarray(img).save(tmp_path / "r" / "only" / "x.png")
    x, _ = ImageFolder(ImageFolderDataParams(type="image_folder", root=str(tmp_path / "r"), num_classes=1, size=12))[0]
    assert x.shape == (3, 12, 12) and x.min() > 0.9


def test_image_folder_params():
    p = folder_params("/x", extensions=["PNG", ".Jpg"], preset="tiny")
    assert p.extensions == (".png", ".jpg") and p.size == 16 and p.sample_shape() == (3, 16, 16)
    with pytest.raises(pydantic.ValidationError):
        ImageFolderDataParams(type="image_folder", root="/x")  # num_classes is required
    with pytest.raises(pydantic.ValidationError):
        folder_params("/x", channels=4)


def test_image_folder_structure_errors(tmp_path, folder):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(folder_params(tmp_path / "missing"))
    (tmp_path / "flat").mkdir()
    _write(tmp_path / "flat" / "a.png", (0, 0, 0))
    with pytest.raises(DataError, match="no class sub-folders"):
        ImageFolder(folder_params(tmp_path / "flat"))
    with pytest.raises(DataError, match="3 class folders.*num_classes is 5"):
        ImageFolder(folder_params(folder, num_classes=5))
    (folder / "dog").mkdir()
    with pytest.raises(DataError, match="dog"):
        ImageFolder(folder_params(folder, num_classes=4))  # an empty class folder


def test_image_folder_non_image_file(folder):
    (folder / "bee" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="notes.txt"):
        ImageFolder(folder_params(folder))
    with pytest.warns(DataWarning, match="notes.txt"):
        ds = ImageFolder(folder_params(folder, skip_bad=True))
    assert len(ds) == 10 and any(p.endswith("notes.txt") for p in ds.bad)
    assert not any(p.endswith("notes.txt") for p, _ in ds.samples)


def test_image_folder_corrupt_file(folder):
    good = (folder / "cat" / "a.png").read_bytes()
    (folder / "cat" / "broken.png").write_bytes(good[: len(good) // 3])  # truncated PNG
    ds = ImageFolder(folder_params(folder))  # found only when loaded (check_files is off)
    idx = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("broken.png")][0]
    with pytest.raises(DataError, match="broken.png"):
        ds[idx]
    with pytest.raises(DataError, match="broken.png"):
        ImageFolder(folder_params(folder, check_files=True))

    ds = ImageFolder(folder_params(folder, skip_bad=True))
    with pytest.warns(DataWarning, match="broken.png"):
        x, y = ds[idx]
    nxt = (idx + 1) % len(ds)
    assert torch.equal(x, ds[nxt][0]) and y == ds[nxt][1]  # replaced by the next good sample
    assert any(p.endswith("broken.png") for p in ds.bad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once only
        assert torch.equal(ds[idx][0], x)

    with pytest.warns(DataWarning, match="broken.png"):
        checked = ImageFolder(folder_params(folder, skip_bad=True, check_files=True))
    assert len(checked) == 10


def test_image_folder_eval_root(tmp_path, folder):
    other = tmp_path / "eval"
    for name, colour in COLOURS.items():
        _write(other / name / "e.png", colour)
    p = folder_params(folder, eval_root=str(other))
    assert len(ImageFolder(p, split="train")) == 10 and len(ImageFolder(p, split="eval")) == 3
    assert len(ImageFolder(folder_params(folder), split="eval")) == 10
