"""CLIP vision tower: open_clip's `VisionTransformer`, LLaVA's feature choice, and the SliceRestore Adapter hook.

Must match:
- open_clip `open_clip.transformer.VisionTransformer` (ViT-L-14-336 'openai', QuickGELU) -- we build that very class
  and load its weights strictly; we never edit it.
- LLaVA's `mm_vision_select_layer=-2`, `mm_vision_select_feature='patch'`: the output of the second-to-last block,
  CLS dropped, no ln_post/proj -> (B, h*w, D), equal (to fp32 rounding: `block` writes the block out) to open_clip's
  `forward_intermediates(indices=[L-2], intermediates_only=True, output_fmt='NLC')` (tests check this).
- HiRes-LLaVA (arXiv 2407.08706) section 3.1: SliceRestore Adapters run inside chosen blocks as a branch parallel to
  self-attention, x <- x + Attn(LN(x)) + SRA(LN(x)), over the slices of one image together (grid m x n known).

Notation: B images, L = h*w patch tokens (CLS excluded), D ViT width, m rows and n cols of slices.
"""
import itertools
import os
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

WEIGHTS_HELP = (
    "download the open_clip 'openai' ViT-L-14-336 weights, e.g. "
    "`huggingface-cli download timm/vit_large_patch14_clip_336.openai open_clip_model.safetensors` "
    "(or open_clip_pytorch_model.bin), and pass that file's path")


@dataclass
class CLIPConfig:
    image_size: int = 336      # S, the base resolution of the overview and of every slice
    patch_size: int = 14
    width: int = 1024          # D
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    output_dim: int = 768      # visual.proj; unused by LLaVA's features but part of the checkpoint we load strictly
    quick_gelu: bool = True    # OpenAI weights were trained with QuickGELU; nn.GELU would be subtly wrong
    pretrained: bool = True    # True: weights file required, never a random init

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.layers < 3:
            raise ValueError("need >= 3 layers: features come from block L-2 and adapters sit before it")
        self.grid = self.image_size // self.patch_size  # h = w tokens per side

    @classmethod
    def from_preset(cls, name, **overrides):
        presets = {
            "vit-l-14-336": dict(),
            # tower for tests and the tiny preset: 96 px, 6 x 6 patches of 16 px (8 x 8 patches cost 1.4x the wall
            # time per run and answered no better, README); 12 blocks, so that several SRAs sit in the last third,
            # each followed by pretrained blocks, as in ViT-L (SRA in 19-22 of 24)
            "tiny": dict(image_size=96, patch_size=16, width=64, layers=12, heads=4, output_dim=32,
                         quick_gelu=True, pretrained=False),
        }
        if name not in presets:
            raise ValueError(f"unknown CLIP preset {name!r}; choose from {sorted(presets)}")
        return cls(**{**presets[name], **overrides})


def default_adapter_layers(n_layers):
    """The paper's SRA layers 19-22 (1-indexed) of 24, i.e. the 4 blocks before the feature block (L-2), scaled:
    n = round(L/6) blocks ending at L-3. 24 -> [18, 19, 20, 21]; 6 -> [3] (design choice for small configs)."""
    n = max(1, round(n_layers / 6))
    return list(range(n_layers - 2 - n, n_layers - 2))


# ----------------------------------------------------------------------------------------------------------------
# building and loading

def build_vision_tower(cfg, weights=None):
    """open_clip VisionTransformer for cfg; weights: a local open_clip checkpoint (full CLIP with `visual.` keys, or
    visual-only), safetensors or .bin (read with weights_only=True). Loaded strictly."""
    # imported here, not at the top: open_clip takes 3-4 s to import, which every CLI's --help would wait for
    from open_clip.transformer import LayerNorm, QuickGELU, VisionTransformer
    vit = VisionTransformer(
        image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.width, layers=cfg.layers,
        heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, output_dim=cfg.output_dim,
        act_layer=QuickGELU if cfg.quick_gelu else nn.GELU, norm_layer=LayerNorm)
    if weights:
        try:
            vit.load_state_dict(read_vision_state_dict(weights), strict=True)
        except RuntimeError as e:  # torch's strict check: missing or unexpected keys, wrong shapes
            raise ValueError(f"{weights}: CLIP weights do not fit this config: {' '.join(str(e).split())[:400]}") from None
    elif cfg.pretrained:
        raise FileNotFoundError(f"CLIP vision weights are required for this preset (no random init): {WEIGHTS_HELP}")
    return vit


def read_vision_state_dict(path):
    """Read a checkpoint file and keep the vision tower's tensors (`visual.` prefix of a full CLIP file dropped)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: CLIP weights file not found; {WEIGHTS_HELP}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, TorchScript archive, pickle with code...
        raise ValueError(f"{path}: cannot read CLIP weights ({type(e).__name__}: {str(e)[:200]}); "
                         f"expected an open_clip state dict (.safetensors or .bin); {WEIGHTS_HELP}") from None
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: not a state dict; {WEIGHTS_HELP}")
    if any(k.startswith("visual.") for k in sd):  # full CLIP checkpoint: the text tower sits at the top level
        sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    return sd


def save_vision_tower(vit, path):
    """Write vit as a full-CLIP-style safetensors file (`visual.` keys), the format read_vision_state_dict reads."""
    from safetensors.torch import save_file
    sd = {"visual." + k: v.detach().contiguous().cpu() for k, v in vit.state_dict().items()}
    save_file(sd, path)


# ----------------------------------------------------------------------------------------------------------------
# LLaVA features with the adapter hook

class VisionTower(nn.Module):
    """Frozen CLIP ViT returning LLaVA features; adapters (block index -> module) run inside their blocks."""

    def __init__(self, cfg, weights=None):
        super().__init__()
        self.cfg = cfg
        self.vit = build_vision_tower(cfg, weights)
        self.vit.requires_grad_(False)
        self.vit.eval()
        blocks = self.vit.transformer.resblocks
        # the hook below re-uses the block's own submodules; it relies on open_clip's default block layout
        from open_clip.transformer import ResidualAttentionBlock  # loaded by build_vision_tower already
        assert self.vit.transformer.batch_first and all(type(b) is ResidualAttentionBlock for b in blocks)
        self.feature_layer = cfg.layers - 2  # LLaVA: output of the penultimate block
        self.gradient_checkpointing = False  # recompute the blocks autograd runs through (SRA) in backward

    def train(self, mode=True):
        super().train(mode)
        self.vit.eval()  # frozen: always eval (no dropout anywhere, but keep it explicit)
        return self

    def forward(self, pixels, groups=None, adapters=None):
        """pixels (N, 3, S, S) normalised -> LLaVA features (N, L, D): prefix, then features (groups, adapters there)."""
        return self.features(self.prefix(pixels, 0), 0, groups, adapters)

    @torch.no_grad()
    def prefix(self, pixels, depth):
        """pixels (N, 3, S, S) normalised -> hidden states (N, 1+L, D) after the patch embedding and the first `depth`
        blocks (no adapters): frozen in every stage, so they can be computed once per image and reused."""
        x = self.vit._embeds(pixels.to(self.vit.conv1.weight.dtype))
        for blk in self.vit.transformer.resblocks[:depth]:
            x = block(blk, x)
        return x

    def features(self, x, start, groups=None, adapters=None):
        """x (N, 1+L, D): hidden states after the first `start` blocks (prefix) -> LLaVA features (N, L, D), CLS
        dropped, after the blocks up to the feature layer. groups: list of (m, n) or None, consecutive runs of
        images (m*n images for a grid, 1 for None) -- the adapters see a grid's slices together, None passes through
        unadapted; adapters: dict block index (>= start) -> module(p (m*n, L, D), (m, n)) -> (m*n, L, D)."""
        adapters = adapters or {}
        if groups is None:
            groups = [None] * x.shape[0]
        sizes = [1 if g is None else g[0] * g[1] for g in groups]
        if sum(sizes) != x.shape[0]:
            raise ValueError(f"groups cover {sum(sizes)} images, x holds {x.shape[0]}")
        if adapters and start > min(adapters):
            raise ValueError(f"a prefix of {start} blocks skips the adapter in block {min(adapters)}")
        trains_adapter = torch.is_grad_enabled() and any(
            p.requires_grad for a in adapters.values() for p in a.parameters())
        first_grad = min(adapters) if trains_adapter else self.feature_layer + 1
        with torch.no_grad():  # everything before the first trainable adapter needs no graph
            x = self._blocks(x.to(self.vit.conv1.weight.dtype), start, first_grad, groups, sizes, adapters)
        x = self._blocks(x, max(start, first_grad), self.feature_layer + 1, groups, sizes, adapters)
        return x[:, 1:]  # (N, L, D), CLS dropped

    def _blocks(self, x, start, stop, groups, sizes, adapters):
        ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        for i in range(start, stop):
            run = partial(block, self.vit.transformer.resblocks[i], adapter=adapters.get(i), groups=groups, sizes=sizes)
            x = checkpoint(run, x, use_reentrant=False) if ckpt else run(x)  # ckpt: keeps only x, (N, 1+L, D)
        return x


def block(blk, x, adapter=None, groups=None, sizes=None):
    """open_clip's ResidualAttentionBlock written out, with its own weights: x + ls_1(Attn(ln_1 x)), then
    x + ls_2(MLP(ln_2 x)); with an adapter, the SRA branch parallel to attention (paper 3.1): x + ls_1(Attn(ln_1 x))
    + SRA(ln_1 x), over the slices of each grid (CLS and ungrouped images get no SRA term)."""
    y = blk.ln_1(x)                                               # (N, 1+L, D)
    x = x + blk.ls_1(attention(blk.attn, y))
    if adapter is not None:
        runs = [(g, sum(s for _, s in run)) for g, run in itertools.groupby(zip(groups, sizes), key=lambda gs: gs[0])]
        parts = []  # one adapter call per run of consecutive images with the same grid
        for (g, _), part in zip(runs, torch.split(y, [size for _, size in runs])):
            if g is None:
                parts.append(torch.zeros_like(part))
            else:
                sra = adapter(part[:, 1:], g)                     # (G*m*n, L, D): G images of grid g in one call
                parts.append(torch.cat([torch.zeros_like(part[:, :1]), sra], dim=1))  # (G*m*n, 1+L, D)
        x = x + torch.cat(parts)
    return x + blk.ls_2(mlp(blk.mlp, blk.ln_2(x)))


def attention(attn, x):
    """nn.MultiheadAttention self-attention of batch-first x (N, T, D), its weights, through SDPA: the module itself
    transposes to (T, N, D) and, without gradients, takes a slower fused path (bench.py tinystep)."""
    N, T, D = x.shape
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)    # (N, T, 3D)
    q, k, v = qkv.view(N, T, 3, attn.num_heads, D // attn.num_heads).permute(2, 0, 3, 1, 4)  # (N, nh, T, hs) each
    y = F.scaled_dot_product_attention(q, k, v)                   # (N, nh, T, hs)
    return attn.out_proj(y.transpose(1, 2).reshape(N, T, D))     # (N, T, D)


def mlp(m, x):
    """open_clip's c_fc -> act -> c_proj. QuickGELU, h * sigmoid(1.702 h), is computed as silu(1.702 h) / 1.702 with
    the two scales folded into c_fc and c_proj: one fused op over the (N, T, 4D) activations instead of three."""
    if isinstance(m.gelu, nn.GELU):  # build_vision_tower's other choice, QuickGELU's alternative
        return m(x)
    h = F.silu(F.linear(x, m.c_fc.weight * 1.702, m.c_fc.bias * 1.702))  # (N, T, 4D)
    return F.linear(h, m.c_proj.weight / 1.702, m.c_proj.bias)


@torch.no_grad()
def attention_entropy(tower, pixels):
    """Mean entropy (nats) of the attention rows of every block, head and query of the ViT on normalised pixels
    (N, 3, S, S). Uniform attention over 1+L tokens gives ln(1+L): a token then mixes in only the image mean."""
    x, total = tower.vit._embeds(pixels), 0.0                            # (N, 1+L, D)
    for blk in tower.vit.transformer.resblocks:
        N, T, D = x.shape
        nh = blk.attn.num_heads
        qkv = F.linear(blk.ln_1(x), blk.attn.in_proj_weight, blk.attn.in_proj_bias)
        q, k, _ = qkv.view(N, T, 3, nh, D // nh).permute(2, 0, 3, 1, 4)  # (N, nh, T, hs) each
        p = (q @ k.transpose(-1, -2) * (D // nh) ** -0.5).softmax(-1)   # (N, nh, T, T)
        total += -(p * p.clamp_min(1e-12).log()).sum(-1).mean().item()
        x = block(blk, x)
    return total / len(tower.vit.transformer.resblocks)
