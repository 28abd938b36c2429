"""eval.py end to end: every benchmark in its official file layout (docs/benchmarks.md#benchmarks, built here with tiny
PNGs), scored from known predictions (--predictions) and run with the tiny model; resume; one-line errors."""
import base64
import csv
import io
import json
import os
import shutil
import sys

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import conversation  # noqa: E402
import eval as ev  # noqa: E402
from test_metrics import HB_EXPECTED, HB_ITEMS, HB_PREDS  # noqa: E402


def png(path, color=(200, 30, 30), size=(40, 28)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)


def dump(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


# Each builder writes the official layout under d and returns (known predictions in the submission format, the
# metrics they must give). Expected numbers are worked out by hand in the comments.

def make_docvqa(d):
    item = dict(docId=1, ucsf_document_id="x", ucsf_document_page_no="1", data_split="val")
    dump(f"{d}/val_v1.0.json", {"dataset_name": "docvqa", "dataset_version": "1.0", "dataset_split": "val", "data": [
        {**item, "questionId": 7, "question": "Title?", "image": "documents/a.png", "answers": ["Hello World", "HW"]},
        {**item, "questionId": 9, "question": "Code?", "image": "documents/b.png", "answers": ["abcd"]}]})
    png(f"{d}/documents/a.png"), png(f"{d}/documents/b.png", (0, 0, 255))
    # "hello  world": 1.0 (whitespace collapsed); "abxy" vs "abcd": 1 - 2/4 = 0.5 (kept) -> 0.75
    return [{"questionId": 7, "answer": "hello  world"}, {"questionId": 9, "answer": "abxy"}], {"anls": 0.75}


def make_infovqa(d):
    dump(f"{d}/infographicsVQA_val_v1.0.json", {"dataset_name": "infographicsvqa", "data": [
        {"questionId": 1, "question": "Q1?", "image_local_name": "1.jpeg", "ocr_output_file": "1.json",
         "answers": ["ac"]},
        {"questionId": 2, "question": "Q2?", "image_local_name": "2.jpeg", "ocr_output_file": "2.json",
         "answers": ["yes", "y"]}]})
    for i in (1, 2):
        png(f"{d}/infographicsvqa_images/{i}.jpeg", (i * 50, 0, 0), (30, 50))
    return [{"questionId": 1, "answer": "ab"}, {"questionId": 2, "answer": "no"}], {"anls": 0.25}  # (0.5 + 0) / 2


def make_stvqa(d):  # the test split: answers hidden, so there is nothing to score
    dump(f"{d}/test_task_3.json", {"dataset_name": "ST-VQA", "data": [
        {"question_id": 3, "question": "Brand?", "file_path": "coco-text/c1.png", "dataset": "coco-text"},
        {"question_id": 4, "question": "Word?", "file_path": "coco-text/c2.png", "dataset": "coco-text"}]})
    png(f"{d}/coco-text/c1.png"), png(f"{d}/coco-text/c2.png")
    return [{"question_id": 3, "answer": "a"}, {"question_id": 4, "answer": "b"}], {"score": None, "n": 2}


def make_textvqa(d):
    rows = [{"question": "How many?", "question_id": 10, "image_id": "ab12", "answers": ["2"] * 3 + ["3"] * 7},
            {"question": "Is it red?", "question_id": 11, "image_id": "cd34", "answers": ["yes"] * 10}]
    dump(f"{d}/TextVQA_0.5.1_val.json", {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1",
                                         "data": [{**r, "question_tokens": [], "set_name": "val"} for r in rows]})
    dump(f"{d}/TextVQA_Rosetta_OCR_v0.2_val.json", {"data": [{"image_id": "ab12", "ocr_tokens": ["STOP", "2"]}]})
    for r in rows:
        png(f"{d}/train_images/{r['image_id']}.jpg", (9, 9, 9), (32, 32))
    # "Two" -> "2" matches 3 humans: 0.9; "no" matches none: 0 -> 0.45
    return [{"question_id": 10, "answer": "Two"}, {"question_id": 11, "answer": "no"}], {"accuracy": 0.45}


def make_chartqa(d):
    dump(f"{d}/test_human.json", [{"imgname": "h1.png", "query": "Share?", "label": "0.5"}])
    dump(f"{d}/test_augmented.json", [{"imgname": "a1.png", "query": "Min?", "label": "0"},
                                      {"imgname": "a2.png", "query": "Who?", "label": "Inspired"}])
    for n in ("h1", "a1", "a2"):
        png(f"{d}/png/{n}.png")
    preds = [{"id": "human-0", "answer": "50%"}, {"id": "augmented-0", "answer": "0.0"},
             {"id": "augmented-1", "answer": " inspired"}]  # 1 ("50%" = 0.5); 0 (target "0": strings); 1 (stripped)
    return preds, {"relaxed_overall": 2 / 3, "relaxed_human_split": 1.0, "relaxed_augmented_split": 0.5}


def make_ai2d(d):
    q = lambda qid, answer: {"abcLabel": False, "answerTexts": ["sun", "moon", "earth", "mars"],
                             "correctAnswer": answer, "questionId": qid}
    dump(f"{d}/questions/0.png.json", {"imageName": "0.png", "questions": {
        "What is shown?": q("0.png-0", 1), "Which is hot?": q("0.png-1", 0)}})
    dump(f"{d}/questions/1.png.json", {"imageName": "1.png", "questions": {"Not in test?": q("1.png-0", 2)}})
    png(f"{d}/images/0.png"), png(f"{d}/images/1.png")
    with open(f"{d}/ai2d_test_ids.csv", "w") as f:
        f.write("0\n")
    # "B." parses to B (correct); "The answer is A" keeps the whole reply (wrong) -> 0.5; image 1 not in test
    return [{"questionId": "0.png-0", "answer": "B."}, {"questionId": "0.png-1", "answer": "The answer is A"}], \
        {"accuracy": 0.5}


def make_scienceqa(d):
    base = dict(lecture="", solution="", task="closed choice", grade="grade2", subject="natural science",
                topic="t", category="c", skill="s")
    dump(f"{d}/problems.json", {
        "p1": {**base, "question": "Which?", "choices": ["a", "b", "c"], "answer": 1, "hint": "Look.",
               "image": "image.png", "split": "test"},
        "p2": {**base, "question": "Text only?", "choices": ["x", "y"], "answer": 1, "hint": "", "image": None,
               "split": "test"},
        "p3": {**base, "question": "Train?", "choices": ["x", "y"], "answer": 0, "hint": "", "image": None,
               "split": "train"}})
    dump(f"{d}/pid_splits.json", {"train": ["p3"], "val": [], "test": ["p1", "p2"]})
    png(f"{d}/images/test/p1/image.png")
    # p1 "B" correct (image question); p2 "B." fails LLaVA's rule (2 chars) -> accuracy 0.5, IMG accuracy 1.0
    return [{"question_id": "p1", "text": "B"}, {"question_id": "p2", "text": "B."}], \
        {"accuracy": 0.5, "img_accuracy": 1.0}


def b64png(color):
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def make_mmbench(d):
    cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "source", "l2-category",
            "comment", "split", "image"]
    rows = [[0, "Animal?", "", "cat", "dog", "bird", "", "A", "attr", "s", "l2", "", "dev", b64png((1, 2, 3))],
            [1000000, "Animal?", "", "dog", "bird", "cat", "", "C", "attr", "s", "l2", "", "dev", b64png((1, 2, 3))],
            [1, "Color?", "A hint.", "red", "blue", "", "", "B", "color", "s", "l2", "", "dev", b64png((0, 0, 255))],
            [1000001, "Color?", "A hint.", "blue", "red", "", "", "A", "color", "s", "l2", "", "dev",
             b64png((0, 0, 255))]]
    os.makedirs(d, exist_ok=True)
    with open(f"{d}/mmbench_dev_20230712.tsv", "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(cols)
        w.writerows(rows)
    answers = {0: "A", 1000000: "The answer is (C).", 1: "B", 1000001: "B"}  # question 1's copy is wrong
    preds = [dict(zip(cols[:-1], r[:-1]), prediction=answers[r[0]]) for r in rows]
    return preds, {"circular_accuracy": 0.5, "single_pass_accuracy": 1.0,
                   "per_category": {"attr": 1.0, "color": 0.0}}


def make_pope(d):
    for cat, labels in (("random", ["yes", "no"]), ("popular", ["yes", "no"])):
        jsonl(f"{d}/coco_pope_{cat}.json", [{"question_id": i + 1, "image": f"COCO_val2014_00000000000{i}.jpg",
                                             "text": "Is there a dog in the image?", "label": lab}
                                            for i, lab in enumerate(labels)])
    for i in (0, 1):
        png(f"{d}/val2014/COCO_val2014_00000000000{i}.jpg", (0, 0, 0), (20, 20))
    preds = [{"question_id": 1, "category": "random", "text": "Yes"},
             {"question_id": 2, "category": "random", "text": "No, there is not."},
             {"question_id": 1, "category": "popular", "text": "no"},
             {"question_id": 2, "category": "popular", "text": "NO"}]  # "NO" reads as yes under the official rule
    return preds, {"random": {"accuracy": 1.0, "f1": 1.0, "yes_ratio": 0.5},
                   "popular": {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.5},
                   "mean_over_categories": {"accuracy": 0.5, "f1": 0.5, "yes_ratio": 0.5}}


def make_hallusionbench(d):
    items = []
    for q in HB_ITEMS:
        no_image = q["category"] == "VS" and q["figure_id"] == "0"
        name = None if no_image else f"./hallusion_bench/{q['category']}/{q['subcategory']}/{q['set_id']}_" \
                                     f"{q['figure_id']}.png"
        items.append({**q, "visual_input": "0" if no_image else "1", "sample_note": "", "gt_answer_details": "",
                      "filename": name})
        if name:
            png(os.path.normpath(os.path.join(d, name)))
    dump(f"{d}/HallusionBench.json", items)
    return [{**q, "model_prediction": p} for q, p in zip(items, HB_PREDS)], HB_EXPECTED


def make_llava_w(d):
    jsonl(f"{d}/questions.jsonl", [{"image": "001.jpg", "text": "Describe the image.", "category": "detail",
                                    "question_id": 0},
                                   {"image": "001.jpg", "text": "What color?", "category": "conv",
                                    "question_id": 1}])
    png(f"{d}/images/001.jpg", (0, 200, 0), (30, 30))
    return [{"question_id": 0, "text": "A green square."}, {"question_id": 1, "text": "Green."}], {"score": None}


def make_entitygrid(d):
    import entitygrid
    qs = entitygrid.generate(d, num=4, seed=0, base=64, split="test")
    preds = [{"id": q["id"], "answer": q["answer"] if i < 3 else "Z"} for i, q in enumerate(qs)]
    return preds, {"num": 4, "accuracy": 0.75}


BUILDERS = {"docvqa": make_docvqa, "infovqa": make_infovqa, "stvqa": make_stvqa, "textvqa": make_textvqa,
            "chartqa": make_chartqa, "ai2d": make_ai2d, "scienceqa": make_scienceqa, "mmbench": make_mmbench,
            "pope": make_pope, "hallusionbench": make_hallusionbench, "llava-w": make_llava_w,
            "entitygrid": make_entitygrid}


def test_every_benchmark_has_a_fixture():
    assert set(BUILDERS) == set(ev.BENCHES)


def check_subset(got, expected):
    for k, v in expected.items():
        if isinstance(v, dict):
            check_subset(got[k], v)
        elif v is None:
            assert got[k] is None, k
        else:
            assert got[k] == pytest.approx(v), k


@pytest.mark.parametrize("bench", list(BUILDERS))
def test_known_predictions_give_known_scores(bench, tmp_path):
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    preds, expected = BUILDERS[bench](data)
    dump(str(tmp_path / "predictions.json"), preds)
    metrics = ev.main(["--bench", bench, "--data", data, "--predictions", str(tmp_path / "predictions.json"),
                       "--out", out])
    check_subset(metrics, expected)
    with open(f"{out}/metrics.json") as f:
        assert json.load(f) == json.loads(json.dumps(metrics))
    assert not os.path.exists(f"{out}/predictions.json")  # scoring only: no model, no new predictions


def test_prompts_follow_llava(tmp_path):
    """The user text of each benchmark, as LLaVA-1.5 (or lmms-eval where LLaVA has none) asks it
    (docs/benchmarks.md#benchmarks)."""
    d = str(tmp_path)
    make_textvqa(f"{d}/t"), make_scienceqa(f"{d}/s"), make_mmbench(f"{d}/m"), make_pope(f"{d}/p")
    make_docvqa(f"{d}/d"), make_chartqa(f"{d}/c")
    short = "\nAnswer the question using a single word or phrase."
    letter = "\nAnswer with the option's letter from the given choices directly."
    assert ev.BENCHES["textvqa"].load(f"{d}/t", "val")[0].prompt == \
        "How many?\nReference OCR token: STOP, 2" + short
    assert ev.BENCHES["textvqa"].load(f"{d}/t", "val")[1].prompt == "Is it red?\nReference OCR token: " + short
    s = ev.BENCHES["scienceqa"].load(f"{d}/s", "test")
    assert s[0].text() == "Context: Look.\nWhich?\nA. a\nB. b\nC. c" + letter and s[0].image.endswith("p1/image.png")
    assert s[1].text() == "Text only?\nA. x\nB. y" + letter and s[1].image is None
    m = ev.BENCHES["mmbench"].load(f"{d}/m", "dev")
    assert m[0].text() == "Animal?\nA. cat\nB. dog\nC. bird" + letter         # stops at the first empty option
    assert m[2].text() == "A hint.\nColor?\nA. red\nB. blue" + letter
    assert ev.BENCHES["pope"].load(f"{d}/p", "all")[0].prompt == "Is there a dog in the image?" + short
    assert ev.BENCHES["docvqa"].load(f"{d}/d", "val")[0].prompt == "Title?" + short
    assert ev.BENCHES["chartqa"].load(f"{d}/c", "test")[0].prompt == "Share?\nAnswer the question with a single word."


# ---------------------------------------------------------------------------------------------------------------
# Errors (one line, naming the file and where to get it)

def test_unknown_bench_lists_known_ones(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ev.main(["--bench", "vqav3", "--data", str(tmp_path), "--ckpt", str(tmp_path)])
    err = capsys.readouterr().err
    assert "vqav3" in err and all(b in err for b in ev.BENCHES)


def test_ckpt_or_predictions_is_required(tmp_path, capsys):
    with pytest.raises(SystemExit):  # at argument parsing, before any data is read
        ev.main(["--bench", "docvqa", "--data", str(tmp_path / "nowhere")])
    assert "--ckpt is required unless --predictions is given" in capsys.readouterr().err


@pytest.mark.parametrize("bench, missing", [("docvqa", "val_v1.0.json"), ("scienceqa", "problems.json"),
                                             ("pope", "coco_pope_adversarial.json"), ("mmbench", ".tsv"),
                                             ("hallusionbench", "HallusionBench.json")])
def test_missing_data_file_is_named(bench, missing, tmp_path):
    with pytest.raises(SystemExit, match=f"eval.py: error: .*{missing}.*{bench}.*get it from"):
        ev.main(["--bench", bench, "--data", str(tmp_path), "--ckpt", str(tmp_path)])


def test_predictions_missing_questions_is_an_error(tmp_path):
    preds, _ = make_docvqa(str(tmp_path / "d"))
    dump(str(tmp_path / "p.json"), preds[:1])
    with pytest.raises(SystemExit, match="no prediction for 1 of 2 questions"):
        ev.main(["--bench", "docvqa", "--data", str(tmp_path / "d"), "--predictions", str(tmp_path / "p.json"),
                 "--out", str(tmp_path / "o")])
    dump(str(tmp_path / "p.json"), {"not": "a list"})
    with pytest.raises(SystemExit, match="not a docvqa predictions file"):
        ev.main(["--bench", "docvqa", "--data", str(tmp_path / "d"), "--predictions", str(tmp_path / "p.json"),
                 "--out", str(tmp_path / "o")])


def test_partial_jsonl_torn_line_is_cut(tmp_path):
    path = str(tmp_path / "p.jsonl")
    head = '{"key": {"bench": "pope"}}\n{"qid": "1", "text": "a"}\n{"qid": "2", "text": "b"}\n'
    with open(path, "w") as f:
        f.write(head + '{"qid": "3", "te')
    key, done = ev.read_partial(path)
    assert key == {"bench": "pope"} and list(done) == ["1", "2"]
    with open(path) as f:
        assert f.read() == head


# ---------------------------------------------------------------------------------------------------------------
# With the tiny model (built once per session)

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """Random tiny CLIP + LLaMA + tokenizer (stage0.make_tiny_backbones), saved as a checkpoint once per module."""
    import checkpoints
    import hires
    import stage0
    root = tmp_path_factory.mktemp("tiny")
    texts = ["Is there a dog in the image? Answer the question using a single word or phrase. yes no A B C D"] * 4
    cfg = stage0.make_tiny_backbones(str(root / "base"), texts, seed=0, vocab_size=300, max_slices=4)
    checkpoints.save_checkpoint(hires.HiResLLaVA(cfg), str(root / "ckpt"))
    return str(root / "ckpt")


def copy_ckpt(ckpt, to):
    """A copy of ckpt elsewhere, its config pointing at the same backbones (stored relative, they stay behind)."""
    import checkpoints
    shutil.copytree(ckpt, to)
    dump(str(to / "config.json"), checkpoints.read_config(ckpt))
    return to


class Recorder:
    """Wraps the real model's generate and records what eval.py asks."""

    def __init__(self, model, calls):
        self.model, self.calls = model, calls

    def generate(self, images, prompts, **kw):
        self.calls.append((images, prompts, kw))
        return self.model.generate(images, prompts, **kw)

    def __getattr__(self, name):  # preprocess, cfg, ...: the real model's
        return getattr(self.model, name)


@pytest.fixture
def recorded(monkeypatch):
    calls, load = [], ev.load_model
    monkeypatch.setattr(ev, "load_model", lambda *a, **k: Recorder(load(*a, **k), calls))
    return calls


def run_tiny(bench, data, out, ckpt, *extra):
    return ev.main(["--bench", bench, "--data", data, "--ckpt", ckpt, "--out", out, "--batch-size", "2",
                    "--max-new-tokens", "3", *extra])


@pytest.mark.parametrize("bench", list(BUILDERS))
def test_tiny_model_end_to_end(bench, tmp_path, tiny_ckpt, recorded):
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    known, _ = BUILDERS[bench](data)
    b = ev.BENCHES[bench]
    metrics = run_tiny(bench, data, out, tiny_ckpt)
    samples = b.load(data, b.split)
    # the model saw every question once, greedy, with its LLaVA prompt and its image (None only for text-only ones)
    asked = [(img, p) for images, prompts, kw in recorded for img, p in zip(images, prompts)]
    assert [p for _, p in asked] == [s.text() for s in samples]
    assert all(kw == {"max_new_tokens": 3, "temperature": 0.0} for _, _, kw in recorded)
    assert all(len(images) <= 2 for images, _, _ in recorded)
    assert [img is None for img, _ in asked] == [s.image is None for s in samples]
    assert all(img[0].shape[0] == 3 for img, _ in asked if img is not None)  # preprocessed: (overview, slices, grid)
    # predictions.json: the official records in the official order, the model's text in the answer field
    with open(f"{out}/predictions.json") as f:
        sub = json.load(f)
    assert [b.qid(e) for e in sub] == [b.qid(s.record) for s in samples]
    assert sorted(b.qid(e) for e in sub) == sorted(b.qid(e) for e in known)
    assert all(isinstance(e[b.answer_key], str) for e in sub)
    assert not os.path.exists(f"{out}/predictions.partial.jsonl")  # finished: every answer is in predictions.json
    # scoring the written file reproduces the run's metrics
    again = ev.main(["--bench", bench, "--data", data, "--predictions", f"{out}/predictions.json",
                     "--out", str(tmp_path / "rescored")])
    run_info = metrics.pop("provenance")  # what only a model run knows
    assert (metrics.pop("mc"), metrics.pop("mc_from")) == ("letter", "checkpoint")
    assert run_info["batch_size"] == 2 and run_info["dtype"] == "fp32"
    assert again == metrics and metrics["bad_images"] == 0 and metrics["n"] == len(known)
    assert sum(run_info["slicing"]["grids"].values()) == sum(img is not None for img, _ in asked)
    if bench == "llava-w":
        with open(f"{out}/answers.jsonl") as f:
            assert [json.loads(line) for line in f] == sub


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, tiny_ckpt, recorded, monkeypatch):
    import hires
    from safetensors.torch import load_file, save_file
    data = str(tmp_path / "data")
    make_pope(data)  # 4 questions
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    run_tiny("pope", data, full, tiny_ckpt, "--batch-size", "1")
    real, calls = hires.HiResLLaVA.generate, []

    def killed_at_third(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a kill: two answers are on disk
        return real(self, *a, **k)
    monkeypatch.setattr(hires.HiResLLaVA, "generate", killed_at_third)
    with pytest.raises(KeyboardInterrupt):
        run_tiny("pope", data, cut, tiny_ckpt, "--batch-size", "1")
    monkeypatch.setattr(hires.HiResLLaVA, "generate", real)
    with open(f"{cut}/predictions.partial.jsonl", "a") as f:
        f.write('{"qid": "popular/1", "te')                                       # ... killed mid-write
    with pytest.raises(SystemExit, match="pass --resume"):
        run_tiny("pope", data, cut, tiny_ckpt)
    # answers of this checkpoint are never mixed with another's (by content), another mode's or length's
    other = tmp_path / "other" / "ckpt"
    shutil.copytree(tiny_ckpt, other)
    sd = load_file(str(other / "model.safetensors"))
    save_file({k: v + (k == sorted(sd)[0]) for k, v in sd.items()}, str(other / "model.safetensors"))
    for ckpt, extra, differs in ((str(other), [], "checkpoint"), (tiny_ckpt, ["--mc", "rank"], "mc letter there, "
                                 "rank here"), (tiny_ckpt, ["--max-new-tokens", "5"], "max_new_tokens 3 there, 5")):
        with pytest.raises(SystemExit, match=f"predictions.partial.jsonl: answers of another run \\(.*{differs}"):
            run_tiny("pope", data, cut, ckpt, "--resume", *extra)
    recorded.clear()
    run_tiny("pope", data, cut, tiny_ckpt, "--batch-size", "1", "--resume")
    assert [p for _, prompts, _ in recorded for p in prompts] == ["Is there a dog in the image?" + ev.SHORT] * 2
    with open(f"{full}/predictions.json") as a, open(f"{cut}/predictions.json") as b:
        assert a.read() == b.read()
    assert not os.path.exists(f"{cut}/predictions.partial.jsonl")
    with open(f"{full}/metrics.json") as a, open(f"{cut}/metrics.json") as b:
        m_full, m_cut = json.load(a), json.load(b)
    m_full["provenance"].pop("date"), m_cut["provenance"].pop("date")  # the runs' own clock times
    assert m_full == m_cut


def test_bad_image_gives_empty_prediction_and_warning(tmp_path, tiny_ckpt, capsys):
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    make_docvqa(data)
    open(f"{data}/documents/b.png", "wb").close()  # 0-byte image
    metrics = run_tiny("docvqa", data, out, tiny_ckpt)
    assert metrics["bad_images"] == 1
    with open(f"{out}/predictions.json") as f:
        assert json.load(f)[1] == {"questionId": 9, "answer": ""}
    assert metrics["n_scored"] == 1  # counted, never scored as an answer
    printed = capsys.readouterr()
    assert "warning" in printed.out + printed.err and "b.png" in printed.out + printed.err


def test_default_generation_length_is_the_benchmarks(tmp_path, tiny_ckpt, monkeypatch):
    calls = []

    class Fixed:  # stands in for the model: only the generation settings matter here
        def preprocess(self, img):
            return None, None, (1, 1)

        def check_length(self, image, prompt, options=None):
            pass

        def generate(self, images, prompts, **kw):
            calls.append(kw["max_new_tokens"])
            return ["0.5"] * len(prompts)
    monkeypatch.setattr(ev, "load_model", lambda *a, **k: Fixed())
    make_chartqa(str(tmp_path / "d"))
    ev.main(["--bench", "chartqa", "--data", str(tmp_path / "d"), "--ckpt", tiny_ckpt, "--out", str(tmp_path / "o")])
    assert calls == [16] * 3  # batch size 1 (default); lmms-eval's ChartQA length, no --max-new-tokens given


class SaysYes:  # stands in for the model: answers "Yes" to everything
    def preprocess(self, img):
        return None, None, (1, 1)

    def check_length(self, image, prompt, options=None):
        pass  # every prompt fits

    def generate(self, images, prompts, **kw):
        return ["Yes"] * len(prompts)


def test_missing_image_is_counted_never_scored(tmp_path, tiny_ckpt, monkeypatch, capsys):
    """POPE with the images of its "no" questions missing: they are counted as bad images and left out of the
    score, not scored as an empty answer (which POPE's rule reads as "yes")."""
    monkeypatch.setattr(ev, "load_model", lambda *a, **k: SaysYes())
    data = str(tmp_path / "data")
    make_pope(data)
    os.remove(f"{data}/val2014/COCO_val2014_000000000001.jpg")
    metrics = ev.main(["--bench", "pope", "--data", data, "--ckpt", tiny_ckpt, "--out", str(tmp_path / "o")])
    assert (metrics["bad_images"], metrics["n"], metrics["n_scored"]) == (2, 4, 2)
    assert metrics["random"]["accuracy"] == metrics["popular"]["accuracy"] == 1.0  # the two answered: "yes" = yes
    os.remove(f"{data}/val2014/COCO_val2014_000000000000.jpg")
    metrics = ev.main(["--bench", "pope", "--data", data, "--ckpt", tiny_ckpt, "--out", str(tmp_path / "o2")])
    assert metrics["n_scored"] == 0 and metrics["score"] is None and "no question was answered" in metrics["note"]


def test_stage1_checkpoint_gets_a_warning(tmp_path, tiny_ckpt, monkeypatch, capsys):
    monkeypatch.setattr(ev, "load_model", lambda *a, **k: SaysYes())
    ckpt = copy_ckpt(tiny_ckpt, tmp_path / "stage1")
    dump(str(ckpt / "config.json"), {**json.loads((ckpt / "config.json").read_text()), "template": "plain"})
    data = str(tmp_path / "data")
    make_pope(data)
    ev.main(["--bench", "pope", "--data", data, "--ckpt", str(ckpt), "--out", str(tmp_path / "o")])
    assert "is a stage-1 checkpoint (trained on captions with the plain template" in capsys.readouterr().err
    ev.main(["--bench", "pope", "--data", data, "--ckpt", tiny_ckpt, "--out", str(tmp_path / "o2")])
    assert "stage-1" not in capsys.readouterr().err


def test_prompt_longer_than_context_gives_empty_prediction(tmp_path, tiny_ckpt, capsys):
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    make_docvqa(data)
    with open(f"{data}/val_v1.0.json") as f:
        released = json.load(f)
    released["data"][0]["question"] = "Title? " * 2000  # far beyond the tiny LLM's 1024-token context
    dump(f"{data}/val_v1.0.json", released)
    metrics = run_tiny("docvqa", data, out, tiny_ckpt)  # batch of 2: the other question is still answered
    assert metrics["too_long"] == 1 and metrics["bad_images"] == 0
    with open(f"{out}/predictions.json") as f:
        assert json.load(f)[0] == {"questionId": 7, "answer": ""}
    printed = capsys.readouterr()
    assert "warning: prompt is" in printed.out + printed.err and "context holds 1024" in printed.out + printed.err


def test_unfit_checkpoint_is_a_one_line_error(tmp_path, tiny_ckpt):
    data = str(tmp_path / "data")
    make_docvqa(data)
    bad = copy_ckpt(tiny_ckpt, tmp_path / "bad")
    from safetensors.torch import save_file
    import torch
    save_file({"not.a.parameter": torch.zeros(3)}, str(bad / "model.safetensors"))
    with pytest.raises(SystemExit, match="checkpoint does not fit the model"):
        run_tiny("docvqa", data, str(tmp_path / "o1"), str(bad))
    with pytest.raises(SystemExit):
        run_tiny("docvqa", data, str(tmp_path / "o2"), str(tmp_path / "nowhere"))  # --ckpt: no such directory
    with pytest.raises(SystemExit, match=r"eval.py: error: .*data: not a checkpoint folder \(no config.json"):
        run_tiny("docvqa", data, str(tmp_path / "o2"), data)


def test_mc_rank_answers_the_most_likely_options_letter(tmp_path, tiny_ckpt, monkeypatch):
    """--mc rank: multiple-choice questions get the letter of the option with the highest option_logprobs, after
    the letter-free prompt; the others are still generated; metrics.json records the mode."""
    import hires
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    make_scienceqa(data)  # one image question, one text-only question
    calls, real = [], hires.HiResLLaVA.option_logprobs

    def spy(self, images, prompts, options, **kw):
        scores = real(self, images, prompts, options, **kw)
        calls.append((prompts, options, scores))
        return scores
    monkeypatch.setattr(hires.HiResLLaVA, "option_logprobs", spy)
    metrics = run_tiny("scienceqa", data, out, tiny_ckpt, "--mc", "rank")
    samples = ev.BENCHES["scienceqa"].load(data, "test")
    prompts = [p for ps, _, _ in calls for p in ps]
    assert prompts == [s.text("rank") for s in samples] and all("\nA. " not in p for p in prompts)
    assert prompts[1] == "Text only?\nx\ny\n" + conversation.TEXT_PROMPT
    best = ["ABCD"[max(range(len(sc)), key=sc.__getitem__)] for _, _, scores in calls for sc in scores]
    with open(f"{out}/predictions.json") as f:
        assert [e["text"] for e in json.load(f)] == best
    assert metrics["mc"] == "rank" and metrics["too_long"] == 0


def test_entitygrid_is_evaluated_on_its_2x2_grid(tmp_path, tiny_ckpt, monkeypatch):
    """A checkpoint saved with upscale=True and N=16 would slice the 2S x 2S canvas 4 x 4; eval.py fixes 2 x 2."""
    import checkpoints
    import hires
    import slicing
    ckpt = copy_ckpt(tiny_ckpt, tmp_path / "upscaled")
    cfg = json.loads((ckpt / "config.json").read_text())
    dump(str(ckpt / "config.json"), {**cfg, "upscale": True, "max_slices": 16})
    data = str(tmp_path / "data")
    make_entitygrid(data)
    img = Image.open(os.path.join(data, ev.BENCHES["entitygrid"].load(data, "all")[0].image))
    assert checkpoints.load_checkpoint(str(ckpt)).preprocess(img)[2] == (4, 4)  # what the stored config does
    grids, preprocess = [], slicing.preprocess
    monkeypatch.setattr(hires, "preprocess", lambda *a, **k: grids.append(preprocess(*a, **k)[2]) or
                        preprocess(*a, **k))
    metrics = run_tiny("entitygrid", data, str(tmp_path / "out"), str(ckpt))
    assert grids == [(2, 2)] * 4
    assert metrics["provenance"]["slicing"] == {"tiler": "hires", "upscale": False, "max_slices": 4,
                                                "grids": {"2x2": 4}}
    with open(tmp_path / "out" / "metrics.json") as f:
        assert json.load(f)["provenance"]["slicing"]["grids"] == {"2x2": 4}
    Image.new("RGB", (192, 80)).save(img.filename)  # a canvas the benchmark never draws: a one-line error
    with pytest.raises(SystemExit, match="192x80 slices 1x2, not 2x2"):
        run_tiny("entitygrid", data, str(tmp_path / "out2"), str(ckpt))


def test_greedy_answers_do_not_depend_on_the_batch_size_in_fp32(tmp_path, tiny_ckpt):
    """Batch 1 and left-padded batches of 4 (prompts and images of different lengths) give the same answers."""
    data = tmp_path / "data"
    sizes = [(40, 28), (130, 60), (100, 100), (20, 90), (64, 64), (200, 30), (33, 33), (90, 120)]
    rows = [{"questionId": i, "question": "What is written" + " here" * i + "?", "image": f"{i}.png",
             "answers": ["x"]} for i in range(len(sizes))]
    dump(str(data / "val_v1.0.json"), {"data": rows})
    for i, size in enumerate(sizes):
        png(str(data / f"{i}.png"), (30 * i, 200 - 20 * i, 90), size)
    answers = {}
    for b in (1, 4):
        metrics = run_tiny("docvqa", str(data), str(tmp_path / f"b{b}"), tiny_ckpt, "--batch-size", str(b),
                           "--max-new-tokens", "8")
        assert metrics["provenance"]["batch_size"] == b
        with open(tmp_path / f"b{b}" / "predictions.json") as f:
            answers[b] = [e["answer"] for e in json.load(f)]
    assert answers[1] == answers[4] and len(set(answers[1])) > 1


def test_bf16_backbones_keep_fp32_adapters_under_autocast(tmp_path, tiny_ckpt, monkeypatch):
    import torch
    seen, load = [], ev.load_model
    monkeypatch.setattr(ev, "load_model", lambda *a, **k: seen.append(load(*a, **k)) or seen[-1])
    data = str(tmp_path / "data")
    make_docvqa(data)
    metrics = run_tiny("docvqa", data, str(tmp_path / "out"), tiny_ckpt, "--dtype", "bf16")
    assert metrics["provenance"]["dtype"] == "bf16" and metrics["bad_images"] == 0
    dtypes = {n: p.dtype for n, p in seen[0].named_parameters()}
    assert {d for n, d in dtypes.items() if seen[0]._is_adapter(n)} == {torch.float32}
    assert {d for n, d in dtypes.items() if not seen[0]._is_adapter(n)} == {torch.bfloat16}


def test_metrics_record_provenance(tmp_path, tiny_ckpt):
    import subprocess
    from datetime import datetime, timezone
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    make_docvqa(data)
    before = datetime.now(timezone.utc).replace(microsecond=0)
    run_tiny("docvqa", data, out, tiny_ckpt, "--seed", "7")
    with open(f"{out}/metrics.json") as f:
        p = json.load(f)["provenance"]
    import checkpoints
    cfg = checkpoints.read_config(tiny_ckpt)  # the backbone paths resolved: config.json stores them relative
    assert p["checkpoint"] == os.path.abspath(tiny_ckpt) and os.path.isabs(p["clip_weights"])
    assert (p["clip_weights"], p["llm_path"], p["tokenizer_path"]) == (cfg["clip_weights"], cfg["llm_path"],
                                                                       cfg["tokenizer_path"])
    assert p["prompt_template"] == "vicuna_v1" and p["example_prompt"].endswith(ev.SHORT)
    assert (p["max_new_tokens"], p["batch_size"], p["dtype"], p["seed"]) == (3, 2, "fp32", 7)
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a fresh clone; an exported tree has no commit to record
        assert p["git_commit"].removesuffix("-dirty") == head.stdout.strip()
    assert before <= datetime.fromisoformat(p["date"]) <= datetime.now(timezone.utc)


def test_checkpoint_pointed_at_moved_backbones(tmp_path, tiny_ckpt):
    import checkpoints
    cfg = checkpoints.read_config(tiny_ckpt)
    moved = tmp_path / "moved"
    shutil.copytree(os.path.dirname(cfg["llm_path"]), moved)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    gone = {k: str(tmp_path / "gone" / os.path.relpath(cfg[k], os.path.dirname(cfg["llm_path"])))
            for k in ("clip_weights", "llm_path", "tokenizer_path")}
    dump(str(ckpt / "config.json"), {**cfg, **gone})  # as if the backbones were moved after training
    data = str(tmp_path / "data")
    make_docvqa(data)
    with pytest.raises(SystemExit, match=r"the clip_weights of .* is not there; moved\? point to it with --clip"):
        run_tiny("docvqa", data, str(tmp_path / "o1"), str(ckpt))
    new = {k: str(moved / os.path.relpath(cfg[k], os.path.dirname(cfg["llm_path"]))) for k in gone}
    metrics = run_tiny("docvqa", data, str(tmp_path / "o2"), str(ckpt), "--clip", new["clip_weights"],
                       "--llm", new["llm_path"], "--tokenizer", new["tokenizer_path"])
    reference = run_tiny("docvqa", data, str(tmp_path / "o3"), tiny_ckpt)
    assert {k: metrics["provenance"][k] for k in new} == new
    with open(tmp_path / "o2" / "predictions.json") as a, open(tmp_path / "o3" / "predictions.json") as b:
        assert json.load(a) == json.load(b)
    assert metrics["anls"] == reference["anls"]


def test_ask_about_one_image(tmp_path, tiny_ckpt, capsys, monkeypatch):
    import checkpoints
    import slicing
    import torch
    png(str(tmp_path / "photo.png"), (20, 90, 200), (150, 140))
    ask = ["--ckpt", tiny_ckpt, "--image", str(tmp_path / "photo.png"), "--max-new-tokens", "6"]
    out = ev.main(ask + ["--ask", "What does the sign say?"])
    model = checkpoints.load_checkpoint(tiny_ckpt)
    pre = model.preprocess(slicing.load_image(tmp_path / "photo.png"))
    assert out["grid"] == list(pre[2]) == [2, 2] and out["image_tokens"] == model.image_tokens(pre[2])
    assert out["answers"] == model.generate([pre], ["What does the sign say?"], max_new_tokens=6)  # greedy
    printed = capsys.readouterr().out
    assert "overview + 2x2 slices" in printed and f"{out['image_tokens']} image tokens" in printed
    assert f"] {out['answers'][0]}" in printed
    sampled = [ev.main(ask + ["--ask", "Hi?", "--temperature", "1.0", "--seed", str(s)])["answers"][0]
               for s in (1, 1, 2, 3, 4)]
    torch.manual_seed(1)
    assert sampled[0] == sampled[1] == model.generate([pre], ["Hi?"], max_new_tokens=6, temperature=1.0)[0]
    assert len(set(sampled)) > 1  # sampled, not greedy
    lines = iter(["What colour?", "And the shape?", ""])  # interactive: one question per line, empty line ends
    monkeypatch.setattr("builtins.input", lambda prompt: next(lines))
    assert len(ev.main(ask)["answers"]) == 2
    with pytest.raises(SystemExit):  # --image: no such file
        ev.main(["--ckpt", tiny_ckpt, "--image", str(tmp_path / "nope.png"), "--ask", "Hi?"])
