"""What the DiT-family backbones (``sit``, ``mmdit``) share: the checks of ``forward``'s arguments, the
per-sample, per-(sample, group) or per-(sample, t) conditioning ``c = t_embedder(t) + y_embedder(y)``, the
adaLN helpers (``modulate``, ``per_token``), the modulated output head ``FinalLayer`` and ``build_device``."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from zoo.core.time import GroupedTimes, Times


def check_forward_args(net: Any, x: Tensor, y: Tensor | None, taps: tuple[int, ...], stop_after: int | None,
                       attn_mask: Tensor | None) -> tuple[tuple[int, ...], Tensor]:
    """Validate a backbone's ``forward`` arguments; returns ``(taps as ints, y (B,))`` (null labels for None).

    ``net`` gives ``depth`` (blocks, 1-based for ``taps`` / ``stop_after``), ``num_tokens`` (N), ``token_dim``
    (P) and ``null_label``. ``x`` must be ``(B, N, P)``, ``y`` ``(B,)`` or None, ``attn_mask`` None or bool
    ``(B, N, N)``; raises ``ValueError`` naming the offending argument.
    """
    taps = tuple(int(k) for k in taps)
    depth = net.depth
    bad = [k for k in taps if not 1 <= k <= depth]
    if bad:
        raise ValueError(f"taps {bad} are outside the blocks 1..{depth}")
    if stop_after is not None:
        if not 1 <= stop_after <= depth:
            raise ValueError(f"stop_after={stop_after} is outside the blocks 1..{depth}")
        late = [k for k in taps if k > stop_after]
        if late:
            raise ValueError(f"taps {late} lie after stop_after={stop_after}; those blocks are not run")
    n, p = net.num_tokens, net.token_dim
    if x.dim() != 3 or x.shape[1] != n or x.shape[2] != p:
        raise ValueError(f"x must be (B, N, P) = (B, {n}, {p}); got {tuple(x.shape)}")
    bsz = x.shape[0]
    if y is None:
        y = torch.full((bsz,), net.null_label, dtype=torch.long, device=x.device)
    elif tuple(y.shape) != (bsz,):
        raise ValueError(f"y must be (B,) = ({bsz},); got {tuple(y.shape)}")
    if attn_mask is not None and (attn_mask.dtype != torch.bool or tuple(attn_mask.shape) != (bsz, n, n)):
        raise ValueError(f"attn_mask must be bool (B, N, N) = ({bsz}, {n}, {n}); "
                         f"got {attn_mask.dtype} {tuple(attn_mask.shape)}")
    return taps, y


def conditioning(t_embedder: nn.Module, y_embedder: nn.Module, t: Times, y: Tensor,
                 n: int) -> tuple[Tensor, Tensor | None]:
    """``c = t_embedder(t) + y_embedder(y)`` ``(K, D)`` and the token -> row index ``(B, N)`` into ``c``
    (None when every sample has one time: ``K = B``, rows broadcast over tokens).

    * ``t`` ``(B,)``: ``K = B``, index None.
    * ``t`` :class:`~zoo.core.time.GroupedTimes` (``values`` ``(B, G)``, ``index`` ``(B, N)``): ``K = B G``,
      row ``b G + g`` for sample ``b``, group ``g``; static shapes, no host synchronisation (``G = 1`` is
      the ``(B,)`` path). Every adaLN MLP then runs on ``B G`` rows and each token reads its row.
    * ``t`` ``(B, N)`` (arbitrary per-token times): the rows are the distinct ``(b, t[b, i])``, sorted by
      ``b`` then ``t`` (``torch.unique``: a data-dependent size, and a host sync on CUDA).
    """
    b = y.shape[0]
    if isinstance(t, GroupedTimes):
        values, index = t.values, t.index
        if values.dim() != 2 or values.shape[0] != b or not values.is_floating_point():
            raise ValueError(f"GroupedTimes.values must be float (B, G) with B = {b}; got {values.dtype} "
                             f"{tuple(values.shape)}")
        if tuple(index.shape) != (b, n) or index.dtype != torch.long:
            raise ValueError(f"GroupedTimes.index must be int64 (B, N) = ({b}, {n}); got {index.dtype} "
                             f"{tuple(index.shape)}")
        g = values.shape[1]
        if g == 1:
            return t_embedder(values[:, 0]) + y_embedder(y), None
        c = t_embedder(values.reshape(-1)) + y_embedder(y[:, None].expand(b, g).reshape(-1))   # (B G, D)
        return c, index + g * torch.arange(b, device=index.device)[:, None]
    if t.dim() == 1 and t.shape[0] == b:
        return t_embedder(t) + y_embedder(y), None
    if t.dim() != 2 or tuple(t.shape) != (b, n):
        raise ValueError(f"t must have shape (B,) = ({b},) or (B, N) = ({b}, {n}), or be GroupedTimes; "
                         f"got {tuple(t.shape)}")
    t_vals, t_idx = torch.unique(t, return_inverse=True)                 # (U,), (B, N)
    u = t_vals.numel()
    keys = torch.arange(b, device=t.device)[:, None] * u + t_idx           # (B, N) pair key b * U + t-rank
    pairs, index = torch.unique(keys, return_inverse=True)                 # (K,), (B, N)
    return t_embedder(t_vals[pairs % u]) + y_embedder(y[pairs // u]), index


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: ``x * (1 + scale) + shift`` (``shift``/``scale`` broadcast over tokens)."""
    return x * (1 + scale) + shift


def per_token(mod: Tensor, index: Tensor | None) -> Tensor:
    """Per-pair modulation ``(K, m)`` -> per-token ``(B, N, m)`` (rows picked by ``index`` ``(B, N)``), or, with
    ``index=None`` (one pair per sample, ``K = B``), ``(B, 1, m)`` broadcast over tokens."""
    return mod[:, None] if index is None else mod[index]


class FinalLayer(nn.Module):
    """The output head: ``x`` ``(B, N, D)`` -> ``(B, N, P)``: LayerNorm (no affine), (shift, scale) from ``c``
    ``(K, D)`` through ``SiLU -> Linear(D, 2D)``, then ``linear``."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor, c: Tensor, index: Tensor | None) -> Tensor:
        shift, scale = per_token(self.adaLN_modulation(c), index).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def build_device() -> torch.device:
    """The device modules are being created on (``with torch.device(...)``); meta counts as CPU."""
    dev = torch.get_default_device()
    return torch.device("cpu") if dev.type == "meta" else dev
