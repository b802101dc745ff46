"""Synthetic phantoms generated on the fly: a cardiac cine-MRI slice and a dermoscopy image.

Every image is a pure function of ``(seed, split, index, slice)`` drawn with ``numpy.random.default_rng``,
so nothing is cached and any worker regenerates the same pixels. They are for smoke runs and tests, never
results on ACDC or ISIC. Generation takes a few milliseconds per 128 x 128 image.
"""

from __future__ import annotations

import re

import numpy as np
from scipy import ndimage

from prato_exp.data.base import SPLITS, Case, SegSource, SliceRef

_SPLIT_CODE = {split: code for code, split in enumerate(SPLITS)}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(yy, xx)``, each ``(size, size)`` float32."""
    axis = np.arange(size, dtype=np.float32)
    return axis[:, None].repeat(size, 1), axis[None, :].repeat(size, 0)


def _rotated(
    yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, angle: float
) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates ``(u, v)`` relative to ``(cy, cx)``, rotated by ``angle`` (radians)."""
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(angle), np.sin(angle)
    return dx * c + dy * s, -dx * s + dy * c


def _ellipse(
    yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ru: float, rv: float, angle: float = 0.0
) -> np.ndarray:
    """Squared normalised radius of a rotated ellipse: ``< 1`` inside. ``(H, W)`` float32."""
    u, v = _rotated(yy, xx, cy, cx, angle)
    return (u / ru) ** 2 + (v / rv) ** 2


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, roughly unit-variance noise smooth over ``size / cells`` pixels. ``(size, size)``."""
    coarse = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    return ndimage.zoom(coarse, size / (cells + 1), order=1, mode="nearest", grid_mode=True)[:size, :size]


def _parse_case_id(case_id: str, prefix: str, sizes: dict[str, int]) -> tuple[str, int]:
    match = re.fullmatch(rf"{prefix}_(train|val|test)_(\d+)", case_id)
    if match is None or int(match.group(2)) >= sizes[match.group(1)]:
        raise KeyError(f"Unknown case id {case_id!r} for {prefix} (expected e.g. '{prefix}_val_0003').")
    return match.group(1), int(match.group(2))


class _PhantomSource(SegSource):
    """Shared bookkeeping: split sizes, case ids and per-case random generators."""

    prefix: str

    def __init__(self, num_train: int, num_val: int, num_test: int, size: int, seed: int) -> None:
        sizes = {"train": num_train, "val": num_val, "test": num_test}
        for split, n in sizes.items():
            if n < 0:
                raise ValueError(f"num_{split} must be >= 0, got {n}.")
        if size < 32:
            raise ValueError(f"size must be >= 32 pixels, got {size}.")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}.")
        self.sizes = sizes
        self.size = size
        self.seed = seed

    @property
    def has_test_split(self) -> bool:
        return self.sizes["test"] > 0

    def case_id(self, split: str, index: int) -> str:
        return f"{self.prefix}_{split}_{index:04d}"

    def split_ids(self) -> dict[str, list[str]]:
        return {split: [self.case_id(split, i) for i in range(n)] for split, n in self.sizes.items()}

    def _rng(self, split: str, index: int, *extra: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SPLIT_CODE[split], index, *extra])


class SyntheticCardiacSource(_PhantomSource):
    """Short-axis cine-MRI-like phantom: LV blood pool, myocardial ring, RV crescent.

    Labels 0 background, 1 RV, 2 myocardium, 3 LV; one channel in [0, 1]. Each case has
    ``slices_per_case`` slices running from base to apex (the heart shrinks towards the apex). A fraction
    ``empty_fraction`` of the training slices (at least one when positive) shows no heart at all, so
    training meets slices without foreground.
    """

    name = "phantom_cardiac"
    prefix = "phantom_cardiac"
    num_classes = 4
    in_channels = 1
    class_names = ("RV", "Myo", "LV")

    def __init__(
        self,
        num_train: int = 64,
        num_val: int = 8,
        num_test: int = 8,
        size: int = 128,
        seed: int = 0,
        slices_per_case: int = 1,
        empty_fraction: float = 0.05,
    ) -> None:
        super().__init__(num_train, num_val, num_test, size, seed)
        if slices_per_case < 1:
            raise ValueError(f"slices_per_case must be >= 1, got {slices_per_case}.")
        if not 0.0 <= empty_fraction < 1.0:
            raise ValueError(f"empty_fraction must be in [0, 1), got {empty_fraction}.")
        self.slices_per_case = slices_per_case
        self.empty_fraction = empty_fraction
        refs = self.train_slices()
        n_empty = round(empty_fraction * len(refs))
        if empty_fraction > 0 and refs:
            n_empty = max(n_empty, 1)
        order = np.random.default_rng([seed, 99]).permutation(len(refs))[:n_empty]
        self.empty_slices: frozenset[SliceRef] = frozenset(refs[i] for i in order)

    def train_slices(self) -> list[SliceRef]:
        return [
            SliceRef(self.case_id("train", i), k)
            for i in range(self.sizes["train"])
            for k in range(self.slices_per_case)
        ]

    def load_slice(self, ref: SliceRef) -> tuple[np.ndarray, np.ndarray]:
        split, index = _parse_case_id(ref.case_id, self.prefix, self.sizes)
        if not 0 <= ref.slice_index < self.slices_per_case:
            raise KeyError(
                f"Slice {ref.slice_index} out of range for {ref.case_id} ({self.slices_per_case})."
            )
        return self._generate(split, index, ref.slice_index, empty=ref in self.empty_slices)

    def load_case(self, case_id: str) -> Case:
        """Image ``(1, D, H, W)``, label ``(D, H, W)``; ``D = slices_per_case``."""
        slices = [self.load_slice(SliceRef(case_id, k)) for k in range(self.slices_per_case)]
        image = np.stack([s[0] for s in slices], axis=1)
        label = np.stack([s[1] for s in slices], axis=0)
        return Case(case_id=case_id, image=image, label=label)

    def _generate(self, split: str, index: int, k: int, empty: bool) -> tuple[np.ndarray, np.ndarray]:
        """One slice: image ``(1, S, S)`` float32 in [0, 1], label ``(S, S)`` int64."""
        s = self.size
        case_rng = self._rng(split, index)
        rng = self._rng(split, index, k + 1)
        yy, xx = _grid(s)

        body_cy, body_cx = s / 2 + case_rng.uniform(-0.04, 0.04, 2) * s
        body_rx, body_ry = case_rng.uniform(0.42, 0.48) * s, case_rng.uniform(0.34, 0.42) * s
        heart_cy = s / 2 + case_rng.uniform(-0.1, 0.1) * s
        heart_cx = s / 2 + case_rng.uniform(-0.12, 0.12) * s
        r_lv0 = case_rng.uniform(0.06, 0.11) * s
        wall_ratio = case_rng.uniform(0.35, 0.55)
        aspect = case_rng.uniform(0.85, 1.15)
        lv_angle = case_rng.uniform(0, np.pi)
        rv_dir = case_rng.uniform(0, 2 * np.pi)
        rv_shift, rv_along, rv_across = (
            case_rng.uniform(0.6, 0.9),
            case_rng.uniform(0.9, 1.2),
            case_rng.uniform(1.2, 1.6),
        )
        blood = case_rng.uniform(0.75, 0.95)
        rv_blood = blood * case_rng.uniform(0.85, 1.0)
        myo = case_rng.uniform(0.15, 0.28)
        tissue = case_rng.uniform(0.36, 0.5)
        lung_angles = case_rng.uniform(-0.3, 0.3, 2)

        t = k / max(self.slices_per_case - 1, 1)
        scale = 1.0 - 0.45 * t
        heart_cy += rng.uniform(-0.01, 0.01) * s
        heart_cx += rng.uniform(-0.01, 0.01) * s
        r_lv = max(r_lv0 * scale, 2.0)
        wall = max(wall_ratio * r_lv0 * (0.8 + 0.2 * scale), 2.0)
        r_out = r_lv + wall

        body = _ellipse(yy, xx, body_cy, body_cx, body_rx, body_ry)
        image = np.full((s, s), 0.02, dtype=np.float32)
        image[body < 1.0] = 0.75
        image[body < 0.88] = tissue
        image += (body < 0.88) * 0.07 * _smooth_noise(rng, s, 10)
        for side, angle in zip((-1.0, 1.0), lung_angles, strict=True):
            lung = _ellipse(yy, xx, body_cy - 0.05 * s, body_cx + side * 0.27 * s, 0.13 * s, 0.2 * s, angle)
            image[lung < 1.0] = 0.06

        label = np.zeros((s, s), dtype=np.int64)
        if not empty:
            lv_rho = _ellipse(yy, xx, heart_cy, heart_cx, aspect, 1.0 / aspect, lv_angle)
            rv_cy = heart_cy + np.sin(rv_dir) * rv_shift * r_out
            rv_cx = heart_cx + np.cos(rv_dir) * rv_shift * r_out
            rv_rho = _ellipse(yy, xx, rv_cy, rv_cx, rv_along * r_out, rv_across * r_out * scale, rv_dir)
            rv_wall = 1.5 / (rv_along * r_out)
            heart = lv_rho < (r_out + 1.5) ** 2
            rv = (rv_rho < 1.0) & ~heart
            if t < 0.85:
                image[(rv_rho < (1.0 + rv_wall) ** 2) & ~heart] = myo
                image[rv] = rv_blood
                label[rv] = 1
            image[heart] = tissue
            myocardium = lv_rho < r_out**2
            image[myocardium] = myo
            label[myocardium] = 2
            pool = lv_rho < r_lv**2
            image[pool] = blood
            label[pool] = 3
            for _ in range(rng.integers(0, 3)):
                py, px = rng.uniform(0.3, 0.7, 2) * s
                if np.hypot(py - heart_cy, px - heart_cx) > 2.2 * r_out + 0.05 * s:
                    image[_ellipse(yy, xx, py, px, 0.03 * s, 0.03 * s) < 1.0] = blood
        image = ndimage.gaussian_filter(image, 0.6)

        gx, gy = (xx / s - 0.5) * 2, (yy / s - 0.5) * 2
        c = rng.uniform(-0.2, 0.2, 5)
        image *= np.exp(c[0] * gx + c[1] * gy + c[2] * gx * gy + c[3] * gx**2 + c[4] * gy**2)
        sigma = rng.uniform(0.02, 0.05)
        noise = rng.standard_normal((2, s, s), dtype=np.float32) * sigma
        image = np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2)
        lo, hi = float(image.min()), float(image.max())
        image = (image - lo) / max(hi - lo, 1e-6)
        return image[None].astype(np.float32), label


class SyntheticLesionSource(_PhantomSource):
    """Dermoscopy-like phantom: an irregular pigmented lesion on skin texture, with hairs and vignetting.

    Labels 0 skin, 1 lesion; three RGB channels in [0, 1]; every case is one image (``D = 1``).
    """

    name = "phantom_lesion"
    prefix = "phantom_lesion"
    num_classes = 2
    in_channels = 3
    class_names = ("lesion",)

    def __init__(
        self, num_train: int = 64, num_val: int = 8, num_test: int = 8, size: int = 128, seed: int = 0
    ) -> None:
        super().__init__(num_train, num_val, num_test, size, seed)

    def train_slices(self) -> list[SliceRef]:
        return [SliceRef(self.case_id("train", i), 0) for i in range(self.sizes["train"])]

    def load_slice(self, ref: SliceRef) -> tuple[np.ndarray, np.ndarray]:
        split, index = _parse_case_id(ref.case_id, self.prefix, self.sizes)
        if ref.slice_index != 0:
            raise KeyError(f"Slice {ref.slice_index} out of range for {ref.case_id} (one slice).")
        return self._generate(split, index)

    def load_case(self, case_id: str) -> Case:
        """Image ``(3, 1, H, W)``, label ``(1, H, W)``."""
        image, label = self.load_slice(SliceRef(case_id, 0))
        return Case(case_id=case_id, image=image[:, None], label=label[None])

    def _generate(self, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
        """One image ``(3, S, S)`` float32 in [0, 1] and label ``(S, S)`` int64."""
        s = self.size
        rng = self._rng(split, index)
        yy, xx = _grid(s)

        skin = np.array([0.88, 0.68, 0.58], dtype=np.float32) * rng.uniform(0.8, 1.08)
        skin += rng.uniform(-0.04, 0.04, 3).astype(np.float32)
        shade = 1.0 + 0.05 * _smooth_noise(rng, s, 8)
        image = skin[:, None, None] * shade[None]

        cy, cx = s / 2 + rng.uniform(-0.12, 0.12, 2) * s
        r0 = rng.uniform(0.14, 0.3) * s
        stretch = rng.uniform(0.75, 1.25)
        u, v = _rotated(yy, xx, cy, cx, rng.uniform(0, np.pi))
        u, v = u / stretch, v * stretch
        rho, phi = np.hypot(u, v), np.arctan2(v, u)
        radius = np.ones_like(phi)
        for k in range(2, 13):
            amp = rng.uniform(0.0, 0.28) / k if k < 8 else rng.uniform(0.0, 0.02)
            radius += amp * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
        radius *= r0
        edge = rng.uniform(1.0, 4.0)
        alpha = np.clip(0.5 + (radius - rho) / edge, 0.0, 1.0)
        label = (rho < radius).astype(np.int64)

        pigment = np.array([0.45, 0.28, 0.18], dtype=np.float32) * rng.uniform(0.5, 1.15)
        depth = 1.0 - 0.35 * np.clip(1.0 - rho / radius, 0.0, 1.0) + 0.12 * _smooth_noise(rng, s, 6)
        lesion = pigment[:, None, None] * depth[None]
        image = image * (1.0 - alpha[None]) + lesion * alpha[None]

        hairs = np.zeros((s, s), dtype=np.float32)
        for _ in range(rng.integers(0, 6)):
            p0, p1, p2 = rng.uniform(-0.1, 1.1, (3, 2)) * s
            tt = np.linspace(0.0, 1.0, 3 * s, dtype=np.float32)[:, None]
            points = (1 - tt) ** 2 * p0 + 2 * (1 - tt) * tt * p1 + tt**2 * p2
            iy, ix = np.round(points).astype(int).T
            keep = (iy >= 0) & (iy < s) & (ix >= 0) & (ix < s)
            hairs[iy[keep], ix[keep]] = 1.0
        if hairs.any():
            hairs = np.clip(ndimage.gaussian_filter(hairs, 0.6) * 2.5, 0.0, 1.0)
            hair_color = rng.uniform(0.05, 0.25)
            image = image * (1.0 - hairs[None]) + hair_color * hairs[None]

        r2 = ((yy - s / 2) ** 2 + (xx - s / 2) ** 2) / (s / 2) ** 2
        image = image * (1.0 - rng.uniform(0.1, 0.4) * r2)[None]
        if rng.uniform() < 0.3:
            scope = rng.uniform(1.0, 1.4)
            image = image * np.clip((scope - np.sqrt(r2)) * 8.0, 0.03, 1.0)[None]
        image += rng.standard_normal((3, s, s), dtype=np.float32) * 0.015
        return np.clip(image, 0.0, 1.0).astype(np.float32), label
