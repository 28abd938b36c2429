"""results/premises.py: the text toy's premise checks measure what they say
(docs/method.md#words-and-numbers-the-premise-checks)."""
import dataclasses
import importlib.util
import json
import os
import random

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("premises", os.path.join(ROOT, "results", "premises.py"))
premises = importlib.util.module_from_spec(spec)
spec.loader.exec_module(premises)

SMALL = premises.TextConfig(probe_images=60, fonts=(12,))


def test_glyphs_sit_on_rows_and_tile_their_string():
    """Each string's glyph spans tile its advance, and its middle line is a row centre (a multiple of the patch at
    both scales): the probe's token holds the glyph whole vertically."""
    rng = random.Random(0)
    for size, row in ((96, 16), (192, 16), (96, 8)):
        canvas, glyphs = premises.text_scene(rng, size, [("3.141", 10), ("river", 9), ("0.007", 14)], row)
        assert len(glyphs) >= 10 and canvas.size == (size, size)
        for _, cx, cy, x0, x1 in glyphs:
            assert x0 < cx < x1 and abs((cy - row / 2) / row - round((cy - row / 2) / row)) * row <= 0.5
        ends = [(x0, x1) for _, _, _, x0, x1 in glyphs]
        assert sum(a[1] == b[0] for a, b in zip(ends, ends[1:])) >= len(glyphs) - 3  # 3 strings: 2 gaps


def test_pixel_reader_reads_large_digits_and_a_shuffled_probe_does_not():
    """The ideal reader at font 12 reads the slice's digits; the same probe fitted on shuffled classes is at
    chance: the probe's accuracy is the reader's, not the evaluation's."""
    rng = random.Random(1)
    classes = [premises.CLASS[c] for c in premises.FAMILIES["number"]]
    train = premises.reader_rows(SMALL, "pixels", *premises.probe_images(rng, SMALL, 60, 12, "slice", "number"))
    test = premises.reader_rows(SMALL, "pixels", *premises.probe_images(rng, SMALL, 40, 12, "slice", "number"))
    probe = premises.SlotProbe(1, classes, 1.0).fit(*train)
    assert premises.accuracy(probe.predict(*test[:2]), test[2], "number") >= 0.9
    shuffled = train[2][torch.randperm(len(train[2]), generator=torch.Generator().manual_seed(0))]
    probe = premises.SlotProbe(1, classes, 1.0).fit(train[0], train[1], shuffled)
    assert premises.accuracy(probe.predict(*test[:2]), test[2], "number") <= 0.3


def test_text_stage0_teaches_the_encoder_glyphs(tmp_path):
    """600 steps of the text stage 0 (a 3-block encoder, fonts 8-12) raise the slice-scale probe of font-8 digits
    well above the random encoder's (measured +0.25); the second call reads the cached encoder."""
    cfg = dataclasses.replace(SMALL, steps=600, batch=16, layers=3, stage0_fonts=(8, 12))
    torch.set_num_threads(2)
    random_vit = premises.build_encoder(cfg).requires_grad_(False).eval()
    trained = premises.train_text_encoder(cfg, str(tmp_path / "enc.safetensors"), lambda line: None)
    acc = {name: premises.fit_probe(cfg, reader, random.Random(2), 8, "slice", "number")[1]
           for name, reader in (("random", random_vit), ("trained", trained))}
    assert acc["trained"] >= acc["random"] + 0.15, acc
    again = premises.train_text_encoder(cfg, str(tmp_path / "enc.safetensors"), lambda line: None)
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), again.state_dict().values()))


def test_cut_check_cuts_glyphs_and_writes_its_verdict(tmp_path, capsys):
    """The cut check finds digits whose span crosses the border, writes JSON and prints one line."""
    premises.main(["cut", "--steps", "0", "--fonts", "12", "--out", str(tmp_path), "--work", str(tmp_path / "w"),
                   "--threads", "2", "--probe-images", "60"])
    out = capsys.readouterr().out.strip().splitlines()
    result = json.load(open(tmp_path / "cut.json"))
    assert out[-1].startswith("premise cut: ") and str(tmp_path / "cut.json") in out[-1]
    rows = {r["reader"]: r for r in result["rows"]}
    assert set(rows) == {"random", "trained"} and all(r["cut_glyphs"] >= 10 for r in rows.values())
    assert all(r["drop"] == round(r["uncut"] - max(r["centre"], r["both"]), 4) for r in rows.values())
