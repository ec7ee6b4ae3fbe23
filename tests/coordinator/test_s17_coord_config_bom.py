"""A coordinator config saved as UTF-8 with a byte-order mark (as Windows editors save
it) is read like one without: the mark gave "not valid TOML: Invalid statement (at line
1, column 1)"."""

from __future__ import annotations

import json

from fedge.coordinator.config import load_config
from fedge.secagg.keys import Identity
from fedge.transport import CurveKeyPair


def provision(tmp_path):
    kp = CurveKeyPair.generate()
    prov = tmp_path / "prov.json"
    prov.write_text(json.dumps({
        "curve_public": kp.public, "curve_secret": kp.secret, "roster": "",
        "roster_public_key": Identity.generate().public_bytes().hex(), "operators": {},
        "endpoint": "tcp://127.0.0.1:7700", "admin_endpoint": "tcp://127.0.0.1:7701"}))
    return prov


def test_a_config_with_a_utf8_byte_order_mark_is_read_as_without(tmp_path):
    provision(tmp_path)
    cfg = tmp_path / "coordinator.toml"
    cfg.write_bytes(b"\xef\xbb\xbf" + b'state_dir = "st"\nprovision = "prov.json"\n'
                    b'bind = "tcp://127.0.0.1:7710"\n')
    loaded = load_config(cfg)
    assert loaded.state_dir == tmp_path / "st"
    assert loaded.bind == "tcp://127.0.0.1:7710"
