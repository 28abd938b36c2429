"""LLaVA's conversations as token ids: the SentencePiece tokenizer (as HF's slow LlamaTokenizer with legacy=False),
the vicuna_v1 and plain templates and their label masking, following LLaVA's `conversation.py` / `preprocess_v1` /
`tokenizer_image_token` (docs/method.md#llm-and-lora); and the byte-level BPE tokenizer and chat template a GGUF
file carries (GPT-2's scheme, as HF tokenizers' ByteLevel BPE runs it for SmolLM2).
"""
import functools
import io
import math
import os
import pathlib
import re
import unicodedata

# LLaVA's constants.py: a label the loss skips (torch's and HF's cross-entropy default, llama.IGNORE_INDEX), and the
# placeholder id where `<image>` stood in a prompt
IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200

SYSTEM_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


# ---- tokenizer (SentencePiece, as HF's slow LlamaTokenizer with legacy=False) ----

class Tokenizer:
    def __init__(self, path):
        import sentencepiece as spm
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: tokenizer model not found")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path}: not a SentencePiece model ({str(e).splitlines()[0]})") from None
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.unk_id()  # LLaVA: pad = unk
        self.vocab_size = self.sp.get_piece_size()
        self._unk_len = len(self.sp.encode("<unk>"))

    def _pieces(self, text, prefix):
        if not text:
            return []
        if prefix:  # SentencePiece's dummy prefix: "Hi" -> "▁Hi"
            return self.sp.encode(text)
        # no dummy prefix (text continues a sequence): HF's trick of encoding behind "<unk>" and cutting it off
        return self.sp.encode("<unk>" + text)[self._unk_len:]

    def encode(self, text, bos=True, prefix=True):
        """text -> ids; literal "</s>" -> eos_id, the text after it gets no dummy prefix (HF legacy=False)."""
        ids = [self.bos_id] if bos else []
        for i, part in enumerate(text.split("</s>")):
            if i:
                ids.append(self.eos_id)
            ids += self._pieces(part, prefix and i == 0)
        return ids

    def decode(self, ids):
        return self.sp.decode([i for i in ids if i >= 0 and not self.sp.is_control(i)])


def train_tokenizer(texts, path, vocab_size):
    """Deterministic BPE SentencePiece model (single thread, no sampling or shuffling) with <unk>=0, <s>=1,
    </s>=2, no pad, byte fallback, Llama's normaliser settings; written to path."""
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, character_coverage=1.0,
        split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, hard_vocab_limit=False,
        max_sentence_length=1 << 16, minloglevel=2)
    pathlib.Path(path).write_bytes(model.getvalue())
    return Tokenizer(path)


# ---- byte-level BPE (GPT-2; SmolLM2), from a GGUF file's tokenizer.ggml.* metadata ----

def bytes_to_unicode():
    """GPT-2's map byte -> character: printable Latin-1 bytes stand for themselves, the other 68 (controls,
    space, ...) for chr(256 + k) in byte order, so every byte string is spelled in visible characters (" " is "Ġ")."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + k) for k, b in enumerate(rest)}}


@functools.cache
def unicode_class(major):
    """The body of a regex character class matching Unicode category major* ("L" letters, "N" numbers): Python's
    re has no \\p{L}; built once from unicodedata (about a second)."""
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
    """Byte-level BPE as SmolLM2's tokenizer.json runs it: control tokens (<|im_start|>, ...) matched whole;
    the rest split into each digit alone, then GPT-2's regex (contractions, letter runs with one leading space,
    punctuation runs, whitespace); each piece's UTF-8 bytes spelled by bytes_to_unicode, then the adjacent pair
    of lowest merge rank merged until none is left; pieces looked up in the vocabulary."""

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
        self.split_words = re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^\s{L}{N}]+|\s+(?!\S)|\s+")
        self.cache = {}

    @classmethod
    def from_gguf(cls, meta):
        """meta: the tokenizer.* fields of a GGUF file (llama.read_gguf)."""
        if meta.get("tokenizer.ggml.model") != "gpt2":
            raise ValueError(f"tokenizer {meta.get('tokenizer.ggml.model')!r}: only byte-level BPE ('gpt2') is "
                             "supported")
        return cls(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"], meta["tokenizer.ggml.token_type"],
                   meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id"))

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
        """ids -> text, control tokens left out; a byte sequence cut inside a character decodes as U+FFFD."""
        spelled = "".join(self.tokens[i] for i in ids if i not in self.special)
        return bytes(self.unspell[c] for c in spelled).decode("utf-8", errors="replace")


def render_chat(template, messages, add_generation_prompt=True):
    """A Jinja chat template (GGUF tokenizer.chat_template, HF's tokenizer_config.json) rendered as transformers'
    apply_chat_template does: jinja2's immutable sandbox with trim_blocks and lstrip_blocks. jinja2 comes with
    torch (its dependency), so it is imported here and not listed in requirements.txt."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt)


# ---- vicuna_v1 / plain templates (docs/method.md#llm-and-lora) ----

def tokenize_image(text, tokenizer, bos=True, prefix=True):
    """LLaVA's tokenizer_image_token: each chunk around `<image>` tokenised on its own, joined by -200."""
    chunks = text.split("<image>")
    ids = tokenizer.encode(chunks[0], bos=bos, prefix=prefix)
    for chunk in chunks[1:]:
        ids += [IMAGE_TOKEN_INDEX] + tokenizer.encode(chunk, bos=False)
    return ids


def image_first(text):
    """`<image>` moved to the front of a turn, once: "<image>\n" + the rest stripped (LLaVA's preprocess_multimodal)."""
    return "<image>\n" + text.replace("<image>", "").strip()


def turn_texts(conversations, image=None):
    """LLaVA conversation [{"from": "human"|"gpt", "value"}] -> its turn texts, human first: a leading assistant
    turn dropped, roles checked to alternate (ValueError), `<image>` moved to the front of its turn
    (preprocess_multimodal). image=True (a sample with one image): one `<image>`, at the front of the first turn,
    prepended if missing and dropped from the others; image=False: every `<image>` dropped (the text alone)."""
    turns = list(conversations)
    if turns and turns[0].get("from") == "gpt":  # LLaVA drops a leading assistant turn
        turns = turns[1:]
    texts = []
    for i, t in enumerate(turns):
        if t.get("from") != ("human", "gpt")[i % 2]:
            raise ValueError(f"conversation roles must alternate human, gpt; turn {i} is {t.get('from')!r}")
        text = t["value"]
        if image and i == 0 or image is None and i % 2 == 0 and "<image>" in text:
            text = image_first(text)
        elif image is not None and "<image>" in text:
            text = text.replace("<image>", "").strip()
        texts.append(text)
    return texts


def vicuna_segments(texts):
    """Turn texts (human first) -> the vicuna_v1 pieces LLaVA tokenises one by one: "<system> USER: q1 ASSISTANT:",
    " a1", "USER: q2 ASSISTANT:", " a2", ... (each reply is followed by </s>)."""
    return [f"{SYSTEM_PROMPT} USER: {t} ASSISTANT:" if i == 0 else f"USER: {t} ASSISTANT:" if i % 2 == 0 else " " + t
            for i, t in enumerate(texts)]


def encode_conversation(conversations, tokenizer, template="vicuna_v1", image=None):
    """LLaVA conversation [{"from": "human"|"gpt", "value"}] -> (input_ids, labels); labels keep only the
    assistant replies and their </s> (vicuna_v1) or the caption + "\\n" (plain), IGNORE_INDEX elsewhere. image:
    where `<image>` goes (turn_texts)."""
    turns = turn_texts(conversations, image)
    if template == "plain":  # stage 1: <image> + caption + "\n", BOS and image masked, no EOS
        if len(turns) < 2:
            raise ValueError("plain template needs a human turn and a caption")
        head = tokenize_image("<image>" if "<image>" in turns[0] else "", tokenizer)
        body = tokenizer.encode(turns[1] + "\n", bos=False)
        return head + body, [IGNORE_INDEX] * len(head) + body
    if template != "vicuna_v1":
        raise ValueError(f"unknown template {template!r}; choose vicuna_v1 or plain")
    ids, labels = [], []
    for i, text in enumerate(vicuna_segments(turns)):
        if i % 2 == 0:  # BOS and dummy prefix on the first; the others follow a </s>: neither
            seg = tokenize_image(text, tokenizer, bos=i == 0, prefix=i == 0)
            ids, labels = ids + seg, labels + [IGNORE_INDEX] * len(seg)
        else:  # " " + reply + "</s>": the space merges into the first reply token
            seg = tokenizer.encode(text, bos=False, prefix=False) + [tokenizer.eos_id]
            ids, labels = ids + seg, labels + seg
    return ids, labels


# LLaVA-1.5's multiple-choice endings (its MMBench / ScienceQA evaluation); the text one asks for the option itself,
# which likelihood ranking scores (HiResLLaVA.option_logprobs)
LETTER_PROMPT = "Answer with the option's letter from the given choices directly."
TEXT_PROMPT = "Answer with the option's text from the given choices directly."


def multiple_choice(question, options, letters=True):
    """LLaVA's multiple-choice user text: the question, the options one per line ("A. ...", "B. ...", or bare with
    letters=False, for likelihood ranking), then the instruction to answer with the letter (or the text)."""
    if not letters:
        return question + "".join(f"\n{o}" for o in options) + "\n" + TEXT_PROMPT
    return question + "".join(f"\n{chr(65 + i)}. {o}" for i, o in enumerate(options)) + "\n" + LETTER_PROMPT


def encode_prompt(question, tokenizer):
    """vicuna_v1 inference prompt "<system> USER: <question> ASSISTANT:" (no trailing space) -> ids."""
    return tokenize_image(vicuna_segments([question])[0], tokenizer)
