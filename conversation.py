"""LLaVA's conversations as token ids: the SentencePiece tokenizer (as HF's slow LlamaTokenizer with legacy=False),
the vicuna_v1 and plain templates and their label masking, following LLaVA's `conversation.py` / `preprocess_v1` /
`tokenizer_image_token` (docs/method.md#llm-and-lora). The byte-level BPE tokenizer and chat template of a GGUF
file (SmolLM2) are in llamacpp.py.
"""
import io
import os
import pathlib

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
