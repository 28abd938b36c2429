"""results/ablation.py: the smoke study end to end (records, reproducible commands, report files) and the paired
bootstrap against worked examples."""
import importlib.util
import json
import os
import shlex
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import entitygrid  # noqa: E402

spec = importlib.util.spec_from_file_location("ablation", os.path.join(ROOT, "results", "ablation.py"))
ablation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablation)


def test_smoke_study_writes_records_that_reproduce(tmp_path):
    out, res = tmp_path / "runs", tmp_path / "results"
    records, rows, claims = ablation.main(["--smoke", "--configs", "full,no-sra", "--seeds", "0", "--jobs", "2",
                                           "--out", str(out), "--results", str(res), "--reps", "50"])
    saved = json.loads((res / "ablation.json").read_text())
    assert [(r["config"], r["seed"]) for r in saved] == [("full", 0), ("no-sra", 0)]
    for r in saved:
        assert r["command"].startswith("python train.py --seed 0 --threads 1 ") and r["wall_s"] > 0
        assert len(r["git_commit"].removesuffix("-dirty")) == 40 and r["metrics"]["num"] == 27
        assert set(r["metrics"]["per_task_position"]) == set(entitygrid.TASKS)  # the full scorer output
        assert len(r["questions"]["correct"]) == 27
        assert abs(r["metrics"]["accuracy"] - r["questions"]["correct"].count("1") / 27) < 1e-9
    assert "--no-sra" in saved[1]["command"] and rows["full"]["accuracy"][0] == saved[0]["metrics"]["accuracy"]
    assert any(c[0] == "SRA helps overall" for c in claims)
    md = (res / "ablation.md").read_text()
    assert "| full: overview + slices + SRA + SMS (the model) |" in md and "SRA narrows the gap" in md
    assert Image.open(res / "ablation.png").size[0] > 0
    # the record's command, run again as a user would, gives the same accuracy (within 0.02: one thread, seeded)
    r = saved[0]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable] + shlex.split(r["command"])[1:], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    again = json.loads((out / "full-seed0" / "metrics.json").read_text())
    assert abs(again["accuracy"] - r["metrics"]["accuracy"]) <= 0.02
    # a finished run is not run again: same command, record on disk
    first = (out / "full-seed0" / "record.json").stat().st_mtime
    ablation.main(["--smoke", "--configs", "full", "--seeds", "0", "--out", str(out), "--results", str(res),
                   "--reps", "10"])
    assert (out / "full-seed0" / "record.json").stat().st_mtime == first


def compact(correct, task="r", cell="2"):
    return dict(task=task * len(correct), cell=cell * len(correct), correct=correct)


def test_bootstrap_worked_examples():
    # cells 2 (edge) and 1 (other), recognition only: all right in a; in b edge all right, other all wrong
    n = 20
    both = lambda a, b: dict(task="r" * 2 * n, cell="2" * n + "1" * n, correct=a * n + b * n)
    records = [dict(config="full", seed=s, questions=both("1", "1")) for s in (0, 1)] + \
              [dict(config="no-sra", seed=s, questions=both("1", "0")) for s in (0, 1)]
    rows, claims = ablation.summarise(records, reps=200)
    assert rows["full"]["accuracy"] == (1.0, 1.0, 1.0) and rows["full"]["discrepancy"] == (0.0, 0.0, 0.0)
    assert rows["no-sra"]["accuracy"][0] == 0.5 and rows["no-sra"]["discrepancy"] == (1.0, 1.0, 1.0)
    lo, hi = rows["no-sra"]["accuracy"][1:]
    assert 0.3 < lo < 0.5 < hi < 0.7  # question resampling moves the edge/other mix
    gap = {c[0]: c[4:] for c in claims}["SRA narrows the gap (with overview)"]
    assert gap == (-1.0, -1.0, -1.0)
    # the point estimates are entitygrid.score's
    qs, preds = ablation.expand(both("1", "0"))
    assert entitygrid.score(qs, preds)["discrepancy"] == 1.0


def test_bootstrap_pairs_question_draws():
    # two configurations with identical answers differ by exactly 0 in every replicate
    rng = np.random.default_rng(1)
    c = "".join(rng.choice(["0", "1"], 60))
    q = dict(task="rpc" * 20, cell="123456789" * 6 + "123456", correct=c)
    boot = ablation.bootstrap({"full": {0: ablation.expand(q)}, "qformer": {0: ablation.expand(q)}}, reps=50)
    assert all(np.array_equal(boot["full"][m], boot["qformer"][m]) for m in ablation.METRICS)
