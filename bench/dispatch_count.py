"""Operations dispatched per stage 03 training step and per audio-second of features, before and
after the batched step (1a7be3b), counted on this CPU (a GPU launches about one kernel per
operation, at ~10-20 us each: the count bounds a step's speed when the card waits on the host).

The setting: wavlm-base-plus's architecture (transformers' WavLMConfig(), random weights) with 4
layers, LoRA r4 on q/k/v, tuned at hidden state 2, two 150 s training stories, blocks of 32 TRs,
two per step. An operation is one call through torch's dispatcher (views
included), counted with a TorchDispatchMode from the optimizer's zero_grad to its step.

    .venv/bin/python bench/dispatch_count.py          # about 2 minutes on 2 cores
"""
import os
import sys
import time

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from bench.legacy_step import legacy_extract, legacy_step, use_legacy_attention  # noqa: E402
from lib import batching, plumbing  # noqa: E402


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def counted(fn):
    with Count() as c:
        t0 = time.time()
        out = fn()
    return c.n, time.time() - t0, out


def setup(legacy):
    """The model, readout, optimizer and stories of the setting, the same seeds for both paths."""
    from transformers import WavLMConfig, WavLMModel
    torch.manual_seed(0)
    base = WavLMModel(WavLMConfig(num_hidden_layers=4, layerdrop=0.0, apply_spec_augment=False))
    base.freeze_feature_encoder()
    base = common.make_lora_able(base).eval()
    if legacy:
        use_legacy_attention(base)
    model = common.add_lora(base).train()
    rng = np.random.default_rng(0)
    stories = {}
    for s in ("story00", "story01"):
        audio = torch.tensor(rng.standard_normal(150 * 16000).astype(np.float32) * 0.1)
        stories[s] = batching.story_windows(base, audio, 11.0 + 2.0 * np.arange(70))
        if legacy:
            stories[s]["window_cnn"] = None
    resp = {s: torch.randn(70, 500) for s in stories}
    readout = common.make_readout(768 * 4, {"s": 500}, 100)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad] + list(readout.parameters()), lr=1e-4,
                           fused=not legacy)  # stage 03's optimizer: one fused kernel
    blocks = [(s, i, min(70, i + 32)) for s in stories for i in range(0, 70, 32)]
    return model, readout, opt, stories, resp, blocks


def new_step(model, readout, opt, stories, resp, batch, layer=2):
    """Stage 03's step (03_finetune_lora.py train, one subject): its blocks in one forward, one backward."""
    opt.zero_grad()
    x, in_x = common.block_inputs(model, stories, batch, layer)
    batch = [batch[j] for j in in_x]
    rows, preds = [i1 - i0 for _, i0, i1 in batch], common.read_out(readout, x)
    ys = {"s": torch.cat([resp[s][i0:i1] for s, i0, i1 in batch])}
    loss = sum(common.blocks_loss(preds[subj], ys[subj], rows) for subj in ys) / len(ys)
    (loss / 2).backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()
    return loss.detach()


def main():
    plumbing.set_threads()
    rows = {}
    for name, legacy in (("before (per block, 0213a81)", True), ("after (one forward per step)", False)):
        model, readout, opt, stories, resp, blocks = setup(legacy)
        counts, times = [], []
        for k in range(0, len(blocks), 2):  # every step of an epoch: full blocks and story ends
            batch = blocks[k:k + 2]
            if legacy:
                n, t, _ = counted(lambda: legacy_step(model, readout, opt, stories, resp,
                                                      [(s, i0) for s, i0, _ in batch], 2))
            else:
                n, t, _ = counted(lambda: new_step(model, readout, opt, stories, resp, batch))
            counts.append(n)
            times.append(t)
        audio = stories["story00"]["audio"][:60 * 16000]
        with torch.no_grad():
            if legacy:
                feat_n, feat_t, _ = counted(lambda: legacy_extract(model, audio, 4, 16.0, 4.0))
            else:
                feat_n, feat_t, _ = counted(lambda: common.extract_features(model, audio, layers=[4]))
        rows[name] = (counts, times, feat_n / 60, feat_t)
        print(f"{name}: operations per step {counts} (mean {np.mean(counts):.0f}; steps after the first: "
              f"{np.mean(counts[1:]):.0f}), {np.mean(times):.1f} s per step on this CPU; features (16 s context, "
              f"4 s stride, 60 s of audio): {feat_n / 60:.0f} operations per audio-second, {feat_t:.1f} s", flush=True)
    (b, a) = rows.values()
    print(f"ratio before/after: operations per step {np.mean(b[0]) / np.mean(a[0]):.1f}x "
          f"(after the first step {np.mean(b[0][1:]) / np.mean(a[0][1:]):.1f}x), per audio-second of features "
          f"{b[2] / a[2]:.1f}x; CPU time per step {np.mean(b[1]) / np.mean(a[1]):.2f}x")


if __name__ == "__main__":
    main()
