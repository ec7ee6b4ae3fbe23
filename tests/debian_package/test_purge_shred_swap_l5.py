"""Purge overwrites the key files in the fedge user's directory as that user (diff
review s14 L5): shred opens by path, and a fedge process alive at purge could swap a
key file for a symlink between find and shred; run as root, shred then zeroed the
link's target. The swap is made deterministic here by a `shred` first on PATH that
does it just before the real shred opens the file. Real postinst/postrm, real shred
and setpriv, in a mount namespace with scratch /etc and /var."""

from __future__ import annotations

from pathlib import Path

from tests.debian_package.test_maintainer_scripts import (
    in_scratch_root,
    needs_namespace,
    script_stderr,
)

# the race, at its worst moment: each fedge-owned key file becomes a symlink to a file
# of root's just before shred opens it (as whichever user shred runs as)
SWAPPING_SHRED = r"""#!/bin/sh
echo "$(id -u) $*" >> /var/log/shred.log
for f; do
    case $f in
        /var/lib/fedge/keys/identity.key) rm -f "$f"; ln -s /var/lib/root-only/victim "$f" ;;
    esac
done
exec /usr/bin/shred "$@"
"""


@needs_namespace
def test_a_key_file_swapped_for_a_symlink_during_the_purge_cannot_zero_roots_file(
        tmp_path: Path) -> None:
    (tmp_path / "shred").write_text(SWAPPING_SHRED)
    proc = in_scratch_root(tmp_path, f"""
sh $P/postinst configure '' 2>>$ERR
mkdir -p /var/cache/bin /var/lib/root-only
cp {tmp_path / "shred"} /var/cache/bin/shred
chmod 0755 /var/cache/bin/shred
: > /var/log/shred.log
chmod 0666 /var/log/shred.log
export PATH=/var/cache/bin:$PATH
echo root-data-that-must-survive > /var/lib/root-only/victim
mkdir -p /var/lib/fedge/keys
echo agent-identity-secret > /var/lib/fedge/keys/identity.key
chown -R fedge:fedge /var/lib/fedge/keys
# root's, from an older `fedge agent enrol` run as root: fedge cannot write it
echo old-root-enrol-secret > /var/lib/fedge/keys/curve.json
# one more link to a root file in fedge's directory: not root's to overwrite by path
echo linked > /var/lib/root-only/linked
ln /var/lib/root-only/linked /var/lib/fedge/keys/linked
sh $P/postrm purge 2>>$ERR
echo "victim: $(cat /var/lib/root-only/victim)"
echo "linked: $(cat /var/lib/root-only/linked)"
cat /var/log/shred.log
""")
    assert proc.returncode == 0, proc.stdout + proc.stderr + script_stderr(tmp_path)
    out, err = proc.stdout, script_stderr(tmp_path)
    assert "victim: root-data-that-must-survive" in out, (out, err)
    assert "linked: linked" in out, (out, err)
    calls = [line.split(" ", 1) for line in out.splitlines() if line.endswith((
        "identity.key", "curve.json"))]
    as_user = {args.rsplit("/", 1)[-1]: uid for uid, args in calls}
    assert as_user["curve.json"] == "0"  # root's own file: root, after the path check
    assert as_user["identity.key"] != "0", calls  # fedge's: as fedge
    assert "could not overwrite every key file in /var/lib/fedge/keys" in err
    assert "/var/lib/fedge/keys/linked changed during the purge: not overwritten" in err
