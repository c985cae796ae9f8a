"""Derive assets/s1_cortex.npz from pycortex's example subject S1, so that the simulated study
lives on a real cortex on machines where pycortex cannot be built.

pycortex (BSD licence, Regents of the University of California; https://github.com/gallantlab/pycortex)
ships one real subject, S1, in its default database: its surfaces, the ROI outlines of its
overlays.svg and the `fullhead` transform. Everything here comes from pycortex's own functions,
through the same code as stage 01's --rois-from-pycortex on ds003020 (lib/anatomy.py):
  * columns: the true voxels of the `fullhead` transform's thick cortical mask, in C order (as
    ds003020's data columns are the true voxels of mask_thick): 80,615 voxels (UTS01 has 81,126)
  * roi_AC, roi_LH, roi_RH: lib/anatomy.pycortex_rois on a dataset root whose pycortex-db is S1
  * flat_index, flat_extents: lib/anatomy.pycortex_flatmap, the flattened cortex as columns
  * xyz_mm: each column's centre in the surfaces' coordinates (mm), for smooth spatial maps
  * dist_AC_mm: distance along the cortical surface (pycortex's geodesic distance on the
    fiducial surface, from its nearest vertex) to the nearest vertex of the AC outline

    make pycortex && .venv/bin/python assets/make_s1_cortex.py       # about 2 minutes
The tests rebuild it with the real pycortex and compare (tests/test_cortex.py).
"""
import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from lib import anatomy, plumbing  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(HERE, "s1_cortex.npz"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        asset = anatomy.build_s1_asset(anatomy.s1_root(tmp))
    plumbing.save_npz(args.out, **asset)
    print(f"wrote {args.out}: {len(asset['roi_AC'])} columns, AC {asset['roi_AC'].sum()}, LH {asset['roi_LH'].sum()}, "
          f"RH {asset['roi_RH'].sum()}, flatmap {asset['flat_index'].shape}, "
          f"{os.path.getsize(args.out) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
