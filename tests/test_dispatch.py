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
