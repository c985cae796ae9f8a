"""Shared pieces of the BrainWavLM study: what two or more stages use.

Read top to bottom: small helpers and npz I/O, then the encoding-model numerics of the Huth lab
(Lanczos resampling, delays, z-scoring, Pearson r, noise ceiling, ridge with per-voxel alphas).
Numpy in, numpy out, float32; torch versions where stage 03 needs gradients.
"""
import os
import sys
import tempfile

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------
# Small helpers: errors, devices, seeds, npz files written atomically
# ---------------------------------------------------------------------------------------------


class StudyError(Exception):
    """A problem with the user's input. Stages print it as one line and exit non-zero."""


def fail(msg):
    """Print one clear message and exit 1 (the stages' `main` calls this for a StudyError)."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def pick_device(name=None):
    """`None`/"auto" -> cuda when present, else cpu."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise StudyError(f"--device {name} asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def set_threads(n=None):
    """Pin torch's CPU threads: left alone, torch can oversubscribe a small machine (50x slower seen)."""
    n = n or int(os.environ.get("BRAINWAVLM_THREADS", 0)) or os.cpu_count() or 1
    torch.set_num_threads(n)


def save_npz(path, **arrays):
    """np.savez to a temp file in the same folder, then rename: a crash never leaves half a file."""
    path = str(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".npz")
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_npz(path, what="file"):
    """np.load without pickles, as a plain dict; a missing file is a StudyError naming it."""
    if not os.path.exists(path):
        raise StudyError(f"{what} not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except ValueError as e:
        raise StudyError(f"{path} is not a plain npz file ({e}); rebuild it with the stage that writes it")


def save_figure(fig, path):
    """Save a matplotlib figure atomically (same reason as save_npz)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, ".tmp_" + os.path.basename(path))
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Resampling to TRs: the Huth lab's Lanczos interpolation (lanczosinterp2D)
# ---------------------------------------------------------------------------------------------


def lanczos_kernel(new_times, old_times, window=3, cutoff_mult=1.0):
    """The (new x old) Lanczos-windowed sinc matrix of lanczosinterp2D.

    cutoff = cutoff_mult / mean spacing of new_times. Not normalised: each row sums to about
    (old rate / new rate), exactly as the lab's code, so downstream z-scoring absorbs the scale.
    """
    new_times = np.asarray(new_times, dtype=np.float64)
    old_times = np.asarray(old_times, dtype=np.float64)
    cutoff = cutoff_mult / np.mean(np.diff(new_times))
    t = (new_times[:, None] - old_times[None, :]) * cutoff
    with np.errstate(divide="ignore", invalid="ignore"):
        k = window * np.sin(np.pi * t) * np.sin(np.pi * t / window) / (np.pi ** 2 * t ** 2)
    k[t == 0] = 1.0
    k[np.abs(t) > window] = 0.0
    return k


def lanczos_interp(data, old_times, new_times, window=3, cutoff_mult=1.0):
    """Resample `data` (old_times x features) to new_times (numpy in, float32 out)."""
    k = lanczos_kernel(new_times, old_times, window, cutoff_mult)
    return (k @ np.asarray(data, dtype=np.float64)).astype(np.float32)


def lanczos_interp_torch(data, old_times, new_times, window=3, cutoff_mult=1.0):
    """Differentiable twin of lanczos_interp: `data` is a (..., old_times, features) tensor."""
    k = torch.as_tensor(lanczos_kernel(new_times, old_times, window, cutoff_mult), dtype=data.dtype,
                        device=data.device)
    return k @ data


# ---------------------------------------------------------------------------------------------
# Delays, z-scoring, correlation, noise ceiling
# ---------------------------------------------------------------------------------------------


def make_delayed(x, delays=(1, 2, 3, 4)):
    """Stack copies of x (TRs x features) shifted later by each delay, zero-padded at the start.

    Row t of the result holds x[t - d] for each d: the response at TR t sees the stimulus d TRs
    earlier (the hemodynamic lag). Works on numpy arrays and on torch tensors (last two dims).
    """
    is_torch = torch.is_tensor(x)
    n = x.shape[-2]
    out = []
    for d in delays:
        if is_torch:
            shifted = torch.zeros_like(x)
        else:
            shifted = np.zeros_like(x)
        if d > 0:
            shifted[..., d:, :] = x[..., :n - d, :] if d < n else 0
        elif d < 0:
            shifted[..., :n + d, :] = x[..., -d:, :]
        else:
            shifted[...] = x
        out.append(shifted)
    return torch.cat(out, dim=-1) if is_torch else np.concatenate(out, axis=-1)


def zscore(x, axis=0):
    """Per column (mean 0, std 1 along `axis`); a constant column becomes zeros, never NaN."""
    x = np.asarray(x, dtype=np.float32)
    m = x.mean(axis=axis, keepdims=True)
    s = x.std(axis=axis, keepdims=True)
    return ((x - m) / np.where(s > 0, s, 1.0)).astype(np.float32)


def pearson_r(a, b):
    """Pearson correlation of each column of a with the same column of b (TRs x voxels -> voxels).

    A constant column gives 0, not NaN (it predicts nothing).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"pearson_r: shapes differ {a.shape} vs {b.shape}")
    a = a - a.mean(0)
    b = b - b.mean(0)
    den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(den > 0, (a * b).sum(0) / den, 0.0)
    return r.astype(np.float32)


def noise_ceiling(repeats):
    """Per-voxel ceiling on the correlation any model can reach against the mean of the repeats.

    `repeats`: (n_repeats, TRs, voxels). Estimator: CC_max of Schoppe et al. (2016, Front. Comput.
    Neurosci. 10:10), built on the signal-power estimate of Sahani & Linden (2003, NIPS). With
    y_n = s + e_n, var(mean_n y_n) = SP + NP/N and mean_n var(y_n) = SP + NP, so
        SP = (N var(mean) - mean var(y_n)) / (N - 1),   CC_max = sqrt(SP / var(mean)).
    A negative SP estimate (pure noise voxel) gives 0. Same units as Pearson r.
    """
    y = np.asarray(repeats, dtype=np.float64)
    if y.ndim != 3 or y.shape[0] < 2:
        raise ValueError("noise_ceiling needs (repeats >= 2, TRs, voxels)")
    n = y.shape[0]
    var_mean = y.mean(0).var(0)
    mean_var = y.var(1).mean(0)
    sp = (n * var_mean - mean_var) / (n - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        cc = np.where(var_mean > 0, np.sqrt(np.clip(sp, 0, None) / var_mean), 0.0)
    return np.clip(cc, 0, 1).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Ridge regression with one alpha per voxel, chosen by cross-validation over contiguous blocks
# ---------------------------------------------------------------------------------------------


def contiguous_folds(n_samples, n_folds=5):
    """K folds of contiguous TR blocks (fMRI is autocorrelated: shuffling single TRs leaks)."""
    edges = np.linspace(0, n_samples, n_folds + 1).astype(int)
    idx = np.arange(n_samples)
    return [(np.concatenate([idx[:a], idx[b:]]), idx[a:b]) for a, b in zip(edges[:-1], edges[1:])]


def ridge_cv(X, Y, alphas=np.logspace(0, 6, 13), n_folds=5, folds=None, device="cpu",
             voxel_batch=10000, progress=False):
    """Ridge X -> Y with one alpha per voxel (column of Y), picked by K-fold CV on contiguous blocks.

    Solves min ||Y - X W||^2 + alpha ||W||^2 for every alpha from one eigendecomposition of the
    training X^T X per fold (the SVD of X: X^T X = V S^2 V^T, so W = V diag(1 / (s^2 + alpha)) V^T
    X^T Y), scores each alpha by the Pearson r of held-out predictions (mean over folds), keeps
    the best alpha per voxel (ties go to the larger alpha, as in himalaya), then refits on all rows.
    No intercept: centre or z-score X and Y first. `alpha` is the usual (sklearn / himalaya)
    penalty: an alpha `a` of the lab's bootstrap_ridge, whose solver uses s / (s^2 + a^2), is a^2 here.

    Why it is fast: X^T Y is formed once, each fold's training X^T Y is that minus the held-out
    part, and the cross term of the held-out correlation needs no prediction; only the norm of each
    alpha's prediction costs a matmul. Voxels go in batches of `voxel_batch` so 100k voxels fit in
    memory; `device` may be cuda.
    Returns (weights: features x voxels, best_alphas: voxels, cv_r: alphas x voxels).
    """
    dev = torch.device(device)
    X = np.asarray(X, dtype=np.float32)
    Y = np.asarray(Y, dtype=np.float32)
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"ridge_cv: X {X.shape} and Y {Y.shape} must be 2-D with the same rows")
    alphas = np.asarray(alphas, dtype=np.float64).ravel()
    folds = folds if folds is not None else contiguous_folds(X.shape[0], n_folds)
    n_vox = Y.shape[1]
    Xt = torch.from_numpy(X).to(dev)

    def eig_basis(gram):
        # float64 for the decomposition: squaring X squares its condition number
        lam, V = torch.linalg.eigh(gram)
        return lam.clamp(min=0), V.float()

    X64 = Xt.double()
    gram = X64.T @ X64
    basis = []  # per fold: eigenvalues, eigenvectors, held-out rows in that basis
    for train, test in folds:
        test = torch.as_tensor(test, device=dev)
        lam, V = eig_basis(gram - X64[test].T @ X64[test])
        basis.append((test, lam, V, Xt[test] @ V))
    cv_r = torch.zeros(len(alphas), n_vox, dtype=torch.float64, device=dev)
    W = np.zeros((X.shape[1], n_vox), dtype=np.float32)
    best_alphas = np.zeros(n_vox, dtype=np.float32)
    lam_all, V_all = eig_basis(gram)
    for b, v0 in enumerate(range(0, n_vox, voxel_batch)):
        if progress:
            print(f"    ridge voxels {v0}-{min(n_vox, v0 + voxel_batch)} of {n_vox}", flush=True)
        Yb = torch.from_numpy(np.ascontiguousarray(Y[:, v0:v0 + voxel_batch])).to(dev)
        sl = slice(v0, v0 + Yb.shape[1])
        XtY = Xt.T @ Yb
        for test, lam, V, P in basis:
            Yte = Yb[test]
            Z = V.T @ (XtY - Xt[test].T @ Yte)  # training X^T Y in the eigenbasis
            yz = Yte - Yte.mean(0)
            yz = yz / yz.norm(dim=0).clamp(min=1e-12)
            cross = P.T @ yz  # held-out X^T y in the eigenbasis: r's numerator without predictions
            pmean = P.mean(0)
            for a, alpha in enumerate(alphas):
                EZ = Z / (lam.float() + float(alpha))[:, None]
                pred = P @ EZ
                pc = pred - (pmean @ EZ)[None]
                cv_r[a, sl] += ((cross * EZ).sum(0) / pc.norm(dim=0).clamp(min=1e-12)).double()
        score = cv_r[:, sl] / len(folds)
        # larger alpha wins ties (himalaya adds the same tiny slope)
        best = torch.argmax(score + 1e-10 * torch.log(torch.as_tensor(alphas, device=dev))[:, None], 0)
        a_best = torch.as_tensor(alphas, device=dev)[best]
        Zall = V_all.T @ XtY
        W[:, sl] = (V_all @ (Zall / (lam_all[:, None] + a_best[None, :]).float())).cpu().numpy()
        best_alphas[sl] = a_best.cpu().numpy()
    return W, best_alphas, (cv_r / len(folds)).float().cpu().numpy()


def ridge_predict(X, W, device="cpu", voxel_batch=20000):
    """X @ W in float32, batched over voxels; numpy in, numpy out."""
    dev = torch.device(device)
    Xt = torch.from_numpy(np.asarray(X, dtype=np.float32)).to(dev)
    out = np.zeros((X.shape[0], W.shape[1]), dtype=np.float32)
    for v0 in range(0, W.shape[1], voxel_batch):
        Wb = torch.from_numpy(np.ascontiguousarray(W[:, v0:v0 + voxel_batch], dtype=np.float32)).to(dev)
        out[:, v0:v0 + Wb.shape[1]] = (Xt @ Wb).cpu().numpy()
    return out
