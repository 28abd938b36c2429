"""Checkpoints of a HiRes-LLaVA run, written so that a killed run loses nothing and a moved run still loads.

A checkpoint is a folder: config.json (the HiResConfig, backbone paths inside the run stored relative to the folder)
and model.safetensors (the trainable tensors only). train.py's resumable checkpoints add the optimizer moments, the
step and every rank's RNG states (save_state, resume_stage). Every file is written to a temporary name and renamed
(atomic_write), and merge_checkpoint folds a stage-2 LoRA into a standard HF LLaMA directory, as LLaVA's
merge_lora_weights.py does.
"""
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import asdict, fields, replace

import safetensors.torch  # save_file and load_file looked up at each call (tests cut a save short through it)
import torch
import torch.distributed as dist

from hires import HiResConfig, HiResLLaVA
from llama import merge_lora

BACKBONE_PATHS = ("clip_weights", "llm_path", "tokenizer_path")
STAGE1_WARNING = ("warning: {} is a stage-1 checkpoint (trained on captions with the plain template, never on an "
                  "instruction): its answers say little; evaluate or merge a stage-2 checkpoint")


def atomic_write(path, content):
    """Writes content (str: UTF-8 text; or a function that writes a given path) to a temporary file beside path,
    then renames it over path, so a killed run never leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    if isinstance(content, str):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(content)
    else:
        content(tmp)
    os.replace(tmp, path)


def git_commit():
    """HEAD of the repository this file lives in (+ "-dirty" with uncommitted changes to tracked files), None
    outside git: recorded beside results so a figure names the code that made it."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "")


# ----------------------------------------------------------------------------------------------------------------
# the model checkpoint: config.json + model.safetensors

def backbone_paths(clip=None, llm=None, tokenizer=None):
    """The --clip/--llm/--tokenizer flags of train.py and eval.py as absolute HiResConfig paths (a checkpoint works
    from any folder); with --llm alone the tokenizer is LLM/tokenizer.model when that file is there."""
    if llm and not tokenizer and os.path.isfile(os.path.join(llm, "tokenizer.model")):
        tokenizer = os.path.join(llm, "tokenizer.model")
    return {k: os.path.abspath(v) for k, v in zip(BACKBONE_PATHS, (clip, llm, tokenizer)) if v}


def config_dict(cfg, path, run=None):
    """cfg as the dict config.json holds for a checkpoint in folder `path`: a backbone inside `run` (default: the
    folder above `path`) is stored relative to `path`, so a moved or copied run loads its own backbones; any other
    is stored absolute (read_config resolves a relative one against `path`, not against the working directory)."""
    d, here = asdict(cfg), os.path.abspath(path)
    run = os.path.abspath(run or os.path.dirname(here))
    for k in BACKBONE_PATHS:
        if d[k]:
            inside = os.path.commonpath([os.path.abspath(d[k]), run]) == run
            d[k] = os.path.relpath(os.path.abspath(d[k]), here) if inside else os.path.abspath(d[k])
    return d


def read_config(path, name="config.json"):
    """path/name (a config_dict) with its relative backbone paths resolved against path; one-line errors for a
    folder that is missing or is not a checkpoint."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such checkpoint folder")
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path}: not a checkpoint folder (no {name}; train.py writes checkpoints)")
    try:
        with open(file) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{file}: unreadable checkpoint config ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{file}: not a checkpoint config (a JSON object)")
    for k in BACKBONE_PATHS:
        if d.get(k) and not os.path.isabs(d[k]):
            d[k] = os.path.normpath(os.path.join(path, d[k]))
    return d


def save_checkpoint(model, path, cfg=None, run=None):
    """Directory with config.json (HiResConfig, default model.cfg, as config_dict) and model.safetensors (the
    trainable tensors cfg has: no LoRA ones when its lora_rank is 0, no LLM ones unless train_llm), each atomic."""
    cfg = cfg or model.cfg
    os.makedirs(path, exist_ok=True)
    keep = lambda k: cfg.lora_rank > 0 if "lora_" in k else cfg.train_llm or not k.startswith("llm.")
    sd = {k: v.contiguous().cpu() for k, v in model.trainable_state_dict().items() if keep(k)}
    atomic_write(os.path.join(path, "model.safetensors"), lambda p: safetensors.torch.save_file(sd, p))
    atomic_write(os.path.join(path, "config.json"), json.dumps(config_dict(cfg, path, run), indent=2))


def load_checkpoint(path, device="cpu", dtype=torch.float32, adapter_dtype=None, **overrides):
    """HiResLLaVA from a save_checkpoint directory (dtype, adapter_dtype as HiResLLaVA); overrides replace config
    fields (e.g. moved backbone paths)."""
    d = read_config(path)
    weights = os.path.join(path, "model.safetensors")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{path}: not a checkpoint folder (no model.safetensors)")
    try:
        sd = safetensors.torch.load_file(weights)
    except Exception as e:
        raise ValueError(f"{weights}: corrupt checkpoint ({type(e).__name__}: {str(e)[:120]})") from None
    names = {f.name for f in fields(HiResConfig)}
    if set(d) - names:
        raise ValueError(f"{path}/config.json: unknown config keys {sorted(set(d) - names)}")
    model = HiResLLaVA(HiResConfig(**{**d, **overrides}), dtype=dtype, device=device, adapter_dtype=adapter_dtype)
    try:
        model.load_trainable_state_dict(sd)
    except ValueError as e:
        raise ValueError(f"{weights}: {e}") from None
    return model


def merge_checkpoint(ckpt, out):
    """Deployment form of a stage-2 checkpoint, as LLaVA's merge_lora_weights.py: the LoRA folded into the LLM,
    written as a standard HF LLaMA directory OUT/llm (config.json, model.safetensors in the LLM's own dtype,
    tokenizer.model), beside OUT/config.json (lora_rank 0, train_llm off) and OUT/model.safetensors (the adapters
    only: SRA, sampler, projector): a checkpoint eval.py loads as it is."""
    llm_path = read_config(ckpt)["llm_path"]
    with open(os.path.join(llm_path, "config.json")) as f:
        dtype = getattr(torch, json.load(f).get("torch_dtype") or "float32")  # Vicuna-7B-v1.5: float16
    model = load_checkpoint(ckpt, dtype=dtype, adapter_dtype=torch.float32)
    if model.cfg.template == "plain":
        print(STAGE1_WARNING.format(ckpt), file=sys.stderr)
    merge_lora(model.llm)  # W + (alpha / r) B A, computed in fp32
    llm_dir = os.path.abspath(os.path.join(out, "llm"))
    model.llm.save_pretrained(llm_dir)
    shutil.copyfile(model.cfg.tokenizer_path, os.path.join(llm_dir, "tokenizer.model"))
    for name in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if os.path.isfile(os.path.join(llm_path, name)):  # HF's own tokenizer files, when the LLM has them
            shutil.copyfile(os.path.join(llm_path, name), os.path.join(llm_dir, name))
    cfg = replace(model.cfg, llm_path=llm_dir, tokenizer_path=os.path.join(llm_dir, "tokenizer.model"), lora_rank=0,
                  train_llm=False)
    save_checkpoint(model, out, cfg)
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# train.py's resumable checkpoints: ckpt_dir/step-N/ beside a `latest` pointer

def save_state(ckpt_dir, model, opt, step, trainer, rng_states, keep):
    """ckpt_dir/step-N/: save_checkpoint + optimizer.safetensors + rng.safetensors + trainer.json, built in a temp
    dir and renamed; then the `latest` pointer is replaced; then old checkpoints beyond `keep` are removed."""
    name = f"step-{step:07d}"
    final, tmp = os.path.join(ckpt_dir, name), os.path.join(ckpt_dir, name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(model, tmp, run=os.path.dirname(os.path.dirname(ckpt_dir)))  # ckpt_dir: OUT/stage<k>/...
    index = {id(p): n for n, p in model.named_parameters()}
    moments = {f"{index[id(p)]}.{k}": v.detach().cpu().contiguous()
               for p, state in opt.state.items() for k, v in state.items()}
    safetensors.torch.save_file(moments, os.path.join(tmp, "optimizer.safetensors"))
    safetensors.torch.save_file(rng_states, os.path.join(tmp, "rng.safetensors"))
    atomic_write(os.path.join(tmp, "trainer.json"), json.dumps(dict(trainer, step=step), indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write(os.path.join(ckpt_dir, "latest"), name)  # written last: it names only complete checkpoints
    # the oldest beyond `keep` go, never the one `latest` names (a step number lower than older leftovers)
    done = sorted(d for d in os.listdir(ckpt_dir) if d.startswith("step-") and not d.endswith(".tmp") and d != name)
    for old in done[:max(0, len(done) + 1 - keep)] + [d for d in os.listdir(ckpt_dir) if d.endswith(".tmp")]:
        shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)  # .tmp: cut-short saves


def resume_stage(stage, model, opt, ckpt_dir, proc):
    """-> (start step, history, skip counts) from the checkpoint `latest` names under ckpt_dir (model, optimizer
    moments and this rank's RNG states restored); (0, [], no counts) when there is none."""
    pointer = os.path.join(ckpt_dir, "latest")
    if not os.path.isfile(pointer):
        return 0, [], Counter()
    with open(pointer) as f:
        path = os.path.join(ckpt_dir, f.read().strip())
    model.load_trainable_state_dict(safetensors.torch.load_file(os.path.join(path, "model.safetensors")))
    moments = safetensors.torch.load_file(os.path.join(path, "optimizer.safetensors"))
    for n, p in model.named_parameters():
        if p.requires_grad and f"{n}.step" in moments:
            opt.state[p] = {k: moments[f"{n}.{k}"].to(p.device) if k != "step" else moments[f"{n}.{k}"]
                            for k in ("step", "exp_avg", "exp_avg_sq")}
    with open(os.path.join(path, "trainer.json")) as f:
        trainer = json.load(f)
    rng = safetensors.torch.load_file(os.path.join(path, "rng.safetensors"))
    rank, device = proc["rank"], proc["device"]
    if f"cpu.rank{rank}" in rng:
        torch.set_rng_state(rng[f"cpu.rank{rank}"])
    if f"cuda.rank{rank}" in rng and device.type == "cuda":  # LoRA dropout on the GPU
        torch.cuda.set_rng_state(rng[f"cuda.rank{rank}"], device)
    if proc["master"]:
        print(f"stage {stage}: resumed from step {trainer['step']} ({ckpt_dir})")
    # the skip counts are a sum over ranks: restored once
    return trainer["step"], trainer["history"], Counter(trainer["skipped"] if proc["master"] else {})


def gather_rng(world, device):
    """Every rank's RNG states, CPU and (on a GPU) CUDA, gathered to all ranks: {cpu.rank<r>, cuda.rank<r>: uint8}."""
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
