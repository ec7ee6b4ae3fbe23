"""The daemons' log level is set by FEDGE_LOG_LEVEL (a unit's drop-in) or by
`fedge --log-level`; INFO otherwise. It was always INFO, so the DEBUG detail that
docs/security.md describes could not be reached (logs review, session 15, L6)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedge import systemd as fsd

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = ("import logging; from fedge.systemd import setup_logging; "
          "setup_logging('fedge-agent'); "
          "logging.getLogger('fedge.agent').debug('the detail'); "
          "logging.getLogger('fedge.agent').info('the news')")


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        yield root
    finally:
        root.handlers[:], root.level = saved[0], saved[1]


def env(**extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items()
           if k not in (fsd.LOG_LEVEL_ENV, "INVOCATION_ID", "JOURNAL_STREAM", "NOTIFY_SOCKET")}
    out.update(extra)
    return out


@pytest.mark.parametrize(("value", "level"), [("DEBUG", logging.DEBUG), ("debug", logging.DEBUG),
                                              (" warning ", logging.WARNING),
                                              ("ERROR", logging.ERROR), ("", logging.INFO)])
def test_the_environment_sets_the_level(root_logger: logging.Logger, value: str,
                                        level: int) -> None:
    fsd.setup_logging("fedge-agent", environ={fsd.LOG_LEVEL_ENV: value})
    assert root_logger.level == level


def test_without_the_variable_it_is_info_and_an_explicit_level_wins(
        root_logger: logging.Logger) -> None:
    fsd.setup_logging("fedge-agent", environ={})
    assert root_logger.level == logging.INFO
    fsd.setup_logging("fedge-agent", "error", environ={fsd.LOG_LEVEL_ENV: "DEBUG"})
    assert root_logger.level == logging.ERROR


def test_an_unknown_level_is_refused_by_name(root_logger: logging.Logger) -> None:
    with pytest.raises(ValueError) as err:
        fsd.setup_logging("fedge-agent", environ={fsd.LOG_LEVEL_ENV: "verbose"})
    assert str(err.value) == ("FEDGE_LOG_LEVEL 'verbose' is not a log level: give one of "
                              "DEBUG, INFO, WARNING, ERROR (INFO when unset)")


def test_a_daemon_started_with_debug_writes_its_debug_lines_and_without_does_not() -> None:
    run = [sys.executable, "-c", SCRIPT]
    debug = subprocess.run(run, env=env(FEDGE_LOG_LEVEL="DEBUG"), capture_output=True,
                           text=True, timeout=60, cwd=ROOT)
    plain = subprocess.run(run, env=env(), capture_output=True, text=True, timeout=60,
                           cwd=ROOT)
    assert debug.returncode == plain.returncode == 0, (debug.stderr, plain.stderr)
    assert "DEBUG fedge.agent: the detail" in debug.stderr
    assert "the detail" not in plain.stderr and "INFO fedge.agent: the news" in plain.stderr


def fedge(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "import sys; from fedge.cli import main; "
                           "sys.exit(main())", *args], env=env(**extra),
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_the_command_refuses_a_bad_level_with_one_line_not_a_traceback(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    bad_env = fedge("agent", "run", "--config", str(config), FEDGE_LOG_LEVEL="verbose")
    assert bad_env.returncode == 2
    assert bad_env.stderr == ("fedge: $FEDGE_LOG_LEVEL 'verbose' is not a log level: give "
                              "one of DEBUG, INFO, WARNING, ERROR (INFO when unset)\n")
    bad_option = fedge("--log-level", "chatty", "agent", "run", "--config", str(config))
    assert bad_option.returncode == 2 and "Traceback" not in bad_option.stderr
    assert "--log-level 'chatty' is not a log level" in bad_option.stderr


def test_the_log_level_option_reaches_the_daemon(tmp_path: Path) -> None:
    # an unenrolled appliance: the agent stops at once, after setting up its logging
    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    script = ("import sys, logging; import fedge.systemd as s; real = s.setup_logging\n"
              "def spy(*a, **k):\n"
              "    out = real(*a, **k); print('level', logging.getLogger().level); return out\n"
              "s.setup_logging = spy\n"
              "from fedge.cli import main; sys.exit(main())")
    done = subprocess.run([sys.executable, "-c", script, "--log-level", "debug", "agent", "run",
                           "--config", str(config)], env=env(FEDGE_LOG_LEVEL="ERROR"),
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2 and "not enrolled" in done.stderr, done.stderr
    assert f"level {logging.DEBUG}" in done.stdout
