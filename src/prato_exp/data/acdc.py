"""ACDC cine-MRI (Bernard et al. 2018) in either of its two common layouts, detected from the folder.

* SSL4MIS h5: ``train_slices.list``, ``val.list`` and optionally ``test.list`` next to ``data/``, which holds
  ``data/slices/patientXXX_frameYY_slice_N.h5`` (training slices) and ``data/patientXXX_frameYY.h5``
  (evaluation volumes), each with datasets ``image`` (already scaled to [0, 1]) and ``label``.
* Official NIfTI: ``training/patientXXX/patientXXX_frameYY.nii.gz`` with ``patientXXX_frameYY_gt.nii.gz``
  and ``Info.cfg``, optionally ``testing/`` alike (also found one level down, under ``database/``).
  Patients are split by ``split_seed``; volumes are min-max scaled to [0, 1] per volume.

Labels: 0 background, 1 right ventricle, 2 myocardium, 3 left ventricle.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np

from prato_exp.data.base import (
    Case,
    DataContentError,
    DataLayoutError,
    SegSource,
    SliceRef,
    check_finite,
    require_dir,
)

NUM_CLASSES = 4
H5_LAYOUT = (
    "the SSL4MIS h5 layout (train_slices.list and val.list, optionally test.list, next to data/slices/*.h5 "
    "and data/patientXXX_frameYY.h5)"
)
NIFTI_LAYOUT = (
    "the official NIfTI layout (training/patientXXX/patientXXX_frameYY.nii.gz with "
    "patientXXX_frameYY_gt.nii.gz and Info.cfg, optionally testing/ alike)"
)
EXPECTED = f"ACDC in {H5_LAYOUT} or in {NIFTI_LAYOUT}"

_SLICE_NAME = re.compile(r"(patient\d+_frame\d+)_slice_(\d+)")
_VOLUME_NAME = re.compile(r"patient\d+_frame\d+")
_FRAME_FILE = re.compile(r"(patient\d+_frame\d+)(_gt)?\.nii(\.gz)?")


def _patient(case_id: str) -> str:
    return case_id.split("_", 1)[0]


def _check_labels(label: np.ndarray, path: Path) -> np.ndarray:
    """Validate class indices 0..3 and return them as int64."""
    if label.size and (label.min() < 0 or label.max() >= NUM_CLASSES):
        values = np.unique(label)
        raise DataContentError(f"{path}: labels {values.tolist()} outside the ACDC classes {{0, 1, 2, 3}}.")
    if np.issubdtype(label.dtype, np.floating) and not np.array_equal(label, np.round(label)):
        raise DataContentError(f"{path}: labels are not whole numbers.")
    return label.astype(np.int64)


def _read_h5(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``image`` float32 and ``label`` int64 of one h5 file, shapes ``(H, W)`` or ``(D, H, W)``."""
    try:
        with h5py.File(path, "r") as f:
            image = np.asarray(f["image"][()], dtype=np.float32)
            label = np.asarray(f["label"][()])
    except FileNotFoundError:
        raise DataContentError(f"{path}: listed in the split files but not found.") from None
    except (OSError, KeyError) as err:
        raise DataContentError(f"{path}: unreadable h5 file or no 'image'/'label' datasets ({err}).") from err
    if image.shape != label.shape:
        raise DataContentError(f"{path}: image shape {image.shape} differs from label shape {label.shape}.")
    check_finite(image, str(path))
    if image.size and (image.min() < -1e-3 or image.max() > 1 + 1e-3):
        raise DataContentError(
            f"{path}: image intensities span [{image.min():.3g}, {image.max():.3g}], expected [0, 1] "
            "(SSL4MIS h5 files are min-max scaled per volume)."
        )
    return np.clip(image, 0.0, 1.0), _check_labels(label, path)


def _read_list(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


class ACDCSource(SegSource):
    """ACDC from ``root``, in the SSL4MIS h5 layout or the official NIfTI layout (see the module docstring).

    Args:
        root: dataset folder.
        split_seed: seed of the patient-level split (NIfTI layout only; the h5 layout has fixed lists).
        val_fraction: share of the training patients used for validation (NIfTI layout).
        test_fraction: share used for testing when there is no ``testing/`` folder (NIfTI layout).
        percentile_clip: ``(low, high)`` percentiles to clip each NIfTI volume to before min-max scaling.

    ``has_test_split`` is False when the data holds no test cases (the shared h5 copy has no ``test.list``);
    callers then report validation figures and must say so.
    """

    name = "acdc"
    num_classes = NUM_CLASSES
    in_channels = 1
    class_names = ("RV", "Myo", "LV")

    def __init__(
        self,
        root: str | Path,
        split_seed: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        percentile_clip: Sequence[float] | None = None,
    ) -> None:
        for label, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= fraction < 1.0:
                raise ValueError(f"{label} must be in [0, 1), got {fraction}.")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction}.")
        if percentile_clip is not None:
            low, high = (float(p) for p in percentile_clip)
            if not 0.0 <= low < high <= 100.0:
                raise ValueError(
                    f"percentile_clip must be (low, high) with 0 <= low < high <= 100, got {percentile_clip}."
                )
            percentile_clip = (low, high)
        self.root = require_dir(root, EXPECTED)
        self.split_seed = split_seed
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.percentile_clip = percentile_clip
        self._volumes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._spacing: dict[str, tuple[float, float]] = {}
        self._slice_spacing: dict[str, float] = {}

        if (self.root / "train_slices.list").is_file():
            self.layout = "h5"
            self._init_h5()
        else:
            nifti_root = next(
                (p for p in (self.root, self.root / "database") if (p / "training").is_dir()), None
            )
            if nifti_root is None:
                found = sorted(p.name for p in self.root.iterdir())[:10]
                raise DataLayoutError(
                    f"{self.root} holds neither {H5_LAYOUT} nor {NIFTI_LAYOUT}; found {found}."
                )
            self.layout = "nifti"
            self._init_nifti(nifti_root)
        self._check_disjoint()

    @property
    def has_test_split(self) -> bool:
        return bool(self._splits["test"])

    def split_ids(self) -> dict[str, list[str]]:
        return {split: list(ids) for split, ids in self._splits.items()}

    def train_slices(self) -> list[SliceRef]:
        return list(self._train_slices)

    def load_slice(self, ref: SliceRef) -> tuple[np.ndarray, np.ndarray]:
        """Image ``(1, H, W)`` float32 in [0, 1] and label ``(H, W)`` int64."""
        if ref.case_id in self._case_slices:
            if ref not in self._slice_files:
                raise KeyError(f"No training slice {ref} under {self.root}.")
            image, label = _read_h5(self._slice_files[ref])
            if image.ndim != 2:
                raise DataContentError(
                    f"{self._slice_files[ref]}: expected a 2-D slice, got shape {image.shape}."
                )
            return image[None], label
        image, label = self._volume(ref.case_id)
        if not 0 <= ref.slice_index < label.shape[0]:
            raise KeyError(
                f"Slice {ref.slice_index} out of range for {ref.case_id} ({label.shape[0]} slices)."
            )
        return image[ref.slice_index][None], label[ref.slice_index].astype(np.int64)

    def load_case(self, case_id: str) -> Case:
        """Image ``(1, D, H, W)`` float32 in [0, 1], label ``(D, H, W)`` int64; spacing from NIfTI only."""
        image, label = self._volume(case_id)
        return Case(
            case_id=case_id,
            image=image[None],
            label=label.astype(np.int64),
            spacing_hw=self._spacing.get(case_id),
            slice_spacing=self._slice_spacing.get(case_id),
        )

    def _volume(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        """``(D, H, W)`` float32 image and uint8 label of one case, loaded once and kept."""
        if case_id not in self._volumes:
            if case_id in self._volume_files:
                self._volumes[case_id] = self._load_volume(case_id)
            elif case_id in self._case_slices:
                slices = [self.load_slice(ref) for ref in self._case_slices[case_id]]
                shapes = {s[1].shape for s in slices}
                if len(shapes) > 1:
                    raise DataContentError(f"Slices of {case_id} under {self.root} differ in size: {shapes}.")
                self._volumes[case_id] = (
                    np.stack([s[0][0] for s in slices]),
                    np.stack([s[1] for s in slices]).astype(np.uint8),
                )
            else:
                raise KeyError(f"Unknown ACDC case id {case_id!r} under {self.root}.")
        return self._volumes[case_id]

    def _load_volume(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        if self.layout == "h5":
            path = self._volume_files[case_id]
            image, label = _read_h5(path)
            if image.ndim != 3:
                raise DataContentError(f"{path}: expected a (D, H, W) volume, got shape {image.shape}.")
            return image, label.astype(np.uint8)
        image_path, gt_path = self._volume_files[case_id]
        image = check_finite(self._read_nifti(image_path).astype(np.float32), str(image_path))
        label = _check_labels(self._read_nifti(gt_path), gt_path)
        if image.shape != label.shape:
            raise DataContentError(
                f"{image_path}: image shape {image.shape} differs from {gt_path} {label.shape}."
            )
        return self._scale(image), label.astype(np.uint8)

    def _scale(self, image: np.ndarray) -> np.ndarray:
        """Optional percentile clip, then min-max to [0, 1] over the whole volume."""
        if self.percentile_clip is not None:
            low, high = np.percentile(image, self.percentile_clip)
            image = np.clip(image, low, high)
        lo, hi = float(image.min()), float(image.max())
        if hi <= lo:
            return np.zeros_like(image, dtype=np.float32)
        return ((image - lo) / (hi - lo)).astype(np.float32)

    @staticmethod
    def _read_nifti(path: Path) -> np.ndarray:
        """Voxel data as stored, transposed from nibabel's ``(x, y, z)`` to ``(D, H, W) = (z, y, x)``."""
        try:
            data = np.asanyarray(nib.load(path).dataobj)
        except Exception as err:
            raise DataContentError(f"{path}: unreadable NIfTI file ({err}).") from err
        if data.ndim != 3:
            raise DataContentError(f"{path}: expected a 3-D volume, got shape {data.shape}.")
        return np.ascontiguousarray(data.transpose(2, 1, 0))

    def _init_h5(self) -> None:
        data = self.root / "data"
        if not (data / "slices").is_dir():
            raise DataLayoutError(
                f"{self.root} has train_slices.list but no data/slices/ folder; expected {H5_LAYOUT}."
            )
        if not (self.root / "val.list").is_file():
            raise DataLayoutError(f"{self.root} has train_slices.list but no val.list; expected {H5_LAYOUT}.")

        self._slice_files: dict[SliceRef, Path] = {}
        self._case_slices: dict[str, list[SliceRef]] = {}
        list_path = self.root / "train_slices.list"
        for name in _read_list(list_path):
            match = _SLICE_NAME.fullmatch(name)
            if match is None:
                raise DataContentError(f"{list_path}: entry {name!r} is not patientXXX_frameYY_slice_N.")
            path = data / "slices" / f"{name}.h5"
            if not path.is_file():
                raise DataContentError(f"{path}: listed in {list_path} but not found.")
            ref = SliceRef(match.group(1), int(match.group(2)))
            self._slice_files[ref] = path
            self._case_slices.setdefault(ref.case_id, []).append(ref)
        if not self._slice_files:
            raise DataContentError(f"{list_path} lists no slices.")
        for refs in self._case_slices.values():
            refs.sort(key=lambda r: r.slice_index)
        self._train_slices = sorted(self._slice_files, key=lambda r: (r.case_id, r.slice_index))

        self._volume_files: dict[str, Path] = {}
        self._splits = {"train": sorted(self._case_slices), "val": [], "test": []}
        for split in ("val", "test"):
            list_path = self.root / f"{split}.list"
            if not list_path.is_file():
                continue
            for name in _read_list(list_path):
                if _VOLUME_NAME.fullmatch(name) is None:
                    raise DataContentError(f"{list_path}: entry {name!r} is not patientXXX_frameYY.")
                path = data / f"{name}.h5"
                if not path.is_file():
                    raise DataContentError(f"{path}: listed in {list_path} but not found.")
                self._volume_files[name] = path
                self._splits[split].append(name)
            self._splits[split].sort()
        if not self._splits["val"]:
            raise DataContentError(f"{self.root / 'val.list'} lists no volumes.")

    def _init_nifti(self, nifti_root: Path) -> None:
        train_patients = self._scan_patients(nifti_root / "training")
        test_patients = (
            self._scan_patients(nifti_root / "testing") if (nifti_root / "testing").is_dir() else {}
        )
        shared = sorted(set(train_patients) & set(test_patients))
        if shared:
            raise DataContentError(
                f"{nifti_root}: patients {shared} are in both training/ and testing/ (patient-level leakage)."
            )
        names = sorted(train_patients)
        order = [names[i] for i in np.random.default_rng(self.split_seed).permutation(len(names))]
        n_val = round(self.val_fraction * len(names))
        n_test = 0 if test_patients else round(self.test_fraction * len(names))
        if len(names) - n_val - n_test < 1:
            raise DataContentError(f"{nifti_root / 'training'}: {len(names)} patients are too few to split.")
        patients = {
            "val": order[:n_val],
            "test": order[n_val : n_val + n_test],
            "train": order[n_val + n_test :],
        }
        frames = {**train_patients, **test_patients}
        if test_patients:
            patients["test"] = sorted(test_patients)

        self._slice_files = {}
        self._case_slices = {}
        self._volume_files = {}
        self._splits = {split: [] for split in ("train", "val", "test")}
        for split, members in patients.items():
            for patient in sorted(members):
                for case_id, files in sorted(frames[patient].items()):
                    self._volume_files[case_id] = files
                    self._splits[split].append(case_id)
        self._train_slices = []
        train_ids = set(self._splits["train"])
        for case_id, (image_path, _) in self._volume_files.items():
            try:
                header = nib.load(image_path).header
            except Exception as err:
                raise DataContentError(f"{image_path}: unreadable NIfTI file ({err}).") from err
            shape, zooms = header.get_data_shape(), header.get_zooms()
            if len(shape) != 3:
                raise DataContentError(f"{image_path}: expected a 3-D volume, got shape {shape}.")
            self._spacing[case_id] = (float(zooms[1]), float(zooms[0]))
            self._slice_spacing[case_id] = float(zooms[2])
            if case_id in train_ids:
                self._train_slices.extend(SliceRef(case_id, k) for k in range(shape[2]))
        self._train_slices.sort(key=lambda r: (r.case_id, r.slice_index))

    @staticmethod
    def _scan_patients(folder: Path) -> dict[str, dict[str, tuple[Path, Path]]]:
        """``{patient: {case_id: (image, gt)}}`` of every ``patientXXX`` folder under ``folder``."""
        patients: dict[str, dict[str, tuple[Path, Path]]] = {}
        for patient_dir in sorted(folder.iterdir()):
            if not patient_dir.is_dir():
                continue
            if re.fullmatch(r"patient\d+", patient_dir.name) is None:
                raise DataLayoutError(f"{patient_dir}: not a patientXXX folder; expected {NIFTI_LAYOUT}.")
            images: dict[str, Path] = {}
            gts: dict[str, Path] = {}
            for path in sorted(patient_dir.iterdir()):
                match = _FRAME_FILE.fullmatch(path.name)
                if match is not None:
                    (gts if match.group(2) else images)[match.group(1)] = path
            for case_id, gt in sorted(gts.items()):
                if case_id not in images:
                    raise DataContentError(f"{gt}: ground truth without its image {case_id}.nii.gz.")
            for case_id, image in sorted(images.items()):
                if case_id not in gts:
                    raise DataContentError(f"{image}: image without its ground truth {case_id}_gt.nii.gz.")
                if _patient(case_id) != patient_dir.name:
                    raise DataContentError(
                        f"{image}: file of {_patient(case_id)} inside {patient_dir.name}/."
                    )
            if not images:
                raise DataContentError(f"{patient_dir}: no patientXXX_frameYY.nii.gz frames with _gt files.")
            patients[patient_dir.name] = {case_id: (images[case_id], gts[case_id]) for case_id in images}
        if not patients:
            raise DataLayoutError(f"{folder} holds no patientXXX folders; expected {NIFTI_LAYOUT}.")
        return patients

    def _check_disjoint(self) -> None:
        owner: dict[str, str] = {}
        for split, ids in self._splits.items():
            for case_id in ids:
                patient = _patient(case_id)
                if owner.setdefault(patient, split) != split:
                    raise DataContentError(
                        f"{self.root}: patient {patient} is in both the {owner[patient]} and the {split} "
                        "split (patient-level leakage); fix the split lists."
                    )
