"""bench.py gpu at a small scale on CPU: the GPU smoke run's code path (stage-2 steps, figures, generation)."""
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bench  # noqa: E402


def test_gpu_smoke_run_small_on_cpu(capsys):
    r = bench.main(["gpu", "--size", "small", "--device", "cpu", "--steps", "2", "--micro-batch", "2",
                    "--new-tokens", "4", "--threads", "2"])
    assert r["grid"] == (4, 4) and len(r["losses"]) == 2 and all(math.isfinite(x) for x in r["losses"])
    assert r["losses"][1] < r["losses"][0]  # the steps train (same batch each step)
    assert r["llm_tokens"] > 16 * 16 and r["step_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_gib"] > 0
    assert [len(ids) for ids in r["generated"]] == [4, 4]
    out = capsys.readouterr().out
    assert "micro-batch 2 x" in out and "LLM tokens/s" in out and "MFU" in out and "peak memory" in out
    assert "greedy batch of 2" in out
