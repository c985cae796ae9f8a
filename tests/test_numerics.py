"""common.py numerics against independent references."""
import numpy as np
import pytest
import torch

import common
from lib import plumbing
from helpers import run_stage


def lanczos_reference(data, oldtime, newtime, window=3, cutoff_mult=1.0):
    """A loop-by-loop transcription of the Lanczos formula of the lab's lanczosinterp2D."""
    cutoff = cutoff_mult / np.mean(np.diff(newtime))
    out = np.zeros((len(newtime), data.shape[1]))
    for i, tn in enumerate(newtime):
        for j, to in enumerate(oldtime):
            t = (tn - to) * cutoff
            if t == 0:
                w = 1.0
            elif abs(t) > window:
                w = 0.0
            else:
                w = window * np.sin(np.pi * t) * np.sin(np.pi * t / window) / (np.pi ** 2 * t ** 2)
            out[i] += w * data[j]
    return out


def test_lanczos_matches_reference_and_torch_twin():
    rng = np.random.default_rng(0)
    old = np.sort(rng.uniform(0, 30, 200))
    new = 1.0 + 2.0 * np.arange(14)
    x = rng.standard_normal((200, 3))
    ref = lanczos_reference(x, old, new)
    np.testing.assert_allclose(common.lanczos_interp(x, old, new), ref, rtol=1e-4, atol=1e-4)
    # not normalised: a constant input scales by (old rate / new rate), as in the lab's code
    assert abs(common.lanczos_interp(np.ones((200, 1)), old, new)[5, 0] - 200 / 30 * 2) < 3
    xt = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    yt = common.lanczos_interp(xt, old, new)
    np.testing.assert_allclose(yt.detach().numpy(), ref, rtol=1e-4, atol=1e-4)
    yt.sum().backward()
    assert xt.grad is not None and xt.grad.abs().sum() > 0


def test_lanczos_recovers_a_slow_signal():
    old = np.arange(0, 60, 0.02)
    new = np.arange(1, 59, 2.0)
    slow = np.sin(2 * np.pi * old / 20)[:, None]
    y = common.lanczos_interp(slow, old, new)
    r = np.corrcoef(y[3:-3, 0], np.sin(2 * np.pi * new[3:-3] / 20))[0, 1]
    assert r > 0.999


def test_make_delayed_numpy_and_torch():
    x = np.arange(12, dtype=np.float32).reshape(6, 2) + 1
    d = common.make_delayed(x, (1, 2))
    assert d.shape == (6, 4)
    np.testing.assert_array_equal(d[:, :2], np.vstack([np.zeros((1, 2)), x[:-1]]))
    np.testing.assert_array_equal(d[:, 2:], np.vstack([np.zeros((2, 2)), x[:-2]]))
    dt = common.make_delayed(torch.tensor(x), (1, 2))
    np.testing.assert_array_equal(dt.numpy(), d)
    np.testing.assert_array_equal(common.make_delayed(x, (0,)), x)
    # a negative delay reads later rows (the lab's convention); past the end, zeros
    np.testing.assert_array_equal(common.make_delayed(x, (-1,)), np.vstack([x[1:], np.zeros((1, 2))]))
    np.testing.assert_array_equal(common.make_delayed(x, (7, -7)), np.zeros((6, 4)))


def test_zscore_and_pearson():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 4)).astype(np.float32) * 3 + 2
    x[:, 2] = 7.0
    z = common.zscore(x)
    assert np.all(np.isfinite(z))
    np.testing.assert_allclose(z[:, [0, 1, 3]].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z[:, [0, 1, 3]].std(0), 1, atol=1e-5)
    assert np.all(z[:, 2] == 0)
    a = rng.standard_normal((80, 5))
    b = a + rng.standard_normal((80, 5))
    r = common.pearson_r(a, b)
    np.testing.assert_allclose(r, [np.corrcoef(a[:, i], b[:, i])[0, 1] for i in range(5)], atol=1e-6)
    assert common.pearson_r(a, np.ones_like(a))[0] == 0


def test_pearson_r_and_noise_ceiling_slice_by_slice_are_each_voxel_s_own(monkeypatch):
    """Real subjects have ~81,000 voxels, which pearson_r and noise_ceiling take VOXEL_SLICE (10,000)
    at a time; the tests' arrays are smaller than one slice. With slices of 7 voxels (the last one
    short), every voxel's r is np.corrcoef's and its ceiling the formula's, voxel by voxel."""
    monkeypatch.setattr(common, "VOXEL_SLICE", 7)
    rng = np.random.default_rng(3)
    signal = rng.standard_normal((60, 1)) * np.linspace(0.1, 3, 30)  # every voxel its own signal strength
    a, b = signal + rng.standard_normal((60, 30)), signal + rng.standard_normal((60, 30))
    np.testing.assert_allclose(common.pearson_r(a, b), [np.corrcoef(a[:, v], b[:, v])[0, 1] for v in range(30)],
                               atol=1e-6)
    repeats = signal[None] + rng.standard_normal((4, 60, 30))
    ceiling = []
    for v in range(30):
        y = repeats[:, :, v]
        var_mean, mean_var = y.mean(0).var(), y.var(1).mean()
        power = max(0.0, (4 * var_mean - mean_var) / 3)  # the signal power of Sahani & Linden
        ceiling.append(min(1.0, np.sqrt(power / var_mean)))
    np.testing.assert_allclose(common.noise_ceiling(repeats), ceiling, atol=1e-6)
    assert np.ptp(ceiling) > 0.5  # voxels far apart: one read at another's place would show


@pytest.fixture(scope="module")
def abstract_study(tmp_path_factory):
    """The abstract 300-voxel study (--cortex none): every voxel's noise sd 0.7-2 times its signal's."""
    data = str(tmp_path_factory.mktemp("abstract") / "data")
    assert run_stage("01_prepare_data.py", ["--data", data, "--cortex", "none"]) == 0
    return data


@pytest.mark.parametrize("which", ["abstract", "S1"])
def test_noise_ceiling_agrees_with_known_truth(which, abstract_study, default_study):
    """On the simulated studies the estimate from repeats matches the ceiling implied by the true
    noise-free signal and noise level. On S1's cortex most voxels have little signal, where 10
    repeats of a 115-TR story estimate the ceiling loosely (as on real data): there the check is
    on the voxels whose true ceiling is above 0.5, and the estimate's correlation with the truth."""
    data = abstract_study if which == "abstract" else default_study
    truth = plumbing.load_npz(f"{data}/truth.npz")
    for subj in truth["subjects"]:
        s = plumbing.load_npz(f"{data}/subjects/{subj}.npz")
        est = common.noise_ceiling(s["test_repeats"])
        np.testing.assert_allclose(est, s["noise_ceiling"], atol=1e-6)
        true = truth[f"{subj}_true_ceiling"]
        # and the empirical r between the truth and the mean of repeats
        emp = common.pearson_r(truth[f"{subj}_test_signal"], s["test_repeats"].mean(0))
        if which == "abstract":
            assert np.abs(est - true).mean() < 0.05 and np.corrcoef(est, true)[0, 1] > 0.9
            assert np.abs(emp - true).mean() < 0.05
        else:
            good = true > 0.5
            assert 0.2 < good.mean() < 0.4  # the regime: most of cortex has little signal
            assert np.abs(est - true)[good].mean() < 0.07 and np.corrcoef(est, true)[0, 1] > 0.75
            assert np.abs(emp - true)[good].mean() < 0.05


def test_noise_ceiling_limits():
    rng = np.random.default_rng(2)
    sig = rng.standard_normal((1, 100, 3))
    assert np.allclose(common.noise_ceiling(np.repeat(sig, 4, 0)), 1, atol=1e-5)
    assert common.noise_ceiling(rng.standard_normal((10, 400, 50))).mean() < 0.15
    with pytest.raises(ValueError):
        common.noise_ceiling(sig)


def test_contiguous_folds_cover_everything_once():
    folds = common.contiguous_folds(103, 5)
    test = np.concatenate([t for _, t in folds])
    np.testing.assert_array_equal(test, np.arange(103))
    for tr, te in folds:
        assert np.all(np.diff(te) == 1)
        assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == 103


def _ridge_problem(seed=0, n=400, p=60, v=120):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p)).astype(np.float32)
    X[:, 1:] += 0.5 * X[:, :-1]
    W = rng.standard_normal((p, v)) * rng.uniform(0, 0.4, v)
    Y = X @ W + rng.standard_normal((n, v)) * 2
    return common.zscore(X), common.zscore(Y)


def test_ridge_cv_agrees_with_himalaya():
    from himalaya.backend import set_backend
    from himalaya.ridge import RidgeCV
    from himalaya.scoring import correlation_score
    set_backend("numpy")
    X, Y = _ridge_problem()
    alphas = np.logspace(-1, 4, 12)
    folds = common.contiguous_folds(len(X), 5)
    W, best, cv_r = common.ridge_cv(X, Y, alphas, folds=folds, voxel_batch=50)
    ref = RidgeCV(alphas=alphas, cv=folds, solver="svd", fit_intercept=False,
                  solver_params=dict(score_func=correlation_score, local_alpha=True)).fit(X, Y)
    assert np.mean(np.isclose(best, ref.best_alphas_)) > 0.97  # near-ties may flip in float32
    assert len(np.unique(best)) > 2  # per-voxel alphas really differ here
    same = np.isclose(best, ref.best_alphas_)
    np.testing.assert_allclose(W[:, same], np.asarray(ref.coef_)[:, same], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(cv_r.max(0), np.asarray(ref.cv_scores_), atol=1e-4)
    assert cv_r.shape == (12, Y.shape[1])


def test_ridge_cv_closed_form_and_predict():
    X, Y = _ridge_problem(1, n=200, p=20, v=7)
    alphas = np.array([3.0])
    W, best, _ = common.ridge_cv(X, Y, alphas)
    W_ref = np.linalg.solve(X.T.astype(np.float64) @ X + 3.0 * np.eye(20), X.T @ Y)
    np.testing.assert_allclose(W, W_ref, atol=1e-4)
    np.testing.assert_allclose(common.ridge_predict(X, W, voxel_batch=3), X @ W, atol=1e-4)
    with pytest.raises(ValueError):
        common.ridge_cv(X, Y[:-1], alphas)


def test_ridge_cv_with_more_features_than_rows_agrees_with_himalaya():
    """A small study under a wide model (tens of TRs, 3,072 delayed features of wavlm-base-plus):
    ridge_cv then decomposes the rows x rows Gram matrix; same answer, much less work."""
    from himalaya.backend import set_backend
    from himalaya.ridge import RidgeCV
    from himalaya.scoring import correlation_score
    set_backend("numpy")
    X, Y = _ridge_problem(2, n=60, p=150, v=40)
    alphas = np.logspace(0, 4, 9)
    folds = common.contiguous_folds(len(X), 5)
    W, best, cv_r = common.ridge_cv(X, Y, alphas, folds=folds)
    ref = RidgeCV(alphas=alphas, cv=folds, solver="svd", fit_intercept=False,
                  solver_params=dict(score_func=correlation_score, local_alpha=True)).fit(X, Y)
    same = np.isclose(best, ref.best_alphas_)
    assert same.mean() > 0.95
    np.testing.assert_allclose(W[:, same], np.asarray(ref.coef_)[:, same], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(cv_r.max(0), np.asarray(ref.cv_scores_), atol=1e-4)
    W_ref = np.linalg.solve(X.T.astype(np.float64) @ X + 10.0 * np.eye(150), X.T @ Y)
    np.testing.assert_allclose(common.ridge_cv(X, Y, [10.0])[0], W_ref, atol=1e-4)


def test_design_matrix_zscores_on_the_response_rows_like_the_lab():
    """The lab z-scores the downsampled features over the response rows, then delays. Here the
    delays also read PAD_TRS earlier rows: those must be scaled with the response rows' mean and
    std, not enter them (a DC offset there once gave 0.97 SD errors and a 1.4x std inflation)."""
    rng = np.random.default_rng(0)
    pad, n = common.PAD_TRS, 60
    ds = 10.0 + 10.0 * rng.standard_normal((pad + n, 5))  # large offset, as a TR-level feature mean
    ds[:pad] = 0.0  # before the sound: the features sit far from the story's mean
    delays = (1, 2, 3, 4)
    X = common.design_matrix(ds, delays)
    lab = common.make_delayed(common.zscore(ds[pad:]), delays)  # z-score the response rows, then delay
    k = max(delays)
    np.testing.assert_allclose(X[k:], lab[k:], atol=1e-5)  # rows whose delays stay inside the story
    mu, sd = ds[pad:].mean(0), ds[pad:].std(0)
    for j, d in enumerate(delays):  # earlier rows read the pad with the same scaling
        block = X[:, j * 5:(j + 1) * 5]
        np.testing.assert_allclose(block[:d], (ds[pad - d:pad] - mu) / sd, atol=1e-5)
    np.testing.assert_allclose(X[:, :5].std(0), 1.0, atol=0.1)  # no hidden column-wise penalty
