"""The provision file's CURVE key pair is checked when the config is read: a
curve_public that is not a Z85 key (an int), or a pair that does not belong together,
started the coordinator into a KeyFileError traceback; a roster that is not a string,
into an AttributeError."""

from __future__ import annotations

import json

import pytest

from fedge.coordinator.config import ConfigError, load_config
from fedge.transport import CurveKeyPair
from tests.coordinator.test_s17_coord_config_bom import provision


@pytest.mark.parametrize(("field", "value", "error"), [
    ("curve_public", 12345, "public key must be a Z85 str, got int"),
    ("curve_public", CurveKeyPair.generate().public, "secret key does not belong to"),
    ("curve_secret", "short", "secret key has 5 characters; a Z85 CURVE key has 40 (a "
                              "secret key is not shown)"),
    ("roster", 7, "is unreadable or lacks a field"),
], ids=["public-not-a-string", "public-of-another-pair", "secret-too-short", "roster-not-a-path"])
def test_a_provision_file_with_a_bad_key_pair_is_refused_naming_it(tmp_path, field, value,
                                                                    error):
    prov = provision(tmp_path)
    prov.write_text(json.dumps(json.loads(prov.read_text()) | {field: value}))
    cfg = tmp_path / "coordinator.toml"
    cfg.write_text('state_dir = "st"\nprovision = "prov.json"\nbind = "tcp://127.0.0.1:0"\n')
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert str(err.value).startswith(f"coordinator config {cfg}: provision file {prov}")
    assert error in str(err.value), err.value
