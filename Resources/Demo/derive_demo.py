"""Re-create the demo volume from pyradiomics' lung1 (run: python Resources/Demo/derive_demo.py SHARED_DATA).

Keeps 24 axial slices (z 20..43, the tumour lies in slices 12..14 of the crop) and halves the
in-plane resolution by 2x2 averaging (labels: 2x2 majority), so the demo ships in ~2 MB.
The geometry is carried exactly: the new voxel centres are the centres of the 2x2 blocks.
"""

import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def derive(src: Path, dst: Path) -> None:
    image = sitk.ReadImage(str(src / "lung1_image.nrrd"))
    label = sitk.ReadImage(str(src / "lung1_label.nrrd"))
    a = sitk.GetArrayFromImage(image)[20:44].astype(np.float32)
    lab = sitk.GetArrayFromImage(label)[20:44].astype(np.float32)
    k, j, i = a.shape
    a = a.reshape(k, j // 2, 2, i // 2, 2).mean(axis=(2, 4)).round().astype(np.int16)
    lab = (lab.reshape(k, j // 2, 2, i // 2, 2).mean(axis=(2, 4)) >= 0.5).astype(np.uint8)
    spacing = np.array(image.GetSpacing())
    direction = np.array(image.GetDirection()).reshape(3, 3)
    origin = np.array(image.TransformIndexToPhysicalPoint((0, 0, 20))) + direction @ np.array([spacing[0] / 2, spacing[1] / 2, 0])
    for arr, name in ((a, "lung1_ct_crop.nrrd"), (lab, "lung1_tumor_crop.nrrd")):
        out = sitk.GetImageFromArray(arr)
        out.SetSpacing((spacing[0] * 2, spacing[1] * 2, spacing[2]))
        out.SetOrigin(tuple(origin))
        out.SetDirection(image.GetDirection())
        sitk.WriteImage(out, str(dst / name), useCompression=True)


if __name__ == "__main__":
    derive(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/pyradiomics"), Path(__file__).parent)
