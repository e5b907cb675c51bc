"""Backbone ``sit``: the SiT / DiT transformer with adaLN-Zero, feature taps and per-token timesteps.

Architecture (as ``facebookresearch/DiT`` and ``willisma/SiT`` ``models.py``)::

    h = x_embedder(x) + pos_embed                        # (B, N, P) -> (B, N, D), fixed 2-D sin-cos positions
    c = t_embedder(t) + y_embedder(y)                    # per sample (B, D), or per distinct (sample, t) pair
    for block in blocks:                                 # adaLN-Zero, 6 modulation vectors from SiLU -> Linear(c)
        h = h + gate_msa * attn(modulate(norm1(h), shift_msa, scale_msa))
        h = h + gate_mlp * mlp(modulate(norm2(h), shift_mlp, scale_mlp))
    pred = final_layer(h, c)                             # LayerNorm, 2 modulation vectors, Linear D -> P

with ``modulate(x, shift, scale) = x * (1 + scale) + shift``, LayerNorms without affine (eps 1e-6), qkv
bias, MLP ``Linear(D, r D) -> GELU(tanh) -> Linear(r D, D)`` and DiT's initialisation (xavier-uniform
linears, N(0, 0.02) for the label table and the timestep MLP, adaLN and output layer zero).

Tokens arrive already patchified: ``x`` ``(B, N, P)`` with ``N = h * w`` in row-major grid order and
``P = p * p * C`` in **(ph, pw, c) order** (channel fastest), i.e. DiT's ``unpatchify`` order
(``x.reshape(B, h, w, p, p, C)``) -- what ``zoo.modalities.image`` produces. The model predicts tokens in
the same layout. Time is RF time (:mod:`zoo.core.time`); nothing here flips it.

Per-token timesteps (Self-Flow, [note:per-token-adaln]): ``t`` may be :class:`~zoo.core.time.GroupedTimes`
(``(B, G)`` times and each token's group, what the objectives pass) or ``(B, N)`` (arbitrary times). The
conditioning, the timestep MLP and every adaLN MLP then run once per ``(sample, group)`` row (or per
*distinct* ``(sample, t)`` pair, found with ``torch.unique``, for ``(B, N)``), and each token reads its row of
the modulation (an index that ``torch.compile`` fuses into the modulate ops); a ``t`` shared by all tokens of
a sample gives bit-identical outputs to the ``(B,)`` path (same matrices in the same order).

Weight names follow DiT so official SiT/DiT checkpoints convert with few changes: ``x_embedder`` (a
``Linear(P, D)``; DiT's conv ``x_embedder.proj.weight`` ``(D, C, p, p)`` maps to
``w.permute(0, 2, 3, 1).reshape(D, p * p * C)``), ``pos_embed`` ``(1, N, D)`` (a persistent buffer),
``t_embedder.mlp.{0,2}``, ``y_embedder.embedding_table``, ``blocks.{i}.attn.qkv``, ``blocks.{i}.attn.proj``,
``blocks.{i}.mlp.fc1/fc2``, ``blocks.{i}.adaLN_modulation.1``, ``final_layer.adaLN_modulation.1``,
``final_layer.linear`` (with ``learn_sigma`` the DiT output has ``2C`` channels per token in (ph, pw, c)
order; keep the first ``C``: ``w.view(p, p, 2C, D)[:, :, :C].reshape(p * p * C, D)``).
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from registry.kinds import BACKBONES
from zoo.backbones.common import FinalLayer, build_device, check_forward_args, conditioning, modulate, per_token
from zoo.core.params import ZooParams
from zoo.core.layout import TokenLayout
from zoo.core.time import Times
from zoo.core.types import BackboneOut
from zoo.layers.attention import build_attention
from zoo.layers.embed import LabelEmbedder, TimestepEmbedder, sincos_pos_embed_2d

_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}  # hidden, depth, heads


class SiTParams(ZooParams):
    """SiT/DiT transformer; presets ``tiny`` and DiT's ``S|B|L|XL / 2|4|8``; field defaults are B/2."""

    type: Literal["sit"] = Field(..., description="SiT/DiT transformer with adaLN-Zero and per-token timesteps.")
    hidden: int = Field(768, gt=0, description="Width D (divisible by heads and by 4).")
    depth: int = Field(12, gt=0, description="Number of transformer blocks.")
    heads: int = Field(12, gt=0, description="Attention heads; head dim = hidden / heads.")
    patch: int = Field(2, gt=0, description="Patch size p of the latent grid (the modality patchifies with it).")
    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden width = int(hidden * mlp_ratio).")
    attention: "AttentionSpec | None" = Field(  # noqa: F821 (resolved by registry.spec.rebuild)
        None, description="Attention backend; null = xformers on CUDA when it works, else sdpa (chosen at build).")

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"hidden": 64, "depth": 4, "heads": 4, "patch": 2},
        **{f"{name}/{p}": {"hidden": d, "depth": n, "heads": h, "patch": p}
           for name, (d, n, h) in _SIZES.items() for p in (2, 4, 8)},
    }

    @model_validator(mode="after")
    def _check_width(self) -> "SiTParams":
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        if self.hidden % 4:
            raise ValueError(f"hidden {self.hidden} must be divisible by 4 (2-D sin-cos positions)")
        return self




class Attention(nn.Module):
    """Multi-head self-attention: ``x`` ``(B, N, D)`` -> ``(B, N, D)`` via ``qkv`` (bias) and ``proj``;
    the score computation is the pluggable backend ``attn_fn`` (q, k, v ``(B, N, H, Dh)``)."""

    def __init__(self, dim: int, heads: int, attn_fn: Any):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.attn_fn = attn_fn  # a plain callable without weights (not a submodule)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """``attn_mask``: optional bool ``(B, N, N)``, True where query ``i`` may attend to key ``j``."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).unbind(2)  # (B, N, H, Dh) each
        out = self.attn_fn(q, k, v) if attn_mask is None else self.attn_fn(q, k, v, attn_mask)
        return self.proj(out.reshape(b, n, d))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, backend={self.attn_fn!r}"


class Mlp(nn.Module):
    """``(..., D)`` -> ``(..., D)``: ``fc1`` -> GELU(tanh) -> ``fc2``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    """adaLN-Zero block. ``x`` ``(B, N, D)``; ``c`` ``(K, D)`` conditioning per (sample, t) pair;
    ``index`` ``(B, N)`` pair of each token, or None when ``K = B`` (one t per sample); ``attn_mask``
    optional bool ``(B, N, N)`` (True = may attend), passed to the attention."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, attn_fn: Any):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, attn_fn)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor, index: Tensor | None, attn_mask: Tensor | None = None) -> Tensor:
        mod = per_token(self.adaLN_modulation(c), index)                      # (B, 1 or N, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), attn_mask)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))



@BACKBONES.register
class SiT(nn.Module):
    """The SiT/DiT backbone (see the module docstring).

    Args:
        params: :class:`SiTParams`.
        token_dim: ``P``, values per token (``C * p * p``).
        grid: ``(h, w)`` token grid; ``N = h * w``.
        num_classes: class labels ``0 .. num_classes - 1``; 0 = unconditional. ``null_label = num_classes``.
        layout: the modality's :class:`~zoo.core.layout.TokenLayout` (must have one segment), optional.

    Example::

        net = SiT(SiTParams(type="sit", preset="tiny"), token_dim=16, grid=(8, 8), num_classes=10)
        out = net(x, t, y, taps=(2,))     # x (B, 64, 16), t (B,) or (B, 64), y (B,) -> out.pred (B, 64, 16)
    """

    Params = SiTParams

    def __init__(self, params: SiTParams, *, token_dim: int, grid: tuple[int, ...], num_classes: int,
                 layout: TokenLayout | None = None):
        super().__init__()
        if layout is not None and len(layout.segments) != 1:
            raise ValueError(f"backbone 'sit' takes one modality; this layout has {', '.join(layout.names)} "
                             f"(use backbone 'mmdit' for several)")
        grid = tuple(int(g) for g in grid)
        if len(grid) != 2:
            raise ValueError(f"backbone 'sit' needs a 2-D token grid (h, w); got {grid}")
        self.params = params
        self.hidden, self.depth, self.heads = params.hidden, params.depth, params.heads
        self.token_dim, self.grid, self.num_classes = int(token_dim), grid, int(num_classes)
        self.num_tokens = grid[0] * grid[1]
        self.null_label = self.num_classes
        d = self.hidden
        attn_fn = build_attention(params.attention, build_device())

        self.x_embedder = nn.Linear(self.token_dim, d)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(d, grid)[None], persistent=True)  # (1, N, D)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(self.num_classes, d)
        self.blocks = nn.ModuleList(SiTBlock(d, self.heads, params.mlp_ratio, attn_fn) for _ in range(self.depth))
        self.final_layer = FinalLayer(d, self.token_dim)
        self.attention_backend = attn_fn
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier-uniform linears with zero bias; N(0, 0.02) for the label table
        and the timestep MLP; adaLN modulation and the output layer zero (each block starts as identity)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [*(b.adaLN_modulation[-1] for b in self.blocks), self.final_layer.adaLN_modulation[-1],
                      self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # ------------------------------------------------------------------------------------ conditioning
    def _conditioning(self, t: Times, y: Tensor, n: int) -> tuple[Tensor, Tensor | None]:
        """``c`` ``(K, D)`` and the token -> pair index ``(B, N)`` (None when ``t`` is ``(B,)``, ``K = B``).

        For ``t`` ``(B, N)`` the pairs are the distinct ``(b, t[b, i])``, sorted by ``b`` then ``t``; the
        t-embedding, label embedding and (later) every adaLN MLP run once per pair, not per token.
        """
        return conditioning(self.t_embedder, self.y_embedder, t, y, n)

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor, t: Times, y: Tensor | None, *, taps: tuple[int, ...] = (),
                stop_after: int | None = None, attn_mask: Tensor | None = None) -> BackboneOut:
        """Velocity prediction and tapped features.

        Args:
            x: ``(B, N, P)`` noisy tokens.
            t: RF time in [0, 1]: ``(B,)``, ``(B, N)`` or :class:`~zoo.core.time.GroupedTimes` (``(B, G)``
                times and each token's group; static shapes, the path of Self-Flow's two times per sample).
            y: ``(B,)`` int64 labels in ``0 .. num_classes`` (``num_classes`` = null), or None = all null.
            taps: 1-based block indices whose outputs ``(B, N, D)`` go into ``features``.
            stop_after: run blocks ``1 .. stop_after`` only and return ``pred=None``.
            attn_mask: optional bool ``(B, N, N)``, True where token ``i`` may attend to token ``j``, used
                by every block's attention (e.g. Self-Flow's attention separation); None = full attention.
                Every row needs at least one True (a row with none gives NaN in every backend).
        """
        taps, y = check_forward_args(self, x, y, taps, stop_after, attn_mask)
        c, index = self._conditioning(t, y, self.num_tokens)
        h = self.x_embedder(x) + self.pos_embed                               # (B, N, D)
        last = self.depth if stop_after is None else stop_after
        features: dict[int, Tensor] = {}
        for k, block in enumerate(self.blocks[:last], start=1):
            h = block(h, c, index, attn_mask)
            if k in taps:
                features[k] = h
        if stop_after is not None:
            return BackboneOut(None, features)
        return BackboneOut(self.final_layer(h, c, index), features)

    def shard_units(self) -> list[nn.Module]:
        """The transformer blocks, in order (:func:`zoo.core.protocols.shard_units`)."""
        return list(self.blocks)

    # ------------------------------------------------------------------------------------------- cost
    def flops(self, num_tokens: int) -> float:
        """Analytic forward FLOPs (2 x MACs) for one sample of ``num_tokens`` tokens sharing one t.

        MACs: per block ``N (4 D^2 + 2 D r D)`` (qkv, proj, MLP; ``12 D^2 N`` at r = 4) + ``2 N^2 D``
        (scores and weighted sum) + ``6 D^2`` (adaLN, once per sample); plus ``2 D^2`` final adaLN,
        ``2 N P D`` input/output projections and ``256 D + D^2`` for the timestep MLP. Norms, softmax and
        element-wise ops are not counted (DiT's convention; XL/2 at N = 256 gives 118.6 GMAC).
        Per-token timesteps add ``8 D^2`` MACs per extra distinct (sample, t) pair, not counted here.
        """
        n, d, p = int(num_tokens), self.hidden, self.token_dim
        mlp = int(d * self.params.mlp_ratio)
        block = n * (4 * d * d + 2 * d * mlp) + 2 * n * n * d + 6 * d * d
        macs = self.depth * block + 2 * d * d + 2 * n * p * d + (self.t_embedder.frequency_dim * d + d * d)
        return 2.0 * macs
