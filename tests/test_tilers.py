"""The peers' tilers (--tiler anyres, overlap, native): their upstream rules, their geometry, the equal LLM-token
budget, and a checkpoint that records its tiler for eval.py."""
import json
import os
import random
import sys

import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import clip  # noqa: E402
import eval as ev  # noqa: E402
import hires  # noqa: E402
import slicing  # noqa: E402
import train  # noqa: E402

S, P = 96, 16  # the tiny preset's ViT: base resolution and patch


def test_anyres_grid_choice_is_llava_nexts_rule():
    """select_best_resolution against transformers' own (LLaVA-NeXT's rule, (height, width) order there) on a table
    of sizes and on random ones; the table's expected canvases worked out by hand."""
    from transformers.image_processing_utils import select_best_resolution as upstream
    resolutions = slicing.anyres_resolutions(336, 4)
    table = {(672, 672): (672, 672), (1344, 672): (672, 336), (336, 1008): (336, 1008), (500, 400): (672, 672),
             (1000, 200): (1008, 336), (100, 100): (672, 336), (640, 480): (672, 672), (300, 900): (336, 1008)}
    for (w, h), best in table.items():
        assert slicing.select_best_resolution(w, h, resolutions) == best, (w, h)
    tie = [(672, 672), (672, 336)]  # a 2:1 image keeps as many pixels in both: the one that wastes less wins
    tie_hw = [(h, w) for w, h in tie]  # upstream's order
    assert slicing.select_best_resolution(2000, 1000, tie) == (672, 336) == upstream((1000, 2000), tie_hw)[::-1]
    rng = random.Random(0)
    for w, h in list(table) + [(rng.randint(1, 4000), rng.randint(1, 4000)) for _ in range(500)]:
        ref = upstream((h, w), [(rh, rw) for rw, rh in resolutions])
        assert slicing.select_best_resolution(w, h, resolutions) == (ref[1], ref[0]), (w, h)


def test_anyres_unpad_is_llava_nexts():
    """hires.unpad keeps the tokens of the resized image inside its padded canvas, as LLaVA-NeXT's unpad_image."""
    from transformers.models.llava_next.modeling_llava_next import unpad_image
    for rows, cols, w, h in [(12, 12, 192, 192), (12, 24, 300, 100), (24, 12, 90, 400), (6, 12, 640, 481)]:
        top, bottom, left, right = hires.unpad(rows, cols, w, h)
        ref = unpad_image(torch.zeros(1, rows, cols), (h, w))
        assert (bottom - top, right - left) == tuple(ref.shape[1:]), (rows, cols, w, h)
    assert hires.unpad(12, 24, 300, 100) == (2, 10, 0, 24)  # a 3:1 image on a 2:1 canvas: padded above and below


def patch_ids(width, height):
    """An image whose 16 x 16 patches each hold their own grey id (row-major), and the (rows, cols) id grid."""
    rows, cols = height // P, width // P
    ids = torch.arange(rows * cols).view(rows, cols)
    pixels = ids.repeat_interleave(P, 0).repeat_interleave(P, 1).to(torch.uint8)   # (H, W)
    return Image.fromarray(pixels.numpy()).convert("RGB"), ids


def test_overlap_interiors_tile_the_canvas_exactly_once():
    """Overlapping crops of a 2S x 2S canvas: crop_interiors + merge give back every patch of the canvas exactly
    once, in place (Molmo's margins dropped); the crops do overlap."""
    img, ids = patch_ids(2 * S, 2 * S)
    overview, crops, (m, n) = slicing.overlap_image(img, S, P, slicing.OVERLAP_CROPS)
    h, M = S // P, slicing.overlap_margin(S, P) // P
    assert (m, n) == (3, 3) and M == 1 and crops.shape == (9, 3, S, S)
    tokens = crops[:, 0, P // 2::P, P // 2::P].reshape(m * n, h * h, 1).float()    # each patch's id, (9, 36, 1)
    stitched = hires.merge(hires.crop_interiors(tokens, h, M), m, n, h - 2 * M, h - 2 * M)[0, 0]  # (12, 12)
    assert torch.equal(stitched.long(), ids)  # ids are unique: each patch once; the black padding (0) is dropped
    assert torch.equal(crops[0, :, :, S - 2 * M * P:], crops[1, :, :, :2 * M * P])  # neighbours share 2M pixels


def test_native_features_at_the_base_size_are_the_overviews():
    """At S x S no position interpolation happens: native's ViT features are the plain ViT's, bit for bit; at
    another size the interpolated positions give features of the interpolated grid."""
    torch.manual_seed(0)
    tower = hires.VisionTower(clip.CLIPConfig.from_preset("tiny"))
    x = torch.randn(2, 3, S, S)
    with torch.no_grad():
        assert torch.equal(tower.embed(x), tower.vit._embeds(x))
        assert torch.equal(tower.features(tower.prefix(x, 0), 0), tower(x))
        assert tower(torch.randn(1, 3, 224, 160)).shape == (1, 14 * 10, 64)
    img = Image.new("RGB", (2 * S, 2 * S), "white")
    assert slicing.native_image(img, P, 9)[2] == (3, 3)  # a budget of 9 tokens: the S x S image, 3 x 3 merged


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    """Tiny random backbones (the real formats) for the tiler models."""
    import stage0
    d = tmp_path_factory.mktemp("tilers")
    texts = ["a red square and a blue circle; USER: what is this? ASSISTANT: A B C D, 0.596 apple."] * 40
    return stage0.make_tiny_backbones(str(d), texts, vocab_size=300, max_slices=4, upscale=False)


@pytest.mark.parametrize("tiler", slicing.TILERS)
def test_every_tiler_gives_the_llm_an_equal_budget(tiny_cfg, tiler):
    """On EntityGrid-QA's 2S x 2S canvas every tiler gives the LLM hires's image-token count within 10%, and the
    count the config predicts is what encode_images lays out (a wrong count would cut samples or break batches)."""
    torch.manual_seed(0)
    model = hires.HiResLLaVA(hires.HiResConfig(**{**tiny_cfg.__dict__, "tiler": tiler, "sampler": "sms"}))
    img = Image.new("RGB", (2 * S, 2 * S), "white")
    pre = model.preprocess(img)
    with torch.no_grad():
        out = model.encode_images([pre, pre])
    hires_tokens = hires.HiResConfig(**{**tiny_cfg.__dict__, "tiler": "hires"}).image_tokens((2, 2))
    assert hires_tokens == 50
    assert out[0].shape[0] == model.image_tokens(pre[2]) == model.image_tokens(model.grid(img.size))
    assert abs(out[0].shape[0] - hires_tokens) <= 0.1 * hires_tokens, (tiler, out[0].shape[0])
    assert (model.sra is not None) == (tiler == "hires")


def test_anyres_keeps_only_the_images_tokens_of_a_wide_image(tiny_cfg):
    """A 5:2 image on anyres's best canvas (3:1): the padding's token columns are dropped and each kept row ends
    with the newline embedding."""
    torch.manual_seed(0)
    model = hires.HiResLLaVA(hires.HiResConfig(**{**tiny_cfg.__dict__, "tiler": "anyres"}))
    pre = model.preprocess(Image.new("RGB", (250, 100), "white"))
    m, n, w, h = pre[2]
    t = 6 // 2
    rows, cols = model.cfg.map_size(pre[2])
    assert (m, n) == (1, 3) and rows == m * t and cols == 7 < n * t
    with torch.no_grad():
        out = model.encode_images([pre])[0]
    newline = out[t * t + cols::cols + 1]  # after the overview's t*t tokens, every (cols+1)-th token
    assert len(newline) == rows and torch.equal(newline, model.newline.expand(rows, -1))


def test_checkpoint_records_its_tiler_and_eval_follows_it(tmp_path):
    """A short anyres run: the checkpoint's config.json says anyres, eval.py answers with the anyres model (the same
    answers as train.py's own evaluation), and a --tiler that is not the checkpoint's is one line."""
    out, data = tmp_path / "run", tmp_path / "data"
    common = ["--data-dir", str(data), "--train-size", "64", "--test-size", "27", "--vocab-size", "400",
              "--batch1", "16", "--batch2", "16", "--micro-batch", "8", "--threads", "1", "--random-backbones",
              "--steps1", "2", "--steps2", "2"]
    train.main(["--out", str(out), "--tiler", "anyres", *common])
    with open(out / "stage2" / "config.json") as f:
        assert json.load(f)["tiler"] == "anyres"
    metrics = ev.main(["--bench", "entitygrid", "--data", str(data / "test"), "--ckpt", str(out / "stage2"),
                       "--out", str(tmp_path / "eval"), "--dtype", "fp32"])
    with open(out / "predictions.json") as f:
        ours = {p["id"]: p["answer"] for p in json.load(f)}
    with open(tmp_path / "eval" / "predictions.json") as f:
        theirs = {p["id"]: p["answer"] for p in json.load(f)}
    assert ours == theirs and metrics["provenance"]["slicing"]["tiler"] == "anyres"
    with pytest.raises(SystemExit, match="trained with the anyres tiler"):
        ev.main(["--bench", "entitygrid", "--data", str(data / "test"), "--ckpt", str(out / "stage2"),
                 "--out", str(tmp_path / "eval2"), "--tiler", "native"])
    with pytest.raises(SystemExit, match="trained the anyres tiler in stage 1"):
        train.main(["--out", str(tmp_path / "run2"), "--stage", "2", "--init", str(out / "stage1"), "--tiler",
                    "overlap", *common])


def test_a_peer_tilers_run_resumes_with_its_own_flags(tmp_path):
    """A run of a peer's tiler records sra off (HiResConfig turns it off); --resume with the run's own flags is
    accepted, and --resume under another tiler is refused in one line."""
    import dataclasses
    ckpt = tmp_path / "run" / "stage1" / "checkpoints" / "step-0000001"
    ckpt.mkdir(parents=True)
    (ckpt.parent / "latest").write_text(ckpt.name)
    argv = ["--out", str(tmp_path / "run"), "--stage", "1", "--tiler", "anyres"]
    args = train.parse_args(argv)
    cfg = hires.HiResConfig(clip_preset="tiny", mc=args.mc, **{k: getattr(args, k) for k in train.MODEL_FLAGS})
    (ckpt / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    assert cfg.sra is False and train.parse_args(argv + ["--resume"]).tiler == "anyres"
    with pytest.raises(SystemExit):
        train.parse_args(argv[:-2] + ["--resume"])
