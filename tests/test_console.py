"""What a command shows: phase lines and a one-line result on the terminal, the result path alone on
stdout's last line, everything else in OUT/logs/console.log; --verbose shows it all."""

from __future__ import annotations

import time

from conftest import SHARED_TRAIN

from selectmoe import console
from selectmoe.cli import main


def test_quiet_run_shows_phases_and_the_result_and_logs_the_rest(ray_session, tmp_path, capfd):
    out = tmp_path / "validate"
    args = ["validate-data", f"dataset.data_path={SHARED_TRAIN / 'oasst1.jsonl'}", f"output_dir={out}"]
    assert main(args) == 0
    stdout, stderr = capfd.readouterr()
    assert stdout.splitlines() == [str(out)]  # the output folder alone
    lines = stderr.splitlines()
    assert lines[0] == f"(full output: {out / 'logs' / 'console.log'})"
    assert any(
        line.startswith("validate-data: reading, checking and writing the rows: done in") for line in lines
    )
    assert lines[-1].startswith("validate-data: 374 rows read, 374 accepted, 0 rejected")
    assert len(lines) <= 8
    assert (out / "logs" / "console.log").exists()  # what a fresh process logs there: test_select's
    # two concurrent `selectmoe select` runs check it (here Ray was started before, by the session)

    assert main([*args, "--verbose"]) == 0
    stdout, stderr = capfd.readouterr()
    assert stdout.splitlines()[-1] == str(out)
    assert "full output" not in stderr


def test_a_phase_takes_one_line_and_a_long_one_is_announced_while_it_runs(monkeypatch, capsys):
    monkeypatch.setattr(console, "ANNOUNCE_S", 0.05)
    with console.phase("quick"):
        pass
    with console.phase("slow"):
        time.sleep(0.3)
    with console.branch("baseline random"), console.phase("inside"):
        pass
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("quick: done in") and lines[1] == "slow ..."
    assert lines[2].startswith("slow: done in") and lines[3].startswith("[baseline random] inside: done in")
    assert len(lines) == 4
