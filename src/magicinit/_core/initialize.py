"""The in-place entry points: ``init_`` (Parts 1 and 2) and ``rescale_`` (Part 2 only)."""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .between import NO_GRADIENT, BetweenResult, equalize_between
from .context import PassContext
from .distributed import ProcessGroupArg
from .graph import LayerGraph
from .inputs import Batch, batch_size, split_batch
from .operations import normalization_eps
from .options import DEFAULTS, Options
from .report import LayerReport, LayerStatus, Report
from .safety import ModelSnapshot, evaluating, guarded, restore_after_the_passes
from .samplers import Sampler, get_sampler
from .session import Session, original_module, outside_caller_modes, start_session
from .sites import WeightUnit, refreshed
from .stopwatch import Stopwatch
from .within import (
    FEW_VALUES_PER_CHANNEL,
    ON_TARGET,
    WithinLayerResult,
    after_may_differ,
    normalize_within,
    remeasure_after,
)

CALL = "call"  # the stopwatch's stage around a whole call: its own time is the report's "other"
OTHER = "other"


@outside_caller_modes
def init_(
    model: nn.Module,
    data: Tensor | Iterable[Batch],
    *,
    sampler: str | Sampler = DEFAULTS.sampler,
    within: bool = DEFAULTS.within,
    between: bool = DEFAULTS.between,
    beta: float = DEFAULTS.beta,
    seed: int | None = DEFAULTS.seed,
    samples: int = DEFAULTS.samples,
    sample_dim: int = DEFAULTS.sample_dim,
    forward: Callable[[nn.Module, Batch], Any] | None = DEFAULTS.forward,
    skip: Iterable[str] = DEFAULTS.skip,
    include_frozen: bool = DEFAULTS.include_frozen,
    progress: bool = DEFAULTS.progress,
    patch_budget_mb: float = DEFAULTS.patch_budget_mb,
    rate_chunk_size: int = DEFAULTS.rates.chunk_size,
    rate_precision: float = DEFAULTS.rates.precision,
    rate_max_rounds: int = DEFAULTS.rates.max_rounds,
    scale_mode: str = DEFAULTS.scaling.mode,
    scale_tolerance: float = DEFAULTS.scaling.tolerance,
    scale_max_rounds: int = DEFAULTS.scaling.max_rounds,
    verify_rates: bool = DEFAULTS.scaling.verify,
    across_normalization: bool = DEFAULTS.scaling.across_normalization,
    process_group: ProcessGroupArg = DEFAULTS.process_group,
) -> Report:
    r"""Data-dependent initialization of ``model``, in place (Krähenbühl et al., ICLR 2016).

    Part 1 (``within``) draws every affine layer's filters with ``sampler``
    and sets, for every output channel i of the layer's output z on the init
    data, :math:`W_i \leftarrow W_i / \sigma_i` and
    :math:`b_i \leftarrow \beta - \mu_i / \sigma_i`, so each channel has mean
    ``beta`` and std 1 (one forward pass in all). Part 2 (``between``) then
    rescales layers, keeping the network's function, so that their relative
    change rates :math:`C_k = \sqrt{E\|\nabla_{W_k} L\|^2 / \|W_k\|^2}` under
    back-propagated Gaussian noise are as equal as the graph allows.
    A normalization layer (batch, layer, group, instance, RMS norm) fixes the
    scale of its input unless ``across_normalization``: then its ``eps`` and
    running statistics are scaled with that input, so train- and eval-mode
    outputs are kept.

    Args:
        model: any ``nn.Module``; every weight its forward applies by convolution, transposed
            convolution, linear map, ``addmm`` or matrix product is initialized (an affine site:
            conv and linear modules, attention's projections, ``F.linear`` in your own code, ...).
        data: a batch (tensor, ``(inputs, targets)`` tuple, dict) or an iterable of batches.
        sampler: how filters are first drawn: ``"gaussian"``, ``"orthogonal"``, ``"keep"`` (the
            present weights), or from the layer's input patches: ``"pca"``, ``"zca"``,
            ``"kmeans"`` (= ``"kmeans-reference"``, the authors' construction), ``"kmeans-full"``,
            ``"patches"`` (see docs/method.md, Part 3); a name added with
            ``register_sampler``, or a callable ``(SamplerRequest) -> filters``.
        within: run Part 1.
        between: run Part 2.
        beta: target mean of every channel after Part 1 (the reference's ``-b``, 0.1 there).
        seed: same seed, model and data give bit-identical weights (across CPU thread counts: see
            docs/guide.md); None uses torch's global RNG.
        samples: at most this many samples of ``data`` are used.
        sample_dim: the dimension of each input tensor that indexes samples: 1 for torch's
            sequence-first transformer layers (``batch_first=False``, inputs ``(L, N, E)``), so that
            ``samples`` caps sequences, not positions. A 1-dimensional tensor (labels) has its samples
            along its only dimension; a 0-dimensional one is not split.
        forward: ``forward(model, batch) -> output`` for models with other inputs.
        skip: qualified module or parameter names (or module prefixes) whose weights are left as they are.
        include_frozen: also initialize layers whose weight has ``requires_grad=False``.
        progress: show tqdm progress bars.
        patch_budget_mb: memory one layer's patch matrix may take (data-driven samplers, which
            draw 128 random patches per filter, fewer if over budget).
        rate_chunk_size: samples per noise draw when estimating change rates.
        rate_precision: target standard error of each ``log C_k``.
        rate_max_rounds: at most the draws of this many passes over the data per rate estimate.
        scale_mode: ``"exact"`` (Part 2 keeps the function to rounding; an operation that is not
            homogeneous fixes the scales around it) or ``"approximate"`` (operations homogeneous
            on the init data within ``scale_tolerance``, such as LRN at small activations, are
            rescaled across too, in damped rounds; the report gives the output change beyond
            one global factor, and which operations were treated so).
        scale_tolerance: largest relative deviation ``||f(r x) - r f(x)|| / ||r f(x)||`` (r = 1/2
            and 2, on the init data) of an operation treated as homogeneous in ``"approximate"`` mode,
            and the largest output change beyond one global factor its rounds may cause.
        scale_max_rounds: at most this many rounds of measure, solve and apply in ``"approximate"`` mode.
        verify_rates: measure the change rates again after an exact rescaling; by default the
            report's rates after Part 2 are predicted (each measured rate times its layer's known
            factor), which saves a second measurement.
        across_normalization: also rescale the layers whose outputs a normalization layer
            normalizes (scaling its ``eps`` and running statistics to match). Off by default:
            those layers' rates are then free, and Part 2 would set them to what the other
            layers allow (in a batch-norm CNN, the head's), which slowed training in
            ``bench/train.py --experiment batch-norm``.
        process_group: the ``torch.distributed`` processes that initialize this model together,
            each on its own shard of the data: every statistic is reduced over them and all end
            with bit-identical weights (``samples`` is per process). ``"default"``: the default
            group if ``torch.distributed`` is initialized; None: this process alone.

    Returns:
        A ``Report``: ``print(report)`` shows a table, ``report.to_dict()`` is JSON-able.

    Raises:
        MagicInitError: bad arguments, data or model; the model is then exactly as before.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 10))
        >>> report = magicinit.init_(net, torch.randn(64, 3, 16, 16), seed=0)
    """
    # the first statement: locals() holds the keywords alone
    options = Options.from_keywords({name: value for name, value in locals().items() if name not in ("model", "data")})
    return _initialize(model, data, options)


@outside_caller_modes
def rescale_(
    model: nn.Module,
    data: Tensor | Iterable[Batch],
    *,
    seed: int | None = DEFAULTS.seed,
    samples: int = DEFAULTS.samples,
    sample_dim: int = DEFAULTS.sample_dim,
    forward: Callable[[nn.Module, Batch], Any] | None = DEFAULTS.forward,
    skip: Iterable[str] = DEFAULTS.skip,
    include_frozen: bool = DEFAULTS.include_frozen,
    progress: bool = DEFAULTS.progress,
    rate_chunk_size: int = DEFAULTS.rates.chunk_size,
    rate_precision: float = DEFAULTS.rates.precision,
    rate_max_rounds: int = DEFAULTS.rates.max_rounds,
    scale_mode: str = DEFAULTS.scaling.mode,
    scale_tolerance: float = DEFAULTS.scaling.tolerance,
    scale_max_rounds: int = DEFAULTS.scaling.max_rounds,
    verify_rates: bool = DEFAULTS.scaling.verify,
    across_normalization: bool = DEFAULTS.scaling.across_normalization,
    process_group: ProcessGroupArg = DEFAULTS.process_group,
) -> Report:
    """Part 2 only, in place: equalize the change rates of a (trained) model, keeping its function.

    For fine-tuning a pre-trained network: the layers are rescaled as in
    ``init_(..., within=False)``; outputs stay the same up to rounding (in the
    default ``scale_mode="exact"``). The arguments are those of ``init_``. By
    default a layer before a normalization keeps its scale (in a ResNet, most
    layers); ``across_normalization=True`` rescales those too. bench/finetune.py
    measures ``rescale_`` on a pre-trained plain CNN without normalization.

    Example:
        >>> report = magicinit.rescale_(pretrained, loader, seed=0)  # doctest: +SKIP
        >>> print(report)  # doctest: +SKIP
    """
    keywords = {name: value for name, value in locals().items() if name not in ("model", "data")}  # the first statement
    return _initialize(model, data, Options.from_keywords({**keywords, "within": False, "between": True}))


def _initialize(model: nn.Module, data: Tensor | Iterable[Batch], options: Options) -> Report:
    """Parts 1 and 2 as ``options`` say (checked), and the report. Whatever ends the call with an exception,
    ``KeyboardInterrupt`` included, leaves the model as it was: after the passes too (a Ctrl-C deferred
    while buffers are put back, or arriving while the report is built), the model is put back from the
    snapshot the passes started from (``restore_after_the_passes``)."""
    model = original_module(model)  # a torch.compile'd model shares its parameters with the module it wraps
    chosen_sampler = get_sampler(options.sampler)
    stopwatch = Stopwatch()
    snapshot: ModelSnapshot | None = None  # of the model before the passes, once they start
    units: list[WeightUnit] = []
    try:
        with stopwatch.stage(CALL):  # its own time: the snapshots and restores, bookkeeping
            session = start_session(model, data, options, stopwatch)
            units = list(session.all_units.values())
            within_results: dict[str, WithinLayerResult] = {}
            between_result = None
            # buffers put back at the end
            with refreshed(model, units), guarded(model, session.snapshot) as snapshot:
                session.notes.extend(check_attention_layout(session.context, options.sample_dim, stacklevel=5))
                if options.within:
                    with stopwatch.stage("within"):
                        within_results = normalize_within(
                            session.context,
                            session.index,
                            session.units,
                            chosen_sampler,
                            beta=options.beta,
                            patch_budget_bytes=int(options.patch_budget_mb * 2**20),
                        )
                        # what the report gives as "after": the output with the final Part 1 weights, where it may
                        # differ from what each layer gave at its own normalization (a bias shared with a later
                        # layer)
                        if after_may_differ(within_results):
                            remeasure_after(session.context, session.index, session.units, within_results)
                if options.between:
                    with stopwatch.stage("between"):
                        constant = {
                            name for name, r in within_results.items() if len(r.zero_variance) == r.scale.numel()
                        }
                        between_result = _between(session, constant)
                        # running statistics Part 2 scaled on purpose stay; every other buffer is put back
                        # (safety.guarded)
                        snapshot.keep_buffers_of(model.get_submodule(name) for name in between_result.normalizations)
        settings = {**options.settings(), **_count_samples(session)}
        return _build_report(session, settings, within_results, between_result, stopwatch)
    except BaseException:
        if snapshot is not None:
            restore_after_the_passes(model, snapshot, units)
        raise


def _seconds(stopwatch: Stopwatch) -> tuple[dict[str, float], dict[str, float]]:
    """``Report.seconds`` and ``Report.between_seconds`` from the call's stopwatch."""
    seconds = {**stopwatch.children(CALL), OTHER: stopwatch.exclusive.get(CALL, 0.0)}
    between = {}
    if "between" in stopwatch.inclusive:
        between = {**stopwatch.children("between"), OTHER: stopwatch.exclusive["between"]}
    return seconds, between


def _between(session: Session, constant: set[str]) -> BetweenResult:
    """Part 2 on the session; layers left alone and layers constant on the data stay fixed."""
    fixed = {name for name in session.all_units if name not in session.units} | constant
    writable = {name: unit for name, unit in session.all_units.items() if unit.read_only is None}
    result = equalize_between(session.context, writable, session.graph, fixed, session.index)
    for name in constant:
        result.excluded[name] = "constant on the init data: its change rate means nothing"
    return result


def check_attention_layout(context: PassContext, sample_dim: int, stacklevel: int) -> list[str]:
    """A warning (and the same note, returned) where the data's ``sample_dim`` is not what the model's
    ``nn.MultiheadAttention`` layers take as samples; no note where it is, or where that cannot be told.

    The model runs on one init sample (grad on: torch's fast paths for attention, which skip the module's
    forward, need it off); a layer that then gets a 3-dimensional query with one sequence position and a
    batch of several (along its ``batch_first`` dimension) was handed positions as samples: the sample
    dimension cut its sequences (torch's transformer layers take ``(L, N, E)`` by default, whose
    dimension 0 a default ``sample_dim=0`` reads as samples). ``stacklevel``: the warning's, from here
    to the user's call.
    """
    model = context.model
    attentions = {name: module for name, module in model.named_modules() if isinstance(module, nn.MultiheadAttention)}
    if not attentions:
        return []
    queries: dict[str, tuple[int, ...]] = {}

    def recorder(name: str) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]:
        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            query = args[0] if args else kwargs.get("query")
            if isinstance(query, Tensor) and query.dim() == 3:
                queries.setdefault(name, tuple(query.shape))

        return record

    handles = [
        module.register_forward_pre_hook(recorder(name), with_kwargs=True) for name, module in attentions.items()
    ]
    try:
        with evaluating(model), torch.enable_grad():
            context.run(split_batch(context.batch, 0, 1))
    finally:
        for handle in handles:
            handle.remove()
    for name, shape in queries.items():
        batch_first = attentions[name].batch_first
        batch_dim = 0 if batch_first else 1
        if shape[batch_dim] == 1 or shape[1 - batch_dim] != 1:
            continue
        remedy = (
            f"pass sample_dim={1 - sample_dim}"
            if sample_dim in (0, 1)
            else "pass as sample_dim the dimension of each input tensor that indexes samples"
        )
        note = (
            f"nn.MultiheadAttention '{name}' (batch_first={batch_first}) got a query of shape {shape} from one "
            f"init sample: a sequence of one position in a batch of {shape[batch_dim]}, so sample_dim={sample_dim} "
            "is not the data's sample dimension: sequences were cut to 'samples' positions and positions "
            f"counted as samples; {remedy} (torch's transformer layers take (L, N, E) unless batch_first=True)"
        )
        warnings.warn(f"magicinit: {note}", UserWarning, stacklevel=stacklevel)
        return [note]
    return []


def _count_samples(session: Session) -> dict[str, int]:
    """Samples used, over all processes, and how many processes there were (report settings);
    with several processes, a note says so."""
    collective = session.context.collective
    used, processes = batch_size(session.context.batch), 1
    if collective is not None:
        used, processes = collective.total(used), collective.size
        session.notes.append(f"statistics over {processes} processes, {used} samples in all")
    return {"samples_used": used, "processes": processes}


def _add_weight_facts(
    session: Session,
    entry: LayerReport,
    within: WithinLayerResult | None,
    pinned: LayerGraph,
    bias_users: dict[str, list[str]],
) -> None:
    """Notes on how the weight is held and used: other names, reparametrization, a bias shared with
    other layers (``bias_users``: the layers Part 1 set each bias parameter for, in order), several
    sites, and what fixes its scales in ``pinned`` (the graph Part 2 used last)."""
    unit = session.all_units[entry.name]
    if unit.aliases:
        entry.notes.append(f"the same parameter is also registered as {', '.join(unit.aliases)}")
    if unit.kind in ("weight_norm", "prune") and entry.status in (LayerStatus.INITIALIZED, LayerStatus.RESCALED):
        entry.notes.append(f"{unit.kind}: written through {' and '.join(unit.parameters)}")
    bias = within.bias if within is not None else None
    sharing = bias_users.get(bias, []) if bias is not None else []
    if len(sharing) > 1:
        others = ", ".join(f"'{name}'" for name in sharing if name != entry.name)
        last = sharing[-1]
        entry.notes.append(
            f"its bias '{bias}' is also the bias of {others}: Part 1 set it for each in turn, last for "
            + (
                "this layer"
                if last == entry.name
                else f"'{last}', so this layer's channel means are no longer beta (see its figures after)"
            )
        )
    graph = session.graph
    if entry.name not in graph.sites:
        return
    calls = graph.calls[entry.name]  # counted on the tracing probe (2 samples)
    normalized = within.sites if within is not None else 0
    if calls > 1 and normalized == calls:
        entry.notes.append(
            f"used at {calls} affine sites per forward, each on its own part of the weight: all normalized, "
            "their channels listed in site order"
        )
    elif calls > 1 and normalized:
        entry.notes.append(
            f"used at {calls} affine sites per forward: Part 1 normalized {normalized} (the first use of each part "
            f"of the weight); the other {calls - normalized} are not normalized (their outputs are what this weight "
            "gives there)"
        )
    elif calls > 1:
        entry.notes.append(f"used at {calls} affine sites per forward")
    if entry.name not in pinned.sites:  # Part 2's last trace (on more samples) took another path
        pinned = graph
    entry.input_scale_fixed_by, entry.output_scale_fixed_by = pinned.pinned_by(entry.name)
    if entry.name in pinned.input_parts and pinned.has_free_slices(entry.name):
        sizes = pinned.input_parts[entry.name].sizes
        entry.notes.append(
            f"its input is a concatenation of {len(sizes)} slices ({'+'.join(map(str, sizes))} channels): "
            "Part 2 may scale each slice, and the matching input channels of this weight, apart"
        )
    usual = {"model input", "model output"}
    if entry.input_scale_fixed_by and entry.input_scale_fixed_by not in usual:
        entry.notes.append(f"input scale fixed by {entry.input_scale_fixed_by}")
    if entry.output_scale_fixed_by and entry.output_scale_fixed_by not in usual:
        entry.notes.append(f"output scale fixed by {entry.output_scale_fixed_by}")


def _add_within_facts(session: Session, entry: LayerReport, within: WithinLayerResult, beta: float) -> None:
    """Notes on what Part 1 did at the layer and what its output measured afterwards: constant channels,
    channels off target (``WithinLayerResult.off_target``), too few values per channel."""
    constant, channels = within.zero_variance, within.scale.numel()
    mean = ", its bias set to beta" if within.mean_set else ""
    if within.constant:
        weight = session.all_units[entry.name].tensor(session.context.model)
        if not bool(weight.detach().any()):
            entry.notes.append(
                f"every channel ({channels}) constant on the init data because its weight is all zero: not "
                f"normalized: the weight stays zero{mean}; Part 2 holds it fixed"
            )
        else:
            entry.notes.append(
                f"every channel ({channels}) constant on the init data (its input is: a dead unit upstream, or "
                f"constant data): not normalized: its filters are scaled to unit norm{mean}; Part 2 holds it fixed"
            )
    elif constant:
        entry.notes.append(
            f"{len(constant)} of {channels} channel(s) constant on the init data (first: {constant[:8]}): not "
            f"normalized, given the median scale of the other channels{' and mean beta' if within.mean_set else ''}"
        )
    off_target = within.off_target(beta)
    if off_target is not None:
        entry.notes.append(off_target)
    if within.values_per_channel < FEW_VALUES_PER_CHANNEL:
        entry.notes.append(
            f"only {within.values_per_channel} value(s) per channel on the init data (samples times positions), "
            f"fewer than {FEW_VALUES_PER_CHANNEL}: its channel statistics stand for little; pass more samples"
        )


def _summarize_within(report: Report, within_results: dict[str, WithinLayerResult]) -> None:
    """One note, and one warning, for each kind of Part 1 result that needs a look: layers constant in
    every channel, layers off target after Part 1, layers with too few values per channel."""
    beta = report.settings["beta"]
    constant = [name for name, result in within_results.items() if result.constant]
    off_target = [name for name, result in within_results.items() if result.off_target(beta) is not None]
    few = [name for name, result in within_results.items() if result.values_per_channel < FEW_VALUES_PER_CHANNEL]
    kinds = {
        "are constant in every channel on the init data, so not normalized (status 'constant'; their notes "
        "say why)": constant,
        f"are off target after Part 1: re-measured with the final weights, a channel's std is outside "
        f"[{ON_TARGET.std_low:g}, {ON_TARGET.std_high:g}] or its mean more than {ON_TARGET.mean:g} from beta "
        "(their notes give the worst channels)": off_target,
        f"were measured on fewer than {FEW_VALUES_PER_CHANNEL} values per channel (samples times positions): "
        "their statistics stand for little; pass more samples": few,
    }
    for what, names in kinds.items():
        if names:
            listed = ", ".join(f"'{name}'" for name in names[:5]) + (", ..." if len(names) > 5 else "")
            message = f"{len(names)} layer(s) ({listed}) {what}"
            report.notes.append(message)
            # stacklevel: here, _build_report, _initialize, init_ and its wrapper, then the user's call
            warnings.warn(f"magicinit: {message}", UserWarning, stacklevel=6)


LEFT_ALONE = (
    LayerStatus.EXCLUDED,
    LayerStatus.NEVER_CALLED,
    LayerStatus.FIXED,
    LayerStatus.CONSTANT,
    LayerStatus.UNCHANGED,
)


def _summarize_left_alone(report: Report) -> None:
    """Where most layers were left as they were (``LEFT_ALONE``), a note that counts them by reason."""
    left = [layer for layer in report.layers if layer.status in LEFT_ALONE]
    if 2 * len(left) <= len(report.layers) or not (report.settings["within"] or report.settings["between"]):
        return
    reasons = Counter(_left_alone_reason(layer) for layer in left)
    counted = ", ".join(f"{count} {reason}" for reason, count in reasons.most_common())
    report.notes.append(f"{len(left)} of {len(report.layers)} layers were left as they were: {counted}")


def _left_alone_reason(layer: LayerReport) -> str:
    """A short reason for a layer left alone: its status, or for an excluded one its note's first words."""
    if layer.status != LayerStatus.EXCLUDED or not layer.notes:
        return str(layer.status)
    reason = layer.notes[0]
    for end in (":", " (", ",", " in '"):
        reason = reason.split(end, 1)[0]
    return reason


def _build_report(
    session: Session,
    settings: dict[str, Any],
    within_results: dict[str, WithinLayerResult],
    between_result: BetweenResult | None,
    stopwatch: Stopwatch,
) -> Report:
    """The report: one entry per affine layer of the model, in registration order, the call's notes and where
    its time went (``stopwatch``)."""
    layers = []
    called = session.graph.calls
    model = session.context.model
    pinned = between_result.graph if between_result is not None and between_result.graph else session.graph
    bias_users: dict[str, list[str]] = {}  # each bias parameter Part 1 set, and for which layers (in order)
    for name, normalized in within_results.items():
        if normalized.bias is not None:
            bias_users.setdefault(normalized.bias, []).append(name)
    for name, unit in session.all_units.items():
        result = within_results.get(name)
        entry = LayerReport(
            name=name,
            type=unit.owner_type,
            shape=tuple(unit.tensor(model).shape),
            calls=called.get(name, 0),
            status=_status(session, name, result, between_result),
        )
        if entry.status == LayerStatus.EXCLUDED:
            entry.notes.append(session.excluded[name])
        elif entry.status == LayerStatus.NEVER_CALLED:
            entry.notes.append("never called in forward: left as is")
        elif entry.status == LayerStatus.UNCHANGED:
            entry.notes.append(
                "Part 1 did not reach it on the init data (the tracing probe called it): left as is"
                if settings["within"]
                else "left as is: within=False and between=False"
            )
        if result is not None:
            entry.channel_mean_before = result.before.mean.tolist()
            entry.channel_std_before = result.before.std.tolist()
            entry.channel_mean_after = result.after.mean.tolist()
            entry.channel_std_after = result.after.std.tolist()
            entry.zero_variance_channels = result.zero_variance
            entry.notes.extend(result.notes)
            _add_within_facts(session, entry, result, settings["beta"])
        _add_weight_facts(session, entry, result, pinned, bias_users)
        if between_result is not None and between_result.before is not None and name in between_result.before.rate:
            entry.rate_before = between_result.before.rate[name]
            entry.rate_before_log_error = between_result.before.log_error[name]
            if between_result.after is not None:
                entry.rate_after = between_result.after.rate[name]
                entry.rate_after_log_error = between_result.after.log_error[name]
            entry.weight_scale = between_result.weight_factor.get(name)
        if between_result is not None and name in between_result.excluded:  # with rates measured or not
            entry.notes.append(f"not equalized: {between_result.excluded[name]}")
        layers.append(entry)
    seconds, between_seconds = _seconds(stopwatch)
    report = Report(layers, settings, list(session.notes), seconds=seconds, between_seconds=between_seconds)
    if not settings["within"] and not settings["between"]:
        report.notes.append("within=False and between=False: nothing was measured or changed")
    _summarize_within(report, within_results)
    _summarize_left_alone(report)
    if between_result is not None:
        _add_between_facts(report, between_result, settings, model)
    return report


def _add_between_facts(report: Report, between: BetweenResult, settings: dict[str, Any], model: nn.Module) -> None:
    """Part 2's summary: rate spreads, output change, compensated normalizations, approximations, notes."""
    if between.nothing_to_do is not None:
        report.notes.append(f"Part 2 changed nothing: {between.nothing_to_do}")
        return
    assert between.before is not None
    report.output_change = between.function_change
    report.output_scale = between.output_scale
    report.output_change_beyond_scale = between.change_beyond_scale
    report.normalizations = {
        name: {"input_factor": factor, "eps": normalization_eps(model.get_submodule(name))}
        for name, factor in between.normalizations.items()
    }
    report.approximated = dict(between.approximated)
    report.scale_rounds = between.rounds
    report.rate_measurements = between.measurements
    report.rate_spread_before = _spread(between.before.rate, between.equalized)
    if between.after is not None:
        report.rate_spread_after = _spread(between.after.rate, between.equalized)
    if between.instead_of_approximate is not None:
        report.notes.append(between.instead_of_approximate)
    if settings.get("scale_mode") == "approximate" and not between.exact_instead:
        report.notes.append(
            f"scale_mode='approximate': {between.rounds} rescaling round(s), change rates from "
            f"{between.before.draws} noise draws per measurement, {between.measurements} measurement(s) "
            f"({between.before.method}); the output changed by "
            f"{between.change_beyond_scale:.1e} (relative) beyond a global factor of {between.output_scale:.4g}"
        )
        if between.approximated:
            listed = ", ".join(f"{op} ({deviation:.1e})" for op, deviation in between.approximated.items())
            report.notes.append(f"treated as homogeneous on the init data (largest deviation): {listed}")
        if between.limited:
            report.notes.append(f"the rounds stopped early: {between.limited}")
    else:
        report.notes.append(
            f"change rates from {between.before.draws} noise draws in {between.before.rounds} round(s) "
            f"(chunks of {settings['rate_chunk_size']} samples; {between.before.method}); the rescaling changed "
            "the output by "
            f"{between.function_change:.1e} (relative, rounding)"
        )
    if between.after_predicted:
        report.notes.append(
            "rates after Part 2: predicted from the exact rescaling (each measured rate times its layer's known "
            "factor), not measured again; verify_rates=True measures them"
        )
    report.rates_after_predicted = between.after_predicted
    if between.normalizations:
        report.notes.append(
            f"{len(between.normalizations)} normalization layer(s) had their input rescaled, with eps (and running "
            f"statistics) scaled to match, so their output is unchanged. {EPS_NOT_IN_STATE_DICT}"
        )
    if between.reverted:
        report.notes.append(f"Part 2 was not kept: {between.not_kept or 'it would change the network output'}")


EPS_NOT_IN_STATE_DICT = (
    "eps is a module attribute, not in state_dict(): keep the model object, or after load_state_dict set each "
    "module's eps from report.normalizations"
)


def _status(
    session: Session, name: str, within: WithinLayerResult | None, between: BetweenResult | None
) -> LayerStatus:
    """What happened to layer ``name``, from what Parts 1 and 2 did."""
    if name in session.excluded:
        return LayerStatus.EXCLUDED
    if within is not None:  # before the graph's word: the probe may take another path than all the data
        return LayerStatus.CONSTANT if within.constant else LayerStatus.INITIALIZED
    if name not in session.graph.sites:
        return LayerStatus.NEVER_CALLED
    if between is None:  # no Part 2, and Part 1 did not run or did not reach it
        return LayerStatus.UNCHANGED
    if not between.reverted and name in between.changed:
        return LayerStatus.RESCALED
    if between.nothing_to_do is not None and between.nothing_to_do != NO_GRADIENT:  # (rates of 0 were measured)
        return LayerStatus.FIXED
    return LayerStatus.MEASURED


def _spread(rates: dict[str, float], names: list[str]) -> float | None:
    values = [rates[n] for n in names if n in rates and rates[n] > 0 and math.isfinite(rates[n])]
    return max(values) / min(values) if values else None
