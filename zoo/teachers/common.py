"""Pieces shared by the teacher entries (frozen external encoders, REPA's targets).

* :func:`read_state_dict` / :func:`check_state_dict`: read a local weights file (``.safetensors`` or a torch
  pickle loaded with ``weights_only=True``) and compare it with a module, naming the first key that does not
  fit. Nothing is ever downloaded: a missing file is a :class:`FileNotFoundError` naming the expected path.
* :func:`imagenet_input`: data-space images ``(B, C, H, W)`` in [-1, 1] -> ImageNet-normalised RGB
  ``(B, 3, h, w)`` (grey repeated to RGB, then resized).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsMismatch(ValueError):
    """A weights file whose keys or shapes do not fit the module; the message names the first bad key."""


def image_problems(spec: Any, who: str) -> list[tuple[str, str]]:
    """Image teachers read ``(C, H, W)`` data with C = 1 (grey, repeated to RGB) or 3 (a problem at the teacher)."""
    shape = tuple(spec.data.sample_shape())
    if len(shape) != 3 or shape[0] not in (1, 3):
        return [("", f"{who} reads images (C, H, W) with C = 1 or 3; the data gives {shape}")]
    return []


def imagenet_input(raw: Tensor, size: tuple[int, int] | None, *, resize_first: bool = False,
                   mode: str = "bicubic", antialias: bool = False, mean: tuple[float, ...] = IMAGENET_MEAN,
                   std: tuple[float, ...] = IMAGENET_STD) -> Tensor:
    """``raw`` ``(B, C, H, W)`` in [-1, 1], C in {1, 3} -> ``(B, 3, *size)`` float32, ``(x - mean) / std`` on
    [0, 1] pixels.

    REPA's order (``preprocess_raw_image``): normalise, then resize (bicubic, no antialias); with
    ``resize_first`` the resize comes first. ``size`` None keeps the input size; ``mode``/``antialias`` go to
    ``F.interpolate``.
    """
    if raw.dim() != 4 or raw.shape[1] not in (1, 3):
        raise ValueError(f"teacher input must be images (B, C, H, W) with C = 1 or 3; got {tuple(raw.shape)}")
    x = (raw.float() + 1.0) * 0.5                                           # [-1, 1] -> [0, 1]
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    resize = size is not None and tuple(x.shape[-2:]) != tuple(size)
    kw: dict[str, Any] = {"align_corners": False, "antialias": antialias} if mode in ("bilinear", "bicubic") else {}
    if resize and resize_first:
        x = F.interpolate(x, size=tuple(size), mode=mode, **kw)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    x = (x - m) / s
    if resize and not resize_first:
        x = F.interpolate(x, size=tuple(size), mode=mode, **kw)
    return x


# ------------------------------------------------------------------------------------------- weights
def read_state_dict(path: str | Path, who: str, expected: str) -> dict[str, Tensor]:
    """Tensors of a local weights file: ``.safetensors`` via safetensors, anything else via
    ``torch.load(weights_only=True)`` (a dict of tensors, or one under ``"state_dict"`` / ``"model"``).

    Raises FileNotFoundError naming ``path`` and what was ``expected`` there; nothing is downloaded.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{who}: weights file not found: {p} (expected {expected}); nothing is downloaded, "
                                f"put the file there or change the path in the spec")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: Any = load_file(str(p))
    else:
        try:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as e:  # pickle that needs code, or not a torch file at all
            raise WeightsMismatch(f"{who}: cannot read {p} with torch.load(weights_only=True): {e}") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
    if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise WeightsMismatch(f"{who}: {p} does not hold a state dict (a mapping of names to tensors)")
    return dict(sd)


def strip_prefix(sd: dict[str, Tensor], prefixes: tuple[str, ...] = ("module.", "backbone.")) -> dict[str, Tensor]:
    """Drop a wrapper prefix (DDP ``module.``, ``backbone.``) when every key carries it."""
    for pre in prefixes:
        if sd and all(k.startswith(pre) for k in sd):
            sd = {k[len(pre):]: v for k, v in sd.items()}
    return sd


def check_state_dict(module: nn.Module, sd: Mapping[str, Tensor], who: str, path: str | Path,
                     optional: tuple[str, ...] = ()) -> None:
    """Raise :class:`WeightsMismatch` unless ``sd`` has exactly the module's keys with the module's shapes.

    The message names the first mismatching key in the module's own key order (missing or wrong shape),
    else the first key of the file the module does not have. Keys in ``optional`` may be absent.
    """
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = [k for k in want if k not in sd and k not in optional]
    bad_shape = [k for k in want if k in sd and tuple(sd[k].shape) != want[k]]
    unexpected = [k for k in sd if k not in want]
    first = next((k for k in want if k in missing or k in bad_shape), None)
    if first is not None:
        what = ("is missing from the file" if first in missing else
                f"has shape {tuple(sd[first].shape)} in the file but the model expects {want[first]}")
    elif unexpected:
        first, what = unexpected[0], "is in the file but not in the model"
    else:
        return
    raise WeightsMismatch(
        f"{who}: {path} does not fit the model: first mismatching key {first!r} {what} "
        f"({len(missing)} missing, {len(bad_shape)} wrong shape, {len(unexpected)} unexpected); check the preset "
        f"and fields against the checkpoint")


def load_checked(module: nn.Module, sd: Mapping[str, Tensor], who: str, path: str | Path,
                 optional: tuple[str, ...] = ()) -> None:
    """:func:`check_state_dict`, then copy the tensors in (dtype converted to the module's)."""
    check_state_dict(module, sd, who, path, optional)
    module.load_state_dict(dict(sd), strict=not optional)


def frozen(module: nn.Module) -> nn.Module:
    """Eval mode, no gradients."""
    return module.eval().requires_grad_(False)


class ImageTeacher(nn.Module):
    """Base of the image encoders: checks the data is ``(C, H, W)`` with C = 1 or 3 and keeps the generator's
    token grid; ``grid`` is the output patch grid when it is fixed (an ``image_size`` or a token grid given at
    build), else None (then ``features(..., grid=...)`` gives it per call)."""

    def __init__(self, params: Any, who: str, input_shape: tuple[int, ...] | None,
                 token_grid: tuple[int, ...] | None):
        super().__init__()
        if input_shape is not None and (len(input_shape) != 3 or input_shape[0] not in (1, 3)):
            raise ValueError(f"teacher {who!r} reads images (C, H, W) with C = 1 or 3; got input_shape {input_shape}")
        self.params = params
        self.token_grid = tuple(int(g) for g in token_grid) if token_grid is not None else None

    @property
    def grid(self) -> tuple[int, int] | None:
        if self.params.image_size is None and self.token_grid is None:
            return None
        return self.params.feature_grid(None, self.token_grid)
