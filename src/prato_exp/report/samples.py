"""Figure samples: the same few slices of an evaluation split, run through one network, saved as ``.npz``.

``train.py`` and ``eval.py`` call :func:`save_report_samples` at the end of a run; ``prato-report`` draws
the paper's qualitative figures (Figs. 3, 4, 6, 7, 8, 9) from these files across the runs of a table.
The slices depend only on the split's cases and labels, never on the network, so every run of the same
dataset and split stores the same slices and the figures can put methods side by side.

The file holds, for ``N`` samples on a token grid ``h x w`` with ``P`` pruning points:

========================  =================  ===============================================================
key                       shape, dtype       what
========================  =================  ===============================================================
``case_ids``              ``(N,)`` str       case of each sample
``slice_indices``         ``(N,)`` int64     slice within the case
``image``                 ``(N,C,H,W)`` f16  network input
``label``                 ``(N,H,W)`` uint8  ground truth at input size
``pred``                  ``(N,H,W)`` uint8  argmax prediction at input size
``box_xyxy``              ``(N,4)`` f32      box prompt the network saw (input pixels)
``prune_enabled``         ``(N,)`` bool      False where the empty-slice fallback switched pruning off
``grid_hw``               ``(2,)`` int64     ``(h, w)``; ``(0, 0)`` when nothing was pruned
``keep_grid``             ``(N,P,h,w)`` bool grid places alive after each pruning point (``P = 0``: none)
``scores``                ``(N,P,h,w)`` f16  each point's score per grid place, NaN where not alive there
``weights``               ``(N,M)`` f16      PrATo's inverse-entropy weights at the first point (if any)
``class_names``           ``(K-1,)`` str     foreground class names (when the dataset names them)
========================  =================  ===============================================================

``image`` and ``label`` are the dataset's own pixels, which never go into the repository. An archived run
(``scripts/archive_runs.py``) keeps the network's part only (:func:`write_network_samples`): the two keys
are replaced by a fingerprint of each slice (``image_mean_std`` ``(N,2)`` f32, ``label_pixels`` ``(N,K)``
int64, pixels per class), and the report reads the slices back from the run's dataset by case and slice
(:func:`restore_dataset_slices`), refusing them when the fingerprint differs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

SAMPLES_FILENAME = "report_samples.npz"
"""Name of the samples file inside a run folder (what ``prato-report`` looks for)."""
DATA_KEYS = ("image", "label")
"""The keys holding the dataset's pixels, left out of archived samples."""
IMAGE_TOLERANCE = 1e-2
"""Largest difference of a restored slice's image mean or std (float16 storage, resampling rounding)."""


class SampleDataError(ValueError):
    """Archived samples whose slices cannot be read back from their dataset, with the reason."""


def pick_report_slices(eval_set: Dataset, count: int) -> list[int]:
    """Dataset indices of ``count`` slices chosen from the cases alone, the same in every run.

    The cases are sorted by id and ``count`` of them are taken evenly spread over that order (all of them
    when there are fewer); from each, the slice with the most foreground pixels (the lowest slice index
    on ties; slice 0 of a case with no foreground). Uses ``eval_set.cases`` and ``eval_set.index`` (an
    :class:`~prato_exp.lightning.datamodule.EvalSlices`) when present, else reads every sample's
    ``case_id``, ``slice_index`` and ``label``.
    """
    if count <= 0 or len(eval_set) == 0:
        return []
    if hasattr(eval_set, "cases") and hasattr(eval_set, "index"):
        position = {key: i for i, key in enumerate(eval_set.index)}
        foreground = {
            cid: (np.asarray(case.label) > 0).reshape(case.num_slices, -1).sum(axis=1)
            for cid, case in eval_set.cases.items()
        }
    else:
        position, per_case = {}, {}
        for i in range(len(eval_set)):
            sample = eval_set[i]
            key = (str(sample["case_id"]), int(sample["slice_index"]))
            position[key] = i
            per_case.setdefault(key[0], {})[key[1]] = int((sample["label"] > 0).sum())
        foreground = {
            cid: np.array([slices.get(z, -1) for z in range(max(slices) + 1)])
            for cid, slices in per_case.items()
        }
    case_ids = sorted(foreground)
    chosen = np.unique(np.linspace(0, len(case_ids) - 1, num=min(count, len(case_ids))).round().astype(int))
    picks = []
    for j in chosen:
        cid = case_ids[int(j)]
        z = int(np.argmax(foreground[cid]))  # first maximum: lowest slice index on ties
        picks.append(position[(cid, z)])
    return picks


def _scores_on_grid(scores: Tensor, alive_before: Tensor | None, num_grid: int) -> np.ndarray:
    """One image's scores at a pruning point on the ``(Z,)`` grid, NaN where no token was alive.

    ``scores`` ``(N,)`` are per alive slot: ``N == Z`` when the point saw the full grid (the first point,
    ``mask`` and ``zero_once`` modes); otherwise the slots are the places alive after the previous point,
    in ascending grid order (``TokenSet.select(keep, "drop")``), followed by padding.
    """
    values = scores.detach().float().cpu().numpy()
    grid = np.full(num_grid, np.nan, dtype=np.float32)
    if values.shape[0] == num_grid or alive_before is None:
        grid[: min(num_grid, values.shape[0])] = values[:num_grid]
        return grid
    places = np.flatnonzero(alive_before.cpu().numpy())
    grid[places] = values[: places.size]
    return grid


@torch.no_grad()
def save_report_samples(net: nn.Module, eval_set: Dataset, path: Path, count: int = 4) -> Path:
    """Run ``net`` (eval mode, batch 1) on the slices of :func:`pick_report_slices`; write one ``.npz``.

    Args:
        net: a prunable segmentation network (``forward(image, box_xyxy, prune_enabled) -> SegOutput``).
        eval_set: an evaluation dataset whose items hold ``image``, ``label``, ``box_xyxy``,
            ``prune_enabled``, ``case_id`` and ``slice_index``.
        path: the ``.npz`` file to write, or a folder (then ``<path>/report_samples.npz``).
        count: number of slices (one per case).

    Returns:
        The path written. Keys and shapes are listed in this module's docstring.
    """
    path = Path(path)
    if path.suffix != ".npz":
        path = path / SAMPLES_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    indices = pick_report_slices(eval_set, count)
    if not indices:
        raise ValueError("the evaluation set is empty: no report samples to save")
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    rows: list[dict[str, Any]] = []
    try:
        for index in indices:
            sample = eval_set[index]
            out = net(
                sample["image"][None].to(device),
                sample["box_xyxy"][None].to(device),
                sample["prune_enabled"][None].to(device),
            )
            trace = out.trace
            h, w = trace.grid_hw if trace.keep_grids else (0, 0)
            keep, scores = [], []
            for point, (result, alive) in enumerate(zip(trace.results, trace.keep_grids, strict=False)):
                before = trace.keep_grids[point - 1][0] if point else None
                keep.append(alive[0].cpu().numpy().reshape(h, w))
                scores.append(_scores_on_grid(result.scores[0], before, h * w).reshape(h, w))
            weights = None
            if trace.results and "weights" in trace.results[0].extras:
                weights = trace.results[0].extras["weights"][0].detach().float().cpu().numpy()
            rows.append(
                {
                    "case_id": str(sample["case_id"]),
                    "slice_index": int(sample["slice_index"]),
                    "image": sample["image"].float().cpu().numpy(),
                    "label": sample["label"].cpu().numpy(),
                    "pred": out.logits.argmax(1)[0].cpu().numpy(),
                    "box": sample["box_xyxy"].float().cpu().numpy(),
                    "prune_enabled": bool(sample["prune_enabled"]),
                    "grid_hw": (h, w),
                    "keep": np.stack(keep) if keep else np.zeros((0, h, w), bool),
                    "scores": np.stack(scores) if scores else np.zeros((0, h, w), np.float32),
                    "weights": weights,
                }
            )
    finally:
        net.train(was_training)

    grid_hw = rows[0]["grid_hw"]
    if any(r["grid_hw"] != grid_hw or r["keep"].shape != rows[0]["keep"].shape for r in rows):
        raise ValueError("the samples have different token grids or pruning point counts; cannot stack them")
    arrays: dict[str, np.ndarray] = {
        "case_ids": np.array([r["case_id"] for r in rows]),
        "slice_indices": np.array([r["slice_index"] for r in rows], dtype=np.int64),
        "image": np.stack([r["image"] for r in rows]).astype(np.float16),
        "label": np.stack([r["label"] for r in rows]).astype(np.uint8),
        "pred": np.stack([r["pred"] for r in rows]).astype(np.uint8),
        "box_xyxy": np.stack([r["box"] for r in rows]).astype(np.float32),
        "prune_enabled": np.array([r["prune_enabled"] for r in rows], dtype=bool),
        "grid_hw": np.array(grid_hw, dtype=np.int64),
        "keep_grid": np.stack([r["keep"] for r in rows]).astype(bool),
        "scores": np.stack([r["scores"] for r in rows]).astype(np.float16),
    }
    if all(r["weights"] is not None for r in rows) and len({r["weights"].shape for r in rows}) == 1:
        arrays["weights"] = np.stack([r["weights"] for r in rows]).astype(np.float16)
    class_names = getattr(getattr(eval_set, "source", None), "class_names", None)
    if class_names:
        arrays["class_names"] = np.array([str(c) for c in class_names])
    np.savez_compressed(path, **arrays)
    return path


def load_report_samples(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a samples file (no pickled objects are read)."""
    with np.load(Path(path), allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def slice_fingerprint(image: np.ndarray, label: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """What identifies the slices without holding them: per slice the image's mean and std (over all
    channels and pixels) and the label's pixel count per class.

    Args:
        image: ``(N, C, H, W)``.
        label: ``(N, H, W)`` integer classes in ``[0, num_classes)``.
        num_classes: ``K``, the length of each count row.

    Returns:
        ``image_mean_std`` ``(N, 2)`` float32 and ``label_pixels`` ``(N, K)`` int64.
    """
    flat = image.astype(np.float64).reshape(image.shape[0], -1)
    mean_std = np.stack([flat.mean(axis=1), flat.std(axis=1)], axis=1).astype(np.float32)
    counts = np.stack([np.bincount(lab.reshape(-1), minlength=num_classes) for lab in label.astype(np.int64)])
    return {"image_mean_std": mean_std, "label_pixels": counts.astype(np.int64)}


def write_network_samples(source: Path, destination: Path) -> Path:
    """Copy the samples file ``source`` to ``destination`` without the dataset's pixels.

    :data:`DATA_KEYS` are replaced by :func:`slice_fingerprint`; everything the network produced (its
    prediction, kept tokens, scores, weights) and the box it saw are kept. Returns ``destination``.
    """
    arrays = load_report_samples(source)
    if not set(DATA_KEYS) <= arrays.keys():
        raise SampleDataError(f"{source}: holds no {' / '.join(DATA_KEYS)}: already archived?")
    num_classes = int(max(arrays["label"].max(), arrays["pred"].max())) + 1
    if "class_names" in arrays:
        num_classes = max(num_classes, len(arrays["class_names"]) + 1)
    kept = {k: v for k, v in arrays.items() if k not in DATA_KEYS}
    kept.update(slice_fingerprint(arrays["image"], arrays["label"], num_classes))
    destination.parent.mkdir(parents=True, exist_ok=True)
    with destination.open("wb") as f:
        np.savez_compressed(f, **kept)
    return destination


ROOT_VARIABLES = {"ACDCSource": "PRATO_ACDC_ROOT", "ISICSource": "PRATO_ISIC_ROOT"}
"""The environment variable that moves each real dataset (as in ``conf/dataset/``), by source class."""

SliceReader = Callable[[str, int], tuple[np.ndarray, np.ndarray]]
"""``(case_id, slice_index) -> (image (C, H, W), label (H, W))`` at the network's input size."""


def restore_dataset_slices(
    arrays: dict[str, np.ndarray], read_slice: SliceReader, where: str
) -> dict[str, np.ndarray]:
    """Archived samples with ``image`` and ``label`` read back by ``read_slice``; unchanged if present.

    The fingerprint catches another dataset version, input size or intensity preprocessing; it cannot
    tell a slice from its own flip or transpose.

    Raises:
        SampleDataError: naming ``where`` (the samples file), the case and the slice when the slice read
            back differs from the fingerprint the run stored (another version of the dataset, another
            input size or preprocessing).
    """
    if set(DATA_KEYS) <= arrays.keys():
        return arrays
    if len(arrays["case_ids"]) == 0:
        raise SampleDataError(f"{where}: holds no samples")
    images, labels = [], []
    for case_id, z in zip(arrays["case_ids"], arrays["slice_indices"], strict=True):
        image, label = read_slice(str(case_id), int(z))
        images.append(np.asarray(image, dtype=np.float32))
        labels.append(np.asarray(label).astype(np.uint8))
    image, label = np.stack(images).astype(np.float16), np.stack(labels)
    num_classes = arrays["label_pixels"].shape[1]
    if label.size and int(label.max()) >= num_classes:
        raise SampleDataError(
            f"{where}: the dataset's labels reach {int(label.max())}, the run's {num_classes - 1}"
        )
    found = slice_fingerprint(image, label, num_classes)
    for i, (case_id, z) in enumerate(zip(arrays["case_ids"], arrays["slice_indices"], strict=True)):
        image_differs = (
            np.abs(found["image_mean_std"][i] - arrays["image_mean_std"][i]).max() > IMAGE_TOLERANCE
        )
        if image_differs or not np.array_equal(found["label_pixels"][i], arrays["label_pixels"][i]):
            raise SampleDataError(
                f"{where}: case {case_id} slice {int(z)} read from the dataset differs from the slice the "
                f"run saw (image mean/std {found['image_mean_std'][i].tolist()} vs "
                f"{arrays['image_mean_std'][i].tolist()}, label pixels per class "
                f"{found['label_pixels'][i].tolist()} vs {arrays['label_pixels'][i].tolist()})"
            )
    return {**arrays, "image": image, "label": label}


def dataset_slice_reader(config_path: Path) -> SliceReader:
    """A :data:`SliceReader` for the dataset and input size of a run's ``config.yaml``.

    The dataset is built from the config's ``dataset`` node (its root resolved as the run resolved it,
    ``PRATO_*_ROOT`` included, relative to the current folder) and each slice is resized as the run's
    evaluation resized it (:func:`~prato_exp.data.transforms.resize_pair`). Cases are read once.

    Raises:
        SampleDataError: when the dataset cannot be built (its folder missing, say), with the reason.
    """
    from hydra.errors import HydraException
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from prato_exp.data.transforms import resize_pair

    config = OmegaConf.load(config_path)
    try:
        source_name = str(config.dataset._target_).rsplit(".", 1)[-1]
        env_root = os.environ.get(ROOT_VARIABLES.get(source_name, ""))
        if env_root and "root" in config.dataset:
            config.dataset.root = env_root  # an eval run's config holds the root its checkpoint resolved
        source = instantiate(config.dataset)
        size = int(OmegaConf.select(config, "datamodule.input_size", default=None) or config.model.img_size)
    except (HydraException, OmegaConfBaseException, OSError, ValueError) as err:
        reason = err.__cause__ if isinstance(err, HydraException) and err.__cause__ else err
        raise SampleDataError(
            f"{config_path}: cannot read the run's dataset back ({reason}); a relative root is read from "
            f"the current folder, and {' / '.join(ROOT_VARIABLES.values())} replace the root when set"
        ) from err
    cases: dict[str, Any] = {}

    def read_slice(case_id: str, z: int) -> tuple[np.ndarray, np.ndarray]:
        if case_id not in cases:
            try:
                cases[case_id] = source.load_case(case_id)
            except (KeyError, OSError, ValueError) as err:
                raise SampleDataError(f"{config_path}: cannot read case {case_id} back ({err})") from err
        case = cases[case_id]
        if not 0 <= z < case.num_slices:
            raise SampleDataError(f"{config_path}: case {case_id} has {case.num_slices} slices, not {z + 1}")
        image, label = resize_pair(case.image[:, z], case.label[z], size)
        return image.numpy(), label.numpy()

    return read_slice
