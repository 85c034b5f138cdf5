"""Plain ViT encoder with timm's parameter names (SPEC §6).

The state_dict of :class:`VisionTransformer` loads with ``strict=True`` into timm's
``VisionTransformer(global_pool='token', class_token=True, num_classes=0)`` of the same size:
``patch_embed.proj``, ``cls_token``, ``pos_embed`` (1, 1 + N, D), ``blocks.N.{norm1, attn.qkv,
attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``.

The self-supervised models feed the encoder their own token sequences (``patch_tokens`` ->
a gather op -> ``forward_tokens``); ``forward_features``/``embed`` run a whole image.
"""
from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..validate import check_float
from .topk_attention import TopKAttention

ATTN_IMPLS = ("sdpa", "xformers", "flash")
WEIGHT_INITS = ("xavier", "trunc_normal")


# --------------------------------------------------------------------------------------------
# Fixed 2-D sin-cos position embedding (MAE's util/pos_embed.py, in torch).
# --------------------------------------------------------------------------------------------
def get_1d_sincos_pos_embed(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, embed_dim): ``[sin(pos·ω), cos(pos·ω)]``, ω = 10000^(-2i/D)."""
    if embed_dim % 2:
        raise ValueError(f"sincos embedding needs an even width, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = pos.reshape(-1).double()[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = False) -> torch.Tensor:
    """MAE's fixed embedding: (gh·gw [+1], D) fp32; half the width encodes each grid axis.

    Like MAE, the first half is computed from the meshgrid's first output (the column index), so
    the table equals MAE's numpy one; a zero row is prepended for the cls token when asked.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sincos embedding needs a width divisible by 4, got {embed_dim}")
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    grid_w, grid_h = torch.meshgrid(torch.arange(gw, dtype=torch.float64), torch.arange(gh, dtype=torch.float64),
                                    indexing="xy")  # numpy's meshgrid(w, h): both (gh, gw)
    emb = torch.cat([get_1d_sincos_pos_embed(embed_dim // 2, grid_w), get_1d_sincos_pos_embed(embed_dim // 2, grid_h)],
                    dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], num_prefix: int = 1,
                          offset: float | None = 0.1) -> torch.Tensor:
    """Resize a (P + g·g, D) table to ``grid`` by bicubic interpolation of the patch part, in the
    table's own dtype.

    ``offset=0.1`` is DINO's ``interpolate_pos_encoding`` (vision_transformer.py): ``interpolate``
    with ``scale_factor = ((gh + 0.1) / g, (gw + 0.1) / g)`` rather than a target size. The 0.1
    only makes the output size floor to (gh, gw), but PyTorch then samples with the given scale
    factor instead of g / gh, so the values differ from ``size=grid`` (37% normwise for 8x8 -> 4x4).
    The quirk is the official computation; ``offset=None`` interpolates to ``size=grid``.
    """
    patch = pos_embed[num_prefix:]
    n, dim = patch.shape
    side = int(math.isqrt(n))
    if side * side != n:
        raise ValueError(f"cannot interpolate a non-square position table of {n} patches")
    if (side, side) == tuple(grid):
        return pos_embed
    patch = patch.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if offset is None:
        patch = F.interpolate(patch, size=tuple(grid), mode="bicubic", align_corners=False)
    else:
        scale = ((grid[0] + offset) / math.sqrt(n), (grid[1] + offset) / math.sqrt(n))
        patch = F.interpolate(patch, scale_factor=scale, mode="bicubic")
        if tuple(patch.shape[-2:]) != tuple(grid):
            raise ValueError(f"interpolating the {side}x{side} position table by {scale} gave "
                             f"{tuple(patch.shape[-2:])}, not the {tuple(grid)} grid")
    patch = patch.permute(0, 2, 3, 1).reshape(-1, dim)
    return torch.cat([pos_embed[:num_prefix], patch], dim=0)


# --------------------------------------------------------------------------------------------
# Blocks (timm names: norm1, attn.{qkv,proj}, norm2, mlp.{fc1,fc2}).
# --------------------------------------------------------------------------------------------
def dense_attention(q, k, v, impl: str = "sdpa", dropout_p: float = 0.0) -> torch.Tensor:
    """Softmax attention over (B, H, N, d); xformers / flash-attn are imported only when asked for."""
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    if impl == "xformers":
        try:
            import xformers.ops as xops
        except ImportError as e:
            raise ImportError("attn_impl='xformers' needs xformers (pip install xformers)") from e
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), p=dropout_p)
        return out.transpose(1, 2)
    if impl == "flash":
        try:
            from flash_attn import flash_attn_func
        except ImportError as e:
            raise ImportError("attn_impl='flash' needs flash-attn (pip install flash-attn)") from e
        if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"attn_impl='flash' runs fp16/bf16 on CUDA only, got {q.dtype} on {q.device} "
                             "(use autocast, or attn_impl='sdpa')")
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p)
        return out.transpose(1, 2)
    raise ValueError(f"unknown attn_impl {impl!r}; choose from {ATTN_IMPLS}")


class Attention(nn.Module):
    """timm ``Attention``: fused qkv projection, dense multi-head attention, output projection."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_impl: str = "sdpa",
                 attn_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"unknown attn_impl {attn_impl!r}; choose from {ATTN_IMPLS}")
        self.num_heads, self.head_dim, self.attn_impl, self.attn_drop = num_heads, dim // num_heads, attn_impl, attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = dense_attention(q, k, v, self.attn_impl, self.attn_drop if self.training else 0.0)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth per sample (drops the whole residual branch); identity at rate 0 or in eval.

    Draws as timm 0.3.2's and DINO's ``drop_path`` do (``floor(keep + U[0, 1))`` per sample, then
    ``x / keep · mask``), so the same RNG state drops the same samples as the official code.
    """

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = rate

    def forward(self, x):
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1 - self.rate
        mask = (keep + torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)).floor_()
        return x.div(keep) * mask


def without_drop_path(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every stochastic-depth layer at rate 0: the official teachers
    (SdAE's models_teacher, DINO's main_dino.py) are built without drop_path. Serves this file's
    :class:`DropPath` (``rate``) and timm's (``drop_prob``), so timm encoders get the same teacher."""
    twin = copy.deepcopy(module)
    for m in twin.modules():
        if isinstance(m, DropPath):
            m.rate = 0.0
        elif hasattr(m, "drop_prob"):
            m.drop_prob = 0.0
    return twin


class Block(nn.Module):
    """Pre-norm transformer block; ``topk`` (int, fraction of N) makes it MixedAE's homologous block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 topk: int | float | None = None, attn_impl: str = "sdpa", drop_path: float = 0.0,
                 backend: str | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if topk is None:
            self.attn = Attention(dim, num_heads, qkv_bias, attn_impl)
        else:
            self.attn = TopKAttention(dim, num_heads, qkv_bias, topk=topk, backend=backend)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def fixed_grid_tokens(encoder, imgs: torch.Tensor, method: str) -> torch.Tensor:
    """The patch tokens (B, L, D) of images at the encoder's own size. The masked methods index its
    fixed position table, masks and decoder by position, so another size is refused by name (it
    failed deep inside, in a reshape or an add of mismatched tables)."""
    size = encoder.img_size
    if tuple(imgs.shape[-2:]) != (size, size):
        raise ValueError(f"{method}: the images are {imgs.shape[-2]}x{imgs.shape[-1]} px, the model is built for "
                         f"{size}x{size} (img_size)")
    return encoder.patch_tokens(imgs)


def make_blocks(depth, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, topk=None, attn_impl="sdpa",
                drop_path_rate=0.0, backend=None) -> nn.ModuleList:
    """``depth`` blocks; ``topk`` is one value for every block or a per-layer sequence (None = dense)."""
    topks = list(topk) if isinstance(topk, (list, tuple)) else [topk] * depth
    if len(topks) != depth:
        raise ValueError(f"topk lists {len(topks)} layers but depth is {depth}")
    # the official "stochastic depth decay rule"; on the CPU, so a default device (meta, cuda) never applies
    rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
    return nn.ModuleList(Block(dim, num_heads, mlp_ratio, qkv_bias, topks[i], attn_impl, rates[i], backend)
                         for i in range(depth))


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size  # read by the timm export
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):  # (B, C, H, W) -> (B, H/p · W/p, D)
        return self.proj(x).flatten(2).transpose(1, 2)


# --------------------------------------------------------------------------------------------
# The encoder.
# --------------------------------------------------------------------------------------------
class VisionTransformer(nn.Module):
    """ViT with a cls token and no head; timm-compatible names.

    ``pos_embed="sincos"`` is MAE's fixed table (a frozen parameter), ``"learned"`` DINO's
    trainable one. Other input resolutions interpolate the table bicubically (DINO's local crops).
    ``topk`` (one value or per layer) swaps blocks to top-K attention (MixedAE).
    ``weight_init="xavier"`` is MAE's ``initialize_weights`` (xavier-uniform linears and patch
    projection, normal(0.02) cls token); ``"trunc_normal"`` is timm 0.3.2's / DINO's (trunc-normal
    0.02 linears, cls token and learned table; the patch projection keeps PyTorch's Conv2d init).
    ``config`` holds the constructor arguments (:meth:`fresh` builds a newly initialised twin).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 pos_embed: str = "sincos", topk: int | float | Sequence | None = None, attn_impl: str = "sdpa",
                 drop_path_rate: float = 0.0, weight_init: str = "xavier", backend: str | None = None):
        super().__init__()
        self.config = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                           depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                           pos_embed=pos_embed, topk=topk, attn_impl=attn_impl, drop_path_rate=drop_path_rate,
                           weight_init=weight_init)
        check_float("drop_path_rate", drop_path_rate, ge=0.0, lt=1.0)  # 1 would drop every residual branch
        if weight_init not in WEIGHT_INITS:
            raise ValueError(f"weight_init must be one of {WEIGHT_INITS}, got {weight_init!r}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        if pos_embed not in ("sincos", "learned"):
            raise ValueError(f"pos_embed must be 'sincos' or 'learned', got {pos_embed!r}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.embed_dim, self.num_heads, self.backend = embed_dim, num_heads, backend
        self.grid = img_size // patch_size
        self.num_patches = self.grid ** 2
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, embed_dim),
                                      requires_grad=pos_embed == "learned")
        self.blocks = make_blocks(depth, embed_dim, num_heads, mlp_ratio, qkv_bias, topk, attn_impl,
                                  drop_path_rate, backend)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights(pos_embed, weight_init)

    def _init_weights(self, pos_embed: str, weight_init: str):
        with torch.no_grad():
            if pos_embed == "sincos":
                self.pos_embed.copy_(get_2d_sincos_pos_embed(self.embed_dim, self.grid, cls_token=True)[None])
            else:
                nn.init.trunc_normal_(self.pos_embed, std=0.02)
            if weight_init == "xavier":  # MAE models_mae.initialize_weights
                w = self.patch_embed.proj.weight
                nn.init.xavier_uniform_(w.view(w.shape[0], -1))
                nn.init.normal_(self.cls_token, std=0.02)
            else:  # timm 0.3.2 VisionTransformer.__init__ / DINO vision_transformer.py
                nn.init.trunc_normal_(self.cls_token, std=0.02)
        init_linears_and_norms(self.blocks, weight_init)

    def fresh(self, **overrides) -> "VisionTransformer":
        """A newly initialised encoder of the same configuration (``overrides`` replace entries)."""
        return VisionTransformer(**{**self.config, **overrides}, backend=self.backend)

    # --- pieces the self-supervised models compose -------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, p·p·C), MAE's patch layout (row-major patches, (p, q, c) inside)."""
        p = self.patch_size
        b, c, h, w = imgs.shape
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        x = imgs.reshape(b, c, h // p, p, w // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        p = self.patch_size
        gh, gw = grid or (self.grid, self.grid)
        c = x.shape[-1] // (p * p)
        x = x.reshape(x.shape[0], gh, gw, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, gh * p, gw * p)

    def patch_tokens(self, imgs: torch.Tensor) -> torch.Tensor:
        """Patch embeddings without position: (B, L, D)."""
        return self.patch_embed(imgs)

    def pos_embed_for(self, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """The (1 + L, D) position table for a ``grid`` of patches (interpolated when it differs)."""
        table = self.pos_embed[0]
        if grid is None or tuple(grid) == (self.grid, self.grid):
            return table
        return interpolate_pos_embed(table, tuple(grid))

    def cls_prefix(self, pos: torch.Tensor | None = None) -> torch.Tensor:
        """``cls_token + pos[0]`` as the (1, D) prefix of every sequence."""
        pos = self.pos_embed[0] if pos is None else pos
        return self.cls_token[0] + pos[:1]

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Run the blocks and the final norm over a ready token sequence (B, T, D)."""
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    # --- whole images -------------------------------------------------------------------------
    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1 + N, D) after the final norm; any multiple of the patch size."""
        p = self.patch_size
        grid = (imgs.shape[-2] // p, imgs.shape[-1] // p)
        pos = self.pos_embed_for(grid)
        x = self.patch_tokens(imgs) + pos[1:]
        cls = self.cls_prefix(pos).expand(x.shape[0], -1, -1)
        return self.forward_tokens(torch.cat([cls, x], dim=1))

    def embed(self, imgs: torch.Tensor) -> torch.Tensor:
        """The normalised cls token (B, D): timm's ``forward_head(pre_logits=True)`` with global_pool='token'."""
        return self.forward_features(imgs)[:, 0]

    forward = embed


def init_linears_and_norms(module: nn.Module, weight_init: str = "xavier") -> None:
    """``_init_weights`` of MAE (``"xavier"``: xavier-uniform linears) or of timm 0.3.2 / DINO
    (``"trunc_normal"``: trunc-normal 0.02 linears); zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            if weight_init == "xavier":
                nn.init.xavier_uniform_(m.weight)
            else:
                nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def set_backend(module: nn.Module, backend: str | None) -> nn.Module:
    """Point every submodule that has a ``backend`` attribute (models, encoders, TopKAttention) at ``backend``."""
    for m in module.modules():
        if hasattr(m, "backend"):
            m.backend = backend
        if hasattr(m, "_ema"):
            m._ema = None  # rebuilt with the new backend on the next update
    return module
