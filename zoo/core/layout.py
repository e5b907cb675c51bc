"""Token layout: which tokens of a ``(B, N, P)`` sequence belong to which modality, and where they sit.

Every modality exposes a :class:`TokenLayout`. A single-modality run (image, video or audio) has one
segment; ``audio_video`` has two, video tokens first, then audio tokens, in one sequence. Segments are
contiguous and cover ``0 .. N - 1`` in order. A segment's tokens carry ``token_dim`` values; the sequence's
``P`` is the largest of them and the channels ``token_dim .. P - 1`` of a shorter segment are zero
padding, which backbones never read (modality-specific input projections take ``x[..., :token_dim]``) and
always predict as zero, and which carry no loss.

``coords`` ``(N, 3)`` float32 holds each token's position ``(time in seconds, row, column)``: the centre
of its patch, with rows/columns in token units (``0`` for axes a modality does not have). Video and audio
tokens of the same clip share the time axis, so a frame and the audio at the same instant get the same
time coordinate; images sit at time 0. Rotary position embeddings read these coordinates.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Segment:
    """One modality's tokens: ``start .. start + length - 1``, ``token_dim`` valid channels, laid out on
    ``grid`` (row-major), e.g. ``(h, w)`` for images, ``(t, h, w)`` for video, ``(t,)`` for audio."""

    name: str
    start: int
    length: int
    token_dim: int
    grid: tuple[int, ...]

    @property
    def stop(self) -> int:
        return self.start + self.length

    @property
    def tokens(self) -> slice:
        return slice(self.start, self.stop)


@dataclass(frozen=True, eq=False)
class TokenLayout:
    """The segments of a token sequence (see the module docstring). ``coords`` ``(N, 3)`` float32."""

    segments: tuple[Segment, ...]
    coords: Tensor

    def __post_init__(self) -> None:
        pos = 0
        for s in self.segments:
            if s.start != pos or s.length < 1 or s.token_dim < 1:
                raise ValueError(f"segments must be contiguous, non-empty and ordered; got {self.segments}")
            pos = s.stop
        if tuple(self.coords.shape) != (pos, 3):
            raise ValueError(f"coords must be (N, 3) = ({pos}, 3); got {tuple(self.coords.shape)}")
        names = [s.name for s in self.segments]
        if len(set(names)) != len(names):
            raise ValueError(f"segment names must be distinct; got {names}")

    @property
    def num_tokens(self) -> int:
        return self.segments[-1].stop

    @property
    def token_dim(self) -> int:
        """``P``: the largest segment token dim (the width of the shared ``(B, N, P)`` tensor)."""
        return max(s.token_dim for s in self.segments)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.segments)

    def segment(self, name: str) -> Segment:
        for s in self.segments:
            if s.name == name:
                return s
        raise KeyError(f"no segment {name!r} in this layout (segments: {', '.join(self.names)})")

    def per_token(self, values: dict[str, float], default: float | None = None) -> Tensor:
        """``(N,)`` float32: each token gets its segment's value from ``values`` (or ``default``).
        Raises KeyError naming the missing modality when neither is given."""
        out = torch.empty(self.num_tokens, dtype=torch.float32)
        for s in self.segments:
            if s.name in values:
                out[s.tokens] = float(values[s.name])
            elif default is not None:
                out[s.tokens] = float(default)
            else:
                raise KeyError(f"no value for modality {s.name!r} (given: {', '.join(values) or 'none'})")
        return out

    def segment_ids(self) -> Tensor:
        """``(N,)`` int64: the segment index of every token."""
        return torch.cat([torch.full((s.length,), i, dtype=torch.long) for i, s in enumerate(self.segments)])

    @staticmethod
    def single(name: str, grid: tuple[int, ...], token_dim: int, coords: Tensor | None = None) -> "TokenLayout":
        """One segment over ``grid``; default coords: time 0 and, for a 2-D grid, (row, column)."""
        n = int(torch.Size(grid).numel())
        if coords is None:
            coords = torch.zeros(n, 3)
            if len(grid) == 2:
                rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
                coords[:, 1], coords[:, 2] = rows.reshape(-1).float(), cols.reshape(-1).float()
        return TokenLayout((Segment(name, 0, n, int(token_dim), tuple(int(g) for g in grid)),), coords.float())
