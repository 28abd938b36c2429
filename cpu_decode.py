"""Faster CPU decoding for llama.py's Llama: q/k/v, and gate/up, of each block as one product each.

A decode step multiplies one row by every weight matrix, so it is bound by how fast the products
stream the weights from memory. llama.py holds widening weights column-major (Llama._column_major);
fuse(model) also lays the q/k/v weights of a block, and its gate/up weights, side by side as column
blocks of one buffer (C, sum of out): one product x @ buffer streams a whole group in one pass instead
of several small ones. Narrow layers gain most (SmolLM2's k/v are 192 wide; docs/speed.md). The
Parameters become views into the buffer, so names, shapes, values and saved files stay, and
optimizers, load_state_dict and LoRA merges write into it.

    model = cpu_decode.fuse(Llama.from_pretrained(path))  # after the last .to(): it copies weights

A group runs as llama.py's separate layers where one product would skip something: a LoRA wrapper,
autograd wanting a weight's gradient, or weights no longer in the buffer (a .to() after fuse).
"""
import functools

import torch
import torch.nn as nn


def fuse(model):
    """model: a Llama on CPU -> the same model, each block's q/k/v and gate/up products fused."""
    for block in model.model.layers:
        fuse_group(block.self_attn, ("q_proj", "k_proj", "v_proj"))
        fuse_group(block.mlp, ("gate_proj", "up_proj"))
    return model


def fuse_group(owner, names):
    """Makes the weights of owner's layers `names` column blocks of one buffer (C, sum of out), and
    owner.project (which llama.py's Attention and MLP call) one product with it."""
    weights = [getattr(owner, n).weight for n in names]
    if weights[0].device.type != "cpu" or len({w.dtype for w in weights}) > 1:
        return
    packed = torch.cat([w.data.t() for w in weights], dim=1)  # (C, sum of out), contiguous
    col = 0
    for w in weights:
        w.data = packed[:, col:col + w.shape[0]].t()  # (out, in), a view into the buffer
        col += w.shape[0]
    pointers = [w.data_ptr() for w in weights]
    owner.project = functools.partial(fused_project, owner, names, packed, pointers)


def fused_project(owner, names, packed, pointers, x):
    """x (B, T, C) -> the outputs of owner's layers `names`: x @ packed split by layer, or each layer
    on its own (the class's project) where the one product would skip a LoRA branch or a gradient, or
    where the weights are no longer the buffer's."""
    layers = [getattr(owner, n) for n in names]
    for m, p in zip(layers, pointers):
        grad = m.weight.requires_grad and torch.is_grad_enabled()
        if type(m) is not nn.Linear or m.weight.data_ptr() != p or grad:
            return type(owner).project(owner, x)
    return (x @ packed).split([m.out_features for m in layers], dim=-1)
