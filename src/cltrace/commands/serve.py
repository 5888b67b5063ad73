"""`cltrace serve`: the local graph viewer."""

from __future__ import annotations

import argparse

from cltrace.commands import add_parser, add_run_arguments


def register(subparsers) -> None:
    p = add_parser(subparsers, "serve", "Browse saved attribution graphs in a local web viewer.")
    p.add_argument(
        "--graphs",
        action="append",
        metavar="DIR",
        default=None,
        help="folder of graph JSON files (repeatable); default: cltrace's graphs folder",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="interface to bind; 0.0.0.0 exposes the viewer to your network"
    )
    p.add_argument("--port", type=int, default=8765, help="port to listen on (0: any free port)")
    p.add_argument("--open", action="store_true", help="open the viewer in a web browser")
    add_run_arguments(p, required=False, note="loads the model so the page can run interventions")
    p.add_argument(
        "--features",
        default=None,
        metavar="DB",
        help="feature store for dashboards (top contexts, token effects)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cltrace import paths
    from cltrace.errors import CltraceError
    from cltrace.viewer.backend import make_backend
    from cltrace.viewer.server import ViewerConfig, serve

    if args.graphs:
        folders = [Path(d) for d in args.graphs]
    else:
        folders = [paths.graphs_dir()]
        folders[0].mkdir(parents=True, exist_ok=True)  # an empty list beats an error
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing:
        raise CltraceError(
            f"no graph folder at {', '.join(missing)}",
            hint="run `cltrace trace` to save a graph, or pass --graphs DIR",
        )
    backend = make_backend(args)  # loads the model first when --transcoder is given
    try:
        config = ViewerConfig(graph_dirs=folders, host=args.host, port=args.port, open_browser=args.open)
        serve(config, backend)
    except (ValueError, OSError) as err:
        raise CltraceError(
            f"cannot start the viewer: {err}", hint="is another program using the port? try --port 0"
        ) from err
    return 0
