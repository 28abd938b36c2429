"""HiRes-LLaVA (arXiv 2407.08706): the model from slices to LLM embeddings, in the order an image travels.

slicing.py cuts an image into an overview and slices (paper 3.3); this file takes them from there: the token layout
with its separators (Fig. 2a), the SliceRestore Adapter (3.1), the frozen CLIP ViT run block by block with the SRA
inside (3.1), the samplers (3.2), the projector, and HiResLLaVA, which splices the image tokens into the LLM's input
(llama.py). Details the paper does not give are our reconstruction, marked "(design choice)"; they are named
constants or HiResConfig flags, each listed with its reason and its tensor shapes in docs/method.md.

Notation: m rows, n cols of slices; S base resolution; h = w tokens per side of one ViT image; L = h*w; D ViT width;
C LLM width; k sampler kernel. ViT blocks are numbered from 0 (clip.py).
"""
import itertools
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch.utils.checkpoint import checkpoint

from clip import CLIPConfig, build_vision_tower, default_adapter_layers
from conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX, Tokenizer, encode_conversation, encode_prompt, image_first
from llama import Llama, apply_lora, check_state_dict
from slicing import TILERS, grid_of, normalize, overlap_margin, preprocess

# the separators of token_layout as plain text tokens, so no new embedding rows (design choice, as
# LLaVA-UHD; docs/method.md#projector-and-separators)
SEPARATORS = {"sep_overview": "\n",  # (a) between the overview and the slices
              "sep_slice": ",",       # (b) between two slices of a row
              "sep_row": "\n"}        # (c) at the end of each row of slices
SRA_KERNEL = 3        # depthwise conv of the local fusion (design choice)
SAMPLERS = ("sms", "qformer", "avgpool")
# what each training stage trains (paper 4.1), by part of the model; the ViT and the LLM's weights stay frozen
STAGE_TRAINS = {1: ("sampler", "projector", "newline"),
                2: ("sra", "sampler", "projector", "newline", "lora")}
TRAIN_LLM = ("llm", "lora")  # HiResConfig.train_llm (the tiny preset): the whole LLM trains in both stages too


@dataclass
class HiResConfig:
    clip_preset: str = "vit-l-14-336"
    # the backbones; config.json stores those inside the run relative to the checkpoint folder (config_dict)
    clip_weights: str = ""          # open_clip checkpoint file (see clip.WEIGHTS_HELP)
    llm_path: str = ""              # HF directory of the LLM (Vicuna-7B-v1.5)
    tokenizer_path: str = ""        # sentencepiece .model; default <llm_path>/tokenizer.model
    max_slices: int = 16            # N
    upscale: bool = True            # double (m, n) when 4mn <= N (paper 3.3; off for EntityGrid-QA evaluation)
    slices: bool = True             # False: overview only (the no-slicing baseline)
    overview: bool = True           # False: slices only
    sra: bool = True                # SliceRestore Adapter on/off
    sra_layers: list = None         # 0-based ViT blocks; default: paper's 19-22 of 24, scaled (clip.py)
    sampler: str = "sms"            # "sms" | "qformer" | "avgpool"
    kernel: int = 2                 # k: (h/k)*(w/k) tokens per image
    sms_window: bool = False        # restrict each SMS query to its own k x k window (design choice, off)
    sample_overview: bool = True    # the overview also goes through the sampler (design choice)
    tiler: str = "hires"            # how an image is cut (slicing.TILERS): the paper's, or a peer's (no SRA)
    max_length: int = 0             # context of one spliced sequence (image tokens too); 0: the LLM's (Vicuna 4096)
    lora_rank: int = 128            # paper 4.1: rank 128, alpha 256; 0 disables LoRA
    lora_alpha: float = 256.0
    lora_dropout: float = 0.05      # LLaVA's LoRA dropout (design choice)
    train_llm: bool = False         # the whole LLM trains in both stages: the tiny preset's random stand-in for
                                    # Vicuna must learn language; the paper's Vicuna stays frozen (+ LoRA)
    # how it was trained to answer, which evaluation follows: the template of its last stage ("plain": stage 1, on
    # captions, never an instruction; "vicuna_v1": stage 2) and its multiple-choice answers ("letter": the option's
    # letter after LLaVA's prompt; "rank": the option's text, scored by ranking the options by likelihood)
    template: str = "vicuna_v1"
    mc: str = "letter"

    def __post_init__(self):
        clip_cfg = CLIPConfig.from_preset(self.clip_preset)
        layers = clip_cfg.layers
        if self.sra_layers is None:
            self.sra_layers = default_adapter_layers(layers)
        self.sra_layers = sorted(int(i) for i in self.sra_layers)
        if any(not 0 <= i < layers - 2 for i in self.sra_layers):
            raise ValueError(f"sra_layers {self.sra_layers} must lie before the feature block {layers - 2}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r} not in {SAMPLERS}")
        if self.kernel < 1 or clip_cfg.grid % self.kernel:
            raise ValueError(f"kernel {self.kernel} must divide the ViT token grid")
        if not (self.slices or self.overview):
            raise ValueError("at least one of slices and overview must be on")
        if self.max_slices < 1 or self.lora_rank < 0:
            raise ValueError("max_slices must be >= 1 and lora_rank >= 0")
        if self.template not in ("plain", "vicuna_v1") or self.mc not in ("letter", "rank"):
            raise ValueError(f"template {self.template!r} / mc {self.mc!r}: need plain|vicuna_v1 / letter|rank")
        if self.tiler not in TILERS:
            raise ValueError(f"tiler {self.tiler!r} not in {TILERS}")
        if self.tiler != "hires":
            self.sra = False  # the peers' tilers have no SliceRestore Adapter
        if self.tiler in ("overlap", "native") and self.sampler == "qformer":
            raise ValueError(f"the {self.tiler} tiler samples maps of any size; the qformer's queries are fixed")
        if not self.tokenizer_path and self.llm_path:
            self.tokenizer_path = os.path.join(self.llm_path, "tokenizer.model")

    def slicing(self, vit=None):
        """The keyword arguments of slicing.preprocess with which this model cuts an image for the ViT `vit` (a
        CLIPConfig; default: the preset's); the native tiler's budget is the hires tiler's token count on a
        2S x 2S image cut into 2 x 2 slices, EntityGrid-QA's canvas as it is evaluated (equal budget)."""
        vit = vit or CLIPConfig.from_preset(self.clip_preset)
        tokens = 0
        if self.tiler == "native":
            tokens = HiResConfig(**{**self.__dict__, "tiler": "hires"}).image_tokens((2, 2))
        return dict(tiler=self.tiler, base=vit.image_size, patch=vit.patch_size, max_slices=self.max_slices,
                    upscale=self.upscale, slices=self.slices, tokens=tokens)

    def layout(self, grid):
        """token_layout of one image whose slice grid is (m, n), with this config's overview and slices."""
        m, n = grid if self.slices else (0, 0)
        return token_layout(m, n, self.overview)

    def image_tokens(self, grid, seps=None):
        """LLM tokens of one image whose preprocess() grid is `grid`: for hires the count of its layout (seps: tokens
        per separator, default one each as with LLaMA's tokenizer; HiResLLaVA.image_tokens passes its
        tokenizer's); for anyres and overlap the overview, then each row of the stitched map and its newline; for
        native its merged tokens."""
        h = CLIPConfig.from_preset(self.clip_preset).grid
        per_slice = (h // self.kernel) ** 2
        overview = per_slice if self.sample_overview else h * h
        if self.tiler == "native":
            return grid[0] * grid[1]
        if self.tiler in ("anyres", "overlap"):
            rows, cols = self.map_size(grid)
            return overview * self.overview + rows * (cols + 1)
        return token_count(self.layout(grid), overview, per_slice, seps)

    def map_size(self, grid):
        """anyres and overlap: the (rows, cols) of an image's stitched token map after the sampler (anyres: its
        padding dropped, unpad)."""
        vit = CLIPConfig.from_preset(self.clip_preset)
        t = vit.grid // self.kernel                                          # tokens per side of a tile, sampled
        if self.tiler == "anyres":
            m, n, width, height = grid
            top, bottom, left, right = unpad(m * t, n * t, width, height)
            return bottom - top, right - left
        inner = vit.grid - 2 * overlap_margin(vit.image_size, vit.patch_size) // vit.patch_size  # a crop's interior
        return grid[0] * inner // self.kernel, grid[1] * inner // self.kernel


class PromptTooLong(ValueError):
    """A prompt (text + image tokens) that leaves no room in the LLM context for an answer."""


# ----------------------------------------------------------------------------------------------------------------
# the token layout (paper Fig. 2a)

def token_layout(m, n, overview=True):
    """One image as the LLM reads it, in order: the overview, separator (a) "sep_overview", then the m x n slices
    row by row (their row-major indices), separator (b) "sep_slice" between two slices of a row and (c) "sep_row"
    after each row. m = n = 0: the overview alone; overview=False: the slices alone. HiResLLaVA.encode_images
    assembles its image tokens from this list and token_count counts them from it."""
    layout = (["overview"] + (["sep_overview"] if m * n else [])) if overview else []
    for r in range(m):
        for c in range(n):
            layout += [r * n + c, "sep_slice" if c < n - 1 else "sep_row"]
    return layout


def token_count(layout, overview, per_slice, seps=None):
    """LLM tokens of a token_layout: `overview` tokens for the overview, per_slice for each slice, and seps[name]
    for each separator (default one token each, as "\n" and "," are for LLaMA's tokenizer)."""
    size = {"overview": overview, **(seps or {"sep_overview": 1, "sep_slice": 1, "sep_row": 1})}
    return sum(size[p] if isinstance(p, str) else per_slice for p in layout)


# ----------------------------------------------------------------------------------------------------------------
# SliceRestore Adapter (paper 3.1)

class CrossAttention(nn.Module):
    """Multi-head (cross-)attention with separate q/k/v/o projections, via scaled_dot_product_attention."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, ctx=None, mask=None):
        ctx = x if ctx is None else ctx
        B, Q, D = x.shape
        nh, hs = self.heads, D // self.heads
        q = self.q(x).view(B, Q, nh, hs).transpose(1, 2)                    # (B, nh, Q, hs)
        k = self.k(ctx).view(B, -1, nh, hs).transpose(1, 2)                 # (B, nh, K, hs)
        v = self.v(ctx).view(B, -1, nh, hs).transpose(1, 2)                 # (B, nh, K, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)         # (B, nh, Q, hs)
        return self.o(y.transpose(1, 2).reshape(B, Q, D))                   # (B, Q, D)


def merge(slices, m, n, h, w):
    """Slices (G*m*n, h*w, D) of G images, each image's slices row-major, -> G feature maps (G, D, m*h, n*w) with the
    slices on their grid."""
    D = slices.shape[-1]
    fmap = slices.view(-1, m, n, h, w, D).permute(0, 5, 1, 3, 2, 4)         # (G, D, m, h, n, w)
    return fmap.reshape(-1, D, m * h, n * w)


def split(fmap, m, n, h, w):
    """Inverse of merge: (G, D, m*h, n*w) -> (G*m*n, h*w, D)."""
    D = fmap.shape[1]
    slices = fmap.view(-1, D, m, h, n, w).permute(0, 2, 4, 3, 5, 1)         # (G, m, n, h, w, D)
    return slices.reshape(-1, h * w, D)


class SliceRestoreAdapter(nn.Module):
    """Merge the slices of one image, fuse locally (depthwise conv) + globally (pool to (h, w), self-attention,
    bilinear upsample), split back (paper 3.1). The output projection is zero-initialised (design choice) so an
    untrained adapter leaves the frozen ViT exactly unchanged."""

    def __init__(self, dim, heads, grid):
        super().__init__()
        self.grid = grid  # h = w of one slice
        self.local = nn.Conv2d(dim, dim, SRA_KERNEL, padding=SRA_KERNEL // 2, groups=dim)
        self.attn = CrossAttention(dim, heads)
        self.proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, slices, grid):
        """slices (G*m*n, L, D) of G images that share the grid (m, n), image by image -> (G*m*n, L, D), the SRA
        term added beside the block's attention. Each image is merged, fused and split on its own."""
        (m, n), h = grid, self.grid
        fmap = merge(slices, m, n, h, h)                                    # (G, D, m*h, n*w)
        pooled = F.adaptive_avg_pool2d(fmap, (h, h))                        # (G, D, h1, w1) = (h, w) (design choice)
        fused = self.attn(pooled.flatten(2).transpose(1, 2))                # (G, h*w, D)
        fused = fused.transpose(1, 2).reshape(-1, slices.shape[-1], h, h)   # (G, D, h, w)
        fused = F.interpolate(fused, size=fmap.shape[-2:], mode="bilinear", align_corners=False)  # (G, D, m*h, n*w)
        return self.proj(split(self.local(fmap) + fused, m, n, h, h))      # (G*m*n, L, D)


# ----------------------------------------------------------------------------------------------------------------
# the frozen CLIP ViT with the SRA inside its blocks (paper 3.1)

class VisionTower(nn.Module):
    """The frozen open_clip ViT (clip.py builds and loads it), run block by block: LLaVA's features are the output
    of the penultimate block (`mm_vision_select_layer=-2`), CLS dropped, no ln_post/proj -> (N, L, D). SliceRestore
    Adapters run inside their blocks, beside attention (vit_block)."""

    def __init__(self, cfg, weights=None):
        super().__init__()
        self.cfg = cfg
        self.vit = build_vision_tower(cfg, weights)
        self.vit.requires_grad_(False)
        self.vit.eval()
        # vit_block re-uses each block's own submodules: it relies on open_clip's default block layout
        from open_clip.transformer import ResidualAttentionBlock  # loaded by build_vision_tower already
        assert self.vit.transformer.batch_first
        assert all(type(b) is ResidualAttentionBlock for b in self.vit.transformer.resblocks)
        self.feature_layer = cfg.layers - 2  # LLaVA: the output of the penultimate block
        self.gradient_checkpointing = False  # recompute the blocks autograd runs through (SRA) in backward

    def train(self, mode=True):
        super().train(mode)
        self.vit.eval()  # frozen: always eval (no dropout anywhere, but keep it explicit)
        return self

    def forward(self, pixels, grids=None, adapters=None):
        """pixels (N, 3, S, S) normalised -> LLaVA features (N, L, D)."""
        return self.features(self.prefix(pixels, 0), 0, grids, adapters)

    def embed(self, pixels):
        """pixels (N, 3, H, W) -> (N, 1+H*W/p^2, D): patch embedding, CLS, positions, ln_pre. Images of another size
        than S x S (the native tiler) get the position embedding bicubically interpolated to their patch grid, as
        Qwen2-VL's and CLIP's readers of other sizes do; at S x S it is open_clip's own, uninterpolated."""
        vit = self.vit
        if tuple(pixels.shape[-2:]) == (self.cfg.image_size, self.cfg.image_size):
            return vit._embeds(pixels)
        x = vit.conv1(pixels)                                            # (N, D, H/p, W/p)
        rows, cols = x.shape[-2:]
        g, D = self.cfg.grid, x.shape[1]
        grid = vit.positional_embedding[1:].reshape(1, g, g, D).permute(0, 3, 1, 2)  # (1, D, g, g)
        grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
        pos = torch.cat([vit.positional_embedding[:1], grid.flatten(2)[0].t()])     # (1+rows*cols, D)
        cls = vit.class_embedding.expand(x.shape[0], 1, D).to(x.dtype)
        x = torch.cat([cls, x.flatten(2).transpose(1, 2)], dim=1) + pos.to(x.dtype)
        return vit.ln_pre(vit.patch_dropout(x))

    @torch.no_grad()
    def prefix(self, pixels, depth):
        """pixels (N, 3, H, W) normalised -> hidden states (N, 1+L, D) after the patch embedding and blocks
        0..depth-1 (no adapters): frozen in every stage, so they can be computed once per image and reused."""
        x = self.embed(pixels.to(self.vit.conv1.weight.dtype))
        for blk in self.vit.transformer.resblocks[:depth]:
            x = vit_block(blk, x)
        return x

    def features(self, x, start, grids=None, adapters=None):
        """x (N, 1+L, D): hidden states after blocks 0..start-1 (prefix) -> LLaVA features (N, L, D), CLS dropped.
        grids: the (m, n) of consecutive images, whose m*n slices x holds in order; adapters: {block: SRA}, each
        run inside its block over the slices of each image together."""
        adapters = adapters or {}
        if adapters and start > min(adapters):
            raise ValueError(f"a prefix of {start} blocks skips the adapter in block {min(adapters)}")
        if adapters and sum(m * n for m, n in grids) != x.shape[0]:
            raise ValueError(f"grids {grids} cover {sum(m * n for m, n in grids)} slices, x holds {x.shape[0]}")
        trains = torch.is_grad_enabled() and any(p.requires_grad for a in adapters.values() for p in a.parameters())
        first_grad = min(adapters) if trains else self.feature_layer + 1
        ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        x = x.to(self.vit.conv1.weight.dtype)
        for i in range(start, self.feature_layer + 1):
            run = partial(vit_block, self.vit.transformer.resblocks[i], sra=adapters.get(i), grids=grids)
            with torch.no_grad() if i < first_grad else nullcontext():  # no graph before the first trained SRA
                x = checkpoint(run, x, use_reentrant=False) if ckpt and i >= first_grad else run(x)  # keeps only x
        return x[:, 1:]                                                   # (N, L, D), CLS dropped


def vit_block(blk, x, sra=None, grids=None):
    """open_clip's ResidualAttentionBlock written out, with its own weights: x + ls_1(Attn(ln_1 x)), then
    x + ls_2(MLP(ln_2 x)); with an SRA, its branch beside attention (paper 3.1):
    x + ls_1(Attn(ln_1 x)) + SRA(ln_1 x)."""
    y = blk.ln_1(x)                                                      # (N, 1+L, D)
    x = x + blk.ls_1(attention(blk.attn, y))
    if sra is not None:
        x = x + sra_branch(sra, y, grids)                                # the SliceRestore Adapter
    return x + blk.ls_2(mlp(blk.mlp, blk.ln_2(x)))


def sra_branch(sra, y, grids):
    """y (N, 1+L, D), ln_1 of the slices of consecutive images with slice grids `grids` -> the SRA term (N, 1+L, D),
    zero at CLS. Images that follow each other with the same grid go through the adapter in one call."""
    runs = [(g, len(list(same))) for g, same in itertools.groupby(grids)]       # (grid, images)
    parts = torch.split(y[:, 1:], [m * n * count for (m, n), count in runs])  # (G*m*n, L, D) each
    term = torch.cat([sra(part, grid) for part, (grid, _) in zip(parts, runs)])  # (N, L, D)
    return torch.cat([torch.zeros_like(y[:, :1]), term], dim=1)


def attention(attn, x):
    """nn.MultiheadAttention self-attention of batch-first x (N, T, D), its weights, through SDPA: the module itself
    transposes to (T, N, D) and, without gradients, takes a slower fused path (bench.py tinystep)."""
    N, T, D = x.shape
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)            # (N, T, 3D)
    q, k, v = qkv.view(N, T, 3, attn.num_heads, D // attn.num_heads).permute(2, 0, 3, 1, 4)  # (N, nh, T, hs)
    y = F.scaled_dot_product_attention(q, k, v)                          # (N, nh, T, hs)
    return attn.out_proj(y.transpose(1, 2).reshape(N, T, D))            # (N, T, D)


def mlp(m, x):
    """open_clip's c_fc -> act -> c_proj. QuickGELU, h * sigmoid(1.702 h), is computed as silu(1.702 h) / 1.702 with
    the two scales folded into c_fc and c_proj: one fused op over the (N, T, 4D) activations instead of three."""
    if isinstance(m.gelu, nn.GELU):  # build_vision_tower's other choice, QuickGELU's alternative
        return m(x)
    h = F.silu(F.linear(x, m.c_fc.weight * 1.702, m.c_fc.bias * 1.702))  # (N, T, 4D)
    return F.linear(h, m.c_proj.weight / 1.702, m.c_proj.bias)


# ----------------------------------------------------------------------------------------------------------------
# samplers (paper 3.2) and projector

class SelfMiningSampler(nn.Module):
    """Average-pooled tokens (k x k, stride k) query their own image's tokens: (N, L, D) -> (N, L/k^2, D).
    Pre-norm cross-attention + residual, then a pre-norm FFN + residual (design choice)."""

    def __init__(self, dim, heads, grid, kernel=2, window=False):
        super().__init__()
        self.grid, self.kernel = grid, kernel
        self.norm_q, self.norm_kv, self.norm_ffn = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, heads)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.register_buffer("mask", window_mask(grid, kernel) if window else None, persistent=False)

    def queries(self, tokens, grid):
        return average_pool(tokens, grid, self.kernel)                       # (N, L/k^2, D)

    def forward(self, tokens, grid=None):
        """tokens (N, L, D) of N token maps of grid (rows, cols), default (h, w), the ViT's -> (N, L/k^2, D)."""
        grid = grid or (self.grid, self.grid)
        if self.mask is not None and grid != (self.grid, self.grid):
            raise ValueError(f"the windowed SMS samples {self.grid} x {self.grid} maps, not {grid}")
        q = self.queries(tokens, grid)                                       # (N, L/k^2, D)
        x = q + self.attn(self.norm_q(q), self.norm_kv(tokens), mask=self.mask)
        return x + self.ffn(self.norm_ffn(x))


def average_pool(tokens, grid, kernel):
    """k x k average pooling, stride k, of each image's rows x cols token map: (N, L, D) -> (N, L/k^2, D)."""
    N, L, D = tokens.shape
    fmap = tokens.transpose(1, 2).reshape(N, D, *grid)                       # (N, D, rows, cols)
    return F.avg_pool2d(fmap, kernel).flatten(2).transpose(1, 2)             # (N, L/k^2, D)


def window_mask(grid, kernel):
    """(L/k^2, L) bool: query j may attend only to the tokens of its own k x k window."""
    rows = torch.arange(grid)[:, None].expand(grid, grid) // kernel
    cols = torch.arange(grid)[None, :].expand(grid, grid) // kernel
    window = (rows * (grid // kernel) + cols).flatten()                     # (L,) window index of every token
    return window[None, :] == torch.arange((grid // kernel) ** 2)[:, None]


class QFormerSampler(SelfMiningSampler):
    """Ablation baseline: the same block, but fixed learned queries (as many as SMS outputs), no position kept."""

    def __init__(self, dim, heads, grid, kernel=2):
        super().__init__(dim, heads, grid, kernel)
        self.query = nn.Parameter(0.02 * torch.randn((grid // kernel) ** 2, dim))

    def queries(self, tokens, grid):
        if grid != (self.grid, self.grid):
            raise ValueError(f"the Q-Former's {len(self.query)} queries sample {self.grid} x {self.grid} maps")
        return self.query.expand(tokens.shape[0], -1, -1)                    # (N, L/k^2, D)


class AvgPoolSampler(nn.Module):
    """Ablation baseline: plain k x k average pooling."""

    def __init__(self, grid, kernel=2):
        super().__init__()
        self.grid, self.kernel = grid, kernel

    def forward(self, tokens, grid=None):
        return average_pool(tokens, grid or (self.grid, self.grid), self.kernel)  # (N, L/k^2, D)


def make_sampler(kind, dim, heads, grid, kernel, window):
    if kind == "sms":
        return SelfMiningSampler(dim, heads, grid, kernel, window)
    if kind == "qformer":
        return QFormerSampler(dim, heads, grid, kernel)
    return AvgPoolSampler(grid, kernel)


# ----------------------------------------------------------------------------------------------------------------
# the peers' tilers (docs/method.md#the-peers-tilers): stitched maps, unpadding, the 2 x 2 merge

def unpad(rows, cols, width, height):
    """LLaVA-NeXT's unpad_image on a stitched map of rows x cols tokens into which an image of width x height was
    resized with its aspect kept and centred (slicing.resize_and_pad) -> (top, bottom, left, right) of the tokens
    that hold the image: the rows or columns of padding dropped."""
    if width / height > cols / rows:                                     # padded above and below
        pad = (rows - int(round(height * cols / width, 7))) // 2
        return pad, rows - pad, 0, cols
    pad = (cols - int(round(width * rows / height, 7))) // 2             # padded left and right
    return 0, rows, pad, cols - pad


def crop_interiors(crops, h, margin):
    """Tokens (N, h*h, D) of N overlapping crops -> (N, i*i, D), i = h - 2 * margin: every crop's margin tokens
    dropped, so that merge() stitches the interiors into a map covering the image once (overlap)."""
    N, _, D = crops.shape
    return crops.view(N, h, h, D)[:, margin:h - margin, margin:h - margin].reshape(N, -1, D)


def with_newlines(fmap, newline):
    """A map (C, rows, cols) read in raster order with a learned newline embedding (C,) after each row (LLaVA-NeXT's
    image_newline) -> (rows * (cols + 1), C)."""
    C, rows, cols = fmap.shape
    newlines = newline.to(fmap.dtype)[:, None, None].expand(C, rows, 1)
    return torch.cat([fmap, newlines], dim=2).flatten(1).t()


class PatchMerger(nn.Module):
    """Qwen2-VL's 2 x 2 token merge: LayerNorm, then each 2 x 2 block of neighbouring tokens side by side:
    (N, R*C, D) of an R x C map -> (N, R/2 * C/2, 4D); the projector (input 4D) maps them to the LLM."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens, grid):
        (N, _, D), (R, C) = tokens.shape, grid
        x = self.norm(tokens).view(N, R // 2, 2, C // 2, 2, D).permute(0, 1, 3, 2, 4, 5)  # (N, R/2, C/2, 2, 2, D)
        return x.reshape(N, (R // 2) * (C // 2), 4 * D)


def separator_ids(tokenizer, text):
    """Token ids of a separator as it reads mid-text: encode('\\n' + text) minus encode('\\n'), so sentencepiece's
    dummy-prefix space is not part of it."""
    head = tokenizer.encode("\n", bos=False)
    full = tokenizer.encode("\n" + text, bos=False)
    if full[:len(head)] != head or len(full) == len(head):
        raise ValueError(f"cannot tokenise separator {text!r} on its own with this tokenizer")
    return full[len(head):]


class Prefix(NamedTuple):
    """One image after the ViT blocks before the first SRA layer (HiResLLaVA.prefix), which no stage trains: it can
    stand in for the preprocess() tuple of the same image. overview (1+L, D), slices (m*n, 1+L, D), grid: the
    preprocess() grid ((m, n); anyres (m, n, width, height); native the merged tokens' (rows, cols))."""
    overview: torch.Tensor
    slices: torch.Tensor
    grid: tuple


# ----------------------------------------------------------------------------------------------------------------
# the model (paper Fig. 2a)

class HiResLLaVA(nn.Module):
    """Frozen CLIP ViT (+ SRA) -> sampler -> projector -> spliced into the frozen LLM (+ LoRA)."""

    def __init__(self, cfg, dtype=torch.float32, device="cpu", adapter_dtype=None, vision=None, llm=None):
        """dtype: the frozen ViT and LLM weights; adapter_dtype (default dtype): the tensors training updates
        (SRA, sampler, projector, LoRA), e.g. fp32 beside bf16 backbones. The LLM is read straight onto device.
        vision, llm: backbones already built (bench.py: random weights at the paper's shapes) instead of read."""
        super().__init__()
        self.cfg = cfg
        clip_cfg = CLIPConfig.from_preset(cfg.clip_preset)
        if not cfg.llm_path and llm is None:
            raise ValueError("HiResConfig.llm_path is required (an HF LLaMA directory)")
        self.vision = vision or VisionTower(clip_cfg, cfg.clip_weights or None)
        self.llm = llm or Llama.from_pretrained(cfg.llm_path, dtype=dtype, device=device)
        self.tokenizer = Tokenizer(cfg.tokenizer_path)
        self.context = cfg.max_length or self.llm.cfg.max_seq_len  # tokens of one sequence, images included
        if self.context > self.llm.cfg.max_seq_len:
            raise ValueError(f"max_length {cfg.max_length} exceeds the LLM's context {self.llm.cfg.max_seq_len}")
        D, heads, h = self.vision.cfg.width, self.vision.cfg.heads, self.vision.cfg.grid
        C = self.llm.model.embed_tokens.weight.shape[1]
        self.sra = nn.ModuleDict({str(i): SliceRestoreAdapter(D, heads, h) for i in cfg.sra_layers}) \
            if cfg.sra and cfg.slices else None
        native = cfg.tiler == "native"
        self.sampler = PatchMerger(D) if native else make_sampler(cfg.sampler, D, heads, h, cfg.kernel, cfg.sms_window)
        self.projector = nn.Sequential(nn.Linear(4 * D if native else D, C), nn.GELU(), nn.Linear(C, C))  # mlp2x_gelu
        # anyres and overlap read their stitched map row by row, a learned newline after each (LLaVA-NeXT's init)
        self.newline = nn.Parameter(torch.randn(C) / C ** 0.5) if cfg.tiler in ("anyres", "overlap") else None
        if cfg.lora_rank > 0:
            apply_lora(self.llm, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
        self.seps = {name: separator_ids(self.tokenizer, text) for name, text in SEPARATORS.items()}
        self.to(device)
        for name, p in self.named_parameters():  # rebinding .data keeps parameter identity (LoRA, optimizer)
            p.data = p.data.to((adapter_dtype or dtype) if self._is_adapter(name) else dtype)
        self.set_stage(1)

    # --- stages and trainable tensors (paper 4.1)
    def _trains_in(self, stage, name):
        """Whether tensor `name` trains in `stage` (STAGE_TRAINS), by its part: sra, sampler, projector, lora (the
        LLM's LoRA), llm or vision."""
        part = "lora" if "lora_" in name else name.split(".")[0]
        return part in STAGE_TRAINS[stage] or (self.cfg.train_llm and part in TRAIN_LLM)

    def _is_adapter(self, name):
        """A tensor some stage trains: SRA, sampler, projector, LoRA; with train_llm the whole LLM too."""
        return any(self._trains_in(stage, name) for stage in STAGE_TRAINS)

    def set_stage(self, stage):
        """Sets requires_grad by STAGE_TRAINS: the tensors of `stage` train, every other tensor is frozen."""
        if stage not in STAGE_TRAINS:
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        for name, p in self.named_parameters():
            p.requires_grad_(self._trains_in(stage, name))

    def trainable_state_dict(self):
        """Every tensor either stage trains (same key set in both stages, so stage 1 -> 2 loads strictly); with
        train_llm this includes the LLM, so a checkpoint holds the model that was evaluated."""
        return {k: p.detach() for k, p in self.named_parameters() if self._is_adapter(k)}

    def load_trainable_state_dict(self, sd):
        own = self.trainable_state_dict()  # detached views: copying into them fills the parameters
        check_state_dict(own, sd, "checkpoint does not match this model config")
        for k, p in own.items():
            p.copy_(sd[k])

    # --- images to LLM embeddings
    def preprocess(self, img):
        """PIL image -> (overview (3,S,S), slices (m*n,3,S,S), grid (m, n)) as the tiler cuts it (slicing.preprocess);
        cheap, for DataLoader workers."""
        return preprocess(img, **self.cfg.slicing(self.vision.cfg))

    def image_tokens(self, grid):
        """LLM tokens of one image whose slice grid is (m, n), with this tokenizer's separators."""
        return self.cfg.image_tokens(grid, {name: len(ids) for name, ids in self.seps.items()})

    def grid(self, size):
        """The grid preprocess() gives an image of size (width, height), without cutting it (slicing.grid_of)."""
        return grid_of(*size, **self.cfg.slicing(self.vision.cfg))

    @property
    def prefix_depth(self):
        """The ViT blocks no stage trains, which prefix() runs once per image: those before the first SRA; without
        one, every block up to the feature layer (the cache then holds the features, and a step runs no ViT block)."""
        return min(self.cfg.sra_layers) if self.sra is not None else self.vision.feature_layer + 1

    @torch.no_grad()
    def prefix(self, images):
        """preprocess() tuples -> Prefix tuples: each image's hidden states after ViT blocks 0..prefix_depth-1,
        which no stage trains. The one place the ViT-prefix cache enters: a batch of Prefix tuples (train.py
        --cache-vit computed them once per image) passes through unchanged."""
        if all(isinstance(im, Prefix) for im in images):
            return images
        if any(isinstance(im, Prefix) for im in images):
            raise ValueError("a batch mixes cached ViT prefixes (Prefix tuples) with preprocess() tuples")
        if len({tuple(overview.shape) for overview, _, _ in images}) > 1:  # the native tiler's images of two sizes
            return [self.prefix([im])[0] for im in images]
        device = self.llm.model.embed_tokens.weight.device
        pixels = torch.cat([torch.cat([overview[None], slices]) for overview, slices, _ in images])  # (N, 3, S, S)
        x = self.vision.prefix(normalize(pixels.to(device)), self.prefix_depth)                   # (N, 1+L, D)
        parts = torch.split(x, [1 + len(slices) for _, slices, _ in images])
        return [Prefix(p[0], p[1:], tuple(grid)) for p, (_, _, grid) in zip(parts, images)]

    def encode_images(self, images):
        """preprocess() tuples (or Prefix tuples) of B images -> B x (T_i, C) LLM embeddings in the order of
        token_layout (paper Fig. 2a): the overviews through the plain ViT, the slices through the ViT with the SRA
        inside its blocks, each through the sampler and the projector, with the separators' embeddings between.
        The peers' tilers: encode_stitched (anyres, overlap) and encode_native."""
        cfg, depth = self.cfg, self.prefix_depth
        device = self.llm.model.embed_tokens.weight.device
        states = self.prefix(images)                                             # B x Prefix
        if cfg.tiler == "native":
            return self.encode_native(states)
        if cfg.tiler != "hires":
            return self.encode_stitched(states)
        if cfg.overview:
            overviews = self.encode_overviews(states)                            # (B, L/k^2 or L, C)
        if cfg.slices:
            sra = {int(i): a for i, a in self.sra.items()} if self.sra is not None else None
            f = self.vision.features(torch.cat([s.slices for s in states]).to(device), depth,
                                     [s.grid for s in states], sra)              # (sum m*n, L, D)
            slices = torch.split(self.projector(self.sampler(f)), [len(s.slices) for s in states])  # (m*n, L/k^2, C)
        seps = {name: self.llm.embed(torch.tensor([ids], device=device))[0] for name, ids in self.seps.items()}
        out = []
        for b, s in enumerate(states):
            tokens = {"overview": overviews[b] if cfg.overview else None, **seps}  # (t, C) each
            out.append(torch.cat([tokens[p] if isinstance(p, str) else slices[b][p] for p in cfg.layout(s.grid)]))
        return out                                                               # B x (T_i, C)

    def encode_overviews(self, states):
        """The overviews of Prefix tuples through the plain, frozen ViT (paper 2.4: nothing there to train), the
        sampler and the projector -> (B, L/k^2 or L, C)."""
        device = self.llm.model.embed_tokens.weight.device
        with torch.no_grad():
            f = self.vision.features(torch.stack([s.overview for s in states]).to(device), self.prefix_depth)
        return self.projector(self.sampler(f) if self.cfg.sample_overview else f)

    def encode_stitched(self, states):
        """anyres (LLaVA-NeXT) and overlap (Molmo): the overview as encode_images encodes it, then the tiles through
        the plain ViT, stitched into one map per image (merge) and read row by row with a newline after each row.
        anyres samples each tile and drops the map's padding (unpad); overlap drops each crop's margins, so that the
        kept tokens cover the image once, and samples the stitched map."""
        cfg, h = self.cfg, self.vision.cfg.grid
        device = self.llm.model.embed_tokens.weight.device
        with torch.no_grad():  # no SRA: nothing in the ViT trains
            f = self.vision.features(torch.cat([s.slices for s in states]).to(device), self.prefix_depth)
        overviews = self.encode_overviews(states) if cfg.overview else [None] * len(states)
        out = []
        for s, tiles, overview in zip(states, torch.split(f, [len(s.slices) for s in states]), overviews):
            (m, n), t = s.grid[:2], h // cfg.kernel
            if cfg.tiler == "anyres":
                fmap = merge(self.projector(self.sampler(tiles)), m, n, t, t)[0]          # (C, m*t, n*t)
                top, bottom, left, right = unpad(m * t, n * t, *s.grid[2:])
                fmap = fmap[:, top:bottom, left:right]
            else:
                M = overlap_margin(self.vision.cfg.image_size, self.vision.cfg.patch_size) // self.vision.cfg.patch_size
                i = h - 2 * M                                                             # a crop's interior
                x = merge(crop_interiors(tiles, h, M), m, n, i, i).flatten(2).transpose(1, 2)  # (1, m*i * n*i, D)
                x = self.projector(self.sampler(x, (m * i, n * i)))[0]                   # (m*i/k * n*i/k, C)
                fmap = x.t().reshape(-1, m * i // cfg.kernel, n * i // cfg.kernel)       # (C, rows, cols)
            rows = with_newlines(fmap, self.newline)                                     # (rows * (cols+1), C)
            out.append(rows if overview is None else torch.cat([overview, rows]))
        return out

    def encode_native(self, states):
        """native (Qwen2-VL style): the whole image in one ViT pass, its position embedding interpolated to its
        patch grid (VisionTower.embed), the tokens merged 2 x 2 (PatchMerger) and projected: no slices."""
        device = self.llm.model.embed_tokens.weight.device
        out = []
        for s in states:
            with torch.no_grad():  # nothing in the ViT trains
                f = self.vision.features(s.overview[None].to(device), self.prefix_depth)  # (1, R*C, D)
            out.append(self.projector(self.sampler(f, (2 * s.grid[0], 2 * s.grid[1])))[0])  # (R/2 * C/2, C)
        return out

    def splice(self, ids, labels, image):
        """Text ids (with IMAGE_TOKEN_INDEX once if image is not None) -> (embeds (T, C), labels (T,))."""
        n_img = ids.count(IMAGE_TOKEN_INDEX)
        if n_img != (image is not None):
            raise ValueError(f"sample has {n_img} <image> placeholders but {'an' if image is not None else 'no'} "
                             f"image; need exactly one per image sample and none otherwise")
        device = self.llm.model.embed_tokens.weight.device
        text = torch.tensor([[max(t, 0) for t in ids]], device=device)
        emb = self.llm.embed(text)[0]                                            # (T, C)
        lab = torch.tensor(labels if labels is not None else [IGNORE_INDEX] * len(ids), device=device)
        if image is None:
            return emb, lab
        j = ids.index(IMAGE_TOKEN_INDEX)
        ignore = lab.new_full((image.shape[0],), IGNORE_INDEX)
        return torch.cat([emb[:j], image.to(emb.dtype), emb[j + 1:]]), torch.cat([lab[:j], ignore, lab[j + 1:]])

    def _embed_batch(self, input_ids, labels, images):
        encoded = iter(self.encode_images([im for im in images if im is not None]) if any(
            im is not None for im in images) else [])
        return [self.splice(ids, lab, next(encoded) if im is not None else None)
                for ids, lab, im in zip(input_ids, labels, images)]

    def forward(self, input_ids, labels, images):
        """Batch of token lists, label lists and preprocess() tuples (or None) -> mean next-token loss."""
        seqs = self._embed_batch(input_ids, labels, images)
        T = min(max(len(e) for e, _ in seqs), self.context)
        embeds, labels, mask = pad_batch(seqs, T)
        return self.llm(input_embeds=embeds, attention_mask=mask, labels=labels)

    def check_length(self, image, prompt, options=None):
        """Raises PromptTooLong when the vicuna_v1 prompt of a user text with its image (a preprocess() or Prefix
        tuple, or None) leaves no room for an answer in the context (generate), or, given options, when the prompt
        with its longest option does not fit (option_logprobs). Counted from the token layout, without the model."""
        human = prompt if image is None else image_first(prompt)
        extra = self.image_tokens(image[2]) - 1 if image is not None else 0  # the image replaces its placeholder
        if options is None:
            n = len(encode_prompt(human, self.tokenizer)) + extra
            if n >= self.context:
                raise PromptTooLong(f"prompt is {n} tokens with its image; the LLM context holds {self.context}, "
                                    f"so no answer fits")
            return
        n = extra + max(len(encode_conversation([{"from": "human", "value": human}, {"from": "gpt", "value": o}],
                                                self.tokenizer)[0]) for o in options)
        if n > self.llm.cfg.max_seq_len:
            raise PromptTooLong(f"prompt and option are {n} tokens with the image; the LLM context holds "
                                f"{self.llm.cfg.max_seq_len}")

    @torch.no_grad()
    def generate(self, images, prompts, max_new_tokens=32, temperature=0.0, top_p=1.0):
        """PIL images (or preprocess() tuples, or None) and user texts -> answers; vicuna_v1 prompt, left-padded
        batched generation. Raises PromptTooLong (check_length) before any work if a prompt fills the context."""
        pre = [im if im is None or isinstance(im, tuple) else self.preprocess(im) for im in images]
        for im, p in zip(pre, prompts):
            self.check_length(im, p)
        ids = [encode_prompt(p if im is None else image_first(p), self.tokenizer) for p, im in zip(prompts, pre)]
        seqs = self._embed_batch(ids, [None] * len(ids), pre)
        embeds, _, mask = pad_batch(seqs, max(len(e) for e, _ in seqs), left=True)
        out = self.llm.generate(input_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p, eos_id=self.tokenizer.eos_id)
        return [self.tokenizer.decode(o).strip() for o in out]

    @torch.no_grad()
    def option_logprobs(self, images, prompts, options):
        """Multiple choice by likelihood: PIL images (or preprocess() tuples, or None), user texts and each one's list
        of option texts -> per prompt, the log-probability of each option as the vicuna_v1 answer (sum over its
        tokens and </s>). The image is encoded once per prompt; all options are scored as one batch. Raises
        PromptTooLong (check_length) before any work if a prompt with its longest option does not fit."""
        pre = [im if im is None or isinstance(im, tuple) else self.preprocess(im) for im in images]
        for im, p, opts in zip(pre, prompts, options):
            self.check_length(im, p, opts)
        ids, labels, owner = [], [], []
        for k, (p, im, opts) in enumerate(zip(prompts, pre, options)):
            human = p if im is None else image_first(p)
            for o in opts:
                i, lab = encode_conversation([{"from": "human", "value": human}, {"from": "gpt", "value": o}],
                                             self.tokenizer)
                ids.append(i), labels.append(lab), owner.append(k)
        encoded = iter(self.encode_images([im for im in pre if im is not None]) if any(
            im is not None for im in pre) else [])
        per_prompt = [next(encoded) if im is not None else None for im in pre]
        seqs = [self.splice(i, lab, per_prompt[k]) for i, lab, k in zip(ids, labels, owner)]
        embeds, labels, mask = pad_batch(seqs, max(len(e) for e, _ in seqs))
        logp = self.llm.label_logprobs(input_embeds=embeds, attention_mask=mask, labels=labels).sum(1)  # (options,)
        scores = [[] for _ in prompts]
        for k, lp in zip(owner, logp.tolist()):
            scores[k].append(lp)
        return scores


def pad_batch(seqs, T, left=False):
    """[(embeds (t, C), labels (t,))] -> embeds (B, T, C), labels (B, T), mask (B, T); each cut to its first T
    tokens and right-padded (training), or left-padded (generation)."""
    e0 = seqs[0][0]
    embeds = e0.new_zeros(len(seqs), T, e0.shape[1])
    labels = torch.full((len(seqs), T), IGNORE_INDEX, device=e0.device)
    mask = torch.zeros(len(seqs), T, dtype=torch.long, device=e0.device)
    for b, (e, lab) in enumerate(seqs):
        t = min(len(e), T)
        at = slice(T - t, T) if left else slice(0, t)
        embeds[b, at], labels[b, at], mask[b, at] = e[:t], lab[:t], 1
    return embeds, labels, mask


# ----------------------------------------------------------------------------------------------------------------
# precision

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # --dtype of train.py and eval.py


def resolve_dtype(name, device):
    """--dtype on a device -> the name of the compute dtype (DTYPES): the one given, or for auto bf16 on a GPU
    that has it, fp16 on one without, fp32 on the CPU."""
    if name != "auto":
        return name
    return "fp32" if torch.device(device).type != "cuda" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast(device, dtype):
    """Mixed precision as training and evaluation run it: the frozen backbones' matmuls in dtype, the adapters
    (kept fp32), norms and softmax in fp32; off for fp32."""
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)


if __name__ == "__main__":  # the model file has no command line; say where the one that merges a checkpoint is
    sys.exit("hires.py: error: the model file has no command line; merge a stage-2 checkpoint with "
             "python eval.py --ckpt CKPT --merge DIR")
