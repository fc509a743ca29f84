"""Part 3: the data-driven samplers (pca, zca, kmeans-full, kmeans-reference, patches)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import magicinit
from conftest import ARCHITECTURES, PatchCounter, assert_unit_channels, channel_stats, first_call_outputs
from magicinit._core import samplers
from magicinit._core.sites import CallInterceptor, SiteCall, UnitIndex

DATA_DRIVEN = ["pca", "zca", "kmeans-full", "kmeans-reference", "patches"]
KMEANS = ["kmeans-full", "kmeans-reference"]


def planted_tiles(seed: int, prototypes: int = 6, tile: int = 4, grid: int = 4, images: int = 64):
    """Images tiled with ``tile x tile`` patches, each one of a few known prototypes plus noise
    and a random brightness offset (a strong nuisance that whitening removes)."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(prototypes, tile, tile, generator=g)
    protos = protos - protos.mean((1, 2), keepdim=True)
    protos = protos / protos.norm(dim=(1, 2), keepdim=True) * tile
    labels = torch.randint(0, prototypes, (images, grid, grid), generator=g)
    tiles = protos[labels] + 2.0 * torch.randn(images, grid, grid, 1, 1, generator=g)
    x = tiles.permute(0, 1, 3, 2, 4).reshape(images, 1, grid * tile, grid * tile)
    return x + 0.5 * torch.randn(x.shape, generator=g), labels


def purity_and_coverage(layer: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> tuple[float, bool]:
    """Tiles whose strongest channel's majority prototype is their own; every prototype some channel's majority."""
    with torch.no_grad():
        winner = layer(x).argmax(dim=1)
    correct, covered = 0, set()
    for channel in winner.unique():
        owned = labels[winner == channel]
        majority = int(owned.mode().values)
        covered.add(majority)
        correct += int((owned == majority).sum())
    return correct / labels.numel(), covered == set(range(int(labels.max()) + 1))


def test_kmeans_means_the_reference_construction() -> None:
    assert magicinit.SAMPLERS["kmeans"] is magicinit.SAMPLERS["kmeans-reference"]


@pytest.mark.parametrize("kmeans", KMEANS)
def test_kmeans_gives_every_planted_prototype_a_channel_where_gaussian_does_not(kmeans: str) -> None:
    gaussian_purity = []
    for seed in (0, 1, 2):
        x, labels = planted_tiles(seed)
        layer = nn.Conv2d(1, 6, 4, stride=4)
        magicinit.init_(layer, x, sampler=kmeans, between=False, seed=seed)
        purity, covered = purity_and_coverage(layer, x, labels)
        assert purity >= 0.95 and covered, (seed, purity, covered)
        layer = nn.Conv2d(1, 6, 4, stride=4)
        magicinit.init_(layer, x, sampler="gaussian", between=False, seed=seed)
        gaussian_purity.append(purity_and_coverage(layer, x, labels)[0])
    assert sum(gaussian_purity) / 3 < 0.9, gaussian_purity


class _SiteRecorder(CallInterceptor):
    """Keeps every affine site of a forward pass."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(UnitIndex(model))
        self.sites: list[SiteCall] = []

    def on_call(self, func, args, kwargs, site):  # type: ignore[no-untyped-def]
        if site is not None:
            self.sites.append(site)
        return func(*args, **kwargs)


def _first_site(model: nn.Module, x: torch.Tensor) -> SiteCall:
    recorder = _SiteRecorder(model)
    with torch.no_grad(), recorder:
        model(x)
    return recorder.sites[0]


@pytest.mark.parametrize(
    "layer,shape",
    [
        (nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2), (3, 4, 11)),
        (nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2, padding_mode="reflect"), (3, 4, 9, 9)),
        (nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 1, 1), padding_mode="circular"), (2, 2, 3, 5, 5)),
        (nn.Conv2d(6, 6, 3, groups=6, bias=False), (2, 6, 5, 5)),
        (nn.Linear(5, 3), (4, 7, 5)),
    ],
)
def test_patches_are_exactly_what_each_filter_sees(layer: nn.Module, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape)
    site = _first_site(layer, x)
    adapter = site.adapter
    patches = site.patches(site.input)  # (groups, M, fan); the input as the call saw it (padded, say)
    filters = adapter.to_filters(site.weight, site.groups)  # (groups, out/g, fan)
    responses = patches @ filters.transpose(1, 2)  # (groups, M, out/g)
    with torch.no_grad():
        bias = torch.zeros(adapter.out_channels(site.weight, site.groups)) if layer.bias is None else layer.bias
        if adapter.channels_last_in_output:
            out = adapter.channel_view(layer(x) - bias)
        else:
            out = adapter.channel_view((layer(x) - bias.view(1, -1, *[1] * (x.dim() - 2))).contiguous())
    groups, per_group = filters.shape[:2]
    expected = out.reshape(out.shape[0], groups, per_group, -1).permute(1, 0, 3, 2).reshape(groups, -1, per_group)
    assert torch.allclose(responses, expected, atol=1e-5)
    transposed = nn.ConvTranspose2d(2, 2, 3)
    assert _first_site(transposed, torch.randn(1, 2, 4, 4)).patches(torch.randn(1, 2, 4, 4)) is None


def test_pca_filters_are_orthogonal_in_the_whitened_space() -> None:
    # pca whitening all patches (not 128 per filter), so that all outputs are uncorrelated
    pca_on_every_patch = dataclasses.replace(magicinit.SAMPLERS["pca"], patches_per_filter=10**6)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2))
    x = torch.nn.functional.avg_pool2d(torch.randn(32, 3, 14, 14), 3, 1)  # correlated pixels
    magicinit.init_(model, x, sampler=pca_on_every_patch, between=False, seed=0)
    outputs = first_call_outputs(model, x)
    for name, groups in (("0", 1), ("2", 2)):
        out = outputs[name]  # channel covariance = F C F^T: diagonal for PCA filters
        per_group = out.shape[1] // groups
        for g in range(groups):
            channels = out[:, g * per_group : (g + 1) * per_group].transpose(0, 1).reshape(per_group, -1).double()
            correlation = torch.corrcoef(channels)
            assert torch.allclose(correlation, torch.eye(per_group, dtype=torch.float64), atol=1e-4), (name, g)


@pytest.mark.parametrize("sampler", DATA_DRIVEN)
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_sampler_then_part1_gives_exact_statistics(sampler: str, arch: str) -> None:
    build, shape = ARCHITECTURES[arch]
    model = build()
    x = torch.randn(24, *shape) * 2 + 0.5
    report = magicinit.init_(model, x, sampler=sampler, between=False, beta=0.1, seed=0)
    assert_unit_channels(model, x, report, beta=0.1)


@pytest.mark.parametrize("sampler", DATA_DRIVEN)
def test_same_seed_gives_bit_identical_weights(sampler: str) -> None:
    x = torch.randn(16, 3, 10, 10)
    states = []
    for seed in (4, 4, 5):
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4)
        )
        magicinit.init_(model, x, sampler=sampler, seed=seed, rate_precision=0.2)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    if sampler != "pca":  # pca draws nothing at random where there are enough patch dimensions
        assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_fallbacks_to_gaussian_are_reported() -> None:
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.ConvTranspose1d(1, 2, 3))
    forward = lambda m, x: m[2](m[1](m[0](x)).unsqueeze(1))  # noqa: E731
    report = magicinit.init_(model, torch.randn(8, 4), sampler="kmeans", between=False, forward=forward, seed=0)
    assert any("8 input patches for 32 filters per group: filters drawn by gaussian" in n for n in report["0"].notes)
    assert any("no input patches: filters drawn by gaussian" in n for n in report["2"].notes)


def test_memory_budget_subsamples_patches_and_stays_exact() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    x = torch.randn(32, 3, 12, 12)
    default, small = PatchCounter("kmeans"), PatchCounter("kmeans")
    same_layers = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    magicinit.init_(same_layers, x, sampler=default, between=False, seed=0)  # the default budget: 500 MB
    report = magicinit.init_(model, x, sampler=small, between=False, seed=0, patch_budget_mb=0.01)
    assert small.patches.keys() == default.patches.keys() == {"0", "2"}
    assert all(small.patches[n] < default.patches[n] / 5 for n in default.patches), (small.patches, default.patches)
    assert not any("gaussian" in n for e in report.layers for n in e.notes)  # 0.01 MB: ~90 patches >= 8
    _mean, std = channel_stats(model[2], first_call_outputs(model, x)["2"])
    assert torch.allclose(std, torch.ones_like(std), atol=1e-3)
    with pytest.raises(magicinit.MagicInitError, match="patch_budget_mb=0"):
        magicinit.init_(model, x, sampler="kmeans", patch_budget_mb=0)


@pytest.mark.parametrize("kmeans", KMEANS)
def test_kmeans_progress_bar_when_asked(kmeans: str, capsys: pytest.CaptureFixture[str]) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    magicinit.init_(model, torch.randn(8, 3, 8, 8), sampler=kmeans, between=False, seed=0, progress=True)
    assert "magicinit: kmeans '0'" in capsys.readouterr().err


def test_data_driven_sampler_uses_the_single_part1_pass() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    magicinit.init_(model, torch.randn(16, 3, 10, 10), sampler="kmeans", between=False, seed=0)
    assert len(calls) == 2  # the 2-sample tracing probe, the one Part 1 pass (nothing to re-measure here)


@pytest.mark.parametrize("kmeans", KMEANS)
def test_kmeans_with_fewer_distinct_patches_than_clusters_reseeds_and_stays_finite(kmeans: str) -> None:
    layer = nn.Conv2d(1, 8, 2, stride=2)
    kinds = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]), torch.tensor([[1.0, 1.0], [-1.0, -1.0]]), torch.zeros(2, 2)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (16, 4, 4), generator=g)
    tiles = torch.stack(kinds)[labels]  # three distinct patches for eight clusters
    x = tiles.permute(0, 1, 3, 2, 4).reshape(16, 1, 8, 8)
    report = magicinit.init_(layer, x, sampler=kmeans, between=False, seed=0)
    assert torch.isfinite(layer.weight).all() and torch.isfinite(layer.bias).all()
    _mean, std = channel_stats(layer, layer(x).detach())
    live = torch.ones(8, dtype=torch.bool)
    live[report.layers[0].zero_variance_channels] = False
    assert torch.allclose(std[live], torch.ones_like(std[live]), atol=1e-3)


@pytest.mark.parametrize("sampler", DATA_DRIVEN)
def test_whitening_ignores_directions_without_signal(sampler: str) -> None:
    """A constant and a duplicated input feature span no new direction: no filter may read
    them amplified (that turned float32 rounding into errors of 1e-2 a few layers later)."""
    g = torch.Generator().manual_seed(0)
    signal = torch.randn(256, 4, generator=g)
    x = torch.cat([signal, signal[:, :1], torch.full((256, 1), 0.3)], dim=1)  # rank 4 of 6
    layer = nn.Linear(6, 8)
    report = magicinit.init_(layer, x, sampler=sampler, between=False, seed=0)
    assert report.layers[0].zero_variance_channels == []
    weight = layer.weight.detach()
    null_directions = torch.tensor([[1.0, 0, 0, 0, -1.0, 0], [0, 0, 0, 0, 0, 1.0]]) / torch.tensor([[2**0.5], [1.0]])
    assert (weight @ null_directions.T).abs().max() < 1e-4 * weight.norm(dim=1).max()
    _mean, std = channel_stats(layer, layer(x).detach())
    assert torch.allclose(std, torch.ones_like(std), atol=1e-3)
    if sampler in ("pca", "zca"):
        assert any("more filters than patch directions with signal" in n for n in report.layers[0].notes)


def test_constant_patches_fall_back_to_gaussian() -> None:
    layer = nn.Linear(3, 4)
    report = magicinit.init_(layer, torch.ones(32, 3), sampler="pca", between=False, seed=0)
    assert any("input patches are constant: filters drawn by gaussian" in n for n in report.layers[0].notes)
    assert torch.isfinite(layer.weight).all() and torch.isfinite(layer.bias).all()


def _patch_principal_directions(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of the covariance of all the layer's input patches, by decreasing eigenvalue (columns)."""
    patches = nn.functional.unfold(x, layer.kernel_size, stride=layer.stride).transpose(1, 2)
    patches = patches.reshape(-1, patches.shape[-1]).double()
    patches = patches - patches.mean(0)
    _, vectors = torch.linalg.eigh(patches.T @ patches)
    return vectors.flip(1)


@pytest.mark.parametrize("kmeans", KMEANS)
def test_reference_kmeans_filters_lie_in_the_top_patch_directions(kmeans: str) -> None:
    """The reference whitened onto as many top principal directions as the layer has filters:
    its filters have no component outside them. Full-rank whitening reaches every direction."""
    g = torch.Generator().manual_seed(0)
    x = nn.functional.avg_pool2d(torch.randn(15, 2, 18, 18, generator=g), 3, 1)  # smooth: a decaying spectrum
    layer = nn.Conv2d(2, 6, 4, stride=2)  # fan_in 32 > 6 filters; 15 * 49 patches, all used (under 128 * 6)
    magicinit.init_(layer, x, sampler=kmeans, between=False, seed=0)
    vectors = _patch_principal_directions(layer, x)
    weight = layer.weight.detach().reshape(6, -1).double()
    outside = (weight @ vectors[:, 6:]).norm(dim=1) / weight.norm(dim=1)
    if kmeans == "kmeans-reference":
        assert outside.max() < 1e-3, outside
    else:
        assert outside.min() > 0.1, outside


def test_minibatch_kmeans_finds_the_euclidean_means_of_tight_clusters() -> None:
    g = torch.Generator().manual_seed(3)
    centres = nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1)
    members = torch.randint(5, (1000,), generator=g)
    points = nn.functional.normalize(centres[members] + 0.1 * torch.randn(1000, 8, generator=g), dim=1)
    request = samplers.SamplerRequest(
        name="layer",
        module=nn.Linear(8, 5),
        shape=torch.Size((1, 5, 8)),
        current=torch.zeros(1, 5, 8),
        layer_input=(points,),
        generator=torch.Generator().manual_seed(0),
    )
    found = samplers._minibatch_kmeans(points.unsqueeze(0), 5, request)[0]
    means = torch.stack([points[members == k].mean(0) for k in range(5)])
    distance = torch.cdist(means, found)  # every true mean has its own centroid, close to it
    nearest = distance.argmin(dim=1)
    assert sorted(nearest.tolist()) == list(range(5))
    assert distance.min(dim=1).values.max() < 0.02, distance.min(dim=1).values


@pytest.mark.parametrize("top", [None, 5])
def test_signal_only_whitening_drops_only_coordinates_that_are_zero_everywhere(top: int | None) -> None:
    """k-means and random patches work on ``whitened_patches(signal_only=True)``: the full whitened
    patches without their trailing all-zero coordinates, mapped back by as many rows of the transform."""
    g = torch.Generator().manual_seed(1)
    low_rank = torch.randn(2, 300, 7, generator=g) @ torch.randn(2, 7, 18, generator=g)  # 7 directions of 18
    whitening = magicinit.patch_whitening(low_rank, top=top)
    full, signal = whitening.whitened_patches(), whitening.whitened_patches(signal_only=True)
    assert whitening.directions == (7 if top is None else 5) and signal.shape == (2, 300, whitening.directions)
    assert bool((full[..., whitening.directions :] == 0).all())
    torch.testing.assert_close(full[..., : whitening.directions], signal, rtol=1e-5, atol=1e-5)
    expected = whitening.centred_patches.double() @ whitening.transform.double().transpose(1, 2)
    torch.testing.assert_close(full.double(), expected, rtol=1e-4, atol=1e-4)


def test_kmeans_in_the_signal_coordinates_finds_the_centroids_of_the_full_whitened_space() -> None:
    """The reference k-means on the leading coordinates (what the sampler now clusters) gives the
    same filters as on the full, zero-padded whitened patches, from the same seed."""
    g = torch.Generator().manual_seed(2)
    patches = torch.randn(1, 600, 5, generator=g) @ torch.randn(1, 5, 27, generator=g) + torch.randn(1, 600, 27) * 0.01
    whitening = magicinit.patch_whitening(patches, top=4)
    request = samplers.SamplerRequest(
        name="layer",
        module=nn.Linear(27, 4),
        shape=torch.Size((1, 4, 27)),
        current=torch.zeros(1, 4, 27),
        layer_input=(patches[0],),
        generator=torch.Generator().manual_seed(0),
    )
    filters = {}
    for signal_only in (False, True):
        request = dataclasses.replace(request, generator=torch.Generator().manual_seed(0))
        points = samplers._unit_rows(whitening.whitened_patches(signal_only=signal_only))
        centroids = samplers._minibatch_kmeans(points, 4, request)
        filters[signal_only] = centroids @ whitening.transform[:, : points.shape[-1]]
    torch.testing.assert_close(filters[True], filters[False], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("filters", "refusal"),
    [
        (float("nan"), r"layer '0': the sampler returned filters with NaN or Inf values"),
        (1e38, r"layer '0': its output .* not finite .* the filters the sampler drew \(largest magnitude 1e\+38\)"),
    ],
)
def test_a_sampler_whose_filters_are_not_finite_or_overflow_is_named(filters: float, refusal: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    saved = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(magicinit.MagicInitError, match=refusal):
        magicinit.init_(model, torch.randn(16, 3, 8, 8), sampler=lambda request: torch.full(request.shape, filters))
    assert all(torch.equal(saved[name], tensor) for name, tensor in model.state_dict().items())
