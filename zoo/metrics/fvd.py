"""``fvd``: Fréchet Video Distance in I3D features, the StyleGAN-V (Skorokhodov et al. 2022) / cd-fvd (Ge et al.
2024, songweige/content-debiased-fvd) protocol, from a LOCAL safetensors state dict.

Network: the Inception-v1 I3D of Carreira & Zisserman 2017 (400 Kinetics classes), in the PyTorch layout of
piergiaj/pytorch-i3d that cd-fvd ships (``i3d_pretrained_400.pt``; module names ``Conv3d_1a_7x7``,
``Mixed_3b.b1b.conv3d``, ``logits.conv3d``...), so that file converts key for key
(``python -m runtime.convert detector i3d SRC --out i3d.safetensors``). Convolutions and max pools use TF's
"SAME" padding (output ``ceil(in / stride)``, the pad split ``p // 2`` before, the rest after, zeros); every
convolution but the logits is conv (no bias) -> batch norm (eps 1e-5) -> ReLU. Head: average pool ``(2, 7, 7)``
stride 1, a 1x1x1 convolution with bias to 400, spatial squeeze, mean over the remaining time steps.

Protocol (StyleGAN-V ``compute_fvd``; cd-fvd ``preprocess_i3d`` + ``get_i3d_logits``): clips of the first 16
frames, quantised to uint8 like saved videos, each frame resized to 224 x 224 (bilinear, ``align_corners=False``,
no antialiasing), scaled to [-1, 1] (``2 x / 255 - 1``), grey repeated to RGB; the features are the 400 logits;
FVD = Fréchet distance of Gaussian fits of the generated and real features (:mod:`zoo.metrics.frechet`).
StyleGAN-V's ``fvd2048_16f`` hands uint8 clips to its TorchScript detector with ``rescale=True, resize=True,
return_features=True`` (the same 400 logits); that resize happens inside the archive, so the explicit
preprocessing here is cd-fvd's.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from registry.kinds import METRICS
from storage.safe_state import load_state_strict
from zoo.core.params import ZooParams
from zoo.core.protocols import Metric
from zoo.metrics.frechet import feature_stats, frechet_distance

NUM_FRAMES = 16     # StyleGAN-V / cd-fvd: 16-frame clips
RESOLUTION = 224    # cd-fvd TARGET_RESOLUTION
NUM_CLASSES = 400   # Kinetics-400


def same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding of one axis: ``(before, after)`` so that the output has ``ceil(size / stride)`` steps."""
    total = max(kernel - (stride if size % stride == 0 else size % stride), 0)
    return total // 2, total - total // 2


def _pad3d(x: Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> Tensor:
    (pt, pt2), (ph, ph2), (pw, pw2) = (same_pad(s, k, st) for s, k, st in zip(x.shape[2:], kernel, stride))
    return F.pad(x, (pw, pw2, ph, ph2, pt, pt2))


class Unit3D(nn.Module):
    """SAME-padded Conv3d (``conv3d``), optional BatchNorm3d (``bn``), optional ReLU: ``(B, Cin, T, H, W) -> (B, Cout,
    ceil(T/st), ceil(H/sh), ceil(W/sw))``."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int, int] = (1, 1, 1),
                 stride: tuple[int, int, int] = (1, 1, 1), norm: bool = True, relu: bool = True, bias: bool = False):
        super().__init__()
        self.kernel, self.stride, self.relu = kernel, stride, relu
        self.conv3d = nn.Conv3d(cin, cout, kernel, stride, padding=0, bias=bias)
        self.bn = nn.BatchNorm3d(cout, eps=1e-5, momentum=0.001) if norm else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv3d(_pad3d(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.relu else x


class SamePool(nn.Module):
    """Max pool with TF "SAME" zero padding (no parameters)."""

    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool3d(_pad3d(x, self.kernel, self.stride), self.kernel, self.stride)


class Mixed(nn.Module):
    """An Inception block: ``b0`` 1x1; ``b1a`` 1x1 -> ``b1b`` 3x3x3; ``b2a`` 1x1 -> ``b2b`` 3x3x3; 3x3x3 max pool ->
    ``b3b`` 1x1; concatenated on channels (``c[0] + c[2] + c[4] + c[5]``)."""

    def __init__(self, cin: int, c: tuple[int, int, int, int, int, int]):
        super().__init__()
        self.b0 = Unit3D(cin, c[0])
        self.b1a, self.b1b = Unit3D(cin, c[1]), Unit3D(c[1], c[2], (3, 3, 3))
        self.b2a, self.b2b = Unit3D(cin, c[3]), Unit3D(c[3], c[4], (3, 3, 3))
        self.b3a, self.b3b = SamePool((3, 3, 3), (1, 1, 1)), Unit3D(cin, c[5])

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], 1)


_BLOCKS: list[tuple[str, int, tuple[int, ...]]] = [
    ("Mixed_3b", 192, (64, 96, 128, 16, 32, 32)), ("Mixed_3c", 256, (128, 128, 192, 32, 96, 64)),
    ("Mixed_4b", 480, (192, 96, 208, 16, 48, 64)), ("Mixed_4c", 512, (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", 512, (128, 128, 256, 24, 64, 64)), ("Mixed_4e", 512, (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", 528, (256, 160, 320, 32, 128, 128)), ("Mixed_5b", 832, (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", 832, (384, 192, 384, 48, 128, 128)),
]


class I3D(nn.Module):
    """Inception-v1 I3D: ``forward(x (B, 3, T, 224, 224) in [-1, 1]) -> logits (B, num_classes)``; T >= 9 (the
    temporal size must reach 2 at the head's pool)."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.MaxPool3d_2a_3x3 = SamePool((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.MaxPool3d_3a_3x3 = SamePool((1, 3, 3), (1, 2, 2))
        for name, cin, c in _BLOCKS[:2]:
            self.add_module(name, Mixed(cin, c))
        self.MaxPool3d_4a_3x3 = SamePool((3, 3, 3), (2, 2, 2))
        for name, cin, c in _BLOCKS[2:7]:
            self.add_module(name, Mixed(cin, c))
        self.MaxPool3d_5a_2x2 = SamePool((2, 2, 2), (2, 2, 2))
        for name, cin, c in _BLOCKS[7:]:
            self.add_module(name, Mixed(cin, c))
        self.logits = Unit3D(1024, num_classes, norm=False, relu=False, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        for module in self.children():
            if module is self.logits:
                break
            x = module(x)
        x = F.avg_pool3d(x, (2, 7, 7), (1, 1, 1))          # (B, 1024, T', 1, 1)
        return self.logits(x).squeeze(4).squeeze(3).mean(2)


def i3d_input(video: Tensor, num_frames: int = NUM_FRAMES, size: int = RESOLUTION) -> Tensor:
    """Video ``(B, C, T, H, W)`` in [-1, 1], C in {1, 3}, T >= num_frames -> the I3D input ``(B, 3, num_frames,
    size, size)``: the first ``num_frames`` frames quantised to uint8 (``clamp(127.5 x + 128, 0, 255)`` truncated,
    as saved samples), bilinear resize (no antialias), ``2 x / 255 - 1``."""
    if video.dim() != 5 or video.shape[1] not in (1, 3):
        raise ValueError(f"fvd needs video (B, C, T, H, W) with C = 1 or 3, got {tuple(video.shape)}")
    if video.shape[2] < num_frames:
        raise ValueError(f"fvd needs clips of at least {num_frames} frames (the protocol's clip length), got "
                         f"{video.shape[2]}")
    v = torch.clamp(127.5 * video[:, :, :num_frames].float() + 128.0, 0, 255).to(torch.uint8).float()
    b, c, t, h, w = v.shape
    frames = v.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    if (h, w) != (size, size):
        frames = F.interpolate(frames, size=(size, size), mode="bilinear", align_corners=False)
    frames = frames.reshape(b, t, c, size, size).permute(0, 2, 1, 3, 4)
    return (2.0 * frames / 255.0 - 1.0).expand(-1, 3, -1, -1, -1)


_NETS: dict[tuple, I3D] = {}


def load_i3d(weights: str | None, device: torch.device | str = "cpu") -> I3D:
    """I3D from a local safetensors state dict (strict); ``None`` = random initialisation (tests only). Cached."""
    key = (str(weights), str(device))
    if key not in _NETS:
        net = I3D() if weights is None else load_state_strict(
            I3D(), weights, "I3D", "see README 'Evaluating like the papers'; convert with "
                                   "`python -m runtime.convert detector i3d`")
        _NETS[key] = net.eval().to(device)
    return _NETS[key]


@torch.no_grad()
def i3d_features(video: Tensor, weights: str | None, device: torch.device | str = "cpu", batch_size: int = 16,
                 num_frames: int = NUM_FRAMES) -> Tensor:
    """Video ``(B, C, T, H, W)`` in [-1, 1] -> I3D logits ``(B, 400)`` float32 on the CPU."""
    net = load_i3d(weights, device)
    out = [net(i3d_input(v, num_frames).to(device)).float().cpu() for v in video.split(batch_size)]
    return torch.cat(out)


def stack_samples(items: list[Any]) -> Any:
    """Data samples (tensors, or dicts of tensors by stream) -> one batch (a tensor or a dict of batches)."""
    if isinstance(items[0], dict):
        return {k: torch.stack([torch.as_tensor(x[k]) for x in items]) for k in items[0]}
    return torch.stack([torch.as_tensor(x) for x in items])


def _video_of(samples: Any) -> Tensor:
    if isinstance(samples, dict):
        if "video" not in samples:
            raise ValueError(f"fvd needs a 'video' stream, the samples have {sorted(samples)}")
        return samples["video"]
    return samples


class FVDParams(ZooParams):
    """Fréchet Video Distance (I3D logits, StyleGAN-V / cd-fvd protocol) on the video stream."""

    type: Literal["fvd"] = Field(..., description="FVD in Kinetics-400 I3D logits (16-frame clips at 224 px).")
    weights: str | None = Field(..., description="Local I3D state dict (.safetensors; `python -m runtime.convert detector "
                                                 "i3d` writes it from cd-fvd's i3d_pretrained_400.pt or StyleGAN-V's "
                                                 "i3d_torchscript.pt); null = random init, tests only.")
    reference: str | None = Field(None, description="npz with `mu_i3d`, `sigma_i3d` (or `i3d` features) of real clips; "
                                                    "null = num_real eval-split clips.")
    num_real: int = Field(2048, ge=2, description="Eval-split clips for the reference when reference is null "
                                                  "(StyleGAN-V / cd-fvd: 2048).")
    num_frames: int = Field(NUM_FRAMES, ge=9, description="Frames per clip (the protocol: 16).")
    batch_size: int = Field(16, gt=0, description="Clips per I3D pass.")

    def problems(self, spec: Any) -> Iterable[tuple[str, str]]:
        data = spec.data.data_space()
        shape = data.sample_shape()
        video = shape.get("video") if isinstance(shape, dict) else shape
        if not (isinstance(video, tuple) and len(video) == 4):
            yield "type", f"fvd needs video (C, T, H, W) samples, got {shape}"
        elif video[1] < self.num_frames:
            yield "num_frames", f"clips have {video[1]} frames, fewer than num_frames = {self.num_frames}"


@METRICS.register
class FVD(Metric):
    """``metric(samples (N, C, T, H, W) or {"video": ...}, labels ignored) -> {"fvd": float >= 0}``."""

    Params = FVDParams
    higher_is_better = False
    _refs: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def __init__(self, params: FVDParams, data_params: Any, device: torch.device | str = "cpu", **deps: Any):
        self.params, self.data_params, self.device = params, data_params.data_space(), device

    def sample_features(self, samples: Any, labels: Tensor | None) -> dict[str, Tensor]:
        """``{"i3d": (B, 400) float32}``."""
        p = self.params
        return {"i3d": i3d_features(_video_of(samples), p.weights, self.device, p.batch_size, p.num_frames)}

    def reference(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mu (400,), sigma (400, 400))`` of the real clips (cached per process)."""
        p = self.params
        key = (p.weights, p.reference, p.num_real, p.num_frames, self.data_params.model_dump_json())
        if key not in FVD._refs:
            if p.reference is not None:
                with np.load(p.reference, allow_pickle=False) as z:
                    FVD._refs[key] = ((z["mu_i3d"], z["sigma_i3d"]) if "mu_i3d" in z.files
                                      else feature_stats(z["i3d"]))
            else:
                from registry.kinds import DATASETS

                ds = DATASETS.build(self.data_params, split="eval")
                n = min(p.num_real, len(ds))
                feats = [self.sample_features(stack_samples([ds[j][0] for j in range(i, min(n, i + p.batch_size))]),
                                              None)["i3d"] for i in range(0, n, p.batch_size)]
                FVD._refs[key] = feature_stats(torch.cat(feats))
        return FVD._refs[key]

    def from_features(self, features: dict[str, Tensor], labels: Tensor | None) -> dict[str, float]:
        f = features["i3d"].double()
        if not torch.isfinite(f).all():
            return {"fvd": math.nan}
        mu, sigma = feature_stats(f)
        return {"fvd": frechet_distance(mu, sigma, *self.reference())}

    def __call__(self, samples: Any, labels: Tensor | None = None) -> dict[str, float]:
        return self.from_features(self.sample_features(samples, labels), labels)
