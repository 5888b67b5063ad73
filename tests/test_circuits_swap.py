"""Graph-guided swaps (issue 11 item 5): subject spans of different token lengths align, and
the swap applies exactly the chosen features at exactly the aligned positions."""

from __future__ import annotations

import pytest
import torch

from cltrace.attribution.graph import AttributionConfig, attribute
from cltrace.circuits.batched import last_logits, probabilities
from cltrace.circuits.swap import SubjectSpans, SwapConfig, align_subjects, graph_guided_swap
from cltrace.errors import CltraceError
from cltrace.interventions.steer import Steerer
from test_attribution import make_transcoder
from tiny import tiny_model


def test_alignment_of_subjects_with_different_token_lengths():
    # "<bos> the capital of Texas is" vs "<bos> the capital of New York is"
    a, b = [1, 5, 6, 7, 20, 9], [1, 5, 6, 7, 30, 31, 9]
    spans = align_subjects(a, b)
    assert spans == SubjectSpans(a=(4, 5), b=(4, 6))
    assert spans.b_to_a() == {5: 4}  # York -> Texas; "New" has no partner
    back = align_subjects(b, a)
    assert back == SubjectSpans(a=(4, 6), b=(4, 5))
    assert back.b_to_a() == {4: 5}  # Texas -> York (right-aligned)
    # subject at the end (no common suffix), and two-token against three-token subjects
    assert align_subjects([1, 2, 3, 4], [1, 2, 7]) == SubjectSpans((2, 4), (2, 3))
    spans = align_subjects([1, 2, 10, 11, 5, 6], [1, 2, 20, 21, 22, 5, 6])
    assert spans.b_to_a() == {4: 3, 3: 2}
    # prefix and suffix never overlap: a repeated token is an insertion, not a subject
    with pytest.raises(CltraceError):
        align_subjects([1, 8, 8, 9], [1, 8, 9])
    with pytest.raises(CltraceError):
        align_subjects([1, 2, 3], [1, 2, 3])
    with pytest.raises(CltraceError):
        align_subjects([1, 2, 3], [1, 2, 9, 3])  # B only inserts: A's span is empty


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    lm = tiny_model("gemma")
    tc = make_transcoder(lm, "clt", n_features=24)
    return lm, tc


@pytest.mark.parametrize("rank", ["influence", "effect"])
def test_swap_applies_exactly_the_chosen_features_at_the_aligned_positions(tiny, rank):
    lm, tc = tiny
    prompt_a, prompt_b = "the capital of Texas is", "the capital of France Paris is"
    cfg = AttributionConfig(max_feature_nodes=None, progress=False)
    graph_a, graph_b = attribute(lm, tc, prompt_a, cfg), attribute(lm, tc, prompt_b, cfg)
    report = graph_guided_swap(
        lm, tc, prompt_a, prompt_b, graph_a=graph_a, graph_b=graph_b, cfg=SwapConfig(max_pairs=10, rank=rank)
    )
    assert report.spans == SubjectSpans(a=(4, 5), b=(4, 6))
    assert {iv.mode for iv in report.interventions} == {"scale", "set"}
    assert 0 < report.pairs_touched <= 10 and report.pairs_touched == len(report.interventions)
    st = Steerer(lm, tc)
    acts_b = st.activations(lm.tokenize(prompt_b))  # [n, L, F]
    fa = {tuple(x) for x in graph_a.active_features[graph_a.selected_features].tolist()}
    for iv in report.interventions:
        assert iv.positions == (4,)  # only A's subject position
        if iv.mode == "scale":
            assert iv.value == 0.0 and (iv.layer, 4, iv.feature) in fa  # an A feature at the subject
        else:
            # B's activation at B's last subject token (position 5), the one aligned with A's
            assert iv.mode == "set"
            want = float(acts_b[5, iv.layer, iv.feature]) * _scale(report, iv)
            assert iv.value == pytest.approx(want, rel=1e-5)
    # the reported outcome is what exactly these interventions do on the real model
    tokens = lm.tokenize(prompt_a)
    after = st.logits(tokens, report.interventions)[0, -1].float()
    p = torch.softmax(after, -1)
    assert report.p_b_after == pytest.approx(float(p[report.answer_b_id]), abs=1e-5)
    assert report.after[0].token_id == int(p.argmax())
    assert report.flipped == (int(p.argmax()) == report.answer_b_id)
    before = probabilities(lm, last_logits(lm, tokens))[0]
    assert report.p_b_before == pytest.approx(float(before[report.answer_b_id]), abs=1e-5)
    # the chosen setting: fewest pairs among flipping ones, else the best P(B)
    flips = [t for t in report.trials if t.flipped]
    if flips:
        assert report.flipped and report.pairs_touched == min(t.pairs for t in flips)
    else:
        assert report.p_b_after == pytest.approx(max(t.p_b for t in report.trials), abs=1e-6)
    assert all(t.pairs <= 10 for t in report.trials)


def _scale(report, iv) -> float:
    """The inject scale of the chosen trial (the one whose pair count and P(B) match)."""
    chosen = [
        t for t in report.trials if t.pairs == report.pairs_touched and abs(t.p_b - report.p_b_after) < 1e-6
    ]
    return chosen[0].inject_scale


def test_swap_with_circuits_uses_only_their_subject_supernodes(tiny):
    from cltrace.circuits.circuit import Circuit, CircuitNode

    lm, tc = tiny
    prompt_a, prompt_b = "the capital of Texas is", "the capital of France Paris is"
    cfg = AttributionConfig(max_feature_nodes=None, progress=False)
    graph_a, graph_b = attribute(lm, tc, prompt_a, cfg), attribute(lm, tc, prompt_b, cfg)

    def circuit(graph, pos):
        feats = graph.active_features[graph.selected_features].tolist()
        ids = [f"{l}_{f}_{p}" for l, p, f in feats if p == pos][:3]  # a 3-member supernode
        node = CircuitNode("sn0", "subject", "features", ids, [pos], (0, 2), [], 0.5)
        return Circuit("", [], "", 0, 0.0, "", "", [node], [], 0.5), ids

    circ_a, ids_a = circuit(graph_a, 4)
    circ_b, ids_b = circuit(graph_b, 5)
    report = graph_guided_swap(
        lm,
        tc,
        prompt_a,
        prompt_b,
        graph_a=graph_a,
        graph_b=graph_b,
        circuit_a=circ_a,
        circuit_b=circ_b,
        cfg=SwapConfig(rank="influence"),
    )
    assert report.n_candidates[0] <= 3 and report.n_candidates[1] <= 3
    for iv in report.interventions:
        if iv.mode == "scale":
            assert f"{iv.layer}_{iv.feature}_4" in ids_a
        else:
            assert f"{iv.layer}_{iv.feature}_5" in ids_b and iv.positions == (4,)
