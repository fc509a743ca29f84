"""Part 4 of the method: diagnostics (the reference's ``measure_stat``), model untouched."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn

from .distributed import ProcessGroupArg
from .initialize import check_attention_layout
from .inputs import Batch
from .options import DEFAULTS, DIAGNOSE_SEED, Options
from .rates import measure_change_rates
from .report import Diagnosis, LayerDiagnosis
from .safety import guarded
from .session import original_module, outside_caller_modes, start_session
from .stats import coefficient_of_variation
from .within import first_site_moments


@outside_caller_modes
def diagnose(
    model: nn.Module,
    data: Tensor | Iterable[Batch],
    *,
    seed: int | None = DIAGNOSE_SEED,
    samples: int = DEFAULTS.samples,
    sample_dim: int = DEFAULTS.sample_dim,
    forward: Callable[[nn.Module, Batch], Any] | None = DEFAULTS.forward,
    skip: Iterable[str] = DEFAULTS.skip,
    progress: bool = DEFAULTS.progress,
    rate_chunk_size: int = DEFAULTS.rates.chunk_size,
    rate_precision: float = DEFAULTS.rates.precision,
    rate_max_rounds: int = DEFAULTS.rates.max_rounds,
    process_group: ProcessGroupArg = DEFAULTS.process_group,
) -> Diagnosis:
    """Per-layer statistics of ``model`` on ``data``; the model is not changed.

    For every affine layer that the forward pass calls: the mean and std of
    each output channel, the coefficient of variation of those stds (output
    CV, 0 when every channel has the same scale), the layer's change rate
    ``C_k`` from back-propagated noise with its standard error, and
    the mean and coefficient of variation of the per-channel change rates.
    A well-initialized network has output CV near 0 and equal rates.

    Args:
        model: any ``nn.Module``.
        data: a batch or an iterable of batches, as for ``init_``.
        seed: seed of the noise draws (default 0: repeatable, torch's global RNG untouched);
            None uses torch's global RNG.
        samples, sample_dim, forward, skip, progress, rate_*, process_group: as for ``init_`` (statistics
            over all processes of the group, each on its own data).

    Example:
        >>> print(magicinit.diagnose(net, images))  # doctest: +SKIP
    """
    # the first statement: locals() holds the keywords alone; diagnose measures every layer, frozen or not
    keywords = {name: value for name, value in locals().items() if name not in ("model", "data")}
    options = Options.from_keywords({**keywords, "include_frozen": True})
    model = original_module(model)  # a torch.compile'd model shares its parameters with the module it wraps
    session = start_session(model, data, options)  # its tracing pass leaves the model as it was
    with guarded(model, session.snapshot):  # and so do the later ones: their forwards' buffer updates are put back
        notes = check_attention_layout(session.context, options.sample_dim, stacklevel=4)
        moments, layouts = first_site_moments(session.context, session.index, session.units)
        called = {name: unit for name, unit in session.units.items() if name in moments}
        rates = measure_change_rates(session.context, called, layouts, "magicinit: diagnose")
    layers = []
    for name, unit in called.items():
        channel_rate = rates.channel_rate[name]
        layers.append(
            LayerDiagnosis(
                name=name,
                type=unit.owner_type,
                channel_mean=moments[name].mean.tolist(),
                channel_std=moments[name].std.tolist(),
                output_cv=coefficient_of_variation(moments[name].std),
                rate=rates.rate[name],
                rate_log_error=rates.log_error[name],
                rate_mean=float(channel_rate.double().mean()),
                rate_cv=coefficient_of_variation(channel_rate),
            )
        )
    return Diagnosis(layers, rates.draws, notes)
