"""hires.py: slicing, SRA, SMS, the full tiny model, checkpoints, bad images."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

import clip
import hires
from llama import IGNORE_INDEX, IMAGE_TOKEN_INDEX


def test_slice_grid_properties():
    S = 336
    assert hires.slice_grid(2 * S, 2 * S, S, 16, upscale=False) == (2, 2)
    assert hires.slice_grid(2 * S, 2 * S, S, 16, upscale=True) == (4, 4)
    assert hires.slice_grid(1, 1, S) == (2, 2)
    for w in (1, 7, 335, 336, 337, 1000, 3000, 10000):
        for h in (1, 100, 336, 999, 5000):
            m, n = hires.slice_grid(w, h, S, 16)
            assert 1 <= m * n <= 16
            if math.ceil(h / S) * math.ceil(w / S) > 16:  # shrunk: no fitting grid has a closer aspect ratio
                err = abs(math.log(n / m) - math.log(w / h))
                assert all(abs(math.log(c / r) - math.log(w / h)) >= err - 1e-12
                           for r in range(1, 17) for c in range(1, 16 // r + 1))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "L", "P", "I;16", "I", "F", "CMYK", "1"])
def test_preprocess_any_mode_and_size(mode):
    for size in ((1, 1), (10000, 100), (50, 70)):
        ov, sl, (m, n) = hires.preprocess_image(Image.new(mode, size), base=32, max_slices=16)
        assert ov.shape == (3, 32, 32) and sl.shape == (m * n, 3, 32, 32) and torch.isfinite(sl).all()


def test_bad_images(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    (tmp_path / "trunc.png").write_bytes((tmp_path / "ok.png").read_bytes()[:60])
    for name in ("missing.png", "empty.png", "text.jpg", "trunc.png"):
        with pytest.raises(hires.ImageError, match=name):
            hires.load_image(tmp_path / name)
    assert hires.load_image(tmp_path / "ok.png").mode == "RGB"


def test_merge_split_identity():
    p = torch.randn(6, 16, 5)
    assert torch.equal(hires.split(hires.merge(p, 2, 3, 4, 4), 2, 3, 4, 4), p)


def _slice_features(tower, sra, x, grid):
    return tower(x, [grid], {3: sra})


def test_sra_zero_init_and_cross_slice_context():
    torch.manual_seed(0)
    cfg = clip.CLIPConfig.from_preset("tiny")
    tower = clip.VisionTower(cfg)
    sra = hires.SliceRestoreAdapter(cfg.width, cfg.heads, cfg.grid)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():  # bit-identical in the same grad mode (MultiheadAttention's fast path differs by ulps)
        assert torch.equal(_slice_features(tower, sra, x, (2, 2)), tower(x))  # untrained adapter: ViT unchanged
    torch.nn.init.normal_(sra.proj.weight, std=0.1)
    x2 = x.clone()
    x2[0] += 1.0  # change confined to slice 0
    on = (_slice_features(tower, sra, x, (2, 2)) - _slice_features(tower, sra, x2, (2, 2)))[1].abs().max()
    off = (tower(x) - tower(x2))[1].abs().max()
    assert on > 1e-4 and off == 0


def test_sms_tokens_and_locality():
    torch.manual_seed(0)
    g, k, D = 8, 2, 32
    for window in (False, True):
        sms = hires.SelfMiningSampler(D, 4, g, k, window)
        p = torch.randn(1, g * g, D, requires_grad=True)
        out = sms(p)
        assert out.shape == (1, (g // k) ** 2, D)
        j = 5  # window row 1, col 1 -> tokens (2..3, 2..3)
        (grad,) = torch.autograd.grad(out[0, j].sum(), p)
        mass = grad[0].abs().sum(-1).view(g, g)
        own = mass[2:4, 2:4].sum()
        assert own > 0.5 * mass.sum()
        if window:
            assert own == mass.sum()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    texts = ["a red square and a blue circle; USER: what is this? ASSISTANT: A B C D, 0.596 apple."] * 40
    return hires.make_tiny_backbones(d, texts, seed=0, vocab_size=300), d


def _batch(model):
    ims = [model.preprocess(Image.new("RGB", (100, 40), "red")), model.preprocess(Image.new("RGBA", (30, 90))), None]
    ids = [[1, 5, IMAGE_TOKEN_INDEX, 6, 7], [1, IMAGE_TOKEN_INDEX, 8, 9, 10], [1, 4, 5, 6]]
    labels = [[IGNORE_INDEX] * 3 + [6, 7], [IGNORE_INDEX] * 2 + [8, 9, 10], [IGNORE_INDEX, 5, 6, IGNORE_INDEX]]
    return ids, labels, ims


@pytest.mark.parametrize("sampler", ["sms", "qformer", "avgpool"])
def test_model_stages_grads_generate(tiny, sampler):
    cfg, _ = tiny
    torch.manual_seed(0)
    model = hires.HiResLLaVA(hires.HiResConfig(**{**cfg.__dict__, "sampler": sampler}))
    ids, labels, ims = _batch(model)
    assert ims[0][2] != ims[1][2]  # mixed-aspect batch
    for stage in (1, 2):
        model.set_stage(stage)
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels, ims)
        loss.backward()
        assert torch.isfinite(loss)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {n for n, p in model.named_parameters() if p.grad is not None}
        assert not any(n.startswith("vision.") for n in trainable)
        assert any(n.startswith("sra.") for n in trainable) == (stage == 2)
    out = model.generate([Image.new("RGB", (200, 50)), None], ["what is this?", "hi"], max_new_tokens=3)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)


def test_token_count_matches_encoding(tiny):
    cfg, _ = tiny
    model = hires.HiResLLaVA(cfg)
    im = model.preprocess(Image.new("RGB", (100, 40)))
    per = (clip.CLIPConfig.from_preset("tiny").grid // cfg.kernel) ** 2
    m, n = im[2]
    assert model.encode_images([im])[0].shape[0] == hires.image_token_count(m, n, per)


def test_checkpoint_round_trip_and_mismatch(tiny, tmp_path):
    cfg, _ = tiny
    model = hires.HiResLLaVA(cfg)
    with torch.no_grad():
        for p in model.trainable_state_dict().values():
            p.add_(torch.randn_like(p))
    hires.save_checkpoint(model, tmp_path / "ck")
    loaded = hires.load_checkpoint(tmp_path / "ck")
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(v, loaded.trainable_state_dict()[k]), k
    with pytest.raises(ValueError, match="missing"):
        hires.load_checkpoint(tmp_path / "ck", sampler="avgpool")


def test_show_draws_the_slicing_png(tmp_path, capsys):
    Image.new("RGB", (1280, 720), "white").save(tmp_path / "wide.png")
    hires.main(["--show", str(tmp_path / "wide.png"), "--png", str(tmp_path / "s.png")])
    with Image.open(tmp_path / "s.png") as im:
        assert im.format == "PNG" and im.width > 360
    assert hires.slice_grid(1280, 720) == (3, 4)  # the grid the picture draws; 144 tokens/image at k=2, /14
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(SystemExit, match="empty.png"):
        hires.main(["--show", str(tmp_path / "empty.png")])
