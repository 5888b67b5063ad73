"""The model-backed viewer back-end: dashboards from a feature store, interventions through a
`Steerer` (model + transcoder). Either part may be missing; `NullBackend` answers for it.

Both parts are duck-typed so tests can pass stand-ins:
    store.dashboard(layer, index) -> dict         (cltrace.features.store.FeatureStore)
    steerer.run(prompt, interventions, top_k=, generate=) -> obj with .to_dict()
                                                   (cltrace.interventions.steer.Steerer)
"""

from __future__ import annotations

import threading
from typing import Any

from cltrace.errors import CltraceError
from cltrace.viewer.backend import BackendError, GraphRef, InterventionRequest, NullBackend
from cltrace.viewer.swap import GraphCache, SwapRequest, run_swap

TOP_K = 10


class ModelBackend:
    """Feature dashboards and interventions for graphs traced with the loaded model."""

    def __init__(self, store: Any = None, steerer: Any = None):
        self.store = store
        self.steerer = steerer
        self.null = NullBackend()
        self._lock = threading.Lock()  # one forward at a time: the server is multi-threaded
        self._label_rows: dict[tuple[int, int], dict] | None = None  # store.labels_table, once
        self._graphs = GraphCache()  # full graphs for swaps

    def feature(self, graph: GraphRef, layer: int, index: int) -> dict | None:
        if self.store is None:
            return self.null.feature(graph, layer, index)
        check_same_transcoder(self.store, graph)
        try:
            return self.store.dashboard(layer, index)
        except CltraceError as err:  # the store's "no feature L:i in this store"
            raise BackendError(err.message, status=404) from err

    def intervene(self, graph: GraphRef, request: InterventionRequest) -> dict:
        if self.steerer is None:
            return self.null.intervene(graph, request)
        from cltrace.interventions.steer import Intervention

        prompt = graph.metadata.get("prompt")
        if not isinstance(prompt, str):
            raise BackendError("the graph has no prompt to re-run", status=422)
        ivs = [
            Intervention(
                layer=i.layer,
                feature=i.feature,
                mode=i.mode,
                value=i.value,
                positions=None if i.pos is None else (i.pos,),
            )
            for i in request.interventions
        ]
        # freeze attention: constrained patching through the last layer (interventions.steer)
        frozen = {"constrain_until": self.steerer.tc.cfg.n_layers - 1} if request.freeze_attention else {}
        with self._lock:
            try:
                result = self.steerer.run(prompt, ivs, top_k=TOP_K, generate=request.generate, **frozen)
            except CltraceError as err:  # an index out of range: the message names the ranges
                raise BackendError(err.message, status=400) from err
            except ValueError as err:  # positions outside the prompt
                raise BackendError(str(err), status=400) from err
        return result.to_dict()

    def set_label(self, graph: GraphRef, layer: int, index: int, label: str) -> dict:
        """Save (or with "" clear) the user's label; the feature's refreshed dashboard."""
        import sqlite3

        if self.store is None:
            return self.null.set_label(graph, layer, index, label)
        check_same_transcoder(self.store, graph)
        try:
            self.store.set_label(layer, index, label or None)
        except CltraceError as err:  # no feature L:i in this store
            raise BackendError(err.message, status=404) from err
        except sqlite3.OperationalError as err:
            if "readonly" in str(err) or "read-only" in str(err):
                raise BackendError(
                    f"the feature store {self.store.path} is read-only, so the label was not "
                    "saved: serve a writable copy (or fix the file's permissions)",
                    status=403,
                ) from err
            raise BackendError(
                f"the feature store could not save the label ({err}); try again", status=503
            ) from err
        with self._lock:
            self._label_rows = None  # the label table is read again with the new label
        return self.store.dashboard(layer, index)

    def swap(
        self, graph: GraphRef, request: SwapRequest, source: GraphRef | None, circuit_b: dict | None
    ) -> dict:
        """A graph-guided swap of the pinned features with prompt B's (viewer/swap.py)."""
        if self.steerer is None:
            return self.null.swap(graph, request, source, circuit_b)
        with self._lock:
            return run_swap(self.steerer, self._graphs, graph, request, source, circuit_b)

    def suggest_supernodes(self, graph: GraphRef) -> list[dict]:
        return self.null.suggest_supernodes(graph)

    def labels(self, graph: GraphRef) -> dict[str, dict]:
        """Label and label scores of the graph's features, by node id ({} without scores)."""
        if self.store is None:
            return {}
        check_same_transcoder(self.store, graph)
        with self._lock:
            if self._label_rows is None:
                try:
                    rows = self.store.labels_table(include_broad=True)
                except CltraceError:  # a store without label scores
                    rows = []
                self._label_rows = {(r["layer"], r["index"]): r for r in rows}
        return labels_by_node(graph, self._label_rows)


def labels_by_node(graph: GraphRef, rows: dict[tuple[int, int], dict]) -> dict[str, dict]:
    """{node_id: {label, detection, output, broad}} for the graph's features found in `rows`."""
    from cltrace.viewer.backend import FEATURE_TYPE, feature_index

    out = {}
    for node in graph.data.get("nodes", []):
        index = feature_index(node)
        if node.get("feature_type") != FEATURE_TYPE or index is None:
            continue
        row = rows.get((int(node.get("layer") or 0), index))
        if row is not None:
            out[str(node["node_id"])] = {k: row.get(k) for k in ("label", "detection", "output", "broad")}
    return out


def check_same_transcoder(store: Any, graph: GraphRef) -> None:
    """A 409 when the store was built from another transcoder than the graph's."""
    theirs = (graph.metadata.get("cltrace") or {}).get("transcoder")
    ours = (getattr(store, "meta", None) or {}).get("transcoder")
    if theirs and ours and ours != "in-memory" and transcoder_key(ours) != transcoder_key(theirs):
        raise BackendError(
            f"the feature store was built from transcoder {ours!r} but this graph was "
            f"traced with {theirs!r}: its dashboards would describe other features; "
            f"serve with --features <the store of {theirs}>",
            status=409,
        )


def transcoder_key(ident: str) -> str:
    """A transcoder id as a run name: graphs record the run's name (`demo-clt`), stores may record
    the transcoder's folder (`/…/runs/demo-clt/transcoder`) or the run's; both give `demo-clt`."""
    from pathlib import PurePath

    from cltrace.runs import TRANSCODER_SUBDIR

    path = PurePath(ident)
    return path.parent.name if path.name == TRANSCODER_SUBDIR and path.parent.name else path.name


def load_model_backend(
    features: str | None, transcoder: str | None, model: str | None, device: str = "auto"
) -> ModelBackend:
    """Open the feature store and/or load model + transcoder (slow: imports torch)."""
    store = steerer = None
    if features:
        from cltrace.features.store import FeatureStore

        store = FeatureStore(features)
    if transcoder:
        from cltrace.interventions.steer import Steerer
        from cltrace.runs import open_run

        loaded = open_run(transcoder, model, device)
        steerer = Steerer(loaded.model, loaded.transcoder)
    return ModelBackend(store, steerer)
