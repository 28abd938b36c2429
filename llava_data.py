"""LLaVA's training data (docs/method.md#training-stages): the JSON list [{id, image?, conversations}] as token ids,
labels (conversation.encode_conversation) and preprocessed images; bad samples counted and replaced, never fatal one
by one; the frozen ViT prefix cached once per image; micro-batches of similar length (LLaVA's
group_by_modality_length) in finetuning on data that mixes image and text-only samples. And the tiny preset's stage
0, which pretrains its backbones on the toy world before the paper's two stages: its data, its model and the encoder
diagnostics (docs/method.md#the-tiny-preset).
"""
import json
import os
import random
import shutil
import warnings
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import clip
import conversation
import entitygrid
import hires
import llama
import slicing

SKIP_REASONS = ("missing image", "bad image", "empty or malformed conversation", "<image> without an image",
                "image without <image> (prepended)", "too long (truncated)", "too long (no answer left)")


class DataError(Exception):
    """A one-line, user-facing problem with the training data (unreadable file, no usable sample)."""


class LlavaData(torch.utils.data.Dataset):
    """LLaVA's training list [{id, image?, conversations}] with images under `folder`. A sample that cannot be used
    is counted under its SKIP_REASONS entry and replaced by the next usable one, so batches keep their size."""

    def __init__(self, path, folder, tokenizer, template, preprocess, context, image_tokens):
        """context: tokens of one spliced sequence (HiResLLaVA.context); image_tokens: slice grid -> LLM tokens of
        the image (HiResLLaVA.image_tokens), so the length check counts what the model will see."""
        try:
            with open(path) as f:
                self.items = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read LLaVA training data ({e})") from None
        if not isinstance(self.items, list) or not self.items:
            raise DataError(f"{path}: expected a non-empty JSON list of {{id, image, conversations}} samples")
        self.folder, self.tokenizer, self.template = folder, tokenizer, template
        self.preprocess, self.context, self.image_tokens = preprocess, context, image_tokens
        self.prefixes = {}  # image path -> hires.Prefix, filled by cache_prefixes (--cache-vit)

    def __len__(self):
        return len(self.items)

    def modality_lengths(self, grid):
        """LLaVA's modality_lengths: per sample its LLM tokens, text plus image tokens, negated for text-only samples;
        from the text and the image file's header alone (grid: (width, height) -> slice grid, HiResLLaVA.grid). An
        image that cannot be opened adds no image tokens (the sample is counted as bad when drawn)."""
        lengths = []
        for item in self.items:
            turns = item.get("conversations") if isinstance(item, dict) else None
            text = " ".join(t["value"] for t in turns if isinstance(t, dict) and isinstance(t.get("value"), str)) \
                if isinstance(turns, list) else ""
            n = max(1, len(self.tokenizer.encode(text.replace("<image>", ""), bos=False)))
            if not (isinstance(item, dict) and "image" in item):
                lengths.append(-n)
                continue
            try:
                with Image.open(os.path.join(self.folder, str(item["image"]))) as img:  # reads the header only
                    n += self.image_tokens(grid(img.size))
            except (OSError, ValueError):
                pass
            lengths.append(n)
        return lengths

    def __getitem__(self, i):
        skipped = []
        for j in range(i, i + len(self.items)):
            sample, reason = self.encode(self.items[j % len(self.items)])
            if reason:
                skipped.append(reason)
            if sample is not None:
                return sample, skipped
        raise DataError(f"no usable sample in the training data (reasons: {Counter(skipped)})")

    def encode(self, item):
        """-> ((input_ids, labels, image or None), None | reason); a reason with a sample means it was repaired."""
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(turns, list) or not all(isinstance(t, dict) and isinstance(t.get("value"), str)
                                                  for t in turns):
            return None, "empty or malformed conversation"
        try:
            texts = conversation.turn_texts(turns)  # a leading assistant turn dropped, the roles checked
        except ValueError:
            return None, "empty or malformed conversation"
        if not any(t.strip() for t in texts[1::2]):  # no answer to learn
            return None, "empty or malformed conversation"
        reason, tagged = None, any("<image>" in t for t in texts)
        if "image" in item and not tagged:
            reason = "image without <image> (prepended)"
        elif "image" not in item and tagged:
            return None, "<image> without an image"
        # LLaVA's preprocess_multimodal: one "<image>\n" at the start of the first human turn
        ids, labels = conversation.encode_conversation(turns, self.tokenizer, self.template, image="image" in item)
        image = None
        if "image" in item:
            path = os.path.join(self.folder, str(item["image"]))
            if path in self.prefixes:  # the frozen ViT blocks already ran on it (--cache-vit)
                image = self.prefixes[path]
            elif not os.path.exists(path):
                return None, "missing image"
            else:
                try:
                    image = self.preprocess(slicing.load_image(path))
                except slicing.ImageError as e:
                    warnings.warn(str(e))
                    return None, "bad image"
        extra = self.image_tokens(image[2]) - 1 if image is not None else 0  # the image replaces its placeholder
        if len(ids) + extra > self.context:  # cut here, where it is counted, not silently in the model
            keep = self.context - extra
            ids, labels, reason = ids[:max(0, keep)], labels[:max(0, keep)], "too long (truncated)"
            if all(x == conversation.IGNORE_INDEX for x in labels):  # the answers lie beyond the context
                return None, "too long (no answer left)"
        return (ids, labels, image), reason


def collate(batch):
    """[(sample, skipped reasons)] -> dict of lists for HiResLLaVA.forward plus the skip counts."""
    samples = [s for s, _ in batch]
    return dict(input_ids=[s[0] for s in samples], labels=[s[1] for s in samples], images=[s[2] for s in samples],
                skipped=Counter(r for _, reasons in batch for r in reasons))


class Stage0Data(torch.utils.data.Dataset):
    """Stage 0 of the tiny preset: sample i is one text of the toy world (captions and question-answer conversations
    without their image, all tokens labelled: plain LM) and one scene of whole entities drawn from seed and i
    (entitygrid.whole_entity_scene) with its per-patch targets."""

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

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, i):
        image, entities = entitygrid.whole_entity_scene(random.Random(f"stage0/{self.seed}/{i}"), self.size,
                                                        self.families)
        pixels = torch.tensor(np.asarray(image)).permute(2, 0, 1)                       # (3, S, S) uint8
        targets = torch.from_numpy(entitygrid.patch_targets(entities, self.classes, self.size, self.patch))
        return (self.texts[i], self.texts[i], (pixels, targets)), []


def cache_prefixes(model, datasets, master, batch=8):
    """The frozen ViT blocks (HiResLLaVA.prefix_depth), once per training image: {path: hires.Prefix}, shared by
    the datasets (and stages). Images that fail to load are left out; the datasets count them when drawn. Small
    batches: on CPU, 8 images with their slices run ~2x faster per image than 32 (the activations stay in cache)."""
    paths = sorted({os.path.join(d.folder, str(it["image"])) for d in datasets for it in d.items
                    if isinstance(it, dict) and "image" in it})
    cache = {}
    for i in tqdm(range(0, len(paths), batch), desc="cache ViT prefix", disable=not master):
        ok, images = [], []
        for path in paths[i:i + batch]:
            try:
                images.append(model.preprocess(slicing.load_image(path)))
                ok.append(path)
            except slicing.ImageError:
                pass
        if images:
            cache.update(zip(ok, model.prefix(images)))
    return cache


def modality_length_groups(lengths, micro_batch, megabatch, generator):
    """LLaVA's group_by_modality_length (llava_trainer.py), at micro-batch granularity: image samples (length > 0)
    and text-only samples (length < 0) apart, each modality's random permutation cut into megabatches of `megabatch`
    samples, each megabatch sorted by length and cut into micro-batches, so samples of similar length share a
    micro-batch and pad little; the micro-batches in random order. The incomplete ends of the two modalities share
    the last micro-batches; a remainder shorter than a micro-batch is dropped. -> list of micro-batches (index lists)."""
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    batches, rest = [], []
    for image in (True, False):
        ids = [i for i in perm if (lengths[i] > 0) == image]
        for k in range(0, len(ids), megabatch):
            mega = sorted(ids[k:k + megabatch], key=lambda i: -abs(lengths[i]))
            cut = len(mega) - len(mega) % micro_batch
            batches += [mega[j:j + micro_batch] for j in range(0, cut, micro_batch)]
            rest += mega[cut:]
    rest.sort(key=lambda i: -abs(lengths[i]))
    batches += [rest[j:j + micro_batch] for j in range(0, len(rest) - micro_batch + 1, micro_batch)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def padding_fraction(batches, lengths, context):
    """Share of the LLM positions of micro-batches (each padded to its longest sample, cut at context) that are
    padding."""
    real = sum(min(abs(lengths[i]), context) for b in batches for i in b)
    padded = sum(len(b) * max(min(abs(lengths[i]), context) for i in b) for b in batches)
    return 1 - real / padded


class MicroBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's micro-batches, step by step, from a seeded per-epoch order shared by all ranks.

    Like DistributedSampler it shards one permutation by rank, but at micro-batch granularity: step s takes the
    next `global_batch` indices, cut into micro-batches; micro-batch j goes to rank j % world. A global batch is thus
    the same micro-batches whatever the number of processes, so 1 and 2 processes give the same gradients. With
    lengths (LlavaData.modality_lengths), the micro-batches are modality_length_groups, one global batch a megabatch.
    """

    def __init__(self, n, global_batch, micro_batch, rank, world, seed, start_step=0, lengths=None):
        self.n, self.global_batch, self.micro_batch, self.rank, self.world = n, global_batch, micro_batch, rank, world
        self.seed, self.start_step, self.lengths = seed, start_step, lengths
        self.steps_per_epoch = n // global_batch

    def epoch(self, epoch):
        """The epoch's micro-batches in order (at least steps_per_epoch global batches of them)."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        if self.lengths is not None:
            return modality_length_groups(self.lengths, self.micro_batch, self.global_batch, generator)
        perm = torch.randperm(self.n, generator=generator).tolist()
        return [perm[j:j + self.micro_batch] for j in range(0, self.n - self.micro_batch + 1, self.micro_batch)]

    def __iter__(self):
        step, per_step = self.start_step, self.global_batch // self.micro_batch
        while True:
            epoch, k = divmod(step, self.steps_per_epoch)
            batches = self.epoch(epoch)
            for j in range(self.rank, per_step, self.world):
                yield batches[k * per_step + j]
            step += 1


# ----------------------------------------------------------------------------------------------------------------
# stage 0 of the tiny preset: its backbones pretrained on the toy world

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
        """Stage 0 starting from the random backbones train.prepare_tiny wrote into the folder base."""
        paths = hires.read_config(base, "hires_config.json")
        return cls(PretrainConfig(*(paths[k] for k in hires.BACKBONE_PATHS), families,
                                  entitygrid.entity_classes(families)))

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.vision = clip.VisionTower(clip.CLIPConfig.from_preset("tiny"), cfg.clip_weights)
        self.llm = llama.Llama.from_pretrained(cfg.llm_path)
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
        """pixels (B, 3, S, S) uint8, targets (B, L, 6) as entitygrid.patch_targets -> class cross-entropy over all
        tokens + copies cross-entropy + 5 x box L1 over entity tokens (the weight puts the three near one scale)."""
        vit = self.vision.vit
        x = vit._embeds(slicing.normalize(pixels))                                      # (B, 1+L, D)
        for blk in vit.transformer.resblocks:
            x = clip.block(blk, x)
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
        hires.atomic_write(os.path.join(out, "encoder.json"), json.dumps(probe, indent=1))
        print("stage 0: encoder (random -> pretrained): " + ", ".join(f"{k} {v:.3f} -> {probe['pretrained'][k]:.3f}"
                                                                        for k, v in random_probe.items()))
        clip.save_vision_tower(self.vision.vit, os.path.join(out, "clip_tiny.safetensors"))
        self.llm.save_pretrained(os.path.join(out, "llm"))
        shutil.copyfile(self.cfg.tokenizer_path, os.path.join(out, "tokenizer.model"))
        hires.atomic_write(os.path.join(out, "hires_config.json"), json.dumps(dict(
            clip_weights="clip_tiny.safetensors", llm_path="llm", tokenizer_path="tokenizer.model")))

    def forward(self, input_ids, labels, images):
        """Batch as llava_data.collate gives it: token lists (text), label lists, (pixels, targets) per sample."""
        T = max(map(len, input_ids))
        ids = torch.tensor([i + [0] * (T - len(i)) for i in input_ids])         # (B, T)
        lab = torch.tensor([b + [conversation.IGNORE_INDEX] * (T - len(b)) for b in labels])  # (B, T)
        lm = self.llm(ids.to(self.llm.lm_head.weight.device), labels=lab)
        pixels, targets = (torch.stack(t) for t in zip(*images))
        return lm + self.vit_loss(pixels.to(lm.device), targets.to(lm.device))


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
    return dict(cut_sensitivity=sum(sens) / n, attention_entropy=clip.attention_entropy(tower, slicing.normalize(
        pixels[:n])), probe=(pred == labels[split:][on].long() - 1).float().mean().item())
