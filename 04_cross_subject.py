"""Stage 04: do brain-tuned models generalise across subjects?

The paper's cross-subject analysis (Section 3.3): a WavLM fine-tuned on subject A's responses
(stage 03) gives features; stage 02's exact ridge recipe maps them to subject B's voxels (fit on
B's train + validation stories, scored on B's test story). The gain says whether what the model
learned from A is a property of the speech, not of A's brain. It is measured like for like: against
the untuned model at the same layer, with B's ridge recipe (mean_delta_r); the gain against B's
best-layer baseline is printed and saved beside it (mean_delta_r_vs_best): a change of layer alone
moves r.

    python 04_cross_subject.py                  # every subject's whole-cortex model, on everyone
    python 04_cross_subject.py --roi AC --tuned-on sim01

Reads stage 02's and stage 03's results (each checked: same study, the run scored against the
stage 02 result that is there now, the checkpoint that run's) and the tuned features stage 03
cached under data/features/03_.../ (recomputed from the checkpoint if absent). Writes
04_cross_subject.npz for the default runs on every subject, and a file named after the choice
otherwise (--roi AC: 04_cross_subject_AC.npz, a subset: ..._sim01-on-sim01-sim02.npz), so no choice
replaces another.
"""
import os

import numpy as np

import common
from lib import batching, checkpoints, figures, inputs, plumbing, provenance
from lib.checkpoints import ROIS
from lib.plumbing import one_of, stage, tag_type


def get_parser():
    p = plumbing.parser(__doc__)
    plumbing.add_common_args(p)
    p.add_argument("--checkpoints", default="checkpoints", help="stage 03's checkpoint folder")
    p.add_argument("--tuned-on", nargs="+", help="subjects whose tuned models to use (default: "
                   "all, and the joint runs there are)")
    p.add_argument("--evaluate-on", nargs="+", help="subjects to evaluate on (default: all)")
    p.add_argument("--roi", type=one_of(ROIS, "ROI"), default="whole",
                   help=f"which stage 03 runs: {'|'.join(ROIS)}")
    p.add_argument("--full-finetune", action="store_true", help="use the full fine-tuning runs")
    p.add_argument("--seed", type=int, default=0, help="which stage 03 seed")
    p.add_argument("--init-from", help="use the runs stage 03 started from another run: an ROI "
                   "(whole: each subject's whole-cortex run) or a run's name")
    p.add_argument("--tag", type=tag_type, help="which stage 03 runs when results/ holds runs of "
                   "several settings: their tag (6 hex digits in the name) or 'default'")
    p.add_argument("--recipe", choices=["repo", "authors"], default="repo", help="which stage 03 "
                   "runs: those of stage 03's --recipe (docs/methods.md)")
    p.add_argument("--data-efficiency", action="store_true", help="for each subject a joint run "
                   "never saw: test r of the ridge fit on 1, 2, 4, ... of the stories, with "
                   "untuned, single-subject and joint features (beyond the paper: README)")
    return p


def get_args(argv=None):
    return get_parser().parse_args(argv)


def tuned_features(args, run, study):
    """A tuned model's features of every story at its layer, downsampled to the TRs: stage 03's
    cache (keyed by the tuned model's weights), recomputed from the checkpoint if absent."""
    base = run["baseline"]
    model = checkpoints.load_tuned(args, run, common.load_wavlm(
        str(base["model"]), int(base["model_seed"]), args.device), args.device)
    fingerprint, layer = plumbing.model_fingerprint(model), int(run["layer"])  # stage 03's key
    model, cache = batching.merged(model), os.path.join(args.data, "features", run["name"])
    window = common.scoring_window(base)
    return {s: common.story_features(model, fingerprint, cache,
                                     os.path.join(args.data, "stories", f"{s}.npz"), *window[:2],
                                     top_layer=layer, data=args.data, take=window[2])[layer]
            for s in study["train"] + study["val"] + [study["test"]]}


def cross_subject(args, study, subject_files, runs, features):
    """Each tuned model (rows: the subject it was tuned on; features: its tuned_features) scored on
    each subject (columns) with that subject's stage 02 recipe, against the untuned model at the
    same layer. Returns (per-voxel arrays, mean delta r, mean delta r against the subject's
    best-layer baseline)."""
    delta = np.zeros((len(runs), len(subject_files)), np.float32)
    vs_best, out, untuned = np.zeros_like(delta), {}, {}  # untuned r by (subject, layer)
    for i, (a, run) in enumerate(runs.items()):
        layer = int(run["layer"])
        for j, (b, d) in enumerate(subject_files.items()):
            base = run["baselines"][b]
            recipe = common.ridge_recipe(base)
            r = common.score_on_test(features[a], d, study, device=args.device, **recipe)[0]
            if (b, layer) not in untuned:
                untuned[b, layer] = common.untuned_r(base, layer, d, study, args.device)
            delta[i, j], vs_best[i, j] = (r - untuned[b, layer]).mean(), (r - base["test_r"]).mean()
            out.update({f"test_r_{a}_on_{b}": r, f"delta_r_{a}_on_{b}": r - untuned[b, layer],
                        f"delta_vs_best_{a}_on_{b}": r - base["test_r"],
                        f"untuned_r_{b}_layer{layer}": untuned[b, layer]})
            print(f"  tuned on {a}, evaluated on {b}: mean r {r.mean():.4f}; untuned at layer "
                  f"{layer} {untuned[b, layer].mean():.4f} (delta {delta[i, j]:+.4f}); {b}'s best "
                  f"baseline, layer {int(base['best_layer'])}, {base['test_r'].mean():.4f} "
                  f"(delta {vs_best[i, j]:+.4f})", flush=True)
    return out, delta, vs_best


def held_out(delta, tuned_on, evaluated_on):
    """For each subject that a joint run never saw: its gain (like for like) from its own model,
    from the models tuned on one other subject (their mean), and from the joint models of others
    (their mean; the leave-one-out run when there is one). Returns {subject: (own, single,
    joint)}."""
    out = {}
    for j, b in enumerate(evaluated_on):
        joint = [i for i, a in enumerate(tuned_on)
                 if a.startswith("joint-") and b not in a.split("-")]
        if not joint:
            continue
        single = [i for i, a in enumerate(tuned_on) if not a.startswith("joint-") and a != b]
        own = [i for i, a in enumerate(tuned_on) if a == b]
        out[b] = (delta[own[0], j] if own else np.nan,
                  np.mean(delta[single, j]) if single else np.nan, np.mean(delta[joint, j]))
        print(f"  {b}, never seen by a joint run: own model {out[b][0]:+.4f}, models tuned on one "
              f"other subject {out[b][1]:+.4f} (mean of {len(single)}), the joint model of others "
              f"{out[b][2]:+.4f}")
    return out


def stories_to_match(sizes, curve, target):
    """The stories a curve of test r needs to reach `target` (linear between the sizes measured;
    NaN when it never does)."""
    for k in range(len(sizes)):
        if curve[k] >= target:
            if k == 0:
                return float(sizes[0])
            return float(sizes[k - 1] + (target - curve[k - 1]) / (curve[k] - curve[k - 1])
                         * (sizes[k] - sizes[k - 1]))
    return np.nan


def data_efficiency(args, study, subject_files, runs, features):
    """How many stories of a subject the ridge needs with each kind of features: for each subject a
    joint run never saw, stage 02's recipe fit on its first 1, 2, 4, ... stories (of train + val)
    and scored on the test story, with the untuned model's features (same layer), each model tuned
    on one other subject, and the joint model of the others. Returns (sizes, {subject: {kind:
    mean test r per size}}, {subject: {kind: stories needed to match untuned with all}})."""
    fit = study["train"] + study["val"]
    sizes = sorted({min(2 ** k, len(fit)) for k in range(int(np.ceil(np.log2(len(fit)))) + 1)})
    curves, needed, untuned = {}, {}, {}  # untuned features by layer: every subject's alike
    for b, d in subject_files.items():
        kinds = [a for a in runs if a != b and b not in a.split("-")]
        if not any(a.startswith("joint-") for a in kinds):
            continue
        base, layer = runs[kinds[0]]["baselines"][b], int(runs[kinds[0]]["layer"])
        if layer not in untuned:
            untuned[layer] = common.untuned_features(base, layer, study, args.device)
        kind_features = dict(untuned=untuned[layer], **{a: features[a] for a in kinds})
        recipe = common.ridge_recipe(base)
        curves[b] = {kind: np.array([common.score_on_test(
            f, d, dict(study, train=fit[:n], val=[]), device=args.device, **recipe)[0].mean()
            for n in sizes]) for kind, f in kind_features.items()}
        target = curves[b]["untuned"][-1]  # untuned features with every story
        needed[b] = {k: stories_to_match(sizes, c, target) for k, c in curves[b].items()}
        print(f"  {b}: mean test r with " + "/".join(map(str, sizes)) + " stories: " + "; ".join(
            f"{k} " + " ".join(f"{v:.3f}" for v in c) + " (untuned-with-all reached at "
            + (f"{needed[b][k]:.1f})" if np.isfinite(needed[b][k]) else "no size)")
            for k, c in curves[b].items()), flush=True)
    return sizes, curves, needed


def unseen_arrays(unseen, sizes, curves, needed):
    """held_out's and data_efficiency's numbers as the result file's arrays."""
    out = {f"unseen_{b}": np.array(v, np.float32) for b, v in unseen.items()}  # own, single, joint
    out.update({f"efficiency_{b}_{k}": c for b, cs in curves.items() for k, c in cs.items()})
    out.update({f"stories_to_match_{b}_{k}": np.float32(n) for b, ns in needed.items()
                for k, n in ns.items()})
    return dict(out, efficiency_stories=np.array(sizes, np.int64)) if curves else out


def print_matrix(title, matrix, tuned_on, evaluated_on):
    print(f"\n  {title} (rows: tuned on, columns: evaluated on)")
    w = max(10, max(len(a) for a in tuned_on) + 1)
    print("  " + " " * w + "".join(f"{b:>10s}" for b in evaluated_on))
    for i, a in enumerate(tuned_on):
        print(f"  {a:{w}s}" + "".join(f"{matrix[i, j]:+10.4f}" for j in range(len(evaluated_on))))
    mask = np.array([[a != b for b in evaluated_on] for a in tuned_on])
    if mask.any():
        print(f"  off-diagonal mean {matrix[mask].mean():+.4f}, min {matrix[mask].min():+.4f}")


@stage(get_parser)
def main(args):
    study, subject_files, runs = inputs.cross_subject(args)  # every run and checkpoint checked
    tuned_on, evaluated_on = list(runs), list(subject_files)
    print(f"stage 04: models tuned on {', '.join(tuned_on)} evaluated on {', '.join(evaluated_on)}")
    features = {a: tuned_features(args, run, study) for a, run in runs.items()}  # once each
    out, delta, vs_best = cross_subject(args, study, subject_files, runs, features)
    unseen = held_out(delta, tuned_on, evaluated_on)  # joint runs: the subjects they never saw
    sizes, curves, needed = (data_efficiency(args, study, subject_files, runs, features)
                             if args.data_efficiency else ([], {}, {}))
    path = provenance.save_cross_subject(args, study, runs, out, __file__, mean_delta_r=delta,
                                         tuned_on=np.array(tuned_on), mean_delta_r_vs_best=vs_best,
                                         evaluated_on=np.array(evaluated_on),
                                         **unseen_arrays(unseen, sizes, curves, needed))
    in_words = provenance.describe_run(next(iter(runs.values()))["provenance"]).split(" ", 1)[1]
    figures.cross_subject(delta, tuned_on, evaluated_on, path[:-4] + ".png", in_words)
    if curves:
        figures.data_efficiency(sizes, curves, needed, path[:-4] + "_data_efficiency.png")
    print_matrix("mean delta r, like for like: tuned - untuned at the same layer, the evaluated "
                 "subject's recipe", delta, tuned_on, evaluated_on)
    print_matrix("mean delta r against the evaluated subject's best baseline (stage 02's layer)",
                 vs_best, tuned_on, evaluated_on)
    return f"{path} and .png"


if __name__ == "__main__":
    main()
