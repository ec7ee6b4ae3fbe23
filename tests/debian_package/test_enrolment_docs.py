"""The enrolment steps in the docs destroy every copy of the appliance's secret keys
on the appliance, the enrolment file included: it holds the same long-term CURVE
and identity keys that the steps move to /etc/fedge/credentials/agent/."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def code_lines(markdown: str) -> list[list[str]]:
    """Every line of every fenced code block, split as the shell would."""
    blocks = markdown.split("```")[1::2]
    return [shlex.split(line, comments=True) for block in blocks
            for line in block.splitlines()[1:] if shlex.split(line, comments=True)]


def test_the_firmware_readme_shreds_the_enrolment_file_it_enrols(tmp_path: Path) -> None:
    section = (REPO / "firmware" / "README.md").read_text().split("## Enrolment", 1)[1]
    lines = code_lines(section.split("\n## ", 1)[0])
    (enrol,) = [argv for argv in lines if argv[:3] == ["fedge", "agent", "enrol"]]
    enrolment_file = enrol[-1]
    assert enrolment_file.endswith(".fedge-enrol")
    shreds = [argv for argv in lines if argv[:2] == ["shred", "-u"] and enrolment_file in argv]
    assert len(shreds) == 1, lines
    assert lines.index(shreds[0]) > lines.index(enrol)  # only once enrolment succeeded
    # and the line does it, on a real file
    copy = tmp_path / "SITE.fedge-enrol"
    copy.write_bytes(b"long-term keys")
    argv = [str(copy) if a == enrolment_file else a for a in shreds[0]]
    subprocess.run(argv, check=True, timeout=30)
    assert not copy.exists()


def test_every_other_enrolment_doc_says_so_too() -> None:
    readme_debian = (REPO / "packaging" / "debian" / "README.Debian").read_text()
    assert "shred the enrolment file" in readme_debian
    assert "then shred -u both originals and\n                the enrolment file" in readme_debian
    guide = (REPO / "docs" / "console-and-updates.md").read_text()
    lines = code_lines(guide.split("## From zero", 1)[1].split("\n## ", 1)[0])
    (enrol,) = [argv for argv in lines if argv[:3] == ["fedge", "agent", "enrol"]]
    enrolment_file = next(a for a in enrol if a.endswith(".fedge-enrol"))
    assert ["shred", "-u", enrolment_file] in lines
