"""`fedge serve` and `fedge export` (nothing heavy is imported until a handler runs)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

DEFAULT_REPOSITORY = "/var/lib/fedge/models"
DEFAULT_STATE_DIR = "/var/lib/fedge-coordinator"  # = fedge.coordinator.config.DEFAULT_STATE_DIR


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port {text!r} is not an integer") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is outside 0..65535")
    return value


MAX_POLL_INTERVAL_S = 3600.0  # the watcher waits this long at most between scans


def _poll_interval(text: str) -> float:
    """The watcher thread waits on it (threading.Event.wait): a value it cannot wait
    on (1e10, inf) killed the thread, and new versions were never loaded."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= MAX_POLL_INTERVAL_S:
        raise argparse.ArgumentTypeError(
            f"{value} must be > 0 seconds and at most {MAX_POLL_INTERVAL_S:g} (an hour)")
    return value


def max_threads() -> int:
    """The most onnxruntime intra-op threads a session may have: 4 per CPU. Each
    model version's session starts that many threads, so --threads 100000 exhausted
    the machine."""
    return 4 * (os.cpu_count() or 1)


def _threads(text: str) -> int:
    value = positive_int(text)
    if value > max_threads():
        raise argparse.ArgumentTypeError(
            f"{value} is more than {max_threads()} (4 per CPU, {os.cpu_count() or 1} CPUs): "
            "each model version's session starts that many threads")
    return value


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{value} must be a finite number of seconds > 0")
    return value


def _milliseconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of milliseconds") from None
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"{value} must be a finite number >= 0 milliseconds")
    return value


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"input shape {text!r} must be comma-separated integers, e.g. 39 or 3,32,32"
        ) from None
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"input shape {text!r} needs positive dimensions")
    return dims


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve", help="serve ONNX models over the Open Inference Protocol (KServe v2 REST)"
    )
    serve.add_argument("--repository", default=os.environ.get("FEDGE_MODEL_REPOSITORY",
                                                              DEFAULT_REPOSITORY),
                       help="model repository: <dir>/<model>/<version>/model.onnx "
                            f"(default {DEFAULT_REPOSITORY} or $FEDGE_MODEL_REPOSITORY)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_port, default=8000, help="0: any free port")
    serve.add_argument("--poll-interval", type=_poll_interval, default=0.5,
                       help="seconds between repository scans for new versions (at most "
                            "3600)")
    serve.add_argument("--max-body-bytes", type=positive_int, default=64 * 1024 * 1024,
                       help="one request's body; a larger one gets 413 (default 64 MiB)")
    serve.add_argument("--max-buffered-body-bytes", type=positive_int, default=256 * 1024 * 1024,
                       help="request bodies held at once, all connections together, at least "
                            "--max-body-bytes; a request whose body does not fit gets 503 with "
                            "Retry-After before it is read (default 256 MiB)")
    serve.add_argument("--max-header-bytes", type=positive_int, default=64 * 1024,
                       help="request line and headers of one request; more gets 431 (414 for "
                            "a long URL) and the connection is closed (default 65536)")
    serve.add_argument("--threads", type=_threads, default=None,
                       help="onnxruntime intra-op threads per session (default: CPUs, max 4; "
                            "at most 4 per CPU)")
    serve.add_argument("--inline-budget-ms", type=_milliseconds, default=2.0,
                       help="requests estimated (single-row time measured at load x rows) to "
                            "take longer run on a worker thread, not the event loop (default 2)")
    serve.add_argument("--max-connections", type=positive_int, default=1000,
                       help="client connections open at once; one more closes the one that has "
                            "waited longest on its client (default 1000, lowered to fit the "
                            "open-file limit)")
    serve.add_argument("--idle-timeout", type=_timeout, default=30.0,
                       help="seconds a connection may wait before beginning a request "
                            "(default 30)")
    serve.add_argument("--request-timeout", type=_timeout, default=60.0,
                       help="seconds from a request's first byte to its last, headers and body "
                            "(default 60; then 408 and the connection is closed)")
    serve.add_argument("--load-timeout", type=_timeout, default=60.0,
                       help="seconds a new model version's check (a trial inference, timing "
                            "runs, a batching check; run in a child process) may take; one "
                            "that takes longer is not served (default 60)")
    serve.add_argument("--infer-timeout", type=_timeout, default=60.0,
                       help="seconds one inference run may take; a longer one is stopped and "
                            "answered with 504 (default 60)")
    serve.set_defaults(func=_serve)

    export = subparsers.add_parser("export", help="export a finished job's model to ONNX")
    export.add_argument("--job", required=True, help="job id")
    export.add_argument("--state-dir", default=os.environ.get("FEDGE_STATE_DIR",
                                                              DEFAULT_STATE_DIR),
                        help="coordinator state directory (holds jobs/<id>/final.safetensors)")
    export.add_argument("--out", default=None,
                        help="ONNX file to write (default: jobs/<id>/model.onnx)")
    export.add_argument("--input-shape", type=_shape, default=None,
                        help="per-example input shape (default: from the model registry, e.g. "
                             "in_features, or channels x image size for resnet_small)")
    export.add_argument("--install", metavar="REPOSITORY", default=None,
                        help="also install the result as a new version in this repository")
    export.add_argument("--name", default=None,
                        help="model name for --install (default: the job id)")
    export.add_argument("--agent-config", metavar="FILE", default=None,
                        help="for --install of a federated tabular model: the agent.toml of "
                             "a site holding its data set, whose standardisation is "
                             "prepended to the graph as an appliance does when the model is "
                             "pushed to it (without it such a model is not installed)")
    export.set_defaults(func=_export)


def _serve(args: argparse.Namespace) -> int:
    from fedge.systemd import setup_logging

    # journald under systemd, else timestamped lines on stderr: which version was
    # live when ("serving cox version 3") and why one was not ("not serving ...")
    setup_logging("fedge-serve")
    from fedge.serve.server import serve

    try:
        serve(
            args.repository, host=args.host, port=args.port, poll_interval=args.poll_interval,
            max_body_bytes=args.max_body_bytes, max_header_bytes=args.max_header_bytes,
            threads=args.threads,
            inline_budget_s=args.inline_budget_ms / 1000, max_connections=args.max_connections,
            idle_timeout_s=args.idle_timeout, request_timeout_s=args.request_timeout,
            load_timeout_s=args.load_timeout,
            max_buffered_body_bytes=args.max_buffered_body_bytes,
            infer_timeout_s=args.infer_timeout,
            announce=lambda line: print(line, flush=True),
        )
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"fedge serve: {exc}", file=sys.stderr)
        return 1
    return 0


def _export(args: argparse.Namespace) -> int:
    """Exit status 2 when the export or the install is refused (the one line on
    stderr says why; the install writes nothing), 0 when done.

    A federated tabular model was trained on rows each site standardised with its own
    constants, which are not in the graph (fedge.serve.jobs); installed as it is, a
    server would feed it the raw rows a hospital's application sends and answer with
    wrong outputs, silently. So ``--install`` of such a model needs ``--agent-config``
    (a site's agent.toml holding the data set): the model is installed as an appliance
    installs a pushed one (fedge.agent.updates.SiteModels: that site's standardisation
    prepended, its feature names and class names written). Without it the install is
    refused, naming the ways that work; the exported file is written all the same."""
    from fedge.serve.errors import ExportRefused
    from fedge.serve.jobs import ExportError, export_job
    from fedge.serve.repository import ModelRepository

    try:
        result = export_job(args.state_dir, args.job, args.out, input_shape=args.input_shape)
    except (ExportError, ExportRefused) as exc:
        print(f"fedge export: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {result.path} (opset {result.opset}, sha256 {result.sha256[:16]}…, "
          f"parity max abs diff {result.parity_max_abs_diff:.3g} on {result.parity_batch} rows)")
    if args.install:
        name = args.name or args.job
        # ValueError: the repository's checks; with --agent-config also an invalid
        # agent.toml (AgentConfigError), a model the site's features do not fit
        # (SiteStandardisationError) and a data set that cannot be loaded (TaskRefusal)
        refused: tuple[type[Exception], ...] = (ValueError,)
        try:
            installer: Any = ModelRepository(args.install)
            if args.agent_config is not None:
                from fedge.agent.trainer import TaskRefusal

                refused = (ValueError, TaskRefusal)
                installer = _site_installer(installer, args.agent_config)
            else:
                refusal = _needs_a_site(result.metadata, result.path, name)
                if refusal:
                    print(f"fedge export: {refusal}", file=sys.stderr)
                    return 2
            version = installer.install(name, result.path)
        except OSError as exc:
            print(f"fedge export: cannot install into {args.install}: {exc}", file=sys.stderr)
            return 2
        except refused as exc:
            print(f"fedge export: {name!r} not installed: {exc}", file=sys.stderr)
            return 2
        print(f"installed {name} version {version} in {args.install}")
    return 0


def _needs_a_site(metadata: dict[str, str], path: object, name: str) -> str | None:
    """Why the exported model cannot be installed without a site's standardisation,
    naming what works instead; None when it can be (images, constants in the graph)."""
    from fedge.serve.sitelocal import needs_site_standardisation

    dataset = needs_site_standardisation(metadata)
    if dataset is None:
        return None
    return (f"not installed: model {name!r} was trained on rows of data set {dataset!r} "
            "that each site standardised with its own constants, which are not in the "
            "graph; served as it is, raw rows give wrong outputs. Install it with a "
            "site's standardisation: push it to the sites (fedge console push "
            f"{path} --kind model --name {name} --version N; each appliance prepends "
            "its own), or on a host holding the data set add --agent-config "
            "/etc/fedge/agent.toml (that site's agent config) to this command")


def _site_installer(repository: Any, agent_config: str) -> Any:
    """The appliance's installer (fedge.agent.updates.SiteModels) over ``repository``,
    with the data sets of the agent config at ``agent_config``.

    Raises: AgentConfigError (a ValueError): the file cannot be read or is invalid."""
    from fedge.agent.process import load_config
    from fedge.agent.trainer import TorchTrainer
    from fedge.agent.updates import SiteModels

    cfg = load_config(agent_config)
    trainer = TorchTrainer(cfg.datasets)  # no state_dir: reads the data sets, writes nothing
    return SiteModels(repository, trainer.standardisation, classes=trainer.class_names)
