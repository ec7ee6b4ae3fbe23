"""Text for messages: what a peer wrote, made safe to log, store and show; who this
process runs as; sites grouped by the reason they share."""

from __future__ import annotations

import os


def printable(text: object) -> str:
    """``str(text)`` with each character that is not printable (a line break, ESC,
    BEL) written escaped as Python writes it (``\\n``, ``\\x1b``), whole otherwise:
    for logging or showing a peer's text (a site's reason, a job name, an
    appliance's version) without letting it forge a second log line or drive the
    reader's terminal. Never raises."""
    try:
        text = str(text)
    except Exception:  # a peer's object whose __str__ raises
        return f"<{type(text).__name__}>"
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def as_user() -> str:
    """The words " as user NAME" for this process's effective user (" as uid N" without
    a passwd entry, "" without users at all): for "... cannot be read as user fedge"."""
    if not hasattr(os, "geteuid"):
        return ""
    import pwd

    try:
        return f" as user {pwd.getpwuid(os.geteuid()).pw_name}"
    except KeyError:
        return f" as uid {os.geteuid()}"


def by_reason(reasons: dict[str, str]) -> list[tuple[list[str], str]]:
    """``{site: reason}`` grouped: each reason once with the sites that gave it, in the
    order of each reason's first site by name (a reason every site of a cohort gave,
    a shared outage or a data set none holds, is one line, not one per site). The
    coordinator groups a failed attempt's reason with this
    (fedge.coordinator.rounds.grouped_reasons), and the console its dropped sites."""
    by: dict[str, list[str]] = {}
    for site, why in sorted(reasons.items()):
        by.setdefault(str(why), []).append(str(site))
    return [(sites, why) for why, sites in by.items()]
