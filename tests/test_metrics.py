"""metrics.py on worked examples from the official definitions (docs/benchmarks.md#metrics). No model needed."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval as ev  # noqa: E402
import metrics  # noqa: E402


# ANLS (docs/benchmarks.md#anls) ------------------------------------------------------------------------------------

@pytest.mark.parametrize("pred, answers, expected", [
    ("Hello", ["hello"], 1.0),                 # case-insensitive
    ("  hello  ", ["hello"], 1.0),             # stripped before the distance
    ("ab", ["ac"], 0.5),                       # NL exactly 0.5 is KEPT (the script drops only score < 0.5)
    ("abcd", ["abxy"], 0.5),
    ("abc", ["axy"], 0.0),                     # similarity 1/3 < 0.5 -> 0
    ("abc", ["xyz", "abd"], 2 / 3),            # best answer counts
    ("", ["abc"], 0.0),                        # empty prediction vs non-empty answer: NL = 1
    ("", [""], 1.0),                           # both empty: NL = 0
    ("a  b", ["a b"], 1.0),                    # whitespace collapsed for the distance
    ("ab  c", ["abd"], 0.6),                   # distance("ab c","abd")=2 over RAW length 5 (not 4 -> 0.5)
    ("ßßß", ["sss"], 0.5),                     # length from .upper(): "SSSSSS" has 6 chars, distance 3
])
def test_anls_worked_examples(pred, answers, expected):
    assert metrics.anls(pred, answers) == pytest.approx(expected)


def test_levenshtein():
    assert metrics.levenshtein("kitten", "sitting") == 3
    assert metrics.levenshtein("", "abc") == 3
    assert metrics.levenshtein("flaw", "lawn") == 2


# VQA accuracy with the EvalAI / m4c processor (docs/benchmarks.md#vqa-accuracy) ------------------------------------

@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0)])
def test_vqa_accuracy_leave_one_out_table(k, expected):
    answers = ["cat"] * k + ["dog"] * (10 - k)
    assert metrics.vqa_accuracy("cat", answers) == pytest.approx(expected)
    closed_form = (k * min(1, (k - 1) / 3) + (10 - k) * min(1, k / 3)) / 10
    assert metrics.vqa_accuracy("cat", answers) == pytest.approx(closed_form)


@pytest.mark.parametrize("raw, normalised", [
    ("it's red", "it 's red"),          # m4c word_tokenize splits 's (the official tool keeps "it's")
    ("hello,world", "helloworld"),      # m4c deletes commas first (official: "hello world")
    ("Yes", "yes"),                     # lowercased unconditionally
    ("3.", "3"), ("3.5", "3.5"),        # PERIOD_STRIP removes every "." not followed by a digit
    ("e.g.", "eg"),
    ("10:30", "10:30"), ("50%", "50%"), # ':' and '%' are not punctuation here
    ("x-y", "x y"),                     # '-' inside a word -> space
    ("x - y", "x y"),                   # '-' next to a space -> deleted
    ("Two dogs", "2 dogs"), ("none", "0"),
    ("The cat", "cat"), ("an apple", "apple"),
    ("whats", "what's"), ("dont", "don't"),
    ("somebody'd", "somebodyd"),        # the table's one reversed entry
    ("Im", "im"),                       # capitalised keys never match after lowercasing
    ("what?\tnow\n", "what now"),
    ("." * 40, "." * 8),                # re.UNICODE passed as count: only 32 periods removed
])
def test_evalai_normalize(raw, normalised):
    assert metrics.evalai_normalize(raw) == normalised


@pytest.mark.parametrize("raw, out", [
    ("x-y 1,000", "xy 1000"),  # a digit-comma-digit anywhere: every punctuation mark is deleted
    ("x-y 1,a", "x y 1 a"),    # none: a mark with no space beside it becomes a space
])
def test_process_punctuation_digit_comma(raw, out):
    assert metrics.process_punctuation(raw) == out


def test_contractions_table_is_complete():
    assert len(metrics.CONTRACTIONS) == 120
    assert metrics.CONTRACTIONS["yall'd've"] == "y'all'd've" and metrics.CONTRACTIONS["twas"] == "'twas"


def test_vqa_accuracy_uses_normaliser():
    assert metrics.vqa_accuracy("Two", ["2"] * 10) == 1.0
    assert metrics.vqa_accuracy("Yes", ["yes"] * 10) == 1.0          # official tool: 0; m4c (LLaVA TextVQA): 1
    assert metrics.vqa_accuracy("it's red", ["its red"] * 10) == 0.0  # "it 's red" != "its red"
    assert metrics.vqa_accuracy("the Cat.", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(0.9)


# ChartQA relaxed accuracy (docs/benchmarks.md#relaxed-accuracy) ----------------------------------------------------

@pytest.mark.parametrize("pred, target, expected", [
    ("50%", "0.5", 1.0), ("50%", "50", 0.0),
    ("104", "100", 1.0), ("105", "100", 1.0), ("106", "100", 0.0), ("95", "100", 1.0), ("94.9", "100", 0.0),
    ("0", "0", 1.0), ("0.0", "0", 0.0), ("0.01", "0", 0.0),   # target 0 -> exact string match
    ("1,000", "1000", 0.0), ("1e3", "1000", 1.0),
    (" 12%\n", "0.12", 1.0),                                     # prediction stripped first
    ("Yes", "yes", 1.0), ("Inspired", "inspired ", 0.0),         # target is not stripped
    ("nan", "nan", 0.0),
])
def test_relaxed_accuracy(pred, target, expected):
    assert metrics.relaxed_accuracy(pred, target) == expected


# Multiple choice parsers (docs/benchmarks.md#option-letters) -------------------------------------------------------

@pytest.mark.parametrize("text, n, expected", [
    ("B", 3, "B"), ("B. cat", 3, "B"), ("B.", 3, None), ("b", 3, None), ("A.B", 3, None), ("AB", 3, None),
    ("The answer is C.", 4, "C"), ("I think. The answer is C.", 4, "C"),
    ("The answer is C", 4, None),                     # the regex needs one character after the letter
    ("The answer is A. The answer is B.", 4, None),   # two matches -> FAILED
    ("D", 3, None),                                   # beyond the number of choices
    ("E", 5, "E"), ("cat", 3, None),
])
def test_parse_letter_scienceqa(text, n, expected):
    assert metrics.parse_letter_scienceqa(text, n) == expected


@pytest.mark.parametrize("text, gt, correct", [
    ("B", "B", True), ("B.", "B", True), ("(B)", "B", True), ("b", "B", True), ("B. the sun", "B", True),
    ("The answer is B", "B", False), ("C", "B", False), ("  C. x", "C", True),
])
def test_parse_letter_ai2d(text, gt, correct):
    assert (metrics.parse_letter_ai2d(text) == gt) is correct


CHOICES = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}


@pytest.mark.parametrize("text, expected", [
    ("B", "B"), ("The answer is (C).", "C"), ("Answer: D", "D"),
    ("A and B", None),                                   # two letters, no option text
    ("I think it is a dog", "B"),                        # text match ("a" is not the letter A)
    ("It is a dog or a cat", None),                      # two option texts
    ("Z", "Z"),
    ("C is the answer because the bird flies over the tall green trees", None),  # letter not in the last 5 tokens
])
def test_parse_letter_mmbench(text, expected):
    assert metrics.parse_letter_mmbench(text, CHOICES) == expected


def test_circular_accuracy_groups():
    rows = [(1, True), (1_000_001, True), (2_000_001, False), (2, True), (1_000_002, True), (3, False)]
    assert metrics.circular_accuracy(rows) == {1: False, 2: True, 3: False}


# POPE (docs/benchmarks.md#pope-yes-or-no) --------------------------------------------------------------------------

@pytest.mark.parametrize("text, yes", [
    ("Yes", True), ("No", False), ("no", False), ("No.", False), ("NO", True), ("", True), ("None", True),
    ("Yes, there is no dog.", False), ("There is not a dog", False), ("Yes. No", True), ("no, none", False),
])
def test_parse_yes_pope(text, yes):
    assert metrics.parse_yes_pope(text) is yes


def test_pope_metrics():
    m = metrics.pope_metrics([True, True, False, False, True], [True, False, False, True, True])  # TP 2 FP 1 TN 1 FN 1
    assert m["accuracy"] == pytest.approx(3 / 5) and m["yes_ratio"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    m = metrics.pope_metrics([True, True, True, True], [True, True, True, False])
    assert m["precision"] == pytest.approx(3 / 4) and m["recall"] == 1.0 and m["yes_ratio"] == 1.0
    assert metrics.pope_metrics([False, False], [True, False])["precision"] == 0.0  # guarded division


# HallusionBench (docs/benchmarks.md#hallusionbench-scores) ---------------------------------------------------------

@pytest.mark.parametrize("text, said", [
    ("Yes, it is.", "yes"), ("No.", "no"), ("YES", "yes"), ("yes and no", "unknown"), ("I don't know", "unknown"),
    ("", "unknown"),
])
def test_parse_yes_no(text, said):
    assert metrics.parse_yes_no(text) == said


def hb(cat, sub, set_id, fig, qid, gt):
    return {"category": cat, "subcategory": sub, "set_id": str(set_id), "figure_id": str(fig),
            "question_id": str(qid), "gt_answer": str(gt), "question": "q?", "filename": None}


HB_ITEMS = [hb("VD", "chart", 0, 0, 0, 1), hb("VD", "chart", 0, 0, 1, 0), hb("VD", "chart", 0, 1, 0, 0),
            hb("VD", "chart", 0, 1, 1, 1), hb("VS", "map", 1, 0, 0, 1), hb("VS", "map", 1, 1, 0, 1),
            hb("VS", "map", 1, 0, 1, 0)]
HB_PREDS = ["Yes", "No", "Yes", "yes", "I cannot tell", "maybe", "No"]
# correct: T T F T T(unclear on VS figure 0) F T -> aAcc 5/7; figures (VS figure 0 left out): VD0 T, VD1 F, VS1 F
# -> fAcc 1/3; question groups: VD q0 F, VD q1 T, VS q0 F, VS q1 T -> qAcc 1/2.
HB_EXPECTED = {"aAcc": 5 / 7, "fAcc": 1 / 3, "qAcc": 1 / 2}


def test_hallusion_scores_hand_made_set():
    samples = [ev.Sample(q, q["question"], None, {}) for q in HB_ITEMS]
    m = ev.BENCHES["hallusionbench"].score(samples, HB_PREDS)
    for k, v in HB_EXPECTED.items():
        assert m[k] == pytest.approx(v), k
    assert m["n_figures"] == 3 and m["n_question_pairs"] == 4
