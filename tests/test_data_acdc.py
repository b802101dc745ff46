"""ACDC loader: the real SSL4MIS h5 copy, small h5 and NIfTI layouts written here, and the error cases."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from prato_exp.data.acdc import ACDCSource
from prato_exp.data.base import DataContentError, DataLayoutError, SliceRef

ACDC_ROOT = Path(
    os.environ.get("PRATO_ACDC_ROOT", Path(__file__).resolve().parents[2] / "shared/data/acdc_ssl4mis")
)
SPACING_XYZ = (1.5, 1.25, 10.0)
SHAPE_XYZ = (6, 5, 3)


def _patients(ids: list[str]) -> set[str]:
    return {case_id.split("_")[0] for case_id in ids}


# ---- real SSL4MIS h5 data -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_acdc() -> ACDCSource:
    if not (ACDC_ROOT / "train_slices.list").is_file():
        pytest.skip(f"ACDC h5 data not found at {ACDC_ROOT}: set PRATO_ACDC_ROOT to the SSL4MIS folder")
    return ACDCSource(ACDC_ROOT)


def test_real_h5_splits(real_acdc: ACDCSource) -> None:
    ids = real_acdc.split_ids()
    assert real_acdc.layout == "h5"
    assert len(real_acdc.train_slices()) == 1312
    assert len(_patients(ids["train"])) == 70
    assert len(ids["val"]) == 20 and len(_patients(ids["val"])) == 10
    assert ids["test"] == [] and not real_acdc.has_test_split
    assert not _patients(ids["train"]) & _patients(ids["val"])


def test_real_h5_arrays(real_acdc: ACDCSource) -> None:
    image, label = real_acdc.load_slice(real_acdc.train_slices()[0])
    assert image.ndim == 3 and image.shape[0] == 1 and image.dtype == np.float32
    assert label.shape == image.shape[1:] and label.dtype == np.int64
    assert image.min() >= 0.0 and image.max() <= 1.0
    case = real_acdc.load_case(real_acdc.split_ids()["val"][0])
    assert case.image.ndim == 4 and case.image.shape[:2] == (1, case.num_slices) and case.num_slices > 1
    assert case.image.shape[2:] == case.label.shape[1:] and case.label.dtype == np.int64
    assert set(np.unique(case.label).tolist()) == {0, 1, 2, 3}
    assert case.spacing_hw is None


# ---- small h5 layout --------------------------------------------------------------------------------------


def _write_h5(path: Path, image: np.ndarray, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image.astype(np.float32))
        f.create_dataset("label", data=label.astype(np.uint8))


def _make_h5_root(root: Path, test: list[str] | None = None, val: list[str] | None = None) -> Path:
    rng = np.random.default_rng(0)
    slices = [f"patient00{p}_frame01_slice_{k}" for p in (1, 2) for k in (1, 2, 3)]
    for name in slices:
        _write_h5(root / "data/slices" / f"{name}.h5", rng.uniform(size=(8, 7)), rng.integers(0, 4, (8, 7)))
    volumes = (val or ["patient003_frame01", "patient003_frame02"]) + (test or [])
    for name in volumes:
        _write_h5(root / "data" / f"{name}.h5", rng.uniform(size=(3, 8, 7)), rng.integers(0, 4, (3, 8, 7)))
    (root / "train_slices.list").write_text("\n".join(slices) + "\n")
    (root / "val.list").write_text("\n".join(val or ["patient003_frame01", "patient003_frame02"]) + "\n")
    if test is not None:
        (root / "test.list").write_text("\n".join(test) + "\n")
    return root


def test_h5_layout_with_test_list(tmp_path: Path) -> None:
    source = ACDCSource(_make_h5_root(tmp_path, test=["patient004_frame01"]))
    ids = source.split_ids()
    assert ids == {
        "train": ["patient001_frame01", "patient002_frame01"],
        "val": ["patient003_frame01", "patient003_frame02"],
        "test": ["patient004_frame01"],
    }
    assert source.has_test_split
    assert source.train_slices()[:3] == [SliceRef("patient001_frame01", k) for k in (1, 2, 3)]
    case = source.load_case("patient004_frame01")
    assert case.image.shape == (1, 3, 8, 7) and case.label.shape == (3, 8, 7)
    stacked = source.load_case("patient001_frame01")
    image, label = source.load_slice(SliceRef("patient001_frame01", 2))
    np.testing.assert_array_equal(stacked.image[:, 1], image)
    np.testing.assert_array_equal(stacked.label[1], label)


def test_h5_patient_in_two_splits(tmp_path: Path) -> None:
    with pytest.raises(DataContentError, match="patient001"):
        ACDCSource(_make_h5_root(tmp_path, val=["patient001_frame02"]))


def test_h5_listed_file_missing(tmp_path: Path) -> None:
    root = _make_h5_root(tmp_path)
    (root / "data/slices/patient002_frame01_slice_3.h5").unlink()
    with pytest.raises(DataContentError, match=r"patient002_frame01_slice_3\.h5"):
        ACDCSource(root)


def test_h5_bad_labels_name_the_file(tmp_path: Path) -> None:
    root = _make_h5_root(tmp_path)
    _write_h5(root / "data/slices/patient001_frame01_slice_2.h5", np.zeros((8, 7)), np.full((8, 7), 7))
    source = ACDCSource(root)
    with pytest.raises(DataContentError, match=r"patient001_frame01_slice_2\.h5"):
        source.load_slice(SliceRef("patient001_frame01", 2))


# ---- small official NIfTI layout --------------------------------------------------------------------------


def _volume(seed: int) -> np.ndarray:
    x, y, z = np.meshgrid(*(np.arange(n) for n in SHAPE_XYZ), indexing="ij")
    return (x + 10 * y + 100 * z + seed).astype(np.int16)


def _write_patient(folder: Path, patient: int, labels: np.ndarray | None = None, gt: bool = True) -> None:
    pdir = folder / f"patient{patient:03d}"
    pdir.mkdir(parents=True)
    affine = np.diag([*SPACING_XYZ, 1.0])
    (pdir / "Info.cfg").write_text("ED: 1\nES: 2\nGroup: NOR\nHeight: 180.0\nNbFrame: 30\nWeight: 80.0\n")
    for frame in (1, 2):
        stem = f"patient{patient:03d}_frame{frame:02d}"
        nib.save(nib.Nifti1Image(_volume(patient), affine), pdir / f"{stem}.nii.gz")
        if gt:
            label = labels if labels is not None else (_volume(0) % 4).astype(np.uint8)
            nib.save(nib.Nifti1Image(label, affine), pdir / f"{stem}_gt.nii.gz")


def _make_nifti_root(root: Path, n_train: int = 10, n_test: int = 0) -> Path:
    for p in range(1, n_train + 1):
        _write_patient(root / "training", p)
    for p in range(101, 101 + n_test):
        _write_patient(root / "testing", p)
    return root


def test_nifti_patient_level_split(tmp_path: Path) -> None:
    root = _make_nifti_root(tmp_path)
    source = ACDCSource(root, split_seed=0)
    ids = source.split_ids()
    assert source.layout == "nifti"
    assert [len(_patients(ids[s])) for s in ("train", "val", "test")] == [8, 1, 1]
    assert [len(ids[s]) for s in ("train", "val", "test")] == [16, 2, 2]
    for split_ids in ids.values():
        for patient in _patients(split_ids):
            assert {f"{patient}_frame01", f"{patient}_frame02"} <= set(split_ids)
    assert not _patients(ids["train"]) & _patients(ids["val"])
    assert not _patients(ids["train"]) & _patients(ids["test"])
    assert not _patients(ids["val"]) & _patients(ids["test"])
    assert source.has_test_split
    assert len(source.train_slices()) == 16 * SHAPE_XYZ[2]
    assert ACDCSource(root, split_seed=0).split_ids() == ids
    other = [ACDCSource(root, split_seed=s).split_ids()["val"] for s in range(1, 6)]
    assert any(v != ids["val"] for v in other)


def test_nifti_orientation_scaling_spacing(tmp_path: Path) -> None:
    source = ACDCSource(_make_nifti_root(tmp_path, n_train=3))
    case = source.load_case("patient002_frame01")
    nx, ny, nz = SHAPE_XYZ
    assert case.image.shape == (1, nz, ny, nx) and case.label.shape == (nz, ny, nx)
    raw = _volume(2).transpose(2, 1, 0).astype(np.float32)
    expected = (raw - raw.min()) / (raw.max() - raw.min())
    np.testing.assert_allclose(case.image[0], expected, atol=1e-6)
    assert case.image.min() == 0.0 and case.image.max() == 1.0
    assert case.image[0, 2, 1, 4] > case.image[0, 0, 1, 4] > case.image[0, 0, 0, 4] > case.image[0, 0, 0, 0]
    np.testing.assert_array_equal(case.label, (_volume(0) % 4).transpose(2, 1, 0))
    assert case.spacing_hw == (SPACING_XYZ[1], SPACING_XYZ[0])
    train_case = source.split_ids()["train"][0]
    image, label = source.load_slice(SliceRef(train_case, 1))
    assert image.shape == (1, ny, nx) and image.dtype == np.float32 and label.dtype == np.int64


def test_nifti_percentile_clip(tmp_path: Path) -> None:
    source = ACDCSource(_make_nifti_root(tmp_path, n_train=3), percentile_clip=(10, 90))
    image = source.load_case("patient001_frame01").image
    assert image.min() == 0.0 and image.max() == 1.0
    assert (image == 1.0).mean() > 0.05 and (image == 0.0).mean() > 0.05


def test_nifti_testing_folder_is_the_test_split(tmp_path: Path) -> None:
    source = ACDCSource(_make_nifti_root(tmp_path, n_train=10, n_test=2))
    ids = source.split_ids()
    assert _patients(ids["test"]) == {"patient101", "patient102"}
    assert [len(_patients(ids[s])) for s in ("train", "val")] == [9, 1]


def test_nifti_image_without_gt(tmp_path: Path) -> None:
    root = _make_nifti_root(tmp_path, n_train=3)
    _write_patient(root / "training", 4, gt=False)
    with pytest.raises(DataContentError, match=r"patient004_frame01\.nii\.gz"):
        ACDCSource(root)


def test_nifti_labels_outside_classes(tmp_path: Path) -> None:
    root = _make_nifti_root(tmp_path, n_train=3)
    _write_patient(root / "training", 4, labels=np.full(SHAPE_XYZ, 5, dtype=np.uint8))
    source = ACDCSource(root)
    with pytest.raises(DataContentError, match=r"patient004_frame01_gt\.nii\.gz"):
        source.load_case("patient004_frame01")


def test_nifti_unreadable_file(tmp_path: Path) -> None:
    root = _make_nifti_root(tmp_path, n_train=3)
    (root / "training/patient002/patient002_frame02.nii.gz").write_bytes(b"not a nifti file")
    with pytest.raises(DataContentError, match=r"patient002_frame02\.nii\.gz"):
        ACDCSource(root)


def test_missing_or_unknown_root_names_both_layouts(tmp_path: Path) -> None:
    for root in (tmp_path / "absent", tmp_path):
        with pytest.raises(DataLayoutError, match=r"train_slices\.list.*training/"):
            ACDCSource(root)
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(DataLayoutError, match=r"train_slices\.list.*training/"):
        ACDCSource(tmp_path)
