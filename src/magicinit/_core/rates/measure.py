"""The relative change rate of every layer, from back-propagated noise (Parts 2 and 4).

A layer's relative change rate is ``C_k = sqrt(E||dL/dW_k||^2 / ||W_k||^2)``
under a random linear loss ``L = eta . output`` (noise back-propagated from
the top: no labels). The paper draws ``eta`` from a standard Gaussian; any
noise with ``E[eta eta^T] = I`` has the same expectation, and Rademacher
noise (``strategy.NoiseDraws.noise``) has the least variance. It is
estimated on small chunks of the init data, each with its own noise draw: the
gradient of a chunk mixes its samples' contributions with random signs, so
many small chunks give a far steadier estimate than a few large ones at the
same cost. Rounds over the data (each chunk with fresh noise) repeat until
the standard error of every ``log C_k`` is below a target. The target is the
rate *on the init data*, so the error counts only the noise: it is estimated
from how much each chunk's squared gradient norm varies between rounds, not
from differences between samples. After the first round only, where it holds
``ONE_ROUND_MIN_DRAWS`` draws or more, the spread of its draws bounds that
error from above (it counts the differences between samples too), and where
the bound already meets the target no second round is made.

The samples rarely weigh alike: on some models one sample holds half of a
layer's squared gradient norm (``bench/rate_noise.py --part shares``), and a
draw of a sample that holds a thousandth barely moves the error. Where, after
two rounds of every chunk, some layer misses the target and the first round's
weights are unequal enough to pay (``UNEQUAL_GAIN``), later rounds draw each
chunk in proportion to its first-round weight (``_draw_weights``), several
times in a round, the total doubling each round (``_next_draws``); each chunk
keeps its own mean (the estimate is the sum of the chunks' means, whatever
their numbers of draws), and the first round stays out of the estimate, so
that no chunk's number of draws depends on the draws its mean is taken from.
A chunk drawn once after it takes the pooled relative variance of the chunks
drawn more often. ``rate_max_rounds`` bounds the draws: that many rounds'
worth, over all ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..adapters import Layout
from ..context import PassContext
from ..distributed import Collective
from ..errors import MagicInitError
from ..inputs import batch_size
from ..safety import temporary_hooks
from ..sites import WeightUnit, refreshed
from .choose import choose_strategy
from .norms import squared_filter_norms
from .strategy import NoiseDraws, check_gradients_reach_output

ONE_ROUND_MIN_DRAWS = 64  # draws in one round from which their own spread is trusted to bound the noise error
FULL_ROUNDS = 2  # rounds of every chunk before only the chunks that matter are drawn
# Drawing the chunks in proportion to their weights w (summing to 1) over C chunks has about C * sum(w^2) times
# less variance than drawing them alike; below this, every round draws every chunk (one kept forward serves
# them all, and the first round stays in the estimate)
UNEQUAL_GAIN = 2.0
# Drawing some chunks only needs every chunk's own channel (and slice) sums: at most this many floats of them
# (chunks x channels of all layers); above, every round draws every chunk.
PER_CHUNK_FLOATS = 2**24

# batch norms, which compute the statistics of the batch they get even in eval mode when they keep no running
# statistics (track_running_stats=False)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass
class ChangeRates:
    """Estimated change rates of a set of layers.

    Attributes:
        rate: ``C_k`` per layer (0 where no gradient reaches the layer).
        log_error: standard error of ``log C_k`` (the estimate's spread).
        channel_rate: per output channel ``sqrt(E||dL/dW_i||^2 / ||W_i||^2)``.
        draws: number of noise draws averaged (over all chunks and rounds).
        rounds: rounds made (the first ``FULL_ROUNDS`` of every chunk, later ones of the chunks that matter,
            each as many times as they get draws).
        input_slice_gradient: for weights measured with ``input_slices``, ``E||dL/dW_s||^2`` of
            every slice ``s`` of their input channels (float64, on the CPU).
        method: how the draws' gradient norms were computed (``choose_strategy``): ``"from site
            activations"``, ``"vectorized per-sample gradients"`` or ``"one sample at a time"`` (with the
            reason where it is not the first).
    """

    rate: dict[str, float]
    log_error: dict[str, float]
    channel_rate: dict[str, Tensor]
    draws: int
    input_slice_gradient: dict[str, Tensor] = field(default_factory=dict)
    method: str = "one sample at a time"
    rounds: int = 0


def measure_change_rates(
    context: PassContext,
    units: dict[str, WeightUnit],
    layouts: dict[str, Layout],
    desc: str = "magicinit: change rates",
    input_slices: dict[str, tuple[int, ...]] | None = None,
) -> ChangeRates:
    """Estimate the change rate of every weight in ``units`` from back-propagated noise.

    ``layouts`` gives each weight's filter layout (``graph.LayerGraph.layouts``).
    The rate is that of the weight as the forward uses it: the parameter, or a
    reparametrization's result. For the weights in ``input_slices`` (sizes of
    consecutive slices of input channels, dimension 1), the squared gradient
    norm of every slice is averaged too. The model's parameters are not changed.
    Gradients are taken with ``torch.autograd.grad`` (no ``.grad`` is written);
    the real parameters' ``requires_grad`` is switched on for the duration and
    the caller restores it. The draws' norms come from the fastest strategy
    ``choose.choose_strategy`` finds for the model. With a
    collective, every rank draws its own noise (from a generator forked off
    the shared one) over its own data, and the sums and their noise variances
    are summed over the ranks, which stop after the same round.
    """
    options, collective = context.rates, context.collective
    problem = _single_sample_batch_norm(context)
    if collective is not None:  # every rank raises if one must (each has its own number of samples)
        collective.agree(problem)
    elif problem is not None:
        raise problem
    generator = context.generator
    if collective is not None and generator is not None:
        generator = collective.fork(generator)
    model, names = context.model, list(units)
    for unit in units.values():
        for param in unit.real_parameters(model):
            param.requires_grad_(True)
    check_gradients_reach_output(context, units)
    chunks = len(range(0, batch_size(context.batch), options.chunk_size))
    slices = {name: sizes for name, sizes in (input_slices or {}).items() if name in units}
    channels = sum(layouts[name][0].out_channels(units[name].tensor(model), layouts[name][1]) for name in names)
    per_chunk = chunks * (channels + sum(map(len, slices.values()))) <= PER_CHUNK_FLOATS
    if collective is not None:  # every rank draws some chunks only, or none does (the same collectives)
        per_chunk = collective.total(0 if per_chunk else 1) == 0
    pilot, sums = _ChunkSums(chunks, per_chunk), _ChunkSums(chunks, per_chunk)  # round 1; the later rounds
    budget = options.max_rounds * chunks  # the draws of rate_max_rounds rounds over every chunk, at most
    all_chunks = collective.total(chunks) if collective is not None else chunks
    # per round: the chunks drawn (a chunk drawn several times repeats) and every layer's squared norm of each
    # of those draws, (layers, draws)
    history: list[tuple[Tensor, Tensor]] = []
    rounds = 0
    errors: dict[str, float] = {}  # of the last round's estimate
    drawn: list[int] | None = None  # the chunks of the next round (None: each once)
    weights: Tensor | None = None  # in the rounds after FULL_ROUNDS: every chunk's share of the draws
    noise_draws = NoiseDraws(context, units, layouts, slices, generator)
    # the reparametrizations' attributes hold this pass's graph: recomputed without it at the end
    with (
        context.progress_bar(budget, desc, unit="draw") as advance,
        temporary_hooks() as hooks,
        refreshed(model, units.values()),
    ):
        strategy, method = choose_strategy(noise_draws, hooks)
        try:
            while True:
                rounds += 1
                indices = list(range(chunks)) if drawn is None else drawn
                into = pilot if rounds == 1 else sums
                round_totals: dict[str, list[Tensor]] = {name: [] for name in names}
                position = 0
                for block in strategy.rounds(drawn) if indices else ():
                    rows = indices[position : position + block.count]
                    position += block.count
                    for name in names:
                        into.add("channel", name, block.channel[name], rows)
                        round_totals[name].append(block.channel[name].sum(1))
                        if name in slices:
                            into.add("slices", name, block.slices[name], rows)
                    advance(block.count)
                into.count(indices)
                # one transfer per round, not per layer or draw (layers on other devices joined first)
                totals = torch.zeros(len(names), 0, dtype=torch.float64)
                if indices:
                    joined = [torch.cat(round_totals[name]) for name in names]
                    totals = torch.stack([t.to(joined[0].device) for t in joined]).cpu().double()
                history.append((torch.tensor(indices, dtype=torch.long), totals))
                # after one round, its draws' bound; after more, the noise measured between a chunk's draws (once
                # only the chunks that matter are drawn, of the rounds after the first: see _draw_weights)
                if rounds == 1:
                    errors = _one_round_log_errors(names, history, collective)
                elif weights is None:
                    errors = _log_errors(names, history, chunks, collective)
                else:
                    errors = _log_errors(names, history[1:], chunks, collective, one_draw_floor=True)
                if all(e <= options.precision for e in errors.values()):
                    break
                remaining = budget - pilot.draws() - sums.draws()
                if rounds == FULL_ROUNDS and per_chunk:  # draw where the weight is only where that pays
                    weights = _draw_weights(history[0][1], collective)
                    squares = weights.square().sum().reshape(1)
                    gain = all_chunks * float(collective.sum(squares) if collective is not None else squares)
                    if gain < UNEQUAL_GAIN:
                        weights = None
                if weights is None:
                    drawn, more = None, chunks if remaining >= chunks else 0
                else:
                    drawn = _next_draws(
                        weights, sums.counts, rounds + 1 - FULL_ROUNDS, remaining, all_chunks, collective
                    )
                    more = len(drawn)
                if (collective.total(more) if collective is not None else more) == 0:
                    break  # the budget is spent
        finally:
            strategy.close()
    n_draws = pilot.draws() + sums.draws()
    if weights is None:  # every chunk drawn in every round: all of them count
        sums = pilot.merged(sums)
    if collective is not None:
        n_draws = collective.total(n_draws)
        chunks = collective.total(chunks)
    rate, channel_rate = {}, {}
    for name in names:
        adapter, groups = layouts[name]
        channel_norm_sq = squared_filter_norms(adapter.to_filters(units[name].tensor(model).detach(), groups))
        channel_norm_sq = channel_norm_sq.flatten().cpu()
        mean_grad_sq = sums.mean_over_chunks("channel", name, collective) / chunks
        weight_norm_sq = float(channel_norm_sq.sum())
        rate[name] = math.sqrt(float(mean_grad_sq.sum()) / weight_norm_sq) if weight_norm_sq > 0 else math.inf
        channel_rate[name] = (mean_grad_sq / channel_norm_sq).sqrt().float()
    slice_gradient = {name: sums.mean_over_chunks("slices", name, collective) / chunks for name in slices}
    return ChangeRates(rate, errors, channel_rate, n_draws, slice_gradient, method, rounds)


def _single_sample_batch_norm(context: PassContext) -> MagicInitError | None:
    """The refusal (naming the layer) of chunks of a single sample for a model with a batch norm that keeps no
    running statistics: it normalizes a sample alone by that sample's own statistics (for ``BatchNorm1d``: an
    error), which is not the function it computes on a training batch; None where there is nothing to refuse."""
    count, chunk_size = batch_size(context.batch), context.rates.chunk_size
    if chunk_size > 1 and count % chunk_size != 1:
        return None
    for name, module in context.model.named_modules():
        if isinstance(module, BATCH_NORMS) and module.running_mean is None:
            why = "rate_chunk_size=1" if chunk_size == 1 else f"the last chunk of the {count} samples"
            return MagicInitError(
                f"layer '{name}' ({type(module).__name__}, track_running_stats=False) normalizes by the statistics "
                "of the batch it gets, in eval mode too, and change rates are measured on chunks of the init data, "
                f"which here hold a single sample ({why}): on one sample it fails or computes another function. "
                "Pass rate_chunk_size=k with k of 2 or more (the training batch size gives the rates of training) "
                "that leaves no chunk of a single sample, or init_(..., between=False): Part 1 alone works, on all "
                "the init data at once"
            )
    return None


def _one_round_log_errors(
    names: list[str], history: list[tuple[Tensor, Tensor]], collective: Collective | None = None
) -> dict[str, float]:
    """An upper bound of the standard error of ``log C`` due to the noise after one round (``history``: one
    round, every chunk drawn once), from the spread of its draws; inf with fewer than
    ``ONE_ROUND_MIN_DRAWS`` draws (all ranks') or another number of rounds.

    Each draw is one chunk under its own noise: the draws' variance is the mean noise variance of a
    chunk plus the variance of the chunks' expected norms (law of total variance), so in expectation it
    exceeds the noise alone; a layer no gradient reaches has error 0.
    """
    sums = torch.zeros(len(names), 3, dtype=torch.float64)
    if len(history) == 1:
        values = history[0][1].double()
        sums[:, 0], sums[:, 1], sums[:, 2] = values.sum(1), values.square().sum(1), values.shape[1]
    if collective is not None:
        sums = collective.sum(sums)
    errors = {}
    for name, (total, squares, count) in zip(names, sums.tolist()):
        if total <= 0:
            errors[name] = 0.0 if count else math.inf
        elif count < max(ONE_ROUND_MIN_DRAWS, 2):
            errors[name] = math.inf
        else:
            mean = total / count
            variance = max(squares / count - mean * mean, 0.0) * count / (count - 1)
            errors[name] = 0.5 * math.sqrt(variance / count) / mean  # log C = 0.5 log C^2
    return errors


def _chunk_statistics(history: list[tuple[Tensor, Tensor]], chunks: int) -> tuple[Tensor, Tensor, Tensor]:
    """From the rounds' draws (``history``), every chunk's number of draws ``(chunks,)``, and per layer and
    chunk the mean of its draws' squared norms and their variance (unbiased; 0 with fewer than two draws),
    ``(layers, chunks)``."""
    rows = torch.cat([drawn for drawn, _ in history])
    values = torch.cat([totals for _, totals in history], dim=1)
    counts = torch.bincount(rows, minlength=chunks).double()
    means = values.new_zeros(values.shape[0], chunks).index_add_(1, rows, values) / counts.clamp_min(1)
    squares = values.new_zeros(values.shape[0], chunks).index_add_(1, rows, (values - means[:, rows]).square())
    variances = torch.where(counts >= 2, squares / (counts - 1).clamp_min(1), 0.0)
    return counts, means, variances


def _log_errors(
    names: list[str],
    history: list[tuple[Tensor, Tensor]],
    chunks: int,
    collective: Collective | None = None,
    *,
    one_draw_floor: bool = False,
) -> dict[str, float]:
    """Standard error of ``log C`` due to the noise, from the rounds' draws (``history``: per round, the
    chunks drawn and their squared gradient norms, ``(layers, draws)`` in the order of ``names``).

    Each chunk's noise variance is estimated across its own draws, and its mean's variance is that over
    its number of draws; with one round the error is unknown (inf). ``one_draw_floor``: a chunk drawn
    once has the relative variance of the chunks drawn more (pooled: their variances over their squared
    means, summed) times its mean squared. A
    layer no gradient reaches has rate 0 exactly (error 0). With a ``collective``, the chunks of all ranks
    count.
    """
    # per layer: the sum of the chunks' means and the sum of their means' variances
    sums = torch.zeros(len(names), 2, dtype=torch.float64)
    if history:
        counts, means, variances = _chunk_statistics(history, chunks)
        if one_draw_floor:  # the relative variance of the chunks drawn more often (of all ranks), pooled
            several = counts >= 2
            pooled = torch.stack([(variances * several).sum(1), (means.square() * several).sum(1)], dim=1)
            if collective is not None:
                pooled = collective.sum(pooled)
            typical = torch.where(pooled[:, 1] > 0, pooled[:, 0] / pooled[:, 1].clamp_min(1e-300), math.inf)
            variances = torch.where(counts == 1, typical.unsqueeze(1) * means.square(), variances)
        sums[:, 0] = means.sum(1)
        sums[:, 1] = (variances / counts.clamp_min(1)).sum(1)
    if collective is not None:
        sums = collective.sum(sums)
    errors = {}
    for name, (total, variance_sum) in zip(names, sums.tolist()):
        if total <= 0:
            errors[name] = 0.0
        elif len(history) < 2:
            errors[name] = math.inf
        else:
            errors[name] = 0.5 * math.sqrt(variance_sum) / total  # log C = 0.5 log C^2
    return errors


def _draw_weights(first_round: Tensor, collective: Collective | None = None) -> Tensor:
    """Every chunk's share of the draws after ``FULL_ROUNDS``, from the first round's squared norms
    ``(layers, chunks)``: its largest share of a layer's total (of all ranks' chunks), normalized over all
    ranks' chunks. Neyman's allocation (draws in proportion to a chunk's noise) with the noise taken in
    proportion to the chunk's norm. The first round's draws then stay out of the estimate: a chunk's number
    of draws must not depend on the draws its mean is taken from (a chunk whose draws happened to be low
    would get fewer draws, and keep its low mean: the estimate would be biased low)."""
    totals = first_round.sum(1, keepdim=True)
    if collective is not None:
        totals = collective.sum(totals)
    shares = (first_round / totals.clamp_min(1e-300)).amax(0)
    total_share = shares.sum().reshape(1)
    if collective is not None:
        total_share = collective.sum(total_share)
    return shares / total_share.clamp_min(1e-300)


def _next_draws(
    weights: Tensor,
    counts: Tensor,
    step: int,
    remaining: int,
    all_chunks: int,
    collective: Collective | None = None,
) -> list[int]:
    """The chunks to draw in the ``step``-th round after ``FULL_ROUNDS``, a chunk as many times as it gets
    draws: up to ``2^(step - 1)`` times ``all_chunks`` (all ranks') in all, its ``weights`` share of them (at
    least one), less the draws it has (``counts``; where that leaves none on any rank, the next step's), and
    at most the ``remaining`` draws of all ranks in all (shared in proportion, rounded down). With a
    collective, the budget is that of all ranks together: a rank whose samples weigh most takes draws the
    others do not need."""
    budget = collective.total(remaining) if collective is not None else remaining
    extra = torch.zeros_like(counts)
    while budget > 0 and step < 64:  # 2^63 draws: no budget gets there
        wanted = (weights * (2.0 ** (step - 1) * all_chunks)).ceil().clamp_min(1)
        extra = (wanted - counts).clamp_min(0)  # whole numbers
        requested = collective.total(int(extra.sum())) if collective is not None else int(extra.sum())
        if requested > 0:
            break
        step += 1
    else:
        return []
    if requested > budget:
        shares = extra * (budget / requested)
        extra = shares.floor()
        leftover = math.floor(float(shares.sum()) + 1e-9) - int(extra.sum())
        extra[(shares - extra).argsort(descending=True)[:leftover]] += 1
    return torch.arange(len(counts)).repeat_interleave(extra.long()).tolist()


class _ChunkSums:
    """The draws' squared norms per channel (``"channel"``) and per input slice (``"slices"``) of every
    layer, summed per chunk where chunks may be drawn unequally often (``per_chunk``), else over all chunks;
    and every chunk's number of draws."""

    def __init__(self, chunks: int, per_chunk: bool) -> None:
        self.per_chunk = per_chunk
        self.counts = torch.zeros(chunks, dtype=torch.float64)
        self.tables: dict[str, dict[str, Tensor]] = {"channel": {}, "slices": {}}

    def add(self, table: str, name: str, values: Tensor, rows: list[int]) -> None:
        """Add the norms ``values`` ``(draws, entries)`` of the chunks ``rows`` to layer ``name``'s sums."""
        store = self.tables[table]
        if self.per_chunk:
            if name not in store:
                store[name] = values.new_zeros(len(self.counts), values.shape[1])
            store[name].index_add_(0, torch.tensor(rows, device=values.device), values)
        else:
            total = values.sum(0)
            store[name] = store[name] + total if name in store else total

    def count(self, rows: list[int]) -> None:
        """One more draw of each chunk in ``rows`` (a chunk drawn twice is there twice)."""
        self.counts += torch.bincount(torch.tensor(rows, dtype=torch.long), minlength=len(self.counts)).double()

    def merged(self, other: _ChunkSums) -> _ChunkSums:
        """These sums and ``other``'s (of other rounds of the same chunks) together."""
        joined = _ChunkSums(len(self.counts), self.per_chunk)
        joined.counts = self.counts + other.counts
        for table, store in self.tables.items():
            for name, value in store.items():
                extra = other.tables[table].get(name)
                joined.tables[table][name] = value if extra is None else value + extra
        return joined

    def draws(self) -> int:
        """The draws made, over all chunks."""
        return int(self.counts.sum())

    def mean_over_chunks(self, table: str, name: str, collective: Collective | None = None) -> Tensor:
        """The sum over the chunks (of all ranks) of each chunk's mean norms, on the CPU."""
        value = self.tables[table][name]
        if self.per_chunk:
            local = (value / self.counts.to(value).clamp_min(1).unsqueeze(1)).sum(0)
        else:  # every chunk was drawn in every round
            local = value / self.counts.max().clamp_min(1).item()
        return (collective.sum(local) if collective is not None else local).cpu()
