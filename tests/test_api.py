"""The public surface: custom samplers (registered or passed), the report's settings and statuses, the package
layout."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import magicinit
from conftest import assert_unit_channels, assert_untouched, plain_cnn, state_copy
from magicinit import MagicInitError, SamplerRequest
from magicinit._core import samplers
from magicinit._core.distributed import Collective

PACKAGE = Path(magicinit.__file__).parent


class RecordingSampler:
    """A sampler that draws sign filters (+-1 entries) and keeps every request it got."""

    def __init__(self) -> None:
        self.requests: list[SamplerRequest] = []
        self.filters: dict[str, torch.Tensor] = {}

    def __call__(self, request: SamplerRequest) -> torch.Tensor:
        self.requests.append(request)
        filters = torch.randn(request.shape, generator=request.generator).sign()
        self.filters[request.name] = filters.clone()
        return filters


def _assert_filters_are_rescaled(model: nn.Module, drawn: dict[str, torch.Tensor]) -> None:
    """Every layer's filters are the drawn ones times one positive factor per output channel."""
    for name, module in model.named_modules():
        if name not in drawn:
            continue
        weight = module.weight.detach().reshape(drawn[name].shape).double()
        expected = drawn[name].double()
        cosine = (weight * expected).sum(-1) / (weight.norm(dim=-1) * expected.norm(dim=-1))
        assert torch.allclose(cosine, torch.ones_like(cosine), atol=1e-6), name


@pytest.fixture
def registry() -> Iterator[None]:
    """The sampler registry as it was before the test, afterwards (names a test registers are removed)."""
    before = dict(samplers._REGISTERED)
    yield
    samplers._REGISTERED.clear()
    samplers._REGISTERED.update(before)


def test_registered_sampler_is_used_by_name_for_every_layer(registry: None) -> None:
    sampler = RecordingSampler()
    assert magicinit.register_sampler("signs")(sampler) is sampler
    assert magicinit.SAMPLERS["signs"] is sampler
    model, x = plain_cnn(4), torch.randn(32, 3, 8, 8)
    report = magicinit.init_(model, x, sampler="signs", between=False, seed=0)
    layers = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert [r.name for r in sampler.requests] == layers
    for request in sampler.requests:
        assert request.module is dict(model.named_modules())[request.name]
        assert request.shape == (1, request.module.weight.shape[0], request.module.weight[0].numel())
        assert isinstance(request.layer_input[0], torch.Tensor) and request.layer_input[0].shape[0] == 32
    _assert_filters_are_rescaled(model, sampler.filters)
    assert_unit_channels(model, x, report)
    assert report.settings["sampler"] == "signs"


def test_a_callable_is_a_sampler_and_the_report_names_it() -> None:
    sampler = RecordingSampler()
    model, x = plain_cnn(4), torch.randn(32, 3, 8, 8)
    report = magicinit.init_(model, x, sampler=sampler, between=False, seed=0)
    assert len(sampler.requests) == 4
    _assert_filters_are_rescaled(model, sampler.filters)
    assert_unit_channels(model, x, report)
    assert report.settings["sampler"].endswith("RecordingSampler")
    json.dumps(report.to_dict())


def test_a_callable_sampler_of_the_wrong_shape_leaves_the_model_as_it_was() -> None:
    model = plain_cnn(3)
    saved = state_copy(model)
    with pytest.raises(MagicInitError, match=r"layer '0': the sampler returned filters of shape \(3,\)"):
        magicinit.init_(model, torch.randn(8, 3, 8, 8), sampler=lambda request: torch.zeros(3))
    assert_untouched(model, saved)


@pytest.mark.parametrize("name", ["", None, 3])
def test_register_sampler_needs_a_name(name: object) -> None:
    with pytest.raises(MagicInitError, match="register_sampler: the name must be a non-empty str"):
        magicinit.register_sampler(name)  # type: ignore[arg-type]


def test_register_sampler_needs_a_callable() -> None:
    with pytest.raises(MagicInitError, match=r"register_sampler\('x'\): int is not callable"):
        magicinit.register_sampler("x")(3)  # type: ignore[arg-type]
    assert "x" not in magicinit.SAMPLERS


def test_register_sampler_replaces_a_name_only_when_asked(registry: None) -> None:
    first, second = RecordingSampler(), RecordingSampler()
    magicinit.register_sampler("signs")(first)
    with pytest.raises(
        MagicInitError,
        match=r"register_sampler\('signs'\): a sampler is already registered under "
        r"that name \(.*RecordingSampler\); choose another name, or pass replace=True",
    ):
        magicinit.register_sampler("signs")(second)
    assert magicinit.SAMPLERS["signs"] is first
    gaussian = magicinit.SAMPLERS["gaussian"]
    with pytest.raises(MagicInitError, match=r"register_sampler\('gaussian'\): .* pass replace=True"):
        magicinit.register_sampler("gaussian")(second)  # the built-ins are registered the same way
    assert magicinit.SAMPLERS["gaussian"] is gaussian
    assert magicinit.register_sampler("signs", replace=True)(second) is second
    assert magicinit.SAMPLERS["signs"] is second
    model, x = plain_cnn(3), torch.randn(16, 3, 8, 8)
    magicinit.init_(model, x, sampler="signs", between=False, seed=0)
    assert not first.requests and len(second.requests) == 3


def test_the_exported_registry_is_read_only() -> None:
    with pytest.raises(TypeError):
        magicinit.SAMPLERS["signs"] = RecordingSampler()  # type: ignore[index]
    with pytest.raises(TypeError):
        del magicinit.SAMPLERS["gaussian"]  # type: ignore[attr-defined]
    assert not hasattr(magicinit.SAMPLERS, "pop") and not hasattr(magicinit.SAMPLERS, "update")
    assert {
        "gaussian",
        "orthogonal",
        "keep",
        "pca",
        "zca",
        "kmeans",
        "kmeans-full",
        "kmeans-reference",
        "patches",
    } <= set(magicinit.SAMPLERS)
    public = {name: value for name, value in vars(samplers).items() if not name.startswith("_")}
    assert not [name for name, value in public.items() if isinstance(value, (dict, list, set))]  # nothing mutable


def test_the_collective_a_sampler_sees_is_an_exported_protocol() -> None:
    assert issubclass(Collective, magicinit.SamplerCollective)  # the torch.distributed one satisfies it
    collective_field = next(f for f in dataclasses.fields(SamplerRequest) if f.name == "collective")
    assert collective_field.type == "SamplerCollective | None"
    used = {"sum", "total", "gather", "broadcast", "fork"}  # every method samplers call, and no other
    protocol_methods = {
        name
        for name, value in vars(magicinit.SamplerCollective).items()
        if inspect.isfunction(value) and not name.startswith("_")
    }
    assert protocol_methods == used
    source = Path(samplers.__file__).read_text()
    called = set(re.findall(r"collective\.(\w+)\(", source))
    assert called == used, called


def test_data_driven_sampler_checks_its_options() -> None:
    with pytest.raises(MagicInitError, match=r"patches_per_filter=0: expected an int >= 1"):
        magicinit.DataDrivenSampler(lambda request, whitening: whitening.transform, patches_per_filter=0)
    with pytest.raises(MagicInitError, match=r"DataDrivenSampler: draw must be a callable"):
        magicinit.DataDrivenSampler(3)  # type: ignore[arg-type]
    pca = magicinit.SAMPLERS["pca"]
    assert isinstance(pca, magicinit.DataDrivenSampler) and pca.patches_per_filter == 128
    fewer = dataclasses.replace(pca, patches_per_filter=2)
    report = magicinit.init_(nn.Linear(6, 4), torch.randn(64, 6), sampler=fewer, between=False, seed=0)
    assert report.settings["sampler"] == "magicinit._core.samplers.pca(patches_per_filter=2)"


def test_layer_patches_takes_as_many_patches_per_filter_as_asked() -> None:
    layer = nn.Conv2d(2, 4, 3)
    x = torch.randn(10, 2, 8, 8)  # 360 patches of 18 values
    request = SamplerRequest(
        name="layer",
        module=layer,
        shape=torch.Size((1, 4, 18)),
        current=torch.zeros(1, 4, 18),
        layer_input=(x,),
        generator=torch.Generator().manual_seed(0),
        input_patches=lambda x: nn.functional.unfold(x, 3).transpose(1, 2).reshape(1, -1, 18),
    )
    assert magicinit.layer_patches(request, patches_per_filter=30).shape == (1, 120, 18)
    assert magicinit.layer_patches(request, patches_per_filter=1).shape == (1, 72, 18)  # at least 4 x fan_in
    everything = magicinit.layer_patches(request, patches_per_filter=10**6)
    assert everything.shape == (1, 360, 18)
    whitening = magicinit.patch_whitening(everything)
    whitened = whitening.whitened_patches()[0].double()
    torch.testing.assert_close(whitened.T @ whitened / 360, torch.eye(18, dtype=torch.float64), atol=0.05, rtol=0)
    top = magicinit.patch_whitening(everything, top=5)
    assert top.rank == 5 and bool((top.eigenvalues[0, 5:] == 0).all())


def test_unknown_sampler_names_the_known_ones_and_the_callable_form() -> None:
    with pytest.raises(MagicInitError, match=r"sampler=.kmean. is not known; choose one of: .*, or pass a callable"):
        magicinit.init_(plain_cnn(3), torch.randn(4, 3, 8, 8), sampler="kmean")


def test_settings_record_every_rate_option_as_passed() -> None:
    options = {"rate_chunk_size": 2, "rate_precision": 0.3, "rate_max_rounds": 3}
    report = magicinit.init_(plain_cnn(3), torch.randn(8, 3, 8, 8), seed=0, **options)
    assert {k: report.settings[k] for k in options} == options
    rescaled = magicinit.rescale_(plain_cnn(3), torch.randn(8, 3, 8, 8), seed=0, **options)
    assert {k: rescaled.settings[k] for k in options} == options


def test_cli_rate_options_reach_the_report(tmp_path: Path) -> None:
    import numpy as np

    from magicinit.tools.cli import main

    data = tmp_path / "x.npy"
    np.save(data, torch.randn(8, 3, 8, 8).numpy())
    report = tmp_path / "r.json"
    code = main(
        [
            "init",
            "plain-cnn",
            "--model-args",
            '{"depth": 3, "width": 4}',
            "--data",
            str(data),
            "--out",
            str(tmp_path / "w.pt"),
            "--report",
            str(report),
            "--quiet",
            "--rate-max-rounds",
            "3",
            "--rate-precision",
            "0.25",
            "--rate-chunk-size",
            "2",
        ]
    )
    assert code == 0
    settings = json.loads(report.read_text())["settings"]
    assert (settings["rate_max_rounds"], settings["rate_precision"], settings["rate_chunk_size"]) == (3, 0.25, 2)


def test_statuses_are_typed_and_serialize_as_plain_strings() -> None:
    class WithUnused(nn.Sequential):
        def __init__(self) -> None:
            super().__init__(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
            self.unused = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self[2](self[1](self[0](x)))

    model = WithUnused()
    model[2].weight.requires_grad_(False)
    report = magicinit.init_(model, torch.randn(16, 4), seed=0)
    assert [layer.status for layer in report.layers] == [
        magicinit.LayerStatus.INITIALIZED,
        magicinit.LayerStatus.EXCLUDED,
        magicinit.LayerStatus.NEVER_CALLED,
    ]
    assert all(type(layer.status) is magicinit.LayerStatus for layer in report.layers)
    statuses = [layer["status"] for layer in report.to_dict()["layers"]]
    assert statuses == ["initialized", "excluded", "never called"] and all(type(s) is str for s in statuses)
    rescaled = magicinit.rescale_(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), torch.randn(16, 4))
    assert {layer.status for layer in rescaled.layers} == {magicinit.LayerStatus.RESCALED}


class GrowsOnFirstCall(nn.Module):
    """A model whose forward adds a submodule (with a parameter) on its first call."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "scale"):
            self.scale = nn.Linear(3, 3, bias=False)
            nn.init.eye_(self.scale.weight)
            self.scale.weight.requires_grad_(False)
        return self.scale(self.body(x))


def test_a_model_that_grows_in_forward_keeps_its_modes_and_flags() -> None:
    model = GrowsOnFirstCall().train()
    magicinit.init_(model, torch.randn(16, 4), seed=0)
    assert all(module.training for module in model.modules() if module is not model.scale)
    assert [p.requires_grad for p in model.body.parameters()] == [True] * 4
    assert not model.scale.weight.requires_grad


# --- the package's layout ------------------------------------------------------------------------


def test_every_public_name_is_documented_and_typed() -> None:
    for name in magicinit.__all__:
        value = getattr(magicinit, name)
        if inspect.isfunction(value) or inspect.isclass(value):
            assert inspect.getdoc(value), name
        if inspect.isfunction(value):
            signature = inspect.signature(value)
            assert signature.return_annotation is not inspect.Signature.empty, name
            for parameter in signature.parameters.values():
                assert parameter.annotation is not inspect.Parameter.empty, (name, parameter.name)


def _sources(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


@pytest.mark.slow
def test_the_library_never_imports_the_tools() -> None:
    for path in _sources(PACKAGE / "_core") + [PACKAGE / "__init__.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = "." * node.level + (node.module or "")
                assert "tools" not in target.split("."), f"{path.name} imports {target}"
    code = "import sys, magicinit; print([m for m in sys.modules if m.startswith('magicinit.tools')])"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    )
