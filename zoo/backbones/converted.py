"""Backbone ``sit_time_flip``: a SiT whose weights run in **SiT time**, served in the zoo's RF time.

Official SiT (``willisma/SiT``, ``ICPlan``) and the official Self-Flow network (``black-forest-labs/Self-Flow``
``src/model.py``, inside its ``forward``) are trained with data at ``t_sit = 1`` and noise at ``t_sit = 0``, and
predict ``x_data - x_noise``. The zoo integrates RF time (:mod:`zoo.core.time`: data at ``t = 0``, noise at
``t = 1``, velocity ``x1 - x0``). A network ``f`` of the first kind is the RF velocity field

    v_RF(x, t) = -f(x, 1 - t)                  (per token when t is (B, N))

and that is this backbone's whole forward: :class:`zoo.backbones.sit.SiT` is called with ``1 - t`` and its
prediction negated. Nothing in ``SiT`` flips time; the conversion lives here, in one visible place, and is
chosen in the spec (``runtime.convert`` writes ``{"type": "sit_time_flip", ...}`` for SiT-time checkpoints).
REPA's SiT is trained in RF time already (REPA ``loss.py``: ``alpha_t = 1 - t`` on data, target
``noise - data``) and converts to the plain ``sit`` type.

``learn_sigma`` (DiT/SiT/Self-Flow default for the released checkpoints): the output layer predicts ``2C``
channels per latent pixel, in the same (ph, pw, c) order as the tokens; the first ``C`` are the velocity,
the other ``C`` a variance the flow model never uses. The layer is kept at its full size, so the state dict
holds the published weights unchanged, and the forward keeps channels ``0 .. C-1`` of every pixel.

State-dict keys are exactly ``SiT``'s (this class *is* a ``SiT``; with ``learn_sigma`` only the shape of
``final_layer.linear`` differs: ``(p * p * 2C, D)``). Features tapped with ``taps`` are the hidden states of
the network run at ``1 - t``, i.e. what the official code calls block outputs.

Example::

    net = SiTTimeFlip(SiTTimeFlipParams(type="sit_time_flip", preset="tiny", learn_sigma=True),
                      token_dim=16, grid=(8, 8), num_classes=10)
    v = net(x, t, y).pred          # == -(first C of 2C channels of SiT(x, 1 - t, y))
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from torch import Tensor, nn

from registry.kinds import BACKBONES
from zoo.backbones.common import FinalLayer
from zoo.backbones.sit import SiT, SiTParams
from zoo.core.time import Times, sit_time
from zoo.core.types import BackboneOut


class SiTTimeFlipParams(SiTParams):
    """A ``sit`` whose weights expect SiT time (data at 1) and predict ``data - noise``; same fields,
    presets and checks as ``sit`` (inherited) plus ``learn_sigma``."""

    type: Literal["sit_time_flip"] = Field(  # type: ignore[assignment]
        ..., description="SiT run in SiT time (converted SiT / Self-Flow weights): v_RF(x, t) = -net(x, 1 - t).")
    learn_sigma: bool = Field(
        False, description="The output layer has 2C channels per latent pixel (DiT/SiT learn_sigma); the first C "
                           "are the velocity, the rest are ignored.")


@BACKBONES.register
class SiTTimeFlip(SiT):
    """``SiT`` in SiT time behind an RF-time interface (see the module docstring).

    Args: as :class:`zoo.backbones.sit.SiT`; ``params`` is a :class:`SiTTimeFlipParams`.
    """

    Params = SiTTimeFlipParams

    def __init__(self, params: SiTTimeFlipParams, *, token_dim: int, grid: tuple[int, ...], num_classes: int,
                 layout: Any = None):
        super().__init__(params, token_dim=token_dim, grid=grid, num_classes=num_classes, layout=layout)
        self.learn_sigma = bool(params.learn_sigma)
        p2 = params.patch * params.patch
        if self.token_dim % p2:
            raise ValueError(f"token_dim {self.token_dim} is not a multiple of patch^2 = {p2}")
        self.channels = self.token_dim // p2
        if self.learn_sigma:  # (p, p, 2C) outputs per token, zero-initialised like DiT's
            self.final_layer = FinalLayer(self.hidden, 2 * self.token_dim)
            for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def _mean_channels(self, out: Tensor) -> Tensor:
        """``(B, N, p*p*2C)`` -> ``(B, N, p*p*C)``: channels ``0 .. C-1`` of every latent pixel."""
        b, n, _ = out.shape
        return out.reshape(b, n, -1, 2 * self.channels)[..., : self.channels].reshape(b, n, self.token_dim)

    def forward(self, x: Tensor, t: Times, y: Tensor | None, *, taps: tuple[int, ...] = (),
                stop_after: int | None = None, **kwargs: Any) -> BackboneOut:
        """``v_RF(x, t) = -net(x, 1 - t)``; arguments and shapes as :meth:`SiT.forward` (``t`` in RF time,
        ``(B,)``, ``(B, N)`` or ``GroupedTimes``; other keyword arguments, e.g. an attention mask, pass through unchanged)."""
        out = super().forward(x, sit_time(t), y, taps=taps, stop_after=stop_after, **kwargs)
        if out.pred is None:
            return out
        pred = self._mean_channels(out.pred) if self.learn_sigma else out.pred
        return BackboneOut(-pred, out.features)

    def flops(self, num_tokens: int) -> float:
        """``SiT.flops`` plus the unused half of a ``learn_sigma`` output layer."""
        extra = 2.0 * num_tokens * self.token_dim * self.hidden if self.learn_sigma else 0.0
        return super().flops(num_tokens) + extra
