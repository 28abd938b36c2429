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
import json
import math
import os
import shutil
import sys
import time
from collections import Counter
from contextlib import nullcontext

from tqdm import tqdm

import conversation
import entitygrid
import eval as evaluation  # the benchmarks' answering and the range-checked flag type, shared with eval.py
import slicing

# torch, safetensors and the files that import torch (hires, llava_data, clip) are imported in the functions that use
# them: they take 2 s to import, and --help or a bad flag answers without them (the command line needs none).

ADAM_BETAS = (0.9, 0.999)  # the paper does not give its betas; LLaVA trains with HF Trainer's AdamW defaults
PRESETS = {  # every value is a command-line default; see --help
    "tiny": dict(lora_dropout=0.0, max_slices=4, upscale=False, lora_rank=0, lora_alpha=16, max_length=512,
                 lr1=2e-3, lr2=2e-3, lora_lr=2e-3, batch1=32, batch2=32, micro_batch=8, epochs1=10, epochs2=4,
                 train_size=6000, test_size=2700, vocab_size=1000, dtype="fp32", grad_ckpt=False, num_workers=0,
                 train_llm=True, mc="rank", cache_vit=True, families="object,shape", sra_layers=[7, 8, 9]),
    "paper": dict(lora_dropout=0.05, max_slices=16, upscale=True, lora_rank=128, lora_alpha=256, max_length=0,
                  lr1=1e-3, lr2=2e-5, lora_lr=2e-4, batch1=256, batch2=128, micro_batch=8, epochs1=1, epochs2=1,
                  train_size=0, test_size=0, vocab_size=0, dtype="auto", grad_ckpt=True, num_workers=4,
                  train_llm=False, mc="letter", cache_vit=False, families=",".join(entitygrid.FAMILIES),
                  sra_layers=[18, 19, 20, 21]),
}
# HiResConfig fields set by the flag of the same name; a stage-2 start from --init takes those given over its config
MODEL_FLAGS = ("max_slices", "upscale", "sampler", "max_length", "lora_rank", "lora_alpha", "lora_dropout", "sra",
               "sra_layers", "slices", "overview", "train_llm")


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
    training-stages): the LLM side (LoRA; with train_llm the whole LLM) at llm_lr, sampler and projector at lr, the
    SRA at sra_lr (default lr; the paper trains LoRA at 2e-4, the rest at 2e-5: --sra-lr is by default llm_lr / 10)."""
    import torch
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    side = lambda n: "llm" if n.startswith("llm.") else "sra" if n.startswith("sra.") else "vision"
    rates = dict(llm=llm_lr, sra=lr if sra_lr is None else sra_lr, vision=lr)
    groups = [dict(params=[p for n, p in named if side(n) == g], lr=rate, base_lr=rate, name=g)
              for g, rate in rates.items()]
    return torch.optim.AdamW([g for g in groups if g["params"]], betas=ADAM_BETAS, weight_decay=0.0)


def trainable_counts(model):
    """{group: trainable parameter count}: sra, sampler, projector, lora, llm (LLaVA users ask for it)."""
    counts = Counter()
    for n, p in model.named_parameters():  # llm: the whole LLM trains (train_llm; stage 0)
        counts["lora" if "lora_" in n else n.split(".")[0]] += p.numel() if p.requires_grad else 0
    return {g: counts[g] for g in ("sra", "sampler", "projector", "lora", "llm", "vision") if counts[g]}


def save_state(ckpt_dir, model, opt, step, trainer, rng_states, keep):
    """ckpt_dir/step-N/: hires checkpoint + optimizer.safetensors + rng.safetensors + trainer.json, built in a temp
    dir and renamed; then the `latest` pointer is replaced; then old checkpoints beyond `keep` are removed."""
    from safetensors.torch import save_file
    import hires
    name = f"step-{step:07d}"
    final, tmp = os.path.join(ckpt_dir, name), os.path.join(ckpt_dir, name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    hires.save_checkpoint(model, tmp, run=os.path.dirname(os.path.dirname(ckpt_dir)))  # ckpt_dir: OUT/stage<k>/...
    index = {id(p): n for n, p in model.named_parameters()}
    moments = {f"{index[id(p)]}.{k}": v.detach().cpu().contiguous()
               for p, state in opt.state.items() for k, v in state.items()}
    save_file(moments, os.path.join(tmp, "optimizer.safetensors"))
    save_file(rng_states, os.path.join(tmp, "rng.safetensors"))
    hires.atomic_write(os.path.join(tmp, "trainer.json"), json.dumps(dict(trainer, step=step), indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    hires.atomic_write(os.path.join(ckpt_dir, "latest"), name)  # written last: it names only complete checkpoints
    # the oldest beyond `keep` go, never the one `latest` names (a step number lower than older leftovers)
    done = sorted(d for d in os.listdir(ckpt_dir) if d.startswith("step-") and not d.endswith(".tmp") and d != name)
    for old in done[:max(0, len(done) + 1 - keep)] + [d for d in os.listdir(ckpt_dir) if d.endswith(".tmp")]:
        shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)  # .tmp: cut-short saves


def draw_loss_curve(losses, png, title):
    """Loss per step as a PNG drawn with Pillow (matplotlib is not a dependency)."""
    from PIL import Image, ImageDraw
    W, H, pad, lo, hi, n = 640, 360, 40, min(losses), max(losses), len(losses)
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.rectangle((pad, pad, W - pad, H - pad), outline=(160, 160, 160))
    d.line([(pad + (W - 2 * pad) * i / max(1, n - 1), H - pad - (H - 2 * pad) * (v - lo) / max(1e-9, hi - lo))
            for i, v in enumerate(losses)], fill=(30, 70, 210), width=2)
    for xy, text in (((pad, 10), f"{title}: loss per step (last {losses[-1]:.4f})"), ((4, pad), f"{hi:.3f}"),
                     ((4, H - pad - 10), f"{lo:.3f}"), ((W - pad - 40, H - pad + 8), f"{n} steps")):
        d.text(xy, text, fill="black")
    img.save(png)


# ----------------------------------------------------------------------------------------------------------------
# one training stage

def train_stage(args, stage, model, data, out_dir, proc):
    """Train `model` (already at its starting weights) for one stage; checkpoints under out_dir/checkpoints, the
    final trainable weights in out_dir (a hires checkpoint). Returns the per-step history and the skip counts."""
    import torch
    import hires
    import llava_data
    world, master = proc["world"], proc["master"]
    lr, global_batch, accum, total = stage_plan(args, stage, len(data), world)
    model.set_stage(stage)
    # what evaluation follows: the template trained, and the multiple-choice answer mode (hires.HiResConfig)
    model.cfg.template, model.cfg.mc = ("plain" if stage == 1 else "vicuna_v1"), args.mc
    opt = make_optimizer(model, lr, args.lora_lr, args.sra_lr) if stage == 2 else make_optimizer(model, lr, lr)
    params = [p for g in opt.param_groups for p in g["params"]]
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    os.makedirs(ckpt_dir, exist_ok=True)
    start, history, skipped = resume_stage(args, stage, model, opt, ckpt_dir, proc)
    n_train, n_total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    if master:
        print(f"stage {stage}: {len(data)} samples, {total} steps of {global_batch} (micro {args.micro_batch} x "
              f"{accum} accum x {world} proc), trainable {n_train:,} / {n_total:,} params")
        groups = ", ".join(f"{g} {n:,}" for g, n in trainable_counts(model).items())
        print(f"stage {stage}: trainable by group: {groups}")
    net = ddp_wrap(model, proc)
    lengths = data.modality_lengths(model.grid) if stage == 2 else None
    if lengths and (min(lengths) > 0 or max(lengths) < 0):
        lengths = None  # one modality: as LLaVA, length grouping is for finetuning on mixed data (LLaVA-665K)
    sampler = llava_data.MicroBatchSampler(len(data), global_batch, args.micro_batch, proc["rank"], world, args.seed,
                                           start, lengths)
    # its own generator: iter() would otherwise draw from the global RNG (dropout) that --resume has just restored
    loader = iter(torch.utils.data.DataLoader(data, batch_sampler=sampler, collate_fn=llava_data.collate,
                                              num_workers=args.num_workers, generator=torch.Generator()))
    scaler = torch.amp.GradScaler(proc["device"].type, enabled=proc["dtype"] == torch.float16)
    model.train()
    bar = tqdm(range(start, total), initial=start, total=total, desc=f"stage {stage}", disable=not master)
    for step in bar:
        t0 = time.time()
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(step, total, args.warmup_ratio)
        stats = accumulate(net, loader, accum, scaler, skipped, proc)
        loss = stats[0].item()
        if not math.isfinite(loss):
            raise TrainError(f"stage {stage}: loss is {loss} at step {step + 1}; stopped. The last good checkpoint is "
                             f"kept in {ckpt_dir} (resume with --resume, e.g. with a lower learning rate)")
        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip).item()  # the norm before clipping
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        dt = time.time() - t0
        history.append(dict(step=step + 1, loss=loss, lr=opt.param_groups[-1]["lr"], grad_norm=grad_norm,
                            samples_per_s=stats[2].item() / dt, tokens_per_s=stats[1].item() / dt))
        if master:  # loss on the bar; a log line every --log-every steps and at the last
            bar.set_postfix(loss=f"{loss:.4f}")
            if (step + 1) % args.log_every == 0 or step + 1 == total:
                h = history[-1]
                tqdm.write(f"stage {stage} step {step + 1}/{total} loss {loss:.4f} lr {h['lr']:.2e} grad "
                           f"{grad_norm:.3f} {h['samples_per_s']:.1f} samples/s {h['tokens_per_s']:.0f} text tok/s")
        if (step + 1) % args.save_every == 0 or step + 1 == total:  # every rank joins the collectives
            skipped_all, rng = reduce_counts(skipped, world, proc["device"]), gather_rng(world, proc["device"])
            if master:
                trainer = dict(stage=stage, total_steps=total, warmup_ratio=args.warmup_ratio, world=world,
                               history=history, skipped=skipped_all)
                save_state(ckpt_dir, model, opt, step + 1, trainer, rng, args.keep)
                draw_loss_curve([h["loss"] for h in history], os.path.join(out_dir, "loss.png"), f"stage {stage}")
    bar.close()
    skipped_all = reduce_counts(skipped, world, proc["device"])
    if master:
        hires.save_checkpoint(model, out_dir, run=args.out)
        hires.atomic_write(os.path.join(out_dir, "history.json"), json.dumps(history))
        print(f"stage {stage}: done, weights in {out_dir}; skipped/repaired samples: "
              f"{dict(skipped_all) or 'none'} (sum over all samples drawn)")
    return history, skipped_all


def stage_plan(args, stage, n_samples, world):
    """-> (learning rate, global batch, micro-batches accumulated per process and step, total steps) of a stage."""
    lr, global_batch, epochs, steps = (getattr(args, f"{k}{stage}", 0) for k in ("lr", "batch", "epochs", "steps"))
    if global_batch % (args.micro_batch * world):
        raise TrainError(f"global batch {global_batch} is not a multiple of micro batch {args.micro_batch} x "
                         f"{world} processes")
    accum = global_batch // (args.micro_batch * world)
    if n_samples < global_batch:
        raise TrainError(f"stage {stage}: {n_samples} samples, fewer than one global batch of {global_batch}")
    return lr, global_batch, accum, steps or epochs * (n_samples // global_batch)


def resume_stage(args, stage, model, opt, ckpt_dir, proc):
    """-> (start step, history, skip counts): with --resume, from the checkpoint `latest` names under ckpt_dir (model,
    optimizer moments and this rank's RNG states restored); otherwise from step 0."""
    import torch
    from safetensors.torch import load_file
    pointer = os.path.join(ckpt_dir, "latest")
    if not args.resume or not os.path.isfile(pointer):
        return 0, [], Counter()
    with open(pointer) as f:
        path = os.path.join(ckpt_dir, f.read().strip())
    model.load_trainable_state_dict(load_file(os.path.join(path, "model.safetensors")))
    moments = load_file(os.path.join(path, "optimizer.safetensors"))
    for n, p in model.named_parameters():
        if p.requires_grad and f"{n}.step" in moments:
            opt.state[p] = {k: moments[f"{n}.{k}"].to(p.device) if k != "step" else moments[f"{n}.{k}"]
                            for k in ("step", "exp_avg", "exp_avg_sq")}
    with open(os.path.join(path, "trainer.json")) as f:
        trainer = json.load(f)
    rng = load_file(os.path.join(path, "rng.safetensors"))
    rank, device = proc["rank"], proc["device"]
    if f"cpu.rank{rank}" in rng:
        torch.set_rng_state(rng[f"cpu.rank{rank}"])
    if f"cuda.rank{rank}" in rng and device.type == "cuda":  # LoRA dropout on the GPU
        torch.cuda.set_rng_state(rng[f"cuda.rank{rank}"], device)
    if proc["master"]:
        print(f"stage {stage}: resumed from step {trainer['step']} ({ckpt_dir})")
    # the skip counts are a sum over ranks: restored once
    return trainer["step"], trainer["history"], Counter(trainer["skipped"] if proc["master"] else {})


def ddp_wrap(model, proc):
    """The model itself in one process; else DDP in which only the trainable tensors take part: frozen weights are
    neither broadcast nor reduced."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    if proc["world"] == 1:
        return model
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
    device = proc["device"]
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)


def accumulate(net, loader, accum, scaler, skipped, proc):
    """Forward and backward of accum micro-batches (DDP syncs gradients on the last only); adds the batches' skip
    counts to `skipped`. -> tensor (loss, text tokens, samples) of the step, summed (loss: averaged) over ranks."""
    import torch
    import torch.distributed as dist
    world = proc["world"]
    stats = torch.zeros(3, device=proc["device"])  # no .item() (a GPU sync) per micro-batch
    for micro in range(accum):
        batch = next(loader)
        with net.no_sync() if world > 1 and micro < accum - 1 else nullcontext():
            with proc["autocast"]:
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


def reduce_counts(counter, world, device):
    """Sum the per-rank skip counters (a fixed vector of llava_data.SKIP_REASONS) -> dict."""
    import torch
    import torch.distributed as dist
    import llava_data
    v = torch.tensor([counter[r] for r in llava_data.SKIP_REASONS], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(v)
    return {r: int(c) for r, c in zip(llava_data.SKIP_REASONS, v.tolist()) if c}


def gather_rng(world, device):
    """Every rank's RNG states, CPU and (on a GPU) CUDA, gathered to all ranks: {cpu.rank<r>, cuda.rank<r>: uint8}."""
    import torch
    import torch.distributed as dist
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

def prepare_tiny(args):
    """Generate EntityGrid-QA train/test under args.data_dir when missing, stage-1 captions, a sentencepiece model
    trained on the training text, a random tiny CLIP tower and tiny LLaMA under args.out/base. Master only."""
    import hires
    import clip
    for split, num in (("train", args.train_size), ("test", args.test_size)):
        d = os.path.join(args.data_dir, split)
        if not os.path.isfile(os.path.join(d, "llava.json")):
            entitygrid.generate(d, num, args.seed, base=clip.CLIPConfig.from_preset("tiny").image_size, split=split,
                                families=args.families.split(","))
    train_dir = os.path.join(args.data_dir, "train")
    captions, text_qa = (os.path.join(train_dir, f) for f in ("captions.json", "text_qa.json"))
    for path, make in ((captions, entitygrid.caption_items), (text_qa, entitygrid.text_qa_items)):
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
        hires.atomic_write(os.path.join(base, "hires_config.json"), json.dumps(hires.config_dict(cfg, base, args.out)))


def run_stage0(args, proc):
    """Stage 0 (tiny preset): the random backbones of OUT/base pretrained together (llava_data.TinyPretrain), written to
    OUT/stage0 in their real formats with the encoder diagnostics (encoder.json) and, last, hires_config.json."""
    import torch
    import llava_data
    families = args.families.split(",")
    torch.manual_seed(args.seed)
    model = llava_data.TinyPretrain.from_base(os.path.join(args.out, "base"), families).to(proc["device"])
    random_probe, out = llava_data.encoder_probe(model.vision, families), os.path.join(args.out, "stage0")
    train_stage(args, 0, model, llava_data.Stage0Data(args.data_dir, model, args.seed), out, proc)
    if proc["master"]:
        model.save_backbones(out, random_probe)
    barrier(proc)


def backbone_dir(args):
    """Tiny preset: where stages 1-2 find their frozen backbones: random (OUT/base, --random-backbones), or stage 0's
    (--stage0 DIR, else OUT/stage0)."""
    return os.path.join(args.out, "base") if args.random_backbones else args.stage0 or os.path.join(args.out, "stage0")


def model_config(args):
    """HiResConfig: the tiny backbones written by prepare_tiny, or --clip/--llm for the paper preset."""
    import hires
    if args.preset == "tiny":
        stored = hires.read_config(backbone_dir(args), "hires_config.json")
        paths = dict(clip_preset="tiny", **{k: stored[k] for k in hires.BACKBONE_PATHS})
    else:
        paths = dict(clip_preset="vit-l-14-336", **hires.backbone_paths(args.clip, args.llm, args.tokenizer))
    try:
        return hires.HiResConfig(**paths, **{k: getattr(args, k) for k in MODEL_FLAGS})
    except ValueError as e:  # e.g. --sra-layers at or after the feature block
        raise TrainError(str(e)) from None


def init_model(args, placement):
    """Stage 2 from a stage-1 checkpoint: its config, every flag given winning over it. The sampler cannot change
    (stage 1 trained it); a new LoRA rank starts fresh and --no-sra drops the SRA (stage 1 leaves both at init)."""
    from safetensors.torch import load_file
    import hires
    try:
        stored = hires.read_config(args.init)
        sd = load_file(os.path.join(args.init, "model.safetensors"))
    except (OSError, ValueError) as e:
        raise TrainError(f"--init {args.init}: not a stage-1 checkpoint ({e})") from None
    overrides = {k: getattr(args, k) for k in args.given}
    overrides.update(hires.backbone_paths(args.clip, args.llm, args.tokenizer))
    sampler = overrides.get("sampler", stored["sampler"])
    if sampler != stored["sampler"]:
        raise TrainError(f"--sampler {sampler}: {args.init} trained the {stored['sampler']} sampler in stage 1, so "
                         f"stage 2 keeps it (run stage 1 with --sampler {sampler})")
    for key in hires.BACKBONE_PATHS:
        path = overrides.get(key, stored[key])
        if not os.path.exists(path):
            raise TrainError(f"{path}: the {key} of {args.init} is not there; pass --clip/--llm/--tokenizer")
    try:
        cfg = hires.HiResConfig(**{**stored, **overrides})
    except (TypeError, ValueError) as e:  # unknown keys, impossible combinations
        raise TrainError(f"--init {args.init}: {e}") from None
    model = hires.HiResLLaVA(cfg, **placement)
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
    return model, overrides


# ----------------------------------------------------------------------------------------------------------------
# EntityGrid-QA evaluation (tiny preset): all ranks generate their share, rank 0 scores

def evaluate_entitygrid(model, test_dir, args, proc):
    """EntityGrid-QA answered as eval.py answers it (evaluation.answer_batch: --mc rank ranks the option texts by
    likelihood, --mc letter generates the letter); every rank answers its share, all gather the predictions."""
    import torch
    import torch.distributed as dist
    samples = evaluation.load_entitygrid(test_dir, "all")
    mine = samples[proc["rank"]::proc["world"]]
    model.eval()
    preds = {}
    for i in tqdm(range(0, len(mine), args.eval_batch), desc="eval EntityGrid-QA", disable=not proc["master"]):
        batch = [(s, slicing.load_image(s.image)) for s in mine[i:i + args.eval_batch]]
        with torch.no_grad(), proc["autocast"]:
            out = evaluation.answer_batch(model, batch, args, evaluation.BENCHES["entitygrid"], args.mc)
        preds.update({s.gt["id"]: o for (s, _), o in zip(batch, out)})
    if proc["world"] > 1:
        parts = [None] * proc["world"]
        dist.all_gather_object(parts, preds)
        preds = {k: v for p in parts for k, v in p.items()}
    return entitygrid.score([s.gt for s in samples], preds), preds


# ----------------------------------------------------------------------------------------------------------------
# command line

def block_list(text):
    """'7,8,9' -> [7, 8, 9] (argparse type of --sra-layers)."""
    try:
        return [int(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated block numbers, e.g. 7,8,9") from None


def parse_args(argv=None):
    """The run settings. Defaults come from one place, the preset (PRESETS, picked by --preset, else 'paper' when
    --clip/--llm are given, else 'tiny'); every numeric flag is range-checked here, before anything runs."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter,
                                usage=argparse.SUPPRESS)  # an error is one line, no usage block above it
    a = p.add_argument
    # argparse types (eval.bounded): a number in its range, else a one-line error; a learning rate of 0 keeps weights
    count, natural, rate = evaluation.bounded(int, 1), evaluation.bounded(int, 0), evaluation.bounded(float, 0)
    positive, fraction = evaluation.bounded(float, 0, strict=True), evaluation.bounded(float, 0, 1)
    a("--preset", choices=sorted(PRESETS), help="defaults: tiny (tiny backbones, EntityGrid-QA, CPU; shown here) or "
      "paper (ViT-L-14-336 + Vicuna-7B); default: paper with --clip/--llm, else tiny")
    a("--stage", choices=("0", "1", "2", "all"), default="all", help="0 (tiny only): pretrain the tiny ViT and LLaMA; "
      "1: sampler+projector on captions; 2: SRA+sampler+projector+LoRA on instructions (needs --init unless 'all'); "
      "all: (tiny: 0 unless done,) 1, 2, then EntityGrid eval for tiny")
    a("--stage0", help="tiny: a finished stage-0 directory (OUT/stage0 of a run with the same data and seed) whose "
      "backbones stages 1-2 use; default OUT/stage0. The paper preset has no stage 0: CLIP and Vicuna are pretrained")
    a("--random-backbones", action="store_true", help="tiny: no stage 0: the random tiny ViT and LLaMA (comparison)")
    a("--out", help="run directory (stage k writes OUT/stage<k>; default runs/<preset>)")
    a("--init", help="stage-1 checkpoint directory that stage 2 starts from")
    a("--resume", action="store_true", help="continue from the last complete checkpoint under OUT")
    a("--overwrite", action="store_true", help="delete the OUT/stage<k> to be trained and start over (else refused)")
    a("--clip", help="open_clip ViT-L-14-336 weights file (paper preset)")
    a("--llm", help="Vicuna-7B-v1.5 HF directory (paper preset)")
    a("--tokenizer", help="sentencepiece model (default LLM/tokenizer.model)")
    a("--data1", help="stage-1 LLaVA JSON (captions; tiny: generated EntityGrid captions)")
    a("--data2", help="stage-2 LLaVA JSON (instructions; tiny: generated EntityGrid-QA llava.json)")
    a("--image-folder", help="folder the JSON's image paths are relative to (tiny: the data dir)")
    a("--data-dir", default="data/entitygrid", help="tiny: EntityGrid-QA train/ and test/ (generated if missing)")
    a("--train-size", type=count, help="tiny: number of EntityGrid-QA training questions to generate")
    a("--test-size", type=count, help="tiny: number of EntityGrid-QA test questions to generate and evaluate")
    a("--families", help=f"tiny: EntityGrid-QA families of the generated splits, of {','.join(entitygrid.FAMILIES)}")
    a("--vocab-size", type=count, help="tiny: sentencepiece vocabulary size trained from the data")
    a("--max-slices", type=count, help="maximum slices per image N (paper 16)")
    a("--upscale", action=argparse.BooleanOptionalAction, help="double the grid of small images when 4mn <= N")
    a("--sampler", choices=("sms", "qformer", "avgpool"), default="sms", help="token sampler (paper: sms)")
    a("--sra", action=argparse.BooleanOptionalAction, default=True, help="SliceRestore Adapter in the ViT")
    a("--slices", action=argparse.BooleanOptionalAction, default=True, help="the slices (--no-slices: overview only)")
    a("--overview", action=argparse.BooleanOptionalAction, default=True, help="the low-res overview")
    a("--lora-rank", type=natural, help="LoRA rank r (paper 128; 0: no LoRA)")
    a("--lora-alpha", type=positive, help="LoRA alpha; scaling alpha/r (paper 256)")
    a("--lora-dropout", type=fraction, help="dropout on the LoRA branch (paper preset: LLaVA's 0.05)")
    a("--max-len", dest="max_length", type=natural, help="tokens of one sequence, image tokens included; 0: the LLM's "
      "own context (Vicuna-7B-v1.5: 4096). Longer samples are cut and counted; with no answer left, skipped")
    a("--lr0", type=rate, default=1e-3, help="tiny: stage-0 learning rate")
    a("--batch0", type=count, default=32, help="tiny: stage-0 batch (scenes and texts)")
    a("--steps0", type=natural, default=300, help="tiny: stage-0 optimizer steps")
    a("--lr1", type=rate, help="stage-1 learning rate (paper 1e-3)")
    a("--lr2", type=rate, help="stage-2 learning rate of the sampler and projector (paper 2e-5)")
    a("--sra-lr", type=rate, help="stage-2 learning rate of the SRA (default: --lora-lr / 10; paper 2e-5)")
    a("--sra-layers", type=block_list, help="0-based ViT blocks with an SRA, comma-separated (paper: 18,19,20,21)")
    a("--lora-lr", type=rate, help="stage-2 learning rate of LoRA (with --train-llm the whole LLM; paper 2e-4)")
    a("--batch1", type=count, help="stage-1 global batch size over all processes (paper 256)")
    a("--batch2", type=count, help="stage-2 global batch size over all processes (paper 128)")
    a("--micro-batch", type=count, help="samples per process per forward; gradients are accumulated up to the batch")
    a("--epochs1", type=count, help="stage-1 epochs (paper 1; tiny 10: position builds on the captions' cells, README)")
    a("--epochs2", type=count, help="stage-2 epochs (paper 1)")
    a("--steps1", type=natural, default=0, help="stage-1 optimizer steps (0: from --epochs1)")
    a("--steps2", type=natural, default=0, help="stage-2 optimizer steps (0: from --epochs2)")
    a("--warmup-ratio", type=fraction, default=0.03, help="fraction of the steps warmed up linearly")
    a("--grad-clip", type=positive, default=1.0, help="clip the global gradient norm to this")
    a("--dtype", choices=("auto", "fp32", "bf16", "fp16"), help="frozen weights and autocast (auto: bf16 on a GPU "
      "that has it, else fp16; fp32 on the CPU)")
    a("--grad-ckpt", action=argparse.BooleanOptionalAction, help="activation checkpointing (LLM, SRA blocks)")
    a("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when there is a GPU, else cpu")
    a("--threads", type=natural, default=0, help="CPU threads per process (0: cores / processes)")
    a("--num-workers", type=natural, help="DataLoader worker processes per rank")
    a("--seed", type=natural, default=0, help="seed for init, data order and generation")
    a("--log-every", type=count, default=10, help="print a log line every N steps")
    a("--save-every", type=count, default=100, help="write a checkpoint every N steps (and at the end)")
    a("--keep", type=count, default=2, help="number of checkpoints kept")
    a("--eval-batch", type=count, default=64, help="EntityGrid-QA evaluation batch size")
    a("--max-new-tokens", type=count, default=4, help="tokens generated per EntityGrid-QA answer (--mc letter)")
    a("--mc", choices=("rank", "letter"), help="answers as option text, ranked by likelihood (rank), or as the "
      "letter (letter); recorded in the checkpoint, which eval.py follows")
    a("--train-llm", action=argparse.BooleanOptionalAction, help="train the whole LLM (else frozen, with LoRA)")
    a("--cache-vit", action=argparse.BooleanOptionalAction, help="run the frozen ViT blocks once per image")
    p.set_defaults(**PRESETS["tiny"])  # what --help shows
    # pass 1: the preset, and which model flags the command line gives (they win over an --init config)
    first = p.parse_args(argv, argparse.Namespace(**dict.fromkeys(MODEL_FLAGS)))
    preset = first.preset or ("paper" if first.clip or first.llm else "tiny")
    p.set_defaults(preset=preset, out=os.path.join("runs", preset), **PRESETS[preset])
    args = p.parse_args(argv)
    args.given = {k for k in MODEL_FLAGS if getattr(first, k) is not None}
    if args.sra_lr is None:  # derived from another flag: the paper's 2e-5 beside LoRA's 2e-4
        args.sra_lr = args.lora_lr / 10
    check_args(p, args)
    return args


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written; after each flag's help its default (the tiny preset's), where it has one."""
    def _get_help_string(self, action):
        return action.help + (" (default: %(default)s)" if action.default not in (None, False, argparse.SUPPRESS)
                              else "")


def check_args(p, args):
    """Combinations, devices and paths of the parsed flags (the ranges are their types'): one line each."""
    families = args.families.split(",")
    if set(families) - set(entitygrid.FAMILIES) or not {"object", "shape"} & set(families):
        p.error(f"--families {args.families}: choose from {','.join(entitygrid.FAMILIES)}, with object or shape "
                "(the counting questions draw those)")
    for flag, path in (("--clip", args.clip), ("--llm", args.llm), ("--tokenizer", args.tokenizer),
                       ("--init", args.init)):
        if path and not os.path.exists(path):
            p.error(f"{flag} {path}: no such file or directory")
    if args.preset == "paper" and not (args.clip and args.llm):
        p.error("the paper preset needs --clip (open_clip ViT-L-14-336 weights file) and --llm (Vicuna-7B-v1.5 "
                "directory); without both, run the tiny preset (no weight flags)")
    if args.preset == "paper" and (args.stage != "1" and not args.data2 or args.stage != "2" and not args.data1):
        p.error("the paper preset needs --data1 (stage 1) and/or --data2 (stage 2) LLaVA JSON files and --image-folder")
    if args.preset == "paper" and (args.stage == "0" or args.stage0 or args.random_backbones):
        p.error("stage 0 belongs to the tiny preset: the paper preset's CLIP and Vicuna arrive pretrained")
    if args.stage == "0" and (args.stage0 or args.random_backbones):
        p.error("--stage 0 writes OUT/stage0: drop --stage0/--random-backbones")
    if args.stage == "2" and not args.init:
        p.error("--stage 2 needs --init STAGE1_CHECKPOINT_DIR")
    if args.init and not os.path.isfile(os.path.join(args.init, "config.json")):
        p.error(f"--init {args.init}: not a checkpoint folder (no config.json; stage 1 writes OUT/stage1)")
    if args.resume and args.overwrite:
        p.error("--resume continues OUT, --overwrite deletes it: give one")


def setup(args):
    """This process of the run: process group (torchrun sets RANK/WORLD_SIZE), device, threads, compute dtype ->
    proc dict: rank, world, master (rank 0, which alone prints and saves), device, dtype and its autocast context."""
    import torch
    import torch.distributed as dist
    import hires
    if args.device == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: this machine has no CUDA device (torch.cuda.is_available() is False); use "
                         "--device cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if world > 1:
        if device.type == "cuda":  # before the process group: NCCL then binds each rank to its own GPU, not GPU 0
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if device.type == "cpu":
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    dtype = hires.DTYPES[hires.resolve_dtype(args.dtype, device)]
    return dict(rank=rank, world=world, device=device, master=rank == 0, dtype=dtype,
                autocast=hires.autocast(device, dtype))


def barrier(proc):
    import torch.distributed as dist
    if proc["world"] > 1:
        dist.barrier()


def claim_out(args, stages, proc):
    """Refuse to train into an OUT/stage<k> an earlier run wrote (its checkpoints would mix with this run's), unless
    --resume continues it or --overwrite deletes it (and the tiny run's results) first."""
    used = [d for d in (os.path.join(args.out, f"stage{k}") for k in stages) if os.path.exists(d)]
    barrier(proc)  # every rank has looked before the master deletes anything
    if used and not args.resume and not args.overwrite:
        raise TrainError(f"{used[0]} holds an earlier run: continue it with --resume, start over with --overwrite "
                         "(deletes it), or pass another --out")
    if used and args.overwrite and proc["master"]:
        for d in used:
            shutil.rmtree(d)
        for name in ("metrics.json", "predictions.json"):
            if os.path.exists(os.path.join(args.out, name)):
                os.remove(os.path.join(args.out, name))
    barrier(proc)


def run(args, proc):
    import torch
    import hires
    import llava_data
    tiny, master = args.preset == "tiny", proc["master"]
    stages = [1, 2] if args.stage == "all" else [int(args.stage)]
    claim_out(args, stages, proc)
    if tiny:
        if master:
            prepare_tiny(args)
        barrier(proc)
        done = os.path.isfile(os.path.join(backbone_dir(args), "hires_config.json"))  # written last
        if args.stage == "0" or args.stage == "all" and not done and not (args.stage0 or args.random_backbones):
            run_stage0(args, proc)
        elif not done and args.stage != "2":  # stage 2 takes its backbones from --init's config
            raise TrainError(f"{backbone_dir(args)}: no finished stage 0 there; run --stage 0 (or --stage all)")
        if args.stage == "0":
            return None
        args.data1 = args.data1 or os.path.join(args.data_dir, "train", "captions.json")
        args.data2 = args.data2 or os.path.join(args.data_dir, "train", "text_qa.json" if args.mc == "rank" else
                                                "llava.json")
        args.image_folder = args.image_folder or os.path.join(args.data_dir, "train")
    torch.manual_seed(args.seed)  # identical trainable init on every rank
    # frozen weights in the autocast dtype, read straight onto the device (7B: no 27 GB fp32 copy on each GPU);
    # the trained tensors stay fp32 for the optimizer
    placement = dict(device=proc["device"], dtype=proc["dtype"], adapter_dtype=torch.float32)
    if args.stage == "2":
        model, overrides = init_model(args, placement)
        if master:
            print(f"stage 2 from {args.init}; flags over its config: {overrides or 'none'}")
    else:
        model = hires.HiResLLaVA(model_config(args), **placement)
    model.llm.gradient_checkpointing = model.vision.gradient_checkpointing = args.grad_ckpt
    torch.manual_seed(args.seed + proc["rank"])  # per-rank randomness (LoRA dropout)
    data = {stage: llava_data.LlavaData(args.data1 if stage == 1 else args.data2, args.image_folder or "",
                                        model.tokenizer, "plain" if stage == 1 else "vicuna_v1", model.preprocess,
                                        model.context, model.image_tokens) for stage in stages}
    if args.cache_vit:
        prefixes = llava_data.cache_prefixes(model, list(data.values()), master)
        for d in data.values():
            d.prefixes = prefixes
    for stage in stages:
        train_stage(args, stage, model, data[stage], os.path.join(args.out, f"stage{stage}"), proc)
    if tiny and args.stage != "1":
        metrics, preds = evaluate_entitygrid(model, os.path.join(args.data_dir, "test"), args, proc)
        if master:
            hires.atomic_write(os.path.join(args.out, "metrics.json"), json.dumps(metrics, indent=1))
            # eval.py's submission format for EntityGrid-QA: `eval.py --predictions` rescores it
            hires.atomic_write(os.path.join(args.out, "predictions.json"),
                               json.dumps([{"id": k, "answer": v} for k, v in preds.items()], indent=1))
            tasks = ", ".join(f"{t} {a:.3f}" for t, a in metrics["per_task"].items())
            print(f"EntityGrid-QA test ({metrics['num']} questions): accuracy {metrics['accuracy']:.3f} ({tasks}); "
                  f"edge {metrics['edge_accuracy']:.3f} vs other {metrics['other_accuracy']:.3f}, Discrepancy "
                  f"{metrics['discrepancy']:.3f} -> {os.path.join(args.out, 'metrics.json')}")
        return metrics


def main(argv=None):
    args = parse_args(argv)  # first: --help and a bad flag answer before the imports below
    import torch.distributed as dist
    import llava_data
    t0 = time.time()
    try:
        proc = setup(args)
        result = run(args, proc)
    except (TrainError, llava_data.DataError, slicing.ImageError, FileNotFoundError) as e:
        sys.exit(f"train.py: error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if proc["master"]:
        print(f"total wall time {time.time() - t0:.1f} s")
    return result


if __name__ == "__main__":
    main()
