"""The cortex: pycortex ROIs and flatmaps of a subject, the S1 cortex asset, drawing on a flatmap,
a study's maps in pycortex's WebGL viewer.

Used by stage 01 (AC/LH/RH masks and the flatmap of each ds003020 subject from the dataset's own
pycortex database, --rois-from-pycortex; the simulated subjects' columns on pycortex's S1 from
assets/s1_cortex.npz), stages 02-03 (draw_flatmap: the paper's figures, without pycortex),
viewer.py (each subject's columns as a pycortex volume, the viewer written by pycortex) and
assets/make_s1_cortex.py (which builds that asset with the same pycortex code). pycortex is
optional: a source build (`make pycortex`), imported only where it is needed.
"""
import json
import os
import shutil

import numpy as np

from lib.plumbing import StudyError, load_npz

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
S1_COLUMNS = 80615  # true voxels of the thick cortical mask of pycortex's S1 (transform fullhead)
# The demo's budget (make demo from a fresh clone <= 10 min, data/ <= 2 GB) does not hold all 80,615
# columns: ridge costs ~0.15 ms per voxel and fit and the demo makes 33 fits; make demo took 10 min
# 38 s with 20,000 (bench/RESULTS.md). The default is the largest uniform sample that fits
S1_DEMO_COLUMNS = 12000
FLAT_HEIGHT = 512  # pixels of a flatmap's height (pycortex's quickflat draws at 1024 by default)


# ---- pycortex: a subject's ROIs and flatmap from its database ----

def import_pycortex(who="--rois-from-pycortex", instead="pass --roi-file masks.npz instead"):
    try:
        import cortex
    except ImportError:
        raise StudyError(f"{who} needs pycortex, which is not installed (a source build: `pip install "
                         "numpy cython setuptools-scm wheel && pip install --no-build-isolation pycortex`, or `make "
                         f"pycortex`)" + (f", or {instead}" if instead else ""))
    return cortex


def pycortex_subject(deriv, subject):
    """pycortex pointed at the dataset's own database (<deriv>/pycortex-db; deriv: its derivative/ or
    derivatives/ folder, ds003020.derivatives) and the subject's transform (<deriv>/subject_xfms.json,
    else <subject>_auto): (cortex module, transform)."""
    cortex = import_pycortex()
    db = os.path.join(deriv, "pycortex-db")
    xfms_path = os.path.join(deriv, "subject_xfms.json")
    if not os.path.isdir(os.path.join(db, subject)):
        raise StudyError(f"{os.path.join(db, subject)} not found: download {os.path.basename(deriv)}/"
                         f"pycortex-db/{subject} of ds003020")
    xfm = json.load(open(xfms_path)).get(subject, f"{subject}_auto") if os.path.exists(xfms_path) else f"{subject}_auto"
    cortex.db.filestore, cortex.db._subjects = db, None  # the dataset's own filestore
    return cortex, xfm


def pycortex_rois(deriv, subject):
    """AC/LH/RH column masks of one subject from the dataset's own pycortex database, with
    pycortex's functions: the data's columns are the true voxels of the transform's 'thick' mask
    (in order); AC from the ROI outlines in overlays.svg, as public brain-tuning code reads it."""
    cortex, xfm = pycortex_subject(deriv, subject)
    thick = np.asarray(cortex.db.get_mask(subject, xfm, "thick"), bool)
    # = cortex.utils.get_roi_masks(subject, xfm, ["AC"], gm_sampler="cortical-conservative", threshold=0.9)
    mapper = cortex.utils.get_mapper(subject, xfm, type="nearest")
    ac = mapper.backwards(roi_vertices(cortex, subject, "AC").astype(float)) > 0.9
    lh, rh = cortex.utils.get_hemi_masks(subject, xfm)
    return masks_from_volumes(thick, {"AC": ac}, lh, rh)


def roi_vertices(cortex, subject, roi):
    """cortex.utils.get_roi_verts(subject, roi, mask=True)[roi], the same vertices without its
    Python loop over every triangle (about 5 s a subject; tests/test_cortex.py checks S1's counts):
    the vertices inside the ROI's outline on the flat surface, plus their fiducial-surface
    neighbours that the flattening cut away."""
    svg = cortex.db.get_overlay(subject)
    if roi not in svg.rois.shapes:
        raise StudyError(f"the pycortex database of {subject} has no {roi} outline in its overlays.svg; pass "
                         "--roi-file masks.npz instead")
    pts, flat = cortex.db.get_surf(subject, "flat", merge=True)
    _, full = cortex.db.get_surf(subject, "fiducial", merge=True)
    on_flat = np.zeros(len(pts), bool)
    on_flat[np.unique(flat)] = True
    inside = np.zeros(len(pts), bool)
    inside[np.asarray(svg.rois.get_mask(roi), int)] = True
    inside &= on_flat
    edges = np.concatenate([full[:, [0, 1]], full[:, [1, 2]], full[:, [2, 0]]])
    edges = np.concatenate([edges, edges[:, ::-1]])
    inside[edges[inside[edges[:, 0]] & ~on_flat[edges[:, 1]], 1]] = True
    return inside


def pycortex_flatmap(deriv, subject, height=FLAT_HEIGHT):
    """The flattened cortex as an image of column indices (-1 off cortex), from pycortex's own
    flatmap cache (the pixel -> voxel weights quickflat draws with): each pixel takes the column
    with the largest weight, in quickflat's orientation. draw_flatmap draws data with it,
    without pycortex. Returns (flat_index: height x width int32, extents: the flat coordinates)."""
    cortex, xfm = pycortex_subject(deriv, subject)
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


# ---- the simulated study's cortex: pycortex's S1 ----

MIN_AC = 5  # AC columns a study keeps however small: stages 03-05 tune and score on AC


def cortex_sample(args, rng):
    """S1's cortex (assets/s1_cortex.npz, derived from pycortex's S1), or a uniform random sample of
    --n-voxels of its columns (in their order, so the ROI shares stay true); the flatmap then
    shows each pixel's nearest sampled column. A sample too small to hold MIN_AC AC columns (AC is
    1.5% of cortex) is drawn again, stratified: MIN_AC from AC, the rest from outside it."""
    path = os.path.join(ASSETS, "s1_cortex.npz")
    a = load_npz(path, "the S1 cortex asset (assets/make_s1_cortex.py rebuilds it)")
    n = len(a["roi_AC"])
    if args.n_voxels >= n:
        columns = np.arange(n)
    else:
        columns = np.sort(rng.choice(n, args.n_voxels, replace=False))
    n_ac, uniform = min(MIN_AC, args.n_voxels - 1), int(a["roi_AC"][columns].sum())
    if uniform < n_ac:
        ac, rest = np.flatnonzero(a["roi_AC"]), np.flatnonzero(~a["roi_AC"])
        columns = np.sort(np.r_[rng.choice(ac, n_ac, replace=False),
                                rng.choice(rest, args.n_voxels - n_ac, replace=False)])
        print(f"  --n-voxels {args.n_voxels}: a uniform sample held {uniform} AC columns, so the sample "
              f"is stratified: {n_ac} from AC, {args.n_voxels - n_ac} from the rest of cortex")
    from scipy.spatial import cKDTree
    _, nearest = cKDTree(a["xyz_mm"][columns]).query(a["xyz_mm"])  # each column's nearest sampled one
    flat = np.where(a["flat_index"] >= 0, nearest[np.maximum(a["flat_index"], 0)], -1).astype(np.int32)
    return dict({k: a[k][columns] for k in ("roi_AC", "roi_LH", "roi_RH", "xyz_mm", "dist_AC_mm")},
                columns=columns, flat_index=flat, flat_extents=a["flat_extents"], source=a["source"])


def s1_root(folder):
    """A dataset root in ds003020's layout whose pycortex database is a copy of pycortex's S1."""
    import cortex
    src = os.path.join(cortex.database.default_filestore, "S1")
    dst = os.path.join(folder, "derivative", "pycortex-db", "S1")
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("cache"))
    json.dump({"S1": "fullhead"}, open(os.path.join(folder, "derivative", "subject_xfms.json"), "w"))
    return folder


def build_s1_asset(root):
    """assets/s1_cortex.npz's arrays from a dataset root whose pycortex database is S1 (s1_root): the
    columns' ROIs, flatmap, positions in mm and geodesic distance to AC."""
    deriv = os.path.join(root, "derivative")
    masks = pycortex_rois(deriv, "S1")
    flat_index, extents = pycortex_flatmap(deriv, "S1")
    cortex, xfm = pycortex_subject(deriv, "S1")
    from scipy.spatial import cKDTree
    thick = np.asarray(cortex.db.get_mask("S1", xfm, "thick"), bool)
    kji = np.argwhere(thick)  # (z, y, x), C order: the columns' order
    coord = np.asarray(cortex.db.get_xfm("S1", xfm, xfmtype="coord").xfm)  # surface mm -> voxel (x, y, z)
    vox = np.c_[kji[:, ::-1], np.ones(len(kji))]
    xyz = (np.linalg.inv(coord) @ vox.T).T[:, :3]
    # geodesic distance to AC on each hemisphere's fiducial surface, read at each column's nearest vertex
    ac_verts = np.flatnonzero(roi_vertices(cortex, "S1", "AC"))
    dist, points, offset = [], [], 0
    for hemi in ("lh", "rh"):
        pts, polys = cortex.db.get_surf("S1", "fiducial", hemi)
        surf = cortex.polyutils.Surface(pts, polys)
        mine = ac_verts[(ac_verts >= offset) & (ac_verts < offset + len(pts))] - offset
        dist.append(surf.geodesic_distance(mine) if len(mine) else np.full(len(pts), np.inf))
        points.append(pts)
        offset += len(pts)
    _, nearest = cKDTree(np.vstack(points)).query(xyz)
    dist_ac = np.concatenate(dist)[nearest]
    return dict(roi_AC=masks["AC"], roi_LH=masks["LH"], roi_RH=masks["RH"], flat_index=flat_index,
                flat_extents=extents, xyz_mm=xyz.astype(np.float32), dist_AC_mm=dist_ac.astype(np.float32),
                ijk=kji[:, ::-1].astype(np.int16), volume_shape=np.array(thick.shape),
                source=np.array(f"pycortex {cortex.__version__}, subject S1, transform fullhead"))


# ---- pycortex's WebGL viewer (viewer.py) ----

def s1_place(columns):
    """Where the simulated study's columns lie: pycortex's own S1 (transform fullhead), `columns` the
    sample of S1's cortical voxels stage 01 drew (data/truth.npz). Returns what volume() needs."""
    cortex = import_pycortex("viewer.py", None)
    cortex.db.filestore, cortex.db._subjects = cortex.database.default_filestore, None
    thick = np.asarray(cortex.db.get_mask("S1", "fullhead", "thick"), bool)
    if thick.sum() != S1_COLUMNS or np.max(columns) >= S1_COLUMNS:
        raise StudyError(f"pycortex's S1 has {thick.sum()} cortical voxels, assets/s1_cortex.npz {S1_COLUMNS}: "
                         "another pycortex than the one the asset was built from (`make pycortex` builds it)")
    return dict(subject="S1", xfm="fullhead", thick=thick, columns=np.asarray(columns), db=cortex.db.filestore)


def dataset_place(deriv, subject, n_columns):
    """Where a ds003020 subject's columns lie: the true voxels of its transform's thick cortical mask
    in the dataset's pycortex database, in order, as --rois-from-pycortex reads them."""
    import_pycortex("viewer.py", None)
    cortex, xfm = pycortex_subject(deriv, subject)
    thick = np.asarray(cortex.db.get_mask(subject, xfm, "thick"), bool)
    if thick.sum() != n_columns:
        raise StudyError(f"{subject}'s data hold {n_columns} voxels but the thick cortical mask of its transform "
                         f"{xfm} in {os.path.join(deriv, 'pycortex-db')} has {thick.sum()}: is --ds-root the "
                         "dataset the study was built from?")
    return dict(subject=subject, xfm=xfm, thick=thick, columns=np.arange(n_columns), db=cortex.db.filestore)


def volume(values, place, **view):
    """A subject's per-column values as a pycortex Volume on its cortex (s1_place, dataset_place);
    the cortex's voxels without a column (the simulated study's unsampled ones) are NaN: blank.
    view: cmap, vmin, vmax, description."""
    import cortex
    columns = np.full(place["thick"].sum(), np.nan, np.float32)
    columns[place["columns"]] = values
    vol = np.full(place["thick"].shape, np.nan, np.float32)
    vol[place["thick"]] = columns
    return cortex.Volume(vol, place["subject"], place["xfm"], **view)


def write_viewer(out, views, db, title):
    """pycortex's static WebGL viewer (cortex.webgl.make_static) of `views` ({name: Volume}, the first
    the one it opens on) from the database `db`, written into a folder beside `out` and swapped in
    whole: an error or Ctrl-C on the way leaves `out` as it was."""
    import cortex
    import cortex.webgl
    cortex.db.filestore, cortex.db._subjects = db, None
    tmp, old = out.rstrip("/") + ".tmp", out.rstrip("/") + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        cortex.webgl.make_static(tmp, views, title=title)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(out):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


# ---- drawing (no pycortex needed) ----

def draw_flatmap(ax, values, flat_index, extents, outline=None, title="", **imshow):
    """Per-column values on the flattened cortex (the paper's figures) from a flat_index image
    (stage 01: pycortex's pixel -> column map, computed once, so no pycortex is needed here).
    outline: a boolean column mask (e.g. AC) drawn as a contour."""
    img = np.where(flat_index >= 0, np.asarray(values, np.float64)[np.maximum(flat_index, 0)], np.nan)
    im = ax.imshow(img, extent=extents, interpolation="nearest", **imshow)
    if outline is not None:
        inside = np.where(flat_index >= 0, np.asarray(outline)[np.maximum(flat_index, 0)], False).astype(float)
        ax.contour(inside[::-1], levels=[0.5], colors="c", linewidths=0.8, extent=extents)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    return im
