"""The Python API for notebooks, re-exported at the package root (imported on first use):

    import cltrace

    run = cltrace.load("demo-gemma-3-270m-clt")              # model + transcoder: a LoadedRun
    traced = cltrace.trace(run, "Fact: the capital of the state containing Dallas is")
    traced.graph, traced.pruned, traced.scores                # what `cltrace trace` prints
    result = cltrace.intervene(run, "The capital of Texas is",
                               [cltrace.Intervention(layer=3, feature=1234, mode="scale", value=0.0)])
    print(result.table())                                     # what `cltrace intervene` prints
    card = cltrace.feature(run, 3, 1234)                     # what `cltrace feature --json` prints

Each function is the library call its CLI command makes, with the same defaults, so a
notebook and the command line give the same graphs, numbers and files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cltrace.runs import LoadedRun, Run, open_run, store_path

if TYPE_CHECKING:
    from cltrace.attribution.pipeline import TraceResult
    from cltrace.features.store import FeatureStore
    from cltrace.interventions.steer import Intervention, Result


def load(
    run: str | Path | Run, model: str | None = None, device: str = "auto", dtype: str = "float32"
) -> LoadedRun:
    """A run (a name under the runs folder, or a folder) with its transcoder and its model.

    `model` overrides the model named in the transcoder's config; `device` is "auto" (CUDA when
    available, else CPU), "cpu", "cuda", "cuda:1", ...
    """
    return open_run(run, model, device, dtype)


def trace(
    loaded: LoadedRun,
    prompt: str,
    *,
    out: str | Path | None = None,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    **config: Any,
) -> TraceResult:
    """The attribution graph of `prompt`, pruned and scored, written as `cltrace trace` writes it
    (`out`: the pruned JSON; default <graphs folder>/<slug>.json, the full graph beside it).

    `config` sets `AttributionConfig` fields, e.g. max_feature_nodes=1024, batch_size=16,
    output_targets=(token_id, ...).
    """
    from cltrace.attribution.graph import AttributionConfig
    from cltrace.attribution.pipeline import default_graph_path, trace_to_files

    path = Path(out) if out is not None else default_graph_path(prompt)
    return trace_to_files(
        loaded.model,
        loaded.transcoder,
        prompt,
        AttributionConfig(**config),
        path,
        transcoder_id=loaded.run.name,
        node_threshold=node_threshold,
        edge_threshold=edge_threshold,
    )


def intervene(
    loaded: LoadedRun,
    prompt: str,
    interventions: Sequence[Intervention] = (),
    *,
    top_k: int = 10,
    generate: int = 0,
    constrain_until: int | None = None,
    steer_generated: bool = False,
) -> Result:
    """Next-token probabilities (and `generate` greedy tokens) before and after setting,
    scaling or adding to transcoder features; `Result.table()` is what `cltrace intervene`
    prints. For a concept swap, pass `swap_interventions(loaded, prompt, source_prompt)`."""
    from cltrace.interventions.steer import Steerer

    return Steerer(loaded.model, loaded.transcoder).run(
        prompt,
        list(interventions),
        top_k=top_k,
        generate=generate,
        constrain_until=constrain_until,
        steer_generated=steer_generated,
    )


def swap_interventions(
    loaded: LoadedRun, prompt: str, source_prompt: str, **options: Any
) -> list[Intervention]:
    """The interventions of `cltrace intervene --swap-from`: suppress the prompt's distinctive
    features, inject the source prompt's (options: suppress, inject, suppress_factor,
    inject_scale, where, n_auto)."""
    from cltrace.interventions.steer import Steerer

    return Steerer(loaded.model, loaded.transcoder).swap_interventions(prompt, source_prompt, **options)


def feature_store(source: LoadedRun | str | Path) -> FeatureStore:
    """The feature store of a loaded run, a run (name or folder) or a store file; close it (or use
    it in a `with` block) when done."""
    from cltrace.features.store import FeatureStore

    path = source.run.feature_store if isinstance(source, LoadedRun) else store_path(source)
    return FeatureStore(path)


def feature(source: LoadedRun | str | Path, layer: int, index: int) -> dict:
    """One feature's dashboard (label, density, top contexts, promoted and suppressed tokens),
    as `cltrace feature RUN LAYER:INDEX --json` prints it and the viewer shows it."""
    with feature_store(source) as store:
        return store.dashboard(layer, index)


__all__ = ["LoadedRun", "Run", "feature", "feature_store", "intervene", "load", "swap_interventions", "trace"]
