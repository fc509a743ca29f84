"""One test per assumption ``magicinit._core.torch_internals`` makes about torch: a torch upgrade that
breaks one fails here, by name."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap
from torch.nn.utils import parametrize, prune
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm
from torch.overrides import TorchFunctionMode, handle_torch_function, has_torch_function

from magicinit._core.session import TORCH_REPARAMETRIZATIONS
from magicinit._core.sites import (
    COMPOSITES,
    CallInterceptor,
    SiteCall,
    UnitIndex,
    op_name,
)
from magicinit._core.torch_internals import (
    compiled_original,
    forward_hooks,
    forward_pre_hooks,
    global_forward_hooks,
    is_vectorization_refusal,
    name_in_compiled_original,
    parametrization_cache_enabled,
    pruned_tensor_name,
    reentrant_checkpoints_run_plainly,
    root_cause_name,
    view_base,
    without_torch_function_dispatch,
)


class _NoVmapRule(torch.autograd.Function):
    """An autograd function without ``setup_context`` or ``vmap``: no batching rule."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x * 2

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad * 2


def _vmap_error(func: Any) -> BaseException:
    with pytest.raises(Exception) as caught:
        vmap(func)(torch.randn(3, 4))
    return caught.value


@pytest.mark.parametrize(
    "func",
    [
        _NoVmapRule.apply,  # an operation without a batching rule
        lambda t: t * 2 if t.sum() > 0 else t,  # data-dependent control flow
        lambda t: torch.nonzero(t),  # an output of data-dependent shape
        lambda t: t * t.sum().item(),  # a value read into Python
        lambda t: t * torch.from_numpy(t.numpy() > 0),  # a value read outside torch
    ],
    ids=["no-batching-rule", "control-flow", "dynamic-shape", "item", "numpy"],
)
def test_vmaps_refusals_are_recognized_by_their_wording(func: Any) -> None:
    error = _vmap_error(func)
    assert is_vectorization_refusal(error)
    wrapped = RuntimeError("in a strategy")
    wrapped.__cause__ = error
    assert is_vectorization_refusal(wrapped)


def test_other_errors_under_vmap_are_no_refusal() -> None:
    matrix = torch.randn(5, 2)
    error = _vmap_error(lambda t: t @ matrix)  # a shape mistake of the function's own
    assert not is_vectorization_refusal(error)
    assert not is_vectorization_refusal(ValueError("shapes do not match"))


def test_root_cause_name_is_the_innermost_errors_type() -> None:
    inner = KeyError("x")
    middle = ValueError("middle")
    middle.__cause__ = inner
    outer = RuntimeError("outer")
    outer.__cause__ = middle
    assert root_cause_name(outer) == "KeyError"
    assert root_cause_name(inner) == "KeyError"


class _Doubled(nn.Module):
    """A parametrization that computes a new tensor."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return 2 * weight


def test_parametrize_cache_state_is_readable_and_makes_one_tensor_per_pass() -> None:
    layer = nn.Linear(3, 3)
    parametrize.register_parametrization(layer, "weight", _Doubled())
    assert not parametrization_cache_enabled()
    assert layer.weight is not layer.weight  # recomputed on every access
    with parametrize.cached():
        assert parametrization_cache_enabled()
        assert layer.weight is layer.weight  # what lets a site be recognized by its weight's identity
    assert not parametrization_cache_enabled()


def test_pruning_hooks_name_the_tensor_they_recompute() -> None:
    layer = nn.Linear(4, 3)
    prune.l1_unstructured(layer, "weight", amount=0.5)
    prune.random_unstructured(layer, "bias", amount=0.3)
    hooks = [hook for hook in forward_pre_hooks(layer) if isinstance(hook, BasePruningMethod)]
    assert [pruned_tensor_name(hook) for hook in hooks] == ["weight", "bias"]
    assert hasattr(layer, "weight_orig") and hasattr(layer, "bias_orig")


@pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated:FutureWarning")
def test_forward_pre_hooks_are_the_modules_own_in_order_with_torchs_reparametrizations_as_instances() -> None:
    layer = nn.utils.weight_norm(nn.Linear(4, 3))
    prune.l1_unstructured(layer, "bias", amount=0.5)
    nn.utils.spectral_norm(layer, "weight_v")

    def mine(module: nn.Module, args: Any) -> None:
        return None

    handle = layer.register_forward_pre_hook(mine)
    hooks = forward_pre_hooks(layer)
    assert [type(hook) for hook in hooks[:3]] == [WeightNorm, prune.L1Unstructured, SpectralNorm]
    assert hooks[3] is mine
    assert [isinstance(hook, TORCH_REPARAMETRIZATIONS) for hook in hooks] == [True, True, True, False]
    handle.remove()
    assert mine not in forward_pre_hooks(layer)


def test_forward_hooks_are_the_modules_own() -> None:
    layer = nn.Linear(2, 2)
    assert forward_hooks(layer) == []

    def mine(module: nn.Module, args: Any, output: Any) -> None:
        return None

    handle = layer.register_forward_hook(mine)
    global_handle = nn.modules.module.register_module_forward_hook(mine)
    try:
        assert forward_hooks(layer) == [mine]  # global hooks are not the module's
    finally:
        global_handle.remove()
    handle.remove()
    assert forward_hooks(layer) == []


class _Recorder(TorchFunctionMode):
    """Records the names of the torch functions called under it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types_, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.names.append(op_name(func))
        return func(*args, **(kwargs or {}))


def test_attention_asks_has_torch_function_from_its_globals_and_a_copy_without_it_shows_its_calls() -> None:
    attention = nn.MultiheadAttention(8, 2).eval()
    x = torch.randn(5, 1, 8)
    arguments = (
        x,
        x,
        x,
        8,
        2,
        attention.in_proj_weight,
        attention.in_proj_bias,
        None,
        None,
        False,
        0.0,
        attention.out_proj.weight,
        attention.out_proj.bias,
    )
    function = F.multi_head_attention_forward
    assert "has_torch_function" in function.__code__.co_names and "has_torch_function" in function.__globals__
    with torch.no_grad():
        expected, _ = function(*arguments)
        with _Recorder() as whole:
            function(*arguments)
        assert whole.names == ["multi_head_attention_forward"]  # the mode sees one call ...
        copy = without_torch_function_dispatch(function)
        with _Recorder() as inside:
            result, _ = copy(*arguments)
    assert "linear" in inside.names and "multi_head_attention_forward" not in inside.names  # ... the copy, its calls
    assert torch.equal(result, expected)


def _fused(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A torch function written in Python, like ``F.multi_head_attention_forward``: a mode sees one call."""
    if has_torch_function((x, weight)):
        return handle_torch_function(_fused, (x, weight), x, weight)
    return F.linear(torch.relu(x), weight)


class _Sites(CallInterceptor):
    """Records the names of the calls it handles, and the weights of the sites among them."""

    def __init__(self, index: UnitIndex, **options: Any) -> None:
        super().__init__(index, **options)
        self.names: list[str] = []
        self.sites: list[str] = []

    def on_call(self, func: Any, args: Any, kwargs: Any, site: SiteCall | None) -> Any:
        self.names.append(op_name(func))
        if site is not None:
            self.sites.append(site.unit.name)
        return func(*args, **kwargs)


def test_composites_are_a_frozen_default_that_an_interceptor_can_extend() -> None:
    assert isinstance(COMPOSITES, frozenset) and F.multi_head_attention_forward in COMPOSITES
    model = nn.Module()
    model.proj = nn.Module()
    model.proj.weight = nn.Parameter(torch.randn(3, 4))
    x = torch.randn(2, 4)
    expected = _fused(x, model.proj.weight)
    with _Sites(UnitIndex(model)) as plain:
        plain_result = _fused(x, model.proj.weight)
    assert plain.names == ["fused"] and plain.sites == []  # its linear map is hidden inside it
    with _Sites(UnitIndex(model), composites=COMPOSITES | {_fused}) as seeing:
        seeing_result = _fused(x, model.proj.weight)
    assert seeing.names == ["relu", "linear"] and seeing.sites == ["proj"]
    assert torch.equal(plain_result, expected) and torch.equal(seeing_result, expected)
    assert COMPOSITES == frozenset({F.multi_head_attention_forward})  # the default is unchanged


def test_a_view_knows_its_base_and_a_tensor_that_owns_its_storage_has_none() -> None:
    weight = torch.randn(4, 6)
    assert view_base(weight) is None
    for view in (weight[:2], weight.t(), weight.view(2, 12), weight[:, 1:3]):
        assert view_base(view) is weight
    assert view_base(weight.clone()) is None
    parameter = nn.Parameter(torch.randn(3, 3))
    assert view_base(parameter) is None and view_base(parameter[1:]) is parameter


def test_a_compiled_model_keeps_the_module_it_wraps() -> None:
    model = nn.Sequential(nn.Linear(3, 4))
    compiled = torch.compile(model)  # wrapping is lazy: nothing is compiled until it is called
    assert compiled_original(compiled) is model
    assert compiled_original(model) is None and compiled_original(object()) is None


def test_a_compiled_models_names_are_the_originals_under_its_prefix() -> None:
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 4)), nn.Linear(4, 2))
    compiled = torch.compile(model)
    original_names = {name for name, _ in model.named_modules()} | {name for name, _ in model.named_parameters()}
    compiled_names = {name for name, _ in compiled.named_modules()} | {name for name, _ in compiled.named_parameters()}
    assert {name_in_compiled_original(name) for name in compiled_names} - {None} == original_names
    assert name_in_compiled_original("_orig_mod.0.0.weight") == "0.0.weight"
    assert name_in_compiled_original("_orig_mod") == ""
    assert name_in_compiled_original("0.0") is None and name_in_compiled_original("_orig_modx") is None


def test_global_forward_hooks_are_listed_pre_hooks_first_and_gone_once_removed() -> None:
    before = global_forward_hooks()

    def pre(module: nn.Module, args: Any) -> None:
        return None

    def post(module: nn.Module, args: Any, output: Any) -> None:
        return None

    post_handle = nn.modules.module.register_module_forward_hook(post)
    pre_handle = nn.modules.module.register_module_forward_pre_hook(pre)
    try:
        listed = global_forward_hooks()
        assert pre in listed and post in listed and listed.index(pre) < listed.index(post)
        assert pre not in forward_pre_hooks(nn.Linear(2, 2))  # not a module's own
    finally:
        post_handle.remove()
        pre_handle.remove()
    assert global_forward_hooks() == before


def _checkpointed(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return torch.utils.checkpoint.checkpoint(layer, torch.relu(x), use_reentrant=True)


def test_reentrant_checkpoints_run_as_plain_calls_inside_the_block_and_checkpoint_again_after() -> None:
    torch.manual_seed(0)
    layer, x = nn.Linear(4, 3), torch.randn(5, 4, requires_grad=True)
    real = torch.utils.checkpoint.CheckpointFunction
    # torch's reentrant variant refuses .grad() through it (and gives the weights inside no gradient)
    with pytest.raises(RuntimeError, match="use_reentrant=True"):
        torch.autograd.grad(_checkpointed(layer, x).sum(), [layer.weight, x], allow_unused=True)
    with reentrant_checkpoints_run_plainly():
        with reentrant_checkpoints_run_plainly():  # nested blocks
            output = _checkpointed(layer, x)
        (gradient,) = torch.autograd.grad(output.sum(), [layer.weight])
        with torch.no_grad():
            assert torch.equal(output, layer(torch.relu(x)))
        assert torch.allclose(gradient, torch.relu(x).sum(0).expand(3, 4))
        sequential = torch.utils.checkpoint.checkpoint_sequential(
            nn.Sequential(layer, nn.ReLU()), 2, x, use_reentrant=True
        )
        assert torch.autograd.grad(sequential.sum(), [layer.weight])[0] is not None
    assert torch.utils.checkpoint.CheckpointFunction is real
    with pytest.raises(RuntimeError, match="use_reentrant=True"):
        torch.autograd.grad(_checkpointed(layer, x).sum(), [layer.weight, x], allow_unused=True)


def test_reentrant_checkpoints_keep_checkpointing_on_other_threads() -> None:
    import threading

    layer, x = nn.Linear(4, 3), torch.randn(5, 4, requires_grad=True)
    outcome: list[BaseException | None] = []

    def other_thread() -> None:
        try:
            torch.autograd.grad(_checkpointed(layer, x).sum(), [layer.weight, x], allow_unused=True)
            outcome.append(None)
        except RuntimeError as error:
            outcome.append(error)

    with reentrant_checkpoints_run_plainly():
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert isinstance(outcome[0], RuntimeError) and "use_reentrant=True" in str(outcome[0])
