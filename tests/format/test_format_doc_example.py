"""docs/FORMAT.md §10's worked example is what ``pyckpt.save`` writes today.

The spec's example is the one place a reader of the format sees whole files; it must not drift from
the writer (it said ``format_version`` [1, 1] after the writer moved to [1, 2])."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

import pyckpt
from pyckpt import manifest

SPEC = Path(__file__).resolve().parents[2] / "docs" / "FORMAT.md"


def _example() -> tuple[str, str, bytes, str]:
    """(the save call, MANIFEST.json, the data file's bytes, rank-00000.json) as §10 gives them."""
    text = SPEC.read_text()
    sec = text[text.index("## 10. Worked example"):text.index("## 11.")]
    call = re.search(r"`(pyckpt\.save\(.*?\))`", sec).group(1)
    blocks = re.findall(r"```json\n(.*?)```", sec, re.S)
    assert len(blocks) == 2, "§10 has the manifest and the part, one json block each"
    data = bytes.fromhex(re.search(r"holds the 16 bytes\s*`([0-9a-f ]+)`", sec).group(1).replace(" ", ""))
    return call, "".join(line.strip() for line in blocks[0].splitlines()), data, blocks[1]  # one line in the file


def test_the_worked_example_is_what_save_writes(tmp_path):
    call, doc_manifest, doc_data, doc_part = _example()
    # The call as the spec prints it, run against a directory of this test.
    eval(call.replace('"ckpt"', repr(str(tmp_path / "ckpt"))), {"pyckpt": pyckpt, "torch": torch})  # noqa: S307
    ck = tmp_path / "ckpt"

    part = (ck / "rank-00000.json").read_bytes()
    assert json.loads(part) == json.loads(doc_part)
    written = json.loads((ck / "MANIFEST.json").read_bytes())
    shown = json.loads(doc_manifest)
    # Times and versions differ from run to run; every other member must be the writer's.
    for varying in ("created_at", "created_by", "manifest_crc32c"):
        written.pop(varying), shown.pop(varying)
    assert written == shown
    assert shown["parts"][0]["nbytes"] == len(part) and shown["parts"][0]["crc32c"] == manifest.crc32c(part)
    assert (ck / "rank-00000" / "data-000.bin").read_bytes() == doc_data


def test_the_worked_example_manifest_checksum_is_its_own():
    """The example's ``manifest_crc32c`` is the CRC32C of its bytes before ``,"manifest_crc32c"``
    (§3), and the reader accepts the example's manifest as it is printed."""
    _, doc_manifest, _, _ = _example()
    head, _, tail = doc_manifest.partition(',"manifest_crc32c":')
    assert int(tail.rstrip("}")) == manifest.crc32c(head.encode())
    assert manifest.seal(json.loads(doc_manifest)) == doc_manifest.encode()
