"""The paper's ablations at toy scale (Tables 2 and 3 of arXiv 2407.08706) on EntityGrid-QA, one command:

    python results/ablation.py            # 7 configurations x seeds 0-4 of the tiny preset, 2 runs at a time

Each run is one `python train.py ...` command (the tiny preset plus the configuration's flags, one CPU thread, its
own seed for data, backbones, init and order), started as a subprocess and logged under --out. Each seed's stage 0
(the pretrained tiny backbones) runs once and serves every configuration of the seed (`--stage0 DIR`). A
configuration whose stage 1 is another's (they differ only in flags that act in stage 2, STAGE2_FLAGS) starts stage
2 from that one's stage-1 checkpoint (`--stage 2 --init`), so such a pair differs only where its flags do. Its record
in results/ablation.json holds that command (and those it starts from), the configuration, seed, wall seconds, git
commit, a hash of the model, training and benchmark code, the full `entitygrid.score` output and, per test
question, its task, cell, layout and whether it was answered right.

The statistics (results/ablation.md, results/ablation.png): per configuration, the mean over seeds with a 95%
nested bootstrap interval (seeds drawn with replacement, then each drawn seed's test questions). Every claim is a
paired contrast of per-seed values (same seed = same data, backbones and test questions), reported with a t
interval over seeds (Student's t, n-1 degrees of freedom), the nested bootstrap interval, and the two-sided paired
t test of H0: contrast = bound, its p-value adjusted by Holm's method over all claims.

A finished run (same command, record on disk, same code) is not run again, so an interrupted study continues where
it stopped; --part i/k runs the runs of every k-th seed, so k sessions (or machines sharing --out) can split it.
`--smoke` runs the same pipeline on a few samples and steps (the test suite runs it); its numbers mean nothing.
"""
import argparse
import datetime
import hashlib
import json
import math
import os
import queue
import shlex
import shutil
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import entitygrid  # noqa: E402
import checkpoints  # noqa: E402

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
STAGE2_FLAGS = ("--no-sra",)  # stage 1 freezes the SRA, whose zero-init output is the identity: same stage-1 model
MARGIN = 0.02  # "does not lower": a drop below 0.02 (about one standard error of a run's edge or other accuracy)
# claims: (text, metric, {config: weight}, bound); the contrast sum(weight * metric) > bound, paired by seed
CLAIMS = [
    ("slicing opens an edge gap", "gap", {"no-sra": 1, "overview": -1}, 0.0),
    ("SRA closes at least half of that gap", "gap", {"no-sra": 0.5, "overview": 0.5, "full": -1}, 0.0),
    ("SRA does not lower the other cells", "other_accuracy", {"full": 1, "no-sra": -1}, -MARGIN),
    ("SRA does not lower accuracy", "accuracy", {"full": 1, "no-sra": -1}, -MARGIN),
    ("SRA narrows the gap (slices only)", "gap", {"slices": 1, "slices+sra": -1}, 0.0),
    ("SRA helps edge counting", "counting_edge", {"full": 1, "no-sra": -1}, 0.0),
    ("slices help overall", "accuracy", {"no-sra": 1, "overview": -1}, 0.0),
    ("SMS beats the Q-Former sampler", "accuracy", {"full": 1, "qformer": -1}, 0.0),
    ("SMS beats average pooling", "accuracy", {"full": 1, "avgpool": -1}, 0.0),
    ("SMS keeps position better than the Q-Former", "position", {"full": 1, "qformer": -1}, 0.0),
    ("SMS keeps position better than average pooling", "position", {"full": 1, "avgpool": -1}, 0.0),
]
METRICS = ("accuracy", "edge_accuracy", "other_accuracy", "gap", "discrepancy", "counting_edge", "position")
CODE_EXCLUDE = ("eval.py", "metrics.py", "bench.py")  # top-level files no training run executes
SMOKE = ["--train-size", "64", "--test-size", "27", "--vocab-size", "400", "--steps0", "2", "--steps1", "2",
         "--steps2", "2", "--batch0", "8", "--batch1", "8", "--batch2", "8", "--eval-batch", "27"]
EDGE = [c - 1 for c in entitygrid.EDGE_CELLS]
OTHER = [c - 1 for c in entitygrid.OTHER_CELLS]


# ----------------------------------------------------------------------------------------------------------------
# the runs

def source(name):
    """The configuration whose stage-1 checkpoint `name` starts stage 2 from: the first with the same stage-1 flags
    (itself if none comes before it)."""
    stage1 = lambda c: [f for f in CONFIGS[c][0] if f not in STAGE2_FLAGS]
    return next(c for c in CONFIGS if stage1(c) == stage1(name))


def depends(name):
    """The run that `name` starts from: a configuration's stage-1 source, or the seed's stage 0 ("stage0", which
    starts from nothing: None)."""
    return None if name == "stage0" else "stage0" if source(name) == name else source(name)


def command(name, seed, out, smoke):
    """The train.py command of one run (a configuration, or "stage0": the seed's stage 0, which every configuration
    of the seed uses), as a list; relative to the repository root."""
    cmd = ["python", "train.py", "--seed", str(seed), "--threads", "1", "--data-dir", f"{out}/data-seed{seed}",
           "--out", f"{out}/{name}-seed{seed}"]
    if name == "stage0":
        return cmd + ["--stage", "0"] + (SMOKE if smoke else [])
    cmd += ["--stage0", f"{out}/stage0-seed{seed}/stage0"]
    if source(name) != name:
        cmd += ["--stage", "2", "--init", f"{out}/{source(name)}-seed{seed}/stage1"]
    return cmd + CONFIGS[name][0] + (SMOKE if smoke else [])


def code_hash():
    """SHA-256 (12 hex digits) of the top-level .py files a run executes: model, training and benchmark code.
    Records with another hash were made by other code, whatever their commit."""
    h = hashlib.sha256()
    for name in sorted(f for f in os.listdir(ROOT) if f.endswith(".py") and f not in CODE_EXCLUDE):
        with open(os.path.join(ROOT, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()[:12]


def read_record(name, seed, out, smoke):
    """The record of a finished run of this command, or None."""
    path = os.path.join(ROOT, out, f"{name}-seed{seed}", "record.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        record = json.load(f)
    return record if record["command"] == shlex.join(command(name, seed, out, smoke)) else None


def run_one(name, seed, out, smoke, core):
    """Run one configuration and seed -> its record, written atomically."""
    cmd = command(name, seed, out, smoke)
    run_dir = os.path.join(ROOT, out, f"{name}-seed{seed}")
    if os.path.isfile(os.path.join(run_dir, "train.log")):  # a run killed before its record: start it afresh
        shutil.rmtree(run_dir)
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
    after, dep = [], depends(name)
    while dep:  # the commands this run starts from, first first
        after, dep = [shlex.join(command(dep, seed, out, smoke))] + after, depends(dep)
    record = dict(config=name, flags=CONFIGS.get(name, ([],))[0], seed=seed, command=shlex.join(cmd), after=after,
                  wall_s=round(wall, 1), git_commit=checkpoints.git_commit() or "unknown", code=code_hash(),
                  date=datetime.datetime.now().isoformat(timespec="seconds"))
    if name != "stage0":
        questions = entitygrid.load_questions(os.path.join(ROOT, out, f"data-seed{seed}", "test"))
        with open(os.path.join(run_dir, "predictions.json")) as f:  # eval.py's format: [{"id", "answer"}]
            preds = {e["id"]: e["answer"] for e in json.load(f)}
        record.update(metrics=entitygrid.score(questions, preds), questions=compact(questions, preds))
    checkpoints.atomic_write(os.path.join(run_dir, "record.json"), json.dumps(record))
    return record


def compact(questions, preds):
    """Per test question (file order): task initial, cell digit, layout initial (edge/corner/mixed) and 1/0 for
    right/wrong, as four strings."""
    right = [entitygrid.parse_letter(preds.get(q["id"], "")) == q["answer"] for q in questions]
    return dict(task="".join(q["task"][0] for q in questions), cell="".join(str(q["cell"]) for q in questions),
                layout="".join(entitygrid.layout(q["positions"])[0] for q in questions),
                correct="".join("1" if r else "0" for r in right))


def plan(configs, seeds, part):
    """The runs to do, in start order, for the seeds of --part i/k (every k-th from the i-th: a seed's runs share
    its stage 0, so they stay in one part): each seed's stage 0, then the stage-1 sources that others wait for, the
    other sources, the dependents last (so a run waiting for the one it starts from never holds a core for long).
    A selected configuration brings its source along."""
    mine = seeds[part[0] - 1::part[1]]
    sources = [src for src in CONFIGS if any(source(c) == src for c in configs)]
    sources.sort(key=lambda src: not any(source(c) == src != c for c in configs))
    return ([("stage0", s) for s in mine] + [(src, s) for src in sources for s in mine] +
            [(c, s) for c in configs if source(c) != c for s in mine])


def run_study(runs, args):
    """Run the planned runs, args.jobs at a time, each pinned to its own core; a dependent waits for its source.
    -> {(config, seed): record}."""
    code = code_hash()
    done, todo = {}, []
    for c, s in runs:
        record = read_record(c, s, args.out, args.smoke)
        if record and record["code"] != code and not args.mix_code:
            if not args.redo_stale:
                raise SystemExit(f"ablation: {args.out}/{c}-seed{s} was recorded with code {record['code']} (commit "
                                 f"{record['git_commit'][:12]}), this checkout has code {code}; rerun such runs "
                                 f"with --redo-stale or keep them with --mix-code")
            record = None
        if record and (depends(c), s) not in todo:  # what a run starts from is redone: the run is too
            done[c, s] = record
        else:
            todo.append((c, s))
    print(f"ablation: {len(done)} of {len(runs)} runs recorded, {len(todo)} to run, {args.jobs} at a time", flush=True)
    cores = queue.Queue()  # a run takes a free core and gives it back
    for core in (sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0])[:args.jobs]:
        cores.put(core)
    futures, walls, t0 = {}, [], time.time()

    def job(c, s):
        if (depends(c), s) in futures:
            futures[depends(c), s].result()  # what it starts from; started earlier, so this always ends
        core = cores.get()
        try:
            record = run_one(c, s, args.out, args.smoke, core)
        finally:
            cores.put(core)
        walls.append(record["wall_s"])
        left = (len(todo) - len(walls)) * float(np.mean(walls)) / args.jobs  # runs left x mean run / cores
        if c == "stage0":
            print(f"stage 0 seed {s}: {record['wall_s']:.0f} s", flush=True)
            return record
        print(f"{c} seed {s}: accuracy {record['metrics']['accuracy']:.3f}, gap (other - edge) "
              f"{record['metrics']['other_accuracy'] - record['metrics']['edge_accuracy']:+.3f} "
              f"({record['wall_s']:.0f} s; {time.time() - t0:.0f} s so far, about {left / 60:.0f} min to go)",
              flush=True)
        return record
    with ThreadPoolExecutor(args.jobs) as pool:
        for c, s in todo:
            futures[c, s] = pool.submit(job, c, s)
        done.update({k: f.result() for k, f in futures.items()})
    return done


# ----------------------------------------------------------------------------------------------------------------
# statistics

def t_sf2(t, df):
    """P(|T| >= |t|) for Student's t with integer df > 0: Abramowitz & Stegun 26.7.3-4 (finite sums in theta)."""
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    terms = 0.0
    if df % 2:  # odd: A = 2/pi (theta + sin(theta) (cos + 2/3 cos^3 + ... + (2*4..(df-3))/(3*5..(df-2)) cos^(df-2)))
        a = c
        for j in range(1, (df - 1) // 2 + 1):
            terms, a = terms + a, a * (2 * j) / (2 * j + 1) * c * c
        return 1 - 2 / math.pi * (theta + s * terms)
    a = 1.0  # even: A = sin(theta) (1 + 1/2 cos^2 + ... + (1*3..(df-3))/(2*4..(df-2)) cos^(df-2))
    for j in range(df // 2):
        terms, a = terms + a, a * (2 * j + 1) / (2 * j + 2) * c * c
    return 1 - s * terms


def t_quantile(q, df):
    """The q quantile (q > 0.5) of Student's t with integer df, by bisection on t_sf2."""
    lo, hi = 0.0, 1e7
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_sf2(mid, df) / 2 > 1 - q else (lo, mid)
    return (lo + hi) / 2


def paired_t(d, bound=0.0):
    """Per-seed contrasts d -> (mean, 95% t interval lo, hi, t statistic, two-sided p of H0: mean = bound)."""
    d = np.asarray(d, float)
    n = len(d)
    mean = float(d.mean())
    if n < 2:
        return mean, float("nan"), float("nan"), float("nan"), float("nan")
    se = float(d.std(ddof=1)) / math.sqrt(n)
    half = t_quantile(0.975, n - 1) * se
    if se == 0:
        return mean, mean, mean, float("nan"), (1.0 if mean == bound else 0.0)
    t = (mean - bound) / se
    return mean, mean - half, mean + half, t, t_sf2(t, n - 1)


def holm(p):
    """Holm's step-down adjusted p-values, in the input order (nan stays nan and is not counted)."""
    p = np.asarray(p, float)
    ok = np.flatnonzero(~np.isnan(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    out, running = np.full(len(p), np.nan), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p[i]))
        out[i] = running
    return out


def counts(c):
    """A record's compact questions -> (group (n,) = task index * 9 + cell - 1, right (n,) 0/1)."""
    task = {t[0]: k for k, t in enumerate(entitygrid.TASKS)}
    group = np.array([9 * task[t] + int(cell) - 1 for t, cell in zip(c["task"], c["cell"])])
    return group, np.array([r == "1" for r in c["correct"]], float)


def nanmean(x, axis):
    with warnings.catch_warnings():  # a mean over nothing is nan: a cell or seed without such questions
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=axis)


def cell_metrics(right, total):
    """right, total: (..., 3, 9) answers right / questions per (task, cell) -> METRICS, each (...), by
    entitygrid.score's definitions (tests check them against it): Acc_i the mean over tasks with questions at cell
    i, edge / other the means of Acc_i, gap = other - edge, Discrepancy = |gap|."""
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = right / total                                                    # (..., 3, 9), nan: no questions
        per_cell = nanmean(acc, -2)                                            # (..., 9)
        edge, other = nanmean(per_cell[..., EDGE], -1), nanmean(per_cell[..., OTHER], -1)
        return dict(accuracy=right.sum((-2, -1)) / total.sum((-2, -1)), edge_accuracy=edge, other_accuracy=other,
                    gap=other - edge, discrepancy=np.abs(other - edge), counting_edge=nanmean(acc[..., 2, EDGE], -1),
                    position=right[..., 1, :].sum(-1) / total[..., 1, :].sum(-1))


def tally(group, right, idx=None):
    """-> (right, total) per (task, cell), (3, 9), over the questions idx (all if None)."""
    g, r = (group, right) if idx is None else (group[idx], right[idx])
    return np.bincount(g, r, 27).reshape(3, 9), np.bincount(g, minlength=27).reshape(3, 9).astype(float)


def bootstrap(runs, reps, seed=0):
    """runs: config -> {seed: (group, right)}, the same seeds and test questions for every config. Each replicate
    draws the seeds with replacement and, per drawn seed, its test questions with replacement; the same draw serves
    every configuration, so contrasts are paired. -> config -> metric -> (reps,) means over the drawn seeds."""
    rng = np.random.default_rng(seed)
    seeds = sorted(next(iter(runs.values())))
    shape = (reps, len(seeds), 3, 9)
    right, total = {c: np.empty(shape) for c in runs}, np.empty(shape)
    for r in range(reps):
        for j, s in enumerate(rng.choice(seeds, len(seeds))):
            group = next(iter(runs.values()))[s][0]  # every configuration of a seed answers the same questions
            idx = rng.integers(0, len(group), len(group))
            for c in runs:
                right[c][r, j], total[r, j] = tally(runs[c][s][0], runs[c][s][1], idx)
    return {c: {m: nanmean(v, 1) for m, v in cell_metrics(right[c], total).items()} for c in runs}


def summarise(records, reps):
    """-> (rows: config -> metric -> (mean over seeds, bootstrap lo, hi), claims: list of dicts)."""
    configs = [c for c in CONFIGS if any(r["config"] == c for r in records)]
    runs = {c: {r["seed"]: counts(r["questions"]) for r in records if r["config"] == c} for c in configs}
    if len({tuple(sorted(v)) for v in runs.values()}) != 1:
        raise SystemExit("ablation: every configuration needs the same seeds for the paired statistics")
    seeds = sorted(next(iter(runs.values())))
    per_seed = {c: {m: np.array([cell_metrics(*tally(*runs[c][s]))[m] for s in seeds]) for m in METRICS}
                for c in configs}
    boot = bootstrap(runs, reps)
    interval = lambda x: np.nanpercentile(x, [2.5, 97.5]).tolist() if not np.isnan(x).all() else [np.nan] * 2
    rows = {c: {m: (float(nanmean(per_seed[c][m], 0)), *interval(boot[c][m])) for m in METRICS} for c in configs}
    claims = []
    for text, m, weights, bound in CLAIMS:
        if not set(weights) <= set(configs):
            continue
        contrast = lambda src, metric: sum(w * src[c][metric] for c, w in weights.items())
        mean, lo, hi, t, p = paired_t(contrast(per_seed, m), bound)
        claims.append(dict(text=text, metric=m, weights=weights, bound=bound, mean=mean, t_lo=lo, t_hi=hi, t=t,
                           p=p, boot=interval(contrast(boot, m)), per_seed=contrast(per_seed, m).tolist(),
                           discrepancy=paired_t(contrast(per_seed, "discrepancy"))[:3] if m == "gap" else None))
    for c, p in zip(claims, holm([c["p"] for c in claims])):
        c["p_holm"] = float(p)
    return rows, claims


# ----------------------------------------------------------------------------------------------------------------
# reports

def contrast_text(weights):
    """{"no-sra": 0.5, "overview": 0.5, "full": -1} -> '0.5 no-sra + 0.5 overview - full'."""
    out = ""
    for c, w in weights.items():
        coef = "" if abs(w) == 1 else f"{abs(w):g} "
        out += (" - " if w < 0 else " + " if out else "") + coef + c
    return out


def write_markdown(path, records, rows, claims, reps, argv, stage0_s):
    seeds = sorted({r["seed"] for r in records})
    fmt = lambda v: f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"
    lines = [f"# EntityGrid-QA ablations, tiny preset ({len(records)} runs: {len(rows)} configurations x seeds "
             f"{', '.join(map(str, seeds))})", "",
             f"Written by `{shlex.join(['python', 'results/ablation.py'] + argv)}`; code "
             f"{', '.join(sorted({r['code'] for r in records}))} (commits "
             f"{', '.join(sorted({r['git_commit'][:12] for r in records}))}); "
             f"{sum(r['wall_s'] for r in records) / 60:.0f} run-minutes (and {stage0_s / 60:.0f} for the seeds' "
             "stage 0) on 1 CPU thread each; "
             f"{records[0]['metrics']['num']} test questions per seed. Per configuration: the mean over seeds and "
             f"[95% nested bootstrap interval] from {reps} replicates (seeds, then questions within each seed). "
             "gap = other - edge (signed), Discrepancy = |edge - other| (docs/method.md#entitygrid-qa); counting "
             "edge = counting accuracy on edge cells. Each run's command is in results/ablation.json.", "",
             "| configuration | flags | accuracy | edge | other | gap (other - edge) | Discrepancy | counting edge "
             "| position |", "|---|---|---|---|---|---|---|---|---|"]
    for c, v in rows.items():
        flags = " ".join(CONFIGS[c][0]) or "(none)"
        lines.append(f"| {c}: {CONFIGS[c][1]} | `{flags}` | " + " | ".join(fmt(v[m]) for m in METRICS) + " |")
    lines += ["", f"Claims: paired contrasts of per-seed values (n = {len(seeds)} seeds). t interval: mean +- "
              f"t(0.975, n-1) x sd / sqrt(n); p: two-sided paired t test of H0: contrast = bound; Holm: p adjusted "
              f"by Holm's step-down method over the {len(claims)} claims. A claim holds when its Holm p < 0.05 and "
              f"the contrast exceeds the bound ({-MARGIN:+.2f} for \"does not lower\": a smaller drop counts as "
              "none). For gap claims, the same contrast on the Discrepancy is beside it.", "",
              "| claim | metric: contrast | bound | estimate | 95% t interval | 95% bootstrap | p | Holm p | holds "
              "| same on Discrepancy [t interval] |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in claims:
        holds = "yes" if c["p_holm"] < 0.05 and c["mean"] > c["bound"] else "no"
        disc = "" if c["discrepancy"] is None else "{:+.3f} [{:+.3f}, {:+.3f}]".format(*c["discrepancy"])
        lines.append(f"| {c['text']} | {c['metric']}: {contrast_text(c['weights'])} | {c['bound']:+.2f} | "
                     f"{c['mean']:+.3f} | [{c['t_lo']:+.3f}, {c['t_hi']:+.3f}] | [{c['boot'][0]:+.3f}, "
                     f"{c['boot'][1]:+.3f}] | {c['p']:.3g} | {c['p_holm']:.3g} | {holds} | {disc} |")
    lines += ["", "Counting accuracy by layout (mean over seeds; one copy on an edge cell, one on a corner, two or "
              "more mixing both):", "", "| configuration | one edge copy | one corner copy | mixed |", "|---|---|---|---|"]
    for c in rows:
        lay = [[r["metrics"]["per_task_layout"]["counting"][k] for r in records if r["config"] == c]
               for k in entitygrid.LAYOUTS]
        lines.append(f"| {c} | " + " | ".join("-" if entitygrid.mean(v) is None else f"{entitygrid.mean(v):.3f}"
                                              for v in lay) + " |")
    lines += ["", "Accuracy by task on edge / other cells (mean over seeds of entitygrid.discrepancy on the task's "
              "per-cell accuracies):", "", "| configuration | " + " | ".join(entitygrid.TASKS) + " |",
              "|---|" + "---|" * len(entitygrid.TASKS)]
    for c in rows:
        cells = []
        for t in entitygrid.TASKS:
            sides = [entitygrid.discrepancy({int(i): a for i, a in r["metrics"]["per_task_position"][t].items()})[:2]
                     for r in records if r["config"] == c]  # (edge, other) per seed
            edge, other = (entitygrid.mean(side) for side in zip(*sides))
            cells.append("-" if edge is None or other is None else f"{edge:.3f} / {other:.3f}")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def per_cell(records, config):
    """Mean over seeds of Acc_i (entitygrid.score's per_position) -> (3, 3) array, nan where never asked."""
    vals = [[{int(k): v for k, v in r["metrics"]["per_position"].items()}[i] for i in entitygrid.CELLS]
            for r in records if r["config"] == config]  # JSON has made the cell keys strings
    return nanmean(np.array(vals, float), 0).reshape(3, 3)


def draw(path, rows, records):
    """Left: per configuration accuracy, edge, other and Discrepancy as bars with 95% intervals. Right: per-cell
    accuracy (3 x 3, edge cells framed) for full and --no-sra, and their difference (Pillow only)."""
    from PIL import Image, ImageDraw
    metrics = [("accuracy", (60, 60, 60)), ("edge_accuracy", (220, 80, 60)), ("other_accuracy", (60, 120, 220)),
               ("discrepancy", (240, 170, 30))]
    bar, gap, left, top, W, cell = 12, 14, 170, 40, 720, 46
    maps = [(c + " accuracy per cell", per_cell(records, c), False) for c in ("full", "no-sra") if c in rows]
    if len(maps) == 2:
        maps.append(("full - no-sra per cell", maps[0][1] - maps[1][1], True))
    H = max(top + len(rows) * (len(metrics) * bar + gap) + 40, top + len(maps) * (3 * cell + 40) + 20)
    img = Image.new("RGB", (W + (3 * cell + 40 if maps else 0), H), "white")
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
            d.line((x(lo), y + 2, x(lo), y + bar - 3), fill="black")
            d.line((x(hi), y + 2, x(hi), y + bar - 3), fill="black")
            y += bar
        y += gap
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        d.line((x(t), top - 4, x(t), H - 34), fill=(200, 200, 200))
        d.text((x(t) - 10, H - 30), f"{t:.2f}", fill="black")
    for k, (title, grid, diff) in enumerate(maps):  # accuracy: white -> blue; difference: red (lower) / blue
        x0, y0 = W + 20, top + k * (3 * cell + 40)
        d.text((x0, y0 - 14), title, fill="black")
        scale = max(0.1, float(np.nanmax(np.abs(grid)))) if diff else 1.0
        for i in range(9):
            r, c = divmod(i, 3)
            v = grid[r, c]
            f = 0.0 if np.isnan(v) else min(1.0, abs(v) / scale)
            ink = (220, 50, 40) if diff and v < 0 else (40, 90, 220)
            color = tuple(round(255 - f * (255 - t)) for t in ink)
            box = (x0 + c * cell, y0 + r * cell, x0 + (c + 1) * cell - 1, y0 + (r + 1) * cell - 1)
            edge = i + 1 in entitygrid.EDGE_CELLS
            d.rectangle(box, fill=color, outline=(0, 0, 0) if edge else (170, 170, 170), width=3 if edge else 1)
            label = "-" if np.isnan(v) else (f"{v:+.2f}" if diff else f"{v:.2f}")
            d.text((box[0] + 9, box[1] + 17), label, fill="white" if f > 0.6 else "black")
    if maps:
        d.text((W + 20, top + len(maps) * (3 * cell + 40) - 20), "thick frame: edge cell", fill="black")
    img.save(path, format="PNG")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {','.join(CONFIGS)}")
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds; each has its own data and backbones")
    p.add_argument("--part", default="1/1", help="i/k: run only the runs of every k-th seed of --seeds, from the "
                   "i-th; the report is written once every run of --configs x --seeds is recorded")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, each on one core with one thread")
    p.add_argument("--out", default="runs/ablation", help="run directories (relative to the repository root)")
    p.add_argument("--results", default="results", help="where ablation.json, .md and .png go")
    p.add_argument("--reps", type=int, default=1000, help="bootstrap replicates")
    p.add_argument("--mix-code", action="store_true", help="keep records made by other model/training/benchmark code")
    p.add_argument("--redo-stale", action="store_true", help="rerun runs recorded with other code")
    p.add_argument("--smoke", action="store_true", help="a few samples and steps: checks the pipeline, not the model")
    args = p.parse_args(argv)
    configs = args.configs.split(",")
    if set(configs) - set(CONFIGS):
        p.error(f"--configs: unknown {sorted(set(configs) - set(CONFIGS))}; choose from {','.join(CONFIGS)}")
    try:
        seeds = sorted({int(s) for s in args.seeds.split(",")})
        part = tuple(int(v) for v in args.part.split("/"))
        if len(part) != 2 or not 1 <= part[0] <= part[1]:
            raise ValueError
    except ValueError:
        p.error(f"--seeds {args.seeds} / --part {args.part}: seeds are integers, a part is i/k with 1 <= i <= k")
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: at least 1")
    runs = plan(configs, seeds, part)
    if not runs:
        p.error(f"--part {args.part}: no seed of --seeds {args.seeds} falls in it")
    import stage0
    import train
    for seed in sorted({s for _, s in runs}):  # each seed's data first, here, so that parallel runs never race
        stage0.prepare_tiny(train.parse_args(command(runs[0][0], seed, args.out, args.smoke)[2:]))
    t0 = time.time()
    run_study(runs, args)
    wanted = [(c, s) for c in configs for s in seeds]
    records = [read_record(c, s, args.out, args.smoke) for c, s in wanted]
    if any(r is None for r in records):
        print(f"ablation: {sum(r is not None for r in records)} of {len(wanted)} runs recorded; the report comes "
              "when all are (run the other parts)")
        return records, None, None
    if len({r["code"] for r in records}) > 1 and not args.mix_code:
        raise SystemExit(f"ablation: the records come from code {sorted({r['code'] for r in records})}; rerun the "
                         "stale ones with --redo-stale or report them together with --mix-code")
    rows, claims = summarise(records, args.reps)
    os.makedirs(args.results, exist_ok=True)
    path = lambda ext: os.path.join(args.results, f"ablation.{ext}")
    checkpoints.atomic_write(path("json"), json.dumps(records, indent=1))
    stage0_s = sum(r["wall_s"] for r in (read_record("stage0", s, args.out, args.smoke) for s in seeds) if r)
    checkpoints.atomic_write(path("md"), lambda tmp: write_markdown(tmp, records, rows, claims, args.reps, argv,
                                                                    stage0_s))
    checkpoints.atomic_write(path("png"), lambda tmp: draw(tmp, rows, records))
    print(f"ablation: {len(records)} runs in {time.time() - t0:.0f} s -> {args.results}/ablation.{{json,md,png}}")
    return records, rows, claims


if __name__ == "__main__":
    main()
