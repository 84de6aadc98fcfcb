"""NRRD in memory: what a client and a ``medvlsm serve`` server send each other (numpy + zlib).

The wire format is a subset of NRRD that ``encode`` writes and ``decode`` reads, and nothing else:

- attached data only, ``gzip`` or ``raw`` encoding (no ``data file``, no line or byte skips, no
  bzip2, ascii or hex);
- ``int8``, ``uint8``, ``int16``, ``uint16``, ``int32``, ``uint32``, ``float`` and ``double`` voxels,
  little or big endian;
- an LPS grid: 3 domain axes (a volume ``[K, J, I]``), plus a first ``vector`` axis of 3 or 4
  components (an RGB volume ``[K, J, I, C]``) or a last ``list`` axis (layers ``[L, K, J, I]``);
- ``MedVLSM_*`` key/value pairs for the run's facts.

``decode`` trusts nothing it is given. It parses the header itself (pynrrd would open the file a
``data file`` line names), checks the decoded size — sizes x bytes per voxel — against the caller's
``Limits`` before decoding, and inflates gzip as a stream that stops the moment the output would
exceed that size or the input ends short. Its error texts speak of the bytes it was sent only.
"""

from __future__ import annotations

import io as stdio
import re
import zlib
from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .volume import Volume

ENCODINGS = {"gzip": "gzip", "gz": "gzip", "raw": "raw"}
VOXEL_TYPES = {  # NRRD's names (and the synonyms its spec lists) -> numpy; 64-bit integers are refused
    **dict.fromkeys(("int8", "signed char", "int8_t"), "i1"),
    **dict.fromkeys(("uint8", "uchar", "unsigned char", "uint8_t"), "u1"),
    **dict.fromkeys(("int16", "short", "short int", "signed short", "signed short int", "int16_t"), "i2"),
    **dict.fromkeys(("uint16", "ushort", "unsigned short", "unsigned short int", "uint16_t"), "u2"),
    **dict.fromkeys(("int32", "int", "signed int", "int32_t"), "i4"),
    **dict.fromkeys(("uint32", "uint", "unsigned int", "uint32_t"), "u4"),
    "float": "f4", "double": "f8",
}
FIELDS = ("type", "dimension", "space", "sizes", "space directions", "kinds", "endian", "encoding", "space origin")
DETACHED = ("data file", "datafile", "line skip", "lineskip", "byte skip", "byteskip")
LPS = ("left-posterior-superior", "lps")
MAX_HEADER_BYTES = 64 << 10
CHUNK = 1 << 20


@dataclass(frozen=True)
class Limits:
    """What ``decode`` may produce: values (voxels x components or layers) and decoded bytes."""

    max_values: int
    max_bytes: int


def encode(grid: Volume, array: np.ndarray | None = None, fields: dict | None = None) -> bytes:
    """An array on ``grid`` as gzip NRRD bytes with the grid's geometry (LPS): ``[K, J, I]``, an RGB
    ``[K, J, I, C]`` or layers ``[L, K, J, I]``; ``fields``: extra text fields (``MedVLSM_*``)."""
    array = grid.array if array is None else array
    out = stdio.BytesIO()
    write_nrrd(out, array, grid_header(grid, array, fields))
    return out.getvalue()


def labels_fingerprint(grid: Volume, layers: np.ndarray, names) -> str:
    """The key of a case's labels on the server (``PUT /labels/{key}``): uint8 layers ``[S, K, J, I]``,
    their grid and names, as ``Volume.fingerprint`` keys a volume."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(layers, np.uint8).data)
    h.update(repr((layers.shape, grid.ijk_to_lps().round(6).tolist(), list(names))).encode())
    return h.hexdigest()


def grid_header(grid: Volume, array: np.ndarray, fields: dict | None = None) -> dict:
    """The NRRD header of ``array`` on ``grid`` (LPS; the axes as ``encode`` describes them)."""
    directions = (grid.direction @ np.diag(grid.spacing)).T  # rows: i, j, k steps in LPS mm
    layers = array.ndim == 4 and array.shape[1:] == grid.shape
    header = {"space": "left-posterior-superior", "space origin": np.asarray(grid.origin, float),
              "encoding": "gzip", **{f"MedVLSM_{k}": str(v) for k, v in (fields or {}).items()}}
    if array.ndim == 3:
        header.update(kinds=["domain"] * 3, **{"space directions": directions})
    elif layers:  # the slowest axis in C order is the last in NRRD's
        header.update(kinds=["domain"] * 3 + ["list"], **{"space directions": np.vstack([directions, np.full(3, np.nan)])})
    else:
        header.update(kinds=["vector"] + ["domain"] * 3, **{"space directions": np.vstack([np.full(3, np.nan), directions])})
    return header


def write_nrrd(file, array: np.ndarray, header: dict, level: int = 1) -> None:
    """``array`` (C order) with ``header`` as gzip NRRD into the open binary ``file``, compressed slab by
    slab: beside the compressed bytes, a slab's copy at most (pynrrd's ``write`` copies the whole array
    with ``tobytes`` first). The header is pynrrd's own (its field formatting and order)."""
    from nrrd import writer

    header = writer._handle_header(array, {**header, "encoding": "gzip"}, "C")
    writer._write_header(file, header)
    deflate = zlib.compressobj(level, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    step = max(1, (8 << 20) // max(1, array[0].nbytes)) if array.ndim else 1
    for start in range(0, len(array), step):
        slab = np.ascontiguousarray(array[start : start + step])  # a view when the array is C-contiguous
        file.write(deflate.compress(memoryview(slab).cast("B")))
    file.write(deflate.flush())


def _refuse(source: str, problem: str) -> InputError:
    return InputError(f"{source} is not a volume medvlsm accepts: {problem}",
                      "Send what medvlsm.wire.encode writes (gzip or raw NRRD with attached data)")


def _printable(text: str, limit: int = 40) -> str:
    return repr(text[:limit])


def _vector(text: str, source: str) -> np.ndarray | None:
    """``(x,y,z)`` -> 3 finite floats; ``none`` -> None."""
    text = text.strip()
    if text == "none":
        return None
    match = re.fullmatch(r"\(([^()]*)\)", text)
    try:
        values = np.array([float(v) for v in match.group(1).split(",")]) if match else None
    except ValueError:
        values = None
    if values is None or values.shape != (3,) or not np.isfinite(values).all():
        raise _refuse(source, f"{_printable(text)} is not a vector of three finite numbers")
    return values


def _split_header(data, source: str) -> tuple[dict, dict, int]:
    """``(fields, MedVLSM key/values, offset of the data)``; every field checked against the list."""
    end = bytes(data[:MAX_HEADER_BYTES + 2]).find(b"\n\n")
    if end < 0:
        raise _refuse(source, f"no NRRD header ending within {MAX_HEADER_BYTES >> 10} KB")
    try:
        lines = bytes(data[:end]).decode("ascii").split("\n")
    except UnicodeDecodeError:
        raise _refuse(source, "the header is not ASCII text") from None
    if not re.fullmatch(r"NRRD000[1-5]", lines[0]):
        raise _refuse(source, "it does not start with an NRRD magic line")
    fields, facts = {}, {}
    for line in lines[1:]:
        if line.startswith("#"):
            continue
        if ":=" in line:
            key, value = line.split(":=", 1)
            if key.startswith("MedVLSM_"):
                facts[key[len("MedVLSM_"):]] = value
            continue
        name, sep, value = line.partition(": ")
        name = name.strip().lower()
        if not sep:
            raise _refuse(source, f"header line {_printable(line)} is not 'field: value'")
        if name in DETACHED:
            raise _refuse(source, f"'{name}' (data outside the upload) is not accepted")
        if name not in FIELDS:
            raise _refuse(source, f"header field {_printable(name)} is not accepted")
        if name in fields:
            raise _refuse(source, f"header field '{name}' appears twice")
        fields[name] = value.strip()
    missing = [f for f in FIELDS if f not in fields and f != "endian"]
    if missing:
        raise _refuse(source, f"the header lacks {', '.join(missing)}")
    return fields, facts, end + 2


@dataclass(frozen=True)
class _Layout:
    sizes: tuple  # C order (slowest first)
    dtype: np.dtype
    encoding: str
    layers: bool  # a last 'list' axis: [L, K, J, I]
    directions: np.ndarray  # the three domain axes' steps (rows: i, j, k)
    origin: np.ndarray

    @property
    def values(self) -> int:
        return int(np.prod(self.sizes, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.values * self.dtype.itemsize


def _layout(fields: dict, source: str) -> _Layout:
    kind = VOXEL_TYPES.get(fields["type"].lower())
    if kind is None:
        raise _refuse(source, f"voxel type {_printable(fields['type'])} is not one of int8..int32, uint8..uint32, "
                              "float, double (convert 64-bit integers to int32 or float)")
    encoding = ENCODINGS.get(fields["encoding"].lower())
    if encoding is None:
        raise _refuse(source, f"encoding {_printable(fields['encoding'])} is not gzip or raw")
    endian = fields.get("endian", "").lower()
    if np.dtype(kind).itemsize > 1 and endian not in ("little", "big"):
        raise _refuse(source, "a multi-byte voxel type needs 'endian: little' or 'big'")
    dtype = np.dtype(kind).newbyteorder(">" if endian == "big" else "<")
    if fields["space"].lower() not in LPS:
        raise _refuse(source, "the space is not left-posterior-superior")
    try:
        dimension = int(fields["dimension"])
        sizes = [int(s) for s in fields["sizes"].split()]
    except ValueError:
        raise _refuse(source, "dimension and sizes are not integers") from None
    kinds = fields["kinds"].split()
    if dimension not in (3, 4) or len(sizes) != dimension or len(kinds) != dimension:
        raise _refuse(source, "it is not a 3D volume, an RGB volume or a stack of layers (3 or 4 axes)")
    if not all(0 < s < 2**31 for s in sizes):
        raise _refuse(source, "every size must be a positive integer")
    vectors = [_vector(v, source) for v in re.findall(r"\([^()]*\)|none", fields["space directions"])]
    domain = [n for n, k in enumerate(kinds) if k in ("domain", "space")]
    extra = [n for n in range(dimension) if n not in domain]
    if (len(domain) != 3 or len(vectors) != dimension or any(vectors[n] is None for n in domain)
            or any(vectors[n] is not None for n in extra)):
        raise _refuse(source, "the space directions do not give three domain axes (and 'none' for the other)")
    if extra and not (extra == [3] and kinds[3] == "list" or extra == [0] and sizes[0] in (3, 4)):
        raise _refuse(source, "a fourth axis must be the first (3 or 4 colour components) or a last 'list' axis")
    return _Layout(tuple(reversed(sizes)), dtype, encoding, extra == [3],
                   np.array([vectors[n] for n in domain]), _vector(fields["space origin"], source))


def _check_budget(layout: _Layout, limits: Limits, source: str) -> None:
    if layout.values > limits.max_values or layout.nbytes > limits.max_bytes:
        raise InputError(f"{source} declares {layout.values:,} values ({layout.nbytes / 2**20:,.0f} MB decoded), more "
                         f"than accepted here ({limits.max_values:,} values, {limits.max_bytes / 2**20:,.0f} MB)",
                         "Send a smaller volume (crop it) or ask the server's operator to raise "
                         "--max-voxels / --max-volume-mb")


def _inflate(payload: memoryview, out: np.ndarray, source: str) -> None:
    """gzip ``payload`` -> exactly ``out.nbytes`` bytes in ``out``, in chunks: never more in memory."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    filled, position = 0, 0
    try:
        while position < len(payload) or inflater.unconsumed_tail:
            data = inflater.unconsumed_tail or payload[position:position + CHUNK]
            if not inflater.unconsumed_tail:
                position += len(data)
            room = out.nbytes - filled
            piece = inflater.decompress(data, room + 1)  # one byte more than fits: the overflow shows
            if len(piece) > room:
                raise _refuse(source, f"its data inflates to more than the {out.nbytes:,} bytes its header declares")
            out[filled:filled + len(piece)] = np.frombuffer(piece, np.uint8)
            filled += len(piece)
            if inflater.eof:
                break
    except zlib.error:
        raise _refuse(source, "its gzip data is damaged") from None
    if not inflater.eof or filled != out.nbytes:
        raise _refuse(source, f"its data ends short of the {out.nbytes:,} bytes its header declares")
    if inflater.unused_data or position < len(payload):
        raise _refuse(source, "bytes follow the end of its gzip data")


def decode(data, limits: Limits, source: str = "The upload") -> tuple[Volume, np.ndarray, dict]:
    """The inverse of ``encode``: ``(grid, array, facts)``; ``grid.array is array`` for a volume,
    layers ``[L, K, J, I]`` come on a grid of ``[K, J, I]``. ``data``: bytes or a bytearray (not
    copied). Anything outside the wire format, or beyond ``limits``, is an ``InputError`` — checked
    before a byte is decoded."""
    payload = memoryview(data).cast("B")
    fields, facts, offset = _split_header(payload, source)
    layout = _layout(fields, source)
    _check_budget(layout, limits, source)
    raw = np.empty(layout.nbytes, np.uint8)
    if layout.encoding == "gzip":
        _inflate(payload[offset:], raw, source)
    elif len(payload) - offset != layout.nbytes:
        raise _refuse(source, f"it holds {len(payload) - offset:,} bytes of raw data, not the {layout.nbytes:,} "
                              "its header declares")
    else:
        raw[:] = np.frombuffer(payload[offset:], np.uint8)
    array = raw.view(layout.dtype).reshape(layout.sizes)
    if not layout.dtype.isnative:
        array = array.byteswap(inplace=True).view(layout.dtype.newbyteorder("="))
    spacing = np.linalg.norm(layout.directions, axis=1)
    if not (spacing > 0).all():
        raise _refuse(source, "a space direction has zero length")
    if layout.origin is None:
        raise _refuse(source, "the space origin is 'none'")
    voxels = np.broadcast_to(np.uint8(0), array.shape[1:]) if layout.layers else array  # a grid without memory
    grid = Volume(voxels, tuple(spacing), tuple(layout.origin), (layout.directions / spacing[:, None]).T, source)
    return grid, array, facts
