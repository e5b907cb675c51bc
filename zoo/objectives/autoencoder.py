"""Objective ``autoencoder``: train a VAE backbone (``conv_vae``, ``conv_vae_1d``, ``clip_vae``) on the data itself.
The VAE is a :class:`zoo.autoencoders.base.TrainableAutoencoder`; nothing here uses the flow backbone protocol.

For data ``x`` ``(B, C, *S)`` in [-1, 1] (``TokenBatch.raw``; ``needs_raw``)::

    mean, logvar = backbone.encode_moments(x)                  # (B, z, *S / f) each
    z = mean + exp(logvar / 2) * eps,  eps = ctx.rng.randn(...) # reparameterised (one draw, the only one)
    x_rec = backbone.decode(z)
    loss = rec(x_rec, x) + kl_weight * KL + perceptual_weight * perc
    rec  = mean |x_rec - x|  (l1)  or  mean (x_rec - x)^2  (mse)
    KL   = mean over elements of 0.5 * (mean^2 + exp(logvar) - 1 - logvar)      # KL(N(mean, var) || N(0, 1))
    perc = mean (phi(x_rec) - phi(x))^2, phi = a spec teacher's features (e.g. the digit classifier's last
           conv map) of the image, or of every frame of a video clip

Metrics: ``loss_rec``, ``loss_kl``, ``loss_perc`` (when used) and ``psnr`` = 10 log10(2^2 / mse) (peak-to-peak 2).

``reconstruct`` returns reconstructions (posterior mean, decoded, clamped to [-1, 1]) of held-out (``eval``)
samples, chosen in order so that sample ``i`` has label ``labels[i]`` (the first ``n`` samples when
unconditional; for the digits datasets, whose label is ``index % 10``, that is the first ``n`` samples), so
the run's sample sheets and metrics (class accuracy, classifier FD against real data: an rFID analogue)
apply unchanged.
"""
from __future__ import annotations

from typing import Any, ClassVar, Iterator, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from registry.kinds import BACKBONES, OBJECTIVES
from zoo.autoencoders.base import TrainableAutoencoder
from zoo.core.params import Root, ZooParams
from zoo.core.protocols import ObjectiveModule
from zoo.core.types import LossOut, StepContext, TokenBatch



def vae_backbones() -> list[str]:
    """The backbone tags whose network is a :class:`TrainableAutoencoder` (what this objective trains)."""
    return [tag for tag, cls in BACKBONES.items() if issubclass(cls, TrainableAutoencoder)]


def kl_to_standard_normal(mean: Tensor, logvar: Tensor) -> Tensor:
    """Mean over all elements of ``KL(N(mean, exp(logvar)) || N(0, 1))`` (fp32 scalar)."""
    mean, logvar = mean.float(), logvar.float()
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()


def reconstruction_loss(rec: Tensor, x: Tensor, kind: str) -> Tensor:
    """``l1``: mean absolute error; ``mse``: mean squared error (fp32 scalar)."""
    rec, x = rec.float(), x.float()
    return F.l1_loss(rec, x) if kind == "l1" else F.mse_loss(rec, x)


def psnr(rec: Tensor, x: Tensor) -> Tensor:
    """PSNR in dB for data in [-1, 1] (peak-to-peak 2): ``10 log10(4 / mse)``."""
    mse = F.mse_loss(rec.detach().float().clamp(-1, 1), x.float()).clamp_min(1e-10)
    return 10.0 * torch.log10(4.0 / mse)


class AutoencoderObjectiveParams(ZooParams):
    """Reconstruction + KL (+ optional perceptual) loss of a VAE backbone on the data."""

    type: Literal["autoencoder"] = Field(..., description="Train a conv_vae / conv_vae_1d backbone: reconstruction + "
                                                          "KL (+ perceptual) on the data (autoencoder identity).")
    reconstruction: Literal["l1", "mse"] = Field("l1", description="Reconstruction distance (mean over elements).")
    kl_weight: float = Field(1e-4, ge=0, description="Weight of the KL to N(0, 1), mean over latent elements.")
    perceptual_weight: float = Field(0.0, ge=0, description="Weight of the feature distance of a teacher (images or video frames).")
    perceptual_teacher: str | None = Field(None, description="Name under `teachers` whose features give the perceptual "
                                                             "term (e.g. the digit `classifier`); null = none.")
    sample_posterior: bool = Field(True, description="Decode a posterior sample (reparameterised) during training; "
                                                     "false = the mean (a plain autoencoder with a KL penalty).")

    def problems(self, spec: Any) -> Iterator[tuple[str, str]]:
        vaes = vae_backbones()
        if spec.backbone.type not in vaes:
            yield Root("backbone.type"), (f"objective 'autoencoder' trains a VAE backbone ({', '.join(vaes)}); "
                                          f"got {spec.backbone.type!r}")
        if self.perceptual_weight > 0:
            shape = spec.data.sample_shape()
            if isinstance(shape, dict) or len(tuple(shape)) not in (3, 4):
                yield "perceptual_weight", (f"the perceptual term compares image (or video frame) features; "
                                                      f"the data give {shape} (audio has no perceptual teacher: set "
                                                      f"it to 0)")
            elif self.perceptual_teacher is None:
                yield "perceptual_teacher", "perceptual_weight > 0 needs a teacher name (under `teachers`)"
        if self.perceptual_teacher is not None and self.perceptual_teacher not in spec.teachers:
            known = ", ".join(sorted(spec.teachers)) or "none; declare it under teachers"
            yield "perceptual_teacher", f"unknown teacher {self.perceptual_teacher!r} (known: {known})"


@OBJECTIVES.register
class AutoencoderObjective(ObjectiveModule):
    """No parameters. deps: ``teachers`` (frozen modules by name; held in a plain dict, never saved)."""

    Params = AutoencoderObjectiveParams
    needs_raw: ClassVar[bool] = True
    reconstructs: ClassVar[bool] = True

    def __init__(self, params: AutoencoderObjectiveParams, *, teachers: dict[str, nn.Module] | None = None,
                 **deps: Any):
        super().__init__()
        self.params = params
        self.teachers = dict(teachers or {})  # plain dict: not submodules

    def forward(self, student: nn.Module, batch: TokenBatch, ctx: StepContext) -> LossOut:
        """``batch.raw`` ``(B, C, *S)``; ``student.encode_moments`` / ``decode`` as in the module docstring."""
        p = self.params
        if not isinstance(student, TrainableAutoencoder):
            raise TypeError(f"objective 'autoencoder' trains a VAE backbone ({', '.join(vae_backbones())}); "
                            f"got {type(student).__name__}")
        if batch.raw is None or isinstance(batch.raw, dict):
            raise ValueError("objective 'autoencoder' needs the data-space batch (TokenBatch.raw) of one stream")
        x = batch.raw.float()
        mean, logvar = student.encode_moments(x)
        eps = ctx.rng.randn(*mean.shape[1:]).to(device=mean.device, dtype=mean.dtype)
        z = mean + (0.5 * logvar).exp() * eps if p.sample_posterior else mean
        rec = student.decode(z)
        loss_rec = reconstruction_loss(rec, x, p.reconstruction)
        loss_kl = kl_to_standard_normal(mean, logvar)
        loss = loss_rec + p.kl_weight * loss_kl
        metrics = {"loss_rec": loss_rec.detach(), "loss_kl": loss_kl.detach(), "psnr": psnr(rec, x)}
        if p.perceptual_weight > 0:
            loss_perc = self._perceptual(rec, x)
            loss = loss + p.perceptual_weight * loss_perc
            metrics["loss_perc"] = loss_perc.detach()
        return LossOut(loss=loss, metrics=metrics)

    def _perceptual(self, rec: Tensor, x: Tensor) -> Tensor:
        teacher = self.teachers.get(self.params.perceptual_teacher or "")
        if teacher is None:
            raise ValueError(f"objective 'autoencoder': teacher {self.params.perceptual_teacher!r} is not loaded")
        if x.dim() == 5:  # video (B, C, T, H, W): features of every frame
            rec, x = (v.transpose(1, 2).flatten(0, 1) for v in (rec, x))
        with torch.no_grad():
            target = teacher.features(x).float()
        return F.mse_loss(teacher.features(rec.float()).float(), target)

    @torch.no_grad()
    def reconstruct(self, graph: Any, n: int, labels: Tensor | None, *, use_ema: bool = True) -> Tensor:
        """Reconstructions ``(n, C, *S)`` in [-1, 1] of held-out samples whose labels are ``labels`` (in order):
        the posterior mean, decoded."""
        from registry.kinds import DATASETS

        net = graph.ema.module if (use_ema and graph.ema is not None) else graph.backbone
        data = DATASETS.build(graph.spec.data, split="eval")
        xs = [data[i][0] for i in eval_indices(data, n, labels)]
        was_training = net.training
        net.eval()
        out = []
        for i in range(0, len(xs), 256):
            x = torch.stack(xs[i: i + 256]).to(graph.device).float()
            with graph.autocast():
                rec = net.decode(net.encode_moments(x)[0])
            out.append(rec.float().clamp(-1, 1).cpu())
        net.train(was_training)
        return torch.cat(out)


def eval_indices(data: Any, n: int, labels: Tensor | None) -> list[int]:
    """Indices of ``n`` held-out samples: the first ``n`` when ``labels`` is None, else for each ``labels[i]``
    the next sample (in index order) with that label. Labels are read as ``data[j][1]``."""
    if labels is None:
        if n > len(data):
            raise ValueError(f"objective 'autoencoder': {n} reconstructions asked, the eval split has {len(data)}")
        return list(range(n))
    pending: dict[int, list[int]] = {}
    for i, y in enumerate(labels.tolist()):
        pending.setdefault(int(y), []).append(i)
    out = [-1] * len(labels)
    need = len(labels)
    for j in range(len(data)):
        if need == 0:
            break
        slots = pending.get(int(data[j][1]))
        if slots:
            out[slots.pop(0)] = j
            need -= 1
    if need:
        raise ValueError(f"objective 'autoencoder': the eval split lacks samples for {need} of the asked labels")
    return out

