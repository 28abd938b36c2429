"""LLaVA's training data (docs/method.md#training-stages): the JSON list [{id, image?, conversations}] as token ids,
labels (conversation.encode_conversation) and preprocessed images; bad samples counted and replaced, never fatal one
by one; the frozen ViT prefix cached once per image; micro-batches of similar length.
"""
import json
import os
import warnings
from collections import Counter

import torch
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

    def __init__(self, path, folder, tokenizer, template, preprocess, context, image_tokens):
        """context: tokens of one spliced sequence (HiResLLaVA.context); image_tokens: slice grid -> LLM tokens of
        the image (HiResConfig.image_tokens), so the length check counts what the model will see."""
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
        if turns and turns[0].get("from") == "gpt":
            turns = turns[1:]  # LLaVA drops a leading assistant turn
        if not any(t.get("from") == "gpt" and t["value"].strip() for t in turns):
            return None, "empty or malformed conversation"
        n_image_tokens = sum(t["value"].count("<image>") for t in turns)
        reason = None
        if "image" in item and n_image_tokens == 0:
            reason = "image without <image> (prepended)"
        elif "image" not in item and n_image_tokens:
            return None, "<image> without an image"
        if "image" in item:  # LLaVA's preprocess_multimodal: one "<image>\n" at the start of the first human turn
            turns = [{"from": "human", "value": conversation.image_first(turns[0]["value"])}] + [
                {"from": t["from"], "value": t["value"].replace("<image>", "")} for t in turns[1:]]
        try:
            ids, labels = conversation.encode_conversation(turns, self.tokenizer, self.template)
        except ValueError:  # roles not alternating human, gpt
            return None, "empty or malformed conversation"
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


def cache_prefixes(model, datasets, master, batch=8):
    """The frozen ViT blocks before the first SRA layer, once per training image: {path: hires.Prefix}, shared by
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


class MicroBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's micro-batches, step by step, from a seeded per-epoch permutation shared by all ranks.

    Like DistributedSampler it shards one permutation by rank, but at micro-batch granularity: step s takes the
    next `global_batch` indices, cut into micro-batches; micro-batch j goes to rank j % world. A global batch is thus
    the same micro-batches whatever the number of processes, so 1 and 2 processes give the same gradients.
    """

    def __init__(self, n, global_batch, micro_batch, rank, world, seed, start_step=0):
        self.n, self.gb, self.mb, self.rank, self.world = n, global_batch, micro_batch, rank, world
        self.seed, self.start_step = seed, start_step
        self.steps_per_epoch = n // global_batch

    def __iter__(self):
        step = self.start_step
        while True:
            epoch, k = divmod(step, self.steps_per_epoch)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            batch = perm[k * self.gb:(k + 1) * self.gb]
            for j in range(self.rank, self.gb // self.mb, self.world):
                yield batch[j * self.mb:(j + 1) * self.mb]
            step += 1
