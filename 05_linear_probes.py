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

    python 05_linear_probes.py                       # subject: the study's first
    python 05_linear_probes.py --subject UTS01                    # English1000 (ds003020's own)
    python 05_linear_probes.py --subject UTS01 --word-vectors glove.6B.300d.txt   # the paper's GloVe
"""
import json
import os
import re
import time

import numpy as np

import common
from lib import checkpoints, ds003020, plumbing, probing, provenance, speech
from lib.plumbing import StudyError

MODELS = ("baseline", "whole", "AC")


def get_args(argv=None):
    return get_parser().parse_args(argv)


def get_parser():
    p = plumbing.parser(__doc__)
    plumbing.add_common_args(p)
    p.add_argument("--checkpoints", default="checkpoints", help="stage 03's checkpoint folder")
    p.add_argument("--subject", help="whose tuned models to probe (default: the study's first subject)")
    p.add_argument("--models", nargs="+", default=list(MODELS), help=f"any of {', '.join(MODELS)}: the frozen "
                   "model, the whole-cortex and the AC-tuned LoRA runs")
    p.add_argument("--seed", type=int, default=0, help="which stage 03 seed")
    p.add_argument("--init-from", help="probe the AC run stage 03 started from another run: an ROI (whole) or "
                   "a run name, e.g. sim01_whole_lora_seed0")
    p.add_argument("--tag", help="which stage 03 runs when results/ holds runs of several settings: their tag "
                   "(6 hex digits in the name) or 'default'")
    p.add_argument("--word-vectors", help="real data's semantic targets: a GloVe text file (word then numbers "
                   "per line; the paper's choice) or an .hf5 in English1000's layout (default on ds003020: the "
                   "English1000 vectors stage 01 saved in data/english1000.npz)")
    p.add_argument("--n-folds", type=int, default=5, help="folds of whole stories (>= 2)")
    return p


def check_args(args):
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        raise StudyError(f"unknown model(s) {' '.join(unknown)}: choose from {', '.join(MODELS)}")
    plumbing.check_ranges([("--n-folds", args.n_folds, 2, None)])
    if args.tag not in (None, "default") and not re.fullmatch(r"[0-9a-f]{6}", args.tag):
        raise StudyError(f"--tag {args.tag!r}: a tag is 'default' or the 6 hex digits in a run's name")
    if args.word_vectors and not os.path.exists(args.word_vectors):
        raise StudyError(f"--word-vectors {args.word_vectors} not found")


def load_runs(args, subj, study):
    """The stage 03 runs to probe ({'whole': run, 'AC': run}), each checked by provenance.load_run, and
    the stage 02 result they were scored against (all runs must share it)."""
    runs = {}
    for which in [m for m in args.models if m != "baseline"]:
        runs[which] = provenance.load_run(args, subj, which, "lora", args.seed, args.init_from if which == "AC" else None,
                                      provenance.baseline_tag_flag(args.tag), study)
    bases = {r["baseline"]["path"] for r in runs.values()}
    if len(bases) > 1:
        raise StudyError(f"the runs were scored against different stage 02 results ({', '.join(sorted(bases))}); "
                         "choose runs of one setting with --tag")
    base = next(iter(runs.values()))["baseline"] if runs else provenance.load_baseline(args, subj, study)
    return runs, base


def load_model(args, which, run, base, device):
    if which == "baseline":
        return common.load_wavlm(str(base["model"]), int(base["model_seed"]), device)
    best = os.path.join(args.checkpoints, run["name"], "best")
    if not os.path.isdir(os.path.join(best, "model")):
        raise StudyError(f"{run['path']} has no checkpoint ({best}/model not found): was --checkpoints "
                         f"{args.checkpoints} the folder of that run?")
    return checkpoints.load_tuned_wavlm(base, os.path.join(best, "model"), full=False, device=device)


def output_name(args, study, subj, tag):
    """05_probes[_<choice>].npz: the defaults' choice keeps the plain name."""
    parts = [subj if subj != study["subjects"][0] else "",
             "-".join(args.models) if args.models != list(MODELS) else "", f"seed{args.seed}" if args.seed else "",
             tag, f"from_{args.init_from}" if args.init_from else "", f"folds{args.n_folds}" if args.n_folds != 5 else ""]
    return "_".join(["05_probes"] + [p for p in parts if p])


def acoustic_targets(story):
    """Per word: mean log-mel energy in 8 bands over its span, and its log duration."""
    mel, t = speech.log_mel(story["audio"])
    rows = []
    for a, b in zip(story["word_onsets"], story["word_offsets"]):
        sel = (t >= a) & (t <= b)
        sel = sel if sel.any() else np.abs(t - (a + b) / 2) == np.abs(t - (a + b) / 2).min()
        rows.append(np.concatenate([mel[sel].mean(0), [np.log(b - a)]]))
    return np.array(rows, np.float32)


def probe_layer(reps, targets, probes, groups, n_folds, device="cpu"):
    """Every probe on one layer's word representations: (scores, each probe's score on each fold of
    held-out stories, NaN-padded to n_folds). The folds depend on the stories only, so fold k holds
    out the same stories for every model: models compare fold by fold (summarize)."""
    row, by_fold = [], np.full((len(probes), n_folds), np.nan, np.float32)
    for k, name in enumerate(probes):
        sel, Y, classes = targets[name]
        folds = []
        row.append(probing.probe(reps[sel], Y[sel], groups[sel], n_folds, None if classes is None else classes[sel], folds,
                                 device))
        by_fold[k, :len(folds)] = folds
    return row, by_fold


def summarize(scores, by_fold, models, probes, tuned_layer):
    """The printed comparison: each model's best layer; every model at the layer the whole-cortex run
    was tuned at (like for like); there, each tuned model against the baseline fold by fold (the
    folds differ in difficulty for every model alike, so the paired differences spread less than
    the scores do)."""
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
            parts.append(f"{p_} {d.mean():+.3f} +- {d.std():.3f} (higher on {(d > 0).sum()} of {len(d)} folds)")
        print(f"  {m} - baseline at layer {tuned_layer}, paired by held-out fold: " + ", ".join(parts))


def plot(scores, spreads, models, layers, probes, path, subject, runs):
    """Each probe's score by hidden state, one line per model, +- its sd across the held-out folds
    (models side by side); the legend names the runs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, len(probes), figsize=(4.5 * len(probes), 4.4), squeeze=False)
    for k, name in enumerate(probes):
        for m, model in enumerate(models):
            ax[0, k].errorbar(np.array(layers) + 0.06 * (m - (len(models) - 1) / 2), scores[m, :, k], spreads[m, :, k],
                              fmt="o-", capsize=2, label=f"{model}: {runs[model]}" if model in runs else
                              f"{model}: untuned (stage 02's model)")
        ax[0, k].set_xticks(layers)  # hidden states are whole numbers
        ax[0, k].set(xlabel="hidden state (0: the transformer's input)",
                     ylabel=("accuracy" if name == "category" else "mean r") + " (held-out stories; +- sd across folds)",
                     title=f"{name} probe")
    handles, names = ax[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=1, fontsize=7, frameon=False)
    fig.suptitle(f"Linear probes of {subject}'s models: word representations -> targets")
    fig.subplots_adjust(bottom=0.18 + 0.05 * len(models), top=0.85, wspace=0.3)
    plumbing.save_figure(fig, path)


def main(argv=None):
    args = get_args(argv)
    plumbing.set_threads(args.threads)
    t0 = time.time()
    try:
        check_args(args)
        device = plumbing.pick_device(args.device)
        study = common.load_study(args.data)
        subj = args.subject or study["subjects"][0]
        plumbing.subject_list([subj], study)
        runs, base = load_runs(args, subj, study)
        names = study["train"] + study["val"] + [study["test"]]
        stories = {s: plumbing.load_npz(os.path.join(args.data, "stories", f"{s}.npz")) for s in names}
        words = np.concatenate([stories[s]["words"] for s in names])
        groups = np.concatenate([[i] * len(stories[s]["words"]) for i, s in enumerate(names)])
        acoustic = np.concatenate([acoustic_targets(stories[s]) for s in names])
        targets = {"acoustic": (np.ones(len(words), bool), acoustic, None)}
        if study["source"] == "simulated":
            truth = plumbing.load_npz(os.path.join(args.data, "truth.npz"))
            index = {w: i for i, w in enumerate(truth["vocab"])}
            idx = np.array([index[w] for w in words])
            content = truth["vocab_category"][idx] >= 0  # function words carry no meaning here
            cats = truth["vocab_category"][idx]
            targets["semantic"] = (content, truth["semantic_vectors"][idx], None)
            targets["category"] = (content, np.eye(cats.max() + 1, dtype=np.float32)[np.maximum(cats, 0)], cats)
        else:
            vecs, source = ds003020.real_word_vectors(args, set(words))
            known = np.array([w in vecs for w in words])
            print(f"  word vectors ({source}): {known.sum()} of {len(words)} words found, {(~known).sum()} skipped")
            if not known.any():
                raise StudyError(f"no word of the stories is in {source}")
            dim = len(next(iter(vecs.values())))
            targets["semantic"] = (known, np.array([vecs.get(w, np.zeros(dim)) for w in words], np.float32), None)
        probes = [p_ for p_ in ("semantic", "acoustic", "category") if p_ in targets]
        print(f"stage 05: probes {', '.join(probes)} on {len(words)} words, models {', '.join(args.models)}")
        scores, by_fold, layers, cnn = [], [], None, None
        for which in args.models:
            model = common.merged(load_model(args, which, runs.get(which), base, device))
            if cnn is None:  # the CNN is frozen in stage 03, so one pass serves every model
                cnn = {s: common.story_cnn(model, stories[s]["audio"], args.data, s) for s in names}
            reps = np.concatenate([probing.word_representations(model, stories[s], cnn[s], float(base["context_s"]),
                                                        float(base["stride_s"])) for s in names], axis=1)
            layers = list(range(reps.shape[0]))
            per_layer = [probe_layer(reps[li], targets, probes, groups, args.n_folds, device) for li in layers]
            for li, (row, _) in enumerate(per_layer):
                print(f"  {which:8s} layer {li}: " + ", ".join(f"{n} {v:.3f}" for n, v in zip(probes, row)), flush=True)
            scores.append([row for row, _ in per_layer])
            by_fold.append([folds for _, folds in per_layer])
    except StudyError as e:
        plumbing.fail(e)
    except KeyboardInterrupt:
        plumbing.fail("interrupted: nothing was written; rerun the same command", 130)
    scores, by_fold = np.array(scores, np.float32), np.array(by_fold, np.float32)
    spreads = np.nanstd(by_fold, axis=-1)
    tag = next(iter(runs.values()))["tag"] if runs else ""
    name = output_name(args, study, subj, f"{tag}")
    prov = dict(stage="05", stories=study["stories_fingerprint"], subject=subj, baseline=base["fingerprint"],
                runs={k: r["fingerprint"] for k, r in runs.items()}, word_vectors=args.word_vectors, n_folds=args.n_folds,
                code=provenance.code_state(__file__))
    plumbing.save_npz(os.path.join(args.results, f"{name}.npz"), models=np.array(args.models),
                    layers=np.array(layers), probes=np.array(probes), scores=scores, scores_sd_across_folds=spreads,
                    scores_by_fold=by_fold,
                    subject=np.array(subj),
                    runs=np.array([runs[m]["name"] if m in runs else "" for m in args.models]),
                    provenance=np.array(json.dumps(prov, sort_keys=True)))
    plot(scores, spreads, args.models, layers, probes, os.path.join(args.results, f"{name}.png"), subj,
         {m: provenance.describe_run(r["provenance"]) for m, r in runs.items()})
    summarize(scores, by_fold, args.models, probes, int(runs["whole"]["layer"]) if "whole" in runs else None)
    print(f"\nwrote {args.results}/{name}.npz and .png in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
