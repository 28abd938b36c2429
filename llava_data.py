"""LLaVA's training data (docs/method.md#training-stages): the JSON list [{id, image?, conversations}] as token ids,
labels (conversation.encode_conversation) and preprocessed images (slicing.preprocess); bad samples counted and
replaced, never fatal one by one; the frozen ViT prefix cached once per image; micro-batches of similar length
(LLaVA's group_by_modality_length) in finetuning on data that mixes image and text-only samples.
"""
import json
import os
import warnings
from collections import Counter

import torch
from PIL import Image
from tqdm import tqdm

import conversation
import slicing

SKIP_REASONS = ("missing image", "bad image", "empty or malformed conversation", "<image> without an image",
                "image without <image> (prepended)", "too long (truncated)", "too long (no answer left)")


class DataError(Exception):
    """A one-line, user-facing problem with the training data (unreadable file, no usable sample)."""


class LlavaData(torch.utils.data.Dataset):
    """LLaVA's training list [{id, image?, conversations}] with images under `folder`. A sample that cannot be used
    is counted under its SKIP_REASONS entry and replaced by the next usable one, so batches keep their size."""

    def __init__(self, path, folder, tokenizer, template, slice_args, context, image_tokens):
        """slice_args: keyword arguments of slicing.preprocess (the model's, slice_args(model)); context:
        tokens of one spliced sequence (HiResLLaVA.context); image_tokens: slice grid -> LLM tokens of the image
        (HiResLLaVA.image_tokens), so the length check counts what the model will see."""
        try:
            with open(path) as f:
                self.items = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read LLaVA training data ({e})") from None
        if not isinstance(self.items, list) or not self.items:
            raise DataError(f"{path}: expected a non-empty JSON list of {{id, image, conversations}} samples")
        self.folder, self.tokenizer, self.template = folder, tokenizer, template
        self.slice_args, self.context, self.image_tokens = slice_args, context, image_tokens
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
                    image = slicing.preprocess(slicing.load_image(path), **self.slice_args)
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


def slice_args(model):
    """The keyword arguments of slicing.preprocess with which a HiResLLaVA cuts its images (its preprocess)."""
    return model.cfg.slicing(model.vision.cfg)


def collate(batch):
    """[(sample, skipped reasons)] -> dict of lists for HiResLLaVA.forward plus the skip counts."""
    samples = [s for s, _ in batch]
    return dict(input_ids=[s[0] for s in samples], labels=[s[1] for s in samples], images=[s[2] for s in samples],
                skipped=Counter(r for _, reasons in batch for r in reasons))


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
    the last micro-batches; a remainder shorter than a micro-batch is dropped. -> list of micro-batches (index
    lists)."""
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
