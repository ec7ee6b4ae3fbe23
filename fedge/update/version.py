"""Version skew between the coordinator and its agents.

Rule: an agent on the coordinator's major.minor is accepted; an agent exactly
one minor version behind (same major) is accepted and told to update; anything
else — older by more than one minor, another major, or newer than the
coordinator — is refused with a reason naming both versions.

Privacy accounting: from fedge 0.2 an agent reports ε for replacing one record
(PLD accounting); agents before it report ε for adding or removing one (RDP), a
lower figure for the same run. The coordinator gives DP jobs no seat to an agent
before :data:`REPLACE_ONE_EPSILON_SINCE` (:func:`reports_replace_one_epsilon`,
fedge.coordinator.cohort), though the skew rule accepts it for other jobs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fedge.wire.codec import short

MAX_VERSION_LEN = 64

_VERSION = re.compile(r"^(\d+)\.(\d+)(?:\.(\d+))?(?:[.+\-].*)?$")


@dataclass(frozen=True)
class SkewDecision:
    accepted: bool
    update_required: bool
    reason: str


def parse_version(value: str, *, what: str = "version") -> tuple[int, int, int]:
    """Parse "MAJOR.MINOR[.PATCH][suffix]" into a tuple.

    Raises:
        ValueError: the value is not a string of that form (names `what` and the value).
    """
    if not isinstance(value, str):
        raise ValueError(f"{what} {short(value)} is not a string")
    # an agent's version is quoted in replies and logs: one of any length or with
    # control characters is refused, and quoted cut short
    if len(value) > MAX_VERSION_LEN or not value.isprintable():
        raise ValueError(f"{what} {short(value)} is not a printable string of at most "
                         f"{MAX_VERSION_LEN} characters")
    match = _VERSION.match(value.strip())
    if match is None:
        raise ValueError(f"{what} {short(value)} is not of the form MAJOR.MINOR[.PATCH]")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def check_version_skew(coordinator_version: str, agent_version: str) -> SkewDecision:
    """Decide whether the coordinator accepts an agent of `agent_version`.

    Raises:
        ValueError: either version cannot be parsed.
    """
    c = parse_version(coordinator_version, what="coordinator version")
    a = parse_version(agent_version, what="agent version")
    if a[:2] == c[:2]:
        return SkewDecision(True, False, f"agent {agent_version} matches coordinator "
                            f"{coordinator_version}")
    if a[0] == c[0] and a[1] == c[1] - 1:
        return SkewDecision(True, True, f"agent {agent_version} is one minor version behind "
                            f"coordinator {coordinator_version}: accepted, update required")
    if a[:2] > c[:2]:
        rule = "agents may not be newer than the coordinator"
    elif a[0] != c[0]:
        rule = "major versions differ"
    else:
        rule = "agents may lag by at most one minor version"
    return SkewDecision(False, False, f"agent {agent_version} refused by coordinator "
                        f"{coordinator_version}: {rule}")


# the first major.minor whose agents report ε for replacing one record (module doc)
REPLACE_ONE_EPSILON_SINCE = (0, 2)


def reports_replace_one_epsilon(agent_version: str) -> bool:
    """Whether an agent of ``agent_version`` reports ε under today's replace-one (PLD)
    accounting (module doc); a version that cannot be parsed does not."""
    try:
        return parse_version(agent_version, what="agent version")[:2] \
            >= REPLACE_ONE_EPSILON_SINCE
    except ValueError:
        return False
