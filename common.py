"""Shared pieces of the BrainWavLM study: what two or more stages use.

Contents, in reading order (section 5 is plumbing: skip it on a first read):
  1. Encoding-model numerics: lanczos_interp, make_delayed, zscore, pearson_r, noise_ceiling,
     design_matrix (features -> ridge design), ridge_cv (per-voxel alphas), score_on_test
  2. The speech model: load_wavlm (WavLM whose attention LoRA can reach), add_lora
  3. Features: extract_features (causal windows), story_features (one story, cached)
  4. Data: load_study, load_subject (lazy), stack_responses, english1000, log_mel
  5. Plumbing: StudyError, devices, save_npz / load_npz, disk caches, shared flags
  6. Provenance: fingerprints of what each result was built from, settings tags, finding results
"""
import argparse
import glob
import hashlib
import itertools
import json
import os
import re
import sys
import tempfile
import warnings

import numpy as np
import torch

# peft's save_pretrained calls a transformers method deprecated in v5; nothing a user can act on
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


# ==== 1. Encoding-model numerics (the Huth lab's recipe): numpy in, numpy out, float32 ====

def lanczos_interp(data, old_times, new_times, window=3, cutoff_mult=1.0):
    """Resample `data` (old_times x features) to new_times with the Lanczos-windowed sinc of the
    lab's lanczosinterp2D, cutoff = cutoff_mult / mean spacing of new_times. Not normalised (as the
    lab's: z-scoring absorbs the scale). numpy in, float32 out; a torch tensor (..., old_times,
    features) in, a differentiable tensor out (stage 03 trains through it)."""
    new_times = np.asarray(new_times, dtype=np.float64)
    cutoff = cutoff_mult / np.mean(np.diff(new_times))
    t = (new_times[:, None] - np.asarray(old_times, dtype=np.float64)[None, :]) * cutoff
    with np.errstate(divide="ignore", invalid="ignore"):
        k = window * np.sin(np.pi * t) * np.sin(np.pi * t / window) / (np.pi ** 2 * t ** 2)
    k[t == 0] = 1.0
    k[np.abs(t) > window] = 0.0
    if torch.is_tensor(data):
        return torch.as_tensor(k, dtype=data.dtype, device=data.device) @ data
    return (k @ np.asarray(data, dtype=np.float64)).astype(np.float32)

def make_delayed(x, delays=(1, 2, 3, 4)):
    """Copies of x (TRs x features, numpy or torch) shifted later by each delay, zero-padded, side by
    side: row t holds x[t - d] for each d, the stimulus d TRs before the response (hemodynamic lag).
    A negative delay reads later rows, as in the lab's make_delayed."""
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
        x, y = a[:, v0:v0 + VOXEL_SLICE].astype(np.float64), b[:, v0:v0 + VOXEL_SLICE].astype(np.float64)
        x -= x.mean(0)
        y -= y.mean(0)
        den = np.sqrt((x * x).sum(0) * (y * y).sum(0))
        with np.errstate(divide="ignore", invalid="ignore"):
            r[v0:v0 + VOXEL_SLICE] = np.where(den > 0, (x * y).sum(0) / den, 0.0)
    return r

def noise_ceiling(repeats):
    """Per-voxel ceiling on the r any model can reach against the mean of `repeats` (repeats x TRs x
    voxels): CC_max of Schoppe et al. (2016) from the signal power of Sahani & Linden (2003). With
    y_n = s + e_n: SP = (N var(mean) - mean var(y_n)) / (N - 1), CC_max = sqrt(SP / var(mean)); a
    negative SP (a pure-noise voxel) gives 0."""
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
    """Frame features (frames x hidden) -> Lanczos -> the response TRs with PAD_TRS more in front."""
    tr_times = np.asarray(tr_times, dtype=np.float64)
    pad = tr_times[0] - np.mean(np.diff(tr_times)) * np.arange(PAD_TRS, 0, -1)
    return lanczos_interp(feats, feat_times, np.concatenate([pad, tr_times]))

def design_matrix(ds, delays=(1, 2, 3, 4)):
    """Downsampled features (PAD_TRS + TRs rows) -> z-scored -> delayed, one row per response TR.
    As in the lab's recipe, mean and std come from the response rows; the pad rows (partly before
    the sound) get the same scaling, and the delays read them."""
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
    edges, idx = np.linspace(0, n_samples, n_folds + 1).astype(int), np.arange(n_samples)
    return [(np.concatenate([idx[:a], idx[b:]]), idx[a:b]) for a, b in zip(edges[:-1], edges[1:])]

def ridge_cv(X, Y, alphas=ALPHAS, n_folds=5, folds=None, device="cpu", voxel_batch=None):
    """Ridge X -> Y with one alpha per voxel (column of Y), picked by K-fold CV on contiguous blocks.

    min ||Y - X W||^2 + alpha ||W||^2 for every alpha from one eigendecomposition of each fold's
    X^T X = V S^2 V^T: W = V diag(1 / (s^2 + alpha)) V^T X^T Y. Each alpha is scored by the Pearson r
    of held-out predictions (mean over folds); the best per voxel (ties to the larger, as himalaya)
    is refit on all rows. No intercept: z-score X and Y first. The lab's bootstrap_ridge alpha `a`
    (solver s / (s^2 + a^2)) is a^2 here. Fast because X^T Y is formed once (a fold's is that minus
    its held-out rows' part), r's numerator needs no prediction and each alpha's prediction norm
    comes from the held-out rows' Gram matrix. Voxels go in batches (one batch of Y < 256 MB).
    Returns (weights: features x voxels, best_alphas: voxels, cv_r: alphas x voxels).
    """
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
        """Eigenvalues and eigenvectors of X[rows]^T X[rows]. With fewer rows than features, from
        the rows x rows Gram matrix: X^T Y lies in the span of X's rows, which is all we need."""
        if not wide:  # the whole Gram matrix minus the rows left out
            rest = torch.as_tensor(np.setdiff1d(np.arange(X.shape[0]), rows), device=dev)
            lam, V = torch.linalg.eigh(gram - X64[rest].T @ X64[rest])
            return lam.clamp(min=0), V.float()
        Xr = X64[torch.as_tensor(rows, device=dev)]
        lam, U = torch.linalg.eigh(Xr @ Xr.T)
        keep = lam > lam.max() * 1e-10
        return lam[keep], (Xr.T @ U[:, keep] / lam[keep].sqrt()).float()

    basis = []  # per fold: held-out rows, eigenvalues, eigenvectors, held-out X in that basis, its Gram
    for train, test in folds:
        test = torch.as_tensor(test, device=dev)
        lam, V = eig_basis(train)
        P = Xt[test] @ V
        Pc = (P - P.mean(0)).double()  # p x p Gram of the centred rows: 5x cheaper norms at UTS01's shape
        basis.append((test, lam, V, P, (Pc.T @ Pc).float() if P.shape[0] > P.shape[1] else None))
    cv_r = torch.zeros(len(alphas), n_vox, dtype=torch.float64, device=dev)
    W, best_alphas = np.zeros((X.shape[1], n_vox), dtype=np.float32), np.zeros(n_vox, dtype=np.float32)
    lam_all, V_all = eig_basis(np.arange(X.shape[0]))
    for v0 in range(0, n_vox, voxel_batch):
        Yb = torch.from_numpy(np.ascontiguousarray(Y[:, v0:v0 + voxel_batch])).to(dev)
        sl, XtY = slice(v0, v0 + Yb.shape[1]), Xt.T @ Yb
        for test, lam, V, P, G in basis:
            Yte = Yb[test]
            Z = V.T @ (XtY - Xt[test].T @ Yte)  # training X^T Y in the eigenbasis
            yz = Yte - Yte.mean(0)
            cross = P.T @ (yz / yz.norm(dim=0).clamp(min=1e-12))  # r's numerator, without predictions
            pmean = P.mean(0)
            for a, alpha in enumerate(alphas):
                EZ = Z / (lam.float() + float(alpha))[:, None]
                if G is not None:
                    norm = ((G @ EZ) * EZ).sum(0).clamp(min=0).sqrt()
                else:
                    norm = (P @ EZ - (pmean @ EZ)[None]).norm(dim=0)
                cv_r[a, sl] += ((cross * EZ).sum(0) / norm.clamp(min=1e-12)).double()
        score = cv_r[:, sl] / len(folds)
        best = torch.argmax(score + 1e-10 * torch.log(torch.as_tensor(alphas, device=dev))[:, None], 0)
        a_best = torch.as_tensor(alphas, device=dev)[best]
        W[:, sl] = (V_all @ (V_all.T @ XtY / (lam_all[:, None] + a_best[None, :]).float())).cpu().numpy()
        best_alphas[sl] = a_best.cpu().numpy()
    return W, best_alphas, (cv_r / len(folds)).float().cpu().numpy()

def ridge_predict(X, W, device="cpu", voxel_batch=20000):
    """X @ W in float32, batched over voxels; numpy in, numpy out."""
    Xt = torch.from_numpy(np.asarray(X, dtype=np.float32)).to(torch.device(device))
    out = np.zeros((X.shape[0], W.shape[1]), dtype=np.float32)
    for v0 in range(0, W.shape[1], voxel_batch):
        Wb = torch.from_numpy(np.ascontiguousarray(W[:, v0:v0 + voxel_batch], dtype=np.float32)).to(Xt.device)
        out[:, v0:v0 + Wb.shape[1]] = (Xt @ Wb).cpu().numpy()
    return out

def score_on_test(features, subject_data, study, delays=(1, 2, 3, 4), alphas=ALPHAS, device="cpu", n_folds=5,
                  Y=None):
    """Stage 02's recipe for one layer: ridge (per-voxel alpha) on the train + validation stories,
    Pearson r per voxel on the test story. features[story]: that layer's downsample_to_trs output.
    Y: the train + validation responses, if the caller holds them. Returns (test_r, weights, alphas)."""
    fit = study["train"] + study["val"]
    X = np.vstack([design_matrix(features[s], delays) for s in fit])
    Y = stack_responses(subject_data, fit) if Y is None else Y
    W, best_alphas, _ = ridge_cv(X, Y, alphas, n_folds=n_folds, device=device)
    del Y  # our own stack (if we read one) goes before the prediction
    pred = ridge_predict(design_matrix(features[study["test"]], delays), W, device)
    return pearson_r(subject_data["test_resp"], pred), W, best_alphas

def ridge_recipe(baseline):
    """Stage 02's ridge settings from its results npz: stages 03-04 score tuned features exactly so."""
    return dict(delays=tuple(int(x) for x in baseline["delays"]), n_folds=int(baseline.get("n_folds", 5)),
                alphas=np.asarray(baseline.get("alpha_grid", ALPHAS), np.float64))


# ==== 2. The speech model: WavLM with attention that LoRA can reach ====

FRAME_HOP = 320  # WavLM's CNN strides multiply to 320 samples: one frame per 20 ms at 16 kHz
FRAME_WIN = 400  # receptive field of one frame, in samples
PRETRAINED_TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "wavlm-tiny-pretrained")

def tiny_config(hidden=96, layers=3, heads=4, conv=128):
    """A small WavLM (~0.6M parameters): wavlm-base-plus's architecture and frame rate, narrower and
    shallower, with a per-frame (layer-norm) CNN. No conv biases and 128 CNN channels: what suited
    the simulated auditory voxels best in bench/tiny_model.py (docs/methods.md)."""
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
    wrappers around the modules are never called: PEFT then trains nothing, silently. This does the
    same maths (gated relative position bias as an additive mask, padding masked out) through the
    modules and scaled_dot_product_attention.
    """
    bsz, tgt_len, _ = hidden_states.size()
    if position_bias is None:
        position_bias = self.compute_bias(tgt_len, tgt_len)
        position_bias = position_bias.unsqueeze(0).repeat(bsz, 1, 1, 1).view(bsz * self.num_heads, tgt_len, tgt_len)
    # gate of the relative position bias, computed from the hidden states as in WavLM
    gated = hidden_states.view(hidden_states.shape[:-1] + (self.num_heads, -1)).permute(0, 2, 1, 3)
    gate_a, gate_b = torch.sigmoid(self.gru_rel_pos_linear(gated).view(gated.shape[:-1] + (2, 4)).sum(-1)).chunk(2, -1)
    gate = gate_a * (gate_b * self.gru_rel_pos_const - 1.0) + 2.0
    bias = (gate.view(bsz * self.num_heads, -1, 1) * position_bias).view(bsz, self.num_heads, tgt_len, tgt_len)
    if attention_mask is not None:  # 1 = real frame, 0 = padding: padded keys get -inf
        bias = bias.masked_fill(attention_mask.ne(1)[:, None, None, :], float("-inf"))
    q, k, v = (proj(hidden_states).view(bsz, tgt_len, self.num_heads, self.head_dim).transpose(1, 2)
               for proj in (self.q_proj, self.k_proj, self.v_proj))
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=bias.to(q.dtype), dropout_p=self.dropout if self.training else 0.0)
    return self.out_proj(out.transpose(1, 2).reshape(bsz, tgt_len, self.embed_dim)), None, position_bias

def make_lora_able(model):
    """Route every WavLM attention through _attention_forward (see there). Returns the model."""
    import types
    for module in model.modules():
        if type(module).__name__ == "WavLMAttention":
            module.forward = types.MethodType(_attention_forward, module)
    return model

def load_wavlm(name="tiny", seed=0, device=None, config=None):
    """`tiny`: a seeded random tiny WavLM (from `config`, default tiny_config()); `tiny-pretrained`:
    models/wavlm-tiny-pretrained, this repository's self-supervised one; else a Hugging Face id or
    folder (e.g. microsoft/wavlm-base-plus). LayerDrop and SpecAugment off, CNN frozen, attention
    LoRA-able; returned in eval mode on `device`."""
    from transformers import WavLMModel
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # "Loading weights" bars on stderr: noise around our one-line errors
    name = PRETRAINED_TINY if name == "tiny-pretrained" else name
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
                raise StudyError(f"could not load WavLM {name!r} ({str(e).splitlines()[0]}). Pass a local folder "
                                 f"with config.json and the weights, or download it once on a machine with "
                                 f"internet: `hf download {name}` (then it loads offline from the cache)")
    model.config.layerdrop, model.config.apply_spec_augment = 0.0, False
    model.freeze_feature_encoder()
    return make_lora_able(model).to(pick_device(device)).eval()

def add_lora(model, rank=4, alpha=4, dropout=0.1, targets=("q_proj", "k_proj", "v_proj")):
    """Wrap `targets` of every layer with LoRA adapters (peft); only the adapters train."""
    from peft import LoraConfig, get_peft_model
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets)))

def base_wavlm(model):
    """The WavLMModel inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model

def load_tuned_wavlm(baseline, folder, full, device=None):
    """A stage 03 checkpoint: stage 02's base WavLM (`baseline`: its results npz) with the saved
    peft adapter, or with the fully fine-tuned weights when `full`."""
    model = load_wavlm(str(baseline["model"]), int(baseline["model_seed"]), device)
    if full:
        from safetensors.torch import load_file
        model.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
        return model
    from peft import PeftModel
    return PeftModel.from_pretrained(model, folder).to(pick_device(device)).eval()

def autocast(device):
    """bf16 autocast on CUDA, nothing on CPU (float32 there: reproducible to the bit)."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


# ==== 3. Features: causal windows over a story, Lanczos-downsampled to its TRs ====

def cnn_features(model, audio):
    """The frozen CNN front end: (batch, samples) -> (batch, frames, conv channels)."""
    with torch.no_grad():
        return base_wavlm(model).feature_extractor(audio).transpose(1, 2)

def hidden_states_from_cnn(model, cnn, n_layers=None, attention_mask=None, mask=None, mask_embed=None):
    """WavLM from CNN output: [input to layer 1, output of layer 1, ..., of n_layers] (the first
    n_layers + 1 of transformers' hidden_states); the layers above are never run. mask (batch x
    frames, bool): those frames' features become mask_embed, for masked-prediction pretraining
    (models/pretrain_tiny.py; transformers ignores mask_time_indices once SpecAugment is off)."""
    m = base_wavlm(model)
    enc = m.encoder
    h, _ = m.feature_projection(cnn)
    if mask is not None:
        h = torch.where(mask[..., None], mask_embed.to(h.dtype), h)
    h = h + enc.pos_conv_embed(h)
    states, bias = [enc.dropout(h if m.config.do_stable_layer_norm else enc.layer_norm(h))], None
    for layer in enc.layers[:n_layers if n_layers is not None else len(enc.layers)]:
        h, bias = layer(states[-1], attention_mask=attention_mask, position_bias=bias)
        states.append(h)
    return states

def n_frames(n_samples):
    return (n_samples - FRAME_WIN) // FRAME_HOP + 1

def story_cnn(model, audio, data=None, story=None):
    """A local (layer-norm) CNN's output for a whole story (frames x channels). Each frame depends on
    its own 25 ms only, so a slice of it starting at a multiple of 320 samples is what the CNN gives
    for that slice of audio: the frozen CNN runs once per story, not once per window (None for
    group-norm CNNs such as wavlm-base-plus's, which normalise over their input). With `data` and
    `story`, cached in <data>/features/cnn-<hash of the CNN>/: stages 02, 03 and 05 share one pass."""
    m = base_wavlm(model)
    if m.config.feat_extract_norm != "layer":
        return None
    x = torch.as_tensor(audio, dtype=torch.float32, device=next(m.parameters()).device).reshape(-1)
    F, chunk = n_frames(len(x)), 3000  # 60 s of frames at a time: bounded memory

    def compute():
        return torch.cat([cnn_features(m, x[None, f0 * FRAME_HOP:(min(F, f0 + chunk) - 1) * FRAME_HOP + FRAME_WIN])[0]
                          for f0 in range(0, F, chunk)])
    if data is None:
        return compute()
    path = os.path.join(data, "features", f"cnn-{model_fingerprint(m.feature_extractor)[:16]}", f"{story}.npz")
    cnn = cached_npz(path, sha1(x.cpu().numpy()), lambda: compute().cpu().numpy(), "cnn")
    return torch.as_tensor(cnn, device=x.device)

def extract_features(model, audio, sr=16000, layers=None, context_s=16.0, stride_s=4.0, batch_size=8,
                     grad=False, progress=False, cnn=None):
    """Causal WavLM features of one story, from sliding windows.

    WavLM's attention is bidirectional, so causality comes from the windows: each spans `context_s
    + stride_s` seconds, moves by `stride_s` and keeps the frames of its last `stride_s` seconds, so
    each kept frame has `context_s` of past audio (where the story has it) and under `stride_s` of
    future. stride_s=0.1 is the lab's 16 s / 0.1 s recipe; it costs (context_s + stride_s) /
    stride_s model-seconds per audio second. A layer-norm CNN runs once per story (`cnn`: story_cnn's
    output, if the caller has it), a group-norm CNN per window (it normalises over its input).
    Returns (feats, times): feats[i] (frames x hidden, float32; a tensor on the model's device when
    grad) is hidden state layers[i] (0 = input to the first layer); times: frame centres in s.
    """
    m = base_wavlm(model)
    if sr != 16000:
        raise StudyError(f"WavLM needs 16 kHz audio, got {sr} Hz; resample first (stage 01 does)")
    n_layers = m.config.num_hidden_layers
    layers = list(range(n_layers + 1)) if layers is None else [int(x) for x in layers]
    if not all(0 <= layer <= n_layers for layer in layers):
        raise StudyError(f"layers {layers} out of range: this model has hidden states 0..{n_layers}")
    check_window(context_s, stride_s, ("context_s", "stride_s"))
    s_f, c_f = int(round(stride_s * sr / FRAME_HOP)), int(round(context_s * sr / FRAME_HOP))
    x = torch.as_tensor(audio, dtype=torch.float32, device=next(m.parameters()).device).reshape(-1)
    F = n_frames(len(x))
    if F < 1:
        raise StudyError(f"audio of {len(x)} samples is shorter than one WavLM frame ({FRAME_WIN} samples)")
    local_cnn = m.config.feat_extract_norm == "layer"
    cnn = story_cnn(m, x) if local_cnn and cnn is None else cnn
    if local_cnn and len(cnn) != F:
        raise StudyError(f"precomputed CNN output has {len(cnn)} frames, the audio {F}")
    # windows: keep frames [k0, k1), feed frames [k0 - context, k1); equal shapes share a batch
    wins = [(max(0, k0 - c_f), k0, min(F, k0 + s_f)) for k0 in range(0, F, s_f)]
    groups = {}
    for w in wins:
        groups.setdefault((w[2] - w[0], w[2] - w[1]), []).append(w)
    batches = [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
    out, index = [[None] * len(wins) for _ in layers], {w: i for i, w in enumerate(wins)}
    with torch.set_grad_enabled(grad), autocast(x.device):
        for batch in progress_bar(batches, "    windows") if progress else batches:
            if local_cnn:
                c = torch.stack([cnn[a:b] for a, _, b in batch])
            else:
                c = cnn_features(m, torch.stack([x[a * FRAME_HOP:(b - 1) * FRAME_HOP + FRAME_WIN] for a, _, b in batch]))
            states, keep = hidden_states_from_cnn(model, c, max(layers)), batch[0][2] - batch[0][1]
            for li, layer in enumerate(layers):
                h = states[layer][:, -keep:].float()
                for j, w in enumerate(batch):
                    out[li][index[w]] = h[j]
    feats = [torch.cat(o) for o in out]
    times = (np.arange(F) * FRAME_HOP + FRAME_WIN / 2) / sr  # the centre of each frame's 25 ms
    return (feats if grad else [f.cpu().numpy() for f in feats]), times

def story_features(model, fingerprint, cache_dir, story_npz, context_s, stride_s, refresh=False, progress=False,
                   top_layer=None, cnn=None, data=None):
    """Hidden states 0..top_layer (default: all) of one story, downsample_to_trs'd: (layers x
    (PAD_TRS + TRs) x hidden), cached in <cache_dir>/<story>.npz under the model's fingerprint, the
    window settings, the audio and the TR times. cnn: the story's story_cnn output, if the caller
    has it; else computed (and cached under `data`)."""
    name = os.path.basename(story_npz)[:-4]
    story = load_npz(story_npz, "story file")
    n_states = base_wavlm(model).config.num_hidden_layers + 1 if top_layer is None else top_layer + 1
    key = json.dumps(dict(model=fingerprint, context_s=context_s, stride_s=stride_s, pad=PAD_TRS, layers=n_states,
                          audio=sha1(story["audio"]), tr_times=sha1(story["tr_times"])), sort_keys=True)

    def compute():
        c = story_cnn(model, story["audio"], data, name) if cnn is None and data is not None else cnn
        feats, times = extract_features(model, story["audio"], int(story["sr"]), layers=range(n_states),
                                        context_s=context_s, stride_s=stride_s, progress=progress, cnn=c)
        return np.stack([downsample_to_trs(f, times, story["tr_times"]) for f in feats])
    return cached_npz(os.path.join(cache_dir, f"{name}.npz"), key, compute, "ds", refresh)


# ==== 4. Data: the study, a subject's responses (read lazily), acoustics ====

def load_study(data):
    """study.npz as a dict of plain Python values, with the fingerprints stage 01 recorded (of the
    stories and splits, of each subject's file): every result records them, and each stage refuses
    results built from another study. A missing or old-layout file is a StudyError."""
    path = os.path.join(data, "study.npz")
    if not os.path.exists(path):
        raise StudyError(f"{path} not found: build the data first with `python 01_prepare_data.py --data {data}`")
    saved = load_npz(path)
    missing = sorted({"source", "subjects", "train_stories", "val_stories", "test_story", "tr",
                      "stories_fingerprint", "subject_fingerprints"} - set(saved))
    if missing:
        raise StudyError(f"{path} is from an older layout (no {', '.join(missing)}); rebuild it with "
                         f"`python 01_prepare_data.py --data {data}` (with the flags it was built with)")
    subjects = [str(s) for s in saved["subjects"]]
    return dict(source=str(saved["source"]), subjects=subjects, data=data,
                train=[str(s) for s in saved["train_stories"]], val=[str(s) for s in saved["val_stories"]],
                test=str(saved["test_story"]), tr=float(saved["tr"]),
                stories_fingerprint=str(saved["stories_fingerprint"]),
                subject_fingerprints=dict(zip(subjects, (str(f) for f in saved["subject_fingerprints"]))))

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
    missing = [k for k in [f"resp_{s}" for s in study["train"] + study["val"]] + ["test_resp"] if k not in d]
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
        return (np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0)(f)[0]

def stack_responses(d, stories, voxels=None):
    """The responses of `stories` one under the other (TRs x voxels, float32), read story by story
    into one preallocated array (the peak is the stack, not stack plus parts). voxels: a boolean
    mask or index array of the columns to keep."""
    rows = [array_shape(d, f"resp_{s}")[0] for s in stories]
    columns = np.arange(array_shape(d, f"resp_{stories[0]}")[1])[slice(None) if voxels is None else voxels]
    out = np.empty((sum(rows), len(columns)), np.float32)
    for s, row, n in zip(stories, np.cumsum([0] + rows), rows):
        out[row:row + n] = d[f"resp_{s}"] if voxels is None else d[f"resp_{s}"][:, voxels]
    return out

def subject_list(requested, study):
    unknown = [s for s in requested or [] if s not in study["subjects"]]
    if unknown:
        raise StudyError(f"unknown subject(s) {', '.join(unknown)}: this study has {', '.join(study['subjects'])}")
    return requested or study["subjects"]

def english1000(path, words):
    """The lab's English1000 embedding (derivative/english1000sm.hf5, as its SemanticModel reads it:
    `data` is dimensions x words, `vocab` the words as bytes) for `words`, lower-cased: (the words
    found, their vectors: words x dimensions)."""
    import h5py
    try:
        with h5py.File(path, "r") as f:
            if "data" not in f or "vocab" not in f:
                raise StudyError(f"{path} has no 'data' and 'vocab' datasets (found {sorted(f.keys())}); it is not "
                                 "the English1000 file of ds003020 (derivative/english1000sm.hf5)")
            vocab = [w.decode() if isinstance(w, bytes) else str(w) for w in f["vocab"][...]]
            data = f["data"]
            if data.ndim != 2 or data.shape[1] != len(vocab):
                raise StudyError(f"{path}: 'data' is {data.shape}, expected dimensions x {len(vocab)} words")
            index = {w: i for i, w in enumerate(vocab)}
            found = sorted({w.lower() for w in words} & set(index))
            vectors = np.asarray(data[...], np.float32)[:, [index[w] for w in found]].T if found else np.zeros((0, data.shape[0]), np.float32)
    except OSError as e:
        raise StudyError(f"cannot read {path}: {e}")
    return np.array(found), vectors

FLAT_HEIGHT = 512  # pixels of a flatmap's height (pycortex's quickflat draws at 1024 by default)

def draw_flatmap(ax, values, flat_index, extents, outline=None, title="", **imshow):
    """Per-column values on the flattened cortex (the paper's figures) from a flat_index image
    (stage 01: pycortex's pixel -> column map, computed once, so no pycortex is needed here).
    outline: a boolean column mask (e.g. AC) drawn as a contour."""
    img = np.where(flat_index >= 0, np.asarray(values, np.float64)[np.maximum(flat_index, 0)], np.nan)
    im = ax.imshow(img, extent=extents, interpolation="nearest", **imshow)
    if outline is not None:
        inside = np.where(flat_index >= 0, np.asarray(outline)[np.maximum(flat_index, 0)], False).astype(float)
        ax.contour(inside[::-1], levels=[0.5], colors="c", linewidths=0.8, extent=extents)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    return im

def log_mel(audio, n_bands=8, hop=160, win=400):
    """Log-mel band energies of 16 kHz audio at 100 Hz (frames x bands, frame-centre times): what
    drives the simulated auditory voxels (stage 01) and the acoustic probe targets (stage 05)."""
    n, sr = 1 + (len(audio) - win) // hop, 16000
    frames = np.lib.stride_tricks.sliding_window_view(audio, win)[::hop][:n] * np.hanning(win)
    power, freqs = np.abs(np.fft.rfft(frames, axis=1)) ** 2, np.fft.rfftfreq(win, 1 / sr)
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    edges = 700 * (10 ** (np.linspace(mel(100), mel(7000), n_bands + 2) / 2595) - 1)
    fb = np.zeros((n_bands, len(freqs)))
    for b in range(n_bands):
        lo, mid, hi = edges[b:b + 3]
        fb[b] = np.clip(np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)), 0, None)
    energy = power @ fb.T
    # a 40 dB floor, as a hearing threshold: digital silence between words would otherwise send
    # the log to -inf-ish and dominate the drive with the gap pattern alone
    return np.log(energy + 1e-4 * energy.mean(0)), (np.arange(n) * hop + win / 2) / sr


# ==== 5. Plumbing (skip on a first read): errors, devices, npz and figure I/O, caches, names, flags ====

class StudyError(Exception):
    """A problem with the user's input. Stages print it as one line and exit non-zero."""

def fail(msg, code=1):
    """Print one clear message and exit non-zero (the stages' `main` calls this for a StudyError)."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)

def pick_device(name=None):
    """`None`/"auto" -> cuda when present, else cpu."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise StudyError(f"--device {name} asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(str(name))

def set_threads(n=None):
    """Pin torch's CPU threads: left alone, torch can oversubscribe a small machine (50x slower seen)."""
    torch.set_num_threads(n or int(os.environ.get("BRAINWAVLM_THREADS", 0)) or os.cpu_count() or 1)

def progress_bar(items, desc):
    """A tqdm bar on a terminal; the plain items when output goes to a file (a bar there writes
    thousands of characters per epoch)."""
    if not sys.stderr.isatty():
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc, leave=False)

def save_npz(path, items=(), **arrays):
    """Write an npz (uncompressed, as np.savez) to a temp file in the same folder, then rename: a
    crash never leaves half a file. `items`: (name, array) pairs, e.g. a generator, written one at a
    time before the keyword arrays, so a subject's responses need never be in memory all at once.
    Returns a fingerprint of the contents (names, dtypes, shapes, bytes), hashed as they are written."""
    import zipfile
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp_", suffix=".npz")
    os.close(fd)
    h = hashlib.sha1()
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, value in itertools.chain(items, arrays.items()):
                value = np.asanyarray(value)
                with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, value, allow_pickle=False)
                h.update(f"{name} {value.dtype.str} {value.shape}".encode())
                h.update(np.ascontiguousarray(value).reshape(-1).view(np.uint8))
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return h.hexdigest()[:16]

def load_npz(path, what="file"):
    """np.load without pickles, as a plain dict; a missing file is a StudyError naming it."""
    if not os.path.exists(path):
        raise StudyError(f"{what} not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except ValueError as e:
        raise StudyError(f"{path} is not a plain npz file ({e}); rebuild it with the stage that writes it")

def sha1(array):
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()

def cached_npz(path, key, compute, name, refresh=False):
    """compute()'s array, saved in `path` as `name` with `key` (a string naming all it was computed
    from) and read back, bit for bit, while the key matches; otherwise (or refresh) recomputed."""
    if os.path.exists(path) and not refresh:
        saved = load_npz(path)
        if str(saved.get("key")) == key:
            return saved[name]
        print(f"    {path} was computed from other weights or audio: recomputing it", flush=True)
    value = compute()
    save_npz(path, key=np.array(key), **{name: value})
    return value

def save_figure(fig, path):
    """Save a matplotlib figure atomically (as save_npz), then close it (stage 03 plots once per run)."""
    import matplotlib.pyplot as plt
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), ".tmp_" + os.path.basename(path))
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    plt.close(fig)

def model_fingerprint(model):
    """sha1 of every weight (adapters included): tells one model's feature cache from another's."""
    h = hashlib.sha1()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode() + t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()

def check_window(context_s, stride_s, flags=("--context-s", "--stride-s")):
    """Window context and stride must be whole numbers of WavLM's 20 ms frames (stride > 0)."""
    hop_s = FRAME_HOP / 16000
    for flag, value, lo in ((flags[1], stride_s, hop_s), (flags[0], context_s, 0.0)):
        if value < lo or abs(value / hop_s - round(value / hop_s)) > 1e-6:
            raise StudyError(f"{flag} {value:g} must be a {'positive' if lo else 'non-negative'} multiple of "
                             f"WavLM's 20 ms frame (e.g. 0.1, 2, 4)")

def load_stage(script):
    """A script of this repository (a path from its root) as a module: stage names start with a
    digit, so `import` cannot. For the fetch script, bench/, models/ and the tests. Loaded once per
    process and registered in sys.modules (so its functions pickle for stage 01's worker pool)."""
    import importlib.util
    name = "stage_" + os.path.basename(script).replace(".py", "")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(os.path.abspath(__file__)), script))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]

def parser(doc):
    """The stages' argparse: a bad flag value is one `error:` line and exit 1, like every other
    input error (argparse's own prints the usage too and exits 2)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: fail(f"{message} (see --help)")
    return p

def add_common_args(p):
    """The flags every stage 02-05 shares."""
    p.add_argument("--data", default="data", help="folder written by 01_prepare_data.py (default: data/)")
    p.add_argument("--results", default="results", help="output folder (default: results/)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if present)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")

def check_ranges(checks):
    """(flag, value, low, high) tuples -> one clear StudyError for the first out of range (None: open)."""
    for flag, value, lo, hi in checks:
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f"{lo:g}..{hi:g}" if lo is not None and hi is not None else (f">= {lo:g}" if lo is not None else f"<= {hi:g}")
            raise StudyError(f"{flag} {value:g} is out of range: it must be {bounds}")


# ==== 6. Provenance: what every result was built from, so that no stage combines stale inputs ====
# A result records a fingerprint of the study's stories, of the subject's file, of the model and of
# its settings (and of the results it builds on). Results made with settings other than the
# defaults get a tag in their file name (a hash of what differs), so no run replaces another's.

FOLDERS = {"data": "data", "results": "results", "checkpoints": "checkpoints"}  # the stages' defaults

def digest(obj):
    """A short, stable fingerprint of a JSON-able record (settings, provenance)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]

def settings_tag(settings, defaults):
    """'' when every setting has its default, else '_' + 6 hex digits of those that differ."""
    changed = {k: v for k, v in settings.items() if v != defaults.get(k)}
    return "_" + digest(changed)[:6] if changed else ""

def as_flags(settings, defaults):
    """The settings that differ from the defaults, as the command-line flags that give them."""
    out = []
    for k, v in sorted(settings.items()):
        if v == defaults.get(k) or v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        values = v if isinstance(v, (list, tuple)) else [] if v is True else [v]
        out.append(" ".join([flag] + [f"{x:g}" if isinstance(x, float) else str(x) for x in values]))
    return out

def explicit_flags(p, argv):
    """The dests the user set on the command line (not left at their defaults)."""
    saved = [(a, a.default) for a in p._actions]
    for a, _ in saved:
        a.default = argparse.SUPPRESS
    try:
        return set(vars(p.parse_args(argv)))
    finally:
        for a, d in saved:
            a.default = d

def command(script, args, *flags):
    """A command to suggest in an error, with the user's own --data/--results/--checkpoints."""
    io = [f"--{k} {getattr(args, k)}" for k, d in FOLDERS.items()
          if getattr(args, k, d) != d and not (k == "checkpoints" and script.startswith(("01", "02")))]
    return "`" + " ".join(["python", script, *io, *[f for f in flags if f]]) + "`"

def read_provenance(d, path, rebuild):
    """The provenance record of a result npz (a dict); a result without one predates the records."""
    if "provenance" not in d:
        raise StudyError(f"{path} predates provenance records (what a result was built from): rebuild it with {rebuild}")
    return json.loads(str(d["provenance"]))

def check_built_from(prov, study, subject, path, rebuild):
    """Refuse a result built from other stories or another file of `subject` than the study's now."""
    if prov["stories"] != study["stories_fingerprint"]:
        why = "its stories or splits differ"
    elif subject is not None and prov["subject_data"] != study["subject_fingerprints"].get(subject):
        why = f"{subject}'s responses differ"
    else:
        return
    raise StudyError(f"{path} was built from another study than {study['data']}/ ({why}: the data were rebuilt "
                     f"since); rebuild it with {rebuild}")

def baseline_files(results, subject):
    """{tag: path} of the stage 02 results of `subject` ('' is the defaults' file)."""
    out = {}
    for path in glob.glob(os.path.join(glob.escape(results), f"02_baseline_{subject}*.npz")):
        rest = os.path.basename(path)[len(f"02_baseline_{subject}"):-4]
        if re.fullmatch(r"(_[0-9a-f]{6})?", rest):
            out[rest[1:]] = path
    return out

def load_baseline(args, subject, study, tag=None):
    """Stage 02's result for `subject`, checked to be from this study. tag: which one ('' = made
    with the defaults, None = the only one there). Adds its path, tag, provenance and fingerprint."""
    rebuild = command("02_baseline_ridge.py", args, f"--subjects {subject}")
    found = {t: p for t, p in baseline_files(args.results, subject).items() if tag is None or t == tag}
    if not found:
        which = f" with tag {tag or 'default'}" if tag is not None else ""
        raise StudyError(f"no stage 02 result for {subject}{which} in {args.results}/ "
                         f"({os.path.join(args.results, f'02_baseline_{subject}.npz')} not found): run {rebuild} first")
    if len(found) > 1:
        listed = []
        for t, p in sorted(found.items()):
            flags = json.loads(str(load_npz(p).get("provenance", "{}"))).get("flags", ["?"])
            listed.append(f"{t or 'default'} ({' '.join(flags) or 'the defaults'})")
        raise StudyError(f"{args.results}/ holds {len(found)} stage 02 results for {subject}: {'; '.join(listed)}; "
                         "choose one with --baseline-tag TAG")
    (t, path), = found.items()
    b = load_npz(path, "stage 02 result")
    prov = read_provenance(b, path, rebuild)
    rebuild = command("02_baseline_ridge.py", args, f"--subjects {subject}", *prov["flags"])
    check_built_from(prov, study, subject, path, rebuild)
    b.update(path=path, tag=t, provenance=prov, fingerprint=digest(prov), rebuild=rebuild)
    return b

def baseline_tag_flag(value):
    """--baseline-tag's value: 'default' names the file made with stage 02's defaults."""
    return None if value is None else "" if value == "default" else value

RUN_TAIL = re.compile(r"(?:_([0-9a-f]{6}))?(?:_from_(.+))?")

def run_name(subject, roi, mode, seed, tag="", init_from=None):
    """Stage 03's name of a run (results file, checkpoint folder): tag '' for the defaults' settings,
    else '_xxxxxx'; a run started from another (--init-from) carries that run's name after _from_."""
    return f"03_{subject}_{roi}_{mode}_seed{seed}{tag}" + (f"_from_{init_from.removeprefix('03_')}" if init_from else "")

def find_runs(folder, subject, roi, mode, seed, ext):
    """Stage 03 runs of (subject, roi, mode, seed) in `folder` (ext '.npz': results; '': checkpoint
    folders): a list of (name, tag, the name of the run it started from or None)."""
    prefix = run_name(subject, roi, mode, seed)
    out = []
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), prefix + "*" + ext))):
        name = os.path.basename(path)[:len(os.path.basename(path)) - len(ext)]
        m = RUN_TAIL.fullmatch(name[len(prefix):])
        if m and (ext or not name.endswith((".tmp", ".old"))):
            out.append((name, m.group(1) or "", m.group(2)))
    return out

def init_matches(source, wanted, subject):
    """Does a run's --init-from source (a run name without 03_) match what the user asked for: a
    run name, or an ROI word ('whole': the subject's own whole-cortex run)?"""
    if wanted is None:
        return source is None
    if source is None:
        return False
    return source == wanted.removeprefix("03_") or source.startswith(f"{subject}_{wanted}_")

def load_run(args, subject, roi, mode, seed, init_from=None, tag=None, study=None):
    """The one stage 03 result matching the request, checked against the study and against the
    stage 02 result it was scored against (same file, unchanged since). Returns the npz as a dict
    with its name, provenance and its baseline (load_baseline's dict)."""
    runs = [(n, t, s) for n, t, s in find_runs(args.results, subject, roi, mode, seed, ".npz")
            if init_matches(s, init_from, subject) and (tag is None or t == tag)]
    train = command("03_finetune_lora.py", args, f"--subject {subject}", "" if roi == "whole" else f"--roi {roi}",
                    f"--seed {seed}" if seed else "", "--full-finetune" if mode == "full" else "",
                    f"--init-from {init_from}" if init_from else "")
    if not runs:
        raise StudyError(f"no stage 03 result {run_name(subject, roi, mode, seed)}{'*' if tag is None else tag}"
                         f"{f' started from {init_from}' if init_from else ''} in {args.results}/: run {train} "
                         "first (with your training flags)")
    if len(runs) > 1:
        listed = []
        for n, t, _ in runs:
            prov = json.loads(str(load_npz(os.path.join(args.results, n + ".npz")).get("provenance", "{}")))
            listed.append(f"{t or 'default'} ({' '.join(prov.get('flags', ['?'])) or 'the defaults'})")
        raise StudyError(f"{args.results}/ holds {len(runs)} stage 03 runs of {subject} {roi} {mode} seed {seed}: "
                         f"{'; '.join(listed)}; choose one with --tag TAG")
    name = runs[0][0]
    path = os.path.join(args.results, name + ".npz")
    run = load_npz(path, "stage 03 result")
    prov = read_provenance(run, path, train)
    retrain = command("03_finetune_lora.py", args, f"--subject {subject}", *prov["flags"])
    if study is not None:
        check_built_from(prov, study, subject, path, retrain)
        base = load_baseline(args, subject, study, prov["baseline"]["tag"])
        if base["fingerprint"] != prov["baseline"]["fingerprint"]:
            raise StudyError(f"{path} was scored against another stage 02 result than {base['path']} holds now "
                             f"(stage 02 was rerun since, with other inputs): rerun it with {retrain}")
        run["baseline"] = base
    run.update(name=name, path=path, provenance=prov, fingerprint=digest(prov), tag=runs[0][1])
    return run
