"""hires.py: slicing, SRA, SMS, the full tiny model, checkpoints, bad images."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import clip
import hires
import slicing
import stage0
from conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX, encode_conversation, encode_prompt


def test_slice_grid_properties():
    S = 336
    assert slicing.slice_grid(2 * S, 2 * S, S, 16, upscale=False) == (2, 2)
    assert slicing.slice_grid(2 * S, 2 * S, S, 16, upscale=True) == (4, 4)
    assert slicing.slice_grid(1, 1, S) == (2, 2)
    assert slicing.slice_grid(5000, 5000, S, 16) == (4, 4)  # shrunk; equal aspect: the larger grid wins the tie
    assert slicing.slice_grid(10000, 100, S, 16) == (1, 16)
    for w in (1, 7, 335, 336, 337, 1000, 3000, 10000):
        for h in (1, 100, 336, 999, 5000):
            m, n = slicing.slice_grid(w, h, S, 16)
            assert 1 <= m * n <= 16
            if math.ceil(h / S) * math.ceil(w / S) > 16:  # shrunk: no fitting grid has a closer aspect ratio
                err = abs(math.log(n / m) - math.log(w / h))
                assert all(abs(math.log(c / r) - math.log(w / h)) >= err - 1e-12
                           for r in range(1, 17) for c in range(1, 16 // r + 1))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "L", "P", "I;16", "I", "F", "CMYK", "1"])
def test_preprocess_any_mode_and_size(mode):
    for size in ((1, 1), (10000, 100), (50, 70)):
        ov, sl, (m, n) = slicing.preprocess_image(Image.new(mode, size), base=32, max_slices=16)
        assert ov.shape == (3, 32, 32) and sl.shape == (m * n, 3, 32, 32) and torch.isfinite(sl).all()


def test_bad_images(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    (tmp_path / "trunc.png").write_bytes((tmp_path / "ok.png").read_bytes()[:60])
    for name in ("missing.png", "empty.png", "text.jpg", "trunc.png"):
        with pytest.raises(slicing.ImageError, match=name):
            slicing.load_image(tmp_path / name)
    assert slicing.load_image(tmp_path / "ok.png").mode == "RGB"


def test_tiles_and_merge_are_row_major():
    """merge puts preprocess's slices back where they were cut: pixels as 'tokens' give the resized image back."""
    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (32, 48, 3), dtype=np.uint8))
    _, sl, (m, n) = slicing.preprocess_image(img, base=16, max_slices=6, upscale=False)
    assert (m, n) == (2, 3)
    p = sl.flatten(2).transpose(1, 2)                                       # (m*n, S*S, 3)
    full = slicing.to_tensor(img.resize((3 * 16, 2 * 16), Image.BICUBIC))    # (3, m*S, n*S)
    assert torch.equal(hires.merge(p, m, n, 16, 16)[0], full)
    assert torch.equal(hires.split(hires.merge(p, m, n, 16, 16), m, n, 16, 16), p)


def test_sra_runs_images_of_one_grid_together_as_one_by_one():
    """An SRA call on G images that share a grid gives each image what a call on that image alone gives: merge, fuse
    and split never mix images."""
    torch.manual_seed(0)
    sra = hires.SliceRestoreAdapter(16, 2, 4)
    torch.nn.init.normal_(sra.proj.weight, std=0.1)
    p = torch.randn(3 * 2 * 3, 16, 16)  # 3 images of 2 x 3 slices of 4 x 4 tokens
    together = sra(p, (2, 3))
    alone = torch.cat([sra(q, (2, 3)) for q in p.split(6)])
    torch.testing.assert_close(together, alone)
    assert not torch.allclose(together[:6], sra(p[6:12], (2, 3)))  # a different image gives a different term
    f = hires.merge(p, 2, 3, 4, 4)
    assert f.shape == (3, 16, 8, 12) and torch.equal(hires.split(f, 2, 3, 4, 4), p)


def _slice_features(tower, sra, x, grid):
    return tower(x, [grid], {3: sra})


def test_sra_zero_init_and_cross_slice_context():
    torch.manual_seed(0)
    cfg = clip.CLIPConfig.from_preset("tiny")
    tower = hires.VisionTower(cfg)
    sra = hires.SliceRestoreAdapter(cfg.width, cfg.heads, cfg.grid)
    x = torch.randn(4, 3, cfg.image_size, cfg.image_size)
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
        j = 6  # window row 1, col 2 -> tokens (2..3, 4..5)
        (grad,) = torch.autograd.grad(out[0, j].sum(), p)
        mass = grad[0].abs().sum(-1).view(g, g)
        own = mass[2:4, 4:6].sum()
        assert own > 0.5 * mass.sum()
        if window:
            assert own == mass.sum()
    # the queries (and the avgpool baseline) are the k x k window means, row-major
    p = torch.randn(2, g * g, D)
    means = p.view(2, g // k, k, g // k, k, D).mean((2, 4)).flatten(1, 2)
    assert torch.allclose(hires.SelfMiningSampler(D, 4, g, k).queries(p, (g, g)), means, atol=1e-6)
    assert torch.allclose(hires.AvgPoolSampler(g, k)(p), means, atol=1e-6)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    texts = ["a red square and a blue circle; USER: what is this? ASSISTANT: A B C D, 0.596 apple."] * 40
    return stage0.make_tiny_backbones(d, texts, seed=0, vocab_size=300), d


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
        allowed = ("sampler.", "projector.") + (("sra.",) if stage == 2 else ())
        assert all(n.startswith(allowed) or (stage == 2 and "lora_" in n) for n in trainable)  # no ViT, no LLM base
        assert any(n.startswith("sra.") for n in trainable) == (stage == 2)
    out = model.generate([Image.new("RGB", (200, 50)), None], ["what is this?", "hi"], max_new_tokens=3)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)


@pytest.fixture(scope="module")
def model(tiny):
    torch.manual_seed(0)
    return hires.HiResLLaVA(tiny[0])


@torch.no_grad()
def test_token_layout_and_separators(model):
    im = model.preprocess(Image.new("RGB", (100, 40)))
    L = clip.CLIPConfig.from_preset("tiny").grid ** 2
    per, (m, n) = L // model.cfg.kernel ** 2, im[2]
    assert m > 1 and n > 1
    out = model.encode_images([im])[0]
    assert out.shape[0] == per + 1 + m * n * (per + 1)  # overview, (a), each slice followed by (b) or (c)
    a, b, c = (model.llm.embed(torch.tensor([model.seps[k]]))[0] for k in ("sep_overview", "sep_slice", "sep_row"))
    assert len(a) == len(b) == len(c) == 1 and not torch.equal(b, c)
    ends = [per] + [per + 1 + (r * n + j + 1) * (per + 1) - 1 for r in range(m) for j in range(n)]
    seps = [a] + [b if j < n - 1 else c for r in range(m) for j in range(n)]  # (a), then (b) in a row, (c) at its end
    for e, sep in zip(ends, seps):
        assert torch.equal(out[e:e + 1], sep)
    assert model.image_tokens((m, n)) == model.cfg.image_tokens((m, n)) == out.shape[0]
    model.cfg.sample_overview = False  # the overview keeps all L tokens
    try:
        assert model.encode_images([im])[0].shape[0] == model.image_tokens((m, n)) == L + 1 + m * n * (per + 1)
    finally:
        model.cfg.sample_overview = True
    for flag in ("overview", "slices"):  # the length check of training counts what encode_images lays out
        setattr(model.cfg, flag, False)
        try:
            im = model.preprocess(Image.new("RGB", (100, 40)))
            assert model.image_tokens(im[2]) == model.encode_images([im])[0].shape[0]
        finally:
            setattr(model.cfg, flag, True)


def test_token_layout_order_and_count():
    assert hires.token_layout(2, 2) == ["overview", "sep_overview", 0, "sep_slice", 1, "sep_row", 2, "sep_slice", 3,
                                          "sep_row"]
    assert hires.token_layout(0, 0) == ["overview"] and hires.token_layout(1, 2, overview=False) == [
        0, "sep_slice", 1, "sep_row"]
    # the paper preset: 144 tokens per image after SMS, 16 slices -> 144 + 1 + 16 * 145 (docs/method.md)
    assert hires.token_count(hires.token_layout(4, 4), 144, 144) == 2465
    two = {"sep_overview": 2, "sep_slice": 2, "sep_row": 2}  # a tokenizer that splits each separator in two
    assert hires.token_count(hires.token_layout(2, 4), 576, 144, two) == 576 + 2 + 8 * (144 + 2)


@torch.no_grad()
def test_sra_changes_the_slices_not_the_overview(model):
    im = model.preprocess(Image.new("RGB", (100, 40), "red"))
    per = (clip.CLIPConfig.from_preset("tiny").grid // model.cfg.kernel) ** 2
    sra, model.sra = model.sra, None
    try:
        off = model.encode_images([im])[0]
    finally:
        model.sra = sra
    saved = {k: v.clone() for k, v in sra.state_dict().items()}
    try:
        for a in sra.values():
            torch.nn.init.normal_(a.proj.weight, std=0.1)
        on = model.encode_images([im])[0]
    finally:
        sra.load_state_dict(saved)
    assert torch.allclose(on[:per], off[:per], atol=1e-6)  # overview: plain ViT (paper 2.4)
    assert not torch.allclose(on[per + 1:], off[per + 1:], atol=1e-3)


def test_splice_places_image_and_masks_its_labels(model):
    C = model.llm.model.embed_tokens.weight.shape[1]
    image = torch.randn(7, C)
    emb, lab = model.splice([1, 5, IMAGE_TOKEN_INDEX, 6, 7], [IGNORE_INDEX, 5, IGNORE_INDEX, 6, 7], image)
    text = model.llm.embed(torch.tensor([[1, 5, 6, 7]]))[0]
    assert torch.equal(emb, torch.cat([text[:2], image, text[2:]]))
    assert lab.tolist() == [IGNORE_INDEX, 5] + [IGNORE_INDEX] * 7 + [6, 7]
    with pytest.raises(ValueError, match="placeholders"):
        model.splice([1, 5, 6], None, image)


def test_checkpoint_round_trip_and_mismatch(tiny, tmp_path):
    cfg, _ = tiny
    model = hires.HiResLLaVA(cfg)
    with torch.no_grad():
        for p in model.trainable_state_dict().values():
            p.add_(torch.randn_like(p))
    checkpoints.save_checkpoint(model, tmp_path / "ck")
    loaded = checkpoints.load_checkpoint(tmp_path / "ck")
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(v, loaded.trainable_state_dict()[k]), k
    with pytest.raises(ValueError, match="missing"):
        checkpoints.load_checkpoint(tmp_path / "ck", sampler="avgpool")
    # train.py on a GPU: bf16 backbones, fp32 trained tensors, loaded without rounding through bf16
    mixed = checkpoints.load_checkpoint(tmp_path / "ck", dtype=torch.bfloat16, adapter_dtype=torch.float32)
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(v, mixed.trainable_state_dict()[k]), k


def test_bf16_backbones_fp32_adapters_train_under_autocast(tiny):
    cfg, _ = tiny
    torch.manual_seed(0)
    model = hires.HiResLLaVA(cfg, dtype=torch.bfloat16, adapter_dtype=torch.float32)
    adapters = set(model.trainable_state_dict())
    assert adapters and all((p.dtype == torch.float32) == (n in adapters) for n, p in model.named_parameters())
    assert model.llm.rope_cos.dtype == torch.float32  # RoPE tables are never rounded
    model.set_stage(2)
    ids, labels, ims = _batch(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels, ims)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_show_draws_the_slicing_png(tmp_path, capsys):
    Image.new("RGB", (1280, 720), "white").save(tmp_path / "wide.png")
    slicing.main(["--show", str(tmp_path / "wide.png"), "--png", str(tmp_path / "s.png")])
    with Image.open(tmp_path / "s.png") as im:
        assert im.format == "PNG" and im.width > 360
    assert slicing.slice_grid(1280, 720) == (3, 4)  # the grid the picture draws; 144 tokens/image at k=2, /14
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(SystemExit, match="empty.png"):
        slicing.main(["--show", str(tmp_path / "empty.png")])


def test_option_logprobs_sum_each_options_tokens(model):
    """option_logprobs = the sum of log-softmax(full logits) over the answer's tokens and </s>, each sequence scored
    alone (so padding the options of a batch together changes nothing)."""
    images, prompts = [Image.new("RGB", (100, 40), "red"), None], ["what is this?", "hi"]
    options = [["A B", "C", "apple"], ["D", "0.596"]]
    with torch.no_grad():
        scores = model.option_logprobs(images, prompts, options)
        for im, p, opts, got in zip(images, prompts, options, scores):
            assert len(got) == len(opts)
            for o, s in zip(opts, got):
                human = p if im is None else "<image>\n" + p
                ids, lab = encode_conversation([{"from": "human", "value": human}, {"from": "gpt", "value": o}],
                                               model.tokenizer)
                emb = model.encode_images([model.preprocess(im)])[0] if im is not None else None
                e, lab = model.splice(ids, lab, emb)
                logp = model.llm(input_embeds=e[None])[0].log_softmax(-1)       # (T, V)
                ref = sum(logp[t, lab[t + 1]] for t in range(len(lab) - 1) if lab[t + 1] != IGNORE_INDEX)
                assert s == pytest.approx(ref.item(), abs=1e-4)  # fp32, different padding and batch
    assert model.option_logprobs(images[:1], prompts[:1], options[:1])[0] == pytest.approx(scores[0], abs=1e-4)


def _assert_same_loss_and_grads(model, ids, labels, pixels, cached):
    """One forward + backward on preprocessed images and on their Prefix tuples: the same loss and gradients."""
    results = []
    for images in (pixels, cached):
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels, images)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (l1, g1), (l2, g2) = results
    assert l1 == pytest.approx(l2, abs=1e-6) and g1.keys() == g2.keys()
    for n in g1:  # fp32; the prefix ran in another batch composition
        torch.testing.assert_close(g1[n], g2[n], atol=1e-5, rtol=1e-4)


def test_prefix_cache_gives_the_same_loss_and_gradients(tiny):
    """Prefix tuples (the frozen blocks before the first SRA layer, computed once) stand in for pixels: the same
    loss and gradients in both stages, SRA active."""
    cfg, _ = tiny
    torch.manual_seed(0)
    model = hires.HiResLLaVA(cfg)
    for a in model.sra.values():  # a trained SRA: its output is not zero
        torch.nn.init.normal_(a.proj.weight, std=0.1)
    ids, labels, ims = _batch(model)
    cached = [None if im is None else model.prefix([im])[0] for im in ims]
    assert isinstance(cached[0], hires.Prefix) and cached[0].slices.shape[0] == len(ims[0][1])
    for stage in (1, 2):
        model.set_stage(stage)
        _assert_same_loss_and_grads(model, ids, labels, ims, cached)
    mixed = [c if i % 2 else im for i, (im, c) in enumerate(zip(ims, cached))]  # pixels and Prefix in one batch
    with pytest.raises(ValueError, match="mixes cached ViT prefixes"):
        model.prefix([im for im in mixed if im is not None])


@pytest.mark.parametrize("off", ["sra", "slices"])
def test_prefix_without_sra_holds_the_features(tiny, off):
    """Without an SRA (--no-sra, or overview only) no ViT block trains: the prefix runs every block up to the
    feature layer, and a step on cached images runs no ViT block, with the loss and gradients of pixels."""
    cfg, _ = tiny
    torch.manual_seed(0)
    model = hires.HiResLLaVA(hires.HiResConfig(**{**cfg.__dict__, off: False}))
    assert model.sra is None and model.prefix_depth == model.vision.feature_layer + 1
    ids, labels, ims = _batch(model)
    cached = [None if im is None else model.prefix([im])[0] for im in ims]
    calls = []
    for blk in model.vision.vit.transformer.resblocks:
        blk.ln_1.register_forward_hook(lambda *_: calls.append(1))
    model.set_stage(2)
    _assert_same_loss_and_grads(model, ids, labels, ims, cached)
    assert len(calls) == model.vision.feature_layer + 1  # the pixels' step only (overviews and slices together)


def test_train_llm_trains_and_saves_the_whole_llm(tiny, tmp_path):
    cfg, _ = tiny
    torch.manual_seed(0)
    model = hires.HiResLLaVA(hires.HiResConfig(**{**cfg.__dict__, "train_llm": True, "lora_rank": 0}))
    llm = {n for n, _ in model.named_parameters() if n.startswith("llm.")}
    for stage in (1, 2):
        model.set_stage(stage)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert llm <= trainable and not any(n.startswith("vision.") for n in trainable)
        assert any(n.startswith("sra.") for n in trainable) == (stage == 2)
    with torch.no_grad():
        model.llm.lm_head.weight.add_(1.0)  # as if trained
    checkpoints.save_checkpoint(model, tmp_path / "ck")
    loaded = checkpoints.load_checkpoint(tmp_path / "ck")
    assert torch.equal(loaded.llm.lm_head.weight, model.llm.lm_head.weight)
    assert set(loaded.trainable_state_dict()) == set(model.trainable_state_dict()) >= {"llm." + n for n in (
        "lm_head.weight", "model.norm.weight", "model.embed_tokens.weight")}


def test_merged_checkpoint_is_an_hf_llama_and_answers_the_same(tiny, tmp_path, capsys):
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import eval as ev
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    model = hires.HiResLLaVA(tiny[0])
    with torch.no_grad():  # a trained-looking LoRA and SRA, so merging has something to fold in
        for n, p in model.named_parameters():
            if "lora_B" in n or n.startswith("sra."):
                p.normal_(0, 0.05)
    checkpoints.save_checkpoint(model, tmp_path / "ckpt")
    ev.main(["--ckpt", str(tmp_path / "ckpt"), "--merge", str(tmp_path / "merged")])
    assert "LoRA merged" in capsys.readouterr().out
    llm = tmp_path / "merged" / "llm"
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= set(os.listdir(llm))
    merged = ev.load_model(str(tmp_path / "merged"))  # eval.py runs from it as from any checkpoint
    assert merged.cfg.lora_rank == 0 and not any("lora_" in n for n, _ in merged.named_parameters())
    tokens = torch.randint(3, 300, (2, 12))
    hf = LlamaForCausalLM.from_pretrained(llm).eval()
    with torch.no_grad():  # fp32, same ops up to order: float rounding only
        torch.testing.assert_close(hf(tokens).logits, model.llm(tokens), atol=1e-4, rtol=1e-4)
    images = [Image.new("RGB", s, c) for s, c in (((100, 40), "red"), ((30, 90), "blue"), ((64, 64), "green"))]
    prompts = ["what is this?", "which colour is the shape on the left?", "count"]
    model.eval()
    assert merged.generate(images, prompts, max_new_tokens=8) == model.generate(images, prompts, max_new_tokens=8)


def test_merged_holds_the_adapters_only_and_moves_with_its_run(tiny, tmp_path, capsys):
    """With the whole LLM trained (the tiny preset), merged/model.safetensors still holds no llm.* tensor (they are in
    merged/llm/); the tiny llm/ folder is a complete HF directory with its tokenizer; a moved merged folder loads."""
    import json
    import os
    import shutil
    import sys
    from dataclasses import replace
    from safetensors.torch import load_file
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import eval as ev
    cfg = replace(tiny[0], lora_rank=0, train_llm=True)
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"} <= \
        set(os.listdir(cfg.llm_path)) and cfg.tokenizer_path == os.path.join(cfg.llm_path, "tokenizer.model")
    torch.manual_seed(0)
    model = hires.HiResLLaVA(cfg)
    with torch.no_grad():
        model.llm.lm_head.weight.add_(0.5)  # as if trained
    checkpoints.save_checkpoint(model, tmp_path / "run" / "stage2")
    assert any(k.startswith("llm.") for k in load_file(tmp_path / "run" / "stage2" / "model.safetensors"))
    ev.main(["--ckpt", str(tmp_path / "run" / "stage2"), "--merge", str(tmp_path / "run" / "merged")])
    assert not any(k.startswith("llm.") for k in load_file(tmp_path / "run" / "merged" / "model.safetensors"))
    stored = json.loads((tmp_path / "run" / "merged" / "config.json").read_text())
    assert (stored["llm_path"], stored["tokenizer_path"], stored["train_llm"]) == ("llm", "llm/tokenizer.model", False)
    shutil.move(tmp_path / "run", tmp_path / "moved")
    merged = ev.load_model(str(tmp_path / "moved" / "merged"))
    assert torch.equal(merged.llm.lm_head.weight, model.llm.lm_head.weight)
    images, prompts = [Image.new("RGB", (100, 40), "red")], ["what is this?"]
    model.eval()
    assert merged.generate(images, prompts, max_new_tokens=6) == model.generate(images, prompts, max_new_tokens=6)


def test_stage1_checkpoint_warns_when_merged(tiny, tmp_path, capsys):
    from dataclasses import replace
    import eval as ev
    checkpoints.save_checkpoint(hires.HiResLLaVA(replace(tiny[0], template="plain")), tmp_path / "stage1")
    ev.main(["--ckpt", str(tmp_path / "stage1"), "--merge", str(tmp_path / "merged")])
    assert "is a stage-1 checkpoint" in capsys.readouterr().err


def test_pixels_travel_as_uint8_and_are_normalised_on_the_device():
    img = Image.fromarray(np.random.RandomState(1).randint(0, 256, (50, 70, 3), dtype=np.uint8))
    ov, sl, _ = slicing.preprocess_image(img, base=32, max_slices=4)
    assert ov.dtype == sl.dtype == torch.uint8  # a 16-slice ViT-L sample: 5.8 MB instead of 23 MB of float32
    x = torch.from_numpy(np.asarray(slicing.make_overview(img, 32), dtype=np.float32) / 255.0).permute(2, 0, 1)
    reference = (x - torch.tensor(slicing.CLIP_MEAN)[:, None, None]) / torch.tensor(slicing.CLIP_STD)[:, None, None]
    assert slicing.normalize(ov).dtype == torch.float32 and torch.equal(slicing.normalize(ov), reference)


def test_vit_checkpointing_through_sra_blocks_same_gradients_less_memory(model):
    """Activation checkpointing in the ViT blocks autograd runs through (SRA ones up to the feature block): the same
    gradients, and far fewer activations kept for backward."""
    im = [model.preprocess(Image.new("RGB", (100, 40), "red")), model.preprocess(Image.new("RGB", (60, 90)))]
    model.set_stage(2)
    with torch.no_grad():
        for a in model.sra.values():
            a.proj.weight.normal_(0, 0.02)  # a non-zero SRA output, so its inputs get gradients too
    saved, grads = {}, {}
    try:
        for ckpt in (False, True):
            model.vision.gradient_checkpointing = ckpt
            model.zero_grad(set_to_none=True)
            sizes = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t,
                                                          lambda t: t):
                out = torch.cat(model.encode_images(im))
            out.pow(2).sum().backward()
            saved[ckpt] = sum(sizes)
            grads[ckpt] = {n: p.grad.clone() for n, p in model.named_parameters() if n.startswith("sra.")}
    finally:
        model.vision.gradient_checkpointing = False
        for a in model.sra.values():
            torch.nn.init.zeros_(a.proj.weight)
        model.zero_grad(set_to_none=True)
        model.set_stage(1)
    assert saved[True] < saved[False] / 2, saved
    assert grads[True].keys() == grads[False].keys() and all(g.any() for g in grads[False].values())
    for n in grads[False]:  # the recomputed forward is the same computation: equal up to float rounding
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=1e-5, atol=1e-7)


@torch.no_grad()
def test_check_length_counts_what_the_model_embeds(model):
    """PromptTooLong is raised before any work, from the token layout's count, which is exactly the length of the
    spliced sequence: one token of room left fits, none does not; with options, the longest option counts."""
    im = model.preprocess(Image.new("RGB", (100, 40)))
    prompt, image = "What is this?", model.encode_images([im])[0]
    n = len(model.splice(encode_prompt("<image>\n" + prompt, model.tokenizer), None, image)[0])
    context = model.context
    try:
        model.context = n + 1
        model.check_length(im, prompt)
        model.context = n
        with pytest.raises(hires.PromptTooLong, match=f"prompt is {n} tokens with its image; the LLM context holds {n}"):
            model.generate([im], [prompt])
    finally:
        model.context = context
    long = "red " * model.llm.cfg.max_seq_len
    turns = [{"from": "human", "value": "<image>\n" + prompt}, {"from": "gpt", "value": long}]
    n = len(model.splice(*encode_conversation(turns, model.tokenizer), image)[0])
    with pytest.raises(hires.PromptTooLong, match=f"prompt and option are {n} tokens"):
        model.option_logprobs([im], [prompt], [["blue", long]])
    model.check_length(im, prompt, ["blue", "red"])  # short options fit
