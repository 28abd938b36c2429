"""Benchmark evaluation of HiRes-LLaVA (docs/benchmarks.md) on each benchmark's official released files; the
official metrics themselves are in metrics.py.

Prompts as LLaVA-1.5 (docs/benchmarks.md#common-to-all-benchmarks), batched greedy generation; every answer is
appended to OUT/predictions.partial.jsonl as it comes (--resume continues a killed run), then OUT/predictions.json
(submission format) and OUT/metrics.json (official normalisation, docs/benchmarks.md#metrics) are written;
--predictions rescores a file.
A bad image (slicing.ImageError) or a prompt longer than the context (hires.PromptTooLong) is not fatal: an empty
prediction, a warning, and a count in metrics "bad_images" / "too_long".
"""
import argparse
import base64
import csv
import glob
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone

from tqdm import tqdm

import entitygrid
from conversation import encode_prompt, multiple_choice
from metrics import (anls, circular_accuracy, hallusion_metrics, mean, parse_letter_ai2d, parse_letter_mmbench,
                     parse_letter_scienceqa, parse_yes_no, parse_yes_pope, pope_metrics, relaxed_accuracy,
                     vqa_accuracy)
from train import bounded, unwritable  # the range-checked flag type and the output check of both command lines

# hires, slicing and torch are imported inside the functions that use them: they take seconds to import (torch,
# open_clip), and `--help` or a bad flag answers without them.


class EvalError(Exception):
    """A one-line, user-facing problem (missing file, unfit checkpoint, bad predictions file)."""


# ----------------------------------------------------------------------------------------------------------------
# Benchmarks: official files in, LLaVA-1.5's prompts, submission files out (docs/benchmarks.md#benchmarks).

SHORT = "\nAnswer the question using a single word or phrase."
BENCHES = {}


@dataclass
class Sample:
    record: dict          # official fields the submission repeats; the id fields among them key the question
    prompt: str           # user text; hires puts "<image>\n" in front when there is an image
    image: object = None  # image path, image bytes (MMBench), or None (text-only question)
    gt: dict = None       # what the scorer needs; None when the split's answers are hidden
    qid: str = ""         # the question's key (Bench.qid of record), set by run()
    options: list = None  # multiple choice: the option texts (letters A, B, ... in order); prompt is then the stem

    def text(self, mc="letter"):
        """The user text: the prompt, or for multiple choice the stem with the options lettered (mc="letter",
        LLaVA's prompt) or listed without letters for likelihood ranking (mc="rank")."""
        if self.options is None:
            return self.prompt
        return multiple_choice(self.prompt, self.options, letters=mc != "rank")

    def ranked(self, mc):
        """True when --mc rank scores this question's options by likelihood instead of generating an answer."""
        return self.options is not None and mc == "rank"


@dataclass
class Bench:
    name: str
    load: object          # (data_dir, split) -> list[Sample]
    score: object         # (samples, answers: list[str]) -> metrics dict
    files: str            # the expected layout (errors, --help)
    source: str           # where to get it, and where hidden-answer splits are scored
    id_keys: tuple        # record fields that identify a question
    answer_key: str       # record field the submission holds the model's text in
    split: str
    max_new_tokens: int   # LLaVA-1.5's (or lmms-eval's) generation length for the benchmark
    slicing: dict = None  # checkpoint config fields the benchmark fixes (EntityGrid-QA: its 2 x 2 grid)
    batch_size: int = 1   # questions generated together unless --batch-size says otherwise

    def qid(self, record):
        return "/".join(str(record[k]) for k in self.id_keys)


def register(name, score, files, source, id_keys, answer_key="answer", split="test", max_new_tokens=128,
             slicing=None, batch_size=1):
    """Decorator: adds a loader (data_dir, split) -> list[Sample] to BENCHES under `name`."""
    def add(load):
        BENCHES[name] = Bench(name, load, score, files, source, id_keys, answer_key, split, max_new_tokens,
                              slicing, batch_size)
        return load
    return add


def need(path, bench):
    """`path` if it exists, else a one-line error naming the expected files and where to get them."""
    if not os.path.exists(path):
        raise EvalError(f"{path} not found: {bench} expects {BENCHES[bench].files} "
                        f"(get it from {BENCHES[bench].source})")
    return path


def load_json(path, bench, lines=False):
    """A JSON file, or a JSON-lines file (lines=True); one-line errors when missing or malformed."""
    with open(need(path, bench), encoding="utf-8") as f:
        text = f.read()
    parts = [(i, line) for i, line in enumerate(text.split("\n"), 1) if line.strip()] if lines else [(0, text)]
    out = []
    for i, part in parts:
        try:
            out.append(json.loads(part))
        except json.JSONDecodeError as e:
            raise EvalError(f"{path}{f' line {i}' if lines else ''}: not valid JSON ({e}); truncated? get the "
                            "file again") from None
    return out if lines else out[0]


def scorer(metric, per_question):
    """score function averaging per_question(sample, answer) into {metric: mean}."""
    return lambda samples, answers: {metric: mean(per_question(s, a) for s, a in zip(samples, answers))}


def add_anls_bench(name, file, image_key, folder, id_key, source, split):
    """DocVQA / InfographicVQA / ST-VQA: {"data": [...]} files scored with ANLS (docs/benchmarks.md#docvqa)."""
    @register(name, scorer("anls", lambda s, a: anls(a, s.gt["answers"])), f"DIR/{file} and the images under "
              f"DIR/{folder}", source, (id_key,), split=split, max_new_tokens=32)
    def load(data, split):
        return [Sample({id_key: q[id_key]}, q["question"] + SHORT, os.path.join(data, folder, q[image_key]),
                       {"answers": q["answers"]} if "answers" in q else None)
                for q in load_json(os.path.join(data, file.format(split=split)), name)["data"]]


add_anls_bench("docvqa", "{split}_v1.0.json", "image", "", "questionId", "https://rrc.cvc.uab.es/?ch=17 (Task 1)",
               "val")
add_anls_bench("infovqa", "infographicsVQA_{split}_v1.0.json", "image_local_name",
               "infographicsvqa_images", "questionId", "https://rrc.cvc.uab.es/?ch=17 (Task 3)", "val")
# ST-VQA's annotation field names are not verified (docs/benchmarks.md#stvqa): task-3 files, question_id, file_path.
add_anls_bench("stvqa", "{split}_task_3.json", "file_path", "", "question_id", "https://rrc.cvc.uab.es/?ch=11",
               "test")


@register("textvqa", scorer("accuracy", lambda s, a: vqa_accuracy(a, s.gt["answers"])),
          "DIR/TextVQA_0.5.1_<split>.json, DIR/train_images/<image_id>.jpg, optionally "
          "DIR/TextVQA_Rosetta_OCR_v0.2_<split>.json", "https://textvqa.org/dataset (test: EvalAI)", ("question_id",),
          split="val")
def load_textvqa(data, split):
    """TextVQA_0.5.1_<split>.json with LLaVA's prompt: the Rosetta OCR tokens when the OCR file is there
    (docs/benchmarks.md#textvqa)."""
    ocr_path, ocr = os.path.join(data, f"TextVQA_Rosetta_OCR_v0.2_{split}.json"), None
    if os.path.exists(ocr_path):  # OCR file fields [UNVERIFIED]: {"data": [{"image_id", "ocr_tokens"}]}
        ocr = {o["image_id"]: o["ocr_tokens"] for o in load_json(ocr_path, "textvqa")["data"]}
    else:
        print(f"warning: {ocr_path} not found: prompting without OCR tokens (not comparable with LLaVA-1.5)")
    folder = "test_images" if split == "test" else "train_images"  # val images ship in train_images
    samples = []
    for q in load_json(os.path.join(data, f"TextVQA_0.5.1_{split}.json"), "textvqa")["data"]:
        tokens = "" if ocr is None else "\nReference OCR token: " + ", ".join(ocr.get(q["image_id"], []))
        samples.append(Sample({"question_id": q["question_id"]}, q["question"] + tokens + SHORT,
                              os.path.join(data, folder, q["image_id"] + ".jpg"),
                              {"answers": q["answers"]} if "answers" in q else None))
    return samples


def score_chartqa(samples, answers):
    ok = [(s.gt["part"], relaxed_accuracy(a, s.gt["label"])) for s, a in zip(samples, answers)]
    return {"relaxed_overall": mean(x for _, x in ok), "relaxed_human_split": mean(x for p, x in ok if p == "human"),
            "relaxed_augmented_split": mean(x for p, x in ok if p == "augmented")}


@register("chartqa", score_chartqa, "DIR/<split>_human.json, DIR/<split>_augmented.json and DIR/png/ (the "
          "'ChartQA Dataset/test' folder)", "https://github.com/vis-nlp/ChartQA", ("id",), max_new_tokens=16)
def load_chartqa(data, split):
    """ChartQA <split>_human.json + <split>_augmented.json + png/, lmms-eval's prompt (docs/benchmarks.md#chartqa)."""
    return [Sample({"id": f"{part}-{i}", "imgname": q["imgname"], "query": q["query"]},
                   q["query"] + "\nAnswer the question with a single word.", os.path.join(data, "png", q["imgname"]),
                   {"label": q["label"], "part": part})
            for part in ("human", "augmented")
            for i, q in enumerate(load_json(os.path.join(data, f"{split}_{part}.json"), "chartqa"))]


@register("ai2d", scorer("accuracy", lambda s, a: parse_letter_ai2d(a) == s.gt["answer"]),
          "DIR/questions/*.json, DIR/images/ and DIR/ai2d_test_ids.csv (split 'all' needs no id list)",
          "https://allenai.org/data/diagrams (ai2d-all.zip) + ai2d_test_ids.csv", ("questionId",), max_new_tokens=16)
def load_ai2d(data, split):
    """Original AI2D release (docs/benchmarks.md#ai2d; layout not verified); split test keeps ai2d_test_ids.csv,
    all keeps all."""
    keep = None
    if split == "test":
        with open(need(os.path.join(data, "ai2d_test_ids.csv"), "ai2d")) as f:
            keep = {line.strip().split(",")[0] for line in f if line.strip()}
    samples = []
    for path in sorted(glob.glob(os.path.join(need(os.path.join(data, "questions"), "ai2d"), "*.json"))):
        entry = load_json(path, "ai2d")
        if keep is None or entry["imageName"].rsplit(".", 1)[0] in keep:
            image = os.path.join(data, "images", entry["imageName"])
            samples += [Sample({"questionId": q["questionId"]}, text, image, {"answer": chr(65 + q["correctAnswer"])},
                               options=list(q["answerTexts"])) for text, q in entry["questions"].items()]
    return samples


def score_scienceqa(samples, answers):
    ok = [parse_letter_scienceqa(a, s.gt["n_choices"]) == s.gt["answer"] for s, a in zip(samples, answers)]
    return {"accuracy": mean(ok), "img_accuracy": mean(o for o, s in zip(ok, samples) if s.image is not None),
            "n_img": sum(s.image is not None for s in samples)}


@register("scienceqa", score_scienceqa, "DIR/problems.json, DIR/pid_splits.json and DIR/images/<split>/<pid>/"
          "image.png", "https://github.com/lupantech/ScienceQA (data/scienceqa)", ("question_id",), "text",
          max_new_tokens=1024)
def load_scienceqa(data, split):
    """ScienceQA problems.json + pid_splits.json + images/, LLaVA's prompt and answer-file format
    (docs/benchmarks.md#scienceqa)."""
    problems, samples = load_json(os.path.join(data, "problems.json"), "scienceqa"), []
    for pid in load_json(os.path.join(data, "pid_splits.json"), "scienceqa")[split]:
        p = problems[pid]
        samples.append(Sample({"question_id": pid}, (f"Context: {p['hint']}\n" if p.get("hint") else "") +
                              p["question"],
                              os.path.join(data, "images", split, pid, p["image"]) if p.get("image") else None,
                              {"answer": chr(65 + p["answer"]), "n_choices": len(p["choices"])},
                              options=list(p["choices"])))
    return samples


MMBENCH_COLUMNS = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category")  # LLaVA's


def score_mmbench(samples, answers):
    index = [int(s.record["index"]) for s in samples]
    ok = {i: parse_letter_mmbench(a, s.gt["choices"]) == s.gt["answer"] for i, s, a in zip(index, samples, answers)}
    groups = circular_accuracy(ok.items())
    main = [(i, s.record["category"]) for i, s in zip(index, samples) if i < 1_000_000]  # copies: + k * 10**6
    return {"circular_accuracy": mean(groups[i] for i, _ in main), "n_questions": len(main),
            "single_pass_accuracy": mean(ok[i] for i, _ in main),
            "per_category": {c: mean(groups[i] for i, k in main if k == c) for c in sorted({k for _, k in main})}}


@register("mmbench", score_mmbench, "DIR/<the one MMBench *.tsv whose name contains the split, e.g. "
          "mmbench_dev_20230712.tsv>", "https://github.com/open-compass/MMBench (test: the OpenCompass server, "
          "as .xlsx)", ("index",), "prediction", "dev", max_new_tokens=1024)
def load_mmbench(data, split):
    """The MMBench TSV whose name contains the split, read with csv, base64 images, LLaVA's prompt
    (docs/benchmarks.md#mmbench)."""
    tsvs = [p for p in glob.glob(os.path.join(data, "*.tsv")) if split.lower() in os.path.basename(p).lower()]
    if len(tsvs) != 1:
        raise EvalError(f"{data}: {len(tsvs)} *.tsv files with '{split}' in the name, need exactly one: mmbench "
                        f"expects {BENCHES['mmbench'].files} (get it from {BENCHES['mmbench'].source})")
    csv.field_size_limit(2**31 - 1)  # base64 image cells are far above csv's 128 KiB default
    present = lambda v: v is not None and v.strip().lower() not in ("", "nan", "none")
    samples = []
    with open(tsvs[0], newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            choices = {}
            for letter in "ABCD":  # as LLaVA: A-D up to the first empty option
                if not present(row.get(letter)):
                    break
                choices[letter] = row[letter]
            try:
                image = base64.b64decode(row["image"])  # bytes: open_image goes through a temporary file
            except ValueError:
                image = b""  # a bad image (slicing.ImageError) once it is opened
            hint = row["hint"] + "\n" if present(row.get("hint")) else ""
            gt = {"choices": choices, "answer": row["answer"]} if present(row.get("answer")) else None
            samples.append(Sample({k: row.get(k) for k in MMBENCH_COLUMNS}, hint + row["question"], image, gt,
                                  options=list(choices.values())))
    return samples


POPE_CATEGORIES = ("adversarial", "popular", "random")


def score_pope(samples, answers):
    out = {}
    for cat in POPE_CATEGORIES:
        sub = [(s, a) for s, a in zip(samples, answers) if s.record["category"] == cat]
        if sub:
            out[cat] = pope_metrics([parse_yes_pope(a) for _, a in sub], [s.gt["label"] == "yes" for s, _ in sub])
    out["mean_over_categories"] = {k: mean(m[k] for m in out.values()) for k in ("accuracy", "f1", "yes_ratio")}
    return out


@register("pope", score_pope, "DIR/coco_pope_{adversarial,popular,random}.json and the COCO val2014 images in "
          "DIR/val2014/", "https://github.com/AoiDragon/POPE (output/coco) + https://cocodataset.org (val2014)",
          ("category", "question_id"), "text", "all")
def load_pope(data, split):
    """POPE coco_pope_<category>.json, JSON lines despite the name; "all": each category present
    (docs/benchmarks.md#pope)."""
    cats = [c for c in POPE_CATEGORIES if os.path.exists(os.path.join(data, f"coco_pope_{c}.json"))]
    return [Sample({"question_id": q["question_id"], "category": cat}, q["text"] + SHORT,
                   os.path.join(data, "val2014", q["image"]), {"label": q["label"]})
            for cat in ((cats or POPE_CATEGORIES[:1]) if split == "all" else (split,))
            for q in load_json(os.path.join(data, f"coco_pope_{cat}.json"), "pope", lines=True)]


def score_hallusion(samples, answers):
    """aAcc/fAcc/qAcc with the offline judge standing in for GPT-4 (docs/benchmarks.md#hallusionbench-scores)."""
    correct = []
    for s, a in zip(samples, answers):
        q, said = s.record, parse_yes_no(a)
        # "unknown" plays the judge's "unclear", which the official rule counts correct for VS figure 0 only
        unclear_ok = said == "unknown" and q["category"] == "VS" and str(q["figure_id"]) == "0"
        correct.append(said == ("yes" if str(q["gt_answer"]) == "1" else "no") or unclear_ok)
    return {**hallusion_metrics([s.record for s in samples], correct),
            "judge": "offline yes/no extraction (VLMEvalKit YOrN_Extraction), not the official GPT-4 judge"}


@register("hallusionbench", score_hallusion, "DIR/HallusionBench.json and the images of hallusion_bench.zip "
          "unpacked in DIR", "https://github.com/tianyi-lab/HallusionBench",
          ("category", "subcategory", "set_id", "figure_id", "question_id"), "model_prediction", "all")
def load_hallusion(data, split):
    """HallusionBench.json: filename relative to DIR (null: no image); submission adds model_prediction
    (docs/benchmarks.md#hallusionbench)."""
    return [Sample(q, q["question"], os.path.normpath(os.path.join(data, q["filename"])) if q.get("filename") else None,
                   {}) for q in load_json(os.path.join(data, "HallusionBench.json"), "hallusionbench")]


@register("llava-w", lambda samples, answers: {"score": None, "note": "LLaVA-Bench is scored only by a GPT-4 judge: "
          "run LLaVA's llava/eval/eval_gpt_review_bench.py --answer-list answers_gpt4.jsonl OUT/answers.jsonl, "
          "then summarize_gpt_review.py"}, "DIR/questions.jsonl and DIR/images/",
          "https://huggingface.co/datasets/liuhaotian/llava-bench-in-the-wild", ("question_id",), "text", "all", 1024)
def load_llava_w(data, split):
    """LLaVA-Bench questions.jsonl + images/ (LLaVA model_vqa.py); records in LLaVA's answer-file format."""
    return [Sample({"question_id": q["question_id"], "prompt": q["text"], "answer_id": f"hires-{q['question_id']}",
                    "model_id": "hires-llava", "metadata": {}}, q["text"], os.path.join(data, "images", q["image"]),
                   {}) for q in load_json(os.path.join(data, "questions.jsonl"), "llava-w", lines=True)]


def score_entitygrid(samples, answers):
    return entitygrid.score([s.gt for s in samples], {s.gt["id"]: a for s, a in zip(samples, answers)})


# the 2S x 2S canvas is built for exactly 2 x 2 slices (entitygrid.py): with upscale (the paper preset) it would be
# 4 x 4, and the slice borders would cut the edge cells too, so every checkpoint is evaluated without upscaling
@register("entitygrid", score_entitygrid, "DIR/questions.jsonl and its images (written by `python entitygrid.py`)",
          "`python entitygrid.py --help`", ("id",), split="all", max_new_tokens=16,
          slicing=dict(upscale=False, max_slices=4), batch_size=64)  # 64: train.py's --eval-batch, as fast
def load_entitygrid(data, split):
    """EntityGrid-QA (docs/method.md#entitygrid-qa): questions.jsonl as entitygrid.py writes it, scored by
    entitygrid.score."""
    questions = load_json(os.path.join(data, "questions.jsonl"), "entitygrid", lines=True)
    return [Sample({"id": q["id"]}, q["question"], os.path.join(data, q["image"]), q, options=q["options"])
            for q in questions]

# ----------------------------------------------------------------------------------------------------------------
# Running the model: batched greedy generation, every answer appended to a JSON-lines file as it is produced.


def write_json(path, obj):
    """Atomic write: a killed run never leaves a half-written predictions.json or metrics.json."""
    import checkpoints
    checkpoints.atomic_write(path, json.dumps(obj, indent=1, ensure_ascii=False))


def read_partial(path):
    """(run key, {qid: record}) from predictions.partial.jsonl; a torn last line (killed mid-write) is cut off."""
    with open(path, "rb") as f:
        data = f.read()
    records, good = [], 0
    for line in data.split(b"\n")[:-1]:  # what follows the last newline is incomplete by construction
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
        good += len(line) + 1
    if good != len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    if not records or not isinstance(records[0], dict) or "key" not in records[0]:
        raise EvalError(f"{path}: no run key on its first line, so its answers cannot be matched to this run; "
                        "delete it to start over")
    return records[0]["key"], {r["qid"]: r for r in records[1:]}


def load_model(ckpt, device="cpu", dtype="fp32", **overrides):
    """checkpoints.load_checkpoint in eval mode, backbones in dtype (a hires.DTYPES name) and the trained adapters
    in fp32 as training keeps them (overrides: config fields), with one-line errors for a missing or non-fitting
    checkpoint."""
    import checkpoints
    import cpu_decode
    import hires
    import torch
    cfg = {**checkpoint_config(ckpt), **overrides}
    for key, flag in (("clip_weights", "--clip"), ("llm_path", "--llm"), ("tokenizer_path", "--tokenizer")):
        if cfg.get(key) and not os.path.exists(cfg[key]):
            raise EvalError(f"{cfg[key]}: the {key} of {ckpt} is not there; moved? point to it with {flag}")
    try:
        model = checkpoints.load_checkpoint(ckpt, device=device, dtype=hires.DTYPES[dtype],
                                            adapter_dtype=torch.float32, **overrides).eval()
    except FileNotFoundError as e:
        raise EvalError(str(e)) from None
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise EvalError(f"{ckpt}: checkpoint does not fit the model: {str(e).splitlines()[0]}") from None
    cpu_decode.fuse(model.llm)  # on CPU: faster decoding, in the layout train.py evaluates in
    return model


def check_tiler(args, trained):
    """--tiler must be the checkpoint's: its weights (a newline embedding, a 2 x 2 merge) belong to its tiler."""
    own = trained.get("tiler", "hires")
    if args.tiler and args.tiler != own:
        raise EvalError(f"--tiler {args.tiler}: {args.ckpt} was trained with the {own} tiler and keeps it; drop "
                        f"--tiler or evaluate a checkpoint trained with --tiler {args.tiler}")


def checkpoint_config(ckpt):
    """checkpoints.read_config: the checkpoint's config.json, backbone paths resolved; one-line errors."""
    import checkpoints
    try:
        return checkpoints.read_config(ckpt)
    except (OSError, ValueError) as e:
        raise EvalError(str(e)) from None


def open_image(sample, tmp):
    """The sample's PIL image via slicing.load_image (image bytes go through a temporary file); None: no image."""
    import slicing
    if not isinstance(sample.image, bytes):
        return None if sample.image is None else slicing.load_image(sample.image)
    path = os.path.join(tmp, sample.qid)  # one file per question: images of a batch stay apart
    with open(path, "wb") as f:
        f.write(sample.image)
    return slicing.load_image(path)


def preprocess(model, bench, sample, img):
    """The image through the model's slicing -> preprocess tuple; a benchmark with fixed slicing gets exactly it."""
    pre = model.preprocess(img)
    if bench.name == "entitygrid" and model.cfg.tiler == "hires" and tuple(pre[2]) != (2, 2):
        raise EvalError(f"{sample.image}: {img.width}x{img.height} slices {pre[2][0]}x{pre[2][1]}, not 2x2, at this "
                        f"model's base resolution; generate EntityGrid-QA with --base set to the ViT's image size")
    return pre


def generate_all(bench, samples, args, partial, key):
    """Answers parallel to samples, each one's failure kind (None: answered), the counts of bad images and
    over-long prompts, and the slice grids used. --resume continues a partial file only if its first line holds
    the same run key (run_key)."""
    import checkpoints
    import hires
    import slicing
    import torch

    def failed(s, error, kind):  # documented choice: an empty prediction, a warning, a count under `kind`
        tqdm.write(f"warning: {error}: empty prediction for question {s.qid}")
        return {"qid": s.qid, "text": "", "error": str(error), "kind": kind}
    if os.path.exists(partial) and not args.resume:
        raise EvalError(f"{partial} exists from an earlier run: pass --resume to continue it, or delete it")
    done = {}
    if os.path.exists(partial):
        theirs, done = read_partial(partial)
        differ = "; ".join(f"{k} {theirs.get(k)} there, {key[k]} here" for k in key if theirs.get(k) != key[k])
        if differ:
            raise EvalError(f"{partial}: answers of another run ({differ}); pass another --out, or delete it to "
                            "start over")
    else:
        with open(partial, "w", encoding="utf-8") as f:
            f.write(json.dumps({"key": key}) + "\n")
    torch.manual_seed(args.seed)
    todo = [s for s in samples if s.qid not in done]
    if todo:
        dtype = key["dtype"]  # run_key resolved --dtype for this device
        model = load_model(args.ckpt, args.device, dtype, **(bench.slicing or {}),
                           **checkpoints.backbone_paths(args.clip, args.llm, args.tokenizer))
        amp = hires.autocast(args.device, hires.DTYPES[dtype])
        with open(partial, "a", encoding="utf-8") as f, tempfile.TemporaryDirectory() as tmp, \
                tqdm(total=len(samples), initial=len(samples) - len(todo), desc=bench.name, unit="q") as bar:
            for i in range(0, len(todo), args.batch_size):
                batch, fit = todo[i:i + args.batch_size], []
                for s in batch:
                    try:
                        img = open_image(s, tmp)
                        pre = img if img is None else preprocess(model, bench, s, img)
                        ranked = s.ranked(key["mc"])
                        model.check_length(pre, s.text(key["mc"]), s.options if ranked else None)
                        fit.append((s, pre))
                    except slicing.ImageError as e:
                        done[s.qid] = failed(s, e, "bad_images")
                    except hires.PromptTooLong as e:
                        done[s.qid] = failed(s, e, "too_long")
                with torch.inference_mode(), amp:
                    texts = answer_batch(model, fit, args, bench, key["mc"]) if fit else []
                for (s, pre), text in zip(fit, texts):  # hires.generate returns the answers stripped
                    done[s.qid] = {"qid": s.qid, "text": text, **({"grid": list(pre[2])} if pre is not None else {})}
                f.writelines(json.dumps(done[s.qid], ensure_ascii=False) + "\n" for s in batch)
                f.flush()
                os.fsync(f.fileno())  # an answer on disk is never generated again
                bar.update(len(batch))
    kinds = [done[s.qid].get("kind") for s in samples]
    grids = sorted("x".join(map(str, done[s.qid]["grid"])) for s in samples if "grid" in done[s.qid])
    return [done[s.qid]["text"] for s in samples], kinds, {k: kinds.count(k) for k in ("bad_images", "too_long")}, \
        {g: grids.count(g) for g in dict.fromkeys(grids)}


def run_key(args, bench, split, mc, max_new_tokens):
    """What the answers depend on, stored as the first line of the partial file: the checkpoint by content (sha256
    of its tensors and its config without the backbone paths, so a moved run is the same checkpoint), benchmark,
    split, multiple-choice mode and generation settings (greedy). The batch size is left out: fp32 answers do not
    depend on it, and a run that ran out of memory resumes with a smaller one."""
    import checkpoints
    import hires
    h, weights = hashlib.sha256(), os.path.join(args.ckpt, "model.safetensors")
    if not os.path.isfile(weights):
        raise EvalError(f"{args.ckpt}: not a checkpoint folder (no model.safetensors; train.py writes checkpoints)")
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    cfg = {k: v for k, v in checkpoint_config(args.ckpt).items() if k not in checkpoints.BACKBONE_PATHS}
    h.update(json.dumps(cfg, sort_keys=True).encode())
    return dict(checkpoint=h.hexdigest()[:16], bench=bench.name, split=split, mc=mc, max_new_tokens=max_new_tokens,
                temperature=0.0, dtype=hires.resolve_dtype(args.dtype, args.device))


def provenance(args, bench, samples, grids, key):
    """What produced the answers, stored next to the score: checkpoint, backbones, prompt, decoding, code, date."""
    import checkpoints
    cfg = checkpoint_config(args.ckpt)
    cfg.update(bench.slicing or {}, **checkpoints.backbone_paths(args.clip, args.llm, args.tokenizer))
    return {"checkpoint": os.path.abspath(args.ckpt), **{k: cfg.get(k) for k in ("clip_preset", "clip_weights",
            "llm_path", "tokenizer_path")}, "checkpoint_sha256": key["checkpoint"], "prompt_template": "vicuna_v1",
            "trained_template": cfg.get("template"), "example_prompt": samples[0].prompt,
            "max_new_tokens": key["max_new_tokens"], "temperature": 0.0,
            "batch_size": args.batch_size, "dtype": key["dtype"], "device": args.device,
            "seed": args.seed, "git_commit": checkpoints.git_commit(),
            "slicing": {"tiler": cfg.get("tiler", "hires"), "max_slices": cfg.get("max_slices"),
                        "upscale": cfg.get("upscale"), "grids": grids},
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def answer_batch(model, batch, args, bench, mc):
    """Greedy answers to [(sample, image)] whose prompts fit the context; with --mc rank, multiple-choice samples
    get the letter of the option the model finds most likely (the option texts after the letter-free prompt; the
    scorer parses that letter)."""
    rank = [s.ranked(mc) for s, _ in batch]
    free = [(s, img) for (s, img), r in zip(batch, rank) if not r]
    texts = iter(model.generate([img for _, img in free], [s.text() for s, _ in free], temperature=0.0,
                                max_new_tokens=args.max_new_tokens or bench.max_new_tokens) if free else [])
    ranked = [(s, img) for (s, img), r in zip(batch, rank) if r]
    scores = iter(model.option_logprobs([img for _, img in ranked], [s.text("rank") for s, _ in ranked],
                                        [s.options for s, _ in ranked]) if ranked else [])
    best = lambda lp: chr(65 + max(range(len(lp)), key=lp.__getitem__))  # the letter of the likeliest option
    return [best(next(scores)) if r else next(texts) for r in rank]


def read_predictions(path, bench, samples):
    """Answers parallel to samples from a predictions.json in the benchmark's submission format."""
    try:
        with open(path, encoding="utf-8") as f:
            preds = {bench.qid(e): str(e[bench.answer_key]) for e in json.load(f)}
    except FileNotFoundError:
        raise EvalError(f"{path}: predictions file not found") from None
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise EvalError(f"{path}: not a {bench.name} predictions file ({type(e).__name__}: {e})") from None
    missing = [s.qid for s in samples if s.qid not in preds]
    if missing:
        raise EvalError(f"{path}: no prediction for {len(missing)} of {len(samples)} questions (first: {missing[0]});"
                        " use the same --split/--limit as the run that wrote it")
    return [preds[s.qid] for s in samples]

# ----------------------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(usage=argparse.SUPPRESS,  # an error is one line, not a usage block above it
        description="Evaluate a HiRes-LLaVA checkpoint on a benchmark's official files, or score a predictions "
                    "file. Writes OUT/predictions.json (the benchmark's submission format) and OUT/metrics.json. "
                    "With --image: ask the checkpoint about one image (--ask, or questions read from stdin). With "
                    "--merge: write its deployment form.",
        epilog="benchmarks: default --split, default --max-new-tokens, expected files in --data DIR:\n" +
               "\n".join(f"  {n:15s} {b.split:5s} {b.max_new_tokens:5d}  {b.files}" for n, b in BENCHES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--bench", choices=list(BENCHES), help="benchmark to run")
    a("--data", help="folder holding the benchmark's released files (see below)")
    a("--image", help="ask about this image instead of running a benchmark")
    a("--ask", help="with --image: the question (without it, one question per line from stdin)")
    a("--temperature", type=bounded(float, 0), default=0.0, help="with --image: 0 is greedy, else sampled with "
      "--top-p (>= 0)")
    a("--top-p", type=float, default=1.0, help="with --image: nucleus sampling mass, in (0, 1]")
    a("--ckpt", help="checkpoint folder written by train.py (config.json + model.safetensors)")
    a("--out", help="output folder (default: runs/eval/<bench>)")
    a("--clip", help="CLIP weights file, if moved since training (default: the checkpoint's)")
    a("--llm", help="LLM directory, if moved since training (default: the checkpoint's)")
    a("--tokenizer", help="sentencepiece model (default: LLM/tokenizer.model with --llm, else the checkpoint's)")
    a("--split", help="split to read (default: the benchmark's, listed below)")
    a("--device", default="cpu", help="torch device: cpu, cuda or cuda:N")
    a("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto", help="backbone weights and autocast "
      "(adapters stay fp32, as in training; hires.resolve_dtype); auto: bf16 on a GPU that has it, else fp16; fp32 on "
      "the CPU")
    a("--batch-size", type=bounded(int, 1), help="questions generated together (default 1, as LLaVA's model_vqa; "
      "entitygrid 64, as train.py's evaluation); greedy answers are the same at any batch size in fp32, not always in "
      "bf16: see the README")
    a("--limit", type=bounded(int, 1), help="evaluate only the first N questions (quick checks)")
    a("--seed", type=int, default=0, help="torch seed set before generation (recorded in metrics.json)")
    a("--resume", action="store_true", help="continue an interrupted run from OUT/predictions.partial.jsonl "
      "(without it, an existing partial file is an error)")
    a("--max-new-tokens", type=bounded(int, 1), help="generation length cap, >= 1 (default: LLaVA-1.5's for the "
      "benchmark, below; with --image 512)")
    a("--mc", choices=("letter", "rank"), help="multiple-choice benchmarks (ai2d, scienceqa, mmbench, entitygrid): "
      "generate the option letter after LLaVA's prompt (letter), or rank the option texts by likelihood after a "
      "letter-free prompt and answer the best one's letter (rank; the tiny preset). Default: the mode the "
      "checkpoint was trained for (its config.json 'mc'; metrics.json says which was used)")
    a("--tiler", choices=("hires", "anyres", "overlap", "native"), help="how images are cut: the tiler the "
      "checkpoint was trained with, recorded in its config.json (the default); another is refused")
    a("--predictions", help="score this existing predictions.json instead of running a model")
    a("--merge", metavar="DIR", help="write the --ckpt checkpoint's deployment form into DIR, as LLaVA's "
      "merge_lora_weights.py: DIR/llm (HF LLaMA directory, LoRA folded in) and DIR/config.json + "
      "DIR/model.safetensors (the adapters), a checkpoint eval.py loads as it is")
    args = p.parse_args(argv)
    if not 0 < args.top_p <= 1:
        p.error(f"--top-p {args.top_p}: must be in (0, 1]")
    if not args.ckpt and not args.predictions:
        p.error("--ckpt is required unless --predictions is given")
    if args.merge and os.path.abspath(args.merge) == os.path.abspath(args.ckpt or ""):
        p.error(f"--merge {args.merge}: the checkpoint itself; merge into another folder")
    if not args.image and not args.merge and not (args.bench and args.data):
        p.error("--bench and --data are required (or --image FILE to ask about one image, --merge DIR to merge)")
    if args.image and not args.ckpt:
        p.error("--image needs --ckpt")
    for flag, path in (("--ckpt", args.ckpt), ("--image", args.image)):
        if path and not os.path.exists(path):
            p.error(f"{flag} {path}: no such file or directory")
    if args.ckpt and not os.path.isdir(args.ckpt):
        p.error(f"--ckpt {args.ckpt}: a file, not a checkpoint folder; pass the folder that holds it "
                f"({os.path.dirname(args.ckpt) or '.'})")
    if args.predictions and os.path.isdir(args.predictions):
        p.error(f"--predictions {args.predictions}: a folder; pass the predictions file, e.g. "
                f"{os.path.join(args.predictions, 'predictions.json')}")
    if args.merge and any(os.path.isfile(os.path.join(args.merge, f)) for f in ("config.json", "model.safetensors")):
        p.error(f"--merge {args.merge}: holds a checkpoint already, which merging would overwrite; merge into a new "
                "folder")
    if not args.image and not args.merge:  # a benchmark run writes OUT
        args.out = args.out or os.path.join("runs", "eval", args.bench)
    for flag, path in (("--out", args.out if not args.image and not args.merge else None), ("--merge", args.merge)):
        problem = path and unwritable(flag, path)
        if problem:
            p.error(problem)
    if args.device.startswith("cuda"):
        import torch  # here, not at the top: --help and the checks above answer without torch's 2-5 s import
        if not torch.cuda.is_available():
            p.error(f"--device {args.device}: this machine has no CUDA device (torch.cuda.is_available() is "
                    "False); use --device cpu")
    return args


def ask(args):
    """Answer questions about one image (LLaVA's CLI): prints the slice grid, the token count and each answer."""
    import checkpoints
    import hires
    import slicing
    import torch
    try:
        img = slicing.load_image(args.image)  # before the model: a bad image costs no model load
    except slicing.ImageError as e:
        raise EvalError(str(e)) from None
    dtype = hires.resolve_dtype(args.dtype, args.device)
    check_tiler(args, checkpoint_config(args.ckpt))
    model = load_model(args.ckpt, args.device, dtype,
                       **checkpoints.backbone_paths(args.clip, args.llm, args.tokenizer))
    if model.cfg.template == "plain":
        print(checkpoints.STAGE1_WARNING.format(args.ckpt), file=sys.stderr)
    pre = model.preprocess(img)
    image_tokens, (m, n) = model.image_tokens(pre[2]), pre[2][:2]
    cut = f"{m}x{n} merged tokens" if model.cfg.tiler == "native" else f"overview + {m}x{n} slices"
    print(f"{args.image}: {model.cfg.tiler} tiler, {cut}, {image_tokens} image tokens")
    questions = [args.ask] if args.ask is not None else (line.strip() for line in iter(input_line, None))
    amp = hires.autocast(args.device, hires.DTYPES[dtype])
    torch.manual_seed(args.seed)
    answers = []
    for q in questions:
        prompt = q if "<image>" in q else "<image>\n" + q
        n_tokens = len(encode_prompt(prompt, model.tokenizer)) - 1 + image_tokens
        try:
            with torch.inference_mode(), amp:
                text = model.generate([pre], [q], max_new_tokens=args.max_new_tokens or 512,
                                      temperature=args.temperature, top_p=args.top_p)[0]
        except hires.PromptTooLong as e:
            raise EvalError(str(e)) from None
        print(f"[{n_tokens} prompt tokens] {text}")
        answers.append(text)
    return {"image": args.image, "grid": [m, n], "image_tokens": image_tokens, "answers": answers}


def merge(args):
    """--merge: checkpoints.merge_checkpoint of --ckpt into the --merge folder; one-line errors."""
    import checkpoints
    try:
        cfg = checkpoints.merge_checkpoint(args.ckpt, args.merge)
    except (OSError, ValueError) as e:  # a missing or unfit checkpoint, a backbone not there, a full disk
        raise EvalError(str(e).splitlines()[0]) from None
    print(f"wrote {cfg.llm_path} (HF LLaMA, LoRA merged) and {args.merge}/model.safetensors (adapters)")
    return cfg


def input_line():
    """A question typed at the prompt; None at the end of input or on an empty line."""
    try:
        return input("USER: ").strip() or None
    except EOFError:
        return None


def run(args):
    bench = BENCHES[args.bench]
    args.batch_size = args.batch_size or bench.batch_size
    split, out = args.split or bench.split, args.out  # parse_args: default runs/eval/<bench>
    try:
        samples = bench.load(need(args.data, args.bench), split)[:args.limit]
    except KeyError as e:
        raise EvalError(f"{args.data}: {args.bench} files lack the field or split {e} ({bench.files})") from None
    if not samples:
        raise EvalError(f"{args.data}: no {args.bench} questions for split '{split}'")
    for s in samples:
        s.qid = bench.qid(s.record)
    os.makedirs(out, exist_ok=True)
    partial = os.path.join(out, "predictions.partial.jsonl")
    if args.predictions:
        answers, kinds, run_info = read_predictions(args.predictions, bench, samples), [None] * len(samples), {}
        errors, mc = {"bad_images": 0, "too_long": 0}, {"mc": args.mc} if args.mc else {}
    else:
        import checkpoints
        trained = checkpoint_config(args.ckpt)
        check_tiler(args, trained)
        if trained.get("template") == "plain":
            print(checkpoints.STAGE1_WARNING.format(args.ckpt), file=sys.stderr)
        # the answer mode the checkpoint was trained for, unless --mc says otherwise
        mc = {"mc": args.mc or trained.get("mc", "letter"), "mc_from": "--mc" if args.mc else "checkpoint"}
        key = run_key(args, bench, split, mc["mc"], args.max_new_tokens or bench.max_new_tokens)
        answers, kinds, errors, grids = generate_all(bench, samples, args, partial, key)
        run_info = {"provenance": provenance(args, bench, samples, grids, key)}
        submission = [{**s.record, bench.answer_key: a} for s, a in zip(samples, answers)]
        write_json(os.path.join(out, "predictions.json"), submission)
        if args.bench == "llava-w":  # LLaVA's judge reads JSON lines
            with open(os.path.join(out, "answers.jsonl"), "w", encoding="utf-8") as f:
                f.writelines(json.dumps(e, ensure_ascii=False) + "\n" for e in submission)
    # a question without an answer (bad image, prompt too long) is counted above, never scored as an answer
    scored = [(s, a) for s, a, k in zip(samples, answers, kinds) if k is None]
    if any(s.gt is None for s in samples):
        scores = {"score": None, "note": f"answers are hidden for this split: submit predictions.json ({bench.source})"}
    elif not scored:
        scores = {"score": None, "note": "no question was answered (see bad_images, too_long)"}
    else:
        scores = bench.score(*map(list, zip(*scored)))
    metrics = {"bench": args.bench, "split": split, "n": len(samples), "n_scored": len(scored), **mc, **scores,
               **errors, **run_info}
    write_json(os.path.join(out, "metrics.json"), metrics)
    if os.path.exists(partial) and not args.predictions:
        os.remove(partial)  # every answer is in predictions.json: a finished run leaves no partial file
    return metrics


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.image:
            return ask(args)
        if args.merge:
            return merge(args)
        metrics = run(args)
    except EvalError as e:
        raise SystemExit(f"eval.py: error: {e}") from None
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
