"""Swaps from the viewer (issue 13 item 5): replace a pinned supernode's features by the
matching features of a second prompt, with the library's graph-guided swap
(`cltrace.circuits.swap.graph_guided_swap`, METHOD.md §6).

Prompt A is the graph on screen; prompt B is another graph in the graphs folder or a typed
prompt. The two must differ in one span (the subject, `align_subjects`). Candidates:
    A: the pinned members at A's subject positions (only those: the swap never touches
       anything the user did not pin);
    B: the members of the supernode of the same name in B's circuit file when it has one
       touching B's subject, else every feature of B's graph at B's subject;
both ranked as the library ranks them (`SwapConfig.rank`: by default the graph's predicted
effect on their own answer, only supportive ones kept); the search then picks the fewest
(feature, position) pairs that flip A's answer to B's (or the best try when none flips).

Full graphs (`attribution.graph.Graph`) come from `<stem>.graph.safetensors` beside the
graph JSON (written by `cltrace trace`), or are traced once per prompt and cached.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cltrace.viewer.backend import BackendError, GraphRef

if TYPE_CHECKING:
    from cltrace.interventions.steer import Intervention
    from cltrace.transcoders.interface import TranscoderLike

CACHE_SIZE = 8  # traced or loaded full graphs kept in memory
TOP_K = 10


@dataclass(frozen=True)
class SwapRequest:
    """`POST /api/swap`: swap the members `node_ids` of graph `graph` with prompt B's."""

    graph: str
    node_ids: list[str]
    name: str | None = None  # the supernode's name, matched in B's circuit file
    source_graph: str | None = None  # B: a graph of the graphs folder ...
    source_prompt: str | None = None  # ... or a prompt
    generate: int = 0


@dataclass
class _Group:
    """The part of `circuits.circuit.CircuitNode` that `graph_guided_swap` reads."""

    node_ids: list[str]
    positions: list[int]


@dataclass
class _Circuit:
    feature_nodes: list[_Group] = field(default_factory=list)


def feature_position(node_id: str) -> int | None:
    """The position of a feature node id `{layer}_{feature}_{pos}` (None for other nodes)."""
    parts = node_id.split("_")
    if len(parts) == 3 and all(p.isdigit() for p in parts):
        return int(parts[2])
    return None


def group(node_ids: list[str]) -> _Group:
    ids = [i for i in node_ids if feature_position(i) is not None]
    return _Group(ids, sorted({feature_position(i) for i in ids}))  # type: ignore[misc]


def full_graph_path(ref: GraphRef) -> Path:
    """`graphs/x.json` -> `graphs/x.graph.safetensors` (what `cltrace trace` writes)."""
    stem = ref.path.name[: -len(".json")] if ref.path.name.endswith(".json") else ref.path.stem
    return ref.path.with_name(stem + ".graph.safetensors")


class GraphCache:
    """Full graphs by prompt: loaded from the safetensors beside a graph JSON, else traced."""

    def __init__(self, size: int = CACHE_SIZE):
        self.size = size
        self._graphs: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, lm, transcoder: TranscoderLike, prompt: str, ref: GraphRef | None = None):
        with self._lock:
            if prompt in self._graphs:
                self._graphs.move_to_end(prompt)
                return self._graphs[prompt]
        graph = self._load(ref, lm, prompt) if ref is not None else None
        if graph is None:
            from cltrace.attribution.graph import AttributionConfig, attribute

            graph = attribute(
                lm, transcoder, prompt, AttributionConfig(max_feature_nodes=1024, progress=False)
            )
        with self._lock:
            self._graphs[prompt] = graph
            while len(self._graphs) > self.size:
                self._graphs.popitem(last=False)
        return graph

    @staticmethod
    def _load(ref: GraphRef, lm, prompt: str):
        """The saved full graph when it exists and is this prompt's (same tokens)."""
        from cltrace.attribution.graph import Graph
        from cltrace.errors import CltraceError

        path = full_graph_path(ref)
        if not path.is_file():
            return None
        try:
            graph = Graph.load(path)
        except CltraceError:
            return None
        tokens = lm.tokenize(prompt).reshape(-1).tolist()
        return graph if graph.input_tokens.reshape(-1).tolist() == tokens else None


def prompt_of(ref: GraphRef) -> str:
    prompt = ref.metadata.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise BackendError(f"graph {ref.name!r} has no prompt to re-run", status=422)
    return prompt


def matching_group(circuit: dict | None, name: str | None) -> _Circuit | None:
    """B's circuit supernode named `name` (case-insensitive), as a one-node circuit."""
    if not circuit or not name:
        return None
    for node in circuit.get("supernodes") or []:
        if (
            node.get("kind") == "features"
            and str(node.get("name", "")).strip().lower() == name.strip().lower()
        ):
            return _Circuit([group([str(i) for i in node.get("node_ids") or []])])
    return None


def run_swap(
    steerer,
    cache: GraphCache,
    graph_a: GraphRef,
    request: SwapRequest,
    graph_b: GraphRef | None,
    circuit_b: dict | None,
) -> dict:
    """The swap of `request` on the model: the intervention result (before/after top tokens,
    continuations) plus `swap`: answers, spans, pairs touched, flipped, P(B's answer)."""
    from cltrace.circuits.swap import SwapConfig, align_subjects, graph_guided_swap
    from cltrace.errors import CltraceError

    lm, tc = steerer.model, steerer.tc
    prompt_a = prompt_of(graph_a)
    prompt_b = prompt_of(graph_b) if graph_b is not None else str(request.source_prompt)
    pinned = group(request.node_ids)
    if not pinned.node_ids:
        raise BackendError(
            "pin at least one feature node to swap (embeddings, errors and logits cannot be swapped)",
            status=400,
        )
    try:
        spans = align_subjects(
            lm.tokenize(prompt_a).reshape(-1).tolist(), lm.tokenize(prompt_b).reshape(-1).tolist()
        )
        if not any(spans.a[0] <= p < spans.a[1] for p in pinned.positions):
            words = _span_text(graph_a, spans.a)
            raise BackendError(
                f"none of the pinned features is at the tokens where the prompts differ (positions "
                f"{spans.a[0]}-{spans.a[1] - 1}{words}); pin features at those positions",
                status=422,
            )
        ga = cache.get(lm, tc, prompt_a, graph_a)
        gb = cache.get(lm, tc, prompt_b, graph_b)
        matched = matching_group(circuit_b, request.name)
        if matched is not None and not any(
            spans.b[0] <= p < spans.b[1] for p in matched.feature_nodes[0].positions
        ):
            matched = None  # B's supernode is elsewhere: fall back to all of B's subject features
        report = graph_guided_swap(
            lm,
            tc,
            prompt_a,
            prompt_b,
            graph_a=ga,
            graph_b=gb,
            circuit_a=_Circuit([pinned]),
            circuit_b=matched,
            cfg=SwapConfig(top_k=TOP_K),
        )
        if not report.interventions:
            raise BackendError(
                "nothing to swap: the pinned features are not in the full graph at the "
                "differing tokens, and prompt B has no features there",
                status=422,
            )
        result = steerer.run(prompt_a, report.interventions, top_k=TOP_K, generate=request.generate)
    except CltraceError as err:  # prompts that do not differ in one span, indices out of range
        raise BackendError(err.message, status=422) from err
    out = result.to_dict()
    swap = report.to_dict()
    for key in ("interventions", "before", "after"):  # the top level has them (Steerer.run)
        swap.pop(key)
    swap["n_trials"] = len(swap.pop("trials"))
    swap["answer_ids"] = [report.answer_a_id, report.answer_b_id]
    swap["source"] = (
        f"supernode “{request.name}” of B's circuit"
        if matched is not None
        else "B's features at its differing tokens"
    )
    swap["suppressed"] = sorted({_node_id(i) for i in report.interventions if i.mode == "scale"})
    out["swap"] = swap
    out["applied"] = [
        {
            "layer": i.layer,
            "feature": i.feature,
            "pos": (i.positions or (None,))[0],
            "mode": i.mode,
            "value": i.value,
        }
        for i in report.interventions
    ]
    return out


def _node_id(iv: Intervention) -> str:
    """The graph node id `layer_feature_pos` of a swap edit (graph_guided_swap gives each one position)."""
    if not iv.positions:
        raise BackendError(f"swap edit {iv} has no position", status=500)
    return f"{iv.layer}_{iv.feature}_{iv.positions[0]}"


def _span_text(ref: GraphRef, span: tuple[int, int]) -> str:
    tokens = ref.metadata.get("prompt_tokens") or []
    words = "".join(str(t) for t in tokens[span[0] : span[1]])
    return f": “{words}”" if words else ""
