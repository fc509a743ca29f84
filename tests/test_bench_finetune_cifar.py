"""bench/finetune.py --dataset cifar10 on a tiny fake CIFAR-shaped dataset (no ../shared data): the JSON
written as it goes, the pre-training cache, --resume, --stage, --estimate and the section of RESULTS.md."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import finetune
from train import Dataset

torch.set_num_threads(1)

LABELS = {"1000": 50, "5000": 100}  # the tasks, shrunk to fit the fake data


def fake_cifar(count: int = 300, seed: int = 0) -> Dataset:
    """CIFAR-like images (3 channels, 16 px) whose class shifts one channel's mean, split 3 ways."""
    generator = torch.Generator().manual_seed(seed)

    def part(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % 10  # every class alike
        images = torch.randn(n, 3, 16, 16, generator=generator)  # 16 px: 4 times cheaper than 32
        images[:, 0] += 0.3 * (labels.float()[:, None, None] - 4.5)
        return images, labels

    return Dataset("fake", part(count), part(30), part(30))


@pytest.fixture
def small_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(finetune, "CIFAR_TASKS", LABELS)


def argv(tmp_path: Path, *more: str) -> list[str]:
    return [
        "--dataset", "cifar10", "--depth", "4", "--steps", "2", "--pretrain-steps", "3", "--seeds", "0", "1",
        "--lrs", "0.01", "0.03", "--max-extensions", "1", "--init-samples", "16",
        "--output", str(tmp_path / "finetune_cifar10.json"), "--results", str(tmp_path / "RESULTS.md"),
        "--cache-dir", str(tmp_path / "cache"), *more,
    ]  # fmt: skip


def test_the_cifar_path_runs_end_to_end_resumes_and_writes_its_own_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_tasks: None
) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## bench/finetune.py\n\ndigits table\n\n## bench/zoo.py\n\nzoo table\n")
    bench = finetune.main(argv(tmp_path, "--tasks", "1000"), data=fake_cifar())
    assert bench is not None
    stored = json.loads((tmp_path / "finetune_cifar10.json").read_text())
    assert stored["settings"]["dataset"] == "cifar10" and stored["settings"]["steps"] == 2
    assert [p["seed"] for p in stored["pretrainings"]] == [0, 1]
    assert all(len(p["losses"]) == 3 and 0.0 <= p["pretext_accuracy"] <= 1.0 for p in stored["pretrainings"])
    assert len(list((tmp_path / "cache").glob("rotation-cifar10-d4-3steps-*-seed*.pt"))) == 2
    runs, grids = stored["runs"], stored["grids"]
    task = "CIFAR-10, 50 labels"
    assert set(grids) == {f"{task}, {row}" for row in finetune.CIFAR_ROWS}
    for row in finetune.CIFAR_ROWS:
        grid = grids[f"{task}, {row}"]
        searched = [r for r in runs if (r["task"], r["row"], r["seed"]) == (task, row, 0)]
        assert sorted(r["learning_rate"] for r in searched) == grid["tried"]
        assert len(grid["tried"]) in (2, 3)  # the starting grid, and one extension where the best was at an edge
        assert grid["stopped_at_edge"] == (grid["best"] in (grid["tried"][0], grid["tried"][-1]))
        others = [r for r in runs if (r["task"], r["row"], r["seed"]) == (task, row, 1)]
        assert [r["learning_rate"] for r in others] == [grid["best"]]
    assert len(runs) == len(bench.runs)
    for run in runs:
        assert run["losses"] and (run["diverged"] or 0.0 <= run["test_accuracy"] <= 1.0)
    section = results.read_text()
    assert "digits table" in section and "zoo table" in section  # the other sections untouched
    assert section.count(finetune.CIFAR_HEADING + "\n") == 1
    assert "### CIFAR-10, 50 labels" in section and "| rotation pre-trained + rescale_ |" in section
    assert "rescale_ against the magicinit head alone" in section and "best from scratch by validation" in section

    # the other task in a second invocation, into the same JSON and section
    finetune.main(argv(tmp_path, "--tasks", "5000", "--rows", "kaiming normal", "--resume"), data=fake_cifar())
    stored = json.loads((tmp_path / "finetune_cifar10.json").read_text())
    assert {r["task"] for r in stored["runs"]} == {task, "CIFAR-10, 100 labels"}
    section = results.read_text()
    assert "### CIFAR-10, 50 labels" in section and "### CIFAR-10, 100 labels" in section
    assert "digits table" in section and "zoo table" in section and section.count(finetune.CIFAR_HEADING) == 1

    # --resume: nothing is pre-trained or fine-tuned again, and the section is rewritten from the JSON
    monkeypatch.setattr(finetune, "pretrain", lambda *a, **k: pytest.fail("pre-trained again"))
    monkeypatch.setattr(finetune, "fine_tune", lambda *a, **k: pytest.fail("fine-tuned again"))
    again = finetune.main(argv(tmp_path, "--tasks", "1000", "--resume"), data=fake_cifar())
    assert again is not None and set(bench.runs) < set(again.runs) and len(again.runs) == len(stored["runs"])
    assert len(json.loads((tmp_path / "finetune_cifar10.json").read_text())["invocations"]) == 3
    assert results.read_text().count(finetune.CIFAR_HEADING + "\n") == 1

    with pytest.raises(SystemExit, match="settings"):  # other settings: refused
        finetune.main([*argv(tmp_path), "--resume", "--steps", "3"], data=fake_cifar())


def test_stages_reuse_the_cached_pretraining(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_tasks: None
) -> None:
    trained: list[int] = []
    real_pretrain = finetune.pretrain

    def counting(images: torch.Tensor, depth: int, record: finetune.Pretraining, **options: object) -> object:
        trained.append(record.seed)
        return real_pretrain(images, depth, record, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(finetune, "pretrain", counting)
    with pytest.raises(SystemExit, match="--stage pretrain"):  # nothing cached yet
        finetune.main(argv(tmp_path, "--stage", "finetune", "--seeds", "0"), data=fake_cifar())
    bench = finetune.main(argv(tmp_path, "--stage", "pretrain", "--seeds", "0"), data=fake_cifar())
    assert bench is not None and trained == [0] and not bench.runs
    stored = json.loads((tmp_path / "finetune_cifar10.json").read_text())
    assert [p["seed"] for p in stored["pretrainings"]] == [0] and stored["runs"] == []
    finetune.main(argv(tmp_path, "--tasks", "1000", "--rows", "rotation pre-trained, default head", "--resume"),
                  data=fake_cifar())  # fmt: skip
    assert trained == [0, 1]  # seed 0 loaded from the cache, seed 1 trained
    other_data = finetune.main(argv(tmp_path, "--stage", "pretrain", "--seeds", "0"), data=fake_cifar(seed=1))
    assert other_data is not None and trained == [0, 1, 0]  # other images: not the cached net


def test_estimate_writes_nothing(tmp_path: Path, small_tasks: None, capsys: pytest.CaptureFixture[str]) -> None:
    bench = finetune.main(argv(tmp_path, "--estimate"), data=fake_cifar())
    assert bench is not None and not bench.runs
    assert "expected wall time" in capsys.readouterr().out
    assert not (tmp_path / "finetune_cifar10.json").exists() and not (tmp_path / "RESULTS.md").exists()


def test_the_labeled_subsets_are_class_balanced_fixed_and_nested() -> None:
    data = fake_cifar()
    small, large = finetune.class_balanced_subset(data, 50), finetune.class_balanced_subset(data, 100)
    assert torch.bincount(small.train[1], minlength=10).tolist() == [5] * 10
    assert torch.bincount(large.train[1], minlength=10).tolist() == [10] * 10
    assert torch.equal(small.train[0], finetune.class_balanced_subset(data, 50).train[0])
    rows = {tuple(image.flatten()[:8].tolist()) for image in large.train[0]}
    assert all(tuple(image.flatten()[:8].tolist()) in rows for image in small.train[0])
    assert small.name == "CIFAR-10, 50 labels" and finetune.cifar_task_name(1000) == "CIFAR-10, 1 000 labels"


def test_rotate_batch_matches_all_rotations() -> None:
    images = torch.randn(12, 3, 8, 8)
    rotation = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0, 1, 1, 2, 3])
    index = torch.arange(12).flip(0)
    expected = finetune.all_rotations(images)[rotation, index]
    assert torch.equal(finetune.rotate_batch(images[index], rotation), expected)


def test_quick_writes_to_a_temporary_folder_and_digits_stays_the_default(tmp_path: Path) -> None:
    quick = finetune.parse_args(["--dataset", "cifar10", "--quick"])
    for path in (quick.output, quick.results, quick.cache_dir):
        assert finetune.BENCH not in path.parents and path.parent != finetune.BENCH
    assert len(quick.seeds) == 1 and quick.max_extensions == 0
    full = finetune.parse_args(["--dataset", "cifar10"])
    assert full.output == finetune.BENCH / "finetune_cifar10_results.json" and full.tasks == ["1000", "5000"]
    (tmp_path / "mnist").mkdir()
    digits = finetune.parse_args(["--data-root", str(tmp_path)])
    assert digits.dataset == "digits"
    assert list(finetune.digits_settings(digits)) == [
        "data_root", "tasks", "rows", "depth", "lrs", "seeds", "steps", "pretrain_steps", "pretrain_lr", "threads",
        "quick", "out_dir", "results",
    ]  # fmt: skip
    assert (digits.tasks, digits.rows, digits.lrs) == (
        ["MNIST", "USPS"],
        list(finetune.ROWS),
        [0.001, 0.003, 0.01, 0.03],
    )
    assert (digits.steps, digits.pretrain_steps, digits.threads) == (300, 3000, 2)
