"""dlm.sampler.generate's shortcuts change nothing a caller sees: the loop runs under inference
mode but hands back ordinary tensors, and the even schedule's counts taken on the host (when
every row has as many masks) commit exactly what the per-row tensor counts commit.
"""

import pytest
import torch

from dlm.config import ModelConfig
from dlm.model import DiffusionLM
from dlm.sampler import even_counts, generate

V, MASK = 53, 52


def _model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                      max_seq_len=128, init_std=0.4, mask_token_id=MASK)  # fmt: skip
    return DiffusionLM(cfg).eval()


def test_outputs_are_ordinary_tensors():
    model = _model()
    ids = torch.randint(0, MASK, (2, 5), generator=torch.Generator().manual_seed(1))
    kw = dict(gen_length=8, steps=4, block_length=4, mask_id=MASK)
    x = generate(model, ids, **kw)
    x2, hist = generate(model, ids, output_history=True, **kw)
    assert torch.equal(x, x2) and torch.equal(x, hist[-1])
    assert not any(t.is_inference() for t in [x, x2, *hist])
    # In-place edits and autograd (the embedding saves the ids for backward) both work.
    x[0, -1] = 0
    hist[-1][0, 0] = 0
    model.train()
    (model(x).float().sum() + model(x2).float().sum()).backward()
    assert model.tok_emb.weight.grad is not None
    model.eval()
    # Inside the caller's own inference mode: the same tokens.
    with torch.inference_mode():
        y = generate(model, ids, **kw)
    assert torch.equal(y, generate(model, ids, **kw))


def test_host_counts_match_tensor_counts():
    """Row 1 has a mask inside its prompt, so the batch's rows count different masks (per-row
    tensor counts) while each row alone has one count (taken on the host). Each batch row must
    equal its row generated alone, and every step commit even_counts' share."""
    model = _model()
    ids = torch.randint(0, MASK, (2, 6), generator=torch.Generator().manual_seed(3))
    ids[1, 2] = MASK
    kw = dict(gen_length=8, steps=4, block_length=8, mask_id=MASK, output_history=True)
    x, hist = generate(model, ids, **kw)
    for b in range(2):
        xb, hb = generate(model, ids[b : b + 1], **kw)
        assert torch.equal(x[b : b + 1], xb)
        n0 = (torch.cat([ids[b : b + 1], torch.full((1, 8), MASK)], 1) == MASK).sum(1)
        prev = (ids[b : b + 1] == MASK).sum() + 8
        for step, h in enumerate(hb):
            left = (h == MASK).sum()
            assert prev - left == even_counts(n0, 4)[0, step]
            prev = left


class _Ranged(DiffusionLM):
    """DiffusionLM recording the output_range of every forward."""

    def forward(self, input_ids, attention_mask=None, position_ids=None, *, t=None,
                kv_cache=None, return_hidden=False, output_range=None):  # fmt: skip
        self.ranges.append(output_range)
        return super().forward(input_ids, attention_mask, position_ids, t=t, kv_cache=kv_cache,
                               return_hidden=return_hidden, output_range=output_range)  # fmt: skip


class _Unranged(DiffusionLM):
    """The same model without output_range: the sampler runs the last layer everywhere."""

    def forward(self, input_ids, attention_mask=None, position_ids=None, *, t=None,
                kv_cache=None, return_hidden=False):  # fmt: skip
        return super().forward(input_ids, attention_mask, position_ids, t=t, kv_cache=kv_cache,
                               return_hidden=return_hidden)  # fmt: skip


_WINDOW_CASES = {
    "low_confidence": dict(),
    "maskgit_T": dict(alg="maskgit_plus", temperature=0.8, top_p=0.9, seed=5),
    "entropy_dream": dict(alg="entropy", schedule="dream"),
    "shift": dict(logits_shift=True),
    "shift_T_ancestral": dict(alg="ancestral", logits_shift=True, temperature=1.0, seed=3),
    "cfg": dict(cfg_scale=1.5),
    "infill": dict(infill=True),
    "infill_shift": dict(infill=True, logits_shift=True),
    "eos": dict(eos_id=7, stop_at_eos=True),
    "threshold": dict(threshold=0.2),
    "random": dict(alg="random", seed=2),
    "fused_head": dict(fused_head=True),
    "fused_head_shift_T": dict(fused_head=True, logits_shift=True, temperature=0.9, seed=4),
    "prefix": dict(kv_cache="prefix"),
    "prefix_shift": dict(kv_cache="prefix", logits_shift=True),
    "dual_shift": dict(kv_cache="dual", logits_shift=True),
    "time": dict(time=True),
}


@pytest.mark.parametrize("case", list(_WINDOW_CASES))
def test_last_layer_window_changes_no_token(case):
    """With a model taking output_range (DiffusionLM) the sampler runs the last layer only for
    the window it draws from: the block, from its first candidate (a mask left in the prompt
    comes before it), one position earlier under Dream's shift. Tokens and history must equal
    those of the same model without output_range (float64: only the order of sums differs),
    on a left-padded batch, and the window must really have been asked for."""
    kw = dict(_WINDOW_CASES[case])
    infill, time = kw.pop("infill", False), kw.pop("time", False)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                      max_seq_len=128, init_std=0.4, mask_token_id=MASK,
                      time_conditioning=time)  # fmt: skip
    ranged = _Ranged(cfg).double().eval()
    plain = _Unranged(cfg).double().eval()
    plain.load_state_dict(ranged.state_dict())
    ranged.ranges = []
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, MASK, (3, 7), generator=g)
    am = torch.ones(3, 7, dtype=torch.bool)
    am[1, :2] = False
    am[2, :4] = False
    if infill:
        ids[0, 5] = MASK
        ids[2, 6] = MASK
    gen = dict(gen_length=12, steps=6, block_length=4, mask_id=MASK, output_history=True, **kw)
    x, hist = generate(ranged, ids, am, **gen)
    y, hist_y = generate(plain, ids, am, **gen)
    assert torch.equal(x, y)
    assert len(hist) == len(hist_y) and all(torch.equal(a, b) for a, b in zip(hist, hist_y))
    used = [r for r in ranged.ranges if r is not None]
    assert used, "the sampler never asked for a window"
    if not kw.get("kv_cache"):
        L = 7 + 12
        # The first block is [7, 11): its window starts one earlier under the shift, and at the
        # prompt's mask (position 5) when there is one.
        want0 = (5 if infill else 7) - (1 if kw.get("logits_shift") else 0)
        assert used[0] == (want0, 11)
        assert all(b - a < L for a, b in used)
    elif kw["kv_cache"] == "prefix":
        # A block's first forward runs everything, later ones [7 (6 with the shift), 19): both
        # keep only the block's logits (the shift reads position 6's output for 7).
        shift = int(bool(kw.get("logits_shift")))
        assert used[:2] == [(7 - shift, 11), (0, 4 + shift)], used


def test_window_of_an_empty_block():
    """gen_length 0 and no mask in the prompt: the block is empty and nothing is a candidate;
    with every_step (Dream's and LLaDA's loops run the model at every step) the forward must
    still run (once: x does not change after it), over the whole sequence."""
    from dlm.sampler import _generate

    model = _model()
    ids = torch.randint(0, MASK, (2, 5), generator=torch.Generator().manual_seed(2))
    counter = []
    out = _generate(model, ids, gen_length=0, steps=2, every_step=True, mask_id=MASK,
                    counter=counter)  # fmt: skip
    assert torch.equal(out, ids) and counter == [2]  # then reused: x did not change
