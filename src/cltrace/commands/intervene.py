"""`cltrace intervene PROMPT --transcoder RUN ...`: steer, ablate, patch or swap features and
print the next-token probabilities (and optional continuations) before and after."""

from __future__ import annotations

import argparse
import re

from cltrace.commands import add_parser, add_run_arguments
from cltrace.commands.feature import parse_feature_ref

_ASSIGN = re.compile(r"^\s*L?(\d+)\s*:\s*(\d+)\s*(?:@\s*(-?\d+(?:\s*,\s*-?\d+)*))?\s*=\s*(\S+)\s*$")


def parse_assignment(text: str) -> tuple[int, int, tuple[int, ...] | None, float]:
    """ "3:1234@5=2.5" -> (3, 1234, (5,), 2.5); "@-1" is the last prompt token, no "@": all."""
    m = _ASSIGN.match(text)
    try:
        value = float(m.group(4)) if m else None
    except ValueError:
        value = None
    if m is None or value is None:
        raise argparse.ArgumentTypeError(
            f"{text!r}: write LAYER:INDEX[@POS[,POS...]]=NUMBER, e.g. 3:1234@-1=0"
        )
    pos = tuple(int(p) for p in m.group(3).split(",")) if m.group(3) else None
    return int(m.group(1)), int(m.group(2)), pos, value


def parse_feature_list(text: str) -> list[tuple[int, int]]:
    """ "3:12,4:7" -> [(3, 12), (4, 7)]."""
    return [parse_feature_ref(part) for part in text.split(",") if part.strip()]


def parse_named_value(text: str) -> tuple[str, float]:
    """ "Texas=0" -> ("Texas", 0.0)."""
    name, sep, value = text.rpartition("=")
    try:
        if sep and name:
            return name, float(value)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r}: write NAME=NUMBER, e.g. Texas=0")


def register(subparsers) -> None:
    p = add_parser(
        subparsers,
        "intervene",
        "Run a prompt with transcoder features set, scaled, ablated or swapped, and "
        "show the next-token probabilities before and after.",
    )
    p.add_argument("prompt", metavar="PROMPT", help="the prompt (BOS is added where the model needs it)")
    add_run_arguments(p)
    p.add_argument(
        "--set",
        dest="set_",
        action="append",
        type=parse_assignment,
        default=[],
        metavar="L:I[@POS]=V",
        help="set a feature's activation (repeatable); POS may be negative",
    )
    p.add_argument(
        "--scale",
        action="append",
        type=parse_assignment,
        default=[],
        metavar="L:I[@POS]=F",
        help="multiply a feature's activation (0: ablate, -1: invert, 5: amplify)",
    )
    p.add_argument(
        "--add",
        action="append",
        type=parse_assignment,
        default=[],
        metavar="L:I[@POS]=V",
        help="add to a feature's activation",
    )
    p.add_argument(
        "--swap-from",
        default=None,
        metavar="PROMPT_B",
        help="swap in the concept of PROMPT_B: suppress --features, inject --inject from B",
    )
    p.add_argument(
        "--features",
        type=parse_feature_list,
        default=None,
        metavar="L:I,L:I",
        help="with --swap-from: features of PROMPT's concept to suppress (default: automatic)",
    )
    p.add_argument(
        "--inject",
        type=parse_feature_list,
        default=None,
        metavar="L:I,L:I",
        help="with --swap-from: PROMPT_B's features to inject (default: automatic)",
    )
    p.add_argument(
        "--suppress-factor", type=float, default=0.0, help="scale for suppressed features (0 or negative)"
    )
    p.add_argument("--inject-scale", type=float, default=1.0, help="multiplier on injected activations")
    p.add_argument(
        "--where",
        choices=["last", "same"],
        default="last",
        help="inject B's last-position activations at the last position, or position by position",
    )
    p.add_argument(
        "--n-auto", type=int, default=10, help="features chosen when --features/--inject are omitted"
    )
    p.add_argument(
        "--supernodes",
        default=None,
        metavar="FILE",
        help="supernode file ({name: [node ids]} or a graph's .supernodes.json)",
    )
    p.add_argument(
        "--supernode",
        action="append",
        type=parse_named_value,
        default=[],
        metavar="NAME=F",
        help="scale every feature of a supernode at its graph position (repeatable)",
    )
    p.add_argument(
        "--constrain-until",
        type=int,
        default=None,
        metavar="LAYER",
        help="constrained patching: clamp MLP outputs from the first intervened layer to LAYER",
    )
    p.add_argument("--generate", type=int, default=0, help="greedy tokens to generate before and after")
    p.add_argument(
        "--steer-generated",
        action="store_true",
        help="also apply position-less interventions to generated tokens",
    )
    p.add_argument("--top", type=int, default=10, help="next tokens to show")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def interventions_from_args(args: argparse.Namespace, n_layers: int) -> list:
    """Interventions from --set/--scale/--add and --supernode."""
    from cltrace.errors import CltraceError
    from cltrace.interventions.steer import Intervention, Mode
    from cltrace.interventions.supernodes import load_supernodes

    by_mode: tuple[tuple[Mode, list], ...] = (("set", args.set_), ("scale", args.scale), ("add", args.add))
    out = [Intervention(l, i, pos, mode, v) for mode, items in by_mode for l, i, pos, v in items]
    if args.supernode:
        if not args.supernodes:
            raise CltraceError("--supernode needs --supernodes FILE", "name the file that defines the groups")
        groups = {g.name: g for g in load_supernodes(args.supernodes)}
        for name, factor in args.supernode:
            if name not in groups:
                raise CltraceError(
                    f"no supernode {name!r} in {args.supernodes}",
                    f"known: {', '.join(sorted(groups)) or 'none'}",
                )
            out += groups[name].interventions("scale", factor, n_layers=n_layers)
    return out


def run(args: argparse.Namespace) -> int:
    import json

    from cltrace import runs
    from cltrace.errors import CltraceError
    from cltrace.interventions.steer import Steerer

    loaded = runs.open_run(args.transcoder, args.model, args.device)
    lm = loaded.model
    steerer = Steerer(lm, loaded.transcoder)
    ivs = interventions_from_args(args, lm.n_layers)
    if args.swap_from is not None:
        ivs += steerer.swap_interventions(
            args.prompt,
            args.swap_from,
            suppress=args.features,
            inject=args.inject,
            suppress_factor=args.suppress_factor,
            inject_scale=args.inject_scale,
            where=args.where,
            n_auto=args.n_auto,
        )
    if not ivs:
        raise CltraceError(
            "nothing to do: no intervention given",
            "use --set/--scale/--add L:I=V, --swap-from PROMPT_B or --supernode NAME=F",
        )
    bad = [iv for iv in ivs if not 0 <= iv.layer < lm.n_layers]
    if bad:
        raise CltraceError(
            f"layer {bad[0].layer} does not exist", f"the model has layers 0..{lm.n_layers - 1}"
        )
    try:
        result = steerer.run(
            args.prompt,
            ivs,
            top_k=args.top,
            generate=args.generate,
            constrain_until=args.constrain_until,
            steer_generated=args.steer_generated,
        )
    except (ValueError, IndexError) as err:
        raise CltraceError(
            f"cannot apply the interventions: {err}",
            "check feature indices and positions against the transcoder and prompt",
        ) from err
    print(json.dumps(result.to_dict(), indent=1, ensure_ascii=False) if args.json else result.table())
    return 0
