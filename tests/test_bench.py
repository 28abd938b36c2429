"""bench.py: ttft builds both contestants from the shared backbones, counts their image tokens as their models do
and produces a first token; tinystep, llama and gpu run at tiny sizes (the timings themselves are not tested)."""
import argparse
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench  # noqa: E402
from hires import token_count, token_layout  # noqa: E402
from conversation import encode_prompt  # noqa: E402

pytest.importorskip("transformers")


def test_ttft_models_token_counts_and_first_token(tmp_path):
    args = argparse.Namespace(image_size=336, patch_size=14, vit_width=64, vit_layers=3, vit_heads=2, llm_dim=64,
                              llm_layers=1)
    tok, llm, vit, hf_vit = bench.ttft_backbones(args, str(tmp_path))
    assert (hf_vit.hidden_size, hf_vit.num_hidden_layers, hf_vit.image_size, hf_vit.patch_size) == (64, 3, 336, 14)
    assert llm.vocab_size == tok.vocab_size + 1  # the extra row is LLaVA-NeXT's <image> token
    hires_fn, hires_tokens = bench.ttft_model(str(tmp_path), "HiRes-LLaVA", (llm, vit, hf_vit))
    next_fn, next_tokens = bench.ttft_model(str(tmp_path), "LLaVA-NeXT", (llm, vit, hf_vit))
    # HiRes-LLaVA: overview + 4x4 slices of 24x24 patches, SMS k=2 -> 144 each, plus separators
    assert hires_tokens == token_count(token_layout(4, 4), 144, 144) == 2465
    # LLaVA-NeXT: 576 overview tokens + the 96x96 grid of the 4x4 tiles with one newline per row
    assert next_tokens == 576 + 96 * (96 + 1)
    assert isinstance(hires_fn()[0], str)
    prompt = len(encode_prompt("<image>\n" + bench.QUESTION, tok)) - 1 + next_tokens  # <image> -> its tokens
    assert next_fn().shape == (1, prompt + 1)  # the prompt and one new token


def test_tinystep_speedups_keep_the_loss():
    """bench.py tinystep: the step from the ViT-prefix cache gives the loss of the step from pixels."""
    out = bench.main(["tinystep", "--repeats", "1", "--threads", "1"])
    assert out["losses"]["cache"] == pytest.approx(out["losses"]["pixels"], rel=1e-5)  # fp32, other op order
    assert set(out["times"]) == {"pixels", "cache", "micro8"} and all(t > 0 for t in out["times"].values())


def test_llama_bench_same_tokens_and_ratios():
    """bench.py llama at a tiny size: llama.py and transformers generate the same greedy tokens, and the decode
    ratio is reported per prompt length with its range over rounds."""
    out = bench.main(["llama", "--dim", "64", "--layers", "2", "--prompt-len", "5", "17", "--new-tokens", "6",
                      "--repeats", "2", "--threads", "1"])
    assert set(out) == {5, 17}
    for r in out.values():
        assert r["same"] and r["decode_range"][0] <= r["decode"] <= r["decode_range"][1]


def test_gpu_smoke_run_small_on_cpu(capsys):
    """bench.py gpu at the tiny presets' shapes on CPU: the GPU smoke run's code path (stage-2 steps, figures,
    generation)."""
    r = bench.main(["gpu", "--size", "small", "--device", "cpu", "--steps", "2", "--micro-batch", "2",
                    "--new-tokens", "4", "--threads", "2"])
    assert r["grid"] == (4, 4) and len(r["losses"]) == 2 and all(math.isfinite(x) for x in r["losses"])
    assert r["losses"][1] < r["losses"][0]  # the steps train (same batch each step)
    assert r["llm_tokens"] > 16 * 16 and r["step_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_gib"] > 0
    assert [len(ids) for ids in r["generated"]] == [4, 4]
    out = capsys.readouterr().out
    assert "micro-batch 2 x" in out and "LLM tokens/s" in out and "MFU" in out and "peak memory" in out
    assert "greedy batch of 2" in out
