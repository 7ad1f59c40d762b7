"""dlm.sampler.generate's shortcuts change nothing a caller sees: the loop runs under inference
mode but hands back ordinary tensors, and the even schedule's counts taken on the host (when
every row has as many masks) commit exactly what the per-row tensor counts commit.
"""

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
