"""The allocator setting of training runs: freed tensor memory is reused instead of page-faulted anew."""

from __future__ import annotations

import subprocess
import sys

import pytest

from prato_exp.cli.allocator import retain_freed_memory

# allocate, touch and free a 64 MiB tensor 30 times, as a training step does its activations; print the
# minor page faults this took
CHURN = """
import resource, sys, torch
from prato_exp.cli.allocator import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(30):
    buffer = torch.ones(16 * 2**20)
    del buffer
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True
    ).stdout
    return int(out.strip().splitlines()[-1])


linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="mallopt is glibc's; elsewhere the setting is a no-op"
)


@linux_only
def test_glibc_accepts_the_setting() -> None:
    assert retain_freed_memory()


@linux_only
def test_repeated_buffers_are_reused_instead_of_faulted_in_again() -> None:
    # 64 MiB is 16,384 pages: the default maps and unmaps it every time (~490,000 faults); with the
    # setting the heap grows over the first few rounds and is reused from then on (~80,000)
    default, retained = _page_faults("default"), _page_faults("retain")
    assert default > 25 * 16_384
    assert retained < default / 3
