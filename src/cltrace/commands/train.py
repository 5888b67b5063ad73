"""`cltrace train`: train a cross-layer (or per-layer) transcoder on harvested activations."""

from __future__ import annotations

import argparse

from cltrace.commands import add_parser


def register(subparsers) -> None:
    p = add_parser(subparsers, "train",
                   "Train a cross-layer or per-layer transcoder on a model's MLP activations "
                   "(from a harvested store, or harvested on the fly); resumable")
    p.add_argument("--preset", default="demo", help="demo | session | small | paper | smollm2 (see transcoders/config.py)")
    p.add_argument("--model", default=None, help="bundled model name or transformers folder (default: the preset's)")
    p.add_argument("--kind", choices=["clt", "plt"], default=None, help="cross-layer or per-layer (default: clt)")
    p.add_argument("--skip", action="store_true", help="add a linear skip connection (skip transcoder)")
    p.add_argument("--activation", choices=["jumprelu", "topk"], default=None,
                   help="JumpReLU with learned thresholds, or TopK (default: the preset's)")
    p.add_argument("--topk", type=int, default=None, help="k active features per layer and token (TopK)")
    p.add_argument("--features", type=int, default=None, help="features per layer (default: the preset's)")
    p.add_argument("--tokens", type=int, default=None, help="training tokens (default: the preset's)")
    p.add_argument("--batch", type=int, default=None, help="tokens per optimizer step")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--lambda-s", type=float, default=None, help="sparsity penalty λ_S")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=None,
                   help="auto: bf16 autocast on CUDA or bf16-capable CPUs")
    p.add_argument("--refit-tokens", type=int, default=None,
                   help="after training, refit the decoder by least squares on this many tokens (0 = off)")
    p.add_argument("--store", default=None,
                   help="activation store from `cltrace harvest` (default: harvest on the fly from the corpus)")
    p.add_argument("--split", default="train", help="corpus split when harvesting on the fly")
    p.add_argument("--out", default=None, help="run folder (default: <CLTRACE_HOME>/runs/<model>-<kind>-<F>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from cltrace import paths
    from cltrace.errors import CltraceError
    from cltrace.transcoders.config import preset
    from cltrace.transcoders.distributed import setup_from_env
    from cltrace.transcoders.train import train

    cfg = preset(args.preset, model=args.model, kind=args.kind, n_features=args.features,
                 tokens=args.tokens, batch_size=args.batch, lr=args.lr, lambda_s=args.lambda_s,
                 precision=args.precision, store=args.store, skip=args.skip or None,
                 refit_tokens=args.refit_tokens, activation=args.activation, topk=args.topk)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    slug = cfg.model.rstrip("/").split("/")[-1]
    out = args.out or paths.runs_dir() / f"{slug}-{cfg.kind}-{cfg.n_features}"
    dist = setup_from_env(device)
    if args.resume and not _has_checkpoint(out):
        raise CltraceError(f"nothing to resume in {out}", hint="drop --resume to start a new run")
    if not args.resume and _has_checkpoint(out):
        raise CltraceError(f"{out} already holds a run", hint="add --resume to continue it, or choose another --out")
    batches, n_layers, d_model = _batches(cfg, args, device)
    result = train(cfg, batches, n_layers, d_model, out, resume=args.resume, device=device, dist=dist)
    if dist.is_main:
        last = result.history[-1] if result.history else None
        if last is not None:
            print(f"trained {last.step} steps ({last.tokens:,} tokens) at {result.tokens_per_s:,.0f} tokens/s: "
                  f"nmse {last.nmse:.3f}, L0 {last.l0:.1f}, {result.dead} dead features")
        print(f"transcoder saved to {out}/transcoder  (next: cltrace eval {out})")
    return 0


def _has_checkpoint(out) -> bool:
    from pathlib import Path

    return (Path(out) / "checkpoint.json").exists()


def _batches(cfg, args, device):
    """(batch iterable, n_layers, d_model): a store's batches, or a live harvest."""
    from cltrace.errors import CltraceError

    if cfg.store:
        from cltrace.activations.store import ActivationStore

        store = ActivationStore(cfg.store)
        if store.layers != list(range(len(store.layers))):
            raise CltraceError(f"{cfg.store} holds layers {store.layers}; a transcoder needs all of them")
        epochs = -(-cfg.tokens_needed // max(store.n_tokens, 1))
        if epochs > 1:
            print(f"note: the store holds {store.n_tokens:,} tokens, fewer than the {cfg.tokens_needed:,} "
                  f"this run reads: {epochs} passes over it, reshuffled each time")
        return (store.iter_batches(cfg.batch_size, shuffle=True, seed=cfg.seed, drop_last=True, epochs=epochs),
                len(store.layers), store.d_model)
    from cltrace.activations.harvest import HarvestConfig, iter_activation_batches
    from cltrace.data.corpus import iter_documents
    from cltrace.models.loading import load_model

    hcfg = HarvestConfig(ctx_len=cfg.context_len, seed=cfg.seed)
    model = load_model(cfg.model, device=device, dtype=hcfg.torch_forward_dtype(device))
    docs = iter_documents(args.split)
    batches = iter_activation_batches(model, docs, hcfg, batch_tokens=cfg.batch_size,
                                      max_tokens=cfg.tokens_needed, drop_last=True)
    return batches, model.n_layers, model.d_model
