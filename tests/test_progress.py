"""Progress with stderr redirected: a plain line every LOG_EVERY_S seconds (fake clock)."""

from __future__ import annotations

import io

import pytest

from cltrace import progress as progress_mod
from cltrace.progress import LOG_EVERY_S, LogProgress, progress


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_line_every_interval_with_rate_and_eta():
    clock, out = Clock(), io.StringIO()
    bar = LogProgress(
        total=1_000_000,
        desc="harvest",
        unit="tok",
        unit_scale=True,
        initial=100_000,
        every=30,
        clock=clock,
        file=out,
    )
    for _ in range(29):  # 29 s at 2,000 tok/s: nothing yet
        clock.now += 1
        bar.update(2_000)
    assert out.getvalue() == ""
    clock.now += 1
    bar.update(2_000)  # 30 s, 60k tokens done since the start
    assert out.getvalue() == "harvest: 160k/1.00M tok (16%), 2.00k tok/s, ETA 07:00\n"
    bar.set_postfix(loss="0.5", l0="12.0")
    clock.now += 10
    bar.update(20_000)  # 10 s later: no new line before 30 s have passed
    assert out.getvalue().count("\n") == 1
    clock.now += 20
    bar.update(40_000)  # 60 s, 120k tokens: still 2k tok/s, 780k left
    assert out.getvalue().splitlines()[1] == (
        "harvest: 220k/1.00M tok (22%), 2.00k tok/s, ETA 06:30, loss=0.5, l0=12.0"
    )
    bar.close()
    bar.close()
    assert out.getvalue().splitlines()[2] == (
        "harvest: 220k/1.00M tok (22%), 2.00k tok/s, done in 01:00, loss=0.5, l0=12.0"
    )


def test_iterables_are_wrapped_and_short_work_prints_nothing():
    clock, out = Clock(), io.StringIO()

    def ticking(n):
        for i in range(n):
            clock.now += 7.5
            yield i

    bar = LogProgress(
        ticking(4), total=4, desc="token effects", unit="layer", every=30, clock=clock, file=out
    )
    assert list(bar) == [0, 1, 2, 3]
    assert out.getvalue().splitlines() == [
        "token effects: 4/4 layer (100%), 0.13 layer/s, ETA 00:00",
        "token effects: 4/4 layer (100%), 0.13 layer/s, done in 00:30",
    ]
    quiet = io.StringIO()
    with LogProgress(total=10, every=30, clock=Clock(), file=quiet) as short:
        short.update(10)
    assert quiet.getvalue() == ""


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize(
    "tty, setting, disable, expected",
    [
        (False, None, None, "log"),
        (False, "", None, "log"),
        (True, None, None, "bar"),
        (False, "1", None, "bar"),
        (True, "0", None, "quiet"),
        (False, None, True, "quiet"),
        (False, None, False, "bar"),
    ],
)
def test_which_reporter(monkeypatch, tty, setting, disable, expected):
    monkeypatch.setattr(progress_mod.sys, "stderr", _Stream(tty))
    if setting is None:
        monkeypatch.delenv("CLTRACE_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("CLTRACE_PROGRESS", setting)
    bar = progress(total=5, desc="x", disable=disable)
    kind = "log" if isinstance(bar, LogProgress) else ("quiet" if bar.disable else "bar")
    bar.close()
    assert kind == expected
    assert LOG_EVERY_S == 30.0


def test_no_total_means_no_eta():
    """Work whose end is not known (a harvest feeding training under a wall-time budget) logs
    what is done and the rate, never a percentage or an ETA."""
    clock, out = Clock(), io.StringIO()
    bar = LogProgress(
        total=None, desc="harvest", unit="tok", unit_scale=True, every=30, clock=clock, file=out
    )
    clock.now += 30
    bar.update(60_000)
    line = out.getvalue().strip()
    assert line.startswith("harvest: 60.0k tok") and "2.00k tok/s" in line, line
    assert "ETA" not in line and "%" not in line, line
    bar.close()


def test_training_under_a_budget_asks_the_harvest_for_no_eta(monkeypatch):
    """launch passes show_eta=False to the on-the-fly harvest when a minutes budget is set."""
    import cltrace.activations.harvest as harvest_mod
    from cltrace.transcoders import launch
    from cltrace.transcoders.config import TrainConfig

    seen = {}

    def fake(model, documents, cfg, **kw):
        seen.update(kw)
        return iter(())

    class FakeModel:
        n_layers, d_model = 2, 8

    monkeypatch.setattr(harvest_mod, "iter_activation_batches", fake)
    monkeypatch.setattr("cltrace.models.loading.load_model", lambda *a, **k: FakeModel())
    monkeypatch.setattr("cltrace.data.corpus.iter_documents", lambda split: iter(()))
    for minutes, want in ((None, True), (5.0, False)):
        launch.training_data(TrainConfig(minutes=minutes), "cpu", "train")
        assert seen["show_eta"] is want
