"""The paper's ablations at toy scale (Tables 2 and 3 of arXiv 2407.08706) on EntityGrid-QA, one command:

    python results/ablation.py            # 7 configurations x seeds 0,1,2 of the tiny preset, 2 runs at a time

Each run is one `python train.py ...` command (the tiny preset plus the configuration's flags, one CPU thread, its
own seed for data, backbones, init and order), started as a subprocess and logged under --out. Its record in
results/ablation.json holds that command, the configuration, seed, wall seconds, git commit, the full
`entitygrid.score` output and, per test question, its task, cell and whether it was answered right. From those,
results/ablation.md and results/ablation.png give per configuration the mean over seeds and a 95% bootstrap
interval over seeds and questions, plus paired differences for the paper's claims. A finished run (same command,
record on disk) is not run again, so an interrupted study continues where it stopped.

`--smoke` runs the same pipeline on a few samples and steps (the test suite runs it); its numbers mean nothing.
"""
import argparse
import datetime
import json
import os
import queue
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import entitygrid  # noqa: E402

# name -> (train.py flags, what it is); all on the tiny preset (train.PRESETS["tiny"])
CONFIGS = {
    "full": ([], "overview + slices + SRA + SMS (the model)"),
    "no-sra": (["--no-sra"], "SRA off"),
    "slices+sra": (["--no-overview"], "slices only, with SRA"),
    "slices": (["--no-overview", "--no-sra"], "slices only, no SRA"),
    "overview": (["--no-slices"], "overview only (no slicing, so no SRA)"),
    "qformer": (["--sampler", "qformer"], "SMS replaced by the Q-Former sampler"),
    "avgpool": (["--sampler", "avgpool"], "SMS replaced by average pooling"),
}
# the paper's claims as paired differences (a - b) of one metric, seeds paired (same data and backbones)
CLAIMS = [
    ("slicing puts an accuracy gap between edge and other cells", "discrepancy", "no-sra", "overview"),
    ("slices help overall", "accuracy", "no-sra", "overview"),
    ("SRA narrows the gap (with overview)", "discrepancy", "full", "no-sra"),
    ("SRA narrows the gap (slices only)", "discrepancy", "slices+sra", "slices"),
    ("SRA helps edge counting", "counting_edge", "full", "no-sra"),
    ("SRA helps overall", "accuracy", "full", "no-sra"),
    ("SMS beats the Q-Former sampler", "accuracy", "full", "qformer"),
    ("SMS beats average pooling", "accuracy", "full", "avgpool"),
    ("SMS keeps position better than the Q-Former", "position", "full", "qformer"),
    ("SMS keeps position better than average pooling", "position", "full", "avgpool"),
]
METRICS = ("accuracy", "edge_accuracy", "other_accuracy", "discrepancy", "counting_edge", "position")
SMOKE = ["--train-size", "64", "--test-size", "27", "--vocab-size", "400", "--steps1", "2", "--steps2", "2", "--batch1", "8",
         "--batch2", "8", "--eval-batch", "27"]


def command(name, seed, out, smoke):
    """The train.py command of one run, as a list; relative to the repository root."""
    flags = CONFIGS[name][0] + (SMOKE if smoke else [])
    return ["python", "train.py", "--seed", str(seed), "--threads", "1", "--data-dir", f"{out}/data-seed{seed}",
            "--out", f"{out}/{name}-seed{seed}"] + flags


def run_one(name, seed, out, smoke, core):
    """Run (or reuse) one configuration and seed -> its record."""
    cmd = command(name, seed, out, smoke)
    run_dir = os.path.join(ROOT, out, f"{name}-seed{seed}")
    record_path = os.path.join(run_dir, "record.json")
    if os.path.isfile(record_path):
        with open(record_path) as f:
            record = json.load(f)
        if record["command"] == shlex.join(cmd):
            return record
    os.makedirs(run_dir, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # one thread, one core: no oversubscription
    pin = (lambda: os.sched_setaffinity(0, {core})) if hasattr(os, "sched_setaffinity") else None
    t0 = time.time()
    with open(os.path.join(run_dir, "train.log"), "w") as log:
        proc = subprocess.run([sys.executable] + cmd[1:], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                              preexec_fn=pin)
    wall = time.time() - t0
    if proc.returncode:
        raise SystemExit(f"ablation: {shlex.join(cmd)} failed (exit {proc.returncode}); see {run_dir}/train.log")
    questions = entitygrid.load_questions(os.path.join(ROOT, out, f"data-seed{seed}", "test"))
    with open(os.path.join(run_dir, "predictions.json")) as f:
        preds = json.load(f)
    metrics = entitygrid.score(questions, preds)
    import hires  # here, not at the top: torch and open_clip take seconds to import, and --help needs neither
    record = dict(config=name, flags=CONFIGS[name][0], seed=seed, command=shlex.join(cmd), wall_s=round(wall, 1),
                  git_commit=hires.git_commit() or "unknown", date=datetime.datetime.now().isoformat(timespec="seconds"),
                  metrics=metrics, questions=compact(questions, preds))
    hires.atomic_write(record_path, json.dumps(record))  # a killed study leaves no half record
    return record


def compact(questions, preds):
    """Per test question (file order): task initial, cell digit and 1/0 for right/wrong, as three strings."""
    right = [entitygrid.parse_letter(preds.get(q["id"], "")) == q["answer"] for q in questions]
    return dict(task="".join(q["task"][0] for q in questions), cell="".join(str(q["cell"]) for q in questions),
                correct="".join("1" if r else "0" for r in right))


# ----------------------------------------------------------------------------------------------------------------
# statistics: the official scorer on bootstrap resamples

def expand(c):
    """A record's compact questions -> (questions, predictions) that entitygrid.score accepts (the letter A stands
    for right, B for wrong)."""
    task = {t[0]: t for t in entitygrid.TASKS}
    qs = [dict(id=i, task=task[t], cell=int(cell), answer="A") for i, (t, cell) in enumerate(zip(c["task"], c["cell"]))]
    return qs, {i: "A" if r == "1" else "B" for i, r in enumerate(c["correct"])}


def metrics_of(questions, preds):
    """The METRICS of one run on a set of questions (counting_edge: counting accuracy over the edge cells)."""
    s = entitygrid.score(questions, preds)
    return dict(accuracy=s["accuracy"], edge_accuracy=s["edge_accuracy"], other_accuracy=s["other_accuracy"],
                discrepancy=s["discrepancy"], position=s["per_task"]["position"],
                counting_edge=entitygrid.discrepancy(s["per_task_position"]["counting"])[0])


def nanmean(values):
    """Mean of the values that exist (a metric is None where a run has no such questions); nan if none does."""
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else float("nan")


def interval(x):
    """The central 95% of the bootstrap replicates (nan where the metric never exists)."""
    return [float("nan")] * 2 if np.isnan(x).all() else np.nanpercentile(x, [2.5, 97.5]).tolist()


def bootstrap(runs_by_config, reps, seed=0):
    """runs_by_config: config -> {seed: (questions, preds)}, the same seeds for every config. Each replicate draws
    the seeds with replacement and, per drawn seed, the test questions with replacement; the same draw serves every
    configuration, so differences are paired. -> config -> metric -> array (reps,) of the mean over drawn seeds."""
    rng = np.random.default_rng(seed)
    seeds = sorted(next(iter(runs_by_config.values())))
    out = {c: {m: np.empty(reps) for m in METRICS} for c in runs_by_config}
    first = next(iter(runs_by_config.values()))
    for r in range(reps):
        drawn = []
        for s in rng.choice(seeds, len(seeds)):
            n = len(first[s][0])  # every configuration of a seed answers the same test questions
            drawn.append((s, rng.integers(0, n, n)))
        for c, runs in runs_by_config.items():
            vals = [metrics_of([runs[s][0][i] for i in idx], runs[s][1]) for s, idx in drawn]
            for m in METRICS:
                out[c][m][r] = nanmean([v[m] for v in vals])
    return out


def summarise(records, reps):
    """-> (rows: config -> metric -> (mean over seeds, lo, hi), claims: [(text, metric, a, b, diff, lo, hi)])."""
    configs = [c for c in CONFIGS if any(r["config"] == c for r in records)]
    runs = {c: {r["seed"]: expand(r["questions"]) for r in records if r["config"] == c} for c in configs}
    if len({tuple(sorted(v)) for v in runs.values()}) != 1:
        raise SystemExit("ablation: every configuration needs the same seeds for the paired bootstrap")
    boot = bootstrap(runs, reps)
    rows = {}
    for c in configs:
        point = [metrics_of(*runs[c][s]) for s in sorted(runs[c])]
        rows[c] = {m: (nanmean([p[m] for p in point]), *interval(boot[c][m]))
                   for m in METRICS}
    claims = []
    for text, m, a, b in CLAIMS:
        if a in rows and b in rows:
            d = boot[a][m] - boot[b][m]
            claims.append((text, m, a, b, rows[a][m][0] - rows[b][m][0], *interval(d)))
    return rows, claims


# ----------------------------------------------------------------------------------------------------------------
# reports

def write_markdown(path, records, rows, claims, reps, argv):
    seeds = sorted({r["seed"] for r in records})
    commits = sorted({r["git_commit"] for r in records})
    fmt = lambda v: f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"
    lines = [f"# EntityGrid-QA ablations, tiny preset ({len(records)} runs: {len(rows)} configurations x seeds "
             f"{', '.join(map(str, seeds))})", "",
             f"Written by `{shlex.join(['python', 'results/ablation.py'] + argv)}`; code {', '.join(commits)}; "
             f"{sum(r['wall_s'] for r in records) / 60:.0f} run-minutes on 1 CPU thread each. Per configuration: "
             f"the mean over seeds and [95% interval] from {reps} bootstrap replicates over seeds and test questions "
             f"({records[0]['metrics']['num']} per seed). Discrepancy = |edge - other| (docs/method.md#entitygrid-qa);"
             " counting edge = counting accuracy on edge cells. Each run's command is in results/ablation.json.", "",
             "| configuration | flags | accuracy | edge | other | Discrepancy | counting edge | position |",
             "|---|---|---|---|---|---|---|---|"]
    for c, v in rows.items():
        flags = " ".join(CONFIGS[c][0]) or "(none)"
        lines.append(f"| {c}: {CONFIGS[c][1]} | `{flags}` | " + " | ".join(fmt(v[m]) for m in METRICS) + " |")
    lines += ["", "Paired differences (a - b, same seeds and question draws); an interval that excludes 0 supports "
              "the claim's sign:", "", "| claim | metric | a - b | difference [95% interval] |", "|---|---|---|---|"]
    for text, m, a, b, d, lo, hi in claims:
        lines.append(f"| {text} | {m} | {a} - {b} | {d:+.3f} [{lo:+.3f}, {hi:+.3f}] |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def draw(path, rows):
    """Per configuration: accuracy, edge, other and Discrepancy as bars with their 95% intervals (Pillow only)."""
    from PIL import Image, ImageDraw
    metrics = [("accuracy", (60, 60, 60)), ("edge_accuracy", (220, 80, 60)), ("other_accuracy", (60, 120, 220)),
               ("discrepancy", (240, 170, 30))]
    bar, gap, left, top, W = 12, 14, 170, 40, 720
    H = top + len(rows) * (len(metrics) * bar + gap) + 40
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    x = lambda v: left + (W - left - 20) * v
    d.text((10, 10), "EntityGrid-QA ablations (tiny preset): mean over seeds, 95% bootstrap interval", fill="black")
    for k, (m, col) in enumerate(metrics):
        d.rectangle((left + 120 * k, 24, left + 120 * k + 10, 32), fill=col)
        d.text((left + 120 * k + 14, 22), m.replace("_accuracy", ""), fill="black")
    y = top
    for c, v in rows.items():
        d.text((10, y + 2), c, fill="black")
        for m, col in metrics:
            mean, lo, hi = v[m]
            d.rectangle((x(0), y + 1, x(mean), y + bar - 2), fill=col)
            d.line((x(lo), y + bar // 2, x(hi), y + bar // 2), fill="black", width=1)
            d.line((x(lo), y + 2, x(lo), y + bar - 3), fill="black"), d.line((x(hi), y + 2, x(hi), y + bar - 3),
                                                                             fill="black")
            y += bar
        y += gap
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        d.line((x(t), top - 4, x(t), H - 34), fill=(200, 200, 200))
        d.text((x(t) - 10, H - 30), f"{t:.2f}", fill="black")
    img.save(path)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {','.join(CONFIGS)}")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; each has its own data and backbones")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, each on one core with one thread")
    p.add_argument("--out", default="runs/ablation", help="run directories (relative to the repository root)")
    p.add_argument("--results", default="results", help="where ablation.json, .md and .png go")
    p.add_argument("--reps", type=int, default=1000, help="bootstrap replicates")
    p.add_argument("--smoke", action="store_true", help="a few samples and steps: checks the pipeline, not the model")
    args = p.parse_args(argv)
    configs, seeds = args.configs.split(","), [int(s) for s in args.seeds.split(",")]
    if set(configs) - set(CONFIGS):
        p.error(f"--configs: unknown {sorted(set(configs) - set(CONFIGS))}; choose from {','.join(CONFIGS)}")
    import train
    for seed in seeds:  # each seed's data first, in this process, so that parallel runs never race to write it
        train.prepare_tiny(train.parse_args(command(configs[0], seed, args.out, args.smoke)[2:]))
    jobs = [(c, s) for s in seeds for c in configs]
    cores = queue.Queue()  # a run takes a free core and gives it back
    for core in (sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0])[:args.jobs]:
        cores.put(core)

    def job(c, s):
        core = cores.get()
        try:
            return run_one(c, s, args.out, args.smoke, core)
        finally:
            cores.put(core)
    t0 = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(job, c, s) for c, s in jobs]
        records = []
        for f, (c, s) in zip(futures, jobs):
            records.append(f.result())
            print(f"{c} seed {s}: accuracy {records[-1]['metrics']['accuracy']:.3f}, Discrepancy "
                  f"{records[-1]['metrics']['discrepancy']:.3f} ({records[-1]['wall_s']:.0f} s; "
                  f"{time.time() - t0:.0f} s so far)", flush=True)
    rows, claims = summarise(records, args.reps)
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "ablation.json"), "w") as f:
        json.dump(records, f, indent=1)
    write_markdown(os.path.join(args.results, "ablation.md"), records, rows, claims, args.reps, argv)
    draw(os.path.join(args.results, "ablation.png"), rows)
    print(f"ablation: {len(records)} runs in {time.time() - t0:.0f} s -> {args.results}/ablation.{{json,md,png}}")
    return records, rows, claims


if __name__ == "__main__":
    main()
