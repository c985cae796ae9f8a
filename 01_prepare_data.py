"""Stage 01: turn a dataset into the plain .npz files every later stage reads.

Two sources, one layout (README, "Data layout"):
  * simulated (default): a small spoken-story study built in seconds with no download. Stories are
    real synthesized speech (espeak-ng via the espeakng-loader wheel); simulated subjects have
    auditory voxels driven by the sound, semantic voxels driven by word meaning, mixed and
    noise-only voxels, a canonical HRF, TR = 2 s and a test story heard 10 times. The ground truth
    goes to truth.npz so tests can check every claim against it.
  * ds003020: the LeBel et al. (2023) dataset (OpenNeuro), the one the paper used (Section 2.1).

    python 01_prepare_data.py                                   # simulated study -> data/
    python 01_prepare_data.py --source ds003020 --ds-root PATH --subjects UTS01 UTS02 UTS03 \\
        [--roi-file masks.npz | --rois-from-pycortex]
"""
import ctypes
import difflib
import json
import multiprocessing
import os
import shutil
import time

import numpy as np
from scipy.io import wavfile
from scipy.signal import fftconvolve, resample_poly
from scipy.stats import gamma

import common
from common import StudyError, digest, fail, log_mel, noise_ceiling, pearson_r, save_npz, zscore

SR = 16000
TR = 2.0
# ds003020 bookkeeping (HuthLab/deep-fMRI-dataset): the lab simulates respdict[story] - 5 TR times
# (load_simulated_trfiles), mid-TR, with the sound starting 10 s into the scan (so the first at
# -9 s); its features are then trimmed by 10 TRs at the start and 5 at the end ([5+5:-5]). So the
# hf5 holds respdict[story] - 5 - 15 = respdict - 20 rows, row i at 2.0 * i + 11.0 s into the wav.
FIRST_TR_TIME = 11.0
TRIM_TRS = 20
# the lab's filler tokens of the TextGrid word tier (HuthLab/deep-fMRI-dataset), compared after
# lower-casing, stripping braces, then spaces: "{ LG }", "{lg}", " sp " and "" are all fillers
FILLERS = {"sentence_start", "sentence_end", "br", "lg", "ls", "ns", "sp", ""}
# The paper's validation stories are fromboyhoodtofatherhood and onapproachtopluto, but the second
# is not in ds003020 (only in the lab's larger release). We keep the first and add waitingtogo, the
# published story closest to it in length (369 TRs against 368), so the two weigh the same.
DS_VAL_STORIES = ["fromboyhoodtofatherhood", "waitingtogo"]

# Real English words so espeak pronounces them; a category's words share a semantic centroid.
CATEGORIES = {
    "animal": "dog cat horse mouse sheep goat tiger eagle snake rabbit wolf bear duck fox frog camel "
              "whale zebra lion owl",
    "food": "bread apple cheese soup rice butter honey lemon cake salad bacon onion pepper sugar "
            "cookie peach melon noodle toast grape",
    "body": "hand foot knee elbow finger shoulder ankle chin thumb wrist neck belly spine lip tooth "
            "heel palm rib skull tongue",
    "weather": "rain snow wind storm cloud thunder fog frost sunshine hail breeze drizzle flood "
               "lightning mist blizzard drought rainbow gust sleet",
    "family": "mother father sister brother uncle aunt cousin daughter son grandma grandpa niece "
              "nephew baby wife husband parent twin bride groom",
    "vehicle": "car truck bus train boat plane bike taxi wagon ferry rocket tractor scooter subway "
               "canoe jeep van tram yacht sled",
    "tool": "hammer saw drill wrench shovel rake ladder nail screw axe chisel pliers brush bucket "
            "rope needle knife hose clamp file",
    "music": "piano guitar drum violin trumpet flute song choir melody rhythm banjo cello harp "
             "tuba organ opera chord tempo lyric bass",
    "building": "house castle church tower school bridge cabin barn palace hotel garage temple "
                "prison museum factory library chapel hut mansion shed",
    "emotion": "happy angry afraid proud lonely jealous calm nervous joyful gloomy brave shy eager "
               "bored grateful guilty hopeful anxious curious tender",
}
FUNCTION_WORDS = "the a and of to in was he she it then with that but for".split()
# variants whose audio is the same every time: en-us+f2, +f3 and +f5 add noise seeded from the clock
VOICES = ["en-us", "en-us+m3", "en-us+f1", "en-us+m7", "en-us+f4", "en-us+m1"]
KIND_NAMES = np.array(["auditory", "semantic", "mixed", "noise"])
S1_COLUMNS = 80615  # true voxels of the thick cortical mask of pycortex's S1 (transform fullhead)
# The demo's budget (make demo from a fresh clone <= 10 min, data/ <= 2 GB) does not hold all 80,615
# columns: ridge costs ~0.15 ms per voxel and fit and the demo makes 33 fits; make demo took 10 min
# 38 s with 20,000 (bench/RESULTS.md). The default is the largest uniform sample that fits
S1_DEMO_COLUMNS = 12000


def get_args(argv=None):
    return get_parser().parse_args(argv)


def get_parser():
    p = common.parser(__doc__)
    p.add_argument("--data", default="data", help="output folder (default: data/)")
    p.add_argument("--source", choices=["simulated", "ds003020"], default="simulated",
                   help="simulated: the embedded study (no download); ds003020: the real data (--ds-root)")
    p.add_argument("--seed", type=int, default=0, help="seed of everything random (simulated study)")
    g = p.add_argument_group("simulated study")
    g.add_argument("--n-subjects", type=int, default=3, help="simulated subjects (sim01, sim02, ...)")
    g.add_argument("--cortex", choices=["S1", "none"], default="S1", help="S1: voxels on pycortex's example "
                   "subject's cortex (assets/s1_cortex.npz), ROIs from its overlays; none: the abstract "
                   "300-voxel study of four voxel kinds")
    g.add_argument("--n-voxels", type=int, help=f"voxels per subject (S1: a uniform sample of its {S1_COLUMNS:,} "
                   f"columns, default {S1_DEMO_COLUMNS:,}, the demo's budget; none: default 300)")
    g.add_argument("--n-train-stories", type=int, default=10, help="training stories")
    g.add_argument("--n-val-stories", type=int, default=1, help="validation stories (pick layers and epochs)")
    g.add_argument("--story-seconds", type=float, default=120.0, help="length of each train/val story")
    g.add_argument("--test-seconds", type=float, default=240.0, help="length of the test story")
    g.add_argument("--story-trs", type=int, nargs="+", help="TRs of each train then validation story (the "
                   "last --n-val-stories are validation), e.g. ds003020's counts (bench/scale.py); overrides "
                   "--n-train-stories and --story-seconds")
    g.add_argument("--test-repeats", type=int, default=10, help="times the test story is heard")
    g.add_argument("--n-categories", type=int, default=10, help=f"semantic categories (<= {len(CATEGORIES)})")
    g.add_argument("--words-per-category", type=int, default=4,
                   help="content words per category (<= 20); more words = harder to learn (README)")
    g.add_argument("--n-voices", type=int, default=1, help=f"espeak voices (<= {len(VOICES)})")
    g.add_argument("--rate", type=int, default=170, help="speaking rate, words per minute")
    g.add_argument("--semantic-dim", type=int, default=16, help="dimensions of the words' semantic vectors")
    g.add_argument("--noise-sd", type=float, nargs=2, default=[0.7, 2.0], metavar=("LO", "HI"),
                   help="--cortex none: per-voxel noise sd range (signal sd = 1), log-uniform")
    g = p.add_argument_group("ds003020")
    g.add_argument("--ds-root", help="root of the downloaded OpenNeuro ds003020 dataset")
    g.add_argument("--subjects", nargs="+", default=["UTS01", "UTS02", "UTS03"], help="subjects (default: the paper's)")
    g.add_argument("--val-stories", nargs="+", default=DS_VAL_STORIES,
                   help=f"stories that pick the best layer / epoch (default: {' '.join(DS_VAL_STORIES)})")
    g.add_argument("--test-story", default="wheretheressmoke", help="the story heard 10 times, held out")
    g = g.add_mutually_exclusive_group()
    g.add_argument("--roi-file", help="npz with boolean masks <subject>_AC, <subject>_LH, <subject>_RH")
    g.add_argument("--rois-from-pycortex", action="store_true",
                   help="AC/LH/RH masks from the dataset's derivative/pycortex-db (needs pycortex installed)")
    return p


def check_args(args):
    """Ranges of the simulated study's flags, as one clear error each (a study nobody can fit is
    refused here rather than by a traceback in a later stage)."""
    min_s = FIRST_TR_TIME + 10 * TR  # at least 10 TRs after the first response row
    if args.n_voxels is None:
        args.n_voxels = 300 if args.cortex == "none" else S1_DEMO_COLUMNS
    checks = [
        ("--n-subjects", args.n_subjects, 1, None, ""),
        ("--n-voxels", args.n_voxels, 2, None if args.cortex == "none" else S1_COLUMNS,
         " (the LH/RH halves need two)" if args.cortex == "none" else " (the columns of S1's cortex)"),
        ("--n-train-stories", args.n_train_stories, 1, None, ""),
        ("--n-val-stories", args.n_val_stories, 1, None, " (stages 02 and 03 choose on them)"),
        ("--story-seconds", args.story_seconds, min_s, None, f" (10 TRs after the first at {FIRST_TR_TIME:g} s)"),
        ("--test-seconds", args.test_seconds, min_s, None, f" (10 TRs after the first at {FIRST_TR_TIME:g} s)"),
        ("--test-repeats", args.test_repeats, 2, None, " (the noise ceiling needs repeats)"),
        ("--n-categories", args.n_categories, 1, len(CATEGORIES), ""),
        ("--words-per-category", args.words_per_category, 1, 20, ""),
        ("--n-voices", args.n_voices, 1, len(VOICES), ""),
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


# ---------------------------------------------------------------------------------------------
# Speech synthesis: espeak-ng through ctypes, no system install
# ---------------------------------------------------------------------------------------------

def synthesize(job):
    """One word -> float32 audio at 16 kHz, trimmed to the voiced part.

    espeak-ng carries hidden state from one utterance to the next (the same word comes out a few
    samples different the second time), so each word is spoken by a fresh engine in a forked worker:
    that makes the same seed give the same audio.
    """
    word, voice, rate = job
    import espeakng_loader
    lib = ctypes.cdll.LoadLibrary(espeakng_loader.get_library_path())
    data_dir = os.path.dirname(espeakng_loader.get_data_path())
    rate_in = lib.espeak_Initialize(2, 0, data_dir.encode(), 0)  # 2 = AUDIO_OUTPUT_SYNCHRONOUS
    if rate_in <= 0:
        raise StudyError("espeak-ng failed to initialise; reinstall the espeakng-loader wheel")
    chunks = []
    callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                     ctypes.c_void_p)

    def collect(wav, n, events):
        if n > 0 and wav:
            chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0
    callback = callback_type(collect)
    lib.espeak_SetSynthCallback(callback)
    if lib.espeak_SetVoiceByName(voice.encode()) != 0:
        raise StudyError(f"espeak-ng has no voice {voice!r}")
    lib.espeak_SetParameter(1, int(rate), 0)  # 1 = espeakRATE (words per minute)
    text = word.encode() + b"\0"
    lib.espeak_Synth(text, len(text), 0, 1, 0, 0, None, None)
    lib.espeak_Synchronize()
    x = np.concatenate(chunks).astype(np.float32) / 32768.0
    x = resample_poly(x, SR, rate_in).astype(np.float32)
    voiced = np.nonzero(np.abs(x) > 0.01)[0]
    return x[voiced[0]:voiced[-1] + 1]


def synthesize_all(words, voices, rate):
    """clips[voice][word]: every word spoken once per voice, each by a fresh engine (see synthesize)."""
    jobs = [(w, v, rate) for v in voices for w in words]
    with multiprocessing.get_context("fork").Pool(2, maxtasksperchild=1) as pool:
        flat = pool.map(synthesize, jobs, chunksize=1)
    return [flat[i * len(words):(i + 1) * len(words)] for i in range(len(voices))]


# ---------------------------------------------------------------------------------------------
# The simulated study
# ---------------------------------------------------------------------------------------------

def make_vocabulary(args, rng):
    """Content words in categories with semantic vectors near a category centroid; function words
    carry no meaning (zero vector). The sound of a word says nothing about its vector."""
    cats = list(CATEGORIES)[:args.n_categories]
    words, category, vectors = [], [], []
    centroids = rng.standard_normal((len(cats), args.semantic_dim))
    for c, name in enumerate(cats):
        for w in CATEGORIES[name].split()[:args.words_per_category]:
            v = centroids[c] + 0.5 * rng.standard_normal(args.semantic_dim)
            words.append(w)
            category.append(c)
            vectors.append(v / np.linalg.norm(v))
    for w in FUNCTION_WORDS:
        words.append(w)
        category.append(-1)
        vectors.append(np.zeros(args.semantic_dim))
    return np.array(words), np.array(category), np.array(vectors, dtype=np.float32), np.array(cats)


def make_story(seconds, vocab, category, clips, rng, n_voices):
    """A story: sentences whose topic drifts between categories, spoken by concatenating each word's
    one synthesized clip (per voice) with short gaps. Returns audio and word indices/onsets/offsets."""
    n_cat = category.max() + 1
    func = np.flatnonzero(category < 0)
    pieces, idx, onsets, offsets = [np.zeros(int(0.5 * SR), np.float32)], [], [], []
    t = 0.5
    topic = rng.integers(n_cat)
    while t < seconds - 1.0:
        if rng.random() < 0.4:  # topic drift between sentences
            topic = rng.integers(n_cat)
        voice = rng.integers(n_voices)
        content = np.flatnonzero(category == topic)
        for _ in range(rng.integers(4, 10)):
            w = rng.choice(func) if rng.random() < 0.35 else rng.choice(content)
            clip = clips[voice][w]
            gap = np.zeros(int(rng.uniform(0.04, 0.12) * SR), np.float32)
            pieces += [clip, gap]
            idx.append(w)
            onsets.append(t)
            offsets.append(t + len(clip) / SR)
            t += (len(clip) + len(gap)) / SR
        pause = np.zeros(int(rng.uniform(0.25, 0.6) * SR), np.float32)
        pieces.append(pause)
        t += len(pause) / SR
    audio = np.concatenate(pieces)
    audio = np.concatenate([audio, np.zeros(max(0, int(seconds * SR) - len(audio)), np.float32)])
    return audio, np.array(idx), np.array(onsets), np.array(offsets)


def hrf(dt, length=32.0):
    """SPM's canonical double-gamma HRF (peak ~5 s, undershoot ~15 s), unit sum."""
    t = np.arange(0, length, dt)
    h = gamma.pdf(t, 6) - gamma.pdf(t, 16) / 6
    return h / h.sum()


def to_trs(x, dt, tr_times):
    """Convolve a high-rate (time x dims) signal with the HRF and average it within each TR."""
    y = fftconvolve(x, hrf(dt)[:, None], axes=0)[:len(x)]
    t = np.arange(len(x)) * dt
    return np.stack([y[(t >= c - TR / 2) & (t < c + TR / 2)].mean(0) for c in tr_times])


def story_tr_times(duration):
    n = int((duration - FIRST_TR_TIME) // TR) + 1
    return FIRST_TR_TIME + TR * np.arange(n)


def build_simulated(args):
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    vocab, category, sem_vectors, cat_names = make_vocabulary(args, rng)
    voices = VOICES[:args.n_voices]
    clips = synthesize_all(list(vocab), voices, args.rate)
    print(f"synthesized {len(vocab)} words x {len(voices)} voice(s) in {time.time() - t0:.1f} s")

    n_train = len(args.story_trs) - args.n_val_stories if args.story_trs else args.n_train_stories
    names = ([f"story{i:02d}" for i in range(n_train)]
             + [f"val{i:02d}" for i in range(args.n_val_stories)] + ["test"])
    trs = dict(zip(names, args.story_trs or []))  # exact TR counts, when given
    stories = {}
    for name in names:
        secs = args.test_seconds if name == "test" else args.story_seconds
        if name in trs:  # audio until 1 s past the last TR, then the TR grid cut to the count
            secs = FIRST_TR_TIME + TR * (trs[name] - 1) + 1.0
        audio, idx, on, off = make_story(secs, vocab, category, clips, rng, len(voices))
        tr_times = story_tr_times(len(audio) / SR)[:trs.get(name)]
        stories[name] = dict(audio=audio, idx=idx, on=on, off=off, tr_times=tr_times)

    # Latent drives at 100 Hz, shared by all subjects: acoustics (log-mel) and meaning (the vector of
    # the word being heard). Each is put through the HRF and averaged within TRs.
    dt = 0.01
    sem_centre = sem_vectors[category >= 0].mean(0)
    mels = {n: log_mel(s["audio"]) for n, s in stories.items()}
    allmel = np.concatenate([m for m, _ in mels.values()])
    mu, sd = allmel.mean(0), allmel.std(0)
    drives = {}
    for name, s in stories.items():
        m, mt = mels[name]
        grid = np.arange(0, len(s["audio"]) / SR, dt)
        aco = np.stack([np.interp(grid, mt, (m[:, b] - mu[b]) / sd[b]) for b in range(m.shape[1])], 1)
        # the meaning in play: the vector of the latest content word, held through function words
        # and pauses, so meaning is not just "speech is on" (vectors are centred for the same reason)
        sem = np.zeros((len(grid), args.semantic_dim))
        for w, a in zip(s["idx"], s["on"]):
            if category[w] >= 0:
                sem[int(a / dt):] = sem_vectors[w] - sem_centre
        drives[name] = (to_trs(aco, dt, s["tr_times"]), to_trs(sem, dt, s["tr_times"]))

    out = args.data
    tmp_out = out.rstrip("/") + ".tmp_build"
    shutil.rmtree(tmp_out, ignore_errors=True)
    prints = {}  # each file's content fingerprint: study.npz records them (common.load_study)
    for name, s in stories.items():
        prints[name] = save_npz(os.path.join(tmp_out, "stories", f"{name}.npz"), audio=s["audio"], sr=np.int64(SR),
                 tr_times=s["tr_times"].astype(np.float64), words=vocab[s["idx"]],
                 word_onsets=s["on"], word_offsets=s["off"])

    subjects = [f"sim{i + 1:02d}" for i in range(args.n_subjects)]
    truth = dict(kind_names=KIND_NAMES, vocab=vocab, vocab_category=category, category_names=cat_names,
                 semantic_vectors=sem_vectors, subjects=np.array(subjects))
    n_aco = drives["test"][0].shape[1]
    asset = None if args.cortex == "none" else cortex_sample(args, rng)
    for subj in subjects:
        if asset is None:  # the abstract study: voxels of four kinds, ROIs drawn at random
            sim = abstract_voxels(args, rng, drives, n_aco)
        else:  # voxels on S1's cortex: tuning, amplitude and noise as smooth maps over it
            sim = cortex_voxels(args, rng, drives, n_aco, asset)
        signal, noise_sd, v = sim["signal"], sim["noise_sd"], len(sim["noise_sd"])

        def noisy(x):  # AR(1) noise (rho 0.3): fMRI noise is autocorrelated in time
            e = rng.standard_normal(x.shape)
            for t in range(1, len(e)):
                e[t] = 0.3 * e[t - 1] + np.sqrt(1 - 0.09) * e[t]
            return x + e * noise_sd
        test_signal = signal("test")

        def arrays():  # in the order the noise is drawn: responses, test repeats, then ROIs
            for n in drives:
                if n != "test":
                    yield f"resp_{n}", zscore(noisy(signal(n)))
            repeats = np.empty((args.test_repeats, *test_signal.shape), np.float32)
            for i in range(args.test_repeats):  # one at a time: a float64 stack is 2 GB at UTS01's size
                repeats[i] = noisy(test_signal)
            yield "test_resp", zscore(repeats.mean(0))
            yield "noise_ceiling", noise_ceiling(repeats)
            yield "test_repeats", repeats
            del repeats
            yield from sim["rois"]().items()
        prints[subj] = save_npz(os.path.join(tmp_out, "subjects", f"{subj}.npz"), arrays(),
                                constant_voxels=np.zeros(v, bool), nan_voxels=np.zeros(v, bool),
                                **({} if asset is None else dict(flat_index=asset["flat_index"],
                                                                 flat_extents=asset["flat_extents"])))
        # the ceiling from the truth: expected r between the signal and the mean of N noisy repeats
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
        truth.update(columns=asset["columns"], cortex_source=asset["source"])
    truth["test_acoustic_drive"] = drives["test"][0].astype(np.float32)
    truth["test_semantic_drive"] = drives["test"][1].astype(np.float32)
    prints["truth"] = save_npz(os.path.join(tmp_out, "truth.npz"), **truth)
    write_study(tmp_out, "simulated", subjects, names[:n_train], names[n_train:-1], "test", args.seed, prints)
    return tmp_out, subjects, stories


def abstract_voxels(args, rng, drives, n_aco):
    """The abstract study (--cortex none): each voxel is auditory (25%), semantic (40%), mixed (20%)
    or noise (15%); 'AC' is the auditory kind and LH/RH are random halves."""
    v = args.n_voxels
    kind = rng.choice(4, size=v, p=[0.25, 0.4, 0.2, 0.15])
    # each subject mixes the shared latents into its voxels its own way
    w_aco = (0.5 + rng.standard_normal((n_aco, v))) * np.isin(kind, [0, 2])
    w_sem = rng.standard_normal((args.semantic_dim, v)) * np.isin(kind, [1, 2])

    def raw(n):
        return drives[n][0] @ w_aco / np.sqrt(n_aco) + drives[n][1] @ w_sem
    sd_sig = signal_sd(raw, drives)

    def rois():
        order = rng.permutation(v)
        return {"roi_AC": kind == 0, "roi_LH": np.isin(np.arange(v), order[:v // 2]),
                "roi_RH": np.isin(np.arange(v), order[v // 2:])}
    noise_sd = np.exp(rng.uniform(*np.log(args.noise_sd), size=v))
    return dict(signal=lambda n: raw(n) / sd_sig, noise_sd=noise_sd, kind=kind, w_aco=w_aco, w_sem=w_sem, rois=rois)


def signal_sd(raw, drives):
    """A signal's std per voxel over every story, in two passes story by story (mean, then
    deviations): one story's signal in memory at a time."""
    rows = sum(len(d[0]) for d in drives.values())
    mean = sum(raw(n).sum(0) for n in drives) / rows
    sd = np.sqrt(sum(((raw(n) - mean) ** 2).sum(0) for n in drives) / rows)
    sd[sd == 0] = 1
    return sd


# The regime of the study on S1 (docs/methods.md, with the facts it follows): fixed before the
# claims were measured, and not tuned to make one appear.
ACOUSTIC_FALLOFF_MM = 12.0   # acoustic amplitude exp(-d / 12 mm), d: distance along cortex to AC
SEMANTIC_SHARE = 0.25        # share of cortex in the semantic network (its amplitude > 1/2)
SMOOTH_MM = 15.0             # length scale of the smooth maps (tuning, network, noise)
NOISE_SD = 2.5               # noise sd against a signal amplitude of 1: single-trial r 0.37 at best


def smooth_fields(xyz, rng, n_fields, length_mm, n_waves=256):
    """n_fields random fields over the cortex, each ~N(0, 1) at every voxel and smooth over
    `length_mm` (random Fourier features of a Gaussian kernel on the voxels' positions, in mm)."""
    omega = rng.standard_normal((n_fields, n_waves, 3)) / length_mm
    phase = rng.uniform(0, 2 * np.pi, (n_fields, n_waves))
    return np.stack([np.sqrt(2 / n_waves) * np.cos(xyz @ omega[k].T + phase[k]).sum(1) for k in range(n_fields)])


def cortex_sample(args, rng):
    """S1's cortex (assets/s1_cortex.npz, derived from pycortex's S1), or a uniform random sample of
    --n-voxels of its columns (in their order, so the ROI shares stay true); the flatmap then
    shows each pixel's nearest sampled column."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "s1_cortex.npz")
    a = common.load_npz(path, "the S1 cortex asset (assets/make_s1_cortex.py rebuilds it)")
    n = len(a["roi_AC"])
    if args.n_voxels >= n:
        columns = np.arange(n)
    else:
        columns = np.sort(rng.choice(n, args.n_voxels, replace=False))
    from scipy.spatial import cKDTree
    _, nearest = cKDTree(a["xyz_mm"][columns]).query(a["xyz_mm"])  # each column's nearest sampled one
    flat = np.where(a["flat_index"] >= 0, nearest[np.maximum(a["flat_index"], 0)], -1).astype(np.int32)
    return dict({k: a[k][columns] for k in ("roi_AC", "roi_LH", "roi_RH", "xyz_mm", "dist_AC_mm")},
                columns=columns, flat_index=flat, flat_extents=a["flat_extents"], source=a["source"])


def cortex_voxels(args, rng, drives, n_aco, c):
    """Voxels on S1's cortex. Acoustic tuning in and around AC, its amplitude falling off with the
    distance along the cortex; semantic tuning over a broad network (a smooth map covering
    SEMANTIC_SHARE of cortex, weaker inside AC); the tuning itself (which bands, which meanings)
    a mix of a few smooth maps; noise of about equal size everywhere, so that the signal-to-noise
    map follows the two amplitudes: high in AC and the language network, low in most of cortex."""
    amp_aco = np.exp(-c["dist_AC_mm"] / ACOUSTIC_FALLOFF_MM)
    net = smooth_fields(c["xyz_mm"], rng, 1, 2 * SMOOTH_MM)[0]
    net = 1 / (1 + np.exp(-3 * (net - np.quantile(net, 1 - SEMANTIC_SHARE))))
    amp_sem = net * (1 - 0.8 * amp_aco)  # primary auditory cortex carries sound more than meaning
    maps = smooth_fields(c["xyz_mm"], rng, 4 + 6, SMOOTH_MM)  # 4 acoustic and 6 semantic tuning maps
    w_aco = 0.5 + rng.standard_normal((n_aco, 4)) @ maps[:4] / 2
    w_sem = rng.standard_normal((args.semantic_dim, 6)) @ maps[4:] / np.sqrt(6)
    sd_aco = signal_sd(lambda n: drives[n][0] @ w_aco, drives)
    sd_sem = signal_sd(lambda n: drives[n][1] @ w_sem, drives)

    def signal(n):
        return amp_aco * (drives[n][0] @ w_aco) / sd_aco + amp_sem * (drives[n][1] @ w_sem) / sd_sem
    noise_sd = NOISE_SD * np.exp(0.2 * smooth_fields(c["xyz_mm"], rng, 1, 2 * SMOOTH_MM)[0])
    amp = np.sqrt(amp_aco ** 2 + amp_sem ** 2)
    kind = np.where(amp < 0.15, 3, np.where(amp_aco / np.maximum(amp, 1e-9) > 0.85, 0,
                                            np.where(amp_sem / np.maximum(amp, 1e-9) > 0.85, 1, 2)))
    rois = {"roi_AC": c["roi_AC"], "roi_LH": c["roi_LH"], "roi_RH": c["roi_RH"]}
    return dict(signal=signal, noise_sd=noise_sd, kind=kind, w_aco=w_aco, w_sem=w_sem, amp_aco=amp_aco,
                amp_sem=amp_sem, rois=lambda: rois)


# ---------------------------------------------------------------------------------------------
# The real dataset: OpenNeuro ds003020
# ---------------------------------------------------------------------------------------------

def is_filler(text):
    """The lab's rule for the word tier: lower-case, strip braces, then spaces; fillers are dropped."""
    return text.lower().strip("{}").strip() in FILLERS


def read_textgrid_words(path):
    """Words of a Praat TextGrid's word tier (the second tier), with the lab's filler tokens dropped."""
    try:
        text = open(path, encoding="utf-8", errors="replace").read()
    except OSError as e:
        raise StudyError(f"cannot read {path}: {e}")
    tiers = text.split("item [")[2:]  # [0] is the header, [1] the 'item []:' line
    if len(tiers) < 2:
        raise StudyError(f"{path} has fewer than 2 tiers; the word tier must be the second "
                         "(re-export the TextGrid in Praat's long text format)")
    words, on, off = [], [], []
    for iv in tiers[1].split("intervals [")[1:]:
        fields = {}
        for line in iv.splitlines():
            if "=" in line:
                k, v = line.split("=", 1)
                fields[k.strip()] = v.strip()
        w = fields.get("text", "").strip('"')
        if is_filler(w):
            continue
        words.append(w.strip().lower())
        on.append(float(fields["xmin"]))
        off.append(float(fields["xmax"]))
    return np.array(words), np.array(on), np.array(off)


def read_wav(path):
    """Any rate, mono or stereo, int or float wav -> float32 mono at 16 kHz."""
    try:
        rate, x = wavfile.read(path)
    except (OSError, ValueError) as e:
        raise StudyError(f"cannot read {path}: {e}")
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32) / np.iinfo(x.dtype).max
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise StudyError(f"{path} holds NaN or infinite samples; replace the file with a clean copy of the dataset's")
    if x.ndim == 2:
        x = x.mean(1)
    if rate != SR:
        g = np.gcd(int(rate), SR)
        x = resample_poly(x, SR // g, int(rate) // g).astype(np.float32)
    return x


def read_hf5(path):
    """A response file -> (response: TRs x voxels or None, repeats: repeats x TRs x voxels or None).

    ds003020's files hold `data` (some versions: `resp`); the test story's file also holds
    `individual_repeats`. A 3-D `data` is taken as the repeats themselves (older exports)."""
    import h5py
    try:
        with h5py.File(path, "r") as f:
            resp = next((np.asarray(f[k], dtype=np.float32) for k in ("data", "resp") if k in f), None)
            repeats = np.asarray(f["individual_repeats"], np.float32) if "individual_repeats" in f else None
            keys = list(f.keys())
    except OSError as e:
        raise StudyError(f"cannot read {path}: {e}")
    if resp is not None and resp.ndim == 3 and repeats is None:
        resp, repeats = None, resp
    if resp is None and repeats is None:
        raise StudyError(f"{path} has no 'data' or 'resp' dataset (found {keys}); it is not a ds003020 "
                         "response file")
    return resp, repeats


def bad_voxels(resp):
    """(non-finite, constant) voxel masks of a (..., TRs, voxels) response."""
    flat = resp.reshape(-1, resp.shape[-1])
    nonfinite = ~np.isfinite(flat).all(0)
    constant = np.zeros(flat.shape[1], bool)
    ok = ~nonfinite  # std only over finite voxels; no copy of the (GB-sized) array when all are
    constant[ok] = (flat.std(0) if ok.all() else flat[:, ok].std(0)) == 0
    return nonfinite, constant


def closest(name, names):
    near = difflib.get_close_matches(name, sorted(names), n=3, cutoff=0.6)
    return f"closest: {', '.join(near)}" if near else "no close name"


def choose_stories(args, respdict, respdict_path, prep):
    """Stories every requested subject has a response file for, that respdict.json knows; the
    validation and test stories must be among them. Prints what was left out, for whom."""
    have = {s: {f[:-4] for f in os.listdir(os.path.join(prep, s)) if f.endswith(".hf5")} for s in args.subjects}
    for st in args.val_stories + [args.test_story]:
        flag = "--test-story" if st == args.test_story else "--val-stories"
        if st not in respdict:
            raise StudyError(f"{flag} {st!r} is not a story of ds003020 ({respdict_path} does not list it; "
                             f"{closest(st, respdict)})")
        lacking = [s for s in args.subjects if st not in have[s]]
        if lacking:
            raise StudyError(f"{flag} {st!r} has no response file for {', '.join(lacking)} "
                             f"({os.path.join(prep, lacking[0], st + '.hf5')} not found; choose a story "
                             "every subject heard, or leave those subjects out)")
    shared = set.intersection(*have.values())
    for s in args.subjects:
        left_out = sorted(have[s] - shared)
        if left_out:
            print(f"  note: {len(left_out)} stor{'y' if len(left_out) == 1 else 'ies'} of {s} left out "
                  "(not every requested subject has them): "
                  f"{' '.join(left_out[:8])}{' ...' if len(left_out) > 8 else ''}")
    unknown = sorted(shared - set(respdict))
    if unknown:
        print(f"  note: {len(unknown)} stories left out: not in {respdict_path}: {' '.join(unknown)}")
    fixed = set(args.val_stories) | {args.test_story}
    return sorted(shared & set(respdict) - fixed)


def import_pycortex():
    try:
        import cortex
    except ImportError:
        raise StudyError("--rois-from-pycortex needs pycortex, which is not installed (a source build: `pip install "
                         "numpy cython setuptools-scm wheel && pip install --no-build-isolation pycortex`, or `make "
                         "pycortex`), or pass --roi-file masks.npz instead")
    return cortex


def pycortex_subject(root, subject):
    """pycortex pointed at the dataset's own database (derivative/pycortex-db) and the subject's
    transform (derivative/subject_xfms.json, else <subject>_auto): (cortex module, transform)."""
    cortex = import_pycortex()
    db = os.path.join(root, "derivative", "pycortex-db")
    xfms_path = os.path.join(root, "derivative", "subject_xfms.json")
    if not os.path.isdir(os.path.join(db, subject)):
        raise StudyError(f"{os.path.join(db, subject)} not found: download derivative/pycortex-db/{subject} of ds003020")
    xfm = json.load(open(xfms_path)).get(subject, f"{subject}_auto") if os.path.exists(xfms_path) else f"{subject}_auto"
    cortex.db.filestore, cortex.db._subjects = db, None  # the dataset's own filestore
    return cortex, xfm


def pycortex_rois(root, subject):
    """AC/LH/RH column masks of one subject from the dataset's own pycortex database, with
    pycortex's functions: the data's columns are the true voxels of the transform's 'thick' mask
    (in order); AC from the ROI outlines in overlays.svg, as public brain-tuning code reads it."""
    cortex, xfm = pycortex_subject(root, subject)
    thick = np.asarray(cortex.db.get_mask(subject, xfm, "thick"), bool)
    ac = cortex.utils.get_roi_masks(subject, xfm, roi_list=["AC"], gm_sampler="cortical-conservative",
                                    threshold=0.9)["AC"]
    lh, rh = cortex.utils.get_hemi_masks(subject, xfm)
    return masks_from_volumes(thick, {"AC": ac}, lh, rh)


def pycortex_flatmap(root, subject, height=common.FLAT_HEIGHT):
    """The flattened cortex as an image of column indices (-1 off cortex), from pycortex's own
    flatmap cache (the pixel -> voxel weights quickflat draws with): each pixel takes the column
    with the largest weight, in quickflat's orientation. common.draw_flatmap draws data with it,
    without pycortex. Returns (flat_index: height x width int32, extents: the flat coordinates)."""
    cortex, xfm = pycortex_subject(root, subject)
    from cortex.quickflat import utils as qf
    thick = np.asarray(cortex.db.get_mask(subject, xfm, "thick"), bool).ravel()
    column = np.full(thick.size, -1, np.int64)
    column[thick] = np.arange(thick.sum())
    mask, extents = qf.get_flatmask(subject, height=height)
    pixmap = qf.get_flatcache(subject, xfm, height=height).tocoo()
    keep = column[pixmap.col] >= 0
    rows, cols, weights = pixmap.row[keep], column[pixmap.col[keep]], pixmap.data[keep]
    order = np.lexsort((-weights, rows))  # per pixel, the heaviest column first
    first = np.ones(len(order), bool)
    first[1:] = rows[order][1:] != rows[order][:-1]
    pixel = np.full(pixmap.shape[0], -1, np.int64)
    pixel[rows[order][first]] = cols[order][first]
    image = np.full(mask.shape, -1, np.int64)
    image[mask] = pixel
    return image.T[::-1].astype(np.int32), np.asarray(extents, np.float64)


def masks_from_volumes(thick, roi_volumes, lh, rh):
    """Volume masks (z, y, x) -> boolean masks over the data's columns, the true voxels of `thick`
    in C order. LH/RH: each voxel goes to the hemisphere of its nearest hemisphere-surface voxel
    (pycortex's hemisphere masks cover only voxels the surface passes through)."""
    from scipy.spatial import cKDTree
    thick = np.asarray(thick, bool)
    out = {name: np.asarray(v)[thick] > 0 for name, v in roi_volumes.items()}
    pts = np.argwhere(thick)
    lh_pts, rh_pts = np.argwhere(np.asarray(lh, bool)), np.argwhere(np.asarray(rh, bool))
    if not len(lh_pts) or not len(rh_pts):
        raise StudyError("the hemisphere masks are empty: the pycortex database or transform is incomplete")
    d_lh, _ = cKDTree(lh_pts).query(pts)
    d_rh, _ = cKDTree(rh_pts).query(pts)
    out["LH"] = d_lh < d_rh
    out["RH"] = ~out["LH"]
    return out


def find_ds003020(args):
    """Every file stage 01 reads from a ds003020 root, checked before minutes of reading (also the
    last step of 00_fetch_ds003020.py). Returns (training stories, respdict)."""
    root = args.ds_root
    if not root or not os.path.isdir(root):
        raise StudyError(f"--ds-root {root!r} is not a folder; fetch ds003020 with `python 00_fetch_ds003020.py "
                         "--dest PATH` (or download it) and pass its root (the folder holding derivative/ and stimuli/)")
    prep = os.path.join(root, "derivative", "preprocessed_data")
    respdict_path = os.path.join(root, "derivative", "respdict.json")
    if not os.path.exists(respdict_path):
        raise StudyError(f"{respdict_path} not found: the TR bookkeeping needs it (it is part of ds003020)")
    respdict = json.load(open(respdict_path))
    for s in args.subjects:
        if not os.path.isdir(os.path.join(prep, s)):
            have = sorted(os.listdir(prep)) if os.path.isdir(prep) else []
            raise StudyError(f"unknown subject {s}: no folder {os.path.join(prep, s)} (found {have})")
    train = choose_stories(args, respdict, respdict_path, prep)
    for st in train + args.val_stories + [args.test_story]:
        for f in (os.path.join(root, "stimuli", f"{st}.wav"), os.path.join(root, "derivative", "TextGrids", f"{st}.TextGrid")):
            if not os.path.exists(f):
                raise StudyError(f"story {st}: {f} not found (every story needs its wav and TextGrid)")
    if args.rois_from_pycortex:
        import_pycortex()
        for s in args.subjects:
            if not os.path.isdir(os.path.join(root, "derivative", "pycortex-db", s)):
                raise StudyError(f"--rois-from-pycortex: {os.path.join(root, 'derivative', 'pycortex-db', s)} not found "
                                 f"(fetch derivative/pycortex-db/{s} of ds003020)")
    return train, respdict


def build_ds003020(args):
    root = args.ds_root
    train, respdict = find_ds003020(args)
    names = train + args.val_stories + [args.test_story]
    if args.rois_from_pycortex:
        rois = {s: pycortex_rois(root, s) for s in args.subjects}
        flats = {s: pycortex_flatmap(root, s) for s in args.subjects}  # for the stages' flatmaps
    else:
        rois, flats = load_npz_rois(args.roi_file, args.subjects), {}
    print(f"  {len(train)} training stories, validation {' '.join(args.val_stories)}, test {args.test_story}")

    tmp_out = args.data.rstrip("/") + ".tmp_build"
    shutil.rmtree(tmp_out, ignore_errors=True)
    stories, prints = {}, {}
    for st in names:
        wav = os.path.join(root, "stimuli", f"{st}.wav")
        audio = read_wav(wav)
        words, on, off = read_textgrid_words(os.path.join(root, "derivative", "TextGrids", f"{st}.TextGrid"))
        tr_times = FIRST_TR_TIME + TR * np.arange(respdict[st] - TRIM_TRS)
        if tr_times[-1] > len(audio) / SR + 30:
            raise StudyError(f"story {st}: respdict says {respdict[st]} TRs (last row at {tr_times[-1]:.0f} s)"
                             f" but {wav} lasts {len(audio) / SR:.0f} s; the wav or respdict is wrong")
        stories[st] = tr_times
        prints[st] = save_npz(os.path.join(tmp_out, "stories", f"{st}.npz"), audio=audio, sr=np.int64(SR),
                              tr_times=tr_times, words=words, word_onsets=on, word_offsets=off)
        print(f"  story {st}: {len(audio) / SR:.0f} s, {len(words)} words, {len(tr_times)} TRs")
    e1000 = os.path.join(root, "derivative", "english1000sm.hf5")
    if os.path.exists(e1000):  # the semantic probe's targets (stage 05) for the stories' words
        words = set(np.concatenate([np.load(os.path.join(tmp_out, "stories", f"{st}.npz"))["words"] for st in names]))
        found, vectors = common.english1000(e1000, words)
        prints["english1000"] = save_npz(os.path.join(tmp_out, "english1000.npz"), words=found, vectors=vectors)
        print(f"  English1000 vectors for {len(found)} of the stories' {len(words)} word types -> english1000.npz")
    else:
        print(f"  note: {e1000} not found: stage 05's semantic probe will need --word-vectors")
    prep = os.path.join(root, "derivative", "preprocessed_data")
    for s in args.subjects:
        prints[s] = write_subject(args, s, prep, stories, respdict, rois.get(s, {}), tmp_out, flats.get(s))
    if args.rois_from_pycortex:  # reusable as --roi-file without pycortex
        save_npz(os.path.join(tmp_out, "roi_masks.npz"),
                 **{f"{s}_{name}": m for s, masks in rois.items() for name, m in masks.items()})
    write_study(tmp_out, "ds003020", args.subjects, train, args.val_stories, args.test_story, args.seed, prints)
    return tmp_out, args.subjects, stories


def write_subject(args, s, prep, stories, respdict, rois, tmp_out, flat=None):
    """One subject's responses, z-scored per story. Voxels with NaN anywhere are set to 0 in every
    story and flagged (the lab's readers apply np.nan_to_num); the test story's `individual_repeats`
    give test_repeats and the noise ceiling, its `data` (the published mean) test_resp."""
    out, nonfinite, constant = {}, False, False
    for st, tr_times in stories.items():
        path = os.path.join(prep, s, f"{st}.hf5")
        resp, repeats = read_hf5(path)
        for x in (resp, repeats):
            if x is not None and x.shape[-2] != len(tr_times):
                raise StudyError(f"{path} has {x.shape[-2]} rows but respdict says {respdict[st]} TRs, "
                                 f"i.e. {len(tr_times)} rows after the lab's trimming of {TRIM_TRS}; "
                                 "the file or derivative/respdict.json is from another version")
        for x in (resp, repeats):
            if x is not None:
                bad, const = bad_voxels(x)
                nonfinite, constant = nonfinite | bad, constant | const
        if st != args.test_story:
            if resp is None:
                raise StudyError(f"{path} holds repeats but no averaged 'data'; only the test story may")
            out[f"resp_{st}"] = zscore(np.nan_to_num(resp, nan=0.0, posinf=0.0, neginf=0.0))
            continue
        if repeats is None:
            print(f"  note: {path} holds one (averaged) response, no repeats: noise_ceiling is NaN for {s}")
        else:
            repeats = np.nan_to_num(repeats, nan=0.0, posinf=0.0, neginf=0.0)
            out["test_repeats"] = repeats
            if resp is None:
                resp = repeats.mean(0)
            else:
                diff = np.abs(np.nan_to_num(resp) - repeats.mean(0))
                r = pearson_r(np.nan_to_num(resp), repeats.mean(0))
                print(f"  {s} {st}: published mean ('data') vs mean of the {len(repeats)} individual_repeats: "
                      f"max |difference| {diff.max():.3g}, median voxel r {np.median(r):.4f}")
        out["test_resp"] = zscore(np.nan_to_num(resp, nan=0.0, posinf=0.0, neginf=0.0))
    n_vox = {v.shape[-1] for v in out.values()}
    if len(n_vox) != 1:
        raise StudyError(f"subject {s}: stories disagree on the voxel count {sorted(n_vox)}")
    n_vox = n_vox.pop()
    nonfinite = np.broadcast_to(nonfinite, (n_vox,)).copy()
    constant = np.broadcast_to(constant, (n_vox,)) & ~nonfinite
    for x in out.values():
        x[..., nonfinite] = 0.0
    out["noise_ceiling"] = (noise_ceiling(out["test_repeats"]) if "test_repeats" in out
                            else np.full(n_vox, np.nan, np.float32))
    if nonfinite.any():
        print(f"  note: {s}: {nonfinite.sum()} voxels with NaN set to 0 in every story (flagged in nan_voxels)")
    if constant.any():
        print(f"  note: {s}: {constant.sum()} constant voxels kept as zeros (flagged in constant_voxels)")
    for name, mask in rois.items():
        if len(mask) != n_vox:
            src = "--rois-from-pycortex" if args.rois_from_pycortex else args.roi_file
            raise StudyError(f"{src}: {s}_{name} has {len(mask)} entries but {s} has {n_vox} voxels")
        out[f"roi_{name}"] = mask
    missing = [r for r in ("AC", "LH", "RH") if r not in rois]
    if missing:
        print(f"  note: {s}: no {', '.join(missing)} mask" + (" (no --roi-file)" if not args.roi_file else
              f" in {args.roi_file}") + "; stages that need them will say so")
    if flat is not None:
        if flat[0].max() >= n_vox:
            raise StudyError(f"the pycortex flatmap of {s} has columns up to {flat[0].max()} but {s} has {n_vox} voxels")
        out["flat_index"], out["flat_extents"] = flat
    fingerprint = save_npz(os.path.join(tmp_out, "subjects", f"{s}.npz"), constant_voxels=constant,
                           nan_voxels=nonfinite, **out)
    finite = np.isfinite(out["noise_ceiling"])
    print(f"  subject {s}: {n_vox} voxels" + (f", mean noise ceiling {out['noise_ceiling'][finite].mean():.3f}"
                                              if finite.any() else ""))
    return fingerprint


def load_npz_rois(path, subjects):
    if not path:
        return {}
    if not os.path.exists(path):
        raise StudyError(f"--roi-file {path} not found")
    with np.load(path, allow_pickle=False) as f:
        rois = {}
        for key in f.files:
            subj, _, name = key.partition("_")
            if name not in ("AC", "LH", "RH"):
                raise StudyError(f"{path}: key {key!r} is not <subject>_AC, <subject>_LH or <subject>_RH")
            if subj in subjects:
                rois.setdefault(subj, {})[name] = f[key].astype(bool)
    return rois


def write_study(out, source, subjects, train, val, test, seed, prints):
    """study.npz: the splits and the fingerprints every later result records. stories_fingerprint
    covers the splits and every story file; each subject file has its own, so rebuilding with one
    subject more or less (or other noise) leaves the others' results valid."""
    stories = digest(dict(source=source, train=list(train), val=list(val), test=test,
                          files={k: v for k, v in prints.items() if k not in subjects and k != "truth"}))
    save_npz(os.path.join(out, "study.npz"), source=np.array(source), subjects=np.array(subjects),
             train_stories=np.array(train), val_stories=np.array(val), test_story=np.array(test),
             tr=np.float64(TR), seed=np.int64(seed), stories_fingerprint=np.array(stories),
             subject_fingerprints=np.array([prints[s] for s in subjects]))


def describe_replacement(data, new):
    """What rebuilding `data` replaces, in words: which results built from the old study stay valid."""
    old_path = os.path.join(data, "study.npz")
    if not os.path.exists(old_path):
        return f"{data}/ exists but holds no study: replacing it"
    try:
        old, now = common.load_npz(old_path), common.load_npz(os.path.join(new, "study.npz"))
        if "stories_fingerprint" not in old:
            return f"replacing {data}/ (an older layout without fingerprints: rerun stages 02-05 on the new study)"
        if str(old["stories_fingerprint"]) != str(now["stories_fingerprint"]):
            return (f"replacing {data}/ with another study (its stories or splits differ): stages 02-05 will "
                    "refuse results built from the old one until they are rerun")
        was = dict(zip(old["subjects"], old["subject_fingerprints"]))
        same = [s for s, f in zip(now["subjects"], now["subject_fingerprints"]) if was.get(s) == f]
        changed = [str(s) for s in now["subjects"] if s not in same]
        return (f"replacing {data}/: the same stories; " + (f"subjects {', '.join(changed)} differ (their results will "
                "be refused until rerun)" if changed else "every subject identical, so existing results stay valid"))
    except (StudyError, KeyError) as e:
        return f"replacing {data}/ (its study.npz could not be read: {e})"


def main(argv=None):
    args = get_args(argv)
    t0 = time.time()
    print(f"stage 01: building the {args.source} study into {args.data}/")
    tmp_out = args.data.rstrip("/") + ".tmp_build"
    try:
        if args.source == "simulated":
            check_args(args)
        tmp_out, subjects, stories = (build_simulated if args.source == "simulated" else build_ds003020)(args)
    except (StudyError, KeyboardInterrupt) as e:
        shutil.rmtree(tmp_out, ignore_errors=True)
        if isinstance(e, KeyboardInterrupt):
            fail(f"interrupted: {args.data}/ is as it was; rerun the same command", 130)
        fail(e)
    # swap the finished study in whole, so a failed build never leaves a half-written data/. The
    # feature caches move across: they are keyed by model weights and audio, so stale entries are
    # recomputed when read and the rest are reused
    if os.path.isdir(args.data):
        print(f"  note: {describe_replacement(args.data, tmp_out)}")
        if os.path.isdir(os.path.join(args.data, "features")):
            os.replace(os.path.join(args.data, "features"), os.path.join(tmp_out, "features"))
            print(f"  kept {args.data}/features/ (model feature caches, checked against the audio when read)")
        old = args.data.rstrip("/") + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(args.data, old)
        os.replace(tmp_out, args.data)
        shutil.rmtree(old)
    else:
        os.replace(tmp_out, args.data)
    audio_s = sum(len(np.load(os.path.join(args.data, "stories", f"{s}.npz"))["audio"]) / SR for s in stories)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.data) for f in fs
               if not d.startswith(os.path.join(args.data, "features")))
    print(f"wrote {len(stories)} stories ({audio_s / 60:.1f} min of audio), {len(subjects)} subjects, "
          f"{size / 1e6:.1f} MB in {time.time() - t0:.1f} s -> {args.data}/")


if __name__ == "__main__":
    main()
