"""CLIP vision tower: open_clip's `VisionTransformer` (ViT-L-14-336 'openai', or the tiny preset's), built and loaded.

Must match open_clip's `open_clip.transformer.VisionTransformer` with QuickGELU: we build that very class and load
its weights strictly; we never edit it. hires.VisionTower runs its blocks with LLaVA's feature choice and the
SliceRestore Adapters inside (paper 3.1).

Block numbers in this code are 0-based: ViT-L's 24 blocks are 0-23, LLaVA's features come from block 22 (the
penultimate, `mm_vision_select_layer=-2`), and the paper's SRA layers 19-22 (1-based) are blocks 18-21.
"""
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

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
    """The blocks of the SRA: the paper's 4 blocks before the feature block L-2 (blocks 18-21 of 24), scaled:
    round(L/6) blocks ending at L-3. 24 -> [18, 19, 20, 21]; 6 -> [3] (design choice for small configs)."""
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
            detail = " ".join(str(e).split())[:400]
            raise ValueError(f"{weights}: CLIP weights do not fit this config: {detail}") from None
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
