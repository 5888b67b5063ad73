"""`cltrace train`: train a cross-layer (or per-layer) transcoder on harvested activations."""

from __future__ import annotations

import argparse

from cltrace.commands import add_device_argument, add_parser


def register(subparsers) -> None:
    p = add_parser(
        subparsers,
        "train",
        "Train a cross-layer or per-layer transcoder on a model's MLP activations "
        "(from a harvested store, or harvested on the fly); resumable",
    )
    p.add_argument(
        "--preset",
        default="demo",
        help="demo | session | small | paper | smollm2 (see transcoders/config.py)",
    )
    p.add_argument(
        "--model", default=None, help="bundled model name or transformers folder (default: the preset's)"
    )
    p.add_argument(
        "--kind", choices=["clt", "plt"], default=None, help="cross-layer or per-layer (default: clt)"
    )
    p.add_argument("--skip", action="store_true", help="add a linear skip connection (skip transcoder)")
    p.add_argument(
        "--activation",
        choices=["jumprelu", "topk", "batchtopk"],
        default=None,
        help="JumpReLU with learned thresholds, TopK, or BatchTopK (k·batch per layer and batch); "
        "TopK and BatchTopK end as JumpReLU (default: the preset's)",
    )
    p.add_argument(
        "--topk", type=int, default=None, help="k active features per layer and token (TopK, BatchTopK)"
    )
    p.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="wall-time budget of the training: the token budget is sized from the throughput "
        "measured in the first steps (default: the preset's; --tokens alone trains that many)",
    )
    p.add_argument(
        "--auxk-alpha",
        type=float,
        default=None,
        help="weight of the AuxK dead-feature loss (default: the preset's; 0 = off)",
    )
    p.add_argument(
        "--resample-every",
        type=int,
        default=None,
        metavar="TOKENS",
        help="TopK/BatchTopK: resample dead features every this many tokens until --resample-until "
        "(default: the preset's; 0 = off)",
    )
    p.add_argument(
        "--resample-until",
        type=float,
        default=None,
        metavar="FRAC",
        help="TopK/BatchTopK: fraction of the steps after which resampling stops (default: where the "
        "learning-rate decay begins)",
    )
    p.add_argument(
        "--balance-rate",
        type=float,
        default=None,
        help="TopK/BatchTopK: load-balancing step of the selection bias (default: the preset's; 0 = off)",
    )
    p.add_argument(
        "--centre-targets",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start the decoder bias at the targets' mean and weigh each layer's error by "
        "1 / its variance (default: the preset's)",
    )
    p.add_argument("--features", type=int, default=None, help="features per layer (default: the preset's)")
    p.add_argument("--tokens", type=int, default=None, help="training tokens (default: the preset's)")
    p.add_argument("--batch", type=int, default=None, help="tokens per optimizer step")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--lambda-s", type=float, default=None, help="sparsity penalty λ_S")
    p.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default=None,
        help="auto: bf16 autocast on CUDA or bf16-capable CPUs",
    )
    p.add_argument(
        "--refit-tokens",
        type=int,
        default=None,
        help="after training, refit the decoder by least squares on this many tokens (0 = off)",
    )
    p.add_argument(
        "--finetune-minutes",
        type=float,
        default=None,
        help="after training, fine-tune end to end on the replacement model's KL for this many "
        "minutes (0 = off; default: the preset's; see `cltrace finetune`)",
    )
    p.add_argument(
        "--store",
        default=None,
        help="activation store from `cltrace harvest` (default: harvest on the fly from the corpus)",
    )
    p.add_argument("--split", default="train", help="corpus split when harvesting on the fly")
    p.add_argument(
        "--data-repeats",
        type=int,
        default=None,
        metavar="N",
        help="when harvesting on the fly, train on every harvested token N times, the copies in "
        "different batches (default: the preset's; 1 = fresh tokens only)",
    )
    p.add_argument("--out", default=None, help="run folder (default: <CLTRACE_HOME>/runs/<model>-<kind>-<F>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_device_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cltrace.transcoders.config import preset
    from cltrace.transcoders.launch import train_run

    cfg = preset(
        args.preset,
        model=args.model,
        kind=args.kind,
        n_features=args.features,
        tokens=args.tokens,
        batch_size=args.batch,
        lr=args.lr,
        lambda_s=args.lambda_s,
        precision=args.precision,
        store=args.store,
        skip=args.skip or None,
        refit_tokens=args.refit_tokens,
        finetune_minutes=args.finetune_minutes,
        activation=args.activation,
        topk=args.topk,
        minutes=args.minutes,
        auxk_alpha=args.auxk_alpha,
        resample_every_tokens=args.resample_every,
        resample_until=args.resample_until,
        balance_rate=args.balance_rate,
        centre_targets=args.centre_targets,
        data_repeats=args.data_repeats,
    )
    train_run(cfg, args.out, resume=args.resume, device=args.device, split=args.split)
    return 0
