"""What each stage reads, found and checked in one call: the study and its subjects, the layers
asked for, stage 02's baselines and stage 03's runs with their checkpoints. Anything stale,
foreign or missing is refused here, before any work, with one line naming the command that makes
it (lib/provenance.py keeps the records these checks compare).

Used by stages 02-05 and viewer.py.
"""
import glob
import json
import os

import numpy as np

from lib import anatomy, checkpoints, ds003020, plumbing, provenance
from lib.plumbing import StudyError
from lib.study import load_study, load_subject


def study_and_subjects(args, requested):
    """The study in args.data and the subjects asked for (default: all), each file opened lazily."""
    study = load_study(args.data)
    return study, {s: load_subject(args.data, s, study) for s in plumbing.subject_list(requested, study)}


def layers(requested, n_states, model):
    """The hidden states asked for (default: all), each checked to exist in the model."""
    layers = requested if requested else list(range(n_states))
    if any(not 0 <= layer < n_states for layer in layers):
        raise StudyError(f"--layers {' '.join(map(str, layers))}: {model} has hidden states 0..{n_states - 1}")
    return layers


def study_for_tuning(args):
    """Stage 03's study, with --tune-stories checked against its training stories (and the training
    windows: whole 20 ms frames, unless each gives one frame)."""
    if args.train_window_feature == "stride":
        plumbing.check_window(args.train_context_s, args.train_stride_s,
                              ("--train-context-s", "--train-stride-s"))
    study = load_study(args.data)
    if args.tune_stories and args.tune_stories > len(study["train"]):
        raise StudyError(f"--tune-stories {args.tune_stories}: the study has {len(study['train'])} "
                         "training stories")
    return study


def subject_roi(args, subj, study):
    """A subject's file and the voxels stage 03's loss sees (Section 3.2: whole cortex, AC, LH, RH)."""
    d = load_subject(args.data, subj, study)
    if args.roi == "whole":
        return d, np.ones(plumbing.array_shape(d, "test_resp")[1], bool)
    if f"roi_{args.roi}" not in d:
        raise StudyError(f"{args.data}/subjects/{subj}.npz has no {args.roi} mask; for ds003020 pass "
                         "--roi-file or --rois-from-pycortex to 01_prepare_data.py")
    if not d[f"roi_{args.roi}"].any():
        raise StudyError(f"the {args.roi} mask of {subj} is empty")
    return d, d[f"roi_{args.roi}"]


def check_layer(layer, model):
    """A hidden state the model has (--layer)."""
    if not 0 <= layer <= model.config.num_hidden_layers:
        raise StudyError(f"--layer {layer}: the model has hidden states 0..{model.config.num_hidden_layers}")


def tuned_runs(args, subjects, study):
    """The stage 03 run of every subject asked for (args: its ROI, mode, seed, start run and tag),
    each checked with its checkpoint (checkpoints.find_tuned) before any work. Runs missing: one
    error naming the command that makes them, with the flags of a run that is there, or --tuned-on
    for the runs there are."""
    runs, missing = {}, []
    mode = "full" if args.full_finetune else "lora"
    for a in subjects:
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
                         + (f" (the flags of {found['name']}), or pass --tuned-on {' '.join(runs)} to use the "
                            "runs there are" if found else " (with your training flags)"))
    if len({r["tag"] for r in runs.values()}) > 1:  # a matrix compares like with like
        raise StudyError("the runs differ in settings: " + ", ".join(r["name"] for r in runs.values())
                         + "; choose one setting with --tag TAG")
    return runs


def cross_subject(args):
    """Stage 04's inputs: the study, the subjects to evaluate on (files opened lazily) and the tuned
    runs: each subject's, then the joint runs of the same settings (when --tuned-on is not given;
    labelled joint-<subjects>), each with the stage 02 result of every evaluated subject of the
    setting it was scored against (run["baselines"]), checked to be fit on the run's base model."""
    study, subject_files = study_and_subjects(args, args.evaluate_on)
    runs, loaded = tuned_runs(args, plumbing.subject_list(args.tuned_on, study), study), {}
    mode, tag = "full" if args.full_finetune else "lora", next(iter(runs.values()))["tag"]
    for name, subjects, t in provenance.joint_runs(args.results, args.roi, mode, args.seed):
        if args.tuned_on is None and t == tag and set(subjects) <= set(study["subjects"]):
            label = "joint-" + "-".join(subjects)
            runs[label] = checkpoints.find_tuned(args, label, study, args.roi, mode, None)
    for run in runs.values():
        tag, run["baselines"] = run["provenance"]["baseline"]["tag"], {}
        for b in subject_files:
            if (b, tag) not in loaded:
                loaded[b, tag] = provenance.load_baseline(args, b, study, tag)
            run["baselines"][b] = base = loaded[b, tag]
            if base["provenance"]["model_fingerprint"] != run["provenance"]["model_fingerprint"]:
                raise StudyError(f"{base['path']} was fit on another base model than {run['name']} was tuned "
                                 f"from: rerun it with {base['rebuild']}")
    return study, subject_files, runs


def probed_runs(args):
    """Stage 05's inputs: the study, the subject (default: the study's first) and its stage 03 runs
    to probe ({'whole': run, 'AC': run}, each checked with its checkpoint as stage 04 checks them)
    with the stage 02 result they were scored against (all runs must share it)."""
    if args.word_vectors and not os.path.exists(args.word_vectors):
        raise StudyError(f"--word-vectors {args.word_vectors} not found")
    study = load_study(args.data)
    subj = args.subject or study["subjects"][0]
    plumbing.subject_list([subj], study)
    runs = {which: checkpoints.find_tuned(args, subj, study, which, "lora", args.init_from if which == "AC" else None)
            for which in args.models if which != "baseline"}
    bases = {r["baseline"]["path"] for r in runs.values()}
    if len(bases) > 1:
        raise StudyError(f"the runs were scored against different stage 02 results ({', '.join(sorted(bases))}); "
                         "choose runs of one setting with --tag")
    base = next(iter(runs.values()))["baseline"] if runs else provenance.load_baseline(args, subj, study,
                                                                                      recipe=args.recipe)
    return study, subj, runs, base


def tuning_baselines(args, study, subjects):
    """Each subject's stage 02 result (load_baseline, --baseline-tag). A joint run's subjects must
    agree on what they are compared with: one base model, one layer, one ridge recipe and window,
    and responses to the same stories (the same TRs of each)."""
    tag = provenance.baseline_tag_flag(args.baseline_tag)
    out = {s: provenance.load_baseline(args, s, study, tag, args.recipe) for s in subjects}
    if not args.joint:
        return out
    if args.init_from:
        raise StudyError("--init-from starts a single subject's run from another; --joint runs start "
                         "from stage 02's model")
    first, ref = subjects[0], out[subjects[0]]
    for s in subjects[1:]:
        b = out[s]
        for key, what in (("best_layer", "layer"), ("delays", "delays"), ("context_s", "window"),
                          ("stride_s", "window"), ("alpha_grid", "ridge alphas")):
            if np.asarray(b[key]).tolist() != np.asarray(ref[key]).tolist():
                raise StudyError(f"--joint: {first}'s and {s}'s stage 02 results differ in {what} "
                                 f"({ref['path']}, {b['path']}): rerun stage 02 for both with one setting")
        if b["provenance"]["model_fingerprint"] != ref["provenance"]["model_fingerprint"]:
            raise StudyError(f"--joint: {ref['path']} and {b['path']} were fit on other base models")
    files = {s: load_subject(args.data, s, study) for s in subjects}
    for st in study["train"] + study["val"] + [study["test"]]:
        key = f"resp_{st}" if st != study["test"] else "test_resp"
        rows = {s: plumbing.array_shape(d, key)[0] for s, d in files.items()}
        if len(set(rows.values())) > 1:
            raise StudyError(f"--joint: the subjects did not hear the same stories ({st}: "
                             + ", ".join(f"{s} {n} TRs" for s, n in rows.items()) + "); tune them apart")
    return out


def viewer(args):
    """viewer.py's inputs: the study, where each subject's voxels lie on a cortex and every result in
    args.results, each checked as the stages check it: stage 02's of each subject (every tag),
    stage 03's runs (single and joint), stage 04's results. Returns (study, {subject: its place,
    anatomy.s1_place or dataset_place}, {subject: [stage 02 results]}, {name: run}, [stage 04])."""
    study, files = study_and_subjects(args, args.subjects)
    found = glob.glob(os.path.join(glob.escape(args.results), "0[234]_*.npz"))
    if not found:
        raise StudyError(f"no results in {args.results}/ (02_baseline_*.npz, 03_*.npz, 04_cross_subject*.npz): "
                         "run `make demo`, or stages 02-04, first")
    baselines = {s: [provenance.load_baseline(args, s, study, tag)
                     for tag in sorted(provenance.baseline_files(args.results, s))] for s in files}
    runs = provenance.load_runs(args, study)
    cross = [provenance.load_cross_subject(args, path, study, runs) for path in sorted(
        glob.glob(os.path.join(glob.escape(args.results), "04_cross_subject*.npz")))]
    return study, places(args, study, files), baselines, runs, cross


def places(args, study, files):
    """Where each subject's voxels lie: the simulated study's on pycortex's S1 (the sample stage 01
    drew, data/truth.npz), ds003020's on the subject's own surfaces in the dataset's pycortex-db
    (--ds-root, else the root the study was built from)."""
    if study["source"] == "simulated":
        truth = plumbing.load_npz(os.path.join(args.data, "truth.npz"), "the simulated study's truth.npz")
        if "columns" not in truth:
            raise StudyError(f"{args.data}/ is the abstract simulated study (01_prepare_data.py --cortex none): its "
                             "voxels lie on no cortex; build it on S1 (the default) to see it on the brain")
        place = anatomy.s1_place(truth["columns"])
        for s, d in files.items():
            if plumbing.array_shape(d, "test_resp")[1] != len(place["columns"]):
                raise StudyError(f"{args.data}/subjects/{s}.npz and {args.data}/truth.npz differ in voxels: "
                                 "rebuild the study with 01_prepare_data.py")
        return {s: place for s in files}
    built = json.loads(str(plumbing.load_npz(os.path.join(args.data, "study.npz"))["provenance"]))["settings"]
    root = args.ds_root or built.get("ds_root")
    if not root or not os.path.isdir(root):
        raise StudyError(f"the study was built from ds003020 at {root}, which is not there now: pass --ds-root PATH "
                         "(the dataset's root, whose derivative/pycortex-db holds the subjects' surfaces)")
    deriv = ds003020.derivatives(root)
    return {s: anatomy.dataset_place(deriv, s, plumbing.array_shape(d, "test_resp")[1]) for s, d in files.items()}
