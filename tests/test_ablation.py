"""results/ablation.py: the smoke study end to end (records, reproducible commands, stage-1 reuse, resume, parts,
code checks, report files), and the statistics (t distribution, paired t, Holm, nested bootstrap) on worked
examples computed by hand."""
import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import entitygrid  # noqa: E402

spec = importlib.util.spec_from_file_location("ablation", os.path.join(ROOT, "results", "ablation.py"))
ablation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablation)


def test_smoke_study_reuses_stage1_resumes_and_reproduces(tmp_path):
    out, res = tmp_path / "runs", tmp_path / "results"
    base = ["--smoke", "--configs", "full,no-sra", "--out", str(out), "--results", str(res), "--reps", "50"]
    records, rows, claims = ablation.main(base + ["--seeds", "0"])
    saved = json.loads((res / "ablation.json").read_text())
    assert [(r["config"], r["seed"]) for r in saved] == [("full", 0), ("no-sra", 0)]
    full, nosra = saved
    for r in saved:
        assert r["command"].startswith("python train.py --seed 0 --threads 1 ") and r["wall_s"] > 0
        assert len(r["git_commit"].removesuffix("-dirty")) == 40 and r["code"] == ablation.code_hash()
        assert r["metrics"]["num"] == 27 and set(r["metrics"]["per_task_layout"]) == set(entitygrid.TASKS)
        assert len(r["questions"]["correct"]) == len(r["questions"]["layout"]) == 27
        assert abs(r["metrics"]["accuracy"] - r["questions"]["correct"].count("1") / 27) < 1e-9
    # one stage 0 per seed, used by both; no-sra starts stage 2 from full's stage-1 checkpoint, training no stage 1
    stage0 = json.loads((out / "stage0-seed0" / "record.json").read_text())
    assert stage0["command"].endswith("--stage 0 " + " ".join(ablation.SMOKE)) and stage0["wall_s"] > 0
    assert f"--stage0 {out}/stage0-seed0/stage0" in full["command"] and "--stage 2" not in full["command"]
    assert f"--stage 2 --init {out}/full-seed0/stage1 --no-sra" in nosra["command"]
    assert full["after"] == [stage0["command"]] and nosra["after"] == [stage0["command"], full["command"]]
    assert (out / "full-seed0" / "stage1").is_dir() and not (out / "no-sra-seed0" / "stage1").exists()
    assert not any((out / f"{c}-seed0" / "stage0").exists() for c in ("full", "no-sra"))
    assert rows["full"]["accuracy"][0] == full["metrics"]["accuracy"]
    assert any(c["text"] == "SRA does not lower accuracy" for c in claims)
    md = (res / "ablation.md").read_text()
    assert "| full: overview + slices + SRA + SMS (the model) |" in md and "Holm" in md and "gap (other - edge)" in md
    rec = full["metrics"]["per_task_position"]["recognition"]  # the per-task table: edge cells, then the others
    edge, other = (entitygrid.mean(rec[str(i)] for i in cells)
                   for cells in (entitygrid.EDGE_CELLS, entitygrid.OTHER_CELLS))
    assert f"| full | {edge:.3f} / {other:.3f} |" in md, md
    assert Image.open(res / "ablation.png").size[0] > 720  # bars plus the per-cell maps
    # the record's command, run again as a user would, gives the same accuracy (within 0.02: one thread, seeded)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable] + shlex.split(full["command"])[1:] + ["--out", str(tmp_path / "again")],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert abs(again["accuracy"] - full["metrics"]["accuracy"]) <= 0.02
    # resume: finished runs are not run again; a part without every run of --seeds writes no report
    stamp = lambda: [(out / f"{c}-seed0" / "record.json").stat().st_mtime for c in ("stage0", "full", "no-sra")]
    first = stamp()
    assert ablation.main(base + ["--seeds", "0"])[1] is not None and stamp() == first
    assert ablation.main(base + ["--seeds", "0,1", "--part", "1/2"])[1] is None and stamp() == first
    # a record made by other code is refused, or kept on request
    path = out / "no-sra-seed0" / "record.json"
    path.write_text(json.dumps(dict(nosra, code="0123456789ab")))
    with pytest.raises(SystemExit, match="recorded with code 0123456789ab"):
        ablation.main(base + ["--seeds", "0"])
    ablation.main(base + ["--seeds", "0", "--mix-code"])
    assert stamp()[2] == path.stat().st_mtime  # kept, not rerun, and reported beside the other code
    assert f"code 0123456789ab, {full['code']}" in (res / "ablation.md").read_text() or \
        f"code {full['code']}, 0123456789ab" in (res / "ablation.md").read_text()


def test_plan_orders_stage0_sources_dependents_and_splits_by_seed():
    configs, seeds = list(ablation.CONFIGS), [0, 1, 2]
    assert ablation.source("no-sra") == "full" and ablation.source("slices") == "slices+sra"
    assert all(ablation.source(c) == c for c in ("full", "slices+sra", "overview", "qformer", "avgpool"))
    assert ablation.depends("full") == "stage0" and ablation.depends("no-sra") == "full"
    parts = [ablation.plan(configs, seeds, (i, 2)) for i in (1, 2)]
    assert {s for _, s in parts[0]} == {0, 2} and {s for _, s in parts[1]} == {1}  # a seed stays in one part
    every = sorted(r for p in parts for r in p)
    assert every == sorted([(c, s) for c in configs for s in seeds] + [("stage0", s) for s in seeds])
    for p in parts:
        for k, (c, s) in enumerate(p):
            if ablation.depends(c):  # what it starts from comes earlier in the same part
                assert (ablation.depends(c), s) in p[:k]
    whole = ablation.plan(configs, seeds, (1, 1))
    assert [c for c, _ in whole[:9]] == ["stage0"] * 3 + ["full"] * 3 + ["slices+sra"] * 3  # waited-for first
    assert ablation.plan(["no-sra"], [0], (1, 1)) == [("stage0", 0), ("full", 0), ("no-sra", 0)]


def test_t_distribution_against_tables_and_closed_forms():
    assert ablation.t_sf2(1.0, 1) == pytest.approx(0.5, abs=1e-12)  # Cauchy: P(|T| >= 1) = 1/2
    for t in (0.3, 1.0, 2.5, 7.0):  # df 2: P(|T| < t) = t / sqrt(2 + t^2)
        assert ablation.t_sf2(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-12)
    # df 3: P(|T| < t) = 2/pi (atan(t/sqrt3) + sqrt3 t / (3 + t^2))
    assert ablation.t_sf2(1.5, 3) == pytest.approx(1 - 2 / math.pi * (math.atan(1.5 / math.sqrt(3)) +
                                                                    math.sqrt(3) * 1.5 / 5.25), abs=1e-12)
    # 0.975 quantiles from printed t tables (6 significant digits)
    for df, q in ((1, 12.7062), (2, 4.30265), (3, 3.18245), (4, 2.77645), (5, 2.57058), (9, 2.26216)):
        assert ablation.t_quantile(0.975, df) == pytest.approx(q, abs=1e-4)


def test_paired_t_and_holm_worked_examples():
    # d = 1, 2, 3: mean 2, sd 1, se 1/sqrt3; t = 2 sqrt3 with 2 df; p = 1 - 2sqrt3/sqrt14 = 0.074180
    mean, lo, hi, t, p = ablation.paired_t([1.0, 2.0, 3.0])
    half = 4.302653 / math.sqrt(3)
    assert (mean, lo, hi) == pytest.approx((2.0, 2 - half, 2 + half), abs=1e-5)
    assert t == pytest.approx(2 * math.sqrt(3)) and p == pytest.approx(0.074180, abs=1e-6)
    assert ablation.paired_t([1.0, 2.0, 3.0], bound=2.0)[4] == pytest.approx(1.0)  # t = 0
    # Holm: p sorted 0.005, 0.01, 0.03, 0.04 -> 4x, 3x, 2x, 1x = 0.02, 0.03, 0.06, 0.04 -> running max 0.06
    assert ablation.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert ablation.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    got = ablation.holm([0.01, float("nan"), 0.02])
    assert np.isnan(got[1]) and got[[0, 2]] == pytest.approx([0.02, 0.02])


def compact_of(questions, right):
    return ablation.compact(questions, {q["id"]: ("A" if r else "B") for q, r in zip(questions, right)})


def test_cell_metrics_are_entitygrid_score():
    rng = np.random.default_rng(3)
    qs = [dict(id=str(i), task=entitygrid.TASKS[i % 3], cell=int(c), answer="A", positions=[int(c)])
          for i, c in enumerate(rng.choice([1, 2, 3, 5, 6, 9], 90))]  # cells 4, 7, 8 never asked
    right = rng.random(90) < 0.6
    score = entitygrid.score(qs, {q["id"]: ("A" if r else "B") for q, r in zip(qs, right)})
    got = ablation.cell_metrics(*ablation.tally(*ablation.counts(compact_of(qs, right))))
    assert got["accuracy"] == pytest.approx(score["accuracy"])
    assert got["edge_accuracy"] == pytest.approx(score["edge_accuracy"])
    assert got["other_accuracy"] == pytest.approx(score["other_accuracy"])
    assert got["discrepancy"] == pytest.approx(score["discrepancy"])
    assert got["gap"] == pytest.approx(score["other_accuracy"] - score["edge_accuracy"])
    assert got["position"] == pytest.approx(score["per_task"]["position"])
    assert got["counting_edge"] == pytest.approx(entitygrid.discrepancy(score["per_task_position"]["counting"])[0])


def test_summarise_worked_example():
    # recognition at cell 2 (edge) and 1 (other), 20 each; no-sra: edge right, other wrong (gap -1) in both seeds;
    # full: all right (gap 0); overview: seed 0 all right, seed 1 edge wrong, other right (gap +1)
    n = 20
    both = lambda a, b: dict(task="r" * 2 * n, cell="2" * n + "1" * n, correct=a * n + b * n)
    answers = {"full": ("1", "1", "1", "1"), "no-sra": ("1", "0", "1", "0"), "overview": ("1", "1", "0", "1")}
    records = [dict(config=c, seed=s, questions=both(*a[2 * s:2 * s + 2])) for c, a in answers.items() for s in (0, 1)]
    rows, claims = ablation.summarise(records, reps=200)
    assert rows["full"]["accuracy"] == (1.0, 1.0, 1.0) and rows["full"]["gap"] == (0.0, 0.0, 0.0)
    assert rows["no-sra"]["gap"] == (-1.0, -1.0, -1.0) and rows["no-sra"]["discrepancy"] == (1.0, 1.0, 1.0)
    lo, hi = rows["overview"]["accuracy"][1:]
    assert 0.3 < lo < 0.75 < hi <= 1.0  # seeds and questions resampled
    c = {c["text"]: c for c in claims}
    opens = c["slicing opens an edge gap"]  # no-sra - overview per seed: -1 - 0, -1 - 1
    assert opens["per_seed"] == [-1.0, -2.0] and opens["mean"] == -1.5
    half = 12.7062 * 0.5  # sd of (-1, -2) is 1/sqrt2, se = sd / sqrt2 = 0.5
    assert (opens["t_lo"], opens["t_hi"]) == pytest.approx((-1.5 - half, -1.5 + half), abs=1e-3)
    closes = c["SRA closes at least half of that gap"]  # 0.5 no-sra + 0.5 overview - full: -0.5, 0
    assert closes["per_seed"] == [-0.5, 0.0]
    # beside it, the same contrast on |gap|: 1 - 0, 1 - 1 -> mean 0.5, se 0.5
    assert opens["discrepancy"] == pytest.approx((0.5, 0.5 - 12.7062 * 0.5, 0.5 + 12.7062 * 0.5), abs=1e-3)
    ps = [x["p"] for x in claims]
    assert [x["p_holm"] for x in claims] == pytest.approx(list(ablation.holm(ps)), nan_ok=True)


def test_bootstrap_pairs_question_draws():
    # two configurations with identical answers differ by exactly 0 in every replicate
    rng = np.random.default_rng(1)
    c = "".join(rng.choice(["0", "1"], 60))
    q = dict(task="rpc" * 20, cell="123456789" * 6 + "123456", correct=c)
    boot = ablation.bootstrap({"full": {0: ablation.counts(q)}, "qformer": {0: ablation.counts(q)}}, reps=50)
    assert all(np.array_equal(boot["full"][m], boot["qformer"][m], equal_nan=True) for m in ablation.METRICS)
    assert boot["full"]["accuracy"].std() > 0  # the questions are resampled


@pytest.mark.parametrize("argv,message", [
    (["--part", "0/2"], "a part is i/k with 1 <= i <= k"), (["--seeds", "a"], "seeds are integers"),
    (["--configs", "bogus"], "--configs: unknown ['bogus']"), (["--jobs", "0"], "--jobs 0: at least 1"),
    (["--seeds", "0", "--part", "2/2"], "--part 2/2: no seed of --seeds 0 falls in it")])
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        ablation.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
