import sys

import pytest

from aihpc.errors import InputError
from aihpc.stage import rule_log


def test_input_error_becomes_one_line_and_exit_1(tmp_path):
    log = tmp_path / "logs" / "rule.log"
    with pytest.raises(SystemExit) as exit_info, rule_log(log):
        print("started")
        raise InputError("data/x.idx: expected magic 2051, found 1")
    assert exit_info.value.code == 1
    assert log.read_text() == "started\nerror: data/x.idx: expected magic 2051, found 1\n"


def test_bug_keeps_its_traceback(tmp_path):
    log = tmp_path / "rule.log"
    with pytest.raises(SystemExit), rule_log(log):
        raise KeyError("oops")
    assert "Traceback" in log.read_text() and "KeyError: 'oops'" in log.read_text()


def test_output_goes_to_the_log_and_streams_are_restored(tmp_path, capfd):
    log = tmp_path / "rule.log"
    with rule_log(log):
        print("to stdout")
        print("to stderr", file=sys.stderr)
    print("after")
    assert log.read_text().splitlines() == ["to stdout", "to stderr"]
    assert "after" in capfd.readouterr().out
