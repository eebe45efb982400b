"""QEMU's own qcow2 tests (qemu-iotests 7.2, Debian's source of the installed qemu-utils)
with `pyhv img` as qemu-img: every bash test that uses only qemu-img and qemu-io (no VM,
no NBD) and passes with the real qemu-img here. One `./check` run serves all of them.

A test pyhv does not pass yet is an expected failure naming its cause (strict: once it
passes, it must leave KNOWN). Out of scope, as the README says: LUKS, and QEMU's
block-layer filename syntax (`blkdebug:`, `file:`)."""

from __future__ import annotations

import pytest

from tests.helpers.iotests import run_iotests

# the bash qcow2 tests that pass with the real qemu-img 7.2 on these machines
WITH_QEMU_IMG = """
001 002 003 004 005 008 009 010 011 012 013 014 015 017 018 019 020 021 022 023 024 025 026
027 029 031 032 033 034 035 036 037 038 039 042 043 046 047 048 049 050 052 053 054 061 062
063 066 069 072 073 074 079 080 082 086 089 090 097 098 103 104 105 107 110 111 112 114 115
121 122 126 133 134 137 138 150 154 158 159 170 177 178 179 187 189 190 197 198 204 214 215
217 226 243 250 251 252 261 263 265 268 270 271 272 279 284 287 289 290 292 293 305 313
""".split()

OUT_OF_SCOPE = {
    "074": "blkdebug: filenames", "126": "file: filenames",
    **dict.fromkeys("178 189 198 263 284 293".split(), "LUKS"),
}

KNOWN = {
    "029": "convert -l",
    "080": "snapshots of damaged images, amend, convert -l",
    "261": "amend, check -r of incomplete snapshot table entries",
    "122": "convert of several source images, convert -S 0",
    "020": "json:/blkdebug: filenames (out of scope)",
    **dict.fromkeys("098 110 150 204 217".split(),
                    "json:/blkdebug:/null-co filenames (out of scope)"),
    "250": "resize --shrink: discards passed to the file, the file truncated",
    **dict.fromkeys("061 243 270 289".split(), "the data_file option"),
    "082": "-o help, amend",
    "089": "json: filenames (out of scope)",
    "190": "measure, bitmap",
    "271": "measure, extended-L2 preallocation over a backing file, check of unaligned "
           "data clusters",
    "112": "amend",
    "251": "convert --salvage (with blkdebug: error injection)",
}

IN_SCOPE = [n for n in WITH_QEMU_IMG if n not in OUT_OF_SCOPE]

# one ./check run for all of them (~6 min) happens in the first test's setup
pytestmark = pytest.mark.timeout(2400)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_iotests(IN_SCOPE, tmp_path_factory.mktemp("iotests"))


def test_the_harness_passes_qemu_img_itself(tmp_path):
    """The same harness with the real qemu-img: a failure here is the harness's."""
    result = run_iotests(["001", "138"], tmp_path, qemu_img="/usr/bin/qemu-img")
    assert {n: r.status for n, r in result.items()} == {"001": "pass", "138": "pass"}


@pytest.mark.parametrize("name", IN_SCOPE)
def test_iotest(results, name, request):
    if name in KNOWN:
        request.applymarker(pytest.mark.xfail(reason=KNOWN[name], strict=True))
    result = results.get(name)
    assert result is not None, f"./check did not report {name}"
    assert result.status == "pass", result.detail
