"""bench/gpu.sh and bench/gpu_table.py without a GPU: the script parses, stops clearly where there is no CUDA,
and the table is built from sample step outputs (every step passed; some failed, timed out, ran no test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import gpu_table

ROOT = Path(__file__).resolve().parent.parent

SPEED_LOG = """machine: torch 2.14.1, device cuda (NVIDIA H100 80GB HBM3)

| depth | forward s | Part 1 s (within) | Part 1 / forward | ≤ 1.3? | lsuv s | lsuv / forward | lsuv / Part 1 \
| Part 2 / (fwd+bwd) | Part 2 model calls (passes) | rate spread before → after | rescale_ / (fwd+bwd) | ≤ 4? \
| after rescale_, re-measured here: max deviation from geometric mean | peak memory: init_ / (fwd+bwd) |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
| 8 | 0.002 | 0.004 (0.003) | 1.91 | MISS | 0.050 | 25.00 | 13.1 | 3.10 | 7 (0.1) | 330 → 1 | 2.90 | PASS \
| 2.1 % (PASS ≤ 10 %) | 1.50 (38 / 25 MiB) |
| 16 | 0.003 | 0.006 (0.005) | 2.05 | MISS | 0.090 | 30.00 | 14.6 | 3.40 | 7 (0.1) | 900 → 1 | 3.20 | PASS \
| 3.0 % (PASS ≤ 10 %) | 1.60 (70 / 44 MiB) |

Samplers: Part 1 (init_(between=False)) with each sampler over the same one with gaussian:

| width | sampler | Part 1 time / gaussian's (median) | every pair | target |
|---|---|---|---|---|
| 32 | kmeans | 2.50 | 2.50 | ≤ 5.0: PASS |
| 32 | pca | 1.10 | 1.10 | - |
| 64 | kmeans | 2.90 | 2.90 | ≤ 5.0: PASS |

Part 1 / forward <= 1.3: missed at depth 8, 16
"""

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="0"
skipped="{skipped}" tests="{tests}"><testcase classname="tests.test_safety"
name="test_data_on_another_device_is_moved_to_the_models[cpu-cuda]"/></testsuite></testsuites>"""

ZOO = {
    "rows": [
        {
            "name": "resnet18",
            "init_seconds": 0.61,
            "forward_seconds": 0.0021,
            "init_over_forward": 290.4,
            "spread_before": 41.3,
            "spread_after": 1.0,
            "rate_way": "from site activations",
            "warnings": [],
        }
    ]
}

DISTRIBUTED = {
    "world": 2,
    "backend": "gloo",
    "why": "1 GPU: NCCL needs one GPU per rank",
    "devices": ["cuda:0", "cuda:0"],
    "nccl": "2.27.3",
    "checks": [{"name": "CUDA model and data", "ok": True, "seconds": 12.5}],
    "ok": True,
    "error": None,
}

GRAM = {
    "models": [
        {
            "name": "resnet18",
            "formed_seconds": 0.8,
            "gram_seconds": 0.6,
            "formed_norm_seconds": 0.2,
            "gram_norm_seconds": 0.05,
            "sites": 21,
            "gram_sites": 9,
            "rate_way": "from site activations",
            "weight_difference": 3e-7,
        }
    ],
    "verdict": "on cuda, the Gram route's norm computation is 4.00× as fast: allowing it off the CPU would pay",
}


def write_run(out: Path, codes: dict[str, str], tests: int = 2, skipped: int = 0) -> None:
    """A bench/gpu.sh output folder: steps.tsv with ``codes`` (exit status, or '-' for not run) per step,
    and every step's output."""
    out.mkdir(exist_ok=True)
    logs = {
        "cuda tests": "cuda_tests.log",
        "speed.py": "speed.log",
        "zoo": "zoo.log",
        "distributed": "distributed.log",
        "gram route": "gram.log",
    }
    lines = [f"{name}\t{codes.get(name, '0')}\t12.3\t60\t{log}" for name, log in logs.items()]
    (out / "steps.tsv").write_text("\n".join(lines) + "\n")
    (out / "machine.txt").write_text("torch 2.14.1, CUDA 13.0\n1 GPU(s): NVIDIA H100 80GB HBM3\n")
    (out / "cuda_tests.log").write_text("2 passed, 1500 deselected in 20.0s\n")
    (out / "cuda_tests.xml").write_text(JUNIT.format(tests=tests, skipped=skipped))
    (out / "speed.log").write_text(SPEED_LOG)
    (out / "zoo.log").write_text("  resnet18 done\n")
    (out / "zoo.json").write_text(json.dumps(ZOO))
    (out / "distributed.log").write_text("ok\n")
    (out / "distributed.json").write_text(json.dumps(DISTRIBUTED))
    (out / "gram.log").write_text("ok\n")
    (out / "gram.json").write_text(json.dumps(GRAM))


def table_rows(text: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split(" | ") for line in text.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [cell.strip() for cell in cells] for cells in rows[1:]}


def test_gpu_sh_is_valid_bash() -> None:
    done = subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_every_step_passed_gives_one_table_of_their_figures(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_run(tmp_path, {})
    assert gpu_table.main(["table", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("## bench/gpu.sh\n") and printed == (tmp_path / "gpu_table.md").read_text()
    assert "NVIDIA H100 80GB HBM3" in printed
    rows = table_rows(printed)
    assert list(rows) == ["cuda tests", "speed.py", "zoo", "distributed", "gram route"]
    assert all(row[1] == "ok" and row[2] == "12.3" for row in rows.values())
    assert "2 passed, 0 failed" in rows["cuda tests"][3]
    speed = rows["speed.py"][3]
    assert "depth 8: Part 1/fwd 1.91 (MISS), Part 2/(fwd+bwd) 3.10, Part 2 calls (passes) 7 (0.1)" in speed
    assert "depth 16: Part 1/fwd 2.05" in speed and "memory init_/(fwd+bwd) 1.60 (70 / 44 MiB)" in speed
    assert "kmeans/gaussian Part 1: 2.50 (width 32), 2.90 (width 64)" in speed
    assert "resnet18: init_/fwd 0.61 s / 2.1 ms = 290×, spread 41.3 → 1" in rows["zoo"][3]
    assert "2 processes, gloo (1 GPU: NCCL needs one GPU per rank)" in rows["distributed"][3]
    assert "CUDA model and data ok 12.5 s" in rows["distributed"][3]
    gram = rows["gram route"][3]
    assert "rescale_ 0.800 s formed vs 0.600 s Gram (×0.75); norms 0.200 vs 0.050 s (×0.25)" in gram
    assert "Gram route at 9 of 21 sites" in gram and "allowing it" in gram


def test_failed_steps_are_marked_and_the_table_still_prints(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_run(tmp_path, {"speed.py": "1", "zoo": "124", "gram route": "-"}, tests=0)
    (tmp_path / "speed.log").write_text("Traceback (most recent call last):\nRuntimeError: CUDA error: out of memory\n")
    (tmp_path / "distributed.json").write_text(
        json.dumps(DISTRIBUTED | {"ok": False, "error": "rank 1: AssertionError: checksums differ"})
    )
    assert gpu_table.main(["table", str(tmp_path)]) == 1
    rows = table_rows(capsys.readouterr().out)
    assert rows["cuda tests"][1] == "failed (0 tests selected)"
    assert rows["speed.py"][1] == "failed (exit 1)" and "CUDA error: out of memory" in rows["speed.py"][3]
    assert rows["zoo"][1] == "timeout (limit 60 s)"
    assert rows["distributed"][1] == "failed (a check failed)" and "checksums differ" in rows["distributed"][3]
    assert rows["gram route"][1] == "not run (no time left)"
    write_run(tmp_path, {"cuda tests": "5"}, tests=0)  # pytest collected nothing
    assert gpu_table.main(["table", str(tmp_path)]) == 1
    assert table_rows(capsys.readouterr().out)["cuda tests"][1] == "failed (0 tests selected)"
    write_run(tmp_path, {}, tests=2, skipped=2)  # CUDA tests that skip did not test anything
    assert gpu_table.main(["table", str(tmp_path)]) == 1
    assert table_rows(capsys.readouterr().out)["cuda tests"][1].startswith("failed (tests skipped")


def test_the_table_replaces_its_section_of_a_results_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_run(tmp_path, {})
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## bench/gpu.sh\n\nno GPU figure yet\n\n## bench/zoo.py\n\nzoo\n")
    assert gpu_table.main(["table", str(tmp_path), "--results", str(results)]) == 0
    text = results.read_text()
    assert "no GPU figure yet" not in text and "| gram route | ok |" in text
    assert text.endswith("## bench/zoo.py\n\nzoo\n")


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, gpu.sh would run every step")
def test_gpu_sh_stops_clearly_without_a_gpu(tmp_path: Path) -> None:
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "OUT": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""},
        timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "no usable GPU: torch.cuda.is_available() is False" in done.stderr
    assert not (tmp_path / "steps.tsv").read_text()  # no step ran
