"""``fad``: Fréchet Audio Distance in VGGish embeddings, the fadtk protocol (Gui et al. 2024, microsoft/fadtk,
model ``vggish``), from a LOCAL safetensors state dict.

Network: VGGish (Hershey et al. 2017) in the layout of harritaylor/torchvggish (the port fadtk loads):
``features`` = conv3x3 64, pool, 128, pool, 256, 256, pool, 512, 512, pool (ReLU after every convolution;
keys ``features.{0,3,6,8,11,13}``), then the ``(B, 512, 6, 4)`` map flattened in TF's (H, W, C) order into
``embeddings`` = Linear 12288 -> 4096, ReLU, 4096 -> 4096, ReLU, 4096 -> 128 (keys ``embeddings.{0,2,4}``).
fadtk drops the final ReLU and the PCA/quantisation post-processing: the 128-d embedding is the last linear layer's
output. torchvggish's ``vggish-10086976.pth`` converts key for key (``python -m runtime.convert detector vggish``).

Frontend (torchvggish ``vggish_input.waveform_to_examples`` / ``mel_features``, constants of ``vggish_params``):
mono audio in [-1, 1] at 16 kHz (other rates are resampled with ``scipy.signal.resample_poly``; torchvggish uses
resampy, which differs slightly: data at 16 kHz is untouched), clips shorter than 1 s zero-padded to 1 s (fadtk's
``min_len`` for VGGish); STFT magnitude with a 400-sample (25 ms) periodic Hann window, hop 160 (10 ms), FFT 512;
64 HTK-mel bands (``1127 ln(1 + f / 700)``) between 125 and 7500 Hz, triangular weights on the 257 bin
frequencies ``linspace(0, 8000, 257)``, the DC bin zeroed; ``log(mel + 0.01)``; patches of 96 frames (0.96 s),
hop 96, incomplete ones dropped. Computed in float64 (as the numpy original), fed to the network in float32.

FAD (fadtk ``calc_frechet_distance``): Fréchet distance between Gaussian fits (mean, ``np.cov`` with ddof 1) of
ALL patch embeddings of the generated and of the real clips (:mod:`zoo.metrics.frechet`; fadtk takes the matrix
square root with ``scipy.linalg.sqrtm``, equal up to round-off).
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from registry.kinds import METRICS
from storage.safe_state import load_state_strict
from zoo.core.params import ZooParams
from zoo.core.protocols import Metric
from zoo.metrics.frechet import feature_stats, frechet_distance
from zoo.metrics.fvd import stack_samples

SAMPLE_RATE = 16000
WINDOW_S, HOP_S = 0.025, 0.010
NUM_BANDS, MEL_MIN_HZ, MEL_MAX_HZ = 64, 125.0, 7500.0
LOG_OFFSET = 0.01
PATCH_FRAMES = 96        # 0.96 s of 10 ms frames, hop 0.96 s
EMBEDDING_SIZE = 128
MIN_SECONDS = 1.0        # fadtk VGGishModel(min_len=1)


def hertz_to_mel(f: Tensor) -> Tensor:
    """HTK mel scale: ``1127 ln(1 + f / 700)``."""
    return 1127.0 * torch.log1p(f / 700.0)


def mel_matrix(num_bins: int = 257, sample_rate: int = SAMPLE_RATE, bands: int = NUM_BANDS,
               low: float = MEL_MIN_HZ, high: float = MEL_MAX_HZ) -> Tensor:
    """``(num_bins, bands)`` float64 triangular mel weights; row 0 (DC) zero."""
    bins_mel = hertz_to_mel(torch.linspace(0.0, sample_rate / 2, num_bins, dtype=torch.float64))
    edges = torch.linspace(float(hertz_to_mel(torch.tensor(low, dtype=torch.float64))),
                           float(hertz_to_mel(torch.tensor(high, dtype=torch.float64))), bands + 2, dtype=torch.float64)
    lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]
    up = (bins_mel[:, None] - lo) / (mid - lo)
    down = (hi - bins_mel[:, None]) / (hi - mid)
    w = torch.clamp(torch.minimum(up, down), min=0.0)
    w[0] = 0.0
    return w


def log_mel(wave: Tensor) -> Tensor:
    """16 kHz mono ``(L,)`` -> ``(frames, 64)`` float64 log-mel, ``frames = 1 + (L - 400) // 160``."""
    win, hop = round(SAMPLE_RATE * WINDOW_S), round(SAMPLE_RATE * HOP_S)
    n_fft = 2 ** math.ceil(math.log2(win))
    x = wave.to(torch.float64)
    frames = x.unfold(0, win, hop)                                            # (F, 400)
    hann = 0.5 - 0.5 * torch.cos(2 * math.pi / win * torch.arange(win, dtype=torch.float64))  # periodic
    mag = torch.fft.rfft(frames * hann, n_fft).abs()                          # (F, 257)
    return torch.log(mag @ mel_matrix(mag.shape[1]) + LOG_OFFSET)


def resample(audio: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """``(..., L)`` at ``rate`` -> ``target`` (polyphase, scipy); unchanged when the rates are equal."""
    if rate == target:
        return audio
    try:
        from scipy.signal import resample_poly
    except ImportError:
        raise ImportError(f"fad: audio at {rate} Hz must be resampled to {target} Hz with scipy, which is not "
                          f"installed (`pip install scipy`, or the `eval` extra)") from None

    g = math.gcd(int(rate), int(target))
    return resample_poly(audio, target // g, int(rate) // g, axis=-1)


def vggish_examples(audio: Tensor, rate: int) -> Tensor:
    """Clips ``(B, L)`` or ``(B, C, L)`` in [-1, 1] at ``rate`` Hz -> patches ``(B, P, 1, 96, 64)`` float32
    (channels averaged; every clip of a batch has the same length, hence the same ``P``)."""
    a = audio.detach().to("cpu", torch.float64)
    if a.dim() == 3:
        a = a.mean(1)
    if a.dim() != 2:
        raise ValueError(f"fad needs audio (B, L) or (B, C, L), got {tuple(audio.shape)}")
    a = torch.from_numpy(np.ascontiguousarray(resample(a.numpy(), rate)))
    need = int(MIN_SECONDS * SAMPLE_RATE)
    if a.shape[1] < need:
        a = torch.nn.functional.pad(a, (0, need - a.shape[1]))
    out = []
    for clip in a:
        m = log_mel(clip)                                                     # (F, 64)
        p = m.shape[0] // PATCH_FRAMES
        out.append(m[: p * PATCH_FRAMES].reshape(p, 1, PATCH_FRAMES, NUM_BANDS))
    return torch.stack(out).float()


class VGGish(nn.Module):
    """``forward(patches (N, 1, 96, 64)) -> (N, 128)`` embeddings (fadtk: no final ReLU, no PCA)."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1
        for v in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, int(v), 3, padding=1), nn.ReLU(inplace=True)]
                cin = int(v)
        self.features = nn.Sequential(*layers)
        self.embeddings = nn.Sequential(nn.Linear(512 * 4 * 6, 4096), nn.ReLU(True), nn.Linear(4096, 4096),
                                        nn.ReLU(True), nn.Linear(4096, EMBEDDING_SIZE))

    def forward(self, x: Tensor) -> Tensor:
        f = self.features(x)                                   # (N, 512, 6, 4)
        return self.embeddings(f.permute(0, 2, 3, 1).flatten(1))  # TF order (H, W, C)


_NETS: dict[tuple, VGGish] = {}


def load_vggish(weights: str | None, device: torch.device | str = "cpu") -> VGGish:
    """VGGish from a local safetensors state dict (strict); ``None`` = random init (tests only). Cached."""
    key = (str(weights), str(device))
    if key not in _NETS:
        net = VGGish() if weights is None else load_state_strict(
            VGGish(), weights, "VGGish", "see README 'Evaluating like the papers'; convert with "
                                         "`python -m runtime.convert detector vggish`")
        _NETS[key] = net.eval().to(device)
    return _NETS[key]


@torch.no_grad()
def vggish_features(audio: Tensor, rate: int, weights: str | None, device: torch.device | str = "cpu",
                    batch_size: int = 64) -> Tensor:
    """Clips ``(B, [C,] L)`` at ``rate`` -> embeddings ``(B, P, 128)`` float32 on the CPU (P patches per clip)."""
    ex = vggish_examples(audio, rate)
    b, p = ex.shape[:2]
    if p == 0:
        return torch.zeros(b, 0, EMBEDDING_SIZE)
    net = load_vggish(weights, device)
    flat = ex.flatten(0, 1)
    emb = torch.cat([net(c.to(device)).float().cpu() for c in flat.split(batch_size)])
    return emb.reshape(b, p, EMBEDDING_SIZE)


class FADParams(ZooParams):
    """Fréchet Audio Distance (VGGish, fadtk protocol) on the audio stream."""

    type: Literal["fad"] = Field(..., description="FAD in VGGish embeddings (fadtk protocol: 16 kHz, 0.96 s patches).")
    weights: str | None = Field(..., description="Local VGGish state dict (.safetensors; `python -m runtime.convert "
                                                 "detector vggish` writes it from torchvggish's vggish-10086976.pth); "
                                                 "null = random init, tests only.")
    reference: str | None = Field(None, description="npz with `mu_vggish`, `sigma_vggish` (or `vggish` embeddings "
                                                    "(M, 128)) of real audio; null = num_real eval-split clips.")
    num_real: int = Field(2000, ge=2, description="Eval-split clips for the reference when reference is null.")
    batch_size: int = Field(64, gt=0, description="Patches per VGGish pass.")

    def problems(self, spec: Any) -> Iterable[tuple[str, str]]:
        data = spec.data.data_space()
        if "audio" not in data.stream_rates():
            yield "type", f"fad needs an audio stream, the data has {sorted(data.stream_rates())}"


@METRICS.register
class FAD(Metric):
    """``metric(samples (N, [C,] L) or {"audio": ...}, labels ignored) -> {"fad": float >= 0}``."""

    Params = FADParams
    higher_is_better = False
    _refs: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def __init__(self, params: FADParams, data_params: Any, device: torch.device | str = "cpu", **deps: Any):
        self.params, self.data_params, self.device = params, data_params.data_space(), device
        rates = self.data_params.stream_rates()
        if "audio" not in rates:
            raise ValueError(f"fad needs an audio stream, the data has {sorted(rates)}")
        self.rate = int(rates["audio"])

    def _audio(self, samples: Any) -> Tensor:
        if isinstance(samples, dict):
            if "audio" not in samples:
                raise ValueError(f"fad needs an 'audio' stream, the samples have {sorted(samples)}")
            return samples["audio"]
        return samples

    def sample_features(self, samples: Any, labels: Tensor | None) -> dict[str, Tensor]:
        """``{"vggish": (B, P, 128) float32}``, P patches of 0.96 s per clip."""
        p = self.params
        return {"vggish": vggish_features(self._audio(samples), self.rate, p.weights, self.device, p.batch_size)}

    def reference(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mu (128,), sigma (128, 128))`` of the real audio's patch embeddings (cached per process)."""
        p = self.params
        key = (p.weights, p.reference, p.num_real, self.data_params.model_dump_json())
        if key not in FAD._refs:
            if p.reference is not None:
                with np.load(p.reference, allow_pickle=False) as z:
                    FAD._refs[key] = ((z["mu_vggish"], z["sigma_vggish"]) if "mu_vggish" in z.files
                                      else feature_stats(z["vggish"]))
            else:
                from registry.kinds import DATASETS

                ds = DATASETS.build(self.data_params, split="eval")
                n, bs = min(p.num_real, len(ds)), 64
                feats = [self.sample_features(stack_samples([ds[j][0] for j in range(i, min(n, i + bs))]),
                                              None)["vggish"] for i in range(0, n, bs)]
                FAD._refs[key] = feature_stats(torch.cat(feats).flatten(0, 1))
        return FAD._refs[key]

    def from_features(self, features: dict[str, Tensor], labels: Tensor | None) -> dict[str, float]:
        f = features["vggish"].double().flatten(0, 1)
        if not torch.isfinite(f).all():
            return {"fad": math.nan}
        mu, sigma = feature_stats(f)
        return {"fad": frechet_distance(mu, sigma, *self.reference())}

    def __call__(self, samples: Any, labels: Tensor | None = None) -> dict[str, float]:
        return self.from_features(self.sample_features(samples, labels), labels)
