"""Stage 0 of the tiny preset (docs/method.md#the-tiny-preset): its backbones, pretrained on the toy world.

The paper's CLIP and Vicuna arrive pretrained; the tiny preset has none, so it writes random tiny backbones in their
real formats (make_tiny_backbones, prepare_tiny) and pretrains them together on EntityGrid-QA's world before the
paper's two stages (TinyPretrain, Stage0Data, run_stage0). The encoder diagnostics (encoder_probe,
attention_entropy) measure how far that moves the ViT towards the property the paper relies on in CLIP.
"""
import json
import os
import random
import shutil
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import conversation
import cpu_decode
import entitygrid
import slicing
from checkpoints import BACKBONE_PATHS, atomic_write, config_dict, read_config
from clip import CLIPConfig, build_vision_tower, save_vision_tower
from hires import HiResConfig, VisionTower, vit_block
from llama import Llama, LlamaConfig
from llava_data import DataError


# ----------------------------------------------------------------------------------------------------------------
# the tiny preset's data and random backbones

def make_tiny_backbones(path, texts, seed=0, vocab_size=400, **cfg_overrides):
    """Write random tiny backbones into the directory path (a CLIP tower file; llm/, a complete HF LLaMA directory
    with its sentencepiece tokenizer trained on texts) and return a HiResConfig pointing at them, so the tiny preset
    runs the real loading code. Each is built in a directory beside path and renamed into place: a killed run leaves
    no half-written file."""
    path = os.path.abspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "llm"))
    os.makedirs(path, exist_ok=True)
    torch.manual_seed(seed)
    save_vision_tower(build_vision_tower(CLIPConfig.from_preset("tiny")), os.path.join(tmp, "clip_tiny.safetensors"))
    tok = conversation.train_tokenizer(list(texts), os.path.join(tmp, "llm", "tokenizer.model"), vocab_size)
    Llama(LlamaConfig.from_preset("tiny", vocab_size=tok.vocab_size)).save_pretrained(os.path.join(tmp, "llm"))
    hf_tokenizer = dict(tokenizer_class="LlamaTokenizer", add_bos_token=True, add_eos_token=False, bos_token="<s>",
                        eos_token="</s>", unk_token="<unk>", pad_token=None, legacy=False)  # ids 1, 2, 0 as trained
    atomic_write(os.path.join(tmp, "llm", "tokenizer_config.json"), json.dumps(hf_tokenizer, indent=2))
    for name in os.listdir(tmp):
        shutil.rmtree(os.path.join(path, name), ignore_errors=True)  # llm/ of a killed run: os.replace needs it gone
        os.replace(os.path.join(tmp, name), os.path.join(path, name))
    os.rmdir(tmp)
    defaults = dict(clip_preset="tiny", clip_weights=os.path.join(path, "clip_tiny.safetensors"),
                    llm_path=os.path.join(path, "llm"), lora_rank=8, lora_alpha=16.0, lora_dropout=0.0)
    return HiResConfig(**{**defaults, **cfg_overrides})


def prepare_tiny(args):
    """Generate EntityGrid-QA train/test under args.data_dir when missing, stage-1 captions, a sentencepiece model
    trained on the training text, a random tiny CLIP tower and tiny LLaMA under args.out/base. Master only."""
    for split, num in (("train", args.train_size), ("test", args.test_size)):
        d = os.path.join(args.data_dir, split)
        if not os.path.isfile(os.path.join(d, "llava.json")):
            entitygrid.generate(d, num, args.seed, base=CLIPConfig.from_preset("tiny").image_size, split=split,
                                families=args.families.split(","))
    train_dir = os.path.join(args.data_dir, "train")
    captions, text_qa = (os.path.join(train_dir, f) for f in ("captions.json", "text_qa.json"))
    for path, make in ((captions, entitygrid.caption_items), (text_qa, entitygrid.text_qa_items)):
        if not os.path.isfile(path):
            atomic_write(path, json.dumps(make(entitygrid.load_questions(train_dir))))
    base = os.path.join(args.out, "base")
    if not os.path.isfile(os.path.join(base, "hires_config.json")):  # written last: the backbones are complete
        texts = []
        for qa in ("llava.json", "text_qa.json"):  # with the template's words (USER:, ASSISTANT:)
            with open(os.path.join(train_dir, qa)) as f:
                texts += [seg.replace("<image>", "") for item in json.load(f)
                          for seg in conversation.vicuna_segments(conversation.turn_texts(item["conversations"]))]
        with open(captions) as f:
            texts += [t["value"] for item in json.load(f) for t in item["conversations"]]
        try:
            cfg = make_tiny_backbones(base, texts, args.seed, args.vocab_size)
        except RuntimeError as e:  # sentencepiece: e.g. fewer pieces than the data has characters
            raise DataError(f"--vocab-size {args.vocab_size}: sentencepiece cannot train on {train_dir} "
                            f"({str(e).splitlines()[-1]})") from None
        atomic_write(os.path.join(base, "hires_config.json"), json.dumps(config_dict(cfg, base, args.out)))


# ----------------------------------------------------------------------------------------------------------------
# the stage-0 model and its data

NATIVE_EVERY = 4  # one stage-0 scene in 4 at the native tiler's size (design choice)


@dataclass
class PretrainConfig:
    """Stage 0 of the tiny preset: the random backbones it starts from and the entity classes of its ViT targets."""
    clip_weights: str
    llm_path: str
    tokenizer_path: str
    families: list
    classes: list
    max_copies: int = 3
    train_llm: bool = True   # stage 0 trains every tensor; save_checkpoint keeps them all
    lora_rank: int = 0


class TinyPretrain(nn.Module):
    """Stage 0 of the tiny preset (not in the paper, whose CLIP and Vicuna arrive pretrained): the tiny ViT and the
    tiny LLaMA trained from random on the toy world, so that stages 1-2 can freeze them as the paper freezes its own.

    ViT: scenes of whole entities (entitygrid.whole_entity_scene); every patch token of the last block (ln_post, as
    CLIP's loss sees it) predicts, through linear heads, the class of the entity under it, how many copies of it the
    scene holds and the entity's box relative to the patch (entitygrid.patch_targets). None of the three can be read
    from a patch's own pixels, so late tokens come to encode the whole entity, as CLIP's do (diagnostics:
    docs/method.md#the-tiny-preset). LLaMA: plain next-token loss on the toy world's text (captions, questions,
    answers). The loss is the sum of the two."""

    @classmethod
    def from_base(cls, base, families):
        """Stage 0 starting from the random backbones prepare_tiny wrote into the folder base."""
        paths = read_config(base, "hires_config.json")
        return cls(PretrainConfig(*(paths[k] for k in BACKBONE_PATHS), families, entitygrid.entity_classes(families)))

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(CLIPConfig.from_preset("tiny"), cfg.clip_weights)
        self.llm = Llama.from_pretrained(cfg.llm_path)
        D = self.vision.cfg.width
        self.cls, self.copies, self.box = nn.Linear(D, 1 + len(cfg.classes)), nn.Linear(D, cfg.max_copies), \
            nn.Linear(D, 4)

    def set_stage(self, stage):
        self.requires_grad_(True)

    def trainable_state_dict(self):
        return {k: p.detach() for k, p in self.named_parameters()}

    def load_trainable_state_dict(self, sd):
        self.load_state_dict(sd, strict=True)

    def vit_loss(self, pixels, targets):
        """pixels (B, 3, H, W) uint8, targets (B, L, 6) as entitygrid.patch_targets -> class cross-entropy over all
        tokens + copies cross-entropy + 5 x box L1 over entity tokens (the weight puts the three near one scale)."""
        vit = self.vision.vit
        x = self.vision.embed(slicing.normalize(pixels))                         # (B, 1+L, D)
        for blk in vit.transformer.resblocks:
            x = vit_block(blk, x)
        x = vit.ln_post(x[:, 1:])                                               # (B, L, D)
        cls = targets[..., 0].long()                                            # (B, L), 0 = background
        on = cls > 0
        copies = (targets[..., 1][on].long() - 1).clamp(max=self.cfg.max_copies - 1)
        return (F.cross_entropy(self.cls(x).flatten(0, 1), cls.flatten()) +
                F.cross_entropy(self.copies(x[on]), copies) + 5 * F.l1_loss(self.box(x[on]), targets[..., 2:][on]))

    def save_backbones(self, out, random_probe):
        """The encoder diagnostics before (random_probe) and after stage 0 into out/encoder.json and printed; the
        pretrained backbones in their real formats under out (open_clip state dict, HF LLaMA directory, the
        tokenizer), and out/hires_config.json, written last, with their paths relative to out."""
        probe = dict(random=random_probe, pretrained=encoder_probe(self.vision, self.cfg.families))
        atomic_write(os.path.join(out, "encoder.json"), json.dumps(probe, indent=1))
        print("stage 0: encoder (random -> pretrained): " + ", ".join(f"{k} {v:.3f} -> {probe['pretrained'][k]:.3f}"
                                                                        for k, v in random_probe.items()))
        save_vision_tower(self.vision.vit, os.path.join(out, "clip_tiny.safetensors"))
        self.llm.save_pretrained(os.path.join(out, "llm"))
        shutil.copyfile(self.cfg.tokenizer_path, os.path.join(out, "tokenizer.model"))
        atomic_write(os.path.join(out, "hires_config.json"), json.dumps(dict(
            clip_weights="clip_tiny.safetensors", llm_path="llm", tokenizer_path="tokenizer.model")))

    def forward(self, input_ids, labels, images):
        """Batch as llava_data.collate gives it: token lists (text), label lists, (pixels, targets) per sample."""
        T = max(map(len, input_ids))
        ids = torch.tensor([i + [0] * (T - len(i)) for i in input_ids])         # (B, T)
        lab = torch.tensor([b + [conversation.IGNORE_INDEX] * (T - len(b)) for b in labels])  # (B, T)
        lm = self.llm(ids.to(self.llm.lm_head.weight.device), labels=lab)
        sizes = sorted({pixels.shape for pixels, _ in images})  # S x S scenes, and the native tiler's size
        loss = 0
        for size in sizes:  # the mean over the batch's scenes, each size's scenes in one pass
            pixels, targets = (torch.stack(t) for t in zip(*[im for im in images if im[0].shape == size]))
            loss = loss + len(pixels) / len(images) * self.vit_loss(pixels.to(lm.device), targets.to(lm.device))
        return lm + loss


class Stage0Data(torch.utils.data.Dataset):
    """Stage 0 of the tiny preset: sample i is one text of the toy world (captions and question-answer conversations
    without their image, all tokens labelled: plain LM) and one scene of whole entities drawn from seed and i
    (entitygrid.whole_entity_scene) with its per-patch targets; samples as LlavaData's, for llava_data.collate.
    Every NATIVE_EVERY-th scene has the size at which the native tiler reads EntityGrid-QA's 2S x 2S canvas
    (slicing.native_size), so that the frozen ViT has seen it (mixed-resolution pretraining, as Qwen2-VL's); the
    others are S x S."""

    def __init__(self, data_dir, model, seed):
        """model: the TinyPretrain to train (its tokenizer, entity classes and ViT image and patch size)."""
        cfg, vit, tokenizer = model.cfg, model.vision.cfg, conversation.Tokenizer(model.cfg.tokenizer_path)
        train_dir = os.path.join(data_dir, "train")
        with open(os.path.join(train_dir, "text_qa.json")) as f:
            self.texts = [conversation.encode_conversation(item["conversations"], tokenizer, image=False)[0]
                          for item in json.load(f)]
        with open(os.path.join(train_dir, "captions.json")) as f:
            self.texts += [tokenizer.encode(item["conversations"][1]["value"]) + [tokenizer.eos_id]
                           for item in json.load(f)]
        self.classes, self.seed, self.families = cfg.classes, seed, cfg.families
        self.size, self.patch = vit.image_size, vit.patch_size
        tokens = HiResConfig(clip_preset="tiny", tiler="native").slicing()["tokens"]
        self.native = slicing.native_size(2 * self.size, 2 * self.size, self.patch, tokens)[0]

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, i):
        size = self.native if i % NATIVE_EVERY == NATIVE_EVERY - 1 else self.size
        image, entities = entitygrid.whole_entity_scene(random.Random(f"stage0/{self.seed}/{i}"), size, self.families)
        pixels = torch.tensor(np.asarray(image)).permute(2, 0, 1)                       # (3, size, size) uint8
        targets = torch.from_numpy(entitygrid.patch_targets(entities, self.classes, size, self.patch))
        return (self.texts[i], self.texts[i], (pixels, targets)), []


# ----------------------------------------------------------------------------------------------------------------
# the encoder diagnostics

@torch.no_grad()
def encoder_probe(tower, families, n=48, seed=0):
    """The paper's property of a frozen encoder, measured on whole entities (docs/method.md#the-tiny-preset):
    cut_sensitivity: change of the feature-layer tokens of an entity's left half when its right half is blanked
    (as a slice border cuts it), relative to their change when the whole entity is blanked; attention_entropy: mean
    over blocks, heads and queries, in nats (uniform: ln(1+L)); probe: accuracy of a ridge-regression linear probe
    of the entity's class from one feature-layer token, on held-out scenes."""
    cfg, classes = tower.cfg, entitygrid.entity_classes(families)
    S, P = cfg.image_size, cfg.patch_size
    rng = random.Random(f"probe/{seed}")
    whole, cut, keep = (torch.from_numpy(a) for a in entitygrid.cut_entities(rng, n, S, P, families))
    # whole, cut (n, 3, S, S) uint8; keep (n, L) bool
    blank = torch.full_like(whole, 255)
    fw, fc, fb = (tower(slicing.normalize(x)) for x in (whole, cut, blank))            # (n, L, D) each
    sens = [((fw[i] - fc[i])[keep[i]].norm() / (fw[i] - fb[i])[keep[i]].norm()).item() for i in range(n)]
    scenes = [entitygrid.whole_entity_scene(rng, S, families) for _ in range(6 * n)]
    pixels = torch.stack([torch.tensor(np.asarray(im)).permute(2, 0, 1) for im, _ in scenes])
    labels = torch.stack([torch.from_numpy(entitygrid.patch_targets(e, classes, S, P)[:, 0]) for _, e in scenes])
    feats = tower(slicing.normalize(pixels))                                            # (6n, L, D)
    split = 4 * n  # probe trained on the first 4n scenes, tested on the rest
    x, y = feats[:split][labels[:split] > 0], labels[:split][labels[:split] > 0].long() - 1
    mu, sd = x.mean(0), x.std(0) + 1e-6
    design = lambda f: torch.cat([(f - mu) / sd, torch.ones(len(f), 1)], 1)            # (T, D+1)
    X = design(x)
    W = torch.linalg.solve(X.T @ X + torch.eye(X.shape[1]), X.T @ F.one_hot(y, len(classes)).float())
    on = labels[split:] > 0
    pred = (design(feats[split:][on]) @ W).argmax(1)
    return dict(cut_sensitivity=sum(sens) / n, attention_entropy=attention_entropy(tower, slicing.normalize(
        pixels[:n])), probe=(pred == labels[split:][on].long() - 1).float().mean().item())


@torch.no_grad()
def attention_entropy(tower, pixels):
    """Mean entropy (nats) of the attention rows of every block, head and query of the ViT on normalised pixels
    (N, 3, S, S). Uniform attention over 1+L tokens gives ln(1+L): a token then mixes in only the image mean."""
    x, total = tower.vit._embeds(pixels), 0.0                            # (N, 1+L, D)
    for blk in tower.vit.transformer.resblocks:
        N, T, D = x.shape
        nh = blk.attn.num_heads
        qkv = F.linear(blk.ln_1(x), blk.attn.in_proj_weight, blk.attn.in_proj_bias)
        q, k, _ = qkv.view(N, T, 3, nh, D // nh).permute(2, 0, 3, 1, 4)  # (N, nh, T, hs) each
        p = (q @ k.transpose(-1, -2) * (D // nh) ** -0.5).softmax(-1)   # (N, nh, T, T)
        total += -(p * p.clamp_min(1e-12).log()).sum(-1).mean().item()
        x = vit_block(blk, x)
    return total / len(tower.vit.transformer.resblocks)


# ----------------------------------------------------------------------------------------------------------------
# stage 0 itself

def run_stage0(args, proc, train_stage):
    """Stage 0: the random backbones of OUT/base pretrained together (TinyPretrain) by train_stage, train.py's loop,
    then written to OUT/stage0 in their real formats with the encoder diagnostics (encoder.json) and, last,
    hires_config.json (master only)."""
    families = args.families.split(",")
    torch.manual_seed(args.seed)
    model = TinyPretrain.from_base(os.path.join(args.out, "base"), families).to(proc["device"])
    cpu_decode.fuse(model.llm)  # the LLM's weight layout of every run of this code (cpu_decode.py)
    random_probe, out = encoder_probe(model.vision, families), os.path.join(args.out, "stage0")
    train_stage(args, 0, model, Stage0Data(args.data_dir, model, args.seed), out, proc)
    if proc["master"]:
        model.save_backbones(out, random_probe)
