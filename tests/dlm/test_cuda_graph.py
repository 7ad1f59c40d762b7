"""dlm.cuda_graph and generate(cuda_graph=...): same outputs as the eager forward.

Everywhere, the graphs are played by ReplayBackend, a stand-in with a graph's contract: the
captured function reads only the graph's own input buffers, and a replay rewrites the captured
output tensor in place. A wrapper that forgot to copy new inputs in, or handed out the output
buffer itself, gives wrong tokens here. On a machine with a GPU the same tests also run real
CUDA graphs (the "cuda" parameter).
"""

import gc
import warnings

import pytest
import torch

from dlm import cuda_graph as cg
from dlm.config import ModelConfig
from dlm.model import DiffusionLM
from dlm.sampler import StaticKVCache, generate
from dlm_kernels import dispatch

V, MASK = 53, 52
BACKENDS = ["replay"] + (["cuda"] if torch.cuda.is_available() else [])


class ReplayBackend:
    def __init__(self, fail: bool = False):
        self.fail, self.replays = fail, 0

    def capture(self, fn, device):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        out = fn()
        return _Replay(self, fn, out), out


class _Replay:
    def __init__(self, backend, fn, out):
        self.backend, self.fn, self.out = backend, fn, out

    def replay(self):
        self.backend.replays += 1
        self.out.copy_(self.fn())


def _model(vocab=V, dev="cpu", **over):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                      max_seq_len=128, init_std=0.4, mask_token_id=vocab - 1, **over)  # fmt: skip
    return DiffusionLM(cfg).eval().to(dev)


def _setup(backend):
    """(device, GraphedForward factory) for a backend name."""
    if backend == "cuda":
        return "cuda", lambda m: cg.GraphedForward(m)
    return "cpu", lambda m: cg.GraphedForward(m, backend=ReplayBackend())


def _padded_batch(dev):
    g = torch.Generator().manual_seed(2)
    ids = torch.zeros(3, 7, dtype=torch.long)
    am = torch.zeros(3, 7, dtype=torch.bool)
    for b, n in enumerate([7, 4, 6]):
        ids[b, 7 - n :] = torch.randint(2, MASK, (n,), generator=g)
        am[b, 7 - n :] = True
    return ids.to(dev), am.to(dev)


@pytest.mark.parametrize("backend", BACKENDS)
def test_replays_equal_the_model(backend):
    dev, make = _setup(backend)
    m = _model(dev=dev)
    g = make(m)
    ids1, am = _padded_batch(dev)
    ids2 = torch.randint(0, MASK, ids1.shape, device=dev)

    def same(out, ref):
        # The stand-in replays the eager code: the same bits. A real graph replays the kernels
        # eager mode launched, but cuBLAS may pick another algorithm inside a capture.
        if backend == "replay":
            assert torch.equal(out, ref)
        else:
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    with torch.inference_mode():
        a = g(ids1, attention_mask=am, output_range=(2, 6))
        b = g(ids2, attention_mask=am, output_range=(2, 6))  # same signature: a replay
        assert g.captures == 1
        same(a, m(ids1, attention_mask=am, output_range=(2, 6)))
        same(b, m(ids2, attention_mask=am, output_range=(2, 6)))
        # An output handed out is the caller's own: the next replay does not rewrite it.
        assert not torch.equal(a, b)
        same(a, m(ids1, attention_mask=am, output_range=(2, 6)))
        c = g(ids1, attention_mask=am, output_range=(0, 7))
        assert g.captures == 2  # a new window is a new signature
        same(c, m(ids1, attention_mask=am))
        h = g(ids2, attention_mask=am, return_hidden=True)
        assert g.captures == 3
        same(h, m(ids2, attention_mask=am, return_hidden=True))


CASES = {
    "greedy-blocks": dict(alg="low_confidence"),
    "padded-cfg": dict(alg="low_confidence", cfg_scale=1.5),
    "sampled-shift-dream": dict(
        alg="maskgit_plus", temperature=0.8, top_p=0.9, logits_shift=True, schedule="dream"
    ),
    "fused-head": dict(alg="entropy", temperature=0.5, fused_head=True),
    "history": dict(alg="topk_margin", output_history=True),
}
PADDED = {"padded-cfg", "sampled-shift-dream", "fused-head"}  # left-padded prompts


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_generate_with_graphs_gives_the_eager_tokens(backend, case):
    dev, make = _setup(backend)
    m = _model(dev=dev)
    kw = dict(CASES[case])
    if case in PADDED:
        ids, am = _padded_batch(dev)
    else:
        ids, am = torch.randint(0, MASK, (2, 5), device=dev), None
    kw.update(gen_length=12, steps=6, block_length=4, mask_id=MASK, seed=3)
    g = make(m)
    out = generate(m, ids, am, cuda_graph=g, **kw)
    ref = generate(m, ids, am, **kw)
    if kw.get("output_history"):
        (out, hist), (ref, rhist) = out, ref
        assert len(hist) == len(rhist) and all(map(torch.equal, hist, rhist))
    assert torch.equal(out, ref)
    assert (out[:, -12:] != MASK).all()
    # One capture per block window (three blocks), none per step; a second call replays them.
    assert g.captures == 3
    again = generate(m, ids, am, cuda_graph=g, **dict(kw, output_history=False))
    assert torch.equal(again, out)
    assert g.captures == 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("case", ["plain", "padded-shift-fused", "cfg"])
def test_kv_cache_under_graphs_gives_the_eager_tokens(backend, mode, case):
    # Fast-dLLM's caches under graphs: each block's whole-sequence forward and its cached step
    # are two signatures, the cache's buffers stay put (a graph bakes in their addresses) and
    # are reused by the next call of the same shape.
    dev, make = _setup(backend)
    m = _model(dev=dev)
    kw = dict(gen_length=12, steps=6, block_length=4, mask_id=MASK, seed=3, kv_cache=mode,
              alg="maskgit_plus", temperature=0.7)  # fmt: skip
    if case == "padded-shift-fused":
        ids, am = _padded_batch(dev)
        kw.update(logits_shift=True, fused_head=True)
    else:
        ids, am = torch.randint(0, MASK, (2, 5), device=dev), None
        if case == "cfg":
            kw.update(cfg_scale=1.5, alg="low_confidence", temperature=0.0)
    g = make(m)
    out = generate(m, ids, am, cuda_graph=g, **kw)
    assert torch.equal(out, generate(m, ids, am, **kw))
    assert g.captures == 6 and len(g.caches) == 1
    (cache,) = g.caches.values()
    ptrs = [cache.keys[i].data_ptr() for i in sorted(cache.keys)]
    assert torch.equal(generate(m, ids, am, cuda_graph=g, **kw), out)
    assert g.captures == 6
    assert [cache.keys[i].data_ptr() for i in sorted(cache.keys)] == ptrs


def test_rows_that_did_not_change_are_recomputed_with_the_batch():
    # The eager loop reruns only the rows a step changed (a smaller batch); under a graph each
    # window has one shape, so every forward runs the whole batch.
    m = _model()
    ids = torch.randint(0, MASK, (3, 5), generator=torch.Generator().manual_seed(5))
    kw = dict(gen_length=8, steps=8, mask_id=MASK, alg="low_confidence", threshold=0.3)
    rows = []
    orig = m.forward

    def counting(input_ids, *a, **k):
        rows.append(input_ids.shape[0])
        return orig(input_ids, *a, **k)

    m.forward = counting
    ref = generate(m, ids, **kw)
    assert min(rows) < 3  # the eager loop did rerun a part of the batch
    rows.clear()
    g = cg.GraphedForward(m, backend=ReplayBackend())
    out = generate(m, ids, cuda_graph=g, **kw)
    assert set(rows) == {3}
    assert (out[:, 5:] != MASK).all()
    # Equal here; in general only up to the rounding of a batched versus a smaller matmul.
    assert torch.equal(out, ref)


def test_moved_parameters_drop_the_graphs():
    m = _model()
    g = cg.GraphedForward(m, backend=ReplayBackend())
    ids = torch.randint(0, MASK, (2, 6))
    with torch.inference_mode():
        g.check_parameters()
        g(ids)
        assert len(g.graphs) == 1
        with torch.no_grad():
            for p in m.parameters():  # in place: the graphs read this memory, they stay
                p.mul_(1.01)
        g.check_parameters()
        assert len(g.graphs) == 1
    m.to(torch.float64)  # new tensors at new addresses: every graph is stale
    with torch.inference_mode():
        # A direct call checks too (it replayed kernels reading the freed float32 weights).
        assert torch.equal(g(ids), m(ids))
        assert g.captures == 2 and len(g.graphs) == 1
    # generate checks at each call.
    m.to(torch.float32)
    generate(m, ids, cuda_graph=g, gen_length=4, steps=2, mask_id=MASK)
    assert g.captures == 3 and len(g.graphs) == 1


class _Syncing(torch.nn.Module):
    """A model whose forward reads a value on the host (as some Hugging Face models check
    their masks): it cannot be captured."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, input_ids, attention_mask=None, **kw):
        if bool((input_ids < 0).any()):
            raise ValueError("negative ids")
        return self.inner(input_ids, attention_mask=attention_mask, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_failed_capture_warns_once_and_runs_eagerly(backend):
    dev, _ = _setup(backend)
    m = _Syncing(_model(dev=dev)).eval()
    if backend == "replay":
        g = cg.GraphedForward(m, backend=ReplayBackend(fail=True))
    else:
        g = cg.GraphedForward(m)
    ids = torch.randint(0, MASK, (2, 6), device=dev)
    kw = dict(gen_length=8, steps=4, mask_id=MASK, seed=1)
    with pytest.warns(RuntimeWarning, match="capturing the model's forward failed"):
        out = generate(m, ids, cuda_graph=g, **kw)
    assert torch.equal(out, generate(m, ids, **kw))
    assert g.captures == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(m, ids, cuda_graph=g, **kw)  # the failure is remembered: no second warning
    if backend == "cuda":
        # The host sync was caught before any capture: nothing is left mid-capture, and a
        # model that can be captured still is.
        assert cg._BROKEN is None
        assert torch.cuda.current_stream() == torch.cuda.default_stream()
        torch.cuda.empty_cache()
        good = _model(dev=dev)
        g2 = cg.GraphedForward(good)
        assert torch.equal(generate(good, ids, cuda_graph=g2, **kw), generate(good, ids, **kw))
        assert g2.captures == 1


def test_graphed_forward_is_kept_per_model_and_released_with_it():
    m = _model()
    g = cg.graphed_forward(m)
    assert cg.graphed_forward(m) is g and g.model is m
    assert cg.graphed_forward(_model()) is not g
    n = len(cg._CACHE)
    del m, g
    gc.collect()
    assert len(cg._CACHE) < n
    fn = lambda ids: ids  # noqa: E731 (functions can be weakly referenced too)
    assert cg.graphed_forward(fn).model is fn


def test_full_cache_is_dropped_whole_before_the_next_capture(monkeypatch):
    # Graphs on one capture stream share cuBLAS's workspace: never destroy one under the
    # others, and never after a capture that may already use it.
    monkeypatch.setattr(cg, "_MAX_GRAPHS", 2)
    m = _model()
    live = []

    class Recording(ReplayBackend):
        def capture(self, fn, device):
            live.append(len(g.graphs))
            return super().capture(fn, device)

    g = cg.GraphedForward(m, backend=Recording())
    ids = torch.randint(0, MASK, (2, 6))
    with torch.inference_mode():
        for a in range(3):
            assert torch.equal(g(ids, output_range=(a, 6)), m(ids, output_range=(a, 6)))
    assert live == [0, 1, 0] and len(g.graphs) == 1 and g.captures == 3
    monkeypatch.setattr(cg, "_MAX_BYTES", 1)
    with torch.inference_mode():
        g(ids, output_range=(4, 6))
    assert live[-1] == 0 and len(g.graphs) == 1


def test_signature_includes_autocast_and_the_impl():
    m = _model()
    g = cg.GraphedForward(m, backend=ReplayBackend())
    ids = torch.randint(0, MASK, (2, 6))
    with torch.inference_mode():
        g(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = g(ids)
            assert out.dtype == m(ids).dtype
        assert g.captures == 2
        with dispatch.use("reference"):
            g(ids)
        assert g.captures == 3


def test_direct_calls_outside_inference_mode():
    # Buffers captured under generate's inference mode still take a later no_grad call's
    # inputs, and the output is an ordinary tensor without a graph to backpropagate through.
    m = _model()
    g = cg.GraphedForward(m, backend=ReplayBackend())
    ids = torch.randint(0, MASK, (2, 5))
    generate(m, ids, cuda_graph=g, gen_length=4, steps=2, mask_id=MASK)
    full = torch.full((2, 9), MASK)
    full[:, :5] = ids
    with torch.no_grad():
        a = g(full, output_range=(5, 9))
        assert torch.equal(a, m(full, output_range=(5, 9)))
    b = g(full, output_range=(5, 9))
    assert not b.requires_grad and not b.is_inference()
    b += 1  # an ordinary tensor: editable in place


def test_cuda_graph_arguments():
    m = _model()
    ids = torch.randint(0, MASK, (2, 5))
    kw = dict(gen_length=4, steps=2, mask_id=MASK)
    g = cg.GraphedForward(m, backend=ReplayBackend())
    with pytest.raises(ValueError, match="cuda_graph needs CUDA tensors, got the prompt on cpu"):
        generate(m, ids, cuda_graph=True, **kw)
    with pytest.raises(TypeError, match="cuda_graph must be True, False or"):
        generate(m, ids, cuda_graph="yes", **kw)
    m.train()
    with pytest.raises(ValueError, match=r"eval mode \(model.eval\(\)\)"):
        generate(m, ids, cuda_graph=g, **kw)
    m.eval()
    with pytest.raises(
        TypeError, match="argument kv_cache must be a tensor, a StaticKVCache or a plain"
    ):
        g(ids, kv_cache=[1])
    with pytest.raises(ValueError, match="a GraphedForward of another model"):
        generate(_model(), ids, cuda_graph=g, **kw)
    with pytest.raises(ValueError, match="cuda_graph needs CUDA tensors, got the prompt on"):
        generate(m, ids, cuda_graph=cg.GraphedForward(m), **kw)
    with pytest.raises(ValueError, match="CUDA graphs need CUDA tensors, got input_ids on"):
        cg.GraphedForward(m)(ids)
    assert torch.equal(generate(m, ids, cuda_graph=False, **kw), generate(m, ids, **kw))


def test_a_failed_capture_that_began_drops_every_graph():
    # A capture that began and failed leaves a graph on the capture stream; destroying it
    # clears cuBLAS's workspace under the live graphs (pytorch#193402): all go at once.
    m = _model()

    class FailsAfterOne(ReplayBackend):
        def __init__(self):
            super().__init__()
            self.failed = []  # as CudaGraphBackend: graphs whose capture began and failed

        def capture(self, fn, device):
            if g.captures:
                self.failed.append("a graph")
                raise RuntimeError("operation failed during capture")
            return super().capture(fn, device)

    g = cg.GraphedForward(m, backend=FailsAfterOne())
    ids = torch.randint(0, MASK, (2, 6))
    with torch.inference_mode():
        g(ids)
        assert len(g.graphs) == 1
        with pytest.warns(RuntimeWarning, match="capturing the model's forward failed"):
            out = g(ids, output_range=(2, 6))
        assert torch.equal(out, m(ids, output_range=(2, 6)))
        assert list(g.graphs.values()) == [None]  # the first graph went too


def test_static_kv_cache_keeps_its_buffers():
    # Its key is never reused, even by a cache made after it is gone (id() would be).
    assert len({StaticKVCache().graph_key()[0] for _ in range(20)}) == 20
    a, b = StaticKVCache(), StaticKVCache()
    k = torch.randn(2, 5, 1, 4)
    ka, _ = a.update(0, k, k)
    ptr = ka.data_ptr()
    assert a.update(0, k + 1, k)[0].data_ptr() == ptr  # rewritten in place
    a.start = 3
    assert a.update(0, k[:, :2], k[:, :2])[0].data_ptr() == ptr
    a.start = 0
    with pytest.raises(RuntimeError, match="never reallocate|one cache per batch shape"):
        a.update(0, k.double(), k.double())
    with torch.inference_mode():
        kb, _ = b.update(0, k, k)
    assert not kb.is_inference()
    b.update(0, k, k)  # outside inference mode too


def test_tf32_set_through_the_new_api():
    # torch >= 2.9: once fp32_precision is set, reading allow_tf32 raises.
    m = _model()
    g = cg.GraphedForward(m, backend=ReplayBackend())
    ids = torch.randint(0, MASK, (2, 6))
    mm = torch.backends.cuda.matmul
    prev = mm.fp32_precision
    try:
        mm.fp32_precision = "tf32"
        with torch.inference_mode():
            assert torch.equal(g(ids), m(ids))
    finally:
        mm.fp32_precision = prev


def test_reset_starts_a_fresh_memory_pool_and_static_caches_count(monkeypatch):
    # After a reset every graph of the old pool is gone and its use count is 0: the next
    # capture must not go into it (the allocator asserts, vllm-project/vllm#28426), so the
    # backend's stream and pool are dropped with the graphs.
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    backend = cg.CudaGraphBackend()
    backend.streams[0] = ("a stream", "a pool")
    g = cg.GraphedForward(_model(), backend=backend)
    g.reset()
    assert backend.streams == {}
    # The static KV caches' buffers count in the bytes kept (one full cache per batch shape).
    cache = StaticKVCache()
    cache.keys[0], cache.values[0] = torch.zeros(4, 8), torch.zeros(4, 8)
    assert cg._cache_bytes(cache) == 2 * 4 * 8 * 4
