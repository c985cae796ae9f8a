"""The science the five stages share, in reading order (the machinery is in lib/: README map).
  1. The encoding model (the Huth lab's recipe): lanczos_interp, make_delayed, zscore, pearson_r,
     noise_ceiling, design_matrix, ridge_cv (per-voxel alphas), score_on_test (the test story)
  2. The speech model: load_wavlm (WavLM whose attention LoRA can reach), add_lora
  3. Features: extract_features (causal windows), story_features (one story, cached)
  4. BrainWavLM end to end (Section 2.3): frames -> Lanczos -> norm -> delays -> readout; the loss
  5. Linear probes (Section 3.4): word representations, ridge probes with whole stories held out
"""
import json
import os
import types

import numpy as np
import torch

from lib.batching import (FRAME_WIN, SR, base_wavlm, encode_windows, feature_times, feature_windows,
                          keep_mask_embed, kept_frames, n_frames, story_cnns, window_cnn,
                          window_features, windows_per_batch)
from lib.plumbing import (StudyError, autocast, cached_npz, feature_cache_dir, from_pretrained,
                          load_npz, model_fingerprint, pick_device, progress_bar, sha1, to_device)
from lib.study import stack_responses


# ==== 1. The encoding model (the Huth lab's recipe): numpy in, numpy out, float32 ====

def lanczos_kernel(old_times, new_times, window=3, cutoff_mult=1.0):
    """The lab's lanczosinterp2D as a matrix (new_times x old_times, float64): a Lanczos-windowed
    sinc, cutoff = cutoff_mult / mean spacing of new_times, not normalised (z-scoring absorbs the
    scale)."""
    new_times = np.asarray(new_times, dtype=np.float64)
    cutoff = cutoff_mult / np.mean(np.diff(new_times))
    t = (new_times[:, None] - np.asarray(old_times, dtype=np.float64)[None, :]) * cutoff
    with np.errstate(divide="ignore", invalid="ignore"):
        k = window * np.sin(np.pi * t) * np.sin(np.pi * t / window) / (np.pi ** 2 * t ** 2)
    k[t == 0] = 1.0
    k[np.abs(t) > window] = 0.0
    return k

def lanczos_interp(data, old_times, new_times, window=3, cutoff_mult=1.0):
    """Resample `data` (old_times x features) to new_times (lanczos_kernel). numpy in, float32 out;
    a torch tensor in, a differentiable tensor out."""
    k = lanczos_kernel(old_times, new_times, window, cutoff_mult)
    if torch.is_tensor(data):
        return torch.as_tensor(k, dtype=data.dtype, device=data.device) @ data
    return (k @ np.asarray(data, dtype=np.float64)).astype(np.float32)

def make_delayed(x, delays=(1, 2, 3, 4)):
    """Copies of x (TRs x features, numpy or torch) shifted by each delay, zero-padded, side by
    side: row t holds x[t - d], the stimulus d TRs before the response (a negative d reads later
    rows)."""
    n, zeros = x.shape[-2], (torch.zeros_like if torch.is_tensor(x) else np.zeros_like)
    out = [zeros(x) for _ in delays]
    for shifted, d in zip(out, delays):
        if d >= 0:
            shifted[..., d:, :] = x[..., :max(n - d, 0), :]
        else:
            shifted[..., :max(n + d, 0), :] = x[..., -d:, :]
    return torch.cat(out, dim=-1) if torch.is_tensor(x) else np.concatenate(out, axis=-1)

def zscore(x, axis=0):
    """Per column (mean 0, std 1 along `axis`); a constant column becomes zeros, never NaN."""
    x = np.asarray(x, dtype=np.float32)
    m, s = x.mean(axis=axis, keepdims=True), x.std(axis=axis, keepdims=True)
    return ((x - m) / np.where(s > 0, s, 1.0)).astype(np.float32)

VOXEL_SLICE = 10000  # float64 work goes this many voxels at a time: whole, it is GBs at 81k voxels

def pearson_r(a, b):
    """Pearson r of each column of a with the same column of b (TRs x voxels -> voxels); a constant
    column gives 0, not NaN (it predicts nothing)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"pearson_r: shapes differ {a.shape} vs {b.shape}")
    if a.ndim == 1:
        return pearson_r(a[:, None], b[:, None])[0]
    r = np.empty(a.shape[1], np.float32)
    for v0 in range(0, a.shape[1], VOXEL_SLICE):
        cols = slice(v0, v0 + VOXEL_SLICE)
        x, y = a[:, cols].astype(np.float64), b[:, cols].astype(np.float64)
        x -= x.mean(0)
        y -= y.mean(0)
        den = np.sqrt((x * x).sum(0) * (y * y).sum(0))
        with np.errstate(divide="ignore", invalid="ignore"):
            r[v0:v0 + VOXEL_SLICE] = np.where(den > 0, (x * y).sum(0) / den, 0.0)
    return r

def noise_ceiling(repeats):
    """Per-voxel ceiling on the r any model can reach against the mean of `repeats` (repeats x TRs x
    voxels): CC_max of Schoppe et al. (2016) from the signal power of Sahani & Linden (2003), SP =
    (N var(mean) - mean var(y_n)) / (N - 1), CC_max = sqrt(SP / var(mean)); 0 where SP < 0 (pure
    noise)."""
    repeats = np.asarray(repeats)
    if repeats.ndim != 3 or repeats.shape[0] < 2:
        raise ValueError("noise_ceiling needs (repeats >= 2, TRs, voxels)")
    n, out = repeats.shape[0], np.empty(repeats.shape[2], np.float32)
    for v0 in range(0, repeats.shape[2], VOXEL_SLICE):
        y = repeats[:, :, v0:v0 + VOXEL_SLICE].astype(np.float64)
        var_mean, mean_var = y.mean(0).var(0), y.var(1).mean(0)
        with np.errstate(divide="ignore", invalid="ignore"):
            cc = np.sqrt(np.clip((n * var_mean - mean_var) / (n - 1), 0, None) / var_mean)
        out[v0:v0 + VOXEL_SLICE] = np.clip(np.where(var_mean > 0, cc, 0.0), 0, 1)
    return out

PAD_TRS = 8  # TRs downsampled before the first response row, so delays read real audio, not zeros

def downsample_to_trs(feats, feat_times, tr_times):
    """Frame features (frames x hidden) -> Lanczos -> the response TRs, PAD_TRS more in front."""
    tr_times = np.asarray(tr_times, dtype=np.float64)
    pad = tr_times[0] - np.mean(np.diff(tr_times)) * np.arange(PAD_TRS, 0, -1)
    return lanczos_interp(feats, feat_times, np.concatenate([pad, tr_times]))

def design_matrix(ds, delays=(1, 2, 3, 4), story_start="audio"):
    """Downsampled features (PAD_TRS + TRs rows) -> z-scored -> delayed, one row per response TR. As
    the lab's, mean and std come from the response rows; the pad rows, which the delays read,
    too. story_start 'zeros': the delays read zeros before the first response row (the lab's
    make_delayed on the response rows alone, as the authors' refit)."""
    if max(delays) > PAD_TRS:
        raise StudyError(f"delays up to {PAD_TRS} TRs are supported (got {max(delays)})")
    x = np.asarray(ds, dtype=np.float32)
    mean, std = x[PAD_TRS:].mean(0), x[PAD_TRS:].std(0)
    z = (x - mean) / np.where(std > 0, std, 1.0)
    z = make_delayed(z[PAD_TRS:] if story_start == "zeros" else z, delays)
    return z if story_start == "zeros" else z[PAD_TRS:]

# The lab's bootstrap_ridge grid logspace(1, 3) is logspace(2, 6) in this (himalaya) convention; the
# grid reaches lower so small studies (a few hundred TRs) find their optimum too.
ALPHAS = np.logspace(0, 6, 13)

def contiguous_folds(n_samples, n_folds=5):
    """K folds of contiguous TR blocks (fMRI is autocorrelated: shuffling single TRs leaks)."""
    edges, idx = np.linspace(0, n_samples, n_folds + 1).astype(int), np.arange(n_samples)
    return [(np.concatenate([idx[:a], idx[b:]]), idx[a:b]) for a, b in zip(edges[:-1], edges[1:])]

def bootstrap_folds(n_samples, n_boots=3, chunk_trs=40, held_out=0.25, seed=0):
    """The lab's bootstrap_ridge splits (the authors' refit): n_boots draws, each holding out
    int(held_out * n / chunk_trs) random chunks of chunk_trs TRs (never the rows past the last whole
    chunk). Seeded here; theirs is not."""
    rng, chunks = np.random.default_rng(seed), np.arange(n_samples // chunk_trs * chunk_trs)
    chunks, n_held = chunks.reshape(-1, chunk_trs), int(n_samples * held_out / chunk_trs)
    held = [np.sort(chunks[rng.permutation(len(chunks))[:n_held]].ravel()) for _ in range(n_boots)]
    return [(np.setdiff1d(np.arange(n_samples), h), h) for h in held]

RIDGES = ("folds", "bootstrap")  # fit_ridge's

def fit_ridge(X, Y, alphas=ALPHAS, n_folds=5, ridge="folds", device="cpu"):
    """ridge_cv with a recipe's splits: 'folds' (ours: n_folds contiguous blocks, ties to the larger
    alpha as himalaya) or 'bootstrap' (the lab's bootstrap_ridge, ties to the smaller)."""
    if ridge == "bootstrap":
        return ridge_cv(X, Y, alphas, folds=bootstrap_folds(len(X)), device=device, ties="smaller")
    return ridge_cv(X, Y, alphas, n_folds=n_folds, device=device)

def ridge_cv(X, Y, alphas=ALPHAS, n_folds=5, folds=None, device="cpu", voxel_batch=None,
             ties="larger"):
    """Ridge X -> Y with one alpha per voxel (column of Y), picked by K-fold CV on contiguous
    blocks. Every alpha from one eigendecomposition per fold (X^T X = V S^2 V^T, W = V (S^2 +
    alpha)^-1 V^T X^T Y), scored by the Pearson r of held-out predictions (mean over folds); each
    voxel's best (ties to the larger, as himalaya) is refit on all rows. No intercept: z-score X and
    Y first. The lab's bootstrap_ridge alpha a is a^2 here. X^T Y is formed once, r's numerator
    needs no prediction, prediction norms come from Gram matrices; voxels go in batches (Y batch <
    256 MB). ties 'smaller': the first best alpha (the lab's argmax). Returns (weights: features x
    voxels, best_alphas: voxels, cv_r: alphas x voxels)."""
    dev = torch.device(device)
    X, Y = np.asarray(X, dtype=np.float32), np.asarray(Y, dtype=np.float32)
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"ridge_cv: X {X.shape} and Y {Y.shape} must be 2-D with the same rows")
    alphas = np.asarray(alphas, dtype=np.float64).ravel()
    folds = folds if folds is not None else contiguous_folds(X.shape[0], n_folds)
    n_vox = Y.shape[1]
    voxel_batch = voxel_batch or int(np.clip(2 ** 28 // (4 * X.shape[0]), 1000, 10000))
    Xt = torch.from_numpy(X).to(dev)
    X64 = Xt.double()  # float64 for the eigenproblems: squaring X squares its condition number
    wide = X.shape[0] <= X.shape[1]  # fewer rows than features (a small study, a wide model)
    gram = None if wide else X64.T @ X64

    def eig_basis(rows):
        """Eigenpairs of X[rows]^T X[rows]; with fewer rows than features, from the rows x rows Gram
        matrix (X^T Y lies in the span of X's rows)."""
        if not wide:  # the whole Gram matrix minus the rows left out
            rest = torch.as_tensor(np.setdiff1d(np.arange(X.shape[0]), rows), device=dev)
            lam, V = torch.linalg.eigh(gram - X64[rest].T @ X64[rest])
            return lam.clamp(min=0), V.float()
        Xr = X64[torch.as_tensor(rows, device=dev)]
        lam, U = torch.linalg.eigh(Xr @ Xr.T)
        keep = lam > lam.max() * 1e-10
        return lam[keep], (Xr.T @ U[:, keep] / lam[keep].sqrt()).float()

    # per fold: held-out rows, eigenvalues, eigenvectors, held-out X in that basis, its Gram
    basis = []
    for train, test in folds:
        test = torch.as_tensor(test, device=dev)
        lam, V = eig_basis(train)
        P = Xt[test] @ V
        # p x p Gram of the centred rows: 5x cheaper norms at UTS01's shape
        Pc = (P - P.mean(0)).double()
        basis.append((test, lam, V, P, (Pc.T @ Pc).float() if P.shape[0] > P.shape[1] else None))
    cv_r = torch.zeros(len(alphas), n_vox, dtype=torch.float64, device=dev)
    W = np.zeros((X.shape[1], n_vox), dtype=np.float32)
    best_alphas = np.zeros(n_vox, dtype=np.float32)
    lam_all, V_all = eig_basis(np.arange(X.shape[0]))
    for v0 in range(0, n_vox, voxel_batch):
        Yb = torch.from_numpy(np.ascontiguousarray(Y[:, v0:v0 + voxel_batch])).to(dev)
        sl, XtY = slice(v0, v0 + Yb.shape[1]), Xt.T @ Yb
        for test, lam, V, P, G in basis:
            Yte = Yb[test]
            Z = V.T @ (XtY - Xt[test].T @ Yte)  # training X^T Y in the eigenbasis
            yz = Yte - Yte.mean(0)
            # r's numerator, without predictions
            cross = P.T @ (yz / yz.norm(dim=0).clamp(min=1e-12))
            pmean = P.mean(0)
            for a, alpha in enumerate(alphas):
                EZ = Z / (lam.float() + float(alpha))[:, None]
                if G is not None:
                    norm = ((G @ EZ) * EZ).sum(0).clamp(min=0).sqrt()
                else:
                    norm = (P @ EZ - (pmean @ EZ)[None]).norm(dim=0)
                cv_r[a, sl] += ((cross * EZ).sum(0) / norm.clamp(min=1e-12)).double()
        score = cv_r[:, sl] / len(folds)
        log_alphas = torch.log(torch.as_tensor(alphas, device=dev))
        nudge = 1e-10 * log_alphas[:, None] if ties == "larger" else 0.0
        best = torch.argmax(score + nudge, 0)  # ties to the larger alpha, or the first
        a_best = torch.as_tensor(alphas, device=dev)[best]
        shrink = (lam_all[:, None] + a_best[None, :]).float()
        W[:, sl] = (V_all @ (V_all.T @ XtY / shrink)).cpu().numpy()
        best_alphas[sl] = a_best.cpu().numpy()
    return W, best_alphas, (cv_r / len(folds)).float().cpu().numpy()

def ridge_predict(X, W, device="cpu", voxel_batch=20000):
    """X @ W in float32, batched over voxels; numpy in, numpy out."""
    Xt = torch.from_numpy(np.asarray(X, dtype=np.float32)).to(torch.device(device))
    out = np.zeros((X.shape[0], W.shape[1]), dtype=np.float32)
    for v0 in range(0, W.shape[1], voxel_batch):
        Wb = np.ascontiguousarray(W[:, v0:v0 + voxel_batch], dtype=np.float32)
        Wb = torch.from_numpy(Wb).to(Xt.device)
        out[:, v0:v0 + Wb.shape[1]] = (Xt @ Wb).cpu().numpy()
    return out

def score_on_test(features, subject_data, study, delays=(1, 2, 3, 4), alphas=ALPHAS, device="cpu",
                  n_folds=5, Y=None, ridge="folds", fit_stories="train+val", story_start="audio"):
    """Stage 02's recipe for one layer: ridge (fit_ridge) on the train + validation stories
    (fit_stories 'train': the training stories alone, as the authors' refit; Y: their responses, if
    the caller holds them), Pearson r per voxel on the test story. Returns (test_r, W, alphas)."""
    fit = study["train"] + (study["val"] if fit_stories == "train+val" else [])
    X = np.vstack([design_matrix(features[s], delays, story_start) for s in fit])
    Y = stack_responses(subject_data, fit) if Y is None else Y
    W, best_alphas, _ = fit_ridge(X, Y, alphas, n_folds, ridge, device)
    del Y  # our own stack (if we read one) goes before the prediction
    pred = ridge_predict(design_matrix(features[study["test"]], delays, story_start), W, device)
    return pearson_r(subject_data["test_resp"], pred), W, best_alphas

def ridge_recipe(baseline):
    """Stage 02's ridge settings from its results npz: stages 03-04 score tuned features so."""
    named = dict(n_folds=5, ridge="folds", fit_stories="train+val", story_start="audio")
    return dict({k: type(d)(baseline.get(k, d)) for k, d in named.items()},  # older: the defaults
                delays=tuple(int(x) for x in baseline["delays"]),
                alphas=np.asarray(baseline.get("alpha_grid", ALPHAS), np.float64))

def untuned_features(baseline, layer, study, device="cpu"):
    """The untuned model's features of every story at `layer` (stage 02's model and window, from
    its cache): what a tuned model's features are compared with."""
    model = load_wavlm(str(baseline["model"]), int(baseline["model_seed"]), device)
    window = scoring_window(baseline)
    cache = feature_cache_dir(study["data"], str(baseline["model"]), int(baseline["model_seed"]),
                              *window)
    stories = study["train"] + study["val"] + [study["test"]]
    return {s: story_features(model, model_fingerprint(model), cache,
                              os.path.join(study["data"], "stories", f"{s}.npz"), *window[:2],
                              data=study["data"], take=window[2])[layer] for s in stories}

def scoring_window(baseline):
    """Stage 02's windows, which every scoring of tuned features shares: (context, stride, take)."""
    take = str(baseline.get("window_feature", "stride"))
    return float(baseline["context_s"]), float(baseline["stride_s"]), take

def untuned_r(baseline, layer, subject_data, study, device="cpu"):
    """The yardstick of every tuned model: the untuned model read out at `layer`, on the subject of
    stage 02's result `baseline`, scored with that result's recipe (like for like). At stage 02's
    own layer it is stage 02's test r; at another, the untuned features are scored here."""
    if layer == int(baseline["best_layer"]):
        return baseline["test_r"]
    features = untuned_features(baseline, layer, study, device)
    return score_on_test(features, subject_data, study, device=device, **ridge_recipe(baseline))[0]

def ridge_fixed(X, Y, alphas, device="cpu"):
    """Ridge weights X -> Y with a given alpha per voxel, W = V (S^2 + alpha)^-1 V^T X^T Y (as
    ridge_cv's refit): the authors refit every epoch after the first with epoch 0's alphas."""
    Xt = torch.from_numpy(np.asarray(X, dtype=np.float32)).to(torch.device(device))
    lam, V = torch.linalg.eigh(Xt.double().T @ Xt.double())
    lam, V = lam.clamp(min=0).float(), V.float()
    Z = V.T @ (Xt.T @ torch.from_numpy(np.asarray(Y, dtype=np.float32)).to(Xt.device))
    shrink = lam[:, None] + torch.as_tensor(np.asarray(alphas), device=Xt.device).float()[None]
    return (V @ (Z / shrink)).cpu().numpy()

def linearized_val_r(features, Y_train, val_resp, study, recipe, alphas=None, device="cpu"):
    """The authors' choice of epoch (brain_best_linear.py): features through a ridge on the training
    stories, Pearson r on each validation story, the mean over stories, then voxels (NaN-safe).
    alphas: each voxel's (epoch 0's), else chosen by the recipe's ridge. Returns (r, alphas)."""
    X = np.vstack([design_matrix(features[s], recipe["delays"], recipe["story_start"])
                   for s in study["train"]])
    if alphas is None:
        W, alphas, _ = fit_ridge(X, Y_train, recipe["alphas"], recipe["n_folds"], recipe["ridge"],
                                 device)
    else:
        W = ridge_fixed(X, Y_train, alphas, device)
    r = [pearson_r(y, ridge_predict(design_matrix(features[s], recipe["delays"],
                                                  recipe["story_start"]), W, device))
         for s, y in val_resp.items()]
    return float(np.nanmean(np.mean(r, axis=0))), alphas

# ==== 2. The speech model: WavLM with attention that LoRA can reach ====

PRETRAINED_TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models",
                               "wavlm-tiny-pretrained")  # models/pretrain_tiny.py made it

def tiny_config(hidden=96, layers=3, heads=4, conv=128):
    """A small WavLM (~0.6M parameters): wavlm-base-plus's architecture and frame rate, narrower,
    with a per-frame (layer-norm) CNN, no conv biases, 128 channels (bench/tiny_model.py's best)."""
    from transformers import WavLMConfig
    return WavLMConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       intermediate_size=2 * hidden, conv_dim=(conv,) * 7, conv_bias=False,
                       feat_extract_norm="layer", num_conv_pos_embeddings=32,
                       num_conv_pos_embedding_groups=4,
                       hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                       feat_proj_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0,
                       apply_spec_augment=False, num_buckets=64, max_bucket_distance=200)

def relative_position_bias(attn, length):
    """WavLM's relative position bias (1 x heads x length x length) from layer 1's embedding. The
    buckets depend on the length alone, so they are built once per length and device and kept
    there (transformers rebuilds them in every forward); the embedding lookup stays in the forward,
    since full fine-tuning trains it. Broadcast over the batch, never repeated."""
    device = attn.rel_attn_embed.weight.device
    cache = attn.__dict__.setdefault("_bias_buckets", {})
    if (length, device) not in cache:
        pos = torch.arange(length, device=device)
        cache[length, device] = attn._relative_positions_bucket(pos[None, :] - pos[:, None])
    return attn.rel_attn_embed(cache[length, device]).permute(2, 0, 1).unsqueeze(0)

def _attention_forward(self, hidden_states, attention_mask=None, position_bias=None, index=0,
                       **kwargs):
    """WavLM self-attention that calls q_proj/k_proj/v_proj/out_proj as modules. Stock transformers
    hands their weights straight to F.multi_head_attention_forward, so LoRA wrappers are never
    called and PEFT trains nothing, silently. Same maths (gated relative position bias as an
    additive mask, padding masked out) through the modules and scaled_dot_product_attention."""
    bsz, tgt_len, _ = hidden_states.size()
    q, k, v = (proj(hidden_states).view(bsz, tgt_len, self.num_heads, self.head_dim).transpose(1, 2)
               for proj in (self.q_proj, self.k_proj, self.v_proj))
    if position_bias is None:  # layer 1 makes it; the layers above receive it
        position_bias = relative_position_bias(self, tgt_len).to(q.dtype)  # bf16 under autocast
    # gate of the relative position bias, computed from the hidden states as in WavLM
    gated = hidden_states.view(hidden_states.shape[:-1] + (self.num_heads, -1)).permute(0, 2, 1, 3)
    gates = self.gru_rel_pos_linear(gated).view(gated.shape[:-1] + (2, 4)).sum(-1)
    gate_a, gate_b = torch.sigmoid(gates).chunk(2, -1)
    gate = (gate_a * (gate_b * self.gru_rel_pos_const - 1.0) + 2.0).to(q.dtype)
    if attention_mask is None:
        bias = gate * position_bias  # batch x heads x T x T: broadcast, not repeated
    else:  # padded keys get -inf, added in the same pass as the gate's product (0 elsewhere: exact)
        pad = torch.zeros(attention_mask.shape, dtype=q.dtype, device=q.device)
        pad = pad.masked_fill(attention_mask.ne(1), float("-inf"))[:, None, None, :]
        bias = torch.addcmul(pad, gate, position_bias)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0)
    out = self.out_proj(out.transpose(1, 2).reshape(bsz, tgt_len, self.embed_dim))
    return out, None, position_bias

def make_lora_able(model):
    """Route every WavLM attention through _attention_forward (see there). Returns the model."""
    for module in model.modules():
        if type(module).__name__ == "WavLMAttention":
            module.forward = types.MethodType(_attention_forward, module)
    return model

def load_wavlm(name="tiny", seed=0, device=None, config=None):
    """`tiny`: a seeded random tiny WavLM (`config`, default tiny_config()); `tiny-pretrained`: this
    repository's self-supervised one (models/); else a Hugging Face id or folder (e.g.
    microsoft/wavlm-base-plus). LayerDrop and SpecAugment off (stage 03 may set them), CNN frozen,
    attention LoRA-able, eval mode; the mask embedding kept beside the weights (keep_mask_embed)."""
    from transformers import WavLMModel
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # "Loading weights" bars: noise around our one-line errors
    name = PRETRAINED_TINY if name == "tiny-pretrained" else name
    if name == "tiny":
        torch.manual_seed(seed)
        model, info = WavLMModel(config if config is not None else tiny_config()), None
    else:  # the checkpoint's own mask probability, so that its masked_spec_embed is read
        model, info = from_pretrained(WavLMModel, name, layerdrop=0.0, mask_feature_prob=0.0,
                                      output_loading_info=True)
    keep_mask_embed(model, seed, info)
    model.config.layerdrop, model.config.mask_time_prob = 0.0, 0.0
    model.config.apply_spec_augment = False  # batching masks (hidden_states_from_cnn)
    model.freeze_feature_encoder()
    return make_lora_able(model).to(pick_device(device)).eval()

def add_lora(model, rank=4, alpha=4, dropout=0.1, targets=("q_proj", "k_proj", "v_proj")):
    """Wrap `targets` of every layer with LoRA adapters (peft); only the adapters train. An unknown
    target is one clear error naming the model's adaptable layers (peft's is a traceback)."""
    from peft import LoraConfig, get_peft_model
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and not n.startswith("feature_extractor")})
    unknown = [t for t in targets if t not in linear]
    if unknown:
        raise StudyError(f"--lora-targets {' '.join(unknown)}: not a linear layer of this model; "
                         f"choose from {' '.join(linear)}")
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                                            target_modules=list(targets)))

# ==== 3. Features: causal windows over a story, Lanczos-downsampled to its TRs ====

def extract_features(model, audio, sr=16000, layers=None, context_s=16.0, stride_s=4.0, grad=False,
                     progress=False, cnn=None, take="stride"):
    """Causal WavLM features of one story: its windows (feature_windows; the lab's recipe is 16 s
    of context every 0.1 s, costing (context_s + stride_s) / stride_s model-seconds per second), as
    many per forward as memory allows. cnn: story_cnn(s)' output, if the caller has it. Returns
    (feats, times): feats[i] (features x hidden; a tensor on the model's device when grad) is
    hidden state layers[i] (0: the first layer's input); times: the features' times in seconds."""
    m = base_wavlm(model)
    if sr != 16000:
        raise StudyError(f"WavLM needs 16 kHz audio, got {sr} Hz; resample first (stage 01 does)")
    n_layers = m.config.num_hidden_layers
    layers = list(range(n_layers + 1)) if layers is None else [int(x) for x in layers]
    if not all(0 <= layer <= n_layers for layer in layers):
        raise StudyError(f"layers {layers} out of range: this model has hidden states "
                         f"0..{n_layers}")
    x = torch.as_tensor(audio, dtype=torch.float32, device=next(m.parameters()).device).reshape(-1)
    F = n_frames(len(x))
    if F < 1:
        raise StudyError(f"audio of {len(x)} samples is shorter than one WavLM frame "
                         f"({FRAME_WIN} samples)")
    whole = cnn.get(0) if isinstance(cnn, dict) else cnn  # the story's own frame grid
    if whole is not None and len(whole) != F:
        raise StudyError(f"precomputed CNN output has {len(whole)} frames, the audio {F}")
    windows, times = feature_windows(len(x), context_s, stride_s, take)
    if not windows:
        raise StudyError(f"audio of {len(x) / SR:g} s is shorter than one window step "
                         f"({stride_s:g} s)")
    cnns = window_cnn(m, x, windows, cnn)
    n = windows_per_batch(m, max(n_frames(b - a) for a, b, _, _ in windows), x.device, grad)
    batches = [range(i, min(i + n, len(windows))) for i in range(0, len(windows), n)]
    out = [[] for _ in layers]
    with torch.set_grad_enabled(grad), autocast(x.device):
        for batch in progress_bar(batches, "    windows") if progress else batches:
            states = encode_windows(model, [cnns[i] for i in batch], max(layers))
            for li, layer in enumerate(layers):
                out[li].append(kept_frames(states[layer], [windows[i] for i in batch]).float())
    feats = [torch.cat(o) for o in out]  # on the device until the story is done
    feats = feats if grad else [f.cpu().numpy() for f in feats]
    return feats, feature_times(times, 0, len(feats[0]))

def story_features(model, fingerprint, cache_dir, story_npz, context_s, stride_s, refresh=False,
                   progress=False, top_layer=None, cnn=None, data=None, take="stride"):
    """Hidden states 0..top_layer (default: all) of one story, downsample_to_trs'd ((PAD_TRS + TRs)
    x hidden each), cached in <cache_dir>/<story>.npz (None: not cached) under the model's
    fingerprint, the windows (take: feature_windows'), the audio and the TR times. cnn: the story's
    story_cnns (else computed, cached in `data`)."""
    name = os.path.basename(story_npz)[:-4]
    story = load_npz(story_npz, "story file")
    n_states = (base_wavlm(model).config.num_hidden_layers if top_layer is None else top_layer) + 1

    def compute():
        c = cnn if cnn is not None or data is None else story_cnns(
            model, story["audio"], context_s, stride_s, take, data, name)
        feats, times = extract_features(model, story["audio"], int(story["sr"]), range(n_states),
                                        context_s, stride_s, progress=progress, cnn=c, take=take)
        return np.stack([downsample_to_trs(f, times, story["tr_times"]) for f in feats])
    if cache_dir is None:  # uncached (a tuned model's epoch): no key to hash the audio for
        return compute()
    key = dict(model=fingerprint, context_s=context_s, stride_s=stride_s, pad=PAD_TRS,
               layers=n_states, audio=sha1(story["audio"]), tr_times=sha1(story["tr_times"]))
    key = json.dumps(key if take == "stride" else dict(key, take=take), sort_keys=True)
    return cached_npz(os.path.join(cache_dir, f"{name}.npz"), key, compute, "ds", refresh)

# ==== 4. BrainWavLM, end to end: WavLM layer -> Lanczos -> norm -> delays -> readout ====

def make_readout(n_in, n_vox, bottleneck, init="default"):
    """BrainWavLM's readout: a bottleneck shared by every subject (Linear n_in -> bottleneck; none
    when 0) and one output layer per subject, {subject: voxels} (a joint run has several). init
    'xavier': every weight xavier-uniform, as the authors' (biases torch's default)."""
    layers = {"bottleneck": torch.nn.Linear(n_in, bottleneck)} if bottleneck else {}
    layers.update({s: torch.nn.Linear(bottleneck or n_in, n) for s, n in n_vox.items()})
    if init == "xavier":
        for layer in layers.values():
            torch.nn.init.xavier_uniform_(layer.weight)
    return torch.nn.ModuleDict(layers)

def read_out(readout, x):
    """Each subject's predicted responses ({subject: rows x voxels}, float32): the shared
    bottleneck once, then the subject's output layer."""
    z = readout["bottleneck"](x) if "bottleneck" in readout else x
    return {s: head(z).float() for s, head in readout.items() if s != "bottleneck"}

def delay_reach(delays):
    """TRs the delays read before and after a block (a negative delay reads later rows)."""
    return max(0, max(delays)), max(0, -min(delays))

def block_span(story, i0, i1, delays, history="real"):
    """What rows i0..i1 of a story need: the TR grid that feeds their delays (rows i0 - max delay ..
    i1; history 'zeros': the block's rows alone, as the authors' zero-padded delays) and the windows
    [w0, w1) of the story whose kept features the Lanczos window (3 TRs each side) reaches from it.
    The block's features are then exactly the whole story's."""
    tr = np.mean(np.diff(story["tr_times"]))
    before, after = delay_reach(delays) if history == "real" else (0, 0)
    grid = story["tr_times"][0] + tr * np.arange(i0 - before, i1 + after)
    keep = story["offsets"]
    reach = np.array([grid[0] - 3 * tr, grid[-1] + 3 * tr])  # seconds
    first, last = (reach * SR - story["times"][0]) / story["times"][1]  # in features
    w0 = max(0, int(np.searchsorted(keep, np.ceil(first), "right")) - 1)
    return grid, w0, max(w0 + 1, int(np.searchsorted(keep, np.floor(last), "right")))

_KERNELS = {}  # Lanczos matrices on a device: the grids are regular, so blocks share a few

def block_kernel(story, grid, w0, w1, device, dtype, floor=None):
    """The Lanczos matrix from the kept features of windows w0..w1 to the block's grid, on
    `device`. It depends on the two grids' lengths and steps and the grid's offset from the first
    feature alone: keyed by those (to the nanosecond) and built from them, once, the same whichever
    block asks first (a resumed run equals an uninterrupted one). floor: entries below it set to 0
    (the authors' training kernel: `K[K < 1e-10] = 0`, which also drops the negative lobes)."""
    f0, n = window_features(story, w0, w1)
    tr = np.mean(np.diff(story["tr_times"]))
    offset_ns = round((grid[0] - feature_times(story["times"], f0, 1)[0]) * 1e9)
    key = (n, len(grid), offset_ns, round(tr * 1e9), story["times"][1], floor, str(device), dtype)
    if key not in _KERNELS:
        old = np.arange(n) * (story["times"][1] / SR)
        new = offset_ns * 1e-9 + key[3] * 1e-9 * np.arange(max(2, len(grid)))  # the cutoff: 1 / TR
        k = lanczos_kernel(old, new)[:len(grid)]
        if floor is not None:
            k[k.astype(np.float32) < floor] = 0.0  # theirs compares the float32 kernel
        _KERNELS[key] = to_device(k, device).to(dtype)
    return _KERNELS[key]

def block_inputs(model, stories, blocks, layer, delays=(1, 2, 3, 4), norm="block",
                 history="real", floor=None):
    """The readout's input for blocks [(story, i0, i1), ...] from ONE WavLM forward (a step is all
    its blocks at once): every window they need -> hidden state `layer`'s kept features -> each
    block's differentiable Lanczos to its grid (block_kernel, `floor`) -> per-feature norm over the
    block -> delays (readout_input: `norm`, `history`). Returns (rows of every block one under the
    other x delays * hidden, the blocks' order in it)."""
    spans, cnns, windows = [], [], []
    for s, i0, i1 in blocks:
        grid, w0, w1 = block_span(stories[s], i0, i1, delays, history)
        n = window_features(stories[s], w0, w1)[1]
        spans.append((s, grid, w0, w1, sum(k1 - k0 for _, _, k0, k1 in windows), n))
        cnns += stories[s]["window_cnn"][w0:w1]
        windows += stories[s]["windows"][w0:w1]
    frames = kept_frames(encode_windows(model, cnns, layer)[layer], windows).float()
    groups = {}  # blocks of one length are normalised and delayed together
    for j, (s, grid, w0, w1, f, n) in enumerate(spans):
        k = block_kernel(stories[s], grid, w0, w1, frames.device, frames.dtype, floor)
        groups.setdefault(len(grid), []).append((j, k @ frames[f:f + n]))
    x = [readout_input(torch.stack([x for _, x in g]), delays, norm, history).flatten(0, 1)
         for g in groups.values()]
    return (torch.cat(x) if len(x) > 1 else x[0]), [j for g in groups.values() for j, _ in g]

def readout_input(x, delays=(1, 2, 3, 4), norm="block", history="real"):
    """Blocks x grid rows x hidden -> per-feature norm over each block's rows -> delays. norm
    'block': z-score with the unbiased std + 1e-5; 'instance': the authors' InstanceNorm1d (in
    training mode, validation too): biased variance, 1e-5 inside the root; 'none'. history 'real':
    the grid starts max(delays) rows early, so each delayed copy reads real rows (make_delayed
    without its zero padding); 'zeros': the block's own rows, zeros before (their DelayFeatures)."""
    if norm == "block":
        # Per-feature normalisation over the block (the paper's readout starts with an
        # InstanceNorm): a block is all one step sees, so it is normalised on its own
        # (docs/methods.md: --norm none)
        x = (x - x.mean(-2, keepdim=True)) / (x.std(-2, keepdim=True) + 1e-5)
    elif norm == "instance":
        x = (x - x.mean(-2, keepdim=True)) / torch.sqrt(x.var(-2, correction=0, keepdim=True)
                                                         + 1e-5)
    if history == "zeros":
        return make_delayed(x, delays)
    before, after = delay_reach(delays)
    n = x.shape[-2]
    return torch.cat([x[..., before - d:n - after - d, :] for d in delays], -1)

def tr_correlations(pred, y):
    """The correlation across voxels at each TR (row) of pred and y."""
    p = pred - pred.mean(-1, keepdim=True)
    q = y - y.mean(-1, keepdim=True)
    return (p * q).sum(-1) / (p.norm(dim=-1) * q.norm(dim=-1) + 1e-8)

def spatial_corr_loss(pred, y):
    """-(1/T) sum_t corr_voxels(pred[t], y[t]): the paper's loss; blind to each TR's scale."""
    return -tr_correlations(pred, y).mean()

def blocks_loss(pred, y, rows, loss="corr"):
    """The sum over blocks of each block's loss (the spatial correlation loss, or the mean squared
    error) in one pass: pred, y the rows of every block one under the other (block_inputs), `rows`
    each block's count; a row's loss weighs 1 / its block's rows."""
    per_row = -tr_correlations(pred, y) if loss == "corr" else ((pred - y) ** 2).mean(-1)
    weights = to_device(np.repeat(1.0 / np.array(rows), rows).astype(np.float32), per_row.device)
    return (per_row * weights).sum()

def predict_story(model, readout, story, layer, block_trs, delays=(1, 2, 3, 4), norm="block",
                  history="real", floor=None):
    """A whole story's predicted responses of each subject of the readout ({subject: rows x
    voxels}), in the blocks training sees (block_inputs' settings), without a gradient: as many
    blocks per forward as memory allows."""
    rows = len(story["tr_times"])
    blocks = [("s", i, min(rows, i + block_trs)) for i in range(0, rows, block_trs)]
    longest = max(n_frames(b - a) for a, b, _, _ in story["windows"])
    spans = [block_span(story, i0, i1, delays, history) for _, i0, i1 in blocks]
    widest = max(w1 - w0 for _, w0, w1 in spans)  # windows a block needs
    per = max(1, windows_per_batch(model, longest, story["audio"].device) // widest)
    out = {}
    with torch.no_grad(), autocast(story["audio"].device):
        for j in range(0, len(blocks), per):
            x, order = block_inputs(model, {"s": story}, blocks[j:j + per], layer, delays, norm,
                                    history, floor)
            sizes = [blocks[j + i][2] - blocks[j + i][1] for i in order]
            for s, pred in read_out(readout, x).items():
                out.setdefault(s, []).extend(p for _, p in sorted(zip(order, pred.split(sizes)),
                                                                   key=lambda o: o[0]))
    return {s: torch.cat(p).cpu().numpy() for s, p in out.items()}

# ==== 5. Linear probes (Section 3.4): what a model's layers hold about each word ====

def word_representations(model, story, cnn, context_s, stride_s, take="stride"):
    """(layers x words x hidden): each layer's features (feature_windows') averaged within each
    word's span. cnn: the story's frozen CNN output (story_cnn), the same for every model
    compared."""
    feats, times = extract_features(model, story["audio"], context_s=context_s, stride_s=stride_s,
                                    cnn=cnn, take=take)
    out = np.zeros((len(feats), len(story["words"]), feats[0].shape[1]), np.float32)
    for w, (a, b) in enumerate(zip(story["word_onsets"], story["word_offsets"])):
        sel = (times >= a) & (times <= b)
        if not sel.any():  # a word shorter than a frame: its nearest frame
            sel = np.abs(times - (a + b) / 2) == np.abs(times - (a + b) / 2).min()
        for li, f in enumerate(feats):
            out[li, w] = f[sel].mean(0)
    return out

def probe(X, Y, groups, n_folds, classes=None, per_fold=None, device="cpu"):
    """Ridge probe with whole stories held out: mean r over target dims, or accuracy for classes.
    per_fold: a list that receives the same score on each fold's held-out stories (its spread)."""
    stories = np.unique(groups)
    folds = np.array_split(stories, min(n_folds, len(stories)))
    pred = np.zeros_like(Y)

    def score(p, rows):
        if classes is not None:
            return float(np.mean(np.argmax(p, 1) == classes[rows]))
        return float(np.mean(pearson_r(Y[rows], p)))

    for held in folds:
        te = np.isin(groups, held)
        mu, sd = X[~te].mean(0), X[~te].std(0) + 1e-6
        ym, ys = Y[~te].mean(0), Y[~te].std(0) + 1e-6
        W, _, _ = ridge_cv((X[~te] - mu) / sd, (Y[~te] - ym) / ys, n_folds=5, device=device)
        pred[te] = ((X[te] - mu) / sd) @ W * ys + ym
        if per_fold is not None:
            per_fold.append(score(pred[te], te))
    return score(pred, np.ones(len(Y), bool))
