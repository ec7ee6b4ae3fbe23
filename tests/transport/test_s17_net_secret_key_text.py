"""A CURVE secret key that is refused is never quoted, not even in part (s17 diff
review L3).

``check_public_key`` quoted the first 12 characters of a key of the wrong length, and
the first 8 of one holding characters outside Z85: for the coordinator's curve_secret
(a provision file edited by hand, a paste with a trailing space) those went to the
terminal of `fedge coordinator check` and to the journal. A secret key's message now
gives its length, or where it holds what Z85 has not; a public key's still quotes it.
The real command and real key files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedge.transport import CurveKeyPair, KeyFileError, check_public_key, load_keypair
from tests.coordinator.test_s17_coord_config_bom import provision

REPO = Path(__file__).resolve().parents[2]


def shown(secret: str, said: str) -> bool:
    """Whether ``said`` quotes any 4 characters running in ``secret``."""
    return any(secret[i:i + 4] in said for i in range(len(secret) - 3))


@pytest.mark.parametrize(("mangle", "says"), [
    (lambda s: s + " ", "has 41 characters; a Z85 CURVE key has 40 (a secret key is not "
                        "shown)"),
    (lambda s: s[:-9], "has 31 characters; a Z85 CURVE key has 40 (a secret key is not "
                       "shown)"),
    (lambda s: s[:5] + "~" + s[6:], "holds characters that are not Z85 at position(s) 6 of "
                                    "40 (a secret key is not shown)"),
])
def test_a_bad_secret_key_is_described_not_quoted(mangle, says):
    kp = CurveKeyPair.generate()
    assert kp.secret is not None
    bad = mangle(kp.secret)
    with pytest.raises(KeyFileError) as err:
        CurveKeyPair(kp.public, bad)
    assert str(err.value) == f"secret key {says}"
    assert not shown(kp.secret, str(err.value)), err.value
    # a public key is not secret: it is still quoted, for finding it
    with pytest.raises(KeyFileError) as err:
        check_public_key(mangle(kp.public))
    assert mangle(kp.public)[:8] in str(err.value)


def test_a_bad_secret_key_in_a_key_file_is_not_quoted(tmp_path):
    kp = CurveKeyPair.generate()
    assert kp.secret is not None
    path = tmp_path / "coordinator.key_secret"
    path.write_text(f'curve\n    public-key = "{kp.public}"\n'
                    f'    secret-key = "{kp.secret[:-1]}"\n')
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError) as err:
        load_keypair(path)
    assert str(err.value) == (f"secret-key in {path} has 39 characters; a Z85 CURVE key "
                              "has 40 (a secret key is not shown)")


def test_coordinator_check_does_not_print_the_provisions_curve_secret(tmp_path):
    """The reviewer's case: one stray character after the provision's curve_secret."""
    prov = provision(tmp_path)
    doc = json.loads(prov.read_text())
    secret = doc["curve_secret"]
    prov.write_text(json.dumps(doc | {"curve_secret": secret + " "}))
    cfg = tmp_path / "coordinator.toml"
    cfg.write_text('state_dir = "st"\nprovision = "prov.json"\nbind = "tcp://127.0.0.1:0"\n')
    done = subprocess.run([sys.executable, "-m", "fedge.cli", "coordinator", "check",
                           "--config", str(cfg)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.endswith("secret key has 41 characters; a Z85 CURVE key has 40 (a "
                                "secret key is not shown)\n"), done.stderr
    assert not shown(secret, done.stderr + done.stdout), done.stderr
