"""EntityGrid-QA (entitygrid.py, paper 3.4): geometry of the drawings, answers recomputed independently,
determinism, train/test disjointness, balance, the Discrepancy metric on worked examples, CLI errors."""
import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import entitygrid as eg  # noqa: E402

EDGE = {2, 4, 5, 6, 8}  # written out here, not taken from the module under test


@pytest.fixture(scope="module")
def small(tmp_path_factory):  # the tiny preset's base: 128 x 128 canvas; 108 = 4 full balancing blocks of 27
    d = tmp_path_factory.mktemp("eg64")
    return d, eg.generate(str(d), 108, seed=0, base=64, split="train")


@pytest.fixture(scope="module")
def full(tmp_path_factory):  # the paper's base: 672 x 672 canvas
    d = tmp_path_factory.mktemp("eg336")
    return d, eg.generate(str(d), 54, seed=1, base=336, split="test")


def ink_cells(path):
    """Cells 1..9 holding any non-white pixel, and the ink mask."""
    ink = (np.asarray(Image.open(path).convert("RGB")) != 255).any(-1)  # (H, W)
    H, W = ink.shape
    rows, cols = np.arange(H) * 3 // H, np.arange(W) * 3 // W
    cells = {3 * r + c + 1 for r in range(3) for c in range(3) if ink[rows == r][:, cols == c].any()}
    return cells, ink


@pytest.mark.parametrize("which", ["small", "full"])
def test_ink_lies_exactly_in_listed_cells_and_edge_entities_cross_the_border(which, request):
    d, questions = request.getfixturevalue(which)
    for q in questions:
        cells, ink = ink_cells(d / q["image"])
        assert cells == set(q["positions"]), (q["id"], cells, q["positions"])
        H, W = ink.shape
        base = W // 2
        assert (H, W) == ((128, 128) if which == "small" else (672, 672))
        for cell in q["positions"]:  # an entity in the middle column/row is cut by the slice border
            r, c = (cell - 1) // 3, (cell - 1) % 3
            region = ink[r * H // 3 + 1:(r + 1) * H // 3, c * W // 3 + 1:(c + 1) * W // 3]
            lo = c * W // 3 + 1
            if c == 1:
                assert region[:, :base - lo].any() and region[:, base - lo:].any(), (q["id"], cell)
            lo = r * H // 3 + 1
            if r == 1:
                assert region[:base - lo].any() and region[base - lo:].any(), (q["id"], cell)


def expected_relation(a, b):
    ra, ca, rb, cb = (a - 1) // 3, (a - 1) % 3, (b - 1) // 3, (b - 1) % 3
    horizontal = {-1: "left", 0: "", 1: "right"}[np.sign(ca - cb)]
    vertical = {-1: "upper", 0: "", 1: "lower"}[np.sign(ra - rb)]
    if horizontal and vertical:
        return f"{vertical} {horizontal}"
    return horizontal or {"upper": "above", "lower": "below", "": ""}[vertical]


@pytest.mark.parametrize("which", ["small", "full"])
def test_answers_recomputed_from_positions_and_names(which, request):
    _, questions = request.getfixturevalue(which)
    for q in questions:
        opts, pos, names = q["options"], q["positions"], q["entities"]
        assert len(opts) == 4 and len(set(opts)) == 4 and q["answer"] in "ABCD"
        correct = opts["ABCD".index(q["answer"])]
        assert len(pos) == len(names) == len(set(pos)) and all(1 <= p <= 9 for p in pos)
        assert q["cell"] == pos[0] and q["edge"] == (pos[0] in EDGE)
        if q["task"] == "recognition":
            assert len(pos) == 1 and correct == names[0]
            assert q["question"] == "What is the object in the image?"
        elif q["task"] == "position":
            assert len(pos) == 2 and names[0] != names[1]
            assert correct == expected_relation(pos[0], pos[1]), q
            a, b = (f"the number {n}" if re.fullmatch(r"\d\.\d{3}", n) else f'the word "{n}"' if n in eg.WORDS
                    else f"the {n}" for n in names)
            assert q["question"] == f"Where is {a} relative to {b} in the image?"
        else:
            assert q["task"] == "counting" and correct == str(len(pos)) and len(set(names)) == 1
            thing = re.fullmatch(r"How many (.+) are there in the image\?", q["question"]).group(1)
            assert thing.startswith(names[0].split()[0]) and thing.endswith("s")  # plural: "red stars", "cars"
            assert len(pos) == 1 or len({p in EDGE for p in pos}) == 2  # two or more copies mix edge and corner
    assert {q["task"] for q in questions} == {"recognition", "position", "counting"}


def test_llava_json_and_format_question(small):
    d, questions = small
    assert eg.load_questions(str(d)) == questions
    llava = json.loads((d / "llava.json").read_text())
    q = {"question": "How many cars are there in the image?", "options": ["3", "1", "4", "2"]}
    assert eg.format_question(q) == ("How many cars are there in the image?\nA. 3\nB. 1\nC. 4\nD. 2\n"
                                     "Answer with the option's letter from the given choices directly.")
    assert eg.format_question(q, letters=False) == ("How many cars are there in the image?\n3\n1\n4\n2\n"
                                                    "Answer with the option's text from the given choices directly.")
    for q, item in zip(questions, llava):
        assert item["id"] == q["id"] and item["image"] == q["image"] and (d / item["image"]).is_file()
        human, gpt = item["conversations"]
        assert human == {"from": "human", "value": "<image>\n" + eg.format_question(q)}
        assert gpt == {"from": "gpt", "value": q["answer"]}


def file_digests(d):
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(d).rglob("*")) if p.is_file()}


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path):
    a, b, c = (eg.generate(str(tmp_path / n), 30, seed=s, base=64) and file_digests(tmp_path / n)
               for n, s in (("a", 7), ("b", 7), ("c", 8)))
    assert len(a) == 32 and a == b  # 30 PNGs + questions.jsonl + llava.json
    assert a["questions.jsonl"] != c["questions.jsonl"]


def test_train_and_test_never_share_an_image(tmp_path, monkeypatch):
    owners = []  # every scene generate() draws must belong to the split being generated
    render = eg.render
    monkeypatch.setattr(eg, "render", lambda ents, base: owners.append(eg.scene_split(ents, base)[0])
                        or render(ents, base))
    images = {}
    for split in ("train", "test"):
        for seed in (0, 1):
            owners.clear()
            d = tmp_path / f"{split}{seed}"
            questions = eg.generate(str(d), 60, seed=seed, base=64, split=split)
            assert owners == [split] * 60 and all(q["split"] == split for q in questions)
            digests = [hashlib.sha256((d / q["image"]).read_bytes()).hexdigest() for q in questions]
            assert len(set(digests)) == 60  # no repeated image inside a run either
            images.setdefault(split, set()).update(digests)
    assert not images["train"] & images["test"]


def test_a_scene_drawn_twice_in_a_run_is_drawn_again(tmp_path, monkeypatch):
    calls = []  # the first two scenes get the same digest: the second must be rejected and resampled
    monkeypatch.setattr(eg, "scene_split", lambda ents, base: calls.append(1) or
                        ("train", "same" if len(calls) <= 2 else str(len(calls))))
    eg.generate(str(tmp_path), 3, seed=0, base=48)
    assert len(calls) == 4


def test_entities_are_jittered_within_a_quarter_of_their_extent_and_solid_in_their_colour(full):
    d, questions = full
    offsets = []
    for q in questions:
        if q["task"] != "recognition":
            continue
        rgb = np.asarray(Image.open(d / q["image"]).convert("RGB"))
        ys, xs = np.nonzero((rgb != 255).any(-1))
        w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        r, c = (q["cell"] - 1) // 3, (q["cell"] - 1) % 3
        dx, dy = (xs.min() + xs.max() + 1) / 2 - (c + 0.5) * 224, (ys.min() + ys.max() + 1) / 2 - (r + 0.5) * 224
        assert abs(dx) <= w / 4 + 1 and abs(dy) <= h / 4 + 1, (q["id"], dx, dy, w, h)
        offsets.append((abs(dx), abs(dy)))
        name = q["entities"][0]
        if name.split()[-1] in eg.SHAPES:  # "red star": its most common pixel is exactly the colour's RGB
            colors, counts = np.unique(rgb[ys, xs], axis=0, return_counts=True)
            assert tuple(colors[counts.argmax()]) == eg.COLORS[name.split()[0]], q["id"]
    assert len(offsets) == 18 and min(np.max(offsets, axis=0)) > 4, offsets  # jittered along both axes


def test_generate_rejects_bad_arguments(tmp_path):
    for args, message in (((0, 64, "test"), "num must be a positive integer"), ((2, 47, "test"), "base must be in"),
                          ((2, 2049, "test"), "base must be in"), ((2, 64, "val"), "split must be")):
        with pytest.raises(ValueError, match=message):
            eg.check_options(*args)
    with pytest.raises(ValueError, match="num must be"):  # generate() checks before it writes anything
        eg.generate(str(tmp_path / "o"), 0, seed=0)
    assert not (tmp_path / "o").exists()


def test_cells_tasks_and_letters_are_balanced(small, full):
    _, questions = small  # 108 = 4 blocks of 27 (task, cell) pairs and 27 blocks of 4 letters: exact balance
    assert Counter((q["task"], q["cell"]) for q in questions) == {(t, c): 4 for t in eg.TASKS for c in range(1, 10)}
    assert Counter(q["answer"] for q in questions) == {letter: 27 for letter in "ABCD"}
    _, questions = full  # 54: 2 blocks of 27, letters 13 or 14 each
    assert Counter(q["cell"] for q in questions) == {c: 6 for c in range(1, 10)}
    assert all(13 <= n <= 14 for n in Counter(q["answer"] for q in questions).values())
    counts = Counter(q["options"]["ABCD".index(q["answer"])] for _, qs in (small, full) for q in qs
                     if q["task"] == "counting")
    assert set(counts) == {"1", "2", "3", "4"}  # every count occurs
    everything = Counter(p for _, qs in (small, full) for q in qs for p in q["positions"])
    # all drawn entities spread over the cells: corners hold ~11% more (mixed counting layouts put half the copies
    # on 4 corner cells), and ~60 entities per cell here vary by ~13%
    assert max(everything.values()) < 1.8 * min(everything.values())


SLICES = ({1, 2, 4, 5}, {2, 3, 5, 6}, {4, 5, 7, 8}, {5, 6, 8, 9})  # cells each of the 2 x 2 slices shows


def test_counting_layouts_do_not_depend_on_the_questioned_cell():
    # the number of edge copies, and a "count the slices holding a copy" shortcut, follow one distribution for
    # questions at edge and at other cells (two or more copies); counts stay uniform over 1-4
    import random
    rng, n = random.Random(0), 12000
    stats = {True: Counter(), False: Counter()}
    shortcut = {True: [], False: []}
    counts = Counter()
    for i in range(n):
        cell = 1 + i % 9
        copies, _, correct, distractors = eg.sample_scene(rng, "counting", cell)
        pos = [e.cell for e in copies]
        assert pos[0] == cell and correct == str(len(pos)) and sorted(distractors + [correct]) == list("1234")
        counts[correct] += 1
        if len(pos) > 1:
            stats[cell in EDGE][len(pos), sum(p in EDGE for p in pos)] += 1
            shortcut[cell in EDGE].append(sum(bool(s & set(pos)) for s in SLICES) == len(pos))
    assert all(abs(c / n - 0.25) < 0.02 for c in counts.values())  # 0.02: ~5 standard errors at n = 12000
    for key in set(stats[True]) | set(stats[False]):  # (copies, edge copies): 1..k-1 edge copies, uniform
        k, e = key
        assert 1 <= e <= k - 1
        for edge in (True, False):
            share = stats[edge][key] / sum(v for (kk, _), v in stats[edge].items() if kk == k)
            assert abs(share - 1 / (k - 1)) < 0.04, (edge, key, share)  # ~4 standard errors at ~900 per k
    gap = np.mean(shortcut[False]) - np.mean(shortcut[True])
    assert abs(gap) < 0.04, gap  # the shortcut answers 100% of corner-only layouts; here both sides alike


@pytest.mark.parametrize("text,letter", [
    ("B", "B"), ("b", "B"), (" B.\n", "B"), ("(B)", "B"), ("B) 2", "B"), ("B. stop sign", "B"), ("B: left", "B"),
    ("(D) tree", "D"), ("E", None), ("E.", None), ("(E)", None), ("b) 2", None), ("A stop sign", None),
    ("The answer is B", None), ("The answer is B.", None), ("", None), ("BC", None)])
def test_parse_letter(text, letter):
    assert eg.parse_letter(text) == letter


def mk(i, task, cell, answer="A"):
    return {"id": str(i), "task": task, "cell": cell, "answer": answer}


def test_score_worked_example_all_cells():
    # one question per (task, cell); all right at the 4 other cells, only recognition right at the 5 edge cells
    qs = [mk(f"{t}{c}", t, c) for t in eg.TASKS for c in range(1, 10)]
    preds = {q["id"]: ("A." if q["cell"] not in EDGE or q["task"] == "recognition" else "(C)") for q in qs}
    r = eg.score(qs, preds)
    assert r["accuracy"] == pytest.approx(17 / 27)
    assert r["per_task"] == pytest.approx({"recognition": 1.0, "position": 4 / 9, "counting": 4 / 9})
    assert r["per_position"] == pytest.approx({c: (1 / 3 if c in EDGE else 1.0) for c in range(1, 10)})
    assert (r["edge_accuracy"], r["other_accuracy"]) == pytest.approx((1 / 3, 1.0))
    assert r["discrepancy"] == pytest.approx(2 / 3)
    assert r["per_task_discrepancy"] == pytest.approx({"recognition": 0.0, "position": 1.0, "counting": 1.0})
    assert r["position_prior_per_cell"] == {c: None for c in range(1, 10)}  # no options: no prior


def test_position_prior_worked_example():
    """Options left/right/above/below: a corner cell makes two of them possible, a middle edge cell three, the
    centre all four; position right at the other cells only is 0.5 above the prior there, below it at the edges."""
    options = ["left", "right", "above", "below"]
    expected = {1: 1 / 2, 2: 1 / 3, 3: 1 / 2, 4: 1 / 3, 5: 1 / 4, 6: 1 / 3, 7: 1 / 2, 8: 1 / 3, 9: 1 / 2}
    assert {c: eg.position_prior(c, options) for c in range(1, 10)} == pytest.approx(expected)
    qs = [dict(mk(c, "position", c), options=options) for c in range(1, 10)]
    r = eg.score(qs, {q["id"]: "A" if q["cell"] not in EDGE else "B" for q in qs})
    assert r["position_prior_per_cell"] == pytest.approx(expected)
    above = r["position_above_prior"]
    assert above["per_cell"] == pytest.approx({c: (c not in EDGE) - expected[c] for c in range(1, 10)})
    assert (above["edge"], above["other"]) == pytest.approx(((-4 / 3 - 1 / 4) / 5, 0.5))


def test_position_prior_over_random_distractors():
    """Averaged over every choice of 3 distractors from the 7 wrong relations: 0.62 at a corner, 0.40 at cells
    2/4/6/8, 0.25 at the centre (exact: 65/105, 14/35, 1/4)."""
    import itertools
    for cell, value in ((1, 65 / 105), (9, 65 / 105), (2, 14 / 35), (6, 14 / 35), (5, 1 / 4)):
        correct = eg.relation(cell, 5 if cell != 5 else 1)
        draws = list(itertools.combinations([r for r in eg.RELATIONS if r != correct], 3))
        assert sum(eg.position_prior(cell, [correct, *d]) for d in draws) / len(draws) == pytest.approx(value)


def test_score_worked_example_missing_cells_and_tasks():
    qs = [mk(0, "recognition", 1), mk(1, "position", 1), mk(2, "counting", 2, "B"),
          mk(3, "recognition", 3), mk(4, "recognition", 3, "D"), mk(5, "position", 3, "C")]
    preds = {"0": "A", "1": "B", "2": "B", "3": "A", "4": "garbage", "5": "C"}
    r = eg.score(qs, preds)
    assert r["accuracy"] == pytest.approx(4 / 6)
    assert r["per_task"] == pytest.approx({"recognition": 2 / 3, "position": 1 / 2, "counting": 1.0})
    # Acc_3 is the mean over tasks (0.5 recognition, 1.0 position) = 0.75, not the pooled 2/3
    assert r["per_position"][1] == 0.5 and r["per_position"][2] == 1.0 and r["per_position"][3] == 0.75
    assert all(r["per_position"][c] is None for c in (4, 5, 6, 7, 8, 9))
    assert (r["edge_accuracy"], r["other_accuracy"], r["discrepancy"]) == pytest.approx((1.0, 0.625, 0.375))
    assert r["per_task_discrepancy"] == {"recognition": None, "position": None, "counting": None}
    assert eg.score(qs, {})["accuracy"] == 0.0  # missing predictions count as wrong


@pytest.mark.parametrize("argv,message", [
    (["--num", "0"], "--num must be a positive integer"),
    (["--num", "-3"], "--num must be a positive integer"),
    (["--num", "5", "--base", "20"], "--base must be in [48, 2048]"),
    (["--num", "5", "--base", "5000"], "--base must be in [48, 2048]"),
    (["--num", "5", "--split", "val"], "invalid choice"),
])
def test_cli_rejects_bad_numbers(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        eg.main(["--out", str(tmp_path / "o")] + argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_cli_unwritable_out_and_missing_show(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for argv, message in ((["--out", str(blocker / "sub"), "--num", "2"], f"--out {blocker / 'sub'}: cannot write"),
                          (["--show", str(tmp_path / "nothing")], "no questions.jsonl"),
                          ([], "give exactly one of --out")):
        with pytest.raises(SystemExit) as e:
            eg.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "Traceback" not in err, err


def test_cli_generates_and_draws_contact_sheet(tmp_path):
    out = tmp_path / "d"
    run = subprocess.run([sys.executable, str(ROOT / "entitygrid.py"), "--out", str(out), "--num", "12", "--seed", "3",
                          "--base", "64", "--split", "test"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert len(eg.load_questions(str(out))) == 12 and len(list((out / "images").glob("*.png"))) == 12
    eg.main(["--show", str(out), "--png", str(tmp_path / "sheet.png")])
    sheet = Image.open(tmp_path / "sheet.png")
    assert sheet.width > 600 and os.path.getsize(tmp_path / "sheet.png") < 300_000
    helptext = subprocess.run([sys.executable, str(ROOT / "entitygrid.py"), "--help"],
                              capture_output=True, text=True).stdout
    for flag in ("--out", "--num", "--seed", "--base", "--split", "--show", "--png"):
        assert flag in helptext


def test_score_by_layout_worked_example():
    qs = [dict(mk(0, "counting", 2), positions=[2]), dict(mk(1, "counting", 1), positions=[1]),
          dict(mk(2, "counting", 2), positions=[2, 3, 4]), dict(mk(3, "counting", 3), positions=[3, 5]),
          dict(mk(4, "position", 1), positions=[1, 9]), dict(mk(5, "recognition", 5)),  # no positions: left out
          dict(mk(6, "counting", 7), positions=[7, 9])]
    r = eg.score(qs, {"0": "B", "1": "A", "2": "A", "3": "C", "4": "A", "5": "A", "6": "A"})["per_task_layout"]
    assert r["counting"] == {"edge": 0.0, "corner": 1.0, "mixed": 0.5}
    assert r["position"] == {"edge": None, "corner": 1.0, "mixed": None}
    assert r["recognition"] == {"edge": None, "corner": None, "mixed": None}


def test_recognition_per_family():
    """family_of names every generated entity's family; score reports recognition accuracy per family."""
    import random
    for f in eg.FAMILIES:
        assert all(eg.family_of(eg.sample_entity(random.Random(i), f, 1).name) == f for i in range(100))
    qs = [{"id": str(i), "task": "recognition", "cell": 1, "answer": "A", "entities": [name]}
          for i, name in enumerate(["apple", "3.141", "house", "red star", "tree"])]
    qs.append({"id": "p", "task": "position", "cell": 2, "answer": "A", "entities": ["house", "apple"]})
    got = eg.score(qs, {"0": "A", "1": "B", "2": "A", "3": "A", "4": "C", "p": "A"})["recognition_per_family"]
    assert got == {"word": 1.0, "number": 0.0, "object": 0.5, "shape": 1.0}
