"""train.py on the tiny preset: end-to-end stages, schedule, optimizer groups, kill -9 + resume, NaN stop, bad data,
1 vs 2 processes. CPU, small generated EntityGrid-QA."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import safetensors.torch
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoints  # noqa: E402
import hires  # noqa: E402
import slicing  # noqa: E402
import conversation
import llama  # noqa: E402
import llava_data  # noqa: E402
import entitygrid  # noqa: E402
import stage0  # noqa: E402
import train  # noqa: E402

PY = sys.executable


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("entitygrid"))
    return d


def tiny_args(out, data_dir, *extra, stage0=False):
    """Small, fast settings: 48 samples, batch 8 in micro-batches of 4, a small vocabulary. Without stage0: random
    backbones, the LLM trained in full (what a random LLM needs, README), so the tests of the stages' machinery do
    not pay for stage 0."""
    return ["--out", str(out), "--data-dir", data_dir, "--train-size", "48", "--test-size", "27",
            "--vocab-size", "400", "--batch1", "8", "--batch2", "8", "--micro-batch", "4", "--threads", "2",
            "--log-every", "1", *([] if stage0 else ["--random-backbones", "--train-llm", "--lora-rank", "0"]), *extra]


def history(out, stage, key="loss"):
    with open(os.path.join(out, f"stage{stage}", "history.json")) as f:
        return [h[key] for h in json.load(f)]


def test_schedule_matches_hf_cosine_with_warmup():
    from transformers import get_cosine_schedule_with_warmup
    total = 100  # warm-up ceil(0.03 * 100) = 3 steps
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=3, num_training_steps=total)
    hf = []
    for _ in range(total):
        hf.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = [train.lr_factor(s, total) for s in range(total)]
    assert ours == pytest.approx(hf, abs=1e-12)
    assert ours[:4] == pytest.approx([0, 1 / 3, 2 / 3, 1.0])
    assert train.lr_factor(3 + 97 // 2, total) == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(
        torch.pi * 48 / 97)).item()))


def test_stage1_then_stage2_loads_stage1_weights(tmp_path, data_dir):
    out1, out2 = tmp_path / "s1", tmp_path / "s2"
    train.main(tiny_args(out1, data_dir, "--stage", "1", "--steps1", "2"))
    assert len(history(out1, 1)) == 2 and os.path.isfile(out1 / "stage1" / "loss.png")
    lr1 = train.PRESETS["tiny"].lr1
    assert history(out1, 1, "lr") == [0.0, lr1]  # the schedule is applied: warm-up ceil(0.03 * 2) = 1 step
    s1 = load_file(out1 / "stage1" / "model.safetensors")
    # stage 2 with learning rates 0 (and another seed, so a fresh init would differ): it saves what it started from
    train.main(tiny_args(out2, data_dir, "--stage", "2", "--init", str(out1 / "stage1"), "--steps2", "2",
                         "--lr2", "0", "--lora-lr", "0", "--seed", "1"))
    s2 = load_file(out2 / "stage2" / "model.safetensors")
    # the tiny preset trains its stand-in LLM: the checkpoints carry it (and no LoRA)
    assert set(s1) == set(s2) and "llm.lm_head.weight" in s2 and any(k.startswith("sra.") for k in s2)
    assert not any("lora_" in k for k in s2)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert len(history(out2, 2)) == 2


@pytest.mark.parametrize("llm,rank", [("--no-train-llm", "8"), ("--train-llm", "0")])  # paper-like, tiny preset
def test_optimizer_holds_exactly_the_trainable_params(tmp_path, data_dir, llm, rank):
    """Three groups: the LLM side (LoRA, or the whole LLM with --train-llm) at llm_lr, the SRA at sra_lr, the sampler
    and projector at lr; by default --sra-lr is a tenth of --lora-lr, the paper's 2e-5 beside LoRA's 2e-4."""
    args = train.parse_args(tiny_args(tmp_path, data_dir, "--lora-rank", rank, llm))
    assert args.sra_lr == pytest.approx(args.lora_lr / 10)
    assert train.parse_args(tiny_args(tmp_path, data_dir, "--sra-lr", "3e-4")).sra_lr == 3e-4
    paper = train.PRESETS["paper"]
    assert (paper.lora_lr, paper.lr2, paper.lora_lr / 10) == (2e-4, 2e-5, pytest.approx(2e-5))
    stage0.prepare_tiny(args)
    model = hires.HiResLLaVA(train.model_config(args))
    rates = dict(llm=5e-4, sra=5e-5, vision=1e-3)
    for stage in (1, 2):
        model.set_stage(stage)
        opt = train.make_optimizer(model, lr=1e-3, llm_lr=5e-4, sra_lr=5e-5)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        by_id = {id(p): n for n, p in model.named_parameters()}
        in_opt = [by_id[id(p)] for g in opt.param_groups for p in g["params"]]
        assert sorted(in_opt) == sorted(trainable)
        assert {g["name"] for g in opt.param_groups} == ({"llm", "sra", "vision"} if stage == 2 else
                                                         {"llm", "vision"} if llm == "--train-llm" else {"vision"})
        for g in opt.param_groups:
            names = [by_id[id(p)] for p in g["params"]]
            assert g["lr"] == g["base_lr"] == rates[g["name"]] and g["weight_decay"] == 0.0
            assert all(n.split(".")[0].replace("sampler", "vision").replace("projector", "vision") == g["name"]
                       for n in names)
            assert g["betas"] == (0.9, 0.999)  # LLaVA's (HF Trainer AdamW defaults)
        assert any("lora_" in n for n in trainable) == (stage == 2 and rank == "8")
        assert ("llm.lm_head.weight" in trainable) == (llm == "--train-llm")


def test_sra_layers_flag_places_the_adapters(tmp_path, data_dir):
    args = train.parse_args(tiny_args(tmp_path, data_dir, "--sra-layers", "9,8"))
    stage0.prepare_tiny(args)
    assert sorted(hires.HiResLLaVA(train.model_config(args)).sra) == ["8", "9"]
    assert train.parse_args(tiny_args(tmp_path, data_dir)).sra_layers == [7, 8, 9]  # 1-indexed 8-10 of 12 blocks
    with pytest.raises(train.TrainError, match="before the feature block"):
        train.model_config(train.parse_args(tiny_args(tmp_path, data_dir, "--sra-layers", "10")))


def test_tiny_tokenizer_knows_the_template_words(tmp_path, data_dir):
    """Trained on the templated text, so USER:/ASSISTANT: are whole pieces, not a run of byte-fallback bytes."""
    args = train.parse_args(tiny_args(tmp_path, data_dir))
    stage0.prepare_tiny(args)
    tok = conversation.Tokenizer(train.model_config(args).tokenizer_path)
    for word in (" USER:", " ASSISTANT:"):
        pieces = [tok.sp.id_to_piece(i) for i in tok.encode(word, bos=False, prefix=False)]
        assert not any(p.startswith("<0x") for p in pieces), pieces


def test_kill9_then_resume_matches_uninterrupted(tmp_path, data_dir):
    common = ["--stage", "1", "--steps1", "6", "--save-every", "1"]
    train.main(tiny_args(tmp_path / "full", data_dir, *common))  # also generates the data for the subprocess
    killed = tmp_path / "killed"
    proc = subprocess.Popen([PY, os.path.join(ROOT, "train.py"), *tiny_args(killed, data_dir, *common)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = killed / "stage1" / "checkpoints" / "latest"
    deadline = time.time() + 120
    while not (latest.exists() and latest.read_text() >= "step-0000003") and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest.read_text() < "step-0000006", "the run finished before it was killed"
    (killed / "stage1" / "checkpoints" / "step-0000009.tmp").mkdir()  # a save cut short: must be ignored
    train.main(tiny_args(killed, data_dir, *common, "--resume"))
    assert history(killed, 1) == pytest.approx(history(tmp_path / "full", 1), rel=1e-5)  # float: same ops, same order


def test_a_used_out_is_refused_unless_resumed_or_overwritten(tmp_path, data_dir):
    common = ["--stage", "1", "--steps1", "2", "--save-every", "1"]
    train.main(tiny_args(tmp_path, data_dir, *common))
    stage1, ckpt = tmp_path / "stage1", tmp_path / "stage1" / "checkpoints"
    before = {p: p.read_bytes() for p in stage1.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit, match=r"^train.py: error: .*stage1 holds an earlier run: continue it with --resume, "
                       r"start over with --overwrite \(deletes it\), or pass another --out$"):
        train.main(tiny_args(tmp_path, data_dir, *common))
    assert {p: p.read_bytes() for p in stage1.rglob("*") if p.is_file()} == before  # nothing lost
    (ckpt / "step-0000035").mkdir(), (ckpt / "step-0000040").mkdir()  # leftovers of a longer run
    train.main(tiny_args(tmp_path, data_dir, *common, "--overwrite"))
    assert sorted(os.listdir(ckpt)) == ["latest", "step-0000001", "step-0000002"]
    # pruning keeps the checkpoint `latest` names, even when leftovers carry higher step numbers
    (ckpt / "latest").unlink()
    (ckpt / "step-0000035").mkdir(), (ckpt / "step-0000040").mkdir()
    train.main(tiny_args(tmp_path, data_dir, *common, "--resume"))  # no `latest`: from step 0
    assert (ckpt / "latest").read_text() == "step-0000002" and (ckpt / "step-0000002" / "model.safetensors").exists()
    assert sorted(os.listdir(ckpt)) == ["latest", "step-0000002", "step-0000040"]
    train.main(tiny_args(tmp_path, data_dir, *common, "--resume"))  # and it resumes


def test_save_cut_short_keeps_last_checkpoint_and_resume_restores_rng(tmp_path, data_dir, monkeypatch):
    forward = hires.HiResLLaVA.forward
    monkeypatch.setattr(hires.HiResLLaVA, "forward",  # random like dropout: the losses depend on the RNG state
                        lambda self, *a, **k: forward(self, *a, **k) * (1 + 0.1 * torch.rand(())))
    common = ["--stage", "1", "--steps1", "3", "--save-every", "1"]
    train.main(tiny_args(tmp_path / "full", data_dir, *common))
    save_file, rng_saves = safetensors.torch.save_file, []  # checkpoints.save_state looks it up where it saves

    def dies_in_second_save(tensors, path):  # after step 2's model and optimizer files are written
        rng_saves.append(path.endswith("rng.safetensors"))
        if sum(rng_saves) == 2:
            raise OSError("disk full")
        save_file(tensors, path)
    monkeypatch.setattr(safetensors.torch, "save_file", dies_in_second_save)
    with pytest.raises(OSError, match="disk full"):
        train.main(tiny_args(tmp_path / "cut", data_dir, *common))
    ckpt = tmp_path / "cut" / "stage1" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step-0000001" and not (ckpt / "step-0000002").exists()
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    train.main(tiny_args(tmp_path / "cut", data_dir, *common, "--resume"))  # from step 1: RNG, data, moments
    assert history(tmp_path / "cut", 1) == pytest.approx(history(tmp_path / "full", 1), rel=1e-5)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_dir, monkeypatch):
    forward, calls = hires.HiResLLaVA.forward, []

    def poisoned(self, *a, **k):  # steps 1-2 fine (2 micro-batches each), NaN from step 3 on
        calls.append(1)
        loss = forward(self, *a, **k)
        return loss * float("nan") if len(calls) > 4 else loss
    monkeypatch.setattr(hires.HiResLLaVA, "forward", poisoned)
    with pytest.raises(SystemExit, match="loss is nan at step 3"):
        train.main(tiny_args(tmp_path, data_dir, "--stage", "1", "--steps1", "5", "--save-every", "1"))
    assert (tmp_path / "stage1" / "checkpoints" / "latest").read_text() == "step-0000002"


def test_too_small_vocabulary_is_a_one_line_error(tmp_path, data_dir):
    args = tiny_args(tmp_path, data_dir, "--stage", "1", "--steps1", "1")
    args[args.index("--vocab-size") + 1] = "50"
    with pytest.raises(SystemExit, match=r"--vocab-size 50: sentencepiece cannot train .*Vocabulary size is smaller"):
        train.main(args)


def test_bad_data_is_counted_not_fatal(tmp_path, data_dir):
    args = train.parse_args(tiny_args(tmp_path, data_dir))
    stage0.prepare_tiny(args)
    model = hires.HiResLLaVA(train.model_config(args))
    Image.new("RGB", (80, 60), (200, 30, 30)).save(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really")
    good = {"id": "g", "image": "ok.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]}
    bad = [{"id": 1, "image": "nope.png", "conversations": good["conversations"]},
           {"id": 2, "image": "corrupt.png", "conversations": good["conversations"]},
           {"id": 3, "image": "ok.png", "conversations": []},
           {"id": 4, "conversations": good["conversations"]},
           {"id": 5, "image": "ok.png", "conversations": [
               {"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "red"}]},
           {"id": 6, "image": "ok.png", "conversations": [
               {"from": "human", "value": "<image>\n" + "word " * 400}, {"from": "gpt", "value": "red"}]},
           {"id": 7, "image": "ok.png", "conversations": [
               {"from": "human", "value": "<image>\nWhy?"}, {"from": "gpt", "value": "red " * 400}]}]
    items = [x for b in bad for x in (b, good)]  # each bad sample is followed by a good one
    path = tmp_path / "data.json"
    path.write_text(json.dumps(items))
    data = llava_data.LlavaData(str(path), str(tmp_path), model.tokenizer, "vicuna_v1", llava_data.slice_args(model),
                                256, model.image_tokens)
    batch = llava_data.collate([data[i] for i in range(len(data))])
    expected = {"missing image": 1, "bad image": 1, "empty or malformed conversation": 1,
                "<image> without an image": 1, "image without <image> (prepended)": 1, "too long (truncated)": 1,
                "too long (no answer left)": 1}
    assert dict(batch["skipped"]) == expected
    # the spliced length (image tokens in place of the placeholder) fits, and so nothing is cut in the model
    lengths = [len(i) + model.image_tokens(im[2]) - 1 for i, im in zip(batch["input_ids"], batch["images"])]
    assert max(lengths) == 256
    assert len(batch["input_ids"]) == len(items)  # every bad one was replaced, so batches keep their size
    loss = model(batch["input_ids"], batch["labels"], batch["images"])
    assert torch.isfinite(loss)
    # one training step over all 14 items (each drawn once): the counts reach the report and the checkpoint
    args = train.parse_args(tiny_args(tmp_path, data_dir, "--batch1", "14", "--micro-batch", "7", "--steps1", "1"))
    _, skipped = train.train_stage(args, 1, model, data, str(tmp_path / "stage1"), train.setup(args))
    trainer = json.loads((tmp_path / "stage1" / "checkpoints" / "step-0000001" / "trainer.json").read_text())
    assert skipped == trainer["skipped"] == expected


def test_micro_batch_sampler_shards_without_overlap():
    def steps(rank, world, start=0):  # -> list over steps of this rank's micro-batches
        it = iter(llava_data.MicroBatchSampler(24, 8, 2, rank, world, seed=0, start_step=start))
        return [[next(it) for _ in range(4 // world)] for _ in range(6)]
    one = steps(0, 1)
    for step in one[:3]:  # 3 steps = one epoch: a permutation of the 24 samples
        assert len(step) == 4 and all(len(mb) == 2 for mb in step)
    assert sorted(i for step in one[:3] for mb in step for i in mb) == list(range(24))
    assert one[3:] != one[:3]  # a new permutation each epoch
    r0, r1 = steps(0, 2), steps(1, 2)  # rank r takes micro-batches r, r + 2: together the 1-process micro-batches
    assert [[a[0], b[0], a[1], b[1]] for a, b in zip(r0, r1)] == one
    assert steps(1, 2, start=4)[:2] == r1[4:]  # start_step: a resume mid-epoch continues where it stopped


def test_one_and_two_processes_give_the_same_losses(tmp_path, data_dir):
    common = ["--stage", "1", "--steps1", "3", "--threads", "1"]
    train.main(tiny_args(tmp_path / "one", data_dir, *common))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          os.path.join(ROOT, "train.py"), *tiny_args(tmp_path / "two", data_dir, *common)],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-4000:]  # a failed 2-process run shows why, not only its status
    # same micro-batches, gradients averaged in a different order: equal up to float rounding
    for key in ("loss", "grad_norm"):  # the gradient norm: accumulation and DDP both average
        assert history(tmp_path / "two", 1, key) == pytest.approx(history(tmp_path / "one", 1, key), rel=1e-4)


def fit_fixed_batch(args, n=16, steps=100):
    """Stage-2 training of the tiny preset on n fixed EntityGrid-QA samples (option-text answers) -> (model, losses,
    the questions)."""
    stage0.prepare_tiny(args)
    torch.manual_seed(0)
    model = hires.HiResLLaVA(train.model_config(args))
    model.set_stage(2)
    train_dir = os.path.join(args.data_dir, "train")
    data = llava_data.LlavaData(os.path.join(train_dir, "text_qa.json"), train_dir, model.tokenizer, "vicuna_v1",
                                llava_data.slice_args(model), model.context, model.image_tokens)
    batch = llava_data.collate([data[i] for i in range(n)])
    batch["images"] = model.prefix(batch["images"])  # the frozen ViT blocks once, as --cache-vit does
    opt = train.make_optimizer(model, args.lr2, args.lora_lr, args.sra_lr)
    losses = []
    for _ in range(steps):
        loss = model(batch["input_ids"], batch["labels"], batch["images"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return model, losses, train.entitygrid.load_questions(train_dir)[:n]


def test_tiny_model_overfits_a_fixed_batch(tmp_path, data_dir):
    """The tiny preset can learn: 16 fixed questions are fit (loss near 0) and every answer is ranked first. With
    the stand-in LLM frozen (the paper's recipe on a random LLM) the same steps leave the loss high."""
    args = train.parse_args(tiny_args(tmp_path, data_dir))
    model, losses, questions = fit_fixed_batch(args)
    assert losses[-1] < 0.1, losses[::10]
    model.eval()
    images = [slicing.load_image(os.path.join(args.data_dir, "train", q["image"])) for q in questions]
    scores = model.option_logprobs(images, [entitygrid.format_question(q, letters=False) for q in questions],
                                   [q["options"] for q in questions])
    assert [entitygrid.LETTERS[max(range(4), key=s.__getitem__)] for s in scores] == [q["answer"] for q in questions]


def test_stage2_checkpoint_reloads_to_the_same_answers(tmp_path, data_dir):
    """eval.py --ckpt STAGE2 --mc rank sees the model train.py evaluated: the same predictions and accuracy."""
    import eval as ev
    out = tmp_path / "run"
    metrics = train.main(tiny_args(out, data_dir, "--steps1", "2", "--steps2", "4", "--eval-batch", "8"))
    again = ev.main(["--bench", "entitygrid", "--data", os.path.join(data_dir, "test"), "--ckpt", str(out / "stage2"),
                     "--out", str(tmp_path / "eval"), "--batch-size", "5"])  # --mc rank: the checkpoint's
    with open(out / "predictions.json") as f:  # one predictions format: train.py's is eval.py's
        in_process = {e["id"]: e["answer"] for e in json.load(f)}
    with open(tmp_path / "eval" / "predictions.json") as f:
        reloaded = {e["id"]: e["answer"] for e in json.load(f)}
    assert reloaded == in_process and again["accuracy"] == metrics["accuracy"]
    assert (again["mc"], again["mc_from"]) == ("rank", "checkpoint")
    rescored = ev.main(["--bench", "entitygrid", "--data", os.path.join(data_dir, "test"), "--predictions",
                        str(out / "predictions.json"), "--out", str(tmp_path / "rescored")])
    assert rescored["accuracy"] == metrics["accuracy"]
    # a moved run evaluates the same with no flags: its checkpoints name the backbones relative to themselves
    os.rename(out, tmp_path / "moved")
    assert json.loads((tmp_path / "moved" / "stage2" / "config.json").read_text())["llm_path"] == "../base/llm"
    moved = ev.main(["--bench", "entitygrid", "--data", os.path.join(data_dir, "test"), "--ckpt",
                     str(tmp_path / "moved" / "stage2"), "--out", str(tmp_path / "eval_moved")])
    assert moved["provenance"]["llm_path"] == str(tmp_path / "moved" / "base" / "llm")
    with open(tmp_path / "eval_moved" / "predictions.json") as f:
        assert {e["id"]: e["answer"] for e in json.load(f)} == in_process


def test_length_check_counts_image_tokens_under_the_paper_preset(tmp_path, data_dir):
    """A 640x480 COCO image under the paper preset slices 4x4: 2465 image tokens. With the default context (the
    LLM's own, Vicuna-7B-v1.5's 4096) its answer is kept; under the old 2048 no answer token is left, and the sample
    is counted under its own reason and replaced, not trained on."""
    (tmp_path / "clip.pt").write_bytes(b"")
    (tmp_path / "vicuna").mkdir()
    args = train.parse_args(["--clip", str(tmp_path / "clip.pt"), "--llm", str(tmp_path / "vicuna"),
                             "--data1", "unused.json", "--data2", "unused.json"])
    cfg = train.model_config(args)
    assert cfg.max_length == 0 and cfg.image_tokens((4, 4)) == 2465
    context = llama.LlamaConfig.from_preset("vicuna-7b").max_seq_len  # what HiResLLaVA resolves 0 to
    assert context == 4096
    tiny = train.parse_args(tiny_args(tmp_path / "tiny", data_dir))
    stage0.prepare_tiny(tiny)
    tok = conversation.Tokenizer(train.model_config(tiny).tokenizer_path)
    Image.new("RGB", (640, 480), (10, 120, 30)).save(tmp_path / "coco.jpg")
    Image.new("RGB", (300, 200), (10, 120, 30)).save(tmp_path / "small.jpg")
    item = {"id": "coco", "image": "coco.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the picture?"}, {"from": "gpt", "value": "green"}]}
    path = tmp_path / "data.json"
    path.write_text(json.dumps([item, dict(item, id="small", image="small.jpg")]))
    pre = dict(base=336, max_slices=cfg.max_slices, upscale=cfg.upscale)  # slicing.preprocess_image's arguments
    data = llava_data.LlavaData(str(path), str(tmp_path), tok, "vicuna_v1", pre, context, cfg.image_tokens)
    (ids, labels, image), reason = data.encode(item)
    assert image[2] == (4, 4) and reason is None
    answer = [x for x in labels if x != conversation.IGNORE_INDEX]
    assert answer == tok.encode("green", bos=False) + [tok.eos_id]
    assert len(ids) - 1 + 2465 <= context
    old = llava_data.LlavaData(str(path), str(tmp_path), tok, "vicuna_v1", pre, 2048, cfg.image_tokens)
    (ids, _, image), skipped = old[0]
    assert skipped == ["too long (no answer left)"] and image[2] == (2, 2)  # the next sample, 300x200 -> 2x2


def test_stage2_flags_win_over_the_stage1_config(tmp_path, data_dir, capsys):
    s1, s2 = tmp_path / "s1" / "stage1", tmp_path / "s2" / "stage2"
    # the paper's recipe (frozen LLM + LoRA) on the tiny backbones
    train.main(tiny_args(tmp_path / "s1", data_dir, "--stage", "1", "--steps1", "1", "--lora-rank", "64",
                         "--no-train-llm"))
    stored = json.loads((s1 / "config.json").read_text())
    assert (stored["max_slices"], stored["upscale"], stored["max_length"], stored["lora_rank"]) == (4, False, 512, 64)
    flags = ["--max-slices", "2", "--upscale", "--max-len", "400", "--lora-rank", "4", "--lora-alpha", "8",
             "--lora-dropout", "0.1", "--no-train-llm"]  # over tiny_args' --train-llm: stage 1 kept the LLM frozen
    train.main(tiny_args(tmp_path / "s2", data_dir, "--stage", "2", "--init", str(s1), "--steps2", "2", *flags))
    cfg = json.loads((s2 / "config.json").read_text())
    model = checkpoints.load_checkpoint(str(s2))
    model.set_stage(2)
    groups = {g: sum(p.numel() for n, p in model.named_parameters() if (n.startswith(g + ".") and "lora_" not in n)
                     or (g == "lora" and "lora_" in n)) for g in ("sra", "sampler", "projector", "lora")}
    assert train.trainable_counts(model) == groups and groups["lora"] == 2 * 4 * (128 + 96 + 96 + 128 + 3 * (64 + 172))
    # rank 4 x (in + out) of q, k, v (GQA: 32 out), o, gate, up, down; 2 layers
    assert "stage 2: trainable by group: " + ", ".join(f"{g} {n:,}" for g, n in groups.items()) in \
        capsys.readouterr().out
    assert (cfg["max_slices"], cfg["upscale"], cfg["max_length"], cfg["lora_rank"], cfg["lora_alpha"],
            cfg["lora_dropout"]) == (2, True, 400, 4, 8.0, 0.1)
    sd = load_file(s2 / "model.safetensors")
    assert {v.shape[0] for k, v in sd.items() if k.endswith("lora_A")} == {4}
    with pytest.raises(SystemExit, match=r"^train.py: error: --sampler qformer: .* trained the sms sampler in stage 1"):
        train.main(tiny_args(tmp_path / "s3", data_dir, "--stage", "2", "--init", str(s1), "--sampler", "qformer"))
    trained = tmp_path / "trained-lora"  # a checkpoint marked stage 1 whose LoRA is trained (s2's weights)
    shutil.copytree(s2, trained, ignore=shutil.ignore_patterns("checkpoints"))
    (trained / "config.json").write_text(json.dumps({**cfg, "template": "plain"}))
    with pytest.raises(SystemExit, match=r"--lora-rank 8: the LoRA of .* is trained \(rank 4\)"):
        train.main(tiny_args(tmp_path / "s4", data_dir, "--stage", "2", "--init", str(trained), "--lora-rank", "8"))
    (trained / "config.json").write_text(json.dumps({**cfg, "template": "plain", "sra_layer": [1]}))  # unreadable
    with pytest.raises(SystemExit, match=r"^train.py: error: --init .*unexpected keyword argument 'sra_layer'"):
        train.main(tiny_args(tmp_path / "s5", data_dir, "--stage", "2", "--init", str(trained)))


def test_backbone_paths_are_stored_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clip.pt").write_bytes(b"")
    (tmp_path / "vicuna").mkdir()
    args = train.parse_args(["--clip", "clip.pt", "--llm", "vicuna", "--data1", "a.json", "--data2", "b.json"])
    cfg = train.model_config(args)
    assert (cfg.clip_weights, cfg.llm_path, cfg.tokenizer_path) == (
        str(tmp_path / "clip.pt"), str(tmp_path / "vicuna"), str(tmp_path / "vicuna" / "tokenizer.model"))


def test_stage2_one_and_two_processes_give_the_same_losses(tmp_path, data_dir):
    """Stage 2 (LoRA + SRA + sampler + projector) under DDP on 2 CPU processes matches 1 process."""
    train.main(tiny_args(tmp_path / "s1", data_dir, "--stage", "1", "--steps1", "2", "--lora-rank", "8",
                         "--no-train-llm"))
    common = ["--stage", "2", "--init", str(tmp_path / "s1" / "stage1"), "--steps2", "3", "--threads", "1",
              "--no-train-llm", "--lora-rank", "8"]  # as stage 1: tiny_args' --train-llm would win over --init's
    train.main(tiny_args(tmp_path / "one", data_dir, *common))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          os.path.join(ROOT, "train.py"), *tiny_args(tmp_path / "two", data_dir, *common)],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-4000:]  # a failed 2-process run shows why, not only its status
    for key in ("loss", "grad_norm"):  # same micro-batches, gradients averaged in another order: float rounding
        assert history(tmp_path / "two", 2, key) == pytest.approx(history(tmp_path / "one", 2, key), rel=1e-4)
    one, two = (load_file(tmp_path / d / "stage2" / "model.safetensors") for d in ("one", "two"))
    assert any("lora_" in k for k in one) and any(k.startswith("sra.") for k in one)
    for k in one:  # the trained LoRA and SRA agree too
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-6)


def test_cuda_device_is_set_before_the_process_group(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", str(d))))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # --device cuda is refused on a machine without
    args = train.parse_args(tiny_args(tmp_path, "unused", "--device", "cuda", "--dtype", "fp32"))
    proc = train.setup(args)
    assert calls == [("set_device", "cuda:1"), ("init", "nccl")] and proc["device"] == torch.device("cuda", 1)


def test_memory_arithmetic_uses_the_models_counts():
    """The paper-preset memory table (docs/real-weights.md) quotes parameter and token counts: they are the code's
    (meta device, no RAM)."""
    import dataclasses
    import clip
    readme = open(os.path.join(ROOT, "docs", "real-weights.md")).read()
    args = train.parse_args(["--clip", __file__, "--llm", ROOT, "--data1", "a", "--data2", "b"])
    cfg = train.model_config(args)
    with torch.device("meta"):
        llm = llama.Llama(llama.LlamaConfig.from_preset("vicuna-7b"))
        n_llm = sum(p.numel() for p in llm.parameters())
        llama.apply_lora(llm, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
        n_lora = sum(p.numel() for n, p in llm.named_parameters() if "lora_" in n)
        ccfg = clip.CLIPConfig.from_preset(cfg.clip_preset)
        vit = clip.build_vision_tower(dataclasses.replace(ccfg, pretrained=False))
        n_vit = sum(p.numel() for p in vit.parameters())
        D, C = ccfg.width, llm.cfg.dim
        n_sra = sum(p.numel() for p in hires.SliceRestoreAdapter(D, ccfg.heads, ccfg.grid).parameters())
        n_sms = sum(p.numel() for p in hires.SelfMiningSampler(D, ccfg.heads, ccfg.grid, cfg.kernel).parameters())
        layers = (torch.nn.Linear(D, C), torch.nn.Linear(C, C))  # LLaVA's mlp2x_gelu
        n_proj = sum(q.numel() for layer in layers for q in layer.parameters())
    total = n_lora + len(cfg.sra_layers) * n_sra + n_sms + n_proj
    for n in (n_llm, n_vit, n_lora, n_sra, n_sms, n_proj, total):
        assert f"{n:,}" in readme, n
    assert f"SRA {len(cfg.sra_layers)} x" in readme and f"blocks {cfg.sra_layers[0]}-{ccfg.layers - 2}" in readme
    assert cfg.image_tokens((4, 4)) == 2465 and "(2465 tokens)" in readme
    assert args.micro_batch == 8 and args.grad_ckpt and f"micro-batch {args.micro_batch} (accumulation " \
        f"{args.batch2} / ({args.micro_batch} x 8 GPUs) = {args.batch2 // (args.micro_batch * 8)}" in readme


def test_bad_training_data_file_is_one_line_error(tmp_path, monkeypatch):
    """An empty or unreadable LLaVA JSON file: llava_data.DataError, which train.py reports in one line."""
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(llava_data.DataError, match="non-empty JSON list"):
        llava_data.LlavaData(str(tmp_path / "empty.json"), str(tmp_path), None, "plain", None, 100, None)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(llava_data.DataError, match="cannot read LLaVA training data"):
        llava_data.LlavaData(str(tmp_path / "bad.json"), str(tmp_path), None, "plain", None, 100, None)

    def run(args, proc):
        raise llava_data.DataError(f"{tmp_path / 'empty.json'}: expected a non-empty JSON list")
    monkeypatch.setattr(train, "run", run)
    with pytest.raises(SystemExit, match="train.py: error: .*empty.json: expected a non-empty JSON list"):
        train.main(["--out", str(tmp_path / "run")])


def test_stage0_learns_and_gives_the_encoder_the_papers_property(tmp_path, data_dir, monkeypatch):
    """Stage 0 trains both tiny backbones (its loss falls) and moves the ViT towards CLIP's property: a cut entity's
    remaining tokens change more than with the random encoder, and attention is less uniform. Stages 1-2 then start
    from these backbones, also those of another run (--stage0)."""
    out = tmp_path / "run"
    train.main(tiny_args(out, data_dir, "--stage", "0", "--steps0", "40", "--batch0", "16", "--lr0", "4e-3",
                         stage0=True))
    losses = history(out, 0)
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5]), losses[::5]
    with open(out / "stage0" / "encoder.json") as f:
        probe = json.load(f)
    rand, pre = probe["random"], probe["pretrained"]
    # 40 steps of 16 scenes move it by about 40% (0.146 -> 0.209); an encoder left as it was stays at 1.0
    assert pre["cut_sensitivity"] > 1.15 * rand["cut_sensitivity"], probe
    assert pre["attention_entropy"] < rand["attention_entropy"] - 0.02, probe
    assert os.path.isfile(out / "stage0" / "loss.png") and os.path.isfile(out / "stage0" / "llm" / "config.json")
    cfg = train.model_config(train.parse_args(tiny_args(out, data_dir, stage0=True)))
    assert cfg.clip_weights == str(out / "stage0" / "clip_tiny.safetensors")
    # another run of the same data and seed reuses it; a directory without a finished stage 0 is a one-line error
    with pytest.raises(SystemExit, match="no finished stage 0"):
        train.main(tiny_args(tmp_path / "other", data_dir, "--stage", "1", "--stage0", str(tmp_path / "none"),
                             stage0=True))
    # with relative paths (as results/ablation.py gives them): stage 2 of a third run starts from the second's stage 1,
    # whose checkpoint names backbones outside its run, so they must not be read relative to the checkpoint
    monkeypatch.chdir(tmp_path)
    train.main(tiny_args("other", data_dir, "--stage", "1", "--steps1", "1", "--stage0", "run/stage0", stage0=True))
    assert not os.path.exists(tmp_path / "other" / "stage0")
    train.main(tiny_args("third", data_dir, "--stage", "2", "--steps2", "1", "--init", "other/stage1", "--no-sra",
                         "--stage0", "run/stage0", stage0=True))
    assert os.path.isfile(tmp_path / "third" / "stage2" / "model.safetensors")


def paper_scale_lengths(n=1024, seed=0):
    """A LLaVA-665K-like mix at the paper preset's token counts, computed without the model: captions of few-slice
    images, conversations about 4x4-slice images, text-only conversations (negative: LLaVA's modality_lengths)."""
    cfg, rng = hires.HiResConfig(), random.Random(seed)  # ViT-L/14-336, SMS k=2, N = 16: 2x2 -> 725, 4x4 -> 2465
    kinds = [lambda: cfg.image_tokens((2, 2)) + rng.randint(15, 60), lambda: cfg.image_tokens((4, 4)) +
             rng.randint(100, 1500), lambda: -rng.randint(200, 2000)]
    return [rng.choices(kinds, weights=(4, 4, 2))[0]() for _ in range(n)]


def test_modality_length_groups_pad_less_and_keep_modalities_apart():
    lengths = paper_scale_lengths()
    groups = llava_data.modality_length_groups(lengths, 8, 128, torch.Generator().manual_seed(0))
    assert all(len(b) == 8 for b in groups) and len(groups) == len(lengths) // 8
    flat = [i for b in groups for i in b]
    assert len(set(flat)) == len(flat)  # no sample twice in an epoch
    mixed = [b for b in groups if len({lengths[i] > 0 for i in b}) == 2]
    assert len(mixed) <= 1  # only the modalities' leftover ends may share a micro-batch
    perm = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = [perm[j:j + 8] for j in range(0, len(perm), 8)]
    before, after = (llava_data.padding_fraction(b, lengths, 4096) for b in (shuffled, groups))
    assert after < before / 4  # docs/method.md: about 0.48 -> 0.06 of the LLM positions
    # the sampler with lengths: one epoch is the groups, sharded by rank as without them
    sampler = lambda rank, world: iter(llava_data.MicroBatchSampler(len(lengths), 128, 8, rank, world, seed=0,
                                                                    lengths=lengths))
    one, r0, r1 = sampler(0, 1), sampler(0, 2), sampler(1, 2)
    first = [next(one) for _ in range(16)]
    assert first == groups[:16]  # epoch 0's generator: seed + 0
    assert [b for pair in zip((next(r0) for _ in range(8)), (next(r1) for _ in range(8))) for b in pair] == first
