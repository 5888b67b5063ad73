"""`cltrace demo`: from a fresh machine to a report of the paper's experiments and the viewer.

Steps, each skipped when an earlier run already did it:

1. the default model (dequantised once) and the corpus;
2. a cross-layer transcoder trained with the `demo` preset;
3. its feature store (top contexts, promoted tokens, labels) on held-out text;
4. attribution graphs of the experiment prompts, pruned and saved for the viewer;
5. the experiments of "On the Biology of a Large Language Model" as measured interventions:
   two-hop recall with a country swap, the sport of an athlete, antonyms;
6. a Markdown report with SVG figures, then the viewer on the demo graphs.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cltrace import paths
from cltrace.errors import CltraceError
from cltrace.models import DEFAULT_MODEL

if TYPE_CHECKING:
    from cltrace.runs import LoadedRun
    from cltrace.transcoders.interface import TranscoderLike


@dataclass(frozen=True)
class Experiment:
    """One experiment: a prompt, the answer we expect, and a contrast prompt for a swap.

    Attributes:
        name: short title.
        prompt: traced and intervened on.
        answer: the expected next token (with its leading space where the tokenizer has one).
        swap_prompt: a prompt about another concept whose features are swapped in, or None.
        swap_answer: the answer the swap should produce.
        note: what the experiment shows in the paper.
        subject: the word whose features carry the concept (their table is in the report).
    """

    name: str
    prompt: str
    answer: str
    swap_prompt: str | None = None
    swap_answer: str | None = None
    note: str = ""
    subject: str | None = None


EXPERIMENTS: tuple[Experiment, ...] = (
    Experiment(
        "Two-hop recall",
        "Fact: the currency of the country whose capital is Tokyo is the",
        " yen",
        "Fact: the currency of the country whose capital is Paris is the",
        " euro",
        "Tokyo → Japan → yen: the intermediate country features are swapped for France's.",
        subject="Tokyo",
    ),
    Experiment(
        "Sport of an athlete",
        "Michael Jordan plays the sport of",
        " basketball",
        "Tiger Woods plays the sport of",
        " golf",
        "The athlete's features drive the sport; swapping in another athlete changes it.",
        subject="Jordan",
    ),
    Experiment(
        "Antonyms",
        'The opposite of "hot" is "',
        "cold",
        'The opposite of "big" is "',
        "small",
        "An 'opposite' operation applied to the adjective's features.",
        subject="hot",
    ),
)


@dataclass
class DemoConfig:
    """What `cltrace demo` runs."""

    model: str = DEFAULT_MODEL  # bundled model name or transformers folder
    preset: str = "demo"  # training preset (see transcoders/config.py)
    run: str | None = None  # run folder; default <runs>/demo-<model>-clt
    feature_tokens: int = 60_000  # held-out tokens scanned for the feature store
    eval_tokens: int = 10_000  # held-out tokens for `cltrace eval` (a tenth for the replacement)
    max_feature_nodes: int = 1024  # feature targets per graph
    ablate_top: int = 10  # features ablated in the ablation experiments
    out: Path = field(default_factory=lambda: paths.home() / "demo")
    serve: bool = True  # start the viewer at the end
    open_browser: bool = True
    port: int = 8765
    device: str = "auto"  # see cltrace.hardware.resolve_device

    def run_dir(self) -> Path:
        if self.run:
            return Path(self.run)
        slug = self.model.rstrip("/").split("/")[-1]
        return paths.runs_dir() / f"demo-{slug}-clt"


def step(title: str) -> None:
    print(f"\n==> {title}", flush=True)


def run_demo(cfg: DemoConfig) -> Path:
    """Run every step; return the report's path."""
    start = time.perf_counter()
    step(f"model {cfg.model} and corpus")
    if cfg.model in _bundled():
        from cltrace.models.bundled import ensure_model_dir

        ensure_model_dir(cfg.model)
    from cltrace.data.corpus import ensure_corpus

    ensure_corpus()

    run_dir = cfg.run_dir()
    step(f"cross-layer transcoder ({cfg.preset} preset) in {run_dir}")
    if (run_dir / "transcoder" / "config.json").exists():
        print("already trained")
    else:
        from cltrace.transcoders.config import preset
        from cltrace.transcoders.launch import has_checkpoint, train_run

        train_run(
            preset(cfg.preset, model=cfg.model), run_dir, resume=has_checkpoint(run_dir), device=cfg.device
        )

    from cltrace.runs import open_run

    loaded = open_run(run_dir, cfg.model, cfg.device)
    if not (run_dir / "eval.json").exists():
        step(f"evaluation on held-out text -> {run_dir / 'eval.json'}")
        evaluate(loaded, cfg.eval_tokens)

    db = run_dir / "features.sqlite"
    step(f"feature store ({cfg.feature_tokens:,} held-out tokens) in {db}")
    build_features(loaded, db, cfg.feature_tokens)

    report = write_report(cfg, loaded, db)
    print(f"\nreport: {report}  ({time.perf_counter() - start:.0f} s in all)")
    if cfg.serve:
        step("viewer")
        from cltrace.features.store import FeatureStore
        from cltrace.interventions.steer import Steerer
        from cltrace.viewer.model_backend import ModelBackend
        from cltrace.viewer.server import ViewerConfig, serve

        backend = ModelBackend(FeatureStore(db), Steerer(loaded.model, loaded.transcoder))
        serve(
            ViewerConfig(graph_dirs=[cfg.out / "graphs"], port=cfg.port, open_browser=cfg.open_browser),
            backend,
        )
    return report


def evaluate(loaded: LoadedRun, tokens: int) -> None:
    """`cltrace eval` on `tokens` held-out tokens (a tenth for the replacement metrics): print the
    table and write RUN/eval.json."""
    from cltrace.io import atomic_write_json
    from cltrace.transcoders.evaluate import evaluate_on_text, report

    result = evaluate_on_text(loaded.transcoder, loaded.model, tokens=tokens, replacement_tokens=tokens // 10)
    print(report(result.activations, result.replacement))
    atomic_write_json(result.to_dict(), loaded.run.dir / "eval.json")


def build_features(loaded: LoadedRun, db: Path, tokens: int) -> None:
    """`cltrace features` with its defaults: scan (or continue scanning) `tokens` held-out tokens."""
    from cltrace.features.store import FeatureStoreConfig, build_feature_store

    summary = build_feature_store(
        db,
        loaded.model,
        loaded.transcoder,
        config=FeatureStoreConfig(),
        max_tokens=tokens,
        model_id=loaded.model_name,
        transcoder_id=str(loaded.run.transcoder_dir),
    )
    print(
        f"{db}: {summary.tokens:,} tokens scanned ({summary.tokens_this_run:,} now, "
        f"{summary.tokens_per_second:,.0f} tok/s), {summary.db_bytes / 2**20:.1f} MiB"
    )
    print(f"see a feature: cltrace feature {loaded.run.dir} LAYER:INDEX")


def _bundled() -> set[str]:
    from cltrace.models.bundled import BUNDLED

    return set(BUNDLED)


# -- experiments ------------------------------------------------------------------------------


def write_report(cfg: DemoConfig, loaded: LoadedRun, db: Path) -> Path:
    """Trace every experiment, run its interventions, and write report.md with figures."""
    from cltrace.features.store import FeatureStore
    from cltrace.interventions.steer import Steerer

    out = cfg.out
    (out / "graphs").mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    run_dir, tc, lm = loaded.run.dir, loaded.transcoder, loaded.model
    store = FeatureStore(db) if db.exists() else None
    steerer = Steerer(lm, tc)
    sections = []
    results = []
    for exp in EXPERIMENTS:
        step(f"experiment: {exp.name}")
        section, data = run_experiment(exp, lm, tc, steerer, store, cfg)
        sections.append(section)
        results.append(data)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    report = out / "report.md"
    report.write_text(_header(cfg, run_dir, tc) + "\n\n".join(sections) + "\n")
    return report


def run_experiment(
    exp: Experiment, lm, tc: TranscoderLike, steerer, store, cfg: DemoConfig
) -> tuple[str, dict]:
    """Trace the prompt, ablate its top answer features, swap in the contrast concept."""
    from cltrace.report.svg import before_after_bars

    traced = trace_and_save(exp.prompt, lm, tc, cfg, slug=_slug(exp.name))
    answer = _token_id(lm, exp.answer)
    top = key_features(traced.graph, answer, cfg.ablate_top)
    circuit_lines, circuit_data = circuit_section(traced, lm, tc, store, answer)
    lines = [
        f"## {exp.name}",
        "",
        *circuit_lines,
        f"*{exp.note}*",
        "",
        f"Prompt: `{exp.prompt}` — expected answer `{exp.answer!r}`.",
        "",
        _logit_table(traced, lm),
        "",
        f"Graph: {traced.graph.n_nodes} nodes / {int((traced.graph.adjacency != 0).sum()):,} edges "
        f"before pruning, "
        f"{traced.n_json_nodes} nodes / {traced.n_json_links:,} links after; "
        f"replacement score {traced.scores['unpruned'].replacement:.3f} "
        f"(pruned {traced.scores['pruned'].replacement:.3f}), completeness "
        f"{traced.scores['unpruned'].completeness:.3f} "
        f"(pruned {traced.scores['pruned'].completeness:.3f}); traced in {traced.seconds:.1f} s. "
        f"Open it in the viewer: `{traced.json_path.name}`.",
        "",
    ]
    data: dict = {
        "name": exp.name,
        "prompt": exp.prompt,
        "answer": exp.answer,
        "graph": str(traced.json_path),
        "scores": {k: dataclasses.asdict(v) for k, v in traced.scores.items()},
        "circuit": circuit_data,
    }
    if top:
        lines += [
            "Features with the strongest direct effect on the answer's logit:",
            "",
            "| layer | position (token) | feature | activation | edge to answer | label |",
            "|---|---|---|---|---|---|",
        ]
        strings = traced.graph.token_strings
        for f in top:
            label = store.label(f["layer"], f["feature"]) if store else ""
            lines.append(
                f"| {f['layer']} | {f['pos']} ({strings[f['pos']]!r}) | {f['feature']} | "
                f"{f['activation']:.2f} | {f['edge']:+.3f} | {label or ''} |"
            )
        lines.append("")
        ivs = _ablation(top)
        res = steerer.run(exp.prompt, ivs, top_k=5, generate=8)
        p0, p1 = res.prob(answer, after=False), res.prob(answer)
        fig = before_after_bars(
            cfg.out / "figures" / f"{_slug(exp.name)}-ablation.svg",
            f"Ablating the top {len(ivs)} answer features",
            [exp.answer],
            [p0],
            [p1],
        )
        lines += [
            f"**Ablation** of these {len(ivs)} features (×0 at their positions): "
            f"P({exp.answer!r}) {p0:.3f} → {p1:.3f}. Top after: "
            + ", ".join(f"{t.token!r} {t.prob:.3f}" for t in res.after[:5])
            + ".",
            f"Continuation before: {res.continuation_before!r}; after: {res.continuation_after!r}.",
            "",
            f"![ablation](figures/{fig.name})",
            "",
        ]
        data["ablation"] = {
            "features": [(f["layer"], f["pos"], f["feature"]) for f in top],
            "p_before": p0,
            "p_after": p1,
            "top_after": [t.token for t in res.after[:5]],
        }
    if exp.subject:
        lines += _subject_section(exp, traced.graph, store, data)
    if exp.swap_prompt:
        lines += _swap_section(exp, lm, steerer, answer, cfg, data, traced.graph)
    if "ablation" in data and data["ablation"]["p_after"] > 0.8 * data["ablation"]["p_before"]:
        lines.append(
            "*Honest note:* ablating these features barely moves the answer: the "
            "answer is carried elsewhere (error nodes or many small features) in this "
            "transcoder."
        )
    return "\n".join(lines) + "\n", data


def _subject_section(exp: Experiment, graph, store, data: dict, k: int = 8) -> list[str]:
    """The features at the subject word's (last) token, ranked by their total direct effect
    on the rest of the graph (Σ |outgoing edges|): where the concept enters."""
    assert exp.subject is not None, "called for experiments with a subject"
    strings = graph.token_strings
    subject = exp.subject.strip().lower()
    hits = [p for p, t in enumerate(strings) if subject in t.strip().lower() and t.strip()]
    if not hits:
        return []
    pos = hits[-1]
    nodes = graph.nodes()
    at = (nodes.pos[: graph.n_features] == pos).nonzero().flatten()
    if at.numel() == 0:
        return []
    out = graph.adjacency[:, at].abs().sum(0)
    order = out.argsort(descending=True)[:k]
    rows = []
    for j in order.tolist():
        i = int(at[j])
        layer, feat = int(nodes.layer[i]), int(nodes.feature[i])
        rows.append(
            {
                "layer": layer,
                "feature": feat,
                "activation": float(nodes.activation[i]),
                "out_effect": float(out[j]),
                **_label_and_score(store, layer, feat),
            }
        )
    data["subject_features"] = {"pos": pos, "token": strings[pos], "features": rows}
    lines = [
        f"Features at {strings[pos]!r} (position {pos}) with the largest direct effect on the rest "
        f"of the graph (Σ |outgoing edges|):",
        "",
        "| layer | feature | activation | Σ\\|out\\| | label | detection |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['layer']} | {r['feature']} | {r['activation']:.2f} | {r['out_effect']:.3f} | {r['label']} | "
        f"{_score_text(r['detection'])} |"
        for r in rows
    ]
    return lines + [
        "",
        "*detection*: held-out AUC of the label's read-side evidence (0.5 is chance; "
        "`cltrace features RUN --list` shows the shuffled-label baseline).",
        "",
    ]


def _label_and_score(store, layer: int, feature: int) -> dict:
    """The feature's label and its detection score (None when the store has no scored labels)."""
    if store is None:
        return {"label": "", "detection": None}
    scores = store.label_scores(layer, feature)
    return {"label": store.label(layer, feature) or "", "detection": scores and scores["detection"]}


def _score_text(score: float | None) -> str:
    return "–" if score is None else f"{score:.2f}"


def _swap_section(exp: Experiment, lm, steerer, answer: int, cfg: DemoConfig, data: dict, graph) -> list[str]:
    """Swap in the other prompt's distinctive features: every point of a small grid (how many
    features, how strongly, at the last position or position by position), best one shown."""
    from cltrace.report.svg import before_after_bars

    assert exp.swap_prompt is not None and exp.swap_answer is not None, "called for swap experiments"
    target = _token_id(lm, exp.swap_answer)
    trials = steerer.swap_sweep(exp.prompt, exp.swap_prompt, target)
    best = trials[0]
    res = steerer.run(exp.prompt, best.interventions, top_k=5, generate=8)
    pa0, pa1 = res.prob(answer, after=False), res.prob(answer)
    pb0, pb1 = res.prob(target, after=False), res.prob(target)
    fig = before_after_bars(
        cfg.out / "figures" / f"{_slug(exp.name)}-swap.svg",
        f"Swap in the features of: {exp.swap_prompt}",
        [exp.answer, exp.swap_answer],
        [pa0, pb0],
        [pa1, pb1],
    )
    flipped = [t for t in trials if t.top_id == target]
    data["swap"] = {
        "source_prompt": exp.swap_prompt,
        "best": _trial_dict(best),
        "p_answer": [pa0, pa1],
        "p_swap_answer": [pb0, pb1],
        "top_after": [t.token for t in res.after[:5]],
        "grid": [_trial_dict(t) for t in trials],
        "n_flipped": len(flipped),
    }
    verdict = (
        f"the top answer becomes {exp.swap_answer!r} in {len(flipped)} of {len(trials)} settings"
        if flipped
        else f"the top answer does not become {exp.swap_answer!r} in any of the {len(trials)} settings"
    )
    lines = [
        f"**Swap**: features distinctive of this prompt are suppressed at every position and "
        f"those distinctive of `{exp.swap_prompt}` injected (at the last position, or position by "
        f"position), on a grid of {len(trials)} settings; {verdict}. Best setting "
        f"({best.n_interventions} interventions: {best.n_auto} features each way, injected "
        f"×{best.inject_scale:g}, {best.where}): P({exp.answer!r}) {pa0:.3f} → {pa1:.3f}, "
        f"P({exp.swap_answer!r}) {pb0:.3f} → {pb1:.3f}. Top after: "
        + ", ".join(f"{t.token!r} {t.prob:.3f}" for t in res.after[:5])
        + ".",
        f"Continuation after: {res.continuation_after!r}.",
        "",
        f"![swap](figures/{fig.name})",
        "",
        "| features each way | injected × | where | P(" + exp.swap_answer.strip() + ") | top token |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {t.n_auto} | {t.inject_scale:g} | {t.where} | {t.p_target:.3f} | {t.top!r} |" for t in trials
    ]
    return lines + ["", *_graph_swap_lines(exp, lm, steerer.tc, answer, target, graph, data)]


def _graph_swap_lines(
    exp: Experiment, lm, tc: TranscoderLike, answer: int, target: int, graph, data: dict
) -> list[str]:
    """The paper's swap: only the features at the two prompts' subject spans (cltrace.circuits.swap)."""
    from cltrace.circuits.swap import graph_guided_swap

    assert exp.swap_prompt is not None and exp.swap_answer is not None, "called for swap experiments"
    try:
        rep = graph_guided_swap(
            lm, tc, exp.prompt, exp.swap_prompt, graph_a=graph, answer_a=answer, answer_b=target
        )
    except CltraceError as err:  # e.g. the tokenizer makes the two prompts identical
        data["graph_swap"] = {"error": str(err)}
        return [f"**Graph-guided swap**: not possible here: {err}.", ""]
    data["graph_swap"] = rep.to_dict()
    verdict = (
        f"the top answer becomes {exp.swap_answer!r}"
        if rep.flipped
        else (f"the top answer stays {rep.after[0].token!r}")
    )
    return [
        f"**Graph-guided swap** (the paper's way: only the features at the subject span, at most 30 "
        f"(feature, position) pairs): {rep.pairs_touched} pairs touched; {verdict}. "
        f"P({exp.answer!r}) {rep.p_a_before:.3f} → {rep.p_a_after:.3f}, "
        f"P({exp.swap_answer!r}) {rep.p_b_before:.3f} → {rep.p_b_after:.3f}.",
        "",
    ]


def _trial_dict(t) -> dict:
    return {
        "n_auto": t.n_auto,
        "inject_scale": t.inject_scale,
        "where": t.where,
        "n_interventions": t.n_interventions,
        "p_target": t.p_target,
        "top": t.top,
    }


def trace_and_save(prompt: str, lm, tc: TranscoderLike, cfg: DemoConfig, slug: str):
    """Attribute, prune, score and save one prompt's graph (full + viewer JSON)."""
    from cltrace.attribution.graph import AttributionConfig
    from cltrace.attribution.pipeline import trace_to_files

    return trace_to_files(
        lm,
        tc,
        prompt,
        AttributionConfig(max_feature_nodes=cfg.max_feature_nodes),
        cfg.out / "graphs" / f"{slug}.json",
        transcoder_id=cfg.run_dir().name,
    )


def circuit_section(traced, lm, tc: TranscoderLike, store, answer_id: int) -> tuple[list[str], dict]:
    """The experiment's circuit (cltrace.circuits): its diagram first, then one line of numbers.
    Explains the expected answer when it is one of the graph's output nodes, else the top token."""
    from cltrace.circuits.build import circuit_to_files

    graph = traced.graph
    target = answer_id if answer_id in graph.logit_tokens.tolist() else None
    c, json_path, svg_path = circuit_to_files(
        graph, traced.pruned, traced.json_path, lm, tc, store=store, answer_id=target
    )
    f, n = c.faithfulness, len(c.feature_nodes)
    failed = sum(1 for x in c.feature_nodes if x.failed)
    text = (
        f"Circuit for {c.answer!r}: {n} supernodes carry {c.influence_share:.0%} of the logit influence "
        f"({c.stats['n_grouped_features']} of the pruned graph's {c.stats['n_pruned_features']} features; "
        f"error nodes carry {c.stats['error_share']:.0%})"
    )
    if f.get("spearman_supernodes") is not None:
        text += (
            f"; predicted vs measured effect of ablating each supernode: Spearman "
            f"{f['spearman_supernodes']:.2f} over supernodes"
            + (
                f", {f['spearman_features']:.2f} over the top {f['n_features']} features"
                if f.get("spearman_features") is not None
                else ""
            )
            + f"; {failed} of {n} predictions failed (dashed red)"
        )
    seconds = c.stats["seconds_build"] + (c.stats.get("seconds_validate") or 0.0)
    lines = [
        f"![circuit]({svg_path.parent.name}/{svg_path.name})",
        "",
        text + f". Made in {seconds:.1f} s: `{json_path.name}`.",
        "",
    ]
    return lines, {
        "path": str(json_path),
        "n_supernodes": n,
        "influence_share": c.influence_share,
        "faithfulness": f,
        "n_failed": failed,
        "seconds": seconds,
    }


def key_features(graph, answer_id: int, k: int) -> list[dict]:
    """The k active features with the largest positive direct edge into the answer's logit."""
    import torch

    logits = graph.logit_tokens.tolist()
    if answer_id not in logits:
        return []
    row = graph.adjacency[graph.logit_offset + logits.index(answer_id), : graph.n_features]
    vals, idx = torch.topk(row, min(k, graph.n_features))
    nodes = graph.nodes()
    return [
        {
            "layer": int(nodes.layer[i]),
            "pos": int(nodes.pos[i]),
            "feature": int(nodes.feature[i]),
            "activation": float(nodes.activation[i]),
            "edge": float(v),
        }
        for v, i in zip(vals.tolist(), idx.tolist())
        if v > 0
    ]


def _ablation(features: list[dict]):
    from cltrace.interventions.steer import Intervention

    return [Intervention(f["layer"], f["feature"], (f["pos"],), "scale", 0.0) for f in features]


def _logit_table(traced, lm) -> str:
    g = traced.graph
    cells = [
        f"{traced.logit_strings[t]!r} {p:.3f}"
        for t, p in zip(g.logit_tokens.tolist(), g.logit_probabilities.tolist())
    ]
    return "Top next tokens: " + ", ".join(cells) + "."


def _token_id(lm, text: str) -> int:
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    return int(ids[0])


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def _header(cfg: DemoConfig, run_dir: Path, tc: TranscoderLike) -> str:
    c = tc.cfg
    metrics = ""
    eval_path = run_dir / "eval.json"
    if eval_path.exists():
        from cltrace.transcoders.evaluate import ActivationMetrics

        ev = json.loads(eval_path.read_text())
        a, r = ActivationMetrics(**ev["activations"]).summary(), ev.get("replacement") or {}
        metrics = (
            f"\nHeld-out quality (`{eval_path}`): normalised MSE {a['nmse']:.3f}, L0 "
            f"{a['l0']:.1f} per layer, dead {a['dead'] / (c.n_layers * c.n_features):.1%}"
            + (
                f"; replacement model: top-1 agreement {r['top1_agreement']:.1%}, KL {r['kl']:.2f}, "
                f"CE loss recovered {r['ce_recovered']:.2f}"
                if r
                else ""
            )
            + ".\n"
        )
    return (
        f"# cltrace demo report\n\nModel `{cfg.model}`; transcoder `{run_dir.name}` "
        f"({c.kind.upper()}, {c.n_layers} layers × {c.n_features} features, preset `{cfg.preset}`)."
        f"\n{metrics}\nEvery number below was measured by this run. Graphs are in "
        f"`{cfg.out / 'graphs'}`; `cltrace serve --graphs {cfg.out / 'graphs'}` browses them.\n\n"
    )
