"""Label quality on a real feature store: detection and output scores against shuffled labels.

    .venv/bin/python bench/bench_labels.py demo-gemma-3-270m-clt --relabel --score-output 300
    .venv/bin/python bench/bench_labels.py demo-gemma-3-270m-clt          # read what is stored

With --relabel the store's labels and scores are recomputed in place (no rescan; the model
and transcoder are loaded only to make the held-out pool when the store has none and for
output scores). Then it prints, from the store: how many features are labelled, broad or
never active; the distribution of detection scores (held-out AUC of each label's read-side
evidence) and of the same scores with labels shuffled between features; likewise for output
scores (percentile of the written tokens' logit rise when the feature is steered up); a
histogram of both; the labels of the strongest features (best detection with at least
--min-pos held-out activating positions, then most active) and of a random sample.
"""

from __future__ import annotations

import argparse
import json
import random
import time


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "run", nargs="?", default="demo-gemma-3-270m-clt", help="run folder or name, or a store file"
    )
    p.add_argument("--db", default=None, help="feature store file (default: RUN/features.sqlite)")
    p.add_argument("--relabel", action="store_true", help="recompute labels and scores first")
    p.add_argument("--score-output", type=int, default=300, help="features to output-score when relabelling")
    p.add_argument("--broad-density", type=float, default=0.1)
    p.add_argument("--pool-contexts", type=int, default=32, help="contexts of the held-out pool (when made)")
    p.add_argument("--examples", type=int, default=15, help="strongest labels to print")
    p.add_argument("--random", type=int, default=10, help="random labels to print")
    p.add_argument(
        "--min-pos", type=int, default=8, help="held-out activating positions for a 'strongest' label"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the numbers here")
    return p.parse_args()


def relabel(args) -> dict:
    from cltrace.features.label_store import needs_model
    from cltrace.features.label_store import relabel as relabel_store
    from cltrace.features.labels import LabelConfig
    from cltrace.features.store import FeatureStore
    from cltrace.runs import open_run, store_path

    cfg = LabelConfig(broad_density=args.broad_density, pool_contexts=args.pool_contexts)
    with FeatureStore(store_path(args.run, args.db)) as store:
        model = tc = None
        t0 = time.perf_counter()
        if args.score_output or needs_model(store):
            loaded = open_run(args.run, None, args.device, "float32")
            model, tc = loaded.model, loaded.transcoder
        t_load = time.perf_counter() - t0
        pool_made = needs_model(store)
        done = relabel_store(
            store, cfg, model=model, transcoder=tc, score_output=args.score_output, show_progress=True
        )
    return {
        "load_seconds": round(t_load, 1),
        "relabel_seconds": round(done.seconds, 1),
        "pool_made": pool_made,
    }


def histogram(values: list[float], edges=(0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0001)) -> list[int]:
    return [sum(lo <= v < hi for v in values) for lo, hi in zip(edges, edges[1:])]


def main() -> None:
    args = parse_args()
    from cltrace.features.store import FeatureStore
    from cltrace.runs import store_path

    timing = relabel(args) if args.relabel else {}
    path = store_path(args.run, args.db)
    with FeatureStore(path) as store:
        s = store.label_summary()
        if s is None:
            raise SystemExit(f"{path} has no scored labels: run with --relabel")
        rows = store.labels_table(include_broad=True)
        cols = {
            k: [r[k] for r in rows if r[k] is not None and not r["broad"]] for k in ("detection", "output")
        }
        shuffled = {
            k: [
                v
                for (v,) in store.conn.execute(
                    f"SELECT {k}_shuffled FROM label_scores WHERE {k}_shuffled IS NOT NULL"
                )
            ]
            for k in ("detection", "output")
        }
        n_pos = {
            (int(i) // store.n_features, int(i) % store.n_features): json.loads(e).get("n_pos", 0)
            for i, e in store.conn.execute("SELECT id, evidence FROM label_scores")
        }
        tokens = store.progress()[1]
    print(
        f"store {path}: {s['n_features']:,} features, {tokens:,} tokens scanned; "
        f"{s['n_dead']:,} never active, {s['n_broad']:,} broad (> {s['broad_density']:.0%} of tokens), "
        f"{s['n_with_reads']:,} with read evidence, {s['n_with_writes']:,} with written words"
    )
    if timing:
        print(
            f"relabel: {timing['relabel_seconds']} s (model load {timing['load_seconds']} s, "
            f"pool made: {timing['pool_made']})"
        )
    print(
        f"\n{'score':<20}{'n':>7}{'p10':>7}{'p25':>7}{'median':>8}{'p75':>7}{'p90':>7}{'mean':>7}{'>0.7':>7}"
    )
    for key in ("detection", "detection_shuffled", "output", "output_shuffled"):
        d = s[key]
        if d.get("n"):
            print(
                f"{key:<20}{d['n']:>7,}{d['p10']:>7.2f}{d['p25']:>7.2f}{d['median']:>8.2f}{d['p75']:>7.2f}"
                f"{d['p90']:>7.2f}{d['mean']:>7.2f}{d['share_above_0.7']:>7.0%}"
            )
    print("\nhistogram   [0,.3) [.3,.4) [.4,.5) [.5,.6) [.6,.7) [.7,.8) [.8,.9) [.9,.95) [.95,1]")
    for key, vals in (
        ("detection", cols["detection"]),
        ("  shuffled", shuffled["detection"]),
        ("output", cols["output"]),
        ("  shuffled", shuffled["output"]),
    ):
        if vals:
            print(f"{key:<12}" + "".join(f"{c:>8,}" for c in histogram(vals)))
    strong = [
        r
        for r in rows
        if not r["broad"] and r["detection"] is not None and n_pos[(r["layer"], r["index"])] >= args.min_pos
    ]
    strong.sort(key=lambda r: (-round(r["detection"], 2), -(r["density"] or 0)))
    print(
        f"\nstrongest labels (best detection with >= {args.min_pos} held-out activating positions, "
        f"then most active):"
    )
    show(strong[: args.examples], n_pos)
    named = [r for r in rows if not r["broad"]]
    print(f"\n{args.random} random labels:")
    show(random.Random(0).sample(named, min(args.random, len(named))), n_pos)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": s, "timing": timing, "strongest": strong[: args.examples]}, f, indent=1)


def show(rows: list[dict], n_pos: dict) -> None:
    fmt = lambda v: "  -  " if v is None else f"{v:.2f}"  # noqa: E731
    print(f"  {'feature':>9}  {'detect':>6}  {'(pos)':>5}  {'output':>6}  {'density':>8}  label")
    for r in rows:
        print(
            f"  {r['layer']:>4}:{r['index']:<4}  {fmt(r['detection']):>6}  "
            f"{n_pos[(r['layer'], r['index'])]:>5}  "
            f"{fmt(r['output']):>6}  {(r['density'] or 0):>8.3%}  {r['label']}"
        )


if __name__ == "__main__":
    main()
