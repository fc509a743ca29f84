"""The options of ``init_``, ``rescale_`` and ``diagnose``: each declared once, with its check, default and help.

``Options`` is the one declaration. Each field names its keyword (what the
public functions take), its check (``arguments.py``), its default, a one-line
help, whether the report records it, and which commands of the command line
offer it (and how). From it follow:

- the public signatures' defaults (``DEFAULTS``; the signatures themselves stay
  explicit keywords, documented, and a test keeps them equal to this table);
- the checked values of a call (``Options.from_keywords``), grouped as Part 2's
  ``RateOptions`` and ``ScaleOptions``;
- ``report.settings`` (``Options.settings``);
- the command line's flags (``OPTION_SPECS``, ``CommandLine``) and the Lightning
  callback's accepted keywords (``KEYWORDS``).

Adding an option is one field here, one keyword (and its line of docstring) in
the signatures that take it, and the code that uses it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any

from . import arguments
from .distributed import ProcessGroupArg
from .samplers import PATCH_BUDGET_MB, SAMPLERS, Sampler, sampler_name

MIN_RATE_ROUNDS = 2  # rate_max_rounds at least: a second round measures the noise alone where one round's bound misses
SCALE_MODES = ("exact", "approximate")
DIAGNOSE_SEED = 0  # diagnose's default seed: its noise draws change nothing, so it repeats itself by default

LIBRARY_DEFAULT: Any = type("LibraryDefault", (), {"__repr__": lambda self: "LIBRARY_DEFAULT"})()
INIT, RESCALE, DIAGNOSE = "init", "rescale", "diagnose"  # the command line's commands that take options
EVERY_COMMAND = (INIT, RESCALE, DIAGNOSE)


@dataclass(frozen=True)
class CommandLine:
    """How the ``magicinit`` command offers an option.

    Attributes:
        commands: the commands that take it.
        parse: text to value, before the option's check (``int``, ``float``, ``str``); None for flags.
        default: the command line's default where it differs from the library's (``--seed`` is 0).
        metavar: the value's name in ``--help``.
        choices: a function giving the allowed values (read when the parser is built).
        repeat: the flag may be given several times, each adding one value (``--skip``).
        check: the command line's own check where it accepts less than the library (``--seed``: no None).
    """

    commands: tuple[str, ...]
    parse: Callable[[str], Any] | None = None
    default: Any = LIBRARY_DEFAULT
    metavar: str | None = None
    choices: Callable[[], tuple[str, ...]] | None = None
    repeat: bool = False
    check: arguments.Check | None = None


def option(
    default: Any,
    check: arguments.Check,
    help: str,
    *,
    keyword: str | None = None,
    command_line: CommandLine | None = None,
    recorded: bool = True,
    record: Callable[[Any], Any] | None = None,
) -> Any:
    """A field of an options class: its default, check, one-line help, keyword (default: the field's name),
    how the command line offers it (None: not at all), and whether ``report.settings`` records it (as
    ``record(value)`` if given)."""
    metadata = {
        "check": check,
        "help": help,
        "keyword": keyword,
        "command_line": command_line,
        "recorded": recorded,
        "record": record,
    }
    return field(default=default, metadata=metadata)


def _check_fields(instance: Any) -> None:
    """Replace every field of an options instance by its checked value (``MagicInitError`` names the keyword)."""
    for spec in fields(instance):
        if "check" in spec.metadata:
            keyword = spec.metadata["keyword"] or spec.name
            object.__setattr__(instance, spec.name, spec.metadata["check"](keyword, getattr(instance, spec.name)))


@dataclass(frozen=True)
class RateOptions:
    """How change rates are estimated (the ``rate_*`` keywords, ``--rate-*`` flags).

    Attributes:
        chunk_size: samples per noise draw. One sample per draw is the steadiest
            for the cost: in a larger chunk the samples' gradients add up with
            random signs, which adds variance (the reference used batches of 16).
        precision: stop when the standard error of every ``log C_k`` is below this.
        max_rounds: the draws of this many passes over the init data at most (after two passes,
            the chunks that hold most of a layer's gradient are drawn more often than the others).
    """

    chunk_size: int = option(
        1,
        arguments.at_least(1),
        "samples per noise draw for the change rates",
        keyword="rate_chunk_size",
        command_line=CommandLine(EVERY_COMMAND, int),
    )
    precision: float = option(
        0.02,
        arguments.positive,
        "target standard error of each log change rate",
        keyword="rate_precision",
        command_line=CommandLine(EVERY_COMMAND, float),
    )
    max_rounds: int = option(
        16,
        arguments.at_least(MIN_RATE_ROUNDS),
        "at most the draws of this many passes over the data per rate estimate",
        keyword="rate_max_rounds",
        command_line=CommandLine(EVERY_COMMAND, int),
    )

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True)
class ScaleOptions:
    """How Part 2 may rescale (the ``scale_*``, ``verify_rates`` and ``across_normalization`` keywords).

    Attributes:
        mode: ``"exact"`` keeps the network's function (to rounding): every
            operation that is not homogeneous fixes the scales around it.
            ``"approximate"`` also rescales across operations that behave
            homogeneously on the init data within ``tolerance`` (LRN at small
            activations, GELU or tanh near their linear range, ...), in damped
            rounds of measure, solve, apply, until the rates agree; the output
            may then change slightly beyond a global scale (the report says how much).
        tolerance: in ``"approximate"`` mode, the largest relative deviation
            ``||f(r x) - r f(x)|| / ||r f(x)||`` (``r`` = 1/2 and 2, on the init data) of an
            operation tied, and the largest relative output change beyond one global factor
            that the rounds may cause (a step beyond it is undone and halved).
        max_rounds: rounds of measure-solve-apply at most in ``"approximate"`` mode.
        verify: measure the rates again after an exact rescaling. By default they are
            predicted: an exact rescaling moves every rate by a known factor (``"approximate"``
            mode always measures).
        across_normalization: also rescale the layers whose output a normalization layer
            (batch, layer, group, instance, RMS norm) normalizes, scaling its ``eps`` and
            running statistics to match. Off by default: such a layer's rate is then free, and
            Part 2 sets it to what the layers that are not normalized allow, which in a
            batch-norm net is the head's rate; that slowed every convolution and cost 11.6
            points in ``bench/train.py --experiment batch-norm``.
    """

    mode: str = option(
        "exact",
        arguments.one_of(SCALE_MODES),
        "Part 2: 'exact' keeps the function; 'approximate' also rescales across operations "
        "homogeneous on the data within --scale-tolerance",
        keyword="scale_mode",
        command_line=CommandLine((INIT, RESCALE), str, choices=lambda: SCALE_MODES),
    )
    tolerance: float = option(
        0.05,
        arguments.fraction,
        "largest deviation from homogeneity of an operation rescaled across in 'approximate' "
        "mode, and largest output change beyond a global factor its rounds may cause",
        keyword="scale_tolerance",
        command_line=CommandLine((INIT, RESCALE), float),
    )
    max_rounds: int = option(
        6,
        arguments.at_least(1),
        "at most this many rescaling rounds in 'approximate' mode",
        keyword="scale_max_rounds",
        command_line=CommandLine((INIT, RESCALE), int),
    )
    verify: bool = option(
        False,
        arguments.flag,
        "measure the change rates again after an exact rescaling (default: predicted)",
        keyword="verify_rates",
        command_line=CommandLine((INIT, RESCALE)),
    )
    across_normalization: bool = option(
        False,
        arguments.flag,
        "Part 2 also rescales layers whose outputs a normalization layer normalizes "
        "(default: a normalization fixes its input's scale)",
        command_line=CommandLine((INIT, RESCALE)),
    )

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True)
class Options:
    """Every option of ``init_`` (``rescale_`` and ``diagnose`` take a subset), checked.

    Build one with ``Options.from_keywords`` from the keywords of a call; the
    groups ``rates`` and ``scaling`` are what Part 2's passes read.
    """

    sampler: str | Sampler = option(
        "gaussian",
        arguments.sampler,
        "how filters are drawn",
        command_line=CommandLine((INIT,), str, choices=lambda: _sampler_names()),
        record=sampler_name,
    )
    within: bool = option(True, arguments.flag, "run Part 1", command_line=CommandLine((INIT,)))
    between: bool = option(True, arguments.flag, "run Part 2", command_line=CommandLine((INIT,)))
    beta: float = option(0.0, arguments.finite, "channel mean after Part 1", command_line=CommandLine((INIT,), float))
    seed: int | None = option(
        None,
        arguments.seed,
        "seed of all random draws",
        command_line=CommandLine(EVERY_COMMAND, int, default=0, check=arguments.seed_integer),
    )
    samples: int = option(256, arguments.at_least(1), "init samples used", command_line=CommandLine(EVERY_COMMAND, int))
    sample_dim: int = option(
        0,
        arguments.at_least(0),
        "the dimension of each input tensor that indexes samples: 1 for torch's sequence-first transformer "
        "layers (batch_first=False)",
    )
    forward: Callable[..., Any] | None = option(
        None, arguments.optional_callable, "forward(model, batch)", recorded=False
    )
    skip: str | list[str] = option(
        (),
        arguments.names,
        "leave this layer (qualified module or parameter name, or module prefix) as it is; repeatable",
        recorded=False,
        command_line=CommandLine(EVERY_COMMAND, str, metavar="NAME", repeat=True),
    )
    include_frozen: bool = option(
        False,
        arguments.flag,
        "also work on layers whose weight has requires_grad=False",
        recorded=False,
        command_line=CommandLine((INIT, RESCALE)),
    )
    progress: bool = option(
        False, arguments.flag, "show progress bars", recorded=False, command_line=CommandLine(EVERY_COMMAND)
    )
    patch_budget_mb: float = option(
        PATCH_BUDGET_MB,
        arguments.positive,
        "memory one layer's input patches may take, for data-driven samplers",
        command_line=CommandLine((INIT,), float),
    )
    rates: RateOptions = field(default_factory=RateOptions)
    scaling: ScaleOptions = field(default_factory=ScaleOptions)
    process_group: ProcessGroupArg = option(
        "default", arguments.anything, "processes that initialize together", recorded=False
    )

    def __post_init__(self) -> None:
        _check_fields(self)

    @classmethod
    def from_keywords(cls, keywords: Mapping[str, Any]) -> Options:
        """The checked options of a call, from its keywords (``rate_chunk_size=...``, ...); keywords not
        given take their defaults. A bad value raises ``MagicInitError`` naming the keyword."""
        by_keyword = {spec.keyword: spec for spec in OPTION_SPECS}
        unknown = sorted(set(keywords) - set(by_keyword))
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(map(repr, unknown))}")
        groups: dict[str, dict[str, Any]] = {"": {}}
        for keyword, value in keywords.items():
            spec = by_keyword[keyword]
            groups.setdefault(spec.group, {})[spec.attribute] = value
        top = groups.pop("")
        for name, group_keywords in groups.items():
            top[name] = _GROUPS[name](**group_keywords)
        return cls(**top)

    def keywords(self) -> dict[str, Any]:
        """Every option as the keyword a public function takes, with its value."""
        return {spec.keyword: spec.value(self) for spec in OPTION_SPECS}

    def settings(self) -> dict[str, Any]:
        """What ``report.settings`` records of these options (by keyword)."""
        return {spec.keyword: spec.recorded_value(self) for spec in OPTION_SPECS if spec.recorded}


_GROUPS: dict[str, type] = {"rates": RateOptions, "scaling": ScaleOptions}  # Options' fields that are groups


def _sampler_names() -> tuple[str, ...]:
    """The registered samplers' names, read when the command line's parser is built."""
    return tuple(sorted(SAMPLERS))


@dataclass(frozen=True)
class OptionSpec:
    """One option as the rest of the library sees it: where it lives in ``Options`` and what it declares."""

    keyword: str
    group: str  # "" for a field of Options itself, else the group's field name ("rates", "scaling")
    attribute: str
    default: Any
    check: arguments.Check
    help: str
    command_line: CommandLine | None
    recorded: bool
    record: Callable[[Any], Any] | None

    def value(self, options: Options) -> Any:
        """This option's value in ``options``."""
        holder = getattr(options, self.group) if self.group else options
        return getattr(holder, self.attribute)

    def recorded_value(self, options: Options) -> Any:
        """The value as ``report.settings`` records it."""
        value = self.value(options)
        return self.record(value) if self.record is not None else value

    @property
    def flag(self) -> str:
        """The command line's flag: ``--rate-chunk-size``; ``--no-within`` for an option that is on by default."""
        name = self.keyword.replace("_", "-")
        return f"--no-{name}" if self.default is True else f"--{name}"


def _specs(cls: type, group: str = "") -> Iterator[OptionSpec]:
    for spec in fields(cls):
        if spec.name in _GROUPS:
            yield from _specs(_GROUPS[spec.name], spec.name)
            continue
        meta = spec.metadata
        default = spec.default
        assert default is not MISSING and not is_dataclass(default), spec.name
        yield OptionSpec(
            keyword=meta["keyword"] or spec.name,
            group=group,
            attribute=spec.name,
            default=default,
            check=meta["check"],
            help=meta["help"],
            command_line=meta["command_line"],
            recorded=meta["recorded"],
            record=meta["record"],
        )


OPTION_SPECS: tuple[OptionSpec, ...] = tuple(_specs(Options))
KEYWORDS: tuple[str, ...] = tuple(spec.keyword for spec in OPTION_SPECS)  # what init_ takes besides model and data
DEFAULTS = Options()
