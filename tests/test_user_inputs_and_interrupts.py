"""What real users pass, and interrupts at any instant: every bad argument refused by name before any work,
Ctrl-C at any instant (no hook left, the model whole or untouched), batches as users hold them, a model's own
forward (casts, randomness, opaque outputs), wrappers and no-grad modes, extreme magnitudes, and the command
line's usage errors and all-or-nothing outputs."""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import magicinit
from conftest import (
    assert_no_trace,
    assert_same_state,
    assert_unit_channels,
    assert_untouched,
    plain_cnn,
    state_copy,
)
from magicinit import MagicInitError
from magicinit._core import safety

# --- 1. every argument checked up front, by name -----------------------------------------------------------

BAD_ARGUMENTS = [
    ("samples", 2.5),
    ("samples", True),
    ("samples", 0),
    ("beta", "0.1"),
    ("beta", math.inf),
    ("beta", True),
    ("seed", True),
    ("seed", 2**70),
    ("seed", -1),
    ("seed", 1.0),
    ("skip", None),
    ("skip", [3]),
    ("skip", 5),
    ("patch_budget_mb", math.inf),
    ("patch_budget_mb", 0),
    ("rate_chunk_size", 2.5),
    ("rate_precision", -1),
    ("rate_precision", math.nan),
    ("rate_max_rounds", 1),
    ("sampler", ["kmeans"]),
    ("sampler", None),
    ("within", "yes"),
    ("between", 1),
    ("include_frozen", None),
    ("progress", "no"),
    ("verify_rates", 0),
    ("scale_mode", ["exact"]),
    ("scale_mode", "fast"),
    ("scale_tolerance", 1.0),
    ("scale_tolerance", "0.1"),
    ("forward", "model"),
    ("across_normalization", 1),
    ("across_normalization", "no"),
]


@pytest.mark.parametrize("name,value", BAD_ARGUMENTS, ids=[f"{n}={v!r}" for n, v in BAD_ARGUMENTS])
def test_every_bad_argument_of_init_is_a_magicinit_error_naming_it(name: str, value: object) -> None:
    model = plain_cnn(3)
    saved = state_copy(model)
    with pytest.raises(MagicInitError, match=f"^{name}="):
        magicinit.init_(model, torch.randn(4, 3, 8, 8), **{name: value})
    assert_untouched(model, saved)


@pytest.mark.parametrize("function", ["rescale_", "diagnose"])
@pytest.mark.parametrize(
    "name,value",
    [
        ("samples", 2.5),
        ("seed", 2**70),
        ("skip", None),
        ("rate_chunk_size", 2.5),
        ("rate_max_rounds", "3"),
        ("progress", 1),
    ],
)
def test_rescale_and_diagnose_check_their_arguments_too(function: str, name: str, value: object) -> None:
    with pytest.raises(MagicInitError, match=f"^{name}="):
        getattr(magicinit, function)(plain_cnn(3), torch.randn(4, 3, 8, 8), **{name: value})


def test_numpy_numbers_are_accepted_where_python_numbers_are() -> None:
    report = magicinit.init_(
        plain_cnn(3),
        torch.randn(8, 3, 8, 8),
        samples=np.int64(8),
        beta=np.float32(0.1),
        seed=np.int64(3),
        rate_precision=np.float64(0.05),
    )
    assert report.settings["samples"] == 8


# --- 6. Ctrl-C at any instant ---------------------------------------------------------------------------


@pytest.fixture
def ctrl_c() -> object:
    """SIGINT raising KeyboardInterrupt, as in an interactive Python, for the test's duration (a process
    started in the background by a shell without job control, like some CI runners, ignores SIGINT)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_an_interrupt_during_hook_removal_waits_until_every_hook_is_removed(monkeypatch, ctrl_c) -> None:
    model = plain_cnn(4)
    saved = state_copy(model)
    original_remove = torch.utils.hooks.RemovableHandle.remove
    sent = []

    def remove_with_ctrl_c(handle: torch.utils.hooks.RemovableHandle) -> None:
        if not sent:  # Ctrl-C arrives while the first hook is being removed
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        original_remove(handle)

    monkeypatch.setattr(torch.utils.hooks.RemovableHandle, "remove", remove_with_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        magicinit.init_(model, torch.randn(16, 3, 8, 8), seed=0)
    monkeypatch.undo()
    assert sent
    assert_untouched(model, saved)


@pytest.mark.slow
def test_ctrl_c_at_random_instants_never_leaves_hooks_or_a_half_initialized_model(ctrl_c) -> None:
    model = plain_cnn(5)
    x = torch.randn(32, 3, 8, 8)
    saved = state_copy(model)
    magicinit.init_(model, x, seed=0)
    done = state_copy(model)  # what a whole run gives (seeded: the same every time)
    model.load_state_dict(saved)
    start = time.perf_counter()
    magicinit.init_(model, x, seed=0)  # a second call (the first pays one-time costs) ...
    duration = time.perf_counter() - start  # ... times the instants, however fast this machine is
    interrupted = 0
    for delay in np.random.default_rng(0).uniform(0.0, 1.25 * duration, size=40):
        model.load_state_dict(saved)
        timer = threading.Timer(float(delay), lambda: os.kill(os.getpid(), signal.SIGINT))
        raised = False
        try:
            timer.start()
            magicinit.init_(model, x, seed=0)
            timer.cancel()
            timer.join()
        except KeyboardInterrupt:  # the one signal of this round: none can follow
            timer.join()
            interrupted += 1
            raised = True
        assert_no_trace(model)
        # a call that raised left the model as it was (even where the signal came after the passes, while
        # the report was built); one that returned left it whole: never anything in between
        expected = saved if raised else done
        state = model.state_dict()
        assert all(torch.equal(state[name], expected[name]) for name in expected), (delay, raised)
    assert interrupted >= 10  # most instants fall inside the call


class Counted(nn.Module):
    """A plain CNN with a weight-norm layer (its weight an attribute its hook recomputes) and a buffer its
    forward updates."""

    def __init__(self) -> None:
        super().__init__()
        self.net = plain_cnn(3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm: deprecated, still used
            self.head = nn.utils.weight_norm(nn.Linear(5, 4))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.head(self.net(x))


@pytest.mark.parametrize("entry", ["init_", "rescale_"])
@pytest.mark.parametrize("where", ["while the report is built", "at the end of the buffers' restore"])
def test_a_ctrl_c_after_the_passes_leaves_the_model_as_it_was(monkeypatch, entry: str, where: str) -> None:
    from magicinit._core import initialize

    model = Counted()
    saved = state_copy(model)
    weight = model.head.weight.detach().clone()  # the weight-norm hook's attribute, not in the state dict
    hooks = {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in model.named_modules()}
    if where == "while the report is built":

        def interrupted_report(*args: object, **kwargs: object) -> None:
            raise KeyboardInterrupt

        monkeypatch.setattr(initialize, "_build_report", interrupted_report)
    else:  # as a Ctrl-C that arrived while the buffers were put back is raised at the end (uninterrupted)
        restore_buffers = safety.ModelSnapshot.restore_buffers

        def then_interrupted(snapshot: safety.ModelSnapshot) -> None:
            restore_buffers(snapshot)
            raise KeyboardInterrupt

        monkeypatch.setattr(safety.ModelSnapshot, "restore_buffers", then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        getattr(magicinit, entry)(model, torch.randn(16, 3, 8, 8), seed=0)
    monkeypatch.undo()
    assert_same_state(model, saved)
    assert torch.equal(model.head.weight, weight)
    assert hooks == {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in model.named_modules()}
    assert all(m.training for m in model.modules()) and all(p.requires_grad for p in model.parameters())
    done = getattr(magicinit, entry)(model, torch.randn(16, 3, 8, 8), seed=0)  # the same call, left alone
    assert done.rate_spread_after is not None and not all(
        torch.equal(tensor, saved[name]) for name, tensor in model.state_dict().items() if name != "calls"
    )


def test_uninterrupted_hands_a_deferred_ctrl_c_to_the_previous_handler(ctrl_c) -> None:
    with pytest.raises(KeyboardInterrupt):
        with safety.uninterrupted():
            os.kill(os.getpid(), signal.SIGINT)
            done = True  # reached: the signal waits for the block's end
    assert done
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# --- 2. batches as users hold them -----------------------------------------------------------------------

Pair = collections.namedtuple("Pair", ["image", "label"])


def test_a_namedtuple_batch_reaches_forward_as_that_namedtuple() -> None:
    seen = []

    def forward(model: nn.Module, batch: Pair) -> torch.Tensor:
        seen.append(type(batch))
        return model(batch.image)

    data = [Pair(torch.randn(8, 3, 8, 8), torch.arange(8)), Pair(torch.randn(8, 3, 8, 8), torch.arange(8))]
    magicinit.init_(plain_cnn(3), data, forward=forward, seed=0)
    assert seen and set(seen) == {Pair}


@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    extra: str = "kept"


class DataclassOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = plain_cnn(4)

    def forward(self, x: torch.Tensor) -> Output:
        return Output(self.net(x))


def test_a_dataclass_output_is_understood() -> None:
    model = DataclassOutput()
    report = magicinit.init_(model, torch.randn(32, 3, 8, 8), seed=0, rate_precision=0.05)
    assert report.rate_spread_after is not None and report.rate_spread_after < 1.2


def test_an_output_without_tensors_names_its_type_and_the_remedy() -> None:
    class Opaque:
        def __init__(self, value: torch.Tensor) -> None:
            self.value = value

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = plain_cnn(3)

        def forward(self, x: torch.Tensor) -> Opaque:
            return Opaque(self.net(x))

    model = Wrapped()
    saved = state_copy(model)
    with pytest.raises(MagicInitError, match=r"output \(Opaque\) holds no floating tensor .* forward=lambda"):
        magicinit.init_(model, torch.randn(8, 3, 8, 8), seed=0, within=False)
    assert_untouched(model, saved)


def test_a_list_of_inputs_and_targets_is_one_batch_not_two() -> None:
    images, labels = torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))
    seen = []
    model = plain_cnn(3)
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    magicinit.init_(model, [images, labels], seed=0)  # what next(iter(loader)) gives
    assert all(shape[1:] == (3, 8, 8) for shape in seen)  # the labels never reached the model


def test_a_list_of_same_shaped_tensors_is_batches_with_a_warning() -> None:
    with pytest.warns(UserWarning, match="taken as that many batches"):
        report = magicinit.init_(plain_cnn(3), [torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8)], seed=0)
    assert report is not None


# --- 3. the model's own forward --------------------------------------------------------------------------


class CastsItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = plain_cnn(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float())


def test_a_forward_that_casts_its_input_is_checked_in_its_own_precision() -> None:
    model = CastsItsInput()
    x = torch.randn(32, 3, 8, 8)
    with torch.no_grad():
        for conv in model.net:
            if isinstance(conv, nn.Conv2d):
                conv.weight.mul_(3.0)
        before = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = magicinit.rescale_(model, x, seed=0, rate_precision=0.05)
    with torch.no_grad():
        assert (model(x) - before).norm() / before.norm() < 1e-4
    assert report.rate_spread_after < report.rate_spread_before


class RandomForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = plain_cnn(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.dropout(self.net(x), 0.5, training=True)  # dropout forced on


def test_a_random_forward_is_named_as_the_cause() -> None:
    model = RandomForward()
    saved = state_copy(model)
    with pytest.warns(RuntimeWarning, match="the forward is not repeatable.*dropout forced on"):
        magicinit.rescale_(model, torch.randn(16, 3, 8, 8), seed=0, rate_precision=0.1, rate_max_rounds=2)
    assert_untouched(model, saved)


class CountsCalls(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = plain_cnn(3)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1  # updated even in eval mode
        return self.net(x)


def test_diagnose_leaves_buffers_that_forward_updates_as_they_were() -> None:
    model = CountsCalls()
    magicinit.diagnose(model, torch.randn(8, 3, 8, 8))
    assert int(model.calls) == 0


def test_a_user_hook_on_a_module_is_reported() -> None:
    model = plain_cnn(3)
    model[0].register_forward_hook(lambda module, args, output: output * 2)
    report = magicinit.init_(model, torch.randn(8, 3, 8, 8), seed=0)
    assert any("forward hooks of your own on '0'" in note for note in report.notes)


# --- 4. wrappers and modes -------------------------------------------------------------------------------


def test_a_scripted_model_gets_a_clear_message() -> None:
    scripted = torch.jit.script(plain_cnn(3))
    with pytest.raises(MagicInitError, match=r"TorchScript module .* initialize the Python module first"):
        magicinit.init_(scripted, torch.randn(4, 3, 8, 8))


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_calls_under_no_grad_or_inference_mode_work(mode) -> None:
    model = plain_cnn(4)
    with mode():
        x = torch.randn(16, 3, 8, 8)
        report = magicinit.init_(model, x, seed=0, rate_precision=0.05)
    assert report.rate_spread_after < 1.2
    reference = plain_cnn(4)
    magicinit.init_(reference, x.clone(), seed=0, rate_precision=0.05)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    assert all(not torch.is_inference(p) for p in model.parameters())


def test_a_call_inside_autocast_initializes_the_weights_its_caller_then_computes_with() -> None:
    # autocast keeps the low-precision copy of every weight it casts until its region ends: magicinit's
    # passes used to compute with the weights as they were before it wrote them (Part 1's channel means
    # 10 off), and the caller's next forward in the region too
    x = torch.randn(32, 3, 8, 8)
    reference = plain_cnn(4)
    expected = magicinit.init_(reference, x, seed=0)
    model = plain_cnn(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)  # the caller's forward, before: autocast holds its casts of the weights
        report = magicinit.init_(model, x, seed=0)
        assert torch.is_autocast_enabled("cpu")  # the caller's region goes on
        inside = model(x).float()
    assert report.to_dict()["layers"] == expected.to_dict()["layers"]  # the passes ran as without autocast
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fresh = model(x).float()  # a new region casts the weights as they are now
    assert torch.equal(inside, fresh)  # the caller's region computed with the weights magicinit wrote
    within_only = plain_cnn(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        within_only(x)
        report = magicinit.init_(within_only, x, seed=0, between=False)
    assert_unit_channels(within_only, x, report)  # Part 1's targets, measured here with hooks, in float32


class AutocastInside(nn.Module):
    """A net whose forward enters autocast itself (as ``@torch.autocast`` on a forward does)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3), nn.Linear(16, 5)

    @torch.autocast("cpu", dtype=torch.bfloat16)
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3)))


def test_a_forward_that_enters_autocast_itself_inside_the_callers_region_sees_the_written_weights() -> None:
    # the caller's region keeps the cache of the forward's own regions alive between magicinit's passes: a
    # later pass used to compute with the weights as an earlier one saw them (channel means 0.25 and 5.9)
    x = torch.randn(32, 3, 10, 10)
    model = AutocastInside()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = magicinit.init_(model, x, seed=0, between=False)
    means = {}
    hooks = [
        getattr(model, name).register_forward_hook(
            lambda module, args, output, name=name: means.__setitem__(
                name, float(output.float().transpose(0, 1).reshape(output.shape[1], -1).mean(1).abs().max())
            )
        )
        for name in "abc"
    ]
    with torch.no_grad():
        model(x)  # measured here, as the model computes (in bfloat16)
    for hook in hooks:
        hook.remove()
    assert all(entry.status == "initialized" for entry in report.layers)
    assert max(means.values()) < 0.05, means  # bfloat16's rounding, not a stale weight


def test_autocast_enabled_answers_on_torch_before_2_4(monkeypatch) -> None:
    from magicinit._core import session

    def without_argument(*args: object) -> bool:  # torch < 2.4: no device type; it answers for CUDA
        if args:
            raise TypeError("is_autocast_enabled() takes 0 positional arguments but 1 was given")
        return False

    with torch.autocast("cpu", dtype=torch.bfloat16):  # (torch's own autocast asks with a device type)
        monkeypatch.setattr(torch, "is_autocast_enabled", without_argument)
        assert session.autocast_enabled("cpu") and not session.autocast_enabled("cuda")
        monkeypatch.undo()
    monkeypatch.setattr(torch, "is_autocast_enabled", without_argument)
    assert not session.autocast_enabled("cpu") and not session.autocast_enabled("xpu")


class LazyCounter(nn.Module):
    """A plain CNN that registers a call counter on its first forward."""

    def __init__(self) -> None:
        super().__init__()
        self.net = plain_cnn(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "calls" not in self._buffers:
            self.register_buffer("calls", torch.zeros(()))
        self.calls += 1
        return self.net(x)


@pytest.mark.parametrize("entry", ["init_", "diagnose"])
def test_a_buffer_the_first_forward_registers_is_put_back_as_the_tracing_pass_left_it(entry: str) -> None:
    # the call's one snapshot is taken before the tracing pass registers it: it is recorded when the passes
    # start (the passes' 10 forwards were left in it)
    model = LazyCounter()
    getattr(magicinit, entry)(model, torch.randn(8, 3, 8, 8), seed=0)
    assert float(model.calls) == 1.0


# --- 5. precision extremes -------------------------------------------------------------------------------


def test_bfloat16_layers_with_a_large_fan_in_are_not_declared_constant() -> None:
    model = nn.Sequential(nn.Linear(1024, 16), nn.ReLU(), nn.Linear(16, 4)).to(torch.bfloat16)
    report = magicinit.init_(model, torch.randn(64, 1024), seed=0, between=False)
    assert report["0"].zero_variance_channels == []
    with torch.no_grad():
        out = model[0](torch.randn(64, 1024, dtype=torch.bfloat16)).float()
    assert 0.7 < float(out.std(0).mean()) < 1.4  # measured here: every channel normalized


@pytest.mark.parametrize("magnitude", [1e-30, 1e30])
def test_data_of_extreme_magnitude_is_normalized(magnitude: float) -> None:
    model = plain_cnn(4)
    x = torch.randn(32, 3, 8, 8) * magnitude
    magicinit.init_(model, x, seed=0, between=False)
    stds = []
    hooks = [
        m.register_forward_hook(lambda module, args, out: stds.append(out.double().std(dim=(0, 2, 3)).mean()))
        for m in model
        if isinstance(m, nn.Conv2d)
    ]
    with torch.no_grad():
        before = model(x)
    for hook in hooks:
        hook.remove()
    assert len(stds) == 3 and all(0.8 < float(s) < 1.25 for s in stds), stds  # measured here: unit std at every conv
    # Part 2 on such data: finite rates, equalized, the function kept
    report = magicinit.rescale_(model, x, seed=0, rate_precision=0.05)
    assert report.rate_spread_before is not None and math.isfinite(report.rate_spread_before)
    assert report.rate_spread_after is not None and report.rate_spread_after < 1.2
    with torch.no_grad():
        after = model(x)
    assert float((after - before).norm() / before.norm()) < 1e-4


# --- 7. the command line ---------------------------------------------------------------------------------


def _cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "magicinit", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd)


SMALL = [
    "--model-args",
    '{"depth": 4, "width": 4}',
    "--rate-precision",
    "0.2",
    "--rate-max-rounds",
    "2",
    "--samples",
    "16",
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra,message",
    [
        (["--out", "w.pt", "--report", "w.pt"], "--out and --report name the same file w.pt"),
        (["--out", "w.pt", "--report", "./sub/../w.pt"], "name the same file"),
        (
            ["--out", "w.pt", "--seed", str(2**70)],
            "--seed: 1180591620717411303424: must be an integer in [0, 2**63 - 1]",
        ),
        (["--out", "w.pt", "--seed", "-3"], "--seed: -3: must be an integer in"),
        (["--out", "w.pt", "--model-args", '{"depht": 4}'], "--model-args: model 'plain-cnn' does not take 'depht'"),
    ],
)
def test_output_and_argument_mistakes_are_usage_errors_before_any_work(
    extra: list[str], message: str, tmp_path: Path
) -> None:
    (tmp_path / "sub").mkdir()
    result = _cli("init", "plain-cnn", "--data", "smooth", *SMALL, *extra, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]
    assert list((tmp_path / "sub").iterdir()) == []


def test_an_output_folder_that_is_not_writable_is_a_usage_error(monkeypatch, tmp_path: Path, capsys) -> None:
    from magicinit.tools import cli

    (tmp_path / "locked").mkdir()
    locked = str(tmp_path / "locked")
    real_access = os.access
    monkeypatch.setattr(cli.os, "access", lambda path, mode: False if str(path) == locked else real_access(path, mode))
    code = cli.main(["init", "plain-cnn", "--data", "smooth", *SMALL, "--out", str(tmp_path / "locked" / "w.pt")])
    assert code == 2
    assert f"the folder {locked!r} is not writable" in capsys.readouterr().err
    assert list((tmp_path / "locked").iterdir()) == []


@pytest.mark.slow
def test_a_failure_after_the_work_leaves_no_output_at_all(tmp_path: Path) -> None:
    # the plot fails while being drawn (a figure type matplotlib refuses late): the weights and the
    # report, already computed, must not appear either, nor any temporary file
    (tmp_path / "fail_plot.py").write_text(
        "import sys, runpy\n"
        "import magicinit.tools.cli as cli\n"
        "def broken(*args, **kwargs):\n"
        "    raise OSError('disk full while drawing')\n"
        "cli.plot_layer_statistics = broken\n"
        "sys.argv = ['magicinit', *sys.argv[1:]]\n"
        "raise SystemExit(cli.main())\n"
    )
    command = [
        sys.executable,
        "fail_plot.py",
        "init",
        "plain-cnn",
        "--data",
        "smooth",
        *SMALL,
        "--out",
        "w.pt",
        "--report",
        "r.json",
        "--plot",
        "p.png",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 1 and "disk full while drawing" in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fail_plot.py"]


@pytest.mark.slow
def test_an_existing_output_is_replaced_whole_or_kept(tmp_path: Path) -> None:
    (tmp_path / "w.pt").write_bytes(b"old weights")
    result = _cli("init", "plain-cnn", "--data", "smooth", *SMALL, "--out", "w.pt", "--report", "r.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    state = torch.load(tmp_path / "w.pt")
    assert isinstance(state, dict) and state
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "w.pt"]
    (tmp_path / "plain").write_text("")  # a file written plainly: the outputs get its permissions
    assert (tmp_path / "w.pt").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777


@pytest.mark.slow
def test_data_of_huge_values_is_standardized_without_blaming_nan(tmp_path: Path) -> None:
    np.save(tmp_path / "huge.npy", (np.random.default_rng(0).standard_normal((16, 3, 8, 8)) * 1e25).astype(np.float32))
    result = _cli("init", "plain-cnn", "--data", "huge.npy", *SMALL, "--out", "w.pt", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "NaN" not in result.stderr
