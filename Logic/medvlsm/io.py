"""Reading images and writing results, geometry preserved (SimpleITK, pynrrd).

Every reader returns a ``Volume`` (LPS, ``[K, J, I(, C)]``); every writer takes arrays on the
grid of the volume they were computed from and writes that grid's spacing, origin and
direction unchanged. Inputs are opened read-only and never written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .errors import InputError
from .volume import Volume

LABELMAP_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
SEGMENTATION_EXTENSIONS = (".seg.nrrd", ".dcm")
IMAGE_2D_EXTENSIONS = (".png",)
OUTPUT_EXTENSIONS = SEGMENTATION_EXTENSIONS + LABELMAP_EXTENSIONS + IMAGE_2D_EXTENSIONS

# Distinct, colour-blind friendly segment colours (Okabe-Ito, then Slicer-like tints).
PALETTE = [
    (0.90, 0.62, 0.00), (0.34, 0.71, 0.91), (0.00, 0.62, 0.45), (0.94, 0.89, 0.26),
    (0.00, 0.45, 0.70), (0.84, 0.37, 0.00), (0.80, 0.47, 0.65), (0.50, 0.68, 0.39),
    (0.86, 0.38, 0.45), (0.56, 0.44, 0.86),
]


def extension(path) -> str:
    name = str(path).lower()
    for ext in SEGMENTATION_EXTENSIONS + (".nii.gz",):
        if name.endswith(ext):
            return ext
    return os.path.splitext(name)[1]


def case_name(path) -> str:
    """A file's name without its (possibly double) extension: ``case1.seg.nrrd`` -> ``case1``."""
    name = Path(path).name
    ext = extension(name)
    return name[: len(name) - len(ext)] if ext and name.lower().endswith(ext) else Path(name).stem


def _sitk():
    import SimpleITK as sitk

    return sitk


def volume_from_sitk(image, source: str = "") -> Volume:
    """``SimpleITK.Image`` (2D or 3D, scalar or RGB) -> ``Volume``; 2D becomes one slice."""
    sitk = _sitk()
    dim = image.GetDimension()
    if dim not in (2, 3):
        raise InputError(
            f"{source or 'The image'} is {dim}D: only 2D images and 3D volumes can be segmented",
            "Extract one 3D volume (one time point) first, e.g. with Slicer's 'Sequences' module",
        )
    array = sitk.GetArrayFromImage(image)
    components = image.GetNumberOfComponentsPerPixel()
    if components > 1:
        if dim == 3 or components not in (3, 4):
            raise InputError(
                f"{source or 'The image'} has {components} components per voxel: "
                "a multi-component (vector) volume cannot be segmented",
                "Extract one component first (SimpleITK VectorIndexSelectionCast, or Slicer's 'Vector to Scalar Volume')",
            )
        array = array[..., :3]  # drop alpha
    spacing, origin = list(image.GetSpacing()), list(image.GetOrigin())
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(dim, dim)
    if dim == 2:
        array = array[None]
        spacing, origin = spacing + [1.0], origin + [0.0]
        d3 = np.eye(3)
        d3[:2, :2] = direction
        direction = d3
    return Volume(array, tuple(spacing), tuple(origin), direction, source)


def volume_to_sitk(volume: Volume, array: np.ndarray | None = None, *, vector: bool = False):
    """An array on ``volume``'s grid -> ``SimpleITK.Image`` with that exact geometry."""
    sitk = _sitk()
    array = volume.array if array is None else array
    image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=vector or array.ndim == 4)
    image.SetSpacing(volume.spacing)
    image.SetOrigin(volume.origin)
    image.SetDirection(volume.direction.ravel().tolist())
    return image


def read_image(path) -> Volume:
    """Read a NIfTI/NRRD/MHA/... file, a DICOM series folder or a 2D PNG/JPG as a ``Volume``."""
    sitk = _sitk()
    p = Path(path)
    if not p.exists():
        raise InputError(f"Input not found: {p}", "Check the path (a file, or a folder holding one DICOM series)")
    files = ()
    try:
        if p.is_dir():
            image, files = _read_dicom_series(p)
        else:
            if extension(p) in (".nii", ".nii.gz"):
                check_nifti(p)
            image = sitk.ReadImage(str(p))
    except InputError:
        raise
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        raise InputError(
            f"Cannot read {p}: not an image SimpleITK understands or the file is damaged ({first[:120]})",
            "Convert it to NIfTI/NRRD, or check that the download/copy is complete",
        ) from e
    volume = volume_from_sitk(image, source=p.name)
    volume.dicom_files = tuple(files)
    volume.modality = _dicom_tag(files[0], "0008|0060").upper() if files else ""
    volume.validate()
    return volume


def _read_dicom_series(folder: Path):
    sitk = _sitk()
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or ()
    if not series:
        raise InputError(f"No DICOM series found in folder {folder}", "Point at a folder that holds one DICOM series, or at an image file")
    if len(series) > 1:
        raise InputError(
            f"Folder {folder} holds {len(series)} DICOM series",
            "Put each series in its own folder (or load it in Slicer's DICOM browser and use the module)",
        )
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])
    left_out = sorted(f.name for f in folder.iterdir() if f.is_file() and str(f) not in files and _looks_like_dicom(f))
    if left_out:
        raise InputError(f"{len(left_out)} DICOM file(s) in {folder} cannot be read as part of the series: "
                         f"{', '.join(left_out[:3])}", "Replace the damaged files with complete copies and run again")
    _check_series_positions(files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute(), files


def _dicom_tag(path, tag: str) -> str:
    reader = _sitk().ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else ""


def _check_series_positions(files) -> None:
    """GDCM sorts a series by position but averages its spacing over gaps and duplicates. Refuse a
    series whose slices are not evenly spaced, naming where."""
    if len(files) < 3:
        return
    orientation = np.array(_dicom_tag(files[0], "0020|0037").split("\\"), float)
    normal = np.cross(orientation[:3], orientation[3:])
    z = np.array([np.dot(np.array(_dicom_tag(f, "0020|0032").split("\\"), float), normal) for f in files])
    steps = np.diff(z)
    spacing = float(np.median(np.abs(steps)))
    for n, step in enumerate(steps):
        name = f"{Path(files[n]).name} and {Path(files[n + 1]).name}"
        if abs(step) < 1e-3 * max(spacing, 1e-6):
            raise InputError(f"Two slices of the DICOM series are at the same position ({z[n]:.2f} mm): {name}",
                             "Remove the duplicate file (or separate the two series) and run again")
        if abs(abs(step) - spacing) > 0.1 * spacing:
            raise InputError(f"The DICOM series has uneven slice positions: {name} are {abs(step):.2f} mm apart, "
                             f"the others {spacing:.2f} mm (a slice is missing or out of place)",
                             "Load the complete series; medvlsm will not place slices on an averaged spacing")


def _looks_like_dicom(path: Path) -> bool:
    if path.name.upper() == "DICOMDIR":
        return False
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM" or path.suffix.lower() == ".dcm"
    except OSError:
        return True


# ---- integrity checks ITK does not make ---------------------------------------------------------

_NIFTI_FLOATS = {16: np.float32, 64: np.float64}  # NIfTI datatype codes of the float voxel types


def _nifti_header(head: bytes):
    """(shape, bytes per voxel, float dtype or None, data offset) of a NIfTI-1 or NIfTI-2 header."""
    import struct

    for order in "<>":
        if struct.unpack(order + "i", head[:4])[0] == 348:
            dims = struct.unpack(order + "8h", head[40:56])
            datatype, bitpix = struct.unpack(order + "2h", head[70:74])
            offset = int(struct.unpack(order + "f", head[108:112])[0])
            break
        if struct.unpack(order + "i", head[:4])[0] == 540:
            datatype, bitpix = struct.unpack(order + "2h", head[12:16])
            dims = struct.unpack(order + "8q", head[16:80])
            offset = struct.unpack(order + "q", head[168:176])[0]
            break
    else:
        return None
    shape = dims[1:1 + max(0, min(dims[0], 7))]
    float_type = _NIFTI_FLOATS.get(datatype)
    return shape, bitpix // 8, (np.dtype(float_type).newbyteorder(order) if float_type else None), offset


def check_nifti(path: Path) -> None:
    """ITK reads a truncated ``.nii(.gz)`` with the missing voxels as 0 and NaN/Inf voxels as 0, without
    a word. Stream the file once (memory: one chunk) and refuse both."""
    import gzip

    opener = gzip.open if str(path).lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            info = _nifti_header(f.read(540))
            if info is None:
                return  # not a NIfTI header: ITK's own error will say so
            shape, itemsize, float_type, offset = info
            expected = int(np.prod(shape, dtype=np.int64)) * itemsize
            f.seek(offset)
            received, bad, carry = 0, 0, b""
            while chunk := f.read(1 << 24):
                received += len(chunk)
                if float_type is not None:
                    chunk, whole = carry + chunk, (len(carry) + len(chunk)) // itemsize * itemsize
                    values = np.frombuffer(chunk[:whole], float_type)
                    carry = chunk[whole:]
                    bad += int(values.size - np.count_nonzero(np.isfinite(values)))
    except (EOFError, OSError, gzip.BadGzipFile) as e:
        raise InputError(f"Cannot read {path.name}: the file is damaged or incomplete ({e})",
                         "Copy or download it again; medvlsm will not segment a partial volume") from e
    if received < expected:
        raise InputError(f"{path.name} holds {received} bytes of voxel data where its header says {expected}",
                         "The file is incomplete: copy or download it again")
    if bad:
        raise InputError(f"{path.name} has {bad} NaN or infinite voxels",
                         "Replace them (e.g. with the background value) before segmenting; medvlsm will not guess")


def check_dicom_seg_source(files) -> None:
    """Before the model runs: a DICOM SEG needs highdicom and source instances with the UIDs it references."""
    try:
        import highdicom  # noqa: F401
    except ImportError as e:
        raise InputError("DICOM SEG export needs the highdicom package", "pip install highdicom") from e
    for tag, name in (("0020|000d", "StudyInstanceUID"), ("0020|000e", "SeriesInstanceUID"),
                      ("0008|0018", "SOPInstanceUID")):
        if not _dicom_tag(files[0], tag):
            raise InputError(f"The DICOM series has no {name} ({Path(files[0]).name}): a DICOM SEG cannot reference it",
                             "Write .seg.nrrd or .nii.gz instead, or repair the series' UIDs (e.g. with dcmodify)")


def check_output_path(path, *, is_2d: bool, kind: str = "output", dicom: bool = False) -> str:
    """Fail before the model runs if the result could not be written. Returns the extension."""
    ext = extension(path)
    allowed = OUTPUT_EXTENSIONS if kind == "output" else LABELMAP_EXTENSIONS
    if ext not in allowed:
        raise InputError(
            f"Unknown {kind} extension {ext or '(none)'!r} in {path}",
            f"Use one of: {', '.join(allowed)}",
        )
    if ext == ".png" and not is_2d:
        raise InputError("A .png output holds one 2D slice but the input is a volume", "Use .seg.nrrd or .nii.gz")
    if ext == ".dcm" and not dicom:
        raise InputError("A DICOM SEG (.dcm) output needs a DICOM series as input (it references its slices)",
                         "Give the DICOM series folder as input, or write .seg.nrrd / .nii.gz")
    check_writable(path)
    return ext


def check_writable(path) -> None:
    """Before any work: ``path`` can be created or replaced (its folder exists and takes files)."""
    path = Path(path)
    parent = path.resolve().parent
    if not parent.is_dir():
        raise InputError(f"Output folder {parent} does not exist", "Create it first or choose another path")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"Cannot write {path}: permission denied or read-only", "Choose a folder you can write to")


def check_distinct_outputs(inputs, outputs) -> None:
    """Before any work: no output may be an input, a folder, or another output of the same run."""
    seen = {Path(i).resolve(): "the input" for i in inputs if i}
    for output in outputs:
        if not output:
            continue
        resolved = Path(output).resolve()
        if resolved in seen:
            raise InputError(f"Output {output} is {seen[resolved]}",
                             "Choose another file name: medvlsm never writes over its input or twice to one file")
        if resolved.is_dir():
            raise InputError(f"Output {output} is a folder", "Give a file name, e.g. result.seg.nrrd")
        seen[resolved] = "also another output of this run"


def written(path, writer, *args) -> None:
    """Run ``writer(*args)`` (an atomic writer), turning a failed write (full disk, lost drive) into one
    line that says the path is unchanged."""
    try:
        writer(*args)
    except (OSError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[-1][:200] if str(e).strip() else e.__class__.__name__
        raise InputError(f"Could not write {path} ({reason}); it holds what it held before",
                         "Free disk space or choose another folder, then run again") from e


def write_labelmap(volume: Volume, labels: np.ndarray, path, note: str = "") -> None:
    """``labels [K, J, I]`` (0 = background, i = i-th prompt) on ``volume``'s grid -> file.
    ``note`` (e.g. that the weights were untrained) goes into the file's description field."""
    ext = extension(path)
    labels = labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.uint16, copy=False)
    image = (_sitk().GetImageFromArray((labels[0] > 0).astype(np.uint8) * 255) if ext == ".png"
             else volume_to_sitk(volume, labels))
    _write_sitk(image, path, note)


def _write_sitk(image, path, note: str = "") -> None:
    ext = extension(path)
    if note:
        image.SetMetaData("descrip", note)  # NRRD keeps it as a key:=value field
    with atomic_path(path) as tmp:
        _sitk().WriteImage(image, str(tmp), useCompression=ext != ".png")
        if note and ext in (".nii", ".nii.gz"):
            _set_nifti_descrip(tmp, note)
        _verify_written(tmp)


def _verify_written(path: Path) -> None:
    """ITK's writers do not report a full disk: the file ends early and the call succeeds. Read the
    file back before it replaces anything (NIfTI through the streamed check, since ITK reads a short
    NIfTI without complaint)."""
    try:
        if extension(path) in (".nii", ".nii.gz"):
            check_nifti(path)
        else:
            _sitk().ReadImage(str(path))
    except (InputError, RuntimeError) as e:
        raise OSError(f"the written file is incomplete, the disk may be full: {str(e).splitlines()[0][:120]}") from e


def _set_nifti_descrip(path: Path, note: str) -> None:
    """ITK's NIfTI writer leaves ``descrip`` (80 bytes at offset 148 of a NIfTI-1 header) empty."""
    import gzip

    import shutil

    descrip = note.encode("ascii", "replace")[:79].ljust(80, b"\0")
    if not str(path).lower().endswith(".gz"):
        with open(path, "r+b") as f:
            f.seek(148)
            f.write(descrip)
        return
    patched = path.with_name(path.name + ".descrip")  # streamed: never the whole image in memory
    with gzip.open(path, "rb") as src, gzip.open(patched, "wb", compresslevel=1) as dst:
        header = bytearray(src.read(348))
        header[148:228] = descrip
        dst.write(header)
        shutil.copyfileobj(src, dst, 1 << 20)
    patched.replace(path)


def write_probabilities(volume: Volume, probabilities: np.ndarray, path, note: str = "") -> None:
    """uint8 ``probabilities [P, K, J, I]`` (x 255, the result's own) -> a uint8 file, 0..255 for 0..1;
    several prompts become vector components."""
    note = "; ".join(n for n in (note, "probability x 255 (uint8)") if n)  # the untrained warning first
    array = probabilities[0] if len(probabilities) == 1 else np.moveaxis(probabilities, 0, -1)
    ext = extension(path)
    if ext == ".nrrd":  # written slab by slab: no interleaved copy of every prompt
        from .wire import grid_header, write_nrrd

        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            write_nrrd(f, array, {**grid_header(volume, array), "descrip": note})
        return
    if ext in (".nii", ".nii.gz"):
        _write_nifti_layers(volume, probabilities, path, note)
        return
    _write_sitk(volume_to_sitk(volume, array, vector=len(probabilities) > 1), path, note)


def _write_nifti_layers(volume: Volume, layers: np.ndarray, path, note: str) -> None:
    """uint8 ``layers [P, K, J, I]`` as a NIfTI-1 file, written as a stream: a NIfTI vector image keeps
    its components as the slowest axis, so the file's data is the layers' own bytes in order (SimpleITK
    would need an interleaved copy of every layer first). The header is ITK's, for a 1 x 1 x 1 image of
    the same geometry and components, with the sizes then set: the geometry is written by the same
    code as every other NIfTI this project writes."""
    import gzip
    import struct
    import tempfile

    sitk = _sitk()
    count = len(layers)
    tiny = sitk.Image([1, 1, 1], sitk.sitkVectorUInt8 if count > 1 else sitk.sitkUInt8, *([count] if count > 1 else []))
    tiny.SetSpacing(volume.spacing)
    tiny.SetOrigin(volume.origin)
    tiny.SetDirection(volume.direction.ravel().tolist())
    with tempfile.TemporaryDirectory() as scratch:
        template = Path(scratch) / "header.nii"
        sitk.WriteImage(tiny, str(template))
        raw = template.read_bytes()
    offset = int(struct.unpack_from("<f", raw, 108)[0])  # vox_offset
    header = bytearray(raw[:offset])
    struct.pack_into("<3h", header, 42, volume.shape[2], volume.shape[1], volume.shape[0])  # dim[1..3]: i, j, k
    header[148:228] = note.encode("ascii", "replace")[:79].ljust(80, b"\0")
    with atomic_path(path) as tmp:
        opener = gzip.open(tmp, "wb", compresslevel=1) if str(path).lower().endswith(".gz") else open(tmp, "wb")
        with opener as f:
            f.write(header)
            for layer in layers:
                for k in range(0, layer.shape[0], 16):
                    f.write(memoryview(np.ascontiguousarray(layer[k : k + 16])).cast("B"))
        _verify_written(tmp)


# ---- DICOM SEG (highdicom) ---------------------------------------------------------------------

def _segment_codes(name: str):
    from pydicom.sr.coding import Code

    from .vocabulary import lookup

    structure = lookup(name)
    if structure is None:  # a free-text prompt: generic tissue, the prompt as label
        return Code("91723000", "SCT", "Anatomical Structure"), Code("85756007", "SCT", "Tissue")
    category_code, category_meaning = structure.category_code
    return Code(category_code, "SCT", category_meaning), Code(structure.code, "SCT", structure.meaning)


def write_dicom_seg(volume: Volume, masks: np.ndarray, names, path, model_name: str = "medvlsm",
                    note: str = "") -> None:
    """Masks ``[S, K, J, I]`` of a volume read from a DICOM series -> a binary DICOM SEG referencing
    its slices, one segment per mask, coded from the anatomy vocabulary (SNOMED CT)."""
    try:
        import highdicom as hd
        import pydicom
        from pydicom.sr.codedict import codes
    except ImportError as e:
        raise InputError("DICOM SEG export needs the highdicom package", "pip install highdicom") from e

    from . import __version__

    if not volume.dicom_files:
        raise InputError("The volume was not read from a DICOM series", "Export .seg.nrrd or .nii.gz instead")
    sources = [pydicom.dcmread(f) for f in volume.dicom_files]
    for ds in sources:  # in memory only: many series omit SliceThickness, which highdicom requires
        if "SliceThickness" not in ds:
            ds.SliceThickness = f"{volume.spacing[2]:.6g}"
    algorithm = hd.AlgorithmIdentificationSequence(name=model_name, version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    descriptions = []
    for number, name in enumerate(names, start=1):
        category, kind = _segment_codes(name)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=(str(name) or "empty prompt")[:64],
            segmented_property_category=category, segmented_property_type=kind,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm))
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=np.moveaxis(np.asarray(masks, np.uint8), 0, -1),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=900, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="MedVLSM-Slicer", manufacturer_model_name=model_name, software_versions=__version__,
        device_serial_number="0", content_description=(note or "Text-prompted segmentation (research use)")[:64],
        series_description=(note or "MedVLSM text-prompted segmentation")[:64], omit_empty_frames=False)
    if any(not str(name).isascii() for name in names):
        try:
            "".join(map(str, names)).encode("latin-1")
        except UnicodeEncodeError:
            seg.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: labels in other scripts survive
    with atomic_path(path) as tmp:
        seg.save_as(str(tmp))


# ---- 3D Slicer segmentation files (.seg.nrrd) -------------------------------------------

@dataclass
class Segmentation:
    """Binary masks ``[S, K, J, I]`` with segment names and colours on a volume's grid."""

    masks: np.ndarray
    names: list
    colors: list
    grid: Volume


def _overlapping(masks: np.ndarray) -> bool:
    """Whether any voxel is in two masks (a byte per voxel, not an int64 sum)."""
    if len(masks) < 2:
        return False
    seen = masks[0].copy()
    for m in masks[1:]:
        if np.logical_and(seen, m).any():
            return True
        seen |= m
    return False


def write_seg_nrrd(volume: Volume, masks: np.ndarray, names, path, colors=None, note: str = "") -> None:
    """Write masks ``[S, K, J, I]`` as a Slicer ``.seg.nrrd``, one segment per mask.

    Non-overlapping masks share one layer (a plain labelmap other tools read too); overlapping
    masks get one layer each, as Slicer itself writes them.
    """
    masks = np.asarray(masks, dtype=bool)
    count, utf8 = len(masks), {}
    from .vocabulary import lookup

    structures = [lookup(name) for name in names]  # one vocabulary for every output (Slicer, DICOM SEG, here)
    colors = list(colors or [s.color if s else PALETTE[i % len(PALETTE)] for i, s in enumerate(structures)])
    overlapping = _overlapping(masks)
    if overlapping:
        data = np.moveaxis(masks.view(np.uint8), 0, -1)  # [K, J, I, S]: list axis fastest
    elif count == 1:
        data = masks[0].view(np.uint8)  # the mask's own bytes: 0/1 is the one segment's label
    else:
        data = np.zeros(volume.shape, np.uint8)
        for s in range(count):
            data[masks[s]] = s + 1
    axes = volume.direction @ np.diag(volume.spacing)  # columns: i, j, k steps in LPS mm
    directions = axes.T
    header = {
        "type": "unsigned char",
        "space": "left-posterior-superior",
        "space origin": np.asarray(volume.origin, float),
        "encoding": "gzip",
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
        "Segmentation_ConversionParameters": "",
    }
    if note:
        header["MedVLSM_Note"] = note
    if overlapping:
        header["kinds"] = ["list", "domain", "domain", "domain"]
        header["space directions"] = np.vstack([np.full(3, np.nan), directions])
    else:
        header["kinds"] = ["domain", "domain", "domain"]
        header["space directions"] = directions
    for s, name in enumerate(names):
        extent = _extent(masks[s])
        r, g, b = colors[s]
        header.update({
            f"Segment{s}_ID": f"Segment_{s + 1}",
            f"Segment{s}_Name": _ascii_token(s, str(name) if str(name) else "(empty prompt)", utf8),
            f"Segment{s}_NameAutoGenerated": "0",
            f"Segment{s}_Color": f"{r:.6g} {g:.6g} {b:.6g}",
            f"Segment{s}_ColorAutoGenerated": "0",
            f"Segment{s}_LabelValue": str(1 if overlapping else s + 1),
            f"Segment{s}_Layer": str(s if overlapping else 0),
            f"Segment{s}_Extent": extent,
            f"Segment{s}_Tags": "Segmentation.Status:inprogress|" + (
                f"TerminologyEntry:{structures[s].slicer_terminology()}|" if structures[s] else ""),
        })
    with atomic_path(path) as tmp:  # gzip level 9 is up to 300x slower on noisy masks
        from .wire import write_nrrd

        with open(tmp, "wb") as f:
            write_nrrd(f, data, header)
        if utf8:
            _put_utf8_names(tmp, utf8)


def _ascii_token(index: int, name: str, utf8: dict) -> str:
    """pynrrd writes headers as ASCII; Slicer writes and reads segment names as UTF-8. A non-ASCII
    name goes in as a token that ``_put_utf8_names`` replaces by the name's UTF-8 bytes."""
    if name.isascii():
        return name
    token = f"@@medvlsm-utf8-{index}@@"
    utf8[token.encode("ascii")] = name.encode("utf-8")
    return token


def _put_utf8_names(path: Path, utf8: dict) -> None:
    raw = Path(path).read_bytes()
    end = raw.index(b"\n\n") + 2  # the header ends at the first blank line; the data follows
    header = raw[:end]
    for token, name in utf8.items():
        header = header.replace(token, name)
    Path(path).write_bytes(header + raw[end:])


def _utf8_header(path) -> dict:
    """``key:=value`` fields of an NRRD header decoded as UTF-8 (pynrrd drops non-ASCII bytes)."""
    fields = {}
    with open(path, "rb") as f:
        for line in f:
            if line in (b"\n", b"\r\n"):
                break
            key, sep, value = line.decode("utf-8", "replace").rstrip("\r\n").partition(":=")
            if sep:
                fields[key] = value
    return fields


def _extent(mask: np.ndarray) -> str:
    """Slicer's ``Segment_Extent``: "i0 i1 j0 j1 k0 k1" of a ``[K, J, I]`` mask (per-axis projections:
    ``argwhere`` would cost 24 bytes per segmented voxel)."""
    bounds = []
    for axis in (2, 1, 0):  # i, j, k
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if not len(hit):
            return "0 -1 0 -1 0 -1"
        bounds.append(f"{hit[0]} {hit[-1]}")
    return " ".join(bounds)


def read_seg_nrrd(path) -> Segmentation:
    """Read a Slicer ``.seg.nrrd`` (shared or separate layers) into binary masks."""
    import nrrd

    data, header = nrrd.read(str(path), index_order="C")
    dirs = np.asarray(header["space directions"], float)
    if data.ndim == 4:
        dirs = dirs[~np.isnan(dirs).any(axis=1)]
        data = np.moveaxis(data, -1, 0)  # [L, K, J, I]
    else:
        data = data[None]
    spacing = np.linalg.norm(dirs, axis=1)
    direction = (dirs / spacing[:, None]).T
    if header.get("space", "left-posterior-superior") in ("right-anterior-superior", "RAS"):
        flip = np.diag([-1.0, -1.0, 1.0])
        direction, origin = flip @ direction, flip @ np.asarray(header["space origin"], float)
    else:
        origin = np.asarray(header["space origin"], float)
    # Slicer may crop to the segments' extent; "space origin" is then the cropped grid's origin.
    grid = Volume(np.zeros(data.shape[1:], np.uint8), tuple(spacing), tuple(origin), direction, Path(path).name)
    names, colors, masks = [], [], []
    utf8 = _utf8_header(path)
    s = 0
    while f"Segment{s}_ID" in header:
        layer = int(header.get(f"Segment{s}_Layer", 0))
        value = int(header.get(f"Segment{s}_LabelValue", 1))
        names.append(utf8.get(f"Segment{s}_Name", f"Segment_{s + 1}"))
        colors.append(tuple(float(c) for c in header.get(f"Segment{s}_Color", "0.5 0.5 0.5").split()))
        masks.append(data[layer] == value)
        s += 1
    return Segmentation(np.asarray(masks, bool).reshape((len(masks),) + grid.shape), names, colors, grid)
