"""bench/cifar_train.py and bench/cifar_nets.py on a tiny fake CIFAR-shaped dataset (no ../shared data)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import cifar_train
import magicinit
from cifar_nets import caffenet_cifar, resnet20, vit
from cifar_train import adaptive_grid, kendall_tau, swapped_pairs
from magicinit.tools.nets import plain_cnn
from results_file import replace_section
from train import Dataset

torch.set_num_threads(1)


def fake_cifar(count: int = 160, seed: int = 0) -> Dataset:
    """CIFAR-shaped images whose class shifts one channel's mean, standardized, split 3 ways."""
    generator = torch.Generator().manual_seed(seed)

    def part(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, 10, (n,), generator=generator)
        images = torch.randn(n, 3, 32, 32, generator=generator)
        images[:, 0] += 0.3 * (labels.float()[:, None, None] - 4.5)
        return images, labels

    return Dataset("fake", part(count), part(40), part(40))


def test_the_grid_extends_while_the_best_rate_is_at_an_edge() -> None:
    tried: list[float] = []

    def score(lr: float) -> float:  # peaks at 1.0: above the starting grid
        tried.append(lr)
        return -abs(torch.log10(torch.tensor(lr)).item())

    search = adaptive_grid([0.01, 0.03, 0.1], score, max_extensions=5)
    assert search.best == 1.0 and not search.stopped_at_edge
    assert search.tried == [0.01, 0.03, 0.1, 0.3, 1.0, 3.0]
    assert search.extensions == 3 and len(tried) == len(set(tried)) == 6

    downward = adaptive_grid([0.01, 0.03, 0.1], lambda lr: -lr, max_extensions=2)
    assert downward.tried == [0.001, 0.003, 0.01, 0.03, 0.1]
    assert downward.best == 0.001 and downward.stopped_at_edge  # the limit stopped it

    inside = adaptive_grid([0.01, 0.03, 0.1], lambda lr: -abs(lr - 0.03))
    assert inside.tried == [0.01, 0.03, 0.1] and inside.best == 0.03 and inside.extensions == 0


def test_kendall_tau() -> None:
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == 1.0
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0


def test_swapped_pairs_tell_ties_from_ranking_changes() -> None:
    ends = {"a": [0.30, 0.32], "b": [0.31, 0.33], "c": [0.20, 0.21]}
    early = {"a": [0.29, 0.30], "b": [0.27, 0.28], "c": [0.10, 0.12]}
    pairs, swapped, apart = swapped_pairs(ends, early)
    assert pairs == 3 and swapped == [("a", "b")]  # b passes a: apart at 3/4 (0.27-0.28 below 0.29-0.30)
    assert apart == [("a", "b")]
    early["b"] = [0.28, 0.295]  # overlapping seeds at 3/4 and at the end: a tie, not a change of ranking
    assert swapped_pairs(ends, early)[1:] == ([("a", "b")], [])
    assert swapped_pairs(ends, ends) == (3, [], [])


NETS = {
    "plain d10": lambda: plain_cnn(10, 16, in_channels=3, classes=10),
    "caffenet": lambda: caffenet_cifar(0.125, hidden=64),
    "resnet20": lambda: resnet20(batch_norm=False),
    "resnet20-bn": lambda: resnet20(batch_norm=True),
    "vit": lambda: vit(32, 2, 2),
}


@pytest.mark.parametrize("name", list(NETS))
def test_each_net_builds_and_magicinit_gives_unit_std_channels(name: str) -> None:
    torch.manual_seed(0)
    model = NETS[name]()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    images = torch.randn(48, 3, 32, 32)
    magicinit.init_(model, images, seed=0, between=False)  # Part 1 alone: every channel std 1 exactly
    outputs: dict[str, torch.Tensor] = {}
    affine = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [  # channels first: a convolution's dim 1, a linear layer's last dim
        module.register_forward_hook(
            lambda mod, inp, out, n=n: outputs.__setitem__(
                n, (out.transpose(0, 1) if isinstance(mod, nn.Conv2d) else out.movedim(-1, 0)).detach()
            )
        )
        for n, module in affine[:4]
    ]
    model.eval()
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    for layer, output in outputs.items():
        std = output.flatten(1).std(dim=1)  # per output channel, over images and positions
        assert torch.allclose(std, torch.ones_like(std), atol=0.05), (layer, std)


def test_the_plain_family_runs_end_to_end_and_writes_every_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    output, results = tmp_path / "cifar_plain.json", tmp_path / "RESULTS.md"
    argv = [
        "--family", "plain", "--depths", "4", "--rows", "kaiming normal", "magicinit (gaussian)",
        "--lrs", "0.01", "0.03", "--max-extensions", "1", "--seeds", "0", "1", "--steps", "4",
        "--init-samples", "32", "--output", str(output), "--results", str(results),
    ]  # fmt: skip
    monkeypatch.setattr(cifar_train, "estimate_seconds", lambda args, data: 0.0)
    bench = cifar_train.main(argv, data=fake_cifar())
    stored = json.loads(output.read_text())
    runs = stored["runs"]
    grids = stored["grids"]
    assert set(grids) == {"depth 4, kaiming normal", "depth 4, magicinit (gaussian)"}
    for label, grid in grids.items():
        row = label.split(", ", 1)[1]
        grid_runs = [r for r in runs if r["init"] == row and r["seed"] == 0]
        assert sorted(r["learning_rate"] for r in grid_runs) == grid["tried"]
        assert len(grid["tried"]) in (2, 3)  # the starting grid, and one extension where the best was at an edge
        seed_1 = [r for r in runs if r["init"] == row and r["seed"] == 1]
        assert [r["learning_rate"] for r in seed_1] == [grid["best"]]
    assert len(runs) == len(bench.runs)
    for run in runs:
        assert run["steps"] == 4 and run["losses"]
        assert run["diverged"] or 0.0 <= run["test_accuracy"] <= 1.0
        assert run["diverged"] or 0.0 <= run["validation_accuracy_3_4"] <= 1.0
    section = results.read_text()
    assert "## bench/cifar_train.py --family plain" in section and "| kaiming normal |" in section
    assert "Kendall's tau" in section

    # --resume trains nothing again
    monkeypatch.setattr(cifar_train, "train_run", lambda *a: pytest.fail("trained again"))
    again = cifar_train.main([*argv, "--resume"], data=fake_cifar())
    assert set(again.runs) == set(bench.runs)
    # a resumed invocation with fewer rows still tabulates every row the JSON holds, and says how it ran
    only_kaiming = [*argv[:6], *argv[7:], "--resume"]
    assert only_kaiming[5] == "kaiming normal" and "magicinit (gaussian)" not in only_kaiming
    cifar_train.main(only_kaiming, data=fake_cifar())
    section = results.read_text()
    assert "| kaiming normal |" in section and "| magicinit (gaussian) |" in section
    assert "--rows 'kaiming normal' --lrs" in section and "runs of earlier invocations" in section


def test_quick_does_not_write_the_real_results() -> None:
    args = cifar_train.parse_args(["--family", "vit", "--quick"])
    assert args.output.parent != cifar_train.BENCH and args.results.parent != cifar_train.BENCH
    assert len(args.seeds) == 1 and len(args.lrs) == 2 and len(args.depths) == 1


def test_a_longer_run_has_its_own_json_and_section(tmp_path: Path) -> None:
    default = cifar_train.parse_args(["--family", "caffenet"])
    longer = cifar_train.parse_args(["--family", "caffenet", "--steps", str(2 * default.steps)])
    assert default.output.name == "cifar_caffenet_results.json"
    assert longer.output.name == f"cifar_caffenet_steps{2 * default.steps}_results.json"
    assert cifar_train.heading(default) == "## bench/cifar_train.py --family caffenet"
    assert cifar_train.heading(longer) == f"## bench/cifar_train.py --family caffenet --steps {2 * default.steps}"
    same = cifar_train.parse_args(["--family", "caffenet", "--steps", str(default.steps)])
    assert same.output == default.output and cifar_train.heading(same) == cifar_train.heading(default)
    results = tmp_path / "RESULTS.md"  # writing one section leaves the other
    for args, text in ((default, "short"), (longer, "long"), (default, "short again")):
        replace_section(results, cifar_train.heading(args), f"{cifar_train.heading(args)}\n\n{text}\n")
    written = results.read_text()
    assert "short again" in written and "long" in written and "short\n" not in written


def test_recomputed_bn_statistics_are_the_data_s_and_have_their_own_json_and_section() -> None:
    # one batch of 100 images: the recomputed running mean and variance are that batch's, so the copy in eval
    # mode computes what the net computes on that batch in training mode (up to the running variance's n - 1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):  # statistics far from the data's, as a lagging average's can be
            module.running_mean.fill_(3.0)
            module.running_var.fill_(50.0)
    images = torch.randn(100, 3, 8, 8) * 2 + 1
    recomputed = cifar_train.with_recomputed_bn_statistics(net, images)
    assert recomputed is not net and float(net[1].running_mean[0]) == 3.0 and net[1].momentum == 0.1  # untouched
    with torch.no_grad():
        expected = net.train()(images)
        got, stale = recomputed.eval()(images), net.eval()(images)
    assert torch.allclose(got, expected, rtol=0.02, atol=0.02)
    assert not torch.allclose(stale, expected, rtol=0.5, atol=0.5)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3))
    assert cifar_train.with_recomputed_bn_statistics(plain, images) is plain

    args = cifar_train.parse_args(["--family", "resnet-bn", "--recompute-bn-statistics"])
    default = cifar_train.parse_args(["--family", "resnet-bn"])
    assert args.output.name == "cifar_resnet_bn_bnstats_results.json"
    assert default.output.name == "cifar_resnet_bn_results.json"
    assert cifar_train.heading(args) == "## bench/cifar_train.py --family resnet-bn --recompute-bn-statistics"
    assert "bn_statistics" in cifar_train.Bench(args, args.output).settings()
    assert "bn_statistics" not in cifar_train.Bench(default, default.output).settings()  # older JSONs resume


def test_a_run_with_recomputed_bn_statistics_evaluates_the_recomputed_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    data = fake_cifar()
    torch.manual_seed(0)
    model = plain_cnn(3, 8, in_channels=3, classes=10, batch_norm=True)
    evaluated: list[torch.Tensor] = []  # the first batch norm's running mean of every net evaluated
    original = cifar_train.evaluate

    def recording(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
        norm = next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d))
        evaluated.append(norm.running_mean.clone())
        return original(net, images, labels)

    monkeypatch.setattr(cifar_train, "evaluate", recording)
    run = cifar_train.Run("plain", 3, "kaiming normal", 0, 0.1, 0.0, 4, "")
    cifar_train.train_run(run, model, data, 4, recompute_bn_statistics=True)  # trains ``model`` in place
    assert len(evaluated) == 4  # validation and test, at 3/4 and at the end
    recomputed = cifar_train.with_recomputed_bn_statistics(model, data.train[0])
    norm = next(m for m in recomputed.modules() if isinstance(m, nn.BatchNorm2d))
    own = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert torch.equal(evaluated[-1], norm.running_mean) and torch.equal(evaluated[-2], norm.running_mean)
    assert not torch.allclose(own.running_mean, norm.running_mean)  # the model's own running average differs


def test_runs_without_batch_norm_are_taken_from_the_running_average_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cifar_train, "estimate_seconds", lambda args, data: 0.0)
    averages, recomputed, results = tmp_path / "plain.json", tmp_path / "plain_bnstats.json", tmp_path / "R.md"
    argv = [
        "--family", "plain", "--depths", "3", "--rows", "kaiming normal", "batch norm + kaiming",
        "--lrs", "0.03", "0.1", "--max-extensions", "0", "--seeds", "0", "1", "--steps", "4",
        "--init-samples", "32", "--results", str(results),
    ]  # fmt: skip
    first = cifar_train.main([*argv, "--output", str(averages)], data=fake_cifar())
    # magicinit on the batch-norm twin: a net with batch norm, which magicinit initialized (Part 1 took time)
    magic_twin = cifar_train.main(
        [*argv[:5], cifar_train.BATCH_NORM_MAGICINIT, *argv[7:], "--output", str(tmp_path / "twin.json")],
        data=fake_cifar(),
    )
    assert {key[1] for key in magic_twin.runs} == {"batch norm + magicinit"}
    assert all(run.init_seconds > 0 and run.init_notes is not None for run in magic_twin.runs.values())
    built = cifar_train.FAMILIES["plain"].build(3, cifar_train.FAMILIES["plain"].rows["batch norm + magicinit"][1])
    assert cifar_train.batch_norms_with_running_statistics(built)
    trained: list[str] = []
    original = cifar_train.train_run

    def recording(run: cifar_train.Run, *rest: object) -> cifar_train.Run:
        trained.append(run.init)
        return original(run, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(cifar_train, "train_run", recording)
    copying = [*argv, "--recompute-bn-statistics", "--runs-without-batch-norm-from", str(averages)]
    second = cifar_train.main([*copying, "--output", str(recomputed)], data=fake_cifar())
    assert set(trained) == {"batch norm + kaiming"} and len(trained) == 3  # 2 grid rates, 1 more seed
    kaiming = [key for key in first.runs if key[1] == "kaiming normal"]
    assert len(kaiming) == 3 and all(second.runs[key] == first.runs[key] for key in kaiming)  # the same records
    twin = [key for key in second.runs if key[1] == "batch norm + kaiming"]
    assert len(twin) == 3 and set(second.runs) == set(kaiming) | set(twin)
    grid = [key for key in twin if key[2] == 0]  # the same rates on seed 0 (the chosen one may differ)
    assert all(second.runs[key].train_seconds != first.runs[key].train_seconds for key in grid)  # trained again
    stored = json.loads(recomputed.read_text())
    assert stored["copied"]["rows"] == ["kaiming normal"] and stored["copied"]["runs"] == 3
    assert set(stored["grids"]) == {"depth 3, kaiming normal", "depth 3, batch norm + kaiming"}
    assert "3 runs of the rows without batch norm (kaiming normal) are those of `plain.json`" in results.read_text()

    # resumed, it trains nothing and still says where the runs came from
    monkeypatch.setattr(cifar_train, "train_run", lambda *a: pytest.fail("trained again"))
    cifar_train.main([*copying, "--output", str(recomputed), "--resume"], data=fake_cifar())
    assert "are those of `plain.json`" in results.read_text()
    # the source must have the same settings, and the option needs --recompute-bn-statistics
    with pytest.raises(SystemExit, match="settings"):
        cifar_train.main([*copying, "--steps", "5", "--output", str(tmp_path / "other.json")], data=fake_cifar())
    with pytest.raises(SystemExit):
        cifar_train.parse_args(["--family", "plain", "--runs-without-batch-norm-from", str(averages)])
