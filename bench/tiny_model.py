"""How much of the auditory voxels' noise ceiling a random tiny WavLM reaches, by config and seed.

The simulated study's auditory voxels are driven by 8-band log-mel energy (stage 01). A random model
is a stand-in for a pretrained one, so the baseline (stage 02's recipe, unchanged) should get a
good share of their ceiling: the target is >= 70%. This prints, from one run, the fraction of
the ceiling reached on the test story by the AC voxels (and the non-AC ones) of every subject, for
common.tiny_config() and the variants that differ from it in one setting, over several model
seeds. The first lines put the truth through the same pipeline: the log-mel drive (what a perfect
acoustic model would get), and its two parts, spectral shape and loudness (the mean over bands):
a model whose per-frame layer norms make it blind to loudness is bounded by the shape line.

    .venv/bin/python bench/tiny_model.py [--data data] [--seeds 0 1 2] [--variants default conv-bias ...]
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
from lib import plumbing, scoring, speech  # noqa: E402
from lib.study import load_study, load_subject  # noqa: E402

VARIANTS = {  # name: changes to common.tiny_config()
    "default": {},
    "conv-bias": dict(conv_bias=True),
    "conv-64": dict(conv_dim=(64,) * 7),
    "old-default": dict(conv_bias=True, conv_dim=(64,) * 7),  # the tiny model before its fix
    "hidden-128": dict(hidden_size=128, intermediate_size=256),
    "group-norm": dict(feat_extract_norm="group"),  # as wavlm-base-plus; CNN per window: ~2x slower
}

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--data", default="data")
p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
p.add_argument("--variants", nargs="+", default=["default", "conv-bias", "conv-64", "old-default"],
               choices=list(VARIANTS))
p.add_argument("--threads", type=int, default=None)
args = p.parse_args()
plumbing.set_threads(args.threads)
study = load_study(args.data)
subjects = study["subjects"]
data = {s: load_subject(args.data, s, study) for s in subjects}
names = study["train"] + study["val"] + [study["test"]]
stories = {s: plumbing.load_npz(os.path.join(args.data, "stories", f"{s}.npz")) for s in names}


def score(ds, layers):
    """Stage 02's recipe: layer chosen on the validation stories, refit, scored on the test story."""
    fracs = []
    for subj in subjects:
        d = data[subj]
        test_r, _ = best_layer_score(ds, d, study, layers)
        masks = scoring.roi_masks(d, len(test_r))
        fracs.append([scoring.frac_ceiling(test_r[masks[k]], d["noise_ceiling"][masks[k]])
                      for k in ("AC", "non-AC")])
    return np.array(fracs)


def row(name, seed, fr, secs):
    per = " ".join(f"{a:.3f}" for a in fr[:, 0])
    w = 6 * len(subjects)
    print(f"{name:13s} {seed:>4} {per:>{w}s} {fr[:, 0].mean():9.3f} {fr[:, 1].mean():11.3f} {secs:6.0f}", flush=True)


print(f"fraction of the noise ceiling on the test story ({', '.join(subjects)}), stage 02's recipe\n")
print(f"{'model':13s} {'seed':>4} {'AC by subject':>{6 * len(subjects)}s} {'AC mean':>9s} {'non-AC mean':>11s}"
      f" {'secs':>6s}")
# Bounds from the truth itself: the whole log-mel drive; its spectral shape alone (each frame minus
# its mean over bands: what a model blind to loudness could at best see); its loudness alone (that mean)
mels = {s: speech.log_mel(st["audio"]) for s, st in stories.items()}
for name, part in [("true log-mel", lambda m: m), ("shape only", lambda m: m - m.mean(1, keepdims=True)),
                   ("loudness only", lambda m: m.mean(1, keepdims=True))]:
    t0 = time.time()
    ds = {s: common.downsample_to_trs(part(m), t, stories[s]["tr_times"])[None] for s, (m, t) in mels.items()}
    row(name, "-", score(ds, [0]), time.time() - t0)

for name in args.variants:
    for seed in args.seeds:
        t0 = time.time()
        cfg = common.tiny_config()
        for k, v in VARIANTS[name].items():
            setattr(cfg, k, v)
        model = common.load_wavlm("tiny", seed, "cpu", config=cfg)
        ds = {}
        for s, st in stories.items():
            feats, times = common.extract_features(model, st["audio"], stride_s=4.0)
            ds[s] = np.stack([common.downsample_to_trs(f, times, st["tr_times"]) for f in feats])
        row(name, seed, score(ds, list(range(cfg.num_hidden_layers + 1))), time.time() - t0)
