"""Benchmark the feature store: build rate, database size per million tokens, dashboard latency.

    .venv/bin/python bench/bench_features.py --model smollm2-135m --features 2048 --tokens 8192
    .venv/bin/python bench/bench_features.py --model tiny            # seconds, no model files

Without --run, the transcoder is a freshly initialised `Transcoder` (init_from_sample sets
its scales and biases so each feature fires on --fire-frac of tokens): the cost of a build
depends on widths and on how many features fire, not on what they mean.

The build runs in two calls (half the tokens, then the rest, continuing the same file), so
it also exercises resuming. The database grows by a fixed part (features, token effects,
vocabulary) plus a part per token (contexts, more features reaching their reservoirs); the
size per million tokens is extrapolated linearly from the two measured sizes.
Dashboards are timed from a fresh connection on random features (goal: < 100 ms).
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from cltrace.models import DEFAULT_MODEL

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="bundled name, model folder, or 'tiny'")
    p.add_argument("--run", default=None, help="a trained transcoder run (default: random init)")
    p.add_argument("--features", type=int, default=2048, help="features per layer (random init)")
    p.add_argument(
        "--fire-frac", type=float, default=0.02, help="fraction of tokens each random feature fires on"
    )
    p.add_argument("--tokens", type=int, default=8192, help="tokens to scan in total")
    p.add_argument("--context-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=8, help="contexts per forward")
    p.add_argument(
        "--text", default=None, help="text files/folder (default: held-out corpus, else built-in text)"
    )
    p.add_argument("--dashboards", type=int, default=200, help="dashboards to time")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--keep", default=None, help="write the store here instead of a temporary folder")
    return p.parse_args()


def load_pieces(args):
    """(LoadedModel, transcoder, description)."""
    if args.model == "tiny":
        from test_features_standin import make_transcoder
        from tiny import tiny_model

        lm = tiny_model("gemma")
        return (
            lm,
            make_transcoder(lm, args.features, fire_fraction=args.fire_frac),
            "tiny gemma (3 layers, d 32)",
        )
    from cltrace.models.loading import load_model

    lm = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    if args.run:
        from cltrace.runs import load_transcoder

        return lm, load_transcoder(args.run, args.device), f"{args.model} + run {args.run}"
    from cltrace.transcoders.config import TranscoderConfig
    from cltrace.transcoders.model import Transcoder

    torch.manual_seed(0)
    tc = Transcoder(TranscoderConfig(n_layers=lm.n_layers, d_model=lm.d_model, n_features=args.features))
    sample = lm.capture(lm.tokenize(" ".join(itertools.islice(documents(args), 3))[:4000]))
    tc.init_from_sample(sample.mlp_in[0, 1:].float(), sample.mlp_out[0, 1:].float(), fire_frac=args.fire_frac)
    return lm, tc.to(args.device).eval().requires_grad_(False), f"{args.model} + random CLT"


def documents(args):
    from cltrace.data.corpus import corpus_ready, iter_documents

    if args.text:
        return iter_documents(paths=[args.text])
    if corpus_ready():
        return iter_documents(split="heldout")
    from tiny import WORDS

    rng = random.Random(0)
    return (" ".join(rng.choice(WORDS) for _ in range(200)) for _ in range(100_000))


def time_dashboards(path: Path, n: int) -> tuple[float, list[float]]:
    """(ms to open + first dashboard, [ms per dashboard]) on random features."""
    from cltrace.features.store import FeatureStore

    t0 = time.perf_counter()
    store = FeatureStore(path)
    rng = random.Random(1)
    keys = [(rng.randrange(store.n_layers), rng.randrange(store.n_features)) for _ in range(n)]
    store.dashboard(*keys[0])
    first = (time.perf_counter() - t0) * 1000
    times = []
    for key in keys:
        t = time.perf_counter()
        store.dashboard(*key)
        times.append((time.perf_counter() - t) * 1000)
    store.close()
    return first, times


def main() -> None:
    from cltrace.features.store import FeatureStoreConfig, build_feature_store

    args = parse_args()
    t0 = time.perf_counter()
    lm, tc, what = load_pieces(args)
    load_s = time.perf_counter() - t0
    cfg = FeatureStoreConfig(context_len=args.context_len, batch_contexts=args.batch)
    folder = Path(args.keep or tempfile.mkdtemp(prefix="bench-features-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "features.sqlite"
    half = args.tokens // 2
    a = build_feature_store(
        path, lm, tc, documents=documents(args), config=cfg, max_tokens=half, fresh=True, show_progress=False
    )
    b = build_feature_store(
        path, lm, tc, documents=documents(args), config=cfg, max_tokens=args.tokens, show_progress=False
    )
    per_token = (b.db_bytes - a.db_bytes) / max(1, b.tokens - a.tokens)
    per_million = b.db_bytes + per_token * (1_000_000 - b.tokens)
    effects_s = a.seconds - a.scan_seconds
    first, times = time_dashboards(path, args.dashboards)
    scan_rate = (a.tokens_this_run + b.tokens_this_run) / (a.scan_seconds + b.scan_seconds)
    L, F = lm.n_layers, tc.cfg.n_features
    rows = [
        ("setup", what),
        ("layers x features", f"{L} x {F} = {L * F:,}"),
        ("threads / device", f"{torch.get_num_threads()} / {args.device}, {args.dtype}"),
        ("load model + transcoder", f"{load_s:.1f} s"),
        ("token effects (all features)", f"{effects_s:.1f} s"),
        ("tokens scanned", f"{b.tokens:,} (two calls: {a.tokens:,} + {b.tokens_this_run:,})"),
        ("build rate (forward, encode, merge, flush)", f"{scan_rate:,.0f} tokens/s"),
        ("DB size after each call", f"{a.db_bytes / 2**20:.1f} MiB, {b.db_bytes / 2**20:.1f} MiB"),
        ("DB growth per token", f"{per_token:.1f} bytes"),
        ("DB size at 1M tokens (extrapolated)", f"{per_million / 2**20:.1f} MiB"),
        ("open + first dashboard", f"{first:.1f} ms"),
        (
            f"dashboard, {len(times)} random features",
            f"median {statistics.median(times):.2f} ms, "
            f"p95 {sorted(times)[int(0.95 * len(times)) - 1]:.2f} ms, "
            f"max {max(times):.2f} ms (goal < 100 ms)",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print(f"store: {path}")


if __name__ == "__main__":
    main()
