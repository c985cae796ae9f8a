"""Stage 01: the simulated study and the ds003020 reader, including every bad-input path."""
import argparse
import json
import os
import shutil

import h5py
import numpy as np
import pytest
from scipy.io import wavfile

import common
from lib import anatomy, ds003020, plumbing, speech
from helpers import TINY, fails_cleanly, run_stage, write_textgrid
from lib.study import load_study

STAGE = "01_prepare_data.py"


# --------------------------------------------------------------------------- simulated study

def test_simulated_layout(tiny_study):
    study = plumbing.load_npz(f"{tiny_study}/study.npz")
    assert str(study["source"]) == "simulated" and float(study["tr"]) == 2.0
    assert len(study["train_stories"]) == 3 and len(study["val_stories"]) == 1
    stories = list(study["train_stories"]) + list(study["val_stories"]) + [str(study["test_story"])]
    for st in stories:
        s = plumbing.load_npz(f"{tiny_study}/stories/{st}.npz")
        assert s["audio"].dtype == np.float32 and int(s["sr"]) == 16000
        dur = len(s["audio"]) / 16000
        assert s["tr_times"][0] == 11.0 and np.allclose(np.diff(s["tr_times"]), 2.0)
        assert s["tr_times"][-1] <= dur
        assert len(s["words"]) == len(s["word_onsets"]) == len(s["word_offsets"]) > 10
        assert np.all(s["word_offsets"] > s["word_onsets"]) and s["word_offsets"][-1] <= dur
        assert np.all(np.diff(s["word_onsets"]) > 0)
        # speech is really there: words are loud, the gaps before them quiet
        on = (s["word_onsets"][:5] * 16000).astype(int)
        assert all(np.abs(s["audio"][o:o + 1600]).max() > 0.05 for o in on)
    for subj in study["subjects"]:
        d = plumbing.load_npz(f"{tiny_study}/subjects/{subj}.npz")
        for st in study["train_stories"]:
            n_tr = len(plumbing.load_npz(f"{tiny_study}/stories/{st}.npz")["tr_times"])
            r = d[f"resp_{st}"]
            assert r.shape == (n_tr, 60) and r.dtype == np.float32
            np.testing.assert_allclose(r.mean(0), 0, atol=1e-5)
        assert d["test_repeats"].shape[0] == 10 and d["test_repeats"].shape[1:] == d["test_resp"].shape
        assert d["noise_ceiling"].shape == (60,)
        assert not np.any(d["roi_LH"] & d["roi_RH"]) and np.all(d["roi_LH"] | d["roi_RH"])
    truth = plumbing.load_npz(f"{tiny_study}/truth.npz")
    kind = truth[f"{study['subjects'][0]}_kind"]
    d = plumbing.load_npz(f"{tiny_study}/subjects/{study['subjects'][0]}.npz")
    np.testing.assert_array_equal(d["roi_AC"], kind == list(truth["kind_names"]).index("auditory"))
    assert truth["semantic_vectors"].shape == (len(truth["vocab"]), 16)
    # function words carry no meaning; content words sit near their category's centroid
    assert np.all(truth["semantic_vectors"][truth["vocab_category"] < 0] == 0)


def test_rebuilding_says_what_it_replaces_and_keeps_the_feature_caches(tiny_study, tmp_path, capsys):
    """Stage 01 over an existing study: the same flags keep every fingerprint (results stay valid),
    other noise changes only the subjects' fingerprints, and data/features/ survives both."""
    data = str(tmp_path / "data")
    shutil.copytree(tiny_study, data)
    cache = tmp_path / "data" / "features" / "some-model" / "story00.npz"
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"cached")
    before = load_study(data)
    capsys.readouterr()
    assert run_stage(STAGE, ["--data", data] + TINY) == 0
    assert "every subject identical, so existing results stay valid" in capsys.readouterr().out
    same = load_study(data)
    assert same["stories_fingerprint"] == before["stories_fingerprint"]
    assert same["subject_fingerprints"] == before["subject_fingerprints"] and cache.read_bytes() == b"cached"
    assert run_stage(STAGE, ["--data", data] + TINY + ["--noise-sd", "1.5", "3.0"]) == 0
    assert "the same stories; subjects sim01, sim02 differ" in capsys.readouterr().out
    noisier = load_study(data)
    assert noisier["stories_fingerprint"] == before["stories_fingerprint"]
    assert all(noisier["subject_fingerprints"][s] != before["subject_fingerprints"][s] for s in ("sim01", "sim02"))
    assert run_stage(STAGE, ["--data", data] + TINY[:-1] + ["4"]) == 0  # another seed: other stories
    assert "with another study (its stories or splits differ)" in capsys.readouterr().out
    assert load_study(data)["stories_fingerprint"] != before["stories_fingerprint"]
    assert cache.read_bytes() == b"cached" and not os.path.exists(data + ".old")


def test_the_fingerprints_are_of_the_files_contents(tiny_study):
    """save_npz's fingerprint covers names, dtypes, shapes and bytes: study.npz's record of a
    subject equals a fresh hash of that subject's file, and one changed value changes it."""
    import hashlib
    study = load_study(tiny_study)

    def fingerprint(d):
        h = hashlib.sha1()
        for k, v in d.items():
            h.update(f"{k} {v.dtype.str} {v.shape}".encode())
            h.update(np.ascontiguousarray(v).reshape(-1).view(np.uint8))
        return h.hexdigest()[:16]
    d = dict(np.load(f"{tiny_study}/subjects/sim01.npz", allow_pickle=False))
    assert fingerprint(d) == study["subject_fingerprints"]["sim01"]
    d["test_resp"] = d["test_resp"].copy()
    d["test_resp"][0, 0] += 1e-3
    assert fingerprint(d) != study["subject_fingerprints"]["sim01"]


def test_every_voice_speaks_the_same_audio_at_another_time():
    """Some espeak-ng variants (en-us+f3 among them) add noise seeded from the clock: same seed,
    other audio a second later. Every voice the study may use must be free of it."""
    import time
    first = speech.synthesize_all(["dog", "rainbow"], speech.VOICES, 170)
    time.sleep(1.1)
    again = speech.synthesize_all(["dog", "rainbow"], speech.VOICES, 170)
    for voice, a, b in zip(speech.VOICES, first, again):
        assert all(np.array_equal(x, y) for x, y in zip(a, b)), voice


def test_simulated_signals_come_from_their_drives(tiny_study):
    """Auditory voxels follow the acoustic drive, semantic voxels the semantic drive (the truth)."""
    truth = plumbing.load_npz(f"{tiny_study}/truth.npz")
    subj = truth["subjects"][0]
    kind, sig = truth[f"{subj}_kind"], truth[f"{subj}_test_signal"]
    aco = truth["test_acoustic_drive"] @ truth[f"{subj}_w_acoustic"]
    sem = truth["test_semantic_drive"] @ truth[f"{subj}_w_semantic"]
    aud = kind == 0
    assert np.all(common.pearson_r(aco[:, aud], sig[:, aud]) > 0.99)
    semv = kind == 1
    assert np.all(common.pearson_r(sem[:, semv], sig[:, semv]) > 0.99)
    assert np.all(sig[:, kind == 3] == 0)


def test_simulated_same_seed_same_files(tiny_study, tmp_path):
    other = str(tmp_path / "again")
    assert run_stage(STAGE, ["--data", other] + TINY) == 0
    for rel in ["study.npz", "truth.npz", "stories/story00.npz", "subjects/sim01.npz"]:
        a, b = plumbing.load_npz(f"{tiny_study}/{rel}"), plumbing.load_npz(f"{other}/{rel}")
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{rel}:{k}")
    changed = str(tmp_path / "seed4")
    assert run_stage(STAGE, ["--data", changed] + TINY[:-1] + ["4"]) == 0
    assert not np.array_equal(plumbing.load_npz(f"{changed}/subjects/sim01.npz")["test_resp"],
                              plumbing.load_npz(f"{tiny_study}/subjects/sim01.npz")["test_resp"])


def test_reuse_links_the_study_these_settings_and_this_code_build(default_study, tmp_path, capsys):
    """--reuse DIR (make quick): the default study (whose voxel count stage 01 fills in from its
    other flags) is linked, not rebuilt, by the same command with another --data; another setting
    builds anew."""
    quick = str(tmp_path / "quick")
    assert run_stage(STAGE, ["--data", quick, "--reuse", default_study]) == 0
    assert "linked into" in capsys.readouterr().out
    for rel in ["study.npz", "subjects/sim01.npz", "stories/test.npz"]:
        assert os.path.samefile(f"{quick}/{rel}", f"{default_study}/{rel}")  # hard links: no copy, no rebuild
    assert run_stage(STAGE, ["--data", quick, "--reuse", default_study]) == 0
    assert "nothing to do" in capsys.readouterr().out
    other = str(tmp_path / "other")
    assert run_stage(STAGE, ["--data", other, "--reuse", default_study, "--n-subjects", "1", "--n-voxels", "500"]) == 0
    assert "building the simulated study" in capsys.readouterr().out and not os.path.samefile(
        f"{other}/stories/test.npz", f"{default_study}/stories/test.npz")


def test_a_small_study_on_s1_keeps_five_ac_columns_whatever_the_seed():
    """--n-voxels 60 on S1: AC is 1.5% of cortex, so a uniform sample holds 0.9 AC columns on
    average, too few for stages 03-05 to tune and score on AC. For every seed the sample keeps
    anatomy.MIN_AC (5) of them: the uniform sample when it holds that many, else a stratified one
    (exactly MIN_AC from AC, the rest from outside it); 60 distinct columns in order, their ROIs
    S1's, either way."""
    assert anatomy.MIN_AC == 5
    ac = plumbing.load_npz(os.path.join(anatomy.ASSETS, "s1_cortex.npz"))["roi_AC"]
    stratified = 0
    for n, seed in [(60, seed) for seed in range(12)] + [(2000, 0)]:
        c = anatomy.cortex_sample(argparse.Namespace(n_voxels=n), np.random.default_rng(seed))
        columns = c["columns"]
        assert len(columns) == n and np.all(np.diff(columns) > 0), seed
        np.testing.assert_array_equal(c["roi_AC"], ac[columns])
        uniform = np.sort(np.random.default_rng(seed).choice(len(ac), n, replace=False))
        if ac[uniform].sum() >= anatomy.MIN_AC:
            np.testing.assert_array_equal(columns, uniform)
        else:
            stratified += 1
            assert ac[columns].sum() == anatomy.MIN_AC, (seed, ac[columns].sum())
    assert stratified >= 10  # most 60-column draws: none or a few AC columns (2,000 hold ~30: uniform)


# --------------------------------------------------------------------------- ds003020 fixture

TRAIN = ["alpha", "beta"]
VAL = ["fromboyhoodtofatherhood", "waitingtogo"]  # stage 01's default validation stories
TEST = "wheretheressmoke"
R = 40  # respdict TRs -> 20 response rows, at 11, 13, ..., 49 s


def envelope(t, phase):
    return 1 + 0.8 * np.sin(2 * np.pi * t / 9.0 + phase)


def make_ds(root, subjects=("UTS01", "UTS02"), n_vox=30, seed=0):
    """A miniature ds003020 in the exact layout: hf5 responses, 44.1 kHz stereo wavs, TextGrids,
    respdict.json. Voxel 0 of every story follows the sound's loudness at 2*i + 11 s."""
    rng = np.random.default_rng(seed)
    os.makedirs(f"{root}/stimuli")
    os.makedirs(f"{root}/derivative/TextGrids")
    stories = TRAIN + VAL + [TEST]
    json.dump({s: R for s in stories}, open(f"{root}/derivative/respdict.json", "w"))
    phases = {s: rng.uniform(0, 2 * np.pi) for s in stories}
    dur = 2 * R - 20
    for s in stories:
        t = np.arange(int(dur * 44100)) / 44100
        x = rng.standard_normal((len(t), 2)) * 0.1 * envelope(t, phases[s])[:, None]
        wavfile.write(f"{root}/stimuli/{s}.wav", 44100, (x * 32767 / 0.6).clip(-32767, 32767).astype(np.int16))
        write_textgrid(f"{root}/derivative/TextGrids/{s}.TextGrid",
                       ["{LG}", "hello", "sp", "world", "br", "again"] * 3, dur)
    rows = R - 20
    for subj in subjects:
        os.makedirs(f"{root}/derivative/preprocessed_data/{subj}")
        for s in stories:
            resp = rng.standard_normal((rows, n_vox)).astype(np.float32)
            resp[:, 0] = envelope(11.0 + 2.0 * np.arange(rows), phases[s])
            key = "resp" if s == "beta" else "data"  # the lab's files use either name
            if s == TEST:
                resp = np.stack([resp + 0.1 * rng.standard_normal(resp.shape) for _ in range(3)])
            with h5py.File(f"{root}/derivative/preprocessed_data/{subj}/{s}.hf5", "w") as f:
                f.create_dataset(key, data=resp.astype(np.float32))
    return root


@pytest.fixture(scope="module")
def ds_made_once(tmp_path_factory):
    return make_ds(str(tmp_path_factory.mktemp("ds_once") / "ds003020"))


@pytest.fixture
def ds(ds_made_once, tmp_path):
    """A fresh copy for each test (the bad-input tests damage theirs): writing 44.1 kHz stereo noise
    for five stories costs 0.6 s, the copy a few hundredths."""
    return shutil.copytree(ds_made_once, str(tmp_path / "ds003020"))


def run_ds(ds, out, *extra):
    return run_stage(STAGE, ["--source", "ds003020", "--ds-root", ds, "--data", out,
                             "--subjects", "UTS01", "UTS02", *extra])


def test_ds003020_rows_line_up_with_the_audio(ds, tmp_path):
    out = str(tmp_path / "data")
    assert run_ds(ds, out) == 0
    study = plumbing.load_npz(f"{out}/study.npz")
    assert str(study["source"]) == "ds003020"
    assert list(study["train_stories"]) == TRAIN and list(study["val_stories"]) == VAL
    assert str(study["test_story"]) == TEST
    for s in TRAIN + VAL + [TEST]:
        st = plumbing.load_npz(f"{out}/stories/{s}.npz")
        assert int(st["sr"]) == 16000 and st["audio"].ndim == 1
        assert abs(len(st["audio"]) / 16000 - (2 * R - 20)) < 0.01
        np.testing.assert_allclose(st["tr_times"], 11.0 + 2.0 * np.arange(R - 20))
        assert list(st["words"]) == ["hello", "world", "again"] * 3  # fillers dropped
        # loudness of the prepared 16 kHz audio around each TR time tracks voxel 0 row for row
        a = st["audio"]
        loud = np.array([np.sqrt(np.mean(a[int((t - 0.5) * 16000):int((t + 0.5) * 16000)] ** 2))
                         for t in st["tr_times"]])
        resp = plumbing.load_npz(f"{out}/subjects/UTS01.npz")
        y = resp["test_resp"] if s == TEST else resp[f"resp_{s}"]
        assert np.corrcoef(loud, y[:, 0])[0, 1] > 0.95
        assert np.corrcoef(loud[1:], y[:-1, 0])[0, 1] < 0.9  # one TR off would show
    d = plumbing.load_npz(f"{out}/subjects/UTS02.npz")
    assert d["test_repeats"].shape == (3, R - 20, 30)
    assert d["noise_ceiling"].shape == (30,) and d["noise_ceiling"][0] > 0.9
    assert "roi_AC" not in d  # no --roi-file: masks are never invented


def test_ds003020_roi_file(ds, tmp_path):
    rois = {f"{s}_{r}": np.arange(30) % 3 == i for s in ("UTS01", "UTS02") for i, r in enumerate(["AC", "LH", "RH"])}
    np.savez(tmp_path / "masks.npz", **rois)
    out = str(tmp_path / "data")
    assert run_ds(ds, out, "--roi-file", str(tmp_path / "masks.npz")) == 0
    d = plumbing.load_npz(f"{out}/subjects/UTS01.npz")
    np.testing.assert_array_equal(d["roi_AC"], rois["UTS01_AC"])
    np.savez(tmp_path / "bad.npz", UTS01_AC=np.ones(7, bool))
    assert run_ds(ds, str(tmp_path / "d2"), "--roi-file", str(tmp_path / "bad.npz")) == 1


def test_ds003020_constant_voxels_flagged(ds, tmp_path, capsys):
    for s in TRAIN:
        p = f"{ds}/derivative/preprocessed_data/UTS01/{s}.hf5"
        with h5py.File(p, "a") as f:
            key = "resp" if "resp" in f else "data"
            d = f[key][...]
            d[:, 5] = 3.0
            f[key][...] = d
    out = str(tmp_path / "data")
    assert run_ds(ds, out) == 0
    d = plumbing.load_npz(f"{out}/subjects/UTS01.npz")
    assert d["constant_voxels"].sum() == 1 and d["constant_voxels"][5]
    assert np.all(d["resp_alpha"][:, 5] == 0)
    assert "1 constant voxels" in capsys.readouterr().out


def _break(ds, what):
    sub = f"{ds}/derivative/preprocessed_data/UTS01"
    if what == "no_root":
        return "/nonexistent/ds003020", "is not a folder"
    if what == "no_textgrid":
        os.remove(f"{ds}/derivative/TextGrids/alpha.TextGrid")
        return ds, "alpha.TextGrid not found"
    if what == "no_wav":
        os.remove(f"{ds}/stimuli/beta.wav")
        return ds, "beta.wav not found"
    if what == "bad_key":
        with h5py.File(f"{sub}/alpha.hf5", "w") as f:
            f.create_dataset("bold", data=np.zeros((R - 20, 30), np.float32))
        return ds, "no 'data' or 'resp'"
    if what == "rows":
        with h5py.File(f"{sub}/alpha.hf5", "w") as f:
            f.create_dataset("data", data=np.ones((R - 19, 30), np.float32))
        return ds, "has 21 rows but respdict says 40 TRs"
    if what == "nan_audio":
        rate, x = wavfile.read(f"{ds}/stimuli/beta.wav")
        x = x.astype(np.float32) / 32767
        x[1000] = np.nan
        wavfile.write(f"{ds}/stimuli/beta.wav", rate, x)
        return ds, "beta.wav holds NaN or infinite samples"
    if what == "no_respdict":
        os.remove(f"{ds}/derivative/respdict.json")
        return ds, "respdict.json not found"
    if what == "missing_val":
        os.remove(f"{sub}/waitingtogo.hf5")
        return ds, "--val-stories 'waitingtogo' has no response file for UTS01"


@pytest.mark.parametrize("what", ["no_root", "no_textgrid", "no_wav", "bad_key", "rows", "nan_audio",
                                  "no_respdict", "missing_val"])
def test_ds003020_bad_input_is_one_clear_error_and_nothing_written(ds, tmp_path, capsys, what):
    out = str(tmp_path / "data")
    assert run_ds(ds, out) == 0  # a good study already there must survive a failed rebuild
    before = plumbing.load_npz(f"{out}/subjects/UTS01.npz")["resp_alpha"]
    root, msg = _break(ds, what)
    capsys.readouterr()
    code = run_stage(STAGE, ["--source", "ds003020", "--ds-root", root, "--data", out,
                             "--subjects", "UTS01", "UTS02"])
    err = capsys.readouterr().err
    assert code == 1
    assert msg in err and err.startswith("error:") and len(err.strip().splitlines()) == 1
    np.testing.assert_array_equal(plumbing.load_npz(f"{out}/subjects/UTS01.npz")["resp_alpha"], before)
    assert not os.path.exists(out + ".tmp_build")


def test_ds003020_unknown_subject(ds, tmp_path, capsys):
    out = str(tmp_path / "data")
    assert run_stage(STAGE, ["--source", "ds003020", "--ds-root", ds, "--data", out, "--subjects", "UTS09"]) == 1
    assert "unknown subject UTS09" in capsys.readouterr().err
    assert not os.path.exists(out)


@pytest.mark.parametrize("flags, msg", [
    (["--n-voxels", "-3", "--cortex", "none"], "--n-voxels -3 is out of range: it must be >= 2"),
    (["--n-voxels", "90000"], "--n-voxels 90000 is out of range: it must be 2..80615 (the columns of S1's cortex)"),
    (["--story-seconds", "1"], "--story-seconds 1 is out of range: it must be >= 31"),
    (["--test-seconds", "5"], "--test-seconds 5 is out of range: it must be >= 31"),
    (["--n-subjects", "0"], "--n-subjects 0 is out of range: it must be >= 1"),
    (["--n-train-stories", "0"], "--n-train-stories 0 is out of range: it must be >= 1"),
    (["--rate", "0"], "--rate 0 is out of range: it must be 80..450 words per minute"),
    (["--n-categories", "99"], "--n-categories 99 is out of range: it must be 1..10"),
    (["--test-repeats", "1"], "--test-repeats 1 is out of range: it must be >= 2"),
    (["--n-voxels", "many"], "argument --n-voxels: invalid int value: 'many'"),
    (["--source", "ds0030"], "argument --source: invalid choice: 'ds0030'"),
])
def test_simulated_bad_flags_are_one_line_and_write_nothing(tiny_study, tmp_path, capsys, flags, msg):
    out = str(tmp_path / "data")
    shutil.copytree(tiny_study, out)
    fails_cleanly(STAGE, ["--data", out] + flags, capsys, msg, str(tmp_path))


@pytest.mark.parametrize("text, filler", [("{ LG }", True), ("{lg}", True), (" sp ", True), ("SP", True),
                                          ("", True), ("{BR}", True), ("lg2", False), ("Hello", False),
                                          ("sport", False)])
def test_filler_rule_is_the_labs(text, filler):
    assert ds003020.is_filler(text) is filler


def test_val_story_not_in_ds003020_names_the_closest(ds, tmp_path, capsys):
    out = str(tmp_path / "data")
    assert run_ds(ds, out, "--val-stories", "fromboyhoodtofatherhod") == 1
    err = capsys.readouterr().err
    assert "fromboyhoodtofatherhod" in err and "closest: fromboyhoodtofatherhood" in err
    assert len(err.strip().splitlines()) == 1 and not os.path.exists(out)


def test_masks_from_volumes_follow_the_thick_mask_order_and_split_hemispheres():
    """The pycortex-free half of --rois-from-pycortex: volume masks -> masks over the data's columns."""
    rng = np.random.default_rng(0)
    thick = rng.random((4, 6, 10)) < 0.5  # (z, y, x); the data's columns are its true voxels in C order
    ac = np.zeros(thick.shape, bool)
    ac[:, :, 2] = True
    lh, rh = np.zeros(thick.shape, bool), np.zeros(thick.shape, bool)
    lh[:, :, 0], rh[:, :, 9] = True, True  # hemisphere-surface voxels at either side
    masks = anatomy.masks_from_volumes(thick, {"AC": ac}, lh, rh)
    cols = np.argwhere(thick)
    assert all(len(v) == thick.sum() for v in masks.values())
    np.testing.assert_array_equal(masks["AC"], cols[:, 2] == 2)
    np.testing.assert_array_equal(masks["LH"], cols[:, 2] < 4.5)  # nearer x = 0 than x = 9
    np.testing.assert_array_equal(masks["RH"], ~masks["LH"])


def test_rois_from_pycortex_without_pycortex_is_one_line(ds, tmp_path, capsys, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "cortex", None)  # as if not installed
    out = str(tmp_path / "data")
    assert run_ds(ds, out, "--rois-from-pycortex") == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert "pip install" in err and "--roi-file" in err and not os.path.exists(out)


# --------------------------------------------------------------------------- the published layout

REAL_RESPDICT = os.path.join(os.path.dirname(__file__), "fixtures", "ds003020_respdict.json")
PUB_TRAIN = ["sweetaspie", "againstthewind", "myfathershands"]  # the three shortest stories


def make_published_ds(root, seed=0):
    """ds003020 as published, in miniature: the real 84-story respdict.json, six stories with files
    at their real lengths (rows = respdict - 20), a test file with `data` (the published mean, not
    exactly the mean of the repeats) and 10 `individual_repeats`, UTS02 without one story and with
    another voxel count, a NaN voxel in UTS01, and "{ LG }" in a TextGrid."""
    rng = np.random.default_rng(seed)
    respdict = json.load(open(REAL_RESPDICT))
    os.makedirs(f"{root}/stimuli")
    os.makedirs(f"{root}/derivative/TextGrids")
    shutil.copy(REAL_RESPDICT, f"{root}/derivative/respdict.json")
    stories = PUB_TRAIN + VAL + [TEST]
    for s in stories:
        dur = 2 * respdict[s] - 20
        wavfile.write(f"{root}/stimuli/{s}.wav", 8000, (rng.standard_normal(dur * 8000) * 3000).astype(np.int16))
        write_textgrid(f"{root}/derivative/TextGrids/{s}.TextGrid", ["{ LG }", "so", " sp ", "it", "{lg}"] * 4, dur)
    n_vox = {"UTS01": 30, "UTS02": 25}
    for subj, v in n_vox.items():
        os.makedirs(f"{root}/derivative/preprocessed_data/{subj}")
        for s in stories:
            if subj == "UTS02" and s == "myfathershands":
                continue
            rows = respdict[s] - 20
            signal = rng.standard_normal((rows, v)).astype(np.float32)
            with h5py.File(f"{root}/derivative/preprocessed_data/{subj}/{s}.hf5", "w") as f:
                if s == TEST:
                    noise = rng.standard_normal((10, rows, v)) * np.linspace(0.3, 3, v)
                    reps = (signal + noise).astype(np.float32)
                    f.create_dataset("data", data=(reps.mean(0) + 0.05 * rng.standard_normal((rows, v))).astype(np.float32))
                    f.create_dataset("individual_repeats", data=reps)
                else:
                    if subj == "UTS01" and s == "sweetaspie":
                        signal[3:9, 7] = np.nan
                    f.create_dataset("data", data=signal)
    return root, respdict, n_vox


def test_published_layout_builds_with_the_default_flags(tmp_path, capsys):
    root, respdict, n_vox = make_published_ds(str(tmp_path / "ds003020"))
    out = str(tmp_path / "data")
    assert run_stage(STAGE, ["--source", "ds003020", "--ds-root", root, "--data", out,
                             "--subjects", "UTS01", "UTS02"]) == 0
    printed = capsys.readouterr().out
    study = plumbing.load_npz(f"{out}/study.npz")
    assert list(study["val_stories"]) == VAL and str(study["test_story"]) == TEST
    assert sorted(study["train_stories"]) == ["againstthewind", "sweetaspie"]  # UTS02 lacks myfathershands
    assert "1 story of UTS01 left out" in printed and "myfathershands" in printed
    for s in ["againstthewind", "sweetaspie"] + VAL + [TEST]:
        st = plumbing.load_npz(f"{out}/stories/{s}.npz")
        assert len(st["tr_times"]) == respdict[s] - 20
        assert list(st["words"]) == ["so", "it"] * 4  # "{ LG }", " sp ", "{lg}" dropped
    with h5py.File(f"{root}/derivative/preprocessed_data/UTS01/{TEST}.hf5", "r") as f:
        published, reps = f["data"][...], f["individual_repeats"][...]
    d = plumbing.load_npz(f"{out}/subjects/UTS01.npz")
    # the test story: repeats from individual_repeats, test_resp from the published mean
    np.testing.assert_array_equal(d["test_repeats"][..., :7], reps[..., :7])
    np.testing.assert_allclose(d["test_resp"][:, :7], common.zscore(published)[:, :7], atol=1e-6)
    assert np.all(np.isfinite(d["noise_ceiling"]))
    np.testing.assert_allclose(d["noise_ceiling"], common.noise_ceiling(d["test_repeats"]), atol=1e-6)
    ok = np.arange(30) != 7
    np.testing.assert_allclose(d["noise_ceiling"][ok], common.noise_ceiling(reps)[ok], atol=1e-6)
    assert d["noise_ceiling"][ok].mean() > 0.3
    assert "individual_repeats: max |difference|" in printed
    # the NaN voxel: zero in every story, flagged, counted
    assert d["nan_voxels"].sum() == 1 and d["nan_voxels"][7] and not d["constant_voxels"].any()
    for k in ("resp_againstthewind", "resp_sweetaspie", "test_resp"):
        assert np.all(d[k][:, 7] == 0) and np.all(np.isfinite(d[k]))
    assert np.all(d["test_repeats"][..., 7] == 0) and d["noise_ceiling"][7] == 0
    assert "UTS01: 1 voxels with NaN set to 0" in printed
    e = plumbing.load_npz(f"{out}/subjects/UTS02.npz")
    assert e["test_resp"].shape == (respdict[TEST] - 20, n_vox["UTS02"]) and not e["nan_voxels"].any()


def test_the_later_layout_derivatives_builds_the_same_study(tmp_path, capsys):
    """Snapshots after 3.1.0 spell the folder derivatives/ (BIDS): stage 01 reads responses,
    respdict, TextGrids (and English1000, subject_xfms, pycortex-db: lib/ds003020.derivatives) from
    either spelling, says which it found, and builds the same study; both at once is refused."""
    old, _, _ = make_published_ds(str(tmp_path / "old"))
    new, _, _ = make_published_ds(str(tmp_path / "new"))
    os.rename(f"{new}/derivative", f"{new}/derivatives")
    for root, out in ((old, "d_old"), (new, "d_new")):
        assert run_stage(STAGE, ["--source", "ds003020", "--ds-root", root, "--data", str(tmp_path / out),
                                 "--subjects", "UTS01", "UTS02"]) == 0
        printed = capsys.readouterr().out
        assert ("derivatives in derivatives/ (the layout after snapshot 3.1.0)" in printed) == (root == new)
    for rel in ["study.npz", "subjects/UTS01.npz", "subjects/UTS02.npz", "stories/wheretheressmoke.npz"]:
        a, b = plumbing.load_npz(f"{tmp_path}/d_old/{rel}"), plumbing.load_npz(f"{tmp_path}/d_new/{rel}")
        assert a.keys() == b.keys()
        for k in a:
            if k == "provenance":  # how it was built: the same but for --ds-root, the path typed
                pa, pb = json.loads(str(a[k])), json.loads(str(b[k]))
                assert {x for x in pa["settings"] if pa["settings"][x] != pb["settings"][x]} == {"ds_root"}
                continue
            assert np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f"), (rel, k)
    shutil.copytree(f"{new}/derivatives", f"{new}/derivative")
    fails_cleanly(STAGE, ["--source", "ds003020", "--ds-root", new, "--data", str(tmp_path / "d3"),
                          "--subjects", "UTS01"], capsys, "holds both derivative/ and derivatives/", str(tmp_path / "d3"))


def test_published_test_file_without_repeats_gives_a_nan_ceiling(tmp_path, capsys):
    root, respdict, _ = make_published_ds(str(tmp_path / "ds003020"))
    path = f"{root}/derivative/preprocessed_data/UTS02/{TEST}.hf5"
    with h5py.File(path, "a") as f:
        del f["individual_repeats"]
    out = str(tmp_path / "data")
    assert run_stage(STAGE, ["--source", "ds003020", "--ds-root", root, "--data", out,
                             "--subjects", "UTS01", "UTS02"]) == 0
    assert "noise_ceiling is NaN for UTS02" in capsys.readouterr().out
    e = plumbing.load_npz(f"{out}/subjects/UTS02.npz")
    assert np.all(np.isnan(e["noise_ceiling"])) and "test_repeats" not in e
