"""Progress in a log: when stderr is not a terminal (a batch job, `| tee`), a long loop prints plain
lines with its count and ETA instead of a bar that nobody sees; short loops stay silent."""

import deploypipe.progress as P


def test_a_long_loop_prints_lines_with_count_and_eta_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    clock = iter(range(0, 1000, 10))  # each item takes 10 "seconds"
    monkeypatch.setattr(P.time, "monotonic", lambda: next(clock))
    assert list(P.progress(range(6), total=6, description="layer sensitivities")) == list(range(6))
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["layer sensitivities: 3/6 after 30 s, about 30 s left",
                     "layer sensitivities: 6/6 after 60 s, about 0 s left"]


def test_a_short_loop_is_silent(capsys):
    assert sum(P.progress(range(100), total=100, description="fast")) == 4950
    assert capsys.readouterr().err == ""
