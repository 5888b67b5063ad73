"""QK attribution cost, a graph diff and the recurring circuit of a template, on a real model.

    nice .venv/bin/python bench/bench_qk.py                       # demo CLT when it exists
    nice .venv/bin/python bench/bench_qk.py --transcoder RUN --cities Tokyo,Paris,...

1. `cltrace trace --qk` on a ~15-token prompt: seconds of the graph (`attribute`) and of the QK
   attachment (the pruned graph's strongest attention edges, one head each), the number of
   heads explained, the largest relative error |Σ pairs - score| / |score| over them, and
   the head summaries.
2. The diff of the capital -> currency prompt for two cities (Tokyo vs Paris): counts of
   features that appear, vanish and change, and the answers.
3. The recurring circuit of "the currency of the country whose capital is {city} is the"
   over >= 8 cities: answers, the features kept in at least half of the prompts with their
   counts, each merged part's coverage, and the prompts the shared circuit does not explain.

The transcoder is the demo CLT (`demo-gemma-3-270m-clt`) when present, else a random CLT of
the demo's shape (18 x 1024, ~13 active per token per layer) calibrated on text. Results go
to bench/results/bench_qk.json. The machine is shared: compare numbers taken in one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PROMPT = "Fact: the currency of the country whose capital is Tokyo is the"
TEMPLATE = "the currency of the country whose capital is {city} is the"
CITIES = "Tokyo,Paris,Berlin,Rome,Madrid,London,Moscow,Beijing,Ottawa,Cairo"


def load(args):
    """(model, transcoder, name): the named run when it holds a transcoder, else a random CLT."""
    from cltrace.errors import CltraceError
    from cltrace.models.loading import load_model
    from cltrace.runs import open_run, resolve_run

    try:
        resolve_run(args.transcoder)
    except CltraceError as err:
        print(f"{err}: using a random CLT of the demo's shape", flush=True)
    else:
        loaded = open_run(args.transcoder, None, "cpu")
        return loaded.model, loaded.transcoder, loaded.run.name
    sys.path.insert(0, str(HERE))
    from bench_attribution import make_transcoder

    lm = load_model("gemma-3-270m")
    return lm, make_transcoder(lm, "clt", 1024, 13.0, False), "random-clt-18x1024"


def bench_qk(lm, tc, name: str, args) -> dict:
    from cltrace.attribution.graph import AttributionConfig
    from cltrace.attribution.pipeline import trace_to_files
    from cltrace.attribution.qk_graph import attach_to_trace

    cfg = AttributionConfig(max_feature_nodes=args.max_feature_nodes, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        trace = trace_to_files(lm, tc, PROMPT, cfg, Path(tmp) / "qk.json", transcoder_id=name)
        att = attach_to_trace(lm, tc, trace, max_edges=args.qk_edges)
        doc = json.loads(trace.json_path.read_text())
    results = list({id(r): r for rs in att.results.values() for r in rs}.values())  # distinct heads
    worst = max((r.relative_error for r in results), default=0.0)
    return {
        "prompt": PROMPT,
        "n_tokens": trace.graph.n_pos,
        "active_features": int(trace.graph.stats["n_active"]),
        "graph_seconds": trace.seconds,
        "qk_seconds": att.seconds,
        "heads_explained": att.n_heads_explained,
        "nodes_with_qk": sum("qk_tracing_results" in n for n in doc["nodes"]),
        "max_relative_error": worst,
        "summaries": [r.summary for r in results],
    }


def bench_diff(lm, tc, name: str, args) -> dict:
    from cltrace.attribution.diff import diff_graphs
    from cltrace.attribution.graph import AttributionConfig, attribute

    cfg = AttributionConfig(max_feature_nodes=args.max_feature_nodes, progress=False)
    a, b = (attribute(lm, tc, TEMPLATE.format(city=c), cfg, transcoder_id=name) for c in ("Tokyo", "Paris"))
    answers = tuple(lm.token_strings([int(g.logit_tokens[0])])[0] for g in (a, b))
    start = time.perf_counter()
    d = diff_graphs(a, b, answers)
    return {"seconds": time.perf_counter() - start, **d.to_dict()["counts"], "summary": d.summary()}


def bench_set(lm, tc, name: str, args) -> dict:
    from cltrace.attribution.graph import AttributionConfig
    from cltrace.attribution.recurring import expand_template, trace_prompt_set

    cfg = AttributionConfig(max_feature_nodes=args.max_feature_nodes, progress=False)
    prompts = expand_template(TEMPLATE, {"city": args.cities.split(",")})
    start = time.perf_counter()
    report = trace_prompt_set(
        lm,
        tc,
        prompts,
        cfg,
        template=TEMPLATE,
        transcoder_id=name,
        store=None if args.no_store else _store(name),
    )
    seconds = time.perf_counter() - start
    doc = report.to_dict()
    from cltrace.attribution.recurring_diagram import write_merged

    write_merged(report, Path(args.out).with_name("bench_qk_merged.json"), lm.n_layers, lm.name, name)
    return {
        "seconds": seconds,
        "n_prompts": len(prompts),
        "summary": report.lines(top=20),
        "parts": doc["parts"],
        "prompts": [
            {k: p[k] for k in ("prompt", "answer", "answer_prob", "explained")} for p in doc["prompts"]
        ],
    }


def _store(name: str):
    """The run's feature store (names the supernodes), or None."""
    from cltrace.errors import CltraceError
    from cltrace.runs import resolve_run

    try:
        path = resolve_run(name).feature_store
    except CltraceError:
        return None
    if not path.is_file():
        return None
    from cltrace.features.store import FeatureStore

    return FeatureStore(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--transcoder", default="demo-gemma-3-270m-clt")
    p.add_argument("--max-feature-nodes", type=int, default=4096)
    p.add_argument("--qk-edges", type=int, default=8)
    p.add_argument("--cities", default=CITIES)
    p.add_argument("--no-store", action="store_true", help="supernodes without the run's feature labels")
    p.add_argument("--skip", nargs="*", default=[], choices=["qk", "diff", "set"])
    p.add_argument("--out", default=str(HERE / "results" / "bench_qk.json"))
    args = p.parse_args(argv)
    lm, tc, name = load(args)
    print(f"model {lm.name}, transcoder {name}, {torch.get_num_threads()} threads", flush=True)
    out: dict = {"transcoder": name, "model": lm.name, "threads": torch.get_num_threads()}
    for key, fn in (("qk", bench_qk), ("diff", bench_diff), ("set", bench_set)):
        if key in args.skip:
            continue
        out[key] = fn(lm, tc, name, args)
        print(json.dumps({key: out[key]}, indent=1, ensure_ascii=False), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, ensure_ascii=False))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
