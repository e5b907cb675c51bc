"""Teacher ``vit``: the project's own ViT with the DINOv2 architecture (REPA's default encoder is DINOv2
ViT-B/14, [note:repa-recipe]), loading DINOv2 weights from a LOCAL file.

Architecture (``facebookresearch/dinov2`` ``vision_transformer.py``, hub models): 14x14 patch conv, a CLS
token, optional register tokens (inserted after CLS, after the positions are added), learned positions for a
``pos_grid x pos_grid`` grid (37 = 518 / 14 for the hub weights) resampled bicubically to the input grid,
pre-norm blocks ``x + ls1(attn(norm1(x)))``, ``x + ls2(mlp(norm2(x)))`` with LayerScale, a GELU MLP (a SwiGLU
MLP for G/14), LayerNorm eps 1e-6 everywhere, and a final LayerNorm. ``features`` returns the normed patch
tokens (``x_norm_patchtokens``: no CLS, no registers), which is what REPA aligns to.

Weights, either layout (chosen by the keys found):

* original DINOv2 state dict (``dinov2_vitb14_pretrain.pth``): ``patch_embed.proj``, ``cls_token``,
  ``pos_embed``, ``register_tokens``, ``mask_token``, ``blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,
  mlp.fc1|w12,mlp.fc2|w3,ls2.gamma}``, ``norm``;
* Hugging Face ``Dinov2Model`` ``model.safetensors``: ``embeddings.{cls_token,mask_token,position_embeddings,
  register_tokens,patch_embeddings.projection}``, ``encoder.layer.N.{norm1,attention.attention.{query,key,
  value},attention.output.dense,layer_scale1.lambda1,norm2,mlp.fc1|weights_in,mlp.fc2|weights_out,
  layer_scale2.lambda1}``, ``layernorm`` (q, k, v are concatenated into ``qkv``).

Preprocessing (REPA ``preprocess_raw_image``): [-1, 1] -> [0, 1], grey -> RGB, ImageNet mean/std, then a
bicubic resize to ``image_size`` (REPA: 224 for 256-px images, so the 16 x 16 patch grid equals SiT-XL/2's
token grid). ``image_size`` null = ``patch x token grid`` (REPA's rule on any grid).

Positions: DINOv2 resamples the 37 x 37 table per call with scale factor ``(g + 0.1) / 37`` and no antialias
(the defaults here). REPA instead resamples it once, at load, with timm's ``resample_abs_pos_embed`` (bicubic to
the exact size, antialiased) and then runs at that grid ([REPA-code] ``utils.py`` ``load_encoders``); set
``interpolate_offset: 0`` and ``interpolate_antialias: true`` to reproduce that exactly (the REPA spec does).
Checked against Hugging Face ``transformers`` 5.23 ``Dinov2Model`` (GELU and SwiGLU, square and non-square
inputs, offset 0): identical outputs.
"""
from __future__ import annotations

import re
from typing import Any, ClassVar, Iterable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from registry.kinds import TEACHERS
from zoo.core.params import TeacherParams
from zoo.teachers.common import (ImageTeacher, image_problems, imagenet_input, load_checked, read_state_dict,
                                 strip_prefix)

_DINOV2 = {"S/14": (384, 12, 6, "mlp"), "B/14": (768, 12, 12, "mlp"), "L/14": (1024, 24, 16, "mlp"),
           "G/14": (1536, 40, 24, "swiglu")}  # width, depth, heads, ffn ([DINOv2-code] hub/backbones.py)


def _preset(width: int, depth: int, heads: int, ffn: str, reg: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"width": width, "depth": depth, "heads": heads, "ffn": ffn, "patch": 14, "pos_grid": 37}
    if reg:  # [DINOv2-code] hub/backbones.py: *_reg4 models use 4 registers, antialias=True, offset 0
        out.update(registers=4, interpolate_antialias=True, interpolate_offset=0.0)
    return out


class ViTTeacherParams(TeacherParams):
    """DINOv2-architecture ViT; presets ``tiny`` (tests: random init with ``weights: null``), ``S/14``,
    ``B/14``, ``L/14``, ``G/14`` (DINOv2 hub sizes) and ``*-reg4`` (with 4 register tokens); defaults = B/14."""

    type: Literal["vit"] = Field(..., description="DINOv2-architecture ViT (REPA's encoder family).")
    weights: str | None = Field(..., description="Local weights file: original DINOv2 .pth or Hugging Face "
                                                 "Dinov2Model .safetensors (REPA: torch.hub dinov2_vitb14). null = "
                                                 "random init, for tests only (a spec with null is rejected).")
    width: int = Field(768, gt=0, description="Embedding width D ([DINOv2-code] B/14: 768).")
    depth: int = Field(12, gt=0, description="Transformer blocks ([DINOv2-code] B/14: 12).")
    heads: int = Field(12, gt=0, description="Attention heads ([DINOv2-code] B/14: 12).")
    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden = width * mlp_ratio ([DINOv2-code]: 4); SwiGLU "
                                                    "uses ((int(hidden * 2 / 3) + 7) // 8) * 8.")
    ffn: Literal["mlp", "swiglu"] = Field("mlp", description="Block MLP: GELU 'mlp' (S/B/L) or 'swiglu' "
                                                             "([DINOv2-code] G/14: swiglufused).")
    patch: int = Field(14, gt=0, description="Patch size ([DINOv2-code]: 14).")
    registers: int = Field(0, ge=0, description="Register tokens ([DINOv2-code] *_reg4: 4, else 0).")
    pos_grid: int = Field(37, gt=0, description="Grid of the stored position table ([DINOv2-code] img_size 518 "
                                                "/ 14 = 37).")
    interpolate_offset: float = Field(0.1, ge=0, description="Offset in DINOv2's position resampling scale "
                                                             "factor ((grid + offset) / pos_grid; [DINOv2-code]: "
                                                             "0.1, reg4 models: 0; 0 = resample to the exact size).")
    interpolate_antialias: bool = Field(False, description="Antialias in the bicubic position resampling "
                                                           "([DINOv2-code]: False, reg4 models: True).")
    image_size: int | None = Field(None, gt=0, description="Encoder input size (square), a multiple of patch. "
                                                           "null = patch x token grid, REPA's rule (224 for "
                                                           "SiT-XL/2 on 256 px).")
    layer_norm_eps: float = Field(1e-6, gt=0, description="LayerNorm eps ([DINOv2-code]: 1e-6).")

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"width": 32, "depth": 2, "heads": 2, "patch": 14, "pos_grid": 4, "registers": 2},
        **{k: _preset(*v, reg=False) for k, v in _DINOV2.items()},
        **{f"{k}-reg4": _preset(*v, reg=True) for k, v in _DINOV2.items()},
    }

    @property
    def feature_dim(self) -> int:
        """Channels F of the features (the width)."""
        return self.width

    @property
    def mlp_hidden(self) -> int:
        h = int(self.width * self.mlp_ratio)
        return (int(h * 2 / 3) + 7) // 8 * 8 if self.ffn == "swiglu" else h

    def feature_grid(self, input_shape: tuple[int, ...] | None = None,
                     token_grid: tuple[int, ...] | None = None) -> tuple[int, int]:
        """The ``(h, w)`` patch grid of ``features``: ``image_size / patch``, or the token grid when null."""
        if self.image_size is not None:
            return (self.image_size // self.patch,) * 2
        if token_grid is None:
            return (self.pos_grid, self.pos_grid)
        return tuple(int(g) for g in token_grid)  # type: ignore[return-value]

    def flops(self, token_grid: tuple[int, ...] | None = None) -> float:
        """Forward FLOPs (2 x MACs) per image: patch conv, per block ``T (4 D^2 + MLP) + 2 T^2 D`` with ``T``
        tokens (patches + CLS + registers); norms and softmax not counted (the backbone's convention)."""
        gh, gw = self.feature_grid(None, token_grid)
        n, d = gh * gw, self.width
        t = n + 1 + self.registers
        mlp = (3 if self.ffn == "swiglu" else 2) * d * self.mlp_hidden
        macs = n * 3 * self.patch ** 2 * d + self.depth * (t * (4 * d * d + mlp) + 2 * t * t * d)
        return 2.0 * macs

    def resolve(self, spec: Any) -> "ViTTeacherParams":
        """Write REPA's default ``image_size = patch x token grid`` into the spec (square token grids)."""
        if self.image_size is not None:
            return self
        try:
            latent = spec.autoencoder.latent_shape(spec.data.sample_shape())
            p = spec.backbone.patch
            gh, gw = latent[-2] // p, latent[-1] // p
        except Exception:  # a layout this rule does not cover: leave it to the runtime
            return self
        return self.model_copy(update={"image_size": self.patch * gh}) if gh == gw else self

    def problems(self, spec: Any) -> Iterable[tuple[str, str]]:
        yield from image_problems(spec, "teacher 'vit'")
        if self.weights is None:
            yield ("weights",
                   "weights null means random initialisation, which is for tests only; give a local DINOv2 file")
        if self.image_size is not None and self.image_size % self.patch:
            yield "image_size", f"{self.image_size} is not a multiple of patch {self.patch}"
        if self.width % self.heads:
            yield "heads", f"width {self.width} is not divisible by heads {self.heads}"


# ----------------------------------------------------------------------------------------- modules
class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> ``(B, D, H / p, W / p)``."""
        return self.proj(x)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T, D)`` -> ``(B, T, D)``; qkv rows are ``[q; k; v]``, heads contiguous inside each."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float = 1.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, p: ViTTeacherParams):
        super().__init__()
        d = p.width
        self.norm1, self.attn, self.ls1 = nn.LayerNorm(d, eps=p.layer_norm_eps), Attention(d, p.heads), LayerScale(d)
        self.norm2, self.ls2 = nn.LayerNorm(d, eps=p.layer_norm_eps), LayerScale(d)
        self.mlp = (SwiGLU if p.ffn == "swiglu" else Mlp)(d, p.mlp_hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


@TEACHERS.register
class ViTTeacher(ImageTeacher):
    """Frozen DINOv2-style ViT. ``features(raw (B, C, H, W) in [-1, 1], grid=None) -> (B, h*w, width)``.

    Args:
        params: :class:`ViTTeacherParams` (``weights`` loaded here; null = random init, tests only).
        input_shape: one data sample ``(C, H, W)``, C in {1, 3}.
        token_grid: the generator's token grid; with ``image_size`` null it fixes the encoder input to
            ``patch x token_grid``. ``features(..., grid=...)`` may give it per call instead.
    """

    Params = ViTTeacherParams

    def __init__(self, params: ViTTeacherParams, input_shape: tuple[int, ...] | None = None,
                 token_grid: tuple[int, ...] | None = None, **deps: Any):
        super().__init__(params, "vit", input_shape, token_grid)
        if params.width % params.heads:
            raise ValueError(f"teacher 'vit': width {params.width} is not divisible by heads {params.heads}")
        d = self.feature_dim = params.width
        self.patch_embed = PatchEmbed(params.patch, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + params.pos_grid ** 2, d))
        self.register_tokens = nn.Parameter(torch.zeros(1, params.registers, d)) if params.registers else None
        self.mask_token = nn.Parameter(torch.zeros(1, d))  # unused here; kept so DINOv2 files load strictly
        self.blocks = nn.ModuleList(Block(params) for _ in range(params.depth))
        self.norm = nn.LayerNorm(d, eps=params.layer_norm_eps)
        self._init_random()
        if params.weights is not None:
            self.load_weights(params.weights)
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def _init_random(self) -> None:
        """DINOv2's init: trunc-normal(0.02) linears / positions, normal(1e-6) CLS and registers, LayerScale 1."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)

    # ------------------------------------------------------------------------------------- weights
    def load_weights(self, path: str) -> None:
        """Load a local DINOv2 file (original or Hugging Face layout); errors name the path or the first bad key."""
        sd = strip_prefix(read_state_dict(path, "teacher 'vit'", "a DINOv2 state dict: the original "
                                          "dinov2_vit*14_pretrain.pth or a Hugging Face Dinov2Model model.safetensors"))
        if any(k.startswith(("embeddings.", "encoder.layer.", "dinov2.")) for k in sd):
            sd = hf_to_dinov2(sd)
        load_checked(self, sd, "teacher 'vit'", path, optional=("mask_token",))

    # ------------------------------------------------------------------------------------- forward
    def interpolate_pos_encoding(self, gh: int, gw: int) -> Tensor:
        """The position table ``(1, 1 + gh*gw, D)`` for a ``gh x gw`` patch grid: the stored one when the grid
        matches (DINOv2 returns it unchanged for square inputs), else its patch part resampled bicubically
        (in fp32) with DINOv2's scale factor ``(g + offset) / pos_grid`` (or the exact size when offset is 0)."""
        p, pos = self.params, self.pos_embed
        m = p.pos_grid
        if gh * gw == m * m and gh == gw:
            return pos
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:].float()
        patch_pos = patch_pos.reshape(1, m, m, -1).permute(0, 3, 1, 2)            # (1, D, m, m)
        kw: dict[str, Any] = ({"scale_factor": ((gh + p.interpolate_offset) / m, (gw + p.interpolate_offset) / m)}
                              if p.interpolate_offset else {"size": (gh, gw)})
        patch_pos = F.interpolate(patch_pos, mode="bicubic", antialias=p.interpolate_antialias, **kw)
        if tuple(patch_pos.shape[-2:]) != (gh, gw):
            raise RuntimeError(f"position resampling gave {tuple(patch_pos.shape[-2:])}, expected {(gh, gw)}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, gh * gw, -1).to(pos.dtype)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def forward_tokens(self, x: Tensor) -> Tensor:
        """Preprocessed images ``(B, 3, H, W)`` (H, W multiples of patch) -> all normed tokens
        ``(B, 1 + R + N, D)`` in DINOv2's order CLS, registers, patches."""
        x = self.patch_embed(x)                                                  # (B, D, gh, gw)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)                                         # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + self.interpolate_pos_encoding(gh, gw).to(x.dtype)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1).to(x.dtype), x[:, 1:]], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def input_size(self, grid: tuple[int, ...] | None = None) -> tuple[int, int]:
        """Encoder input ``(H, W)``: ``image_size`` squared, else ``patch x`` (``grid`` or the build-time token
        grid, or the stored position grid when neither is known)."""
        if self.params.image_size is not None:
            return (self.params.image_size,) * 2
        gh, gw = self.params.feature_grid(None, grid if grid is not None else self.token_grid)
        return (self.params.patch * gh, self.params.patch * gw)

    def features(self, raw: Tensor, grid: tuple[int, ...] | None = None) -> Tensor:
        """``raw`` ``(B, C, H, W)`` in [-1, 1] -> normed patch tokens ``(B, h*w, width)``, row-major on the
        grid ``input_size(grid) / patch`` (``grid``: the token grid to match when ``image_size`` is null)."""
        x = imagenet_input(raw, self.input_size(grid))
        return self.forward_tokens(x.to(self.pos_embed.dtype))[:, 1 + self.params.registers:]

    def flops(self, grid: tuple[int, ...] | None = None) -> float:
        return self.params.flops(grid if grid is not None else self.token_grid)


# -------------------------------------------------------------------------------- layout conversion
_HF_RENAMES = [  # (pattern, replacement); hub files use the first names, transformers >= 5 in memory the second
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.mask_token$", "mask_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.register_tokens$", "register_tokens"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.norm([12])\.", r"blocks.\1.norm\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.(output\.dense|o_proj)\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.fc([12])\.", r"blocks.\1.mlp.fc\2."),
    (r"^encoder\.layer\.(\d+)\.mlp\.weights_in\.", r"blocks.\1.mlp.w12."),
    (r"^encoder\.layer\.(\d+)\.mlp\.(weights_out|down_proj)\.", r"blocks.\1.mlp.w3."),
    (r"^layernorm\.", "norm."),
]
_HF_FUSED = {  # pieces concatenated (in this order, along dim 0) into one original tensor
    re.compile(r"^encoder\.layer\.(\d+)\.attention\.(?:attention\.)?(query|key|value|q_proj|k_proj|v_proj)\."
               r"(weight|bias)$"): ("attn.qkv", {"query": 0, "key": 1, "value": 2, "q_proj": 0, "k_proj": 1, "v_proj": 2}),
    re.compile(r"^encoder\.layer\.(\d+)\.mlp\.(gate_proj|up_proj)\.(weight|bias)$"):
        ("mlp.w12", {"gate_proj": 0, "up_proj": 1}),
}


def hf_to_dinov2(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face ``Dinov2Model`` keys (hub ``model.safetensors`` names, or the transformers >= 5 in-memory
    names ``q_proj/k_proj/v_proj/o_proj``, ``gate_proj/up_proj/down_proj``) -> original DINOv2 keys;
    ``query, key, value`` are concatenated into ``qkv`` (and ``gate, up`` into ``w12``) in that order. Keys it
    does not know are kept as they are (and then reported as unexpected)."""
    sd = {k[len("dinov2."):] if k.startswith("dinov2.") else k: v for k, v in sd.items()}
    out: dict[str, Tensor] = {}
    fused: dict[tuple[str, str, str], dict[int, tuple[str, Tensor]]] = {}
    for k, v in sd.items():
        hit = next(((m, target, order) for pat, (target, order) in _HF_FUSED.items() if (m := pat.match(k))), None)
        if hit is not None:
            m, target, order = hit
            fused.setdefault((m.group(1), target, m.group(3)), {})[order[m.group(2)]] = (k, v)
            continue
        for pat, rep in _HF_RENAMES:
            if re.match(pat, k):
                k = re.sub(pat, rep, k)
                break
        out[k] = v
    for (i, target, kind), parts in fused.items():
        n = 3 if target == "attn.qkv" else 2
        if sorted(parts) != list(range(n)):  # incomplete: keep the pieces, the fused key is reported as missing
            out.update(dict(parts.values()))
            continue
        out[f"blocks.{i}.{target}.{kind}"] = torch.cat([parts[j][1] for j in range(n)], dim=0)
    return out
