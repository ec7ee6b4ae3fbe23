"""The enrolment steps in the docs destroy every copy of the appliance's secret keys
on the appliance, the enrolment file included: it holds the same long-term CURVE
and identity keys that the steps move to /var/lib/fedge-credentials/agent/, where
the agent's unit loads them from; and every doc names that place."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
AGENT_UNIT = REPO / "packaging" / "systemd" / "fedge-agent.service"
OLD_PLACE = "/etc/fedge/credentials/agent"


def credentials_source() -> str:
    (line,) = [line for line in AGENT_UNIT.read_text().splitlines()
               if line.startswith("LoadCredential=")]
    return line.split(":", 1)[1]


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


def test_the_firmware_readme_moves_the_keys_where_the_agents_unit_loads_them(
        tmp_path: Path) -> None:
    """The README's install lines, run on real files (paths mapped into tmp_path):
    both keys end up in the unit's LoadCredential= directory, nowhere else."""
    source = credentials_source()
    section = (REPO / "firmware" / "README.md").read_text().split("## Enrolment", 1)[1]
    lines = code_lines(section.split("\n## ", 1)[0])
    installs = [argv for argv in lines if argv[0] == "install"]
    assert [Path(argv[-1]).parent for argv in installs] == [Path(source)] * 2
    assert sorted(Path(argv[-1]).name for argv in installs) == ["curve.key", "identity.key"]
    state, creds = tmp_path / "state", tmp_path / "credentials"
    (state / "keys").mkdir(parents=True)
    creds.mkdir()

    def here(arg: str) -> str:
        return arg.replace(source, str(creds)).replace("/var/lib/fedge", str(state))

    for argv in installs:
        Path(here(argv[-2])).write_text(argv[-2])
        assert argv[1:7] == ["-o", "root", "-g", "root", "-m", "0600"]
        subprocess.run(["install", "-m", "0600", *map(here, argv[7:])], check=True, timeout=30)
    for argv in lines:
        if argv[:2] == ["shred", "-u"] and all(a.startswith("/var/lib/fedge/") for a in argv[2:]):
            subprocess.run(list(map(here, argv)), check=True, timeout=30)
    assert sorted(p.name for p in creds.iterdir()) == ["curve.key", "identity.key"]
    assert list((state / "keys").iterdir()) == []


# Where the old place may still be named: the notes on moving from it.
MOVING_ON = ("Earlier packages kept the agent's credentials", "An appliance set up with the "
             "earlier recipe")
DOCS = ["README.md", "firmware/README.md", "packaging/debian/README.Debian",
        "packaging/debian/etc/agent.toml", "packaging/systemd/fedge-agent.service",
        "docs/security.md", "fedge/agent/process.py"]


@pytest.mark.parametrize("doc", DOCS)
def test_every_doc_names_the_place_the_agents_unit_loads_its_keys_from(doc: str) -> None:
    text = (REPO / doc).read_text()
    assert credentials_source() in text
    paragraphs = [p for p in text.split("\n\n") if not p.lstrip().startswith(MOVING_ON)]
    assert OLD_PLACE not in "\n\n".join(paragraphs)


def test_the_agents_missing_key_message_names_where_the_docs_put_the_keys(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under its unit, with the keys neither among its credentials nor in its state:
    the error tells hospital IT which file of the credentials directory is missing."""
    from fedge.agent.process import AgentConfigError, load_enrolled

    (tmp_path / "enrolment.json").write_text(json.dumps({"site": "s1",
                                                         "roster_public_key": "00" * 32}))
    creds = tmp_path / "run-credentials"
    creds.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    with pytest.raises(AgentConfigError) as err:
        load_enrolled(tmp_path)
    assert f"(from {credentials_source()}/curve.key)" in str(err.value)
    assert OLD_PLACE not in str(err.value)
