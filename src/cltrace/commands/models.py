"""`cltrace models`: list the bundled models, or dequantise them into the cache (--prepare)."""

from __future__ import annotations

import argparse

from cltrace.commands import add_parser

COLUMNS = ("name", "family", "layers", "d_model", "params", "quant", "status", "")


def register(subparsers) -> None:
    p = add_parser(subparsers, "models", "list the bundled models and their cache status, or prepare them")
    p.add_argument(
        "--prepare",
        nargs="?",
        const="all",
        default=None,
        metavar="NAME|all",
        help="dequantise NAME (or every bundled model, the default when no NAME "
        "is given) into the model cache; takes about a minute per model",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cltrace.models import bundled

    if args.prepare is not None:
        names = list(bundled.BUNDLED) if args.prepare == "all" else [args.prepare]
        for name in names:
            bundled.bundled_model(name)  # unknown names fail before any slow work
        for name in names:
            print(f"{name}: {bundled.ensure_model_dir(name)}")
        print()
    print(format_table([bundled.model_info(name) for name in bundled.BUNDLED]))
    print(f"\ncache: {bundled.paths.models_dir()}   (* = default model)")
    return 0


def format_table(rows) -> str:
    """Aligned text table of `bundled.ModelInfo` rows."""
    cells = [COLUMNS] + [_cells(r) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def _cells(info) -> tuple[str, ...]:
    unknown = "?"
    return (
        info.name,
        info.family,
        unknown if info.n_layers is None else str(info.n_layers),
        unknown if info.d_model is None else str(info.d_model),
        unknown if info.n_params is None else f"{info.n_params / 1e6:.0f}M",
        info.quant,
        info.status,
        "*" if info.default else "",
    )
