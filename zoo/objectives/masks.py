"""Token masks (registry kind ``mask``) for Self-Flow's Dual-Timestep Scheduling
([SF-paper] §3.3; [note:selfflow-step]).

A mask decides, per sample, which tokens get the *second* timestep ``s`` (True) and which keep ``t``
(False). Every mask is a :class:`zoo.core.protocols.TokenMask`::

    mask = MASKS.build(params, grid=(16, 16))
    m = mask.sample(rng, num_tokens)      # (B, N) bool on rng.device, B = rng.count

* ``bernoulli`` (the paper's mask): every token independently with probability ``ratio``
  (``[SF-paper]`` §3.3 step 2, ``R_M <= 0.5``), so the group size is Binomial(N, ratio), fresh per sample;
* ``exact_count`` (``[SRA-DTS]`` ``_compute_group_counts``/``_build_group_ids_from_counts``): exactly
  ``round(ratio * N)`` tokens per sample (round half up; for two groups this is SRA-DTS's floor plus
  largest-remainder count, up to how an exact .5 tie is broken) at the positions of a fresh uniformly
  random permutation per sample.

``ratio`` is one number for every token or a number per modality (``{"video": 0.1, "audio": 0.5}``; the
default is the paper's per-modality values, [SF-paper] App. A.3: 0.25 image, 0.1 video, 0.5 audio), read per
token from the run's :class:`~zoo.core.layout.TokenLayout` (dep ``layout``); ``exact_count`` then masks
``round(ratio_m * N_m)`` tokens inside each modality's segment.

Both take ``full_sample_prob`` (``[SRA-DTS]`` ``_build_mask``, ``[SRA2SF]`` §6 rho): with that probability a
sample's mask is all False, so the whole sample has the single timestep ``t`` (and full attention).

Draw order from the step RNG (fixed; every draw is made whatever the parameters are, so the draws that
follow never depend on them):

1. token uniforms: ``rng.rand(N)`` ``(B, N)`` -- ``bernoulli`` masks ``u < ratio``; ``exact_count`` masks
   the ``round(ratio * N)`` tokens with the smallest ``u`` (``argsort`` of i.i.d. uniforms is a uniformly
   random permutation);
2. full-sample uniforms: ``rng.rand()`` ``(B,)`` -- a sample with ``v < full_sample_prob`` gets no mask.

Structured masks (tubes or frame spans for video, time spans for audio) are new entries of this registry:
the constructor receives the token ``grid`` as a dep (``MASKS.build(params, grid=...)``), so such a mask
can lay its groups out on the grid; it should subclass :class:`_TokenMaskBase` and implement ``_draw``.
"""
from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor

from registry.kinds import MASKS
from zoo.core.params import StreamKeys, ZooParams
from zoo.core.types import StepRNG

PAPER_RATIOS = {"image": 0.25, "video": 0.1, "audio": 0.5}
"""[SF-paper] App. A.3: mask ratio per modality (video lowest: temporal redundancy)."""

_FULL_SAMPLE_DESC = ("Probability that a sample gets no mask at all (one timestep for the whole sample, full "
                     "attention) ([SRA-DTS] _build_mask; [SRA2SF] §6 uses 0.25 with attention separation at "
                     "ratio 0.5); default 0.0 = never, as in the Self-Flow paper.")


def mask_count(ratio: float, num_tokens: int) -> int:
    """``round(ratio * num_tokens)``, halves rounded up: the group size of ``exact_count``."""
    return int(math.floor(ratio * num_tokens + 0.5))


class _TokenMaskBase:
    """Shared ``sample``: draws the token uniforms (through ``_draw``), then the full-sample uniforms."""

    def __init__(self, params: Any, **deps: Any):
        self.params = params
        self.grid = deps.get("grid")
        self.layout = deps.get("layout")

    def token_ratios(self, num_tokens: int) -> Tensor:
        """``(N,)`` float32 mask ratio of every token (its modality's, when ``ratio`` is per modality)."""
        r = self.params.ratio
        if not isinstance(r, dict):
            return torch.full((num_tokens,), float(r))
        if self.layout is None:  # no layout given: one image-like segment
            if "image" not in r:
                raise ValueError(f"mask ratio is per modality ({r}) but no token layout was given to pick from")
            return torch.full((num_tokens,), float(r["image"]))
        if self.layout.num_tokens != num_tokens:
            raise ValueError(f"mask layout has {self.layout.num_tokens} tokens, asked for {num_tokens}")
        return self.layout.per_token(r)

    def _draw(self, rng: StepRNG, num_tokens: int) -> Tensor:
        """``(B, N)`` bool from exactly one ``rng.rand(num_tokens)`` draw (subclasses)."""
        raise NotImplementedError

    def sample(self, rng: StepRNG, num_tokens: int) -> Tensor:
        """``(B, N)`` bool on ``rng.device`` (True = second-timestep group), ``B = rng.count``."""
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1; got {num_tokens}")
        m = self._draw(rng, num_tokens)                                      # draw 1: (B, N)
        full = rng.rand() < self.params.full_sample_prob                      # draw 2: (B,)
        return m & ~full[:, None]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params.model_dump(exclude={'preset'})})"


# ------------------------------------------------------------------------------------------- bernoulli
class BernoulliMaskParams(ZooParams):
    """Independent Bernoulli(ratio) per token, fresh per sample (the Self-Flow paper's mask)."""

    type: Literal["bernoulli"] = Field(..., description="Each token independently with probability `ratio` "
                                                        "([SF-paper] §3.3 step 2).")
    ratio: float | Annotated[dict[str, float], StreamKeys(also=PAPER_RATIOS)] = Field(
        default_factory=lambda: dict(PAPER_RATIOS),
        description="Mask ratio R_M = expected share of tokens with the second timestep, at most 0.5 ([SF-paper] "
                    "§3.3): one number, or one per modality (default [SF-paper] App. A.3: 0.25 image, 0.1 video, "
                    "0.5 audio). 0 = no second group (SRA).")
    full_sample_prob: float = Field(0.0, ge=0.0, le=1.0, description=_FULL_SAMPLE_DESC)

    @field_validator("ratio")
    @classmethod
    def _at_most_half(cls, v: float | dict[str, float]) -> float | dict[str, float]:
        for name, r in (v.items() if isinstance(v, dict) else [("", v)]):
            where = f" for {name!r}" if name else ""
            if not 0.0 <= r <= 0.5:
                raise ValueError(f"ratio {r:g}{where} is outside [0, 0.5]: Self-Flow's mask ratio R_M must be <= 0.5 "
                                 f"([SF-paper] §3.3; t and s are unsorted, so a ratio r and 1 - r describe the same "
                                 f"groups)")
        return v


@MASKS.register
class BernoulliMask(_TokenMaskBase):
    """``mask[b, i] = u[b, i] < ratio`` (then the full-sample override)."""

    Params = BernoulliMaskParams

    def _draw(self, rng: StepRNG, num_tokens: int) -> Tensor:
        u = rng.rand(num_tokens)                                              # (B, N)
        return u < self.token_ratios(num_tokens).to(u.device)


# ----------------------------------------------------------------------------------------- exact count
class ExactCountMaskParams(ZooParams):
    """Exactly ``round(ratio * N)`` tokens per sample, at random positions ([SRA-DTS])."""

    type: Literal["exact_count"] = Field(..., description="Exactly round(ratio * N) tokens per sample at the "
                                                          "positions of a fresh random permutation ([SRA-DTS]).")
    ratio: float | Annotated[dict[str, float], StreamKeys()] = Field(
        0.25, description="Share of tokens with the second timestep, rounded half up to a count, one number or one "
                          "per modality (counted inside each modality) ([SRA-DTS] scripts/train.sh: 0.25).")

    @field_validator("ratio")
    @classmethod
    def _in_unit(cls, v: float | dict[str, float]) -> float | dict[str, float]:
        for r in (v.values() if isinstance(v, dict) else [v]):
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"ratio {r:g} is outside [0, 1]")
        return v
    full_sample_prob: float = Field(0.0, ge=0.0, le=1.0, description=_FULL_SAMPLE_DESC)


@MASKS.register
class ExactCountMask(_TokenMaskBase):
    """The ``round(ratio * N)`` tokens with the smallest uniforms of ``rng.rand(N)`` (a random permutation)."""

    Params = ExactCountMaskParams

    def _draw(self, rng: StepRNG, num_tokens: int) -> Tensor:
        u = rng.rand(num_tokens)                                              # (B, N)
        m = torch.zeros_like(u, dtype=torch.bool)
        r = self.params.ratio
        if isinstance(r, dict) and self.layout is not None:
            spans = [(s.start, s.length, float(r[s.name])) for s in self.layout.segments]
        elif isinstance(r, dict):
            spans = [(0, num_tokens, float(r["image"]) if "image" in r else float(self.token_ratios(num_tokens)[0]))]
        else:
            spans = [(0, num_tokens, float(r))]  # the exact value: a float32 round trip can move a .5 count
        for start, length, ratio in spans:
            k = mask_count(ratio, length)
            if k > 0:
                m.scatter_(1, start + u[:, start:start + length].argsort(dim=1)[:, :k], True)
        return m


def build_mask(params: Any, **deps: Any) -> _TokenMaskBase:
    """Params of any registered mask -> the mask (through ``MASKS``); ``deps`` e.g. ``grid``."""
    return MASKS.build(params, **deps)
