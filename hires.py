"""HiRes-LLaVA (arXiv 2407.08706): SliceRestore Adapter, Self-Mining Sampler, and the full model (slicing.py slices).

Paper sections: 3.1 SliceRestore Adapter (SRA), 3.2 Self-Mining Sampler (SMS), Fig. 2a pipeline. Details the paper
does not give are our reconstruction, marked "(design choice)"; they are named constants or HiResConfig flags, each
listed with its reason and its tensor shapes in docs/method.md. Notation: m rows,
n cols of slices; S base resolution; h = w tokens per side of one ViT image; L = h*w; D ViT width; C LLM width;
k sampler kernel.
"""
import argparse
import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass, fields, replace
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from clip import CLIPConfig, VisionTower, build_vision_tower, default_adapter_layers, save_vision_tower
from conversation import (IGNORE_INDEX, IMAGE_TOKEN_INDEX, Tokenizer, encode_conversation, encode_prompt, image_first,
                          train_tokenizer)
from llama import Llama, LlamaConfig, apply_lora, check_state_dict, merge_lora
from slicing import image_token_count, normalize, preprocess_image

# separators as plain text tokens, so no new embedding rows (design choice, as LLaVA-UHD;
# docs/method.md#projector-and-separators)
SEP_OVERVIEW = "\n"   # (a) between the overview and the slices
SEP_SLICE = ","       # (b) between two slices of a row
SEP_ROW = "\n"        # (c) at the end of each row of slices
SRA_KERNEL = 3        # depthwise conv of the local fusion (design choice)
SAMPLERS = ("sms", "qformer", "avgpool")


@dataclass
class HiResConfig:
    clip_preset: str = "vit-l-14-336"
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
        if not self.tokenizer_path and self.llm_path:
            self.tokenizer_path = os.path.join(self.llm_path, "tokenizer.model")

    def image_tokens(self, grid):
        """LLM tokens of one image whose slice grid is (m, n), as encode_images lays them out."""
        h = CLIPConfig.from_preset(self.clip_preset).grid
        per_image = (h // self.kernel) ** 2
        m, n = grid if self.slices else (0, 0)
        count = image_token_count(m, n, per_image)
        if not self.sample_overview:
            count += h * h - per_image                     # the overview keeps all h*w tokens
        if not self.overview:
            count -= (h * h if not self.sample_overview else per_image) + 1  # no overview, no separator (a)
        return count



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


def merge(p, m, n, h, w):
    """Slices (G*m*n, h*w, D) of G images, each image's slices row-major, -> G feature maps (G, D, m*h, n*w) with the
    slices on their grid."""
    D = p.shape[-1]
    f = p.view(-1, m, n, h, w, D).permute(0, 5, 1, 3, 2, 4)                 # (G, D, m, h, n, w)
    return f.reshape(-1, D, m * h, n * w)


def split(f, m, n, h, w):
    """Inverse of merge: (G, D, m*h, n*w) -> (G*m*n, h*w, D)."""
    D = f.shape[1]
    p = f.view(-1, D, m, h, n, w).permute(0, 2, 4, 3, 5, 1)                 # (G, m, n, h, w, D)
    return p.reshape(-1, h * w, D)


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

    def forward(self, p, mn):
        """p (G*m*n, L, D): the slices of G images that share the grid (m, n), image by image -> (G*m*n, L, D), the
        SRA term added beside the block's attention. Each image is merged, fused and split on its own."""
        (m, n), h = mn, self.grid
        f = merge(p, m, n, h, h)                                            # (G, D, m*h, n*w)
        g = F.adaptive_avg_pool2d(f, (h, h))                                # (G, D, h1, w1) = (h, w) (design choice)
        g = self.attn(g.flatten(2).transpose(1, 2))                         # (G, h*w, D)
        g = g.transpose(1, 2).reshape(-1, p.shape[-1], h, h)                # (G, D, h, w)
        g = F.interpolate(g, size=f.shape[-2:], mode="bilinear", align_corners=False)  # (G, D, m*h, n*w)
        return self.proj(split(self.local(f) + g, m, n, h, h))             # (G*m*n, L, D)


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

    def queries(self, p):
        N, L, D = p.shape
        f = p.transpose(1, 2).reshape(N, D, self.grid, self.grid)            # (N, D, h, w)
        return F.avg_pool2d(f, self.kernel).flatten(2).transpose(1, 2)        # (N, L/k^2, D)

    def forward(self, p):
        q = self.queries(p)                                                  # (N, L/k^2, D)
        x = q + self.attn(self.norm_q(q), self.norm_kv(p), mask=self.mask)
        return x + self.ffn(self.norm_ffn(x))


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

    def queries(self, p):
        return self.query.expand(p.shape[0], -1, -1)                         # (N, L/k^2, D)


class AvgPoolSampler(nn.Module):
    """Ablation baseline: plain k x k average pooling."""

    def __init__(self, grid, kernel=2):
        super().__init__()
        self.grid, self.kernel = grid, kernel

    queries = SelfMiningSampler.queries

    def forward(self, p):
        return self.queries(p)                                               # (N, L/k^2, D)


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
        self.seps = [separator_ids(self.tokenizer, t) for t in (SEP_OVERVIEW, SEP_SLICE, SEP_ROW)]
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
        self.stage = stage
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

    @torch.no_grad()
    def prefix(self, images):
        """preprocess() tuples -> Prefix tuples: each image's hidden states after the ViT blocks before the first SRA
        layer, which are frozen in both stages (so train.py can compute them once per image)."""
        device = self.llm.model.embed_tokens.weight.device
        pixels = torch.cat([torch.cat([o[None], s]) for o, s, _ in images]).to(device)
        x = self.vision.prefix(normalize(pixels), min(self.cfg.sra_layers))     # (N, 1+L, D)
        parts = torch.split(x, [1 + len(s) for _, s, _ in images])
        return [Prefix(p[0], p[1:], tuple(g)) for p, (_, _, g) in zip(parts, images)]

    def encode_images(self, images):
        """List of preprocess() tuples (or all Prefix tuples) -> list of (T_i, C) embeddings: overview, (a), slices
        row-major with (b) between slices and (c) at each row end (paper Fig. 2a). The batch's overviews go through
        one ViT call, its slices through another with the SRA."""
        cfg, device = self.cfg, self.llm.model.embed_tokens.weight.device
        cached = isinstance(images[0], Prefix)
        if any(isinstance(im, Prefix) != cached for im in images):
            raise ValueError("a batch mixes Prefix tuples and pixels")

        def vit(x, groups=None, adapters=None):                                  # uint8 pixels or Prefix states
            x = x.to(device)
            return self.vision(x if cached else normalize(x), groups, adapters,
                               start=min(cfg.sra_layers) if cached else 0)       # (N, L, D)

        if cfg.overview:
            with torch.no_grad():  # the overview passes the plain, frozen ViT (paper 2.4): nothing there to train
                f = vit(torch.stack([overview for overview, _, _ in images]))     # (B, L, D)
            overviews = self.projector(self.sampler(f) if cfg.sample_overview else f)  # (B, L/k^2 or L, C)
        if cfg.slices:
            adapters = {int(i): a for i, a in self.sra.items()} if self.sra is not None else None
            f = vit(torch.cat([s for _, s, _ in images]), [tuple(g) for _, _, g in images], adapters)  # (S, L, D)
            slices = iter(self.projector(self.sampler(f)))                       # S x (L/k^2, C)
        sep_a, sep_b, sep_c = (self.llm.embed(torch.tensor([s], device=device))[0] for s in self.seps)  # (k_i, C)
        out = []
        for b, (_, _, (m, n)) in enumerate(images):
            parts = [overviews[b]] + ([sep_a] if cfg.slices else []) if cfg.overview else []
            for r in range(m if cfg.slices else 0):
                for c in range(n):
                    parts += [next(slices), sep_b if c < n - 1 else sep_c]
            out.append(torch.cat(parts))                                         # (T_i, C)
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
        E, Lb, M = pad_batch(seqs, T)
        loss = self.llm(input_embeds=E, attention_mask=M, labels=Lb)
        return loss

    @torch.no_grad()
    def generate(self, images, prompts, max_new_tokens=32, temperature=0.0, top_p=1.0, too_long="raise"):
        """PIL images (or None) and user texts -> answers; vicuna_v1 prompt, left-padded batched generation.
        A prompt that fills the LLM context raises PromptTooLong, or with too_long="return" gets it as its answer."""
        pre = [im if im is None or isinstance(im, tuple) else self.preprocess(im) for im in images]
        ids = [encode_prompt(p if im is None else image_first(p), self.tokenizer) for p, im in zip(prompts, pre)]
        seqs, ctx = self._embed_batch(ids, [None] * len(ids), pre), self.context
        answers = [PromptTooLong(f"prompt is {len(e)} tokens with its image; the LLM context holds {ctx}, so no "
                                 f"answer fits") if len(e) >= ctx else None for e, _ in seqs]
        errors = [a for a in answers if a is not None]
        if errors and too_long == "raise":
            raise errors[0]
        seqs = [s for s, a in zip(seqs, answers) if a is None]
        if seqs:
            E, _, M = pad_batch(seqs, max(len(e) for e, _ in seqs), left=True)
            out = iter(self.llm.generate(input_embeds=E, attention_mask=M, max_new_tokens=max_new_tokens,
                                         temperature=temperature, top_p=top_p, eos_id=self.tokenizer.eos_id))
            answers = [self.tokenizer.decode(next(out)).strip() if a is None else a for a in answers]
        return answers

    @torch.no_grad()
    def option_logprobs(self, images, prompts, options, too_long="raise"):
        """Multiple choice by likelihood: PIL images (or None), user texts and each one's list of option texts ->
        per prompt, the log-probability of each option as the vicuna_v1 answer (sum over its tokens and </s>).
        The image is encoded once per prompt; all options are scored as one batch. A prompt whose longest option
        does not fit the LLM context raises PromptTooLong, or with too_long="return" gets it instead of scores."""
        pre = [im if im is None or isinstance(im, tuple) else self.preprocess(im) for im in images]
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
        ctx, scores = self.llm.cfg.max_seq_len, [[] for _ in prompts]
        for (e, _), k in zip(seqs, owner):
            if len(e) > ctx and not isinstance(scores[k], PromptTooLong):
                scores[k] = PromptTooLong(f"prompt and option are {len(e)} tokens with the image; the LLM context "
                                          f"holds {ctx}")
                if too_long == "raise":
                    raise scores[k]
        fit = [(seq, k) for seq, k in zip(seqs, owner) if not isinstance(scores[k], PromptTooLong)]
        if fit:
            E, Lb, M = pad_batch([seq for seq, _ in fit], max(len(e) for (e, _), _ in fit))
            logp = self.llm.label_logprobs(input_embeds=E, attention_mask=M, labels=Lb).sum(1)  # (options,)
            for (_, k), lp in zip(fit, logp.tolist()):
                scores[k].append(lp)
        return scores


def pad_batch(seqs, T, left=False):
    """[(embeds (t, C), labels (t,))] -> embeds (B, T, C), labels (B, T), mask (B, T); each cut to its first T
    tokens and right-padded (training), or left-padded (generation)."""
    e0 = seqs[0][0]
    E = e0.new_zeros(len(seqs), T, e0.shape[1])
    Lb = torch.full((len(seqs), T), IGNORE_INDEX, device=e0.device)
    M = torch.zeros(len(seqs), T, dtype=torch.long, device=e0.device)
    for b, (e, lab) in enumerate(seqs):
        t = min(len(e), T)
        at = slice(T - t, T) if left else slice(0, t)
        E[b, at], Lb[b, at], M[b, at] = e[:t], lab[:t], 1
    return E, Lb, M


# ----------------------------------------------------------------------------------------------------------------
# checkpoints and the tiny preset

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


def save_checkpoint(model, path, cfg=None):
    """Directory with config.json (HiResConfig, default model.cfg) and model.safetensors (the trainable tensors
    cfg has: no LoRA ones when its lora_rank is 0), each atomic."""
    from safetensors.torch import save_file
    cfg = cfg or model.cfg
    os.makedirs(path, exist_ok=True)
    sd = {k: v.contiguous().cpu() for k, v in model.trainable_state_dict().items()
          if cfg.lora_rank or "lora_" not in k}
    atomic_write(os.path.join(path, "model.safetensors"), lambda p: save_file(sd, p))

    atomic_write(os.path.join(path, "config.json"), json.dumps(asdict(cfg), indent=2))


def load_checkpoint(path, device="cpu", dtype=torch.float32, adapter_dtype=None, **overrides):
    """HiResLLaVA from a save_checkpoint directory (dtype, adapter_dtype as HiResLLaVA); overrides replace config
    fields (e.g. moved backbone paths)."""
    from safetensors.torch import load_file
    files = [os.path.join(path, f) for f in ("config.json", "model.safetensors")]
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{f}: checkpoint file not found")
    try:
        with open(files[0]) as f:
            d = json.load(f)
        sd = load_file(files[1])
    except Exception as e:
        raise ValueError(f"{path}: corrupt checkpoint ({type(e).__name__}: {str(e)[:120]})") from None
    names = {f.name for f in fields(HiResConfig)}
    if set(d) - names:
        raise ValueError(f"{files[0]}: unknown config keys {sorted(set(d) - names)}")
    model = HiResLLaVA(HiResConfig(**{**d, **overrides}), dtype=dtype, device=device, adapter_dtype=adapter_dtype)
    try:
        model.load_trainable_state_dict(sd)
    except ValueError as e:
        raise ValueError(f"{files[1]}: {e}") from None
    return model


def merge_checkpoint(ckpt, out):
    """Deployment form of a stage-2 checkpoint, as LLaVA's merge_lora_weights.py: the LoRA folded into the LLM,
    written as a standard HF LLaMA directory OUT/llm (config.json, model.safetensors in the LLM's own dtype,
    tokenizer.model), beside OUT/config.json (lora_rank 0) and OUT/model.safetensors (SRA, sampler, projector): a
    checkpoint eval.py loads as it is."""
    with open(os.path.join(ckpt, "config.json")) as f:
        llm_path = json.load(f)["llm_path"]
    with open(os.path.join(llm_path, "config.json")) as f:
        dtype = getattr(torch, json.load(f).get("torch_dtype") or "float32")  # Vicuna-7B-v1.5: float16
    model = load_checkpoint(ckpt, dtype=dtype, adapter_dtype=torch.float32)
    merge_lora(model.llm)  # W + (alpha / r) B A, computed in fp32
    llm_dir = os.path.abspath(os.path.join(out, "llm"))
    model.llm.save_pretrained(llm_dir)
    shutil.copyfile(model.cfg.tokenizer_path, os.path.join(llm_dir, "tokenizer.model"))
    for name in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if os.path.isfile(os.path.join(llm_path, name)):  # HF's own tokenizer files, when the LLM has them
            shutil.copyfile(os.path.join(llm_path, name), os.path.join(llm_dir, name))
    cfg = replace(model.cfg, llm_path=llm_dir, tokenizer_path=os.path.join(llm_dir, "tokenizer.model"), lora_rank=0)
    save_checkpoint(model, out, cfg)
    return cfg


def make_tiny_backbones(path, texts, seed=0, vocab_size=400, **cfg_overrides):
    """Write random tiny backbones (CLIP tower, LLaMA, sentencepiece trained on texts) into the directory path and
    return a HiResConfig pointing at them, so the tiny preset runs the real loading code. Each is built in a
    directory beside path and renamed into place: a killed run leaves no half-written file."""
    path = os.path.abspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    os.makedirs(path, exist_ok=True)
    torch.manual_seed(seed)
    save_vision_tower(build_vision_tower(CLIPConfig.from_preset("tiny")), os.path.join(tmp, "clip_tiny.safetensors"))
    tok = train_tokenizer(list(texts), os.path.join(tmp, "tokenizer.model"), vocab_size)
    Llama(LlamaConfig.from_preset("tiny", vocab_size=tok.vocab_size)).save_pretrained(os.path.join(tmp, "llm"))
    for name in os.listdir(tmp):
        shutil.rmtree(os.path.join(path, name), ignore_errors=True)  # llm/ of a killed run: os.replace needs it gone
        os.replace(os.path.join(tmp, name), os.path.join(path, name))
    os.rmdir(tmp)
    defaults = dict(clip_preset="tiny", clip_weights=os.path.join(path, "clip_tiny.safetensors"),
                    llm_path=os.path.join(path, "llm"), tokenizer_path=os.path.join(path, "tokenizer.model"),
                    lora_rank=8, lora_alpha=16.0, lora_dropout=0.0)
    return HiResConfig(**{**defaults, **cfg_overrides})


def main(argv=None):
    ap = argparse.ArgumentParser(description="Merge a stage-2 checkpoint's LoRA into its LLM for deployment. "
                                 "(The slicing picture: python slicing.py --show IMAGE.)")
    ap.add_argument("--merge", metavar="CKPT", required=True, help="stage-2 checkpoint to merge: writes OUT/llm (HF "
                    "LLaMA directory) and OUT/config.json + OUT/model.safetensors (the adapters), which eval.py loads")
    ap.add_argument("--out", required=True, help="output directory")
    args = ap.parse_args(argv)
    cfg = merge_checkpoint(args.merge, args.out)
    print(f"wrote {cfg.llm_path} (HF LLaMA, LoRA merged) and {args.out}/model.safetensors (adapters)")


if __name__ == "__main__":
    main()
