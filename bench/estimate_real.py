"""What the real study costs on one GPU: wavlm-base-plus on UTS01-UTS03, the README's recipe
(stages 02-05), as arithmetic over counted work and measured rates.

Work is counted, not guessed: torch's FlopCounterMode runs wavlm-base-plus's architecture (a random
model of transformers' WavLMConfig() shape, 12 layers) on one stage 02 window and on one stage 03
training step at the paper's defaults (the CNN's output is kept from the first epoch, so a step
holds none of it), here on the CPU; ridge FLOPs follow from common.ridge_cv's operations. Rates
come from bench/gpu_check.sh's JSON (--gpu-check: features, training steps, ridge, stage 05), or
are an assumed fraction of the card's peak, printed as such.

    .venv/bin/python bench/estimate_real.py                         # assumed efficiencies, H100
    .venv/bin/python bench/estimate_real.py --gpu-check gpu_check.json [--before]
    .venv/bin/python bench/estimate_real.py --recipe authors        # the authors' choices

--recipe authors (docs/methods.md, "Beside the authors' code"): features from 4 s windows every
0.25 s (all stages), training steps of one 10-TR block, 20 epochs, each epoch's features of the
training and validation stories through a ridge (the linearized choice of epoch), the lab's
bootstrap ridge (3 draws, 10 alphas). Rates measured for this repository's step apply to theirs
in FLOPs. Their LayerDrop (each layer after the first skipped with probability 0.1 in training) is
not taken off: their steps cost up to a tenth less than counted; SpecAugment costs nothing.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
from lib import batching, plumbing  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--gpu-check", help="gpu_check.json measured on the GPU (else assumed efficiencies)")
p.add_argument("--before", action="store_true", help="with --gpu-check: the rates of the path before the batched step (1a7be3b)")
p.add_argument("--bf16-peak", type=float, default=989e12, help="dense bf16 FLOP/s (H100 SXM: 989e12)")
p.add_argument("--fp32-peak", type=float, default=67e12, help="FP32 FLOP/s without tensor cores (H100 SXM: 67e12)")
p.add_argument("--model-efficiency", type=float, default=0.15, help="assumed fraction of bf16 peak for WavLM")
p.add_argument("--ridge-efficiency", type=float, default=0.5, help="assumed fraction of fp32 peak for ridge")
p.add_argument("--epochs", type=int, default=10, help="stage 03 epochs (default: the script's 10)")
p.add_argument("--runs", type=int, default=9, help="single-subject stage 03 runs (default: the README's recipe: "
               "UTS01 3 seeds of whole-cortex LoRA and 3 of full fine-tuning, UTS02 and UTS03 one each, one AC "
               "run; every run is counted at the LoRA step's FLOPs, so full fine-tuning is underestimated)")
p.add_argument("--joint-runs", type=int, default=4, help="joint stage 03 runs (the recipe: UTS01-UTS03 together, "
               "and each pair that leaves one subject out): a step is a single run's, with one head per subject")
p.add_argument("--sweep-voxels", type=int, default=5000, help="stage 02's layer sweep (the recipe's --sweep-voxels)")
p.add_argument("--recipe", choices=["repo", "authors"], default="repo", help="whose choices (docs/methods.md)")
args = p.parse_args()
authors = args.recipe == "authors"
if authors and args.epochs == 10:
    args.epochs = 20  # theirs: 20, no early stop
plumbing.set_threads()

# ds003020, UTS01-UTS03: the same 84 stories for each subject (respdict.json), voxels per subject
counts = json.load(open(os.path.join(ROOT, "tests", "fixtures", "ds003020_respdict.json")))
audio_s = sum(counts.values()) * 2.0
val = ("fromboyhoodtofatherhood", "waitingtogo")
train_trs = sum(counts.values()) - counts["wheretheressmoke"] - sum(counts[s] for s in val)
voxels = [81126, 94251, 95556]

from transformers import WavLMConfig, WavLMModel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
torch.manual_seed(0)
cfg = WavLMConfig(layerdrop=0.0, apply_spec_augment=False)
model = common.make_lora_able(WavLMModel(cfg).eval())
model.freeze_feature_encoder()
window_s, per_window_s = (4.0, 0.25) if authors else (20.0, 4.0)  # theirs: one 4 s window every 0.25 s
with FlopCounterMode(display=False) as fc, torch.no_grad():  # one stage 02 window: 16 s context + 4 s kept
    model(torch.zeros(1, int(window_s * 16000)))
window_flops = fc.get_total_flops()
feat_flops_per_audio_s = window_flops / per_window_s  # each window's features cover per_window_s

# one step: 2 blocks of 32 TRs mid-story (windows of 4 s, the CNN's output already kept), tuned at layer
# 6; the authors': one block of 10 TRs from their 4 s windows every 0.25 s, at the same layer
lora = common.add_lora(model).train()
audio = torch.zeros(200 * 16000)
if authors:  # a shorter story: the CNN's output of its windows is made once, before the count
    story = batching.story_windows(model, audio[:60 * 16000], 11.0 + 2.0 * np.arange(20), 3.75, 0.25, "first")
    blocks, step_kw = [("s", 5, 15)], dict(norm="instance", history="zeros", floor=1e-10)
else:
    story = batching.story_windows(model, audio, 11.0 + 2.0 * np.arange(90))
    blocks, step_kw = [("s", 16, 48), ("s", 48, 80)], {}
with FlopCounterMode(display=False) as fc:
    x, _ = common.block_inputs(lora, {"s": story}, blocks, 6, **step_kw)
    x.float().pow(2).mean().backward()
step_flops = fc.get_total_flops()

measured = json.load(open(args.gpu_check)) if args.gpu_check else None
tag = "_before" if args.before else ""


def ridge_flops(n, p_, v, n_alphas=10 if authors else 13, folds=3 if authors else 5):
    """common.ridge_cv with the Gram path: X^T Y, per fold its downdate, the eigenbasis products and
    one p x p product per alpha, the final refit; the decompositions (float64) once per fold."""
    per_voxel = 2 * n * p_ * 3 + 2 * p_ * p_ * (folds * (1 + n_alphas) + 2)
    return per_voxel * v + (folds + 1) * 9 * p_ ** 3 + 2 * n * p_ * p_


if measured:
    feat_rate = measured[f"features_audio_s_per_s{tag}"]
    step_rate = measured[f"train_steps_per_s{tag}"]
    ridge_rate = ridge_flops(*measured["ridge_shape"]) / measured["ridge_s"]
    probe_rate = measured.get("stage05_audio_s_per_s")
    how = f"measured on {measured['device']} (bench/gpu_check.sh{', the path before the batched step' if tag else ''})"
else:
    feat_rate = args.model_efficiency * args.bf16_peak / feat_flops_per_audio_s
    step_rate = args.model_efficiency * args.bf16_peak / step_flops
    ridge_rate = args.ridge_efficiency * args.fp32_peak
    probe_rate = None
    how = (f"assumed {args.model_efficiency:.0%} of {args.bf16_peak / 1e12:.0f} TFLOP/s bf16, ridge "
           f"{args.ridge_efficiency:.0%} of {args.fp32_peak / 1e12:.0f} TFLOP/s fp32")

p_ = cfg.hidden_size * 4
steps_per_epoch = int(np.ceil(train_trs / 10)) if authors else int(np.ceil(train_trs / 32 / 2))
rows = []
# stage 02: features once for the 84 stories (shared by the subjects); 13 layers on the swept voxels, then all
t_feat = audio_s / feat_rate
t_sweep = sum(13 * ridge_flops(train_trs, p_, min(v, args.sweep_voxels)) + ridge_flops(train_trs, p_, v)
              for v in voxels) / ridge_rate
rows.append((f"02 features (84 stories, {window_s:g} s windows every {per_window_s:g} s)",
             f"{audio_s / 3600:.1f} h audio x {feat_flops_per_audio_s / 1e9:.0f} GFLOP/s-audio", t_feat))
rows.append((f"02 ridge: 13 layers x {args.sweep_voxels} voxels, refit x 3", "", t_sweep))
# stage 03: per run, epochs of training + per-epoch validation + linearized features and one ridge
t_train = args.epochs * steps_per_epoch / step_rate
# validation each epoch runs the training windows (4 s, no extra context): a fifth of stage 02's 20 s per 4 s;
# the authors' (linearized): every training and validation story's features, a ridge with fixed alphas
t_val = args.epochs * sum(counts[s] for s in val) * 2.0 / feat_rate * 0.2
if authors:
    fit_trs = train_trs + sum(counts[s] for s in val)
    t_val = (args.epochs + 1) * (fit_trs * 2.0 / feat_rate
                                 + (2 * train_trs * p_ * voxels[0] * 2 + 9 * p_ ** 3) / ridge_rate)
t_lin = audio_s / feat_rate + ridge_flops(train_trs, p_, voxels[0]) / ridge_rate
rows.append((f"03 one run: {args.epochs} epochs x {steps_per_epoch} steps", f"{step_flops / 1e12:.2f} TFLOP per step",
             t_train + t_val + t_lin))
rows.append((f"03 all {args.runs} runs", "", args.runs * (t_train + t_val + t_lin)))
# a joint run: the same steps (one forward feeds every head); linearized scoring on each subject it saw
t_joint = t_train + t_val + t_lin + 2 * ridge_flops(train_trs, p_, voxels[1]) / ridge_rate
rows.append((f"03 {args.joint_runs} joint runs (3 + 3 x 2 subjects' ridges)", "", args.joint_runs * t_joint))
t04 = (9 + 3 + 3) * ridge_flops(train_trs, p_, int(np.mean(voxels))) / ridge_rate  # features cached by 03
rows.append(("04 3 x 3 subjects + joint rows (features cached)", "15 ridge fits", t04))
t05 = 3 * audio_s / (probe_rate or feat_rate)  # every story, all layers, per model (measured: with its probes)
rows.append(("05 probes, 3 models", "measured rate" if probe_rate else "features only", t05))
total = sum(t for name, _, t in rows if "one run" not in name)
print(f"recipe: {args.recipe}" + (" (docs/methods.md)" if authors else ""))
print(f"wavlm-base-plus shape: {sum(q.numel() for q in model.parameters()) / 1e6:.1f}M parameters; rates {how}: "
      f"features {feat_rate:.0f} audio-s/s, training {step_rate:.2f} steps/s, ridge {ridge_rate / 1e12:.1f} TFLOP/s")
print(f"counted: one {window_s:g} s window {window_flops / 1e9:.0f} GFLOP; one training step {step_flops / 1e12:.2f} TFLOP"
      + (f" ({step_flops * step_rate / args.bf16_peak:.1%} of bf16 peak at that rate)" if measured else ""))
for name, arithmetic, t in rows:
    print(f"  {name:52s} {arithmetic:40s} {t / 60:7.1f} min")
print(f"  {'the recipe (stages 02-05)':52s} {'':40s} {total / 60:7.1f} min")
