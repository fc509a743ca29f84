"""bench/results_file.py: each benchmark replaces its own section of bench/RESULTS.md and nothing else."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from results_file import replace_section


def test_a_heading_matches_its_whole_line_only(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text(
        "# Benchmark results\n\n## bench/train.py --experiment kmeans\n\nkmeans table\n\n"
        "## bench/train.py\n\nold table\n\n## bench/zoo.py\n\nzoo table\n"
    )
    replace_section(results, "## bench/train.py", "## bench/train.py\n\nnew table\n\n")
    text = results.read_text()
    assert "old table" not in text and "new table" in text
    assert "kmeans table" in text and "zoo table" in text
    replace_section(results, "## bench/train.py --experiment kmeans", "## bench/train.py --experiment kmeans\n\nk2\n\n")
    text = results.read_text()
    assert "kmeans table" not in text and "k2" in text and "new table" in text and "zoo table" in text
    replace_section(results, "## bench/train.py --experiment beta", "## bench/train.py --experiment beta\n\nb\n")
    assert results.read_text().endswith("zoo table\n\n## bench/train.py --experiment beta\n\nb\n")
    # a section that ends without a blank line keeps one before the next heading
    replace_section(results, "## bench/train.py", "## bench/train.py\n\nnewer table\n")
    assert "newer table\n\n## bench/zoo.py" in results.read_text()
