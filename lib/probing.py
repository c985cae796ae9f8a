"""Linear probes on word representations: what a model's layers hold about each word.

Used by stage 05 (semantic, acoustic and category probes of the baseline and tuned models, Section
3.4) and models/pretrain_tiny.py (word identity, to check its pretraining). A word's representation
is a layer's frames averaged within the word's span; a probe is ridge (common.ridge_cv, per-target
alpha) from representations to targets, with whole stories held out.
"""
import numpy as np

import common


def word_representations(model, story, cnn, context_s, stride_s):
    """(layers x words x hidden): each layer's frames averaged within each word's span. cnn: the
    story's frozen CNN output (common.story_cnn), the same for every model compared."""
    feats, times = common.extract_features(model, story["audio"], context_s=context_s, stride_s=stride_s, cnn=cnn)
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
        return float(np.mean(common.pearson_r(Y[rows], p)))

    for held in folds:
        te = np.isin(groups, held)
        mu, sd = X[~te].mean(0), X[~te].std(0) + 1e-6
        ym, ys = Y[~te].mean(0), Y[~te].std(0) + 1e-6
        W, _, _ = common.ridge_cv((X[~te] - mu) / sd, (Y[~te] - ym) / ys, n_folds=5, device=device)
        pred[te] = ((X[te] - mu) / sd) @ W * ys + ym
        if per_fold is not None:
            per_fold.append(score(pred[te], te))
    return score(pred, np.ones(len(Y), bool))
