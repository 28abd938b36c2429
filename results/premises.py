"""The text toy's premise checks: can a slice read a glyph that the overview cannot, and does a slice border damage
a glyph it cuts? (docs/method.md#words-and-numbers-the-premise-checks)

Words and numbers belong in EntityGrid-QA only if high resolution is what reads them, as in the paper's Fig. 4
(a number split across two slices is misread). Two checks decide it before any study; each is one command that
writes a JSON file and prints one line:

    python results/premises.py legibility   # one font size with slice >= 0.90 and overview <= 0.30 per character
    python results/premises.py cut          # a glyph cut by a slice border is read >= 0.20 worse than uncut

Both read glyphs with a linear probe (SlotProbe) from three readers, at slice scale (a base x base crop of the
2*base canvas at full resolution) and at overview scale (the canvas through slicing.make_overview):
- `pixels`: the raw grey pixels of a window centred on the glyph: the ideal aligned linear reader, no encoder;
- `random`: the tokens of a random tiny open_clip ViT (the feature layer, as hires.VisionTower reads it);
- `trained`: the same ViT taught text in a stage 0 of its own (train_text_encoder): whole, uncut strings of
  both families at every font size in TextConfig.stage0_fonts, each token naming the glyphs whose centres it holds
  at their sub-positions. That is the probe's own question, so the encoder reads as well as it can be made to.
Text lines are centred on rows of ROW px of the canvas, so that a glyph lies in one row of 8- or 16-px tokens at
both scales (a glyph across two rows would make both scales harder, not the difference).
"""
import argparse
import functools
import hashlib
import json
import math
import os
import random
import string
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import entitygrid  # noqa: E402
import slicing  # noqa: E402
from clip import CLIPConfig, build_vision_tower  # noqa: E402
from hires import vit_block  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DIGITS, LETTERS = string.digits, string.ascii_lowercase
CHARS = DIGITS + "." + LETTERS
CLASS = {c: i for i, c in enumerate(CHARS)}
FAMILIES = {"number": DIGITS + ".", "word": LETTERS}  # the classes a family's probe chooses among
SCORED = {"number": DIGITS, "word": LETTERS}            # the glyphs it is scored on (the '.' carries no digit)
ROW = 16       # the pitch of text rows on the 2*base canvas, px
WINDOW = 12    # the pixel reader's window, px at its scale


@dataclass
class TextConfig:
    base: int = 96                   # the tiny preset's base resolution; the canvas is 2*base
    patch: int = 8                   # reads small glyphs better than 16 px (the tiny preset's, in p16/)
    width: int = 64
    layers: int = 6
    heads: int = 4
    slots: int = 2                   # sub-positions per token: a patch may hold two glyph centres
    steps: int = 5000
    batch: int = 32
    lr: float = 2e-3
    stage0_fonts: tuple = (4, 20)    # font sizes of stage 0, uniform (both scales' glyphs)
    fonts: tuple = (4, 5, 6, 7, 8, 9, 10, 12, 14)
    # probe training images per (family, font, scale), 3 strings each; a third as many choose the ridge strength,
    # two thirds as many test it; the cut check puts as many numbers on the border
    probe_images: int = 300
    seed: int = 0


# ----------------------------------------------------------------------------------------------------------------
# text with per-glyph geometry

def number(rng):
    return f"{rng.randint(0, 9)}.{rng.randint(0, 999):03d}"  # EntityGrid-QA's number family


def word(rng):
    if rng.random() < 0.5:
        return rng.choice(entitygrid.WORDS)
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))


def draw_text(canvas, text, size, ox, oy, color):
    """Draw text on an RGB canvas with its ink box's top-left at (ox, oy) -> [(class, cx, cy, x0, x1)] per glyph:
    the glyph's advance span [x0, x1) and centre, on the ink box's middle line."""
    f = entitygrid.font(size)
    l, t, _, b = f.getbbox(text)
    ImageDraw.Draw(canvas).text((ox - l, oy - t), text, fill=entitygrid.COLORS[color], font=f)
    cy = oy + (b - t) / 2
    glyphs = []
    for i, ch in enumerate(text):
        x0, x1 = ox - l + f.getlength(text[:i]), ox - l + f.getlength(text[:i + 1])
        glyphs.append((CLASS[ch], (x0 + x1) / 2, cy, x0, x1))
    return glyphs


def text_scene(rng, size, items, row, tries=30):
    """items [(text, font)] drawn without overlap on a white size x size canvas, each ink box centred on a row of
    `row` px -> (canvas, glyphs of all strings)."""
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    boxes, glyphs = [], []
    for text, fs in items:
        l, t, r, b = entitygrid.font(fs).getbbox(text)
        w, h = r - l, b - t
        if w + 2 >= size:
            continue
        for _ in range(tries):
            x, y = rng.randint(1, size - w - 1), round((rng.randrange(size // row) + 0.5) * row - h / 2)
            if 0 <= y <= size - h and all(x + w + 2 <= a or a + c + 2 <= x or y + h + 2 <= bb or bb + d + 2 <= y
                                          for a, bb, c, d in boxes):
                boxes.append((x, y, w, h))
                glyphs += draw_text(canvas, text, fs, x, y, rng.choice(entitygrid.INK_COLORS))
                break
    return canvas, glyphs


def probe_images(rng, cfg, n, font, scale, family):
    """n images of 3 strings of one family -> pixels (n, 3, base, base) uint8, glyphs [(image, class, cx, cy)] in
    the image's px. 'slice': the strings on a base canvas at full resolution (a slice is a crop at full resolution);
    'overview': on the 2*base canvas, then slicing.make_overview, the model's own overview."""
    make = number if family == "number" else word
    pixels, glyphs = [], []
    for i in range(n):
        size = cfg.base if scale == "slice" else 2 * cfg.base
        canvas, gs = text_scene(rng, size, [(make(rng), font) for _ in range(3)], ROW)
        f = cfg.base / size
        pixels.append(slicing.to_tensor(canvas if f == 1 else slicing.make_overview(canvas, cfg.base)))
        glyphs += [(i, cls, cx * f, cy * f) for cls, cx, cy, _, _ in gs]
    return torch.stack(pixels), glyphs


# ----------------------------------------------------------------------------------------------------------------
# the readers

def build_encoder(cfg):
    torch.manual_seed(cfg.seed)
    ccfg = CLIPConfig.from_preset("tiny", image_size=cfg.base, patch_size=cfg.patch, width=cfg.width,
                                  layers=cfg.layers, heads=cfg.heads)
    return build_vision_tower(ccfg)


def tokens(vit, pixels):
    """uint8 pixels (N, 3, S, S) -> the feature layer's tokens (N, L, D): the output of the penultimate block, CLS
    dropped, as hires.VisionTower gives them to the sampler."""
    x = vit._embeds(slicing.normalize(pixels))
    for blk in vit.transformer.resblocks[:len(vit.transformer.resblocks) - 1]:
        x = vit_block(blk, x)
    return x[:, 1:]


def glyph_slots(cfg, cx, cy):
    """A glyph's centre -> (token index, slot) at its scale: the patch holding the centre, the sub-position in it."""
    g = cfg.base // cfg.patch
    c, r = min(g - 1, int(cx // cfg.patch)), min(g - 1, int(cy // cfg.patch))
    return r * g + c, min(cfg.slots - 1, int(cfg.slots * (cx - c * cfg.patch) / cfg.patch))


def stage0_scene(rng, cfg):
    """A base x base scene of 1-4 strings at fonts uniform in stage0_fonts, on rows of ROW px (the slices') or
    ROW / 2 (the overview's) -> pixels, targets (L, slots): the class of the glyph centred in each slot, -100 else."""
    items = [(number(rng) if rng.random() < 0.5 else word(rng), rng.randint(*cfg.stage0_fonts))
             for _ in range(rng.randint(1, 4))]
    canvas, glyphs = text_scene(rng, cfg.base, items, rng.choice((ROW, ROW // 2)))
    target = torch.full(((cfg.base // cfg.patch) ** 2, cfg.slots), -100, dtype=torch.long)
    for cls, cx, cy, _, _ in glyphs:
        target[glyph_slots(cfg, cx, cy)] = cls
    return slicing.to_tensor(canvas), target


def train_text_encoder(cfg, cache, log):
    """Stage 0 for text: the ViT and a linear head on its feature layer learn to name each glyph at its slot
    (cross-entropy on the slots that hold a glyph's centre; AdamW, warmup then cosine) -> the trained ViT, kept in
    the file cache for the other check."""
    vit = build_encoder(cfg)
    if os.path.exists(cache):
        vit.load_state_dict(load_file(cache))
        log(f"text stage 0: the trained encoder from {cache}")
        return vit.requires_grad_(False).eval()
    head = nn.Sequential(nn.LayerNorm(cfg.width), nn.Linear(cfg.width, cfg.slots * len(CHARS)))
    params = list(vit.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.05)
    warm = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, cfg.steps)))))
    rng = random.Random(f"premises/stage0/{cfg.seed}")
    for step in range(cfg.steps):
        pixels, target = (torch.stack(t) for t in zip(*[stage0_scene(rng, cfg) for _ in range(cfg.batch)]))
        logits = head(tokens(vit, pixels)).view(-1, len(CHARS))        # (B * L * slots, classes)
        loss = F.cross_entropy(logits, target.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == cfg.steps - 1:
            hit = target.flatten() != -100
            acc = (logits[hit].argmax(1) == target.flatten()[hit]).float().mean().item()
            log(f"text stage 0 step {step + 1}/{cfg.steps} loss {loss.item():.3f} glyph accuracy {acc:.3f}")
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, cache + ".tmp")
    os.replace(cache + ".tmp", cache)
    return vit.requires_grad_(False).eval()


class SlotProbe:
    """Ridge regression from a standardised token to one-hot glyph classes, one weight matrix per slot: the
    features are token (x) one-hot(slot), with a bias per slot."""

    def __init__(self, slots, classes, lam):
        self.slots, self.classes, self.lam = slots, classes, lam

    def design(self, x, s):
        z = torch.cat([(x - self.mu) / self.sd, torch.ones(len(x), 1)], 1)   # (N, D+1)
        out = torch.zeros(len(z), self.slots, z.shape[1])
        out[torch.arange(len(z)), s] = z
        return out.flatten(1)                                               # (N, slots * (D+1))

    def fit(self, x, s, y):
        self.mu, self.sd = x.mean(0), x.std(0) + 1e-6
        X = self.design(x, s)
        Y = F.one_hot(torch.tensor([self.classes.index(v) for v in y.tolist()]), len(self.classes)).float()
        self.W = torch.linalg.solve(X.T @ X + self.lam * len(X) / 1000 * torch.eye(X.shape[1]), X.T @ Y)
        return self

    def scores(self, x, s):
        return self.design(x, s) @ self.W                                  # (N, classes)

    def predict(self, x, s):
        return torch.tensor(self.classes)[self.scores(x, s).argmax(1)]


def reader_rows(cfg, reader, pixels, glyphs):
    """The reader's view of each glyph -> x (N, F), slot (N,), class (N,). A ViT reads the token holding the centre;
    'pixels' reads the WINDOW x WINDOW grey window centred on it (slot 0)."""
    ys = torch.tensor([cls for _, cls, _, _ in glyphs])
    if reader == "pixels":
        grey = F.pad(pixels.float().mean(1) / 255, (WINDOW,) * 4, value=1.0)     # (N, S + 2W, S + 2W)
        x = torch.stack([grey[i, round(cy) + WINDOW // 2:round(cy) + WINDOW // 2 + WINDOW,
                              round(cx) + WINDOW // 2:round(cx) + WINDOW // 2 + WINDOW].flatten()
                         for i, _, cx, cy in glyphs])
        return x, torch.zeros(len(glyphs), dtype=torch.long), ys
    with torch.no_grad():
        feats = torch.cat([tokens(reader, pixels[i:i + 64]) for i in range(0, len(pixels), 64)])
    where = torch.tensor([glyph_slots(cfg, cx, cy) for _, _, cx, cy in glyphs])
    return feats[torch.tensor([i for i, _, _, _ in glyphs]), where[:, 0]], where[:, 1], ys


def accuracy(pred, y, family):
    scored = torch.tensor([CHARS[v] in SCORED[family] for v in y.tolist()])
    return (pred[scored] == y[scored]).float().mean().item()


def fit_probe(cfg, reader, rng, font, scale, family):
    """A probe fitted at one (font, scale, family), its ridge strength chosen on held-out images -> (probe, test
    accuracy)."""
    classes = [CLASS[c] for c in FAMILIES[family]]
    train, val, test = (reader_rows(cfg, reader, *probe_images(rng, cfg, n, font, scale, family))
                        for n in (cfg.probe_images, cfg.probe_images // 3, 2 * cfg.probe_images // 3))
    slots = 1 if reader == "pixels" else cfg.slots

    def val_accuracy(lam):
        return accuracy(SlotProbe(slots, classes, lam).fit(*train).predict(*val[:2]), val[2], family)

    lam = max((1e-1, 1.0, 1e1), key=val_accuracy)
    probe = SlotProbe(slots, classes, lam).fit(*train)
    return probe, accuracy(probe.predict(*test[:2]), test[2], family)


# ----------------------------------------------------------------------------------------------------------------
# the checks

def legibility(cfg, readers, log):
    """Per-character accuracy per (reader, family, font) at slice and overview scale; the premise holds for a reader
    at a font where slice >= 0.90 and overview <= 0.30 for numbers."""
    rows = []
    for name, reader in readers.items():
        for family in FAMILIES:
            for font in cfg.fonts:
                rng = random.Random(f"premises/legibility/{family}/{font}/{cfg.seed}")
                row = dict(reader=name, family=family, font=font)
                for scale in ("slice", "overview"):
                    row[scale] = round(fit_probe(cfg, reader, rng, font, scale, family)[1], 4)
                rows.append(row)
                log(f"legibility {name:7s} {family:6s} font {font:2d}: slice {row['slice']:.3f} "
                    f"overview {row['overview']:.3f}")
    holds = [r for r in rows if r["family"] == "number" and r["slice"] >= 0.90 and r["overview"] <= 0.30]
    return rows, holds


def cut_damage(cfg, readers, log):
    """Numbers centred on the vertical slice border x = base (jittered by a quarter of their width, as
    entitygrid.place), read by the slice-scale probe from the two slices; each cut glyph (its advance span crosses
    the border) from the token holding its centre and from both border tokens (scores summed), against the same
    string moved left by base / 2 (a multiple of the patch: the same alignment) so that it lies whole in one slice.
    drop: uncut accuracy minus the better of the two cut readings; drop_middle: the same over the digits cut within
    a quarter of their width from their centre."""
    rows = []
    for name, reader in readers.items():
        if name == "pixels":
            continue  # the pixels of the two halves are the pixels of the whole: nothing to lose
        for font in cfg.fonts:
            rng = random.Random(f"premises/cut/{font}/{cfg.seed}")
            probe, _ = fit_probe(cfg, reader, rng, font, "slice", "number")
            hits = dict(uncut=[], centre=[], both=[], middle_uncut=[], middle_centre=[], middle_both=[])
            S, g = cfg.base, cfg.base // cfg.patch
            for _ in range(cfg.probe_images):
                text = number(rng)
                l, t, r, b = entitygrid.font(font).getbbox(text)
                ox = round(S - (r - l) / 2 + rng.uniform(-(r - l) / 4, (r - l) / 4))
                oy = round((rng.randrange(S // ROW) + 0.5) * ROW - (b - t) / 2)
                color = rng.choice(entitygrid.INK_COLORS)
                cut, whole = (Image.new("RGB", (2 * S, S), (255, 255, 255)) for _ in range(2))
                glyphs = draw_text(cut, text, font, ox, oy, color)
                moved = draw_text(whole, text, font, ox - S // 2, oy, color)
                pixels = torch.stack([slicing.to_tensor(im.crop(box)) for im, box in
                                      ((cut, (0, 0, S, S)), (cut, (S, 0, 2 * S, S)), (whole, (0, 0, S, S)))])
                with torch.no_grad():
                    feats = tokens(reader, pixels)                                  # (3, L, D)
                for (cls, cx, cy, x0, x1), (_, ux, uy, _, _) in zip(glyphs, moved):
                    if not x0 < S < x1 or CHARS[cls] not in SCORED["number"]:
                        continue
                    t_u, s_u = glyph_slots(cfg, ux, uy)
                    hits["uncut"].append(probe.predict(feats[2, t_u][None], torch.tensor([s_u])).item() == cls)
                    side, lx = (0, cx) if cx < S else (1, cx - S)
                    t_c, s_c = glyph_slots(cfg, lx, cy)
                    hits["centre"].append(probe.predict(feats[side, t_c][None], torch.tensor([s_c])).item() == cls)
                    r_ = t_c // g  # the border tokens: the left slice's last column, the right slice's first
                    both = (probe.scores(feats[0, r_ * g + g - 1][None], torch.tensor([cfg.slots - 1]))
                            + probe.scores(feats[1, r_ * g][None], torch.tensor([0])))
                    hits["both"].append(probe.classes[both.argmax().item()] == cls)
                    if abs(cx - S) <= (x1 - x0) / 4:  # cut near its middle: the worst case, half on each side
                        for k in ("uncut", "centre", "both"):
                            hits[f"middle_{k}"].append(hits[k][-1])
            row = dict(reader=name, font=font, cut_glyphs=len(hits["uncut"]), cut_middle=len(hits["middle_uncut"]),
                       **{k: round(sum(v) / max(1, len(v)), 4) for k, v in hits.items()})
            row["drop"] = round(row["uncut"] - max(row["centre"], row["both"]), 4)
            row["drop_middle"] = round(row["middle_uncut"] - max(row["middle_centre"], row["middle_both"]), 4)
            rows.append(row)
            log(f"cut {name:7s} font {font:2d}: {row['cut_glyphs']} cut digits, uncut {row['uncut']:.3f}, cut read "
                f"from the centre's token {row['centre']:.3f}, from both border tokens {row['both']:.3f}: drop "
                f"{row['drop']:.3f} (cut near the middle: {row['drop_middle']:.3f} of {row['cut_middle']})")
    return rows, [r for r in rows if r["drop"] >= 0.20]


def markdown(result, command):
    """The result as a table, per-character accuracy (cut: of the digits a border cuts)."""
    cfg = result["config"]
    lines = [f"# Premise check: {result['check']}", "",
             f"`{command}`: a {cfg['layers']}-block ViT, patch {cfg['patch']}, width {cfg['width']}, text stage 0 of "
             f"{cfg['steps']} steps of {cfg['batch']} scenes ("
             + ("read from the cache of an earlier run" if result["stage0_s"] is None else
                f"{result['stage0_s']:.0f} s") + f"); {result['wall_s']:.0f} s in all. Holds: "
             + (", ".join(f"{r['reader']} at font {r['font']}" for r in result["holds"]) or "nowhere") + ".", ""]
    if result["check"] == "legibility":
        readers = list(dict.fromkeys(r["reader"] for r in result["rows"]))
        lines += ["| family | font | " + " | ".join(f"{r} slice | {r} overview" for r in readers) + " |",
                  "|---|---|" + "---|---|" * len(readers)]
        cells = {(r["reader"], r["family"], r["font"]): r for r in result["rows"]}
        for family in FAMILIES:
            for font in cfg["fonts"]:
                lines.append(f"| {family} | {font} | " + " | ".join(
                    f"{cells[n, family, font]['slice']:.3f} | {cells[n, family, font]['overview']:.3f}"
                    for n in readers) + " |")
    else:
        lines += ["| reader | font | cut digits | uncut | cut, centre's token | cut, both border tokens | drop | "
                  "cut near the middle | its drop |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['reader']} | {r['font']} | {r['cut_glyphs']} | {r['uncut']:.3f} | {r['centre']:.3f} | "
                  f"{r['both']:.3f} | {r['drop']:.3f} | {r['cut_middle']} | {r['drop_middle']:.3f} |"
                  for r in result["rows"]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("check", choices=("legibility", "cut"), help="which premise to check")
    p.add_argument("--steps", type=int, default=TextConfig.steps, help="text stage-0 steps of the trained reader")
    p.add_argument("--patch", type=int, default=TextConfig.patch, help="the encoder's patch size, px")
    p.add_argument("--layers", type=int, default=TextConfig.layers, help="the encoder's blocks")
    p.add_argument("--fonts", default=",".join(map(str, TextConfig.fonts)), help="font sizes probed, px")
    p.add_argument("--probe-images", type=int, default=TextConfig.probe_images,
                   help="probe training images per (family, font, scale); a third as many choose its ridge strength, "
                        "two thirds test, as many numbers sit on the border")
    p.add_argument("--seed", type=int, default=TextConfig.seed, help="seed of the encoder, its stage 0 and probes")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", default=os.path.join(HERE, "premises"), help="folder of the JSON results")
    p.add_argument("--work", default=os.path.join(os.path.dirname(HERE), "runs", "premises"),
                   help="folder of the trained encoder, shared by the two checks")
    args = p.parse_args(argv)
    try:
        fonts = tuple(int(f) for f in args.fonts.split(","))
    except ValueError:
        p.error(f"--fonts takes comma-separated integers, got {args.fonts!r}")
    if (min(fonts) < 3 or args.probe_images < 30 or args.steps < 0 or args.layers < 2 or args.patch < 2
            or TextConfig.base % args.patch):
        p.error("need --fonts >= 3, --probe-images >= 30, --steps >= 0, --layers >= 2 and a --patch >= 2 that "
                "divides 96")
    cfg = TextConfig(steps=args.steps, patch=args.patch, layers=args.layers, fonts=fonts, seed=args.seed,
                     slots=max(1, args.patch // 4), probe_images=args.probe_images)
    torch.set_num_threads(args.threads)
    log = functools.partial(print, flush=True)  # a long run logged to a file shows its progress
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    encoder = {k: v for k, v in asdict(cfg).items() if k not in ("probe_images", "fonts")}
    cache = os.path.join(args.work, "text-encoder-" + hashlib.sha256(json.dumps(encoder).encode()).hexdigest()[:12]
                         + ".safetensors")
    cached = os.path.exists(cache)
    readers = {"pixels": "pixels", "random": build_encoder(cfg).requires_grad_(False).eval(),
               "trained": train_text_encoder(cfg, cache, log)}
    stage0_s = None if cached else round(time.time() - t0, 1)  # None: trained by an earlier run, read from cache
    rows, holds = (legibility if args.check == "legibility" else cut_damage)(cfg, readers, log)
    result = dict(check=args.check, config=asdict(cfg), rows=rows, holds=holds, stage0_s=stage0_s,
                  wall_s=round(time.time() - t0, 1))
    path = os.path.join(args.out, f"{args.check}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
    with open(path[:-4] + "md", "w") as f:
        f.write(markdown(result, " ".join(["python results/premises.py", *(argv or sys.argv[1:])])))
    if args.check == "legibility":
        best = max((r for r in rows if r["family"] == "number" and r["reader"] == "trained"),
                   key=lambda r: r["slice"] - r["overview"])
        verdict = (f"holds at font {holds[0]['font']} ({holds[0]['reader']})" if holds else
                   f"does not hold: the trained encoder's widest gap is at font {best['font']}, slice "
                   f"{best['slice']:.3f} vs overview {best['overview']:.3f} (need >= 0.90 and <= 0.30)")
    else:
        best = max((r for r in rows if r["reader"] == "trained"), key=lambda r: r["drop"])
        verdict = (f"holds at font {holds[0]['font']} ({holds[0]['reader']})" if holds else
                   f"does not hold: the trained encoder's largest drop is {best['drop']:.3f} at font {best['font']} "
                   f"(need >= 0.20)")
    print(f"premise {args.check}: {verdict} -> {path} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
