"""The ``magicinit`` command: init, rescale, diagnose, demo.

Exit codes: 0 success, 2 usage error (bad arguments, a MODEL that names
nothing, an output that would replace an input, a ``--skip`` name the model
lacks), 1 failure (unreadable file, bad data, an error in the model), with a
one-line message on stderr; ``--debug`` shows the traceback instead. An
output that would replace an input is refused before anything is read, a
``--skip`` name before the data is read. ``--quiet`` prints nothing but errors.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import Diagnosis, MagicInitError, Report, diagnose, init_, rescale_
from .._core import arguments
from .._core.adapters import find_affine_layers
from .._core.arguments import Check, InvalidOption
from .._core.options import DIAGNOSE, INIT, LIBRARY_DEFAULT, OPTION_SPECS, RESCALE
from .._core.session import check_skip_names, original_module
from .demo import DemoSettings, TrainingRun, run_demo
from .nets import ZOO, build_model
from .plots import first_convolution, plot_filters, plot_layer_statistics, require_matplotlib
from .readers import BUILT_IN, data_path, image_files, is_image_file_name, load_images

__all__ = ["build_parser", "load_model", "load_weights", "main", "save_weights"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """An argument that names nothing usable (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error (and a pointer to --help) instead of the whole usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"depth\": 16}'")
    return value


# how argparse names a value it cannot parse
_TYPE_NAMES: dict[Callable[[str], Any], str] = {int: "integer", float: "number", str: "text"}


def _checked(parse: Callable[[str], Any], check: Check, name: str) -> Callable[[str], Any]:
    """A flag's text to its value: parsed (``int``, ``float``, ...), then checked as the library checks it."""

    def value(text: str) -> Any:
        parsed = parse(text)
        try:
            return check(name, parsed)
        except InvalidOption as error:
            raise argparse.ArgumentTypeError(f"{text}: {error.expected}") from None

    value.__name__ = _TYPE_NAMES.get(parse, parse.__name__)
    return value


def _add_library_options(parser: argparse.ArgumentParser, command: str) -> None:
    """The flags of the library's options that ``command`` takes, as ``options.py`` declares them
    (``--rate-chunk-size`` for ``rate_chunk_size``, ``--no-within`` for an option on by default)."""
    for spec in OPTION_SPECS:
        line = spec.command_line
        if line is None or command not in line.commands:
            continue
        default = spec.default if line.default is LIBRARY_DEFAULT else line.default
        if line.parse is None:  # a flag: it turns the default over
            action, words = ("store_false", f"do not {spec.help}") if default else ("store_true", spec.help)
            parser.add_argument(spec.flag, dest=spec.keyword, action=action, help=words)
        elif line.repeat:
            parser.add_argument(
                spec.flag,
                dest=spec.keyword,
                type=_checked(line.parse, line.check or spec.check, spec.keyword),
                action="append",
                default=[],
                metavar=line.metavar,
                help=spec.help,
            )
        else:
            shown = f"{default:g}" if isinstance(default, float) else default
            parser.add_argument(
                spec.flag,
                dest=spec.keyword,
                type=_checked(line.parse, line.check or spec.check, spec.keyword),
                default=default,
                choices=line.choices() if line.choices is not None else None,
                metavar=line.metavar,
                help=f"{spec.help} (default {shown})",
            )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``magicinit`` command."""
    parser = _Parser(
        prog="magicinit",
        description="Data-dependent initialization of PyTorch networks (Kraehenbuehl et al., ICLR 2016).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = _Parser(add_help=False)  # parents of the subcommands' parsers, which are _Parsers too
    common.add_argument("--quiet", action="store_true", help="print nothing but errors")
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")

    model = _Parser(add_help=False)
    model.add_argument(
        "model",
        metavar="MODEL",
        help=f"'package.module:factory', 'torchvision:NAME', 'timm:NAME', or a built-in: {', '.join(ZOO)}",
    )
    model.add_argument(
        "--model-args",
        type=_json_object,
        default={},
        metavar="JSON",
        help="keyword arguments of the factory, as a JSON object",
    )
    model.add_argument("--device", default="cpu", help="where to run (default cpu; e.g. cuda)")
    model.add_argument(
        "--data",
        required=True,
        metavar="DATA",
        help=f"folder or .tar/.tar.gz of images, .npy/.npz/.pt file, idx file, or a built-in: {', '.join(BUILT_IN)}",
    )
    model.add_argument("--data-key", metavar="KEY", help="the array of an .npz, or the entry of a .pt dict/tuple")
    model.add_argument(
        "--input-size",
        type=_checked(int, arguments.at_least(1), "input_size"),
        metavar="PIXELS",
        help="resize images to this square size (needed for a folder of images)",
    )
    model.add_argument(
        "--channels",
        type=int,
        choices=(1, 3),
        help="read images as grayscale (1) or RGB (3); default: the model's first layer's inputs",
    )
    model.add_argument(
        "--no-standardize",
        dest="standardize",
        action="store_false",
        help="keep the data's values (default: every channel mean 0, std 1)",
    )
    model.add_argument("--report", type=Path, metavar="FILE.json", help="also write the report as JSON")
    model.add_argument("--plot", type=Path, metavar="FILE.png", help="also draw the per-layer statistics")
    model.add_argument(
        "--plot-filters",
        type=Path,
        metavar="FILE.png",
        help="also draw the first convolution's filters (as the command leaves them)",
    )

    init = commands.add_parser(
        "init",
        parents=[common, model],
        help="initialize a model, write its weights",
        description="Parts 1 and 2 of the method: initialize MODEL on DATA, write the weights.",
    )
    init.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="WEIGHTS",
        help="where to write the state_dict (torch.save; .safetensors by suffix)",
    )
    init.add_argument("--weights", type=Path, metavar="FILE", help="start from these weights (for --sampler keep)")
    _add_library_options(init, INIT)

    rescale = commands.add_parser(
        "rescale",
        parents=[common, model],
        help="Part 2 only: equalize change rates of trained weights",
        description="Rescale trained weights so all layers learn at the same rate, keeping the network's function.",
    )
    rescale.add_argument("--weights", type=Path, required=True, metavar="FILE", help="the trained weights")
    rescale.add_argument("--out", type=Path, required=True, metavar="WEIGHTS", help="where to write the result")
    _add_library_options(rescale, RESCALE)

    diag = commands.add_parser(
        "diagnose",
        parents=[common, model],
        help="per-layer statistics of a model",
        description="The channel-std spread and change rates of MODEL on DATA; "
        "nothing is written but the optional report and plot.",
    )
    diag.add_argument("--weights", type=Path, metavar="FILE", help="load these weights first")
    _add_library_options(diag, DIAGNOSE)

    demo = commands.add_parser(
        "demo",
        parents=[common],
        help="train a deep plain CNN on digits with 3 inits",
        description="The main job on built-in defaults: a plain 20-layer CNN without batch "
        "norm trained on scikit-learn's digits from torch's default init, "
        "kaiming normal and magicinit, at every learning rate and from several seeds.",
    )
    defaults = DemoSettings()
    demo.add_argument("--progress", action="store_true", help="show progress bars")
    demo.add_argument(
        "--seed",
        type=_checked(int, arguments.seed_integer, "seed"),
        default=defaults.seed,
        help=f"seed of all random draws (default {defaults.seed})",
    )
    demo.add_argument(
        "--out-dir", type=Path, default=Path("magicinit-demo"), help="where the figures go (default ./magicinit-demo)"
    )
    demo.add_argument(
        "--depth",
        type=_checked(int, arguments.at_least(2), "depth"),
        default=defaults.depth,
        help=f"affine layers (default {defaults.depth})",
    )
    demo.add_argument(
        "--epochs",
        type=_checked(int, arguments.at_least(1), "epochs"),
        default=defaults.epochs,
        help=f"training epochs (default {defaults.epochs})",
    )
    demo.add_argument(
        "--learning-rates",
        type=_checked(float, arguments.positive, "learning_rate"),
        nargs="+",
        default=list(defaults.learning_rates),
        metavar="LR",
        help=f"SGD learning rates (default {' '.join(map(str, defaults.learning_rates))})",
    )
    demo.add_argument(
        "--seeds",
        type=_checked(int, arguments.at_least(1), "seeds"),
        default=defaults.seeds,
        help=f"runs per init and learning rate, seeded SEED, SEED + 1, ... (default {defaults.seeds}; "
        f"torch's default init: the first {defaults.seeds_torch_default})",
    )
    demo.add_argument("--no-plots", dest="plots", action="store_false", help="write no figures")
    return parser


def _first_in_channels(model: nn.Module) -> int | None:
    for module in find_affine_layers(model).values():
        return getattr(module, "in_channels", None)  # a conv's; None for a linear layer
    return None


def _refused_arguments(spec: str, error: TypeError) -> UsageError | None:
    """A usage error naming ``--model-args`` where the factory refused one of them, else None."""
    if "unexpected keyword argument" in str(error) or "got an unexpected" in str(error):
        return UsageError(f"--model-args: model {spec!r} does not take them ({error})")
    return None


def _torchvision_model(spec: str, name: str, model_args: dict[str, Any]) -> nn.Module:
    """``torchvision:NAME``: ``torchvision.models.get_model(NAME, weights=None, **model_args)``."""
    try:
        import torchvision
    except ImportError:
        raise MagicInitError(f"model {spec!r} needs torchvision: pip install torchvision") from None
    try:
        return torchvision.models.get_model(name, weights=None, **model_args)
    except ValueError as error:
        raise UsageError(f"model {spec!r}: {error}") from None


def _timm_model(spec: str, name: str, model_args: dict[str, Any]) -> nn.Module:
    """``timm:NAME``: ``timm.create_model(NAME, pretrained=False, **model_args)``."""
    try:
        import timm
    except ImportError:
        raise MagicInitError(f"model {spec!r} needs timm: pip install timm") from None
    if not timm.is_model(name):
        raise UsageError(f"model {spec!r}: timm has no model {name!r} (timm.list_models() names them)")
    return timm.create_model(name, pretrained=False, **model_args)


# Model specs "SOURCE:NAME" from a model library, by SOURCE: each builds NAME with random weights.
MODEL_SOURCES: dict[str, Callable[[str, str, dict[str, Any]], nn.Module]] = {
    "torchvision": _torchvision_model,
    "timm": _timm_model,
}


def load_model(spec: str, model_args: dict[str, Any]) -> nn.Module:
    """The model named by ``spec``: a built-in name, ``torchvision:NAME``, ``timm:NAME`` or
    ``package.module:factory``."""
    try:
        with _importable_working_directory():
            return _load_model(spec, model_args)
    except TypeError as error:
        refused = _refused_arguments(spec, error)
        if refused is not None:
            raise refused from None
        raise


def _load_model(spec: str, model_args: dict[str, Any]) -> nn.Module:
    if spec in ZOO:
        unknown = sorted(set(model_args) - set(inspect.signature(ZOO[spec]).parameters))
        if unknown and not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(ZOO[spec]).parameters.values()):
            raise UsageError(
                f"--model-args: model {spec!r} does not take {', '.join(map(repr, unknown))} "
                f"(it takes {', '.join(inspect.signature(ZOO[spec]).parameters)})"
            )
        return build_model(spec, **model_args)
    source, _, name = spec.partition(":")
    if source in MODEL_SOURCES:
        return MODEL_SOURCES[source](spec, name, model_args)
    if ":" not in spec:
        raise UsageError(
            f"model {spec!r}: not a built-in ({', '.join(ZOO)}), 'torchvision:NAME', 'timm:NAME' "
            "or 'package.module:factory'"
        )
    module_name, factory_name = spec.split(":", 1)
    if not module_name or not factory_name:
        raise UsageError(f"model {spec!r}: expected 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise UsageError(f"model {spec!r}: module {module_name!r} cannot be imported ({error})") from None
    except Exception as error:  # a module that fails on import
        raise MagicInitError(
            f"model {spec!r}: importing {module_name} failed: {type(error).__name__}: {error}"
        ) from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise UsageError(f"model {spec!r}: {module_name} has no callable {factory_name!r}")
    try:
        built = factory(**model_args)
    except TypeError as error:
        raise _refused_arguments(spec, error) or MagicInitError(
            f"model {spec!r}: the factory raised TypeError: {error}"
        ) from None
    except Exception as error:
        raise MagicInitError(f"model {spec!r}: the factory raised {type(error).__name__}: {error}") from None
    if not isinstance(built, nn.Module):
        raise MagicInitError(f"model {spec!r}: the factory returned {type(built).__name__}, not an nn.Module")
    return built


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a ``state_dict`` (torch.save or .safetensors) into ``model``; errors name the file."""
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_model as load_safetensors
        except ImportError:
            raise MagicInitError(
                f"weights {str(path)!r}: reading .safetensors needs: pip install safetensors"
            ) from None
        try:  # load_model restores weights that save_model stored once for several tied parameters
            load_safetensors(model, str(path), device=str(next(model.parameters(), torch.empty(0)).device))
        except Exception as error:
            raise MagicInitError(f"weights {str(path)!r} cannot be loaded: {' '.join(str(error).split())}") from None
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for a bad file
        raise MagicInitError(f"weights {str(path)!r} cannot be read: {error}") from None
    for key in ("state_dict", "model"):  # common checkpoint layouts
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise MagicInitError(f"weights {str(path)!r}: expected a state_dict, found {type(state).__name__}")
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise MagicInitError(f"weights {str(path)!r} do not fit the model: {' '.join(str(error).split())}") from None


def save_weights(model: nn.Module, path: Path) -> None:
    """Write the model's ``state_dict`` (as CPU tensors) with torch.save, or as .safetensors by suffix; the
    model stays where it is."""
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import save_model
        except ImportError:
            raise MagicInitError(f"writing {str(path)!r} needs: pip install safetensors") from None
        save_model(model, str(path))  # it copies every tensor to the CPU itself
    else:
        torch.save({name: value.detach().cpu() for name, value in model.state_dict().items()}, path)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Torch's global generators (CPU and every visible CUDA device) seeded with ``seed`` for the block
    (layers the model's factory initializes at random are the same on every run), and as they were after it."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


@contextmanager
def _importable_working_directory() -> Iterator[None]:
    """The working directory on ``sys.path`` for the block (factories there, as ``python -m`` finds them),
    and ``sys.path`` as it was after it."""
    folder = str(Path.cwd())
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)


def _check_skip(model: nn.Module, skip: list[str]) -> None:
    """``--skip`` checked as the library checks ``skip``: a name the model lacks is a usage error naming it and
    the model's names closest to it."""
    for name in skip:
        try:
            check_skip_names(model, [name])
        except MagicInitError:
            original = original_module(model)
            names = [module for module, _ in original.named_modules() if module]
            names += [parameter for parameter, _ in original.named_parameters(remove_duplicate=False)]
            close = difflib.get_close_matches(name, names, n=3)
            hint = f"; close: {', '.join(map(repr, close))}" if close else ""
            raise UsageError(f"--skip {name!r}: the model has no module or parameter of that name{hint}") from None


def _prepare(args: argparse.Namespace) -> tuple[nn.Module, torch.Tensor]:
    """The model (weights loaded, on ``--device``) and the init data; ``--skip`` is checked against the model
    before the data is read."""
    model_args = dict(args.model_args)
    model: nn.Module | None = None
    channels = args.channels
    if not (args.model in ZOO and "in_channels" not in model_args):
        with _seeded(args.seed):
            model = load_model(args.model, model_args)
        channels = channels or _first_in_channels(model) or 3
    if args.skip:
        named = model
        if named is None:  # a zoo net built on the meta device (no memory, no random draws) has the names it will have
            with torch.device("meta"):
                named = load_model(args.model, model_args)
        _check_skip(named, args.skip)
    images = load_images(
        args.data,
        samples=args.samples,
        seed=args.seed,
        input_size=args.input_size,
        channels=channels or 3,
        key=args.data_key,
        standardize=args.standardize,
    )
    if model is None:  # a zoo net takes the data's channels unless told otherwise
        if images.dim() >= 3:
            model_args["in_channels"] = images.shape[1]
        with _seeded(args.seed):
            model = load_model(args.model, model_args)
    if getattr(args, "weights", None) is not None:
        load_weights(model, args.weights)
    if args.plot_filters is not None:
        _check_filters_drawable(model, args.plot_filters)
    return model.to(_device(args.device)), images


def _check_filters_drawable(model: nn.Module, path: Path) -> None:
    """``--plot-filters`` needs a 2-d convolution: a model without one is a usage error before any work."""
    try:
        first_convolution(model)
    except MagicInitError as error:
        raise UsageError(f"--plot-filters {path}: {error}") from None


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UsageError(f"--device {name!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MagicInitError(f"--device {name}: torch sees no CUDA device here (torch {torch.__version__})")
    return device


def _check_output(path: Path | None, option: str, suffixes: set[str] | None = None) -> None:
    """Before any work: ``path`` must be a writable file name in an existing, writable folder."""
    if path is None:
        return
    if path.is_dir():
        raise UsageError(f"{option} {path}: is a folder; give a file name")
    if not path.parent.is_dir():
        raise UsageError(f"{option} {path}: the folder {str(path.parent)!r} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: the folder {str(path.parent)!r} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{option} {path}: the file exists and is not writable")
    if suffixes is not None and path.suffix.lower().lstrip(".") not in suffixes:
        raise UsageError(f"{option} {path}: the file type must be one of {', '.join(sorted(suffixes))}")


def _same_file(first: Path, second: Path) -> bool:
    """Whether two paths name one file: the same path once symlinks and ``..`` are resolved, or, where both
    exist, one file under two names (a hard link)."""
    if first.resolve() == second.resolve():
        return True
    try:
        return first.exists() and second.exists() and os.path.samefile(first, second)
    except OSError:
        return False


def _check_distinct(outputs: dict[str, Path | None]) -> None:
    """Two options naming one file would overwrite each other: a usage error."""
    given = [(option, path) for option, path in outputs.items() if path is not None]
    for index, (option, path) in enumerate(given):
        for earlier, earlier_path in given[:index]:
            if _same_file(earlier_path, path):
                raise UsageError(f"{earlier} and {option} name the same file {path}; give each its own")


def _model_module_file(spec: str) -> Path | None:
    """The file in the working directory that MODEL ``module:factory`` imports its module from, if any."""
    if spec in ZOO or ":" not in spec:
        return None
    module_name = spec.split(":", 1)[0]
    parts = module_name.split(".")
    if module_name in MODEL_SOURCES or not all(parts):
        return None
    candidates = (Path(*parts[:-1], f"{parts[-1]}.py"), Path(*parts, "__init__.py"))
    return next((path for path in candidates if path.is_file()), None)


def _in_image_folder(path: Path, folder: Path) -> bool:
    """Whether ``path`` would be read as one of the images of the data folder ``folder``: an image file name
    inside it, or an existing file that is one of its images under another name."""
    if not is_image_file_name(path):
        return False
    if path.resolve().is_relative_to(folder.resolve()):
        return True
    return path.exists() and any(_same_file(path, image) for image in image_files(folder))


def _check_inputs_kept(args: argparse.Namespace, outputs: dict[str, Path | None]) -> None:
    """Before anything is read: an output that would replace an input (``--weights``, ``--data``, MODEL's module
    file), or add an image to the ``--data`` folder, is a usage error."""
    inputs: dict[str, Path] = {}
    module_file = _model_module_file(args.model)
    if module_file is not None:
        inputs[f"MODEL {args.model!r}"] = module_file
    data = data_path(args.data)
    data_folder = data if data is not None and data.is_dir() else None
    if data is not None and data_folder is None:
        inputs["--data"] = data
    if args.weights is not None:
        inputs["--weights"] = args.weights
    for option, path in outputs.items():
        if path is None:
            continue
        for source, input_path in inputs.items():
            if _same_file(path, input_path):
                raise UsageError(
                    f"{option} {path}: is the file {source} reads ({input_path}); writing it would destroy that "
                    f"input: give {option} another name"
                )
        if data_folder is not None and _in_image_folder(path, data_folder):
            raise UsageError(
                f"{option} {path}: is an image in the --data folder {data_folder}, which a later run would read "
                f"as data: write {option} elsewhere"
            )


@contextmanager
def _staged(outputs: list[Path]) -> Iterator[dict[Path, Path]]:
    """Temporary files beside ``outputs`` (same folder, same suffix) to write to; each is moved into place
    only when the block ends without error, all of them then. After an error or Ctrl-C none of the
    outputs is touched and the temporary files are gone."""
    staged: dict[Path, Path] = {}
    umask = os.umask(0)
    os.umask(umask)
    try:
        for path in outputs:
            handle, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
            os.close(handle)
            staged[path] = Path(name)
            os.chmod(name, 0o666 & ~umask)  # the permissions a plainly written file gets (mkstemp's are 0600)
        yield staged
        for path, temporary in staged.items():
            os.replace(temporary, path)
    finally:
        for temporary in staged.values():
            temporary.unlink(missing_ok=True)


def _figure_types() -> set[str]:
    from matplotlib.backend_bases import FigureCanvasBase

    return set(FigureCanvasBase.get_supported_filetypes())


def _emit(args: argparse.Namespace, result: Report | Diagnosis, title: str, model: nn.Module) -> None:
    """Write the outputs asked for (weights, report, plot, filters), all or none, then print the result."""
    out = getattr(args, "out", None)
    outputs = [path for path in (out, args.report, args.plot, args.plot_filters) if path is not None]
    with _staged(outputs) as staged:
        if out is not None:
            save_weights(model, staged[out])
        if args.report is not None:
            staged[args.report].write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        if args.plot is not None:
            plot_layer_statistics(result, staged[args.plot], title=title)
        if args.plot_filters is not None:
            plot_filters(model, staged[args.plot_filters], title=title)
    if not args.quiet:
        print(result)


def _library_options(args: argparse.Namespace) -> dict[str, Any]:
    """The library's options that the command line gave (every flag ``_add_library_options`` added)."""
    options = {spec.keyword: getattr(args, spec.keyword) for spec in OPTION_SPECS if hasattr(args, spec.keyword)}
    options["progress"] = options["progress"] and not args.quiet
    return options


def _write_weights(args: argparse.Namespace, model: nn.Module, report: Report) -> None:
    _emit(args, report, f"magicinit {args.command} {args.model}", model)
    if not args.quiet:
        print(f"wrote {args.out}")
    if report.normalizations and not args.quiet:  # the one change a state_dict does not carry
        eps = ", ".join(f"{name}={values['eps']:.3g}" for name, values in list(report.normalizations.items())[:4])
        more = ", ..." if len(report.normalizations) > 4 else ""
        print(
            f"magicinit: warning: {len(report.normalizations)} normalization layer(s) need their new eps, which "
            f"{args.out} (a state_dict) does not hold: {eps}{more}; all of them are in the report "
            "(--report, 'normalizations')",
            file=sys.stderr,
        )


def _run_init(args: argparse.Namespace) -> None:
    model, images = _prepare(args)
    report = init_(model, images, **_library_options(args))
    _write_weights(args, model, report)


def _run_rescale(args: argparse.Namespace) -> None:
    model, images = _prepare(args)
    report = rescale_(model, images, **_library_options(args))
    _write_weights(args, model, report)


def _run_diagnose(args: argparse.Namespace) -> None:
    model, images = _prepare(args)
    _emit(args, diagnose(model, images, **_library_options(args)), f"magicinit diagnose {args.model}", model)


def _run_demo(args: argparse.Namespace) -> None:
    settings = DemoSettings(
        depth=args.depth,
        epochs=args.epochs,
        learning_rates=tuple(args.learning_rates),
        seeds=args.seeds,
        seed=args.seed,
    )

    def say(text: str) -> None:
        if not args.quiet:
            print(text, flush=True)

    def on_run(run: TrainingRun) -> None:
        accuracy = "diverged" if run.diverged else f"{100 * run.test_accuracy:5.1f}%"
        say(
            f"  {run.init:<15} lr {run.learning_rate:<6g} seed {run.seed:<3} test accuracy {accuracy}  "
            f"({run.train_seconds:.1f} s)"
        )

    seeds, default_seeds = (", ".join(map(str, settings.run_seeds(init))) for init in ("magicinit", "torch default"))
    epochs = f"{settings.epochs} epoch" + ("s" if settings.epochs != 1 else "")
    say(
        f"Training a plain {settings.depth}-layer ReLU CNN (width {settings.width}, no batch norm) on scikit-learn's "
        f"digits, {epochs}, SGD momentum 0.9, batch {settings.batch_size}, learning rates "
        f"{', '.join(map(str, settings.learning_rates))}, seeds {seeds} (torch default: {default_seeds}):"
    )
    start = time.perf_counter()
    report, runs, table = run_demo(
        settings, args.out_dir if args.plots else None, on_run, args.progress and not args.quiet
    )
    say(f"\nmagicinit.init_ report (seed {settings.seed}):\n{report}")
    say("\n" + table)
    say(f"\n{len(runs)} runs in {time.perf_counter() - start:.0f} s")
    if args.plots:
        say(f"wrote {args.out_dir / 'loss_curves.png'} and {args.out_dir / 'layer_statistics.png'}")


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "init": _run_init,
    "rescale": _run_rescale,
    "diagnose": _run_diagnose,
    "demo": _run_demo,
}


@contextmanager
def _warnings_to_stderr(quiet: bool) -> Iterator[None]:
    """Warnings as one ``magicinit: warning:`` line each, as they come (none with --quiet)."""

    def show(message: Warning | str, *_: object, **__: object) -> None:
        text = " ".join(str(message).split()).removeprefix("magicinit: ")
        print(f"magicinit: warning: {text}", file=sys.stderr)

    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        warnings.showwarning = show
        yield


def main(argv: list[str] | None = None) -> int:
    """Run the ``magicinit`` command with ``argv`` (default: the process's arguments); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with 2 on a usage error
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.WARNING, format="magicinit: %(message)s")
    try:
        if args.command == "demo":
            if args.plots:
                require_matplotlib("the demo's figures (or pass --no-plots)")
                if args.out_dir.exists() and not args.out_dir.is_dir():
                    raise UsageError(f"--out-dir {args.out_dir}: is a file, not a folder")
        else:
            for option, figure in (("--plot", args.plot), ("--plot-filters", args.plot_filters)):
                if figure is not None:
                    require_matplotlib(f"{option} {figure}")
                    _check_output(figure, option, _figure_types())
            _check_output(getattr(args, "out", None), "--out")
            _check_output(args.report, "--report")
            outputs = {
                "--out": getattr(args, "out", None),
                "--report": args.report,
                "--plot": args.plot,
                "--plot-filters": args.plot_filters,
            }
            _check_distinct(outputs)
            _check_inputs_kept(args, outputs)
        with _warnings_to_stderr(args.quiet):
            COMMANDS[args.command](args)
    except UsageError as error:
        if args.debug:
            raise
        print(f"magicinit {args.command}: error: {error} (see magicinit {args.command} --help)", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("magicinit: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # every failure becomes one line; --debug shows the traceback
        if args.debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        if not isinstance(error, (MagicInitError, OSError)):
            message = f"{type(error).__name__}: {message}"
        print(f"magicinit: error: {message}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK
