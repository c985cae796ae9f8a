"""Stage 02: the linear baseline. Frozen WavLM hidden states -> ridge -> every voxel.

The standard speech encoding model the paper starts from (Section 2.2 and the "baseline" of its
figures): causal WavLM features of each story, Lanczos-downsampled to the TRs, z-scored per story,
stacked at delays of 1-4 TRs, and mapped to each voxel by ridge regression with a per-voxel alpha
chosen by cross-validation over contiguous TR blocks. Layers are compared on the validation
stories, and one layer, the best mean over the study's subjects, is refit for each subject on its
train + validation stories and scored on the held-out test story (Pearson r per voxel, also as a
fraction of the noise ceiling).

    python 02_baseline_ridge.py                                    # the pretrained tiny WavLM
    python 02_baseline_ridge.py --model tiny                       # the same, a random tiny WavLM
    python 02_baseline_ridge.py --model microsoft/wavlm-base-plus  # real data, on a GPU
    python 02_baseline_ridge.py --recipe authors                   # the authors' windows and ridge

Features are cached under data/features/<model>/context<C>s_stride<S>s/, one folder per window.
"""
import os
import time

import numpy as np

import common
from lib import batching, figures, inputs, plumbing, provenance, scoring
from lib.plumbing import StudyError, ranged, sample_seconds, stage
from lib.study import stack_responses

DEFAULT_STRIDE_S = 4.0  # chosen from bench/features.py (README): 32x cheaper than the lab's 0.1 s
# what a result depends on: its file name carries a tag when one of these differs from the default
SETTINGS = ("model", "model_seed", "layers", "layer_choice", "context_s", "stride_s", "delays",
            "alphas", "n_folds", "sweep_voxels", "seed", "window_feature", "ridge", "fit_stories",
            "story_start", "recipe")
# the authors' released code (docs/methods.md, "Beside the authors' code"): extract_features_hf's
# 4 s windows every 0.25 s, each giving its first frame stamped at its end; brain_refit_linear's
# bootstrap_ridge (alphas logspace(1, 4, 10) in the lab's convention, a^2 here) on the training
# stories, each story's delays zero-padded
AUTHORS = dict(window_feature="first", context_s=3.75, stride_s=0.25, ridge="bootstrap",
               alphas=list(np.logspace(2, 8, 10)), fit_stories="train", story_start="zeros")


def get_parser():
    p = plumbing.parser(__doc__)
    plumbing.add_common_args(p)
    p.add_argument("--model", default="tiny-pretrained", help="'tiny-pretrained' (this "
                   "repository's self-supervised tiny WavLM, models/), 'tiny' (random init) or a "
                   "WavLM id or folder, e.g. microsoft/wavlm-base-plus")
    p.add_argument("--model-seed", type=int, default=0, help="seed of the tiny model's weights")
    p.add_argument("--subjects", nargs="+", help="default: every subject in the study")
    p.add_argument("--layers", type=int, nargs="+", help="hidden states to compare (default: all)")
    p.add_argument("--layer-choice", choices=["study", "subject"], default="study", help="study: "
                   "one layer for every subject, the best mean validation r over all of them, so "
                   "that comparisons across subjects are at one layer (docs/methods.md); subject: "
                   "each subject's own")
    p.add_argument("--context-s", type=sample_seconds(False), default=16.0,
                   help="seconds of past audio per window (lab: 16)")
    p.add_argument("--stride-s", type=sample_seconds(True), default=DEFAULT_STRIDE_S,
                   help="window step (lab: 0.1)")
    p.add_argument("--window-feature", choices=batching.WINDOW_FEATURES, default="stride",
                   help="stride: every frame of a window's last --stride-s seconds, at its centre "
                   "(whole 20 ms frames); first/last: one frame per window, stamped at its end "
                   "(the authors': first)")
    p.add_argument("--delays", type=ranged(int, None, common.PAD_TRS), nargs="+",
                   default=[1, 2, 3, 4], help=f"delays in TRs (paper: 1 2 3 4; at most "
                   f"{common.PAD_TRS}; stage 03 uses the same)")
    p.add_argument("--alphas", type=ranged(float, 0, above=True, why="ridge penalties must be > 0"),
                   nargs="+", default=list(common.ALPHAS), help="ridge penalties to search "
                   "(default: logspace(0, 6, 13), see common.ALPHAS)")
    p.add_argument("--n-folds", type=ranged(int, 2), default=5,
                   help="cross-validation folds of contiguous TRs (>= 2)")
    p.add_argument("--ridge", choices=common.RIDGES, default="folds", help="folds: --n-folds "
                   "contiguous folds; bootstrap: the lab's bootstrap_ridge, 3 draws of 40-TR "
                   "chunks, a quarter held out (common.fit_ridge)")
    p.add_argument("--fit-stories", choices=["train+val", "train"], default="train+val",
                   help="stories the test score's ridge is fit on")
    p.add_argument("--story-start", choices=["audio", "zeros"], default="audio", help="what the "
                   "delays read before a story's first response TR: its downsampled audio, or "
                   "zeros (the lab's make_delayed)")
    p.add_argument("--sweep-voxels", type=ranged(int, 0), default=0, help="compare layers on "
                   "this many random voxels (0: all); the best layer is then fit on every voxel. "
                   "Cheaper for real data (README)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --sweep-voxels draw")
    p.add_argument("--save-weights", action="store_true", help="also write the ridge weights "
                   "(features x voxels: ~1 GB per subject for wavlm-base-plus on ds003020) to "
                   "02_weights_<subject>.npz")
    p.add_argument("--refresh-features", action="store_true", help="recompute the feature cache")
    p.add_argument("--reuse", metavar="DIR", help="when DIR (or RESULTS) holds every subject's "
                   "result made from this study and model with these settings by this code, link "
                   "them into RESULTS instead (the quick loop)")
    flags = ", ".join("--" + k.replace("_", "-") for k in AUTHORS)
    plumbing.add_recipe(p, dict(authors=AUTHORS), help="authors: the defaults of the authors' "
                        f"released code for {flags} (docs/methods.md); a flag given still wins")
    return p


def get_args(argv=None):
    return get_parser().parse_args(argv)


def settings(args, study=None, chosen_on=(), layers=()):
    """The settings a stage 02 result depends on (the seed only matters with --sweep-voxels; the
    subjects a study-wide layer was chosen on, when they are not the whole study's: a layer chosen
    on fewer subjects is another result)."""
    if len(set(args.delays)) != len(args.delays):
        raise StudyError(f"--delays {' '.join(map(str, args.delays))} repeats a delay")
    if args.window_feature == "stride":
        plumbing.check_window(args.context_s, args.stride_s)
    out = {k: getattr(args, k) for k in SETTINGS}
    out["seed"] = args.seed if args.sweep_voxels else 0
    subset = set(chosen_on) != set(study["subjects"]) if study else False
    if args.layer_choice == "study" and len(layers) > 1 and subset:
        out["chosen_on"] = sorted(chosen_on)
    return out


def stack(features, stories, layer, args):
    return np.vstack([common.design_matrix(features[s][layer], args.delays, args.story_start)
                      for s in stories])


def story_features(model, fingerprint, study, args):
    """Every story's hidden states, downsampled to its TRs (layers x (PAD_TRS + TRs) x hidden),
    cached under data/features/<model>/context<C>s_stride<S>s/ (one folder per window setting)."""
    cache = plumbing.feature_cache_dir(args.data, args.model, args.model_seed, args.context_s,
                                       args.stride_s, args.window_feature)
    features, stories = {}, study["train"] + study["val"] + [study["test"]]
    for i, s in enumerate(stories):
        print(f"  features {i + 1}/{len(stories)}: {s}", flush=True)
        path = os.path.join(args.data, "stories", f"{s}.npz")
        features[s] = common.story_features(model, fingerprint, cache, path, args.context_s,
                                            args.stride_s, args.refresh_features, progress=True,
                                            data=args.data, take=args.window_feature)
    return features


def layer_sweep(features, subject_data, subj, study, layers, args):
    """Each layer fit on the training stories and scored on the validation stories: (validation r,
    layers x voxels swept; the voxels swept). With --sweep-voxels N, the sweep sees N voxels drawn
    at random (the layer choice is a mean over voxels, so a subset picks it at a fraction of the
    cost)."""
    train, val = study["train"], study["val"]
    n_vox = plumbing.array_shape(subject_data, "test_resp")[1]
    print(f"  subject {subj}: {n_vox} voxels, ridge per layer on the training stories", flush=True)
    sweep = np.arange(n_vox)
    if args.sweep_voxels and args.sweep_voxels < n_vox:
        rng = np.random.default_rng(args.seed)
        sweep = np.sort(rng.choice(n_vox, args.sweep_voxels, replace=False))
        print(f"    layer sweep on {len(sweep)} of {n_vox} voxels (--sweep-voxels)", flush=True)
    voxels = sweep if len(sweep) < n_vox else None
    Y_train = stack_responses(subject_data, train, voxels)
    Y_val = stack_responses(subject_data, val, voxels)
    val_r = []
    for layer in layers:
        t0 = time.time()
        W, _, _ = common.fit_ridge(stack(features, train, layer, args), Y_train, args.alphas,
                                   args.n_folds, args.ridge, args.device)
        pred = common.ridge_predict(stack(features, val, layer, args), W, args.device)
        val_r.append(common.pearson_r(Y_val, pred))
        print(f"    layer {layer}: mean validation r {val_r[-1].mean():.4f} "
              f"({time.time() - t0:.0f} s)", flush=True)
    return np.array(val_r, np.float32), sweep


def choose_layer(val_r, layers, choice):
    """The best layer by mean validation r: {subject: layer}. 'study': one layer for all, the mean
    over subjects of each subject's mean over voxels; 'subject': each subject's own."""
    own = {subj: layers[int(np.argmax(r.mean(1)))] for subj, r in val_r.items()}
    if choice == "subject":
        return own
    best = layers[int(np.argmax(np.mean([r.mean(1) for r in val_r.values()], axis=0)))]
    return {subj: best for subj in val_r}


def baseline(args, subj, subject_data, features, study, layer, val_r, swept, own, layers, tag):
    """One subject's baseline: the chosen layer refit on train + validation, scored on the test
    story (the recipe stages 03-04 reuse, saved beside the scores)."""
    test_r, W, alphas = common.score_on_test({s: features[s][layer] for s in features},
                                             subject_data, study, args.delays, args.alphas,
                                             args.device, args.n_folds, ridge=args.ridge,
                                             fit_stories=args.fit_stories,
                                             story_start=args.story_start)
    if args.save_weights:  # apart from the results: stages 03-05 read those whole
        plumbing.save_npz(os.path.join(args.results, f"02_weights_{subj}{tag}.npz"), weights=W)
    return dict(test_r=test_r, val_r_by_layer=val_r[subj], best_layer=np.int64(layer),
                alphas=alphas, sweep_voxels=swept, best_layer_own=np.int64(own),
                layers=np.array(layers), noise_ceiling=subject_data["noise_ceiling"],
                model=np.array(args.model), model_seed=np.int64(args.model_seed),
                context_s=np.float64(args.context_s), stride_s=np.float64(args.stride_s),
                window_feature=np.array(args.window_feature), ridge=np.array(args.ridge),
                fit_stories=np.array(args.fit_stories), story_start=np.array(args.story_start),
                recipe=np.array(args.recipe),
                delays=np.array(args.delays), alpha_grid=np.array(args.alphas, np.float64),
                n_folds=np.int64(args.n_folds),
                layer_chosen_on=np.array(list(val_r) if args.layer_choice == "study" else [subj]))


def print_table(results, subject_files):
    """Each subject's best layer and mean test r, over all voxels, AC and the rest, and as a
    fraction of the noise ceiling."""
    print("\n  subject  best layer  mean r all    AC  non-AC  fraction of ceiling: all    AC  "
          "non-AC")
    for subj, res in results.items():
        d, r = subject_files[subj], res["test_r"]
        m = scoring.roi_means(r, d)
        frac = {k: scoring.frac_ceiling(r[v], d["noise_ceiling"][v])
                for k, v in scoring.roi_masks(d, len(r)).items()}
        print(f"  {subj:8s} {int(res['best_layer']):10d}  {m['all']:10.3f} "
              f"{m.get('AC', np.nan):5.3f}  {m.get('non-AC', np.nan):6.3f}  {frac['all']:24.2f} "
              f"{frac.get('AC', np.nan):5.2f}  {frac.get('non-AC', np.nan):6.2f}")


@stage(get_parser)
def main(args):
    study, subject_files = inputs.study_and_subjects(args, args.subjects)
    model = common.load_wavlm(args.model, args.model_seed, args.device)
    layers = inputs.layers(args.layers, model.config.num_hidden_layers + 1, args.model)
    fingerprint, chosen_on = plumbing.model_fingerprint(model), list(subject_files)
    records, tag = provenance.baseline_records(args, study, chosen_on, fingerprint, __file__,
                                               settings(args, study, chosen_on, layers),
                                               settings(get_args([])))
    if args.reuse and provenance.reuse(dict(records.values()), args.reuse,
                                       f"02_baseline_<subject>{tag}.npz"):
        return None
    features = story_features(model, fingerprint, study, args)
    val_r, swept = {}, {}
    for subj, d in subject_files.items():
        val_r[subj], swept[subj] = layer_sweep(features, d, subj, study, layers, args)
    own = choose_layer(val_r, layers, "subject")
    best = choose_layer(val_r, layers, args.layer_choice)
    print(f"  layer {'for the study' if args.layer_choice == 'study' else 'per subject'}: "
          + ", ".join(f"{subj} {layer}" for subj, layer in best.items()), flush=True)
    results = {}
    with plumbing.on_interrupt("subjects finished before it are saved; rerun the same command"):
        for subj, d in subject_files.items():
            results[subj] = baseline(args, subj, d, features, study, best[subj], val_r,
                                     swept[subj], own[subj], layers, tag)
            provenance.save_result(*records[subj], results[subj], note=True)
    subset = "" if chosen_on == study["subjects"] else "_" + "-".join(chosen_on)  # its own figure
    names = figures.baseline_figures(results, subject_files, layers, args.results, tag + subset)
    print_table(results, subject_files)
    return f"{args.results}/02_baseline_<subject>{tag}.npz, {names}"


if __name__ == "__main__":
    main()
