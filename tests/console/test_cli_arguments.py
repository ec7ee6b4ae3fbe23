"""`fedge console` numeric and endpoint options are checked by argparse: one line
naming the option and the rule, exit status 2 (NaN passed a `<= 0` check and reached
a deadline, a sleep or a zmq poll as a traceback or a wait forever)."""

from __future__ import annotations

import pytest

from fedge.cli import build_parser, main

PUSH = ["push", "m.onnx", "--kind", "model", "--name", "m", "--version", "1"]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["console", "--timeout", "nan", "fleet"], "--timeout nan must be a finite number"),
        (["console", "--timeout", "inf", "fleet"], "--timeout inf must be a finite number"),
        (["console", "--timeout", "-1", "fleet"], "--timeout -1 must be a finite number"),
        (["console", "--timeout", "1e300", "fleet"], "--timeout 1e300 must be at most 86400"),
        (["console", "--timeout", "soon", "fleet"], "--timeout 'soon' is not a number"),
        (["console", "jobs", "watch", "j", "--interval", "nan"], "--interval nan must be"),
        (["console", "jobs", "watch", "j", "--interval", "-1"], "--interval -1 must be"),
        (["console", "jobs", "watch", "j", "--interval", "0"], "--interval 0 must be"),
        (["console", "jobs", "watch", "j", "--max-wait", "nan"], "--max-wait nan must be"),
        (["console", *PUSH, "--deadline", "-5"], "--deadline -5 must be a finite number"),
        (["console", *PUSH, "--deadline", "nan"], "--deadline nan must be a finite number"),
        (["console", "init", "--coordinator", "tcp://127.0.0.1:99999"],
         "port 99999 is outside 1..65535"),
        (["console", "init", "--coordinator", "tcp://127.0.0.1:0"],
         "port 0 is outside 1..65535"),
        (["console", "init", "--coordinator", "127.0.0.1:7000"], "must look like tcp://HOST:PORT"),
        (["console", "init", "--coordinator", "tcp://127.0.0.1:7000",
          "--admin-endpoint", "tcp://127.0.0.1:70000"], "port 70000 is outside 1..65535"),
    ],
)
def test_bad_arguments_are_refused_with_the_rule(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_the_last_port_leaves_no_room_for_the_default_admin_port(tmp_path, capsys):
    home = tmp_path / "c"
    rc = main(["console", "--home", str(home), "init", "--coordinator",
               "tcp://127.0.0.1:65535"])
    assert rc == 2
    assert "give --admin-endpoint" in capsys.readouterr().err
    assert not (home / "console.json").exists()
    assert main(["console", "--home", str(home), "init", "--coordinator",
                 "tcp://127.0.0.1:65535", "--admin-endpoint", "tcp://127.0.0.1:65534"]) == 0
