"""What the benchmark scripts share: the library's commit, and their sections of ``bench/RESULTS.md``."""

from __future__ import annotations

import subprocess
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def commit() -> str:
    """The short hash of the checked-out commit (``unknown`` outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=BENCH, check=True).stdout.strip()
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
