"""Every backbone x pruner preset pair still computes what it computed before the pruner-interface refactor.

Why this exists: the refactor of the pruner interface (``prato_exp.pruning`` and the backbones' pruning
code) must not change behaviour. ``tests/data/reference_outputs.pt`` holds what every case produced
before it (logits as block means and sums, keep masks, loss terms; eval and train mode, float64); each
test rebuilds one case exactly as ``tests/reference/record_reference_outputs.py`` did (the same code,
``tests/reference/reference_cases.py``) and compares.

Regenerate with ``python tests/reference/record_reference_outputs.py`` ONLY when a change of behaviour
is intended; regenerating to make this test pass hides exactly what it exists to catch.

On the recording platform the outputs reproduce bit for bit, and every case is compared at its dtype's
tight tolerances. ``tests/data/reference_outputs_<platform>.pt`` files hold the same cases recorded from
the same (pre-refactor) code on other CPU types (``record_reference_outputs.py --platform-copy``); on
such a platform its copy is compared at the tight tolerances instead. Elsewhere (another CPU type, torch
build or numerics environment) each case is compared at the tier it proved portable to when recorded
(``CaseRecord.portable``), with the wider ``CROSS_PLATFORM_TOLERANCES`` measured across two CPU types;
for the few whose keep masks hinge on float32 rounding (a near-tie at the pruning threshold: PrATo's
untrained scores on Swin UNETR's 256 tokens) only kept counts and loss terms are checked there, and the
test reports a skip.

A train-mode-only failure of a stochastic case (Gumbel noise, random masks, dropout) with eval passing
usually means the refactor changed the order or number of random draws, not the computation.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator

import pytest
import torch
from reference.reference_cases import (
    CROSS_PLATFORM_TOLERANCES,
    DTYPES,
    FORMAT_VERSION,
    MODES,
    REFERENCE_PATH,
    CaseRecord,
    assert_outputs_match,
    build_module,
    compose,
    load_reference,
    platform_fingerprint,
    run_case,
    settings,
)

REFERENCE = load_reference() if REFERENCE_PATH.is_file() else None
RECORDS = [CaseRecord.from_dict(d) for d in REFERENCE["cases"]] if REFERENCE else []
PLATFORM_COPIES = sorted(REFERENCE_PATH.parent.glob(f"{REFERENCE_PATH.stem}_*.pt"))


def _same_platform_outputs() -> dict[str, CaseRecord] | None:
    """The recorded cases by id from the reference recorded on this platform, or None (none was)."""
    for path in [REFERENCE_PATH, *PLATFORM_COPIES]:
        if not path.is_file():
            continue
        reference = load_reference(path)
        if reference["platform"] == platform_fingerprint():
            return {r.case.id: r for r in map(CaseRecord.from_dict, reference["cases"])}
    return None


SAME_PLATFORM = _same_platform_outputs()

OK = [(r, mode) for r in RECORDS if r.status == "ok" for mode in MODES]
NOT_RUN = [r for r in RECORDS if r.status != "ok"]


@pytest.fixture(autouse=True)
def _one_thread_quiet() -> Iterator[None]:
    """One intra-op thread, as recorded; no per-case warnings or logs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    level = logging.root.manager.disable
    logging.disable(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    logging.disable(level)
    torch.set_num_threads(threads)


def test_reference_file_matches_the_harness() -> None:
    assert REFERENCE is not None, f"{REFERENCE_PATH} is missing"
    assert REFERENCE["format"] == FORMAT_VERSION
    assert REFERENCE["settings"] == settings(), "reference_cases.py settings changed since recording"
    assert OK, "the reference file holds no recorded outputs"


@pytest.mark.parametrize(("record", "mode"), OK, ids=[f"{r.case.id}-{mode}" for r, mode in OK])
def test_outputs_match_reference(record: CaseRecord, mode: str) -> None:
    if SAME_PLATFORM is not None:
        record = SAME_PLATFORM[record.case.id]
    expected = record.outputs[mode]
    actual = run_case(record.case, mode, DTYPES[record.dtype])
    if SAME_PLATFORM is not None:
        assert_outputs_match(expected, actual, record.dtype)
        return
    if record.portable is not None:
        assert_outputs_match(expected, actual, record.portable, CROSS_PLATFORM_TOLERANCES)
        return
    assert actual.kept_counts == expected.kept_counts
    assert sorted(actual.losses) == sorted(expected.losses)
    pytest.skip(
        "kept counts and loss terms checked, values not: not portable off the recording platform "
        f"({record.portability_note}); recorded on {REFERENCE['platform']}, "
        f"running on {platform_fingerprint()}"
    )


@pytest.mark.parametrize("record", NOT_RUN, ids=[r.case.id for r in NOT_RUN])
def test_refused_pairs_are_still_refused(record: CaseRecord) -> None:
    """A pair refused at recording that builds now has no reference: reported as a skip, not a failure."""
    if record.status == "failed":
        pytest.skip(f"its forward failed at recording ({record.error_message}); nothing to compare")
    try:
        build_module(compose(record.case), torch.float64)
    except Exception:
        return
    refusal = f"{record.error_type}: {record.error_message}"
    pytest.skip(f"refused at recording ({refusal}), builds now: no reference to compare")


@pytest.mark.parametrize("path", PLATFORM_COPIES, ids=[p.name for p in PLATFORM_COPIES])
def test_platform_copies_hold_the_same_cases(path) -> None:
    copy = load_reference(path)
    assert copy["format"] == FORMAT_VERSION and copy["settings"] == REFERENCE["settings"]
    assert copy["platform"] != REFERENCE["platform"], "a platform copy must come from another platform"
    statuses = [(r.case.id, r.status) for r in map(CaseRecord.from_dict, copy["cases"])]
    assert statuses == [(r.case.id, r.status) for r in RECORDS]
