"""Two-stage HiRes-LLaVA training (docs/method.md#training-stages) on LLaVA's data (llava_data.py), single process or
torchrun DDP.

Stage 1 trains the Self-Mining Sampler and projector on captions (LLaVA's `plain` template); stage 2 trains the
SliceRestore Adapter, sampler, projector and LoRA on instructions (`vicuna_v1`), starting from a stage-1 checkpoint
(the table: hires.STAGE_TRAINS). AdamW, warm-up over the first 3% of steps then cosine, no weight decay, gradient
accumulation to a global batch. Checkpoints hold the trainable tensors only plus optimizer moments, step and RNG
states, all safetensors/JSON, written atomically; --resume continues from the last complete one (checkpoints.py).

`python train.py` (no arguments) runs the tiny preset on CPU end to end: generates EntityGrid-QA, pretrains its tiny
backbones (stage 0, stage0.py), trains both stages, evaluates on the test split and writes metrics.json.
`torchrun --nproc_per_node N train.py ...` runs DDP.
"""
import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field, fields, replace

from tqdm import tqdm

import entitygrid
import slicing

# torch and the files that import it (hires, llava_data, checkpoints, stage0) are imported in the functions that use
# them: they take 2 s to import, and --help or a bad flag answers without them (the command line needs none).


# ----------------------------------------------------------------------------------------------------------------
# configuration: one field per command-line flag, the presets as values of it

def bounded(kind, low, high=None, strict=False):
    """argparse type: a number of `kind` >= low (> low if strict) and < high, else a one-line error."""
    def parse(text):
        value = kind(text)
        if value < low or strict and value == low or high is not None and value >= high:
            raise argparse.ArgumentTypeError(f"{value}: must be {'>' if strict else '>='} {low}"
                                             + (f" and < {high}" if high is not None else ""))
        return value
    parse.__name__ = kind.__name__  # argparse's "invalid int value: 'x'" names it
    return parse


def block_list(text):
    """'7,8,9' -> [7, 8, 9] (argparse type of --sra-layers)."""
    try:
        return [int(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated block numbers, e.g. 7,8,9") from None


def unwritable(flag, path):
    """None when `path` is a folder this process can write in, or can make; else the one-line problem, found on the
    nearest part of the path that exists (a file on the way, a read-only place) before any work starts."""
    here = os.path.abspath(path)
    while not os.path.exists(here):
        here = os.path.dirname(here)
    if not os.path.isdir(here):
        where = "is a file" if here == os.path.abspath(path) else f"lies under the file {here}"
        return f"{flag} {path}: {where}, not a folder; pass a folder"
    try:
        tempfile.TemporaryFile(dir=here).close()  # as root, only writing tells: os.access says yes to /sys
    except OSError as e:
        return f"{flag} {path}: cannot write in {here} ({e.strerror}); pass a folder you can write in"
    return None


# the flags' types: a number in its range, else a one-line error; a learning rate of 0 keeps weights
count, natural, rate = bounded(int, 1), bounded(int, 0), bounded(float, 0)
positive, fraction = bounded(float, 0, strict=True), bounded(float, 0, 1)


def flag(default, help, model=False, **argparse_kw):
    """A TrainConfig field that is the flag --<field name, dashed> (or argparse_kw's `name`), with its help and
    argparse's type, choices or action; model=True: the HiResConfig field of the same name, which a stage-2 start
    from --init takes from the command line when given there, else from the stage-1 checkpoint."""
    default_kw = dict(default_factory=lambda: list(default)) if isinstance(default, list) else dict(default=default)
    return field(**default_kw, metadata=dict(help=help, model=model, **argparse_kw))


@dataclass
class TrainConfig:
    """Every setting of a run, one field per flag; the defaults are the tiny preset's (PRESETS)."""
    preset: str = flag(None, "defaults: tiny (tiny backbones, EntityGrid-QA, CPU) or paper (ViT-L-14-336 + "
                       "Vicuna-7B); default: paper with --clip/--llm, else tiny", choices=("paper", "tiny"))
    stage: str = flag("all", "0 (tiny only): pretrain the tiny ViT and LLaMA; 1: sampler+projector on captions; 2: "
                      "SRA+sampler+projector+LoRA on instructions (needs --init unless 'all'); all: (tiny: 0 unless "
                      "done,) 1, 2, then EntityGrid eval for tiny", choices=("0", "1", "2", "all"))
    stage0: str = flag(None, "tiny: a finished stage-0 directory (OUT/stage0 of a run with the same data and seed) "
                       "whose backbones stages 1-2 use; default OUT/stage0. The paper preset has no stage 0: CLIP and "
                       "Vicuna are pretrained")
    random_backbones: bool = flag(False, "tiny: no stage 0: the random tiny ViT and LLaMA (comparison)",
                                  action="store_true")
    out: str = flag(None, "run directory (stage k writes OUT/stage<k>; default runs/<preset>)")
    init: str = flag(None, "stage-1 checkpoint directory that stage 2 starts from")
    resume: bool = flag(False, "continue from the last complete checkpoint under OUT", action="store_true")
    overwrite: bool = flag(False, "delete the OUT/stage<k> to be trained and start over (else refused)",
                           action="store_true")
    # the data and the backbones
    clip: str = flag(None, "open_clip ViT-L-14-336 weights file (paper preset)")
    llm: str = flag(None, "Vicuna-7B-v1.5 HF directory (paper preset)")
    tokenizer: str = flag(None, "sentencepiece model (default LLM/tokenizer.model)")
    data1: str = flag(None, "stage-1 LLaVA JSON (captions; tiny: generated EntityGrid captions)")
    data2: str = flag(None, "stage-2 LLaVA JSON (instructions; tiny: generated EntityGrid-QA llava.json)")
    image_folder: str = flag(None, "folder the JSON's image paths are relative to (tiny: the data dir)")
    data_dir: str = flag("data/entitygrid", "tiny: EntityGrid-QA train/ and test/ (generated if missing)")
    train_size: int = flag(6000, "tiny: number of EntityGrid-QA training questions to generate", type=count)
    test_size: int = flag(2700, "tiny: number of EntityGrid-QA test questions to generate and evaluate", type=count)
    families: str = flag("object,shape", "tiny: EntityGrid-QA families of the generated splits, of "
                         f"{','.join(entitygrid.FAMILIES)}")
    vocab_size: int = flag(1000, "tiny: sentencepiece vocabulary size trained from the data", type=count)
    # the model (HiResConfig fields)
    max_slices: int = flag(4, "maximum slices per image N", True, type=count)
    upscale: bool = flag(False, "double the grid of small images when 4mn <= N", True,
                         action=argparse.BooleanOptionalAction)
    sampler: str = flag("sms", "token sampler (paper: sms)", True, choices=("sms", "qformer", "avgpool"))
    tiler: str = flag("hires", "how an image is cut: hires (the paper's slices with the SRA) or a peer's at an equal "
                      "LLM-token budget, without the SRA: anyres (LLaVA-NeXT), overlap (Molmo), native (Qwen2-VL); "
                      "recorded in the checkpoint", True, choices=slicing.TILERS)
    sra: bool = flag(True, "SliceRestore Adapter in the ViT", True, action=argparse.BooleanOptionalAction)
    slices: bool = flag(True, "the slices (--no-slices: overview only)", True, action=argparse.BooleanOptionalAction)
    overview: bool = flag(True, "the low-res overview", True, action=argparse.BooleanOptionalAction)
    lora_rank: int = flag(0, "LoRA rank r (0: no LoRA)", True, type=natural)
    lora_alpha: float = flag(16, "LoRA alpha; scaling alpha/r", True, type=positive)
    lora_dropout: float = flag(0.0, "dropout on the LoRA branch (the paper preset's is LLaVA's)", True, type=fraction)
    max_length: int = flag(512, "tokens of one sequence, image tokens included; 0: the LLM's own context "
                           "(Vicuna-7B-v1.5: 4096). Longer samples are cut and counted; with no answer left, skipped",
                           True, name="--max-len", type=natural)
    # the optimisation
    lr0: float = flag(1e-3, "tiny: stage-0 learning rate", type=rate)
    batch0: int = flag(32, "tiny: stage-0 batch (scenes and texts)", type=count)
    steps0: int = flag(300, "tiny: stage-0 optimizer steps", type=natural)
    lr1: float = flag(2e-3, "stage-1 learning rate", type=rate)
    lr2: float = flag(2e-3, "stage-2 learning rate of the sampler and projector", type=rate)
    sra_lr: float = flag(None, "stage-2 learning rate of the SRA (default: --lora-lr / 10; paper 2e-5)", type=rate)
    sra_layers: list = flag([7, 8, 9], "0-based ViT blocks with an SRA, comma-separated", True, type=block_list)
    lora_lr: float = flag(2e-3, "stage-2 learning rate of LoRA (with --train-llm the whole LLM)", type=rate)
    batch1: int = flag(32, "stage-1 global batch size over all processes", type=count)
    batch2: int = flag(32, "stage-2 global batch size over all processes", type=count)
    micro_batch: int = flag(8, "samples per process per forward; gradients are accumulated up to the batch",
                            type=count)
    epochs1: int = flag(10, "stage-1 epochs (tiny 10: position builds on the captions' cells, README)", type=count)
    epochs2: int = flag(4, "stage-2 epochs", type=count)
    steps1: int = flag(0, "stage-1 optimizer steps (0: from --epochs1)", type=natural)
    steps2: int = flag(0, "stage-2 optimizer steps (0: from --epochs2)", type=natural)
    warmup_ratio: float = flag(0.03, "fraction of the steps warmed up linearly", type=fraction)
    grad_clip: float = flag(1.0, "clip the global gradient norm to this", type=positive)
    # the machine
    dtype: str = flag("fp32", "frozen weights and autocast (auto: bf16 on a GPU that has it, else fp16; fp32 on the "
                      "CPU)", choices=("auto", "fp32", "bf16", "fp16"))
    grad_ckpt: bool = flag(False, "activation checkpointing (LLM, SRA blocks)", action=argparse.BooleanOptionalAction)
    device: str = flag("auto", "auto: cuda when there is a GPU, else cpu", choices=("auto", "cpu", "cuda"))
    threads: int = flag(0, "CPU threads per process (0: cores / processes)", type=natural)
    num_workers: int = flag(0, "DataLoader worker processes per rank", type=natural)
    seed: int = flag(0, "seed for init, data order and generation", type=natural)
    log_every: int = flag(10, "print a log line every N steps", type=count)
    save_every: int = flag(100, "write a checkpoint every N steps (and at the end)", type=count)
    keep: int = flag(2, "number of checkpoints kept", type=count)
    # the EntityGrid-QA evaluation of the tiny preset
    eval_batch: int = flag(64, "EntityGrid-QA evaluation batch size", type=count)
    max_new_tokens: int = flag(4, "tokens generated per EntityGrid-QA answer (--mc letter)", type=count)
    mc: str = flag("rank", "answers as option text, ranked by likelihood (rank), or as the letter (letter); recorded "
                   "in the checkpoint, which eval.py follows", choices=("rank", "letter"))
    train_llm: bool = flag(True, "train the whole LLM (else frozen, with LoRA)", True,
                           action=argparse.BooleanOptionalAction)
    cache_vit: bool = flag(True, "run the frozen ViT blocks once per image", action=argparse.BooleanOptionalAction)
    # not a flag: the model flags the command line gave (parse_args)
    given: tuple = ()


PRESETS = {"tiny": TrainConfig(),
           "paper": TrainConfig(lora_dropout=0.05, max_slices=16, upscale=True, lora_rank=128, lora_alpha=256,
                                max_length=0, lr1=1e-3, lr2=2e-5, lora_lr=2e-4, batch1=256, batch2=128, epochs1=1,
                                epochs2=1, train_size=0, test_size=0, vocab_size=0, dtype="auto", grad_ckpt=True,
                                num_workers=4, train_llm=False, mc="letter", cache_vit=False,
                                families=",".join(entitygrid.FAMILIES), sra_layers=[18, 19, 20, 21])}
MODEL_FLAGS = tuple(f.name for f in fields(TrainConfig) if f.metadata.get("model"))


def parse_args(argv=None):
    """The run settings: the preset (--preset, else 'paper' when --clip/--llm are given, else 'tiny') with the flags
    given over it; every numeric flag is range-checked by its type, before anything runs."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage=argparse.SUPPRESS)  # an error is one line, no usage block above it
    for f in fields(TrainConfig):
        if "help" in f.metadata:
            kw = {k: v for k, v in f.metadata.items() if k not in ("help", "model", "name")}
            p.add_argument(f.metadata.get("name", "--" + f.name.replace("_", "-")), dest=f.name, default=None,
                           help=help_with_defaults(f), **kw)
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}  # None: not on the command line
    preset = given.get("preset") or ("paper" if given.get("clip") or given.get("llm") else "tiny")
    args = replace(PRESETS[preset], **{**given, "preset": preset},
                   given=tuple(k for k in MODEL_FLAGS if k in given))
    args.out = args.out or os.path.join("runs", preset)
    if args.sra_lr is None:  # derived from another flag: the paper's 2e-5 beside LoRA's 2e-4
        args.sra_lr = args.lora_lr / 10
    check_args(p, args)
    return args


def help_with_defaults(f):
    """A field's help, then its default in the tiny preset and, where it differs, the paper preset's value."""
    show = lambda v: ",".join(map(str, v)) if isinstance(v, list) else str(v)
    tiny, paper = getattr(PRESETS["tiny"], f.name), getattr(PRESETS["paper"], f.name)
    shown = ([f"default: {show(tiny)}"] if tiny is not None and tiny is not False else []) + \
        ([f"paper preset: {show(paper)}"] if paper != tiny else [])
    return f.metadata["help"] + (f" ({'; '.join(shown)})" if shown else "")


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
    if args.init and args.stage != "2":
        p.error(f"--init {args.init}: only --stage 2 starts from a checkpoint (--stage {args.stage} trains stage 1 "
                "itself); add --stage 2, or drop --init")
    init = stored_config(p, "--init", os.path.join(args.init, "config.json")) if args.init else {}
    if init.get("template", "plain") != "plain":  # train_stage records the template of the last stage trained
        p.error(f"--init {args.init}: a stage-2 checkpoint (template {init['template']}); stage 2 starts from a "
                "stage-1 checkpoint: pass OUT/stage1 of the run")
    if args.resume and args.overwrite:
        p.error("--resume continues OUT, --overwrite deletes it: give one")
    if args.resume:
        check_resume(p, args, init)
    for flag, path in (("--out", args.out), ("--data-dir", args.data_dir)):
        problem = (flag == "--out" or args.preset == "tiny" and not os.path.isdir(path)) and unwritable(flag, path)
        if problem:  # --data-dir: a folder that exists is read; one that does not is generated
            p.error(problem)


def stored_config(p, flag, path):
    """A checkpoint's config.json as a dict; one-line error when it cannot be read."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        p.error(f"{flag}: {path}: unreadable checkpoint config ({type(e).__name__}: {e}); train.py writes them")


def check_resume(p, args, init):
    """--resume loads the run's last checkpoint into the model the flags build, so the model settings must be the
    run's own: the first that differs is named with the run's value. A stage-2 start takes those not given from
    --init's config, as init_model does."""
    ours = {k: getattr(args, k) for k in MODEL_FLAGS + ("mc",)}
    ours.update({k: init[k] for k in MODEL_FLAGS if k in init and k not in args.given})
    if ours["tiler"] != "hires":
        ours["sra"] = False  # as HiResConfig records it: the peers' tilers have no SRA
    for stage in ("1", "2") if args.stage == "all" else (args.stage,) if args.stage != "0" else ():
        pointer = os.path.join(args.out, f"stage{stage}", "checkpoints", "latest")
        if not os.path.isfile(pointer):
            continue  # nothing to resume: the stage starts from step 0
        with open(pointer) as f:
            ckpt = os.path.join(os.path.dirname(pointer), f.read().strip())
        theirs = stored_config(p, "--resume", os.path.join(ckpt, "config.json"))
        for k in ours:
            if k in theirs and theirs[k] != ours[k]:
                p.error(f"--resume: {ckpt} was trained with {as_flag(k, theirs[k])}, this command asks for "
                        f"{as_flag(k, ours[k])}; a resumed run keeps its own model settings: pass "
                        f"{as_flag(k, theirs[k])}, or another --out for a new run")


def as_flag(name, value):
    """A setting as the flag that gives it: --sra-layers 7,8,9, --no-sra, --max-len 0."""
    f = next(f for f in fields(TrainConfig) if f.name == name)
    dashed = f.metadata.get("name", "--" + name.replace("_", "-"))
    if isinstance(value, bool):
        return dashed if value else "--no-" + dashed[2:]
    return f"{dashed} {','.join(map(str, value)) if isinstance(value, list) else value}"


class TrainError(Exception):
    """A one-line, user-facing problem that stops the run (bad flag, missing file, non-finite loss)."""


# ----------------------------------------------------------------------------------------------------------------
# schedule and optimizer

ADAM_BETAS = (0.9, 0.999)  # the paper does not give its betas; LLaVA trains with HF Trainer's AdamW defaults


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
    return {g: counts[g] for g in ("sra", "sampler", "projector", "newline", "lora", "llm", "vision") if counts[g]}


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
    final trainable weights in out_dir (checkpoints.save_checkpoint). Returns the per-step history and the skip
    counts."""
    import torch
    import checkpoints
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
    start, history, skipped = (checkpoints.resume_stage(stage, model, opt, ckpt_dir, proc) if args.resume else
                               (0, [], Counter()))
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
            skipped_all = reduce_counts(skipped, world, proc["device"])
            rng = checkpoints.gather_rng(world, proc["device"])
            if master:
                trainer = dict(stage=stage, total_steps=total, warmup_ratio=args.warmup_ratio, world=world,
                               history=history, skipped=skipped_all)
                checkpoints.save_state(ckpt_dir, model, opt, step + 1, trainer, rng, args.keep)
                draw_loss_curve([h["loss"] for h in history], os.path.join(out_dir, "loss.png"), f"stage {stage}")
    bar.close()
    skipped_all = reduce_counts(skipped, world, proc["device"])
    if master:
        checkpoints.save_checkpoint(model, out_dir, run=args.out)
        checkpoints.atomic_write(os.path.join(out_dir, "history.json"), json.dumps(history))
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


# ----------------------------------------------------------------------------------------------------------------
# the model a stage starts from

def backbone_dir(args):
    """Tiny preset: where stages 1-2 find their frozen backbones: random (OUT/base, --random-backbones), or stage 0's
    (--stage0 DIR, else OUT/stage0)."""
    return os.path.join(args.out, "base") if args.random_backbones else args.stage0 or os.path.join(args.out, "stage0")


def model_config(args):
    """HiResConfig: the tiny backbones written by stage0.prepare_tiny, or --clip/--llm for the paper preset."""
    import checkpoints
    import hires
    if args.preset == "tiny":
        stored = checkpoints.read_config(backbone_dir(args), "hires_config.json")
        paths = dict(clip_preset="tiny", **{k: stored[k] for k in checkpoints.BACKBONE_PATHS})
    else:
        paths = dict(clip_preset="vit-l-14-336", **checkpoints.backbone_paths(args.clip, args.llm, args.tokenizer))
    try:
        return hires.HiResConfig(**paths, **{k: getattr(args, k) for k in MODEL_FLAGS})
    except ValueError as e:  # e.g. --sra-layers at or after the feature block
        raise TrainError(str(e)) from None


def init_model(args, placement):
    """Stage 2 from a stage-1 checkpoint: its config, every flag given winning over it. The sampler and the tiler
    cannot change (stage 1 trained them); a new LoRA rank starts fresh and --no-sra drops the SRA (stage 1 leaves
    both at init)."""
    from safetensors.torch import load_file
    import checkpoints
    import hires
    try:
        stored = checkpoints.read_config(args.init)
        sd = load_file(os.path.join(args.init, "model.safetensors"))
    except (OSError, ValueError) as e:
        raise TrainError(f"--init {args.init}: not a stage-1 checkpoint ({e})") from None
    overrides = {k: getattr(args, k) for k in args.given}
    overrides.update(checkpoints.backbone_paths(args.clip, args.llm, args.tokenizer))
    for key in ("sampler", "tiler"):  # stage 1 trained them
        value, trained = overrides.get(key, stored.get(key, "hires")), stored.get(key, "hires")
        if value != trained:
            raise TrainError(f"--{key} {value}: {args.init} trained the {trained} {key} in stage 1, so stage 2 keeps "
                             f"it (run stage 1 with --{key} {value})")
    for key in checkpoints.BACKBONE_PATHS:
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
    """EntityGrid-QA answered as `eval.py --bench entitygrid` answers it (entitygrid.answer: --mc rank ranks the
    option texts by likelihood, --mc letter generates the letter); every rank answers its share, all gather the
    predictions."""
    import torch
    import torch.distributed as dist
    questions = entitygrid.load_questions(test_dir)
    mine = questions[proc["rank"]::proc["world"]]
    model.eval()
    preds = {}
    for i in tqdm(range(0, len(mine), args.eval_batch), desc="eval EntityGrid-QA", disable=not proc["master"]):
        batch = mine[i:i + args.eval_batch]
        images = [slicing.load_image(os.path.join(test_dir, q["image"])) for q in batch]
        with torch.no_grad(), proc["autocast"]:
            out = entitygrid.answer(model, images, batch, args.mc, args.max_new_tokens)
        preds.update({q["id"]: o for q, o in zip(batch, out)})
    if proc["world"] > 1:
        parts = [None] * proc["world"]
        dist.all_gather_object(parts, preds)
        preds = {k: v for p in parts for k, v in p.items()}
    return entitygrid.score(questions, preds), preds


# ----------------------------------------------------------------------------------------------------------------
# the run

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
    import checkpoints
    import cpu_decode
    import hires
    import llava_data
    import stage0
    tiny, master = args.preset == "tiny", proc["master"]
    stages = [1, 2] if args.stage == "all" else [int(args.stage)]
    claim_out(args, stages, proc)
    if tiny:
        if master:
            stage0.prepare_tiny(args)
        barrier(proc)
        done = os.path.isfile(os.path.join(backbone_dir(args), "hires_config.json"))  # written last
        if args.stage == "0" or args.stage == "all" and not done and not (args.stage0 or args.random_backbones):
            stage0.run_stage0(args, proc, train_stage)
            barrier(proc)
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
    cpu_decode.fuse(model.llm)  # on CPU: the evaluation's decoding faster, and the layout the numbers are made in
    torch.manual_seed(args.seed + proc["rank"])  # per-rank randomness (LoRA dropout)
    data = {stage: llava_data.LlavaData(args.data1 if stage == 1 else args.data2, args.image_folder or "",
                                        model.tokenizer, "plain" if stage == 1 else "vicuna_v1",
                                        llava_data.slice_args(model), model.context, model.image_tokens)
            for stage in stages}
    if args.cache_vit:
        prefixes = llava_data.cache_prefixes(model, list(data.values()), master)
        for d in data.values():
            d.prefixes = prefixes
    for stage in stages:
        train_stage(args, stage, model, data[stage], os.path.join(args.out, f"stage{stage}"), proc)
    if tiny and args.stage != "1":
        metrics, preds = evaluate_entitygrid(model, os.path.join(args.data_dir, "test"), args, proc)
        if master:
            checkpoints.atomic_write(os.path.join(args.out, "metrics.json"), json.dumps(metrics, indent=1))
            # eval.py's submission format for EntityGrid-QA: `eval.py --predictions` rescores it
            checkpoints.atomic_write(os.path.join(args.out, "predictions.json"),
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
        # the ranks leave the process group together: a run ends on a collective (the evaluation's all_gather, a
        # stage's reduce_counts) after which the master alone still writes; a rank that closed its gloo connections
        # meanwhile could reset ones the other still reads
        barrier(proc)
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
