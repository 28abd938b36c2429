"""The official metrics of the benchmarks eval.py runs (docs/benchmarks.md#metrics): ANLS, VQA accuracy with the
EvalAI normaliser, relaxed accuracy, the letter and yes/no parsers, POPE, MMBench CircularEval and HallusionBench's
aAcc/fAcc/qAcc. Each function scores ONE question, or one benchmark's counts; eval.py's benchmarks average.
"""
import re
import string


def mean(xs):
    """Mean of the values that are not None; None if there are none (a metric with no question to average)."""
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def levenshtein(a, b):
    """Edit distance with unit costs (insert, delete, substitute)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction, answers, threshold=0.5):
    """ANLS of one question, exactly as the official RRC script; a score of exactly 0.5 is kept
    (docs/benchmarks.md#anls)."""
    pred, nls = " ".join(prediction.strip().lower().split()), []
    for answer in answers:
        length = max(len(answer.upper()), len(prediction.upper()))  # of the raw strings, not the normalised ones
        nls.append(levenshtein(" ".join(answer.strip().lower().split()), pred) / length if length else 0.0)
    score = 1.0 - min(nls) if nls else 0.0
    return 0.0 if score < threshold else score  # the script drops only score < 0.5 (the paper: NL < 0.5)


# The 120-entry VQA/EvalAI contractions table (docs/benchmarks.md#vqa-accuracy), kept verbatim with its quirks
# (identity entries, the reversed somebody'd, capitalised keys that never match after lowercasing).
CONTRACTIONS = dict(pair.split(":") for pair in """
aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've couldnt've:couldn't've
didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've hadn'tve:hadn't've hasnt:hasn't
havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's howd:how'd howll:how'll hows:how's Id've:I'd've
I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am
mightnt:mightn't mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've
neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at
shant:shan't shed've:she'd've she'dve:she'd've she's:she's shouldve:should've shouldnt:shouldn't
shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd somebodyd've:somebody'd've
somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's someoned:someone'd someoned've:someone'd've
someone'dve:someone'd've someonell:someone'll someones:someone's somethingd:something'd
somethingd've:something'd've something'dve:something'd've somethingll:something'll thats:that's thered:there'd
thered've:there'd've there'dve:there'd've therere:there're theres:there's theyd:they'd theyd've:they'd've
they'dve:they'd've theyll:they'll theyre:they're theyve:they've twas:'twas wasnt:wasn't wed've:we'd've
we'dve:we'd've weve:we've werent:weren't whatll:what'll whatre:what're whats:what's whatve:what've whens:when's
whered:where'd wheres:where's whereve:where've whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll
whos:who's whove:who've whyll:why'll whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't
wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've
y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've you'dve:you'd've youll:you'll
youre:you're youve:you've""".split())
NUMBER_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
              "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = list(';/[]"{}()=+\\_-><@`,?!')  # the official 21 characters
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the official typo: removes every "." not before a digit
COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")


def process_punctuation(text):
    """VQA punctuation step with m4c's digit-comma test; at most 32 periods removed (docs/benchmarks.md#vqa-accuracy,
    step 2)."""
    out, digit_comma = text, COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:  # the tests look at the ORIGINAL text, as the official code does
        out = out.replace(p, "" if (p + " " in text or " " + p in text or digit_comma) else " ")
    return PERIOD_STRIP.sub("", out, count=32)  # the original passes re.UNICODE (= 32) as `count`


def evalai_normalize(answer):
    """The m4c/MMF EvalAIAnswerProcessor that LLaVA's TextVQA scoring applies (docs/benchmarks.md#vqa-accuracy)."""
    answer = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    words = process_punctuation(answer.replace("\n", " ").replace("\t", " ").strip()).lower().split()
    return " ".join(CONTRACTIONS.get(w, w) for w in (NUMBER_MAP.get(w, w) for w in words) if w not in ARTICLES)


def vqa_accuracy(prediction, answers):
    """Leave-one-out VQA accuracy, EvalAI normaliser on prediction and answers (docs/benchmarks.md#vqa-accuracy)."""
    gts, pred = [evalai_normalize(a) for a in answers], evalai_normalize(prediction)
    return mean(min(1.0, sum(gt == pred for j, gt in enumerate(gts) if j != g) / 3) for g in range(len(gts))) or 0.0


def relaxed_accuracy(prediction, answer, tolerance=0.05):
    """ChartQA relaxed correctness as pix2struct, prediction stripped as VLMEvalKit
    (docs/benchmarks.md#relaxed-accuracy)."""
    def to_float(text):
        try:
            return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
        except ValueError:
            return None
    prediction = prediction.strip()
    pred, target = to_float(prediction), to_float(answer)
    if pred is not None and target:
        return float(abs(pred - target) / abs(target) <= tolerance)
    return float(prediction.lower() == answer.lower())


def parse_letter_scienceqa(text, n_choices):
    """Option letter by LLaVA's eval_science_qa.py rule, None if unparsed (docs/benchmarks.md#option-letters)."""
    options, found = ("A", "B", "C", "D", "E"), re.findall(r"The answer is ([A-Z]).", text)  # "." = any char
    if text in options:
        letter = text
    elif len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        letter = text[0]
    else:
        letter = found[0] if len(found) == 1 else None
    return letter if letter in options[:n_choices] else None


def parse_letter_ai2d(text):
    """lmms-eval's AI2D answer: X of a leading "X." else the reply, punctuation-free
    (docs/benchmarks.md#option-letters)."""
    m = re.match(r"\s*([A-Z])\.", text)
    return (m.group(1) if m else text).translate(str.maketrans("", "", string.punctuation)).upper()


def parse_letter_mmbench(text, choices):
    """VLMEvalKit can_infer, exact matching, no LLM judge: letter, "Z" or None (docs/benchmarks.md#option-letters)."""
    tokens = text.translate(str.maketrans(".()[],:;!*#{}", " " * 13)).split()
    found = [c for c in choices if c in tokens]
    if len(found) == 1 and tokens.index(found[0]) > len(tokens) - 5:  # a lone letter among the last 5 tokens
        return found[0]
    if not found and "Z" in tokens:
        return "Z"
    m = re.search(r"answer is \*\*([A-D])\*\*", text)
    if m and m.group(1) in choices:
        return m.group(1)
    hits = [c for c, v in choices.items() if v.lower() in text.lower()]
    return hits[0] if len(hits) == 1 and len(text) <= 2 * sum(len(v) for v in choices.values()) else None


def parse_yes_pope(text):
    """True for yes under the official POPE / LLaVA eval_pope.py rule (docs/benchmarks.md#pope-yes-or-no)."""
    return not any(w in ("No", "no", "not") for w in text.split(".")[0].replace(",", "").split(" "))


def parse_yes_no(text):
    """Offline HallusionBench judge, VLMEvalKit's YOrN_Extraction: yes/no/unknown
    (docs/benchmarks.md#hallusionbench-scores)."""
    words = process_punctuation(text.lower()).split()
    return "unknown" if ("yes" in words) == ("no" in words) else "yes" if "yes" in words else "no"


def pope_metrics(pred_yes, label_yes):
    """POPE accuracy, precision, recall, F1 and yes-ratio of the predictions (docs/benchmarks.md#pope-yes-or-no)."""
    pairs = list(zip(pred_yes, label_yes))
    tp, fp, fn = pairs.count((True, True)), pairs.count((True, False)), pairs.count((False, True))
    # 0.0 where the official script would divide by zero
    precision, recall = tp / (tp + fp) if tp + fp else 0.0, tp / (tp + fn) if tp + fn else 0.0
    return {"accuracy": mean(p == l for p, l in pairs), "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": mean(p for p, _ in pairs), "n": len(pairs)}


def all_correct(keys, correct):
    """{group key: every member correct} -- MMBench circular groups, HallusionBench figures and question pairs."""
    groups = {}
    for key, ok in zip(keys, correct):
        groups[key] = groups.get(key, True) and bool(ok)
    return groups


def circular_accuracy(rows):
    """MMBench CircularEval: {question: every present copy correct} from (index, ok)
    (docs/benchmarks.md#mmbench-circulareval)."""
    rows = list(rows)
    return all_correct([i % 1_000_000 for i, _ in rows], [ok for _, ok in rows])


def hallusion_metrics(items, correct):
    """aAcc, fAcc, qAcc of HallusionBench (docs/benchmarks.md#hallusionbench-scores). items: the official dicts;
    correct: parallel bools."""
    key = lambda q, *ks: tuple(str(q[k]) for k in ("category", "subcategory", "set_id") + ks)
    with_figure = [(key(q, "figure_id"), ok) for q, ok in zip(items, correct)
                   if not (q["category"] == "VS" and str(q["figure_id"]) == "0")]  # fAcc leaves out VS figure 0
    figures = all_correct([k for k, _ in with_figure], [ok for _, ok in with_figure])
    pairs = all_correct([key(q, "question_id") for q in items], correct)
    return {"aAcc": mean(correct), "fAcc": mean(figures.values()), "qAcc": mean(pairs.values()), "n": len(items),
            "n_figures": len(figures), "n_question_pairs": len(pairs)}
