"""Stage 05: what did brain tuning teach the model? Linear probes on word representations.

The paper's probing analysis (Section 3.4): each word's representation is the mean of a layer's
frames within the word; ridge probes (the shared ridge_cv, whole stories held out) predict
  * semantic targets: word vectors (the simulated study's true semantic vectors; on ds003020 the
    lab's English1000 embedding that stage 01 extracted from derivative/english1000sm.hf5, or the
    paper's GloVe with --word-vectors glove.6B.300d.txt; words missing from either are skipped),
  * acoustic targets: the word's log-mel energy profile and log duration, from the audio,
  * category (simulated study only): the word's semantic category, scored as accuracy,
for the frozen baseline, the whole-cortex tuned and the AC-tuned models. Score = mean Pearson r
over target dimensions of held-out predictions. The paper's finding: more semantic information
after whole-cortex tuning; AC tuning keeps the acoustic information.

    python 05_linear_probes.py                                    # subject: the study's first
    python 05_linear_probes.py --subject UTS01                    # English1000 (ds003020's own)
    python 05_linear_probes.py --subject UTS01 --word-vectors glove.6B.300d.txt  # the paper's GloVe
"""
import os

import numpy as np

import common
from lib import batching, checkpoints, ds003020, figures, inputs, plumbing, provenance, speech
from lib.plumbing import StudyError, ranged, stage, tag_type

MODELS = ("baseline", "whole", "AC")


def get_parser():
    p = plumbing.parser(__doc__)
    plumbing.add_common_args(p)
    p.add_argument("--checkpoints", default="checkpoints", help="stage 03's checkpoint folder")
    p.add_argument("--subject", help="whose tuned models (default: the study's first subject)")
    p.add_argument("--models", nargs="+", type=plumbing.one_of(MODELS, "model"),
                   default=list(MODELS), help=f"any of {', '.join(MODELS)}: the frozen model, "
                   "the whole-cortex and the AC-tuned LoRA runs")
    p.add_argument("--seed", type=int, default=0, help="which stage 03 seed")
    p.add_argument("--init-from", help="probe the AC run stage 03 started from another run: an "
                   "ROI (whole) or a run name, e.g. sim01_whole_lora_seed0")
    p.add_argument("--recipe", choices=["repo", "authors"], default="repo", help="which stage 03 "
                   "runs (and stage 02 result): those of this --recipe (docs/methods.md)")
    p.add_argument("--tag", type=tag_type, help="which stage 03 runs when results/ holds runs of "
                   "several settings: their tag (6 hex digits in the name) or 'default'")
    p.add_argument("--word-vectors", help="real data's semantic targets: a GloVe text file (word "
                   "then numbers per line; the paper's choice) or an .hf5 in English1000's layout "
                   "(default on ds003020: the English1000 vectors stage 01 saved)")
    p.add_argument("--n-folds", type=ranged(int, 2), default=5, help="folds of whole stories")
    return p


def get_args(argv=None):
    return get_parser().parse_args(argv)


def acoustic_targets(story):
    """Per word: mean log-mel energy in 8 bands over its span, and its log duration."""
    mel, t = speech.log_mel(story["audio"])
    rows = []
    for a, b in zip(story["word_onsets"], story["word_offsets"]):
        sel = (t >= a) & (t <= b)
        sel = sel if sel.any() else np.abs(t - (a + b) / 2) == np.abs(t - (a + b) / 2).min()
        rows.append(np.concatenate([mel[sel].mean(0), [np.log(b - a)]]))
    return np.array(rows, np.float32)


def probe_targets(args, study, stories, words):
    """{probe: (words it scores, targets: words x dims, classes or None)}, in the order semantic,
    acoustic, category: the semantic vectors (and categories) of content words from the
    simulation's truth, or the real data's word vectors for the words they hold; every word's
    acoustic targets."""
    acoustic = np.concatenate([acoustic_targets(s) for s in stories])
    acoustic = (np.ones(len(words), bool), acoustic, None)
    if study["source"] == "simulated":
        truth = plumbing.load_npz(os.path.join(args.data, "truth.npz"))
        index = {w: i for i, w in enumerate(truth["vocab"])}
        idx = np.array([index[w] for w in words])
        cats = truth["vocab_category"][idx]
        content = cats >= 0  # function words carry no meaning here
        onehot = np.eye(cats.max() + 1, dtype=np.float32)[np.maximum(cats, 0)]
        return dict(semantic=(content, truth["semantic_vectors"][idx], None), acoustic=acoustic,
                    category=(content, onehot, cats))
    vecs, source = ds003020.real_word_vectors(args, set(words))
    known = np.array([w in vecs for w in words])
    print(f"  word vectors ({source}): {known.sum()} of {len(words)} words found, "
          f"{(~known).sum()} skipped")
    if not known.any():
        raise StudyError(f"no word of the stories is in {source}")
    dim = len(next(iter(vecs.values())))
    semantic = np.array([vecs.get(w, np.zeros(dim)) for w in words], np.float32)
    return dict(semantic=(known, semantic, None), acoustic=acoustic)


def probe_layer(reps, targets, groups, n_folds, device="cpu"):
    """Every probe on one layer's word representations (common.probe: ridge, whole stories held
    out): (scores, each probe's score on each fold of held-out stories, NaN-padded to n_folds). The
    folds depend on the stories only, so fold k holds out the same stories for every model."""
    row, by_fold = [], np.full((len(targets), n_folds), np.nan, np.float32)
    for k, (sel, Y, classes) in enumerate(targets.values()):
        folds, classes = [], None if classes is None else classes[sel]
        row.append(common.probe(reps[sel], Y[sel], groups[sel], n_folds, classes, folds, device))
        by_fold[k, :len(folds)] = folds
    return row, by_fold


def probe_model(args, which, model, stories, cnn, targets, groups, base):
    """One model's probes at every layer: its word representations (common.word_representations,
    LoRA merged), then probe_layer. Returns (scores: layers x probes, by fold: layers x probes x
    folds)."""
    window = common.scoring_window(base)
    if not cnn:  # the CNN is frozen in stage 03, so one pass serves every model
        cnn.update({n: batching.story_cnns(model, s["audio"], *window, args.data, n)
                    for n, s in stories.items()})
    reps = np.concatenate([common.word_representations(model, s, cnn[n], *window)
                           for n, s in stories.items()], axis=1)
    per_layer = [probe_layer(reps[li], targets, groups, args.n_folds, args.device)
                 for li in range(len(reps))]
    for li, (row, _) in enumerate(per_layer):
        print(f"  {which:8s} layer {li}: "
              + ", ".join(f"{n} {v:.3f}" for n, v in zip(targets, row)), flush=True)
    return [row for row, _ in per_layer], [folds for _, folds in per_layer]


def summarize(scores, by_fold, models, probes, tuned_layer):
    """The printed comparison: each model's best layer; every model at the layer the whole-cortex
    run was tuned at (like for like); there, each tuned model against the baseline fold by fold (the
    folds differ in difficulty for every model alike, so the paired differences spread less than the
    scores do)."""
    print("\n  best layer score per model: " + " | ".join(
        f"{m}: " + ", ".join(f"{p_} {scores[i, :, k].max():.3f}" for k, p_ in enumerate(probes))
        for i, m in enumerate(models)))
    if tuned_layer is None:
        return
    print(f"  at the tuned layer {tuned_layer}: " + " | ".join(
        f"{m}: " + ", ".join(f"{p_} {scores[i, tuned_layer, k]:.3f}" for k, p_ in enumerate(probes))
        for i, m in enumerate(models)))
    if "baseline" not in models:
        return
    b = models.index("baseline")
    for i, m in [(i, m) for i, m in enumerate(models) if m != "baseline"]:
        parts = []
        for k, p_ in enumerate(probes):
            d = by_fold[i, tuned_layer, k] - by_fold[b, tuned_layer, k]
            d = d[np.isfinite(d)]
            parts.append(f"{p_} {d.mean():+.3f} +- {d.std():.3f} (higher on {(d > 0).sum()} of "
                         f"{len(d)} folds)")
        print(f"  {m} - baseline at layer {tuned_layer}, paired by held-out fold: "
              + ", ".join(parts))


@stage(get_parser)
def main(args):
    study, subj, runs, base = inputs.probed_runs(args)  # every run and checkpoint checked first
    names = study["train"] + study["val"] + [study["test"]]
    stories = {s: plumbing.load_npz(os.path.join(args.data, "stories", f"{s}.npz")) for s in names}
    words = np.concatenate([stories[s]["words"] for s in names])
    groups = np.concatenate([[i] * len(stories[s]["words"]) for i, s in enumerate(names)])
    targets = probe_targets(args, study, stories.values(), words)
    print(f"stage 05: probes {', '.join(targets)} on {len(words)} words, models "
          f"{', '.join(args.models)}")
    scores, by_fold, cnn = [], [], {}
    for which in args.models:
        model = common.load_wavlm(str(base["model"]), int(base["model_seed"]), args.device)
        model = batching.merged(model if which == "baseline" else checkpoints.load_tuned_wavlm(
            model, os.path.join(runs[which]["best"], "model"), False, args.device))
        row, folds = probe_model(args, which, model, stories, cnn, targets, groups, base)
        scores.append(row)
        by_fold.append(folds)
    scores, by_fold = np.array(scores, np.float32), np.array(by_fold, np.float32)
    spreads, layers = np.nanstd(by_fold, axis=-1), np.arange(scores.shape[1])
    path = provenance.save_probes(args, study, subj, runs, base, __file__, scores=scores,
                                  models=np.array(args.models), layers=layers,
                                  scores_by_fold=by_fold, probes=np.array(list(targets)),
                                  scores_sd_across_folds=spreads)
    figures.probes(scores, spreads, args.models, list(layers), list(targets), path[:-4] + ".png",
                   subj, {m: provenance.describe_run(r["provenance"]) for m, r in runs.items()})
    summarize(scores, by_fold, args.models, list(targets),
              int(runs["whole"]["layer"]) if "whole" in runs else None)
    return f"{path} and .png"


if __name__ == "__main__":
    main()
