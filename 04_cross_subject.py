"""Stage 04: do brain-tuned models generalise across subjects?

The paper's cross-subject analysis (Section 3.3): a WavLM fine-tuned on subject A's responses
(stage 03) gives features; stage 02's exact ridge recipe maps them to subject B's voxels (fit on
B's train + validation stories, scored on B's test story). The gain says whether what the model
learned from A is a property of the speech, not of A's brain. It is measured like for like: against
the untuned model at the same layer, with B's ridge recipe (mean_delta_r); the gain against B's
best-layer baseline is printed and saved beside it (mean_delta_r_vs_best): a change of layer alone
moves r.

    python 04_cross_subject.py                  # every subject's whole-cortex LoRA model, on everyone
    python 04_cross_subject.py --roi AC --tuned-on sim01

Reads stage 02's and stage 03's results (each checked: same study, the run scored against the
stage 02 result that is there now) and the tuned features stage 03 cached under
data/features/03_.../ (recomputed from the checkpoint if absent). Writes 04_cross_subject.npz for
the default runs on every subject, and a file named after the choice otherwise (--roi AC:
04_cross_subject_AC.npz, a subset: ..._sim01-on-sim01-sim02.npz), so no choice replaces another.
"""
import json
import os
import re
import textwrap
import time

import numpy as np

import common
from lib import checkpoints, plumbing, provenance, scoring
from lib.checkpoints import ROIS
from lib.plumbing import StudyError


def get_args(argv=None):
    return get_parser().parse_args(argv)


def get_parser():
    p = plumbing.parser(__doc__)
    plumbing.add_common_args(p)
    p.add_argument("--checkpoints", default="checkpoints", help="stage 03's checkpoint folder")
    p.add_argument("--tuned-on", nargs="+", help="subjects whose tuned models to use (default: all)")
    p.add_argument("--evaluate-on", nargs="+", help="subjects to evaluate on (default: all)")
    p.add_argument("--roi", default="whole", help=f"which stage 03 runs: {'|'.join(ROIS)}")
    p.add_argument("--full-finetune", action="store_true", help="use the full fine-tuning runs")
    p.add_argument("--seed", type=int, default=0, help="which stage 03 seed")
    p.add_argument("--init-from", help="use the runs stage 03 started from another run: an ROI (whole: each "
                   "subject's whole-cortex run) or a run name, e.g. sim01_whole_lora_seed0")
    p.add_argument("--tag", help="which stage 03 runs when results/ holds runs of several settings: their tag "
                   "(6 hex digits in the name) or 'default'")
    return p


def check_args(args):
    if args.roi not in ROIS:
        raise StudyError(f"unknown ROI {args.roi!r}: choose one of {', '.join(ROIS)}")
    if args.tag not in (None, "default") and not re.fullmatch(r"[0-9a-f]{6}", args.tag):
        raise StudyError(f"--tag {args.tag!r}: a tag is 'default' or the 6 hex digits in a run's name")


def output_name(args, study, tuned_on, evaluated_on, tag):
    """04_cross_subject[_<choice>].npz: the defaults' choice keeps the plain name."""
    parts = [args.roi if args.roi != "whole" else "", "full" if args.full_finetune else "",
             f"seed{args.seed}" if args.seed else "", tag, f"from_{args.init_from}" if args.init_from else ""]
    if tuned_on != study["subjects"] or evaluated_on != study["subjects"]:
        parts.append(f"{'-'.join(tuned_on)}-on-{'-'.join(evaluated_on)}")
    return "_".join(["04_cross_subject"] + [p for p in parts if p])


def plot(mean_delta, tuned_on, evaluated_on, path, runs=""):
    """The like-for-like gain of each tuned model on each subject; `runs`: the runs, in words."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    title = "\n".join(["mean delta r over the untuned model at the same layer"]
                      + textwrap.wrap(f"runs: {runs}", 60, break_on_hyphens=False))
    if len(tuned_on) == 1:  # one tuned model: a bar per subject it is scored on, not a one-row heatmap
        fig, ax = plt.subplots(figsize=(1.2 * len(evaluated_on) + 3, 3.6))
        ax.bar(range(len(evaluated_on)), mean_delta[0], color=["C1" if s == tuned_on[0] else "C0" for s in evaluated_on])
        ax.axhline(0, color="k", lw=1)
        ax.set_xticks(range(len(evaluated_on)), [f"{s}{' (own)' if s == tuned_on[0] else ''}" for s in evaluated_on])
        ax.set(xlabel="evaluated on", ylabel="mean delta r", title=f"{tuned_on[0]}'s tuned model:\n{title}")
        plumbing.save_figure(fig, path)
        return
    fig, ax = plt.subplots(figsize=(1.3 * len(evaluated_on) + 2.5, 1.1 * len(tuned_on) + 1.8))
    lim = np.nanmax(np.abs(mean_delta)) or 1
    im = ax.imshow(mean_delta, cmap="RdBu_r", vmin=-lim, vmax=lim)
    for i in range(len(tuned_on)):
        for j in range(len(evaluated_on)):
            ax.text(j, i, f"{mean_delta[i, j]:+.3f}", ha="center", va="center",
                    fontweight="bold" if tuned_on[i] == evaluated_on[j] else "normal")
            if tuned_on[i] == evaluated_on[j]:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=2))
    ax.set_xticks(range(len(evaluated_on)), evaluated_on)
    ax.set_yticks(range(len(tuned_on)), tuned_on)
    ax.set(xlabel="evaluated on", ylabel="tuned on", title=title)
    fig.colorbar(im, ax=ax)
    plumbing.save_figure(fig, path)


def find_runs(args, tuned_on, study):
    """The stage 03 run (and checkpoint) of every tuned-on subject, all found before any work. Runs
    missing: one error naming the command that makes them, with the flags of a run that is there,
    or --tuned-on for the runs there are."""
    runs, missing = {}, []
    mode = "full" if args.full_finetune else "lora"
    for a in tuned_on:
        try:
            runs[a] = checkpoints.find_tuned(args, a, study)
        except provenance.MissingRun:
            missing.append(a)
    if missing:
        found = next(iter(runs.values()), None)
        flags = [f for f in (found["provenance"]["flags"] if found else []) if not f.startswith("--init-from")]
        make = provenance.train_command(args, missing, args.roi, mode, args.seed, args.init_from, *flags)
        names = ", ".join(provenance.run_name(a, args.roi, mode, args.seed) + "*" for a in missing)
        raise StudyError(f"no stage 03 result {names} in {args.results}/ (nothing was scored): run {make} first"
                         + (f" (the flags of {found['name']}), or pass --tuned-on {' '.join(runs)} to use the runs there "
                            "are" if found else " (with your training flags)"))
    if len({r["tag"] for r in runs.values()}) > 1:  # a matrix compares like with like
        raise StudyError("the runs differ in settings: " + ", ".join(f"{r['name']}" for r in runs.values())
                         + "; choose one setting with --tag TAG")
    return runs


def baselines_for(args, run, evaluated_on, study, loaded):
    """Each evaluated subject's stage 02 result of the setting the run was scored against, checked
    to be fit on the run's base model (read once per subject and setting: `loaded`)."""
    tag = run["provenance"]["baseline"]["tag"]
    out = {}
    for b in evaluated_on:
        if (b, tag) not in loaded:
            loaded[b, tag] = provenance.load_baseline(args, b, study, tag)
        out[b] = loaded[b, tag]
        if out[b]["provenance"]["model_fingerprint"] != run["provenance"]["model_fingerprint"]:
            raise StudyError(f"{out[b]['path']} was fit on another base model than {run['name']} was tuned "
                             f"from: rerun it with {out[b]['rebuild']}")
    return out


def print_matrix(title, matrix, tuned_on, evaluated_on):
    print(f"\n  {title} (rows: tuned on, columns: evaluated on)")
    print("  " + " " * 10 + "".join(f"{b:>10s}" for b in evaluated_on))
    for i, a in enumerate(tuned_on):
        print(f"  {a:10s}" + "".join(f"{matrix[i, j]:+10.4f}" for j in range(len(evaluated_on))))
    mask = np.array([[a != b for b in evaluated_on] for a in tuned_on])
    if mask.any():
        print(f"  off-diagonal mean {matrix[mask].mean():+.4f}, min {matrix[mask].min():+.4f}")


def main(argv=None):
    args = get_args(argv)
    plumbing.set_threads(args.threads)
    t0 = time.time()
    try:
        check_args(args)
        device = plumbing.pick_device(args.device)
        study = common.load_study(args.data)
        tuned_on = plumbing.subject_list(args.tuned_on, study)
        evaluated_on = plumbing.subject_list(args.evaluate_on, study)
        subj_data = {s: common.load_subject(args.data, s, study) for s in evaluated_on}
        print(f"stage 04: models tuned on {', '.join(tuned_on)} evaluated on {', '.join(evaluated_on)}")
        # like for like: against the untuned model at the tuned model's layer; and against B's best baseline
        mean_delta, mean_vs_best = (np.zeros((len(tuned_on), len(evaluated_on)), np.float32) for _ in range(2))
        out, loaded, memo, untuned = {}, {}, {}, {}  # untuned: r of the untuned model by (subject, layer)
        used = find_runs(args, tuned_on, study)  # every run and checkpoint checked before any scoring
        baselines_of = {a: baselines_for(args, run, evaluated_on, study, loaded) for a, run in used.items()}
        for i, (a, run) in enumerate(used.items()):
            model, baselines = checkpoints.load_tuned(args, run, device), baselines_of[a]
            layer, stories = int(run["layer"]), study["train"] + study["val"] + [study["test"]]
            fp = plumbing.model_fingerprint(model)  # the tuned model's: stage 03 cached its features under it
            model = common.merged(model)
            features = {s: common.story_features(model, fp, os.path.join(args.data, "features", run["name"]),
                                                 os.path.join(args.data, "stories", f"{s}.npz"),
                                                 float(run["baseline"]["context_s"]), float(run["baseline"]["stride_s"]),
                                                 top_layer=layer, data=args.data)[layer] for s in stories}
            for j, b in enumerate(evaluated_on):
                r, _, _ = common.score_on_test(features, subj_data[b], study, device=device,
                                               **common.ridge_recipe(baselines[b]))
                if (b, layer) not in untuned:
                    untuned[b, layer] = scoring.untuned_r(baselines[b], layer, subj_data[b], study, args, device, memo)
                delta, vs_best = r - untuned[b, layer], r - baselines[b]["test_r"]
                mean_delta[i, j], mean_vs_best[i, j] = delta.mean(), vs_best.mean()
                out.update({f"test_r_{a}_on_{b}": r, f"delta_r_{a}_on_{b}": delta, f"delta_vs_best_{a}_on_{b}": vs_best,
                            f"untuned_r_{b}_layer{layer}": untuned[b, layer],
                            f"baseline_{b}": np.array(baselines[b]["fingerprint"])})
                print(f"  tuned on {a}, evaluated on {b}: mean r {r.mean():.4f}; untuned at layer {layer} "
                      f"{untuned[b, layer].mean():.4f} (delta {delta.mean():+.4f}); {b}'s best baseline, layer "
                      f"{int(baselines[b]['best_layer'])}, {baselines[b]['test_r'].mean():.4f} (delta "
                      f"{vs_best.mean():+.4f})", flush=True)
    except StudyError as e:
        plumbing.fail(e)
    except KeyboardInterrupt:
        plumbing.fail("interrupted: nothing was written; rerun the same command", 130)
    tag = next(iter(used.values()))["tag"]
    name = output_name(args, study, tuned_on, evaluated_on, tag)
    prov = dict(stage="04", stories=study["stories_fingerprint"], runs={a: r["fingerprint"] for a, r in used.items()},
                baselines={k[len("baseline_"):]: str(v) for k, v in out.items() if k.startswith("baseline_")},
                code=provenance.code_state(__file__))
    plumbing.save_npz(os.path.join(args.results, f"{name}.npz"), tuned_on=np.array(tuned_on),
                      evaluated_on=np.array(evaluated_on), mean_delta_r=mean_delta, mean_delta_r_vs_best=mean_vs_best,
                      roi=np.array(args.roi), mode=np.array("full" if args.full_finetune else "lora"),
                      seed=np.int64(args.seed), runs=np.array([r["name"] for r in used.values()]),
                      provenance=np.array(json.dumps(prov, sort_keys=True)), **out)
    runs_in_words = provenance.describe_run(next(iter(used.values()))["provenance"]).split(" ", 1)[1]  # not the subject
    plot(mean_delta, tuned_on, evaluated_on, os.path.join(args.results, f"{name}.png"), runs_in_words)
    print_matrix("mean delta r, like for like: tuned - untuned at the same layer, the evaluated subject's recipe",
                 mean_delta, tuned_on, evaluated_on)
    print_matrix("mean delta r against the evaluated subject's best baseline (stage 02's layer)", mean_vs_best,
                 tuned_on, evaluated_on)
    print(f"\nwrote {args.results}/{name}.npz and .png in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
