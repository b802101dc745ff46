"""Segment new images with a trained checkpoint and a box drawn by the user.

:class:`Segmenter` loads a ``prato_exp`` training checkpoint (the network is rebuilt from the run config
stored in it, weights loaded strictly) and :meth:`Segmenter.predict` segments

- one 2-D image, ``(H, W)`` grayscale or ``(H, W, C)`` / ``(C, H, W)`` with ``C`` in 1, 3 or 4 (alpha is
  dropped), with one box ``(4,)``;
- a batch: a list of such images (any sizes) or a ``(B, H, W, C)`` / ``(B, C, H, W)`` array, with one
  box per image ``(B, 4)``; returns one :class:`Prediction` per image;
- a 3-D volume ``(D, H, W)`` with one box per slice ``(D, 4)`` or one 3-D box
  ``(x0, y0, z0, x1, y1, z1)``; slices outside ``[z0, z1)`` get no prediction (background), which the
  result states in ``predicted_slices`` and ``notes``.

Numpy arrays and torch tensors are both accepted. Boxes are ``(x0, y0, x1, y1)`` pixel edges in the
original image (pixel ``i`` covers ``[i, i + 1)``, the convention of training); slice edges ``z`` alike.

What happens to an image, in order, mirroring training (``data/*.py``, ``data/transforms.py``):

1. every box is validated on the original image size by :func:`~prato_exp.data.prompts.sanitize_boxes`
   (the one box check of the project) before any slow work, with the image id in every message;
2. channels are matched to the model: RGB to grayscale with the ITU-R 601 luma weights (PIL's ``"L"``;
   an image whose channels are equal keeps them exactly), grayscale to RGB by repetition;
3. intensities are scaled to [0, 1] as training scaled them (see :class:`Intensity`);
4. the image is resized to the network's square input with :func:`~prato_exp.data.transforms.resize_pair`
   (bilinear, ``align_corners=False``, aspect ratio not kept; for ISIC runs first downscaled to the run's
   ``dataset.max_side`` as the ISIC source loads images), and the box is mapped by the overall factors
   ``(S / W, S / H)``;
5. the logits are resized back bilinearly to the original size (as evaluation does) before softmax and
   argmax, so ``mask`` and ``probabilities`` are at the image's own resolution.
"""

from __future__ import annotations

import inspect
import math
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import Tensor, nn

from prato_exp.data.prompts import BoxError, sanitize_boxes
from prato_exp.data.transforms import resize_pair
from prato_exp.lightning.checkpoint import build_net, load_checkpoint, load_net_weights, source_class
from prato_exp.metrics import efficiency
from prato_exp.pruning.base import TokenPruner, pruning_disabled

ImageLike = np.ndarray | Tensor
BoxLike = np.ndarray | Tensor | Sequence[float] | Sequence[Sequence[float]] | Mapping[int, Sequence[float]]

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)
_NET_CACHE_SIZE = 4


class Intensity(str, Enum):
    """How an image's intensities are brought to [0, 1] before the network, as in training.

    - ``minmax``: optional percentile clip, then min-max over the whole image, or over the whole volume
      for a 3-D input. ACDC training scales every NIfTI volume this way (``ACDCSource._scale``, with the
      run's ``dataset.percentile_clip``), the SSL4MIS h5 copy was scaled so before it was saved, and the
      cardiac phantoms are min-max scaled per image. Used for grayscale (1-channel) models.
    - ``range``: integer images divided by their type's maximum (8-bit: ``/ 255``, as ISIC training
      reads its JPEGs), float images taken as they are and required to lie in [0, 1]. Used for RGB
      (3-channel) models, and for h5 files, which hold intensities already scaled for training.
    - ``auto``: ``minmax`` for a 1-channel model, ``range`` for a 3-channel one.
    """

    AUTO = "auto"
    MINMAX = "minmax"
    RANGE = "range"


@dataclass
class Prediction:
    """One image's (or one volume's) segmentation and what pruning did to get it.

    Attributes:
        image_id: the name used in messages (file name, ``"image"``, ``"image[3]"``...).
        mask: ``(H, W)`` (or ``(D, H, W)`` for a volume) int64 class indices at the input's resolution.
        probabilities: ``(K, H, W)`` (or ``(K, D, H, W)``) float32 softmax over the ``K`` classes.
        keep_grid: ``(h, w)`` (or ``(D, h, w)``) bool, token-grid places still alive after the last
            pruning point; all True when nothing was pruned.
        scores: ``(h, w)`` (or ``(D, h, w)``) float32 scores of the first pruning point on the grid, or
            None when the model has no pruner (or its first point does not see the whole grid).
        tokens_kept: grid tokens alive after the last pruning point (summed over predicted slices).
        tokens_total: grid tokens before pruning (summed over predicted slices).
        gflops: GFLOPs of the forward passes that made this prediction (batch 1 per image or slice,
            executed graph, multiply-add = 2 FLOPs; summed over a volume's predicted slices); None
            when not counted (``count_flops=False``).
        time_ms: wall-clock milliseconds of the network forward (the median of ``repeats`` runs;
            a batch's time divided evenly among its images; summed over a volume's slices).
        box_xyxy: the validated box in original pixels, ``(4,)`` (or ``(D, 4)``, NaN rows for slices
            without a prediction).
        box_input: the same box on the network input, ``(4,)`` or ``(D, 4)``.
        input_size: side of the square network input.
        class_names: every class, background first.
        pruned: whether a pruner ran (False for unpruned comparisons and models without a pruner).
        predicted_slices: ``(D,)`` bool for a volume: slices that were segmented; None for 2-D images.
        notes: plain-language remarks (slices without a prediction, intensity scaling used).
        unpruned: the same weights with pruning off, on the same input, when asked for.
    """

    image_id: str
    mask: np.ndarray
    probabilities: np.ndarray
    keep_grid: np.ndarray
    scores: np.ndarray | None
    tokens_kept: int
    tokens_total: int
    gflops: float | None
    time_ms: float
    box_xyxy: np.ndarray
    box_input: np.ndarray
    input_size: int
    class_names: tuple[str, ...]
    pruned: bool
    predicted_slices: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)
    unpruned: Prediction | None = None

    @property
    def kept_fraction(self) -> float:
        """Share of grid tokens alive after the last pruning point."""
        return self.tokens_kept / self.tokens_total if self.tokens_total else 1.0

    def summary(self) -> dict[str, Any]:
        """The scalar facts of this prediction (no arrays), ready for JSON."""
        out: dict[str, Any] = {
            "image_id": self.image_id,
            "shape": list(self.mask.shape),
            "tokens_kept": self.tokens_kept,
            "tokens_total": self.tokens_total,
            "kept_fraction": self.kept_fraction,
            "gflops": self.gflops,
            "time_ms": self.time_ms,
            "pruned": self.pruned,
            "box_xyxy": _nan_to_none(self.box_xyxy.tolist()),
            "box_input": _nan_to_none(self.box_input.tolist()),
            "input_size": self.input_size,
            "classes_found": [
                self.class_names[c] for c in np.unique(self.mask).tolist() if c < len(self.class_names)
            ],
            "notes": list(self.notes),
        }
        if self.predicted_slices is not None:
            out["predicted_slices"] = np.flatnonzero(self.predicted_slices).tolist()
        if self.unpruned is not None:
            base = self.unpruned
            out["unpruned"] = {
                "tokens_kept": base.tokens_kept,
                "gflops": base.gflops,
                "time_ms": base.time_ms,
            }
            out["flop_ratio"] = self.gflops / base.gflops if self.gflops and base.gflops else None
            out["time_ratio"] = self.time_ms / base.time_ms if base.time_ms else None
        return out


def _nan_to_none(values: Any) -> Any:
    if isinstance(values, list):
        return [_nan_to_none(v) for v in values]
    return None if isinstance(values, float) and not math.isfinite(values) else values


@dataclass(frozen=True)
class _RunOptions:
    """How :meth:`Segmenter.predict` runs the network (see its arguments)."""

    unpruned: bool
    repeats: int
    batch_size: int
    count_flops: bool

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.batch_size < 1:
            raise ValueError(f"repeats and batch_size must be >= 1, got {self.repeats}, {self.batch_size}")


@dataclass
class _Item:
    """One 2-D image to segment: channels-first float array at original size, its box and its id."""

    image: np.ndarray  # (C, H, W) float64, scaled to [0, 1], channels matched to the model
    box: np.ndarray  # (4,) validated, original pixels
    image_id: str


BUDGET_KEYS = ("q", "tau", "min_keep")
"""Override keys that change a re-scorable token budget (``pruning.budget``)."""


class Segmenter:
    """A trained network ready to segment new images given a box (see the module docstring).

    Build it with :meth:`from_checkpoint`. Pruning settings that no learned part depends on (the trained
    pruner's ``rescorable`` keys, e.g. PrATo's ``k``; a re-scorable token budget is changed through its
    keys ``q``, ``tau`` and ``min_keep``) can be changed per call; the network is then rebuilt from the
    run config with the change and the same weights loaded.
    """

    def __init__(self, run_config: DictConfig, state: dict[str, Any], path: str, device: str = "cpu") -> None:
        """``state`` holds the checkpoint's ``state_dict``; prefer :meth:`from_checkpoint`."""
        self.run_config = run_config
        self.checkpoint_path = path
        self.device = torch.device(device)
        self._state = state
        source = source_class(run_config.dataset)
        self.in_channels: int = int(source.in_channels)
        self.num_classes: int = int(source.num_classes)
        self.class_names: tuple[str, ...] = ("background", *source.class_names)
        self.input_size: int = int(run_config.datamodule.input_size)
        load_side = inspect.signature(source).parameters.get("max_side")  # ISIC downscales on load
        default_side = None if load_side is None else load_side.default
        self._max_side: int | None = run_config.dataset.get("max_side", default_side)
        pruner_cfg = run_config.model.get("pruner")
        self.pruner_target: str | None = pruner_cfg.get("_target_") if pruner_cfg else None
        self._warm: set[tuple[int, bool]] = set()
        self._nets: OrderedDict[tuple, nn.Module] = OrderedDict()
        self._nets[()] = self._build({})

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu") -> Segmenter:
        """Load a checkpoint written by ``prato-train`` (weights only, never a download).

        Raises FileNotFoundError for a missing file and ValueError for a file that is not a
        ``prato_exp`` checkpoint or does not fit the model its run config describes.
        """
        checkpoint = load_checkpoint(path)
        run_cfg = OmegaConf.create(checkpoint["prato_run_config"])
        if run_cfg.model.get("pretrained"):
            run_cfg.model.pretrained = None  # the checkpoint holds every weight; no other file is read
        return cls(run_cfg, {"state_dict": checkpoint["state_dict"]}, str(path), device)

    @property
    def pruning(self) -> dict[str, Any]:
        """The trained pruner's settings (without Hydra keys), ``{}`` for a model without a pruner."""
        if self.pruner_target is None:
            return {}
        cfg = OmegaConf.to_container(self.run_config.model.pruner, resolve=True)
        return {k: v for k, v in cfg.items() if not k.startswith("_")}

    @property
    def allowed_overrides(self) -> tuple[str, ...]:
        """Pruning keys :meth:`predict` may change: the trained pruner's ``rescorable`` keys, with a
        re-scorable ``budget`` given by its keys (``q=50`` prunes 50 %; ``tau=0.3`` switches PrATo to a
        fixed threshold)."""
        if self.pruner_target is None:
            return ()
        from hydra.utils import get_class

        keys = set(getattr(get_class(self.pruner_target), "rescorable", frozenset()))
        if "budget" in keys:
            keys = (keys - {"budget"}) | set(BUDGET_KEYS)
        return tuple(sorted(keys))

    @property
    def budget(self) -> dict[str, Any] | None:
        """The trained pruner's token budget (``rule``, ``q``, ``tau``, ``min_keep``), None without one."""
        budget = self.pruning.get("budget")
        return {k: v for k, v in budget.items() if not k.startswith("_")} if budget else None

    def net(self, **pruning_overrides: Any) -> nn.Module:
        """The network (eval mode, on ``device``) with ``pruning_overrides`` applied; built once, cached."""
        changes = self._check_overrides(pruning_overrides)
        key = tuple(sorted((k, repr(v)) for k, v in changes.items()))
        if key not in self._nets:
            self._nets[key] = self._build(changes)
            while len(self._nets) > _NET_CACHE_SIZE:
                oldest = next(k for k in self._nets if k != ())
                evicted = self._nets.pop(oldest)
                self._warm -= {(id(evicted), True), (id(evicted), False)}
        self._nets.move_to_end(key)
        return self._nets[key]

    def _check_overrides(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """Refuse unknown keys with the allowed ones; resolve PrATo's threshold switch."""
        if not overrides:
            return {}
        allowed = self.allowed_overrides
        unknown = sorted(k for k in overrides if k not in allowed)
        if unknown:
            name = self.pruner_target.rsplit(".", 1)[-1] if self.pruner_target else "this model (no pruner)"
            why = (
                f"allowed: {list(allowed)}"
                if allowed
                else "it allows none (a learned part depends on its settings, or nothing is pruned)"
            )
            raise ValueError(f"pruning override {unknown} not accepted by {name}; {why}")
        changes = {k: v for k, v in overrides.items() if k not in BUDGET_KEYS and self.pruning.get(k) != v}
        budget_changes = {k: v for k, v in overrides.items() if k in BUDGET_KEYS}
        if budget_changes:
            trained = dict(self.pruning["budget"])
            budget = trained | budget_changes
            if budget_changes.get("q") is not None and budget_changes.get("tau") is not None:
                raise ValueError(f"give q (a percentile) or tau (a threshold), not both: {budget_changes}")
            if budget_changes.get("q") is not None:
                budget |= {"rule": "percentile", "tau": None}
            elif budget_changes.get("tau") is not None:
                budget |= {"rule": "fixed", "q": None}
            if budget != trained:
                changes["budget"] = budget
        return changes

    def _build(self, changes: dict[str, Any]) -> nn.Module:
        model_cfg = self.run_config.model.copy()
        for key, value in changes.items():
            model_cfg.pruner[key] = value
        try:
            net = build_net(model_cfg, source_class(self.run_config.dataset))
        except InstantiationException as err:
            if not changes:
                raise
            cause = err.__cause__ or err  # the pruner's own message, without Hydra's wrapping
            raise ValueError(f"pruning override {changes} refused: {cause}") from err
        if changes:  # the same weights as the trained network: share its tensors rather than copy them
            net.load_state_dict(self._nets[()].state_dict(), strict=True, assign=True)
        else:
            load_net_weights(net, self._state, self.checkpoint_path)
        return net.eval().to(self.device)

    def resolve_intensity(self, intensity: Intensity | str = Intensity.AUTO) -> Intensity:
        """The concrete scaling ``auto`` stands for with this model (``minmax`` or ``range``)."""
        intensity = Intensity(intensity)
        if intensity is Intensity.AUTO:
            return Intensity.MINMAX if self.in_channels == 1 else Intensity.RANGE
        return intensity

    @torch.no_grad()
    def predict(
        self,
        image: ImageLike | Sequence[ImageLike],
        box_xyxy: BoxLike,
        *,
        image_id: str | Sequence[str] | None = None,
        unpruned: bool = False,
        intensity: Intensity | str = Intensity.AUTO,
        repeats: int = 1,
        batch_size: int = 16,
        count_flops: bool = True,
        **pruning_overrides: Any,
    ) -> Prediction | list[Prediction]:
        """Segment ``image`` given ``box_xyxy`` (layouts in the module docstring).

        Args:
            image: one image, a batch (list or 4-D array) or a ``(D, H, W)`` volume.
            box_xyxy: ``(4,)`` for one image, ``(B, 4)`` for a batch, ``(D, 4)`` or ``(6,)`` for a volume,
                in the original image's pixels.
            image_id: name(s) used in error messages and in the result.
            unpruned: also run the same weights with pruning off (``Prediction.unpruned``).
            intensity: see :class:`Intensity`.
            repeats: forward passes timed per batch; ``time_ms`` is their median.
            batch_size: images per forward pass.
            count_flops: count GFLOPs (one more forward per image, under ``FlopCounterMode``); when
                False, ``gflops`` is None.
            pruning_overrides: e.g. ``q=50``; only the trained pruner's re-scorable keys.

        Returns:
            A :class:`Prediction` for one image or a volume, a list of them for a batch.
        """
        run = _RunOptions(unpruned, repeats, batch_size, count_flops)
        mode = self.resolve_intensity(intensity)
        self._check_overrides(pruning_overrides)  # unknown keys fail at once
        kind, images, boxes, ids = _layout(image, box_xyxy, image_id)
        # every box is validated on its image's own size before any slow work (network build included)
        if kind == "volume":
            volume = images[0]
            per_slice, note = _volume_boxes(boxes, volume.shape, ids[0])
        else:
            valid = [
                sanitize_boxes(box[None], _hw(img), [name])[0].numpy().astype(np.float64)
                for img, box, name in zip(images, boxes, ids, strict=True)
            ]
        net = self.net(**pruning_overrides)
        if kind == "volume":
            scaled = self._prepare(volume, mode, ids[0], volume=True)  # (C, D, H, W), scaled over the volume
            order = sorted(per_slice)
            items = [_Item(scaled[:, z], per_slice[z], f"{ids[0]} slice {z}") for z in order]
            return _stack_volume(
                self._run(net, items, run), order, volume.shape, ids[0], note, self.num_classes
            )
        items = [
            _Item(self._prepare(img, mode, name, volume=False), box, name)
            for img, box, name in zip(images, valid, ids, strict=True)
        ]
        predictions = self._run(net, items, run)
        return predictions[0] if kind == "single" else predictions

    def _prepare(self, image: np.ndarray, mode: Intensity, image_id: str, volume: bool) -> np.ndarray:
        """Channels matched to the model and intensities scaled: ``(C, H, W)`` or ``(C, D, H, W)``."""
        array = image if volume else _channels_first(image)
        if volume:
            array = array[None]
        if array.dtype == np.bool_:
            array = array.astype(np.uint8)
        scale = float(np.iinfo(array.dtype).max) if np.issubdtype(array.dtype, np.integer) else None
        data = array.astype(np.float64)
        if not np.isfinite(data).all():
            raise ValueError(f"{image_id}: image has NaN or inf values")
        if data.shape[0] == 4:
            data = data[:3]  # RGBA: alpha dropped
        if data.shape[0] not in (1, 3):
            raise ValueError(
                f"{image_id}: {data.shape[0]} channels; expected 1 (grayscale), 3 (RGB) or 4 (RGBA)"
            )
        if self.in_channels == 1 and data.shape[0] == 3:
            same = np.array_equal(data[0], data[1]) and np.array_equal(data[0], data[2])
            data = data[:1] if same else np.tensordot(_LUMA, data, axes=1)[None]
        elif self.in_channels == 3 and data.shape[0] == 1:
            data = np.repeat(data, 3, axis=0)
        if mode is Intensity.MINMAX:
            clip = self.run_config.dataset.get("percentile_clip")
            if clip is not None:
                low, high = np.percentile(data, [float(c) for c in clip])
                data = np.clip(data, low, high)
            lo, hi = float(data.min()), float(data.max())
            return (data - lo) / (hi - lo) if hi > lo else np.zeros_like(data)
        if scale is not None:
            return data / scale
        lo, hi = float(data.min()), float(data.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(
                f"{image_id}: float intensities span [{lo:.4g}, {hi:.4g}], but intensity='range' expects "
                "[0, 1] (integers are divided by their type's maximum); pass intensity='minmax' to min-max "
                "scale this image"
            )
        return np.clip(data, 0.0, 1.0)

    def _run(self, net: nn.Module, items: list[_Item], run: _RunOptions) -> list[Prediction]:
        predictions = self._forward(net, items, run, pruned=True)
        if run.unpruned:
            with pruning_disabled(net) as plain:
                base = self._forward(plain, items, run, pruned=False)
            for pred, ref in zip(predictions, base, strict=True):
                pred.unpruned = ref
        return predictions

    def _forward(
        self, net: nn.Module, items: list[_Item], run: _RunOptions, pruned: bool
    ) -> list[Prediction]:
        """Resize, forward in batches (timed), count FLOPs per image, resize the logits back."""
        size = self.input_size
        for module in net.modules():
            if isinstance(module, TokenPruner):
                module.reset_rng()  # a seeded pruner gives the same tokens on every call
        inputs = [self.network_input(item.image) for item in items]
        boxes = [_to_input(item.box, item.image.shape[-2:], size) for item in items]
        out: list[Prediction] = []
        for start in range(0, len(items), run.batch_size):
            chunk = slice(start, start + run.batch_size)
            image = torch.stack(inputs[chunk]).to(self.device)  # (b, C, S, S)
            box = torch.as_tensor(np.stack(boxes[chunk]), dtype=torch.float32, device=self.device)  # (b, 4)
            warm_key = (id(net), pruned)
            if warm_key not in self._warm:  # the first call of a network pays one-off setup: untimed
                net(image[:1], box[:1])
                self._warm.add(warm_key)
            result, times = None, []
            for _ in range(run.repeats):
                self._sync()
                started = time.perf_counter()
                result = net(image, box)
                self._sync()
                times.append((time.perf_counter() - started) * 1e3)
            per_image_ms = float(np.median(times)) / image.shape[0]
            trace = result.trace
            h, w = trace.grid_hw
            keep = (
                trace.keep_grids[-1].view(-1, h, w).cpu().numpy()
                if trace.keep_grids
                else np.ones((image.shape[0], h, w), dtype=bool)
            )
            first = trace.results[0].scores if trace.results else None
            scores = (
                first.float().view(-1, h, w).cpu().numpy()
                if first is not None and first.shape[1] == h * w
                else None
            )
            for j, item in enumerate(items[chunk]):
                flops = (
                    efficiency.count_flops(net, image[j : j + 1], box[j : j + 1]) if run.count_flops else None
                )
                logits = F.interpolate(
                    result.logits[j : j + 1].float(), size=item.image.shape[-2:], mode="bilinear"
                )  # (1, K, H, W)
                probs = torch.softmax(logits, dim=1)[0]
                out.append(
                    Prediction(
                        image_id=item.image_id,
                        mask=probs.argmax(0).cpu().numpy().astype(np.int64),
                        probabilities=probs.cpu().numpy().astype(np.float32),
                        keep_grid=keep[j].astype(bool),
                        scores=None if scores is None else scores[j].astype(np.float32),
                        tokens_kept=int(keep[j].sum()),
                        tokens_total=h * w,
                        gflops=None if flops is None else flops.total_flops / 1e9,
                        time_ms=per_image_ms,
                        box_xyxy=item.box.copy(),
                        box_input=boxes[start + j],
                        input_size=size,
                        class_names=self.class_names,
                        pruned=pruned and bool(trace.results),
                    )
                )
        return out

    def network_input(self, image: np.ndarray) -> Tensor:
        """What the network sees of a scaled ``(C, H, W)`` image: ``(C, S, S)`` float32.

        Where the run's dataset source downscales large images on load (ISIC: ``dataset.max_side``,
        bilinear with PIL), the same is done first, so a large photograph reaches the network as it
        did in training; then :func:`~prato_exp.data.transforms.resize_pair` resizes to ``S``.
        """
        max_side = self._max_side
        h, w = image.shape[-2:]
        if max_side and max(h, w) > max_side:
            scale = max_side / max(h, w)
            target = (max(1, round(w * scale)), max(1, round(h * scale)))
            image = np.stack(
                [
                    np.asarray(
                        Image.fromarray(c.astype(np.float32)).resize(target, Image.Resampling.BILINEAR)
                    )
                    for c in image
                ]
            )
        return resize_pair(image, np.zeros(image.shape[-2:]), self.input_size)[0]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _hw(image: np.ndarray) -> tuple[int, int]:
    """``(H, W)`` of a 2-D image in any accepted channel layout."""
    return tuple(_channels_first(image).shape[-2:])  # type: ignore[return-value]


def _channels_first(image: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` view of ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` (``C`` in 1, 3, 4)."""
    if image.ndim == 2:
        return image[None]
    if image.ndim == 3:
        if image.shape[-1] in (1, 3, 4) and image.shape[0] not in (1, 3, 4):
            return np.moveaxis(image, -1, 0)
        if image.shape[0] in (1, 3, 4):
            return image
        if image.shape[-1] in (1, 3, 4):
            return np.moveaxis(image, -1, 0)
    raise ValueError(
        f"an image must be (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4; got shape {tuple(image.shape)}"
    )


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _layout(
    image: ImageLike | Sequence[ImageLike], box_xyxy: BoxLike, image_id: str | Sequence[str] | None
) -> tuple[str, list[np.ndarray], np.ndarray | dict[int, np.ndarray], list[str]]:
    """Classify the input as ``single``, ``batch`` or ``volume``; return images, boxes and ids."""
    if isinstance(box_xyxy, Mapping):
        volume = _as_numpy(image)
        name = image_id if isinstance(image_id, str) else "volume"
        if isinstance(image, list | tuple) or volume.ndim != 3:
            raise BoxError(f"boxes given per slice ({{slice: box}}) need a (D, H, W) volume, got {name!r}")
        per_slice = {int(z): _as_numpy(b).astype(np.float64) for z, b in box_xyxy.items()}
        return "volume", [volume], per_slice, [name]
    boxes = _as_numpy(box_xyxy).astype(np.float64)
    if isinstance(image, list | tuple):
        images = [_as_numpy(i) for i in image]
        kind = "batch"
    else:
        array = _as_numpy(image)
        if array.ndim == 4:
            images, kind = list(array), "batch"
        elif array.ndim == 3 and not (boxes.shape == (4,) or boxes.shape == (1, 4)):
            images, kind = [array], "volume"
        elif array.ndim in (2, 3):
            images, kind = [array], "single"
        else:
            raise ValueError(
                f"image of shape {tuple(array.shape)}: expected (H, W), (H, W, C), (C, H, W), a volume "
                "(D, H, W) or a batch (B, H, W, C) / (B, C, H, W)"
            )
    if kind == "batch":
        if boxes.shape != (len(images), 4):
            raise BoxError(
                f"a batch of {len(images)} images needs boxes of shape ({len(images)}, 4), got {boxes.shape}"
            )
        ids = _ids(image_id, len(images))
        return kind, images, boxes, ids
    name = image_id if isinstance(image_id, str) else "image" if kind == "single" else "volume"
    if kind == "single":
        if boxes.shape not in ((4,), (1, 4)):
            raise BoxError(f"one image needs one box (x0, y0, x1, y1); got shape {boxes.shape} for {name!r}")
        return kind, images, boxes.reshape(1, 4), [name]
    depth = images[0].shape[0]
    if boxes.shape not in ((depth, 4), (6,)):
        raise BoxError(
            f"volume {name!r} of {depth} slices needs one box per slice ({depth}, 4) or one 3-D box "
            f"(x0, y0, z0, x1, y1, z1); got shape {boxes.shape}"
        )
    return kind, images, boxes, [name]


def _ids(image_id: str | Sequence[str] | None, count: int) -> list[str]:
    if image_id is None:
        return [f"image[{i}]" for i in range(count)]
    if isinstance(image_id, str):
        return [f"{image_id}[{i}]" for i in range(count)]
    if len(image_id) != count:
        raise ValueError(f"got {len(image_id)} image ids for {count} images")
    return [str(i) for i in image_id]


def _volume_boxes(
    boxes: np.ndarray | dict[int, np.ndarray], shape: tuple[int, ...], image_id: str
) -> tuple[dict[int, np.ndarray], str | None]:
    """Validated ``{slice: (4,) box}`` of a ``(D, H, W)`` volume and a note for a 3-D box."""
    depth, h, w = shape
    if isinstance(boxes, dict):
        outside = sorted(z for z in boxes if not 0 <= z < depth)
        if outside or not boxes:
            raise BoxError(
                f"volume {image_id!r} has slices 0..{depth - 1}; got boxes for slices {outside or '{}'}"
            )
        order = sorted(boxes)
        if any(boxes[z].shape != (4,) for z in order):
            raise BoxError(f"volume {image_id!r}: a per-slice box is (x0, y0, x1, y1)")
        ids = [f"{image_id} slice {z}" for z in order]
        checked = sanitize_boxes(np.stack([boxes[z] for z in order]), (h, w), ids).numpy()
        return {z: b.astype(np.float64) for z, b in zip(order, checked, strict=True)}, None
    if boxes.shape == (6,):
        z_slices = _z_range(boxes, depth, image_id)
        xy = sanitize_boxes(boxes[[0, 1, 3, 4]][None], (h, w), [image_id])[0].numpy().astype(np.float64)
        note = f"3-D box: slices {z_slices[0]}..{z_slices[-1]} of {depth} lie in its z range"
        return {z: xy for z in z_slices}, note
    ids = [f"{image_id} slice {z}" for z in range(depth)]
    checked = sanitize_boxes(boxes, (h, w), ids).numpy().astype(np.float64)
    return dict(enumerate(checked)), None


def _z_range(box: np.ndarray, depth: int, image_id: str) -> list[int]:
    """Slices ``k`` whose extent ``[k, k + 1)`` overlaps ``[z0, z1)``; a zero-thickness box takes one."""
    z0, z1 = float(box[2]), float(box[5])
    shown = "(" + ", ".join(f"{v:g}" for v in box.tolist()) + ")"
    if not (math.isfinite(z0) and math.isfinite(z1)):
        raise BoxError(f"3-D box {shown} of volume {image_id!r} is not finite")
    if z1 < z0:
        raise BoxError(
            f"3-D box {shown} of volume {image_id!r} has z1 < z0 (expected (x0, y0, z0, x1, y1, z1))"
        )
    outside = (z1 <= 0 or z0 >= depth) if z1 > z0 else (z0 < 0 or z0 > depth)
    if outside:
        raise BoxError(f"3-D box {shown} of volume {image_id!r} lies wholly outside its {depth} slices in z")
    if z1 == z0:
        k = min(math.floor(z0), depth - 1)
        return [k]
    return [k for k in range(depth) if k + 1 > z0 and k < z1]


def _to_input(box: np.ndarray, image_hw: Sequence[int], size: int) -> np.ndarray:
    """Map a box from original pixels to the ``size`` x ``size`` network input (pixel edges scale)."""
    h, w = image_hw
    return (box * np.array([size / w, size / h, size / w, size / h])).astype(np.float32)


def _stack_volume(
    slices: list[Prediction],
    indices: list[int],
    shape: tuple[int, ...],
    image_id: str,
    note: str | None,
    num_classes: int,
) -> Prediction:
    """One volume :class:`Prediction` from its predicted slices; other slices are background."""
    depth, h, w = shape
    k = num_classes
    gh, gw = slices[0].keep_grid.shape
    mask = np.zeros((depth, h, w), dtype=np.int64)
    probs = np.zeros((k, depth, h, w), dtype=np.float32)
    probs[0] = 1.0
    keep = np.zeros((depth, gh, gw), dtype=bool)
    has_scores = slices[0].scores is not None
    scores = np.zeros((depth, gh, gw), dtype=np.float32) if has_scores else None
    box = np.full((depth, 4), np.nan)
    box_in = np.full((depth, 4), np.nan, dtype=np.float32)
    predicted = np.zeros(depth, dtype=bool)
    for z, pred in zip(indices, slices, strict=True):
        mask[z], probs[:, z], keep[z] = pred.mask, pred.probabilities, pred.keep_grid
        if scores is not None and pred.scores is not None:
            scores[z] = pred.scores
        box[z], box_in[z], predicted[z] = pred.box_xyxy, pred.box_input, True
    notes = [note] if note else []
    missing = np.flatnonzero(~predicted)
    if missing.size:
        why = "outside the 3-D box's z range" if note else "without a box"
        notes.append(f"slices {missing.tolist()} are {why}: no prediction, labelled background")
    result = Prediction(
        image_id=image_id,
        mask=mask,
        probabilities=probs,
        keep_grid=keep,
        scores=scores,
        tokens_kept=sum(p.tokens_kept for p in slices),
        tokens_total=sum(p.tokens_total for p in slices),
        gflops=None if slices[0].gflops is None else sum(p.gflops or 0.0 for p in slices),
        time_ms=sum(p.time_ms for p in slices),
        box_xyxy=box,
        box_input=box_in,
        input_size=slices[0].input_size,
        class_names=slices[0].class_names,
        pruned=slices[0].pruned,
        predicted_slices=predicted,
        notes=notes,
    )
    if slices[0].unpruned is not None:
        base = [p.unpruned for p in slices]
        result.unpruned = _stack_volume(base, indices, shape, image_id, note, num_classes)  # type: ignore[arg-type]
    return result
