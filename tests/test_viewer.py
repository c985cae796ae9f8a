"""viewer.py: every result on the brain in pycortex's WebGL viewer, checked in a real browser.

A small study on S1 (2 subjects, 2,000 of S1's 80,615 cortical voxels, short stories) through
stages 02-04 at one epoch; its maps must hold the result files' numbers at their voxels of S1 (read
from assets/s1_cortex.npz, not from the viewer's own mapping). The viewer pycortex writes is served
on 127.0.0.1 and opened by headless Chromium with software WebGL (lib/browser.py): no JavaScript
error on the console but the known ones named below, the brain drawn, two maps two pictures. The
screenshots stay in the test's temp folder. Outside CI, the browser test skips where Chromium is
not installed (`apt-get install chromium`; .ci/run installs it)."""
import argparse
import json
import os
import shutil

import numpy as np
import pytest

from helpers import ROOT, fails_cleanly, one, run_stage
from lib import anatomy, browser, inputs, plumbing
from lib.plumbing import StudyError
from lib.study import load_study, load_subject

pytest.importorskip("cortex", reason="pycortex is not installed (make pycortex builds it): the viewer is pycortex's")

STUDY = ["--cortex", "S1", "--n-subjects", "2", "--n-voxels", "2000", "--n-train-stories", "3", "--n-val-stories", "1",
         "--story-seconds", "60", "--test-seconds", "60", "--seed", "3"]
FAST = ["--epochs", "1", "--block-trs", "16", "--lr-adapter", "3e-3", "--lr-readout", "1e-3"]
# the maps in the viewer's order: it opens on sim01's whole-cortex run, then every map stage by stage
MAPS = ["sim01: gain of whole LoRA, seed 0",
        "sim01: test r of the untuned model, layer 1",
        "sim01: gain of AC LoRA, seed 0, from sim01's whole run",
        "sim01: change over its start run, AC LoRA, seed 0, from sim01's whole run",
        "sim01: gain from sim02's model (whole LoRA, seed 0)",
        "sim02: test r of the untuned model, layer 1",
        "sim02: gain of whole LoRA, seed 0",
        "sim02: gain from sim01's model (whole LoRA, seed 0)"]
# what pycortex's page logs as errors that say nothing about the viewer: every other error fails
KNOWN = {"WebSocket connection to 'ws://127.0.0.1:6437/": "pycortex's Leap Motion hook (template.html) looks for "
         "a Leap Motion controller's server on its port",
         "404 (File not found) [http://127.0.0.1:": "the browser asks for /favicon.ico, which the viewer has not got"}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The study, stage 02 for both subjects, whole-cortex LoRA for both, AC LoRA for sim01 started
    from its whole-cortex run (one epoch each), stage 04; then the viewer (results/viewer)."""
    base = tmp_path_factory.mktemp("viewer")
    data, results, ckpt = str(base / "data"), str(base / "results"), str(base / "ckpt")
    io = ["--data", data, "--results", results]
    assert run_stage("01_prepare_data.py", ["--data", data] + STUDY) == 0
    assert run_stage("02_baseline_ridge.py", io + ["--layers", "1", "--context-s", "4", "--stride-s", "2",
                                                   "--alphas", "3", "3000", "--n-folds", "4"]) == 0
    assert run_stage("03_finetune_lora.py", io + ["--checkpoints", ckpt, "--subject", "sim01", "sim02"] + FAST) == 0
    assert run_stage("03_finetune_lora.py", io + ["--checkpoints", ckpt, "--subject", "sim01", "--roi", "AC",
                                                  "--init-from", "whole"] + FAST) == 0
    assert run_stage("04_cross_subject.py", io + ["--checkpoints", ckpt]) == 0
    assert run_stage("viewer.py", io) == 0
    return data, results


def test_every_result_is_a_map_at_its_voxels_of_s1(made, tmp_path, monkeypatch):
    """Each map holds its result's numbers at its voxels' places in S1's volume (the asset's voxel
    coordinates), NaN (blank) everywhere else, in the look its kind asks for."""
    data, results = made
    views = {}
    monkeypatch.setattr(anatomy, "write_viewer", lambda out, v, db, title: views.update(v))
    assert run_stage("viewer.py", ["--data", data, "--results", results, "--out", str(tmp_path / "v")]) == 0
    assert list(views) == MAPS
    columns = plumbing.load_npz(os.path.join(data, "truth.npz"))["columns"]
    x, y, z = plumbing.load_npz(os.path.join(ROOT, "assets", "s1_cortex.npz"))["ijk"][columns].T.astype(int)
    whole = plumbing.load_npz(one(f"{results}/03_sim01_whole_lora_seed0_*.npz"))
    ac = plumbing.load_npz(one(f"{results}/03_sim01_AC_lora_seed0_*_from_*.npz"))
    cross = plumbing.load_npz(one(f"{results}/04_cross_subject_*.npz"))
    expected = {MAPS[0]: whole["test_r_tuned"] - whole["test_r_untuned"],
                MAPS[1]: plumbing.load_npz(one(f"{results}/02_baseline_sim01_*.npz"))["test_r"],
                MAPS[3]: ac["test_r_tuned"] - whole["test_r_tuned"],
                MAPS[7]: cross["delta_r_sim01_on_sim02"]}
    for name, values in expected.items():
        vol = views[name].data  # (z, y, x), as pycortex takes a volume
        np.testing.assert_allclose(vol[z, y, x], values, rtol=1e-6, err_msg=name)
        assert np.isnan(vol).sum() == vol.size - len(columns), name
    for name, view in views.items():
        if "test r" in name:
            assert view.cmap == "inferno" and view.vmin == 0 < view.vmax, name
        else:  # a difference: diverging, centred on 0
            assert view.cmap == "RdBu_r" and view.vmin == -view.vmax < 0, name
        assert view.description.startswith(("02_", "03_", "04_")), view.description


def need_chromium():
    if os.environ.get("CHROMIUM") or shutil.which("chromium"):
        return
    if os.environ.get("CI"):
        pytest.fail("no Chromium in CI: .ci/run installs Debian's (apt-get install chromium)")
    pytest.skip("the viewer's browser test needs Chromium: `apt-get install chromium` (Debian) or set CHROMIUM")


def changed(a, b):
    """Pixels whose colour differs by more than 2% in a channel."""
    return int((np.abs(a - b).max(-1) > 0.02).sum())


def test_the_viewer_in_a_real_browser(made, tmp_path):
    """pycortex's page in headless Chromium: the maps listed in the viewer's order, the inflated brain
    drawn on the WebGL canvas (not blank: black until pycortex has loaded the brain), another map
    another picture of it (more than 0.5% of the brain's pixels change; 2.3% measured with 2,000
    voxels) and the same map the same picture, no error on the console but the known ones."""
    need_chromium()
    with browser.opened(os.path.join(made[1], "viewer")) as page:
        assert page.names() == MAPS
        gain = page.show(MAPS[0])
        page.picture(str(tmp_path / "viewer_gain.png"))
        test_r = page.show(MAPS[1])
        page.picture(str(tmp_path / "viewer_test_r.png"))
        again = page.show(MAPS[0])
        messages = list(page.messages)
    print(f"screenshots: {tmp_path}/viewer_gain.png, viewer_test_r.png")
    brain = int((gain.max(-1) > 0.02).sum())
    assert gain.std() > 0.05 and brain > 0.05 * gain[..., 0].size, (gain.std(), brain)
    assert changed(gain, test_r) > 0.005 * brain and changed(gain, again) < 0.1 * changed(gain, test_r), (
        brain, changed(gain, test_r), changed(gain, again))
    errors = [m for m in messages if m.startswith(("error", "pageerror")) and not any(k in m for k in KNOWN)]
    assert not errors, errors


def stale_cross_subject(results, tmp_path):
    """A copy of the results whose stage 04 result records another sim02 run than the one there."""
    out = str(tmp_path / "stale")
    shutil.copytree(results, out, ignore=shutil.ignore_patterns("viewer*"))
    path = one(f"{out}/04_cross_subject_*.npz")
    d = plumbing.load_npz(path)
    prov = json.loads(str(d["provenance"]))
    prov["runs"]["sim02"] = "0" * 16
    plumbing.save_npz(path, **dict(d, provenance=np.array(json.dumps(prov))))
    return out


@pytest.mark.parametrize("case, msg", [
    ("another study", "was built from another study than"),
    ("stale stage 04", "which was rerun since in"),
    ("unknown subject", "unknown subject(s) sim09"),
    ("no results", "no results in"),
])
def test_bad_inputs_are_refused_in_one_line(made, tiny_study, tmp_path, capsys, case, msg):
    data, results = made
    if case == "stale stage 04":
        results = stale_cross_subject(results, tmp_path)
    argv = {"another study": ["--data", tiny_study, "--results", results],
            "stale stage 04": ["--data", data, "--results", results],
            "unknown subject": ["--data", data, "--results", results, "--subjects", "sim09"],
            "no results": ["--data", data, "--results", str(tmp_path / "none")]}[case]
    fails_cleanly("viewer.py", argv, capsys, msg, results, str(tmp_path))


def test_a_study_off_the_cortex_is_refused(tiny_study):
    """The abstract study (--cortex none) has no voxel on a cortex: one line saying how to get one."""
    study = load_study(tiny_study)
    files = {s: load_subject(tiny_study, s, study) for s in study["subjects"]}
    with pytest.raises(StudyError, match="lie on no cortex; build it on S1"):
        inputs.places(argparse.Namespace(data=tiny_study, ds_root=None), study, files)


def test_a_failed_write_leaves_the_viewer_as_it_was(made, tmp_path, monkeypatch):
    """pycortex writes into a folder beside the viewer, swapped in whole: an error half-way leaves
    the old viewer and no half-written folder."""
    import cortex.webgl
    out = tmp_path / "viewer"
    shutil.copytree(os.path.join(made[1], "viewer"), out)
    before = sorted(os.listdir(out))

    def half_then_fail(folder, *a, **k):
        os.makedirs(folder, exist_ok=True)
        open(os.path.join(folder, "index.html"), "w").write("<html>half")
        raise RuntimeError("disk full")
    monkeypatch.setattr(cortex.webgl, "make_static", half_then_fail)
    with pytest.raises(RuntimeError):
        anatomy.write_viewer(str(out), {}, cortex.database.default_filestore, "t")
    assert sorted(os.listdir(out)) == before and os.path.getsize(out / "index.html") > 10 ** 6
    assert sorted(os.listdir(tmp_path)) == ["viewer"]
