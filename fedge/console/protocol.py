"""The admin channel's vocabulary: operations, who may call them, and the two
messages that carry them (registered with the wire codec).

An operator's CURVE public key is its identity; the coordinator maps it to a
role. Viewers read; admins also change things.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedge.wire.codec import message

ROLE_ADMIN = "admin"
ROLE_VIEWER = "viewer"

# op -> roles allowed. Everything not listed is unknown.
OPS: dict[str, frozenset[str]] = {
    "fleet": frozenset({ROLE_ADMIN, ROLE_VIEWER}),
    "jobs_list": frozenset({ROLE_ADMIN, ROLE_VIEWER}),
    "jobs_status": frozenset({ROLE_ADMIN, ROLE_VIEWER}),
    "jobs_fetch": frozenset({ROLE_ADMIN, ROLE_VIEWER}),
    "rollout_status": frozenset({ROLE_ADMIN, ROLE_VIEWER}),
    "whoami": frozenset({ROLE_ADMIN, ROLE_VIEWER}),
    "update_versions": frozenset({ROLE_ADMIN, ROLE_VIEWER}),
    # the coordinator's audit log, for the security officer (a viewer key will do)
    "audit": frozenset({ROLE_ADMIN, ROLE_VIEWER}),
    "jobs_submit": frozenset({ROLE_ADMIN}),
    "jobs_cancel": frozenset({ROLE_ADMIN}),
    "enrol": frozenset({ROLE_ADMIN}),
    "revoke": frozenset({ROLE_ADMIN}),
    # accept a site's rolled-back privacy ledger: the role that may revoke it
    "ledger_ack": frozenset({ROLE_ADMIN}),
    "push": frozenset({ROLE_ADMIN}),
    "rotate_online_keys": frozenset({ROLE_ADMIN}),
    "rotate_offline_keys": frozenset({ROLE_ADMIN}),
}

# ``audit``: entries answered by default and at most, and how many of the newest
# entries one request looks at (its work on the coordinator's event loop: tens of ms)
AUDIT_DEFAULT_LIMIT = 200
AUDIT_MAX_LIMIT = 10_000
AUDIT_SCAN_ENTRIES = 100_000

ADMIN_MAX_BYTES = 256 << 20  # a software bundle or a fetched model travels in one message


@message("admin.request", max_bytes=ADMIN_MAX_BYTES)
@dataclass(frozen=True)
class AdminRequest:
    op: str
    args_json: str  # a JSON object of the op's arguments
    blobs: dict[str, bytes]  # binary arguments (signed metadata, bundles)


@message("admin.reply", max_bytes=ADMIN_MAX_BYTES)
@dataclass(frozen=True)
class AdminReply:
    ok: bool
    result_json: str  # JSON of the result ("null" on error)
    error: str  # "" when ok; otherwise what was wrong
    blobs: dict[str, bytes]  # binary results (fetched model files)
