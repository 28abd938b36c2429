"""LLaMA / Vicuna language model and LoRA, in plain PyTorch (tokenizer and templates: conversation.py; llama.cpp's
GGUF files and a chat CLI: llamacpp.py; fused products for CPU decoding: cpu_decode.py).

Must match HF transformers `models/llama/modeling_llama.py` (LlamaForCausalLM: same parameter names, rotate-half
RoPE, RMSNorm in fp32) so HF checkpoints (lmsys/vicuna-7b-v1.5) load strictly with no rename map; Meta's
`llama/model.py` is the same network with interleaved RoPE (docs/method.md#llm-and-lora).
Notation: B batch, T sequence length, C model dim, nh query heads, nkv key/value heads, hs head size.
"""
import json
import math
import os
import pathlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # a label the loss skips (HF's and torch's cross-entropy default)


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    hidden_dim: int = 11008  # SwiGLU inner size
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 0
    tie_word_embeddings: bool = False  # lm_head reuses embed_tokens' weight (SmolLM2, Llama-3.2; not Vicuna)

    def __post_init__(self):
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"LlamaConfig: dim {self.dim} / n_heads {self.n_heads} / n_kv_heads "
                             f"{self.n_kv_heads} must divide evenly")
        self.head_dim = self.dim // self.n_heads

    @classmethod
    def from_preset(cls, name, **overrides):
        presets = {"vicuna-7b": dict(),
                   "tiny": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=172,
                                max_seq_len=1024)}
        if name not in presets:
            raise ValueError(f"unknown Llama preset {name!r}; choose from {sorted(presets)}")
        return cls(**{**presets[name], **overrides})


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # computed in fp32 and cast back before the weight, as HF's LlamaRMSNorm
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(cfg, device=None):
    """HF rotate-half RoPE tables in fp32, (max_seq_len, hs) each, angles duplicated [a, a]: cos, and sin with
    its first half negated, [-sin a, sin a], the sign that HF's rotate_half puts on x's second half."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=device).float() / cfg.head_dim))
    angles = torch.outer(torch.arange(cfg.max_seq_len, device=device).float(), inv_freq)  # (T, hs/2)
    return torch.cat([angles, angles], dim=-1).cos(), torch.cat([-angles.sin(), angles.sin()], dim=-1)  # (T, hs)


def apply_rope(x, cos, sin):
    """x (B, nh, T, hs); cos, signed sin (B, 1, T, hs) in x's dtype. Pairs dim j with j + hs/2 (HF convention):
    HF's x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1], is exactly x * cos + [x2, x1] * [-sin, sin],
    and [x2, x1] is one roll (fewer ops per decode step)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


class KVCache:
    """Preallocated (static) key/value cache of one layer, (B, nkv, max_len, hs): each head's prefix is one
    contiguous block, which the decode step's matmuls read in place."""

    def __init__(self, B, n_kv_heads, max_len, head_dim, dtype, device):
        self.k = torch.zeros(B, n_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, start, k, v):
        """Writes k, v (B, nkv, T, hs) at [start, start+T) and returns the filled prefix (B, nkv, start+T, hs)."""
        end = start + k.shape[2]
        self.k[:, :, start:end], self.v[:, :, start:end] = k, v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, start=0):
        """x (B, T, C); mask None (plain causal) or bool (B, 1, T|1, L) True=attend; cache: KVCache or None."""
        B, T, C = x.shape
        q, k, v = self.project(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(start, k, v)  # (B, nkv, L, hs)
        if T == 1 and cache is not None:  # a decode step: the new token sees every real cached key
            # grouped-query attention as query rows: the nh/nkv heads that share a kv head attend to its cache
            # in one call, read in place (fewer, larger problems than enable_gqa's nh single rows; bench.py llama)
            q = q.view(B, self.n_kv_heads, -1, self.head_dim)  # (B, nkv, nh/nkv, hs)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).view(B, self.n_heads, 1, self.head_dim)
        else:  # grouped-query attention: each kv head serves nh/nkv query heads, without copying the cache
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                               enable_gqa=self.n_kv_heads != self.n_heads)  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)

    def project(self, x):
        """x (B, T, C) -> q (B, T, nh*hs), k, v (B, T, nkv*hs). cpu_decode.py runs the three as one product."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        gate, up = self.project(x)
        return self.down_proj(F.silu(gate) * up)  # SwiGLU

    def project(self, x):
        """x (B, T, C) -> gate, up (B, T, hidden). cpu_decode.py runs the two as one product."""
        return self.gate_proj(x), self.up_proj(x)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, start=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Holds HF's `model.*` parameters (embed_tokens, layers, norm) so the names match the checkpoint."""

    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


def padded_positions_and_mask(keys, T):
    """keys (B, T) bool real tokens -> positions (B, T) = cumsum - 1 (as HF) and a causal+padding mask
    (B, 1, T, T). Each query also sees itself so pad rows are never fully masked (NaN in some SDPA backends)."""
    positions = (keys.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=keys.device).tril()
    mask = (causal & keys[:, None, :]) | torch.eye(T, dtype=torch.bool, device=keys.device)  # (B, T, T)
    return positions, mask[:, None]  # (B, 1, T, T)


def sample(logits, temperature, top_p, generator=None):
    """logits (B, V) -> next ids (B,): argmax at temperature 0, else nucleus sampling over softmax(logits / t)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    sorted_p[(sorted_p.cumsum(-1) - sorted_p) > top_p] = 0  # keep the smallest prefix whose mass reaches top_p
    choice = torch.multinomial(sorted_p, 1, generator=generator)  # (B, 1); multinomial renormalises
    return idx.gather(-1, choice).squeeze(-1)


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False
        # RoPE tables (max_seq_len, hs) in fp32, plain tensors rather than buffers (as Meta's freqs_cis): a
        # .to(bfloat16) of the model leaves them fp32; _run moves them to the activations' device
        self.rope_cos, self.rope_sin = rope_tables(cfg, device="cpu")  # sin signed: [-sin, sin]
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)  # HF's initializer_range
        self._tie_weights()
        self._column_major()

    def _tie_weights(self):
        """With tie_word_embeddings, lm_head.weight IS embed_tokens.weight (one Parameter, (V, C)): one gradient,
        one optimizer state, one tensor in memory; saved once, under HF's name model.embed_tokens.weight."""
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _column_major(self):
        """On CPU, holds the weight W (out, in) of each nn.Linear that keeps or widens the width (out >= in)
        column-major, W^T contiguous: x @ W^T is then a GEMM without transpose, which MKL streams faster in the
        one-row products of a decode step (lm_head 1.6x, q/k/v/o/gate/up 1.2-1.4x; down_proj, which narrows, is
        faster row-major). Only the memory order changes: names, shapes, values and saved files do not, and
        .to(dtype or device) keeps it. Training's losses depend on it in their last bits: in another memory
        order a GEMM sums in another order."""
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.out_features >= m.in_features and m.weight.device.type == "cpu":
                m.weight.data = m.weight.data.t().contiguous().t()

    def embed(self, tokens):
        """tokens (B, T) long -> (B, T, C) token embeddings."""
        return self.model.embed_tokens(tokens)

    def _run(self, x, positions, mask, caches=None, start=0, last_only=False, keep=None):
        """x (B, T, C) embeddings, positions (B, T) long, mask as Attention -> logits (B, T|1, V); with keep (B, T)
        bool, logits (K, V) of the kept positions only (the head is most of a small model's cost)."""
        if self.rope_cos.device != x.device:
            self.rope_cos, self.rope_sin = self.rope_cos.to(x.device), self.rope_sin.to(x.device)
        cos = self.rope_cos[positions].to(x.dtype).unsqueeze(1)  # (B, 1, T, hs): the same over heads
        sin = self.rope_sin[positions].to(x.dtype).unsqueeze(1)
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.model.layers):
            cache = caches[i] if caches is not None else None
            if ckpt:
                x = checkpoint(layer, x, cos, sin, mask, cache, start, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, start)
        x = x[:, -1:] if last_only else x if keep is None else x[keep]
        return self.lm_head(self.model.norm(x))  # (B, T, V) or (K, V)

    def _inputs(self, tokens, input_embeds, attention_mask):
        """-> x (B, T, C), positions (B, T) and mask (None: no padding, SDPA's fast is_causal path)."""
        x = self.embed(tokens) if input_embeds is None else input_embeds  # (B, T, C)
        B, T, _ = x.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds the context max_seq_len={self.cfg.max_seq_len}")
        if attention_mask is None or bool(attention_mask.all()):
            return x, torch.arange(T, device=x.device).expand(B, T), None
        return x, *padded_positions_and_mask(attention_mask.to(x.device).bool(), T)

    def forward(self, tokens=None, *, input_embeds=None, attention_mask=None, labels=None):
        """tokens (B, T) or input_embeds (B, T, C); attention_mask (B, T) 1=real 0=pad; labels (B, T) with -100
        ignored. Returns logits (B, T, V), or with labels the mean next-token cross-entropy over the labelled tokens
        (0, with a zero gradient, when no token is labelled)."""
        if labels is None:
            return self._run(*self._inputs(tokens, input_embeds, attention_mask))
        logp = self.label_logprobs(tokens, input_embeds=input_embeds, attention_mask=attention_mask, labels=labels)
        return -logp.sum() / (labels[:, 1:] != IGNORE_INDEX).sum().clamp(min=1)

    def label_logprobs(self, tokens=None, *, input_embeds=None, attention_mask=None, labels):
        """log p(labels[:, t+1] | tokens up to t) -> (B, T-1) fp32, 0 where the label is ignored. Logits are
        computed at labelled positions only."""
        if attention_mask is not None and torch.equal(attention_mask.long().cumprod(-1), attention_mask.long()):
            attention_mask = None  # right padding only: causal attention keeps every real token off the pads already
        x, positions, mask = self._inputs(tokens, input_embeds, attention_mask)
        target = labels[:, 1:].to(x.device)                                  # (B, T-1)
        keep = target != IGNORE_INDEX
        logits = self._run(x, positions, mask, keep=F.pad(keep, (0, 1), value=False)).float()  # (K, V)
        out = torch.zeros(target.shape, device=x.device, dtype=logits.dtype)
        out[keep] = -F.cross_entropy(logits, target[keep], reduction="none")
        return out

    # ---- generation (KV cache) ----

    @torch.inference_mode()  # no autograd bookkeeping at all: less overhead per op than no_grad
    def generate(self, tokens=None, *, input_embeds=None, attention_mask=None, max_new_tokens=32,
                 temperature=0.0, top_p=1.0, eos_id=None, generator=None):
        """LEFT-padded prompts (B, T) ids or (B, T, C) embeddings -> each sequence's new ids (EOS excluded).
        Greedy when temperature == 0, else temperature + nucleus (top_p) sampling; stops per sequence at EOS."""
        x, positions, mask = self._inputs(tokens, input_embeds, attention_mask)
        B, T, _ = x.shape
        eos_id = self.cfg.eos_id if eos_id is None else eos_id
        max_new_tokens = min(max_new_tokens, self.cfg.max_seq_len - T)  # rope table and cache end at the context
        if max_new_tokens <= 0:  # the prompt fills the context exactly
            return [[] for _ in range(B)]
        L = T + max_new_tokens
        caches = [KVCache(B, self.cfg.n_kv_heads, L, self.cfg.head_dim, x.dtype, x.device)
                  for _ in range(self.cfg.n_layers)]
        padded = mask is not None
        if padded:
            keys = torch.zeros(B, L, dtype=torch.bool, device=x.device)  # (B, L) which cache slots are real
            keys[:, :T] = attention_mask.to(x.device).bool()
        logits = self._run(x, positions, mask, caches, 0, last_only=True)[:, -1]  # (B, V)
        pos = positions[:, -1:] + 1  # (B, 1) next position of every sequence
        new = torch.full((B, max_new_tokens), self.cfg.pad_id, dtype=torch.long, device=x.device)
        done = torch.zeros(B, dtype=torch.bool, device=x.device)
        for step in range(max_new_tokens):
            nxt = torch.where(done, self.cfg.pad_id, sample(logits, temperature, top_p, generator))  # (B,)
            new[:, step] = nxt
            done |= nxt == eos_id
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            if padded:
                keys[:, T + step] = True
                mask = keys[:, None, None, :T + step + 1]  # (B, 1, 1, L')
            logits = self._run(self.embed(nxt[:, None]), pos + step, mask, caches, T + step)[:, -1]  # (B, V)
        return [row[:row.index(eos_id)] if eos_id in row else row for row in new[:, :step + 1].tolist()]

    # ---- HF checkpoint I/O ----

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """Loads an HF Llama directory (config.json + safetensors or .bin, single or sharded)."""
        cfg = config_from_hf(path)
        state, sources = read_hf_weights(path, dtype, device)
        files = ", ".join(sorted(set(sources.values())))
        return cls.from_state_dict(cfg, state, f"{path}: checkpoint ({files})")

    @classmethod
    def from_state_dict(cls, cfg, state, source):
        """The model of cfg holding the tensors of state (HF names; llamacpp.py: a GGUF file's), checked key by
        key; no copy: the model is built on the meta device and the tensors are assigned. source: what the
        error messages name ("DIR: checkpoint (model.safetensors)")."""
        with torch.device("meta"):
            model = cls(cfg)
        if cfg.tie_word_embeddings and "model.embed_tokens.weight" in state:  # HF writes the shared tensor once
            if "lm_head.weight" in state and not torch.equal(state["lm_head.weight"],
                                                             state["model.embed_tokens.weight"]):
                raise ValueError(f"{source}: the config ties the word embeddings but lm_head.weight differs "
                                 "from model.embed_tokens.weight")
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        check_state_dict(model.state_dict(), state, f"{source} does not match its config")
        model.load_state_dict(state, strict=True, assign=True)
        model._tie_weights()  # assign=True gave each name its own Parameter: share the embedding's again
        model._column_major()
        return model.eval()

    def save_pretrained(self, path):
        """Writes config.json (transformers-4.x keys) and model.safetensors into the directory path, as HF does."""
        if any(isinstance(m, LoRALinear) and not m.merged for m in self.modules()):
            raise ValueError("save_pretrained: merge_lora(model) first (HF has no LoRA layers)")
        os.makedirs(path, exist_ok=True)
        c = self.cfg
        hf = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=c.vocab_size,
                  hidden_size=c.dim, intermediate_size=c.hidden_dim, num_hidden_layers=c.n_layers,
                  num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, hidden_act="silu",
                  max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
                  rope_scaling=None, bos_token_id=c.bos_id, eos_token_id=c.eos_id, pad_token_id=c.pad_id,
                  tie_word_embeddings=c.tie_word_embeddings, attention_bias=False, mlp_bias=False,
                  torch_dtype=str(self.lm_head.weight.dtype).removeprefix("torch."))
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()
                 if "lora_" not in k and not (c.tie_word_embeddings and k == "lm_head.weight")}
        save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        pathlib.Path(path, "config.json").write_text(json.dumps(hf, indent=2))


def check_state_dict(expected, state, where):
    """The strict load check: ValueError (one line, up to 4 names each) if state's keys differ from expected's or a
    shape differs. expected, state: name -> tensor."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = sorted(f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})"
                    for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        first = lambda xs: (", ".join(xs[:4]) + (f" and {len(xs) - 4} more" if len(xs) > 4 else "")) or "none"
        raise ValueError(f"{where}: missing {first(missing)}; unexpected {first(unexpected)}; "
                         f"wrong shape {first(shapes)}")


def config_from_hf(path):
    """LlamaConfig from an HF config.json (transformers 4.x: optional rope_theta; 5.x: rope_parameters)."""
    file = os.path.join(path, "config.json")
    try:
        with open(file) as f:
            hf = json.load(f)
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"unsupported rope scaling {rope}")
        if hf.get("hidden_act", "silu") != "silu" or hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ValueError("only hidden_act silu without attention/mlp biases is supported")
        cfg = LlamaConfig(vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                          n_heads=hf["num_attention_heads"],
                          n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                          hidden_dim=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
                          rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                          max_seq_len=hf.get("max_position_embeddings", 4096), bos_id=hf.get("bos_token_id", 1),
                          eos_id=hf.get("eos_token_id", 2), pad_id=hf.get("pad_token_id") or 0,
                          tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))
        if hf.get("head_dim", cfg.head_dim) != cfg.head_dim:
            raise ValueError(f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
        return cfg
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: not found (expected an HF Llama directory)") from None
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{file}: bad Llama config: {e!r}") from None


def read_hf_weights(path, dtype, device):
    """All tensors of an HF directory cast to dtype on device, one tensor at a time; also the file per key.
    Pickled .bin shards are read with torch.load(weights_only=True, mmap=True): tensors only, never code."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
            except (KeyError, ValueError) as e:
                raise ValueError(f"{index}: bad shard index: {e!r}") from None
            break
        if os.path.isfile(os.path.join(path, single)):
            files = [single]
            break
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors, pytorch_model.bin or shard index found")
    state, sources = {}, {}
    for name in files:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file}: shard listed in the index is missing")
        try:
            if name.endswith(".safetensors"):
                with safe_open(file, framework="pt") as f:
                    tensors = ((k, f.get_tensor(k)) for k in f.keys())
                    state.update(_keep(tensors, name, sources, dtype, device))
            else:
                sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                state.update(_keep(sd.items(), name, sources, dtype, device))
        except Exception as e:  # safetensors / unpickler errors: one line naming the file
            raise ValueError(f"{file}: cannot read weights: {str(e).splitlines()[0]}") from None
    return state, sources


def _keep(items, name, sources, dtype, device):
    for k, v in items:
        if k.endswith("rotary_emb.inv_freq"):  # recomputed from the config; old exports stored it per layer
            continue
        sources[k] = name
        yield k, v.to(device=device, dtype=dtype)


# ---- LoRA (Hu et al. 2021), by hand ----

class LoRALinear(nn.Linear):
    """y = W x + (alpha / r) * B A dropout(x); A kaiming-uniform, B zeros so it starts as the base layer.
    Keeps the base `weight` under its HF name; merge() folds B A into W for deployment, idempotent."""

    def __init__(self, base: nn.Linear, rank, alpha, dropout):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.lora_A = nn.Parameter(base.weight.new_empty(rank, self.in_features))  # (r, in)
        self.lora_B = nn.Parameter(base.weight.new_zeros(self.out_features, rank))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout)
        self.merged = False

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def merge(self):
        """W += (alpha / r) B A, computed in fp32; the branch is then skipped. Does nothing the second time."""
        if not self.merged:
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling  # (out, in)
            self.weight.copy_(self.weight.float() + delta)
            self.merged = True


def apply_lora(model, rank=8, alpha=16, dropout=0.0,
               targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
    """Freezes every parameter of model, then wraps the nn.Linear children named in targets. Returns the count."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and type(child) is nn.Linear:
                setattr(parent, name, LoRALinear(child, rank, alpha, dropout))
                wrapped += 1
    return wrapped


def merge_lora(model):
    """Folds every LoRA branch into its base weight; idempotent."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.merge()
