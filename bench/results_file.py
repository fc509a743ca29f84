"""What the benchmark scripts share: the library's commit, their sections of ``bench/RESULTS.md``, and how
a training run's accuracy is read (a diverged run counts as chance) and its learning rate chosen."""

from __future__ import annotations

import statistics
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent


def commit() -> str:
    """The short hash of the checked-out commit (``unknown`` outside a git checkout)."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=BENCH, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def replace_section(results: Path, heading: str, section: str) -> None:
    """Replace the section of ``results`` that starts at the line ``heading`` (a whole ``## `` line, so
    ``## bench/train.py`` does not match ``## bench/train.py --experiment kmeans``) by ``section``, or append it."""
    text = results.read_text() if results.exists() else "# Benchmark results\n"
    line = "\n" + heading + "\n"
    if line in "\n" + text:
        start = ("\n" + text).index(line)
        following = text.find("\n## ", start + len(heading))
        text = text[:start] + section + (text[following + 1 :] if following >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    results.write_text(text)


DIVERGED_ACCURACY = 0.1  # a diverged run counts as chance (10 classes)


def accuracies(runs: Sequence[Any], key: str) -> list[float]:
    """``key`` (``"test_accuracy"``, ``"validation_accuracy"``) of each run in seed order; a run whose
    ``diverged`` is true counts as ``DIVERGED_ACCURACY``."""
    return [DIVERGED_ACCURACY if run.diverged else getattr(run, key) for run in sorted(runs, key=lambda r: r.seed)]


def best_learning_rate(lrs: Sequence[float], runs_at: Callable[[float], Sequence[Any]]) -> float:
    """The learning rate whose runs (``runs_at(lr)``, one per seed) have the best mean validation accuracy."""
    return max(lrs, key=lambda lr: statistics.fmean(accuracies(runs_at(lr), "validation_accuracy")))
