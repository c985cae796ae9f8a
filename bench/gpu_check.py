"""One prepared GPU check: the CUDA tests, stages 02 and 03 on cuda, and the throughput figures the
README's "What real data needs" estimate is built from. Run by bench/gpu_check.sh (see there).

    python3 bench/gpu_check.py --out $OUT                     # on a GPU: wavlm-base-plus's shape, 12 layers
    python3 bench/gpu_check.py --device cpu --size tiny --out /tmp/gc   # the same steps, tiny, on CPU

Writes <out>/gpu_check.json:
  features_audio_s_per_s   stage 02's feature extraction (16 s context, 4 s stride), audio seconds per second
  train_audio_s_per_s, train_steps_per_s   stage 03's training steps (paper defaults: LoRA r4 on q/k/v,
                           blocks of 32 TRs, 2 per step); a block reads ~84 s of audio (its 32 TRs,
                           4 delays and 3 TRs of Lanczos reach each side)
  train_flops_per_step     counted by torch's FlopCounterMode on one step (forward + backward)
  bf16_peak_fraction       achieved FLOP/s over the card's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s)
  peak_gpu_memory_gb       this process: feature extraction and training at the paper's defaults
  stage02_s, stage03_s, tests_rc, device
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
from lib import plumbing  # noqa: E402

BF16_PEAK = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--device", default="cuda")
p.add_argument("--size", choices=["full", "tiny"], default="full",
               help="full: WavLMConfig() (wavlm-base-plus's shape, 12 layers, random); tiny: the tiny config")
p.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
p.add_argument("--steps", type=int, default=20, help="training steps to time")
p.add_argument("--skip-tests", action="store_true")
args = p.parse_args()
os.makedirs(args.out, exist_ok=True)
import torch  # noqa: E402

dev = torch.device(args.device)
out = dict(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", size=args.size,
           torch=torch.__version__)
py = sys.executable


def timed(cmd, log):
    t0 = time.time()
    with open(os.path.join(args.out, log), "w") as f:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    print(f"  {' '.join(os.path.basename(c) for c in cmd[1:3])}: rc {rc}, {time.time() - t0:.1f} s", flush=True)
    return rc, round(time.time() - t0, 1)


def save():
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(out, f, indent=1)


# 1. the CUDA tests (they skip on a machine without CUDA)
if not args.skip_tests:
    out["tests_rc"], out["tests_s"] = timed([py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                             "tests/test_cuda.py"], "tests.log")
    save()

# 2. a random model of the chosen shape, saved as a folder: the path a real checkpoint takes
from transformers import WavLMConfig, WavLMModel  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402
hf_logging.disable_progress_bar()
folder = os.path.join(args.out, "model")
cfg = WavLMConfig() if args.size == "full" else common.tiny_config()
torch.manual_seed(0)
WavLMModel(cfg).save_pretrained(folder)
out["model_params_m"] = round(sum(p.numel() for p in WavLMModel(cfg).parameters()) / 1e6, 1)

# 3. a small simulated study, then stage 02 and one epoch of stage 03 (paper defaults) on the device
data, results, ckpt = (os.path.join(args.out, x) for x in ("data", "results", "checkpoints"))
# tiny: the smallest study with whole 32-TR training blocks (80 s stories), and 4 s windows of context
study = [] if args.size == "full" else ["--n-subjects", "1", "--n-voxels", "50", "--n-train-stories", "2",
                                        "--n-val-stories", "1", "--story-seconds", "80", "--test-seconds", "40"]
window = [] if args.size == "full" else ["--context-s", "4"]
rc, out["stage01_s"] = timed([py, "01_prepare_data.py", "--data", data, *study], "stage01.log")
io = ["--data", data, "--results", results, "--device", args.device]
out["stage02_rc"], out["stage02_s"] = timed([py, "02_baseline_ridge.py", *io, "--model", folder, *window],
                                             "stage02.log")
out["stage03_rc"], out["stage03_s"] = timed([py, "03_finetune_lora.py", *io, "--checkpoints", ckpt,
                                             "--subject", "sim01", "--epochs", "1"], "stage03.log")
save()

# 4. throughput, measured in this process after a warm-up
st = common.load_study(data)


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


model = common.load_wavlm(folder, device=dev)
story = plumbing.load_npz(os.path.join(data, "stories", f"{st['train'][0]}.npz"))
audio = torch.as_tensor(story["audio"], device=dev)
common.extract_features(model, audio[:16000 * 30])  # warm-up
sync()
t0 = time.time()
common.extract_features(model, audio)
sync()
out["features_audio_s_per_s"] = round(len(story["audio"]) / 16000 / (time.time() - t0), 1)

# stage 03's defaults (the paper's): LoRA rank 4, alpha 4, dropout 0.1 on q/k/v; bottleneck 100; 4 s windows
s03args = argparse.Namespace(lora_rank=4, lora_alpha=4, lora_dropout=0.1, lora_targets=["q_proj", "k_proj", "v_proj"],
                             bottleneck=100, train_context_s=0.0, train_stride_s=4.0, norm="block")
model = common.add_lora(model, s03args.lora_rank, s03args.lora_alpha, s03args.lora_dropout, s03args.lora_targets)
d = common.load_subject(data, "sim01", st)
layer = cfg.num_hidden_layers // 2
readout = common.make_readout(cfg.hidden_size * 4, plumbing.array_shape(d, "test_resp")[1], s03args.bottleneck).to(dev)
opt = torch.optim.Adam([p_ for p_ in model.parameters() if p_.requires_grad] + list(readout.parameters()), lr=1e-4)
stories = common.load_stories(model, data, st["train"], dev)
resp = {s: torch.as_tensor(d[f"resp_{s}"], device=dev) for s in st["train"]}
blocks = [(s, i) for s in st["train"] for i in range(0, len(stories[s]["tr_times"]) - 31, 32)]
model.train()


def step(k):
    opt.zero_grad()
    secs = 0.0
    for s, i0 in blocks[(2 * k) % len(blocks):(2 * k) % len(blocks) + 2]:
        with plumbing.autocast(dev):
            pred = common.predict_block(model, readout, stories[s], i0, i0 + 32, layer, s03args).float()
        common.spatial_corr_loss(pred, resp[s][i0:i0 + 32]).backward()
        secs += (32 + 4 + 6) * 2.0  # audio a block reads: its TRs, 4 delays, 3 TRs of Lanczos each side
    opt.step()
    return secs


from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
with FlopCounterMode(display=False) as counter:
    step(0)
out["train_flops_per_step"] = float(counter.get_total_flops())
sync()
t0, secs = time.time(), 0.0
for k in range(1, args.steps + 1):
    secs += step(k)
sync()
elapsed = time.time() - t0
out["train_steps_per_s"] = round(args.steps / elapsed, 2)
out["train_audio_s_per_s"] = round(secs / elapsed, 1)
achieved = out["train_flops_per_step"] * args.steps / elapsed
out["train_tflops"] = round(achieved / 1e12, 2)
peak = next((v for k, v in BF16_PEAK.items() if k in out["device"]), None)
out["bf16_peak_fraction"] = round(achieved / peak, 3) if peak else None
out["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated(dev) / 1e9, 2) if dev.type == "cuda" else None
save()
print(json.dumps(out, indent=1))
