"""What the benchmark scripts share: the library's commit, their sections of ``bench/RESULTS.md``, their raw
JSON (written after every run, resumed with the same settings), and how a training run's accuracy is read (a
diverged run counts as chance) and its learning rate chosen."""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

BENCH = Path(__file__).resolve().parent


def commit() -> str:
    """The short hash of the checked-out commit (``unknown`` outside a git checkout)."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=BENCH, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so that the clock reads its end."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def replace_section(results: Path, heading: str, section: str) -> None:
    """Replace the section of ``results`` that starts at the line ``heading`` (a whole ``## `` line, so
    ``## bench/train.py`` does not match ``## bench/train.py --experiment kmeans``) by ``section``, or append it;
    one blank line separates it from the section that follows, however ``section`` ends."""
    text = results.read_text() if results.exists() else "# Benchmark results\n"
    line = "\n" + heading + "\n"
    if line in "\n" + text:
        start = ("\n" + text).index(line)
        following = text.find("\n## ", start + len(heading))
        rest = section.rstrip("\n") + "\n\n" + text[following + 1 :] if following >= 0 else section
        text = text[:start] + rest
    else:
        text = text.rstrip("\n") + "\n\n" + section
    results.write_text(text)


def machine_facts(**extra: Any) -> dict[str, Any]:
    """The torch version, threads, platform, processor and Python of this process, and ``extra``."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        **extra,
    }


def stored_runs(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON at ``path`` (None if there is none) when it was written with ``settings``; ``SystemExit``
    naming both when not (``--resume`` must not mix runs of other settings)."""
    if not path.is_file():
        return None
    stored = json.loads(path.read_text())
    if stored.get("settings") != settings:
        raise SystemExit(f"--resume: {path} has settings {stored.get('settings')}, this run {settings}")
    return stored


def write_runs(path: Path, fields: dict[str, Any], records: dict[str, list[dict[str, Any]]]) -> None:
    """Write ``fields`` (one line each) then ``records`` (one record per line) as one JSON object to ``path``,
    replacing it whole (a temporary file renamed, so a reader never sees half of it)."""
    parts = [f"{json.dumps(key)}: {json.dumps(value)}" for key, value in fields.items()]
    parts += [
        f"{json.dumps(key)}: [\n" + ",\n".join(json.dumps(record) for record in values) + "\n]"
        for key, values in records.items()
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text("{" + ",\n".join(parts) + "}\n")
    temporary.replace(path)


DIVERGED_ACCURACY = 0.1  # a diverged run counts as chance (10 classes)


def accuracies(runs: Sequence[Any], key: str) -> list[float]:
    """``key`` (``"test_accuracy"``, ``"validation_accuracy"``) of each run in seed order; a run whose
    ``diverged`` is true counts as ``DIVERGED_ACCURACY``."""
    return [DIVERGED_ACCURACY if run.diverged else getattr(run, key) for run in sorted(runs, key=lambda r: r.seed)]


def best_learning_rate(lrs: Sequence[float], runs_at: Callable[[float], Sequence[Any]]) -> float:
    """The learning rate whose runs (``runs_at(lr)``, one per seed) have the best mean validation accuracy."""
    return max(lrs, key=lambda lr: statistics.fmean(accuracies(runs_at(lr), "validation_accuracy")))
