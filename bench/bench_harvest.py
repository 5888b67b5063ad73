"""Benchmark the harvest: throughput against the bare forward pass, bf16 error, disk-harvest memory.

    python bench/bench_harvest.py [--model gemma-3-270m|DIR] [--text DIR_OR_FILES...]
    python bench/bench_harvest.py --disk-tokens 200000 --out /tmp/store   # peak RSS to disk

Throughput: the same packed contexts, in the same run, go through (a) the bare forward
without the unembedding (`LoadedModel.run(with_logits=False)`) and (b) the whole harvest
(`iter_activation_batches`: tokenise, pack, capture, drop position 0, shuffle buffer,
rebatch). Passes alternate and the best of each is kept (the machine is shared and noisy).
bf16 error: harvested bf16 activations (bf16 forward, bf16 storage) against a float32
forward, relative L2 error per token, per layer; mean and max over tokens.
"""

from __future__ import annotations

import argparse
import itertools
import resource
import sys
import time
from collections.abc import Iterable, Iterator

import torch

from cltrace.activations.harvest import (
    HarvestConfig,
    batch_contexts,
    harvest_contexts,
    iter_activation_batches,
    iter_contexts,
    limit_contexts,
)
from cltrace.models import DEFAULT_MODEL
from cltrace.models.loading import LoadedModel, load_model


def iter_text(paths: list[str] | None) -> Iterator[str]:
    """The corpus's train split, or the user's files (streamed: `cltrace.data.corpus`)."""
    from cltrace.data.corpus import iter_documents

    return iter_documents("train", paths=paths)


def time_bare(lm: LoadedModel, groups: list[list[list[int]]]) -> float:
    """Seconds for the forward passes alone (no hooks, no unembedding)."""
    start = time.perf_counter()
    with torch.no_grad():
        for group in groups:
            lm.run(torch.tensor(group, device=lm.device), with_logits=False)
    return time.perf_counter() - start


def time_harvest(lm: LoadedModel, docs: list[str], cfg: HarvestConfig, n_tokens: int) -> float:
    """Seconds for the whole harvest of `n_tokens` tokens, from text to shuffled batches."""
    start = time.perf_counter()
    got = sum(
        b.n_tokens for b in iter_activation_batches(lm, docs, cfg, batch_tokens=4096, max_tokens=n_tokens)
    )
    assert got == n_tokens, (got, n_tokens)
    return time.perf_counter() - start


def throughput(
    lm: LoadedModel, docs: list[str], cfg: HarvestConfig, n_tokens: int, repeats: int
) -> tuple[float, float]:
    """(bare forward tokens/s, harvest tokens/s), best of `repeats` alternating passes."""
    contexts = limit_contexts(iter_contexts(lm, docs, cfg), n_tokens)
    groups = list(batch_contexts(contexts, cfg.batch_contexts))
    time_bare(lm, groups[:1])  # warm-up
    bare, harv = [], []
    for _ in range(repeats):
        bare.append(time_bare(lm, groups))
        harv.append(time_harvest(lm, docs, cfg, n_tokens))
    return n_tokens / min(bare), n_tokens / min(harv)


def relative_errors(ref: torch.Tensor, got: torch.Tensor) -> torch.Tensor:
    """Per-token, per-layer ||got - ref|| / ||ref||: [tokens, layers]."""
    return (got.float() - ref.float()).norm(dim=-1) / ref.float().norm(dim=-1).clamp_min(1e-30)


def bf16_error(fp32: LoadedModel, bf16: LoadedModel, docs: list[str], n_contexts: int) -> dict:
    """Relative error of bf16-harvested activations against float32, per layer."""
    cfg32 = HarvestConfig(forward_dtype="float32", store_dtype="float32")
    cfg16 = HarvestConfig(forward_dtype="bfloat16", store_dtype="bfloat16")
    contexts = list(itertools.islice(iter_contexts(fp32, docs, cfg32), n_contexts))
    out = {}
    for group in batch_contexts(contexts, 8):
        ref, got = harvest_contexts(fp32, group, cfg32), harvest_contexts(bf16, group, cfg16)
        store_only = harvest_contexts(fp32, group, HarvestConfig(forward_dtype="float32"))
        for name, r, g in (
            ("mlp_in", ref.mlp_in, got.mlp_in),
            ("mlp_out", ref.mlp_out, got.mlp_out),
            ("mlp_out (bf16 storage only)", ref.mlp_out, store_only.mlp_out),
        ):
            out.setdefault(name, []).append(relative_errors(r, g))
    return {k: torch.cat(v) for k, v in out.items()}


def print_error_table(errors: dict) -> None:
    names = list(errors)
    print("\nbf16 relative error vs float32 (per token, ||a16 - a32|| / ||a32||)")
    print("layer | " + " | ".join(f"{n} mean / max" for n in names))
    n_layers = errors[names[0]].shape[1]
    for l in range(n_layers):
        cells = [f"{errors[n][:, l].mean():.4f} / {errors[n][:, l].max():.4f}" for n in names]
        print(f"{l:5d} | " + " | ".join(cells))
    cells = [f"{errors[n].mean():.4f} / {errors[n].max():.4f}" for n in names]
    print("  all | " + " | ".join(cells))


def disk_harvest(model: str, docs: Iterable[str], out: str, n_tokens: int) -> None:
    """Harvest `n_tokens` to disk in bf16 and report the rate and the peak RSS of this process."""
    from cltrace.activations.store import write_store

    cfg = HarvestConfig()
    lm = load_model(model, dtype=cfg.torch_forward_dtype())
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    store = write_store(lm, docs, out, n_tokens, cfg, corpus={"bench": True})
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    gb = sum(s.bytes for s in store.manifest.shards) / 1e9
    print(
        f"disk harvest: {store.n_tokens:,} tokens, {gb:.1f} GB, {seconds:.0f} s, "
        f"{store.n_tokens / seconds:,.0f} tokens/s; peak RSS {peak:.2f} GiB "
        f"(after loading the model: {rss_loaded:.2f} GiB)"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--text", nargs="+", default=None, help="files or folders (default: the corpus)")
    p.add_argument("--tokens", type=int, default=12_192, help="tokens per throughput pass")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--dtypes",
        nargs="+",
        choices=["float32", "bfloat16"],
        default=["float32", "bfloat16"],
        help="forward dtypes to time (the error table needs both)",
    )
    p.add_argument("--error-contexts", type=int, default=32)
    p.add_argument("--disk-tokens", type=int, default=None, help="instead: harvest this many to --out")
    p.add_argument("--out", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.disk_tokens:
        return disk_harvest(args.model, iter_text(args.text), args.out, args.disk_tokens)
    docs = list(itertools.islice(iter_text(args.text), 2000))  # re-read by every pass
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, model {args.model}, "
        f"{len(docs)} documents"
    )
    models, rows = {}, []
    for name in args.dtypes:
        lm = models[name] = load_model(args.model, dtype=getattr(torch, name))
        cfg = HarvestConfig(forward_dtype=name, buffer_tokens=4096)
        bare, harv = throughput(lm, docs, cfg, args.tokens, args.repeats)
        rows.append((name, bare, harv))
    print(
        f"\nthroughput, {args.tokens:,} tokens per pass, ctx 128 x batch 8, all "
        f"{lm.n_layers} layers' MLP in+out, best of {args.repeats}"
    )
    print("dtype    | bare forward tok/s | harvest tok/s | ratio")
    for name, bare, harv in rows:
        print(f"{name:8s} | {bare:18,.0f} | {harv:13,.0f} | {harv / bare:.2f}")
    if len(models) == 2:
        print_error_table(bf16_error(models["float32"], models["bfloat16"], docs, args.error_contexts))


if __name__ == "__main__":
    sys.exit(main())
