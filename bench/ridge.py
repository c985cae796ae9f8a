"""Time common.ridge_cv against himalaya's RidgeCV on the same data, in one run.

Issue #2 target: 3000 TRs x 1000 features -> 10,000 voxels, 10 alphas, 5 contiguous folds,
float32, per-voxel alphas; ridge_cv at least 2x faster at equal test r.

    .venv/bin/python bench/ridge.py [--voxels 10000] [--device cpu]
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--trs", type=int, default=3000)
p.add_argument("--features", type=int, default=1000)
p.add_argument("--voxels", type=int, default=10000)
p.add_argument("--test-trs", type=int, default=500)
p.add_argument("--device", default="cpu")
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()
common.set_threads()

# A low-rank, noisy linear world, so ridge has something real to find and alphas matter.
rng = np.random.default_rng(args.seed)
n = args.trs + args.test_trs
latent = rng.standard_normal((n, 50)).astype(np.float32)
X = latent @ rng.standard_normal((50, args.features)).astype(np.float32) / 7
X += rng.standard_normal(X.shape).astype(np.float32)
W_true = rng.standard_normal((args.features, args.voxels)).astype(np.float32) / np.sqrt(args.features)
W_true *= rng.uniform(0, 1, args.voxels).astype(np.float32)  # voxels differ in SNR -> in best alpha
Y = X @ W_true + rng.standard_normal((n, args.voxels)).astype(np.float32) * 2
X, Y = common.zscore(X), common.zscore(Y)
Xtr, Ytr, Xte, Yte = X[:args.trs], Y[:args.trs], X[args.trs:], Y[args.trs:]
alphas = np.logspace(0, 5, 10)
folds = common.contiguous_folds(args.trs, 5)
print(f"data: {args.trs} TRs x {args.features} features -> {args.voxels} voxels, 10 alphas, 5 folds,"
      f" float32, device {args.device}, torch threads {common.torch.get_num_threads()}")

t0 = time.perf_counter()
W, best, _ = common.ridge_cv(Xtr, Ytr, alphas, folds=folds, device=args.device)
t_ours = time.perf_counter() - t0
r_ours = common.pearson_r(Yte, Xte @ W)

from himalaya.backend import set_backend  # noqa: E402
from himalaya.ridge import RidgeCV  # noqa: E402
from himalaya.scoring import correlation_score  # noqa: E402
set_backend("numpy")
model = RidgeCV(alphas=alphas, cv=folds, solver="svd", fit_intercept=False,
                solver_params=dict(score_func=correlation_score, local_alpha=True))
t0 = time.perf_counter()
model.fit(Xtr, Ytr)
t_him = time.perf_counter() - t0
r_him = common.pearson_r(Yte, model.predict(Xte))

print(f"ridge_cv          : {t_ours:6.2f} s   mean test r {r_ours.mean():.5f}")
print(f"himalaya RidgeCV  : {t_him:6.2f} s   mean test r {r_him.mean():.5f}   (numpy backend)")
print(f"same alpha chosen for {np.mean(np.isclose(best, model.best_alphas_)) * 100:.1f}% of voxels;"
      f" max |delta test r| {np.abs(r_ours - r_him).max():.2e}")
print(f"speed-up ridge_cv / himalaya: {t_him / t_ours:.2f}x  (target >= 2x)")
