"""Cost and accuracy of causal feature extraction: the default stride against the lab's 0.1 s.

Target: the default stride is at least 20x cheaper (model-seconds per audio second) at
|delta mean baseline test r| <= 0.01 on the simulated study. One run prints both, measured: the
cost once, and the baseline of every subject, scored with stage 02's recipe unchanged (layer
chosen on the validation stories, refit, Pearson r on the test story), plus the test r of every
layer. --model-seeds repeats it for other random tiny models, to show how much the delta moves.
On real data, --model microsoft/wavlm-base-plus asks the same question of the real model (a GPU
job: the lab's stride runs the model on ~151 s of audio per second of story).

    .venv/bin/python bench/features.py [--data data] [--stride-s 4.0 8.0] [--model-seeds 0]
"""
import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
from bench.recipe import best_layer_score  # noqa: E402
from lib import batching, plumbing  # noqa: E402
from lib.study import load_study, load_subject  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--data", default="data")
p.add_argument("--stride-s", type=float, nargs="+", default=[4.0, 8.0], help="candidate defaults")
p.add_argument("--lab-stride-s", type=float, default=0.1)
p.add_argument("--context-s", type=float, default=16.0)
p.add_argument("--subjects", nargs="+", default=None, help="default: every subject of the study")
p.add_argument("--model", default="tiny", help="'tiny' or a WavLM id/folder, as in stage 02")
p.add_argument("--model-seeds", type=int, nargs="+", default=[0], help="seeds of the tiny model's weights")
p.add_argument("--device", default=None)
args = p.parse_args()
plumbing.set_threads()
device = plumbing.pick_device(args.device)
seeds = args.model_seeds if args.model == "tiny" else [0]  # a pretrained model has one set of weights

study = load_study(args.data)
subjects = plumbing.subject_list(args.subjects, study)
data = {s: load_subject(args.data, s, study) for s in subjects}
stories = study["train"] + study["val"] + [study["test"]]
audio = {s: plumbing.load_npz(os.path.join(args.data, "stories", f"{s}.npz")) for s in stories}
audio_s = sum(len(a["audio"]) for a in audio.values()) / 16000


def model_seconds(n_samples, stride_s, context_s):
    F = batching.n_frames(n_samples)
    s, c = round(stride_s / 0.02), round(context_s / 0.02)
    return sum(min(F, k + s) - max(0, k - c) for k in range(0, F, s)) * 0.02


def baseline(ds, layers):
    """Per subject: (test r at the layer stage 02 would pick, mean test r of each layer)."""
    out = {}
    for subj, d in data.items():
        test_r, best = best_layer_score(ds, d, study, layers, device)
        by_layer = [common.score_on_test({s: ds[s][layer] for s in ds}, d, study, device=device)[0].mean()
                    for layer in layers]
        out[subj] = (float(test_r.mean()), int(best), np.array(by_layer))
    return out


strides = args.stride_s + [args.lab_stride_s]
cost = {st: sum(model_seconds(len(a["audio"]), st, args.context_s) for a in audio.values()) / audio_s
        for st in strides}
print(f"{audio_s / 60:.1f} min of audio, model {args.model}, context {args.context_s} s, "
      f"subjects {', '.join(subjects)}, device {device}\n")
print(f"{'seed':>4} {'stride':>6} {'model-s/audio-s':>15} {'wall s':>7}   mean test r at the best layer (layer)")
wall, r = {}, {}
for seed in seeds:
    model = common.load_wavlm(args.model, seed, device)
    layers = list(range(model.config.num_hidden_layers + 1))
    for st in strides:
        t0 = time.perf_counter()
        ds = {}
        for s in stories:
            f, times = common.extract_features(model, audio[s]["audio"], context_s=args.context_s, stride_s=st)
            ds[s] = np.stack([common.downsample_to_trs(x, times, audio[s]["tr_times"]) for x in f])
        wall[seed, st] = time.perf_counter() - t0
        r[seed, st] = baseline(ds, layers)
        cells = "  ".join(f"{subj} {v[0]:.4f} ({v[1]})" for subj, v in r[seed, st].items())
        print(f"{seed:4d} {st:6.1f} {cost[st]:15.1f} {wall[seed, st]:7.1f}   {cells}", flush=True)

lab = args.lab_stride_s
print()
for st in args.stride_s:
    print(f"stride {st} s vs lab {lab} s: {cost[lab] / cost[st]:.1f}x fewer model-seconds, "
          f"{np.mean([wall[k, lab] / wall[k, st] for k in seeds]):.1f}x less wall time "
          f"(target >= 20x)")
    for seed in seeds:
        a, b = r[seed, st], r[seed, lab]
        best = {subj: a[subj][0] - b[subj][0] for subj in subjects}
        layer = max(np.abs(a[subj][2] - b[subj][2]).max() for subj in subjects)
        print(f"  model seed {seed}: delta mean test r (stride - lab) at the best layer "
              + ", ".join(f"{subj} {v:+.4f}" for subj, v in best.items())
              + f"; study mean {np.mean(list(best.values())):+.4f}; max |delta| over layers and subjects "
              f"{layer:.4f} (target <= 0.01)")
