"""One prepared GPU check: the CUDA tests, stages 01-03 and 05 on the device, and the rates
bench/estimate_real.py turns into the real study's time, each measured after a warm-up, with the
path before the batched step (1a7be3b) beside the new one (bench/legacy_step.py) in the same run.
Run by bench/gpu_check.sh (see there).

    python3 bench/gpu_check.py --out $OUT                     # on a GPU: wavlm-base-plus's shape, 12 layers
    python3 bench/gpu_check.py --device cpu --size tiny --out /tmp/gc   # the same steps, tiny, on CPU

Writes <out>/gpu_check.json after every step (a timeout keeps what was measured):
  tests_rc, stage0N_rc, stage0N_s      the CUDA tests; stages 01-03 and 05 on a small simulated study
  features_audio_s_per_s[_before]      stage 02's feature extraction (16 s context, 4 s stride, every
                                       layer) of one story, audio seconds per second
  train_steps_per_s[_before]           stage 03's step at the paper's defaults (LoRA r4 on q/k/v,
                                       blocks of 32 TRs, 2 per step, tuned at the middle layer)
  train_flops_per_step[_before]        counted by torch's FlopCounterMode on one step (the new step
                                       has no CNN in it: its output is kept from the first epoch)
  bf16_peak_fraction[_before]          achieved FLOP/s over the card's dense bf16 peak
  train_steps_per_s_compiled, compile_s   the same step with --compile (torch.compile, CUDA graphs)
  ridge_s, ridge_shape                 common.ridge_cv at UTS01's shape (27,000 TRs x 3,072 features x
                                       81,126 voxels; --size tiny: 2,000 x 256 x 3,000), on the device
  stage05_audio_s_per_s                stage 05 (two models) over the study's audio, per second
  peak_gpu_memory_gb                   this process
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
from bench.legacy_step import legacy_extract, legacy_step, use_legacy_attention  # noqa: E402
from lib import batching, plumbing  # noqa: E402
from lib.study import load_study, load_subject  # noqa: E402

BF16_PEAK = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--device", default="cuda")
p.add_argument("--size", choices=["full", "tiny"], default="full",
               help="full: WavLMConfig() (wavlm-base-plus's shape, 12 layers, random); tiny: the tiny config")
p.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
p.add_argument("--steps", type=int, default=20, help="training steps to time, each path")
p.add_argument("--skip-tests", action="store_true")
p.add_argument("--skip-compile", action="store_true")
args = p.parse_args()
os.makedirs(args.out, exist_ok=True)
import torch  # noqa: E402

dev = torch.device(args.device)
out = dict(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", size=args.size,
           torch=torch.__version__)
py = sys.executable
full = args.size == "full"


def timed(cmd, log):
    t0 = time.time()
    with open(os.path.join(args.out, log), "w") as f:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    print(f"  {' '.join(os.path.basename(c) for c in cmd[1:3])}: rc {rc}, {time.time() - t0:.1f} s", flush=True)
    return rc, round(time.time() - t0, 1)


def save():
    if dev.type == "cuda":
        out["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated(dev) / 1e9, 2)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(out, f, indent=1)


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


def rate(fn, n):
    """Calls of fn per second over n calls, after one warm-up call."""
    fn(0)
    sync()
    t0 = time.time()
    for k in range(1, n + 1):
        fn(k)
    sync()
    return n / (time.time() - t0)


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
cfg = WavLMConfig() if full else common.tiny_config()
torch.manual_seed(0)
WavLMModel(cfg).save_pretrained(folder)
out["model_params_m"] = round(sum(p.numel() for p in WavLMModel(cfg).parameters()) / 1e6, 1)

# 3. a small simulated study, then stages 02, 03 (one epoch, paper defaults) and 05 on the device
data, results, ckpt = (os.path.join(args.out, x) for x in ("data", "results", "checkpoints"))
# tiny: the smallest study with whole 32-TR training blocks (80 s stories), and 4 s windows of context
study = (["--n-subjects", "1", "--n-train-stories", "4"] if full else
         ["--n-subjects", "1", "--n-voxels", "50", "--n-train-stories", "2", "--n-val-stories", "1",
          "--story-seconds", "80", "--test-seconds", "40"])
window = [] if full else ["--context-s", "4"]
out["stage01_rc"], out["stage01_s"] = timed([py, "01_prepare_data.py", "--data", data, *study], "stage01.log")
io = ["--data", data, "--results", results, "--device", args.device]
out["stage02_rc"], out["stage02_s"] = timed([py, "02_baseline_ridge.py", *io, "--model", folder, *window],
                                             "stage02.log")
out["stage03_rc"], out["stage03_s"] = timed([py, "03_finetune_lora.py", *io, "--checkpoints", ckpt,
                                             "--subject", "sim01", "--epochs", "1"], "stage03.log")
out["stage05_rc"], out["stage05_s"] = timed([py, "05_linear_probes.py", *io, "--checkpoints", ckpt,
                                             "--models", "baseline", "whole"], "stage05.log")
st = load_study(data)
story_files = {s: plumbing.load_npz(os.path.join(data, "stories", f"{s}.npz"))
               for s in st["train"] + st["val"] + [st["test"]]}
audio_s = sum(len(f["audio"]) for f in story_files.values()) / 16000
out["stage05_audio_s_per_s"] = round(2 * audio_s / out["stage05_s"], 1)  # two models, every story
save()

# 4. features: stage 02's extraction of one story, the path before the batched step and today's
model = common.load_wavlm(folder, device=dev)
audio = torch.as_tensor(story_files[st["train"][0]]["audio"], device=dev)
n = cfg.num_hidden_layers
secs = len(audio) / 16000
with torch.no_grad():
    out["features_audio_s_per_s"] = round(secs * rate(lambda k: common.extract_features(model, audio), 2), 1)
    legacy = use_legacy_attention(common.load_wavlm(folder, device=dev))
    out["features_audio_s_per_s_before"] = round(secs * rate(lambda k: legacy_extract(legacy, audio, n, 16.0, 4.0), 2), 1)
del legacy
save()

# 5. training steps at the paper's defaults, before and after, on the study's training stories
layer = n // 2
d = load_subject(data, "sim01", st)
resp = {s: torch.as_tensor(d[f"resp_{s}"], device=dev) for s in st["train"]}


def setup(before):
    torch.manual_seed(0)
    base = common.load_wavlm(folder, device=dev)
    model = common.add_lora(use_legacy_attention(base) if before else base).train()
    readout = common.make_readout(cfg.hidden_size * 4, {"s": resp[st["train"][0]].shape[1]}, 100).to(dev)
    opt = torch.optim.Adam([p_ for p_ in model.parameters() if p_.requires_grad] + list(readout.parameters()), lr=1e-4,
                           fused=not before)
    stories = batching.load_stories(model, data, st["train"], dev, 0.0, 4.0)
    blocks = [(s, i, i + 32) for s in st["train"] for i in range(0, len(stories[s]["tr_times"]) - 31, 32)]
    return model, readout, opt, stories, blocks


def new_step(model, readout, opt, stories, blocks, k):
    """03_finetune_lora.py's step."""
    batch = [blocks[(2 * k + j) % len(blocks)] for j in range(2)]
    opt.zero_grad()
    with plumbing.autocast(dev):
        x, in_x = common.block_inputs(model, stories, batch, layer)
        batch = [batch[j] for j in in_x]
        y = torch.cat([resp[s][i0:i1] for s, i0, i1 in batch])
        loss = common.blocks_loss(common.read_out(readout, x)["s"], y, [i1 - i0 for _, i0, i1 in batch])
    (loss / 2).backward()
    torch.nn.utils.clip_grad_norm_([p_ for g in opt.param_groups for p_ in g["params"]], 1.0)
    opt.step()


def old_step(model, readout, opt, stories, blocks, k):
    batch = [blocks[(2 * k + j) % len(blocks)][:2] for j in range(2)]
    legacy_step(model, readout, opt, stories, resp, batch, layer)


from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
peak = next((v for k, v in BF16_PEAK.items() if k in out["device"]), None)
for tag, step in (("", new_step), ("_before", old_step)):
    model, readout, opt, stories, blocks = setup(tag == "_before")
    with FlopCounterMode(display=False) as counter:
        step(model, readout, opt, stories, blocks, 0)
    flops = float(counter.get_total_flops())
    steps_per_s = rate(lambda k: step(model, readout, opt, stories, blocks, k), args.steps)
    out[f"train_steps_per_s{tag}"] = round(steps_per_s, 2)
    out[f"train_flops_per_step{tag}"] = flops
    out[f"train_tflops{tag}"] = round(flops * steps_per_s / 1e12, 2)
    out[f"bf16_peak_fraction{tag}"] = round(flops * steps_per_s / peak, 3) if peak else None
    save()
    del model, readout, opt, stories

# 6. ridge at UTS01's shape on the device: every voxel, 13 alphas, 5 folds (stage 02's refit, stage 03's scoring)
n_tr, n_feat, n_vox = (27000, 3072, 81126) if full else (2000, 256, 3000)
g = torch.Generator(device=dev).manual_seed(0)
X = torch.randn(n_tr, n_feat, generator=g, device=dev)
Y = (X[:, :64] @ torch.randn(64, n_vox, generator=g, device=dev) * 0.05
     + torch.randn(n_tr, n_vox, generator=g, device=dev)).cpu().numpy()
X = X.cpu().numpy()
sync()
t0 = time.time()
common.ridge_cv(X, Y, device=dev)
sync()
out["ridge_s"] = round(time.time() - t0, 1)
out["ridge_shape"] = [n_tr, n_feat, n_vox]
del X, Y
save()

# 7. last (its compile time is the least predictable): the new step with --compile
if not args.skip_compile:
    model, readout, opt, stories, blocks = setup(False)
    t0 = time.time()
    batching.compile_layers(model)
    for k in range(2):
        new_step(model, readout, opt, stories, blocks, k)
    sync()
    out["compile_s"] = round(time.time() - t0, 1)
    out["train_steps_per_s_compiled"] = round(rate(lambda k: new_step(model, readout, opt, stories, blocks, k),
                                                   args.steps), 2)
    save()
print(json.dumps(out, indent=1))
