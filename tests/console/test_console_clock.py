"""The console's side of clocks: a push the coordinator refuses for expired metadata
says what this console's clock reads (a slow one signs targets already expired and
renews root too late)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from fedge.console.cli import push
from fedge.console.client import AdminClient, AdminError
from fedge.console.enrolment import create_enrolment
from fedge.console.store import ConsoleStore
from tests.update.conftest import tiny_onnx


def test_a_push_refused_for_expired_targets_names_the_consoles_clock(tmp_path, make_server):
    """A console 100 days slow signs targets that expire 10 days before the
    coordinator's (right) clock: the refusal says so, and what this console reads."""
    server = make_server()
    create_enrolment(server.console, "h1", valid_for=timedelta(days=1))
    admin = AdminClient.from_store(server.console, "admin", timeout_s=5)
    admin.call("enrol", *server.console.enrol_request("h1"))
    slow_now = (datetime.now(UTC) - timedelta(days=100)).replace(microsecond=0)
    slow = ConsoleStore(server.console.home, clock=lambda: slow_now)
    f = tmp_path / "model.onnx"
    f.write_bytes(tiny_onnx(1.0))
    with pytest.raises(AdminError) as err:
        push(slow, admin, f, kind="model", name="risk", version="1", sites=["h1"], wait=False)
    text = str(err.value)
    assert "targets metadata v2 expired at" in text and "by this coordinator's clock" in text
    assert f"this console's clock reads {slow_now.isoformat()}; by it, root v1 expires" in text
    assert "if this clock is slow, that explains the refusal" in text
    assert server.updates.versions["targets"] == 1  # nothing published
