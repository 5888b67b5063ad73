"""Circuits across a prompt set: the features (and supernodes) that recur at the same role.

Prompts come from a file or from a template with fillers ("the currency of the country whose
capital is {city} is the", city = Tokyo, Paris, ...). Each prompt is traced and pruned.

Roles. Positions are aligned by role: the tokens shared by *every* prompt at the start
(``pre<i>:<token>``) and at the end (``suf<j>:<token>``, counted from the end), the last
position (``last``, where the answer is predicted), and the differing middle (the filler
span: ``{city}`` for a template, ``span`` for a prompt file), whose features are compared as
a bag over its positions. A template whose filler reaches the last position (nothing of the
template after it) would change the answer position: it is refused.

Recurrence. A feature is keyed by (layer, feature, role); it recurs in a prompt when pruning
keeps it there. For each key: the prompts where it recurs and its mean share of the graph's
influence on the logits. Features present in at least `min_frequency` of the prompts form
the shared circuit, grouped into parts by role (one part per role; with cltrace.circuits,
also supernodes matched across prompts by member overlap). A part's coverage is the mean,
over prompts, of the fraction of its features kept there; a supernode's coverage is the
fraction of prompts with a matching supernode.

Explanation. For each prompt, the share of its kept features' influence carried by shared
features; prompts below `explain_threshold` are those the shared circuit does not explain.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cltrace.errors import CltraceError
from cltrace.transcoders.interface import TranscoderLike

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


# --------------------------------------------------------------------------- prompts


def expand_template(template: str, fills: dict[str, list[str]]) -> list[tuple[str, dict[str, str]]]:
    """Prompts of a template, one per filler (several placeholders: their lists zipped)."""
    names = _PLACEHOLDER.findall(template)
    if not names:
        raise CltraceError(
            f"the template {template!r} has no {{name}} placeholder",
            'write e.g. "the capital of {country} is"',
        )
    missing = set(names) - set(fills)
    if missing:
        raise CltraceError(
            f"no fillers for {', '.join(sorted(missing))}", f"give --fill {sorted(missing)[0]}=A,B,..."
        )
    extra = set(fills) - set(names)
    if extra:
        raise CltraceError(f"--fill {', '.join(sorted(extra))} is not a placeholder of the template")
    lengths = {len(v) for v in fills.values()}
    if len(lengths) != 1:
        raise CltraceError("every --fill needs the same number of values (they are zipped)")
    n = lengths.pop()
    out = []
    for i in range(n):
        values = {k: fills[k][i] for k in fills}
        out.append((_PLACEHOLDER.sub(lambda m, v=values: v[m.group(1)], template), values))
    return out


def parse_fill(specs: Sequence[str]) -> dict[str, list[str]]:
    """['city=Tokyo,Paris'] -> {'city': ['Tokyo', 'Paris']}."""
    fills: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not name.strip() or not items:
            raise CltraceError(f"--fill {spec!r} is not NAME=VALUE,VALUE,...", "e.g. --fill city=Tokyo,Paris")
        fills[name.strip()] = items
    return fills


# --------------------------------------------------------------------------- roles


def shared_ends(token_lists: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(P, S): tokens every prompt shares at the start and at the end (P + S <= shortest)."""
    ref = token_lists[0]
    P = min(_common_prefix(ref, t) for t in token_lists)
    S = min(_common_prefix(ref[::-1], list(t)[::-1]) for t in token_lists)
    S = min(S, min(len(t) for t in token_lists) - P)
    return P, max(S, 0)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def assign_roles(
    token_lists: Sequence[Sequence[int]], strings: Sequence[Sequence[str]], span_name: str, template: bool
) -> list[list[str]]:
    """One role per position of every prompt (module docstring)."""
    if len(token_lists) < 2:
        raise CltraceError("a prompt set needs at least two prompts")
    P, S = shared_ends(token_lists)
    if template and S == 0:
        raise CltraceError(
            "the filler changes the answer position: with nothing of the template after it, the "
            "last token (where the answer is predicted) is part of the filler",
            'put text after the placeholder, e.g. "... capital is {city} is the"',
        )
    roles = []
    for toks, strs in zip(token_lists, strings):
        n = len(toks)
        r = [f"pre{i}:{strs[i]}" if i < P else span_name for i in range(n)]
        for j in range(1, S + 1):
            r[n - j] = f"suf{j}:{strs[n - j]}"
        r[n - 1] = "last"
        roles.append(r)
    return roles


# --------------------------------------------------------------------------- per prompt


@dataclass
class PromptResult:
    prompt: str
    fillers: dict[str, str]
    answer: str
    answer_prob: float
    tokens: list[str]
    roles: list[str]
    features: dict[tuple, float]  # (layer, feature, role) -> influence share
    node_ids: dict[tuple, list[str]]
    explained: float = 0.0
    supernodes: list[tuple[str, set]] = field(default_factory=list)  # (name, member keys)
    edges: dict[tuple, float] = field(default_factory=dict)  # (source key, target key) -> Σ weight;
    # keys: kept features' (layer, feature, role), the answer logit ("logit",)


def prompt_result(graph, pruned, answer: str, roles: list[str], fillers: dict[str, str]) -> PromptResult:
    """Kept features of one graph keyed by (layer, feature, role), with influence shares."""
    from cltrace.attribution.export import node_id

    table = graph.nodes()
    infl = pruned.node_influence.float()
    share = infl / infl.sum().clamp_min(1e-30)
    features: dict[tuple, float] = defaultdict(float)
    ids: dict[tuple, list[str]] = defaultdict(list)
    for i in pruned.node_mask[: graph.n_features].nonzero().squeeze(1).tolist():
        layer, pos, feat = int(table.layer[i]), int(table.pos[i]), int(table.feature[i])
        key = (layer, feat, roles[pos])
        features[key] += float(share[i])
        ids[key].append(node_id(graph, "feature", layer, pos, feat, -1))
    return PromptResult(
        graph.prompt,
        fillers,
        answer,
        float(graph.logit_probabilities[0]),
        list(graph.token_strings),
        roles,
        dict(features),
        dict(ids),
        edges=_key_edges(graph, pruned, roles),
    )


def _key_edges(graph, pruned, roles: list[str]) -> dict[tuple, float]:
    """Pruned edges between kept features and into the answer logit, summed by key pair."""
    table = graph.nodes()

    def key(i: int):
        if i < graph.n_features:
            return (int(table.layer[i]), int(table.feature[i]), roles[int(table.pos[i])])
        return ("logit",) if i == graph.logit_offset else None

    out: dict[tuple, float] = defaultdict(float)
    tgt, src = pruned.edge_mask.nonzero(as_tuple=True)
    for t, s_ in zip(tgt.tolist(), src.tolist()):
        kt, ks = key(t), key(s_)
        if kt is not None and ks is not None:
            out[(ks, kt)] += float(graph.adjacency[t, s_])
    return dict(out)


# --------------------------------------------------------------------------- across prompts


@dataclass
class RecurringFeature:
    key: tuple  # (layer, feature, role)
    prompts: list[int]
    mean_influence: float

    def frequency(self, n: int) -> float:
        return len(self.prompts) / n


@dataclass
class Part:
    """One part of the merged circuit: recurring features at one role, or a supernode."""

    name: str
    kind: str  # "role" or "supernode"
    features: list[tuple]
    coverage: float
    per_prompt: list[float]  # fraction of the part present in each prompt (supernode: 0/1)


@dataclass
class RecurringReport:
    results: list[PromptResult]
    recurring: list[RecurringFeature]
    parts: list[Part]
    min_frequency: float
    explain_threshold: float
    template: str | None = None

    @property
    def unexplained(self) -> list[int]:
        return [i for i, r in enumerate(self.results) if r.explained < self.explain_threshold]

    def shared(self) -> list[RecurringFeature]:
        n = len(self.results)
        return [f for f in self.recurring if f.frequency(n) >= self.min_frequency]

    def lines(self, top: int = 15) -> list[str]:
        n = len(self.results)
        out = [f"{n} prompts" + (f" from {self.template!r}" if self.template else "")]
        for r in self.results:
            fill = ", ".join(f"{k}={v}" for k, v in r.fillers.items()) or r.prompt
            out.append(
                f"  {fill}: answer {r.answer!r} (p={r.answer_prob:.2f}); shared circuit carries "
                f"{r.explained:.0%} of its feature influence"
            )
        shared = self.shared()
        out.append(f"features kept in >= {self.min_frequency:.0%} of the prompts: {len(shared)}")
        for f in shared[:top]:
            layer, feat, role = f.key
            out.append(
                f"  {layer}:{feat} at {role}: {len(f.prompts)}/{n} prompts, "
                f"mean influence share {f.mean_influence:.3f}"
            )
        out.append("merged circuit (coverage = mean fraction of the part kept per prompt):")
        for p in self.parts:
            out.append(f"  {p.name}: {len(p.features)} features, coverage {p.coverage:.0%}")
        bad = self.unexplained
        out.append(
            f"prompts the shared circuit does not explain (< {self.explain_threshold:.0%}): "
            + (", ".join(repr(self.results[i].prompt) for i in bad) if bad else "none")
        )
        return out

    def to_dict(self) -> dict[str, Any]:
        n = len(self.results)
        key = lambda k: {"layer": k[0], "feature": k[1], "role": k[2]}  # noqa: E731
        return {
            "version": 1,
            "kind": "cltrace-recurring-circuit",
            "template": self.template,
            "min_frequency": self.min_frequency,
            "explain_threshold": self.explain_threshold,
            "prompts": [
                {
                    "prompt": r.prompt,
                    "fillers": r.fillers,
                    "answer": r.answer,
                    "answer_prob": r.answer_prob,
                    "tokens": r.tokens,
                    "roles": r.roles,
                    "explained": r.explained,
                    "n_kept_features": len(r.features),
                }
                for r in self.results
            ],
            "recurring": [
                {
                    **key(f.key),
                    "count": len(f.prompts),
                    "frequency": f.frequency(n),
                    "prompts": f.prompts,
                    "mean_influence": f.mean_influence,
                    "node_ids": [self.results[i].node_ids[f.key] for i in f.prompts],
                }
                for f in self.recurring
                if len(f.prompts) > 1
            ],
            "parts": [
                {
                    "name": p.name,
                    "kind": p.kind,
                    "features": [key(k) for k in p.features],
                    "coverage": p.coverage,
                    "per_prompt": p.per_prompt,
                }
                for p in self.parts
            ],
            "unexplained": self.unexplained,
            "summary": self.lines(),
        }


def recurring_features(results: Sequence[PromptResult]) -> list[RecurringFeature]:
    """Every feature key with the prompts that keep it, most frequent (then strongest) first."""
    where: dict[tuple, list[int]] = defaultdict(list)
    for i, r in enumerate(results):
        for k in r.features:
            where[k].append(i)
    out = [
        RecurringFeature(k, ps, sum(results[i].features[k] for i in ps) / len(ps)) for k, ps in where.items()
    ]
    out.sort(key=lambda f: (-len(f.prompts), -f.mean_influence))
    return out


def role_parts(results: Sequence[PromptResult], shared: Sequence[RecurringFeature]) -> list[Part]:
    """One part per role of the shared features; coverage = mean fraction kept per prompt."""
    by_role: dict[str, list[tuple]] = defaultdict(list)
    for f in shared:
        by_role[f.key[2]].append(f.key)
    parts = []
    for role, keys in by_role.items():
        per = [sum(k in r.features for k in keys) / len(keys) for r in results]
        layers = [k[0] for k in keys]
        parts.append(
            Part(f"{role} (layers {min(layers)}-{max(layers)})", "role", keys, sum(per) / len(per), per)
        )
    parts.sort(key=lambda p: -p.coverage)
    return parts


def supernode_parts(results: Sequence[PromptResult], min_overlap: float = 0.3) -> list[Part]:
    """Supernodes of every prompt matched across prompts by member overlap (Jaccard), greedily
    against the merged members of each part; coverage = fraction of prompts with a match."""
    n = len(results)
    merged: list[dict[str, Any]] = []
    for i, r in enumerate(results):
        for name, members in r.supernodes:
            best, best_j = None, 0.0
            for part in merged:
                if i in part["prompts"]:
                    continue
                jac = len(members & part["members"]) / max(len(members | part["members"]), 1)
                if jac >= min_overlap and jac > best_j:
                    best, best_j = part, jac
            if best is None:
                merged.append({"names": [name], "members": set(members), "prompts": {i}})
            else:
                best["names"].append(name)
                best["members"] |= members
                best["prompts"].add(i)
    parts = []
    for m in merged:
        name = max(set(m["names"]), key=m["names"].count)
        per = [1.0 if i in m["prompts"] else 0.0 for i in range(n)]
        parts.append(Part(f"supernode {name!r}", "supernode", sorted(m["members"]), sum(per) / n, per))
    parts.sort(key=lambda p: -p.coverage)
    return [p for p in parts if p.coverage > 1 / n] or parts[:5]


def summarize_set(
    results: list[PromptResult],
    *,
    min_frequency: float = 0.5,
    explain_threshold: float = 0.5,
    template: str | None = None,
) -> RecurringReport:
    """Recurring features, merged-circuit parts and per-prompt explanation shares."""
    recurring = recurring_features(results)
    n = len(results)
    shared = [f for f in recurring if f.frequency(n) >= min_frequency]
    shared_keys = {f.key for f in shared}
    for r in results:
        total = sum(r.features.values())
        r.explained = sum(v for k, v in r.features.items() if k in shared_keys) / total if total > 0 else 0.0
    parts = role_parts(results, shared)
    if any(r.supernodes for r in results):
        parts += supernode_parts(results)
    return RecurringReport(results, recurring, parts, min_frequency, explain_threshold, template)


def circuit_supernodes(
    graph, pruned, lm, transcoder: TranscoderLike, roles: list[str], store=None
) -> list[tuple[str, set]]:
    """(name, member (layer, feature, role) keys) of each feature supernode, from cltrace.circuits
    (empty when that package is absent)."""
    try:
        from cltrace.circuits.build import build_circuit
    except ImportError:
        return []
    circuit = build_circuit(graph, pruned, lm, transcoder, store=store, validate=False)
    out = []
    for sn in circuit.nodes:
        if sn.kind != "features":
            continue
        keys = set()
        for nid in sn.node_ids:
            layer, feat, pos = (int(x) for x in nid.split("_"))
            keys.add((layer, feat, roles[pos]))
        out.append((sn.name, keys))
    return out


def trace_prompt_set(
    lm,
    transcoder: TranscoderLike,
    prompts: Sequence[tuple[str, dict[str, str]]],
    cfg,
    *,
    template: str | None = None,
    transcoder_id: str = "",
    supernodes: bool = True,
    store=None,
    min_frequency: float = 0.5,
    explain_threshold: float = 0.5,
    node_threshold: float = 0.8,
) -> RecurringReport:
    """Trace every prompt, align roles, and summarise what recurs (module docstring)."""
    from cltrace.attribution.graph import attribute, prepare_tokens
    from cltrace.attribution.prune import prune
    from cltrace.progress import progress

    tokens = [prepare_tokens(lm, p).tolist() for p, _ in prompts]
    strings = [lm.token_strings(t) for t in tokens]
    span = "{" + "}…{".join(prompts[0][1]) + "}" if template and prompts[0][1] else "span"
    roles = assign_roles(tokens, strings, span, template is not None)
    results = []
    for (prompt, fills), role in progress(list(zip(prompts, roles)), desc="prompts", unit="prompt"):
        graph = attribute(lm, transcoder, prompt, cfg, transcoder_id=transcoder_id)
        pruned = prune(graph, node_threshold)
        answer = lm.token_strings([int(graph.logit_tokens[0])])[0]
        r = prompt_result(graph, pruned, answer, role, fills)
        if supernodes:
            r.supernodes = circuit_supernodes(graph, pruned, lm, transcoder, role, store)
        results.append(r)
    return summarize_set(
        results, min_frequency=min_frequency, explain_threshold=explain_threshold, template=template
    )
