"""clip.py and hires.VisionTower: LLaVA feature parity with open_clip, tiny tower save/load round trip, clear
errors."""
import pytest
import torch

import clip
import hires


def test_features_match_forward_intermediates():
    torch.manual_seed(0)
    cfg = clip.CLIPConfig.from_preset("tiny")
    tower = hires.VisionTower(cfg)
    x = torch.randn(3, 3, cfg.image_size, cfg.image_size)
    ref = tower.vit.forward_intermediates(x, indices=[cfg.layers - 2], stop_early=True, intermediates_only=True,
                                          output_fmt="NLC")["image_intermediates"][0]
    torch.testing.assert_close(tower(x), ref)  # hires.vit_block: the same function as open_clip's block, other op order
    assert tower(x).shape == (3, cfg.grid ** 2, cfg.width)


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_block_is_open_clips_block(quick_gelu):
    """hires.vit_block (SDPA attention on batch-first tensors, QuickGELU as silu with folded scales) computes what
    open_clip's ResidualAttentionBlock computes, outputs and input gradients alike, with and without autograd."""
    import dataclasses
    torch.manual_seed(0)
    cfg = dataclasses.replace(clip.CLIPConfig.from_preset("tiny"), quick_gelu=quick_gelu)
    blk = clip.build_vision_tower(cfg).transformer.resblocks[2]
    for p in blk.parameters():  # a trained-looking block: larger weights than the init, so differences would show
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(3, 1 + cfg.grid ** 2, cfg.width, requires_grad=True)
    ours, ref = hires.vit_block(blk, x), blk(x)
    torch.testing.assert_close(ours, ref)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(ref, x, g)[0])
    with torch.no_grad():  # nn.MultiheadAttention takes its fused inference path here
        torch.testing.assert_close(hires.vit_block(blk, x), blk(x))


def test_save_load_round_trip(tmp_path):
    cfg = clip.CLIPConfig.from_preset("tiny")
    vit = clip.build_vision_tower(cfg)
    clip.save_vision_tower(vit, tmp_path / "v.safetensors")
    vit2 = clip.build_vision_tower(cfg, tmp_path / "v.safetensors")
    for (k, a), b in zip(vit.state_dict().items(), vit2.state_dict().values()):
        assert torch.equal(a, b), k


def test_real_preset_without_weights_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="huggingface-cli download"):
        clip.build_vision_tower(clip.CLIPConfig.from_preset("vit-l-14-336"))
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.safetensors"):
        clip.build_vision_tower(clip.CLIPConfig.from_preset("tiny"), tmp_path / "bad.safetensors")


def test_adapter_layers_default():
    assert clip.default_adapter_layers(24) == [18, 19, 20, 21]  # paper's layers 19-22, 1-indexed


def test_vit_l_preset_matches_open_clip_vit_l_14_336():
    """Our ViT-L-14-336 tower has exactly the tensor names and shapes of open_clip's own model's `visual` (the keys
    an 'openai' checkpoint is loaded strictly against), and its QuickGELU. Built on the meta device: no memory."""
    import dataclasses
    import open_clip
    with torch.device("meta"):
        ours = clip.build_vision_tower(dataclasses.replace(clip.CLIPConfig.from_preset("vit-l-14-336"),
                                                           pretrained=False))
        mc = open_clip.get_model_config("ViT-L-14-336")  # open_clip's own builder; 'openai' weights use QuickGELU
        ref = open_clip.model._build_vision_tower(mc["embed_dim"], mc["vision_cfg"], quick_gelu=True)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert ours.image_size == ref.image_size == (336, 336) and ours.patch_size == ref.patch_size == (14, 14)
    assert isinstance(ours.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)


@torch.no_grad()
def test_adapter_sees_ln1_of_its_grid_only():
    """The SRA branch gets ln_1 of the block input, CLS dropped, for the grid's slices only; a zero branch changes
    nothing."""
    torch.manual_seed(0)
    cfg = clip.CLIPConfig.from_preset("tiny")
    tower = hires.VisionTower(cfg)
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, p, mn):
            seen.append((p.clone(), mn))
            return torch.zeros_like(p)

    x = torch.randn(3, 3, cfg.image_size, cfg.image_size)
    out = tower(x, [(1, 1), (1, 2)], {3: Recorder()})
    h = tower.vit._embeds(x)
    for blk in tower.vit.transformer.resblocks[:3]:
        h = hires.vit_block(blk, h)
    (p1, mn1), (p2, mn2) = seen  # one call per run of images with the same grid
    y = tower.vit.transformer.resblocks[3].ln_1(h)
    assert (mn1, mn2) == ((1, 1), (1, 2)) and torch.equal(p1, y[:1, 1:]) and torch.equal(p2, y[1:, 1:])
    assert torch.equal(out, tower(x))
