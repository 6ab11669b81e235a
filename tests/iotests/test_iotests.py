"""QEMU 7.2's qemu-iotests (qcow2) with qcowpy as qemu-img: every test in qcowpy_pass.txt must pass.

The default run takes the representative subset (default_subset.txt); ``-m torture`` runs the
whole list. Tests that pass with Debian's qemu-img here but not with qcowpy are in
not_passing.txt with the reason, so the lists account for every test qemu-img passes.
"""
from __future__ import annotations

import pytest

from tests.conftest import skip_or_fail

from . import runner


def _run_or_fail(tests: list[str], jobs: int) -> None:
    if runner.find_iotests() is None:
        skip_or_fail("QEMU 7.2 iotests sources (tests/iotests/fetch-qemu-src) are")
    if runner.find_binaries() is None:
        skip_or_fail("qemu-system-x86_64, qemu-io, qemu-nbd and qemu-storage-daemon are")
    outcome = runner.run(tests, jobs=jobs, timeout=3600)
    missing = sorted(set(tests) - set(outcome.status))
    broken = {t: s for t, s in outcome.status.items() if s != "pass"}
    report = "\n".join(f"== {t}: {s}\n{outcome.diffs.get(t, '')}" for t, s in sorted(broken.items()))
    assert not missing and not broken, f"not run by check: {missing}\n{report}\n{outcome.output[-3000:]}"


def test_lists_account_for_every_test_qemu_img_passes():
    qemu_pass = set(runner.read_list(runner.QEMU_PASS))
    ours = runner.read_list(runner.QCOWPY_PASS)
    reasons = runner.read_reasons(runner.NOT_PASSING)
    subset = runner.read_list(runner.SUBSET)
    assert len(qemu_pass) > 100 and len(ours) == len(set(ours))
    assert set(ours) <= qemu_pass, "a listed qcowpy pass that qemu-img itself does not pass"
    assert set(ours) | set(reasons) == qemu_pass and not set(ours) & set(reasons)
    assert all(reasons.values()), "every test not passing needs its reason"
    assert subset and set(subset) <= set(ours)


def test_representative_subset_passes():
    _run_or_fail(runner.read_list(runner.SUBSET), jobs=2)


@pytest.mark.torture
def test_every_listed_iotest_passes():
    _run_or_fail(runner.read_list(runner.QCOWPY_PASS), jobs=2)
