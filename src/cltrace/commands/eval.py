"""`cltrace eval RUN`: reconstruction, sparsity and replacement-model quality of a transcoder."""

from __future__ import annotations

import argparse

from cltrace.commands import add_parser


def register(subparsers) -> None:
    p = add_parser(subparsers, "eval",
                   "Evaluate a trained transcoder on held-out text: per-layer normalised MSE, FVE, L0, "
                   "dead/dense features, and the replacement model's agreement, KL and CE loss recovered")
    p.add_argument("run", help="run folder from `cltrace train` (or a transcoder folder)")
    p.add_argument("--store", default=None, help="held-out activation store (default: harvest the heldout split)")
    p.add_argument("--tokens", type=int, default=20_000, help="held-out tokens for the activation metrics")
    p.add_argument("--replacement-tokens", type=int, default=2_000,
                   help="tokens for the replacement-model metrics (0: skip them)")
    p.add_argument("--model", default=None, help="language model (default: the one the transcoder was trained on)")
    p.add_argument("--split", default="heldout", help="corpus split to evaluate on")
    p.add_argument("--text", nargs="+", metavar="PATH", default=None,
                   help="evaluate on your own text files, folders or JSONL instead of the corpus")
    p.add_argument("--json", default=None, help="where to write the metrics (default: RUN/eval.json)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import itertools
    from dataclasses import asdict
    from pathlib import Path

    import torch

    from cltrace.errors import CltraceError
    from cltrace.transcoders.evaluate import evaluate_activations, evaluate_replacement, report
    from cltrace.transcoders.model import Transcoder

    if args.tokens < 1 or args.replacement_tokens < 0:
        raise CltraceError("--tokens must be positive and --replacement-tokens >= 0")
    run_dir = Path(args.run)
    folder = run_dir / "transcoder" if (run_dir / "transcoder").is_dir() else run_dir
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tc = Transcoder.load(folder, device=device)
    model_name = args.model or tc.cfg.model_name
    model = None
    if args.store:
        from cltrace.activations.store import ActivationStore

        batches = ActivationStore(args.store).iter_batches(1024, shuffle=False)
    else:
        model, hcfg = _model(model_name, device)
        batches = _harvest(model, hcfg, args.split, args.tokens, args.text)
    act = evaluate_activations(tc, batches, max_tokens=args.tokens)
    rep = None
    if args.replacement_tokens:
        if model is None:
            model, hcfg = _model(model_name, device)
        from cltrace.activations.harvest import iter_contexts
        from cltrace.data.corpus import iter_documents

        ctxs = iter_contexts(model, iter_documents(args.split, paths=args.text), hcfg)
        n_ctx = max(1, args.replacement_tokens // (hcfg.ctx_len - 2))
        ctxs = [c for c in itertools.islice(ctxs, n_ctx) if len(c) == hcfg.ctx_len]
        token_batches = [torch.tensor(ctxs[i:i + 8]) for i in range(0, len(ctxs), 8)]
        if not token_batches:
            raise CltraceError(f"the text holds no full {hcfg.ctx_len}-token context for the replacement metrics",
                               hint="give more text, or --replacement-tokens 0")
        rep = evaluate_replacement(tc, model, token_batches)
    print(report(act, rep))
    out = Path(args.json) if args.json else (run_dir / "eval.json" if run_dir.is_dir() else None)
    if out is not None:
        from cltrace.io import atomic_write_json

        atomic_write_json({"activations": asdict(act), "replacement": asdict(rep) if rep else None}, out)
    return 0


def _model(name, device):
    from cltrace.activations.harvest import HarvestConfig
    from cltrace.errors import CltraceError
    from cltrace.models.loading import load_model

    if not name:
        raise CltraceError("the transcoder does not say which model it was trained on", hint="pass --model")
    hcfg = HarvestConfig(ctx_len=128, forward_dtype="float32")   # metrics of the exact model, not bf16
    return load_model(name, device=device, dtype=hcfg.torch_forward_dtype(device)), hcfg


def _harvest(model, hcfg, split, tokens, paths=None):
    from cltrace.activations.harvest import iter_activation_batches
    from cltrace.data.corpus import iter_documents

    return iter_activation_batches(model, iter_documents(split, paths=paths), hcfg, batch_tokens=1024, max_tokens=tokens)
