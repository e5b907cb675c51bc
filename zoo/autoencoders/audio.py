"""Fixed (weight-free) audio autoencoders: ``waveform``, ``stft`` and ``spectrogram``.

A mono clip is ``(1, L)`` in [-1, 1] (channel-first, like images). Neither entry learns anything; both are
exactly invertible on the clips they encode, so the flow model works on the waveform itself or on its
short-time Fourier transform:

* ``waveform``: latent = ``scale * x`` ``(1, L)``; the ``audio`` modality cuts it into patches of samples.
* ``stft``: latent ``(2F, L / hop + 1)``, ``F = n_fft / 2 + 1``: channels ``0 .. F - 1`` hold the real parts and
  ``F .. 2F - 1`` the imaginary parts of a Hann-windowed, orthonormally scaled (``normalized=True``) centred
  STFT, optionally magnitude-compressed (``c -> c |c|^(power - 1)``), times ``scale``; decoding is ``torch.istft`` with the same window and the clip length
  ``hop * (frames - 1)``, so ``decode(encode(x)) == x`` up to float rounding. Frame ``j`` is centred at sample
  ``j * hop``, so one latent time step is ``hop`` samples (``time_stride``).
"""
from __future__ import annotations

from typing import Any, Iterator, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from registry.kinds import AUTOENCODERS
from zoo.core.params import AutoencoderParams
from zoo.autoencoders.base import AutoencoderModule


def _mono_shape(input_shape: Any, who: str) -> tuple[int, int]:
    if isinstance(input_shape, dict) or len(tuple(input_shape)) != 2 or int(tuple(input_shape)[0]) != 1:
        raise ValueError(f"autoencoder {who!r} takes mono audio (1, L); the data give {input_shape}")
    return 1, int(tuple(input_shape)[1])


class WaveformParams(AutoencoderParams):
    """The waveform itself as the latent (optionally rescaled)."""

    type: Literal["waveform"] = Field(..., description="Mono waveform (1, L) as the latent, times `scale` (no weights).")
    scale: float = Field(1.0, gt=0, description="Latent = scale * waveform (bring the signal near unit variance).")

    def latent_shape(self, input_shape: Any) -> tuple[int, int]:
        """``(1, L)`` -> ``(1, L)``."""
        return _mono_shape(input_shape, "waveform")

    def time_stride(self, input_shape: Any) -> int:
        """Input samples per latent time step: 1."""
        return 1


@AUTOENCODERS.register
class Waveform(AutoencoderModule):
    """``encode`` ``(B, 1, L)`` -> ``(B, 1, L)`` times ``scale``; ``decode`` divides by it."""

    Params = WaveformParams

    def __init__(self, params: WaveformParams):
        super().__init__()
        self.params = params

    def encode(self, x: Tensor) -> Tensor:
        return x * self.params.scale

    def decode(self, z: Tensor) -> Tensor:
        return z / self.params.scale


class STFTParams(AutoencoderParams):
    """Centred, orthonormal Hann STFT: real and imaginary parts as channels."""

    type: Literal["stft"] = Field(..., description="Fixed invertible STFT (real, imag) of mono audio (no weights).")
    n_fft: int = Field(128, ge=8, description="FFT size (window length); F = n_fft / 2 + 1 frequency bins.")
    hop: int | None = Field(None, gt=0, description="Hop in samples; null = n_fft / 4 (75 % overlap, exactly "
                                                    "invertible with a Hann window).")
    power: float = Field(1.0, gt=0, le=1.0, description="Magnitude compression: each coefficient c becomes "
                                                          "c |c|^(power - 1) (phase kept, |c| -> |c|^power), exactly "
                                                          "invertible; 1 = none, 0.5 = the compressed spectrum of speech "
                                                          "enhancement (lifts quiet bins, shrinks decoding errors in silence).")
    scale: float = Field(1.0, gt=0, description="Latent = scale * (compressed) STFT coefficients.")

    @model_validator(mode="after")
    def _check(self) -> "STFTParams":
        if self.n_fft % 2:
            raise ValueError(f"n_fft must be even; got {self.n_fft}")
        if self.hop is not None and self.hop > self.n_fft // 2:
            raise ValueError(f"hop {self.hop} exceeds n_fft / 2 = {self.n_fft // 2}: a Hann window would not cover "
                             f"every sample (the transform would not be invertible)")
        return self

    @property
    def hop_length(self) -> int:
        return self.hop if self.hop is not None else self.n_fft // 4

    def latent_shape(self, input_shape: Any) -> tuple[int, int]:
        """``(1, L)`` -> ``(2F, L / hop + 1)``; ``L`` must be a multiple of ``hop``."""
        _, length = _mono_shape(input_shape, self.type)
        if length % self.hop_length:
            raise ValueError(f"autoencoder {self.type!r}: clip length {length} is not a multiple of hop {self.hop_length}")
        return 2 * (self.n_fft // 2 + 1), length // self.hop_length + 1

    def time_stride(self, input_shape: Any) -> int:
        """Input samples per latent time step: ``hop``."""
        return self.hop_length

    def input_problems(self, input_shape: Any, spec: Any) -> Iterator[tuple[str, str]]:
        """The clip length of the audio stream (of multi-stream data: its ``audio``) is a multiple of the hop."""
        try:
            self.latent_shape(_stream_shape(input_shape, "audio"))
        except ValueError as e:
            yield "", str(e)


def _stream_shape(shape: Any, stream: str) -> Any:
    """The shape of ``stream`` in a data sample shape (a dict of streams, or the tuple of a one-stream sample)."""
    return shape.get(stream, shape) if isinstance(shape, dict) else shape


@AUTOENCODERS.register
class STFT(AutoencoderModule):
    """``encode`` ``(B, 1, L)`` -> ``(B, 2F, L / hop + 1)``; ``decode`` the exact inverse (``torch.istft``)."""

    Params = STFTParams

    def __init__(self, params: STFTParams):
        super().__init__()
        self.params = params
        self.n_fft, self.hop, self.bins = params.n_fft, params.hop_length, params.n_fft // 2 + 1
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)

    def encode(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"stft: expected mono audio (B, 1, L); got {tuple(x.shape)}")
        spec = torch.stft(x[:, 0].float(), self.n_fft, self.hop, window=self.window, center=True,
                          normalized=True, return_complex=True)                   # (B, F, frames)
        if self.params.power != 1.0:
            spec = spec * spec.abs().clamp_min(1e-12).pow(self.params.power - 1.0)
        return torch.cat([spec.real, spec.imag], dim=1) * self.params.scale

    def decode(self, z: Tensor) -> Tensor:
        if z.dim() != 3 or z.shape[1] != 2 * self.bins:
            raise ValueError(f"stft: expected latents (B, {2 * self.bins}, frames); got {tuple(z.shape)}")
        z = z.float() / self.params.scale
        spec = torch.complex(z[:, : self.bins], z[:, self.bins:])
        if self.params.power != 1.0:
            spec = spec * spec.abs().clamp_min(1e-12).pow(1.0 / self.params.power - 1.0)
        length = self.hop * (z.shape[-1] - 1)
        x = torch.istft(spec, self.n_fft, self.hop, window=self.window, center=True, normalized=True, length=length)
        return x[:, None]


class SpectrogramParams(STFTParams):
    """Compressed STFT magnitude; phase is rebuilt by Griffin-Lim when decoding."""

    type: Literal["spectrogram"] = Field(
        ..., description="Fixed STFT magnitude |c|^power of mono audio (no weights); decoded by Griffin-Lim.")
    power: float = Field(0.5, gt=0, le=1.0, description="Magnitude compression |c| -> |c|^power (0.5 lifts quiet bins).")
    griffin_lim_iters: int = Field(100, ge=0, description="Griffin-Lim iterations when decoding (0 = zero phase).")
    momentum: float = Field(0.99, ge=0, lt=1, description="Fast Griffin-Lim momentum (Perraudin et al. 2013); 0 = "
                                                         "the original algorithm.")

    def latent_shape(self, input_shape: Any) -> tuple[int, int]:
        """``(1, L)`` -> ``(F, L / hop + 1)``; ``L`` must be a multiple of ``hop``."""
        channels, frames = super().latent_shape(input_shape)
        return channels // 2, frames


@AUTOENCODERS.register
class Spectrogram(STFT):
    """``encode`` ``(B, 1, L)`` -> ``(B, F, L / hop + 1)`` = ``scale * |STFT|^power``; ``decode`` inverts the
    compression (negative model outputs clip to 0) and rebuilds a phase with fast Griffin-Lim, started from zero
    phase so decoding is deterministic. Not exactly invertible: the phase is lost, the magnitude is kept; for tonal
    signals such as DTMF the decoded clip has the same tones at the same times."""

    Params = SpectrogramParams

    def encode(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"spectrogram: expected mono audio (B, 1, L); got {tuple(x.shape)}")
        spec = torch.stft(x[:, 0].float(), self.n_fft, self.hop, window=self.window, center=True,
                          normalized=True, return_complex=True)                   # (B, F, frames)
        return spec.abs().pow(self.params.power) * self.params.scale

    def decode(self, z: Tensor) -> Tensor:
        if z.dim() != 3 or z.shape[1] != self.bins:
            raise ValueError(f"spectrogram: expected latents (B, {self.bins}, frames); got {tuple(z.shape)}")
        mag = (z.float() / self.params.scale).clamp_min(0).pow(1.0 / self.params.power)   # (B, F, frames)
        length = self.hop * (z.shape[-1] - 1)
        stft = dict(n_fft=self.n_fft, hop_length=self.hop, window=self.window, center=True, normalized=True)
        spec, prev, m = mag.to(torch.complex64), torch.zeros((), dtype=torch.complex64), self.params.momentum
        for _ in range(self.params.griffin_lim_iters):
            rebuilt = torch.stft(torch.istft(spec, length=length, **stft), return_complex=True, **stft)
            spec = mag * torch.exp(1j * (rebuilt - m / (1 + m) * prev).angle())
            prev = rebuilt
        return torch.istft(spec, length=length, **stft)[:, None]
