"""The ``fedcl`` command: ``simulate``, ``submit``, ``compare``, ``sync``, ``strategies``,
``certs``, ``superexec`` and ``config``.

Every :class:`~fedcl.config.Config` field is a flag of ``simulate`` and ``config``
(``dirichlet_alpha`` -> ``--dirichlet-alpha``); ``--config FILE`` loads a TOML file first and
flags override it. Problems the user can fix print one line, ``fedcl: error: ...``, and exit
non-zero.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import textwrap
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

from fedcl.config import (
    FIELDS,
    PARAM_TABLES,
    RESUME_KEY,
    Config,
    config_from_dict,
    field_type,
    load_toml,
    parse_param,
    resolve_tracking_uri,
)
from fedcl.errors import ConfigError, FedclError, OutputInUse, Terminated, one_line
from fedcl.processes import OutputOwner
from fedcl.run_clock import RunClock
from fedcl.signals import TerminationSignals


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage dump
        raise ConfigError(message)


def _scalar(typ: type, name: str):  # type: ignore[no-untyped-def]
    def parse(text: str) -> Any:
        if typ is int:
            try:
                return int(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"--{name} needs an integer, got '{text}'"
                                                 ) from None
        if typ is float:
            try:
                return float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"--{name} needs a number, got '{text}'"
                                                 ) from None
        return text

    return parse


def _optional(typ: type, name: str):  # type: ignore[no-untyped-def]
    inner = _scalar(typ, name)

    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "") else inner(text)

    return parse


def _param_flag(flag: str) -> Callable[[str], tuple[str, Any]]:
    def parse(text: str) -> tuple[str, Any]:
        try:
            return parse_param(text)
        except ConfigError:
            raise argparse.ArgumentTypeError(f"{flag} needs KEY=VALUE, got '{text}'") from None

    return parse


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """``--config`` plus one flag per config field (all defaulting to 'not given')."""
    parser.add_argument("--config", metavar="FILE", help="TOML config file (see simulations/)")
    for name, fld in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        helptext = fld.metadata.get("help", "") + _default_text(fld)
        typ, optional = field_type(name)
        if typ is dict:  # strategy_params -> --strategy-param KEY=VALUE (repeatable)
            parser.add_argument(flag.removesuffix("s"), dest=name, action="append",
                                type=_param_flag(flag.removesuffix("s")), metavar="KEY=VALUE",
                                help=helptext, default=argparse.SUPPRESS)
        elif typ is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=helptext)
        else:
            conv = _optional(typ, flag[2:]) if optional else _scalar(typ, flag[2:])
            parser.add_argument(flag, dest=name, type=conv, default=argparse.SUPPRESS,
                                metavar=typ.__name__.upper(), help=helptext)


def _default_text(fld: dataclasses.Field[Any]) -> str:
    """`` (default: X)`` for a config field's help; nothing where there is no fixed default
    (its help says what happens when it is not given)."""
    if fld.default is not dataclasses.MISSING:
        value: Any = fld.default
    elif fld.default_factory is not dataclasses.MISSING:
        value = fld.default_factory()
    else:
        return ""
    if isinstance(value, bool):
        return f" (default: {'on' if value else 'off'})"
    if value is None or value == "" or value == {} or value == []:
        return ""
    return f" (default: {value})".replace("%", "%%")  # argparse formats help with %


def add_erase_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--erase", action="append", metavar="REQUEST", default=None,
                        help="an erasure request, e.g. client=7,after-task=2 (repeatable; "
                             "added to the config's erasures)")


def config_from_args(args: argparse.Namespace, paths: bool = True) -> Config:
    """Defaults, then ``--config``, then flags; checked by :func:`fedcl.run_setup.setup_run`
    (one-line :class:`ConfigError` otherwise), with the paths the run would write when
    ``paths``."""
    config = load_toml(args.config) if args.config else Config()
    overrides: dict[str, Any] = {}
    for name in FIELDS:
        if not hasattr(args, name):
            continue
        value = getattr(args, name)
        if name in PARAM_TABLES:
            overrides[name] = {**getattr(config, name), **dict(value)}
        else:
            overrides[name] = value
    if getattr(args, "erase", None):
        given = overrides.get("erasures", config.erasures)
        overrides["erasures"] = "; ".join([given, *args.erase] if given else args.erase)
    config = config_from_dict(overrides, source="the command line", base=config)
    from fedcl.run_setup import setup_run  # deferred, as every command's modules: pulls torch

    return setup_run(config, paths=paths).config


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedcl", description="Federated continual learning simulator.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sim = sub.add_parser("simulate", help="run a continual federated simulation (Flower + Ray)")
    add_config_flags(sim)
    add_erase_flag(sim)
    sim.add_argument("--verbose", action="store_true", help="show Flower's and Ray's own logs")
    sim.add_argument("--resume", metavar="DIR",
                     help="continue the run whose output folder is DIR (from its checkpoint)")

    cmp_ = sub.add_parser("compare", help="lay the runs of MLflow experiments side by side, "
                                          "labelled by strategy and the settings that differ")
    cmp_.add_argument("--experiment", action="append", metavar="NAME",
                      help=f"MLflow experiment name (default: {Config().experiment}, where "
                           "fedcl simulate logs unless told otherwise); repeat it, or give "
                           "names separated by commas, to compare the runs of several")
    cmp_.add_argument("--tracking-uri", default=None,
                      help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or "
                           "sqlite:///mlflow.db)")
    cmp_.add_argument("--format", choices=("table", "json", "csv"), default="table",
                      help="table (for reading), json or csv (for scripts); "
                           "default: %(default)s")
    cmp_.add_argument("--plot", metavar="FILE",
                      help="also save a bar chart of ACC and forgetting per run (PNG, PDF, "
                           "SVG: by the file's extension)")

    sync = sub.add_parser("sync", help="send to MLflow what a run kept while its tracking "
                                       "server was unreachable")
    sync.add_argument("output_dir", metavar="DIR", help="the run's output folder")
    sync.add_argument("--tracking-uri", default=None,
                      help="send to this tracking URI instead of the run's own")

    sub.add_parser("strategies", help="list the strategies and unlearning methods with their "
                   "parameters, and the models and datasets (built-in and installed plugins)")

    certs = sub.add_parser("certs", help="write a CA, a SuperLink certificate and SuperNode "
                                         "keys for a TLS federation")
    certs.add_argument("output_dir", metavar="DIR", help="folder for the files")
    certs.add_argument("--host", action="append", dest="hosts", metavar="HOST",
                       help="an address or DNS name the SuperLink is reached at (repeatable; "
                            "default 127.0.0.1 and localhost)")
    certs.add_argument("--supernodes", type=int, default=0, metavar="N",
                       help="also write N SuperNode authentication key pairs")

    sx = sub.add_parser("superexec", help="run a SuperNode's ClientApps from a warm process "
                                          "(SuperNode started with --isolation process)")
    sx.add_argument("--runtime-api-address", required=True, metavar="HOST:PORT",
                    help="the SuperNode's Runtime API (its --host and --port)")
    sx.add_argument("--insecure", action="store_true",
                    help="connect to the Runtime API without TLS (it serves on its own host)")
    sx.add_argument("--root-certificates", metavar="FILE",
                    help="CA certificate of a Runtime API served with TLS")

    sm = sub.add_parser("submit", help="run the app on a SuperLink (as `flwr run`), follow it "
                                       "to its end and exit non-zero if it fails")
    sm.add_argument("superlink", nargs="?", metavar="SUPERLINK",
                    help="the SuperLink connection's name in $FLWR_HOME/config.toml (default: "
                         "its [superlink] default)")
    sm.add_argument("--run-config", "-c", action="append", default=[], metavar="'KEY=VALUE ...'",
                    help="run config overrides, as for `flwr run` (strings in quotes: "
                         "\"clients=3 strategy='fedprox'\"); repeatable")
    sm.add_argument("--resume", metavar="DIR",
                    help="continue a stopped run from the checkpoint in its output folder DIR "
                         "(as the ServerApp's host sees it), with its own config: no "
                         "--run-config with it")
    sm.add_argument("--app", default=".", metavar="DIR",
                    help="the Flower App's folder, a checkout of fedcl (default: %(default)s)")
    sm.add_argument("--verbose", action="store_true",
                    help="also show the run's own log (Flower's lines)")

    cfg = sub.add_parser("config", help="print the resolved config as TOML")
    add_config_flags(cfg)
    add_erase_flag(cfg)
    cfg.add_argument("--flower", action="store_true",
                     help="print it as Flower's [tool.flwr.app.config] table instead")
    return parser


def cmd_simulate(args: argparse.Namespace, signals: TerminationSignals | None = None) -> int:
    """Run the simulation. ``signals``: the process's termination signals, taken over here
    (from the main thread): a signal before the run starts ends the command at once with
    "interrupted by SIG... before the run started", wherever it comes; one during the run
    stops it (:func:`fedcl.simulation.simulate`)."""
    signals = signals or TerminationSignals()
    resume: dict[str, Any] | None = None
    config: Config | None = None
    owner: OutputOwner | None = None
    try:
        signals.install()  # a signal from here on ends the command with one line
        clock = RunClock.from_process_start()  # the run's time counts from the process's start
        from fedcl.data.partition import check_partitions  # (imports take seconds: inside
        from fedcl.plugins import build_model, build_scenario  # the try)
        from fedcl.progress import ConsoleWarnings, LiveDisplay, format_matrix
        from fedcl.run_setup import setup_run
        from fedcl.simulation import simulate
        from fedcl.training import resolve_device

        if args.resume:
            from fedcl import checkpoint

            given = ([name for name in FIELDS if hasattr(args, name)]
                     + (["config"] if args.config else []) + (["erase"] if args.erase else []))
            if given:
                raise ConfigError(f"--resume continues the run with its own config; drop "
                                  f"--{given[0].replace('_', '-')}")
            resume = checkpoint.load(args.resume)
            config = checkpoint.config_of(resume)
            folder = Path(args.resume)  # the run goes on in its checkpoint's folder, also
            config.output = str(folder if folder.is_dir() else folder.parent)  # when moved
            config = setup_run(config, resume=True).config
            owner = _claim(config.output, resume, signals)  # refused while the run still goes
        else:
            config = config_from_args(args)
        resolve_device(config.device)
        scenario = build_scenario(config)  # fail on missing data before any process starts
        build_model(config, scenario)  # ... and on a model plugin that cannot be built
        check_partitions(config)  # and on a partition that cannot be made (the clients then
        # read every task's from fedcl's cache)
        if owner is None:
            owner = _claim_new(config, signals)
    except Terminated as stop:
        raise _stopped_before_start(stop, resume, config, owner, args.resume) from None
    # the live display writes to its own copy of the terminal: while the simulation runs,
    # fedcl sends the process's stdout and stderr (Ray's and Flower's chatter) to flower.log
    fedcl_log = logging.getLogger("fedcl")
    console: TextIO | None = None
    display: LiveDisplay | None = None
    warnings: ConsoleWarnings | None = None
    try:
        console = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
        display = LiveDisplay(console, clock)
        warnings = ConsoleWarnings(display)  # fedcl's warnings on the console, not flower.log
        fedcl_log.addHandler(warnings)
        summary = simulate(config, observer=display, verbose=args.verbose, resume=resume,
                           signals=signals, owner=owner, clock=clock)
    except Terminated as stop:
        if stop.detail:  # simulate said what the signal left
            raise
        # a signal in the instants between the checks above and the simulation's start
        raise _stopped_before_start(stop, resume, config, owner, args.resume) from None
    finally:
        if warnings is not None:
            fedcl_log.removeHandler(warnings)
        if display is not None:
            display.close()
        if console is not None:
            console.close()
    # from here on a signal is only recorded (simulate holds them): the run is over
    print(format_matrix(summary))
    print(f"summary: {summary['output_dir']}/summary.json")
    from fedcl.tracking import where_to_view

    print(f"MLflow run {summary['mlflow_run_id']} in {summary['mlflow_tracking_uri']} "
          f"(experiment '{config.experiment}')")
    for line in where_to_view(summary["mlflow_tracking_uri"],
                              summary.get("mlflow_experiment_id"), summary["mlflow_run_id"]):
        print(line)
    if summary.get("mlflow_outbox"):
        print(f"fedcl: warning: MLflow at {summary['mlflow_tracking_uri']} was unreachable at "
              f"the end; what it lacks is kept in {summary['mlflow_outbox']}: send it with "
              f"`fedcl sync {summary['output_dir']}`", file=sys.stderr)
    if signals.received is not None:
        raise Terminated(signals.received,
                         f" after the run finished; results in {summary['output_dir']}")
    return 0


def _claim(folder: str, resume: dict[str, Any] | None, signals: TerminationSignals
           ) -> OutputOwner:
    """Own the output folder (refused while another run that lives owns it), then stop what
    a killed previous owner left running."""
    with signals.held():
        owner = OutputOwner.claim(folder)
    owner.stop_leftovers([(resume or {}).get("ray_session_dir")])
    return owner


def _claim_new(config: Config, signals: TerminationSignals) -> OutputOwner:
    """Own the output folder of a new run. A folder named by the user is the user's: a live
    owner there is refused. A derived one (``outputs/<strategy>-<scenario>-<UTC second>``,
    no run_name and no output given) may be taken by a run started in the same second (a
    sweep started with ``&``): the next free ``-2``, ``-3``, ... is used instead, and the
    run's name follows it."""
    from fedcl.run_setup import check_output, default_run_name, output_folder

    derived = not config.run_name and not config.output
    base = default_run_name(config)
    for attempt in range(1, 100):
        name = base if attempt == 1 else f"{base}-{attempt}"
        folder = output_folder(config, name)
        try:
            if derived:
                check_output(folder)  # not claimed if it is another run's already
            owner = _claim(str(folder), None, signals)
            try:
                if derived:
                    check_output(folder)  # ... nor if another run made it meanwhile
            except FedclError:
                owner.release()
                raise
        except (ConfigError, OutputInUse):
            if not derived or attempt == 99:
                raise
            continue
        config.run_name, config.output = name, str(folder)
        return owner
    raise AssertionError("unreachable")


def _stopped_before_start(stop: Terminated, resume: dict[str, Any] | None,
                          config: Config | None, owner: OutputOwner | None,
                          resume_path: str | None = None) -> Terminated:
    """A signal before the simulation started: a resumed run's MLflow run, left RUNNING by
    the process that was killed, is marked FAILED once this one owns the folder; a resumed
    run stopped before that (``resume_path``: what ``--resume`` named) says how to go on."""
    if resume is None or owner is None or config is None:
        if resume_path is not None:  # the checkpoint not read or the folder not claimed yet
            return Terminated(stop.signum, f" before the run resumed; `fedcl simulate "
                                           f"--resume {resume_path}` continues it")
        return Terminated(stop.signum, " before the run started")
    from fedcl.tracking import terminate_run  # deferred: it imports mlflow

    detail = ""
    try:
        status = terminate_run(resolve_tracking_uri(config), resume["mlflow_run_id"], "FAILED",
                               str(stop))
        detail = "; the MLflow run is marked FAILED" if status == "FAILED" else ""
    except Exception:
        pass
    return Terminated(stop.signum,
                      f"{detail}; `fedcl simulate --resume {config.output}` continues it")


def cmd_strategies(_: argparse.Namespace) -> int:
    from fedcl import plugins

    print("strategies (--strategy NAME, --strategy-param KEY=VALUE):")
    for name in plugins.strategy_names():
        _print_entry(name, plugins.get_strategy, name in plugins.BUILTIN_STRATEGIES,
                     strategy=True)
    print("\nunlearning methods (--unlearning NAME, --unlearning-param KEY=VALUE):")
    for name in plugins.unlearning_names():
        _print_entry(name, plugins.get_unlearning, name in plugins.BUILTIN_UNLEARNING)
    print("\nmodels (--model NAME):")
    for name in plugins.model_names():
        try:
            model = plugins.get_model(name)
        except ConfigError as err:
            _print_wrapped(name, f"(cannot be loaded: {err})")
            continue
        doc = (model.build.__doc__ or "").strip().split("\n\n")[0]
        note = " Batch norm: cohort_size 1 only." if model.batch_norm else ""
        _print_wrapped(name, " ".join(doc.split()) + note)
    print("\ndatasets (--dataset NAME):")
    for name in plugins.dataset_names():
        try:
            info = plugins.get_dataset(name)
        except ConfigError as err:
            _print_wrapped(name, f"(cannot be loaded: {err})")
            continue
        _print_wrapped(name, f"{info.summary} ({info.num_classes} classes)")
    return 0


LIST_WIDTH = 100  # the width `fedcl strategies` wraps its lines to
NAME_WIDTH = 18  # ... and its column of names


def _print_wrapped(name: str, text: str) -> None:
    """``name`` in its column, then ``text`` wrapped beside it."""
    print(textwrap.fill(f"{name:<{NAME_WIDTH}} {text}", LIST_WIDTH,
                        subsequent_indent=" " * (NAME_WIDTH + 1)))


def _print_entry(name: str, get: Callable[[str], Any], builtin: bool,
                 strategy: bool = False) -> None:
    """One strategy or method: its name and summary, a strategy's scenarios, then one line per
    parameter (``name: type = default  doc``); a plugin that cannot be loaded says why
    instead."""
    from fedcl.plugins import param_docs

    try:
        spec = get(name)
    except ConfigError as err:
        _print_wrapped(name, f"(cannot be loaded: {err})")
        return
    origin = "" if builtin else f" [plugin {spec.build.__module__}]"
    _print_wrapped(name, spec.summary + origin)
    if strategy:  # the scenarios it declares (Capabilities.scenarios)
        from fedcl.run_setup import declared_capabilities

        try:
            scenarios = ", ".join(declared_capabilities(Config(strategy=name)).scenarios)
        except FedclError as err:
            scenarios = f"(cannot tell: {err})"
        print(f"  scenarios: {scenarios}")
    for param in param_docs(spec.params):
        default = f" = {param.default}" if param.default else ""
        line = f"  {param.name}: {param.type}{default}"
        print(textwrap.fill(f"{line}  {param.doc}" if param.doc else line, LIST_WIDTH,
                            subsequent_indent=" " * 6))


def cmd_config(args: argparse.Namespace) -> int:
    config = config_from_args(args, paths=False)  # printed, maybe for another machine
    if args.flower:
        import tomli_w

        print("[tool.flwr.app.config]")
        print(tomli_w.dumps(config.to_run_config()), end="")
    else:
        print(config.to_toml(), end="")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from fedcl.compare import compare

    text = compare(args.experiment or [Config().experiment], tracking_uri=args.tracking_uri,
                   fmt=args.format, plot_path=args.plot)
    print(text)
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from fedcl.tracking import OUTBOX_FILE, sync_outbox

    run_id, sent = sync_outbox(Path(args.output_dir) / OUTBOX_FILE, args.tracking_uri)
    print(f"sent {sent} queued operations to MLflow run {run_id}")
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from fedcl.certs import make_federation_certs

    if args.supernodes < 0:
        raise ConfigError(f"--supernodes must be 0 or more, got {args.supernodes}")
    try:
        files = make_federation_certs(args.output_dir, args.hosts or ["127.0.0.1", "localhost"],
                                      args.supernodes)
    except OSError as err:
        raise FedclError(f"cannot write certificates to {args.output_dir}: "
                         f"{err.strerror or err}") from None
    print(f"wrote {len(files)} files to {args.output_dir}: "
          + ", ".join(f.name for f in files))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from fedcl.submit import Submission, submit

    if args.resume is not None:
        if args.run_config:
            raise ConfigError("--resume continues the run with its own config; drop "
                              "--run-config")
        if not args.resume or "'" in args.resume:
            raise ConfigError(f"--resume: not a folder name: {args.resume!r}")
        args.run_config = [f"{RESUME_KEY}='{args.resume}'"]
    return submit(Submission(Path(args.app), args.superlink, args.run_config, args.verbose))


def cmd_superexec(args: argparse.Namespace) -> int:
    from fedcl.warm_superexec import run_warm_superexec

    run_warm_superexec(args.runtime_api_address, insecure=args.insecure,
                       root_certificates=args.root_certificates)
    return 0


COMMANDS = {"simulate": cmd_simulate, "compare": cmd_compare, "strategies": cmd_strategies,
            "config": cmd_config, "sync": cmd_sync, "certs": cmd_certs,
            "superexec": cmd_superexec, "submit": cmd_submit}


EXIT_GRACE_S = 15.0  # the longest a stopped run's process may take to end once fedcl is done
SIGNAL_EXIT_GRACE_S = 3.0  # ... after a termination signal (whoever sent it waits for the end)


def exit_within(seconds: float, code: int) -> None:
    """Make sure the process ends with ``code`` at most ``seconds`` from now. After a run
    stops early (Ctrl-C, an error), threads that Flower, Ray or MLflow left running can keep
    the interpreter from exiting (it joins them, and runs their ``atexit`` hooks); everything
    fedcl writes is on disk by then, so a daemon timer ends the process instead of letting it
    hang."""

    def force() -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)

    timer = threading.Timer(seconds, force)
    timer.daemon = True
    timer.start()


def _reopen_closed_streams() -> None:
    """A standard stream the caller closed (``fedcl simulate ... >&- 2>&-``; Python then has
    no ``sys.stdout`` or ``sys.stderr``) is pointed at os.devnull: what would be written
    there has nowhere to go anyway, and the libraries a run starts refuse a missing stream
    (Ray enables faulthandler on ``sys.stderr``), which ended every such run with exit 1."""
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        if getattr(sys, name) is not None:
            continue
        null = os.open(os.devnull, os.O_RDWR)
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
        setattr(sys, name, os.fdopen(fd, "r" if fd == 0 else "w", buffering=1))


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. ``simulate`` takes over SIGINT, SIGTERM and SIGHUP (from the main
    thread): each ends it with one line and exit status 128 + the signal's number."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _reopen_closed_streams()
    signals = TerminationSignals()
    try:
        args = build_parser().parse_args(argv)
        if args.command == "simulate":
            return cmd_simulate(args, signals)  # which takes the signals over
        return COMMANDS[args.command](args)
    except FedclError as err:
        signals.hold()
        print(f"fedcl: error: {one_line(str(err))}", file=sys.stderr)
        return err.exit_code
    except Terminated as stop:
        signals.hold()
        print(f"fedcl: {one_line(str(stop))}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print("fedcl: interrupted", file=sys.stderr)
        return 130


def entry() -> int:
    """The ``fedcl`` program: :func:`main` on ``sys.argv``; a run that ends early leaves the
    process at most :data:`EXIT_GRACE_S` to exit (:func:`exit_within`)."""
    try:
        code = main()
    except BrokenPipeError:  # the reader went away (`fedcl strategies | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own advice
        return 0
    except Terminated as stop:  # a signal while main reported another ending
        print(f"fedcl: {one_line(str(stop))}", file=sys.stderr)
        code = stop.exit_code
    if code != 0:
        exit_within(SIGNAL_EXIT_GRACE_S if code > 128 else EXIT_GRACE_S, code)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(entry())
