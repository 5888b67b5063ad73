"""Readable circuits measured on a prompt set of our own (issue 11, "Measure").

For every prompt the model answers as expected (its top next token is the expected answer;
the others are dropped and counted): attribution graph, pruning, automatic supernodes
(`circuits.build.build_circuit`) and validation on the real model
(`circuits.validate.validate_circuit`, constrained patching; optionally also unconstrained).
For every prompt pair whose two prompts are both answered: a graph-guided swap
(`circuits.swap.graph_guided_swap`, at most 30 (feature, position) pairs).

Prints and writes (`--out STEM` -> STEM.json and STEM.md):
- label detection scores from the feature store, if the store has scored labels (median and
  quartiles, against the shuffled-label baseline);
- per circuit: tokens, feature supernodes, member features, influence share, Spearman
  (supernodes, top features), failed supernodes, seconds;
- faithfulness Spearman per graph: median and worst;
- swap success over the pairs (top token becomes B's answer), pairs touched (median);
- seconds to produce a circuit (trace + supernodes + validation) for the prompt closest to
  15 tokens.

    .venv/bin/python bench/bench_circuits.py --run .cache/cltrace/runs/demo-gemma-3-270m-clt \\
        --out bench/results/circuits [--threads 2] [--max-feature-nodes 1024] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

warnings.filterwarnings("ignore")


@dataclass(frozen=True)
class Case:
    category: str
    prompt: str
    answer: str  # expected next token (with its leading space where the tokenizer has one)


CAPITAL = "The capital of {} is the city of"
TWO_HOP = "Fact: the {} of the country whose capital is {} is"
SPORT = "{} plays the sport of"
OPPOSITE = 'The opposite of "{}" is "'

PROMPTS: tuple[Case, ...] = (
    # the demo's three
    Case("two-hop", TWO_HOP.format("currency", "Tokyo") + " the", " yen"),
    Case("sports", SPORT.format("Michael Jordan"), " basketball"),
    Case("antonyms", OPPOSITE.format("hot"), "cold"),
    # two-hop facts
    Case("two-hop", TWO_HOP.format("currency", "Paris") + " the", " euro"),
    Case("two-hop", TWO_HOP.format("currency", "London") + " the", " pound"),
    Case(
        "two-hop",
        TWO_HOP.format("language spoken in", "Paris").replace("of the", "the", 1) + " called",
        " French",
    ),
    Case(
        "two-hop",
        TWO_HOP.format("language spoken in", "Madrid").replace("of the", "the", 1) + " called",
        " Spanish",
    ),
    Case("two-hop", "Fact: the capital of the state containing Dallas is", " Austin"),
    # sports
    Case("sports", SPORT.format("Tiger Woods"), " golf"),
    Case("sports", SPORT.format("Roger Federer"), " tennis"),
    Case("sports", SPORT.format("Lionel Messi"), " football"),
    Case("sports", SPORT.format("Tom Brady"), " football"),
    # antonyms
    Case("antonyms", OPPOSITE.format("big"), "small"),
    Case("antonyms", OPPOSITE.format("up"), "down"),
    Case("antonyms", OPPOSITE.format("good"), "bad"),
    Case("antonyms", OPPOSITE.format("fast"), "slow"),
    Case("antonyms", OPPOSITE.format("happy"), "sad"),
    # capitals
    Case("capitals", CAPITAL.format("France"), " Paris"),
    Case("capitals", CAPITAL.format("Japan"), " Tokyo"),
    Case("capitals", CAPITAL.format("Germany"), " Berlin"),
    Case("capitals", CAPITAL.format("Italy"), " Rome"),
    Case("capitals", CAPITAL.format("Spain"), " Madrid"),
    Case("capitals", CAPITAL.format("Russia"), " Moscow"),
    Case("capitals", CAPITAL.format("Egypt"), " Cairo"),
    Case("capitals", CAPITAL.format("the United Kingdom"), " London"),
    Case("capitals", CAPITAL.format("Texas"), " Austin"),
    # completions
    Case("completions", "The Eiffel Tower is located in the city of", " Paris"),
    Case("completions", "Twinkle, twinkle, little", " star"),
    Case("completions", "Monday, Tuesday, Wednesday,", " Thursday"),
    Case("completions", "January, February, March,", " April"),
    Case("completions", "The sun rises in the", " east"),
)

#: (A, B) prompts: the swap should turn A's answer into B's; the subjects differ, some in token length
PAIRS: tuple[tuple[str, str], ...] = (
    (TWO_HOP.format("currency", "Tokyo") + " the", TWO_HOP.format("currency", "Paris") + " the"),  # demo
    (TWO_HOP.format("currency", "Paris") + " the", TWO_HOP.format("currency", "London") + " the"),
    (PROMPTS[5].prompt, PROMPTS[6].prompt),  # French -> Spanish
    (SPORT.format("Michael Jordan"), SPORT.format("Tiger Woods")),  # demo
    (SPORT.format("Roger Federer"), SPORT.format("Lionel Messi")),
    (SPORT.format("Tiger Woods"), SPORT.format("Roger Federer")),
    (OPPOSITE.format("hot"), OPPOSITE.format("big")),  # demo
    (OPPOSITE.format("up"), OPPOSITE.format("good")),
    (OPPOSITE.format("fast"), OPPOSITE.format("happy")),
    (CAPITAL.format("France"), CAPITAL.format("Japan")),
    (CAPITAL.format("Germany"), CAPITAL.format("Italy")),
    (CAPITAL.format("Spain"), CAPITAL.format("Russia")),
    (CAPITAL.format("Egypt"), CAPITAL.format("France")),
    (CAPITAL.format("the United Kingdom"), CAPITAL.format("Germany")),  # 3 tokens vs 1
    (CAPITAL.format("Texas"), CAPITAL.format("Spain")),
)


def token_id(lm, text: str) -> int:
    return int(lm.tokenizer(text, add_special_tokens=False)["input_ids"][0])


def check_answers(lm, cases) -> tuple[list[int], list[dict]]:
    """Indices of the cases whose top next token is the expected answer; the others, with what
    the model says instead."""
    from cltrace.circuits.batched import last_logits, probabilities

    kept, dropped = [], []
    for i, c in enumerate(cases):
        probs = probabilities(lm, last_logits(lm, lm.tokenize(c.prompt)))[0]
        top = int(probs.argmax())
        if top == token_id(lm, c.answer):
            kept.append(i)
        else:
            dropped.append(
                {
                    "prompt": c.prompt,
                    "expected": c.answer,
                    "got": lm.token_strings([top])[0],
                    "p_expected": float(probs[token_id(lm, c.answer)]),
                    "p_top": float(probs[top]),
                }
            )
    return kept, dropped


def label_scores(store_path: Path) -> dict | None:
    """Detection scores of the store's labels against the shuffled baseline, if scored."""
    import sqlite3

    if not store_path.exists():
        return None
    conn = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT detection, detection_shuffled FROM label_scores WHERE detection IS NOT NULL"
        ).fetchall()
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    if not rows:
        return None
    det = sorted(r[0] for r in rows)
    shuf = sorted(r[1] for r in rows if r[1] is not None)
    q = lambda xs, f: xs[min(len(xs) - 1, int(f * len(xs)))] if xs else None  # noqa: E731
    return {
        "n": len(det),
        "median": statistics.median(det),
        "q25": q(det, 0.25),
        "q75": q(det, 0.75),
        "shuffled_median": statistics.median(shuf) if shuf else None,
        "share_above_0.7": sum(d > 0.7 for d in det) / len(det),
    }


def trace_circuit(lm, tc, store, case: Case, args) -> tuple[object, object, dict]:
    """Graph, circuit (built and validated) and the row of numbers for one prompt."""
    from cltrace.attribution.graph import AttributionConfig, attribute
    from cltrace.attribution.prune import prune
    from cltrace.circuits.build import CircuitConfig, build_circuit
    from cltrace.circuits.validate import ValidationConfig, validate_circuit

    t0 = time.perf_counter()
    graph = attribute(
        lm, tc, case.prompt, AttributionConfig(max_feature_nodes=args.max_feature_nodes, progress=False)
    )
    t1 = time.perf_counter()
    pruned = prune(graph)
    circuit = build_circuit(graph, pruned, lm, tc, store=store, cfg=CircuitConfig(constrain=True))
    t2 = time.perf_counter()
    fn = circuit.feature_nodes
    f = circuit.faithfulness
    row = {
        "category": case.category,
        "prompt": case.prompt,
        "answer": case.answer,
        "tokens": graph.n_pos,
        "p_answer": circuit.answer_prob,
        "supernodes": len(fn),
        "features": sum(len(n.node_ids) for n in fn),
        "pruned_features": int(pruned.node_mask[: graph.n_features].sum()),
        "influence_share": circuit.influence_share,
        "spearman_supernodes": f.get("spearman_supernodes"),
        "spearman_features": f.get("spearman_features"),
        "failed": sum(1 for n in fn if n.failed),
        "judged": sum(1 for n in fn if n.failed is not None),
        "spearman_steering": ((circuit.stats.get("validation") or {}).get("steering") or {}).get("spearman"),
        "spearman_edges": (circuit.stats.get("validation") or {}).get("spearman_edges"),
        "n_edges_checked": len((circuit.stats.get("validation") or {}).get("edges") or []),
        "seconds_trace": t1 - t0,
        "seconds_circuit": t2 - t1,
        "seconds_total": t2 - t0,
        "seconds_validate": circuit.stats.get("seconds_validate"),
        "supernode_table": [
            {
                "name": n.name,
                "positions": n.positions,
                "layers": n.layers,
                "size": len(n.node_ids),
                "share": n.influence_share,
                "predicted": n.predicted,
                "measured": n.measured,
                "prob_after": n.measured_prob,
                "failed": n.failed,
            }
            for n in fn
        ],
    }
    if args.unconstrained:
        other = validate_circuit(copy.deepcopy(circuit), graph, lm, tc, cfg=ValidationConfig(constrain=False))
        row["spearman_supernodes_unconstrained"] = other.faithfulness.get("spearman_supernodes")
        row["spearman_features_unconstrained"] = other.faithfulness.get("spearman_features")
        row["failed_unconstrained"] = sum(1 for n in other.feature_nodes if n.failed)
    return graph, circuit, row


def run_swaps(lm, tc, pairs, graphs, circuits, args) -> list[dict]:
    from cltrace.circuits.swap import SwapConfig, graph_guided_swap

    rows = []
    for a, b in pairs:
        ca, cb = PROMPTS[a], PROMPTS[b]
        row = {"a": ca.prompt, "b": cb.prompt, "answer_a": ca.answer, "answer_b": cb.answer}
        for rank in args.ranks:
            # "circuit": candidates are the members of the circuits' supernodes at the subject span,
            # ranked by predicted effect
            use = rank == "circuit"
            rep = graph_guided_swap(
                lm,
                tc,
                ca.prompt,
                cb.prompt,
                graph_a=graphs[a],
                graph_b=graphs[b],
                circuit_a=circuits[a] if use else None,
                circuit_b=circuits[b] if use else None,
                answer_a=token_id(lm, ca.answer),
                answer_b=token_id(lm, cb.answer),
                cfg=SwapConfig(max_pairs=args.max_pairs, rank="effect" if use else rank),
            )
            row[rank] = {
                "flipped": rep.flipped,
                "pairs": rep.pairs_touched,
                "p_b": [rep.p_b_before, rep.p_b_after],
                "p_a": [rep.p_a_before, rep.p_a_after],
                "top_after": rep.after[0].token,
                "spans": [list(rep.spans.a), list(rep.spans.b)],
                "candidates": list(rep.n_candidates),
                "seconds": rep.seconds,
            }
        rows.append(row)
    return rows


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(rows, swaps, labels, dropped, dropped_pairs, args) -> dict:
    target = min(rows, key=lambda r: abs(r["tokens"] - 15)) if rows else None
    out = {
        "n_prompts": len(rows),
        "n_dropped": len(dropped),
        "labels": labels,
        "spearman_supernodes": {
            "median": median([r["spearman_supernodes"] for r in rows]),
            "worst": min(
                (r["spearman_supernodes"] for r in rows if r["spearman_supernodes"] is not None), default=None
            ),
        },
        "spearman_features": {
            "median": median([r["spearman_features"] for r in rows]),
            "worst": min(
                (r["spearman_features"] for r in rows if r["spearman_features"] is not None), default=None
            ),
        },
        "spearman_steering": {
            "median": median([r["spearman_steering"] for r in rows]),
            "worst": min(
                (r["spearman_steering"] for r in rows if r["spearman_steering"] is not None), default=None
            ),
        },
        "spearman_edges": {
            "median": median([r["spearman_edges"] for r in rows]),
            "worst": min(
                (r["spearman_edges"] for r in rows if r["spearman_edges"] is not None), default=None
            ),
        },
        "influence_share_median": median([r["influence_share"] for r in rows]),
        "supernodes_median": median([r["supernodes"] for r in rows]),
        "features_median": median([r["features"] for r in rows]),
        "failed_share": (sum(r["failed"] for r in rows) / max(1, sum(r["judged"] for r in rows))),
        "seconds_15_tokens": None
        if target is None
        else {
            "tokens": target["tokens"],
            "trace": target["seconds_trace"],
            "circuit": target["seconds_circuit"],
            "total": target["seconds_total"],
        },
        "n_pairs": len(swaps),
        "n_pairs_dropped": len(dropped_pairs),
    }
    if args.unconstrained:
        for k in ("spearman_supernodes_unconstrained", "spearman_features_unconstrained"):
            vals = [r[k] for r in rows if r.get(k) is not None]
            out[k] = {"median": median(vals), "worst": min(vals, default=None)}
    for rank in args.ranks:
        res = [s[rank] for s in swaps]
        out[f"swap_{rank}"] = {
            "flipped": sum(r["flipped"] for r in res),
            "of": len(res),
            "pairs_median": median([r["pairs"] for r in res]),
            "pairs_median_flipped": median([r["pairs"] for r in res if r["flipped"]]),
        }
    return out


def fmt(x, spec=".2f"):
    return "–" if x is None else format(x, spec)


def markdown(summary, rows, swaps, dropped, dropped_pairs, meta, args) -> str:
    s = summary
    lines = [
        f"# Circuits bench ({meta['model']}, {meta['transcoder']})",
        "",
        f"{meta['date']}; {args.threads} threads; max feature nodes {args.max_feature_nodes}; "
        "validation: constrained patching (direct effects)"
        + (" and unconstrained." if args.unconstrained else "."),
        "",
        f"Prompts answered as expected: {s['n_prompts']} of {s['n_prompts'] + s['n_dropped']} "
        f"({s['n_dropped']} dropped); swap pairs with both prompts answered: {s['n_pairs']} "
        f"of {s['n_pairs'] + s['n_pairs_dropped']}.",
        "",
    ]
    lab = s["labels"]
    lines.append(
        "Label detection scores: "
        + (
            "none in the store (labels not scored)"
            if not lab
            else f"median {fmt(lab['median'])} (quartiles {fmt(lab['q25'])}–{fmt(lab['q75'])}, n={lab['n']}) "
            f"vs shuffled labels {fmt(lab['shuffled_median'])}"
        )
        + "."
    )
    lines += [
        "",
        f"Faithfulness (Spearman predicted vs measured): supernodes median "
        f"{fmt(s['spearman_supernodes']['median'])}, worst {fmt(s['spearman_supernodes']['worst'])}; "
        f"top features median {fmt(s['spearman_features']['median'])}, worst "
        f"{fmt(s['spearman_features']['worst'])}; supernodes steered ×2 median "
        f"{fmt(s['spearman_steering']['median'])}, worst {fmt(s['spearman_steering']['worst'])}; "
        f"supernode edges (downstream pre-activations) median {fmt(s['spearman_edges']['median'])}, "
        f"worst {fmt(s['spearman_edges']['worst'])}.",
    ]
    if args.unconstrained:
        u, v = s["spearman_supernodes_unconstrained"], s["spearman_features_unconstrained"]
        lines.append(
            f"Unconstrained (model runs on, total effects): supernodes median {fmt(u['median'])}, "
            f"worst {fmt(u['worst'])}; features median {fmt(v['median'])}, worst {fmt(v['worst'])}."
        )
    lines += [
        f"Circuit size: median {fmt(s['supernodes_median'], 'g')} feature supernodes, "
        f"{fmt(s['features_median'], 'g')} member features; influence share median "
        f"{fmt(s['influence_share_median'])}; failed supernodes {s['failed_share']:.0%} of those judged."
    ]
    t = s["seconds_15_tokens"]
    if t:
        lines.append(
            f"Seconds for a circuit of a {t['tokens']}-token prompt: {t['total']:.1f} "
            f"(trace {t['trace']:.1f}, supernodes + validation {t['circuit']:.1f})."
        )
    for rank in args.ranks:
        w = s[f"swap_{rank}"]
        lines.append(
            f"Swaps ranked by {rank}: {w['flipped']} of {w['of']} flip to B's answer with ≤ "
            f"{args.max_pairs} pairs; pairs touched median {fmt(w['pairs_median'], 'g')} "
            f"(flipped ones {fmt(w['pairs_median_flipped'], 'g')})."
        )
    lines += [
        "",
        "| prompt | tok | supernodes | features | infl. share | ρ supernodes | ρ features | "
        "failed/judged | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['prompt']}` → `{r['answer']}` | {r['tokens']} | {r['supernodes']} | {r['features']} | "
            f"{r['influence_share']:.2f} | {fmt(r['spearman_supernodes'])} | {fmt(r['spearman_features'])} | "
            f"{r['failed']}/{r['judged']} | {r['seconds_total']:.1f} |"
        )
    lines += [
        "",
        "| A → B | "
        + " | ".join(f"{k}: flipped, pairs, P(B) before→after, top after" for k in args.ranks)
        + " |",
        "|---|" + "---|" * len(args.ranks),
    ]
    for w in swaps:
        cells = [
            f"{'yes' if w[k]['flipped'] else 'no'}, {w[k]['pairs']}, "
            f"{w[k]['p_b'][0]:.3f}→{w[k]['p_b'][1]:.3f}, "
            f"`{w[k]['top_after']}`"
            for k in args.ranks
        ]
        lines.append(f"| `{w['a']}` → `{w['answer_b'].strip()}` | " + " | ".join(cells) + " |")
    if dropped:
        lines += ["", "Dropped prompts (the model's top token is not the expected answer):", ""]
        lines += [
            f"- `{d['prompt']}`: expected `{d['expected']}` (p {d['p_expected']:.3f}), got `{d['got']}` "
            f"(p {d['p_top']:.3f})"
            for d in dropped
        ]
    if dropped_pairs:
        lines += ["", "Dropped pairs: " + "; ".join(f"`{a}` / `{b}`" for a, b in dropped_pairs)]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=".cache/cltrace/runs/demo-gemma-3-270m-clt", help="transcoder run folder")
    p.add_argument("--model", default="gemma-3-270m", help="bundled model name or folder")
    p.add_argument("--out", default="bench/results/circuits", help="output stem: STEM.json and STEM.md")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--max-feature-nodes", type=int, default=1024, help="feature targets per graph")
    p.add_argument("--max-pairs", type=int, default=30, help="(feature, position) pairs a swap may touch")
    p.add_argument(
        "--ranks",
        nargs="+",
        default=["influence", "effect", "circuit"],
        choices=["influence", "effect", "circuit"],
        help="swap candidates: span features by influence or predicted effect, or circuit members",
    )
    p.add_argument("--unconstrained", action="store_true", help="also validate without constrained patching")
    p.add_argument("--quick", action="store_true", help="first 6 prompts and 3 pairs only")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from cltrace.features.store import FeatureStore
    from cltrace.models.loading import load_model
    from cltrace.runs import load_transcoder

    run = Path(args.run)
    tc = load_transcoder(run, "cpu")
    lm = load_model(args.model, device="cpu")
    db = run / "features.sqlite"
    store = FeatureStore(db) if db.exists() else None
    kept, dropped = check_answers(lm, PROMPTS)
    where = {c.prompt: i for i, c in enumerate(PROMPTS)}
    pairs = [(where[a], where[b]) for a, b in PAIRS if where[a] in kept and where[b] in kept]
    dropped_pairs = [(a, b) for a, b in PAIRS if (where[a], where[b]) not in pairs]
    if args.quick:
        kept, pairs = kept[:6], [(a, b) for a, b in pairs if a in kept[:6] and b in kept[:6]][:3]
    print(f"{len(kept)} of {len(PROMPTS)} prompts answered as expected; {len(pairs)} swap pairs", flush=True)
    stem = Path(
        args.out[:-5]
        if args.out.endswith(".json")
        else args.out[:-3]
        if args.out.endswith(".md")
        else args.out
    )
    stem.parent.mkdir(parents=True, exist_ok=True)
    partial = stem.with_name(stem.name + ".partial.json")  # rewritten after every prompt and pair

    def save_partial():
        partial.write_text(json.dumps({"prompts": rows, "swaps": swaps, "dropped": dropped}, default=str))

    graphs, circuits, rows, swaps = {}, {}, [], []
    for i in kept:
        graphs[i], circuits[i], row = trace_circuit(lm, tc, store, PROMPTS[i], args)
        rows.append(row)
        save_partial()
        print(
            f"{row['seconds_total']:5.1f} s  {row['tokens']:2d} tok  {row['supernodes']:2d} sn  "
            f"share {row['influence_share']:.2f}  ρ_sn {fmt(row['spearman_supernodes'])}  "
            f"ρ_f {fmt(row['spearman_features'])}  failed {row['failed']}/{row['judged']}  "
            f"{PROMPTS[i].prompt!r}",
            flush=True,
        )
    for pair in pairs:
        w = run_swaps(lm, tc, [pair], graphs, circuits, args)[0]
        swaps.append(w)
        save_partial()
        print(
            "swap "
            + "  ".join(
                f"{k}: {'FLIP' if w[k]['flipped'] else 'no  '} {w[k]['pairs']:2d} pairs "
                f"P(B) {w[k]['p_b'][0]:.3f}->{w[k]['p_b'][1]:.3f}"
                for k in args.ranks
            )
            + f"  {w['a']!r} -> {w['answer_b']!r}",
            flush=True,
        )
    labels = label_scores(db)
    summary = summarize(rows, swaps, labels, dropped, dropped_pairs, args)
    meta = {
        "model": args.model,
        "transcoder": str(run),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "args": vars(args),
    }
    md = markdown(summary, rows, swaps, dropped, dropped_pairs, meta, args)
    stem.with_name(stem.name + ".json").write_text(
        json.dumps(
            {
                "meta": meta,
                "summary": summary,
                "prompts": rows,
                "swaps": swaps,
                "dropped": dropped,
                "dropped_pairs": dropped_pairs,
            },
            indent=1,
            default=str,
        )
    )
    stem.with_name(stem.name + ".md").write_text(md)
    print("\n" + md)


if __name__ == "__main__":
    main()
