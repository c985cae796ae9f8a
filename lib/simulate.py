"""The simulated study: spoken stories and subjects whose responses have a known truth.

Used by stage 01 (the default source) and models/pretrain_tiny.py (its corpus: the same vocabulary
and stories). Stories are real synthesized speech (lib/speech.py); a word's sound says nothing about
its meaning (semantic vectors around category centroids). Subjects' voxels are driven by the sound
(log-mel), by meaning (the latest content word's vector) or both, through a canonical HRF, on the
TR clock of ds003020; on S1's cortex (--cortex S1) the tuning, the amplitudes and the noise are
smooth maps over the cortex (docs/methods.md gives the regime and the facts it follows).
"""
import numpy as np
from scipy.signal import fftconvolve
from scipy.stats import gamma

from lib.ds003020 import FIRST_TR_TIME, TR
from lib.speech import SR, log_mel

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
KIND_NAMES = np.array(["auditory", "semantic", "mixed", "noise"])


# ---- the stories: vocabulary, speech, the TR clock ----

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


def story_tr_times(duration):
    n = int((duration - FIRST_TR_TIME) // TR) + 1
    return FIRST_TR_TIME + TR * np.arange(n)


def make_stories(args, vocab, category, clips, rng):
    """The study's stories in order (story00.., val00.., test): {name: audio, word indices, onsets,
    offsets, TR times}. With --story-trs, each train/validation story has exactly that many TRs."""
    n_train = len(args.story_trs) - args.n_val_stories if args.story_trs else args.n_train_stories
    names = ([f"story{i:02d}" for i in range(n_train)]
             + [f"val{i:02d}" for i in range(args.n_val_stories)] + ["test"])
    trs = dict(zip(names, args.story_trs or []))  # exact TR counts, when given
    stories = {}
    for name in names:
        secs = args.test_seconds if name == "test" else args.story_seconds
        if name in trs:  # audio until 1 s past the last TR, then the TR grid cut to the count
            secs = FIRST_TR_TIME + TR * (trs[name] - 1) + 1.0
        audio, idx, on, off = make_story(secs, vocab, category, clips, rng, len(clips))
        tr_times = story_tr_times(len(audio) / SR)[:trs.get(name)]
        stories[name] = dict(audio=audio, idx=idx, on=on, off=off, tr_times=tr_times)
    return stories, n_train


def latent_drives(stories, category, sem_vectors, semantic_dim):
    """Latent drives at 100 Hz, shared by all subjects: acoustics (log-mel) and meaning (the vector
    of the word being heard). Each is put through the HRF and averaged within TRs: {story:
    (acoustic: TRs x bands, semantic: TRs x semantic_dim)}."""
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
        sem = np.zeros((len(grid), semantic_dim))
        for w, a in zip(s["idx"], s["on"]):
            if category[w] >= 0:
                sem[int(a / dt):] = sem_vectors[w] - sem_centre
        drives[name] = (to_trs(aco, dt, s["tr_times"]), to_trs(sem, dt, s["tr_times"]))
    return drives


def noisy(x, noise_sd, rng):
    """x plus AR(1) noise (rho 0.3: fMRI noise is autocorrelated in time) of sd noise_sd per voxel."""
    e = rng.standard_normal(x.shape)
    for t in range(1, len(e)):
        e[t] = 0.3 * e[t - 1] + np.sqrt(1 - 0.09) * e[t]
    return x + e * noise_sd


# ---- from drive to BOLD: the HRF ----

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


# ---- the subjects' voxels ----

def abstract_voxels(args, rng, drives, n_aco):
    """The abstract study (--cortex none): each voxel is auditory (25%), semantic (40%), mixed (20%)
    or noise (15%); 'AC' is the auditory kind and LH/RH are random halves."""
    v = args.n_voxels
    kind = rng.choice(4, size=v, p=[0.25, 0.4, 0.2, 0.15])
    # each subject mixes the shared latents into its voxels its own way
    w_aco = (0.5 + rng.standard_normal((n_aco, v))) * np.isin(kind, [0, 2])
    w_sem = rng.standard_normal((args.semantic_dim, v)) * np.isin(kind, [1, 2])

    sd_sig = signal_sd(lambda n: drives[n][0] @ w_aco / np.sqrt(n_aco) + drives[n][1] @ w_sem, drives)
    noise_sd = np.exp(rng.uniform(*np.log(args.noise_sd), size=v))
    return dict(noise_sd=noise_sd, kind=kind, w_aco=w_aco, w_sem=w_sem, sd=sd_sig)


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
ACOUSTIC_FALLOFF_MM = 12.0   # outside the AC ROI, acoustic amplitude 1/2 exp(-d / 12 mm), d: distance along cortex
SEMANTIC_SHARE = 0.25        # share of cortex in the semantic network (its amplitude > 1/2)
SMOOTH_MM = 15.0             # length scale of the smooth maps (tuning, network, noise)
NOISE_SD = 2.5               # noise sd against a signal amplitude of 1: single-trial r 0.37 at best
# Where the semantic system is (Binder et al. 2009, Cereb Cortex 19:2767, a meta-analysis of 120
# studies; Huth et al. 2016, Nature 532:453, from story listening, "consistent across individuals"):
# lateral temporal cortex, inferior parietal (angular gyrus), medial parietal (precuneus), inferior
# frontal, dorsolateral and medial prefrontal cortex, in both hemispheres. Centres in S1's space (mm,
# x right, y anterior, z superior), placed from S1's own ROI outlines (pycortex: AC at (+-55, 23, -3),
# Broca's area at (+-52, 53, 16), IPS at (+-24, -30, 29), V1 at (+-8, -45, -18)); x mirrored for LH.
SEMANTIC_CENTRES_MM = [(55, 40, -15), (55, 5, -12), (45, -25, 22), (8, -25, 30), (52, 53, 16), (35, 75, 25),
                       (8, 70, 20)]
SEMANTIC_RADIUS_MM = 18.0    # a Gaussian of this sd around each centre
INDIVIDUAL = 0.35            # a subject's own smooth deviation from the study's network (against 1)


def smooth_fields(xyz, rng, n_fields, length_mm, n_waves=256):
    """n_fields random fields over the cortex, each ~N(0, 1) at every voxel and smooth over
    `length_mm` (random Fourier features of a Gaussian kernel on the voxels' positions, in mm)."""
    omega = rng.standard_normal((n_fields, n_waves, 3)) / length_mm
    phase = rng.uniform(0, 2 * np.pi, (n_fields, n_waves))
    return np.stack([np.sqrt(2 / n_waves) * np.cos(xyz @ omega[k].T + phase[k]).sum(1) for k in range(n_fields)])


def study_anatomy(c, rng):
    """What every subject of a study shares on S1's cortex `c`: the acoustic amplitude (1 in the AC
    ROI, half that at its edge and falling with the distance along cortex outside it, so that AC as
    a ROI and AC as the truth agree) and the semantic network (the literature's centres, plus one
    smooth field for the study)."""
    amp_aco = np.where(c["roi_AC"], 1.0, 0.5 * np.exp(-c["dist_AC_mm"] / ACOUSTIC_FALLOFF_MM))
    xyz = c["xyz_mm"]
    centres = np.array([(sign * x, y, z) for x, y, z in SEMANTIC_CENTRES_MM for sign in (1, -1)], np.float64)
    d2 = ((xyz[:, None, :] - centres[None]) ** 2).sum(-1)
    prior = np.exp(-d2 / (2 * SEMANTIC_RADIUS_MM ** 2)).max(1)
    network = prior / prior.std() + 0.5 * smooth_fields(xyz, rng, 1, 2 * SMOOTH_MM)[0]
    return dict(amp_aco=amp_aco, network=network)


def ac_agreement(c, amp_aco):
    """AC as the ROI against AC as the truth (acoustic amplitude above 1/2): (ROI size, truth size,
    Dice overlap)."""
    truth = amp_aco > 0.5
    return int(c["roi_AC"].sum()), int(truth.sum()), float(2 * (truth & c["roi_AC"]).sum() / (truth.sum() + c["roi_AC"].sum()))


def cortex_voxels(args, rng, drives, n_aco, c, shared):
    """Voxels on S1's cortex. Acoustic tuning in AC and, weaker, around it (shared: study_anatomy);
    semantic tuning over the study's network with the subject's own variation (a smooth map covering
    SEMANTIC_SHARE of cortex, weaker inside AC); the tuning itself (which bands, which meanings)
    a mix of a few smooth maps; noise of about equal size everywhere, so that the signal-to-noise
    map follows the two amplitudes: high in AC and the language network, low in most of cortex."""
    amp_aco = shared["amp_aco"]
    net = shared["network"] + INDIVIDUAL * smooth_fields(c["xyz_mm"], rng, 1, 2 * SMOOTH_MM)[0]
    net = 1 / (1 + np.exp(-3 * (net - np.quantile(net, 1 - SEMANTIC_SHARE))))
    amp_sem = net * (1 - 0.8 * amp_aco)  # primary auditory cortex carries sound more than meaning
    maps = smooth_fields(c["xyz_mm"], rng, 4 + 6, SMOOTH_MM)  # 4 acoustic and 6 semantic tuning maps
    w_aco = 0.5 + rng.standard_normal((n_aco, 4)) @ maps[:4] / 2
    w_sem = rng.standard_normal((args.semantic_dim, 6)) @ maps[4:] / np.sqrt(6)
    sd_aco = signal_sd(lambda n: drives[n][0] @ w_aco, drives)
    sd_sem = signal_sd(lambda n: drives[n][1] @ w_sem, drives)
    noise_sd = NOISE_SD * np.exp(0.2 * smooth_fields(c["xyz_mm"], rng, 1, 2 * SMOOTH_MM)[0])
    amp = np.sqrt(amp_aco ** 2 + amp_sem ** 2)
    kind = np.where(amp < 0.15, 3, np.where(amp_aco / np.maximum(amp, 1e-9) > 0.85, 0,
                                            np.where(amp_sem / np.maximum(amp, 1e-9) > 0.85, 1, 2)))
    rois = {"roi_AC": c["roi_AC"], "roi_LH": c["roi_LH"], "roi_RH": c["roi_RH"]}
    return dict(noise_sd=noise_sd, kind=kind, w_aco=w_aco, w_sem=w_sem, amp_aco=amp_aco, amp_sem=amp_sem,
                sd_aco=sd_aco, sd_sem=sd_sem, rois=rois)


# ---- a subject's responses and truth ----

def signal(sim, drives, story):
    """A subject's noise-free response to a story (TRs x voxels): on S1's cortex, each amplitude
    map times its tuned drive at unit sd; in the abstract study, the voxel's mix at unit sd."""
    aco, sem = drives[story]
    if "amp_aco" in sim:
        return sim["amp_aco"] * (aco @ sim["w_aco"]) / sim["sd_aco"] + sim["amp_sem"] * (sem @ sim["w_sem"]) / sim["sd_sem"]
    return (aco @ sim["w_aco"] / np.sqrt(aco.shape[1]) + sem @ sim["w_sem"]) / sim["sd"]


def rois(sim, rng):
    """The subject's ROI masks: S1's (on its cortex); in the abstract study, 'AC' is the auditory
    kind and LH/RH random halves, drawn here (after the noise, in the stream's order)."""
    if "rois" in sim:
        return sim["rois"]
    v = len(sim["kind"])
    order = rng.permutation(v)
    return {"roi_AC": sim["kind"] == 0, "roi_LH": np.isin(np.arange(v), order[:v // 2]),
            "roi_RH": np.isin(np.arange(v), order[v // 2:])}


def subject_truth(subj, sim, drives, test_repeats):
    """What truth.npz keeps of a subject: voxel kinds, tuning, noise, the test story's signal and the
    true ceiling (the expected r between the signal and the mean of test_repeats noisy repeats)."""
    test_signal, noise_sd = signal(sim, drives, "test"), sim["noise_sd"]
    var_s = test_signal.var(0)
    out = {f"{subj}_kind": sim["kind"], f"{subj}_test_signal": test_signal.astype(np.float32),
           f"{subj}_noise_sd": noise_sd, f"{subj}_true_ceiling": np.sqrt(var_s / (var_s + noise_sd ** 2 / test_repeats)),
           f"{subj}_w_acoustic": sim["w_aco"].astype(np.float32), f"{subj}_w_semantic": sim["w_sem"].astype(np.float32)}
    if "amp_aco" in sim:
        out.update({f"{subj}_acoustic_amplitude": sim["amp_aco"].astype(np.float32),
                    f"{subj}_semantic_amplitude": sim["amp_sem"].astype(np.float32)})
    return out


def study_truth(cortex, shared, drives):
    """What truth.npz keeps of the study: the columns sampled and the semantic network (on S1), the
    test story's latent drives."""
    out = {} if cortex is None else dict(columns=cortex["columns"], cortex_source=cortex["source"],
                                         semantic_network=shared["network"])
    return dict(out, test_acoustic_drive=drives["test"][0].astype(np.float32),
                test_semantic_drive=drives["test"][1].astype(np.float32))
