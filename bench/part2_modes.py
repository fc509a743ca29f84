"""Part 2's two scale modes on networks with operations that are not homogeneous: what each achieves, measured.

For each network, after Part 1 (``init_(..., between=False)``), ``rescale_`` runs
once with ``scale_mode="exact"`` and once with ``scale_mode="approximate"`` on
copies of the same weights. Measured here, not taken from the report:

* the change-rate spread before and after, as max/min over the conv/linear
  layers and as the largest deviation from their geometric mean, from this
  script's own noise back-propagation (one sample per draw, 4 draws per sample,
  eval mode, a seed unlike the library's);
* the output change on all init samples: raw, and beyond one global factor
  ``g = <y, y'> / ||y||^2``.

Networks: the paper's CaffeNet layout (``magicinit.tools.nets.caffenet``, LRN,
grouped convolutions, dropout; width 1/4, 64 Gaussian inputs of 3 x 115 x 115),
a GELU MLP and a tanh CNN on small inputs. Run from the repository root (about
3 minutes on 2 CPU cores)::

    pip install -c constraints.txt -e ".[test,bench]"
    python bench/part2_modes.py
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import magicinit
from magicinit.tools.nets import caffenet
from results_file import BENCH, commit, replace_section

AFFINE = (nn.Conv2d, nn.Linear)


def noise_rates(model: nn.Module, x: torch.Tensor, seed: int = 123, rounds: int = 4) -> dict[str, float]:
    """``sqrt(E||dL/dW||^2 / ||W||^2)`` per conv/linear weight, ``L = noise . model(sample)``, measured here."""
    weights = {name: m.weight for name, m in model.named_modules() if isinstance(m, AFFINE)}
    generator = torch.Generator().manual_seed(seed)
    totals = dict.fromkeys(weights, 0.0)
    model.eval()
    for _ in range(rounds):
        for i in range(len(x)):
            out = model(x[i : i + 1])
            grads = torch.autograd.grad(out, list(weights.values()), torch.randn(out.shape, generator=generator))
            for name, grad in zip(weights, grads):
                totals[name] += float(grad.double().square().sum())
    draws = rounds * len(x)
    return {
        name: math.sqrt(totals[name] / draws / float(w.detach().double().square().sum())) for name, w in weights.items()
    }


def spreads(rates: dict[str, float]) -> tuple[float, float]:
    """max/min, and the largest relative deviation from the geometric mean."""
    values = list(rates.values())
    mean = math.exp(sum(math.log(v) for v in values) / len(values))
    return max(values) / min(values), max(abs(v / mean - 1) for v in values)


def output_changes(reference: torch.Tensor, output: torch.Tensor) -> tuple[float, float]:
    """Relative change, raw and beyond the best global factor."""
    a, b = reference.double(), output.double()
    scale = float((a * b).sum() / a.square().sum())
    return float((b - a).norm() / a.norm()), float((b - scale * a).norm() / (scale * a).norm())


def tanh_cnn() -> nn.Module:
    """A tanh CNN whose first layer is scaled down after Part 1, so tanh works near its linear range."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def gelu_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(3 * 16 * 16, 256),
        nn.GELU(),
        nn.Linear(256, 256),
        nn.GELU(),
        nn.Linear(256, 256),
        nn.GELU(),
        nn.Linear(256, 10),
    )


def shrink_first_layer(model: nn.Module) -> None:
    """Scale the first affine layer's outputs by 0.1 (inputs of the first nonlinearity near 0)."""
    first = next(m for m in model.modules() if isinstance(m, AFFINE))
    with torch.no_grad():
        first.weight.mul_(0.1)
        first.bias.mul_(0.1)


NETWORKS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], bool]] = {
    "caffenet (width 1/4, LRN)": (lambda: caffenet(classes=10, width=0.25), (3, 115, 115), False),
    "GELU MLP (4 layers)": (gelu_mlp, (3, 16, 16), False),
    "tanh CNN, first layer x0.1": (tanh_cnn, (3, 16, 16), True),
}


def run(name: str, samples: int) -> list[str]:
    """The table rows of one network: before, exact, approximate."""
    build, shape, shrink = NETWORKS[name]
    torch.manual_seed(0)
    model = build()
    x = torch.randn(samples, *shape, generator=torch.Generator().manual_seed(1))
    magicinit.init_(model, x, seed=0, between=False)
    if shrink:
        shrink_first_layer(model)
    with torch.no_grad():
        reference = model.eval()(x)
    before = spreads(noise_rates(model, x))
    rows = [f"| {name} | Part 1 only | - | {before[0]:.3g} | {100 * before[1]:.0f} % | - | - | - | - |"]
    for mode in ("exact", "approximate"):
        trial = copy.deepcopy(model)
        started = time.perf_counter()
        report = magicinit.rescale_(trial, x, seed=0, scale_mode=mode)
        seconds = time.perf_counter() - started
        with torch.no_grad():
            raw, beyond = output_changes(reference, trial.eval()(x))
        after = spreads(noise_rates(trial, x))
        rescaled = sum(layer.status == "rescaled" for layer in report.layers)
        rows.append(
            f"| {name} | {mode} | {rescaled}/{len(report.layers)} | {after[0]:.3g} | {100 * after[1]:.0f} % | "
            f"{raw:.1e} | {beyond:.1e} | {len(report.approximated)} | {seconds:.1f} s |"
        )
        print(rows[-1], flush=True)
        if report.approximated:
            print("   treated as homogeneous:", report.approximated, flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64, help="Gaussian init samples (default 64)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument(
        "--results",
        type=Path,
        default=BENCH / "RESULTS.md",
        help="the markdown file whose '## bench/part2_modes.py' section is replaced",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header = [
        "| network | Part 2 | layers rescaled | rate spread max/min | largest deviation from geometric mean | "
        "output change | beyond a global factor | ops treated as homogeneous | rescale_ time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [row for name in NETWORKS for row in run(name, args.samples)]
    table = "\n".join(header + rows)
    print(table)
    section = (
        f"## bench/part2_modes.py\n\nCommand, run from the repository root on {time.strftime('%Y-%m-%d')}, library "
        f"at commit {commit()}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f'{args.threads} threads, CPU:\n\n```\npip install -c constraints.txt -e ".[test,bench]"\n'
        f"python bench/part2_modes.py\n```\n\n"
        f"{args.samples} Gaussian init samples; Part 1 first, then `rescale_` in each mode on copies of the same "
        "weights (defaults: scale_tolerance 0.05). Spreads from this script's own noise back-propagation; output "
        "changes on all init samples.\n\n" + table + "\n"
    )
    replace_section(args.results, "## bench/part2_modes.py", section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
