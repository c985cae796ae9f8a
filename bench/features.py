"""Cost and accuracy of causal feature extraction: the default stride against the lab's 0.1 s.

Issue #3 target: the default stride is at least 20x cheaper (model-seconds per audio second) at
|delta mean baseline test r| <= 0.01 on the simulated study. One run prints both, measured.

    .venv/bin/python bench/features.py [--data data] [--stride-s 4.0] [--subject sim01]
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--data", default="data")
p.add_argument("--stride-s", type=float, nargs="+", default=[4.0, 8.0], help="candidate defaults")
p.add_argument("--lab-stride-s", type=float, default=0.1)
p.add_argument("--context-s", type=float, default=16.0)
p.add_argument("--subject", default=None, help="default: the study's first subject")
p.add_argument("--model-seed", type=int, default=0)
p.add_argument("--device", default=None)
args = p.parse_args()
common.set_threads()

study = common.load_study(args.data)
subject = args.subject or study["subjects"][0]
d = common.load_subject(args.data, subject, study)
model = common.load_wavlm("tiny", args.model_seed, args.device)
stories = study["train"] + study["val"] + [study["test"]]
audio = {s: common.load_npz(os.path.join(args.data, "stories", f"{s}.npz")) for s in stories}
audio_s = sum(len(a["audio"]) for a in audio.values()) / 16000


def model_seconds(n_samples, stride_s, context_s):
    F = common.n_frames(n_samples)
    s, c = round(stride_s / 0.02), round(context_s / 0.02)
    return sum(min(F, k + s) - max(0, k - c) for k in range(0, F, s)) * 0.02


rows = {}
for stride in args.stride_s + [args.lab_stride_s]:
    t0 = time.perf_counter()
    ds = {}
    for s in stories:
        f, times = common.extract_features(model, audio[s]["audio"], context_s=args.context_s, stride_s=stride)
        ds[s] = np.stack([common.downsample_to_trs(x, times, audio[s]["tr_times"]) for x in f])
    wall = time.perf_counter() - t0
    ms = sum(model_seconds(len(a["audio"]), stride, args.context_s) for a in audio.values())
    # the stage 02 recipe per layer, scored on the test story
    r_by_layer = []
    Y = np.vstack([d[f"resp_{s}"] for s in study["train"] + study["val"]])
    for layer in range(ds[stories[0]].shape[0]):
        X = np.vstack([common.design_matrix(ds[s][layer]) for s in study["train"] + study["val"]])
        W, _, _ = common.ridge_cv(X, Y, common.ALPHAS)
        r_by_layer.append(common.pearson_r(d["test_resp"], common.design_matrix(ds[study["test"]][layer]) @ W).mean())
    rows[stride] = (ms / audio_s, wall, np.array(r_by_layer))
    print(f"stride {stride:4.1f} s: {ms / audio_s:6.1f} model-s per audio-s, wall {wall:7.1f} s, "
          f"mean test r by layer {np.round(r_by_layer, 4)}", flush=True)

b = rows[args.lab_stride_s]
print(f"\n{audio_s / 60:.1f} min of audio, context {args.context_s} s, subject {subject}")
for stride in args.stride_s:
    a = rows[stride]
    print(f"stride {stride} s vs lab {args.lab_stride_s} s: {b[0] / a[0]:.1f}x fewer model-seconds, "
          f"{b[1] / a[1]:.1f}x less wall time (target >= 20x); max |delta mean test r| over layers "
          f"{np.abs(a[2] - b[2]).max():.4f} (target <= 0.01)")
