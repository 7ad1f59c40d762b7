"""Which implementation runs an op: Triton, the compiled C++ ops, or the PyTorch reference.

Decided once per process from the environment, then per call from the tensors' device:

    auto (default)  CUDA tensors -> Triton (when triton imports), CPU tensors -> C++ (when
                    ``dlm_kernels._C`` loads and the op has a C++ kernel), otherwise the reference.
                    ``auto`` never sends CPU tensors to Triton, even under the interpreter, so
                    that a CPU model or trainer runs the fast C++ ops and not the slow interpreter.
    flash_attn      ``bidirectional_attention`` runs flash-attn (when installed) for the cases it
                    supports (ops/attention_flash.py); everything else as ``auto``.
    triton          Under ``TRITON_INTERPRET=1`` this forces the Triton path on CPU tensors too:
                    that is how the Triton kernels are tested on machines without a GPU.
    triton | cpp | reference
                    force one path; an op that lacks the forced path uses the reference.

One op refines its CUDA path: ``masked_linear_cross_entropy`` runs cuBLAS over vocabulary slabs
in eager mode and its fused Triton kernels under CUDA-graph capture, or as chosen with
``DLM_KERNELS_LCE=auto|slab|fused`` (ops/linear_cross_entropy.py); ``fused_head_unmask_step``
likewise runs cuBLAS in eager mode (``DLM_KERNELS_HEAD=auto|cublas|fused``).

Set with ``DLM_KERNELS_IMPL=...``; tests and benchmarks switch it for a block with
``with dispatch.use("cpp"): ...``. If the C++ extension is missing or fails to load, the ops fall
back to the reference and one warning says so (never silently).
"""

from __future__ import annotations

import contextlib
import importlib
import operator
import os
import warnings
from collections.abc import Iterator

import torch

IMPLS = ("auto", "triton", "cpp", "reference", "flash_attn")


def _env_impl() -> str:
    impl = os.environ.get("DLM_KERNELS_IMPL", "auto").strip().lower() or "auto"
    if impl not in IMPLS:
        raise ValueError(f"DLM_KERNELS_IMPL must be one of {IMPLS}, got {impl!r}")
    return impl


def _interpret_env() -> bool:
    # As Triton reads it (1, true, on, yes): a kernel decorated for the interpreter must also
    # be selected for it.
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _load_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _load_cpp():
    try:
        return importlib.import_module("dlm_kernels._C")
    except Exception as e:  # ImportError, undefined symbols from a torch mismatch, ...
        warnings.warn(
            "dlm_kernels: the C++ extension dlm_kernels._C could not be loaded "
            f"({type(e).__name__}: {e}); CPU ops fall back to the slower PyTorch reference. "
            "Rebuild with `pip install --no-build-isolation -e .` against the installed torch.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


# Decided once, at import: module globals (not functools.cache, not a lazy import) so that
# torch.compile can trace select() and guard on them even when the first call is compiled.
_IMPL = _env_impl()
_TRITON_OK = _load_triton()
_CPP = _load_cpp()
# Triton itself reads TRITON_INTERPRET when a kernel is decorated, i.e. at import too. Reading
# os.environ on every select() cost ~5 us of a ~10 us call, and a model forward selects
# ~5 times per layer (attention, RMSNorm, RoPE): ~1 ms per generation step at 16 layers.
_INTERPRET = _interpret_env()
_override: list[tuple[object, str]] = []  # (the use() block's token, impl), innermost last


def refresh() -> None:
    """Re-read DLM_KERNELS_IMPL and TRITON_INTERPRET and reload the C++ module (for tests)."""
    global _IMPL, _CPP, _INTERPRET
    _IMPL = _env_impl()
    _CPP = _load_cpp()
    _INTERPRET = _interpret_env()


def requested_impl() -> str:
    """The implementation asked for by ``DLM_KERNELS_IMPL`` (read at import or refresh())."""
    return _IMPL


def triton_interpret() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1`` when
    dlm_kernels was imported, or at the last refresh())."""
    return _INTERPRET


def triton_available() -> bool:
    return _TRITON_OK


def cpp_ops():
    """The compiled module ``dlm_kernels._C``, or None (with one warning) if it cannot load."""
    return _CPP


@contextlib.contextmanager
def use(impl: str) -> Iterator[None]:
    """Force ``impl`` for every op called inside the block (process-wide, so that a backward
    run on autograd's threads sees it too; nestable). Blocks of several threads overlap: the
    one entered last rules while it lasts, and leaving a block removes that block's own entry,
    whatever the order."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    entry = (object(), impl)  # its own token: equal to no other block's entry
    _override.append(entry)
    try:
        yield
    finally:
        _override.remove(entry)  # one atomic list operation


def current_impl() -> str:
    return _override[-1][1] if _override else _IMPL


def select(device: torch.device, *, has_triton: bool = True, has_cpp: bool = True) -> str:
    """Pick "triton", "cpp" or "reference" for an op whose tensors live on ``device``.

    ``has_triton`` / ``has_cpp`` say which kernels the op has. A forced path that cannot run on
    ``device`` (Triton on CPU without the interpreter) raises, so a test never passes by silently
    testing the reference.
    """
    impl = current_impl()
    if impl == "flash_attn":
        # Routes bidirectional_attention to flash-attn where it can (ops/attention_flash.py);
        # every other op, and attention flash-attn cannot do, runs as under auto.
        impl = "auto"
    on_cuda = device.type == "cuda"
    triton_ok = has_triton and triton_available() and (on_cuda or triton_interpret())
    if impl == "auto":
        if on_cuda:
            return "triton" if triton_ok else "reference"
        if device.type == "cpu" and has_cpp and cpp_ops() is not None:
            return "cpp"
        return "reference"
    if impl == "triton":
        if not has_triton:
            return "reference"
        if not triton_ok:
            raise RuntimeError(
                f"DLM_KERNELS_IMPL=triton but Triton cannot run on {device} tensors "
                "(needs CUDA, or TRITON_INTERPRET=1 on CPU, and `import triton` to work)"
            )
        return "triton"
    if impl == "cpp":
        if not has_cpp:
            return "reference"
        if device.type != "cpu":
            raise RuntimeError(f"DLM_KERNELS_IMPL=cpp but the tensors are on {device}")
        if cpp_ops() is None:
            raise RuntimeError("DLM_KERNELS_IMPL=cpp but dlm_kernels._C failed to load")
        return "cpp"
    return "reference"


def as_int(value) -> int | None:
    """``value`` as a Python int when it is an integer scalar (int, numpy integer, anything with
    ``__index__``) and not a bool or a tensor; None otherwise (the caller raises, naming its
    argument). Lets arguments read from numpy or a config file pass as ints."""
    if isinstance(value, torch.Tensor) or is_bool(value):
        return None
    if isinstance(value, (int, torch.SymInt)):
        # Returned as is: torch.compile traces an int argument that changes between calls as a
        # symbol, and operator.index would specialise the graph on its value (a recompile per
        # offset=step).
        return value
    try:
        return operator.index(value)
    except TypeError:
        return None


def is_bool(value) -> bool:
    """A Python or numpy bool (numpy's has ``__index__``, so it would pass as an int)."""
    if isinstance(value, (bool, torch.SymBool)):
        return True
    if isinstance(value, (int, float, torch.SymInt, torch.SymFloat)):
        return False
    return getattr(getattr(value, "dtype", None), "kind", None) == "b"


def plain_eager() -> bool:
    """True outside torch.compile and outside any tracer or dispatch mode (make_fx, fake
    tensors): only then may an op read tensor values on the host or call the C++ functions
    directly, which tracers cannot see."""
    return not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0


def values_readable(t: torch.Tensor) -> bool:
    """Whether the host may read ``t``'s values for an argument check: only in plain eager mode
    and not for fake or meta tensors. The checks are skipped elsewhere; the kernels stay safe on
    bad values (NaN results)."""
    if not plain_eager():
        return False
    if t.device.type == "meta":
        return False
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(t)


def refuse_second_order(bwd_op, name: str) -> None:
    """Give a custom backward op an autograd formula that raises a clear error. Without one, a
    second-order gradient (``create_graph=True``, then a backward through the gradients) fails
    inside torch with "no autograd formula was registered"; the kernel paths have no
    second-order formulas, and the reference paths (``DLM_KERNELS_IMPL=reference``) do."""

    def backward(ctx, *grads):
        raise RuntimeError(
            f"{name}: no second-order gradients on the kernel paths (a backward through "
            "gradients taken with create_graph=True); use the reference "
            "(DLM_KERNELS_IMPL=reference or dlm_kernels.dispatch.use('reference'))"
        )

    bwd_op.register_autograd(backward, setup_context=lambda ctx, inputs, output: None)
