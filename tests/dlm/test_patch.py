"""dlm_kernels.patch on tiny transformers models: same outputs, same loss, same gradients.

Reference: the unpatched model with SDPA and a full bidirectional 4-D mask and transformers' own
causal-LM loss; patched: attn_implementation="dlm" fed the 2-D padding mask, and the fused
masked_linear_cross_entropy loss. float32, left padding, position ids.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")  # the Makefile's test deps install it

from dlm_kernels.patch import (  # noqa: E402
    _key_padding,
    apply_dlm_kernels,
    apply_dlm_kernels_to_llama,
    apply_dlm_kernels_to_qwen2,
)

V, D, L, H, KV, F = 211, 48, 2, 4, 2, 72


def _model(kind: str):
    common = dict(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                  num_attention_heads=H, num_key_value_heads=KV,
                  attn_implementation="sdpa")  # fmt: skip
    if kind == "qwen2":
        m = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.dim() == 1:
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return m.eval()


def _inputs():
    B, S = 3, 13
    ids = torch.randint(0, V, (B, S))
    am = torch.arange(S)[None, :] >= torch.tensor([[0], [3], [8]])
    pos = (am.long().cumsum(1) - 1).clamp_min(0)
    labels = torch.where(torch.rand(B, S) < 0.7, torch.randint(0, V, (B, S)), -100)
    # A label right after the padding is predicted (causal-LM shift) by a padded query row, whose
    # attention output is 0 in our op and a mix of real keys in SDPA's: not comparable, drop it.
    prev_real = torch.cat([torch.ones(B, 1, dtype=torch.bool), am[:, :-1]], 1)
    labels = labels.masked_fill(~am | ~prev_real, -100)
    return ids, am, pos, labels


def _bidirectional(am):
    S = am.shape[1]
    allowed = am[:, None, None, :].expand(-1, 1, S, -1)
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_same_outputs_loss_and_gradients(kind):
    ref = _model(kind)
    ours = apply_dlm_kernels(copy.deepcopy(ref))
    assert ours.config._attn_implementation == "dlm"
    ids, am, pos, labels = _inputs()

    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=_bidirectional(am), position_ids=pos).logits
        got = ours(input_ids=ids, attention_mask=am.long(), position_ids=pos).logits
    assert _rel(got[am], want[am]) <= 1e-5

    loss_ref = ref(input_ids=ids, attention_mask=_bidirectional(am), position_ids=pos,
                   labels=labels).loss  # fmt: skip
    loss_ref.backward()
    out = ours(input_ids=ids, attention_mask=am.long(), position_ids=pos, labels=labels)
    assert out.logits is None  # the fused loss builds no logits
    out.loss.backward()
    assert abs(out.loss.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())
    grads_ref = dict(ref.named_parameters())
    for n, p in ours.named_parameters():
        g_ref = grads_ref[n].grad
        assert p.grad is not None, n
        assert _rel(p.grad, g_ref) <= 1e-4, f"{n}: {_rel(p.grad, g_ref):.2e}"


def test_num_items_in_batch_and_unshifted_labels():
    ref = _model("llama")
    ids, am, pos, labels = _inputs()
    ours = apply_dlm_kernels(copy.deepcopy(ref), shift_labels=False)
    with torch.no_grad():
        logits = ref(input_ids=ids, attention_mask=_bidirectional(am), position_ids=pos).logits
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                               ignore_index=-100, reduction="sum")  # fmt: skip
        loss = ours(input_ids=ids, attention_mask=am, position_ids=pos, labels=labels,
                    num_items_in_batch=17).loss  # fmt: skip
    assert abs(loss.item() - ce.item() / 17) <= 1e-5 * abs(ce.item() / 17)


def test_class_patch_and_attn_implementation_name():
    ref = _model("qwen2")
    apply_dlm_kernels_to_llama(None, fused_linear_cross_entropy=False)  # registers "dlm" only
    cfg = copy.deepcopy(ref.config)
    cfg._attn_implementation = "dlm"
    m = transformers.Qwen2ForCausalLM(cfg).eval()
    m.load_state_dict(ref.state_dict())
    ids, am, pos, _ = _inputs()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=_bidirectional(am), position_ids=pos).logits
        got = m(input_ids=ids, attention_mask=am, position_ids=pos).logits
        # A caller's own 4-D bidirectional mask gives the same result.
        got4 = m(input_ids=ids, attention_mask=_bidirectional(am), position_ids=pos).logits
    assert _rel(got[am], want[am]) <= 1e-5 and _rel(got4[am], want[am]) <= 1e-5
    with pytest.raises(TypeError, match="expected a Qwen2ForCausalLM"):
        apply_dlm_kernels_to_qwen2(_model("llama"))


def test_key_padding_forms():
    am = torch.tensor([[False, True, True], [True, True, True]])
    assert torch.equal(_key_padding(am, 2, 3), am)
    assert torch.equal(_key_padding(_bidirectional(am), 2, 3), am)
    causal = torch.ones(3, 3, dtype=torch.bool).tril()[None, None] & am[:, None, None, :]
    assert torch.equal(_key_padding(causal, 2, 3), am)  # causality dropped, padding kept
    assert _key_padding(None, 2, 3) is None
    with pytest.raises(ValueError, match="attention_mask must be 2-D"):
        _key_padding(am[0], 2, 3)


def test_patched_forward_keeps_the_signature_and_its_arguments():
    """The loss forward keeps the model's own signature: positional calls mean what they did,
    transformers' Trainer (which keeps the dataset columns the forward names) still passes
    attention_mask and position_ids; shift_labels and return_dict=False behave as in
    transformers."""
    import inspect

    ref = _model("qwen2")
    ours = apply_dlm_kernels(copy.deepcopy(ref))
    assert inspect.signature(ours.forward) == inspect.signature(ref.forward)
    ids, am, pos, labels = _inputs()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=_bidirectional(am), position_ids=pos)
        got = ours(ids, am.long(), pos)  # input_ids, attention_mask, position_ids
        assert _rel(got.logits[am], want.logits[am]) <= 1e-5
        loss = ours(ids, am.long(), pos, labels=labels).loss
        tup = ours(ids, am.long(), pos, labels=labels, return_dict=False)
        assert isinstance(tup, tuple) and torch.equal(tup[0], loss)
        # Pre-shifted labels (context parallelism) are used as they are, not shifted again:
        # given the unshifted labels as shift_labels, the loss is the unshifted one.
        plain = apply_dlm_kernels(copy.deepcopy(ref), shift_labels=False)
        want_plain = plain(ids, am.long(), pos, labels=labels).loss
        again = ours(ids, am.long(), pos, shift_labels=labels, labels=labels).loss
        assert abs(again.item() - want_plain.item()) <= 1e-6 * abs(want_plain.item())
        assert abs(again.item() - loss.item()) > 1e-3 * abs(loss.item())


def test_final_logit_softcapping_reaches_the_fused_loss():
    common = dict(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                  num_attention_heads=H, num_key_value_heads=KV, head_dim=D // H,
                  final_logit_softcapping=2.0, attn_implementation="eager")  # fmt: skip
    torch.manual_seed(0)
    ref = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**common)).eval()
    ours = apply_dlm_kernels(copy.deepcopy(ref), attention=False)
    ids, am, pos, labels = _inputs()
    am[:] = True
    with torch.no_grad():
        want = ref(input_ids=ids, position_ids=pos, labels=labels).loss
        got = ours(input_ids=ids, position_ids=pos, labels=labels).loss
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())


def test_sliding_window_longer_than_the_sequence_is_accepted():
    from dlm_kernels.patch import dlm_attention_forward

    q = torch.randn(1, 2, 5, 8)
    out, _ = dlm_attention_forward(None, q, q, q, None, sliding_window=4096)  # Mistral's default
    ref, _ = dlm_attention_forward(None, q, q, q, None)
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="sliding window shorter than the sequence"):
        dlm_attention_forward(None, q, q, q, None, sliding_window=3)
