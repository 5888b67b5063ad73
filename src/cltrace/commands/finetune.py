"""`cltrace finetune RUN`: end-to-end fine-tuning of a trained transcoder on the replacement
model's KL (transcoders/finetune.py)."""

from __future__ import annotations

import argparse

from cltrace.commands import MODEL_HELP, RUN_HELP, add_device_argument, add_parser


def register(subparsers) -> None:
    p = add_parser(
        subparsers,
        "finetune",
        "Fine-tune a trained JumpReLU transcoder end to end: the replacement model's KL to the real "
        "model's next-token distribution, plus the MSE; thresholds stay fixed",
    )
    p.add_argument("run", metavar="RUN", help=RUN_HELP)
    p.add_argument("--minutes", type=float, default=10.0, help="wall-time budget")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate of the decoder (default: 3e-5)")
    p.add_argument(
        "--encoder-lr-scale",
        type=float,
        default=None,
        help="the encoder's learning rate relative to --lr (default: 0.1)",
    )
    p.add_argument(
        "--mse-weight", type=float, default=None, help="weight of the normalised MSE term (default: 1)"
    )
    p.add_argument(
        "--mse-on",
        choices=["real", "replacement"],
        default=None,
        help="MLP inputs of the MSE term: the real run's (what `cltrace eval` measures) or the "
        "replacement run's own (default: replacement)",
    )
    p.add_argument(
        "--decoder-only", action="store_true", help="leave the encoder alone: the features do not change"
    )
    p.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default=None,
        help="the encoder's product: bf16 where the CPU has fast bf16 (auto, the default) or fp32",
    )
    p.add_argument("--split", default="train", help="corpus split to fine-tune on")
    p.add_argument(
        "--text",
        nargs="+",
        metavar="PATH",
        default=None,
        help="fine-tune on your own text files, folders or JSONL instead of the corpus",
    )
    p.add_argument(
        "--out",
        default=None,
        help="run folder to write the fine-tuned transcoder into (default: RUN itself, replacing its "
        "transcoder)",
    )
    p.add_argument("--model", default=None, help=MODEL_HELP)
    add_device_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cltrace.errors import CltraceError
    from cltrace.hardware import resolve_device
    from cltrace.runs import load_transcoder, model_name, resolve_run
    from cltrace.transcoders.finetune import FinetuneConfig
    from cltrace.transcoders.launch import finetune_stage

    run = resolve_run(args.run)
    if run.format != "cltrace":
        raise CltraceError(
            f"{run.dir} holds a {run.format} transcoder; fine-tuning works on cltrace's own runs",
            hint="load it with cltrace.transcoders.interop.load_circuit_tracer and save it as a cltrace "
            "transcoder (Transcoder.save) first",
        )
    device = resolve_device(args.device)
    given = dict(
        lr=args.lr,
        encoder_lr_scale=args.encoder_lr_scale,
        mse_weight=args.mse_weight,
        mse_on=args.mse_on,
        precision=args.precision,
    )
    cfg = FinetuneConfig(
        minutes=args.minutes,
        train_encoder=not args.decoder_only,
        **{k: v for k, v in given.items() if v is not None},
    )
    tc = load_transcoder(run, device)
    out = Path(args.out) if args.out else run.dir
    finetune_stage(
        tc, model_name(run, tc, args.model), out, cfg, device=device, split=args.split, text=args.text
    )
    return 0
