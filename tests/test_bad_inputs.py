"""Every bad input to a command line gets one clear line: for each case of the table, the exit status is not 0,
stderr holds exactly one line (no usage block, no traceback), the line says what is wrong, and every file that was
on disk before is still there, unchanged. In-process (main(argv), SystemExit caught) except for a few subprocess
runs that check what a shell sees."""
import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bench  # noqa: E402
import entitygrid  # noqa: E402
import eval as ev  # noqa: E402
import hires  # noqa: E402
import slicing  # noqa: E402
import train  # noqa: E402

NO_CUDA = not torch.cuda.is_available()
RESUMED = r"^\S+: error: --resume: .*done/stage{}/checkpoints/step-0000002 was trained with {}, this command " \
          r"asks for {}; a resumed run keeps its own model settings: pass \1, or another --out for a new run$"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace with one of each kind of file the cases point at, and a run directory someone finished."""
    d = tmp_path_factory.mktemp("ws")
    entitygrid.generate(str(d / "grid"), 3, seed=0, base=96, split="test", families=("object", "shape"))
    (d / "cut").mkdir()
    (d / "cut" / "questions.jsonl").write_text((d / "grid" / "questions.jsonl").read_text()[:150])  # truncated
    (d / "empty").mkdir()                                    # a folder that is not a checkpoint
    Image.new("RGB", (300, 200), "white").save(d / "photo.png")
    (d / "notes.txt").write_text("not an image")
    for name in ("stage1/model.safetensors", "stage1/checkpoints/latest", "stage2/config.json", "metrics.json"):
        (d / "run" / name).parent.mkdir(parents=True, exist_ok=True)
        (d / "run" / name).write_text(f"an earlier run's {name}")
    for stage, template in (("1", "plain"), ("2", "vicuna_v1")):  # a tiny run of the defaults, both stages done
        finished(d / "done" / f"stage{stage}", template)
    (d / "bad").mkdir()
    (d / "bad" / "config.json").write_text('{"template": "pla')  # cut short
    return d


def finished(stage_dir, template):
    """A finished stage of train.py's tiny preset with its default model flags, as it lays it out on disk: its
    checkpoint (config.json, model.safetensors) and the last resumable one (+ optimizer, trainer state) that
    `latest` names. Only what the command lines read before any work: the configs and the folder layout."""
    tiny = train.PRESETS["tiny"]
    cfg = hires.HiResConfig(clip_preset="tiny", clip_weights="../base/clip_tiny.safetensors", llm_path="../base/llm",
                            tokenizer_path="../base/llm/tokenizer.model", template=template, mc=tiny.mc,
                            **{k: getattr(tiny, k) for k in train.MODEL_FLAGS})
    step = stage_dir / "checkpoints" / "step-0000002"
    for folder, files in ((stage_dir, ()), (step, ("optimizer.safetensors", "trainer.json"))):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
        for name in ("model.safetensors", *files):
            (folder / name).write_text(f"a finished run's {name}")
    (stage_dir / "checkpoints" / "latest").write_text(step.name)


def snapshot(d):
    return {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}


# (module, argv with {ws} for the workspace, the line's expected content, needs no CUDA)
CASES = [
    # train.py: ranges, combinations, devices, files, a used run directory
    (train, ["--micro-batch", "0"], r"^\S+: error: argument --micro-batch: 0: must be >= 1$"),
    (train, ["--lr1", "-1"], r"argument --lr1: -1.0: must be >= 0"),
    (train, ["--lora-lr", "-0.5"], r"argument --lora-lr: -0.5: must be >= 0"),
    (train, ["--batch1", "0"], r"argument --batch1: 0: must be >= 1"),
    (train, ["--epochs2", "-3"], r"argument --epochs2: -3: must be >= 1"),
    (train, ["--keep", "0"], r"argument --keep: 0: must be >= 1"),
    (train, ["--max-len", "-1"], r"argument --max-len: -1: must be >= 0"),
    (train, ["--lora-dropout", "1.5"], r"argument --lora-dropout: 1.5: must be >= 0 and < 1"),
    (train, ["--warmup-ratio", "-0.1"], r"argument --warmup-ratio: -0.1: must be >= 0 and < 1"),
    (train, ["--test-size", "0"], r"argument --test-size: 0: must be >= 1"),
    (train, ["--max-new-tokens", "0"], r"argument --max-new-tokens: 0: must be >= 1"),
    (train, ["--grad-clip", "0"], r"argument --grad-clip: 0.0: must be > 0"),
    (train, ["--lora-alpha", "-2"], r"argument --lora-alpha: -2.0: must be > 0"),
    (train, ["--steps0", "-1"], r"argument --steps0: -1: must be >= 0"),
    (train, ["--micro-batch", "two"], r"argument --micro-batch: invalid int value: 'two'"),
    (train, ["--families", "word"], r"--families word: choose from"),
    (train, ["--sra-layers", "7,x"], r"argument --sra-layers: '7,x': expected comma-separated block numbers"),
    (train, ["--stage", "2"], r"--stage 2 needs --init"),
    (train, ["--stage", "2", "--init", "{ws}/nowhere"], r"--init .*nowhere: no such file or directory"),
    (train, ["--stage", "2", "--init", "{ws}/empty"], r"--init .*empty: not a checkpoint folder \(no config.json"),
    (train, ["--clip", "{ws}/nowhere.pt", "--llm", "{ws}/empty"], r"--clip .*nowhere.pt: no such file"),
    (train, ["--llm", "{ws}/empty"], r"the paper preset needs --clip .* and --llm"),
    (train, ["--resume", "--overwrite"], r"--resume continues OUT, --overwrite deletes it: give one"),
    (train, ["--device", "cuda"], r"--device cuda: this machine has no CUDA device", NO_CUDA),
    (train, ["--out", "{ws}/run"], r"^train.py: error: .*run/stage1 holds an earlier run: continue it with --resume, "
                                   r"start over with --overwrite \(deletes it\), or pass another --out$"),
    (train, ["--out", "{ws}/run", "--stage", "2", "--init", "{ws}/grid"], r"--init .*grid: not a checkpoint folder"),
    # train.py: outputs and data that cannot be written, as the wrong kind of thing or in a read-only place
    (train, ["--out", "{ws}/notes.txt"],
     r"^\S+: error: --out .*notes.txt: is a file, not a folder; pass a folder$"),
    (train, ["--out", "{ws}/notes.txt/run"], r"--out .*notes.txt/run: lies under the file .*notes.txt, not a folder"),
    (train, ["--out", "/sys/hires-llava-run"],  # read-only even for root
     r"--out /sys/hires-llava-run: cannot write in /sys \(.*\); pass a folder you can write in$"),
    (train, ["--out", "/proc/hires-llava-run"], r"--out /proc/hires-llava-run: cannot write in /proc"),
    (train, ["--data-dir", "{ws}/notes.txt"], r"--data-dir .*notes.txt: is a file, not a folder"),
    (train, ["--data-dir", "/sys/entitygrid"], r"--data-dir /sys/entitygrid: cannot write in /sys"),
    # train.py: checkpoints of the wrong stage or kind
    (train, ["--stage", "2", "--init", "{ws}/done/stage2"], r"^\S+: error: --init .*done/stage2: a stage-2 "
     r"checkpoint \(template vicuna_v1\); stage 2 starts from a stage-1 checkpoint: pass OUT/stage1 of the run$"),
    (train, ["--stage", "2", "--init", "{ws}/done/stage2/checkpoints/step-0000002"], r"a stage-2 checkpoint"),
    (train, ["--stage", "2", "--init", "{ws}/done"], r"--init .*done: not a checkpoint folder \(no config.json"),
    (train, ["--stage", "2", "--init", "{ws}/notes.txt"], r"--init .*notes.txt: not a checkpoint folder"),
    (train, ["--stage", "2", "--init", "{ws}/bad"], r"--init: .*bad/config.json: unreadable checkpoint config"),
    (train, ["--init", "{ws}/done/stage1"],
     r"--init .*stage1: only --stage 2 starts from a checkpoint \(--stage all trains stage 1 itself\); add --stage 2, "
     r"or drop --init$"),
    (train, ["--stage", "1", "--init", "{ws}/done/stage1"], r"only --stage 2 starts from a checkpoint"),
    # train.py: a resume whose model flags are not the run's names the flag and the run's value
    (train, ["--out", "{ws}/done", "--resume", "--no-sra"], RESUMED.format(1, "(--sra)", "--no-sra")),
    (train, ["--out", "{ws}/done", "--resume", "--lora-rank", "4"],
     RESUMED.format(1, "(--lora-rank 0)", "--lora-rank 4")),
    (train, ["--out", "{ws}/done", "--resume", "--sra-layers", "8,9"],
     RESUMED.format(1, "(--sra-layers 7,8,9)", "--sra-layers 8,9")),
    (train, ["--out", "{ws}/done", "--stage", "1", "--resume", "--sampler", "avgpool"],
     RESUMED.format(1, "(--sampler sms)", "--sampler avgpool")),
    (train, ["--out", "{ws}/done", "--resume", "--max-len", "256"],
     RESUMED.format(1, "(--max-len 512)", "--max-len 256")),
    (train, ["--out", "{ws}/done", "--resume", "--mc", "letter"], RESUMED.format(1, "(--mc rank)", "--mc letter")),
    (train, ["--out", "{ws}/done", "--stage", "2", "--init", "{ws}/done/stage1", "--resume", "--upscale"],
     RESUMED.format(2, "(--no-upscale)", "--upscale")),
    # eval.py
    (ev, ["--image", "{ws}/photo.png", "--ckpt", "{ws}/empty", "--temperature", "-1"],
     r"^\S+: error: argument --temperature: -1.0: must be >= 0$"),
    (ev, ["--image", "{ws}/photo.png", "--ckpt", "{ws}/empty", "--top-p", "0"], r"--top-p 0.0: must be in \(0, 1\]"),
    (ev, ["--bench", "entitygrid", "--data", "{ws}/grid", "--ckpt", "{ws}/empty", "--max-new-tokens", "0"],
     r"argument --max-new-tokens: 0: must be >= 1"),
    (ev, ["--bench", "entitygrid", "--data", "{ws}/grid", "--ckpt", "{ws}/empty", "--batch-size", "0"],
     r"argument --batch-size: 0: must be >= 1"),
    (ev, ["--bench", "entitygrid", "--data", "{ws}/grid", "--ckpt", "{ws}/empty", "--limit", "-2"],
     r"argument --limit: -2: must be >= 1"),
    (ev, ["--bench", "entitygrid", "--data", "{ws}/grid", "--ckpt", "{ws}/empty", "--device", "cuda"],
     r"--device cuda: this machine has no CUDA device", NO_CUDA),
    (ev, ["--bench", "entitygrid", "--data", "{ws}/grid", "--ckpt", "{ws}/nowhere"],
     r"--ckpt .*nowhere: no such file or directory"),
    (ev, ["--bench", "entitygrid", "--data", "{ws}/grid", "--ckpt", "{ws}/empty", "--out", "{ws}/o1"],
     r"^eval.py: error: .*empty: not a checkpoint folder \(no config.json"),
    (ev, ["--bench", "entitygrid", "--data", "{ws}/cut", "--ckpt", "{ws}/empty", "--out", "{ws}/o2"],
     r"^eval.py: error: .*cut/questions.jsonl line 1: not valid JSON .*truncated\?"),
    (ev, ["--bench", "pope", "--data", "{ws}/grid", "--ckpt", "{ws}/empty", "--out", "{ws}/o3"],
     r"coco_pope_adversarial.json not found: pope expects .* \(get it from"),
    (ev, ["--bench", "entitygrid", "--data", "{ws}/grid", "--predictions", "{ws}/nowhere.json", "--out", "{ws}/o4"],
     r"nowhere.json: predictions file not found"),
    (ev, ["--bench", "entitygrid", "--data", "{ws}/grid", "--predictions", "{ws}/grid/questions.jsonl",
          "--out", "{ws}/o5"], r"questions.jsonl: not a entitygrid predictions file"),
    (ev, ["--image", "{ws}/notes.txt", "--ckpt", "{ws}/empty"], r"notes.txt"),
    (ev, ["--image", "{ws}/photo.png", "--ckpt", "{ws}/empty"], r"empty: not a checkpoint folder"),
    (ev, ["--bench", "entitygrid"], r"--ckpt is required unless --predictions is given"),
    # eval.py: outputs, predictions and checkpoints of the wrong kind
    (ev, ["--bench", "entitygrid", "--data", "{ws}/grid", "--ckpt", "{ws}/done/stage2", "--out", "{ws}/notes.txt"],
     r"^\S+: error: --out .*notes.txt: is a file, not a folder; pass a folder$"),
    (ev, ["--bench", "entitygrid", "--data", "{ws}/grid", "--ckpt", "{ws}/done/stage2", "--out", "{ws}/notes.txt/o"],
     r"--out .*notes.txt/o: lies under the file"),
    (ev, ["--bench", "entitygrid", "--data", "{ws}/grid", "--ckpt", "{ws}/done/stage2", "--out", "/sys/hl-eval"],
     r"--out /sys/hl-eval: cannot write in /sys"),
    (ev, ["--bench", "entitygrid", "--data", "{ws}/grid", "--predictions", "{ws}/empty", "--out", "{ws}/o7"],
     r"^\S+: error: --predictions .*empty: a folder; pass the predictions file, e.g. .*empty/predictions.json$"),
    (ev, ["--bench", "entitygrid", "--data", "{ws}/grid", "--ckpt", "{ws}/done/stage2/model.safetensors"],
     r"--ckpt .*model.safetensors: a file, not a checkpoint folder; pass the folder that holds it \(.*done/stage2\)"),
    (ev, ["--image", "{ws}/empty", "--ckpt", "{ws}/done/stage2"],
     r"^eval.py: error: .*empty: a folder, not an image"),
    (ev, ["--ckpt", "{ws}/done/stage2", "--merge", "{ws}/notes.txt"],
     r"--merge .*notes.txt: is a file, not a folder"),
    (ev, ["--ckpt", "{ws}/done/stage2", "--merge", "/proc/hl-merged"],
     r"--merge /proc/hl-merged: cannot write in /proc"),
    (ev, ["--ckpt", "{ws}/done/stage2", "--merge", "{ws}/done/stage1"],
     r"--merge .*stage1: holds a checkpoint already, which merging would overwrite; merge into a new folder$"),
    # eval.py --merge
    (ev, ["--ckpt", "{ws}/nowhere", "--merge", "{ws}/m"], r"^\S+: error: --ckpt .*nowhere: no such file or directory$"),
    (ev, ["--ckpt", "{ws}/empty", "--merge", "{ws}/m"],
     r"^eval.py: error: .*empty: not a checkpoint folder \(no config"),
    (ev, ["--ckpt", "{ws}/empty", "--merge", "{ws}/empty"], r"--merge .*empty: the checkpoint itself"),
    (ev, ["--merge", "{ws}/m"], r"--ckpt is required unless --predictions is given"),
    # slicing.py --show
    (slicing, ["--show", "{ws}/photo.png", "--max-slices", "0"], r"^\S+: error: --max-slices 0: must be >= 1$"),
    (slicing, ["--show", "{ws}/photo.png", "--base", "0"], r"--base 0: must be >= 1"),
    (slicing, ["--show", "{ws}/photo.png", "--kernel", "0"], r"--kernel 0: must be >= 1"),
    (slicing, ["--show", "{ws}/photo.png", "--base", "100"], r"--base 100: must be a multiple of --patch 14"),
    (slicing, ["--show", "{ws}/nowhere.png"], r"^slicing.py: error: .*nowhere.png"),
    (slicing, ["--show", "{ws}/notes.txt"], r"^slicing.py: error: .*notes.txt"),
    (slicing, ["--show", "{ws}/photo.png", "--png", "{ws}/nowhere/x.png"], r"--png .*x.png: cannot write"),
    (slicing, ["--show", "{ws}/empty"], r"^slicing.py: error: .*empty: a folder, not an image file"),
    (slicing, ["--show", "{ws}/photo.png", "--png", "{ws}/empty"],
     r"--png .*empty: a folder; pass a file name, e.g. .*empty/slicing.png$"),
    (slicing, ["--show", "{ws}/photo.png", "--png", "{ws}/slices.txt"], r"--png .*slices.txt: no picture format has"),
    (slicing, ["--show", "{ws}/photo.png", "--png", "{ws}/notes.txt/x.png"], r"--png .*x.png: cannot write"),
    (slicing, ["--show", "{ws}/photo.png", "--png", "/sys/slicing.png"], r"--png /sys/slicing.png: cannot write"),
    # entitygrid.py
    (entitygrid, ["--out", "{ws}/g", "--num", "0"], r"^\S+: error: --num must be a positive integer"),
    (entitygrid, ["--out", "{ws}/g", "--base", "5"], r"--base must be in"),
    (entitygrid, ["--show", "{ws}/empty"], r"--show .*empty: no questions.jsonl there"),
    (entitygrid, [], r"give exactly one of --out DIR"),
    # bench.py: devices, ranges, and argparse's own errors without a usage block
    (bench, ["gpu", "--device", "cuda"], r"^\S+: error: --device cuda: this machine has no CUDA device", NO_CUDA),
    (bench, ["gpu", "--device", "nonsense"], r"--device nonsense: not a torch device; use cuda, cuda:N or cpu"),
    (bench, ["gpu", "--device", "cpu", "--steps", "0"], r"--steps and --new-tokens must be >= 1"),
    (bench, ["entitygrid", "--samples", "0"], r"--samples must be >= 1 and --base in \[48, 2048\]"),
    (bench, ["entitygrid", "--base", "5"], r"--samples must be >= 1 and --base in \[48, 2048\]"),
    (bench, ["tinystep", "--clock", "nonsense"], r"^\S+ tinystep: error: argument --clock: invalid choice"),
    (bench, ["ttft", "--image-size", "100"], r"^\S+: error: hires ViT flags: image_size 100 is not a multiple"),
    (bench, ["llama", "--repeats", "0"], r"--repeats and --threads must be >= 1"),
    (bench, ["nosuch"], r"^\S+: error: argument .*: invalid choice: 'nosuch'"),
]


def run_main(module, argv, capsys):
    """-> (exit status a shell would see, the lines on stderr): sys.exit(str) prints the string, status 1."""
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    code = e.value.code
    lines = capsys.readouterr().err.splitlines() + ([code] if isinstance(code, str) else [])
    return (1 if isinstance(code, str) else code), lines


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0].__name__}:{' '.join(c[1])[:60]}")
def test_bad_input_is_one_line(case, ws, capsys, monkeypatch):
    module, argv, expected, *runs_here = case
    if runs_here and not runs_here[0]:
        pytest.skip("this machine has CUDA")
    monkeypatch.chdir(ws)  # defaults such as runs/tiny land in the workspace
    before = snapshot(ws)
    status, lines = run_main(module, [a.replace("{ws}", str(ws)) for a in argv], capsys)
    assert status != 0
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0] and re.search(expected, lines[0]), lines[0]
    after = snapshot(ws)
    assert {p: after.get(p) for p in before} == before  # nothing on disk lost or changed


@pytest.mark.parametrize("script, argv, status, expected", [  # two that import no torch: a second each
    ("eval.py", ["--bench", "entitygrid", "--data", "{ws}/cut", "--ckpt", "{ws}/empty", "--out", "{ws}/o6"], 1,
     "eval.py: error: {ws}/cut/questions.jsonl line 1: not valid JSON"),
    ("entitygrid.py", ["--out", "{ws}/g", "--num", "0"], 2, "entitygrid.py: error: --num must be a positive"),
])
def test_what_a_shell_sees(script, argv, status, expected, ws):
    """The real process: its exit status and its stderr (what sys.exit and argparse print outside pytest)."""
    run = subprocess.run([sys.executable, os.path.join(ROOT, script), *[a.replace("{ws}", str(ws)) for a in argv]],
                         cwd=ws, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    expected = expected.replace("{ws}", str(ws))
    assert run.returncode == status and run.stderr.count("\n") == 1 and run.stderr.startswith(expected), run.stderr


@pytest.mark.parametrize("script, bad_flag", [
    ("train.py", ["--micro-batch", "0"]), ("slicing.py", ["--show", "x.png", "--base", "0"]),
    ("eval.py", ["--limit", "0"]), ("entitygrid.py", ["--num", "0"])])
def test_help_and_a_bad_flag_answer_without_torch(script, bad_flag, tmp_path):
    """--help and a flag refused at parse time answer before torch's 2 s import: read from the process's own import
    list (python -X importtime prints every module imported), not from a clock, so a busy machine cannot flake it."""
    for argv, status in ((["--help"], 0), (bad_flag, 2)):
        run = subprocess.run([sys.executable, "-X", "importtime", os.path.join(ROOT, script), *argv], cwd=tmp_path,
                             capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        imported = [line.split("|")[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")]
        assert run.returncode == status and "argparse" in imported, run.stderr[-300:]
        assert not [m for m in imported if m == "torch" or m.startswith("torch.")], f"{script} {argv[0]} imports torch"


@pytest.mark.parametrize("module", [train, ev, slicing, entitygrid], ids=lambda m: m.__name__)
def test_every_flag_has_help(module, monkeypatch, capsys):
    """Each CLI's parser, caught as main() parses: every flag carries a help string, and --help exits 0."""
    import argparse
    parsers = []

    def caught(self, *a, **k):
        parsers.append(self)
        raise SystemExit(0)
    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", caught)
        with pytest.raises(SystemExit):
            module.main([])
    undocumented = [a.option_strings for a in parsers[0]._actions if not a.help]
    assert not undocumented
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0 and "--help" in capsys.readouterr().out


def test_no_question_says_crosss(tmp_path):
    """The plural of a shape that ends in s ("red cross") is "red crosses" in every generated question."""
    assert entitygrid.plural(entitygrid.Entity("shape", "red cross", "red", 0)) == "red crosses"
    questions = entitygrid.generate(str(tmp_path), 60, seed=3, base=96, families=("shape",))
    text = json.dumps(questions)
    assert "crosses" in text and "crosss" not in text
