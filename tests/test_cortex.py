"""The real cortex: pycortex's S1 through stage 01's --rois-from-pycortex code, the committed asset
rebuilt with the real pycortex and compared, and a flatmap drawn without pycortex against
pycortex's own image. Needs pycortex (make test installs it: `make pycortex`)."""
import os

import numpy as np
import pytest

import common
from lib import anatomy, plumbing
from helpers import ROOT
from lib.study import load_study, load_subject


@pytest.fixture(scope="module")
def s1(tmp_path_factory):
    """A dataset root in ds003020's layout whose pycortex-db is pycortex's S1 ({"S1": "fullhead"})."""
    pytest.importorskip("cortex", reason="pycortex is not installed (make pycortex builds it; make test does)")
    root = anatomy.s1_root(str(tmp_path_factory.mktemp("s1")))
    return anatomy, root


@pytest.fixture(scope="module")
def rebuilt(s1):
    m, root = s1
    return m.build_s1_asset(root)


def test_pycortex_rois_on_s1_gives_the_known_counts(rebuilt):
    """stage 01's pycortex_rois, the --rois-from-pycortex route, run on S1 with the real pycortex."""
    assert len(rebuilt["roi_AC"]) == 80615
    assert (rebuilt["roi_AC"].sum(), rebuilt["roi_LH"].sum(), rebuilt["roi_RH"].sum()) == (1203, 40198, 40417)


def test_the_committed_asset_is_what_pycortex_gives(rebuilt):
    committed = plumbing.load_npz(f"{ROOT}/assets/s1_cortex.npz")
    for k in ("roi_AC", "roi_LH", "roi_RH", "flat_index", "ijk", "volume_shape"):
        np.testing.assert_array_equal(committed[k], rebuilt[k], err_msg=k)
    np.testing.assert_allclose(committed["xyz_mm"], rebuilt["xyz_mm"], atol=1e-3)
    np.testing.assert_allclose(committed["flat_extents"], rebuilt["flat_extents"], atol=1e-6)
    np.testing.assert_allclose(committed["dist_AC_mm"], rebuilt["dist_AC_mm"], rtol=1e-3, atol=1e-2)
    # the distance is along the cortex: zero-ish inside AC, growing away from it
    d = rebuilt["dist_AC_mm"]
    assert np.median(d[rebuilt["roi_AC"]]) < 2 and np.median(d[~rebuilt["roi_AC"]]) > 40


def test_our_flatmap_matches_pycortexs_own_image(s1, rebuilt):
    """anatomy.draw_flatmap with stage 01's pixel -> column map draws what pycortex's quickflat draws:
    the same smooth map through both routes correlates > 0.95 over the flattened cortex."""
    import cortex
    from cortex.quickflat import utils as qf
    m, root = s1
    anatomy.pycortex_subject(os.path.join(root, "derivative"), "S1")  # pycortex on the fixture's database
    values = np.sin(rebuilt["xyz_mm"][:, 1] / 15.0) + rebuilt["roi_AC"]  # smooth, with AC standing out
    thick = np.asarray(cortex.db.get_mask("S1", "fullhead", "thick"), bool)
    theirs, extents = qf.make_flatmap_image(cortex.Volume(values, "S1", "fullhead", mask=thick),
                                            height=anatomy.FLAT_HEIGHT)
    flat = rebuilt["flat_index"]
    ours = np.where(flat >= 0, values[np.maximum(flat, 0)], np.nan)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(extents, rebuilt["flat_extents"])
    both = np.isfinite(ours) & np.isfinite(theirs)
    assert both.sum() > 0.95 * np.isfinite(theirs).sum()
    assert np.corrcoef(ours[both], theirs[both])[0, 1] > 0.95
    # and the figure itself is drawn without pycortex
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    anatomy.draw_flatmap(ax, values, flat, rebuilt["flat_extents"], outline=rebuilt["roi_AC"])
    plt.close(fig)


def test_the_simulated_study_lives_on_s1(default_study):
    """make demo's study: a uniform sample of S1's columns with their ROIs, acoustic signal strongest
    in AC and falling off with the distance along cortex, most of cortex low signal-to-noise."""
    study = load_study(default_study)
    truth = plumbing.load_npz(f"{default_study}/truth.npz")
    asset = plumbing.load_npz(f"{ROOT}/assets/s1_cortex.npz")
    columns = truth["columns"]
    assert len(columns) == 12000 and np.all(np.diff(columns) > 0)
    for subj in study["subjects"]:
        d = load_subject(default_study, subj, study)
        for roi in ("AC", "LH", "RH"):
            np.testing.assert_array_equal(d[f"roi_{roi}"], asset[f"roi_{roi}"][columns])
        assert abs(d["roi_AC"].mean() - 1203 / 80615) < 0.004  # a uniform sample keeps the AC share
        aco = truth[f"{subj}_acoustic_amplitude"]
        dist = asset["dist_AC_mm"][columns]
        assert aco[d["roi_AC"]].mean() > 0.8 and aco[dist > 40].max() < 0.05
        ceiling = truth[f"{subj}_true_ceiling"]
        assert np.median(ceiling) < 0.3 and ceiling[d["roi_AC"]].mean() > 0.6
        assert d["flat_index"].max() < len(columns)
        # AC as the ROI and AC as the truth agree: full acoustic amplitude in the ROI, under 1/2 outside
        np.testing.assert_array_equal(aco > 0.5, d["roi_AC"])
    # one anatomy: the subjects share the semantic network (with individual variation), placed where
    # the literature puts it (lib/simulate.SEMANTIC_CENTRES_MM), in both hemispheres
    amps = np.array([truth[f"{s}_semantic_amplitude"] for s in study["subjects"]])
    corr = np.corrcoef(amps)[np.triu_indices(len(amps), 1)]
    assert np.all(corr > 0.7) and np.all(corr < 0.99), corr
    xyz = asset["xyz_mm"][columns]
    from lib.simulate import SEMANTIC_CENTRES_MM
    centres = np.array([(s * x, y, z) for x, y, z in SEMANTIC_CENTRES_MM for s in (1, -1)])
    near = np.sqrt(((xyz[:, None] - centres[None]) ** 2).sum(-1)).min(1) < 15
    assert amps[:, near].mean() > amps[:, ~near].mean() + 0.2
    lh = d["roi_LH"]
    assert (amps[:, lh] > 0.5).mean() > 0.1 and (amps[:, ~lh] > 0.5).mean() > 0.1
