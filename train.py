"""Two-stage HiRes-LLaVA training (docs/method.md#training-stages) on LLaVA's data (llava_data.py), single process or
torchrun DDP.

Stage 1 trains the Self-Mining Sampler and projector on captions (LLaVA's `plain` template); stage 2 trains the
SliceRestore Adapter, sampler, projector and LoRA on instructions (`vicuna_v1`), starting from a stage-1 checkpoint.
AdamW, warm-up over the first 3% of steps then cosine, no weight decay, gradient accumulation to a global batch.
Checkpoints hold the trainable tensors only (hires.save_checkpoint) plus optimizer moments, step and RNG states, all
safetensors/JSON, written atomically; --resume continues from the last complete one.

`python train.py` (no arguments) runs the tiny preset on CPU end to end: generates EntityGrid-QA, trains both stages,
evaluates on the test split and writes metrics.json. `torchrun --nproc_per_node N train.py ...` runs DDP.
"""
import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections import Counter
from contextlib import nullcontext

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import clip
import conversation
import entitygrid
import hires
import llava_data
import slicing

ADAM_BETAS = (0.9, 0.999)  # the paper does not give its betas; LLaVA trains with HF Trainer's AdamW defaults
PRESETS = {  # every value is a command-line default; see --help
    "tiny": dict(lora_dropout=0.0, max_slices=4, upscale=False, lora_rank=0, lora_alpha=16, max_len=512,
                 lr1=2e-3, lr2=2e-3, lora_lr=2e-3, batch1=32, batch2=32, micro_batch=8, epochs1=1, epochs2=4,
                 train_size=6000, test_size=2700, vocab_size=1000, dtype="fp32", grad_ckpt=False, num_workers=0,
                 train_llm=True, mc="rank", cache_vit=True, families="object,shape", sra_layers=[7, 8, 9]),
    "paper": dict(lora_dropout=0.05, max_slices=16, upscale=True, lora_rank=128, lora_alpha=256, max_len=0,
                  lr1=1e-3, lr2=2e-5, lora_lr=2e-4, batch1=256, batch2=128, micro_batch=8, epochs1=1, epochs2=1,
                  train_size=0, test_size=0, vocab_size=0, dtype="auto", grad_ckpt=True, num_workers=4,
                  train_llm=False, mc="letter", cache_vit=False, families=",".join(entitygrid.FAMILIES),
                  sra_layers=[18, 19, 20, 21]),
}
# flag -> HiResConfig field: what a stage-2 start from --init takes from the command line over the stored config
CONFIG_FLAGS = dict(max_slices="max_slices", upscale="upscale", sampler="sampler", max_len="max_length",
                    lora_rank="lora_rank", lora_alpha="lora_alpha", lora_dropout="lora_dropout", sra="sra",
                    sra_layers="sra_layers", slices="slices", overview="overview", train_llm="train_llm")

class TrainError(Exception):
    """A one-line, user-facing problem that stops the run (bad flag, missing file, non-finite loss)."""


# ----------------------------------------------------------------------------------------------------------------
# schedule, optimizer, checkpoints

def lr_factor(step, total_steps, warmup_ratio=0.03):
    """Linear warm-up over the first warmup_ratio of the steps, then cosine to 0 (HF get_cosine_schedule_with_warmup,
    as LLaVA uses it): step 0 has factor 0."""
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return step / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_optimizer(model, lr, llm_lr, sra_lr=None):
    """AdamW over the trainable parameters only, no decay, in three groups as the paper's stage 2 (docs/method.md#
    training-stages): the LLM side (LoRA; with train_llm the whole LLM) at llm_lr, the sampler and projector at lr,
    the SliceRestore Adapter at sra_lr (default lr). The paper trains LoRA at 2e-4 and every other tensor at 2e-5:
    train.py passes sra_lr = --sra-lr, by default a tenth of the LLM side's rate."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    side = lambda n: "llm" if n.startswith("llm.") else "sra" if n.startswith("sra.") else "vision"
    rates = dict(llm=llm_lr, sra=lr if sra_lr is None else sra_lr, vision=lr)
    groups = [dict(params=[p for n, p in named if side(n) == g], lr=rate, base_lr=rate, name=g)
              for g, rate in rates.items()]
    return torch.optim.AdamW([g for g in groups if g["params"]], betas=ADAM_BETAS, weight_decay=0.0)


def trainable_counts(model):
    """{group: trainable parameter count}: sra, sampler, projector, lora, llm (LLaVA users ask for it)."""
    counts = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            group = "lora" if "lora_" in n else n.split(".")[0]  # llm: the whole LLM trains (train_llm)
            counts[group] = counts.get(group, 0) + p.numel()
    return {g: counts[g] for g in ("sra", "sampler", "projector", "lora", "llm") if g in counts}


def save_state(ckpt_dir, model, opt, step, trainer, rng_states, keep):
    """ckpt_dir/step-N/: hires checkpoint + optimizer.safetensors + rng.safetensors + trainer.json, built in a temp
    dir and renamed; then the `latest` pointer is replaced; then old checkpoints beyond `keep` are removed."""
    name = f"step-{step:07d}"
    final, tmp = os.path.join(ckpt_dir, name), os.path.join(ckpt_dir, name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    hires.save_checkpoint(model, tmp)
    index = {id(p): n for n, p in model.named_parameters()}
    moments = {f"{index[id(p)]}.{k}": v.detach().cpu().contiguous()
               for p, state in opt.state.items() for k, v in state.items()}
    save_file(moments, os.path.join(tmp, "optimizer.safetensors"))
    save_file(rng_states, os.path.join(tmp, "rng.safetensors"))
    hires.atomic_write(os.path.join(tmp, "trainer.json"), json.dumps(dict(trainer, step=step), indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    hires.atomic_write(os.path.join(ckpt_dir, "latest"), name)  # written last: it names only complete checkpoints
    done = sorted(d for d in os.listdir(ckpt_dir) if d.startswith("step-") and not d.endswith(".tmp"))
    for old in done[:-keep] + [d for d in os.listdir(ckpt_dir) if d.endswith(".tmp")]:  # .tmp: cut-short saves
        shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)


def load_state(ckpt_dir, model, opt):
    """Restore the `latest` checkpoint into model and opt -> (trainer dict, rng tensors); None if there is none."""
    pointer = os.path.join(ckpt_dir, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        path = os.path.join(ckpt_dir, f.read().strip())
    model.load_trainable_state_dict(load_file(os.path.join(path, "model.safetensors")))
    moments = load_file(os.path.join(path, "optimizer.safetensors"))
    for n, p in model.named_parameters():
        if p.requires_grad and f"{n}.step" in moments:
            opt.state[p] = {k: moments[f"{n}.{k}"].to(p.device) if k != "step" else moments[f"{n}.{k}"]
                            for k in ("step", "exp_avg", "exp_avg_sq")}
    with open(os.path.join(path, "trainer.json")) as f:
        return json.load(f), load_file(os.path.join(path, "rng.safetensors"))


def draw_loss_curve(losses, png, title):
    """Loss per step as a PNG drawn with Pillow (matplotlib is not a dependency)."""
    from PIL import Image, ImageDraw
    W, H, pad = 640, 360, 40
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.rectangle((pad, pad, W - pad, H - pad), outline=(160, 160, 160))
    lo, hi = min(losses), max(losses)
    x = lambda i: pad + (W - 2 * pad) * i / max(1, len(losses) - 1)
    y = lambda v: H - pad - (H - 2 * pad) * (v - lo) / max(1e-9, hi - lo)
    d.line([(x(i), y(v)) for i, v in enumerate(losses)], fill=(30, 70, 210), width=2)
    d.text((pad, 10), f"{title}: loss per step (last {losses[-1]:.4f})", fill="black")
    d.text((4, pad), f"{hi:.3f}", fill="black"), d.text((4, H - pad - 10), f"{lo:.3f}", fill="black")
    d.text((W - pad - 40, H - pad + 8), f"{len(losses)} steps", fill="black")
    img.save(png)


# ----------------------------------------------------------------------------------------------------------------
# one training stage

def train_stage(args, stage, model, data, out_dir, ctx):
    """Train `model` (already at its starting weights) for one stage; checkpoints under out_dir/checkpoints, the
    final trainable weights in out_dir (a hires checkpoint). Returns the per-step history and the skip counts."""
    world, master = ctx["world"], ctx["master"]
    lr, global_batch, accum, total = stage_plan(args, stage, len(data), world)
    model.set_stage(stage)
    opt = make_optimizer(model, lr, args.lora_lr, args.sra_lr) if stage == 2 else make_optimizer(model, lr, lr)
    params = [p for g in opt.param_groups for p in g["params"]]
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    os.makedirs(ckpt_dir, exist_ok=True)
    start, history, skipped = resume_stage(args, stage, model, opt, ckpt_dir, ctx)
    n_train, n_total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    if master:
        print(f"stage {stage}: {len(data)} samples, {total} steps of {global_batch} (micro {args.micro_batch} x "
              f"{accum} accum x {world} proc), trainable {n_train:,} / {n_total:,} params")
        groups = ", ".join(f"{g} {n:,}" for g, n in trainable_counts(model).items())
        print(f"stage {stage}: trainable by group: {groups}")
    net = ddp_wrap(model, ctx)
    sampler = llava_data.MicroBatchSampler(len(data), global_batch, args.micro_batch, ctx["rank"], world, args.seed,
                                           start)
    # its own generator: iter() would otherwise draw from the global RNG (dropout) that --resume has just restored
    loader = iter(torch.utils.data.DataLoader(data, batch_sampler=sampler, collate_fn=llava_data.collate,
                                              num_workers=args.num_workers, generator=torch.Generator()))
    scaler = torch.amp.GradScaler(enabled=ctx["dtype"] == torch.float16)
    model.train()
    bar = tqdm(range(start, total), initial=start, total=total, desc=f"stage {stage}", disable=not master)
    for step in bar:
        t0 = time.time()
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(step, total, args.warmup_ratio)
        stats = accumulate(net, loader, accum, scaler, skipped, ctx)
        loss = stats[0].item()
        if not math.isfinite(loss):
            raise TrainError(f"stage {stage}: loss is {loss} at step {step + 1}; stopped. The last good checkpoint is "
                             f"kept in {ckpt_dir} (resume with --resume, e.g. with a lower learning rate)")
        grad_norm = optimizer_step(opt, scaler, params, args.grad_clip)
        dt = time.time() - t0
        history.append(dict(step=step + 1, loss=loss, lr=opt.param_groups[-1]["lr"], grad_norm=grad_norm,
                            samples_per_s=stats[2].item() / dt, tokens_per_s=stats[1].item() / dt))
        if master:
            report_step(bar, history[-1], stage, total, args)
        if (step + 1) % args.save_every == 0 or step + 1 == total:
            save_stage_state(args, stage, model, opt, history, skipped, total, out_dir, ctx)
    bar.close()
    skipped_all = reduce_counts(skipped, world, ctx["device"])
    if master:
        hires.save_checkpoint(model, out_dir)
        hires.atomic_write(os.path.join(out_dir, "history.json"), json.dumps(history))
        print(f"stage {stage}: done, weights in {out_dir}; skipped/repaired samples: "
              f"{dict(skipped_all) or 'none'} (sum over all samples drawn)")
    return history, skipped_all


def stage_plan(args, stage, n_samples, world):
    """-> (learning rate, global batch, micro-batches accumulated per process and step, total steps) of a stage."""
    lr, global_batch, epochs, steps = (args.lr1, args.batch1, args.epochs1, args.steps1) if stage == 1 else \
        (args.lr2, args.batch2, args.epochs2, args.steps2)
    if global_batch % (args.micro_batch * world):
        raise TrainError(f"global batch {global_batch} is not a multiple of micro batch {args.micro_batch} x "
                         f"{world} processes")
    accum = global_batch // (args.micro_batch * world)
    if n_samples < global_batch:
        raise TrainError(f"stage {stage}: {n_samples} samples, fewer than one global batch of {global_batch}")
    return lr, global_batch, accum, steps or epochs * (n_samples // global_batch)


def resume_stage(args, stage, model, opt, ckpt_dir, ctx):
    """-> (start step, history, skip counts): with --resume, from the latest checkpoint under ckpt_dir (model,
    optimizer and this rank's RNG states restored); otherwise from step 0."""
    resumed = load_state(ckpt_dir, model, opt) if args.resume else None
    if not resumed:
        return 0, [], Counter()
    trainer, rng = resumed
    rank, device = ctx["rank"], ctx["device"]
    if f"cpu.rank{rank}" in rng:
        torch.set_rng_state(rng[f"cpu.rank{rank}"])
    if f"cuda.rank{rank}" in rng and device.type == "cuda":  # LoRA dropout on the GPU
        torch.cuda.set_rng_state(rng[f"cuda.rank{rank}"], device)
    if ctx["master"]:
        print(f"stage {stage}: resumed from step {trainer['step']} ({ckpt_dir})")
    # the skip counts are a sum over ranks: restored once
    return trainer["step"], trainer["history"], Counter(trainer["skipped"] if ctx["master"] else {})


def ddp_wrap(model, ctx):
    """The model itself in one process; else DDP in which only the trainable tensors take part: frozen weights are
    neither broadcast nor reduced."""
    if ctx["world"] == 1:
        return model
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
    device = ctx["device"]
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)


def accumulate(net, loader, accum, scaler, skipped, ctx):
    """Forward and backward of accum micro-batches (DDP syncs gradients on the last only); adds the batches' skip
    counts to `skipped`. -> tensor (loss, text tokens, samples) of the step, summed (loss: averaged) over ranks."""
    world = ctx["world"]
    stats = torch.zeros(3, device=ctx["device"])  # no .item() (a GPU sync) per micro-batch
    for micro in range(accum):
        batch = next(loader)
        with net.no_sync() if world > 1 and micro < accum - 1 else nullcontext():
            with autocast(ctx):
                loss = net(batch["input_ids"], batch["labels"], batch["images"])
            scaler.scale(loss / accum).backward()
        stats[0] += loss.detach() / accum
        stats[1] += sum(map(len, batch["input_ids"]))
        stats[2] += len(batch["labels"])
        skipped += batch["skipped"]
    if world > 1:
        dist.all_reduce(stats)
        stats[0] /= world
    return stats


def optimizer_step(opt, scaler, params, grad_clip):
    """Unscale, clip the global gradient norm, step, clear the gradients. -> the norm before clipping."""
    scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip).item()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return grad_norm


def report_step(bar, h, stage, total, args):
    """Loss on the progress bar; a log line every --log-every steps and at the last step (master only)."""
    bar.set_postfix(loss=f"{h['loss']:.4f}")
    if h["step"] % args.log_every == 0 or h["step"] == total:
        tqdm.write(f"stage {stage} step {h['step']}/{total} loss {h['loss']:.4f} lr {h['lr']:.2e} "
                   f"grad {h['grad_norm']:.3f} {h['samples_per_s']:.1f} samples/s "
                   f"{h['tokens_per_s']:.0f} text tok/s")


def save_stage_state(args, stage, model, opt, history, skipped, total, out_dir, ctx):
    """Checkpoint after the last step of history: every rank joins the collectives (skip counts, RNG states), the
    master writes the checkpoint and the loss curve."""
    world, device = ctx["world"], ctx["device"]
    skipped_all = reduce_counts(skipped, world, device)
    rng = gather_rng(world, device)
    if ctx["master"]:
        trainer = dict(stage=stage, total_steps=total, warmup_ratio=args.warmup_ratio, world=world,
                       history=history, skipped=skipped_all)
        save_state(os.path.join(out_dir, "checkpoints"), model, opt, history[-1]["step"], trainer, rng, args.keep)
        draw_loss_curve([h["loss"] for h in history], os.path.join(out_dir, "loss.png"), f"stage {stage}")


def reduce_counts(counter, world, device):
    """Sum the per-rank skip counters (a fixed vector of llava_data.SKIP_REASONS) -> dict."""
    v = torch.tensor([counter[r] for r in llava_data.SKIP_REASONS], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(v)
    return {r: int(c) for r, c in zip(llava_data.SKIP_REASONS, v.tolist()) if c}


def gather_rng(world, device):
    """Every rank's torch RNG states, CPU and (training on a GPU) CUDA, as tensors {cpu.rank<r>, cuda.rank<r>: uint8},
    gathered to all ranks."""
    states = dict(cpu=torch.get_rng_state())
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    out = {}
    for kind, state in states.items():
        parts = [state]
        if world > 1:
            parts = [torch.empty_like(state, device=device) for _ in range(world)]
            dist.all_gather(parts, state.to(device))
        out.update({f"{kind}.rank{r}": s.cpu() for r, s in enumerate(parts)})
    return out


# ----------------------------------------------------------------------------------------------------------------
# tiny preset: generated data and random base models written in their real formats

def entitygrid_text_qa(questions):
    """EntityGrid-QA as stage-2 data with option-text answers: the options listed without letters, the answer is
    the correct option's text (scored by likelihood ranking, --mc rank)."""
    return [{"id": q["id"], "image": q["image"], "conversations": [
        {"from": "human", "value": "<image>\n" + entitygrid.format_question(q, letters=False)},
        {"from": "gpt", "value": q["options"][entitygrid.LETTERS.index(q["answer"])]}]} for q in questions]


def entitygrid_captions(questions):
    """Stage-1 captions for EntityGrid-QA images (plain template): each entity's name and its cell."""
    return [{"id": q["id"], "image": q["image"], "conversations": [
        {"from": "human", "value": "<image>"},
        {"from": "gpt", "value": ", ".join(f"{e} in cell {c}" for e, c in zip(q["entities"], q["positions"]))}]}
        for q in questions]


def prepare_tiny(args):
    """Generate EntityGrid-QA train/test under args.data_dir when missing, stage-1 captions, a sentencepiece model
    trained on the training text, a random tiny CLIP tower and tiny LLaMA under args.out/base. Master only."""
    for split, num in (("train", args.train_size), ("test", args.test_size)):
        d = os.path.join(args.data_dir, split)
        if not os.path.isfile(os.path.join(d, "llava.json")):
            entitygrid.generate(d, num, args.seed, base=clip.CLIPConfig.from_preset("tiny").image_size, split=split,
                                families=args.families.split(","))
    train_dir = os.path.join(args.data_dir, "train")
    captions, text_qa = (os.path.join(train_dir, f) for f in ("captions.json", "text_qa.json"))
    for path, make in ((captions, entitygrid_captions), (text_qa, entitygrid_text_qa)):
        if not os.path.isfile(path):
            hires.atomic_write(path, json.dumps(make(entitygrid.load_questions(train_dir))))
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
            cfg = hires.make_tiny_backbones(base, texts, args.seed, args.vocab_size)
        except RuntimeError as e:  # sentencepiece: e.g. fewer pieces than the data has characters
            raise TrainError(f"--vocab-size {args.vocab_size}: sentencepiece cannot train on {train_dir} "
                             f"({str(e).splitlines()[-1]})") from None
        hires.atomic_write(os.path.join(base, "hires_config.json"), json.dumps(dataclasses.asdict(cfg)))


def model_config(args):
    """HiResConfig: the tiny backbones written by prepare_tiny, or --clip/--llm for the paper preset."""
    if args.preset == "tiny":
        with open(os.path.join(args.out, "base", "hires_config.json")) as f:
            paths = {k: v for k, v in json.load(f).items() if k in ("clip_weights", "llm_path", "tokenizer_path")}
        paths["clip_preset"] = "tiny"
    else:
        paths = dict(clip_preset="vit-l-14-336", **backbone_paths(args))
    try:
        return hires.HiResConfig(**paths, max_slices=args.max_slices, upscale=args.upscale, sampler=args.sampler,
                                 sra=args.sra, sra_layers=args.sra_layers, slices=args.slices,
                                 overview=args.overview, max_length=args.max_len, lora_rank=args.lora_rank,
                                 lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, train_llm=args.train_llm)
    except ValueError as e:  # e.g. --sra-layers at or after the feature block
        raise TrainError(str(e)) from None


def backbone_paths(args):
    """--clip/--llm/--tokenizer as absolute HiResConfig paths (a checkpoint must work from any folder)."""
    paths = {}
    if args.clip:
        paths["clip_weights"] = os.path.abspath(args.clip)
    if args.llm:
        paths["llm_path"] = os.path.abspath(args.llm)
    if args.tokenizer or args.llm:
        paths["tokenizer_path"] = os.path.abspath(args.tokenizer or os.path.join(args.llm, "tokenizer.model"))
    return paths


def init_model(args, where):
    """Stage 2 from a stage-1 checkpoint: its config, with every flag the user passed winning over it. The sampler
    cannot change (stage 1 trained it); a new LoRA rank starts fresh and --no-sra drops the SRA, as stage 1 leaves
    both at their init."""
    try:
        with open(os.path.join(args.init, "config.json")) as f:
            stored = json.load(f)
        sd = load_file(os.path.join(args.init, "model.safetensors"))
    except (OSError, ValueError) as e:
        raise TrainError(f"--init {args.init}: not a stage-1 checkpoint ({e})") from None
    over = {field: getattr(args, flag) for flag, field in CONFIG_FLAGS.items() if flag in args.given}
    over.update(backbone_paths(args))
    if over.get("sampler", stored["sampler"]) != stored["sampler"]:
        raise TrainError(f"--sampler {over['sampler']}: {args.init} trained the {stored['sampler']} sampler in stage "
                         f"1, so stage 2 keeps it (run stage 1 with --sampler {over['sampler']})")
    for key in ("clip_weights", "llm_path", "tokenizer_path"):
        path = over.get(key, stored[key])
        if not os.path.exists(path):
            raise TrainError(f"{path}: the {key} of {args.init} is not there; pass --clip/--llm/--tokenizer")
    try:
        cfg = hires.HiResConfig(**{**stored, **over})
    except (TypeError, ValueError) as e:  # unknown keys, impossible combinations
        raise TrainError(f"--init {args.init}: {e}") from None
    model = hires.HiResLLaVA(cfg, **where)
    if model.cfg.lora_rank != stored["lora_rank"]:
        if any(v.any() for k, v in sd.items() if k.endswith("lora_B")):
            raise TrainError(f"--lora-rank {model.cfg.lora_rank}: the LoRA of {args.init} is trained (rank "
                             f"{stored['lora_rank']}); its rank cannot change")
        own = model.trainable_state_dict()
        sd = {**{k: v for k, v in sd.items() if "lora_" not in k}, **{k: v for k, v in own.items() if "lora_" in k}}
    if model.sra is None:  # --no-sra over a checkpoint with SRA: stage 1 leaves it at its init, the identity
        sd = {k: v for k, v in sd.items() if not k.startswith("sra.")}
    try:
        model.load_trainable_state_dict(sd)
    except ValueError as e:
        raise TrainError(f"--init {args.init}: {e}") from None
    return model, over


# ----------------------------------------------------------------------------------------------------------------
# EntityGrid-QA evaluation (tiny preset): all ranks generate their share, rank 0 scores

@torch.no_grad()
def evaluate_entitygrid(model, test_dir, args, ctx):
    """--mc letter: greedy answers, letters parsed by entitygrid.score; --mc rank: the option texts ranked by
    likelihood after the letter-free prompt, the best one's letter as the prediction."""
    questions = entitygrid.load_questions(test_dir)
    mine = questions[ctx["rank"]::ctx["world"]]
    model.eval()
    preds = {}
    for i in tqdm(range(0, len(mine), args.eval_batch), desc="eval EntityGrid-QA", disable=not ctx["master"]):
        chunk = mine[i:i + args.eval_batch]
        images = [slicing.load_image(os.path.join(test_dir, q["image"])) for q in chunk]
        with autocast(ctx):
            if args.mc == "rank":
                scores = model.option_logprobs(images, [entitygrid.format_question(q, letters=False) for q in chunk],
                                               [q["options"] for q in chunk])
                out = [entitygrid.LETTERS[max(range(len(s)), key=s.__getitem__)] for s in scores]
            else:
                out = model.generate(images, [entitygrid.format_question(q) for q in chunk],
                                     max_new_tokens=args.max_new_tokens)
        preds.update({q["id"]: o for q, o in zip(chunk, out)})
    if ctx["world"] > 1:
        parts = [None] * ctx["world"]
        dist.all_gather_object(parts, preds)
        preds = {k: v for p in parts for k, v in p.items()}
    return entitygrid.score(questions, preds), preds


# ----------------------------------------------------------------------------------------------------------------
# command line

def block_list(text):
    """'7,8,9' -> [7, 8, 9] (argparse type of --sra-layers)."""
    try:
        return [int(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated block numbers, e.g. 7,8,9") from None


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--preset", choices=sorted(PRESETS), help="hyper-parameter defaults: 'tiny' (random tiny ViT + LLaMA, "
      "EntityGrid-QA, CPU minutes; the default without --clip/--llm) or 'paper' (ViT-L-14-336 + Vicuna-7B)")
    a("--stage", choices=("1", "2", "all"), default="all", help="1: sampler+projector on captions; 2: SRA+sampler+"
      "projector+LoRA on instructions (needs --init unless 'all'); all: 1 then 2 (then EntityGrid eval for tiny)")
    a("--out", default=None, help="run directory (stage k writes OUT/stage<k>; default runs/<preset>)")
    a("--init", help="stage-1 checkpoint directory that stage 2 starts from")
    a("--resume", action="store_true", help="continue from the last complete checkpoint under OUT")
    a("--clip", help="open_clip ViT-L-14-336 weights file (paper preset)")
    a("--llm", help="Vicuna-7B-v1.5 HF directory (paper preset)")
    a("--tokenizer", help="sentencepiece model (default LLM/tokenizer.model)")
    a("--data1", help="stage-1 LLaVA JSON (captions; tiny: generated EntityGrid captions)")
    a("--data2", help="stage-2 LLaVA JSON (instructions; tiny: generated EntityGrid-QA llava.json)")
    a("--image-folder", help="folder the JSON's image paths are relative to (tiny: the data dir)")
    a("--data-dir", default="data/entitygrid", help="tiny: where EntityGrid-QA train/ and test/ are (generated "
      "when missing)")
    a("--train-size", type=int, help="tiny: number of EntityGrid-QA training questions to generate")
    a("--test-size", type=int, help="tiny: number of EntityGrid-QA test questions to generate and evaluate")
    a("--families", help="tiny: comma-separated EntityGrid-QA entity families of the generated splits (of "
      f"{','.join(entitygrid.FAMILIES)}; default object,shape: a random tiny ViT cannot read words and numbers, "
      "see README)")
    a("--vocab-size", type=int, help="tiny: sentencepiece vocabulary size trained from the data")
    a("--max-slices", type=int, help="maximum slices per image N (paper 16)")
    a("--upscale", action=argparse.BooleanOptionalAction, help="double the grid of small images when 4mn <= N")
    a("--sampler", choices=("sms", "qformer", "avgpool"), help="token sampler (default and paper: sms)")
    a("--sra", action=argparse.BooleanOptionalAction, help="SliceRestore Adapter in the ViT (default; --no-sra: "
      "the ablation without it)")
    a("--slices", action=argparse.BooleanOptionalAction, help="the slices of the image (default; --no-slices: "
      "overview only, the no-slicing baseline)")
    a("--overview", action=argparse.BooleanOptionalAction, help="the low-res overview (default; --no-overview: "
      "slices only)")
    a("--lora-rank", type=int, help="LoRA rank r (paper 128)")
    a("--lora-alpha", type=float, help="LoRA alpha; scaling alpha/r (paper 256)")
    a("--lora-dropout", type=float, help="dropout on the LoRA branch (paper preset: LLaVA's 0.05)")
    a("--max-len", type=int, help="tokens of one sequence, image tokens included (HiResConfig.max_length); 0: the "
      "LLM's own context (Vicuna-7B-v1.5: 4096). Longer samples are cut and counted; with no answer left, skipped")
    a("--lr1", type=float, help="stage-1 learning rate (paper 1e-3)")
    a("--lr2", type=float, help="stage-2 learning rate of the sampler and projector (paper 2e-5)")
    a("--sra-lr", type=float, help="stage-2 learning rate of the SliceRestore Adapter (default: a tenth of "
      "--lora-lr; paper 2e-5, as every tensor outside the LLM)")
    a("--sra-layers", type=block_list, help="0-based ViT blocks holding a SliceRestore Adapter, comma-separated "
      "(default: the paper's layers 19-22 of 24, i.e. 18,19,20,21; tiny ViT 7,8,9 of 12)")
    a("--lora-lr", type=float, help="stage-2 learning rate of the LLM side: LoRA, and with --train-llm the whole LLM "
      "(paper 2e-4)")
    a("--batch1", type=int, help="stage-1 global batch size over all processes (paper 256)")
    a("--batch2", type=int, help="stage-2 global batch size over all processes (paper 128)")
    a("--micro-batch", type=int, help="samples per process per forward; gradients are accumulated up to the batch")
    a("--epochs1", type=int, help="stage-1 epochs (paper 1)")
    a("--epochs2", type=int, help="stage-2 epochs (paper 1)")
    a("--steps1", type=int, default=0, help="stage-1 optimizer steps (0: from --epochs1)")
    a("--steps2", type=int, default=0, help="stage-2 optimizer steps (0: from --epochs2)")
    a("--warmup-ratio", type=float, default=0.03, help="fraction of the steps with linear warm-up before cosine")
    a("--grad-clip", type=float, default=1.0, help="clip the global gradient norm to this value")
    a("--dtype", choices=("auto", "fp32", "bf16", "fp16"), help="autocast dtype on CUDA (auto: bf16 if "
      "supported else fp16); CPU always fp32")
    a("--grad-ckpt", action=argparse.BooleanOptionalAction, help="activation checkpointing in the LLM and in the "
      "ViT blocks that carry SRA (paper preset: on)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    a("--threads", type=int, default=0, help="CPU threads per process (0: cores / processes)")
    a("--num-workers", type=int, help="DataLoader worker processes per rank")
    a("--seed", type=int, default=0, help="seed for init, data order and generation")
    a("--log-every", type=int, default=10, help="print a log line every N steps")
    a("--save-every", type=int, default=100, help="write a checkpoint every N steps (and at the end)")
    a("--keep", type=int, default=2, help="number of checkpoints kept")
    a("--eval-batch", type=int, default=64, help="EntityGrid-QA evaluation batch size")
    a("--max-new-tokens", type=int, default=4, help="tokens generated per EntityGrid-QA answer (--mc letter)")
    a("--mc", choices=("rank", "letter"), help="tiny: EntityGrid-QA answers as option text, trained so and scored "
      "by ranking the options by likelihood (rank), or as the option letter, generated and parsed (letter)")
    a("--train-llm", action=argparse.BooleanOptionalAction, help="train the whole LLM in both stages (tiny: its "
      "random stand-in must learn language; paper: Vicuna stays frozen and LoRA trains)")
    a("--cache-vit", action=argparse.BooleanOptionalAction, help="compute the frozen ViT blocks before the first "
      "SRA layer once per training image and reuse them every epoch (memory: ~(1+L)*D floats per image)")
    args = p.parse_args(argv)
    args.preset = args.preset or ("paper" if args.clip or args.llm else "tiny")
    args.given = {k for k in CONFIG_FLAGS if getattr(args, k) is not None}  # these win over an --init config
    args.sampler = args.sampler or "sms"
    for switch in ("sra", "slices", "overview"):
        setattr(args, switch, True if getattr(args, switch) is None else getattr(args, switch))
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.out = args.out or os.path.join("runs", args.preset)
    args.sra_lr = args.lora_lr / 10 if args.sra_lr is None else args.sra_lr  # the paper's 2e-5 beside LoRA's 2e-4
    families = args.families.split(",")
    if set(families) - set(entitygrid.FAMILIES) or not {"object", "shape"} & set(families):
        p.error(f"--families {args.families}: choose from {','.join(entitygrid.FAMILIES)}, with object or shape "
                "(the counting questions draw those)")
    if args.preset == "paper" and not (args.clip and args.llm):
        p.error("the paper preset needs --clip (open_clip ViT-L-14-336 weights file) and --llm (Vicuna-7B-v1.5 "
                "directory); without both, run the tiny preset (no weight flags)")
    for flag, path in (("--clip", args.clip), ("--llm", args.llm)):
        if path and not os.path.exists(path):
            p.error(f"{flag} {path}: no such file or directory")
    if args.preset == "paper" and (args.stage != "1" and not args.data2 or args.stage != "2" and not args.data1):
        p.error("the paper preset needs --data1 (stage 1) and/or --data2 (stage 2) LLaVA JSON files and --image-folder")
    if args.stage == "2" and not args.init:
        p.error("--stage 2 needs --init STAGE1_CHECKPOINT_DIR")
    return args


def setup(args):
    """Process group (torchrun sets RANK/WORLD_SIZE), device, threads, dtype -> ctx dict."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(args.device)
    if world > 1:
        if device.type == "cuda":  # before the process group: NCCL then binds each rank to its own GPU, not GPU 0
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if device.type == "cpu":
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    dtype = torch.float32
    if device.type == "cuda" and args.dtype != "fp32":
        dtype = torch.bfloat16 if args.dtype == "bf16" or args.dtype == "auto" and torch.cuda.is_bf16_supported() \
            else torch.float16
    return dict(rank=rank, world=world, device=device, master=rank == 0, dtype=dtype)


def autocast(ctx):
    """bf16/fp16 autocast on CUDA; CPU runs in fp32."""
    return torch.autocast(ctx["device"].type, dtype=ctx["dtype"]) if ctx["dtype"] != torch.float32 else nullcontext()


def barrier(ctx):
    if ctx["world"] > 1:
        dist.barrier()


def run(args, ctx):
    tiny, master = args.preset == "tiny", ctx["master"]
    if tiny:
        if master:
            prepare_tiny(args)
        barrier(ctx)
        args.data1 = args.data1 or os.path.join(args.data_dir, "train", "captions.json")
        args.data2 = args.data2 or os.path.join(args.data_dir, "train", "text_qa.json" if args.mc == "rank" else
                                                "llava.json")
        args.image_folder = args.image_folder or os.path.join(args.data_dir, "train")
    torch.manual_seed(args.seed)  # identical trainable init on every rank
    # frozen weights in the autocast dtype, read straight onto the device (7B: no 27 GB fp32 copy on each GPU);
    # the trained tensors stay fp32 for the optimizer
    where = dict(device=ctx["device"], dtype=ctx["dtype"], adapter_dtype=torch.float32)
    if args.stage == "2":
        model, over = init_model(args, where)
        if master:
            print(f"stage 2 from {args.init}; flags over its config: {over or 'none'}")
    else:
        model = hires.HiResLLaVA(model_config(args), **where)
    model.llm.gradient_checkpointing = model.vision.gradient_checkpointing = args.grad_ckpt
    torch.manual_seed(args.seed + ctx["rank"])  # per-rank randomness (LoRA dropout)
    stages = [1, 2] if args.stage == "all" else [int(args.stage)]
    data = {stage: llava_data.LlavaData(args.data1 if stage == 1 else args.data2, args.image_folder or "",
                                        model.tokenizer, "plain" if stage == 1 else "vicuna_v1", model.preprocess,
                                        model.context, model.cfg.image_tokens) for stage in stages}
    if args.cache_vit:
        prefixes = llava_data.cache_prefixes(model, list(data.values()), master)
        for d in data.values():
            d.prefixes = prefixes
    for stage in stages:
        train_stage(args, stage, model, data[stage], os.path.join(args.out, f"stage{stage}"), ctx)
    if tiny and args.stage != "1":
        metrics, preds = evaluate_entitygrid(model, os.path.join(args.data_dir, "test"), args, ctx)
        if master:
            hires.atomic_write(os.path.join(args.out, "metrics.json"), json.dumps(metrics, indent=1))
            hires.atomic_write(os.path.join(args.out, "predictions.json"), json.dumps(preds, indent=1))
            pt = metrics["per_task"]
            print(f"EntityGrid-QA test ({metrics['num']} questions): accuracy {metrics['accuracy']:.3f} "
                  f"(recognition {pt['recognition']:.3f}, position {pt['position']:.3f}, counting "
                  f"{pt['counting']:.3f}); edge {metrics['edge_accuracy']:.3f} vs other "
                  f"{metrics['other_accuracy']:.3f}, Discrepancy {metrics['discrepancy']:.3f} "
                  f"-> {os.path.join(args.out, 'metrics.json')}")
        return metrics


def main(argv=None):
    args = parse_args(argv)
    ctx = setup(args)
    t0 = time.time()
    try:
        result = run(args, ctx)
    except (TrainError, llava_data.DataError, slicing.ImageError, FileNotFoundError) as e:
        sys.exit(f"train.py: error: {e}")
    finally:
        if ctx["world"] > 1:
            dist.destroy_process_group()
    if ctx["master"]:
        print(f"total wall time {time.time() - t0:.1f} s")
    return result


if __name__ == "__main__":
    main()
