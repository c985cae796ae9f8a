"""Derive assets/s1_cortex.npz from pycortex's example subject S1, so that the simulated study
lives on a real cortex on machines where pycortex cannot be built.

pycortex (BSD licence, Regents of the University of California; https://github.com/gallantlab/pycortex)
ships one real subject, S1, in its default database: its surfaces, the ROI outlines of its
overlays.svg and the `fullhead` transform. Everything here comes from pycortex's own functions,
through the same code as stage 01's --rois-from-pycortex on ds003020:
  * columns: the true voxels of the `fullhead` transform's thick cortical mask, in C order (as
    ds003020's data columns are the true voxels of mask_thick): 80,615 voxels (UTS01 has 81,126)
  * roi_AC, roi_LH, roi_RH: 01_prepare_data.pycortex_rois on a dataset root whose pycortex-db is S1
  * flat_index, flat_extents: 01_prepare_data.pycortex_flatmap, the flattened cortex as columns
  * xyz_mm: each column's centre in the surfaces' coordinates (mm), for smooth spatial maps
  * dist_AC_mm: distance along the cortical surface (pycortex's geodesic distance on the
    fiducial surface, from its nearest vertex) to the nearest vertex of the AC outline

    make pycortex && .venv/bin/python assets/make_s1_cortex.py       # about 2 minutes
The tests rebuild it with the real pycortex and compare (tests/test_cortex.py).
"""
import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import common  # noqa: E402


def s1_root(folder):
    """A dataset root in ds003020's layout whose pycortex database is a copy of pycortex's S1."""
    import cortex
    src = os.path.join(cortex.database.default_filestore, "S1")
    dst = os.path.join(folder, "derivative", "pycortex-db", "S1")
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("cache"))
    json.dump({"S1": "fullhead"}, open(os.path.join(folder, "derivative", "subject_xfms.json"), "w"))
    return folder


def build(root):
    stage01 = common.load_stage("01_prepare_data.py")
    masks = stage01.pycortex_rois(root, "S1")
    flat_index, extents = stage01.pycortex_flatmap(root, "S1")
    cortex, xfm = stage01.pycortex_subject(root, "S1")
    from scipy.spatial import cKDTree
    thick = np.asarray(cortex.db.get_mask("S1", xfm, "thick"), bool)
    kji = np.argwhere(thick)  # (z, y, x), C order: the columns' order
    coord = np.asarray(cortex.db.get_xfm("S1", xfm, xfmtype="coord").xfm)  # surface mm -> voxel (x, y, z)
    vox = np.c_[kji[:, ::-1], np.ones(len(kji))]
    xyz = (np.linalg.inv(coord) @ vox.T).T[:, :3]
    # geodesic distance to AC on each hemisphere's fiducial surface, read at each column's nearest vertex
    ac_verts = np.asarray(cortex.utils.get_roi_verts("S1", "AC")["AC"])
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(HERE, "s1_cortex.npz"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        asset = build(s1_root(tmp))
    common.save_npz(args.out, **asset)
    print(f"wrote {args.out}: {len(asset['roi_AC'])} columns, AC {asset['roi_AC'].sum()}, LH {asset['roi_LH'].sum()}, "
          f"RH {asset['roi_RH'].sum()}, flatmap {asset['flat_index'].shape}, "
          f"{os.path.getsize(args.out) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
