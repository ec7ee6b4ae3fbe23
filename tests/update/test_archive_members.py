"""What an update archive may hold, checked member by member before anything is
extracted: the software slot and the app folder get regular files and directories
(a .deb's data archive also relative symlinks that stay inside), whatever the
interpreter's tarfile filter lets through."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from fedge.update.ab import SlotInstaller


def tar_gz(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    """Write `members` ((TarInfo, data) pairs, as given) to the .tar.gz `path`."""
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if info.isreg():
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return path


def entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info


def test_a_hardlink_to_a_member_not_there_is_refused_and_leaves_no_temporary_slot(tmp_path):
    """tarfile raises KeyError for it, which escaped unpack's error handling: the
    temporary slot stayed until the next open of the installer swept it."""
    bad = tar_gz(tmp_path / "fedge-2.0.0.tar.gz",
                 [(entry("hl", tarfile.LNKTYPE, "nowhere"), b"")])
    slots = SlotInstaller(tmp_path / "software")
    with pytest.raises(ValueError,
                       match=r"'fedge-2\.0\.0\.tar\.gz' cannot be unpacked: .*'nowhere'"):
        slots.unpack("2.0.0", bad)
    assert list(slots.slots.iterdir()) == []


def cve_2025_4517(out: Path, dest: Path, *, up: int, target: str, new_file: str,
                  overwrite: bytes) -> Path:
    """An archive that escapes tarfile's "data" filter on CPython before 3.11.13 /
    3.12.11, built as CPython's own regression test builds it
    (test_realpath_limit_attack): directories and symlinks whose real path passes
    PATH_MAX, so that the filter's realpath() stops resolving, then a symlink
    ``escape`` `up` levels above `dest` (where the archive is extracted). Through it a
    hardlink is made to `target` (relative to that folder) and `overwrite` written
    into it, and `new_file` is created there."""
    import os

    steps = "abcdefghijklmnop"
    path_max = os.pathconf("/", "PC_PATH_MAX")
    component = "d" * ((path_max - (len(str(dest)) + 1)) // (len(steps) + 1))
    members: list[tuple[tarfile.TarInfo, bytes]] = []
    path = ""
    for step in steps:
        members.append((entry(os.path.join(path, component), tarfile.DIRTYPE), b""))
        members.append((entry(os.path.join(path, step), tarfile.SYMTYPE, component), b""))
        path = os.path.join(path, component)
    link = os.path.join(*steps, "l" * 254)
    members.append((entry(link, tarfile.SYMTYPE, os.path.join(*[".."] * len(steps))), b""))
    members.append((entry("escape", tarfile.SYMTYPE,
                          os.path.join(link, *[".."] * (1 + up))), b""))
    members.append((entry("flaglink", tarfile.LNKTYPE, os.path.join("escape", target)), b""))
    members.append((entry("flaglink"), overwrite))
    members.append((entry(os.path.join("escape", new_file)), b"written outside\n"))
    return tar_gz(out, members)


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (links not followed) and its bytes."""
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file() and not p.is_symlink()}


def test_a_signed_bundle_escaping_by_a_symlink_chain_writes_nothing_and_keeps_the_trusted_root(
        fleet, tmp_path):
    """CVE-2025-4517 against the slot: on the interpreter this project's venv runs
    (3.11.7) the filter alone let a correctly signed bundle replace the appliance's
    TUF root history with an attacker's root, which `rotate-keys` then could not win
    back. The first link is refused before any member is written."""
    from fedge.update import tuf_repo
    from fedge.update.ab import SelfUpdate

    software = fleet.agent_dir / "software"
    dest = software / "slots" / ".1.1.0.abcdefgh"  # unpack's temporary slot, same length
    evil_root = b'{"signed": {"version": 1000}}'
    arc = cve_2025_4517(tmp_path / "fedge-1.1.0.tar.gz", dest, up=2,
                        target="tuf/metadata/root_history/1.root.json",
                        new_file="PWNED", overwrite=evil_root)
    fleet.updater.refresh()
    tuf_before = snapshot(fleet.agent_dir / "tuf" / "metadata")
    assert "root_history/1.root.json" in tuf_before
    path = fleet.publish("software", "fedge", "1.1.0", "fedge-1.1.0.tar.gz",
                         arc.read_bytes())
    [spec] = [s for s in fleet.updater.refresh() if s.kind == "software"]
    bundle = fleet.updater.download(spec)
    tuf_before = snapshot(fleet.agent_dir / "tuf" / "metadata")
    outside_before = snapshot(tmp_path)

    update = SelfUpdate(software)
    with pytest.raises(ValueError, match=r"cannot be unpacked: 'a' is a symlink to 'd+': the "
                                         r"archive may hold regular files and directories only"):
        update.stage(spec.version, bundle, rollout_id="r1", path=path)

    assert snapshot(fleet.agent_dir / "tuf" / "metadata") == tuf_before
    after = snapshot(tmp_path)
    assert after.pop("agent/software/.lock") == b""  # stage's lock: all it wrote
    assert after == outside_before  # nothing written or overwritten anywhere
    assert not list(tmp_path.rglob("PWNED"))
    root = tuf_repo.load((fleet.agent_dir / "tuf/metadata/root.json").read_bytes(), "root")
    assert root.signed.version == 1
    assert update.slots.current_version() is None and update.pending() is None
    assert list(update.slots.slots.iterdir()) == []


def test_a_signed_app_escaping_by_a_symlink_chain_writes_nothing_and_keeps_the_rollback_floor(
        fleet, tmp_path):
    """The same attack on an app: it wrote into the agent's state directory and
    overwrote updates/installed.json, removing the rollback floor."""
    from fedge.serve.repository import ModelRepository
    from tests.update.conftest import tiny_onnx

    fleet.publish("model", "risk", "5", "model.onnx", tiny_onnx(5.0))
    [model] = fleet.updater.pending()
    assert fleet.updater.install(model, models=ModelRepository(tmp_path / "models")).ok
    floor = (fleet.agent_dir / "updates" / "installed.json").read_bytes()
    dest = fleet.agent_dir / "apps" / "tools" / ".2.tmp"  # where _install_app extracts
    arc = cve_2025_4517(tmp_path / "tools.tar.gz", dest, up=2,
                        target="updates/installed.json", new_file="PWNED",
                        overwrite=b'{"model/risk": "0"}')
    fleet.publish("app", "tools", "2", "tools.tar.gz", arc.read_bytes())
    [spec] = [s for s in fleet.updater.pending() if s.name == "tools"]

    outcome = fleet.updater.install(spec)

    assert not outcome.ok
    assert "bad archive: 'a' is a symlink to 'ddd" in outcome.detail
    assert (fleet.agent_dir / "updates" / "installed.json").read_bytes() == floor
    assert not list(tmp_path.rglob("PWNED"))
    assert list((fleet.agent_dir / "apps" / "tools").iterdir()) == []


def app_tar(tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    return tar_gz(tmp_path / "app.tar.gz", [(entry("plan.toml"), b"rounds = 1\n"), *members])


D, SYM, LNK = tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE
REFUSED = {
    "symlink inside": ([(entry("alias", SYM, "plan.toml"), b"")],
                       "'alias' is a symlink to 'plan.toml': the archive may hold regular "
                       "files and directories only"),
    "hardlink inside": ([(entry("hl", LNK, "plan.toml"), b"")],
                        "'hl' is a hardlink to 'plan.toml'"),
    "char device": ([(entry("null", tarfile.CHRTYPE), b"")], "'null' is a device node"),
    "fifo": ([(entry("pipe", tarfile.FIFOTYPE), b"")], "'pipe' is a FIFO"),
    "absolute": ([(entry("/etc/cron.d/x"), b"x")], "'/etc/cron.d/x' is an absolute path"),
    "escaping": ([(entry("lib/../../x"), b"x")], "'lib/../../x' has a '..' component"),
    "dotdot inside": ([(entry("lib/../y"), b"x")], "'lib/../y' has a '..' component"),
    "duplicate": ([(entry("./plan.toml"), b"rounds = 9\n")],
                  "'./plan.toml' appears twice in the archive"),
    "long component": ([(entry("x" * 256), b"x")],
                       "has a path component longer than 255 bytes"),
    "long name": ([(entry("/".join(["d" * 200] * 21)), b"x")],
                  "has a name of 4220 bytes, more than 4096"),
}


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_a_software_archive_member_of_a_refused_kind_or_name_is_refused_before_unpacking(
        tmp_path, case):
    members, why = REFUSED[case]
    bundle = tar_gz(tmp_path / "fedge-2.0.0.tar.gz",
                    [(entry("fedge-bundle.json"), b'{"exec": ["true"]}'),
                     (entry("plan.toml"), b"rounds = 1\n"), *members])
    slots = SlotInstaller(tmp_path / "software")
    with pytest.raises(ValueError) as info:
        slots.unpack("2.0.0", bundle)
    assert "'fedge-2.0.0.tar.gz' cannot be unpacked: " in str(info.value)
    assert why in str(info.value)
    assert list(slots.slots.iterdir()) == []


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_an_app_archive_member_of_a_refused_kind_or_name_is_refused_before_unpacking(
        fleet, tmp_path, case):
    members, why = REFUSED[case]
    fleet.publish("app", "cox", "1", "app.tar.gz", app_tar(tmp_path, members).read_bytes())
    [spec] = fleet.updater.pending()
    outcome = fleet.updater.install(spec)
    assert not outcome.ok
    assert outcome.detail.startswith("ValueError: app cox 1: bad archive: ")
    assert why in outcome.detail
    assert list((fleet.agent_dir / "apps" / "cox").iterdir()) == []
    assert fleet.updater.installed() == {}


def test_a_plain_app_archive_still_installs(fleet, tmp_path):
    fleet.publish("app", "cox", "1", "app.tar.gz", tar_gz(tmp_path / "app.tar.gz", [
        (entry("model", D), b""), (entry("model/cox.py"), b"def fit(): ...\n"),
        (entry("./plan.toml"), b"rounds = 1\n")]).read_bytes())
    [spec] = fleet.updater.pending()
    assert fleet.updater.install(spec).ok
    current = fleet.agent_dir / "apps" / "cox" / "current"
    assert (current / "model" / "cox.py").read_text() == "def fit(): ...\n"
    assert fleet.updater.installed() == {"app/cox": "1"}


def made_bundle(tmp_path: Path, version: str) -> tuple[Path, Path]:
    """A bundle from firmware/make_bundle.py, and its payload."""
    import importlib.util

    repo = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("make_bundle", repo / "firmware/make_bundle.py")
    mb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mb)
    payload = tmp_path / "payload"
    (payload / "site-packages" / "pkg").mkdir(parents=True)
    (payload / "site-packages" / "pkg" / "__init__.py").write_text("x = 1\n")
    (payload / "bin").mkdir()
    (payload / "bin" / "tool").write_text("#!/bin/sh\n")
    (payload / "bin" / "tool").chmod(0o755)
    out = tmp_path / f"fedge-{version}.tar.gz"
    mb.make_bundle(payload, version, out)
    return out, payload


def test_a_bundle_from_make_bundle_still_unpacks_and_verifies(tmp_path):
    out, _ = made_bundle(tmp_path, "2.0.0")
    slot = SlotInstaller(tmp_path / "software").unpack("2.0.0", out)
    assert (slot / "site-packages" / "pkg" / "__init__.py").read_text() == "x = 1\n"
    assert (slot / "bin" / "tool").stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize(("change", "why"), [
    ("extra", r"files not listed in fedge-bundle.json: \['site-packages/evil.pth'\]"),
    ("missing", "bin/tool, listed in fedge-bundle.json, is missing from the bundle"),
    ("nested manifest", r"not listed .*\['site-packages/fedge-bundle.json'\]"),
])
def test_a_bundle_whose_members_are_not_its_file_list_is_refused_before_extracting(
        tmp_path, monkeypatch, change, why):
    """The manifest's table is compared with the archive's member list first: nothing
    of such a bundle is written, not even inside its temporary slot."""
    out, _ = made_bundle(tmp_path, "2.0.0")
    with tarfile.open(out) as tar:
        members = [(m, tar.extractfile(m).read() if m.isreg() else b"")
                   for m in tar.getmembers()]
    if change == "extra":
        members.append((entry("site-packages/evil.pth"), b"import os\n"))
    elif change == "missing":
        members = [(m, d) for m, d in members if m.name != "bin/tool"]
    else:
        members.append((entry("site-packages/fedge-bundle.json"), b"{}"))
    bad = tar_gz(tmp_path / "fedge-2.0.1.tar.gz", members)
    extracted = []
    real = tarfile.TarFile.extractall
    monkeypatch.setattr(tarfile.TarFile, "extractall",
                        lambda self, *a, **kw: extracted.append(a) or real(self, *a, **kw))
    slots = SlotInstaller(tmp_path / "software")
    with pytest.raises(ValueError, match=why):
        slots.unpack("2.0.1", bad)
    assert extracted == [] and list(slots.slots.iterdir()) == []


needs_dpkg = pytest.mark.skipif(__import__("shutil").which("dpkg-deb") is None,
                                reason="dpkg-deb is not installed")


@needs_dpkg
@pytest.mark.parametrize(("members", "why"), [
    ([("./lib/", "dir"), ("./lib/x", "../../etc/passwd")],
     "'./lib/x' is a symlink to '../../etc/passwd', which leaves the archive's root"),
    ([("./a", "b"), ("./b", "c"), ("./c", "")],
     "'./a' is a symlink to 'b', which passes through the symlink member './b'"),
    ([("./sub/", "dir"), ("./d", "sub"), ("./d/x", "")],
     "'./d/x' lies under the symlink member './d'"),
    ([("./x", "lib/../../../etc")],
     "'./x' is a symlink to 'lib/../../../etc', which leaves the archive's root"),
    ([("./hl", "hardlink:./fedge-bundle.json")], "'./hl' is a hardlink"),
], ids=["escaping", "chain", "write through", "up and out", "hardlink"])
def test_a_deb_keeps_only_relative_symlinks_that_stay_inside_and_link_to_no_link(
        tmp_path, members, why):
    from tests.update.test_ab_install import deb, member

    infos = [(member("./fedge-bundle.json"), b'{"exec": ["true"]}')]
    for name, how in members:
        if how == "dir":
            info = member(name, mode=0o755)
            info.type = tarfile.DIRTYPE
        elif how.startswith("hardlink:"):
            info = member(name)
            info.type, info.linkname = tarfile.LNKTYPE, how.split(":", 1)[1]
        elif how:
            info = member(name, link=how)
        else:
            info = member(name)
        infos.append((info, b""))
    path = tmp_path / "fedge-3.0.0.deb"
    deb(path, infos)
    slots = SlotInstaller(tmp_path / "software")
    with pytest.raises(ValueError) as info:
        slots.unpack("3.0.0", path)
    assert "'fedge-3.0.0.deb' cannot be unpacked: " in str(info.value)
    assert why in str(info.value)
    assert list(slots.slots.iterdir()) == []
