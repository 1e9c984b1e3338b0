"""framework/components/logs.py: the console gets memplan's lines, the rank log every line."""

from __future__ import annotations

import logging
import sys
import warnings

import pytest

from framework.components.logs import adopt_library_logger, setup_logging, show_library_lines


@pytest.fixture
def logs(tmp_path):
    """Starts logging into tmp_path/rank0.log when called (inside the test, so that the
    console handler writes to capsys's stdout); the root logger and the warning capture are
    restored after."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    log_file = tmp_path / "rank0.log"

    def start():
        setup_logging(log_file)
        return log_file

    yield start
    for handler in root.handlers:
        handler.close()
    root.handlers[:], level = saved
    root.setLevel(level)
    logging.captureWarnings(False)


def _deprecated_twice() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # as torch's per-step warnings come back every step
        for _ in range(2):
            warnings.warn("`all_gather_into_tensor` is deprecated", FutureWarning, stacklevel=1)


def test_library_lines_and_warnings_go_to_the_rank_log_only(logs, capsys):
    log_file = logs()
    # as the DeepSpeed runtime does: once deepspeed is imported (by any earlier test too) its
    # logger prints through its own handler and does not propagate
    adopt_library_logger("DeepSpeed")
    logging.getLogger("framework.trainer").info("step 1 | loss 5.5")
    logging.getLogger().info("gcc -O3 -c test.c -o test.o")  # DeepSpeed's op probe (distutils)
    logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU")
    _deprecated_twice()
    logging.getLogger("a_library").error("a collective timed out")  # errors: anyone's
    console = capsys.readouterr()
    assert console.out.splitlines() == ["step 1 | loss 5.5", "a collective timed out"]
    assert console.err == ""
    text = log_file.read_text()
    for line in ("step 1 | loss 5.5", "gcc -O3", "Setting accelerator to CPU", "timed out"):
        assert line in text
    assert text.count("FutureWarning: `all_gather_into_tensor` is deprecated") == 1
    assert "\n\n" not in text  # the warning's own trailing newline is not a blank line


def test_logging_console_all_shows_library_lines_too(logs, capsys):
    logs()
    show_library_lines()
    logging.getLogger().info("gcc -O3 -c test.c -o test.o")
    _deprecated_twice()
    out = capsys.readouterr().out
    assert "gcc -O3" in out
    assert out.count("FutureWarning: `all_gather") == 2  # the console does not dedupe
    assert "\n\n" not in out


def test_an_adopted_library_logger_stops_printing_on_its_own(logs, capsys):
    log_file = logs()
    library = logging.getLogger("some_library")
    library.addHandler(logging.StreamHandler(sys.stdout))
    library.propagate = False
    adopt_library_logger("some_library")
    library.warning("its own line")
    assert capsys.readouterr().out == ""
    assert "its own line" in log_file.read_text()
    assert library.handlers == [] and library.propagate
