"""Does a layer sweep on a random voxel subset (02_baseline_ridge.py --sweep-voxels N) pick the layer
the full sweep picks? Reads a finished stage 02 run (its feature cache and results), redoes the sweep
on random subsets of N voxels, several draws each, and prints how often the chosen layer agrees,
how much validation r the subset's choice loses, and the time against the full sweep.

    .venv/bin/python bench/sweep_voxels.py --data /tmp/brainwavlm_scale/12stories/data \
        --results /tmp/brainwavlm_scale/12stories/results --sizes 1000 5000 20000
"""
import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
from lib import plumbing  # noqa: E402
from lib.study import load_study, load_subject, stack_responses  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--data", required=True)
p.add_argument("--results", required=True)
p.add_argument("--subject", default="sim01")
p.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
p.add_argument("--draws", type=int, default=5)
args = p.parse_args()
plumbing.set_threads()

study = load_study(args.data)
base = plumbing.load_npz(os.path.join(args.results, f"02_baseline_{args.subject}.npz"))
layers, delays = [int(x) for x in base["layers"]], tuple(int(x) for x in base["delays"])
cache = plumbing.feature_cache_dir(args.data, str(base["model"]), int(base["model_seed"]), float(base["context_s"]),
                              float(base["stride_s"]))
ds = {s: plumbing.load_npz(os.path.join(cache, f"{s}.npz"))["ds"] for s in study["train"] + study["val"]}
d = load_subject(args.data, args.subject, study)
full_val = base["val_r_by_layer"].mean(1)
full_best = layers[int(np.argmax(full_val))]
print(f"full sweep ({base['val_r_by_layer'].shape[1]} voxels): best layer {full_best}, "
      f"mean validation r by layer {np.round(full_val, 4).tolist()}")
X_train = {layer: np.vstack([common.design_matrix(ds[s][layer], delays) for s in study["train"]]) for layer in layers}
X_val = {layer: np.vstack([common.design_matrix(ds[s][layer], delays) for s in study["val"]]) for layer in layers}
n_vox = plumbing.array_shape(d, "test_resp")[1]
for size in args.sizes:
    agree, loss, secs = 0, [], []
    for draw in range(args.draws):
        voxels = np.sort(np.random.default_rng(draw).choice(n_vox, size, replace=False))
        Y_train, Y_val = stack_responses(d, study["train"], voxels), stack_responses(d, study["val"], voxels)
        t0 = time.time()
        val = []
        for layer in layers:
            W, _, _ = common.ridge_cv(X_train[layer], Y_train, base["alpha_grid"], n_folds=int(base["n_folds"]))
            val.append(common.pearson_r(Y_val, common.ridge_predict(X_val[layer], W)).mean())
        secs.append(time.time() - t0)
        pick = layers[int(np.argmax(val))]
        agree += pick == full_best
        loss.append(full_val.max() - full_val[layers.index(pick)])
    print(f"  {size:6d} voxels x {args.draws} draws: same layer {agree}/{args.draws}, validation r lost by the "
          f"subset's pick (full-voxel means) max {max(loss):.4f}; sweep {np.mean(secs):.1f} s")
