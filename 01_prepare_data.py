"""Stage 01: turn a dataset into the plain .npz files every later stage reads.

Two sources, one layout (README, "Data layout"; common.load_study and common.load_subject read it):
  * simulated (default): a small spoken-story study built in seconds with no download
    (lib/simulate.py). Stories are real synthesized speech; simulated subjects on pycortex's S1
    cortex have voxels driven by the sound, by word meaning, by both or by neither, through a
    canonical HRF, with TR = 2 s and a test story heard 10 times. The ground truth goes to
    truth.npz, so the tests can check every claim against it.
  * ds003020: the LeBel et al. (2023) dataset (OpenNeuro), the one the paper used (Section 2.1),
    read by lib/ds003020.py.

    python 01_prepare_data.py                                   # simulated study -> data/
    python 01_prepare_data.py --source ds003020 --ds-root PATH --subjects UTS01 UTS02 UTS03 \\
        [--roi-file masks.npz | --rois-from-pycortex]
"""
import json
import os
import shutil
import time

import numpy as np

from common import SR, noise_ceiling, zscore
from lib import anatomy, ds003020, simulate, speech
from lib.plumbing import StudyError, fail, load_npz, parser, save_npz
from lib.provenance import code_state, digest, install_study, link_tree, same_record


def get_args(argv=None):
    return get_parser().parse_args(argv)


def get_parser():
    p = parser(__doc__)
    p.add_argument("--data", default="data", help="output folder (default: data/)")
    p.add_argument("--source", choices=["simulated", "ds003020"], default="simulated",
                   help="simulated: the embedded study (no download); ds003020: the real data (--ds-root)")
    p.add_argument("--seed", type=int, default=0, help="seed of everything random (simulated study)")
    p.add_argument("--reuse", metavar="DIR", help="when DIR (or DATA) holds the study these settings and this code "
                   "build, link it into DATA instead of building (the quick loop; simulated studies only)")
    g = p.add_argument_group("simulated study")
    g.add_argument("--n-subjects", type=int, default=3, help="simulated subjects (sim01, sim02, ...)")
    g.add_argument("--cortex", choices=["S1", "none"], default="S1", help="S1: voxels on pycortex's example "
                   "subject's cortex (assets/s1_cortex.npz), ROIs from its overlays; none: the abstract "
                   "300-voxel study of four voxel kinds")
    g.add_argument("--n-voxels", type=int, help=f"voxels per subject (S1: a uniform sample of its {anatomy.S1_COLUMNS:,} "
                   f"columns, default {anatomy.S1_DEMO_COLUMNS:,}, the demo's budget; none: default 300)")
    g.add_argument("--n-train-stories", type=int, default=10, help="training stories")
    g.add_argument("--n-val-stories", type=int, default=2, help="validation stories (pick layers and epochs; the "
                   "paper held out two)")
    g.add_argument("--story-seconds", type=float, default=120.0, help="length of each train/val story")
    g.add_argument("--test-seconds", type=float, default=240.0, help="length of the test story")
    g.add_argument("--story-trs", type=int, nargs="+", help="TRs of each train then validation story (the "
                   "last --n-val-stories are validation), e.g. ds003020's counts (bench/scale.py); overrides "
                   "--n-train-stories and --story-seconds")
    g.add_argument("--test-repeats", type=int, default=10, help="times the test story is heard")
    g.add_argument("--n-categories", type=int, default=10, help=f"semantic categories (<= {len(simulate.CATEGORIES)})")
    g.add_argument("--words-per-category", type=int, default=4,
                   help="content words per category (<= 20); more words = harder to learn (README)")
    g.add_argument("--n-voices", type=int, default=1, help=f"espeak voices (<= {len(speech.VOICES)})")
    g.add_argument("--rate", type=int, default=170, help="speaking rate, words per minute")
    g.add_argument("--semantic-dim", type=int, default=16, help="dimensions of the words' semantic vectors")
    g.add_argument("--noise-sd", type=float, nargs=2, default=[0.7, 2.0], metavar=("LO", "HI"),
                   help="--cortex none: per-voxel noise sd range (signal sd = 1), log-uniform")
    g = p.add_argument_group("ds003020")
    g.add_argument("--ds-root", help="root of the downloaded OpenNeuro ds003020 dataset")
    g.add_argument("--subjects", nargs="+", default=["UTS01", "UTS02", "UTS03"], help="subjects (default: the paper's)")
    g.add_argument("--val-stories", nargs="+", default=ds003020.DS_VAL_STORIES,
                   help=f"stories that pick the best layer / epoch (default: {' '.join(ds003020.DS_VAL_STORIES)})")
    g.add_argument("--test-story", default="wheretheressmoke", help="the story heard 10 times, held out")
    g = g.add_mutually_exclusive_group()
    g.add_argument("--roi-file", help="npz with boolean masks <subject>_AC, <subject>_LH, <subject>_RH")
    g.add_argument("--rois-from-pycortex", action="store_true",
                   help="AC/LH/RH masks from the dataset's derivative/pycortex-db (needs pycortex installed)")
    return p


def check_args(args):
    """Ranges of the simulated study's flags, as one clear error each (a study nobody can fit is
    refused here rather than by a traceback in a later stage)."""
    min_s = ds003020.FIRST_TR_TIME + 10 * ds003020.TR  # at least 10 TRs after the first response row
    if args.n_voxels is None:
        args.n_voxels = 300 if args.cortex == "none" else anatomy.S1_DEMO_COLUMNS
    checks = [
        ("--n-subjects", args.n_subjects, 1, None, ""),
        ("--n-voxels", args.n_voxels, 2, None if args.cortex == "none" else anatomy.S1_COLUMNS,
         " (the LH/RH halves need two)" if args.cortex == "none" else " (the columns of S1's cortex)"),
        ("--n-train-stories", args.n_train_stories, 1, None, ""),
        ("--n-val-stories", args.n_val_stories, 1, None, " (stages 02 and 03 choose on them)"),
        ("--story-seconds", args.story_seconds, min_s, None, f" (10 TRs after the first at {ds003020.FIRST_TR_TIME:g} s)"),
        ("--test-seconds", args.test_seconds, min_s, None, f" (10 TRs after the first at {ds003020.FIRST_TR_TIME:g} s)"),
        ("--test-repeats", args.test_repeats, 2, None, " (the noise ceiling needs repeats)"),
        ("--n-categories", args.n_categories, 1, len(simulate.CATEGORIES), ""),
        ("--words-per-category", args.words_per_category, 1, 20, ""),
        ("--n-voices", args.n_voices, 1, len(speech.VOICES), ""),
        ("--rate", args.rate, 80, 450, " words per minute (espeak-ng's range)"),
        ("--semantic-dim", args.semantic_dim, 1, None, ""),
    ]
    if args.story_trs:
        checks += [("--story-trs", min(args.story_trs), 10, None, " TRs per story")]
        if len(args.story_trs) <= args.n_val_stories:
            raise StudyError(f"--story-trs gives {len(args.story_trs)} stories; {args.n_val_stories} are validation "
                             "stories (--n-val-stories), so at least one more is needed for training")
    for flag, value, lo, hi, why in checks:
        if value < lo or (hi is not None and value > hi):
            bounds = f"{lo:g}..{hi:g}" if hi is not None else f">= {lo:g}"
            raise StudyError(f"{flag} {value:g} is out of range: it must be {bounds}{why}")
    lo, hi = args.noise_sd
    if not 0 < lo <= hi:
        raise StudyError(f"--noise-sd {lo:g} {hi:g}: need 0 < LO <= HI")


def build_simulated(args, out):
    """The simulated study: stories, then each subject's responses to them (lib/simulate.py)."""
    rng = np.random.default_rng(args.seed)  # one stream, drawn in a fixed order: same seed, same study
    t0 = time.time()
    vocab, category, sem_vectors, cat_names = simulate.make_vocabulary(args, rng)
    voices = speech.VOICES[:args.n_voices]
    clips = speech.synthesize_all(list(vocab), voices, args.rate)
    print(f"synthesized {len(vocab)} words x {len(voices)} voice(s) in {time.time() - t0:.1f} s")
    stories, n_train = simulate.make_stories(args, vocab, category, clips, rng)
    drives = simulate.latent_drives(stories, category, sem_vectors, args.semantic_dim)
    prints = {}  # each file's content fingerprint: study.npz records them (lib/provenance.py)
    for name, s in stories.items():
        prints[name] = save_npz(os.path.join(out, "stories", f"{name}.npz"), audio=s["audio"], sr=np.int64(SR),
                                tr_times=s["tr_times"].astype(np.float64), words=vocab[s["idx"]],
                                word_onsets=s["on"], word_offsets=s["off"])

    subjects = [f"sim{i + 1:02d}" for i in range(args.n_subjects)]
    truth = dict(kind_names=simulate.KIND_NAMES, vocab=vocab, vocab_category=category, category_names=cat_names,
                 semantic_vectors=sem_vectors, subjects=np.array(subjects))
    n_aco = drives["test"][0].shape[1]
    asset = None if args.cortex == "none" else anatomy.cortex_sample(args, rng)
    if asset is not None:  # one anatomy for every subject: where AC is, where the semantic network is
        shared = simulate.study_anatomy(asset, rng)
        n_roi, n_truth, dice = simulate.ac_agreement(asset, shared["amp_aco"])
        print(f"  AC: the ROI holds {n_roi} columns, the truth (acoustic amplitude > 1/2) {n_truth}: overlap "
              f"(Dice) {dice:.2f}")
    for subj in subjects:
        if asset is None:  # the abstract study: voxels of four kinds, ROIs drawn at random
            sim = simulate.abstract_voxels(args, rng, drives, n_aco)
        else:  # voxels on S1's cortex: tuning, amplitude and noise as smooth maps over it
            sim = simulate.cortex_voxels(args, rng, drives, n_aco, asset, shared)
        v = len(sim["noise_sd"])
        prints[subj] = save_npz(os.path.join(out, "subjects", f"{subj}.npz"), subject_arrays(args, sim, drives, rng),
                                constant_voxels=np.zeros(v, bool), nan_voxels=np.zeros(v, bool),
                                **({} if asset is None else dict(flat_index=asset["flat_index"],
                                                                 flat_extents=asset["flat_extents"])))
        # the ceiling from the truth: expected r between the signal and the mean of N noisy repeats
        test_signal, noise_sd = sim["signal"]("test"), sim["noise_sd"]
        var_s = test_signal.var(0)
        true_ceiling = np.sqrt(var_s / (var_s + noise_sd ** 2 / args.test_repeats))
        truth.update({f"{subj}_kind": sim["kind"], f"{subj}_test_signal": test_signal.astype(np.float32),
                      f"{subj}_noise_sd": noise_sd, f"{subj}_true_ceiling": true_ceiling,
                      f"{subj}_w_acoustic": sim["w_aco"].astype(np.float32),
                      f"{subj}_w_semantic": sim["w_sem"].astype(np.float32)})
        if asset is not None:
            truth.update({f"{subj}_acoustic_amplitude": sim["amp_aco"].astype(np.float32),
                          f"{subj}_semantic_amplitude": sim["amp_sem"].astype(np.float32)})
        print(f"  {subj}: {v} voxels, true ceiling mean {true_ceiling.mean():.3f}, "
              f"above 0.5 for {np.mean(true_ceiling > 0.5):.0%}" + ("" if asset is None else
              f"; AC {true_ceiling[asset['roi_AC']].mean():.3f}"))
    if asset is not None:
        truth.update(columns=asset["columns"], cortex_source=asset["source"], semantic_network=shared["network"])
    truth["test_acoustic_drive"] = drives["test"][0].astype(np.float32)
    truth["test_semantic_drive"] = drives["test"][1].astype(np.float32)
    prints["truth"] = save_npz(os.path.join(out, "truth.npz"), **truth)
    names = list(stories)
    write_study(out, "simulated", subjects, names[:n_train], names[n_train:-1], "test", args, prints)
    return subjects, stories


def subject_arrays(args, sim, drives, rng):
    """A simulated subject's file, array by array, in the order the noise is drawn: each training and
    validation story's responses (z-scored per story), the test story's mean over its repeats
    (test_resp), the noise ceiling from the repeats, the repeats themselves, then the ROI masks."""
    noise_sd = sim["noise_sd"]
    for n in drives:
        if n != "test":
            yield f"resp_{n}", zscore(simulate.noisy(sim["signal"](n), noise_sd, rng))
    test_signal = sim["signal"]("test")
    repeats = np.empty((args.test_repeats, *test_signal.shape), np.float32)
    for i in range(args.test_repeats):  # one at a time: a float64 stack is 2 GB at UTS01's size
        repeats[i] = simulate.noisy(test_signal, noise_sd, rng)
    yield "test_resp", zscore(repeats.mean(0))
    yield "noise_ceiling", noise_ceiling(repeats)
    yield "test_repeats", repeats
    del repeats
    yield from sim["rois"]().items()


def build_ds003020(args, out):
    """ds003020: every file checked first, then the stories (audio, words, TR times), English1000,
    and each subject's responses (lib/ds003020.py)."""
    root = args.ds_root
    train, respdict = ds003020.find_ds003020(args)
    deriv = ds003020.derivatives(root)  # derivative/ (snapshot 3.1.0) or derivatives/ (later ones)
    names = train + args.val_stories + [args.test_story]
    if args.rois_from_pycortex:
        rois = {s: anatomy.pycortex_rois(root, s) for s in args.subjects}
        flats = {s: anatomy.pycortex_flatmap(root, s) for s in args.subjects}  # for the stages' flatmaps
    else:
        rois, flats = ds003020.load_npz_rois(args.roi_file, args.subjects), {}
    print(f"  {len(train)} training stories, validation {' '.join(args.val_stories)}, test {args.test_story}")
    stories, prints = {}, {}
    for st in names:
        wav = os.path.join(root, "stimuli", f"{st}.wav")
        audio = ds003020.read_wav(wav)
        words, on, off = ds003020.read_textgrid_words(os.path.join(deriv, "TextGrids", f"{st}.TextGrid"))
        tr_times = ds003020.FIRST_TR_TIME + ds003020.TR * np.arange(respdict[st] - ds003020.TRIM_TRS)
        if tr_times[-1] > len(audio) / SR + 30:
            raise StudyError(f"story {st}: respdict says {respdict[st]} TRs (last row at {tr_times[-1]:.0f} s)"
                             f" but {wav} lasts {len(audio) / SR:.0f} s; the wav or respdict is wrong")
        stories[st] = tr_times
        prints[st] = save_npz(os.path.join(out, "stories", f"{st}.npz"), audio=audio, sr=np.int64(SR),
                              tr_times=tr_times, words=words, word_onsets=on, word_offsets=off)
        print(f"  story {st}: {len(audio) / SR:.0f} s, {len(words)} words, {len(tr_times)} TRs")
    e1000 = os.path.join(deriv, "english1000sm.hf5")
    if os.path.exists(e1000):  # the semantic probe's targets (stage 05) for the stories' words
        words = set(np.concatenate([np.load(os.path.join(out, "stories", f"{st}.npz"))["words"] for st in names]))
        found, vectors = ds003020.english1000(e1000, words)
        prints["english1000"] = save_npz(os.path.join(out, "english1000.npz"), words=found, vectors=vectors)
        print(f"  English1000 vectors for {len(found)} of the stories' {len(words)} word types -> english1000.npz")
    else:
        print(f"  note: {e1000} not found: stage 05's semantic probe will need --word-vectors")
    prep = os.path.join(deriv, "preprocessed_data")
    for s in args.subjects:
        prints[s] = ds003020.write_subject(args, s, prep, stories, respdict, rois.get(s, {}), out, flats.get(s))
    if args.rois_from_pycortex:  # reusable as --roi-file without pycortex
        save_npz(os.path.join(out, "roi_masks.npz"),
                 **{f"{s}_{name}": m for s, masks in rois.items() for name, m in masks.items()})
    write_study(out, "ds003020", args.subjects, train, args.val_stories, args.test_story, args, prints)
    return args.subjects, stories


def study_record(args):
    """What study.npz records of how it was built: stage 01's settings and code (lib/provenance.py)."""
    settings = {k: v for k, v in vars(args).items() if k not in ("data", "reuse")}
    return dict(stage="01", settings=settings, code=code_state(__file__))


def reuse_study(args):
    """--reuse DIR: a study built by this code with these settings is linked, not rebuilt."""
    for folder in (args.data, args.reuse):
        if same_record(os.path.join(folder, "study.npz"), study_record(args)):
            if folder != args.data:
                link_tree(folder, args.data)
            print(f"stage 01: {folder}/ holds the study these settings and this code build"
                  + (f": linked into {args.data}/" if folder != args.data else ": nothing to do") + " (--reuse)")
            return True
    return False


def write_study(out, source, subjects, train, val, test, args, prints):
    """study.npz: the splits and the fingerprints every later result records. stories_fingerprint
    covers the splits and every story file; each subject file has its own, so rebuilding with one
    subject more or less (or other noise) leaves the others' results valid."""
    stories = digest(dict(source=source, train=list(train), val=list(val), test=test,
                          files={k: v for k, v in prints.items() if k not in subjects and k != "truth"}))
    save_npz(os.path.join(out, "study.npz"), source=np.array(source), subjects=np.array(subjects),
             train_stories=np.array(train), val_stories=np.array(val), test_story=np.array(test),
             tr=np.float64(ds003020.TR), seed=np.int64(args.seed), stories_fingerprint=np.array(stories),
             subject_fingerprints=np.array([prints[s] for s in subjects]),
             provenance=np.array(json.dumps(study_record(args), sort_keys=True)))


def main(argv=None):
    args = get_args(argv)
    t0 = time.time()
    tmp_out = args.data.rstrip("/") + ".tmp_build"  # built aside, swapped in whole when complete
    try:
        if args.source == "simulated":
            check_args(args)  # (fills in the defaults that depend on other flags: compare after it)
            if args.reuse and reuse_study(args):
                return
        print(f"stage 01: building the {args.source} study into {args.data}/")
        shutil.rmtree(tmp_out, ignore_errors=True)
        subjects, stories = (build_simulated if args.source == "simulated" else build_ds003020)(args, tmp_out)
    except (StudyError, KeyboardInterrupt) as e:
        shutil.rmtree(tmp_out, ignore_errors=True)
        if isinstance(e, KeyboardInterrupt):
            fail(f"interrupted: {args.data}/ is as it was; rerun the same command", 130)
        fail(e)
    install_study(tmp_out, args.data)
    audio_s = sum(len(load_npz(os.path.join(args.data, "stories", f"{s}.npz"))["audio"]) / SR for s in stories)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.data) for f in fs
               if not d.startswith(os.path.join(args.data, "features")))
    print(f"wrote {len(stories)} stories ({audio_s / 60:.1f} min of audio), {len(subjects)} subjects, "
          f"{size / 1e6:.1f} MB in {time.time() - t0:.1f} s -> {args.data}/")


if __name__ == "__main__":
    main()
