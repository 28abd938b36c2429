"""`python bench.py gpu`: the smoke run for a CUDA device. The paper's shapes from random weights (ViT-L-14-336, a
LLaMA with Vicuna-7B's config, bf16 backbones, fp32 adapters): a few stage-2 steps at the paper preset's micro-batch
on 16-slice images (step time, LLM tokens/s, MFU, peak memory), then a greedy batch. `--size small --device cpu`
runs the same code at the tiny presets' shapes (tests/test_bench_gpu.py).
"""
import os
import statistics
import tempfile
import time

import torch



def random_model(args, dtype, device):
    """HiResLLaVA with random backbones (paper: ViT-L-14-336 + Vicuna-7B's config; small: the tiny presets), the
    paper preset's slicing and LoRA, a small sentencepiece model (any ids below the vocabulary do)."""
    import dataclasses
    import conversation
    import hires
    import llama
    import train
    from clip import CLIPConfig, VisionTower
    preset = train.PRESETS["paper"]
    clip_name, llm_name = ("vit-l-14-336", "vicuna-7b") if args.size == "paper" else ("tiny", "tiny")
    torch.manual_seed(0)
    vision = VisionTower(dataclasses.replace(CLIPConfig.from_preset(clip_name), pretrained=False))
    with torch.device(device):  # built on the device: no 27 GB fp32 copy of 7B on the host
        llm = llama.Llama(llama.LlamaConfig.from_preset(llm_name)).to(dtype)
    tok = os.path.join(tempfile.mkdtemp(), "tokenizer.model")
    texts = ["USER: What is written here? ASSISTANT: A B C D, 0.596 apple; the red sign."] * 40
    conversation.train_tokenizer(texts, tok, 300)
    cfg = hires.HiResConfig(clip_preset=clip_name, tokenizer_path=tok, max_slices=preset["max_slices"],
                            upscale=preset["upscale"], lora_rank=preset["lora_rank"],
                            lora_alpha=preset["lora_alpha"], lora_dropout=preset["lora_dropout"])
    model = hires.HiResLLaVA(cfg, dtype=dtype, device=device, adapter_dtype=torch.float32, vision=vision, llm=llm)
    model.llm.gradient_checkpointing = model.vision.gradient_checkpointing = preset["grad_ckpt"]
    return model, preset


def bench_gpu(args):
    """A few stage-2 steps + one greedy batch; returns the figures it prints. MFU counts 4 x LLM params x LLM tokens
    (forward + input gradients: the frozen base gets no weight gradients; recomputation not counted) + 2 x ViT
    params x ViT tokens (forward), against --peak-tflops."""
    from bench import rss_mb  # bench.py imports this file
    import numpy as np
    from PIL import Image
    import conversation
    import hires
    import train
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, preset = random_model(args, dtype, device)
    model.set_stage(2)
    model.train()
    S, micro = model.vision.cfg.image_size, args.micro_batch or preset["micro_batch"]
    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (4 * S, 4 * S, 3), dtype=np.uint8))
    pre = model.preprocess(img)  # 4 x 4 = 16 slices + overview
    turns = [{"from": "human", "value": "<image>\nWhat is written on the sign?"},
             {"from": "gpt", "value": "The red sign says apple. " * 20}]
    ids, labels = conversation.encode_conversation(turns, model.tokenizer, "vicuna_v1")
    batch = ([ids] * micro, [labels] * micro, [pre] * micro)
    T = len(ids) - 1 + model.cfg.image_tokens(pre[2])  # LLM tokens of one sample
    opt = train.make_optimizer(model, preset["lr2"], preset["lora_lr"])
    amp = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        with amp:
            loss = model(*batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return loss.item()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        rss_mb(reset_peak=True)
    step()  # warm-up
    times, losses = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else rss_mb()[1] / 1024
    dt = statistics.median(times)
    n_llm = sum(p.numel() for n, p in model.llm.named_parameters() if "lora_" not in n)
    n_vit = sum(p.numel() for p in model.vision.parameters())
    vit_tokens = micro * (1 + pre[1].shape[0]) * (model.vision.cfg.grid ** 2 + 1)
    flops = 4 * n_llm * micro * T + 2 * n_vit * vit_tokens
    mfu = flops / dt / (args.peak_tflops * 1e12)
    print(f"gpu smoke run ({args.size} shapes, {device}, {str(dtype).removeprefix('torch.')} backbones, fp32 "
          f"adapters): micro-batch {micro} x {T} LLM tokens ({pre[2][0]}x{pre[2][1]} slices + overview)")
    print(f"  stage-2 step {dt:.3f} s (median of {args.steps}), {micro * T / dt:,.0f} LLM tokens/s, MFU "
          f"{100 * mfu:.1f}% of {args.peak_tflops:g} TFLOP/s, peak memory {peak:.2f} GiB, losses "
          f"{', '.join(f'{x:.3f}' for x in losses)}")
    model.eval()
    n_gen = min(micro, 8)
    prompt = conversation.encode_prompt("<image>\nWhat is written on the sign?", model.tokenizer)
    t0 = time.perf_counter()
    with torch.inference_mode(), amp:  # as HiResLLaVA.generate, but ids out: random weights pick ids the small
        seqs = model._embed_batch([prompt] * n_gen, [None] * n_gen, [pre] * n_gen)  # tokenizer cannot decode
        E, _, M = hires.pad_batch(seqs, len(seqs[0][0]), left=True)
        out = model.llm.generate(input_embeds=E, attention_mask=M, max_new_tokens=args.new_tokens, eos_id=-1)
    sync()
    gen_s = time.perf_counter() - t0
    n_new = sum(map(len, out))
    print(f"  greedy batch of {n_gen} x {args.new_tokens} new tokens after a {len(seqs[0][0])}-token prompt: "
          f"{gen_s:.2f} s ({n_new / gen_s:.1f} new tokens/s, prefill included)")
    return dict(step_s=dt, tokens_per_s=micro * T / dt, mfu=mfu, peak_gib=peak, losses=losses,
                generated=out, generate_s=gen_s, llm_tokens=T, grid=pre[2])
