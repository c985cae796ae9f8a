"""Time common.ridge_cv against himalaya's RidgeCV on the same data, in one run.

Default shape (small): 3000 TRs x 1000 features -> 10,000 voxels, 10 alphas, 5 contiguous folds,
float32, per-voxel alphas; target: ridge_cv at least 2x faster at equal test r.

`--shape uts01`: one layer of wavlm-base-plus on UTS01 (27,000 TRs x 3,072 delayed features,
stage 02's 13 alphas, 5 folds). The 81,126 voxels do not fit this machine's time, so both
solvers run at two voxel counts and the times are extrapolated linearly to 81,126 voxels (fixed
cost: the decompositions; per-voxel cost: everything else), labelled as such.

    .venv/bin/python bench/ridge.py                      # small shape, one voxel count
    .venv/bin/python bench/ridge.py --shape uts01        # real shape at 1,000 and 2,000 voxels
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from lib import plumbing  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--shape", choices=["small", "uts01"], default="small")
p.add_argument("--voxels", type=int, nargs="+", help="voxel counts to time (default: 10000; uts01: 1000 2000)")
p.add_argument("--device", default="cpu")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--no-himalaya", action="store_true", help="time ridge_cv only")
args = p.parse_args()
plumbing.set_threads()
if args.shape == "small":
    trs, features, test_trs, alphas = 3000, 1000, 500, np.logspace(0, 5, 10)
else:
    trs, features, test_trs, alphas = 27000, 3072, 291, common.ALPHAS
voxel_counts = args.voxels or ([10000] if args.shape == "small" else [1000, 2000])

# A low-rank, noisy linear world, so ridge has something real to find and alphas matter.
rng = np.random.default_rng(args.seed)
n, v_max = trs + test_trs, max(voxel_counts)
latent = rng.standard_normal((n, 50)).astype(np.float32)
X = latent @ rng.standard_normal((50, features)).astype(np.float32) / 7
X += rng.standard_normal(X.shape).astype(np.float32)
W_true = rng.standard_normal((features, v_max)).astype(np.float32) / np.sqrt(features)
W_true *= rng.uniform(0, 1, v_max).astype(np.float32)  # voxels differ in SNR -> in best alpha
Y = X @ W_true + rng.standard_normal((n, v_max)).astype(np.float32) * 2
X, Y = common.zscore(X), common.zscore(Y)
Xtr, Xte = X[:trs], X[trs:]
folds = common.contiguous_folds(trs, 5)
print(f"data: {trs} TRs x {features} features -> {voxel_counts} voxels, {len(alphas)} alphas, 5 folds,"
      f" float32, device {args.device}, torch threads {common.torch.get_num_threads()}", flush=True)

times = {"ridge_cv": [], "himalaya": []}
for v in voxel_counts:
    Ytr, Yte = np.ascontiguousarray(Y[:trs, :v]), Y[trs:, :v]
    t0 = time.perf_counter()
    W, best, _ = common.ridge_cv(Xtr, Ytr, alphas, folds=folds, device=args.device)
    if args.device.startswith("cuda"):
        common.torch.cuda.synchronize()
    times["ridge_cv"].append(time.perf_counter() - t0)
    r_ours = common.pearson_r(Yte, Xte @ W)
    print(f"{v:6d} voxels  ridge_cv          : {times['ridge_cv'][-1]:7.2f} s   mean test r {r_ours.mean():.5f}",
          flush=True)
    if args.no_himalaya:
        continue
    from himalaya.backend import set_backend
    from himalaya.ridge import RidgeCV
    from himalaya.scoring import correlation_score
    set_backend("numpy")
    model = RidgeCV(alphas=alphas, cv=folds, solver="svd", fit_intercept=False,
                    solver_params=dict(score_func=correlation_score, local_alpha=True))
    t0 = time.perf_counter()
    model.fit(Xtr, Ytr)
    times["himalaya"].append(time.perf_counter() - t0)
    r_him = common.pearson_r(Yte, model.predict(Xte))
    print(f"{v:6d} voxels  himalaya RidgeCV  : {times['himalaya'][-1]:7.2f} s   mean test r {r_him.mean():.5f}"
          f"   (numpy backend)", flush=True)
    print(f"{v:6d} voxels  same alpha chosen for {np.mean(np.isclose(best, model.best_alphas_)) * 100:.1f}% of "
          f"voxels; max |delta test r| {np.abs(r_ours - r_him).max():.2e}; speed-up ridge_cv / himalaya: "
          f"{times['himalaya'][-1] / times['ridge_cv'][-1]:.2f}x  (target >= 2x)", flush=True)

if args.shape == "uts01" and len(voxel_counts) >= 2:
    print("\nextrapolated (a line through the measured points) to UTS01's 81,126 voxels:")
    for name, t in times.items():
        if len(t) == len(voxel_counts):
            slope, fixed = np.polyfit(voxel_counts, t, 1)
            print(f"  {name:9s}: {fixed:7.1f} s fixed + {slope * 1000:6.2f} s per 1000 voxels"
                  f" = {fixed + slope * 81126:8.0f} s per layer (extrapolated)")
