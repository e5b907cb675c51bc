"""The image metrics the papers report: ``fid``, ``sfid``, ``inception_score``, ``precision_recall`` (the ADM
evaluator's suite, openai/guided-diffusion ``evaluations/evaluator.py``) and ``fd_dinov2`` (Stein et al. 2023,
"Exposing flaws of generative model evaluation metrics", layer6ai-labs/dgm-eval), from LOCAL weights files.

Inception network: torch-fidelity's ``FeatureExtractorInceptionV3`` (the TF-ported FID Inception of
pytorch-fid / torch-fidelity / clean-fid, weights ``pt_inception-2015-12-05-6726825d.pth``), built from the path
given (``feature_extractor_weights_path``). Chosen over torchmetrics' ``FrechetInceptionDistance`` because
torchmetrics 1.9 wraps the same network but resizes with antialiasing by default, while torch-fidelity's own
forward resizes to 299 x 299 with its TF1-compatible bilinear rule, as the TF graph the ADM evaluator runs does; and
over a copy of our own because the library is maintained and already matches that graph. torch-fidelity's
package ``__init__`` imports torchvision (for its CLIP extractor); where no torchvision matches the installed
torch, :func:`fidelity_inception_class` imports the Inception module alone. The file is first read with
``torch.load(weights_only=True)`` (torch-fidelity loads it with ``weights_only=False``), so a file that is not a
plain state dict is refused before any pickle code runs.

Inputs: samples in [-1, 1] are quantised like the PNGs/npz the papers evaluate (REPA / SiT ``sample_ddp.py``:
``clamp(127.5 x + 128, 0, 255)`` truncated to uint8); grey becomes RGB.

Features (one Inception pass gives all three): ``pool`` = pool3 ``(N, 2048)`` (FID, precision/recall);
``logits`` = the 1008-way logits without bias (``logits_unbiased``, the ADM ``softmax`` head) for IS;
``spatial`` = the first 7 channels of ``mixed_6/conv`` (torch-fidelity ``Mixed_6d.branch1x1``: TF's ``mixed_6``
is the fourth 17 x 17 block), flattened in TF's NHWC order ``(N, 17 * 17 * 7)`` for sFID.

Formulas (ADM evaluator): FID / sFID = Fréchet distance of the Gaussian fits (:mod:`zoo.metrics.frechet`);
IS = mean over splits of 5000 of ``exp(mean_i KL(p_i || mean p))``; precision / recall = Kynkäänniemi et al.
2019 k-NN manifolds with k = 3 on squared Euclidean distances: a sample counts for precision when it lies within
the k-th-neighbour radius of some reference feature, a reference feature counts for recall when it lies within
the radius of some sample.

Reference statistics: the ADM reference batch layout (``VIRTUAL_imagenet256_labeled.npz``): ``mu``, ``sigma``
(pool3), ``mu_s``, ``sigma_s`` (spatial), ``arr_0`` (uint8 images ``(N, H, W, 3)``, from which precision/recall
reads the reference features); files written by ``python -m runtime.evaluate --reference`` add ``pool``
(the reference pool3 features) and, with DINOv2, ``mu_dinov2``, ``sigma_dinov2``. ``reference: null`` computes
the statistics from ``num_real`` samples of the data's eval split instead (once per process).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any, Iterable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from registry.kinds import METRICS
from zoo.core.params import ZooParams
from zoo.core.protocols import Metric
from zoo.metrics.frechet import feature_stats, frechet_distance

IS_SPLIT = 5000       # ADM evaluator: compute_inception_score(split_size=5000)
PR_K = 3              # ADM evaluator: ManifoldEstimator(nhood_sizes=[3])
SPATIAL_CHANNELS = 7  # ADM evaluator: spatial[..., :7] of mixed_6/conv


# ------------------------------------------------------------------------------------------ inputs
def quantize(x: Tensor) -> Tensor:
    """``(N, C, H, W)`` in [-1, 1], C in {1, 3} -> uint8 ``(N, 3, H, W)`` (REPA/SiT ``sample_ddp.py`` rounding)."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"image metrics need images (N, C, H, W) with C = 1 or 3, got {tuple(x.shape)}")
    q = torch.clamp(127.5 * x.float() + 128.0, 0, 255).to(torch.uint8)
    return q.expand(-1, 3, -1, -1) if q.shape[1] == 1 else q


# ------------------------------------------------------------------------------------------ Inception
def fidelity_inception_class() -> type:
    """torch-fidelity's ``FeatureExtractorInceptionV3``; imported without the package ``__init__`` (which needs
    torchvision for CLIP) when that fails."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        return FeatureExtractorInceptionV3
    except ModuleNotFoundError as e:
        if e.name == "torch_fidelity" or importlib.util.find_spec("torch_fidelity") is None:
            raise ModuleNotFoundError("the Inception metrics need torch-fidelity: pip install --no-deps "
                                      "torch-fidelity (its torchvision requirement is not used)") from e
    except (ImportError, RuntimeError):  # a torchvision that does not match this torch
        pass
    spec = importlib.util.find_spec("torch_fidelity")
    pkg = types.ModuleType("torch_fidelity")
    pkg.__path__ = list(spec.submodule_search_locations)  # type: ignore[union-attr]
    sys.modules["torch_fidelity"] = pkg
    return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3").FeatureExtractorInceptionV3


class InceptionFeatures(nn.Module):
    """The FID Inception from a local file: ``forward(uint8 (N, 3, H, W)) -> {"pool", "logits", "spatial"}``."""

    def __init__(self, weights: str):
        super().__init__()
        try:
            torch.load(weights, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"Inception weights not found: {weights} (pt_inception-2015-12-05-6726825d.pth, "
                                    "see README 'Evaluating like the papers')") from None
        except Exception as e:
            raise ValueError(f"{weights}: not a plain state dict ({e})") from e
        cls = fidelity_inception_class()
        self.net = cls("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=weights)
        self._spatial: Tensor | None = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module: nn.Module, inp: Any, out: Tensor) -> None:
        self._spatial = out[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(out.shape[0], -1)  # TF NHWC order

    @torch.no_grad()
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        pool, logits = self.net(images)
        return {"pool": pool.float(), "logits": logits.float(), "spatial": self._spatial.float()}


_EXTRACTORS: dict[tuple, Any] = {}


def get_inception(weights: str, device: torch.device | str) -> InceptionFeatures:
    key = ("inception", str(weights), str(device))
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = InceptionFeatures(weights).to(device)
    return _EXTRACTORS[key]


def _batched(fn, x: Tensor, batch_size: int, device: torch.device | str) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(0, x.shape[0], batch_size):
        for k, v in fn(x[i:i + batch_size].to(device)).items():
            parts.setdefault(k, []).append(v.detach().to("cpu", torch.float64).numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def inception_features(x: Tensor, weights: str, device: torch.device | str = "cpu",
                       batch_size: int = 100) -> dict[str, np.ndarray]:
    """Images in [-1, 1] -> ``{"pool" (N, 2048), "logits" (N, 1008), "spatial" (N, 2023)}`` float64."""
    return _batched(get_inception(weights, device), quantize(x), batch_size, device)


# ------------------------------------------------------------------------------------------ DINOv2
def build_dinov2(weights: str | None, preset: str, device: torch.device | str) -> nn.Module:
    """The project's ``vit`` teacher (DINOv2 architecture) at ``preset``; weights null = random (tests only)."""
    from registry.kinds import TEACHERS

    key = ("dinov2", str(weights), preset, str(device))
    if key not in _EXTRACTORS:
        params = TEACHERS.get("vit").Params.model_validate({"type": "vit", "preset": preset, "weights": weights})
        _EXTRACTORS[key] = TEACHERS.build(params, input_shape=(3, 224, 224)).to(device)
    return _EXTRACTORS[key]


def dinov2_input(images: Tensor, size: int = 224) -> Tensor:
    """uint8 ``(N, 3, H, W)`` -> the dgm-eval DINOv2 input: [0, 1], bicubic (antialiased) resize to ``size``,
    ImageNet mean/std."""
    from zoo.teachers.common import IMAGENET_MEAN, IMAGENET_STD

    x = images.float() / 255.0
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    m = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def dinov2_features(x: Tensor, weights: str | None, preset: str = "L/14", device: torch.device | str = "cpu",
                    batch_size: int = 100) -> np.ndarray:
    """Images in [-1, 1] -> DINOv2 CLS tokens after the final norm ``(N, width)`` float64 (the hub model's output)."""
    net = build_dinov2(weights, preset, device)

    @torch.no_grad()
    def fn(q: Tensor) -> dict[str, Tensor]:
        return {"cls": net.forward_tokens(dinov2_input(q).to(net.pos_embed.dtype))[:, 0].float()}

    return _batched(fn, quantize(x), batch_size, device)["cls"]


# ------------------------------------------------------------------------------------------ formulas
def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT) -> float:
    """ADM ``compute_inception_score``: softmax of the 1008 logits, mean over consecutive splits of
    ``split_size`` of ``exp(mean_i sum_c p_ic (log p_ic - log mean_j p_jc))``."""
    z = np.asarray(logits, np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i:i + split_size]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def _sq_dists(a: Tensor, b: Tensor) -> Tensor:
    """Squared Euclidean distances ``(len(a), len(b))`` (ADM: ``|u|^2 - 2 u.v + |v|^2``, clamped at 0)."""
    d = (a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None]
    return d.clamp_min(0)


def manifold_radii(feats: np.ndarray, k: int = PR_K, chunk: int = 4096) -> np.ndarray:
    """Squared distance of every feature to its k-th nearest other feature (index k of the sorted row: 0 = itself)."""
    f = torch.as_tensor(np.asarray(feats, np.float64))
    out = [torch.kthvalue(_sq_dists(f[i:i + chunk], f), k + 1, dim=1).values for i in range(0, len(f), chunk)]
    return torch.cat(out).numpy()


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = PR_K, chunk: int = 4096,
                     real_radii: np.ndarray | None = None) -> tuple[float, float]:
    """ADM ``compute_prec_recall``: precision = share of ``fake`` within some real feature's k-NN radius;
    recall = share of ``real`` within some fake feature's radius."""
    r = torch.as_tensor(np.asarray(real, np.float64))
    f = torch.as_tensor(np.asarray(fake, np.float64))
    rr = torch.as_tensor(manifold_radii(real, k, chunk) if real_radii is None else real_radii)
    fr = torch.as_tensor(manifold_radii(fake, k, chunk))
    fake_in = torch.zeros(len(f), dtype=torch.bool)
    real_in = torch.zeros(len(r), dtype=torch.bool)
    for i in range(0, len(r), chunk):
        d = _sq_dists(r[i:i + chunk], f)                       # (real chunk, fake)
        fake_in |= (d <= rr[i:i + chunk, None]).any(0)
        real_in[i:i + chunk] = (d <= fr[None]).any(1)
    return float(fake_in.double().mean()), float(real_in.double().mean())


# ------------------------------------------------------------------------------------------ references
def read_reference(path: str) -> dict[str, np.ndarray]:
    """An ADM reference batch (or a file written by ``runtime.evaluate --reference``) as a dict of arrays."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise FileNotFoundError(f"reference batch not found: {path}") from None


_REFERENCES: dict[tuple, dict[str, np.ndarray]] = {}


def reference_stats(params: "_ImageMetricParams", data_params: Any, device: torch.device | str,
                    need: str) -> dict[str, np.ndarray]:
    """The reference arrays a metric needs (``need``: "inception" or "dinov2"), from ``params.reference`` or
    from ``num_real`` eval-split samples of the data; cached per process."""
    key = (need, params.reference, getattr(params, "weights", None), getattr(params, "preset", None),
           params.num_real, data_params.model_dump_json(), str(device))
    if key in _REFERENCES:
        return _REFERENCES[key]
    if params.reference is not None:
        ref = read_reference(params.reference)
        if need == "inception" and "pool" not in ref and "arr_0" in ref and isinstance(params, _InceptionParams):
            imgs = torch.from_numpy(ref["arr_0"]).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # round-trips uint8
            ref["pool"] = inception_features(imgs, params.weights, device, params.batch_size)["pool"]
    else:
        from registry.kinds import DATASETS

        ds = DATASETS.build(data_params, split="eval")
        x = torch.stack([ds[i][0] for i in range(min(params.num_real, len(ds)))])
        ref = reference_arrays(x, inception=getattr(params, "weights", None) if need == "inception" else None,
                               dinov2=params.weights if need == "dinov2" else None,
                               dinov2_preset=getattr(params, "preset", "L/14"), device=device,
                               batch_size=params.batch_size, use_dinov2=need == "dinov2")
    _REFERENCES[key] = ref
    return ref


def reference_arrays(x: Tensor, inception: str | None = None, dinov2: str | None = None, dinov2_preset: str = "L/14",
                     device: torch.device | str = "cpu", batch_size: int = 100, use_dinov2: bool = False,
                     images: bool = False) -> dict[str, np.ndarray]:
    """ADM-layout reference arrays of images ``x`` in [-1, 1]: ``mu, sigma, mu_s, sigma_s, pool`` (with
    ``inception``), ``mu_dinov2, sigma_dinov2, dinov2`` (with ``dinov2`` or ``use_dinov2``), ``arr_0`` (``images``)."""
    out: dict[str, np.ndarray] = {}
    if inception is not None:
        f = inception_features(x, inception, device, batch_size)
        out["mu"], out["sigma"] = feature_stats(f["pool"])
        out["mu_s"], out["sigma_s"] = feature_stats(f["spatial"])
        out["pool"] = f["pool"]
    if dinov2 is not None or use_dinov2:
        d = dinov2_features(x, dinov2, dinov2_preset, device, batch_size)
        out["mu_dinov2"], out["sigma_dinov2"] = feature_stats(d)
        out["dinov2"] = d
    if images:
        out["arr_0"] = quantize(x).permute(0, 2, 3, 1).numpy()
    return out


# ------------------------------------------------------------------------------------------ entries
class _ImageMetricParams(ZooParams):
    reference: str | None = Field(None, description="Reference batch .npz in the ADM evaluator's layout (ImageNet 256: "
                                                    "VIRTUAL_imagenet256_labeled.npz) or written by `python -m "
                                                    "runtime.evaluate --reference`; null = num_real eval-split samples.")
    num_real: int = Field(2000, ge=4, description="Eval-split samples for the reference when reference is null.")
    batch_size: int = Field(100, gt=0, description="Images per feature-extractor pass.")

    def problems(self, spec: Any) -> Iterable[tuple[str, str]]:
        shape = spec.data.data_space().sample_shape()
        if not (isinstance(shape, tuple) and len(shape) == 3 and shape[0] in (1, 3)):
            yield "type", f"{self.type} needs images (C, H, W) with C = 1 or 3, got data samples {shape}"


class _InceptionParams(_ImageMetricParams):
    weights: str = Field(..., description="Local FID Inception state dict (pt_inception-2015-12-05-6726825d.pth, "
                                          "the file pytorch-fid / torch-fidelity download).")


class FIDParams(_InceptionParams):
    """Fréchet Inception Distance (pool3), the ADM evaluator's FID."""

    type: Literal["fid"] = Field(..., description="FID in the TF-ported Inception's pool3 features.")


class SFIDParams(_InceptionParams):
    """Spatial FID: Fréchet distance of the first 7 channels of mixed_6/conv (Nash et al. 2021; ADM evaluator)."""

    type: Literal["sfid"] = Field(..., description="sFID in mixed_6/conv[:7] spatial features.")


class InceptionScoreParams(_InceptionParams):
    """Inception Score of the samples (no reference needed), ADM's splits of 5000."""

    type: Literal["inception_score"] = Field(..., description="Inception Score (ADM evaluator: splits of 5000).")


class PrecisionRecallParams(_InceptionParams):
    """Improved precision and recall (k-NN manifolds, k = 3) in pool3 features."""

    type: Literal["precision_recall"] = Field(..., description="k-NN precision and recall (ADM evaluator, k = 3).")
    k: int = Field(PR_K, gt=0, description="Neighbourhood size (ADM evaluator: 3).")


class FDDINOv2Params(_ImageMetricParams):
    """Fréchet distance in DINOv2 CLS features (dgm-eval's FD_DINOv2: ViT-L/14)."""

    type: Literal["fd_dinov2"] = Field(..., description="Fréchet distance in DINOv2 ViT-L/14 features.")
    weights: str | None = Field(..., description="Local DINOv2 weights (dinov2_vitl14_pretrain.pth or a Hugging Face "
                                                 "Dinov2Model model.safetensors); null = random init, tests only.")
    preset: str = Field("L/14", description="Teacher 'vit' preset (dgm-eval: L/14).")


class _ImageMetric(Metric):
    """Shared: feature extraction memoised on the last input tensor, so entries of one extractor on the same
    samples run the network once. Each entry keeps one feature (``key``) per sample through the streaming
    interface (:meth:`sample_features`, float32 as the network gives it) and computes its value from all of them
    (:meth:`values`, in float64); ``metric(samples, labels)`` is the two in a row."""

    need = "inception"
    key = "pool"
    _memo: dict[tuple, tuple[Tensor, int, Any]] = {}

    def __init__(self, params: Any, data_params: Any, device: torch.device | str = "cpu", **deps: Any):
        self.params, self.data_params, self.device = params, data_params.data_space(), device

    def features(self, x: Tensor) -> dict[str, np.ndarray]:
        """Images ``(N, C, H, W)`` in [-1, 1] -> the extractor's features by name (float64 arrays ``(N, D)``)."""
        p = self.params
        key = (self.need, getattr(p, "weights", None), getattr(p, "preset", None), str(self.device))
        hit = _ImageMetric._memo.get(key)
        if hit is not None and hit[0] is x and hit[1] == x._version:
            return hit[2]
        if self.need == "inception":
            f = inception_features(x, p.weights, self.device, p.batch_size)
        else:
            f = {"cls": dinov2_features(x, p.weights, p.preset, self.device, p.batch_size)}
        _ImageMetric._memo = {key: (x, x._version, f)}
        return f

    def sample_features(self, samples: Tensor, labels: Tensor | None) -> dict[str, Tensor]:
        """``{key: (B, D) float32}`` (the network computes in float32, so nothing is lost)."""
        return {self.key: torch.from_numpy(self.features(samples)[self.key]).float()}

    def from_features(self, features: dict[str, Tensor], labels: Tensor | None) -> dict[str, float]:
        return self.values(features[self.key].double().numpy())

    def values(self, feats: np.ndarray) -> dict[str, float]:
        """``{name: value}`` from the ``key`` features of all samples ``(N, D)`` float64."""
        raise NotImplementedError

    def __call__(self, samples: Tensor, labels: Tensor | None = None) -> dict[str, float]:
        """``metric(samples (N, C, H, W) in [-1, 1], labels ignored) -> {name: value}``."""
        return self.from_features(self.sample_features(samples, labels), labels)

    def reference(self) -> dict[str, np.ndarray]:
        return reference_stats(self.params, self.data_params, self.device, self.need)


@METRICS.register
class FID(_ImageMetric):
    """``{"fid": float}`` from pool3 features."""

    Params = FIDParams
    higher_is_better = False

    def values(self, feats: np.ndarray) -> dict[str, float]:
        mu, sigma = feature_stats(feats)
        ref = self.reference()
        return {"fid": frechet_distance(mu, sigma, ref["mu"], ref["sigma"])}


@METRICS.register
class SFID(_ImageMetric):
    """``{"sfid": float}`` from the spatial features."""

    Params = SFIDParams
    key = "spatial"
    higher_is_better = False

    def values(self, feats: np.ndarray) -> dict[str, float]:
        mu, sigma = feature_stats(feats)
        ref = self.reference()
        return {"sfid": frechet_distance(mu, sigma, ref["mu_s"], ref["sigma_s"])}


@METRICS.register
class InceptionScore(_ImageMetric):
    """``{"inception_score": float >= 1}`` from the 1008 logits."""

    Params = InceptionScoreParams
    key = "logits"
    higher_is_better = True

    def values(self, feats: np.ndarray) -> dict[str, float]:
        return {"inception_score": inception_score(feats)}


@METRICS.register
class PrecisionRecall(_ImageMetric):
    """``{"precision": float, "recall": float}`` from pool3 features."""

    Params = PrecisionRecallParams

    @classmethod
    def directions(cls, params: Any) -> dict[str, bool]:
        return {"precision": True, "recall": True}

    def values(self, feats: np.ndarray) -> dict[str, float]:
        prec, rec = precision_recall(self.reference()["pool"], feats, self.params.k)
        return {"precision": prec, "recall": rec}


@METRICS.register
class FDDINOv2(_ImageMetric):
    """``{"fd_dinov2": float}`` from DINOv2 CLS features."""

    Params = FDDINOv2Params
    higher_is_better = False
    need = "dinov2"
    key = "cls"

    def values(self, feats: np.ndarray) -> dict[str, float]:
        mu, sigma = feature_stats(feats)
        ref = self.reference()
        return {"fd_dinov2": frechet_distance(mu, sigma, ref["mu_dinov2"], ref["sigma_dinov2"])}
