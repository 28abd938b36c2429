"""HiRes-LLaVA (arXiv 2407.08706): SliceRestore Adapter, Self-Mining Sampler, and the full model (slicing.py slices).

Paper sections: 3.1 SliceRestore Adapter (SRA), 3.2 Self-Mining Sampler (SMS), Fig. 2a pipeline. Details the paper
does not give are our reconstruction, marked "(design choice)"; they are named constants or HiResConfig flags, each
listed with its reason and its tensor shapes in docs/method.md. Notation: m rows,
n cols of slices; S base resolution; h = w tokens per side of one ViT image; L = h*w; D ViT width; C LLM width;
k sampler kernel.
"""
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, fields, replace
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from clip import CLIPConfig, VisionTower, build_vision_tower, default_adapter_layers, save_vision_tower
from conversation import (IGNORE_INDEX, IMAGE_TOKEN_INDEX, Tokenizer, encode_conversation, encode_prompt, image_first,
                          train_tokenizer)
from llama import Llama, LlamaConfig, apply_lora, check_state_dict, merge_lora
from slicing import normalize, preprocess_image, slice_grid, token_count, token_layout

# the separators of slicing.token_layout as plain text tokens, so no new embedding rows (design choice, as
# LLaVA-UHD; docs/method.md#projector-and-separators)
SEPARATORS = {"sep_overview": "\n",  # (a) between the overview and the slices
              "sep_slice": ",",       # (b) between two slices of a row
              "sep_row": "\n"}        # (c) at the end of each row of slices
SRA_KERNEL = 3        # depthwise conv of the local fusion (design choice)
SAMPLERS = ("sms", "qformer", "avgpool")


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
        if not self.tokenizer_path and self.llm_path:
            self.tokenizer_path = os.path.join(self.llm_path, "tokenizer.model")

    def layout(self, grid):
        """slicing.token_layout of one image whose slice grid is (m, n), with this config's overview and slices."""
        m, n = grid if self.slices else (0, 0)
        return token_layout(m, n, self.overview)

    def image_tokens(self, grid, seps=None):
        """LLM tokens of one image whose slice grid is (m, n): the count of its layout (seps: tokens per separator,
        default one each as with LLaMA's tokenizer; HiResLLaVA.image_tokens passes its tokenizer's)."""
        h = CLIPConfig.from_preset(self.clip_preset).grid
        per_slice = (h // self.kernel) ** 2
        return token_count(self.layout(grid), per_slice if self.sample_overview else h * h, per_slice, seps)


class PromptTooLong(ValueError):
    """A prompt (text + image tokens) that leaves no room in the LLM context for an answer."""


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

    def queries(self, tokens):
        return average_pool(tokens, self.grid, self.kernel)                  # (N, L/k^2, D)

    def forward(self, tokens):
        q = self.queries(tokens)                                             # (N, L/k^2, D)
        x = q + self.attn(self.norm_q(q), self.norm_kv(tokens), mask=self.mask)
        return x + self.ffn(self.norm_ffn(x))


def average_pool(tokens, grid, kernel):
    """k x k average pooling, stride k, of each image's h x w token map: (N, L, D) -> (N, L/k^2, D)."""
    N, L, D = tokens.shape
    fmap = tokens.transpose(1, 2).reshape(N, D, grid, grid)                  # (N, D, h, w)
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

    def queries(self, tokens):
        return self.query.expand(tokens.shape[0], -1, -1)                    # (N, L/k^2, D)


class AvgPoolSampler(nn.Module):
    """Ablation baseline: plain k x k average pooling."""

    def __init__(self, grid, kernel=2):
        super().__init__()
        self.grid, self.kernel = grid, kernel

    def forward(self, tokens):
        return average_pool(tokens, self.grid, self.kernel)                  # (N, L/k^2, D)


def make_sampler(kind, dim, heads, grid, kernel, window):
    if kind == "sms":
        return SelfMiningSampler(dim, heads, grid, kernel, window)
    if kind == "qformer":
        return QFormerSampler(dim, heads, grid, kernel)
    return AvgPoolSampler(grid, kernel)


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
    stand in for the preprocess() tuple of the same image. overview (1+L, D), slices (m*n, 1+L, D), grid (m, n)."""
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
        D, heads, h = clip_cfg.width, clip_cfg.heads, clip_cfg.grid
        C = self.llm.model.embed_tokens.weight.shape[1]
        self.sra = nn.ModuleDict({str(i): SliceRestoreAdapter(D, heads, h) for i in cfg.sra_layers}) \
            if cfg.sra and cfg.slices else None
        self.sampler = make_sampler(cfg.sampler, D, heads, h, cfg.kernel, cfg.sms_window)
        self.projector = nn.Sequential(nn.Linear(D, C), nn.GELU(), nn.Linear(C, C))  # LLaVA mlp2x_gelu
        if cfg.lora_rank > 0:
            apply_lora(self.llm, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
        self.seps = {name: separator_ids(self.tokenizer, text) for name, text in SEPARATORS.items()}
        self.to(device)
        for name, p in self.named_parameters():  # rebinding .data keeps parameter identity (LoRA, optimizer)
            p.data = p.data.to((adapter_dtype or dtype) if self._is_adapter(name) else dtype)
        self.set_stage(1)

    # --- stages and trainable tensors (paper 4.1)
    def _is_adapter(self, name):
        """A tensor some stage trains: SRA, sampler, projector, LoRA; with train_llm the whole LLM too."""
        llm = name.startswith("llm.") and ("lora_" in name or self.cfg.train_llm)
        return name.startswith(("sra.", "sampler.", "projector.")) or llm

    def set_stage(self, stage):
        """Stage 1: sampler + projector train. Stage 2: SRA + sampler + projector + LoRA. ViT and LLM base frozen,
        except with train_llm, where the LLM trains in both stages."""
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        for name, p in self.named_parameters():
            trains = name.startswith(("sampler.", "projector.")) or (name.startswith("llm.") and self.cfg.train_llm)
            trains |= stage == 2 and self._is_adapter(name)
            p.requires_grad_(trains)

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
        """PIL image -> (overview (3,S,S), slices (m*n,3,S,S), (m, n)); cheap, for DataLoader workers."""
        c = self.cfg
        return preprocess_image(img, self.vision.cfg.image_size, c.max_slices, c.upscale, c.slices)

    def image_tokens(self, grid):
        """LLM tokens of one image whose slice grid is (m, n), with this tokenizer's separators."""
        return self.cfg.image_tokens(grid, {name: len(ids) for name, ids in self.seps.items()})

    def grid(self, size):
        """The slice grid (m, n) preprocess() cuts an image of size (width, height) into (slicing.slice_grid)."""
        c = self.cfg
        return slice_grid(*size, self.vision.cfg.image_size, c.max_slices, c.upscale) if c.slices else (0, 0)

    @property
    def prefix_depth(self):
        """The ViT blocks no stage trains, which prefix() runs once per image: those before the first SRA; without
        one, every block up to the feature layer (the cache then holds the features, and a step runs no ViT block)."""
        return min(self.cfg.sra_layers) if self.sra is not None else self.vision.feature_layer + 1

    @torch.no_grad()
    def prefix(self, images):
        """preprocess() tuples -> Prefix tuples: each image's hidden states after the first prefix_depth ViT blocks,
        which no stage trains. The one place the ViT-prefix cache enters: Prefix tuples computed earlier
        (train.py --cache-vit) pass through unchanged."""
        todo = [im for im in images if not isinstance(im, Prefix)]
        if todo:
            device = self.llm.model.embed_tokens.weight.device
            pixels = torch.cat([torch.cat([overview[None], slices]) for overview, slices, _ in todo]).to(device)
            x = self.vision.prefix(normalize(pixels), self.prefix_depth)  # (N, 1+L, D)
            parts = torch.split(x, [1 + len(slices) for _, slices, _ in todo])
            computed = iter([Prefix(p[0], p[1:], tuple(grid)) for p, (_, _, grid) in zip(parts, todo)])
        return [im if isinstance(im, Prefix) else next(computed) for im in images]

    def encode_images(self, images):
        """preprocess() tuples (or Prefix tuples) -> list of (T_i, C) LLM embeddings in the order of
        slicing.token_layout (paper Fig. 2a): the ViT's frozen first blocks (prefix); the rest of the ViT, the
        batch's overviews in one call without SRA and its slices in another with the SRA inside its blocks; the
        sampler and the projector; the separators' token embeddings between."""
        cfg, depth = self.cfg, self.prefix_depth
        device = self.llm.model.embed_tokens.weight.device
        states = self.prefix(images)
        if cfg.overview:
            with torch.no_grad():  # the overview passes the plain, frozen ViT (paper 2.4): nothing there to train
                f = self.vision.features(torch.stack([s.overview for s in states]).to(device), depth)  # (B, L, D)
            overviews = self.projector(self.sampler(f) if cfg.sample_overview else f)  # (B, L/k^2 or L, C)
        if cfg.slices:
            adapters = {int(i): a for i, a in self.sra.items()} if self.sra is not None else None
            f = self.vision.features(torch.cat([s.slices for s in states]).to(device), depth,
                                     [s.grid for s in states], adapters)         # (sum m*n, L, D)
            slices = torch.split(self.projector(self.sampler(f)), [len(s.slices) for s in states])  # (m*n, L/k^2, C)
        seps = {name: self.llm.embed(torch.tensor([ids], device=device))[0] for name, ids in self.seps.items()}
        out = []
        for b, s in enumerate(states):
            tokens = {"overview": overviews[b] if cfg.overview else None, **seps}  # (t, C) each
            out.append(torch.cat([tokens[p] if isinstance(p, str) else slices[b][p] for p in cfg.layout(s.grid)]))
        return out                                                               # B x (T_i, C)

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
# precision, checkpoints and the tiny preset

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


def atomic_write(path, content):
    """Writes content (str: UTF-8 text; or a function that writes a given path) to a temporary file beside path,
    then renames it over path, so a killed run never leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    if isinstance(content, str):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(content)
    else:
        content(tmp)
    os.replace(tmp, path)


def git_commit():
    """HEAD of the repository this file lives in (+ "-dirty" with uncommitted changes to tracked files), None
    outside git: recorded beside results so a figure names the code that made it."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "")


BACKBONE_PATHS = ("clip_weights", "llm_path", "tokenizer_path")


def backbone_paths(clip=None, llm=None, tokenizer=None):
    """The --clip/--llm/--tokenizer flags of train.py and eval.py as absolute HiResConfig paths (a checkpoint works
    from any folder); with --llm alone the tokenizer is LLM/tokenizer.model when that file is there."""
    if llm and not tokenizer and os.path.isfile(os.path.join(llm, "tokenizer.model")):
        tokenizer = os.path.join(llm, "tokenizer.model")
    return {k: os.path.abspath(v) for k, v in zip(BACKBONE_PATHS, (clip, llm, tokenizer)) if v}


def config_dict(cfg, path, run=None):
    """cfg as the dict config.json holds for a checkpoint in folder `path`: a backbone inside `run` (default: the
    folder above `path`) is stored relative to `path`, so a moved or copied run loads its own backbones; any other
    is stored absolute (read_config resolves a relative one against `path`, not against the working directory)."""
    d, here = asdict(cfg), os.path.abspath(path)
    run = os.path.abspath(run or os.path.dirname(here))
    for k in BACKBONE_PATHS:
        if d[k]:
            inside = os.path.commonpath([os.path.abspath(d[k]), run]) == run
            d[k] = os.path.relpath(os.path.abspath(d[k]), here) if inside else os.path.abspath(d[k])
    return d


def read_config(path, name="config.json"):
    """path/name (a config_dict) with its relative backbone paths resolved against path; one-line errors for a
    folder that is missing or is not a checkpoint."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such checkpoint folder")
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path}: not a checkpoint folder (no {name}; train.py writes checkpoints)")
    try:
        with open(file) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{file}: unreadable checkpoint config ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{file}: not a checkpoint config (a JSON object)")
    for k in BACKBONE_PATHS:
        if d.get(k) and not os.path.isabs(d[k]):
            d[k] = os.path.normpath(os.path.join(path, d[k]))
    return d


def save_checkpoint(model, path, cfg=None, run=None):
    """Directory with config.json (HiResConfig, default model.cfg, as config_dict) and model.safetensors (the
    trainable tensors cfg has: no LoRA ones when its lora_rank is 0, no LLM ones unless train_llm), each atomic."""
    from safetensors.torch import save_file
    cfg = cfg or model.cfg
    os.makedirs(path, exist_ok=True)
    keep = lambda k: cfg.lora_rank > 0 if "lora_" in k else cfg.train_llm or not k.startswith("llm.")
    sd = {k: v.contiguous().cpu() for k, v in model.trainable_state_dict().items() if keep(k)}
    atomic_write(os.path.join(path, "model.safetensors"), lambda p: save_file(sd, p))
    d = config_dict(cfg, path, run)

    atomic_write(os.path.join(path, "config.json"), json.dumps(d, indent=2))


def load_checkpoint(path, device="cpu", dtype=torch.float32, adapter_dtype=None, **overrides):
    """HiResLLaVA from a save_checkpoint directory (dtype, adapter_dtype as HiResLLaVA); overrides replace config
    fields (e.g. moved backbone paths)."""
    from safetensors.torch import load_file
    d = read_config(path)
    weights = os.path.join(path, "model.safetensors")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{path}: not a checkpoint folder (no model.safetensors)")
    try:
        sd = load_file(weights)
    except Exception as e:
        raise ValueError(f"{weights}: corrupt checkpoint ({type(e).__name__}: {str(e)[:120]})") from None
    names = {f.name for f in fields(HiResConfig)}
    if set(d) - names:
        raise ValueError(f"{path}/config.json: unknown config keys {sorted(set(d) - names)}")
    model = HiResLLaVA(HiResConfig(**{**d, **overrides}), dtype=dtype, device=device, adapter_dtype=adapter_dtype)
    try:
        model.load_trainable_state_dict(sd)
    except ValueError as e:
        raise ValueError(f"{weights}: {e}") from None
    return model


STAGE1_WARNING = ("warning: {} is a stage-1 checkpoint (trained on captions with the plain template, never on an "
                  "instruction): its answers say little; evaluate or merge a stage-2 checkpoint")


def merge_checkpoint(ckpt, out):
    """Deployment form of a stage-2 checkpoint, as LLaVA's merge_lora_weights.py: the LoRA folded into the LLM,
    written as a standard HF LLaMA directory OUT/llm (config.json, model.safetensors in the LLM's own dtype,
    tokenizer.model), beside OUT/config.json (lora_rank 0, train_llm off) and OUT/model.safetensors (the adapters
    only: SRA, sampler, projector): a checkpoint eval.py loads as it is."""
    llm_path = read_config(ckpt)["llm_path"]
    with open(os.path.join(llm_path, "config.json")) as f:
        dtype = getattr(torch, json.load(f).get("torch_dtype") or "float32")  # Vicuna-7B-v1.5: float16
    model = load_checkpoint(ckpt, dtype=dtype, adapter_dtype=torch.float32)
    if model.cfg.template == "plain":
        print(STAGE1_WARNING.format(ckpt), file=sys.stderr)
    merge_lora(model.llm)  # W + (alpha / r) B A, computed in fp32
    llm_dir = os.path.abspath(os.path.join(out, "llm"))
    model.llm.save_pretrained(llm_dir)
    shutil.copyfile(model.cfg.tokenizer_path, os.path.join(llm_dir, "tokenizer.model"))
    for name in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if os.path.isfile(os.path.join(llm_path, name)):  # HF's own tokenizer files, when the LLM has them
            shutil.copyfile(os.path.join(llm_path, name), os.path.join(llm_dir, name))
    cfg = replace(model.cfg, llm_path=llm_dir, tokenizer_path=os.path.join(llm_dir, "tokenizer.model"), lora_rank=0,
                  train_llm=False)
    save_checkpoint(model, out, cfg)
    return cfg


def make_tiny_backbones(path, texts, seed=0, vocab_size=400, **cfg_overrides):
    """Write random tiny backbones into the directory path (a CLIP tower file; llm/, a complete HF LLaMA directory
    with its sentencepiece tokenizer trained on texts) and return a HiResConfig pointing at them, so the tiny preset
    runs the real loading code. Each is built in a directory beside path and renamed into place: a killed run leaves
    no half-written file."""
    path = os.path.abspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "llm"))
    os.makedirs(path, exist_ok=True)
    torch.manual_seed(seed)
    save_vision_tower(build_vision_tower(CLIPConfig.from_preset("tiny")), os.path.join(tmp, "clip_tiny.safetensors"))
    tok = train_tokenizer(list(texts), os.path.join(tmp, "llm", "tokenizer.model"), vocab_size)
    Llama(LlamaConfig.from_preset("tiny", vocab_size=tok.vocab_size)).save_pretrained(os.path.join(tmp, "llm"))
    hf_tokenizer = dict(tokenizer_class="LlamaTokenizer", add_bos_token=True, add_eos_token=False, bos_token="<s>",
                        eos_token="</s>", unk_token="<unk>", pad_token=None, legacy=False)  # ids 1, 2, 0 as trained
    atomic_write(os.path.join(tmp, "llm", "tokenizer_config.json"), json.dumps(hf_tokenizer, indent=2))
    for name in os.listdir(tmp):
        shutil.rmtree(os.path.join(path, name), ignore_errors=True)  # llm/ of a killed run: os.replace needs it gone
        os.replace(os.path.join(tmp, name), os.path.join(path, name))
    os.rmdir(tmp)
    defaults = dict(clip_preset="tiny", clip_weights=os.path.join(path, "clip_tiny.safetensors"),
                    llm_path=os.path.join(path, "llm"), lora_rank=8, lora_alpha=16.0, lora_dropout=0.0)
    return HiResConfig(**{**defaults, **cfg_overrides})


if __name__ == "__main__":  # the model file has no command line; say where the one that merges a checkpoint is
    sys.exit("hires.py: error: the model file has no command line; merge a stage-2 checkpoint with "
             "python eval.py --ckpt CKPT --merge DIR")
