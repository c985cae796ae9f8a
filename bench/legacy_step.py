"""Stage 03's training step as it was before the batched step (commit 0213a81), kept for one purpose:
the before/after pair of bench/dispatch_count.py (this CPU) and bench/gpu_check.py (a lent GPU).
Each block ran on its own (its audio segment cut, ~3 forwards of 8 windows, its own backward), the
frozen CNN ran on every window of group-norm models, the position bias was rebuilt and repeated in
every forward, and every block's loss was read back to the host. Delete this file once a GPU has
measured the pair (bench/RESULTS.md says when).

    legacy_step(model, readout, opt, stories, resp, blocks, layer)   # one optimizer step, as before
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from lib import batching, plumbing  # noqa: E402

SR, FRAME_HOP, FRAME_WIN = 16000, 320, 400


def legacy_attention_forward(self, hidden_states, attention_mask=None, position_bias=None, index=0, **kwargs):
    """The attention as it was: the bias rebuilt by transformers' compute_bias in every forward and
    repeated to batch x heads x T x T."""
    bsz, tgt_len, _ = hidden_states.size()
    if position_bias is None:
        position_bias = self.compute_bias(tgt_len, tgt_len)
        position_bias = position_bias.unsqueeze(0).repeat(bsz, 1, 1, 1).view(bsz * self.num_heads, tgt_len, tgt_len)
    gated = hidden_states.view(hidden_states.shape[:-1] + (self.num_heads, -1)).permute(0, 2, 1, 3)
    gate_a, gate_b = torch.sigmoid(self.gru_rel_pos_linear(gated).view(gated.shape[:-1] + (2, 4)).sum(-1)).chunk(2, -1)
    gate = gate_a * (gate_b * self.gru_rel_pos_const - 1.0) + 2.0
    bias = (gate.view(bsz * self.num_heads, -1, 1) * position_bias).view(bsz, self.num_heads, tgt_len, tgt_len)
    q, k, v = (proj(hidden_states).view(bsz, tgt_len, self.num_heads, self.head_dim).transpose(1, 2)
               for proj in (self.q_proj, self.k_proj, self.v_proj))
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=bias.to(q.dtype), dropout_p=self.dropout if self.training else 0.0)
    return self.out_proj(out.transpose(1, 2).reshape(bsz, tgt_len, self.embed_dim)), None, position_bias


def use_legacy_attention(model):
    import types
    for module in model.modules():
        if type(module).__name__ == "WavLMAttention":
            module.forward = types.MethodType(legacy_attention_forward, module)
    return model


def legacy_hidden_states(model, cnn, n_layers):
    m = batching.base_wavlm(model)
    enc, (h, _) = m.encoder, m.feature_projection(cnn)
    h = h + enc.pos_conv_embed(h)
    states, bias = [enc.dropout(enc.layer_norm(h))], None
    for layer in enc.layers[:n_layers]:
        h, bias = layer(states[-1], position_bias=bias)
        states.append(h)
    return states


def legacy_extract(model, audio, layer, context_s, stride_s, cnn=None, batch_size=8):
    """extract_features with grad, 8 windows per forward, the CNN per window for group-norm models."""
    m = batching.base_wavlm(model)
    s_f, c_f = int(round(stride_s * SR / FRAME_HOP)), int(round(context_s * SR / FRAME_HOP))
    F = batching.n_frames(len(audio))
    wins = [(max(0, k0 - c_f), k0, min(F, k0 + s_f)) for k0 in range(0, F, s_f)]
    groups = {}
    for w in wins:
        groups.setdefault((w[2] - w[0], w[2] - w[1]), []).append(w)
    batches = [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
    out, index = [None] * len(wins), {w: i for i, w in enumerate(wins)}
    with plumbing.autocast(audio.device):
        for batch in batches:
            if cnn is not None:
                c = torch.stack([cnn[a:b] for a, _, b in batch])
            else:
                c = batching.cnn_features(m, torch.stack([audio[a * FRAME_HOP:(b - 1) * FRAME_HOP + FRAME_WIN]
                                                        for a, _, b in batch]))
            states, keep = legacy_hidden_states(model, c, layer), batch[0][2] - batch[0][1]
            h = states[layer][:, -keep:].float()
            for j, w in enumerate(batch):
                out[index[w]] = h[j]
    return torch.cat(out), (np.arange(F) * FRAME_HOP + FRAME_WIN / 2) / SR


def legacy_predict_block(model, readout, story, i0, i1, layer, context_s=0.0, stride_s=4.0, delays=(1, 2, 3, 4)):
    tr = np.mean(np.diff(story["tr_times"]))
    before, after = max(0, max(delays)), max(0, -min(delays))
    grid = story["tr_times"][0] + tr * np.arange(i0 - before, i1 + after)
    half = 3 * tr
    step = int(round(stride_s * SR))
    ctx = int(np.ceil(context_s / stride_s)) * step
    a = max(0, int((grid[0] - half) * SR) // step * step - ctx)
    b = min(len(story["audio"]), -(-int((grid[-1] + half) * SR + FRAME_WIN) // step) * step + FRAME_WIN)
    cnn = story.get("cnn")
    cnn = cnn.get(0) if isinstance(cnn, dict) else cnn  # the story's own frame grid
    if cnn is not None:
        cnn = cnn[a // FRAME_HOP:a // FRAME_HOP + batching.n_frames(b - a)]
    frames, times = legacy_extract(model, story["audio"][a:b], layer, context_s, stride_s, cnn)
    x = common.lanczos_interp(frames, times + a / SR, grid)
    x = (x - x.mean(0)) / (x.std(0) + 1e-5)
    x = common.make_delayed(x, delays)[before:len(grid) - after]
    return common.read_out(readout, x)["s"] if isinstance(readout, torch.nn.ModuleDict) else readout(x)


def legacy_step(model, readout, opt, stories, resp, blocks, layer, block_trs=32, grad_clip=1.0):
    """One optimizer step as stage 03 took it: each block forward and backward on its own."""
    opt.zero_grad()
    losses = []
    for s, i0 in blocks:
        i1 = min(len(stories[s]["tr_times"]), i0 + block_trs)
        with plumbing.autocast(stories[s]["audio"].device):
            pred = legacy_predict_block(model, readout, stories[s], i0, i1, layer).float()
        loss = common.spatial_corr_loss(pred, resp[s][i0:i1])
        (loss / len(blocks)).backward()
        losses.append(loss.item())
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], grad_clip)
    opt.step()
    return float(np.mean(losses))
