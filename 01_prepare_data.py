"""Stage 01: turn a dataset into the plain .npz files every later stage reads.

Two sources, one layout (README, "Data layout"; lib/study.py reads it):
  * simulated (default): a small spoken-story study built in seconds with no download
    (lib/simulate.py). Stories are real synthesized speech; simulated subjects on pycortex's S1
    cortex have voxels driven by the sound, by word meaning, by both or by neither, through a
    canonical HRF, with TR = 2 s and a test story heard 10 times. The ground truth goes to
    truth.npz, so the tests can check every claim against it.
  * ds003020: the LeBel et al. (2023) dataset (OpenNeuro), the one the paper used (Section 2.1),
    read by lib/ds003020.py.
Either way each story's responses are z-scored per voxel (Section 2.2), the test story's is the
mean over its repeats, and the noise ceiling comes from those repeats.

    python 01_prepare_data.py                                   # simulated study -> data/
    # ds003020, ROIs from the dataset's pycortex-db (make pycortex), or from a file of masks
    python 01_prepare_data.py --source ds003020 --ds-root PATH --subjects UTS01 UTS02 UTS03 \\
        --rois-from-pycortex
    python 01_prepare_data.py --source ds003020 --ds-root PATH --roi-file masks.npz
"""
import os
import time

import numpy as np

from common import SR, noise_ceiling, pearson_r, zscore
from lib import anatomy, ds003020, provenance, simulate, speech
from lib.plumbing import StudyError, load_npz, parser, ranged, save_npz, stage


def get_parser():
    p = parser(__doc__)
    p.add_argument("--data", default="data", help="output folder (default: data/)")
    p.add_argument("--source", choices=["simulated", "ds003020"], default="simulated",
                   help="simulated: the embedded study (no download); ds003020: the real data")
    p.add_argument("--seed", type=int, default=0, help="seed of everything random (simulated)")
    p.add_argument("--reuse", metavar="DIR", help="when DIR (or DATA) holds the study these "
                   "settings and this code build, link it into DATA instead (the quick loop)")
    g = p.add_argument_group("simulated study")
    g.add_argument("--n-subjects", type=ranged(int, 1), default=3, help="subjects (sim01, ...)")
    g.add_argument("--cortex", choices=["S1", "none"], default="S1", help="S1: voxels on "
                   "pycortex's example subject's cortex (assets/s1_cortex.npz), ROIs from its "
                   "overlays; none: the abstract 300-voxel study of four voxel kinds")
    g.add_argument("--n-voxels", type=int, help="voxels per subject (S1: a sample of its "
                   f"{anatomy.S1_COLUMNS:,} columns, default {anatomy.S1_DEMO_COLUMNS:,}, the "
                   "demo's budget; none: default 300)")
    g.add_argument("--n-train-stories", type=ranged(int, 1), default=10, help="training stories")
    g.add_argument("--n-val-stories", type=ranged(int, 1), default=2, help="validation stories "
                   "(stages 02 and 03 choose layers and epochs on them; the paper held out two)")
    min_s = ds003020.FIRST_TR_TIME + 10 * ds003020.TR  # 10 TRs after the first response row
    seconds = ranged(float, min_s, why=f"it must be >= {min_s:g} (10 TRs after the first at "
                     f"{ds003020.FIRST_TR_TIME:g} s)")
    g.add_argument("--story-seconds", type=seconds, default=120.0, help="each train/val story")
    g.add_argument("--test-seconds", type=seconds, default=240.0, help="the test story")
    g.add_argument("--story-trs", type=ranged(int, 10, why="it must be >= 10 TRs per story"),
                   nargs="+", help="TRs of each train then validation story (the last "
                   "--n-val-stories are validation), e.g. ds003020's counts (bench/scale.py); "
                   "overrides --n-train-stories and --story-seconds")
    g.add_argument("--test-repeats", type=ranged(int, 2, why="it must be >= 2 (the noise "
                   "ceiling needs repeats)"), default=10, help="times the test story is heard")
    g.add_argument("--n-categories", type=ranged(int, 1, len(simulate.CATEGORIES)), default=10,
                   help=f"semantic categories (<= {len(simulate.CATEGORIES)})")
    g.add_argument("--words-per-category", type=ranged(int, 1, 20), default=4, help="content "
                   "words per category (<= 20); more words = harder to learn (README)")
    g.add_argument("--n-voices", type=ranged(int, 1, len(speech.VOICES)), default=1,
                   help=f"espeak voices (<= {len(speech.VOICES)})")
    g.add_argument("--rate", type=ranged(int, 80, 450, "it must be 80..450 words per minute "
                   "(espeak-ng's range)"), default=170, help="speaking rate, words per minute")
    g.add_argument("--semantic-dim", type=ranged(int, 1), default=16,
                   help="dimensions of the words' semantic vectors")
    g.add_argument("--noise-sd", type=float, nargs=2, default=[0.7, 2.0], metavar=("LO", "HI"),
                   help="--cortex none: per-voxel noise sd range (signal sd = 1), log-uniform")
    g = p.add_argument_group("ds003020")
    g.add_argument("--ds-root", help="root of the downloaded OpenNeuro ds003020 dataset")
    g.add_argument("--subjects", nargs="+", default=["UTS01", "UTS02", "UTS03"],
                   help="subjects (default: the paper's)")
    g.add_argument("--val-stories", nargs="+", default=ds003020.DS_VAL_STORIES,
                   help="stories that pick the best layer and epoch (default: "
                   + " ".join(ds003020.DS_VAL_STORIES) + ")")
    g.add_argument("--test-story", default="wheretheressmoke", help="the story heard 10 times")
    g = g.add_mutually_exclusive_group()
    g.add_argument("--roi-file", help="npz with boolean masks <subject>_AC, _LH and _RH")
    g.add_argument("--rois-from-pycortex", action="store_true", help="AC/LH/RH masks from the "
                   "dataset's derivative/pycortex-db (needs pycortex installed)")
    return p


def get_args(argv=None):
    return get_parser().parse_args(argv)


def check_args(args):
    """The simulated study's flags that depend on each other, as one clear error each (a study
    nobody can fit is refused here rather than by a traceback in a later stage)."""
    if args.n_voxels is None:
        args.n_voxels = 300 if args.cortex == "none" else anatomy.S1_DEMO_COLUMNS
    hi = None if args.cortex == "none" else anatomy.S1_COLUMNS
    if args.n_voxels < 2 or (hi is not None and args.n_voxels > hi):
        bounds = (">= 2 (the LH/RH halves need two)" if hi is None
                  else f"2..{hi} (the columns of S1's cortex)")
        raise StudyError(f"--n-voxels {args.n_voxels} is out of range: it must be {bounds}")
    if args.story_trs and len(args.story_trs) <= args.n_val_stories:
        raise StudyError(f"--story-trs gives {len(args.story_trs)} stories; {args.n_val_stories} "
                         "are validation stories (--n-val-stories), so at least one more is "
                         "needed for training")
    lo, hi = args.noise_sd
    if not 0 < lo <= hi:
        raise StudyError(f"--noise-sd {lo:g} {hi:g}: need 0 < LO <= HI")


# ---- the simulated study (lib/simulate.py) ----

def build_simulated(args, out):
    """Stories (synthesized speech), their latent drives, then each subject's responses to them."""
    rng = np.random.default_rng(args.seed)  # one stream, in a fixed order: same seed, same study
    t0 = time.time()
    vocab, category, sem_vectors, cat_names = simulate.make_vocabulary(args, rng)
    voices = speech.VOICES[:args.n_voices]
    clips = speech.synthesize_all(list(vocab), voices, args.rate)
    print(f"synthesized {len(vocab)} words x {len(voices)} voice(s) in {time.time() - t0:.1f} s")
    stories, n_train = simulate.make_stories(args, vocab, category, clips, rng)
    drives = simulate.latent_drives(stories, category, sem_vectors, args.semantic_dim)
    prints = {}  # each file's content fingerprint: study.npz records them (lib/provenance.py)
    for name, s in stories.items():
        prints[name] = save_npz(os.path.join(out, "stories", f"{name}.npz"), audio=s["audio"],
                                sr=np.int64(SR), tr_times=s["tr_times"].astype(np.float64),
                                words=vocab[s["idx"]], word_onsets=s["on"], word_offsets=s["off"])
    subjects = [f"sim{i + 1:02d}" for i in range(args.n_subjects)]
    truth = dict(kind_names=simulate.KIND_NAMES, vocab=vocab, vocab_category=category,
                 category_names=cat_names, semantic_vectors=sem_vectors,
                 subjects=np.array(subjects))
    n_aco = drives["test"][0].shape[1]
    cortex, shared = None, None
    if args.cortex == "S1":  # one anatomy for every subject: where AC and the semantic network are
        cortex = anatomy.cortex_sample(args, rng)
        shared = simulate.study_anatomy(cortex, rng)
        n_roi, n_truth, dice = simulate.ac_agreement(cortex, shared["amp_aco"])
        print(f"  AC: the ROI holds {n_roi} columns, the truth (acoustic amplitude > 1/2) "
              f"{n_truth}: overlap (Dice) {dice:.2f}")
    for subj in subjects:
        if cortex is None:  # the abstract study: four voxel kinds
            sim = simulate.abstract_voxels(args, rng, drives, n_aco)
        else:  # tuning, amplitude and noise as smooth maps over S1's cortex
            sim = simulate.cortex_voxels(args, rng, drives, n_aco, cortex, shared)
        v = len(sim["noise_sd"])
        flat = {} if cortex is None else dict(flat_index=cortex["flat_index"],
                                              flat_extents=cortex["flat_extents"])
        prints[subj] = save_npz(os.path.join(out, "subjects", f"{subj}.npz"),
                                simulated_subject(args, sim, drives, rng),
                                constant_voxels=np.zeros(v, bool), nan_voxels=np.zeros(v, bool),
                                **flat)
        truth.update(simulate.subject_truth(subj, sim, drives, args.test_repeats))
        ceiling = truth[f"{subj}_true_ceiling"]
        print(f"  {subj}: {v} voxels, true ceiling mean {ceiling.mean():.3f}, above 0.5 for "
              f"{np.mean(ceiling > 0.5):.0%}" + ("" if cortex is None else
                                                  f"; AC {ceiling[cortex['roi_AC']].mean():.3f}"))
    truth.update(simulate.study_truth(cortex, shared, drives))
    prints["truth"] = save_npz(os.path.join(out, "truth.npz"), **truth)
    names = list(stories)
    provenance.write_study(out, "simulated", subjects, names[:n_train], names[n_train:-1], "test",
                           ds003020.TR, args, prints, provenance.study_record(args, __file__))
    return subjects, stories


def simulated_subject(args, sim, drives, rng):
    """A simulated subject's file, array by array, in the order the noise is drawn: each training
    and validation story's responses (z-scored per story), the test story's mean over its repeats
    (test_resp), the noise ceiling from the repeats, the repeats themselves, then the ROI masks."""
    noise_sd = sim["noise_sd"]
    for n in drives:
        if n != "test":
            signal = simulate.signal(sim, drives, n)
            yield f"resp_{n}", zscore(simulate.noisy(signal, noise_sd, rng))
    test_signal = simulate.signal(sim, drives, "test")
    repeats = np.empty((args.test_repeats, *test_signal.shape), np.float32)
    for i in range(args.test_repeats):  # one at a time: a float64 stack is 2 GB at UTS01's size
        repeats[i] = simulate.noisy(test_signal, noise_sd, rng)
    yield "test_resp", zscore(repeats.mean(0))
    yield "noise_ceiling", noise_ceiling(repeats)
    yield "test_repeats", repeats
    del repeats
    yield from simulate.rois(sim, rng).items()


# ---- the real study: ds003020 (lib/ds003020.py reads it) ----

def build_ds003020(args, out):
    """ds003020: every file checked first, then the stories (audio, words, TR times), English1000,
    and each subject's responses."""
    root = args.ds_root
    train, respdict = ds003020.find_ds003020(args)
    deriv = ds003020.derivatives(root)  # derivative/ (snapshot 3.1.0) or derivatives/ (later ones)
    if args.rois_from_pycortex:  # the masks, and the flatmaps the stages draw on
        rois = {s: anatomy.pycortex_rois(deriv, s) for s in args.subjects}
        flats = {s: anatomy.pycortex_flatmap(deriv, s) for s in args.subjects}
    else:
        rois, flats = ds003020.load_npz_rois(args.roi_file, args.subjects), {}
    print(f"  {len(train)} training stories, validation {' '.join(args.val_stories)}, test "
          f"{args.test_story}")
    stories, prints = {}, {}
    for st in train + args.val_stories + [args.test_story]:
        audio, words, on, off = ds003020.read_story(root, deriv, st)
        # the lab's TR bookkeeping: response row i sits 2.0 * i + 11.0 s into the story's audio
        rows = respdict[st] - ds003020.TRIM_TRS
        tr_times = ds003020.FIRST_TR_TIME + ds003020.TR * np.arange(rows)
        ds003020.check_length(st, respdict[st], tr_times, len(audio) / SR, root)
        stories[st] = tr_times
        prints[st] = save_npz(os.path.join(out, "stories", f"{st}.npz"), audio=audio,
                              sr=np.int64(SR), tr_times=tr_times, words=words, word_onsets=on,
                              word_offsets=off)
        print(f"  story {st}: {len(audio) / SR:.0f} s, {len(words)} words, {len(tr_times)} TRs")
    prints.update(ds003020.save_english1000(deriv, out, stories))  # stage 05's semantic targets
    for s in args.subjects:
        arrays = real_subject(args, s, deriv, stories, respdict, rois.get(s, {}), flats.get(s))
        prints[s] = save_npz(os.path.join(out, "subjects", f"{s}.npz"), **arrays)
    if args.rois_from_pycortex:  # reusable as --roi-file without pycortex
        save_npz(os.path.join(out, "roi_masks.npz"),
                 **{f"{s}_{name}": m for s, masks in rois.items() for name, m in masks.items()})
    provenance.write_study(out, "ds003020", args.subjects, train, args.val_stories, args.test_story,
                           ds003020.TR, args, prints, provenance.study_record(args, __file__))
    return args.subjects, stories


def real_subject(args, s, deriv, stories, respdict, rois, flat):
    """One subject's published responses -> the study's arrays. Voxels with a NaN anywhere are zero
    in every story (the lab's readers apply np.nan_to_num) and flagged; each story is z-scored per
    voxel; the test story's `individual_repeats` give the noise ceiling and test_repeats, its `data`
    (the published mean over them) test_resp."""
    resp, repeats, nan_voxels, constant = ds003020.read_subject(deriv, s, stories, respdict,
                                                                args.test_story)
    out = {f"resp_{st}": zscore(zeroed(r, nan_voxels))
           for st, r in resp.items() if st != args.test_story}
    test = resp[args.test_story]
    if repeats is not None:
        repeats = zeroed(repeats, nan_voxels)
        if test is not None:  # UTS01's published mean is not exactly the mean of its repeats
            mean, published = repeats.mean(0), np.nan_to_num(test)
            print(f"  {s} {args.test_story}: published mean ('data') vs mean of the {len(repeats)} "
                  f"individual_repeats: max |difference| {np.abs(published - mean).max():.3g}, "
                  f"median voxel r {np.median(pearson_r(published, mean)):.4f}")
        out.update(test_repeats=repeats, noise_ceiling=noise_ceiling(repeats))
    else:
        print(f"  note: {args.test_story} of {s} holds one (averaged) response, no repeats: "
              f"noise_ceiling is NaN for {s}")
        out["noise_ceiling"] = np.full(len(nan_voxels), np.nan, np.float32)
    out["test_resp"] = zscore(zeroed(test if test is not None else repeats.mean(0), nan_voxels))
    out.update(ds003020.subject_masks(args, s, len(nan_voxels), rois, flat))
    finite = np.isfinite(out["noise_ceiling"])
    print(f"  subject {s}: {len(nan_voxels)} voxels" + (f", mean noise ceiling "
          f"{out['noise_ceiling'][finite].mean():.3f}" if finite.any() else ""))
    return dict(out, nan_voxels=nan_voxels, constant_voxels=constant)


def zeroed(x, nan_voxels):
    """np.nan_to_num (the lab's readers), and the voxels with a NaN anywhere zero throughout."""
    x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    x[..., nan_voxels] = 0.0
    return x


@stage(get_parser)
def main(args):
    if args.source == "simulated":
        check_args(args)  # (fills in the defaults that depend on other flags: compare after it)
        if args.reuse and provenance.reuse_study(args, provenance.study_record(args, __file__)):
            return None
    print(f"stage 01: building the {args.source} study into {args.data}/")
    with provenance.building(args.data) as tmp_out:  # built aside, swapped in whole when complete
        subjects, stories = (build_simulated if args.source == "simulated"
                             else build_ds003020)(args, tmp_out)
    audio_s = sum(len(load_npz(os.path.join(args.data, "stories", f"{s}.npz"))["audio"]) / SR
                  for s in stories)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.data) for f in fs
               if not d.startswith(os.path.join(args.data, "features")))
    return (f"{len(stories)} stories ({audio_s / 60:.1f} min of audio), {len(subjects)} subjects, "
            f"{size / 1e6:.1f} MB -> {args.data}/")


if __name__ == "__main__":
    main()
