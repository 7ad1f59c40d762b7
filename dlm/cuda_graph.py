"""CUDA graphs of a model's forward, replayed step after step by the sampler.

Why: at 1B scale on an H100 a sampler step was launch-bound (gpu-h100-2026-11-27-s9-run1: 16.4 ms
per step of batch 8 for ~6.5 ms of GEMM work). The GPU waits while the CPU issues each of the
forward's few hundred kernels. A CUDA graph issues a whole captured forward in one launch.
Generation calls the model with the same shapes at every step of a block (the block's window),
so one capture per input signature serves every step of that block, and every later call with
the same signature.

    graphs = GraphedForward(model)
    logits = graphs(input_ids, attention_mask=am, output_range=(a, b))  # == model(...)'s logits

What a graph assumes, and how it is kept true:
  * Same shapes, dtypes and non-tensor arguments: the signature is the cache key. A new
    signature is captured once (after one eager warm-up run on a side stream, where autotuners
    and lazy initialisation run).
  * Tensor arguments are copied into the graph's own input buffers before each replay, and the
    output is cloned out of the graph's output buffer, which the next replay overwrites.
  * The parameters stay where they are. In-place updates (an optimizer step, load_state_dict)
    are seen by the graphs, which read the parameters' memory; parameters moved or replaced
    (``model.to(...)``) change their addresses, which ``check_parameters`` notices: it drops
    every graph, and the next calls recapture.
  * The forward makes no host sync and no CPU-side choice from tensor values. A capture that
    fails anyway (a model that checks its mask on the host, say) warns once, and that
    signature runs eagerly from then on.
  * No randomness inside the forward (dropout): ``generate`` uses graphs only for a model in
    eval mode.

All graphs of one GraphedForward share one memory pool: they run one at a time, each output is
kept alive by its graph (so no later capture reuses its memory) and copied out before the next
replay, so a pool the size of one forward's activations serves them all.
"""

from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor

_MAX_GRAPHS = 64  # signatures kept per model (least recently used dropped first)


class CudaGraphBackend:
    """Captures with torch.cuda.CUDAGraph into one shared memory pool."""

    def __init__(self) -> None:
        self.pool = None

    def capture(self, fn: Callable[[], Tensor]):
        """(graph with .replay(), the output tensor the replays rewrite)."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()  # warm-up: Triton autotuning, cuBLAS handles, lazy init happen outside capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        return graph, out


class _Entry:
    __slots__ = ("graph", "inputs", "out")

    def __init__(self, graph, inputs: dict[str, Tensor], out: Tensor) -> None:
        self.graph, self.inputs, self.out = graph, inputs, out


class GraphedForward:
    """``model(input_ids, **kwargs)``'s float logits (or whatever float tensor the model returns,
    through ``dlm.sampler.call_model``), from CUDA graphs captured per call signature.

    Args:
        model: the module or callable (as ``generate`` takes it).
        backend: what captures (default: CudaGraphBackend). Tests pass a stand-in.

    Tensor keyword arguments are graph inputs (copied in each call); every other keyword
    argument (bools, ints, tuples such as ``output_range``, None) is part of the signature.
    """

    def __init__(self, model, backend=None) -> None:
        # Weakly, where it can: graphed_forward's cache keys on the model, and a strong
        # reference from the value would keep every model it has seen alive.
        try:
            self._ref, self._strong = weakref.ref(model), None
        except TypeError:
            self._ref, self._strong = None, model
        self.backend = backend if backend is not None else CudaGraphBackend()
        self.graphs: OrderedDict[tuple, _Entry | None] = OrderedDict()
        self.captures = 0  # graphs captured so far (a count for tests and benchmarks)
        self._params: tuple | None = None

    @property
    def model(self):
        return self._strong if self._ref is None else self._ref()

    def check_parameters(self) -> None:
        """Drop every graph when the model's parameters or buffers moved (``model.to(...)``,
        tensors replaced): a graph reads the addresses it was captured with."""
        mod = self.model if isinstance(self.model, torch.nn.Module) else None
        if mod is None:
            return
        sig = tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in mod.parameters())
        sig += tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in mod.buffers())
        if sig != self._params:
            self.graphs.clear()
            self._params = sig

    def __call__(self, input_ids: Tensor, **kwargs) -> Tensor:
        from dlm.sampler import call_model  # the sampler imports this module

        args = dict(kwargs, input_ids=input_ids)
        key = _signature(args)
        if key not in self.graphs:
            self.graphs[key] = self._capture(args)
            while len(self.graphs) > _MAX_GRAPHS:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        entry = self.graphs[key]
        if entry is None:  # its capture failed: this signature runs eagerly
            return call_model(self.model, input_ids, **kwargs)
        for name, buf in entry.inputs.items():
            buf.copy_(args[name])
        entry.graph.replay()
        return entry.out.clone()

    def _capture(self, args: dict) -> _Entry | None:
        from dlm.sampler import call_model

        inputs = {k: torch.empty(v.shape, dtype=v.dtype, device=v.device).copy_(v)
                  for k, v in args.items() if isinstance(v, Tensor)}  # fmt: skip
        static = {k: inputs.get(k, v) for k, v in args.items()}
        ids = static.pop("input_ids")

        def run() -> Tensor:
            return call_model(self.model, ids, **static)

        try:
            graph, out = self.backend.capture(run)
        except Exception as e:  # noqa: BLE001 (any failure: this signature runs eagerly)
            warnings.warn(
                f"GraphedForward: capturing the model's forward failed ({type(e).__name__}: "
                f"{str(e)[:200]}); calls with this signature run without a CUDA graph",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        self.captures += 1
        return _Entry(graph, inputs, out)


def _signature(args: dict) -> tuple:
    key = []
    for name in sorted(args):
        v = args[name]
        if isinstance(v, Tensor):
            key.append((name, "tensor", tuple(v.shape), v.dtype, v.device))
        else:
            try:
                hash(v)
            except TypeError:
                raise TypeError(
                    f"GraphedForward: argument {name} must be a tensor or a hashable value "
                    f"(part of the graph's signature), got {type(v).__name__}"
                ) from None
            key.append((name, "value", v))
    return tuple(key)


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def graphed_forward(model) -> GraphedForward:
    """The model's GraphedForward, kept across calls (graphs are captured once per signature);
    a new one for a callable that cannot be weakly referenced."""
    try:
        g = _CACHE.get(model)
    except TypeError:
        return GraphedForward(model)
    if g is None:
        g = _CACHE[model] = GraphedForward(model)
    return g
