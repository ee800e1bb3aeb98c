"""benchmarks/merge_speed.py's measurement: the first line as a log and as a terminal sees it."""

import sys

from conftest import load_benchmark


def test_first_line_in_a_pipe_and_on_a_terminal():
    """In a pipe a line counts once ended; on a pseudo-terminal the first byte shown counts
    (the terminal case needs no newline: "starting" is written without one)."""
    bench = load_benchmark("merge_speed")
    code = ("import sys, time; sys.stderr.write('starting'); sys.stderr.flush(); "
            "time.sleep(0.3); sys.stderr.write('\\r        \\rdone\\n')")
    cmd = [sys.executable, "-c", code]
    piped = bench.measure(cmd, {})
    tty = bench.measure(cmd, {}, terminal=True)
    for row in (piped, tty):
        assert "error" not in row and row["peak_rss_mb"] > 0 and row["wall_s"] > 0.3
    assert tty["first_line_s"] < piped["first_line_s"]  # the pipe waited for the '\r'
    assert piped["first_line_s"] > 0.3
