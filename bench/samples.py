"""How many init samples does magicinit need? Measured on MNIST with bench/train.py's plain CNN.

For every count of ``--samples`` (32 to 1024) and every seed of ``--seeds``, on
MNIST at 16 x 16 (bench/train.py's data: 10 000 training images, 2 000 held-out
validation images, the 10 000 test images) and ``plain_cnn(--depth, 16)``:

* **channel statistics** (Part 1 alone, ``init_(between=False, samples=N)`` on N
  random training images): every conv/linear layer's output channels, read by
  forward hooks of this script on the 2 000 validation images (never init
  data); Part 1 sets mean 0 and std 1 on the init data, so the error is how far
  the held-out channels are from that: the RMS over all channels of all layers
  of ``std - 1`` and of the mean (in units of the channel's std), and the
  worst layer's RMS ``std - 1``;
* **change-rate spread** after the whole ``init_`` (Parts 1 and 2), measured by
  ``magicinit.diagnose`` on 256 validation images (other data than the init
  samples): 1 would be perfect equalization carried over to new data;
* **training**: the same initialized net trained as bench/train.py trains
  (SGD, momentum 0.9, batch 128, ``--steps`` steps, learning rate ``--lr``:
  0.01, the rate bench/train.py's validation picks for magicinit at depth 10 on
  MNIST), test accuracy.

Reported per count: the means over seeds (accuracy also with half the range).
Output: the table on stdout and the ``## bench/samples.py`` section of
``bench/RESULTS.md``. Run from the repository root (about 4 minutes on 2 CPU cores)::

    pip install -c constraints.txt -e ".[bench]"
    python bench/samples.py
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import magicinit
from magicinit.tools.demo import evaluate, train
from magicinit.tools.nets import plain_cnn
from results_file import BENCH, commit, replace_section
from train import BATCH_SIZE, DEFAULT_DATA_ROOT, load_mnist


@dataclass
class Row:
    """One (samples, seed) measurement."""

    samples: int
    seed: int
    std_error: float  # RMS over channels of (std - 1) on held-out images, after Part 1
    mean_error: float  # RMS over channels of mean / std on held-out images, after Part 1
    worst_layer_std_error: float
    spread: float  # change-rate spread after init_, measured on held-out images
    test_accuracy: float
    init_seconds: float


def channel_errors(model: nn.Module, images: Tensor) -> tuple[float, float, float]:
    """RMS over all channels of ``std - 1`` and of ``mean / std`` of every conv/linear output on
    ``images`` (forward hooks), and the largest per-layer RMS of ``std - 1``."""
    outputs: list[Tensor] = []
    hooks = [
        module.register_forward_hook(lambda module, args, output: outputs.append(output.detach()))
        for module in model.modules()
        if isinstance(module, (nn.Conv2d, nn.Linear))
    ]
    try:
        with torch.no_grad():
            model.eval()(images)
    finally:
        for hook in hooks:
            hook.remove()
    std_errors, mean_errors, per_layer = [], [], []
    for output in outputs:
        channels = output.transpose(0, 1).reshape(output.shape[1], -1).double()
        std, mean = channels.std(1, correction=0), channels.mean(1)
        std_errors.append(std - 1)
        mean_errors.append(mean / std.clamp_min(1e-12))
        per_layer.append(float((std - 1).square().mean().sqrt()))
    rms = [float(torch.cat(errors).square().mean().sqrt()) for errors in (std_errors, mean_errors)]
    return rms[0], rms[1], max(per_layer)


def rate_spread(diagnosis: magicinit.Diagnosis) -> float:
    """Largest over smallest change rate of the layers a gradient reaches."""
    rates = [layer.rate for layer in diagnosis.layers if 0 < layer.rate < math.inf]
    return max(rates) / min(rates)


def measure(args: argparse.Namespace) -> list[Row]:
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    data = load_mnist(args.data_root)
    held_out = data.validation[0]
    rows = []
    for samples in args.samples:
        for seed in args.seeds:
            pick = torch.randperm(len(data.train[0]), generator=torch.Generator().manual_seed(seed))
            init_images = data.train[0][pick[:samples]]
            torch.manual_seed(seed)
            model = plain_cnn(args.depth, 16, in_channels=1, classes=10)
            part1 = plain_cnn(args.depth, 16, in_channels=1, classes=10)
            part1.load_state_dict(model.state_dict())
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                magicinit.init_(part1, init_images, seed=seed, between=False, samples=samples)
                started = time.perf_counter()
                magicinit.init_(model, init_images, seed=seed, samples=samples)
                init_seconds = time.perf_counter() - started
                spread = rate_spread(magicinit.diagnose(model, held_out[:256], seed=seed))
            std_error, mean_error, worst = channel_errors(part1, held_out)
            train(model, *data.train, steps=args.steps, batch_size=BATCH_SIZE, learning_rate=args.lr, seed=seed)
            accuracy = evaluate(model, *data.test)[0]
            rows.append(Row(samples, seed, std_error, mean_error, worst, spread, accuracy, init_seconds))
            print(
                f"  samples {samples:5d} seed {seed}: std error {std_error:.3f}, mean error {mean_error:.3f}, "
                f"spread {spread:.2f}, test {100 * accuracy:.2f} %, init {init_seconds:.1f} s",
                flush=True,
            )
    return rows


def table(rows: list[Row], args: argparse.Namespace) -> str:
    lines = [
        "| init samples | RMS (std - 1), held out | RMS mean / std, held out | worst layer's RMS (std - 1) "
        "| rate spread on held-out data | test accuracy | init_ seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for samples in args.samples:
        mine = [row for row in rows if row.samples == samples]
        accuracies = [100 * row.test_accuracy for row in mine]
        half_range = (max(accuracies) - min(accuracies)) / 2
        lines.append(
            f"| {samples} | {statistics.mean(r.std_error for r in mine):.3f} "
            f"| {statistics.mean(r.mean_error for r in mine):.3f} "
            f"| {statistics.mean(r.worst_layer_std_error for r in mine):.3f} "
            f"| {statistics.mean(r.spread for r in mine):.2f} "
            f"| {statistics.mean(accuracies):.2f} % ± {half_range:.2f} "
            f"| {statistics.mean(r.init_seconds for r in mine):.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data-root",
        type=Path,
        default=DEFAULT_DATA_ROOT if DEFAULT_DATA_ROOT.is_dir() else None,
        help="folder holding mnist/ (default: ../shared/data when it exists)",
    )
    parser.add_argument("--samples", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--depth", type=int, default=10, help="affine layers of the plain CNN")
    parser.add_argument("--steps", type=int, default=300, help="SGD steps of the training run")
    parser.add_argument("--lr", type=float, default=0.01, help="learning rate of the training run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS.md")
    args = parser.parse_args()
    if args.data_root is None or not (args.data_root / "mnist").is_dir():
        raise SystemExit("MNIST not found: pass --data-root FOLDER (holding mnist/ with the idx files)")
    started = time.perf_counter()
    rows = measure(args)
    text = table(rows, args)
    print(text)
    section = (
        f"## bench/samples.py\n\nCommand, run from the repository root on {time.strftime('%Y-%m-%d')}, library at "
        f"commit {commit()}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{args.threads} threads, CPU, {(time.perf_counter() - started) / 60:.1f} minutes:\n\n"
        f'```\npip install -c constraints.txt -e ".[bench]"\npython bench/samples.py\n```\n\n'
        f"MNIST 16 x 16, plain_cnn(depth {args.depth}, width 16), seeds {', '.join(map(str, args.seeds))} "
        f"(means over them; accuracy ± half the range). Channel statistics after Part 1 alone, read by hooks on "
        f"the 2 000 held-out validation images; rate spread after the whole init_, measured by diagnose on 256 "
        f"of them; test accuracy after {args.steps} SGD steps at learning rate {args.lr:g} (bench/train.py's "
        f"protocol).\n\n{text}\n\n"
    )
    replace_section(args.results, "## bench/samples.py", section)
    if any(not math.isfinite(row.test_accuracy) for row in rows):
        raise SystemExit("a training run did not finish")


if __name__ == "__main__":
    main()
