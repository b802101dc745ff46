"""Files in and out of ``prato-predict``: images, volumes, box files and masks.

Inputs (the format is taken from the file name):

- PNG / JPEG: one 2-D image; 8- or 16-bit grayscale, RGB (palette images are converted to RGB, alpha
  is dropped), as the pixel values stored.
- NIfTI (``.nii``, ``.nii.gz``): a volume segmented slice by slice along its third voxel axis;
  nibabel's ``(x, y, z)`` becomes ``(D, H, W) = (z, y, x)`` as ACDC training reads it. A 2-D file (or
  ``z = 1``) is a volume of one slice. The affine and header are kept to write the mask.
- h5 (``.h5``, ``.hdf5``, the SSL4MIS ACDC layout): dataset ``image``, ``(H, W)`` or ``(D, H, W)``,
  intensities already scaled to [0, 1] for training, so they are used as stored (``intensity="range"``).

Box files: CSV with a header naming ``image_id, x0, y0, x1, y1`` and optionally ``slice``, ``z0``, ``z1``;
or JSON, a list of ``{"image_id": ..., "slice": ..., "box": [x0, y0, x1, y1]}`` objects (``slice``
optional; a 6-value box ``[x0, y0, z0, x1, y1, z1]`` is a 3-D box). ``image_id`` is the file name or the
name without its extension. For a volume: rows with a slice give that slice its box (other slices get
no prediction); one row without a slice gives every slice the same box, or with ``z0``/``z1`` (or six
values) a 3-D box.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import h5py
import nibabel as nib
import numpy as np
from PIL import Image, UnidentifiedImageError

Format = Literal["png", "jpeg", "nifti", "h5"]
SUFFIXES: dict[str, Format] = {
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".nii": "nifti",
    ".nii.gz": "nifti",
    ".h5": "h5",
    ".hdf5": "h5",
}
MASK_SUFFIX: dict[Format, str] = {"png": ".png", "jpeg": ".png", "nifti": ".nii.gz", "h5": ".h5"}


class InputError(ValueError):
    """A file that cannot be used as an input; the message names the file."""


class BoxFileError(ValueError):
    """A box file that cannot be read, or a row that names no input; the message names file and line."""


def input_format(path: str | Path) -> Format | None:
    """The input format of ``path`` from its name, or None for a file that is not an input."""
    name = Path(path).name.lower()
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return SUFFIXES[suffix]
    return None


def image_id_of(path: str | Path) -> str:
    """The file name without its input extension (``patient001_frame01.nii.gz`` -> ``patient001_frame01``)."""
    name = Path(path).name
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def list_inputs(path: str | Path) -> tuple[list[Path], list[Path]]:
    """The input files of ``path`` (a file or a folder, not recursive) and the folder's other files.

    Raises FileNotFoundError for a missing path, InputError for a single file of another format, an
    empty folder, or two inputs with the same image id (their outputs would overwrite each other).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    if path.is_file():
        if input_format(path) is None:
            raise InputError(f"{path}: not an input format; expected one of {sorted(set(SUFFIXES))}")
        return [path], []
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    inputs = [p for p in files if input_format(p) is not None]
    others = [p for p in files if input_format(p) is None]
    if not inputs:
        raise InputError(f"{path} holds no input file; expected one of {sorted(set(SUFFIXES))}")
    seen: dict[str, Path] = {}
    for p in inputs:
        if image_id_of(p) in seen:
            raise InputError(
                f"{seen[image_id_of(p)].name} and {p.name} share the image id {image_id_of(p)!r}; their "
                "outputs would overwrite each other: rename one"
            )
        seen[image_id_of(p)] = p
    return inputs, others


@dataclass
class InputImage:
    """One input file read into memory.

    Attributes:
        path: the file.
        image_id: its name without extension (used in outputs and messages).
        format: ``png``, ``jpeg``, ``nifti`` or ``h5``.
        array: ``(H, W)`` or ``(H, W, 3)`` for a 2-D image, ``(D, H, W)`` for a volume, as stored.
        is_volume: True for NIfTI volumes and 3-D h5 images.
        intensity: the scaling to use (``range`` for h5 files, already scaled; else ``auto``).
        nifti: the NIfTI image (header and affine) of a NIfTI input, to write its mask alike.
        nifti_shape: the stored voxel shape of a NIfTI input.
    """

    path: Path
    image_id: str
    format: Format
    array: np.ndarray
    is_volume: bool
    intensity: str = "auto"
    nifti: Any = None
    nifti_shape: tuple[int, ...] | None = None

    @property
    def hw(self) -> tuple[int, int]:
        """``(H, W)`` of the image or of each slice."""
        return (
            (int(self.array.shape[-2]), int(self.array.shape[-1])) if self.is_volume else self.array.shape[:2]
        )


def read_input(path: str | Path) -> InputImage:
    """Read one input file; an unreadable or unusable file raises InputError naming it."""
    path = Path(path)
    fmt = input_format(path)
    if fmt is None:
        raise InputError(f"{path}: not an input format; expected one of {sorted(set(SUFFIXES))}")
    reader = {"png": _read_picture, "jpeg": _read_picture, "nifti": _read_nifti, "h5": _read_h5}[fmt]
    image = reader(path, fmt)
    if min(image.hw) < 1 or image.array.size == 0:
        raise InputError(f"{path}: empty image of shape {image.array.shape}")
    if not np.isfinite(image.array).all():
        raise InputError(f"{path}: image has NaN or inf values")
    return image


def _read_picture(path: Path, fmt: Format) -> InputImage:
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBA", "RGBX", "1"):
                img = img.convert("L" if img.mode == "1" else "RGB")
            elif img.mode == "LA":
                img = img.getchannel("L")
            array = np.asarray(img)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise InputError(f"{path}: unreadable image ({err})") from err
    if array.ndim == 3 and array.shape[-1] not in (1, 3):
        raise InputError(f"{path}: {array.shape[-1]} channels; expected grayscale or RGB")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return InputImage(path, image_id_of(path), fmt, np.ascontiguousarray(array), is_volume=False)


def _read_nifti(path: Path, fmt: Format) -> InputImage:
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel raises many types for broken files
        raise InputError(f"{path}: unreadable NIfTI file ({err})") from err
    shape = tuple(int(s) for s in data.shape)
    if data.ndim == 4 and shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise InputError(
            f"{path}: NIfTI of shape {shape}; expected a 2-D image or a 3-D volume (a 4-D cine series: "
            "save one frame per file)"
        )
    volume = np.ascontiguousarray(data.transpose(2, 1, 0))  # (x, y, z) -> (D, H, W)
    return InputImage(path, image_id_of(path), fmt, volume, is_volume=True, nifti=img, nifti_shape=shape)


def _read_h5(path: Path, fmt: Format) -> InputImage:
    try:
        with h5py.File(path, "r") as f:
            if "image" not in f:
                raise InputError(
                    f"{path}: no 'image' dataset (found {sorted(f.keys())}); expected the h5 layout"
                )
            array = np.asarray(f["image"][()])
    except InputError:
        raise
    except (OSError, KeyError) as err:
        raise InputError(f"{path}: unreadable h5 file ({err})") from err
    if array.ndim not in (2, 3):
        raise InputError(f"{path}: 'image' of shape {array.shape}; expected (H, W) or (D, H, W)")
    return InputImage(path, image_id_of(path), fmt, array, is_volume=array.ndim == 3, intensity="range")


def write_mask(mask: np.ndarray, image: InputImage, folder: Path) -> Path:
    """Write ``mask`` (``(H, W)`` or ``(D, H, W)`` class indices) next to nothing: into ``folder``.

    PNG for pictures (8-bit class indices), NIfTI for NIfTI inputs (the input's affine and header, uint8),
    h5 for h5 inputs (dataset ``label`` of the image's shape). Returns the written path.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{image.image_id}{MASK_SUFFIX[image.format]}"
    labels = mask.astype(np.uint8)
    if image.format == "nifti":
        voxels = labels.transpose(2, 1, 0).reshape(image.nifti_shape)  # (D, H, W) -> stored (x, y, z)
        header = image.nifti.header.copy()
        out = type(image.nifti)(voxels, image.nifti.affine, header)
        out.set_data_dtype(np.uint8)
        out.header.set_slope_inter(1.0, 0.0)
        nib.save(out, path)
    elif image.format == "h5":
        with h5py.File(path, "w") as f:
            f.create_dataset("label", data=labels, compression="gzip")
    else:
        Image.fromarray(labels).save(path)  # 2-D uint8: 8-bit grayscale PNG
    return path


@dataclass(frozen=True)
class BoxEntry:
    """One row of a box file: which image (and slice) gets which box.

    ``box`` holds 4 values ``(x0, y0, x1, y1)`` or 6 ``(x0, y0, z0, x1, y1, z1)``; ``where`` says
    ``file line N`` (or ``file item N``) for messages.
    """

    image_id: str
    slice_index: int | None
    box: tuple[float, ...]
    where: str


def read_box_file(path: str | Path) -> list[BoxEntry]:
    """Read a CSV or JSON box file (see the module docstring); malformed rows raise BoxFileError."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"box file not found: {path}")
    if path.suffix.lower() == ".json":
        entries = _read_json_boxes(path)
    elif path.suffix.lower() == ".csv":
        entries = _read_csv_boxes(path)
    else:
        raise BoxFileError(f"{path}: box files are .csv or .json")
    if not entries:
        raise BoxFileError(f"{path}: no boxes in it")
    seen: dict[tuple[str, int | None], str] = {}
    for entry in entries:
        key = (entry.image_id, entry.slice_index)
        if key in seen:
            what = f"slice {entry.slice_index} of " if entry.slice_index is not None else ""
            raise BoxFileError(f"{entry.where}: a second box for {what}{entry.image_id!r} ({seen[key]})")
        seen[key] = entry.where
    return entries


def _number(value: Any, what: str, where: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise BoxFileError(f"{where}: {what}={value!r} is not a number") from None


def _slice(value: Any, where: str) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    number = _number(value, "slice", where)
    if not number.is_integer() or number < 0:
        raise BoxFileError(f"{where}: slice={value!r} is not a slice index (0, 1, 2, ...)")
    return int(number)


def _read_csv_boxes(path: Path) -> list[BoxEntry]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        needed = ["image_id", "x0", "y0", "x1", "y1"]
        missing = [c for c in needed if c not in columns]
        if missing:
            raise BoxFileError(
                f"{path}: header {columns} lacks {missing}; expected image_id,slice,x0,y0,x1,y1 "
                "(slice, z0, z1 optional)"
            )
        entries = []
        for line, raw in enumerate(reader, start=2):
            row = {k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in raw.items() if k}
            where = f"{path.name} line {line}"
            if not row.get("image_id"):
                raise BoxFileError(f"{where}: no image_id")
            xy = [_number(row.get(c), c, where) for c in ("x0", "y0", "x1", "y1")]
            z = [row.get("z0") or "", row.get("z1") or ""]
            if any(z) and not all(z):
                raise BoxFileError(f"{where}: give both z0 and z1 for a 3-D box, or neither")
            box = tuple(xy)
            if all(z):
                z0, z1 = (_number(v, name, where) for v, name in zip(z, ("z0", "z1"), strict=True))
                box = (xy[0], xy[1], z0, xy[2], xy[3], z1)
            entries.append(BoxEntry(row["image_id"], _slice(row.get("slice"), where), box, where))
    return entries


def _read_json_boxes(path: Path) -> list[BoxEntry]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BoxFileError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, list):
        raise BoxFileError(
            f'{path}: expected a list of {{"image_id": ..., "slice": ..., "box": [...]}} objects'
        )
    entries = []
    for i, item in enumerate(data):
        where = f"{path.name} item {i}"
        if not isinstance(item, dict) or "image_id" not in item or "box" not in item:
            raise BoxFileError(
                f'{where}: expected {{"image_id": ..., "box": [x0, y0, x1, y1]}}, got {item!r}'
            )
        box = item["box"]
        if not isinstance(box, list) or len(box) not in (4, 6):
            raise BoxFileError(
                f"{where}: box must be 4 numbers (x0, y0, x1, y1) or 6 (x0, y0, z0, x1, y1, z1)"
            )
        values = tuple(_number(v, f"box[{j}]", where) for j, v in enumerate(box))
        entries.append(BoxEntry(str(item["image_id"]), _slice(item.get("slice"), where), values, where))
    return entries


def check_box_ids(entries: Sequence[BoxEntry], inputs: Sequence[Path]) -> None:
    """Raise BoxFileError naming every box-file row whose image id matches no input file."""
    known = {image_id_of(p) for p in inputs} | {p.name for p in inputs}
    unknown = [e for e in entries if e.image_id not in known]
    if unknown:
        rows = ", ".join(f"{e.image_id!r} ({e.where})" for e in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        names = sorted(image_id_of(p) for p in inputs)
        shown = names[:8] + (["..."] if len(names) > 8 else [])
        raise BoxFileError(f"box file rows name images that are not inputs: {rows}{more}; inputs are {shown}")


def boxes_for(image: InputImage, entries: Sequence[BoxEntry]) -> np.ndarray | dict[int, np.ndarray]:
    """The box argument of :meth:`Segmenter.predict` for ``image`` from the box-file rows.

    2-D image: ``(4,)``. Volume: ``(6,)`` (a 3-D box), ``(D, 4)`` (one box for every slice) or
    ``{slice: (4,)}`` (only the listed slices are segmented). Raises BoxFileError when the rows do not
    fit the image (no row, a slice row for a 2-D image, a slice out of range, mixed forms).
    """
    rows = [e for e in entries if e.image_id in (image.image_id, image.path.name)]
    if not rows:
        raise BoxFileError(f"{image.path.name}: no box for image id {image.image_id!r} in the box file")
    if not image.is_volume:
        if len(rows) > 1 or rows[0].slice_index not in (None, 0) or len(rows[0].box) != 4:
            raise BoxFileError(
                f"{rows[0].where}: {image.path.name} is a 2-D image: give one row, a 4-value box, no slice"
            )
        return np.asarray(rows[0].box, dtype=np.float64)
    depth = int(image.array.shape[0])
    whole = [e for e in rows if e.slice_index is None]
    if whole:
        if len(rows) > 1:
            raise BoxFileError(
                f"{whole[0].where}: {image.path.name} has a row without a slice and other rows; give "
                "either one box for the volume or one row per slice"
            )
        box = np.asarray(whole[0].box, dtype=np.float64)
        return box if box.size == 6 else np.repeat(box[None], depth, axis=0)
    per_slice = {}
    for e in rows:
        if len(e.box) != 4:
            raise BoxFileError(f"{e.where}: a row with a slice takes a 4-value box (x0, y0, x1, y1)")
        if e.slice_index >= depth:
            raise BoxFileError(
                f"{e.where}: slice {e.slice_index} out of range for {image.path.name} ({depth} slices)"
            )
        per_slice[e.slice_index] = np.asarray(e.box, dtype=np.float64)
    return per_slice


def parse_box_argument(text: str) -> np.ndarray:
    """``"x0,y0,x1,y1"`` (or six values with z) from the command line; values may be ``nan`` or ``inf``
    (they are then refused by the box check, which names the image)."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (4, 6):
        raise ValueError(f"--box takes 4 numbers x0,y0,x1,y1 (or 6: x0,y0,z0,x1,y1,z1), got {text!r}")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"--box {text!r}: not all numbers") from None
    return np.asarray(values, dtype=np.float64)


__all__ = [
    "BoxEntry",
    "BoxFileError",
    "InputError",
    "InputImage",
    "boxes_for",
    "check_box_ids",
    "image_id_of",
    "input_format",
    "list_inputs",
    "parse_box_argument",
    "read_box_file",
    "read_input",
    "write_mask",
]
