"""dlm_kernels.dispatch: use() blocks across threads, TRITON_INTERPRET as Triton reads it, and
an import that survives a broken triton."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

from dlm_kernels import dispatch


def test_use_blocks_of_two_threads_each_remove_their_own_entry():
    # A enters cpp, B enters reference, A leaves first: B, still inside its block, must see
    # reference (leaving a block once removed the innermost entry, B's, whatever the order).
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def thread_a():
        with dispatch.use("cpp"):
            a_in.set()
            b_in.wait()
        a_out.set()

    def thread_b():
        a_in.wait()
        with dispatch.use("reference"):
            b_in.set()
            a_out.wait()
            seen["b"] = dispatch.current_impl()

    ts = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(10)
    assert seen == {"b": "reference"}
    assert dispatch.current_impl() == dispatch.requested_impl()  # nothing left behind


def test_triton_interpret_read_as_triton_reads_it(monkeypatch):
    for value, want in (("1", True), ("true", True), ("On", True), ("0", False), ("", False)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        dispatch.refresh()
        assert dispatch.triton_interpret() is want, value
    monkeypatch.undo()
    dispatch.refresh()


def test_import_survives_a_broken_triton(tmp_path):
    # A triton that raises something other than ImportError at import: the package still
    # imports, with the Triton path off, as dispatch already assumed. (Calling an op then
    # depends on torch: its custom-op machinery imports torch._dynamo, which imports triton
    # and fails the same way; that is torch's, not ours.)
    fake = tmp_path / "triton"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise RuntimeError('a broken triton')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), root]))
    env.pop("TRITON_INTERPRET", None)
    code = ("import dlm_kernels, dlm_kernels.patch\n"
            "from dlm_kernels import dispatch\n"
            "print(dispatch.triton_available(), dispatch.cpp_ops() is not None)\n")  # fmt: skip
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=str(tmp_path), timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[-2:] == ["False", "True"]


def _loss_and_grad(loss, w):
    import torch

    return loss, torch.autograd.grad(loss, w)[0]


def test_ops_trace_under_make_fx_and_fake_tensors():
    # The host-side value checks (targets in range, cu_seqlens, per-row options) are skipped
    # under tracers and fake tensors instead of reading data the tracer does not have (they
    # failed with GuardOnDataDependentSymNode / DataDependentOutputException).
    import pytest
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    import dlm_kernels as dk
    from tests.utils import impl

    B, L, V = 2, 9, 23
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (B, L), generator=g)
    x[:, ::2] = V
    logits = torch.randn(B, L, V, generator=g)
    tgt = torch.randint(0, V, (B, L), generator=g)
    h, W = torch.randn(B, L, 16, generator=g), torch.randn(V, 16, generator=g)
    q = torch.randn(1, 2 * L, 2, 8, generator=g)
    cu = torch.tensor([0, 5, 2 * L], dtype=torch.int32)
    calls = {
        "unmask_step": (lambda x, lg: dk.unmask_step(x, lg, mask_id=V, num_transfer=2, seed=3),
                        (x, logits)),
        "sample_tokens": (lambda lg: dk.sample_tokens(lg.reshape(-1, V), temperature=0.7,
                                                      top_p=0.9, seed=3), (logits,)),
        "masked_cross_entropy": (lambda lg, t, m: dk.masked_cross_entropy(lg, t, m),
                                 (logits, tgt, x == V)),
        "masked_linear_cross_entropy": (lambda h, W, t, m: dk.masked_linear_cross_entropy(
            h, W, t, m), (h, W, tgt, x == V)),
        "varlen attention": (lambda q, cu: dk.bidirectional_attention(
            q[0], q[0], q[0], cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=13,
            max_seqlen_k=13), (q, cu)),
        # The training call: a weight that needs its gradient (the C++ path computes it in the
        # forward in eager mode only), and a tensor normalizer (read on the host in eager only).
        "masked_linear_cross_entropy grad": (lambda h, W, t, m, n: _loss_and_grad(
            dk.masked_linear_cross_entropy(h, W, t, m, normalizer=n), W),
            (h, W.clone().requires_grad_(True), tgt, x == V, torch.tensor(7.0))),
        "masked_cross_entropy normalizer": (lambda lg, t, m, n: dk.masked_cross_entropy(
            lg, t, m, normalizer=n), (logits, tgt, x == V, torch.tensor(7.0))),
        "fused_head_unmask_step": (lambda x, h, W: dk.fused_head_unmask_step(
            x, h, W, mask_id=V, num_transfer=2, seed=3), (x, h, W)),
    }  # fmt: skip
    # Traced, the C++ linear CE computes its gradients in the backward instead of the forward
    # (eager): the same values up to rounding. Every other result is exact.
    rounding_only = {"masked_linear_cross_entropy grad"}
    for name in ("reference", "cpp"):
        with impl(name):
            for op, (f, args) in calls.items():
                want = f(*args)
                for mode in ("fake", "symbolic"):
                    gm = make_fx(f, tracing_mode=mode)(*args)
                    got = gm(*args)
                    for a, b in zip(torch.utils._pytree.tree_leaves(got),
                                    torch.utils._pytree.tree_leaves(want)):  # fmt: skip
                        if op in rounding_only:
                            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7,
                                                       msg=f"{name} {op} {mode}")  # fmt: skip
                        else:
                            assert torch.equal(a, b), (name, op, mode)
                with FakeTensorMode() as mode:
                    fake = f(*[mode.from_tensor(a) for a in args])
                for a, b in zip(torch.utils._pytree.tree_leaves(fake),
                                torch.utils._pytree.tree_leaves(want)):  # fmt: skip
                    assert a.shape == b.shape and a.dtype == b.dtype, (name, op)
    with pytest.raises(ValueError, match="target"):  # eager calls still check
        dk.masked_cross_entropy(logits, tgt + V, x == V)
