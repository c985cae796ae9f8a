"""Where a stage 03 training step spends its time, from one run.

Target: >= 85% of a step in the WavLM forward + backward (the readout, Lanczos, loss and
data feeding must be cheap). Measured as 1 - (time of the same steps with WavLM's output replaced
by a precomputed tensor) / (time of the full steps). Also prints steps per second and peak memory.

    .venv/bin/python bench/finetune.py [--data data] [--steps 10] [--device cpu]
"""
import argparse
import os
import resource
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
from lib import batching, plumbing  # noqa: E402
from lib.study import load_study, load_subject  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--data", default="data")
p.add_argument("--steps", type=int, default=10)
p.add_argument("--model", default="tiny")
p.add_argument("--layer", type=int, default=None, help="default: the top layer")
p.add_argument("--device", default=None)
# stage 03's training settings (its flags, with its defaults but for the LoRA shape measured in RESULTS.md)
g = p.add_argument_group("stage 03's settings")
g.add_argument("--lora-rank", type=int, default=8)
g.add_argument("--lora-alpha", type=float, default=8)
g.add_argument("--lora-dropout", type=float, default=0.1)
g.add_argument("--lora-targets", nargs="+", default=["projection", "q_proj", "k_proj", "v_proj", "out_proj",
                                                      "intermediate_dense", "output_dense"])
g.add_argument("--bottleneck", type=int, default=100)
g.add_argument("--block-trs", type=int, default=32)
g.add_argument("--batch-blocks", type=int, default=2)
g.add_argument("--grad-clip", type=float, default=1.0)
g.add_argument("--train-context-s", type=float, default=0.0)
g.add_argument("--train-stride-s", type=float, default=4.0)
g.add_argument("--norm", default="block")
args = targs = p.parse_args()
plumbing.set_threads()
device = plumbing.pick_device(args.device)
study = load_study(args.data)
d = load_subject(args.data, study["subjects"][0], study)
model = common.add_lora(common.load_wavlm(args.model, 0, device), targs.lora_rank, targs.lora_alpha,
                        targs.lora_dropout, targs.lora_targets).train()
layer = args.layer if args.layer is not None else model.config.num_hidden_layers
n_vox = plumbing.array_shape(d, "test_resp")[1]
readout = common.make_readout(model.config.hidden_size * 4, {"s": n_vox}, targs.bottleneck).to(device)
opt = torch.optim.Adam([{"params": [q for q in model.parameters() if q.requires_grad], "lr": 1e-3},
                        {"params": readout.parameters(), "lr": 1e-3}])
stories = batching.load_stories(model, args.data, study["train"], device, targs.train_context_s, targs.train_stride_s)
blocks = [(s, i, min(len(stories[s]["tr_times"]), i + targs.block_trs)) for s in study["train"]
          for i in range(0, len(stories[s]["tr_times"]), targs.block_trs)]
order = np.random.default_rng(0).permutation(len(blocks))


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(k):
    """One optimizer step over batch_blocks blocks, as stage 03 takes it."""
    batch = [blocks[j] for j in order[k * targs.batch_blocks:(k + 1) * targs.batch_blocks]]
    opt.zero_grad()
    with plumbing.autocast(device):
        x, in_x = common.block_inputs(model, stories, batch, layer, norm=targs.norm)
        batch = [batch[j] for j in in_x]
        y = torch.cat([torch.as_tensor(d[f"resp_{s}"][i0:i1], device=device) for s, i0, i1 in batch])
        loss = common.blocks_loss(common.read_out(readout, x)["s"], y, [i1 - i0 for _, i0, i1 in batch])
    (loss / targs.batch_blocks).backward()
    torch.nn.utils.clip_grad_norm_([q for g in opt.param_groups for q in g["params"]], targs.grad_clip)
    opt.step()


n = min(args.steps, len(blocks) // targs.batch_blocks)
step(0)  # warm-up
sync()
t0 = time.perf_counter()
for k in range(n):
    step(k)
sync()
t_full = (time.perf_counter() - t0) / n

# the same steps with WavLM's output precomputed (leaf tensors that still take a gradient)
encode, frozen = batching.encode_windows, []
batching.encode_windows = lambda model, cnns, n_layers: frozen.append(encode(model, cnns, n_layers)) or frozen[-1]
with torch.no_grad(), plumbing.autocast(device):
    for k in range(n):
        common.block_inputs(model, stories, [blocks[j] for j in order[k * targs.batch_blocks:(k + 1) * targs.batch_blocks]],
                            layer, norm=targs.norm)
frozen = [[h.detach().requires_grad_() for h in states] for states in frozen]
calls = iter(range(len(frozen)))
batching.encode_windows = lambda model, cnns, n_layers: frozen[next(calls)]
sync()
t0 = time.perf_counter()
for k in range(n):
    step(k)
sync()
t_rest = (time.perf_counter() - t0) / n

peak = (torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)
print(f"model {args.model}, layer {layer}, device {device}, {targs.batch_blocks} blocks of {targs.block_trs} TRs"
      f" per step, torch threads {torch.get_num_threads()}")
print(f"step: {t_full:.3f} s ({1 / t_full:.2f} steps/s); without the WavLM forward+backward: {t_rest:.4f} s")
print(f"fraction of a step in WavLM forward + backward: {(t_full - t_rest) / t_full * 100:.1f}%  (target >= 85%)")
print(f"peak memory: {peak:.2f} GB ({'GPU allocated' if device.type == 'cuda' else 'process max RSS'})")
