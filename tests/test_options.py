"""The options, declared once in ``magicinit._core.options``: the public signatures, the command line, the
Lightning callback and the report all follow that table; the command line leaves no global state behind;
the package's modules import one another without a cycle."""

from __future__ import annotations

import ast
import inspect
import random
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import magicinit
from conftest import assert_same_state, plain_cnn, state_copy
from magicinit import MagicInitError
from magicinit._core.options import (
    DEFAULTS,
    DIAGNOSE,
    DIAGNOSE_SEED,
    INIT,
    KEYWORDS,
    LIBRARY_DEFAULT,
    OPTION_SPECS,
    RESCALE,
    Options,
)
from magicinit.tools.cli import build_parser, main, save_weights

PACKAGE = Path(magicinit.__file__).parent
ENTRY_POINTS = {INIT: magicinit.init_, RESCALE: magicinit.rescale_, DIAGNOSE: magicinit.diagnose}
# what each entry point does not take: Part 1's options for rescale_; diagnose changes nothing
NOT_TAKEN = {
    INIT: set(),
    RESCALE: {"sampler", "within", "between", "beta", "patch_budget_mb"},
    DIAGNOSE: {
        "sampler",
        "within",
        "between",
        "beta",
        "patch_budget_mb",
        "include_frozen",
        "scale_mode",
        "scale_tolerance",
        "scale_max_rounds",
        "verify_rates",
        "across_normalization",
    },
}
OWN_DEFAULTS = {DIAGNOSE: {"seed": DIAGNOSE_SEED}}  # the one documented difference


def _keyword_defaults(function: object) -> dict[str, object]:
    parameters = inspect.signature(function).parameters.values()  # type: ignore[arg-type]
    return {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


@pytest.mark.parametrize("command", [INIT, RESCALE, DIAGNOSE])
def test_every_signature_takes_the_declared_options_with_the_declared_defaults(command: str) -> None:
    function = ENTRY_POINTS[command]
    expected = {spec.keyword: spec.default for spec in OPTION_SPECS if spec.keyword not in NOT_TAKEN[command]}
    expected.update(OWN_DEFAULTS.get(command, {}))
    signature = _keyword_defaults(function)
    assert set(signature) == set(expected)
    for keyword, default in expected.items():
        assert signature[keyword] == default or (tuple(signature[keyword]) == tuple(default) == ()), keyword
    documented = function.__doc__ or ""
    if command == INIT:  # init_ documents each option; the others refer to it
        missing = [k for k in expected if f"        {k}:" not in documented]
        assert not missing, f"init_'s docstring does not document {missing}"


def test_the_command_line_offers_each_option_its_table_names_and_no_other() -> None:
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for command in (INIT, RESCALE, DIAGNOSE):
        flags = {flag for action in commands[command]._actions for flag in action.option_strings}
        for spec in OPTION_SPECS:
            offered = spec.command_line is not None and command in spec.command_line.commands
            assert (spec.flag in flags) == offered, (command, spec.flag)
            if offered:
                action = next(a for a in commands[command]._actions if spec.flag in a.option_strings)
                assert action.dest == spec.keyword
                line = spec.command_line
                assert line is not None
                default = spec.default if line.default is LIBRARY_DEFAULT else line.default
                assert action.default == default or (action.default == [] and default == ()), spec.flag


def test_a_bad_value_on_the_command_line_is_refused_with_the_librarys_words(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["init", "plain-cnn", "--data", "smooth", "--out", "w.pt", "--scale-max-rounds", "0"])
    assert exit_.value.code == 2
    assert "--scale-max-rounds: 0: must be an integer of at least 1" in capsys.readouterr().err


def test_options_check_every_value_and_name_the_keyword() -> None:
    with pytest.raises(MagicInitError, match=r"scale_max_rounds=0: must be an integer of at least 1"):
        magicinit.init_(plain_cnn(3), torch.randn(8, 3, 8, 8), scale_max_rounds=0)
    with pytest.raises(MagicInitError, match=r"rate_max_rounds=1: must be an integer of at least 2"):
        Options.from_keywords({"rate_max_rounds": 1})
    with pytest.raises(TypeError, match="unknown option"):
        Options.from_keywords({"sampels": 3})
    assert Options.from_keywords({"samples": 12}).samples == 12
    assert Options.from_keywords({}) == DEFAULTS


def test_a_forward_that_cannot_take_model_and_batch_is_refused_by_name_before_anything_runs() -> None:
    model = plain_cnn(3)
    saved = state_copy(model)
    calls: list[int] = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    # it was called, and its TypeError read as the model rejecting the init data
    refused = r"forward=<function .*: must take two positional arguments, \(model, batch\)"
    with pytest.raises(MagicInitError, match=refused):
        magicinit.init_(model, torch.randn(8, 3, 8, 8), forward=lambda net: net)
    with pytest.raises(MagicInitError, match=r"missing a required argument: 'scale'"):
        magicinit.rescale_(model, torch.randn(8, 3, 8, 8), forward=lambda net, batch, scale: net(batch * scale))
    assert not calls
    assert_same_state(model, saved)
    # defaults after the two, *args, and callables whose signature cannot be read are taken
    for forward in (lambda net, batch, scale=1.0: net(batch * scale), lambda *args: args[0](args[1])):
        magicinit.init_(model, torch.randn(8, 3, 8, 8), forward=forward, seed=0, between=False)
    assert Options.from_keywords({"forward": max}).forward is max


def _lrn_net_with_rates_far_apart() -> nn.Sequential:
    """Rates far apart across two LRNs (homogeneous at these activations), which leave exact mode no scale
    free: approximate mode needs several rounds, each changing a scale by at most 2x."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.LocalResponseNorm(5, alpha=1e-4),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.LocalResponseNorm(5, alpha=1e-4),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 5),
    )
    with torch.no_grad():
        net[0].weight.mul_(0.05)
        net[3].weight.mul_(20)
        for layer in (net[0], net[3], net[7]):
            layer.bias.zero_()
    return net


@pytest.mark.slow
def test_scale_max_rounds_is_honoured_and_recorded() -> None:
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    unlimited = magicinit.init_(_lrn_net_with_rates_far_apart(), x, seed=0, within=False, scale_mode="approximate")
    assert unlimited.scale_rounds is not None and unlimited.scale_rounds >= 2
    report = magicinit.init_(
        _lrn_net_with_rates_far_apart(), x, seed=0, within=False, scale_mode="approximate", scale_max_rounds=1
    )
    assert report.settings["scale_max_rounds"] == 1 and report.scale_rounds == 1
    assert any("scale_max_rounds=1 rounds were made" in note for note in report.notes), report.notes
    assert report.rate_spread_after is not None and unlimited.rate_spread_after is not None
    assert report.rate_spread_after > 10 * unlimited.rate_spread_after


def test_report_settings_are_the_recorded_options_as_passed() -> None:
    passed = {"samples": 16, "rate_chunk_size": 2, "scale_tolerance": 0.1, "scale_max_rounds": 3, "beta": 0.25}
    report = magicinit.init_(plain_cnn(3), torch.randn(16, 3, 8, 8), seed=1, **passed)
    recorded = {spec.keyword for spec in OPTION_SPECS if spec.recorded}
    assert recorded <= set(report.settings)
    assert {k: report.settings[k] for k in passed} == passed
    assert report.settings["seed"] == 1 and report.settings["sampler"] == "gaussian"
    unrecorded = {spec.keyword for spec in OPTION_SPECS if not spec.recorded}
    assert not unrecorded & set(report.settings)


def test_the_lightning_callback_takes_every_option_of_init() -> None:
    lightning = pytest.importorskip("magicinit.lightning")
    callback = lightning.MagicInitCallback(**{k: DEFAULTS.keywords()[k] for k in KEYWORDS if k != "seed"})
    assert set(callback.init_options) == set(KEYWORDS)


def test_save_weights_leaves_the_model_where_it_is(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    moved: list[object] = []

    class Recording(nn.Sequential):
        def to(self, *args: object, **kwargs: object) -> nn.Module:  # type: ignore[override]
            moved.append(args)
            return super().to(*args, **kwargs)  # type: ignore[arg-type]

    model = Recording(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    save_weights(model, tmp_path / "w.safetensors")
    save_weights(model, tmp_path / "w.pt")
    assert moved == []
    assert (tmp_path / "w.safetensors").stat().st_size > 0 and (tmp_path / "w.pt").stat().st_size > 0


def test_the_command_line_leaves_torch_random_state_and_sys_path_as_they_were(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local_net.py").write_text(
        "import torch.nn as nn\n"
        "def net():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 2))\n"
    )
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    path_before = list(sys.path)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    random_state = random.getstate()

    def init(out: str, *extra: str) -> int:
        arguments = ["init", "local_net:net", "--data", "smooth", "--samples", "8", "--out", out, "--quiet"]
        return main([*arguments, "--seed", "5", *extra])

    code = init("w.pt")
    assert code == 0
    assert torch.equal(torch.get_rng_state(), state)
    assert random.getstate() == random_state
    assert sys.path == path_before
    # the factory's own random layers are seeded: two runs write the same weights
    first = torch.load(tmp_path / "w.pt")
    assert init("v.pt", "--no-within", "--no-between") == 0
    assert init("u.pt", "--no-within", "--no-between") == 0
    assert all(
        torch.equal(a, b)
        for a, b in zip(torch.load(tmp_path / "v.pt").values(), torch.load(tmp_path / "u.pt").values())
    )
    assert first.keys() == torch.load(tmp_path / "v.pt").keys()


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports, anywhere in it (inside functions and under
    ``TYPE_CHECKING`` too: a cycle there is still a cycle in the design)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in modules else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {module for module in found if module in modules and module != name}


def test_the_package_has_no_import_cycle() -> None:
    paths = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {name: _imports(path, set(paths)) for name, path in paths.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for imported in sorted(graph[module]):
            if state.get(imported) == 1:
                cycle = stack[stack.index(imported) :] + [imported]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if imported not in state:
                visit(imported)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert "magicinit._core.options" in graph and len(graph) > 20
