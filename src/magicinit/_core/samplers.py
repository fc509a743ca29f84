"""Part 3 of the method: how a layer's filters are first drawn.

A sampler is a function ``(request) -> filters`` that returns a floating
tensor of shape ``request.shape == (groups, out_per_group, fan_in)``. Part 1
then rescales and shifts every output channel, so a sampler only chooses the
filters' directions. Samplers are looked up by name in ``SAMPLERS`` (a
read-only view); ``register_sampler`` adds one, and refuses to replace a name
unless asked; ``init_(sampler=...)`` also takes a callable directly.

The random samplers (gaussian, orthogonal) ignore the data. The data-driven
ones (pca, zca, kmeans, patches) draw each group's filters from the patches of
the layer's own input in the Part 1 pass, that is after all earlier layers
are initialized: the patches are centred and whitened (PCA), and

- ``pca``: the top principal directions, scaled by ``1/sqrt(eigenvalue)`` (regularized: see
  ``WHITENING_EPSILON``);
- ``zca``: rows of the ZCA whitening transform restricted to the top directions;
- ``kmeans``: k-means centroids of the whitened, unit-length patches, one per
  output channel, mapped back through the whitening; ``kmeans-reference`` (what
  ``kmeans`` means) whitens onto the top directions and runs Euclidean mini-batch
  k-means, as the authors' implementation did; ``kmeans-full`` whitens at full
  rank (regularized) and runs spherical k-means;
- ``patches``: randomly chosen whitened, unit-length patches, mapped back.

Where a layer has no patches (transposed convolutions) or fewer patches than
output channels, they fall back to ``gaussian`` and say so in the report.
Random draws use ``request.generator`` on the CPU (indices and noise are then
copied to the layer's device), so that one seed gives the same weights.

A data-driven sampler of one's own is built from the same public parts as the
built-in ones: ``layer_patches`` (a random subset of the layer's input
patches), ``patch_whitening`` (their PCA whitening, ``PatchWhitening``, reduced
over the processes) and ``DataDrivenSampler``, which turns a function of the
request and the whitening into a sampler with the fallbacks above; with
several processes the request's ``collective`` is a ``SamplerCollective``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .distributed import SamplerCollective
from .errors import MagicInitError

PATCH_BUDGET_MB = 500.0  # default memory of one layer's patch matrix (the reference's default)
PATCHES_PER_FILTER = 128  # default patches drawn per output channel of a group (at least 4 x fan_in)


@dataclass(frozen=True)
class SamplerRequest:
    """What a sampler may look at to draw one layer's filters.

    Attributes:
        name: the weight's name in the report (the layer's qualified module name for a
            conv or linear module, else the parameter's name).
        module: the module that holds the weight (the layer itself for a conv or linear module).
        shape: ``(groups, out_per_group, fan_in)``, the shape to return.
        current: the layer's present filters (float32, CPU).
        layer_input: ``(input,)``: what the site's weight is applied to on the init data,
            with all earlier layers already initialized (for samplers that draw filters
            from the data).
        generator: the random generator to draw from (None: torch's global one).
        patch_budget_bytes: memory the layer's patch matrix may take (float32); more
            patches are subsampled at random.
        progress: show a progress bar for iterative samplers.
        notes: where a sampler says what it did differently (shown in the report).
        collective: the processes that initialize the model together, each with its own
            data (None: this one alone); a data-driven sampler reduces its statistics over
            them (see ``SamplerCollective``) and must return the same filters on every rank.
        input_patches: ``input_patches(x)`` gives the patches each filter sees in input ``x``,
            ``(groups, patches, fan_in)`` (a convolution's receptive fields, a linear map's
            input rows), or None where the site has none (transposed convolutions).
    """

    name: str
    module: nn.Module
    shape: torch.Size
    current: Tensor
    layer_input: tuple[Any, ...]
    generator: torch.Generator | None
    patch_budget_bytes: int = int(PATCH_BUDGET_MB * 2**20)
    progress: bool = False
    notes: list[str] = field(default_factory=list)
    collective: SamplerCollective | None = None
    input_patches: Callable[[Tensor], Tensor | None] = lambda layer_input: None

    def own_data_generator(self) -> torch.Generator | None:
        """The generator for draws over this process's own data (subsets of its patches).

        It is ``generator`` itself for a single process; with several, one forked
        per rank, so that ``generator`` advances alike on every rank however
        much data each holds.
        """
        if self.collective is None or self.generator is None:
            return self.generator
        return self.collective.fork(self.generator)


Sampler = Callable[[SamplerRequest], Tensor]

_REGISTERED: dict[str, Sampler] = {}  # the registry: written only by register_sampler
SAMPLERS: Mapping[str, Sampler] = MappingProxyType(_REGISTERED)
"""The registered samplers by name: a read-only view (``register_sampler`` adds to it)."""


def register_sampler(name: str, *, replace: bool = False) -> Callable[[Sampler], Sampler]:
    """Decorator that adds a sampler to the registry (``SAMPLERS``) under ``name``.

    A sampler is ``sampler(request: SamplerRequest) -> Tensor``, returning
    filters of shape ``request.shape`` (Part 1 then normalizes them).

    Args:
        name: the name ``init_(sampler=name)`` then takes.
        replace: replace a sampler already registered under ``name`` (a built-in one
            included); without it, a name already taken is a ``MagicInitError``.

    Example:
        >>> @magicinit.register_sampler("uniform")
        ... def uniform(request: magicinit.SamplerRequest) -> torch.Tensor:
        ...     return torch.rand(request.shape, generator=request.generator) - 0.5
    """
    if not isinstance(name, str) or not name:
        raise MagicInitError(f"register_sampler: the name must be a non-empty str, got {name!r}")

    def add(sampler: Sampler) -> Sampler:
        if not callable(sampler):
            raise MagicInitError(f"register_sampler({name!r}): {type(sampler).__name__} is not callable")
        if name in _REGISTERED and not replace:
            raise MagicInitError(
                f"register_sampler({name!r}): a sampler is already registered under that name "
                f"({sampler_name(_REGISTERED[name])}); choose another name, or pass replace=True to replace it"
            )
        _REGISTERED[name] = sampler
        return sampler

    return add


def get_sampler(sampler: str | Sampler) -> Sampler:
    """The sampler registered as ``sampler``, or ``sampler`` itself if it is callable.

    An unknown name is a ``MagicInitError`` that lists the known names.
    """
    if callable(sampler):
        return sampler
    if isinstance(sampler, str) and sampler in SAMPLERS:
        return SAMPLERS[sampler]
    known = ", ".join(sorted(SAMPLERS))
    raise MagicInitError(
        f"sampler={sampler!r} is not known; choose one of: {known}, or pass a callable(request) -> filters"
    )


def sampler_name(sampler: str | Sampler) -> str:
    """How the report names ``sampler``: its registered name, or a callable's qualified name
    (a ``DataDrivenSampler``'s: its draw function's, with ``patches_per_filter`` where not the default)."""
    if isinstance(sampler, str):
        return sampler
    if not isinstance(sampler, DataDrivenSampler):
        return _qualified_name(sampler)
    if sampler.patches_per_filter == PATCHES_PER_FILTER:
        return _qualified_name(sampler.draw)
    return f"{_qualified_name(sampler.draw)}(patches_per_filter={sampler.patches_per_filter})"


def _qualified_name(function: Callable[..., Any]) -> str:
    return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', type(function).__name__)}"


@register_sampler("gaussian")
def gaussian(request: SamplerRequest) -> Tensor:
    """I.i.d. standard normal filters (the reference's ``elwise``)."""
    return torch.randn(request.shape, generator=request.generator)


@register_sampler("orthogonal")
def orthogonal(request: SamplerRequest) -> Tensor:
    """Orthonormal filters within each group (rows, or columns when there are more rows).

    Drawn as the Q factor of a Gaussian matrix with the signs of R's diagonal
    folded in, which makes Q uniformly (Haar) distributed. The QR runs on one
    thread (``one_intraop_thread``): LAPACK's blocked QR gives other last bits
    with other thread counts, and one seed gives the same filters with any.
    """
    groups, rows, cols = request.shape
    tall = rows >= cols
    gaussian_matrix = torch.randn(groups, max(rows, cols), min(rows, cols), generator=request.generator)
    with one_intraop_thread():
        q, r = torch.linalg.qr(gaussian_matrix)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    return q if tall else q.transpose(-2, -1)


@functools.cache
def _openmp_backend() -> bool:
    """Whether torch runs its intra-op parallel work on OpenMP (where the thread count is the calling
    thread's own setting, and may change at any time)."""
    return "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()


@contextmanager
def one_intraop_thread() -> Iterator[None]:
    """Run a block with torch's intra-op threads (``torch.set_num_threads``) set to one, and put back after,
    however it ends: for a LAPACK call whose last bits depend on the thread count (``torch.linalg.qr``).

    Why this is safe: with the OpenMP backend (torch's CPU builds; the only one where it is done) the count
    may be set at any time, and ``omp_set_num_threads`` sets the calling thread's own OpenMP count; the
    ``finally`` puts torch's count back (and MKL's with it, as every ``torch.set_num_threads`` call does).
    At worst, torch work that other Python threads run meanwhile runs on fewer threads: slower, not
    different. With another backend, where the count can only be set before any parallel work, or with
    one thread already, the block runs as it is.
    """
    threads = torch.get_num_threads()
    if threads == 1 or not _openmp_backend():
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@register_sampler("keep")
def keep(request: SamplerRequest) -> Tensor:
    """The weights the layer already has; Part 1 then only rescales and shifts them."""
    return request.current.clone()


# --- data-driven samplers ------------------------------------------------------

KMEANS_ITERATIONS = 20  # at most; k-means stops earlier once it has settled
KMEANS_SETTLED = 1e-3  # settled: at most this fraction of the patches changed cluster in an iteration
KMEANS_SEEDING_POINTS = 32  # k-means++ seeds are drawn from this many random patches per cluster at most
WHITENING_EPSILON = 1e-2  # added to the eigenvalues, relative to their mean (regularized whitening)
# Directions whose eigenvalue is below this fraction of the largest carry no signal
# (a constant or duplicated input channel, float32 rounding); the whitening drops them,
# since filters reading them would amplify rounding noise layer after layer.
RANK_TOLERANCE = 1e-5
# The reference whitened onto the top directions with 1e-3 added to the eigenvalues of its
# patch scatter matrix (pixels in 0..255): negligible, here relative to the mean eigenvalue.
# With fewer input directions than filters (first layers), every direction down to RANK_TOLERANCE is then
# whitened almost unregularized, as the reference did; bench/train.py --experiment kmeans favoured it.
TOP_WHITENING_EPSILON = 1e-6
MINIBATCH_PER_CLUSTER = 10  # mini-batch k-means: points per batch, per cluster (the reference's batch_size=10k)
MINIBATCH_EPOCHS = 10  # mini-batch k-means: passes over the patches (in random batches)


@dataclass(frozen=True)
class PatchWhitening:
    """The PCA whitening of one layer's input patches, per group (what ``patch_whitening`` returns).

    ``whitened = centred_patches @ transform.transpose(1, 2)``; a filter drawn in the
    whitened space (a row ``w``) reads the raw patches as ``w @ transform``.

    Attributes:
        centred_patches: the patches minus their mean (over every process's patches),
            ``(groups, patches, fan_in)``.
        eigenvalues: of the patch covariance, ``(groups, fan_in)``, descending and regularized;
            0 past a group's directions with signal.
        eigenvectors: ``(groups, fan_in, fan_in)``, as columns, in the same order.
        rank: the directions with signal (non-zero eigenvalues), the least over the groups.

    Example:
        >>> whitening = magicinit.patch_whitening(patches)
        >>> whitening.whitened_patches()[0].T.cov()  # group 0's: about the identity, up to the rank
    """

    centred_patches: Tensor
    eigenvalues: Tensor
    eigenvectors: Tensor
    rank: int

    @property
    def transform(self) -> Tensor:
        """PCA whitening, ``(groups, fan_in, fan_in)``: row i is ``v_i / sqrt(lambda_i)``, 0 past the rank."""
        inverse_sqrt = torch.where(self.eigenvalues > 0, self.eigenvalues.clamp_min(1e-30).rsqrt(), 0.0)
        return (self.eigenvectors * inverse_sqrt.unsqueeze(1)).transpose(1, 2)

    @property
    def directions(self) -> int:
        """The leading whitened coordinates that carry signal in some group (every later one is 0 in all
        groups): ``fan_in`` or less at full rank, at most the ``top`` asked for otherwise."""
        return int((self.eigenvalues > 0).sum(dim=-1).max())

    def whitened_patches(self, *, signal_only: bool = False) -> Tensor:
        """The whitened patches, ``(groups, patches, fan_in)`` (0 past the rank).

        Args:
            signal_only: only the first ``directions`` coordinates, ``(groups, patches, directions)``;
                map rows of that space back with ``transform[:, :directions]``. The same points
                without the coordinates that are 0 everywhere: distances, norms and means are
                unchanged, and far cheaper where the whitening kept only the top directions.
        """
        signal = self.transform[:, : self.directions]
        whitened = self.centred_patches @ signal.transpose(1, 2)
        if signal_only:
            return whitened
        return nn.functional.pad(whitened, (0, self.centred_patches.shape[-1] - whitened.shape[-1]))


def _subsample(count: int, keep: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.randperm(count, generator=generator)[:keep].to(device)


def _check_patches_per_filter(patches_per_filter: int) -> None:
    if isinstance(patches_per_filter, bool) or not isinstance(patches_per_filter, int) or patches_per_filter < 1:
        raise MagicInitError(f"patches_per_filter={patches_per_filter!r}: expected an int >= 1")


def layer_patches(request: SamplerRequest, *, patches_per_filter: int = PATCHES_PER_FILTER) -> Tensor | None:
    """A random subset of the layer's input patches in the Part 1 pass, ``(groups, M, fan_in)`` float32.

    ``M`` is ``patches_per_filter`` per output channel of a group (at least
    ``4 * fan_in``, for the covariance), and at most what the memory budget
    (``request.patch_budget_bytes``) allows: enough for the covariance and the
    centroids, and far cheaper than all patches. With several processes, ``M``
    is shared out among the ranks in proportion to the patches each holds, and
    each rank returns its own. None where the layer has no patches (transposed
    convolutions) or its input is not a tensor.

    Args:
        request: the layer's sampler request.
        patches_per_filter: patches wanted per output channel of a group (the built-in
            samplers' default, 128); all of them with a large number, memory allowing.

    Example:
        >>> patches = magicinit.layer_patches(request, patches_per_filter=256)
        >>> if patches is not None:
        ...     whitening = magicinit.patch_whitening(patches, request.collective)
    """
    _check_patches_per_filter(patches_per_filter)
    layer_input = request.layer_input[0] if request.layer_input else None
    if not isinstance(layer_input, Tensor):
        return None
    probe = request.input_patches(layer_input[:1])
    if probe is None:
        return None
    groups, out_per_group, fan = request.shape
    wanted = max(patches_per_filter * out_per_group, 4 * fan)
    max_patches = max(1, min(wanted, request.patch_budget_bytes // (4 * groups * fan)))
    sample = layer_input
    generator = request.own_data_generator()
    per_sample = probe.shape[1]
    if request.collective is not None:
        available = layer_input.shape[0] * per_sample
        everywhere = request.collective.total(available)
        max_patches = max(1, -(-max_patches * available // everywhere))
    if layer_input.shape[0] * per_sample > max_patches:  # fewer whole samples first, then positions
        keep = max(1, -(-max_patches // per_sample))
        sample = layer_input[_subsample(layer_input.shape[0], keep, generator, layer_input.device)]
    patches = request.input_patches(sample)
    assert patches is not None
    if patches.shape[1] > max_patches:
        patches = patches[:, _subsample(patches.shape[1], max_patches, generator, patches.device)]
    return patches.float()


def patch_whitening(
    patches: Tensor, collective: SamplerCollective | None = None, *, top: int | None = None
) -> PatchWhitening:
    """Per-group PCA whitening of ``patches`` ``(groups, M, fan_in)``, over every process's patches.

    With a ``collective``, the mean and covariance are those of all ranks' patches
    merged exactly, so every rank gets the same whitening (each keeps its own
    centred patches). Directions whose eigenvalue is below ``RANK_TOLERANCE`` of
    the largest carry no signal and are dropped.

    Args:
        patches: each group's patches, as ``layer_patches`` returns them.
        collective: the processes to reduce over (``request.collective``); None: these patches alone.
        top: None: whiten at full rank, every eigenvalue regularized by ``WHITENING_EPSILON``
            times their mean. ``k``: onto the top ``k`` directions only, with a negligible
            epsilon (``TOP_WHITENING_EPSILON``), as the authors' reference implementation whitened.

    Example:
        >>> whitening = magicinit.patch_whitening(patches, request.collective, top=request.shape[1])
        >>> filters = whitening.whitened_patches()[:, :request.shape[1]] @ whitening.transform
    """
    mean = patches.mean(dim=1, keepdim=True)
    centred = patches - mean
    scatter = centred.transpose(1, 2).double() @ centred.double()  # (groups, fan, fan)
    count = centred.shape[1]
    if collective is None:
        covariance = scatter / count
    else:  # Chan et al.'s merge: scatter within ranks plus the spread of the rank means
        packed = torch.cat([mean.new_tensor([count]), mean.flatten()]).double()
        parts = collective.gather(packed)
        counts = torch.stack([part[0] for part in parts])  # (ranks,)
        means = torch.stack([part[1:].view(mean.shape) for part in parts]).double()  # (ranks, groups, 1, fan)
        total = counts.sum()
        global_mean = (counts.view(-1, 1, 1, 1) * means).sum(0) / total
        offsets = means - global_mean
        between = (counts.view(-1, 1, 1, 1) * offsets.transpose(-2, -1) * offsets).sum(0)
        covariance = (collective.sum(scatter) + between) / total
        centred = patches - global_mean.to(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    eigenvalues, eigenvectors = eigenvalues.flip(-1).clamp_min(0), eigenvectors.flip(-1)
    live = eigenvalues > RANK_TOLERANCE * eigenvalues[:, :1]
    epsilon = WHITENING_EPSILON if top is None else TOP_WHITENING_EPSILON
    regularized = eigenvalues + epsilon * eigenvalues.mean(dim=-1, keepdim=True)
    if top is not None:
        live[:, top:] = False
    eigenvalues = torch.where(live, regularized, 0.0)
    rank = int(live.sum(dim=-1).min())
    return PatchWhitening(centred, eigenvalues.float(), eigenvectors.float(), rank)


WhitenedDraw = Callable[[SamplerRequest, PatchWhitening], Tensor]  # what DataDrivenSampler calls


@dataclass(frozen=True)
class DataDrivenSampler:
    """A sampler that draws a layer's filters from the whitening of its input patches.

    Calling it with a request takes ``layer_patches`` and their ``patch_whitening``
    (over every process) and returns ``draw(request, whitening)``, filters of shape
    ``request.shape``. Where the layer has no patches, fewer patches than filters
    per group, or only constant ones, it draws ``gaussian`` filters instead and says
    so in ``request.notes`` (the report). The built-in pca, zca, kmeans and patches
    samplers are ``DataDrivenSampler``s: ``dataclasses.replace(SAMPLERS["pca"],
    patches_per_filter=...)`` is pca with another number of patches.

    Attributes:
        draw: ``draw(request, whitening) -> filters``; with several processes it must
            return the same filters on every rank (``request.collective``).
        top_whitening: whiten onto as many top directions as the layer has filters per
            group (``patch_whitening(top=...)``), else at full rank.
        patches_per_filter: patches per output channel of a group (``layer_patches``).

    Example:
        >>> def largest(request: magicinit.SamplerRequest, whitening: magicinit.PatchWhitening) -> torch.Tensor:
        ...     whitened = whitening.whitened_patches()
        ...     index = whitened.norm(dim=-1).topk(request.shape[1], dim=1).indices.unsqueeze(-1)
        ...     return whitened.gather(1, index.expand(-1, -1, whitened.shape[-1])) @ whitening.transform
        >>> magicinit.init_(model, images, sampler=magicinit.DataDrivenSampler(largest, patches_per_filter=256))
    """

    draw: WhitenedDraw
    top_whitening: bool = False
    patches_per_filter: int = PATCHES_PER_FILTER

    def __post_init__(self) -> None:
        if not callable(self.draw):
            raise MagicInitError(
                f"DataDrivenSampler: draw must be a callable(request, whitening) -> filters, "
                f"got {type(self.draw).__name__}"
            )
        _check_patches_per_filter(self.patches_per_filter)

    def __call__(self, request: SamplerRequest) -> Tensor:
        """The layer's filters, ``request.shape``: ``draw``'s, or gaussian ones where the patches cannot serve."""
        patches = layer_patches(request, patches_per_filter=self.patches_per_filter)
        out_per_group = request.shape[1]
        if patches is None:
            request.notes.append("this layer type has no input patches: filters drawn by gaussian")
            return gaussian(request)
        count = patches.shape[1]
        if request.collective is not None:
            count = request.collective.total(count)
        if count < out_per_group:
            request.notes.append(
                f"{count} input patches for {out_per_group} filters per group: filters drawn by gaussian"
            )
            return gaussian(request)
        whitening = patch_whitening(patches, request.collective, top=out_per_group if self.top_whitening else None)
        if whitening.rank == 0:
            request.notes.append("the input patches are constant: filters drawn by gaussian")
            return gaussian(request)
        return self.draw(request, whitening)


def _random_whitened_rows(request: SamplerRequest, whitening: PatchWhitening, count: int) -> Tensor:
    """``count`` filters per group, random directions in the whitened space."""
    groups, _, fan = request.shape
    directions = torch.randn(groups, count, fan, generator=request.generator).to(whitening.centred_patches.device)
    return directions @ whitening.transform


def _top_directions_then_random(request: SamplerRequest, whitening: PatchWhitening, rows: Tensor) -> Tensor:
    """``rows`` (groups, k, fan) for the top k directions, completed with random whitened rows."""
    missing = request.shape[1] - rows.shape[1]
    if missing > 0:
        request.notes.append(
            f"more filters than patch directions with signal: {missing} per group random in the whitened space"
        )
        rows = torch.cat([rows, _random_whitened_rows(request, whitening, missing)], dim=1)
    return rows


@register_sampler("pca")
@DataDrivenSampler
def pca(request: SamplerRequest, whitening: PatchWhitening) -> Tensor:
    """The top principal directions of the layer's input patches, scaled by ``1/sqrt(eigenvalue)``
    (the eigenvalue regularized by ``WHITENING_EPSILON`` times their mean)."""
    k = min(request.shape[1], whitening.rank)
    return _top_directions_then_random(request, whitening, whitening.transform[:, :k])


@register_sampler("zca")
@DataDrivenSampler
def zca(request: SamplerRequest, whitening: PatchWhitening) -> Tensor:
    """Rows of the ZCA whitening transform restricted to the top principal directions.

    Each filter is centred on one patch element (pixel and channel), spread
    evenly over the patch, and whitens around it.
    """
    out, fan = request.shape[1], request.shape[2]
    k = min(out, whitening.rank)
    top = whitening.eigenvectors[:, :, :k]
    restricted = top @ whitening.transform[:, :k]  # (groups, fan, fan): V_k diag(1/sqrt(l_k)) V_k^T
    rows = restricted[:, (torch.arange(k, device=restricted.device) * fan) // k]
    return _top_directions_then_random(request, whitening, rows)


def _unit_rows(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@register_sampler("patches")
@DataDrivenSampler
def random_patches(request: SamplerRequest, whitening: PatchWhitening) -> Tensor:
    """Randomly chosen whitened, unit-length input patches, mapped back through the whitening."""
    whitened = _unit_rows(whitening.whitened_patches(signal_only=True))
    chosen = _choose(whitened, request.shape[1], request)
    return chosen @ whitening.transform[:, : whitened.shape[-1]]


def _choose(points: Tensor, count: int, request: SamplerRequest) -> Tensor:
    """``count`` random rows of each group of ``points`` (groups, M, fan); with several
    processes, rank 0's choice from its own rows, sent to all."""
    if request.collective is None:
        return points[:, _subsample(points.shape[1], count, request.generator, points.device)]
    generator = request.own_data_generator()
    if points.shape[1] >= count:
        index = _subsample(points.shape[1], count, generator, points.device)
    else:  # this rank holds fewer rows than asked for: with repetition
        index = torch.randint(points.shape[1], (count,), generator=generator).to(points.device)
    return request.collective.broadcast(points[:, index])


def _kmeans_plus_plus(points: Tensor, clusters: int, generator: torch.Generator | None) -> Tensor:
    """k-means++ seeds for unit-length ``points`` (groups, M, fan): each next seed drawn with
    probability proportional to its squared distance to the nearest seed so far."""
    groups, count, _ = points.shape
    uniform = torch.rand(groups, clusters, generator=generator, dtype=torch.float64).to(points.device)
    first = (uniform[:, 0] * count).long().clamp_max(count - 1)
    group_index = torch.arange(groups, device=points.device)
    seeds = [points[group_index, first]]  # each (groups, fan)
    nearest = torch.full((groups, count), float("inf"), device=points.device, dtype=torch.float64)
    for k in range(1, clusters):
        distance = (2 - 2 * (points @ seeds[-1].unsqueeze(-1)).squeeze(-1)).clamp_min(0).double()
        nearest = torch.minimum(nearest, distance)
        cumulative = nearest.cumsum(dim=1)
        target = uniform[:, k : k + 1] * cumulative[:, -1:]
        index = torch.searchsorted(cumulative, target).squeeze(1).clamp_max(count - 1)
        seeds.append(points[group_index, index])
    return torch.stack(seeds, dim=1)


def _spherical_kmeans(points: Tensor, clusters: int, request: SamplerRequest) -> Tensor:
    """Spherical k-means of unit-length ``points`` (groups, M, fan): ``clusters`` unit centroids per group.

    Centroids start from k-means++ seeding (on the sphere, distance ``2 - 2 cos``,
    the squared distance of unit vectors); a point joins the centroid of largest
    cosine, a centroid is its members' normalized sum; empty clusters are re-seeded
    with random points; at most ``KMEANS_ITERATIONS`` iterations, fewer once at most
    ``KMEANS_SETTLED`` of the points change cluster in one.
    """
    centroids = _seeds(points, clusters, request)
    collective = request.collective
    assignment = None
    groups, count, _fan = points.shape
    with _iterations(request, "kmeans", KMEANS_ITERATIONS) as steps:
        for _ in steps:
            new_assignment = (points @ centroids.transpose(1, 2)).argmax(dim=-1)  # (groups, M)
            changed = count * groups if assignment is None else int((new_assignment != assignment).sum())
            if collective is not None:
                changed, total = collective.total(changed), collective.total(count * groups)
            else:
                total = count * groups
            if changed <= KMEANS_SETTLED * total:
                break
            assignment = new_assignment
            sums, members = _cluster_sums(points, assignment, clusters)
            if collective is not None:
                sums, members = collective.sum(sums), collective.sum(members)
            empty = members == 0
            if bool(empty.any()):
                reseed = _choose(points, clusters, request)
                sums = torch.where(empty.unsqueeze(-1), reseed, sums)
            centroids = _unit_rows(sums)
    return centroids


def _minibatch_kmeans(points: Tensor, clusters: int, request: SamplerRequest) -> Tensor:
    """Euclidean mini-batch k-means (Sculley, 2010) of ``points`` (groups, M, fan), after the reference.

    k-means++ seeds; then ``MINIBATCH_EPOCHS`` passes in random batches of
    ``MINIBATCH_PER_CLUSTER`` points per cluster (the reference's scikit-learn
    ``batch_size``): each point joins the nearest centroid (Euclidean), and each
    centroid moves to the running mean of every point it was given so far (per-centre
    learning rate ``1 / count``). Centroids that never got a point take random points.
    With several processes, every batch is shared out among the ranks in proportion
    to the points each holds, and the batch sums are added over the ranks.

    Where this differs from the scikit-learn ``MiniBatchKMeans`` the reference called
    with its defaults: plain (not greedy) k-means++ seeding, one start (not the best
    of several), a fixed number of passes (no early stopping), and no re-assignment of
    clusters that stay small during the passes.
    """
    centroids = _seeds(points, clusters, request)
    collective = request.collective
    groups, count, _fan = points.shape
    wanted = MINIBATCH_PER_CLUSTER * clusters
    total = count if collective is None else collective.total(count)
    steps_per_epoch = max(1, -(-total // wanted))  # alike on every rank
    batch = min(count, -(-wanted * count // total)) if total else 0  # this rank's share of each batch
    generator = request.own_data_generator()
    seen = points.new_zeros(groups, clusters)
    with _iterations(request, "kmeans", MINIBATCH_EPOCHS * steps_per_epoch) as steps:
        for _ in steps:
            chosen = points[:, _subsample(count, batch, generator, points.device)]  # (groups, batch, fan)
            distance = centroids.square().sum(-1).unsqueeze(1) - 2 * chosen @ centroids.transpose(1, 2)
            sums, members = _cluster_sums(chosen, distance.argmin(dim=-1), clusters)
            if collective is not None:
                sums, members = collective.sum(sums), collective.sum(members)
            seen += members
            moved = members > 0
            updated = centroids + (sums - members.unsqueeze(-1) * centroids) / seen.clamp_min(1).unsqueeze(-1)
            centroids = torch.where(moved.unsqueeze(-1), updated, centroids)
    never = seen == 0
    if bool(never.any()):
        centroids = torch.where(never.unsqueeze(-1), _choose(points, clusters, request), centroids)
    return centroids


def _seeds(points: Tensor, clusters: int, request: SamplerRequest) -> Tensor:
    """k-means++ seeds of unit-length ``points``, drawn from a random subset of at most
    ``KMEANS_SEEDING_POINTS`` per cluster (seeding is sequential); with several processes,
    every rank seeds on its own points and all take rank 0's seeds."""
    seeding, own_generator = points, request.own_data_generator()  # called alike on every rank
    if points.shape[1] > KMEANS_SEEDING_POINTS * clusters:
        seeding = points[:, _subsample(points.shape[1], KMEANS_SEEDING_POINTS * clusters, own_generator, points.device)]
    centroids = _kmeans_plus_plus(seeding, clusters, request.generator)
    if request.collective is not None:
        centroids = request.collective.broadcast(centroids)
    return centroids


def _cluster_sums(points: Tensor, assignment: Tensor, clusters: int) -> tuple[Tensor, Tensor]:
    """Per group and cluster, the sum of the points assigned to it and their count (by scatter,
    not a one-hot product): ``(groups, clusters, fan)`` and ``(groups, clusters)``."""
    groups, _, fan = points.shape
    offsets = (torch.arange(groups, device=points.device) * clusters).unsqueeze(1)  # a cluster index per group
    flat = (assignment + offsets).flatten()
    sums = points.new_zeros(groups * clusters, fan).index_add_(0, flat, points.reshape(-1, fan))
    members = torch.bincount(flat, minlength=groups * clusters).view(groups, clusters).to(points.dtype)
    return sums.view(groups, clusters, fan), members


def _iterations(request: SamplerRequest, what: str, count: int) -> tqdm:
    """``range(count)`` as a tqdm bar named after the layer, shown only when ``request.progress``
    (use it in a ``with`` block, so that the bar closes when the loop breaks)."""
    return tqdm(
        range(count), desc=f"magicinit: {what} '{request.name}'", unit="it", leave=False, disable=not request.progress
    )


def _kmeans(
    cluster: Callable[[Tensor, int, SamplerRequest], Tensor], top_whitening: bool, name: str, doc: str
) -> DataDrivenSampler:
    """A k-means sampler: ``cluster`` the whitened, unit-length patches into one centroid per
    output channel, and map the centroids back through the whitening (``name``: its draw's)."""

    def draw(request: SamplerRequest, whitening: PatchWhitening) -> Tensor:
        points = _unit_rows(whitening.whitened_patches(signal_only=True))  # (groups, M, directions)
        return cluster(points, request.shape[1], request) @ whitening.transform[:, : points.shape[-1]]

    draw.__doc__, draw.__name__, draw.__qualname__ = doc, name, name
    return DataDrivenSampler(draw, top_whitening=top_whitening)


kmeans_full = register_sampler("kmeans-full")(
    _kmeans(
        _spherical_kmeans,
        False,
        "kmeans_full",
        """\
Spherical k-means of the input patches whitened at full rank (regularized), one centroid per output channel.

The patches are centred, whitened along every direction with signal (each
eigenvalue plus ``WHITENING_EPSILON`` times their mean) and normalized to unit
length; centroids come from ``_spherical_kmeans`` and are mapped back through
the whitening.""",
    )
)

kmeans_reference = register_sampler("kmeans-reference")(
    _kmeans(
        _minibatch_kmeans,
        True,
        "kmeans_reference",
        """\
k-means after the authors' reference implementation, one centroid per output channel.

The patches are centred, whitened onto only the top directions (as many as the
layer has filters per group) with a negligible epsilon, normalized to unit
length, and clustered by Euclidean mini-batch k-means (``_minibatch_kmeans``);
the centroids are mapped back through the whitening.""",
    )
)

# What ``sampler="kmeans"`` means: the variant that trained better in ``bench/train.py --experiment kmeans``
# (the reference's, in all 4 dataset/depth settings; see bench/RESULTS.md).
register_sampler("kmeans")(kmeans_reference)
