"""Backbone ``mmdit``: the FLUX-style multimodal transformer of the Self-Flow paper ([note:flux-mmdit]).

Architecture (FLUX.2 ``Flux2``; ``S`` modality segments of the :class:`~zoo.core.layout.TokenLayout`)::

    h_s = x_in[s](x[:, seg_s, :P_s]) + modality_embed[s] + y_embedder(y)   # per segment (B, n_s, D)
    c = t_embedder(t) + y_embedder(y)                           # (K, D): per sample or per distinct (sample, t)
    m_s = double_mod[s](c)  (6D),  m = single_mod(c)  (3D)      # per block, or (shared) once per forward
    for block in double_blocks:   # own weights per segment, joint attention over all N tokens
        h_s = h_s + gate1_s * proj_s(attn(rope(qknorm(qkv_s(mod(norm(h_s), m_s))))))   (q, k, v concatenated)
        h_s = h_s + gate2_s * swiglu_s(mod(norm(h_s), m_s))
    h = cat_s(h_s)                                              # (B, N, D), layout order
    for block in single_blocks:   # shared weights, FLUX parallel attention + MLP
        u = mod(norm(h), m);  h = h + gate * linear2(cat(attn(rope(qknorm(qkv(u)))), swiglu_in(u)))
    pred_s = final[s](h_s, c), zero-padded to P                 # (B, n_s, P_s) -> (B, n_s, P)

``mod(x, shift, scale) = x * (1 + scale) + shift``; LayerNorms without affine (eps 1e-6); QK RMS-norm with a
learned scale per head channel (FLUX ``QKNorm``); bias on the qkv projections only (the paper's "bias on the
qkv projections"; FLUX.2 has none elsewhere); SwiGLU MLPs ``Linear(D, 2M) -> silu(a) * b -> Linear(M, D)``
with ``M = int(D * mlp_ratio)``; rotary positions (``positions``, default 3-D RoPE) on ``layout.coords``.

Shared modulation (our reading of FLUX.2's ``double_stream_modulation_img/_txt`` and
``single_stream_modulation``): one ``SiLU -> Linear(D, 6D)`` per segment for the double blocks and one
``SiLU -> Linear(D, 3D)`` for the single blocks, evaluated once per forward and **the same vectors used by
every block of that type** (not sized per block). Each segment's output head has its own ``Linear(D, 2D)``.

Initialisation (adaLN-Zero, DiT): xavier-uniform linears, zero biases; N(0, 0.02) for the label table, the
timestep MLP and the modality embeddings; QK-norm scales 1; the shared modulation layers, the heads'
modulation and the output projections **zero**, so every gate is 0 (each block starts as the identity) and
``pred`` starts at 0. (Zeroing the residual branch projections as well would leave gate and branch with zero
gradients forever; only the gates are zeroed.)

Per-token timesteps (Self-Flow): ``t`` :class:`~zoo.core.time.GroupedTimes` or ``(B, N)``; the conditioning
and all modulation layers run once per ``(sample, group)`` (or distinct ``(sample, t)``) row and are indexed
per token; a ``t`` shared by all tokens equals the ``(B,)``
path. Block indices for ``taps`` / ``stop_after`` are 1-based over double then single blocks; a double
block's feature is its segments' states concatenated in layout order ``(B, N, D)``. With Self-Flow's
``round(0.3 D)`` / ``round(0.7 D)`` at ``D = 7 + 14 = 21``, student block 6 is the 6th double block and
teacher block 15 the 8th single block.

Weight names: ``x_in.<segment>``, ``modality_embed.<segment>``, ``double_blocks.{i}.streams.<segment>.*``,
``double_mod.{i or 0}.<segment>.1``, ``single_blocks.{i}.*``, ``single_mod.{i or 0}.1``, ``final.<segment>.*`` -- segment names
(modalities) key the modality-specific weights, so a mixed-modality checkpoint's layers transfer by name.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from registry.kinds import BACKBONES, POSITIONS
from zoo.backbones.common import FinalLayer, build_device, check_forward_args, conditioning, modulate, per_token
from zoo.core.layout import TokenLayout
from zoo.core.params import ZooParams
from zoo.core.time import Times
from zoo.core.types import BackboneOut
from zoo.layers.attention import build_attention
from zoo.layers.embed import LabelEmbedder, TimestepEmbedder
from zoo.layers.positions import RopeParams


class MmditParams(ZooParams):
    """FLUX-style MMDiT; presets ``tiny``, ``small`` and the paper's ``625M``; field defaults are ``625M``."""

    type: Literal["mmdit"] = Field(..., description="FLUX-style multimodal transformer: double-stream blocks "
                                                    "(weights per modality) then single-stream blocks.")
    hidden: int = Field(1152, gt=0, description="Width D (divisible by heads).")
    heads: int = Field(16, gt=0, description="Attention heads; head dim = hidden / heads (paper: 72 = 3 x 24).")
    double_blocks: int = Field(7, ge=0, description="Double-stream blocks (own weights per modality segment, "
                                                    "joint attention over all tokens).")
    single_blocks: int = Field(14, ge=0, description="Single-stream blocks (shared weights, parallel attention "
                                                     "and MLP), after the double blocks.")
    mlp_ratio: float = Field(4.0, gt=0, description="SwiGLU hidden width M = int(hidden * mlp_ratio).")
    qk_norm: bool = Field(True, description="RMS-normalise q and k per head (learned scale) before positions.")
    modulation: Literal["per_block", "shared"] = Field(
        "per_block", description="per_block = each block has its own adaLN modulation from the conditioning (DiT); "
                                 "shared = FLUX.2's one modulation per block type, computed once per forward (the "
                                 "625M preset). On 2-core CPU budgets shared modulation learned class labels about "
                                 "half as fast (digits, 1000 steps: class accuracy 0.39).")
    positions: "PositionSpec" = Field(  # noqa: F821 (resolved by registry.spec.rebuild)
        default_factory=lambda: RopeParams(type="rope"),
        description="Position encoding applied to q and k (default 3-D RoPE over (time, row, column)).")
    attention: "AttentionSpec | None" = Field(  # noqa: F821
        None, description="Attention backend; null = xformers on CUDA when it works, else sdpa (chosen at build).")
    abs_pos: bool = Field(
        False, description="Also add a learned absolute position embedding per token (N, D) to the input (FLUX has "
                           "none). RoPE alone is relative: full attention cannot tell where the frame edges or the "
                           "clip start are, which bouncing-digit clips need (walls, the burst at t = 0).")

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"hidden": 64, "heads": 4, "double_blocks": 2, "single_blocks": 2},
        "small": {"hidden": 384, "heads": 8, "double_blocks": 4, "single_blocks": 8},
        "625M": {"hidden": 1152, "heads": 16, "double_blocks": 7, "single_blocks": 14, "mlp_ratio": 4.0,
                 "modulation": "shared"},
    }
    field_aliases: ClassVar[dict[str, tuple[str, ...]]] = {"depth": ("double_blocks", "single_blocks")}

    @property
    def depth(self) -> int:
        """Blocks in all: ``double_blocks + single_blocks`` (what Self-Flow's tap blocks count)."""
        return self.double_blocks + self.single_blocks

    @model_validator(mode="after")
    def _check(self) -> "MmditParams":
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        if self.depth < 1:
            raise ValueError("double_blocks + single_blocks must be at least 1")
        POSITIONS.build(self.positions, head_dim=self.hidden // self.heads)  # ValueError on e.g. too many rope axes
        return self




class RMSNorm(nn.Module):
    """``(..., d)`` -> ``(..., d)``: ``x / rms(x) * scale`` computed in fp32, returned in ``x.dtype``."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps) * self.scale.float()).to(x.dtype)


class SwiGLU(nn.Module):
    """``(..., D)`` -> ``(..., D)``: ``fc1`` (D -> 2M, halves a, b) -> ``silu(a) * b`` -> ``fc2`` (M -> D)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(a) * b)


class _QKV(nn.Module):
    """``(B, n, D)`` -> q, k, v ``(B, n, H, Dh)``: ``qkv`` Linear (bias), optional per-head RMS-norm of q, k."""

    def __init__(self, dim: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = RMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(dim // heads) if qk_norm else nn.Identity()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).unbind(2)
        return self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype), v


class _Stream(nn.Module):
    """One segment's weights in a double block: ``norm1 -> qkv``, ``proj``, ``norm2 -> mlp``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = _QKV(dim, heads, qk_norm)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = SwiGLU(dim, int(dim * mlp_ratio))


class DoubleBlock(nn.Module):
    """Double-stream block. ``hs``: per segment ``(B, n_s, D)``; ``mods``: per segment ``(B, 1 or n_s, 6D)``
    (shift, scale, gate for attention, then for the MLP); ``cos, sin`` ``(N, Dh/2)``; ``attn_mask`` optional
    bool ``(B, N, N)``. Attention is joint over the concatenation of all segments (layout order)."""

    def __init__(self, names: tuple[str, ...], dim: int, heads: int, mlp_ratio: float, qk_norm: bool,
                 attn_fn: Any, positions: Any):
        super().__init__()
        self.names, self.heads = names, heads
        self.streams = nn.ModuleDict({s: _Stream(dim, heads, mlp_ratio, qk_norm) for s in names})
        self.attn_fn, self.positions = attn_fn, positions  # weightless callables, not submodules

    def forward(self, hs: list[Tensor], mods: list[Tensor], cos: Tensor, sin: Tensor,
                attn_mask: Tensor | None) -> list[Tensor]:
        chunks = [m.chunk(6, dim=-1) for m in mods]    # per segment: shift1, scale1, gate1, shift2, scale2, gate2
        qkv = [self.streams[name].attn(modulate(self.streams[name].norm1(h), ch[0], ch[1]))
               for name, h, ch in zip(self.names, hs, chunks)]
        q, k, v = (_cat([p[i] for p in qkv]) for i in range(3))              # (B, N, H, Dh)
        q, k = self.positions.apply(q, k, cos, sin)
        a = self.attn_fn(q, k, v) if attn_mask is None else self.attn_fn(q, k, v, attn_mask)
        a = a.flatten(2)                                                      # (B, N, D)
        out, start = [], 0
        for name, h, ch in zip(self.names, hs, chunks):
            st, n = self.streams[name], h.shape[1]
            h = h + ch[2] * st.proj(a[:, start:start + n])
            out.append(h + ch[5] * st.mlp(modulate(st.norm2(h), ch[3], ch[4])))
            start += n
        return out


class SingleBlock(nn.Module):
    """Single-stream block (FLUX parallel): ``x`` ``(B, N, D)``; ``mod`` ``(B, 1 or N, 3D)`` (shift, scale,
    gate); ``u = mod(norm(x))``; ``x + gate * linear2(cat(attn(qkv(u)), silu(a) * b))`` with ``a, b = mlp_in(u)``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qk_norm: bool, attn_fn: Any, positions: Any):
        super().__init__()
        self.mlp_hidden = int(dim * mlp_ratio)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = _QKV(dim, heads, qk_norm)
        self.mlp_in = nn.Linear(dim, 2 * self.mlp_hidden, bias=False)
        self.linear2 = nn.Linear(dim + self.mlp_hidden, dim, bias=False)
        self.attn_fn, self.positions = attn_fn, positions

    def forward(self, x: Tensor, mod: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None) -> Tensor:
        shift, scale, gate = mod.chunk(3, dim=-1)
        u = modulate(self.norm(x), shift, scale)
        q, k, v = self.attn(u)
        q, k = self.positions.apply(q, k, cos, sin)
        a = self.attn_fn(q, k, v) if attn_mask is None else self.attn_fn(q, k, v, attn_mask)
        g, b = self.mlp_in(u).chunk(2, dim=-1)
        return x + gate * self.linear2(torch.cat([a.flatten(2), F.silu(g) * b], dim=-1))



def _cat(xs: list[Tensor], dim: int = 1) -> Tensor:
    return xs[0] if len(xs) == 1 else torch.cat(xs, dim=dim)


@BACKBONES.register
class Mmdit(nn.Module):
    """The FLUX-style MMDiT backbone (see the module docstring).

    Args:
        params: :class:`MmditParams`.
        token_dim: ``P``, the shared token width (``layout.token_dim``).
        grid: the modality's token grid (used only to build the default layout).
        num_classes: class labels ``0 .. num_classes - 1``; 0 = unconditional. ``null_label = num_classes``.
        layout: the modality's :class:`TokenLayout`; None = ``TokenLayout.single("image", grid, token_dim)``.

    Example::

        net = Mmdit(MmditParams(type="mmdit", preset="tiny"), token_dim=20, grid=(1,), num_classes=0,
                    layout=av_layout)                 # e.g. video (token_dim 12) + audio (token_dim 20)
        out = net(x, t, None, taps=(1,))              # x (B, N, 20), t (B,) or (B, N) -> out.pred (B, N, 20)
    """

    Params = MmditParams

    def __init__(self, params: MmditParams, *, token_dim: int, grid: tuple[int, ...], num_classes: int,
                 layout: TokenLayout | None = None):
        super().__init__()
        grid = tuple(int(g) for g in grid)
        if layout is None:
            layout = TokenLayout.single("image", grid, int(token_dim))
        if int(token_dim) != layout.token_dim:
            raise ValueError(f"token_dim {token_dim} differs from the layout's token dim {layout.token_dim}")
        bad = [s.name for s in layout.segments if not s.name.isidentifier()]
        if bad:
            raise ValueError(f"segment names must be identifiers (they key the weights); got {bad}")
        self.params, self.layout, self.grid = params, layout, grid
        self.hidden, self.heads = params.hidden, params.heads
        self.depth = params.double_blocks + params.single_blocks
        self.num_double = params.double_blocks
        self.token_dim, self.num_tokens = layout.token_dim, layout.num_tokens
        self.num_classes = int(num_classes)
        self.null_label = self.num_classes
        d, names = self.hidden, layout.names
        attn_fn = build_attention(params.attention, build_device())
        self.positions = POSITIONS.build(params.positions, head_dim=d // self.heads)
        self.attention_backend = attn_fn
        self.register_buffer("coords", layout.coords.detach().float().to(torch.get_default_device()),
                             persistent=False)  # (N, 3), a function of the layout, not a weight

        self.x_in = nn.ModuleDict({s.name: nn.Linear(s.token_dim, d) for s in layout.segments})
        self.modality_embed = nn.ParameterDict({s: nn.Parameter(torch.zeros(d)) for s in names})
        self.pos_embed = nn.Parameter(torch.zeros(self.num_tokens, d)) if params.abs_pos else None  # (N, D)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(self.num_classes, d)
        self.shared = params.modulation == "shared"
        copies_d, copies_s = (1, 1) if self.shared else (params.double_blocks, params.single_blocks)
        self.double_mod = nn.ModuleList(nn.ModuleDict({s: nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d)) for s in names})
                                        for _ in range(copies_d))
        self.single_mod = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(d, 3 * d)) for _ in range(copies_s))
        args = (d, self.heads, params.mlp_ratio, params.qk_norm, attn_fn, self.positions)
        self.double_blocks = nn.ModuleList(DoubleBlock(names, *args) for _ in range(params.double_blocks))
        self.single_blocks = nn.ModuleList(SingleBlock(*args) for _ in range(params.single_blocks))
        self.final = nn.ModuleDict({s.name: FinalLayer(d, s.token_dim) for s in layout.segments})
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Xavier-uniform linears, zero biases; N(0, 0.02) label table, timestep MLP, modality embeddings;
        shared modulation, head modulation and output projections zero (blocks start as identity)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for p in self.modality_embed.values():
            nn.init.normal_(p, std=0.02)
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed, std=0.02)
        zero = [*(m[-1] for md in self.double_mod for m in md.values()), *(m[-1] for m in self.single_mod),
                *(f.adaLN_modulation[-1] for f in self.final.values()), *(f.linear for f in self.final.values())]
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # ------------------------------------------------------------------------------------ conditioning
    def _conditioning(self, t: Times, y: Tensor, n: int) -> tuple[Tensor, Tensor | None]:
        """``c`` ``(K, D)`` and the token -> pair index ``(B, N)`` (None when ``t`` is ``(B,)``, ``K = B``);
        for ``t`` ``(B, N)`` the pairs are the distinct ``(b, t[b, i])``, sorted by ``b`` then ``t``."""
        return conditioning(self.t_embedder, self.y_embedder, t, y, n)

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor, t: Times, y: Tensor | None, *, taps: tuple[int, ...] = (),
                stop_after: int | None = None, attn_mask: Tensor | None = None) -> BackboneOut:
        """Velocity prediction and tapped features.

        Args:
            x: ``(B, N, P)`` noisy tokens (channels past a segment's ``token_dim`` are ignored).
            t: RF time in [0, 1]: ``(B,)``, ``(B, N)`` or :class:`~zoo.core.time.GroupedTimes` (``(B, G)``
                times and each token's group; static shapes, the path of Self-Flow's two times per sample).
            y: ``(B,)`` int64 labels in ``0 .. num_classes`` (``num_classes`` = null), or None = all null.
            taps: 1-based block indices (double blocks first, then single) whose outputs ``(B, N, D)`` go
                into ``features``.
            stop_after: run blocks ``1 .. stop_after`` only and return ``pred=None``.
            attn_mask: optional bool ``(B, N, N)``, True where token ``i`` may attend to token ``j``, used by
                every block; None = full attention. Every row needs at least one True.

        Returns: ``BackboneOut(pred (B, N, P) with zero padding channels, features {k: (B, N, D)})``.
        """
        taps, y = check_forward_args(self, x, y, taps, stop_after, attn_mask)
        segs = self.layout.segments
        c, index = self._conditioning(t, y, self.num_tokens)
        idx = [None if index is None else index[:, s.tokens] for s in segs]   # (B, n_s) per segment
        cos, sin = self.positions.angles(self.coords)                          # (N, Dh/2) each
        last = self.depth if stop_after is None else stop_after
        features: dict[int, Tensor] = {}

        # the label embedding also enters every token directly (in-context, besides the modulation): through the
        # modulation alone, tiny CPU runs left the labels unused (the time embedding dominated c)
        y_tok = self.y_embedder(y)[:, None]                                    # (B, 1, D)
        hs = [self.x_in[s.name](x[:, s.tokens, : s.token_dim]) + self.modality_embed[s.name] + y_tok for s in segs]
        if self.pos_embed is not None:
            hs = [h + self.pos_embed[s.tokens] for h, s in zip(hs, segs)]
        h: Tensor | None = None                                                # (B, N, D) once single blocks run
        if self.num_double:
            mods: list[Tensor] = []
            for k, block in enumerate(self.double_blocks[:last], start=1):
                if not mods or not self.shared:
                    table = self.double_mod[0 if self.shared else k - 1]
                    mods = [per_token(table[s.name](c), i) for s, i in zip(segs, idx)]       # (B, 1 or n_s, 6D)
                hs = block(hs, mods, cos, sin, attn_mask)
                if k in taps:
                    features[k] = _cat(hs)
        if last > self.num_double:
            h = _cat(hs)                                                       # (B, N, D)
            mod: Tensor | None = None
            for k, block in enumerate(self.single_blocks[: last - self.num_double], start=self.num_double + 1):
                if mod is None or not self.shared:
                    mod = per_token(self.single_mod[0 if self.shared else k - self.num_double - 1](c), index)  # (B, 1|N, 3D)
                h = block(h, mod, cos, sin, attn_mask)
                if k in taps:
                    features[k] = h
        if stop_after is not None:
            return BackboneOut(None, features)
        outs = []
        for j, (s, i) in enumerate(zip(segs, idx)):
            o = self.final[s.name](hs[j] if h is None else h[:, s.tokens], c, i)  # (B, n_s, P_s)
            outs.append(F.pad(o, (0, self.token_dim - s.token_dim)))
        return BackboneOut(_cat(outs), features)

    def shard_units(self) -> list[nn.Module]:
        """The double-stream then the single-stream blocks, in order (:func:`zoo.core.protocols.shard_units`)."""
        return [*self.double_blocks, *self.single_blocks]

    # ------------------------------------------------------------------------------------------- cost
    def flops(self, num_tokens: int) -> float:
        """Analytic forward FLOPs (2 x MACs) for one sample of ``num_tokens`` tokens sharing one t, the
        tokens split over the segments in the layout's proportions (exact for ``num_tokens = N``).

        MACs (sit's convention: linears and attention matmuls; norms, RoPE, softmax and element-wise ops not
        counted): every block ``N (4 D^2 + 3 D M)`` (qkv, proj / linear2's attention part, SwiGLU) +
        ``2 N^2 D`` (scores and weighted sum); modulation ``S 6 D^2`` per double and ``3 D^2`` per single block
        (once per block type when shared)
        + ``S 2 D^2`` (heads); input / output projections ``2 sum_s n_s P_s D``; timestep MLP ``256 D + D^2``.
        """
        n, d = int(num_tokens), self.hidden
        m = int(d * self.params.mlp_ratio)
        segs = self.layout.segments
        s = len(segs)
        block = n * (4 * d * d + 3 * d * m) + 2 * n * n * d
        io = sum(2 * seg.token_dim * d * n * seg.length / self.num_tokens for seg in segs)
        mod = (6 * s * d * d * len(self.double_mod) if self.num_double else 0) + 3 * d * d * len(self.single_mod)
        macs = self.depth * block + mod + 2 * s * d * d + io + self.t_embedder.frequency_dim * d + d * d
        return 2.0 * macs
