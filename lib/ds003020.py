"""The real dataset, OpenNeuro ds003020 (LeBel et al. 2023), as published: its readers and checks.

Used by stage 01 (--source ds003020), 00_fetch_ds003020.py (its final check) and stage 05 (word
vectors on real data). Readers of the lab's formats (HuthLab/deep-fMRI-dataset): Praat TextGrids
(the word tier), wav, the response .hf5 files, respdict.json (TRs per story), the English1000
embedding; read_subject, one subject's responses checked against the lab's bookkeeping (stage 01
z-scores them and computes the noise ceiling).
"""
import difflib
import json
import os

import numpy as np

from lib.anatomy import import_pycortex
from lib.plumbing import StudyError, load_npz, save_npz
from lib.speech import SR

TR = 2.0  # seconds per volume
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
# Snapshot 3.1.0 (the one assets/ds003020_files.tsv lists) keeps the lab's files in derivative/;
# later snapshots spell it derivatives/ (BIDS). Both are read; derivatives() decides which is there.
DERIVATIVES = ("derivative", "derivatives")


# ---- the lab's file formats ----

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
    from scipy.io import wavfile  # here, not at the top: scipy.io/signal cost every stage ~0.9 s to import
    from scipy.signal import resample_poly
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


def english1000(path, words):
    """The lab's English1000 embedding (derivative/english1000sm.hf5, as its SemanticModel reads it:
    `data` is dimensions x words, `vocab` the words as bytes) for `words`, lower-cased: (the words
    found, their vectors: words x dimensions)."""
    import h5py
    try:
        with h5py.File(path, "r") as f:
            if "data" not in f or "vocab" not in f:
                raise StudyError(f"{path} has no 'data' and 'vocab' datasets (found {sorted(f.keys())}); it is not "
                                 "the English1000 file of ds003020 (derivative/english1000sm.hf5)")
            vocab = [w.decode() if isinstance(w, bytes) else str(w) for w in f["vocab"][...]]
            data = f["data"]
            if data.ndim != 2 or data.shape[1] != len(vocab):
                raise StudyError(f"{path}: 'data' is {data.shape}, expected dimensions x {len(vocab)} words")
            index = {w: i for i, w in enumerate(vocab)}
            found = sorted({w.lower() for w in words} & set(index))
            vectors = np.asarray(data[...], np.float32)[:, [index[w] for w in found]].T if found else np.zeros((0, data.shape[0]), np.float32)
    except OSError as e:
        raise StudyError(f"cannot read {path}: {e}")
    return np.array(found), vectors


def read_word_vectors(path, vocab):
    """Vectors for the words in `vocab` from a GloVe text file (others are not kept in memory)."""
    if not os.path.exists(path):
        raise StudyError(f"--word-vectors {path} not found")
    out = {}
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                parts = line.rstrip().split(" ")
                if parts[0] in vocab:
                    out[parts[0]] = np.array(parts[1:], dtype=np.float32)
    except (UnicodeDecodeError, ValueError) as e:
        raise StudyError(f"{path} line {n} is not 'word number number ...' ({e}); pass a GloVe text file")
    dims = {len(v) for v in out.values()}
    if len(dims) > 1:
        raise StudyError(f"{path}: vectors of different lengths {sorted(dims)}")
    return out


def real_word_vectors(args, vocab):
    """{word: vector} for the semantic probe on real data, and where they came from: --word-vectors
    (GloVe text, or English1000's .hf5 layout), else the English1000 vectors stage 01 extracted."""
    if args.word_vectors and args.word_vectors.endswith((".hf5", ".h5", ".hdf5")):
        found, vectors = english1000(args.word_vectors, vocab)
        return dict(zip(found, vectors)), args.word_vectors
    if args.word_vectors:
        return read_word_vectors(args.word_vectors, vocab), args.word_vectors
    path = os.path.join(args.data, "english1000.npz")
    if not os.path.exists(path):
        raise StudyError(f"no word vectors for the semantic probe: {path} not found (stage 01 writes it when "
                         "the dataset has derivative/english1000sm.hf5); fetch that file and rerun stage 01, or "
                         "pass --word-vectors glove.6B.300d.txt")
    e = load_npz(path)
    return {str(w): v for w, v in zip(e["words"], e["vectors"])}, f"English1000, {path}"


# ---- a dataset root: what is there, which stories ----

def derivatives(root):
    """The dataset's derivatives folder, `derivative/` (snapshot 3.1.0) or `derivatives/` (later
    snapshots): the one place that decides, for every file the stages read (responses, respdict,
    subject_xfms, TextGrids, pycortex-db, English1000). Neither there: derivative/, so messages name
    the published 3.1.0 path."""
    found = [d for d in DERIVATIVES if os.path.isdir(os.path.join(root, d))]
    if len(found) > 1:
        raise StudyError(f"{root} holds both derivative/ and derivatives/ (two snapshots' layouts mixed): keep "
                         "one, or fetch into a new folder")
    return os.path.join(root, found[0] if found else DERIVATIVES[0])


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


def find_ds003020(args):
    """Every file stage 01 reads from a ds003020 root, checked before minutes of reading (also the
    last step of 00_fetch_ds003020.py). Returns (training stories, respdict)."""
    root = args.ds_root
    if not root or not os.path.isdir(root):
        raise StudyError(f"--ds-root {root!r} is not a folder; fetch ds003020 with `python 00_fetch_ds003020.py "
                         "--dest PATH` (or download it) and pass its root (the folder holding derivative/ and stimuli/)")
    deriv = derivatives(root)
    print(f"  derivatives in {os.path.basename(deriv)}/" + (" (the layout after snapshot 3.1.0)"
                                                             if os.path.basename(deriv) == "derivatives" else ""))
    prep = os.path.join(deriv, "preprocessed_data")
    respdict_path = os.path.join(deriv, "respdict.json")
    if not os.path.exists(respdict_path):
        raise StudyError(f"{respdict_path} not found: the TR bookkeeping needs it (it is part of ds003020)")
    respdict = json.load(open(respdict_path))
    for s in args.subjects:
        if not os.path.isdir(os.path.join(prep, s)):
            have = sorted(os.listdir(prep)) if os.path.isdir(prep) else []
            raise StudyError(f"unknown subject {s}: no folder {os.path.join(prep, s)} (found {have})")
    train = choose_stories(args, respdict, respdict_path, prep)
    for st in train + args.val_stories + [args.test_story]:
        for f in (os.path.join(root, "stimuli", f"{st}.wav"), os.path.join(deriv, "TextGrids", f"{st}.TextGrid")):
            if not os.path.exists(f):
                raise StudyError(f"story {st}: {f} not found (every story needs its wav and TextGrid)")
    if args.rois_from_pycortex:
        import_pycortex()
        for s in args.subjects:
            if not os.path.isdir(os.path.join(deriv, "pycortex-db", s)):
                raise StudyError(f"--rois-from-pycortex: {os.path.join(deriv, 'pycortex-db', s)} not found "
                                 f"(fetch {os.path.basename(deriv)}/pycortex-db/{s} of ds003020)")
    return train, respdict


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


# ---- one subject's responses -> its subject file ----

def bad_voxels(resp):
    """(non-finite, constant) voxel masks of a (..., TRs, voxels) response."""
    flat = resp.reshape(-1, resp.shape[-1])
    nonfinite = ~np.isfinite(flat).all(0)
    constant = np.zeros(flat.shape[1], bool)
    ok = ~nonfinite  # std only over finite voxels; no copy of the (GB-sized) array when all are
    constant[ok] = (flat.std(0) if ok.all() else flat[:, ok].std(0)) == 0
    return nonfinite, constant


def read_subject(deriv, s, stories, respdict, test_story):
    """One subject's published responses: ({story: TRs x voxels, the test story's `data` or None},
    the test story's repeats x TRs x voxels or None, voxels with a non-finite value anywhere,
    constant voxels), rows checked against respdict's bookkeeping and voxel counts across stories."""
    resp, repeats, nonfinite, constant = {}, None, False, False
    for st, tr_times in stories.items():
        path = os.path.join(deriv, "preprocessed_data", s, f"{st}.hf5")
        r, reps = read_hf5(path)
        for x in (r, reps):
            if x is not None and x.shape[-2] != len(tr_times):
                raise StudyError(f"{path} has {x.shape[-2]} rows but respdict says {respdict[st]} TRs, "
                                 f"i.e. {len(tr_times)} rows after the lab's trimming of {TRIM_TRS}; "
                                 "the file or derivative/respdict.json is from another version")
            if x is not None:
                bad, const = bad_voxels(x)
                nonfinite, constant = nonfinite | bad, constant | const
        if st != test_story and r is None:
            raise StudyError(f"{path} holds repeats but no averaged 'data'; only the test story may")
        resp[st] = r
        repeats = reps if st == test_story else repeats
    n_vox = {x.shape[-1] for x in list(resp.values()) + [repeats] if x is not None}
    if len(n_vox) != 1:
        raise StudyError(f"subject {s}: stories disagree on the voxel count {sorted(n_vox)}")
    n_vox = n_vox.pop()
    nonfinite = np.broadcast_to(nonfinite, (n_vox,)).copy()
    constant = np.broadcast_to(constant, (n_vox,)) & ~nonfinite
    if nonfinite.any():
        print(f"  note: {s}: {nonfinite.sum()} voxels with NaN set to 0 in every story (flagged in nan_voxels)")
    if constant.any():
        print(f"  note: {s}: {constant.sum()} constant voxels kept as zeros (flagged in constant_voxels)")
    return resp, repeats, nonfinite, constant


def subject_masks(args, s, n_vox, rois, flat):
    """The subject's ROI masks (roi_AC, roi_LH, roi_RH) and flatmap, checked against its voxels."""
    out = {}
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
            raise StudyError(f"the pycortex flatmap of {s} has columns up to {flat[0].max()} but {s} has "
                             f"{n_vox} voxels")
        out["flat_index"], out["flat_extents"] = flat
    return out


def read_story(root, deriv, st):
    """A story's audio (16 kHz) and its words with onsets and offsets (the TextGrid's word tier)."""
    audio = read_wav(os.path.join(root, "stimuli", f"{st}.wav"))
    return (audio, *read_textgrid_words(os.path.join(deriv, "TextGrids", f"{st}.TextGrid")))


def check_length(st, trs, tr_times, audio_s, root):
    """respdict's TR count against the wav: the last response row must fall within the audio."""
    if tr_times[-1] > audio_s + 30:
        raise StudyError(f"story {st}: respdict says {trs} TRs (last row at {tr_times[-1]:.0f} s) but "
                         f"{os.path.join(root, 'stimuli', st + '.wav')} lasts {audio_s:.0f} s; the wav or "
                         "respdict is wrong")


def save_english1000(deriv, out, stories):
    """English1000 vectors of the stories' words into out/english1000.npz (stage 05's semantic
    targets): {"english1000": its fingerprint}, or {} with a note when the dataset lacks the file."""
    e1000 = os.path.join(deriv, "english1000sm.hf5")
    if not os.path.exists(e1000):
        print(f"  note: {e1000} not found: stage 05's semantic probe will need --word-vectors")
        return {}
    words = set(np.concatenate([np.load(os.path.join(out, "stories", f"{st}.npz"))["words"] for st in stories]))
    found, vectors = english1000(e1000, words)
    print(f"  English1000 vectors for {len(found)} of the stories' {len(words)} word types -> english1000.npz")
    return {"english1000": save_npz(os.path.join(out, "english1000.npz"), words=found, vectors=vectors)}
