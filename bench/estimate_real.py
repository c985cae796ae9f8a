"""What the real study costs on one GPU: wavlm-base-plus on UTS01-UTS03, stages 02-05, as arithmetic.

FLOPs are counted, not guessed: torch's FlopCounterMode runs wavlm-base-plus's architecture (a random
model of transformers' WavLMConfig() shape, 12 layers) on one stage 02 window and on one stage 03
training step at the paper's defaults, here on the CPU. Ridge FLOPs follow from common.ridge_cv's
operations. Throughput is then either measured (--gpu-check: bench/gpu_check.sh's JSON from a GPU) or
an assumed fraction of the card's peak, printed as such.

    .venv/bin/python bench/estimate_real.py                         # assumed efficiencies, H100
    .venv/bin/python bench/estimate_real.py --gpu-check gpu_check.json
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from lib import plumbing  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--gpu-check", help="gpu_check.json measured on the GPU (else assumed efficiencies)")
p.add_argument("--bf16-peak", type=float, default=989e12, help="dense bf16 FLOP/s (H100 SXM: 989e12)")
p.add_argument("--fp32-peak", type=float, default=67e12, help="FP32 FLOP/s without tensor cores (H100 SXM: 67e12)")
p.add_argument("--model-efficiency", type=float, default=0.15, help="assumed fraction of bf16 peak for WavLM")
p.add_argument("--ridge-efficiency", type=float, default=0.5, help="assumed fraction of fp32 peak for ridge")
p.add_argument("--epochs", type=int, default=10, help="stage 03 epochs (default: the script's 10)")
p.add_argument("--runs", type=int, default=9, help="stage 03 runs (default: the README's recipe: UTS01 3 seeds of "
               "whole-cortex LoRA and 3 of full fine-tuning, UTS02 and UTS03 one each, one AC run; every run is "
               "counted at the LoRA step's FLOPs, so the 3 full fine-tuning runs are underestimated)")
args = p.parse_args()
plumbing.set_threads()

# ds003020, UTS01-UTS03: the same 84 stories for each subject (respdict.json), voxels per subject
counts = json.load(open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                     "tests", "fixtures", "ds003020_respdict.json")))
audio_s = sum(counts.values()) * 2.0
train_trs = sum(counts.values()) - counts["wheretheressmoke"] - counts["fromboyhoodtofatherhood"] - counts["waitingtogo"]
voxels = [81126, 94251, 95556]

from transformers import WavLMConfig, WavLMModel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
torch.manual_seed(0)
cfg = WavLMConfig()
model = common.make_lora_able(WavLMModel(cfg).eval())
model.freeze_feature_encoder()
with FlopCounterMode(display=False) as fc, torch.no_grad():  # one stage 02 window: 16 s context + 4 s kept
    model(torch.zeros(1, 20 * 16000))
window_flops = fc.get_total_flops()
feat_flops_per_audio_s = window_flops / 4.0  # each window yields 4 s of features

lora = common.add_lora(model)  # the paper's q/k/v, rank 4
lora.train()
audio = torch.zeros(2, 84 * 16000)  # one step: 2 blocks of 32 TRs, ~84 s of audio each (stage 03)
with FlopCounterMode(display=False) as fc:
    h = common.extract_features(lora, audio[0], layers=[6], context_s=0.0, stride_s=4.0, grad=True)[0][0]
    h.float().pow(2).mean().backward()
step_flops = 2 * fc.get_total_flops()

measured = json.load(open(args.gpu_check)) if args.gpu_check else None
if measured:
    feat_rate = measured["features_audio_s_per_s"]
    step_rate = measured["train_steps_per_s"]
    how = f"measured on {measured['device']} (bench/gpu_check.sh)"
else:
    feat_rate = args.model_efficiency * args.bf16_peak / feat_flops_per_audio_s
    step_rate = args.model_efficiency * args.bf16_peak / step_flops
    how = f"assumed {args.model_efficiency:.0%} of {args.bf16_peak / 1e12:.0f} TFLOP/s bf16"


def ridge_flops(n, p_, v, n_alphas=13, folds=5):
    """common.ridge_cv with the Gram path: X^T Y, per fold its downdate, the eigenbasis products and
    one p x p product per alpha, the final refit; the decompositions (float64) once per fold."""
    per_voxel = 2 * n * p_ * 3 + 2 * p_ * p_ * (folds * (1 + n_alphas) + 2)
    return per_voxel * v + (folds + 1) * 9 * p_ ** 3 + 2 * n * p_ * p_


ridge_rate = args.ridge_efficiency * args.fp32_peak
p_ = cfg.hidden_size * 4
steps_per_epoch = int(np.ceil(train_trs / 32 / 2))
rows = []
# stage 02: features once for the 84 stories (shared by the subjects), 13 layers of ridge per subject
t_feat = audio_s / feat_rate
t_sweep = sum(ridge_flops(train_trs, p_, v) for v in voxels) * 13 / ridge_rate
rows.append(("02 features (84 stories, 16 s / 4 s windows)", f"{audio_s / 3600:.1f} h audio x {feat_flops_per_audio_s / 1e9:.0f} GFLOP/s-audio", t_feat))
rows.append(("02 ridge, 13 layers x 3 subjects", f"{ridge_flops(train_trs, p_, voxels[0]) / 1e12:.0f} TFLOP per layer (UTS01)", t_sweep))
# stage 03: per run, epochs of training + per-epoch validation + linearized features and one ridge
t_train = args.epochs * steps_per_epoch / step_rate
# validation each epoch runs the training windows (4 s, no extra context): a fifth of stage 02's 20 s per 4 s
t_val = args.epochs * (counts["fromboyhoodtofatherhood"] + counts["waitingtogo"]) * 2.0 / feat_rate * 0.2
t_lin = audio_s / feat_rate + ridge_flops(train_trs, p_, voxels[0]) / ridge_rate
rows.append((f"03 one run: {args.epochs} epochs x {steps_per_epoch} steps", f"{step_flops / 1e12:.1f} TFLOP per step", t_train + t_val + t_lin))
rows.append((f"03 all {args.runs} runs", "", args.runs * (t_train + t_val + t_lin)))
t04 = 9 * ridge_flops(train_trs, p_, int(np.mean(voxels))) / ridge_rate  # features cached by stage 03
rows.append(("04 3 x 3 subjects (features cached by 03)", "9 ridge fits", t04))
t05 = 3 * audio_s / feat_rate  # every story's features, all layers, per model (the ridge probes are small)
rows.append(("05 probes, 3 models", "", t05))
total = t_feat + t_sweep + args.runs * (t_train + t_val + t_lin) + t04 + t05
print(f"wavlm-base-plus shape: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; "
      f"throughput {how}: features {feat_rate:.0f} audio-s/s, training {step_rate:.2f} steps/s; "
      f"ridge at {args.ridge_efficiency:.0%} of {args.fp32_peak / 1e12:.0f} TFLOP/s fp32")
print(f"counted: one 20 s window {window_flops / 1e9:.0f} GFLOP; one training step {step_flops / 1e12:.2f} TFLOP")
for name, arithmetic, t in rows:
    print(f"  {name:48s} {arithmetic:42s} {t / 60:7.1f} min")
print(f"  {'whole study':48s} {'':42s} {total / 60:7.1f} min")
