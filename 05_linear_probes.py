"""Stage 05: what did brain tuning teach the model? Linear probes on word representations.

The paper's probing analysis (Section 3.4): each word's representation is the mean of a layer's
frames within the word; ridge probes (the shared ridge_cv, whole stories held out) predict
  * semantic targets: word vectors (the simulated study's true semantic vectors; on real data
    GloVe vectors from --word-vectors, words missing from the file counted and skipped),
  * acoustic targets: the word's log-mel energy profile and log duration, from the audio,
  * category (simulated study only): the word's semantic category, scored as accuracy,
for the frozen baseline, the whole-cortex tuned and the AC-tuned models. Score = mean Pearson r
over target dimensions of held-out predictions. The paper's finding: more semantic information
after whole-cortex tuning; AC tuning keeps the acoustic information.

    python 05_linear_probes.py                       # subject: the study's first
    python 05_linear_probes.py --subject UTS01 --word-vectors glove.6B.300d.txt
"""
import argparse
import os
import time

import numpy as np

import common
from common import StudyError

MODELS = ("baseline", "whole", "AC")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--checkpoints", default="checkpoints", help="stage 03's checkpoint folder")
    p.add_argument("--subject", help="whose tuned models to probe (default: the study's first subject)")
    p.add_argument("--models", nargs="+", default=list(MODELS), help=f"any of {', '.join(MODELS)}")
    p.add_argument("--seed", type=int, default=0, help="which stage 03 seed")
    p.add_argument("--init-from", help="probe the AC run stage 03 started from this run (its name without "
                   "'03_', e.g. sim01_whole_lora_seed0)")
    p.add_argument("--word-vectors", help="GloVe-format text file (word then numbers per line), real data")
    p.add_argument("--n-folds", type=int, default=5, help="folds of whole stories")
    return p.parse_args(argv)


def read_word_vectors(path, vocab):
    """Vectors for the words in `vocab` from a GloVe text file (others are not kept in memory)."""
    if not os.path.exists(path):
        raise StudyError(f"--word-vectors {path} not found")
    out = {}
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                parts = line.rstrip().split(" ")
                if parts[0] in vocab:
                    out[parts[0]] = np.array(parts[1:], dtype=np.float32)
    except (UnicodeDecodeError, ValueError) as e:
        raise StudyError(f"{path} line {n} is not 'word number number ...' ({e}); pass a GloVe text file")
    dims = {len(v) for v in out.values()}
    if len(dims) > 1:
        raise StudyError(f"{path}: vectors of different lengths {sorted(dims)}")
    return out


def load_model(args, which, subj, base, device):
    if which == "baseline":
        return common.load_wavlm(str(base["model"]), int(base["model_seed"]), device)
    init = args.init_from if which == "AC" else None
    best = os.path.join(args.checkpoints, common.run_name(subj, which, "lora", args.seed, init), "best", "model")
    if not os.path.isdir(best):
        raise StudyError(f"no tuned model {best}: run `python 03_finetune_lora.py --subject {subj} "
                         f"--roi {which} --seed {args.seed}{f' --init-from {args.checkpoints}/03_{init}' if init else ''}` first")
    return common.load_tuned_wavlm(base, best, full=False, device=device)


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


def acoustic_targets(story):
    """Per word: mean log-mel energy in 8 bands over its span, and its log duration."""
    mel, t = common.log_mel(story["audio"])
    rows = []
    for a, b in zip(story["word_onsets"], story["word_offsets"]):
        sel = (t >= a) & (t <= b)
        sel = sel if sel.any() else np.abs(t - (a + b) / 2) == np.abs(t - (a + b) / 2).min()
        rows.append(np.concatenate([mel[sel].mean(0), [np.log(b - a)]]))
    return np.array(rows, np.float32)


def probe(X, Y, groups, n_folds, classes=None):
    """Ridge probe with whole stories held out: mean r over target dims, or accuracy for classes."""
    stories = np.unique(groups)
    folds = np.array_split(stories, min(n_folds, len(stories)))
    pred = np.zeros_like(Y)
    for held in folds:
        te = np.isin(groups, held)
        mu, sd = X[~te].mean(0), X[~te].std(0) + 1e-6
        ym, ys = Y[~te].mean(0), Y[~te].std(0) + 1e-6
        W, _, _ = common.ridge_cv((X[~te] - mu) / sd, (Y[~te] - ym) / ys, n_folds=5)
        pred[te] = ((X[te] - mu) / sd) @ W * ys + ym
    if classes is not None:
        return float(np.mean(np.argmax(pred, 1) == classes))
    return float(np.mean(common.pearson_r(Y, pred)))


def plot(scores, models, layers, probes, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, len(probes), figsize=(4.5 * len(probes), 3.8))
    ax = np.atleast_1d(ax)
    for k, name in enumerate(probes):
        for m, model in enumerate(models):
            ax[k].plot(layers, scores[m, :, k], "o-", label=model)
        ax[k].set(xlabel="hidden state", ylabel="accuracy" if name == "category" else "mean r", title=f"{name} probe")
        ax[k].legend()
    common.save_figure(fig, path)


def main(argv=None):
    args = get_args(argv)
    common.set_threads(args.threads)
    t0 = time.time()
    try:
        unknown = [m for m in args.models if m not in MODELS]
        if unknown:
            raise StudyError(f"unknown model(s) {unknown}: choose from {', '.join(MODELS)}")
        device = common.pick_device(args.device)
        study = common.load_study(args.data)
        subj = args.subject or study["subjects"][0]
        common.subject_list([subj], study)
        base = common.load_npz(os.path.join(args.results, f"02_baseline_{subj}.npz"), "stage 02 result")
        names = study["train"] + study["val"] + [study["test"]]
        stories = {s: common.load_npz(os.path.join(args.data, "stories", f"{s}.npz")) for s in names}
        words = np.concatenate([stories[s]["words"] for s in names])
        groups = np.concatenate([[i] * len(stories[s]["words"]) for i, s in enumerate(names)])
        acoustic = np.concatenate([acoustic_targets(stories[s]) for s in names])
        targets = {"acoustic": (np.ones(len(words), bool), acoustic, None)}
        if study["source"] == "simulated":
            truth = common.load_npz(os.path.join(args.data, "truth.npz"))
            index = {w: i for i, w in enumerate(truth["vocab"])}
            idx = np.array([index[w] for w in words])
            content = truth["vocab_category"][idx] >= 0  # function words carry no meaning here
            cats = truth["vocab_category"][idx]
            targets["semantic"] = (content, truth["semantic_vectors"][idx], None)
            targets["category"] = (content, np.eye(cats.max() + 1, dtype=np.float32)[np.maximum(cats, 0)], cats)
        elif args.word_vectors:
            vecs = read_word_vectors(args.word_vectors, set(words))
            known = np.array([w in vecs for w in words])
            print(f"  word vectors: {known.sum()} of {len(words)} words found, {(~known).sum()} skipped")
            if not known.any():
                raise StudyError(f"no word of the stories is in {args.word_vectors}")
            dim = len(next(iter(vecs.values())))
            targets["semantic"] = (known, np.array([vecs.get(w, np.zeros(dim)) for w in words], np.float32), None)
        else:
            print("  note: real data without --word-vectors: the semantic probe is skipped")
        probes = [p_ for p_ in ("semantic", "acoustic", "category") if p_ in targets]
        print(f"stage 05: probes {', '.join(probes)} on {len(words)} words, models {', '.join(args.models)}")
        scores, layers, cnn = [], None, None
        for which in args.models:
            model = load_model(args, which, subj, base, device)
            if cnn is None:  # the CNN is frozen in stage 03, so one pass serves every model
                cnn = {s: common.story_cnn(model, stories[s]["audio"], args.data, s) for s in names}
            reps = np.concatenate([word_representations(model, stories[s], cnn[s], float(base["context_s"]),
                                                        float(base["stride_s"])) for s in names], axis=1)
            layers = list(range(reps.shape[0]))
            per_layer = []
            for li in layers:
                row = []
                for name in probes:
                    sel, Y, classes = targets[name]
                    row.append(probe(reps[li][sel], Y[sel], groups[sel], args.n_folds,
                                     None if classes is None else classes[sel]))
                per_layer.append(row)
                print(f"  {which:8s} layer {li}: " + ", ".join(f"{n} {v:.3f}" for n, v in zip(probes, row)), flush=True)
            scores.append(per_layer)
    except StudyError as e:
        common.fail(e)
    scores = np.array(scores, np.float32)
    common.save_npz(os.path.join(args.results, "05_probes.npz"), models=np.array(args.models),
                    layers=np.array(layers), probes=np.array(probes), scores=scores, subject=np.array(subj))
    plot(scores, args.models, layers, probes, os.path.join(args.results, "05_probes.png"))
    print("\n  best layer score per model: " + " | ".join(
        f"{m}: " + ", ".join(f"{p_} {scores[i, :, k].max():.3f}" for k, p_ in enumerate(probes))
        for i, m in enumerate(args.models)))
    print(f"\nwrote {args.results}/05_probes.npz and .png in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
