"""Build, run and summarise the reference cases: every backbone x pruner preset pair, plus a few variants.

Why this exists: the pruner-interface refactor (``prato_exp.pruning`` and the backbones' pruning code)
must not change what any network computes. ``record_reference_outputs.py`` ran the cases below before
that refactor and saved what they produced to ``tests/data/reference_outputs.pt``;
``tests/test_reference_outputs.py`` rebuilds every case the same way and compares. Both use only this
module, so recording and checking cannot drift apart.

A case is built as ``train.py`` builds it (the composed train config, ``build_net``), on a seeded torch
RNG, and run through the :class:`~prato_exp.lightning.module.SegmentationModule` hooks and
``model_step`` that training and validation use, on one fixed batch:

- ``eval``: a fresh network in eval mode, after the validation-epoch hook (pruner RNGs restarted), under
  ``torch.inference_mode`` as Lightning validates;
- ``train``: another fresh network in train mode, after the train-batch hook at global step 0, with torch
  re-seeded right before the forward (Gumbel noise, random masks, dropout), gradients on.

The harness calls no pruner method: it uses the LightningModule's hooks and ``model_step``, and reads
``SegOutput.logits`` and ``PruningTrace.keep_grids``, ``.block_keep_fraction`` and ``.aux_losses()``. Should
the refactor rename those, adapt :func:`run_mode` (how the values are read), never the reference file.

Regenerate with ``python tests/reference/record_reference_outputs.py`` ONLY when a change of behaviour is
intended: regenerating to make the test pass defeats its purpose.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor

TESTS_DIR = Path(__file__).resolve().parents[1]
if str(TESTS_DIR) not in sys.path:  # run as a script: ``conftest`` lives in tests/
    sys.path.insert(0, str(TESTS_DIR))

from conftest import compose_train, group_choices  # noqa: E402

from prato_exp.lightning.checkpoint import build_net, source_class  # noqa: E402
from prato_exp.lightning.module import SegmentationModule  # noqa: E402

REFERENCE_PATH = TESTS_DIR / "data" / "reference_outputs.pt"
FORMAT_VERSION = 1

DATASET = "synthetic_cardiac"
IMG_SIZE = 64
BATCH = 2
BUILD_SEED = 0
"""torch seed right before the network is built (its initial weights)."""
INPUT_SEED = 1234
"""seed of the generator that draws the fixed image and label."""
FORWARD_SEED = 7
"""torch seed right before each forward (training-time randomness)."""
BOXES = ((8.0, 12.0, 40.0, 44.0), (20.0, 4.0, 60.0, 36.0))
"""``box_xyxy`` per image, in input pixels."""
BLOCK = 16
"""logits are stored as their means over ``BLOCK x BLOCK`` pixel blocks (every pixel counts, 1 KiB per
forward in float64), next to the sum and absolute sum of the full logits."""

Mode = Literal["eval", "train"]
MODES: tuple[Mode, ...] = ("eval", "train")
DTYPES = {"float64": torch.float64, "float32": torch.float32}
TOLERANCES = {"float64": {"rtol": 1e-7, "atol": 1e-9}, "float32": {"rtol": 1e-4, "atol": 1e-5}}
"""``assert_close`` tolerances per recorded dtype (keep masks and kept counts are compared exactly)."""
CROSS_PLATFORM_TOLERANCES = {"float64": {"rtol": 1e-5, "atol": 1e-7}, "float32": {"rtol": 1e-4, "atol": 1e-5}}
"""Tolerances per portability tier on a platform with no recording of its own. Measured: an AMD EPYC
(AVX2) against the Intel Xeon (AVX-512) recording differed by up to 6.2e-7 relative and 5.5e-9 absolute in
cases the perturbations had rated float64-portable (float32 parts of PrATo's soft scores and DynamicViT's
predictor), so the float64 tier allows 1e-5 / 1e-7 there; no float32-tier case came near its bounds."""


@dataclass(frozen=True)
class Variant:
    """A change to preset pairs that reaches pruning code the presets alone leave out.

    Attributes:
        overrides: extra Hydra overrides.
        prune_enabled: the batch's ``prune_enabled`` (False: that image is exempt from pruning).
        pairs: the ``(model, pruning)`` presets it is applied to.
    """

    overrides: tuple[str, ...] = ()
    prune_enabled: tuple[bool, ...] = (True, True)
    pairs: tuple[tuple[str, str], ...] = ()


TOKEN_MODELS = ("segformer_small", "swin_unetr_small", "transunet_small", "unetr_small")
PLAIN_VITS = ("transunet_small", "unetr_small")
BASELINES = ("dtop", "dynamicvit", "evovit", "stp", "tram")

PRESET = "preset"
VARIANTS: dict[str, Variant] = {
    PRESET: Variant(),
    # the second image exempt from pruning (the empty-slice ``no_pruning`` fallback)
    "exempt": Variant(
        prune_enabled=(True, False),
        pairs=tuple((m, "prato") for m in TOKEN_MODELS)
        + tuple(("unetr_small", p) for p in ("prato_soft", *BASELINES)),
    ),
    # attention-key masking instead of dropping tokens (no preset uses it)
    "mask": Variant(
        overrides=("pruning.mode=mask",),
        pairs=tuple((m, "prato") for m in TOKEN_MODELS) + tuple(("unetr_small", p) for p in BASELINES),
    ),
    # two pruning points: what one point hands the next (policies, centrality, assembly over points)
    "two_points": Variant(
        overrides=("model.prune_after=[3,6]",),
        pairs=tuple((m, p) for m in PLAIN_VITS for p in ("prato", "random", *BASELINES) if p != "dtop"),
    ),
    # DToP at a threshold its untrained heads reach, so tokens really exit (none do at p0=0.9)
    "dtop_exits": Variant(
        overrides=("model.prune_after=[3,6]", "pruning.p0=0.3"), pairs=tuple((m, "dtop") for m in PLAIN_VITS)
    ),
}
"""``preset`` is every model x pruning preset pair; the others apply to their ``pairs`` that built."""


@dataclass(frozen=True)
class Case:
    """One reference case: a model preset, a pruning preset and a :data:`VARIANTS` key."""

    model: str
    pruning: str
    variant: str = PRESET

    @property
    def id(self) -> str:
        suffix = "" if self.variant == PRESET else f"+{self.variant}"
        return f"{self.model}-{self.pruning}{suffix}"

    @property
    def spec(self) -> Variant:
        return VARIANTS[self.variant]


def model_presets() -> list[str]:
    """The CPU-sized model presets (``*_small``) and the CNN reference; paper sizes are too slow here."""
    return [*sorted(m for m in group_choices("model") if m.endswith("_small")), "basic_unet"]


def pruner_presets() -> list[str]:
    """Every pruning preset in ``conf/pruning``."""
    return group_choices("pruning")


def preset_cases() -> list[Case]:
    """Every model preset x every pruning preset."""
    return [Case(m, p) for m in model_presets() for p in pruner_presets()]


def variant_cases(built: set[tuple[str, str]]) -> list[Case]:
    """The cases of every variant but ``preset``, on their pairs in ``built`` (the presets that built)."""
    return [
        Case(model, pruning, name)
        for name, spec in VARIANTS.items()
        if name != PRESET
        for model, pruning in spec.pairs
        if (model, pruning) in built
    ]


@dataclass
class ModeOutputs:
    """What one forward produced, reduced to what is stored.

    Attributes:
        logits_blocks: ``(B, K, H / BLOCK, W / BLOCK)`` means of the logits over pixel blocks.
        logits_sum: sum of the full logits.
        logits_abs_sum: sum of the absolute full logits.
        keep_grids: ``(P, B, Z)`` bool, the grid places alive after each of the ``P`` pruning points
            (``P = 0`` without pruning).
        kept_counts: ``[point][image]`` kept grid places.
        block_keep_fraction: ``(B, depth)`` alive fraction at each block's input, or None.
        losses: every named loss term of ``SegmentationModule.model_step`` (task loss, the pruners'
            auxiliary losses, early-head losses).
        aux_loss_names: the names in ``trace.aux_losses()`` (a subset of ``losses``).
    """

    logits_blocks: Tensor
    logits_sum: float
    logits_abs_sum: float
    keep_grids: Tensor
    kept_counts: list[list[int]] = field(default_factory=list)
    block_keep_fraction: Tensor | None = None
    losses: dict[str, float] = field(default_factory=dict)
    aux_loss_names: list[str] = field(default_factory=list)


Status = Literal["ok", "refused", "failed"]


@dataclass
class CaseRecord:
    """One case: its outputs per mode, or why it has none.

    ``status`` is ``ok`` (built and ran; ``outputs`` holds both modes), ``refused`` (building the network
    raised ``error_type: error_message``, on purpose for some pairs; the innermost cause of Hydra's
    wrapper) or ``failed`` (it built, but its forward raised in every dtype).

    ``portable`` says how the outputs may be compared on a platform other than the recording one
    (:func:`platform_fingerprint`), as measured by re-running the case under perturbed CPU numerics
    (:data:`PERTURBATIONS`): ``float64`` or ``float32`` (the :data:`TOLERANCES` that held; float32 where
    a pruner's float32 parts, e.g. PrATo's scores, leak rounding into the float64 outputs) or ``None``
    (keep masks flipped: a near-tie at the pruning threshold decided by float32 rounding; such a case
    is compared on the recording platform only). ``portability_note`` says what broke it.
    """

    model: str
    pruning: str
    variant: str
    status: Status
    dtype: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    outputs: dict[str, ModeOutputs] = field(default_factory=dict)
    portable: str | None = None
    portability_note: str = ""

    @property
    def case(self) -> Case:
        return Case(self.model, self.pruning, self.variant)

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts, lists, numbers and tensors, for ``torch.save``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaseRecord:
        outputs = {mode: ModeOutputs(**values) for mode, values in data.get("outputs", {}).items()}
        return cls(**{**data, "outputs": outputs})


@functools.lru_cache(maxsize=4)
def compose(case: Case) -> DictConfig:
    """The train config of ``python train.py model=... pruning=... <variant overrides>`` at 64 px."""
    overrides = [f"model={case.model}", f"pruning={case.pruning}", f"dataset={DATASET}"]
    return compose_train([*overrides, f"model.img_size={IMG_SIZE}", *case.spec.overrides])


def build_module(cfg: DictConfig, dtype: torch.dtype) -> SegmentationModule:
    """The network of ``cfg`` in ``dtype``, inside the LightningModule that trains it.

    The initial weights are drawn from ``BUILD_SEED`` directly in ``dtype`` (the default dtype while
    building): float32 draws cast to float64 would differ by an ulp between CPU types (vectorised
    ``uniform_``), and so would every output. Raises what building the network raises.
    """
    torch.manual_seed(BUILD_SEED)
    source = source_class(cfg.dataset)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        net = build_net(cfg.model, source, cfg.get("box_channel", False)).to(dtype)
    finally:
        torch.set_default_dtype(previous)
    loss, optimizer = instantiate(cfg.loss), instantiate(cfg.optimizer)
    return SegmentationModule(net=net, loss=loss, optimizer=optimizer, class_names=source.class_names)


def make_batch(cfg: DictConfig, case: Case, dtype: torch.dtype) -> dict[str, Tensor]:
    """The fixed batch: a seeded random image and label, the fixed boxes, the variant's ``prune_enabled``."""
    source = source_class(cfg.dataset)
    generator = torch.Generator().manual_seed(INPUT_SEED)
    shape = (BATCH, source.in_channels, IMG_SIZE, IMG_SIZE)
    image = torch.rand(shape, generator=generator, dtype=torch.float64)
    label = torch.randint(0, source.num_classes, (BATCH, IMG_SIZE, IMG_SIZE), generator=generator)
    return {
        "image": image.to(dtype),
        "label": label,
        "box_xyxy": torch.tensor(BOXES[:BATCH], dtype=dtype),
        "prune_enabled": torch.tensor(case.spec.prune_enabled[:BATCH]),
    }


def run_mode(module: SegmentationModule, batch: dict[str, Tensor], mode: Mode) -> ModeOutputs:
    """One forward of ``module`` on ``batch`` as a training step (``train``) or validation (``eval``)."""
    if mode == "train":
        module.train()
        module.on_train_batch_start(batch, 0)
        torch.manual_seed(FORWARD_SEED)
        with torch.enable_grad():
            _, out, losses = module.model_step(batch)
    else:
        module.eval()
        module.on_validation_epoch_start()
        torch.manual_seed(FORWARD_SEED)
        with torch.inference_mode():
            _, out, losses = module.model_step(batch)
    logits = out.logits.detach()
    trace = out.trace
    points = [k.detach().bool() for k in trace.keep_grids]
    keep_grids = torch.stack(points) if points else torch.zeros(0, BATCH, 0, dtype=torch.bool)
    fraction = trace.block_keep_fraction
    return ModeOutputs(
        logits_blocks=F.avg_pool2d(logits, BLOCK),
        logits_sum=float(logits.sum()),
        logits_abs_sum=float(logits.abs().sum()),
        keep_grids=keep_grids.clone(),
        kept_counts=keep_grids.sum(dim=2).tolist(),
        block_keep_fraction=None if fraction is None else fraction.detach().clone(),
        losses={name: float(value.detach()) for name, value in losses.items()},
        aux_loss_names=sorted(trace.aux_losses()),
    )


def run_case(case: Case, mode: Mode, dtype: torch.dtype, cfg: DictConfig | None = None) -> ModeOutputs:
    """One mode of ``case`` in ``dtype`` on a freshly built network (no state shared between modes)."""
    cfg = compose(case) if cfg is None else cfg
    module = build_module(cfg, dtype)
    return run_mode(module, make_batch(cfg, case, dtype), mode)


def root_cause(error: BaseException) -> BaseException:
    """The innermost ``__cause__`` of ``error`` (Hydra wraps a constructor's error in its own)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def record_case(case: Case) -> CaseRecord:
    """Build and run one case: float64 first, float32 when float64 fails; refused when it cannot build."""
    cfg = compose(case)
    record = CaseRecord(case.model, case.pruning, case.variant, "refused")
    try:
        build_module(cfg, torch.float64)
    except Exception as error:  # the constructor's refusal is what is recorded
        cause = root_cause(error)
        record.error_type, record.error_message = type(cause).__name__, str(cause)
        return record
    errors = []
    for name, dtype in DTYPES.items():
        try:
            record.outputs = {mode: run_case(case, mode, dtype, cfg) for mode in MODES}
        except Exception as error:
            errors.append(f"{name}: {type(error).__name__}: {error}")
            continue
        record.status, record.dtype = "ok", name
        return record
    record.status, record.error_type, record.error_message = "failed", "forward", " | ".join(errors)
    return record


def assert_outputs_match(
    expected: ModeOutputs,
    actual: ModeOutputs,
    dtype: str,
    tolerances: dict[str, dict[str, float]] = TOLERANCES,
) -> None:
    """Assert that ``actual`` reproduces ``expected``: keep masks, kept counts and loss names exactly,
    numbers within ``tolerances`` (default :data:`TOLERANCES`) of ``dtype``."""
    tol = tolerances[dtype]
    assert actual.keep_grids.shape == expected.keep_grids.shape, "number of pruning points or grid changed"
    changed = int((actual.keep_grids != expected.keep_grids).sum())
    counts = f"kept counts {expected.kept_counts} -> {actual.kept_counts}"
    assert changed == 0, f"keep masks changed at {changed} grid places; {counts}"
    assert actual.kept_counts == expected.kept_counts
    assert actual.aux_loss_names == expected.aux_loss_names, "auxiliary losses changed"
    assert sorted(actual.losses) == sorted(expected.losses), "loss terms changed"
    for name, value in expected.losses.items():
        torch.testing.assert_close(actual.losses[name], value, **tol, msg=lambda m, n=name: f"loss {n}: {m}")
    if expected.block_keep_fraction is None:
        assert actual.block_keep_fraction is None
    else:
        torch.testing.assert_close(actual.block_keep_fraction, expected.block_keep_fraction, **tol)
    for name in ("logits_sum", "logits_abs_sum"):
        got, want = getattr(actual, name), getattr(expected, name)
        torch.testing.assert_close(got, want, **tol, msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(
        actual.logits_blocks, expected.logits_blocks, **tol, msg=lambda m: f"logits (block means): {m}"
    )


PERTURBATIONS: dict[str, dict[str, str]] = {
    "aten_default": {"ATEN_CPU_CAPABILITY": "default"},
    "aten_avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "mkl_compatible": {"MKL_CBWR": "COMPATIBLE"},
}
"""Environments that change CPU numerics as another CPU type would: ATen's vectorised kernels
(no SIMD, AVX2 instead of AVX-512) and MKL's BLAS code path. Each case is re-run under each of them when
recorded, to measure how portable its outputs are (:attr:`CaseRecord.portable`)."""
NUMERICS_ENV = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "OPENBLAS_CORETYPE")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` where there is one)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    return platform.processor()


def platform_fingerprint() -> dict[str, Any]:
    """What decides the CPU numerics: torch build, ATen's SIMD level, BLAS, the CPU model, numerics env."""
    return {
        "torch": str(torch.__version__),
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl": torch.backends.mkl.is_available(),
        "env": {name: os.environ.get(name) for name in NUMERICS_ENV},
    }


def settings() -> dict[str, Any]:
    """The recording settings, stored so that a changed constant is noticed before any comparison."""
    return {
        "dataset": DATASET,
        "img_size": IMG_SIZE,
        "batch": BATCH,
        "build_seed": BUILD_SEED,
        "input_seed": INPUT_SEED,
        "forward_seed": FORWARD_SEED,
        "boxes": [list(b) for b in BOXES],
        "block": BLOCK,
        "variants": {name: asdict(spec) for name, spec in VARIANTS.items()},
    }


def load_reference(path: Path = REFERENCE_PATH) -> dict[str, Any]:
    """The saved file: ``{"format", "torch_version", "settings", "cases": [CaseRecord dict, ...]}``."""
    return torch.load(path, weights_only=True)
