"""An enrolment file's malformed curve_secret is never quoted, not even in part (s17,
after ed902bf).

`fedge.update.files.check_z85_key`, which `fedge agent enrol` runs on the enrolment
file's keys, said "curve_secret must be a 40-character Z85 string, got '...'" (the first
60 characters of the value: all of a secret one character too long) and "curve_secret
'...' is not valid Z85" (all of it); a group of 5 Z85 characters over 32 bits escaped as
a struct.error traceback. Now, as ed902bf made the transport's check_public_key say of a
secret key, the message gives the length, or the positions of what is wrong. The real
console writes the file; the real `fedge agent enrol` reads it.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from fedge.console.enrolment import create_enrolment
from fedge.console.store import ConsoleStore

REPO = Path(__file__).resolve().parents[2]

HIDDEN = "(a secret key is not shown)"


def shown(secret: str, said: str) -> bool:
    """Whether ``said`` quotes any 4 characters running in ``secret``."""
    return any(secret[i:i + 4] in said for i in range(len(secret) - 3))


def enrolment_with(tmp: Path, mangle: Any, key: str = "curve_secret") -> tuple[Path, str]:
    """A real enrolment file whose payload's ``key`` (curve_secret) is ``mangle``d (its
    signature no longer verifies: the keys are checked first), and the value it had."""
    console = ConsoleStore.init(tmp / "console", coordinator_endpoint="tcp://192.0.2.7:7000")
    path, _ = create_enrolment(console, "h1", valid_for=timedelta(days=1))
    doc = json.loads(path.read_text())
    payload = json.loads(base64.b64decode(doc["payload"]))
    secret = payload[key]
    payload[key] = mangle(secret)
    doc["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    path.write_text(json.dumps(doc))
    return path, secret


@pytest.mark.parametrize(("mangle", "says"), [
    (lambda s: s + " ", f"curve_secret has 41 characters; a Z85 CURVE key has 40 {HIDDEN}"),
    (lambda s: s[:-1], f"curve_secret has 39 characters; a Z85 CURVE key has 40 {HIDDEN}"),
    (lambda s: s[:9] + "~" + s[10:], "curve_secret holds characters that are not Z85 at "
                                     f"position(s) 10 of 40 {HIDDEN}"),
    # Z85's alphabet, yet 84 * 85^4 + ... > 2^32: libzmq refuses the key
    (lambda s: s[:5] + "%%%%%" + s[10:], "curve_secret is not a Z85 CURVE key: its 5 "
                                         "characters at position(s) 6-10 of 40 encode more "
                                         f"than 32 bits {HIDDEN}"),
])
def test_agent_enrol_does_not_print_a_malformed_curve_secret(tmp_path, mangle, says):
    path, secret = enrolment_with(tmp_path, mangle)
    done = subprocess.run([sys.executable, "-m", "fedge.cli", "agent", "enrol", str(path),
                           "--state-dir", str(tmp_path / "st")], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done
    assert not shown(secret, done.stdout + done.stderr), done.stderr
    assert done.stderr == (f"fedge agent enrol: enrolment file {path} is corrupt: "
                           f"{says}\n"), done.stderr
    assert not (tmp_path / "st" / "keys").exists()


def test_a_value_of_the_wrong_type_is_named_by_its_type():
    from fedge.update.files import check_z85_key

    with pytest.raises(ValueError) as err:
        check_z85_key(12345678, what="curve_secret")
    assert str(err.value) == "curve_secret must be a Z85 str, got int"


@pytest.mark.parametrize("key", ["curve_public", "coordinator_public_key"])
def test_a_malformed_public_key_is_quoted_and_not_called_secret(tmp_path, key):
    """Public keys may be shown (they help find the typo); they are not said to be
    secret keys."""
    path, public = enrolment_with(tmp_path, lambda s: s[:9] + "~" + s[10:], key)
    done = subprocess.run([sys.executable, "-m", "fedge.cli", "agent", "enrol", str(path),
                           "--state-dir", str(tmp_path / "st")], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done
    assert key in done.stderr and HIDDEN not in done.stderr, done.stderr
    assert shown(public[:9], done.stderr), done.stderr
