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
  * Same shapes, dtypes and non-tensor arguments, and the same global state that changes what
    the forward launches (autocast, dlm_kernels' dispatch, TF32): all part of the signature, the
    cache key. A new signature is captured once.
  * Tensor arguments are copied into the graph's own input buffers before each replay, and the
    output is cloned out of the graph's output buffer, which the next replay overwrites.
  * The parameters stay where they are. In-place updates (an optimizer step, load_state_dict)
    are seen by the graphs, which read the parameters' memory; parameters moved or replaced
    (``model.to(...)``) change their addresses, which ``check_parameters`` notices.
  * The forward makes no host sync. Before each capture the forward runs twice on the capture
    stream: once to autotune and initialise, once with torch's sync debug mode set to
    "error", so that a host sync (a Hugging Face model checking its mask, DLM_KERNELS_IMPL=
    flash_attn's varlen lengths) raises there, before any capture. That signature then warns
    once and runs eagerly. A capture that fails after that point drops every graph of the
    model (see Memory); one that cannot even end may leave the allocator mid-capture: it
    warns and switches graphs off for the whole process.
  * No randomness and no gradients: the forward runs under no_grad; ``generate`` uses graphs
    only for a model in eval mode.
  * A KV cache (Fast-dLLM's prefix / dual) is state the graphs write and read in place: it is
    a dlm.sampler.StaticKVCache from ``static_cache``, whose buffers never move, and its
    ``graph_key`` (a number never reused, and the slice it writes) is part of the signature;
    each graph keeps the caches it baked in alive. Any other object argument is an error.

Memory. All graphs of one GraphedForward share one memory pool and one capture stream (per
device): they run
one at a time and each output is copied out right after its replay, so a pool the size of one
forward's activations serves them all. Graphs are never destroyed one by one: graphs captured on
one stream share cuBLAS's workspace for that stream, and destroying one graph can free it under
the others (pytorch/pytorch#193402). When the parameters move, or the graphs exceed
_MAX_GRAPHS or _MAX_BYTES of buffers, every graph is dropped at once and the next calls
recapture.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable

import torch
from torch import Tensor

# Signatures kept per model before all are dropped (and recaptured on use). generate at gen 256,
# block 32 makes 8 (no cache) or 16 (a cache: each block's full forward and its cached step);
# the three modes at one batch size make 31 (prefix and dual share their full forwards).
_MAX_GRAPHS = 64
_MAX_BYTES = 2 << 30  # bytes of input + output buffers kept per model, likewise
_BROKEN: str | None = None  # set when a capture failed midway: no more captures in the process


class CudaGraphBackend:
    """Captures with torch.cuda.CUDAGraph on its own stream and memory pool per device."""

    def __init__(self) -> None:
        self.streams: dict[int, tuple[torch.cuda.Stream, tuple]] = {}  # device -> stream, pool
        self.failed: list = []  # graphs of failed captures: destroyed only with the rest

    def synchronize(self) -> None:
        for index in self.streams:
            torch.cuda.synchronize(index)

    def capture(self, fn: Callable[[], Tensor], device: torch.device):
        """(graph with .replay(), the output tensor its replays rewrite)."""
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.cuda.device(index):
            if index not in self.streams:
                self.streams[index] = (torch.cuda.Stream(), torch.cuda.graph_pool_handle())
            stream, pool = self.streams[index]
            caller = torch.cuda.current_stream()
            stream.wait_stream(caller)
            fn = _no_autocast_cache(fn)
            try:
                with torch.cuda.stream(stream):
                    fn()  # Triton autotuning, cuBLAS handles, lazy init: outside the capture
                    mode = torch.cuda.get_sync_debug_mode()
                    torch.cuda.set_sync_debug_mode("error")  # a host sync raises here
                    try:
                        fn()
                    finally:
                        torch.cuda.set_sync_debug_mode(mode)
            finally:
                caller.wait_stream(stream)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.stream(stream):
                # thread_local: another thread's CUDA calls (a data loader's pinning thread)
                # cannot invalidate this capture.
                graph.capture_begin(pool, capture_error_mode="thread_local")
                try:
                    out = fn()
                except BaseException:
                    self._abandon(graph, index, pool)
                    raise
                try:
                    graph.capture_end()
                except BaseException:
                    self._abandon(graph, index, pool, ended=True)
                    raise
            caller.wait_stream(stream)
        return graph, out

    def _abandon(self, graph, index: int, pool, ended: bool = False) -> None:
        """After a failed capture: end it if it can end, and keep the graph object. Destroying
        it now would clear cuBLAS's workspace for this stream under the live graphs
        (pytorch/pytorch#193402); GraphedForward drops every graph at once instead."""
        global _BROKEN
        self.failed.append(graph)
        if not ended:
            try:
                graph.capture_end()
                return
            except Exception:  # noqa: BLE001 (an invalidated capture cannot end cleanly)
                pass
        _BROKEN = "a CUDA graph capture could not end"
        # capture_end raised before it told the allocator the capture ended: tell it here.
        end = getattr(torch._C, "_cuda_endAllocateToPool", None)
        if end is not None:
            try:
                end(index, pool)
            except Exception:  # noqa: BLE001, S110 (best effort: graphs are off from now on)
                pass


def _no_autocast_cache(fn: Callable[[], Tensor]) -> Callable[[], Tensor]:
    """``fn`` under the caller's autocast with its weight-cast cache off: outside inference
    mode autocast caches the low-precision copies of the weights for the region, a capture
    would bake in their addresses, and the region's exit frees them under the graph (why
    make_graphed_callables refuses cache_enabled=True)."""
    if not torch.is_autocast_enabled("cuda"):
        return fn
    dtype = torch.get_autocast_dtype("cuda")

    def run() -> Tensor:
        with torch.autocast("cuda", dtype=dtype, cache_enabled=False):
            return fn()

    return run


class _Entry:
    __slots__ = ("graph", "inputs", "out", "nbytes", "state")

    def __init__(self, graph, inputs: dict[str, Tensor], out: Tensor, state: list) -> None:
        self.graph, self.inputs, self.out = graph, inputs, out
        self.nbytes = out.nbytes + sum(t.nbytes for t in inputs.values())
        self.state = state  # objects whose buffers the graph baked in (a StaticKVCache): alive


class GraphedForward:
    """``model(input_ids, **kwargs)``'s float logits (or whatever float tensor the model returns,
    through ``dlm.sampler.call_model``), from CUDA graphs captured per call signature, under
    no_grad (a forward only).

    Args:
        model: the module or callable (as ``generate`` takes it), held weakly where it can be.
        backend: what captures (default: CudaGraphBackend, CUDA tensors only). Tests pass a
            stand-in with the same ``capture(fn, device) -> (graph, out)``.

    Not thread-safe: the graphs, their input and output buffers and the static KV caches are
    shared by every call on one model (one thread per GraphedForward).

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
        self.graphs: dict[tuple, _Entry | None] = {}
        self.caches: dict = {}  # batch shape -> StaticKVCache (see static_cache)
        self.captures = 0  # graphs captured so far (a count for tests and benchmarks)
        self._params: tuple | None = None

    @property
    def model(self):
        return self._strong if self._ref is None else self._ref()

    def reset(self) -> None:
        """Drop every graph at once (never one by one: see the module's docstring)."""
        if isinstance(self.backend, CudaGraphBackend):
            self.backend.synchronize()  # none may be running when it is destroyed
            self.backend.failed.clear()
        self.graphs = {}
        self.caches = {}
        if isinstance(self.backend, CudaGraphBackend):
            # A fresh stream and memory pool for the next captures: the old pool's use count
            # fell to 0 with its graphs, and capturing into it again trips the allocator's
            # assert (vllm-project/vllm#28426), which would turn every later capture eager.
            self.backend.streams.clear()

    def static_cache(self, key, device: torch.device):
        """The dlm.sampler.StaticKVCache these graphs use for one batch shape ``key`` on
        ``device``: one per shape, kept as long as the graphs (a graph writes and reads its
        buffers in place)."""
        from dlm.sampler import StaticKVCache

        key = (key, device, _global_state(device.type))  # autocast changes the buffers' dtype
        if key not in self.caches:
            self.caches[key] = StaticKVCache()
        return self.caches[key]

    def check_parameters(self) -> None:
        """Drop every graph when the model's parameters or buffers moved (``model.to(...)``,
        tensors replaced): a graph reads the addresses it was captured with."""
        mod = self.model if isinstance(self.model, torch.nn.Module) else None
        if mod is None:
            return
        sig = tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in mod.parameters())
        sig += tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in mod.buffers())
        if sig != self._params:
            self.reset()
            self._params = sig

    def __call__(self, input_ids: Tensor, **kwargs) -> Tensor:
        """check_parameters, then :meth:`run` (the check walks every parameter: ~0.5 ms for
        150 tensors here, which is why generate checks once per call and runs ``run``)."""
        self.check_parameters()  # moved or replaced weights: the graphs read old addresses
        return self.run(input_ids, **kwargs)

    def run(self, input_ids: Tensor, **kwargs) -> Tensor:
        """The forward from its graph, for a caller that ran check_parameters since the
        weights last moved."""
        from dlm.sampler import call_model  # the sampler imports this module

        dev = input_ids.device
        if isinstance(self.backend, CudaGraphBackend) and dev.type != "cuda":
            raise ValueError(
                f"GraphedForward: CUDA graphs need CUDA tensors, got input_ids on {dev}"
            )
        with torch.no_grad():
            args = dict(kwargs, input_ids=input_ids)
            key = _signature(args)
            entry = self.graphs.get(key, False)
            if entry is False:
                # Full: drop them all before this capture (not after: it shares their stream).
                # The static KV caches count too: one full cache per batch shape.
                kept = sum(e.nbytes for e in self.graphs.values() if e is not None)
                kept += sum(_cache_bytes(c) for c in self.caches.values())
                if len(self.graphs) >= _MAX_GRAPHS or kept >= _MAX_BYTES:
                    self.reset()
                entry = self.graphs[key] = None if _BROKEN else self._capture(args, dev)
            if entry is None:  # its capture failed: this signature runs eagerly
                return call_model(self.model, input_ids, **kwargs)
            for name, buf in entry.inputs.items():
                buf.copy_(args[name])
            other = dev.type == "cuda" and dev.index not in (None, torch.cuda.current_device())
            if other:  # a graph replays on its own device's stream
                with torch.cuda.device(dev):
                    entry.graph.replay()
            else:
                entry.graph.replay()
            return entry.out.clone()

    def _capture(self, args: dict, dev: torch.device) -> _Entry | None:
        from dlm.sampler import call_model

        # Ordinary tensors, also when captured under inference_mode: a later call outside it
        # still copies into them.
        with torch.inference_mode(False):
            inputs = {k: v.clone(memory_format=torch.contiguous_format)
                      for k, v in args.items() if isinstance(v, Tensor)}  # fmt: skip
        static = {k: inputs.get(k, v) for k, v in args.items()}
        ids = static.pop("input_ids")
        model = self.model

        def run() -> Tensor:
            return call_model(model, ids, **static)

        try:
            graph, out = self.backend.capture(run, dev)
        except Exception as e:  # noqa: BLE001 (any failure: this signature runs eagerly)
            if getattr(self.backend, "failed", None):
                # A capture that began: drop every graph now, together with its remains.
                self.reset()
            off = f"; {_BROKEN}: CUDA graphs are off for this process" if _BROKEN else ""
            warnings.warn(
                f"GraphedForward: capturing the model's forward failed ({type(e).__name__}: "
                f"{str(e)[:200]}); calls with this signature run without a CUDA graph{off}",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        self.captures += 1
        state = [v for v in static.values() if hasattr(v, "graph_key")]
        return _Entry(graph, inputs, out, state)


def _cache_bytes(cache) -> int:
    """Bytes of the key and value buffers a StaticKVCache holds."""
    return sum(t.nbytes for d in (cache.keys, cache.values) for t in d.values())


def _signature(args: dict) -> tuple:
    dev = args["input_ids"].device
    key: list = [_global_state(dev.type)]
    for name in sorted(args):
        v = args[name]
        if isinstance(v, Tensor):
            key.append((name, "tensor", tuple(v.shape), v.dtype, v.device))
        elif hasattr(v, "graph_key"):  # a StaticKVCache: its buffers and slice are baked in
            key.append((name, "graph_key", v.graph_key()))
        elif _plain(v):
            key.append((name, "value", v))
        else:
            raise TypeError(
                f"GraphedForward: argument {name} must be a tensor, a StaticKVCache or a plain "
                f"value (None, bool, int, float, str, a tuple of them), got {type(v).__name__}"
            )
    return tuple(key)


def _plain(v) -> bool:
    """Values a graph may bake in as constants. Any other object (a plain KVCache, a list)
    could change between replays without the signature seeing it."""
    if isinstance(v, tuple):
        return all(map(_plain, v))
    return v is None or isinstance(v, (bool, int, float, str, torch.dtype, torch.device))


def _global_state(device_type: str) -> tuple:
    """What changes the kernels a forward launches without being an argument."""
    import dlm_kernels.dispatch

    autocast = torch.is_autocast_enabled(device_type)
    return (
        autocast,
        torch.get_autocast_dtype(device_type) if autocast else None,
        dlm_kernels.dispatch.current_impl(),
        _tf32(),
    )


def _tf32() -> tuple:
    # torch >= 2.9 has fp32_precision; reading allow_tf32 raises once a user set the new API.
    m, c = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(m, "fp32_precision"):
        return (m.fp32_precision, getattr(c, "fp32_precision", None))
    return (m.allow_tf32, c.allow_tf32)


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
