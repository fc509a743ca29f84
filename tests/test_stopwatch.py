"""Where a call's time goes: the stopwatch's arithmetic, and the report's stages against a clock read outside."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

import magicinit
from magicinit._core.stopwatch import Stopwatch

SLEEP = 0.05


def exactly(value: float) -> object:
    """``value`` up to float rounding."""
    return pytest.approx(value, rel=1e-9, abs=1e-9)


def test_nested_stages_are_charged_to_the_innermost() -> None:
    stopwatch = Stopwatch()
    with stopwatch.stage("outer"):
        time.sleep(SLEEP)
        for _ in range(2):  # entered twice: adds up
            with stopwatch.stage("inner"):
                time.sleep(SLEEP)
        time.sleep(SLEEP)
    assert stopwatch.exclusive["inner"] >= 2 * SLEEP
    assert 2 * SLEEP <= stopwatch.exclusive["outer"] < 2 * SLEEP + 0.5 * SLEEP + 0.2
    assert stopwatch.inclusive["outer"] == exactly(stopwatch.exclusive["outer"] + stopwatch.exclusive["inner"])
    assert stopwatch.inclusive["inner"] == exactly(stopwatch.exclusive["inner"])
    assert stopwatch.parent == {"outer": None, "inner": "outer"}
    assert stopwatch.children("outer") == {"inner": stopwatch.inclusive["inner"]}


class SlowForward(nn.Module):
    """A small ReLU CNN whose forward also sleeps: most of a call's time is in forwards."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.002)
        return self.net(x)


def test_the_report_stages_add_up_to_the_wall_time_read_outside() -> None:
    torch.manual_seed(0)
    model, x = SlowForward(), torch.randn(16, 3, 8, 8)
    start = time.perf_counter()
    report = magicinit.init_(model, x, seed=0)
    wall = time.perf_counter() - start
    assert list(report.seconds) == ["data", "trace", "within", "between", "other"]
    assert all(seconds >= 0 for seconds in report.seconds.values())
    total = sum(report.seconds.values())
    # the report is built after the stopwatch stops: the only time outside it
    assert total <= wall
    assert total >= 0.8 * wall - 0.05, (total, wall)
    inside = report.between_seconds
    assert set(inside) >= {"rates", "solve", "checks", "other"}, inside
    assert sum(inside.values()) == exactly(report.seconds["between"])
    assert inside["rates"] > inside["solve"]  # back-propagated noise over rounds against a small least-squares solve
    line = str(report).splitlines()[-1]
    assert line.startswith("time: data ") and "between " in line and "(rates " in line, line


def test_rescale_has_no_part_1_stage_and_approximate_mode_names_its_own() -> None:
    torch.manual_seed(0)
    model, x = SlowForward(), torch.randn(16, 3, 8, 8)
    report = magicinit.rescale_(model, x, seed=0, scale_mode="approximate")
    assert "within" not in report.seconds
    assert "rates" in report.between_seconds and "checks" in report.between_seconds
    assert sum(report.between_seconds.values()) == exactly(report.seconds["between"])
