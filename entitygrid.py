"""EntityGrid-QA: a generated benchmark that measures fragmentation at slice borders (paper 3.4).

The method and the metric: docs/method.md#entitygrid-qa.

A 2S x 2S blank canvas (S = base, the encoder's resolution) is cut by the model into exactly 2 x 2 slices. Entities
(words, numbers, objects drawn with Pillow primitives, coloured shapes) sit on a 3 x 3 grid of cells numbered 1..9
row-major from the top-left; each is centred on its cell (with a jitter of at most a quarter of its own extent), so an
entity in an edge cell 2, 4, 5, 6 or 8 is always cut by a slice border and one in 1, 3, 7, 9 lies inside one slice.
Tasks are multiple choice (4 options, one correct): recognition, position (A relative to B), counting.

Reconstructed details (the paper gives none): the entity lists, sizes (55-80% of a cell, text 70-90% wide), option
wording, the balancing (every block of 27 samples holds each (task, cell) once; every block of 4 each answer letter
once), the counting layouts (two or more copies always mix edge and corner cells, sample_scene), the train/test
rule (a scene belongs to the split given by the parity of the SHA-256 of its drawing parameters, so the two splits
can never hold the same image, whatever the seeds) and the Discrepancy conventions of score().
Images are 8-bit palette PNGs (a white background, then a 16-level anti-aliasing ramp per colour), compress_level 1:
~5x faster to write than RGB and pixel-identical to drawing in RGB for primitives.
"""
import argparse
import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from conversation import multiple_choice
from metrics import mean

TASKS = ("recognition", "position", "counting")
CELLS = tuple(range(1, 10))
EDGE_CELLS = (2, 4, 5, 6, 8)   # crossed by a 2 x 2 slice border (5 by both)
OTHER_CELLS = tuple(c for c in CELLS if c not in EDGE_CELLS)  # 1, 3, 7, 9: inside one slice
LAYOUTS = ("edge", "corner", "mixed")  # where a question's entities sit: all in edge cells, none, some
LETTERS = "ABCD"
MIN_BASE, MAX_BASE = 48, 2048  # a cell of 2*base/3 >= 32 px keeps a 6-letter word ~8 px high
MARGIN = 2                     # px of blank between an entity and its cell's border

COLORS = {  # name -> RGB; palette index of colour k at ink level l (0..15) is 1 + 16k + l, index 0 is the background
    "red": (220, 30, 40), "green": (30, 150, 50), "blue": (30, 70, 210), "orange": (245, 140, 20),
    "purple": (140, 50, 170), "black": (20, 20, 20), "white": (255, 255, 255), "brown": (120, 70, 30),
    "yellow": (240, 200, 20), "gray": (70, 70, 80), "sky": (150, 200, 240), "teal": (20, 140, 140)}
INK_COLORS = ("red", "green", "blue", "orange", "purple", "black")  # for words, numbers, shapes
WORDS = ("apple", "river", "cloud", "garden", "pencil", "window", "rocket", "candle", "tiger", "violin", "bridge",
         "pepper", "lemon", "camera", "forest", "mirror")
OBJECTS = {  # name -> (plural, width / height of its drawing)
    "stop sign": ("stop signs", 1.0), "traffic light": ("traffic lights", 0.42), "house": ("houses", 1.0),
    "tree": ("trees", 0.75), "car": ("cars", 2.0), "umbrella": ("umbrellas", 1.0), "boat": ("boats", 1.2),
    "mug": ("mugs", 1.2)}
SHAPES = ("circle", "triangle", "square", "star", "diamond", "hexagon", "cross")
FAMILIES = ("word", "number", "object", "shape")
RELATIONS = ("left", "right", "above", "below", "upper left", "upper right", "lower left", "lower right")


@dataclass
class Entity:
    """One drawn entity: its family, its name (the answer text), colour, cell and pixel box (x0, y0, w, h)."""
    family: str
    name: str
    color: str
    cell: int
    box: tuple = ()
    font_size: int = 0


# ----------------------------------------------------------------------------- palette and drawing

PALETTE = [0] * 768
PALETTE[:3] = (255, 255, 255)
for _k, _rgb in enumerate(COLORS.values()):
    for _l in range(16):  # level l = ink coverage (l+1)/16 blended over white
        PALETTE[3 * (1 + 16 * _k + _l): 3 * (2 + 16 * _k + _l)] = [round(255 + (c - 255) * (_l + 1) / 16) for c in _rgb]
COLOR_INDEX = {name: 16 + 16 * k for k, name in enumerate(COLORS)}  # full-coverage (solid) palette index
RAMP = {name: [0] + [1 + 16 * k + a * 16 // 256 for a in range(1, 256)] for k, name in enumerate(COLORS)}
BINARY = [0] + [255] * 255


@lru_cache(maxsize=None)
def font(size):
    return ImageFont.load_default(size=size)  # Pillow's built-in scalable font: no download


def measure_text(text, max_w, max_h):
    """Largest font size (>= 6) whose ink box fits (max_w, max_h) -> (size, w, h)."""
    size = max(6, int(100 * max_w / font(100).getlength(text)))
    while True:
        l, t, r, b = font(size).getbbox(text)
        if (r - l <= max_w and b - t <= max_h) or size == 6:
            return size, r - l, b - t
        size -= 1


def unit_poly(points, x0, y0, w, h):
    """Map points from their own bounding box onto the pixel box (x0, y0, w, h)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    sx, sy = (w - 1) / (max(xs) - min(xs)), (h - 1) / (max(ys) - min(ys))
    return [(x0 + (x - min(xs)) * sx, y0 + (y - min(ys)) * sy) for x, y in points]


def regular(n, phase, scale=1.0):
    a = [2 * np.pi * i / n + phase for i in range(n)]
    return [(scale * np.cos(t), scale * np.sin(t)) for t in a]


STAR = [p for i in range(5) for p in (regular(5, -np.pi / 2)[i], regular(5, -np.pi / 2 + np.pi / 5, 0.4)[i])]


def draw_shape(d, kind, color, x0, y0, w, h):
    c = COLOR_INDEX[color]
    x1, y1 = x0 + w - 1, y0 + h - 1
    if kind == "circle":
        d.ellipse((x0, y0, x1, y1), fill=c)
    elif kind == "square":
        d.rectangle((x0, y0, x1, y1), fill=c)
    elif kind == "cross":
        d.rectangle((x0 + w * 0.33, y0, x1 - w * 0.33, y1), fill=c)
        d.rectangle((x0, y0 + h * 0.33, x1, y1 - h * 0.33), fill=c)
    else:
        pts = {"triangle": [(0.5, 0), (1, 1), (0, 1)], "diamond": [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)],
               "hexagon": regular(6, 0), "star": STAR}[kind]
        d.polygon(unit_poly(pts, x0, y0, w, h), fill=c)


def draw_object(d, kind, x0, y0, w, h):
    """Simple objects from Pillow primitives, each touching all four sides of its box."""
    C = COLOR_INDEX

    def box(a, b, c, e):  # fractions of the box -> pixels
        return (x0 + a * (w - 1), y0 + b * (h - 1), x0 + c * (w - 1), y0 + e * (h - 1))

    def poly(pts, color):
        d.polygon([(x0 + x * (w - 1), y0 + y * (h - 1)) for x, y in pts], fill=C[color])
    if kind == "stop sign":
        octagon = regular(8, np.pi / 8)
        d.polygon(unit_poly(octagon, x0, y0, w, h), fill=C["red"])
        d.polygon(unit_poly(octagon, x0 + w * 0.08, y0 + h * 0.08, w * 0.84, h * 0.84), fill=C["white"])
        d.polygon(unit_poly(octagon, x0 + w * 0.13, y0 + h * 0.13, w * 0.74, h * 0.74), fill=C["red"])
        d.rectangle(box(0.22, 0.43, 0.78, 0.57), fill=C["white"])
    elif kind == "traffic light":
        d.rectangle(box(0, 0, 1, 1), fill=C["gray"])
        for i, color in enumerate(("red", "yellow", "green")):
            d.ellipse(box(0.15, 0.05 + 0.31 * i, 0.85, 0.05 + 0.31 * i + 0.27), fill=C[color])
    elif kind == "house":
        poly([(0, 0.45), (0.5, 0), (1, 0.45)], "red")
        d.rectangle(box(0.12, 0.45, 0.88, 1), fill=C["yellow"])
        d.rectangle(box(0.42, 0.65, 0.6, 1), fill=C["brown"])
    elif kind == "tree":
        d.rectangle(box(0.38, 0.55, 0.62, 1), fill=C["brown"])
        d.ellipse(box(0, 0, 1, 0.72), fill=C["green"])
    elif kind == "car":
        poly([(0.2, 0.4), (0.32, 0), (0.68, 0), (0.8, 0.4)], "blue")
        d.rectangle(box(0, 0.38, 1, 0.8), fill=C["blue"])
        d.rectangle(box(0.36, 0.1, 0.64, 0.36), fill=C["sky"])
        for cx in (0.22, 0.78):
            d.ellipse(box(cx - 0.11, 0.56, cx + 0.11, 1), fill=C["black"])
    elif kind == "umbrella":
        d.pieslice(box(0, 0, 1, 1.1), 180, 360, fill=C["purple"])
        d.rectangle(box(0.47, 0.5, 0.53, 0.9), fill=C["black"])
        d.rectangle(box(0.47, 0.88, 0.75, 1), fill=C["black"])
    elif kind == "boat":
        poly([(0, 0.7), (1, 0.7), (0.8, 1), (0.2, 1)], "brown")
        d.rectangle(box(0.48, 0, 0.52, 0.7), fill=C["black"])
        poly([(0.55, 0.05), (0.55, 0.65), (0.92, 0.65)], "orange")
        poly([(0.45, 0.15), (0.45, 0.65), (0.12, 0.65)], "red")
    elif kind == "mug":
        d.ellipse(box(0.55, 0.2, 1, 0.75), fill=C["teal"])
        d.ellipse(box(0.66, 0.33, 0.88, 0.62), fill=0)
        d.rectangle(box(0, 0, 0.75, 1), fill=C["teal"])


def render(entities, base):
    """Draw the entities on a blank 2*base x 2*base canvas -> palette ("P") image."""
    canvas = Image.new("L", (2 * base, 2 * base), 0)  # palette indices; 0 = white background
    d = ImageDraw.Draw(canvas)
    for e in entities:
        x0, y0, w, h = e.box
        if e.family in ("word", "number"):
            l, t, _, _ = font(e.font_size).getbbox(e.name)
            mask = Image.new("L", (w, h), 0)
            ImageDraw.Draw(mask).text((-l, -t), e.name, fill=255, font=font(e.font_size))  # anti-aliased coverage
            canvas.paste(mask.point(RAMP[e.color]), (x0, y0), mask.point(BINARY))
        elif e.family == "shape":
            draw_shape(d, e.name.split()[1], e.color, x0, y0, w, h)
        else:
            draw_object(d, e.name, x0, y0, w, h)
    image = Image.frombytes("P", canvas.size, canvas.tobytes())
    image.putpalette(PALETTE)
    return image


# ----------------------------------------------------------------------------- scenes and questions

def cell_rc(cell):
    return (cell - 1) // 3, (cell - 1) % 3  # (row, col)


def relation(cell_a, cell_b):
    """Where cell_a lies relative to cell_b: left/right, above/below or a diagonal."""
    (ra, ca), (rb, cb) = cell_rc(cell_a), cell_rc(cell_b)
    v = "above" if ra < rb else "below" if ra > rb else ""
    h = "left" if ca < cb else "right" if ca > cb else ""
    if h and v:
        return {"above": "upper", "below": "lower"}[v] + " " + h
    return h or v


def family_of(name):
    """The family of an entity from its name (the answer text): word, number, object or shape."""
    if name in WORDS:
        return "word"
    if name in OBJECTS:
        return "object"
    return "number" if re.fullmatch(r"\d\.\d{3}", name) else "shape"


def noun(e):
    return {"word": f'the word "{e.name}"', "number": f"the number {e.name}"}.get(e.family, f"the {e.name}")


def plural(e):
    if e.family == "object":
        return OBJECTS[e.name][0]
    return e.name + ("es" if e.name.endswith("s") else "s")  # "red crosses"


def sample_entity(rng, family, cell):
    color = rng.choice(INK_COLORS)
    if family == "word":
        return Entity(family, rng.choice(WORDS), color, cell)
    if family == "number":
        return Entity(family, f"{rng.randint(0, 9)}.{rng.randint(0, 999):03d}", color, cell)
    if family == "object":
        return Entity(family, rng.choice(list(OBJECTS)), "", cell)
    return Entity(family, f"{color} {rng.choice(SHAPES)}", color, cell)


def same_family_names(rng, e, k):
    """k names of e's family, all different from e.name and each other (recognition distractors)."""
    names = set()
    while len(names) < k:
        other = sample_entity(rng, e.family, e.cell).name
        if other != e.name:
            names.add(other)
    return sorted(names)


def place(rng, e, base):
    """Size and position e in its cell: centred within a quarter of its own extent, MARGIN px inside the cell."""
    c = 2 * base / 3
    if e.family in ("word", "number"):  # text is thin: let it span more of the cell
        e.font_size, w, h = measure_text(e.name, rng.uniform(0.7, 0.9) * c, 0.8 * c)
    else:
        long_side = rng.uniform(0.55, 0.8) * c
        aspect = OBJECTS[e.name][1] if e.family == "object" else 1.0
        w, h = round(long_side * min(aspect, 1)), round(long_side / max(aspect, 1))
    row, col = cell_rc(e.cell)
    jx, jy = (max(0.0, min(s / 4, (c - s) / 2 - MARGIN)) for s in (w, h))
    x0 = round((col + 0.5) * c - w / 2 + rng.uniform(-jx, jx))
    y0 = round((row + 0.5) * c - h / 2 + rng.uniform(-jy, jy))
    e.box = (x0, y0, w, h)


def scene_split(entities, base):
    """The split a scene belongs to: parity of the SHA-256 of everything that determines its pixels."""
    key = json.dumps([base] + [[e.family, e.name, e.color, e.box, e.font_size] for e in entities])
    digest = hashlib.sha256(key.encode()).digest()
    return ("train", "test")[digest[0] & 1], digest.hex()


def sample_scene(rng, task, cell, families=FAMILIES):
    """Entities and (question, correct option, distractors) for one task with the questioned entity in `cell`."""
    if task == "recognition":
        e = sample_entity(rng, rng.choice(families), cell)
        return [e], "What is the object in the image?", e.name, same_family_names(rng, e, 3)
    if task == "position":
        a = sample_entity(rng, rng.choice(families), cell)
        b = sample_entity(rng, rng.choice(families), rng.choice([j for j in CELLS if j != cell]))
        while b.name == a.name:
            b = sample_entity(rng, rng.choice(families), b.cell)
        correct = relation(a.cell, b.cell)
        question = f"Where is {noun(a)} relative to {noun(b)} in the image?"
        return [a, b], question, correct, rng.sample([r for r in RELATIONS if r != correct], 3)
    # counting: 1-4 copies of one entity in distinct cells, the first in `cell`. Two or more copies always mix edge
    # and corner cells, with 1..k-1 edge copies drawn uniformly whatever `cell` is, so edge and other questions have
    # the same layouts (corner copies alone fall one per slice: counting non-empty slices would answer them)
    e = sample_entity(rng, rng.choice([f for f in ("object", "shape") if f in families]), cell)
    k, cells = rng.randint(1, 4), [cell]
    if k > 1:
        edge = rng.randint(1, k - 1) - (cell in EDGE_CELLS)  # edge copies besides the first
        cells += rng.sample([j for j in EDGE_CELLS if j != cell], edge)
        cells += rng.sample([j for j in OTHER_CELLS if j != cell], k - len(cells))
    copies = [Entity(e.family, e.name, e.color, j) for j in cells]
    correct = str(len(cells))
    return copies, f"How many {plural(e)} are there in the image?", correct, [n for n in "1234" if n != correct]


def schedule(rng, num):
    """Balanced (task, cell, letter) per sample: blocks of 27 hold every (task, cell), blocks of 4 every letter."""
    pairs, letters = [], []
    while len(pairs) < num:
        pairs += rng.sample([(t, c) for t in TASKS for c in CELLS], 27)
    while len(letters) < num:
        letters += rng.sample(LETTERS, 4)
    return [(t, c, letter) for (t, c), letter in zip(pairs[:num], letters[:num])]


def check_options(num, base, split, families=FAMILIES):
    """ValueError naming the first bad generate() argument (the CLI shows it as --name ...)."""
    if num <= 0:
        raise ValueError(f"num must be a positive integer, got {num}")
    if not MIN_BASE <= base <= MAX_BASE:
        raise ValueError(f"base must be in [{MIN_BASE}, {MAX_BASE}] (a 3 x 3 cell of 2*base/3 px must hold a legible "
                         f"entity), got {base}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if set(families) - set(FAMILIES) or not {"object", "shape"} & set(families):
        raise ValueError(f"families must be some of {FAMILIES} with object or shape (counting), got {families}")


def generate(out_dir, num, seed, base=336, split="train", families=FAMILIES):
    """Write out_dir/images/*.png, questions.jsonl and llava.json; return the question dicts. families restricts the
    entities (e.g. the tiny preset's splits); the benchmark uses all four."""
    check_options(num, base, split, families)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    rng = random.Random(f"entitygrid/{split}/{seed}")
    seen, questions = set(), []
    for i, (task, cell, letter) in enumerate(tqdm(schedule(rng, num), desc=f"entitygrid {split}", unit="img")):
        while True:  # resample the scene until it belongs to this split and is new in this run
            entities, question, correct, distractors = sample_scene(rng, task, cell, families)
            for e in entities:
                place(rng, e, base)
            owner, digest = scene_split(entities, base)
            if owner == split and digest not in seen:
                seen.add(digest)
                break
        options = rng.sample(distractors, 3)
        options.insert(LETTERS.index(letter), correct)
        image = f"images/{split}_{i:06d}.png"
        render(entities, base).save(os.path.join(out_dir, image), compress_level=1)
        questions.append({
            "id": f"{split}_{seed}_{i:06d}", "image": image, "task": task, "question": question, "options": options,
            "answer": letter, "cell": cell, "edge": cell in EDGE_CELLS, "positions": [e.cell for e in entities],
            "entities": [e.name for e in entities], "split": split})
    with open(os.path.join(out_dir, "questions.jsonl"), "w") as f:
        f.writelines(json.dumps(q) + "\n" for q in questions)
    llava = [{"id": q["id"], "image": q["image"], "conversations": [
        {"from": "human", "value": "<image>\n" + format_question(q)}, {"from": "gpt", "value": q["answer"]}]}
        for q in questions]
    with open(os.path.join(out_dir, "llava.json"), "w") as f:
        json.dump(llava, f, indent=1)
    return questions


# ----------------------------------------------------------------------------- whole entities (tiny ViT stage 0)

def entity_classes(families):
    """Names of every entity the families can draw (numbers excluded: 10,000 of them), in a fixed order."""
    return ([w for w in WORDS] if "word" in families else []) + (list(OBJECTS) if "object" in families else []) + \
        ([f"{c} {s}" for c in INK_COLORS for s in SHAPES] if "shape" in families else [])


def whole_entity_scene(rng, size, families=("object", "shape"), max_entities=3):
    """A size x size RGB image of 1..max_entities whole entities (never cut by the border), sizes from an overview's
    to a slice's scale, boxes not overlapping; a second entity repeats the first one's name half of the time, so
    scenes hold copies. -> (image, entities)."""
    names, entities = entity_classes(families), []
    for _ in range(rng.randint(1, max_entities)):
        name = entities[0].name if entities and rng.random() < 0.5 else rng.choice(names)
        e = Entity(family_of(name), name, name.split()[0] if family_of(name) == "shape" else "black", 0)
        for _ in range(20):  # rejection sampling of a free box
            long_side = rng.uniform(0.2, 0.6) * size
            if e.family == "word":
                e.font_size, w, h = measure_text(name, long_side, long_side)
            else:
                aspect = OBJECTS[name][1] if e.family == "object" else 1.0
                w, h = round(long_side * min(aspect, 1)), round(long_side / max(aspect, 1))
            x0, y0 = rng.randint(0, size - w), rng.randint(0, size - h)
            if all(x0 + w <= a or a + c <= x0 or y0 + h <= b or b + d <= y0 for a, b, c, d in
                   (f.box for f in entities)):
                e.box = (x0, y0, w, h)
                entities.append(e)
                break
    canvas = render(entities, size // 2).convert("RGB")
    return canvas, entities


def patch_targets(entities, names, size, patch):
    """Per-patch stage-0 targets of a whole_entity_scene, row-major (L, 6) float32: the class index of the entity
    under the patch centre (0: background, else 1 + index in names), the number of its copies in the scene, and its
    box (x0, y0, x1, y1) relative to the patch centre in units of the image size. Class, extent and copies are
    properties of the whole entity: a patch cannot tell them from its own pixels."""
    g = size // patch
    cy, cx = (a.flatten() for a in np.meshgrid((np.arange(g) + 0.5) * patch, (np.arange(g) + 0.5) * patch,
                                                  indexing="ij"))                      # (L,) patch centres
    out = np.zeros((g * g, 6), np.float32)
    for e in entities:
        x0, y0, w, h = e.box
        inside = (cx >= x0) & (cx < x0 + w) & (cy >= y0) & (cy < y0 + h)              # (L,)
        out[inside, 0] = 1 + names.index(e.name)
        out[inside, 1] = sum(f.name == e.name for f in entities)
        out[inside, 2:] = np.stack([x0 - cx, y0 - cy, x0 + w - cx, y0 + h - cy], 1)[inside] / size
    return out


def cut_entities(rng, n, size, patch, families=("object", "shape")):
    """n single whole entities at a slice's scale and, beside each, the same image with the entity's right half
    blanked from the patch boundary nearest its centre, as a slice border would cut it. -> whole, cut (n, 3, size,
    size) uint8 arrays and keep (n, L) bool: the patches left of the cut that hold part of the entity."""
    names, whole, cut, keep = entity_classes(families), [], [], []
    g = np.arange(size // patch) * patch                                                # left/top edge of each patch
    for _ in range(n):
        name = rng.choice(names)
        e = Entity(family_of(name), name, name.split()[0] if family_of(name) == "shape" else "black", 0)
        long_side = rng.uniform(0.4, 0.6) * size
        aspect = OBJECTS[name][1] if e.family == "object" else 1.0
        w, h = round(long_side * min(aspect, 1)), round(long_side / max(aspect, 1))
        x0, y0 = rng.randint(0, size - w), rng.randint(0, size - h)
        e.box = (x0, y0, w, h)
        pixels = np.asarray(render([e], size // 2).convert("RGB")).transpose(2, 0, 1)  # (3, S, S)
        at = max(patch, round((x0 + w / 2) / patch) * patch)
        halved = pixels.copy()
        halved[:, :, at:] = 255
        whole.append(pixels), cut.append(halved)
        cols, rows = (g + patch <= at) & (g + patch > x0), (g + patch > y0) & (g < y0 + h)
        keep.append((rows[:, None] & cols[None, :]).flatten())
    return np.stack(whole), np.stack(cut), np.stack(keep)


def load_questions(out_dir):
    with open(os.path.join(out_dir, "questions.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def text_qa_items(questions):
    """EntityGrid-QA as stage-2 data with option-text answers: the options listed without letters, the answer is
    the correct option's text (scored by likelihood ranking, --mc rank)."""
    return [{"id": q["id"], "image": q["image"], "conversations": [
        {"from": "human", "value": "<image>\n" + format_question(q, letters=False)},
        {"from": "gpt", "value": q["options"][LETTERS.index(q["answer"])]}]} for q in questions]


def caption_items(questions):
    """Stage-1 captions for EntityGrid-QA images (plain template): each entity's name and its cell."""
    return [{"id": q["id"], "image": q["image"], "conversations": [
        {"from": "human", "value": "<image>"},
        {"from": "gpt", "value": ", ".join(f"{e} in cell {c}" for e, c in zip(q["entities"], q["positions"]))}]}
        for q in questions]


def format_question(q, letters=True):
    """LLaVA's multiple-choice prompt of a question (conversation.multiple_choice): lettered options and the letter
    instruction; letters=False lists the options bare and asks for the option's text (likelihood ranking)."""
    return multiple_choice(q["question"], q["options"], letters)


def answer(model, images, questions, mc, max_new_tokens):
    """A HiResLLaVA's answers to questions (images: PIL images or preprocess() tuples), as `eval.py --bench
    entitygrid` gives them: mc="rank", the letter of the option whose text the model finds most likely after the
    bare options; mc="letter", the greedy text after LLaVA's lettered prompt (score() parses its letter)."""
    if mc == "rank":
        scores = model.option_logprobs(images, [format_question(q, letters=False) for q in questions],
                                       [q["options"] for q in questions])
        return [LETTERS[max(range(len(lp)), key=lp.__getitem__)] for lp in scores]
    return model.generate(images, [format_question(q) for q in questions], temperature=0.0,
                          max_new_tokens=max_new_tokens)


# ----------------------------------------------------------------------------- metric

def parse_letter(text):
    """Option letter in a model output, or None. Rule: the whole output (stripped of spaces, one pair of brackets and
    a final '.') is one letter A-D in either case; else it starts with an upper-case letter A-D in brackets "(B)" or
    followed by '.', ')' or ':' ("B. stop sign", "B) 2", "B:"). Anything else (e.g. "A stop sign") is unparsed."""
    s = text.strip()
    core = re.sub(r"^\((.*)\)$", r"\1", s.rstrip(".").strip()).strip()
    if len(core) == 1 and core.upper() in LETTERS:
        return core.upper()
    m = re.match(r"^(?:\(([A-D])\)|([A-D])[.):])", s)
    return (m.group(1) or m.group(2)) if m else None


def layout(positions):
    """'edge' when every entity of a question sits in an edge cell, 'corner' when none does, else 'mixed'."""
    edge = {p in EDGE_CELLS for p in positions}
    return "mixed" if len(edge) == 2 else "edge" if edge == {True} else "corner"


def discrepancy(acc_by_cell):
    """(edge, other, |edge - other|) from per-cell accuracies; cells without samples (None) are left out."""
    edge, other = mean(acc_by_cell[i] for i in EDGE_CELLS), mean(acc_by_cell[j] for j in OTHER_CELLS)
    return edge, other, (abs(edge - other) if edge is not None and other is not None else None)


def position_prior(cell, options):
    """The position accuracy of a reader that knows only the asked entity's cell and picks uniformly among the
    options that some other cell makes true (the correct one always is): 0.62 on average at a corner cell (3 of the 8
    relations are possible there), 0.40 at cells 2, 4, 6, 8 and 0.25 at cell 5. Position's own edge gap, with no
    fragmentation in it."""
    possible = {relation(cell, other) for other in CELLS if other != cell}
    return 1 / sum(o in possible for o in options)


def score(questions, predictions):
    """Accuracy and the paper's edge/centre Discrepancy (docs/method.md#entitygrid-qa).

    predictions: id -> model text (letter parsed by parse_letter; missing or unparsed = wrong).
    A question is located at its `cell`: the questioned entity's cell (entity A for position, the first copy for
    counting). Acc_i = mean over the tasks WITH samples at cell i of the task's
    accuracy at cell i; a cell without any sample is None and left out of the edge/other means. edge_accuracy and
    other_accuracy are means of Acc_i over edge cells (2,4,5,6,8) and other cells (1,3,7,9); discrepancy = |edge -
    other|. per_task_discrepancy applies the same formula to one task's per-cell accuracies; recognition_per_family
    is the recognition accuracy by the questioned entity's family (None without questions); per_task_layout is each
    task's accuracy by `layout` of all its entities (edge, corner, mixed; questions without `positions` left out),
    so counting shows its single edge copies, single corner copies and mixed copies apart. position_prior_per_cell
    is the mean position_prior of each cell's position questions and position_above_prior its accuracy minus that
    prior, per cell and as edge and other means: position read beyond what the cell alone gives. Accuracies are in
    [0, 1].
    """
    hits = {(t, i): [] for t in TASKS for i in CELLS}
    by_layout = {(t, l): [] for t in TASKS for l in LAYOUTS}
    for q in questions:
        right = parse_letter(predictions.get(q["id"], "")) == q["answer"]
        hits[q["task"], q["cell"]].append(right)
        if q.get("positions"):
            by_layout[q["task"], layout(q["positions"])].append(right)
    acc = {k: mean(v) for k, v in hits.items()}
    per_task_position = {t: {i: acc[t, i] for i in CELLS} for t in TASKS}
    per_position = {i: mean(acc[t, i] for t in TASKS) for i in CELLS}
    edge, other, disc = discrepancy(per_position)
    prior = {i: mean(position_prior(i, q["options"]) for q in questions
                     if q["task"] == "position" and q["cell"] == i and q.get("options")) for i in CELLS}
    above = {i: None if prior[i] is None else acc["position", i] - prior[i] for i in CELLS}
    above_edge, above_other, _ = discrepancy(above)
    return {
        "num": len(questions), "accuracy": mean(x for v in hits.values() for x in v),
        "per_task": {t: mean(x for i in CELLS for x in hits[t, i]) for t in TASKS},
        "per_position": per_position, "per_task_position": per_task_position,
        "edge_accuracy": edge, "other_accuracy": other, "discrepancy": disc,
        "per_task_discrepancy": {t: discrepancy(per_task_position[t])[2] for t in TASKS},
        "per_task_layout": {t: {l: mean(by_layout[t, l]) for l in LAYOUTS} for t in TASKS},
        "position_prior_per_cell": prior,
        "position_above_prior": {"per_cell": above, "edge": above_edge, "other": above_other},
        "recognition_per_family": {f: mean(parse_letter(predictions.get(q["id"], "")) == q["answer"] for q in questions
                                           if q["task"] == "recognition" and q.get("entities")
                                           and family_of(q["entities"][0]) == f) for f in FAMILIES}}


# ----------------------------------------------------------------------------- contact sheet

def contact_sheet(out_dir, png, count=9, thumb=256):
    """A few samples (spread over the tasks) with the 2 x 2 slice borders dashed and question/answer underneath."""
    questions = load_questions(out_dir)
    picks = [q for t in TASKS for q in [q for q in questions if q["task"] == t][:count // len(TASKS)]] or questions
    picks = picks[:count]
    cols, text_h, f = 3, 118, font(11)
    rows = (len(picks) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (thumb + 12) + 12, rows * (thumb + text_h + 12) + 12), "white")
    d = ImageDraw.Draw(sheet)
    for k, q in enumerate(picks):
        x, y = 12 + (k % cols) * (thumb + 12), 12 + (k // cols) * (thumb + text_h + 12)
        im = Image.open(os.path.join(out_dir, q["image"])).convert("RGB").resize((thumb, thumb), Image.BILINEAR)
        sheet.paste(im, (x, y))
        d.rectangle((x - 1, y - 1, x + thumb, y + thumb), outline=(180, 180, 180))
        mid = thumb // 2  # the slice border: the canvas is exactly 2 x 2 slices
        for s in range(0, thumb, 8):
            d.line((x + mid, y + s, x + mid, y + min(s + 4, thumb - 1)), fill=(230, 0, 120), width=1)
            d.line((x + s, y + mid, x + min(s + 4, thumb - 1), y + mid), fill=(230, 0, 120), width=1)
        lines = wrap(q["question"], f, thumb) + [f"{l}. {o}" for l, o in zip(LETTERS, q["options"])]
        lines.append(f"answer {q['answer']} | {q['task']} | cell {q['cell']} ({'edge' if q['edge'] else 'other'})")
        for j, line in enumerate(lines[:8]):
            d.text((x, y + thumb + 4 + 14 * j), line, fill=(0, 0, 0), font=f)
    sheet.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(png, optimize=True)
    return png


def wrap(text, f, width):
    lines, cur = [], ""
    for word in text.split():
        if cur and f.getlength(cur + " " + word) > width:
            lines.append(cur)
            cur = word
        else:
            cur = (cur + " " + word).strip()
    return lines + [cur]


# ----------------------------------------------------------------------------- CLI

def main(argv=None):
    p = argparse.ArgumentParser(description="Generate EntityGrid-QA (paper 3.4) or draw a contact sheet of it.",
                                usage=argparse.SUPPRESS)  # an error is one line, not a usage block above it
    p.add_argument("--out", help="output directory: gets images/*.png, questions.jsonl and llava.json")
    p.add_argument("--num", type=int, default=1000, help="number of questions (one image each), > 0")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives byte-identical output")
    p.add_argument("--base", type=int, default=336,
                   help=f"encoder resolution S; the canvas is 2S x 2S, i.e. exactly 2 x 2 slices; "
                        f"{MIN_BASE} <= S <= {MAX_BASE} so a cell (2S/3 px) holds a legible entity")
    p.add_argument("--split", choices=("train", "test"), default="train",
                   help="which split; train and test never share an image")
    p.add_argument("--show", metavar="DIR", help="instead of generating, draw a contact sheet of the dataset in DIR")
    p.add_argument("--png", help="contact sheet path (default DIR/contact_sheet.png)")
    args = p.parse_args(argv)
    if (args.out is None) == (args.show is None):
        p.error("give exactly one of --out DIR (generate) or --show DIR (contact sheet)")
    if args.show is not None:
        if not os.path.isfile(os.path.join(args.show, "questions.jsonl")):
            p.error(f"--show {args.show}: no questions.jsonl there (generate with --out first)")
        try:
            print(contact_sheet(args.show, args.png or os.path.join(args.show, "contact_sheet.png")))
        except OSError as e:
            p.error(f"--png {args.png}: cannot write the contact sheet ({e.strerror or e})")
        return
    try:
        check_options(args.num, args.base, args.split)
    except ValueError as e:
        p.error(f"--{e}")
    try:
        questions = generate(args.out, args.num, args.seed, args.base, args.split)
    except OSError as e:
        p.error(f"--out {args.out}: cannot write there ({e.strerror or e})")
    print(f"wrote {len(questions)} {args.split} questions to {args.out}")


if __name__ == "__main__":
    main()
