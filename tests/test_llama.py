"""llama.py against transformers' LlamaForCausalLM (tiny random checkpoints) plus cache / LoRA / template invariants."""
import copy
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import conversation
import llama  # noqa: E402

transformers = pytest.importorskip("transformers")

# fp32 on CPU: both implementations do the same math in a different op order; differences are ~1e-6
ATOL = 1e-4


def hf_model(seed=0, rope_theta=5000.0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rms_norm_eps=1e-5, rope_theta=rope_theta)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF inits norms to 1: randomise so a norm-weight mix-up shows
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return m


def hf_logits(m, ids, mask=None):
    pos = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)  # as HF generate; forward uses arange
    with torch.no_grad():
        return m(input_ids=ids, attention_mask=mask, position_ids=pos).logits


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    m = hf_model()
    m.save_pretrained(d, max_shard_size="40KB")  # forces several safetensors shards + index
    return m, d


def test_sharded_safetensors_both_config_styles_match_hf(hf_dir, tmp_path):
    m, d = hf_dir
    assert os.path.isfile(d / "model.safetensors.index.json")
    ids = torch.randint(0, 97, (2, 17))
    ref = hf_logits(m, ids)
    ours = llama.Llama.from_pretrained(d)
    assert ours.cfg.rope_theta == 5000.0 and ours.cfg.n_kv_heads == 2
    assert (ours.cfg.bos_id, ours.cfg.eos_id, ours.cfg.pad_id) == (m.config.bos_token_id, m.config.eos_token_id, 0)
    torch.testing.assert_close(ours(ids), ref, atol=ATOL, rtol=0)
    # transformers-4.x style (vicuna-7b-v1.5): no rope_theta key, rope_scaling null -> default theta 10000
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg["rope_scaling"] = None
    old = tmp_path / "old"
    old.mkdir()
    for f in os.listdir(d):
        if f != "config.json":
            os.symlink(d / f, old / f)
    (old / "config.json").write_text(json.dumps(cfg))
    ours4 = llama.Llama.from_pretrained(old)
    assert ours4.cfg.rope_theta == 10000.0
    m4 = hf_model(rope_theta=10000.0)  # same seed, same weights; HF's default theta as the reference
    torch.testing.assert_close(ours4(ids), hf_logits(m4, ids), atol=ATOL, rtol=0)


def test_bin_shards_dtype_and_errors(hf_dir, tmp_path):
    m, d = hf_dir
    sd = m.state_dict()
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old exports: must be ignored
    keys = sorted(sd)
    halves = {"pytorch_model-00001-of-00002.bin": keys[:len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for f, ks in halves.items():
        torch.save({k: sd[k].to(torch.bfloat16) for k in ks}, tmp_path / f)
    index = {"weight_map": {k: f for f, ks in halves.items() for k in ks}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    ours = llama.Llama.from_pretrained(tmp_path, dtype=torch.float32)
    assert ours.lm_head.weight.dtype == torch.float32
    ids = torch.randint(0, 97, (1, 9))
    # weights went through bf16 (8-bit mantissa): compare with HF on the same rounded weights
    m16 = hf_model()
    m16.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in m.state_dict().items()})
    torch.testing.assert_close(ours(ids), hf_logits(m16, ids), atol=ATOL, rtol=0)
    # one mis-shaped and one missing tensor -> a single error naming both and the file
    bad = torch.load(tmp_path / "pytorch_model-00002-of-00002.bin", weights_only=True)
    name, gone = sorted(bad)[:2]
    bad[name] = torch.zeros(3, 3)
    del bad[gone]
    torch.save(bad, tmp_path / "pytorch_model-00002-of-00002.bin")
    with pytest.raises(ValueError) as e:
        llama.Llama.from_pretrained(tmp_path)
    msg = str(e.value)
    assert f"missing {gone};" in msg and f"wrong shape {name} (3, 3)" in msg
    assert "pytorch_model-00002-of-00002.bin" in msg and "\n" not in msg
    with pytest.raises(FileNotFoundError, match="config.json"):
        llama.Llama.from_pretrained(tmp_path / "nope")


def test_save_pretrained_loads_in_transformers(tmp_path):
    torch.manual_seed(0)
    ours = llama.Llama(llama.LlamaConfig.from_preset("tiny", vocab_size=97, max_seq_len=64)).eval()
    ours.save_pretrained(tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 97, (2, 13))
    torch.testing.assert_close(ours(ids), hf_logits(hf, ids), atol=ATOL, rtol=0)
    back = llama.Llama.from_pretrained(tmp_path)
    assert back.cfg == ours.cfg  # every field survives config.json
    assert torch.equal(back(ids), ours(ids))  # bit-identical weights, same code
    labels = ids.clone()
    labels[0, :6] = llama.IGNORE_INDEX
    with torch.no_grad():
        ref = hf(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(ours(ids, labels=labels), ref, atol=ATOL, rtol=0)  # fp32 rounding only


def test_tied_embeddings_match_hf_one_parameter_saved_once(tmp_path):
    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    from safetensors import safe_open
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()  # HF writes the shared tensor once, as the embedding
    ours = llama.Llama.from_pretrained(tmp_path / "hf")
    assert ours.cfg.tie_word_embeddings and ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = torch.randint(0, 97, (2, 11))
    torch.testing.assert_close(ours(ids), hf_logits(hf, ids), atol=ATOL, rtol=0)
    ours.train()
    ours(ids, labels=ids).backward()  # both uses of the one weight reach one gradient, as in HF
    hf.train()
    hf(input_ids=ids, labels=ids).loss.backward()
    torch.testing.assert_close(ours.lm_head.weight.grad, hf.lm_head.weight.grad, atol=1e-5, rtol=0)  # fp32 sums
    # a LoRA merge and save keeps the tie: written once, transformers reads it back to the same logits
    ours.eval()
    llama.apply_lora(ours, rank=2)
    for m in ours.modules():
        if isinstance(m, llama.LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.1)
    llama.merge_lora(ours)
    ours.save_pretrained(tmp_path / "ours")
    with safe_open(tmp_path / "ours" / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert back.config.tie_word_embeddings
    torch.testing.assert_close(ours(ids), hf_logits(back, ids), atol=ATOL, rtol=0)
    # a tied config whose file also holds a different lm_head.weight is refused in one line
    from safetensors.torch import load_file, save_file
    sd = load_file(tmp_path / "hf" / "model.safetensors")
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"] + 1
    save_file(sd, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        llama.Llama.from_pretrained(tmp_path / "hf")


def test_padding_mask_matches_hf(hf_dir):
    m, d = hf_dir
    ours = llama.Llama.from_pretrained(d)
    ids = torch.randint(3, 97, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :5] = 0  # left padding
    mask[1, 9:] = 0  # right padding
    ref, out = hf_logits(m, ids, mask), ours(ids, attention_mask=mask)
    real = mask.bool()  # pad positions are garbage in both; compare the real ones
    assert torch.isfinite(out).all()  # fully masked pad rows must not produce NaN (it would reach the loss)
    assert llama.padded_positions_and_mask(real, 12)[1].any(-1).all()  # no such row, whatever the SDPA backend
    torch.testing.assert_close(out[real], ref[real], atol=ATOL, rtol=0)


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    m = llama.Llama(llama.LlamaConfig.from_preset("tiny", vocab_size=97, max_seq_len=64, **kw)).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return m


def generate_logits(monkeypatch, m, *args, **kw):
    """Runs m.generate and also returns the (B, V) logits it sampled from at each step, stacked (B, N, V)."""
    seen, sample = [], llama.sample
    monkeypatch.setattr(llama, "sample", lambda logits, *a: seen.append(logits.clone()) or sample(logits, *a))
    out = m.generate(*args, **kw)
    monkeypatch.undo()
    return out, torch.stack(seen, 1)


def test_kv_cache_equals_full_forward_and_embeds_equal_tokens(monkeypatch):
    m = tiny()
    ids = torch.randint(3, 97, (1, 8))
    (new,), step_logits = generate_logits(monkeypatch, m, ids, max_new_tokens=10, eos_id=-1)
    full = m(torch.cat([ids, torch.tensor([new])], 1))
    # cached decoding vs one full forward: same math, different softmax/matmul reduction order (fp32 rounding)
    torch.testing.assert_close(step_logits, full[:, 7:-1], atol=ATOL, rtol=0)
    assert full[0, 7:-1].argmax(-1).tolist() == new
    assert m.generate(input_embeds=m.embed(ids), max_new_tokens=10, eos_id=-1)[0] == new
    torch.testing.assert_close(m(input_embeds=m.embed(ids)), m(ids), atol=0, rtol=0)  # identical ops
    fp32_cos = m.rope_cos.clone()
    assert torch.equal(m.to(torch.bfloat16).rope_cos, fp32_cos)  # RoPE tables stay fp32 in a bf16 model


def test_left_padded_batch_equals_single_and_eos_stop(monkeypatch):
    m = tiny(1)
    prompts = [torch.randint(3, 97, (n,)).tolist() for n in (3, 9, 6)]
    runs = [generate_logits(monkeypatch, m, torch.tensor([p]), max_new_tokens=8, eos_id=-1) for p in prompts]
    single = [out[0] for out, _ in runs]
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    batch, logits = generate_logits(monkeypatch, m, ids, attention_mask=mask, max_new_tokens=8, eos_id=-1)
    assert batch == single
    # padded keys are masked out exactly; only the matmul shapes differ (fp32 rounding)
    torch.testing.assert_close(logits, torch.cat([lg for _, lg in runs]), atol=ATOL, rtol=0)
    eos = single[1][3]  # make a token of sequence 1 the EOS: it stops there, EOS excluded
    out = m.generate(ids, attention_mask=mask, max_new_tokens=8, eos_id=eos)
    assert out[1] == single[1][:single[1].index(eos)]
    assert tiny(1, eos_id=eos).generate(ids, attention_mask=mask, max_new_tokens=8) == out  # default: cfg.eos_id
    g = torch.Generator().manual_seed(0)
    s = m.generate(ids, attention_mask=mask, max_new_tokens=8, temperature=1.0, top_p=0.9, eos_id=-1, generator=g)
    assert [len(x) for x in s] == [8, 8, 8] and s != single
    # a nucleus that keeps only the top token is greedy
    assert m.generate(ids, attention_mask=mask, max_new_tokens=8, temperature=1.0, top_p=1e-6, eos_id=-1) == single
    with pytest.raises(ValueError, match="exceeds the context"):
        m.generate(torch.zeros(1, 65, dtype=torch.long))
    assert len(m.generate(torch.zeros(1, 62, dtype=torch.long), max_new_tokens=8, eos_id=-1)[0]) == 2  # context end


def greedy_full_forward(m, ids, mask, n):
    """Reference decoder: n greedy steps, each one full forward of the whole sequence, no cache."""
    T = ids.shape[1]
    for _ in range(n):
        nxt = m(ids, attention_mask=mask)[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids[:, T:].tolist()


def test_cached_decode_equals_full_forward_greedy_padded_and_unpadded():
    m = tiny(2)
    assert m.lm_head.weight.t().is_contiguous()  # column-major on CPU (the faster one-row GEMM), same values
    assert m.model.layers[0].mlp.down_proj.weight.is_contiguous()  # the narrowing layer stays row-major
    ids = torch.randint(3, 97, (3, 10))
    ones = torch.ones_like(ids)
    # no padding: the decode step runs without any mask
    assert m.generate(ids, max_new_tokens=12, eos_id=-1) == greedy_full_forward(m, ids, ones, 12)
    mask = ones.clone()
    mask[0, :4], mask[2, :7] = 0, 0  # left padding: the decode step masks the pad keys
    ids = ids.masked_fill(mask == 0, 0)
    assert m.generate(ids, attention_mask=mask, max_new_tokens=12, eos_id=-1) == greedy_full_forward(m, ids, mask, 12)


def test_column_major_weights_through_load_dtype_and_lora(tmp_path):
    """Llama holds widening layers' weights column-major on CPU (Llama._column_major): after construction, after
    from_pretrained, through .to(dtype), load_state_dict and LoRA; the values are those of plain row-major weights."""
    m = tiny(4)
    m.save_pretrained(tmp_path)
    back = llama.Llama.from_pretrained(tmp_path)
    ids = torch.randint(3, 97, (2, 9))

    def column_major(model):
        att, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
        return all(w.t().is_contiguous() for w in (model.lm_head.weight, att.q_proj.weight, att.o_proj.weight,
                                                   mlp.up_proj.weight)) \
            and all(w.is_contiguous() for w in (att.k_proj.weight, mlp.down_proj.weight))  # narrowing: row-major

    def row_major_logits(model):  # a copy with every weight row-major: the same values, other GEMM calls
        plain = copy.deepcopy(model)
        for p in plain.parameters():
            p.data = p.data.contiguous()
        with torch.no_grad():
            return plain(ids)
    assert column_major(m) and column_major(back)
    with torch.no_grad():
        torch.testing.assert_close(back(ids), m(ids), atol=0, rtol=0)
    m.load_state_dict(tiny(5).state_dict())  # copies into the Parameters: the layout stays
    m = m.to(torch.float64)
    assert column_major(m)
    llama.apply_lora(m, rank=2)
    for mod in m.modules():
        if isinstance(mod, llama.LoRALinear):
            torch.nn.init.normal_(mod.lora_B, std=0.5)
    assert column_major(m)
    with torch.no_grad():
        torch.testing.assert_close(m(ids), row_major_logits(m), atol=1e-12, rtol=0)  # fp64, another GEMM order


def test_cpu_decode_fused_products_are_the_layers_weights_through_load_lora_and_dtype(monkeypatch):
    import cpu_decode
    m, other = tiny(4), tiny(5)
    ids = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        plain, want = m(ids), other(ids)
    cpu_decode.fuse(m)
    att = m.model.layers[0].self_attn
    buffer = att.project.args[2]  # fused_project(owner, names, packed, pointers, x)
    assert att.q_proj.weight.data_ptr() == buffer.data_ptr()  # a view into the buffer, not a copy

    def fused_logits():  # the logits with the layer-by-layer projections switched off: the one products ran
        with monkeypatch.context() as mp, torch.no_grad():
            for cls in (llama.Attention, llama.MLP):
                mp.setattr(cls, "project", lambda *a: pytest.fail("ran layer by layer"))
            return m(ids)
    torch.testing.assert_close(fused_logits(), plain, atol=1e-5, rtol=0)  # fp32, another GEMM blocking
    m(ids).sum().backward()  # autograd wants the weights' gradients: each layer runs on its own
    assert all(mod.weight.grad is not None for mod in m.modules() if isinstance(mod, torch.nn.Linear))
    m.load_state_dict(other.state_dict())  # copies into the Parameters, so into the buffers
    torch.testing.assert_close(fused_logits(), want, atol=1e-5, rtol=0)
    m = m.to(torch.float64)  # new tensors, no longer the buffers': layer by layer, never the stale buffer
    with torch.no_grad():
        torch.testing.assert_close(m(ids), want.double(), atol=1e-5, rtol=0)
        llama.apply_lora(m, rank=2)  # wrapped layers run on their own: the LoRA branch counts
        for mod in m.modules():
            if isinstance(mod, llama.LoRALinear):
                torch.nn.init.normal_(mod.lora_B, std=0.5)
        assert (m(ids) - want.double()).abs().max() > 0.1  # the LoRA branch moved the logits


def test_sample_temperature_and_nucleus():
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0]).expand(2000, 4)  # softmax: .03 .09 .24 .64
    g = torch.Generator().manual_seed(0)
    assert llama.sample(logits, 0.01, 1.0, g).eq(3).all()  # a low temperature sharpens towards the argmax
    assert set(llama.sample(logits, 1.0, 0.7, g).tolist()) == {2, 3}  # smallest prefix with mass >= 0.7


def test_check_state_dict_names_every_kind_of_mismatch_in_one_line():
    own = {"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(4)}
    llama.check_state_dict(own, {k: v.clone() for k, v in own.items()}, "x")  # equal key sets and shapes: silent
    with pytest.raises(ValueError) as e:
        llama.check_state_dict(own, {"a": torch.zeros(2), "b": torch.zeros(5), "d": torch.zeros(1)}, "f.safetensors")
    assert str(e.value) == "f.safetensors: missing c; unexpected d; wrong shape b (5,) (expected (3,))"


def test_lora_identity_merge_and_frozen_base(monkeypatch):
    m = tiny()
    ids = torch.randint(3, 97, (2, 10))
    base = m(ids)
    assert llama.apply_lora(m, rank=4, alpha=8) == 2 * 7
    torch.testing.assert_close(m(ids), base, atol=0, rtol=0)  # B = 0: exactly the base model
    m.train()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    m(ids, labels=ids).backward()
    plain = [p.grad.clone() for p in opt.param_groups[0]["params"]]
    opt.zero_grad()
    m.gradient_checkpointing = True
    calls, checkpoint = [], llama.checkpoint
    monkeypatch.setattr(llama, "checkpoint", lambda *a, **kw: calls.append(1) or checkpoint(*a, **kw))
    m(ids, labels=ids).backward()
    monkeypatch.undo()
    assert len(calls) == 2  # one checkpoint per layer
    for a, p in zip(plain, opt.param_groups[0]["params"]):  # recomputation runs the same ops: same grads
        torch.testing.assert_close(p.grad, a, atol=1e-6, rtol=0)
    assert all(p.grad is None for n, p in m.named_parameters() if "lora_" not in n)
    assert all(p.grad is not None for n, p in m.named_parameters() if "lora_" in n)
    opt.step()
    m.eval()
    unmerged = m(ids)
    assert not torch.allclose(unmerged, base)
    q, x = m.model.layers[0].self_attn.q_proj, torch.randn(3, 64)
    torch.testing.assert_close(q(x), x @ (q.weight + 8 / 4 * q.lora_B @ q.lora_A).T, atol=1e-6, rtol=0)  # alpha/r
    q = m.model.layers[0].self_attn.q_proj
    folded = q.weight + 8 / 4 * q.lora_B @ q.lora_A  # (out, in): W + (alpha / r) B A
    llama.merge_lora(m)
    llama.merge_lora(m)  # idempotent: the second call adds nothing
    torch.testing.assert_close(q.weight, folded, atol=1e-6, rtol=0)  # fp32 rounding of the product
    # merged W + BA vs W x + B A x: fp32 reassociation only
    torch.testing.assert_close(m(ids), unmerged, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = ["The quick brown fox jumps over the lazy dog.", "What is in the image? A red square.",
             conversation.SYSTEM_PROMPT, "USER: ASSISTANT:", "Answer with the option's letter 12345."] * 4
    return conversation.train_tokenizer(texts, str(tmp_path_factory.mktemp("tok") / "t.model"), 400), texts


def test_tokenizer_roundtrip_eos_and_determinism(tok, tmp_path):
    t, texts = tok
    assert (t.bos_id, t.eos_id, t.pad_id) == (1, 2, 0)
    for s in ["The lazy fox.\nÜber 42 ünïcode ✓", "  two spaces"]:
        assert t.decode(t.encode(s)) == s
    assert t.decode([conversation.IMAGE_TOKEN_INDEX] + t.encode("hi", bos=False)) == "hi"  # placeholder dropped
    ids = t.encode("hi</s>there")
    assert ids.count(2) == 1 and ids[0] == 1
    t2 = conversation.train_tokenizer(texts, str(tmp_path / "t2.model"), 400)
    assert open(t2.sp.serialized_model_proto and tmp_path / "t2.model", "rb").read() == t.sp.serialized_model_proto()


def pieces(t, ids):
    return "".join("<image>" if i == conversation.IMAGE_TOKEN_INDEX else t.sp.id_to_piece(i) for i in ids)


def test_image_first_is_the_one_image_normalisation():
    """LLaVA's preprocess_multimodal: `<image>` (anywhere, even twice) becomes one "<image>\n" prefix; idempotent."""
    assert conversation.image_first("What is this?\n<image>") == "<image>\nWhat is this?"
    assert conversation.image_first("<image> a <image>b ") == "<image>\na b"
    assert conversation.image_first(conversation.image_first("Q <image>")) == conversation.image_first("Q <image>")
    assert conversation.turn_texts([{"from": "human", "value": "Q\n<image>"}, {"from": "gpt", "value": "A"}])[0] == \
        conversation.image_first("Q\n<image>")
    conv = [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A <image>"}, {"from": "human", "value": "<image>\nR"},
            {"from": "gpt", "value": "B"}]
    assert conversation.turn_texts(conv) == ["Q", "A <image>", "<image>\nR", "B"]
    assert conversation.turn_texts(conv, image=True) == ["<image>\nQ", "A", "R", "B"]  # one image, at the front
    assert conversation.turn_texts(conv, image=False) == ["Q", "A", "R", "B"]


def test_vicuna_template_labels(tok):
    t, _ = tok
    conv = [{"from": "human", "value": "What is this?\n<image>"}, {"from": "gpt", "value": "A red square."},
            {"from": "human", "value": "And the fox?"}, {"from": "gpt", "value": "It jumps."}]
    ids, labels = conversation.encode_conversation(conv, t)
    assert len(ids) == len(labels) and ids.count(conversation.IMAGE_TOKEN_INDEX) == 1 and ids[0] == t.bos_id
    assert conversation.IGNORE_INDEX == llama.IGNORE_INDEX  # the labels' skip mark is the one the loss skips
    kept = [i for i, l in zip(ids, labels) if l != conversation.IGNORE_INDEX]
    assert all(l in (conversation.IGNORE_INDEX, i) for i, l in zip(ids, labels))
    assert pieces(t, kept) == "▁A▁red▁square.</s>▁It▁jumps.</s>"
    # chunk-wise around the image: the chunk after it gets its own dummy prefix "▁" (as LLaVA), and no
    # dummy prefix after </s> (HF legacy=False)
    rendered = (f"{conversation.SYSTEM_PROMPT} USER: <image>▁<0x0A>What is this? ASSISTANT: A red square.</s>"
                f"USER: And the fox? ASSISTANT: It jumps.</s>")
    assert pieces(t, ids) == "<s>▁" + rendered.replace(" ", "▁")
    p = conversation.encode_prompt("<image>\nWhat is this?", t)
    assert ids[:len(p)] == p  # the inference prompt is the training prefix up to "ASSISTANT:"
    pid, plab = conversation.encode_conversation(conv[:2], t, "plain")
    assert pid[:2] == [t.bos_id, conversation.IMAGE_TOKEN_INDEX] and plab[:2] == [-100, -100] and plab[2:] == pid[2:]
    assert t.decode(pid[2:]) == "A red square.\n" and t.eos_id not in pid


@pytest.mark.parametrize("pads", [slice(7, None), slice(0, 2)])
def test_label_logprobs_match_full_logits_and_empty_labels_give_zero_loss(pads):
    """Right padding (training: label_logprobs then runs plain causal attention) and left padding (the mask)."""
    from llama import IGNORE_INDEX, Llama, LlamaConfig
    torch.manual_seed(0)
    m = Llama(LlamaConfig.from_preset("tiny", vocab_size=64))
    ids = torch.randint(3, 64, (2, 9))
    labels = ids.clone()
    labels[0, :5] = IGNORE_INDEX
    labels[1, 1::2] = IGNORE_INDEX
    mask = torch.ones_like(ids)
    mask[1, pads] = 0
    labels[1, pads] = IGNORE_INDEX
    with torch.no_grad():
        logp = m(ids, attention_mask=mask).log_softmax(-1)                   # (B, T, V)
        got = m.label_logprobs(ids, attention_mask=mask, labels=labels)      # (B, T-1)
    ref = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0] * (labels[:, 1:] != IGNORE_INDEX)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)  # fp32: the head on selected rows vs all rows
    loss = m(ids, attention_mask=mask, labels=labels)
    assert loss.item() == pytest.approx(-ref.sum().item() / (labels[:, 1:] != IGNORE_INDEX).sum().item(), abs=1e-5)
    none = torch.full_like(ids, IGNORE_INDEX)  # a micro-batch whose labels were all cut: 0, finite, no gradient
    loss = m(ids, labels=none)
    loss.backward()
    assert loss.item() == 0.0 and all(p.grad is None or not p.grad.any() for p in m.parameters())
