"""The terminal shows the user's lines; library output (Python, C-level, child processes) goes to the log."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from ulrec.cli import _VERBOSE, main

SCRIPT = textwrap.dedent("""
    import os, subprocess, sys
    from pathlib import Path
    from ulrec.console import note, progress_bar, routed, say

    with routed(Path(sys.argv[1]), verbose=sys.argv[2] == "1") as log:
        print("python chatter")
        os.write(2, b"c-level chatter\\n")
        subprocess.run(["echo", "child chatter"], check=True)
        say("for the user")
        note("a notice")
        bar = progress_bar(total=3, desc="bar")
        print("bar disabled" if bar.disable else "bar enabled")
        bar.close()
    print("after")
""")


def _run(tmp_path, verbose: bool) -> tuple[subprocess.CompletedProcess, str]:
    log = tmp_path / "logs" / "ulrec.log"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(log), "1" if verbose else "0"],
                          capture_output=True, text=True, timeout=60, check=True)
    return done, log.read_text() if log.is_file() else ""


def test_routed_output_keeps_only_the_users_lines_on_the_terminal(tmp_path):
    done, log = _run(tmp_path, verbose=False)
    assert done.stdout == "for the user\nafter\n"
    assert done.stderr == "a notice\n"
    for line in ("python chatter", "c-level chatter", "child chatter", "a notice", "bar disabled"):
        assert line in log  # nothing lost; no bar redraws either (not a terminal)
    assert "for the user" not in log


def test_verbose_shows_everything_and_writes_no_log(tmp_path):
    done, log = _run(tmp_path, verbose=True)
    assert log == ""
    for line in ("python chatter", "child chatter", "for the user", "after"):
        assert line in done.stdout
    assert "c-level chatter" in done.stderr and "a notice" in done.stderr


def test_cli_routes_a_stage_and_strips_the_verbose_flag(tmp_path, capfd):
    log = tmp_path / "quickstart" / "logs" / "ulrec.log"
    assert main(["eval", f"run.root={tmp_path}", "-v"]) == 1  # no data: a one-line error
    assert _VERBOSE[0] is True and not log.exists()
    err = capfd.readouterr().err
    assert err.startswith("ulrec: error:") and len(err.strip().splitlines()) == 1
    assert main(["eval", f"run.root={tmp_path}"]) == 1
    assert _VERBOSE[0] is False and log.is_file()
    err = capfd.readouterr().err
    assert err.startswith("ulrec: error:") and len(err.strip().splitlines()) == 1  # still on the terminal
