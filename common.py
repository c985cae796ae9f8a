"""Shared pieces of the BrainWavLM study: what two or more stages use.

Contents, in reading order (section 5 is plumbing: skip it on a first read):
  1. Encoding-model numerics: lanczos_interp, make_delayed, zscore, pearson_r, noise_ceiling,
     design_matrix (features -> ridge design), ridge_cv (per-voxel alphas), score_on_test
  2. The speech model: load_wavlm (WavLM whose attention LoRA can reach), add_lora
  3. Features: extract_features (causal windows), story_features (one story, cached)
  4. Data: load_study, load_subject (lazy), stack_responses, log_mel
  5. Plumbing: StudyError, devices, save_npz / load_npz, run and cache names, shared flags
"""
import itertools
import os
import sys
import tempfile
import warnings

import numpy as np
import torch

# peft's save_pretrained calls a transformers method deprecated in v5; nothing a user can act on
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


# ---------------------------------------------------------------------------------------------
# 1. Encoding-model numerics (the Huth lab's recipe): numpy in, numpy out, float32
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


# pearson_r and noise_ceiling work in float64 on this many voxels at a time: whole, their float64
# copies are GBs at UTS01's 81,126 voxels
VOXEL_SLICE = 10000


def pearson_r(a, b):
    """Pearson correlation of each column of a with the same column of b (TRs x voxels -> voxels).

    A constant column gives 0, not NaN (it predicts nothing).
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"pearson_r: shapes differ {a.shape} vs {b.shape}")
    if a.ndim == 1:
        return pearson_r(a[:, None], b[:, None])[0]
    r = np.empty(a.shape[1], np.float32)
    for v0 in range(0, a.shape[1], VOXEL_SLICE):
        x = a[:, v0:v0 + VOXEL_SLICE].astype(np.float64)
        y = b[:, v0:v0 + VOXEL_SLICE].astype(np.float64)
        x -= x.mean(0)
        y -= y.mean(0)
        den = np.sqrt((x * x).sum(0) * (y * y).sum(0))
        with np.errstate(divide="ignore", invalid="ignore"):
            r[v0:v0 + VOXEL_SLICE] = np.where(den > 0, (x * y).sum(0) / den, 0.0)
    return r


def noise_ceiling(repeats):
    """Per-voxel ceiling on the correlation any model can reach against the mean of the repeats.

    `repeats`: (n_repeats, TRs, voxels). Estimator: CC_max of Schoppe et al. (2016, Front. Comput.
    Neurosci. 10:10), built on the signal-power estimate of Sahani & Linden (2003, NIPS). With
    y_n = s + e_n, var(mean_n y_n) = SP + NP/N and mean_n var(y_n) = SP + NP, so
        SP = (N var(mean) - mean var(y_n)) / (N - 1),   CC_max = sqrt(SP / var(mean)).
    A negative SP estimate (pure noise voxel) gives 0. Same units as Pearson r.
    """
    repeats = np.asarray(repeats)
    if repeats.ndim != 3 or repeats.shape[0] < 2:
        raise ValueError("noise_ceiling needs (repeats >= 2, TRs, voxels)")
    n, out = repeats.shape[0], np.empty(repeats.shape[2], np.float32)
    for v0 in range(0, repeats.shape[2], VOXEL_SLICE):
        y = repeats[:, :, v0:v0 + VOXEL_SLICE].astype(np.float64)
        var_mean = y.mean(0).var(0)
        mean_var = y.var(1).mean(0)
        sp = (n * var_mean - mean_var) / (n - 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            cc = np.where(var_mean > 0, np.sqrt(np.clip(sp, 0, None) / var_mean), 0.0)
        out[v0:v0 + VOXEL_SLICE] = np.clip(cc, 0, 1)
    return out


PAD_TRS = 8  # TRs downsampled before the first response row, so delays read real audio, not zeros


def tr_grid(tr_times, pad=PAD_TRS):
    """The response TR times with `pad` earlier TRs in front (features there feed the delays)."""
    tr_times = np.asarray(tr_times, dtype=np.float64)
    tr = np.mean(np.diff(tr_times))
    return np.concatenate([tr_times[0] - tr * np.arange(pad, 0, -1), tr_times])


def downsample_to_trs(feats, feat_times, tr_times):
    """Lanczos-resample frame features (frames x hidden) onto tr_grid(tr_times)."""
    return lanczos_interp(feats, feat_times, tr_grid(tr_times))


def design_matrix(ds, delays=(1, 2, 3, 4)):
    """Downsampled features on the padded grid -> z-scored per story -> delayed copies, one row per
    response TR. As in the lab's recipe, the mean and std come from the response rows only (the pad
    rows lie before the story's first response, partly before the sound); the pad rows get the same
    scaling, and the delays read them, so the first responses see real earlier audio."""
    if max(delays) > PAD_TRS:
        raise StudyError(f"delays up to {PAD_TRS} TRs are supported (got {max(delays)})")
    x = np.asarray(ds, dtype=np.float32)
    mean, std = x[PAD_TRS:].mean(0), x[PAD_TRS:].std(0)
    return make_delayed((x - mean) / np.where(std > 0, std, 1.0), delays)[PAD_TRS:]


# The lab's bootstrap_ridge grid logspace(1, 3) is logspace(2, 6) in this (himalaya) convention; the
# grid reaches lower so small studies (a few hundred TRs) find their optimum too.
ALPHAS = np.logspace(0, 6, 13)


def contiguous_folds(n_samples, n_folds=5):
    """K folds of contiguous TR blocks (fMRI is autocorrelated: shuffling single TRs leaks)."""
    edges = np.linspace(0, n_samples, n_folds + 1).astype(int)
    idx = np.arange(n_samples)
    return [(np.concatenate([idx[:a], idx[b:]]), idx[a:b]) for a, b in zip(edges[:-1], edges[1:])]


def ridge_cv(X, Y, alphas=ALPHAS, n_folds=5, folds=None, device="cpu",
             voxel_batch=None, progress=False):
    """Ridge X -> Y with one alpha per voxel (column of Y), picked by K-fold CV on contiguous blocks.

    Solves min ||Y - X W||^2 + alpha ||W||^2 for every alpha from one eigendecomposition of the
    training X^T X per fold (the SVD of X: X^T X = V S^2 V^T, so W = V diag(1 / (s^2 + alpha)) V^T
    X^T Y), scores each alpha by the Pearson r of held-out predictions (mean over folds), keeps
    the best alpha per voxel (ties go to the larger alpha, as in himalaya), then refits on all rows.
    No intercept: centre or z-score X and Y first. `alpha` is the usual (sklearn / himalaya)
    penalty: an alpha `a` of the lab's bootstrap_ridge, whose solver uses s / (s^2 + a^2), is a^2 here.

    Why it is fast: X^T Y is formed once, each fold's training X^T Y is that minus the held-out
    part, and the cross term of the held-out correlation needs no prediction; only the norm of each
    alpha's prediction costs a matmul. Voxels go in batches of `voxel_batch` (default: as many as
    keep one batch of Y under 256 MB, 1,000 to 10,000), so 100k voxels fit in memory; `device` may
    be cuda.
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
    voxel_batch = voxel_batch or int(np.clip(2 ** 28 // (4 * X.shape[0]), 1000, 10000))
    Xt = torch.from_numpy(X).to(dev)

    X64 = Xt.double()
    wide = X.shape[0] <= X.shape[1]  # fewer rows than features (a small study, a wide model)
    gram = None if wide else X64.T @ X64

    def eig_basis(rows):
        """Eigenvalues and eigenvectors of X[rows]^T X[rows] (rows: numpy indices), in float64
        (squaring X squares its condition number). With fewer rows than features, from the small
        rows x rows Gram matrix: X^T Y lies in the span of X's rows, so those eigenvectors are all
        the solution needs."""
        if not wide:  # the whole Gram matrix minus the rows left out
            rest = torch.as_tensor(np.setdiff1d(np.arange(X.shape[0]), rows), device=dev)
            lam, V = torch.linalg.eigh(gram - X64[rest].T @ X64[rest])
            return lam.clamp(min=0), V.float()
        Xr = X64[torch.as_tensor(rows, device=dev)]
        lam, U = torch.linalg.eigh(Xr @ Xr.T)
        keep = lam > lam.max() * 1e-10
        return lam[keep], (Xr.T @ U[:, keep] / lam[keep].sqrt()).float()

    basis = []  # per fold: eigenvalues, eigenvectors, held-out rows in that basis
    for train, test in folds:
        test = torch.as_tensor(test, device=dev)
        lam, V = eig_basis(train)
        P = Xt[test] @ V  # held-out rows in the eigenbasis
        # the norm of each alpha's centred prediction P E: from the small Gram matrix of P when the
        # fold has more rows than features (p^2 instead of rows x p per voxel: 5x less at UTS01's shape)
        Pc = (P - P.mean(0)).double()
        basis.append((test, lam, V, P, (Pc.T @ Pc).float() if P.shape[0] > P.shape[1] else None))
    cv_r = torch.zeros(len(alphas), n_vox, dtype=torch.float64, device=dev)
    W = np.zeros((X.shape[1], n_vox), dtype=np.float32)
    best_alphas = np.zeros(n_vox, dtype=np.float32)
    lam_all, V_all = eig_basis(np.arange(X.shape[0]))
    for b, v0 in enumerate(range(0, n_vox, voxel_batch)):
        if progress:
            print(f"    ridge voxels {v0}-{min(n_vox, v0 + voxel_batch)} of {n_vox}", flush=True)
        Yb = torch.from_numpy(np.ascontiguousarray(Y[:, v0:v0 + voxel_batch])).to(dev)
        sl = slice(v0, v0 + Yb.shape[1])
        XtY = Xt.T @ Yb
        for test, lam, V, P, G in basis:
            Yte = Yb[test]
            Z = V.T @ (XtY - Xt[test].T @ Yte)  # training X^T Y in the eigenbasis
            yz = Yte - Yte.mean(0)
            yz = yz / yz.norm(dim=0).clamp(min=1e-12)
            cross = P.T @ yz  # held-out X^T y in the eigenbasis: r's numerator without predictions
            pmean = P.mean(0)
            for a, alpha in enumerate(alphas):
                EZ = Z / (lam.float() + float(alpha))[:, None]
                if G is not None:
                    norm = ((G @ EZ) * EZ).sum(0).clamp(min=0).sqrt()
                else:
                    norm = (P @ EZ - (pmean @ EZ)[None]).norm(dim=0)
                cv_r[a, sl] += ((cross * EZ).sum(0) / norm.clamp(min=1e-12)).double()
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


def score_on_test(features, subject_data, study, delays=(1, 2, 3, 4), alphas=ALPHAS, device="cpu", n_folds=5,
                  Y=None):
    """The final step of the stage 02 recipe for one layer: ridge (per-voxel alpha) fit on train +
    validation stories, Pearson r per voxel on the test story. features[story]: downsampled features
    of that layer (tr_grid rows x hidden). Y: the train + validation responses, when the caller
    already holds them (stage 02); otherwise they are read from `subject_data`.
    Returns (test_r, weights, alphas)."""
    fit = study["train"] + study["val"]
    X = np.vstack([design_matrix(features[s], delays) for s in fit])
    Y = stack_responses(subject_data, fit) if Y is None else Y
    W, best_alphas, _ = ridge_cv(X, Y, alphas, n_folds=n_folds, device=device)
    del Y  # the caller's reference (if any) remains; our own stack goes before the prediction
    pred = ridge_predict(design_matrix(features[study["test"]], delays), W, device)
    return pearson_r(subject_data["test_resp"], pred), W, best_alphas


def ridge_recipe(baseline):
    """Stage 02's ridge settings from its results npz (delays, alpha grid, folds), so stages 03-04
    score tuned features exactly as the baseline was scored. Results from before the grid and folds
    were saved used the defaults."""
    return dict(delays=tuple(int(x) for x in baseline["delays"]),
                alphas=np.asarray(baseline["alpha_grid"], np.float64) if "alpha_grid" in baseline else ALPHAS,
                n_folds=int(baseline["n_folds"]) if "n_folds" in baseline else 5)


# ---------------------------------------------------------------------------------------------
# 2. The speech model: WavLM with attention that LoRA can reach
# ---------------------------------------------------------------------------------------------

FRAME_HOP = 320  # WavLM's CNN strides multiply to 320 samples: one frame per 20 ms at 16 kHz

FRAME_WIN = 400  # receptive field of one frame, in samples


def tiny_config(hidden=96, layers=3, heads=4, conv=128):
    """A small WavLM (~0.6M parameters) for the simulated study and the tests.

    Same frame rate and architecture as wavlm-base-plus, just narrower and shallower. The CNN uses
    per-frame layer norm ("layer"), so each frame depends only on its own 25 ms of audio. No conv
    biases, as in wavlm-base-plus, and 128 CNN channels: measured with bench/tiny_model.py, those
    two decide how much of the auditory voxels' noise ceiling the random model's features reach
    (README, "The tiny model"); a wider hidden size moved it less than the model seed does.
    """
    from transformers import WavLMConfig
    return WavLMConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       intermediate_size=2 * hidden, conv_dim=(conv,) * 7, feat_extract_norm="layer",
                       conv_bias=False, num_conv_pos_embeddings=32, num_conv_pos_embedding_groups=4,
                       hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                       feat_proj_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0,
                       apply_spec_augment=False, num_buckets=64, max_bucket_distance=200)


def _attention_forward(self, hidden_states, attention_mask=None, position_bias=None, index=0, **kwargs):
    """WavLM self-attention that calls q_proj/k_proj/v_proj/out_proj as modules.

    Stock transformers hands those weights straight to F.multi_head_attention_forward, so LoRA
    wrappers around the modules are never called: PEFT then trains nothing, silently. This does
    the same maths (gated relative position bias as an additive mask, padding masked out) through
    the modules and scaled_dot_product_attention.
    """
    bsz, tgt_len, _ = hidden_states.size()
    if position_bias is None:
        position_bias = self.compute_bias(tgt_len, tgt_len)
        position_bias = position_bias.unsqueeze(0).repeat(bsz, 1, 1, 1).view(bsz * self.num_heads, tgt_len, tgt_len)
    # gate of the relative position bias, computed from the hidden states as in WavLM
    gated = hidden_states.view(hidden_states.shape[:-1] + (self.num_heads, -1)).permute(0, 2, 1, 3)
    rel = self.gru_rel_pos_linear(gated).view(gated.shape[:-1] + (2, 4)).sum(-1)
    gate_a, gate_b = torch.sigmoid(rel).chunk(2, dim=-1)
    gate = gate_a * (gate_b * self.gru_rel_pos_const - 1.0) + 2.0
    bias = (gate.view(bsz * self.num_heads, -1, 1) * position_bias).view(bsz, self.num_heads, tgt_len, tgt_len)
    if attention_mask is not None:  # 1 = real frame, 0 = padding: padded keys get -inf
        pad = attention_mask.ne(1)[:, None, None, :]
        bias = bias.masked_fill(pad, float("-inf"))

    def heads(x):
        return x.view(bsz, tgt_len, self.num_heads, self.head_dim).transpose(1, 2)
    q, k, v = heads(self.q_proj(hidden_states)), heads(self.k_proj(hidden_states)), heads(self.v_proj(hidden_states))
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=bias.to(q.dtype), dropout_p=self.dropout if self.training else 0.0)
    out = self.out_proj(out.transpose(1, 2).reshape(bsz, tgt_len, self.embed_dim))
    return out, None, position_bias


def make_lora_able(model):
    """Route every WavLM attention through _attention_forward (see there). Returns the model."""
    import types
    for module in model.modules():
        if type(module).__name__ == "WavLMAttention":
            module.forward = types.MethodType(_attention_forward, module)
    return model


PRETRAINED_TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "wavlm-tiny-pretrained")


def load_wavlm(name="tiny", seed=0, device=None, config=None):
    """`tiny`: a seeded, randomly initialised tiny WavLM (same seed, same weights), built from
    `config` (default tiny_config(); bench/tiny_model.py passes variants). Anything else: a
    Hugging Face id or local folder loaded with from_pretrained (e.g. microsoft/wavlm-base-plus;
    `tiny-pretrained` is models/wavlm-tiny-pretrained, this repository's self-supervised tiny model).
    LayerDrop and SpecAugment masking are switched off, the CNN front end is frozen, the attention
    is made LoRA-able, and the model is returned in eval mode on `device`."""
    from transformers import WavLMModel
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # "Loading weights" bars on stderr: noise around our one-line errors
    if name == "tiny-pretrained":  # the repository's own pretrained stand-in (models/pretrain_tiny.py)
        name = PRETRAINED_TINY
    if name == "tiny":
        torch.manual_seed(seed)
        model = WavLMModel(config if config is not None else tiny_config())
    else:
        kw = dict(layerdrop=0.0, mask_time_prob=0.0, mask_feature_prob=0.0)
        try:  # a local folder or the local cache first: no network wait when the weights are here
            model = WavLMModel.from_pretrained(name, local_files_only=True, **kw)
        except (OSError, ValueError):
            try:
                model = WavLMModel.from_pretrained(name, **kw)
            except (OSError, ValueError) as e:
                raise StudyError(
                    f"could not load WavLM {name!r} ({str(e).splitlines()[0]}). Pass a local folder with "
                    f"config.json and the weights, or download it once on a machine with internet: "
                    f"`hf download {name}` (then it loads offline from the cache)")
    model.config.layerdrop = 0.0
    model.config.apply_spec_augment = False
    model.freeze_feature_encoder()
    make_lora_able(model)
    return model.to(pick_device(device)).eval()


def add_lora(model, rank=4, alpha=4, dropout=0.1, targets=("q_proj", "k_proj", "v_proj")):
    """Wrap `targets` of every layer with LoRA adapters (peft); only the adapters train."""
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets))
    return get_peft_model(model, cfg)


def base_wavlm(model):
    """The WavLMModel inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def load_tuned_wavlm(baseline, folder, full, device=None):
    """A stage 03 checkpoint as a model: the base WavLM stage 02 used (`baseline`: its results npz)
    with the saved peft adapter, or with the fully fine-tuned weights when `full`."""
    model = load_wavlm(str(baseline["model"]), int(baseline["model_seed"]), device)
    if full:
        from safetensors.torch import load_file
        model.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
        return model
    from peft import PeftModel
    return PeftModel.from_pretrained(model, folder).to(pick_device(device)).eval()


def autocast(device):
    """bf16 autocast on CUDA, nothing on CPU (float32 there: reproducible to the bit)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


# ---------------------------------------------------------------------------------------------
# 3. Features: causal windows over a story, Lanczos-downsampled to its TRs
# ---------------------------------------------------------------------------------------------

def cnn_features(model, audio):
    """The frozen CNN front end: (batch, samples) -> (batch, frames, conv channels)."""
    with torch.no_grad():
        return base_wavlm(model).feature_extractor(audio).transpose(1, 2)


def hidden_states_from_cnn(model, cnn, n_layers=None, attention_mask=None, mask=None, mask_embed=None):
    """Run WavLM from CNN output: returns [input to layer 1, output of layer 1, ..., of n_layers],
    i.e. the first n_layers + 1 entries of transformers' hidden_states. Stops early: layers above
    the one you need are never computed. mask (batch x frames, bool) and mask_embed (hidden): the
    masked frames' projected features are replaced by mask_embed, as in masked-prediction pretraining
    (models/pretrain_tiny.py; transformers ignores mask_time_indices once SpecAugment is off)."""
    m = base_wavlm(model)
    enc = m.encoder
    h, _ = m.feature_projection(cnn)
    if mask is not None:
        h = torch.where(mask[..., None], mask_embed.to(h.dtype), h)
    h = h + enc.pos_conv_embed(h)
    if not m.config.do_stable_layer_norm:
        h = enc.layer_norm(h)
    h = enc.dropout(h)
    states = [h]
    bias = None
    for layer in enc.layers[:n_layers if n_layers is not None else len(enc.layers)]:
        h, bias = layer(h, attention_mask=attention_mask, position_bias=bias)
        states.append(h)
    return states


def n_frames(n_samples):
    return (n_samples - FRAME_WIN) // FRAME_HOP + 1


def frame_times(n, sr=16000):
    """Time stamp of each frame: the centre of its 400-sample (25 ms) receptive field."""
    return (np.arange(n) * FRAME_HOP + FRAME_WIN / 2) / sr


def story_cnn(model, audio, data=None, story=None):
    """Output of a local (layer-norm) CNN for a whole story, (frames x channels), in 60 s chunks to
    bound memory. Each frame depends on its own 25 ms only, so any slice of it starting at a
    multiple of 320 samples is what the CNN would compute from that slice of the audio. The CNN is
    frozen in every stage, so callers compute this once per story and pass it to extract_features.
    None for group-norm CNNs (wavlm-base-plus): they normalise over their input, so run per window.

    With `data` and `story`, it is also cached as <data>/features/cnn-<hash of the CNN weights>/
    <story>.npz (with the audio's hash) and read back, bit for bit, by every later call: stage 02,
    each stage 03 run and stage 05 then share one pass over the audio.
    """
    import hashlib
    m = base_wavlm(model)
    if m.config.feat_extract_norm != "layer":
        return None
    x = torch.as_tensor(audio, dtype=torch.float32, device=next(m.parameters()).device).reshape(-1)
    path = None
    if data is not None:
        audio_hash = hashlib.sha1(x.cpu().numpy().tobytes()).hexdigest()
        path = os.path.join(data, "features", f"cnn-{model_fingerprint(m.feature_extractor)[:16]}", f"{story}.npz")
        if os.path.exists(path):
            cached = load_npz(path)
            if str(cached.get("audio")) == audio_hash:
                return torch.as_tensor(cached["cnn"], device=x.device)
    F, chunk = n_frames(len(x)), 3000
    out = torch.cat([cnn_features(model, x[None, f0 * FRAME_HOP:(min(F, f0 + chunk) - 1) * FRAME_HOP + FRAME_WIN])[0]
                     for f0 in range(0, F, chunk)])
    if path is not None:  # the audio changed (study rebuilt) or first use: (re)write it
        save_npz(path, cnn=out.cpu().numpy(), audio=np.array(audio_hash))
    return out


def extract_features(model, audio, sr=16000, layers=None, context_s=16.0, stride_s=4.0, batch_size=8,
                     device=None, grad=False, progress=False, cnn=None):
    """Causal WavLM features of one story, from sliding windows.

    WavLM's attention is bidirectional, so causality comes from the windows: each window spans
    `context_s + stride_s` seconds and moves by `stride_s`, and only the frames of its last
    `stride_s` seconds are kept. Every kept frame has `context_s` of past audio (where the story
    has it) and sees less than `stride_s` of the future. stride_s=0.1 keeping 5 frames is the
    lab's 16 s / 0.1 s recipe; cost in model-seconds per audio second is (context_s + stride_s) /
    stride_s. The frozen CNN is run once per story when its output is local (layer-norm CNNs, e.g.
    the tiny model); group-norm CNNs (wavlm-base-plus) normalise over the whole input, so there it
    runs per window to keep each window exactly what a model fed that window would compute.

    cnn: story_cnn(model, audio), when the caller already has it (the CNN is frozen: stage 03 reuses
    it every epoch, stage 05 for every model).

    Returns (feats, times): feats[i] is a (frames x hidden) float32 array (torch tensor when grad=True)
    for hidden state layers[i] (0 = input to the first transformer layer), and times the frame
    times in seconds (frame_times: centre of each frame's 25 ms).
    """
    m = base_wavlm(model)
    dev = next(m.parameters()).device if device is None else torch.device(device)
    if sr != 16000:
        raise StudyError(f"WavLM needs 16 kHz audio, got {sr} Hz; resample first (stage 01 does)")
    n_layers = m.config.num_hidden_layers
    layers = list(range(n_layers + 1)) if layers is None else [int(x) for x in layers]
    if not all(0 <= layer <= n_layers for layer in layers):
        raise StudyError(f"layers {layers} out of range: this model has hidden states 0..{n_layers}")
    check_window(context_s, stride_s, ("context_s", "stride_s"))
    s_f, c_f = int(round(stride_s * sr / FRAME_HOP)), int(round(context_s * sr / FRAME_HOP))
    x = torch.as_tensor(audio, dtype=torch.float32, device=dev).reshape(-1)
    F = n_frames(len(x))
    if F < 1:
        raise StudyError(f"audio of {len(x)} samples is shorter than one WavLM frame ({FRAME_WIN} samples)")
    local_cnn = m.config.feat_extract_norm == "layer"
    if local_cnn and cnn is None:
        cnn = story_cnn(m, x)
    elif local_cnn and len(cnn) != F:
        raise StudyError(f"precomputed CNN output has {len(cnn)} frames, the audio {F}")
    # windows: keep frames [k0, k1), feed frames [k0 - context, k1); group equal lengths into batches
    wins = [(max(0, k0 - c_f), k0, min(F, k0 + s_f)) for k0 in range(0, F, s_f)]
    groups = {}
    for w in wins:
        groups.setdefault((w[2] - w[0], w[2] - w[1]), []).append(w)
    batches = [(g[i:i + batch_size]) for g in groups.values() for i in range(0, len(g), batch_size)]
    out = [[None] * len(wins) for _ in layers]
    index = {w: i for i, w in enumerate(wins)}
    if progress:
        batches = progress_bar(batches, "    windows")
    with torch.set_grad_enabled(grad), autocast(dev):
        for batch in batches:
            if local_cnn:
                c = torch.stack([cnn[a:b] for a, _, b in batch])
            else:
                c = cnn_features(m, torch.stack([x[a * FRAME_HOP:(b - 1) * FRAME_HOP + FRAME_WIN] for a, _, b in batch]))
            states = hidden_states_from_cnn(model, c, max(layers))
            keep = batch[0][2] - batch[0][1]
            for li, layer in enumerate(layers):
                h = states[layer][:, -keep:].float()
                for j, w in enumerate(batch):
                    out[li][index[w]] = h[j]
    feats = [torch.cat(o) for o in out]
    if not grad:
        feats = [f.cpu().numpy() for f in feats]
    return feats, frame_times(F, sr)


def story_features(model, fingerprint, cache_dir, story_npz, context_s, stride_s, refresh=False, progress=False,
                   top_layer=None, cnn=None, data=None):
    """Hidden states of every layer of one story, Lanczos-downsampled onto tr_grid: an array
    (layers x (PAD_TRS + TRs) x hidden), cached as <cache_dir>/<story>.npz.

    The cache stores a key (model weights, window settings, audio, TR times); a file built from
    anything else is recomputed and overwritten, never reused (refresh=True always recomputes).
    top_layer: compute hidden states 0..top_layer only (the layers above are never run).
    cnn: the story's story_cnn output, if the caller has it; otherwise it is computed, and cached
    under `data` when given (story_cnn).
    """
    import hashlib
    import json
    name = os.path.basename(story_npz)[:-4]
    story = load_npz(story_npz, "story file")
    n_states = base_wavlm(model).config.num_hidden_layers + 1 if top_layer is None else top_layer + 1
    key = json.dumps(dict(model=fingerprint, context_s=context_s, stride_s=stride_s, pad=PAD_TRS, layers=n_states,
                          audio=hashlib.sha1(story["audio"].tobytes()).hexdigest(),
                          tr_times=hashlib.sha1(story["tr_times"].tobytes()).hexdigest()), sort_keys=True)
    path = os.path.join(cache_dir, f"{name}.npz")
    if os.path.exists(path) and not refresh:
        cached = load_npz(path)
        if str(cached.get("key")) == key:
            return cached["ds"]
        print(f"    {path} was computed from other weights or audio: recomputing it", flush=True)
    if cnn is None and data is not None:
        cnn = story_cnn(model, story["audio"], data, name)
    feats, times = extract_features(model, story["audio"], int(story["sr"]), layers=range(n_states), context_s=context_s,
                                    stride_s=stride_s, progress=progress, cnn=cnn)
    ds = np.stack([downsample_to_trs(f, times, story["tr_times"]) for f in feats])
    save_npz(path, ds=ds, key=np.array(key))
    return ds


# ---------------------------------------------------------------------------------------------
# 4. Data: the study, a subject's responses (read lazily), acoustics
# ---------------------------------------------------------------------------------------------

def load_study(data):
    """study.npz as a dict of plain Python values; a missing or old-layout file is a StudyError."""
    path = os.path.join(data, "study.npz")
    if not os.path.exists(path):
        raise StudyError(f"{path} not found: build the data first with `python 01_prepare_data.py --data {data}`")
    saved = load_npz(path)
    missing = sorted({"source", "subjects", "train_stories", "val_stories", "test_story", "tr"} - set(saved))
    if missing:
        raise StudyError(f"{path} is from an older layout (no {', '.join(missing)}); rebuild it with 01_prepare_data.py")
    return dict(source=str(saved["source"]), subjects=[str(s) for s in saved["subjects"]],
                train=[str(s) for s in saved["train_stories"]], val=[str(s) for s in saved["val_stories"]],
                test=str(saved["test_story"]), tr=float(saved["tr"]))


def load_subject(data, subject, study):
    """subjects/<subject>.npz, checked for every response the stages need, opened lazily: d[key]
    reads that one array from disk (UTS01's responses are ~10 GB; no stage holds them twice)."""
    path = os.path.join(data, "subjects", f"{subject}.npz")
    if subject not in study["subjects"] or not os.path.exists(path):
        raise StudyError(f"unknown subject {subject!r}: {data} has {', '.join(study['subjects'])}")
    try:
        d = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise StudyError(f"{path} is not a plain npz file ({e}); rebuild it with 01_prepare_data.py")
    missing = [f"resp_{s}" for s in study["train"] + study["val"] if f"resp_{s}" not in d]
    missing += [] if "test_resp" in d else ["test_resp"]
    if missing:
        raise StudyError(f"{path} has no responses {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; "
                         "rebuild the data with 01_prepare_data.py")
    return d


def array_shape(d, key):
    """Shape of d[key] without reading the array when d is an open npz (its .npy header only)."""
    if not hasattr(d, "zip"):
        return d[key].shape
    with d.zip.open(f"{key}.npy") as f:
        major, _ = np.lib.format.read_magic(f)
        header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        return header(f)[0]


def stack_responses(d, stories, voxels=None):
    """The responses of `stories` one under the other (TRs x voxels, float32), read story by story
    into one preallocated array: the peak is the stack itself, not the stack plus a list of parts.
    voxels: a boolean mask or index array to keep only those columns."""
    shapes = [array_shape(d, f"resp_{s}") for s in stories]
    columns = np.arange(shapes[0][1]) if voxels is None else np.arange(shapes[0][1])[voxels]
    out = np.empty((sum(n for n, _ in shapes), len(columns)), np.float32)
    row = 0
    for s, (n, _) in zip(stories, shapes):
        r = d[f"resp_{s}"]
        out[row:row + n] = r if voxels is None else r[:, voxels]
        row += n
    return out


def subject_list(requested, study):
    subjects = requested or study["subjects"]
    unknown = [s for s in subjects if s not in study["subjects"]]
    if unknown:
        raise StudyError(f"unknown subject(s) {', '.join(unknown)}: this study has {', '.join(study['subjects'])}")
    return subjects


def log_mel(audio, n_bands=8, hop=160, win=400):
    """Log-mel band energies of 16 kHz audio at 100 Hz (frames x bands, frame-centre times): what
    drives the simulated auditory voxels (stage 01) and the acoustic probe targets (stage 05)."""
    n = 1 + (len(audio) - win) // hop
    sr = 16000
    frames = np.lib.stride_tricks.sliding_window_view(audio, win)[::hop][:n] * np.hanning(win)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    freqs = np.fft.rfftfreq(win, 1 / sr)
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    edges = 700 * (10 ** (np.linspace(mel(100), mel(7000), n_bands + 2) / 2595) - 1)
    fb = np.zeros((n_bands, len(freqs)))
    for b in range(n_bands):
        lo, mid, hi = edges[b:b + 3]
        fb[b] = np.clip(np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)), 0, None)
    times = (np.arange(n) * hop + win / 2) / sr
    energy = power @ fb.T
    # a 40 dB floor, as a hearing threshold: digital silence between words would otherwise send
    # the log to -inf-ish and dominate the drive with the gap pattern alone
    return np.log(energy + 1e-4 * energy.mean(0)), times


# ---------------------------------------------------------------------------------------------
# 5. Plumbing (skip on a first read): errors, devices, npz and figure I/O, names, caches, flags
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
    name = str(name)
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise StudyError(f"--device {name} asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def set_threads(n=None):
    """Pin torch's CPU threads: left alone, torch can oversubscribe a small machine (50x slower seen)."""
    n = n or int(os.environ.get("BRAINWAVLM_THREADS", 0)) or os.cpu_count() or 1
    torch.set_num_threads(n)


def progress_bar(items, desc):
    """A tqdm bar on a terminal; the plain items when the output goes to a file (a bar there
    writes thousands of characters per epoch)."""
    if not sys.stderr.isatty():
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc, leave=False)


def save_npz(path, items=(), **arrays):
    """Write an npz (uncompressed, as np.savez) to a temp file in the same folder, then rename: a
    crash never leaves half a file. `items`: (name, array) pairs, e.g. a generator, written one at a
    time before the keyword arrays, so a subject's responses need never be in memory all at once."""
    import zipfile
    path = str(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".npz")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, value in itertools.chain(items, arrays.items()):  # one array in memory at a time
                with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)
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
    """Save a matplotlib figure atomically (same reason as save_npz), then close it: stages that
    plot once per run (03 over seeds and subjects) would otherwise keep every figure open."""
    import matplotlib.pyplot as plt
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, ".tmp_" + os.path.basename(path))
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    plt.close(fig)


def model_fingerprint(model):
    """sha1 of every weight (adapters included): tells one model's feature cache from another's."""
    import hashlib
    h = hashlib.sha1()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def model_tag(name, seed):
    """Folder-safe name of a base model, e.g. tiny_seed0 or microsoft--wavlm-base-plus."""
    return f"tiny_seed{seed}" if name == "tiny" else name.strip("/").replace("/", "--")


def run_name(subject, roi, mode, seed, init_from=None):
    """Stage 03's name of a run (its checkpoint folder and results file), read by stages 04 and 05;
    a run started from another (--init-from) carries that run's name after `_from_`."""
    return f"03_{subject}_{roi}_{mode}_seed{seed}" + (f"_from_{init_from}" if init_from else "")


def feature_cache_dir(data, name, seed, context_s, stride_s):
    """Stage 02's feature cache of one model at one window setting, e.g.
    data/features/tiny_seed0/context16s_stride4s/: each setting keeps its own."""
    return os.path.join(data, "features", model_tag(name, seed), f"context{context_s:g}s_stride{stride_s:g}s")


def check_window(context_s, stride_s, flags=("--context-s", "--stride-s")):
    """Window context and stride must be whole numbers of WavLM's 20 ms frames (stride > 0)."""
    hop_s = FRAME_HOP / 16000
    for flag, value, lo in ((flags[1], stride_s, hop_s), (flags[0], context_s, 0.0)):
        if value < lo or abs(value / hop_s - round(value / hop_s)) > 1e-6:
            raise StudyError(f"{flag} {value:g} must be a {'positive' if lo else 'non-negative'} multiple of "
                             f"WavLM's 20 ms frame (e.g. 0.1, 2, 4)")


def add_common_args(p):
    """The flags every stage 02-05 shares."""
    p.add_argument("--data", default="data", help="folder written by 01_prepare_data.py (default: data/)")
    p.add_argument("--results", default="results", help="output folder (default: results/)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if present)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
