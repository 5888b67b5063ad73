"""Graph-guided swaps, the paper's way (issue 11 item 5, METHOD.md §6).

"Texas → Byzantine Empire": prompt A ("... capital is Tokyo is the") and prompt B ("... capital
is Paris is the") differ in a subject span. The swap suppresses the features at A's subject
that carry A's answer and injects the features at B's subject that carry B's answer, only at
the subject positions, and checks whether A's next token becomes B's answer.

1. Alignment (`align_subjects`): the longest common prefix and the longest common suffix of
   the two token sequences (not overlapping); what is left in the middle is each prompt's
   subject span. The spans may differ in length: B's positions are mapped onto A's from the
   right (B's last subject token onto A's last subject token, and so on); B positions left
   over when B's span is longer are not injected.
2. Candidates: the feature nodes of A's graph at A's span positions (or only the members of
   A's circuit supernodes there, when a circuit is given), ranked by how much they matter for
   A's answer; the same for B's graph, B's span and B's answer. Two rankings
   (`SwapConfig.rank`): "effect" (default), the graph's predicted drop of the answer's logit
   when the node alone is ablated (circuits/predict.py, total effect; most supportive first,
   features predicted to oppose the answer left out), or "influence", the node's unsigned
   influence on the answer's logit node (attribution/prune.py with the answer's logit
   weighted 1). On the demo CLT (gemma-3-270m) "effect" flipped 3 of 5 trial pairs within
   30 pairs, "influence" 1 of 5 (bench/bench_circuits.py measures both).
3. Interventions: A's top-k features are scaled by `suppress_factor` (×0) at their positions;
   B's top-k are set to `inject_scale` × their activation on B at the aligned A positions.
   Each (feature, position) counts as one pair touched.
4. Search (cheap: one batched forward of A per 16 settings): every k in `sizes` × every
   `inject_scale` whose pair count stays within `max_pairs`, tried in order of pair count, a
   batch at a time, stopping after the first batch in which one flips. The chosen setting is
   the one with the fewest pairs among those whose top token is B's answer (ties: higher
   P(B's answer)); when none flips, the one with the highest P(B's answer) is reported, not
   flipped.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from cltrace.attribution.graph import AttributionConfig, Graph, attribute
from cltrace.attribution.prune import influence, logit_weights, normalize_rows
from cltrace.circuits.batched import Edit, probabilities, run_edits
from cltrace.circuits.predict import propagate, relative_changes
from cltrace.errors import CltraceError
from cltrace.interventions.steer import Intervention, TokenProb
from cltrace.transcoders.interface import TranscoderLike


@dataclass(frozen=True)
class SubjectSpans:
    """Where two prompts differ: [start, end) of each prompt's subject span."""

    a: tuple[int, int]
    b: tuple[int, int]

    def b_to_a(self) -> dict[int, int]:
        """B subject position -> A subject position, aligned right to left."""
        n = min(self.a[1] - self.a[0], self.b[1] - self.b[0])
        return {self.b[1] - 1 - k: self.a[1] - 1 - k for k in range(n)}


def align_subjects(tokens_a: Sequence[int], tokens_b: Sequence[int]) -> SubjectSpans:
    """The differing middle spans of two token sequences (common prefix and suffix removed)."""
    a, b = [int(t) for t in tokens_a], [int(t) for t in tokens_b]
    prefix = 0
    while prefix < min(len(a), len(b)) and a[prefix] == b[prefix]:
        prefix += 1
    suffix = 0
    while suffix < min(len(a), len(b)) - prefix and a[-1 - suffix] == b[-1 - suffix]:
        suffix += 1
    span_a, span_b = (prefix, len(a) - suffix), (prefix, len(b) - suffix)
    if span_a[0] >= span_a[1] or span_b[0] >= span_b[1]:
        raise CltraceError(
            "the two prompts do not differ in a subject span (one is the other with "
            "tokens added, or they are equal)",
            "give two prompts that differ in one place, e.g. '... Tokyo is the' and '... Paris is the'",
        )
    return SubjectSpans(span_a, span_b)


@dataclass
class SwapConfig:
    """How `graph_guided_swap` chooses and searches."""

    max_pairs: int = 30  # at most this many (feature, position) pairs touched
    sizes: tuple[int, ...] = (1, 2, 3, 5, 8, 12, 15)  # features per side tried
    inject_scales: tuple[float, ...] = (1.0, 2.0, 4.0)  # B's activations × this
    suppress_factor: float = 0.0  # A's features × this (0: ablate)
    rank: Literal["influence", "effect"] = "effect"  # see the module docstring, step 2
    batch_size: int = 16
    top_k: int = 5  # top tokens reported before / after

    def __post_init__(self):
        if self.max_pairs < 1 or not self.sizes or min(self.sizes) < 1:
            raise CltraceError("max_pairs and every size must be >= 1")
        if self.rank not in ("influence", "effect"):
            raise CltraceError(f"rank must be 'influence' or 'effect', got {self.rank!r}")


@dataclass
class SwapTrialRow:
    """One searched setting."""

    k: int
    inject_scale: float
    pairs: int
    p_b: float
    top: str
    flipped: bool


@dataclass
class SwapReport:
    """What a graph-guided swap did to prompt A."""

    prompt_a: str
    prompt_b: str
    answer_a: str
    answer_b: str
    answer_a_id: int
    answer_b_id: int
    spans: SubjectSpans
    pairs_touched: int
    interventions: list[Intervention]  # what was applied (Steerer-compatible)
    before: list[TokenProb]
    after: list[TokenProb]
    flipped: bool  # the top token became B's answer
    p_b_before: float
    p_b_after: float
    p_a_before: float
    p_a_after: float
    n_candidates: tuple[int, int]  # ranked features available at A's / B's span
    trials: list[SwapTrialRow] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        row = lambda t: {"token": t.token, "prob": t.prob}  # noqa: E731
        return {
            "prompt_a": self.prompt_a,
            "prompt_b": self.prompt_b,
            "answer_a": self.answer_a,
            "answer_b": self.answer_b,
            "span_a": list(self.spans.a),
            "span_b": list(self.spans.b),
            "pairs_touched": self.pairs_touched,
            "flipped": self.flipped,
            "interventions": [i.describe() for i in self.interventions],
            "before": [row(t) for t in self.before],
            "after": [row(t) for t in self.after],
            "p_b": [self.p_b_before, self.p_b_after],
            "p_a": [self.p_a_before, self.p_a_after],
            "n_candidates": list(self.n_candidates),
            "seconds": self.seconds,
            "trials": [vars(t) for t in self.trials],
        }


def answer_weights(graph: Graph, answer_id: int) -> torch.Tensor:
    """Logit weights for influence: the answer's logit node alone, or all logits if absent."""
    tokens = graph.logit_tokens.tolist()
    if answer_id not in tokens:
        return logit_weights(graph)
    w = torch.zeros(graph.n_nodes)
    w[graph.logit_offset + tokens.index(answer_id)] = 1.0
    return w


def ranked_span_features(
    graph: Graph, span: tuple[int, int], answer_id: int, rank: str, allowed: set[str] | None = None
) -> list[int]:
    """Feature nodes at span positions (optionally only `allowed` frontend ids), best first."""
    feats = graph.active_features[graph.selected_features]
    at = [i for i in range(graph.n_features) if span[0] <= int(feats[i, 1]) < span[1]]
    if allowed is not None:
        at = [i for i in at if f"{int(feats[i, 0])}_{int(feats[i, 2])}_{int(feats[i, 1])}" in allowed]
    if not at:
        return []
    tokens = graph.logit_tokens.tolist()
    if rank == "effect" and answer_id in tokens:
        delta = propagate(graph, relative_changes(graph, [[i] for i in at]))
        score = -delta[:, graph.logit_offset + tokens.index(answer_id)]
    else:
        infl = influence(normalize_rows(graph.adjacency.float()), answer_weights(graph, answer_id))
        score = infl[at]
    order = torch.argsort(score, descending=True, stable=True).tolist()
    return [at[j] for j in order if rank != "effect" or float(score[j]) > 0]


def _circuit_members(circuit, span: tuple[int, int]) -> set[str] | None:
    """Frontend ids of the circuit's feature supernodes that touch the span (None: no circuit)."""
    if circuit is None:
        return None
    ids = set()
    for node in circuit.feature_nodes:
        if any(span[0] <= p < span[1] for p in node.positions):
            ids.update(node.node_ids)
    return ids or None


def swap_edits(
    graph_a: Graph,
    graph_b: Graph,
    sup: list[int],
    inj: list[int],
    spans: SubjectSpans,
    inject_scale: float,
    suppress_factor: float,
) -> list[Edit]:
    """Suppress A's nodes `sup` at their positions; inject B's nodes `inj` at the aligned A positions.
    A (feature, position) both suppressed and injected is injected (counted once)."""
    fa = graph_a.active_features[graph_a.selected_features]
    fb = graph_b.active_features[graph_b.selected_features]
    acts_b = graph_b.activation_values[graph_b.selected_features]
    to_a = spans.b_to_a()
    edits: dict[tuple[int, int, int], Edit] = {}
    for i in sup:
        l, p, f = (int(v) for v in fa[i])
        edits[(l, p, f)] = Edit(l, p, f, "scale", suppress_factor)
    for i in inj:
        l, q, f = (int(v) for v in fb[i])
        if q in to_a:
            edits[(l, to_a[q], f)] = Edit(l, to_a[q], f, "set", inject_scale * float(acts_b[i]))
    return list(edits.values())


def _mapped(graph_b: Graph, nodes: list[int], spans: SubjectSpans) -> list[int]:
    pos = graph_b.active_features[graph_b.selected_features][:, 1]
    to_a = spans.b_to_a()
    return [i for i in nodes if int(pos[i]) in to_a]


def graph_guided_swap(
    lm,
    transcoder: TranscoderLike,
    prompt_a: str,
    prompt_b: str,
    *,
    graph_a: Graph | None = None,
    graph_b: Graph | None = None,
    circuit_a=None,
    circuit_b=None,
    answer_a: int | None = None,
    answer_b: int | None = None,
    cfg: SwapConfig | None = None,
    attribution: AttributionConfig | None = None,
) -> SwapReport:
    """Swap A's subject features for B's (see the module docstring); graphs are traced if not given.

    Args:
        lm, transcoder: the model and a JumpReLU transcoder.
        prompt_a, prompt_b: prompts that differ in one subject span.
        graph_a, graph_b: their attribution graphs (traced with `attribution` when None).
        circuit_a, circuit_b: optional circuits: candidates are then their supernodes' members.
        answer_a, answer_b: answer token ids (default: each graph's top logit).
        cfg: search settings.
    """
    cfg = cfg or SwapConfig()
    start = time.perf_counter()
    attribution = attribution or AttributionConfig(max_feature_nodes=1024, progress=False)
    graph_a = graph_a or attribute(lm, transcoder, prompt_a, attribution)
    graph_b = graph_b or attribute(lm, transcoder, prompt_b, attribution)
    spans = align_subjects(graph_a.input_tokens.tolist(), graph_b.input_tokens.tolist())
    answer_a = int(graph_a.logit_tokens[0]) if answer_a is None else int(answer_a)
    answer_b = int(graph_b.logit_tokens[0]) if answer_b is None else int(answer_b)
    sup = ranked_span_features(graph_a, spans.a, answer_a, cfg.rank, _circuit_members(circuit_a, spans.a))
    inj = _mapped(
        graph_b,
        ranked_span_features(graph_b, spans.b, answer_b, cfg.rank, _circuit_members(circuit_b, spans.b)),
        spans,
    )
    settings = _settings(graph_a, graph_b, sup, inj, spans, cfg)
    tokens = graph_a.input_tokens.reshape(1, -1).to(lm.device)
    logits, trials = _search(lm, transcoder, tokens, settings, answer_b, cfg.batch_size)
    probs = probabilities(lm, logits)
    best = _choose(trials)
    row = 0 if best is None else best + 1
    edits = [] if best is None else settings[best][2]
    names = lm.token_strings([answer_a, answer_b])
    return SwapReport(
        prompt_a=prompt_a,
        prompt_b=prompt_b,
        answer_a=names[0],
        answer_b=names[1],
        answer_a_id=answer_a,
        answer_b_id=answer_b,
        spans=spans,
        pairs_touched=len(edits),
        interventions=[Intervention(e.layer, e.feature, (e.pos,), e.mode, e.value) for e in edits],
        before=_top(lm, probs[0], logits[0], cfg.top_k),
        after=_top(lm, probs[row], logits[row], cfg.top_k),
        flipped=bool(best is not None and trials[best].flipped),
        p_b_before=float(probs[0, answer_b]),
        p_b_after=float(probs[row, answer_b]),
        p_a_before=float(probs[0, answer_a]),
        p_a_after=float(probs[row, answer_a]),
        n_candidates=(len(sup), len(inj)),
        trials=trials,
        seconds=time.perf_counter() - start,
    )


def _settings(graph_a, graph_b, sup, inj, spans, cfg: SwapConfig) -> list[tuple[int, float, list[Edit]]]:
    """(k, inject_scale, edits) for every searched setting within the pair budget, deduplicated."""
    out, seen = [], set()
    for k in cfg.sizes:
        for scale in cfg.inject_scales:
            edits = swap_edits(graph_a, graph_b, sup[:k], inj[:k], spans, scale, cfg.suppress_factor)
            key = tuple(sorted((e.layer, e.pos, e.feature, e.mode, e.value) for e in edits))
            if not edits or len(edits) > cfg.max_pairs or key in seen:
                continue
            seen.add(key)
            out.append((k, scale, edits))
    return sorted(out, key=lambda x: len(x[2]))


def _search(lm, transcoder: TranscoderLike, tokens, settings, answer_b: int, batch_size: int):
    """Clean run, then the settings in order of pair count, a batch at a time, stopping after the
    first batch with a flip. Returns the logits (clean first) and one trial per evaluated setting."""
    out: list[torch.Tensor] = []
    trials: list[SwapTrialRow] = []
    for i in range(0, max(1, len(settings)), batch_size):
        chunk = settings[i : i + batch_size]
        rows = ([[]] if i == 0 else []) + [e for _, _, e in chunk]  # the clean run rides along
        logits = run_edits(lm, transcoder, tokens, rows, batch_size=len(rows))
        probs = probabilities(lm, logits[-len(chunk) :] if chunk else logits[:0])
        top = probs.argmax(-1).tolist()
        names = lm.token_strings(top)
        trials += [
            SwapTrialRow(k, s, len(e), float(probs[j, answer_b]), names[j], top[j] == answer_b)
            for j, (k, s, e) in enumerate(chunk)
        ]
        out.append(logits)
        if any(t.flipped for t in trials):
            break
    return torch.cat(out), trials


def _choose(trials: list[SwapTrialRow]) -> int | None:
    """Fewest pairs among flipping settings (then highest P(B)); else highest P(B)."""
    if not trials:
        return None
    flipped = [j for j, t in enumerate(trials) if t.flipped]
    if flipped:
        return min(flipped, key=lambda j: (trials[j].pairs, -trials[j].p_b))
    return max(range(len(trials)), key=lambda j: trials[j].p_b)


def _top(lm, probs: torch.Tensor, logits: torch.Tensor, k: int) -> list[TokenProb]:
    p, idx = probs.topk(k)
    names = lm.token_strings(idx.tolist())
    return [TokenProb(int(i), s, float(q), float(logits[i])) for i, s, q in zip(idx, names, p)]
