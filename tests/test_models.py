"""The family adapters read the right modules: MLP input/output identities on tiny models."""

import pytest
import torch

from tiny import FAMILIES, tiny_model

PROMPT = "Fact : the capital of the state of Texas is Austin"


@pytest.fixture(params=FAMILIES)
def lm(request):
    return tiny_model(request.param)


def test_block_output_is_mid_residual_plus_mlp_output(lm):
    """block_out == resid_mid + mlp_out exactly, and mlp_in == pre-MLP norm(resid_mid)."""
    tokens = lm.tokenize(PROMPT)
    mids, outs = {}, {}

    def keep_mid(layer):
        def hook(_m, inputs):
            mids[layer] = inputs[0].detach()

        return hook

    def keep_out(layer):
        def hook(_m, _i, output):
            outs[layer] = (output[0] if isinstance(output, tuple) else output).detach()

        return hook

    pre = [(lm.adapter.mlp_in_module(b), keep_mid(l)) for l, b in enumerate(lm.blocks)]
    fwd = [(b, keep_out(l)) for l, b in enumerate(lm.blocks)]
    with lm.hooks(forward_hooks=fwd, pre_hooks=pre):
        cap = lm.capture(tokens)
    for l in range(lm.n_layers):
        torch.testing.assert_close(mids[l] + cap.mlp_out[:, :, l], outs[l], rtol=0, atol=1e-6)
        norm = lm.adapter.mlp_in_module(lm.blocks[l])
        torch.testing.assert_close(norm(mids[l]), cap.mlp_in[:, :, l], rtol=0, atol=0)
        torch.testing.assert_close(
            lm.adapter.frozen_norm(norm, mids[l]), cap.mlp_in[:, :, l], rtol=1e-6, atol=1e-6
        )


def test_patching_captured_outputs_reproduces_forward(lm):
    tokens = lm.tokenize(PROMPT)
    cap = lm.capture(tokens, with_logits=True)
    with torch.no_grad(), lm.patch_mlp_outputs(lambda l, _x, _y: cap.mlp_out[:, :, l].clone()):
        same = lm.run(tokens)
    torch.testing.assert_close(same, cap.logits, rtol=0, atol=0)
    with torch.no_grad(), lm.patch_mlp_outputs(lambda l, _x, y: torch.zeros_like(y)):
        ablated = lm.run(tokens)
    assert (ablated - cap.logits).abs().max() > 1e-3  # the MLPs matter, so the hook did act
    # hooks are removed afterwards
    again = lm.capture(tokens, with_logits=True)
    torch.testing.assert_close(again.logits, cap.logits, rtol=0, atol=0)


def test_unsupported_architecture_is_a_clear_error():
    from transformers import BertConfig, BertForMaskedLM

    from cltrace.errors import CltraceError
    from cltrace.models.adapters import adapter_for

    with pytest.raises(CltraceError, match="unsupported model_type 'bert'; supported: gemma2, "):
        adapter_for(
            BertForMaskedLM(
                BertConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2, intermediate_size=8)
            )
        )


def test_missing_model_path_is_a_clear_error(tmp_path):
    from cltrace.errors import CltraceError
    from cltrace.models.loading import load_model

    with pytest.raises(CltraceError, match="neither a bundled model nor a folder"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(CltraceError, match="no config.json"):
        load_model(str(tmp_path))
