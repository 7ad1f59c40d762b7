"""Generation for masked diffusion LMs: LLaDA's and Dream's samplers in one loop, batched.

    x = generate(model, prompt, attention_mask, gen_length=128, steps=64, block_length=32,
                 alg="low_confidence", mask_id=126336)

The loop is built from small pure functions (the model call, Dream's logit shift, guidance, the
per-step commit counts of each schedule, the stopping rule); every commit goes through the fused
op ``dlm_kernels.unmask_step`` (filter, draw, score, select, commit in one call).

Batches. Prompts of different lengths are left-padded and described by ``attention_mask``. Each
row's output equals generating that prompt alone with the same seed:
  * the model sees each row's real tokens at the positions it would see alone (position ids
    restart at the first real token when the model takes ``position_ids``) and never a pad key;
  * every random draw is keyed by (seed, the row's own step count, the position counted from the
    row's first real token): unmask_step's per-row seed, offset and left_pad, one call per step;
  * schedules count each row's own masked tokens (Dream counts the batch mean).
This holds exactly up to floating-point differences of batched versus single matmuls, which only
matter at ties.

Less model work, same tokens. A model whose forward takes ``output_range=`` (DiffusionLM) is
asked only for the window a step draws from (the block, from its first candidate; one position
earlier under Dream's shift): its last layer runs for those rows only. The op gets that window
with ``left_pad = pad - w0`` (negative once the window starts after the padding), so every draw
is keyed by its position in the row, whatever the window: the tokens are the whole sequence's.

KV caching (Fast-dLLM). ``kv_cache="prefix"``: at the start of each block one full forward fills
a cache of every layer's keys and values; the block's later steps recompute only the block and
what follows it, attending to the cached prefix. ``"dual"`` recomputes only the block and reads
both the prefix and the suffix from the cache. Both are approximations (the cached keys of a
bidirectional model depend on tokens committed since the block started); with one layer they
are exact. The model must accept ``kv_cache=`` (see ``KVCache`` for the protocol; DiffusionLM does).
On a random 4-layer model about 30% of the tokens match the uncached output (its predictions
flip with any change of context); Fast-dLLM reports near-identical accuracy on trained models.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

import dlm_kernels
from dlm.cuda_graph import CudaGraphBackend, GraphedForward, graphed_forward

# alg -> the op's confidence mode (None: ancestral, no confidence).
ALGS: dict[str, str | None] = {
    "ancestral": None,
    "origin": None,  # Dream's name for the ancestral algorithm
    "maskgit_plus": "prob",
    "topk_margin": "margin",
    "entropy": "neg_entropy",
    "low_confidence": "raw_prob",
    "random": "random",
}
SCHEDULES = ("even", "dream")
KV_CACHES = (None, "prefix", "dual")


# ---------------------------------------------------------------------------------------------
# The model call
# ---------------------------------------------------------------------------------------------
class KVCache:
    """Every layer's keys and values for the whole sequence (Fast-dLLM's prefix / dual cache).

    Protocol with the model: the sampler sets ``start`` and calls
    ``model(input_ids, attention_mask=keys_mask, position_ids=ids_positions, kv_cache=cache)``
    where input_ids (B, n) are the tokens at positions [start, start + n). In each attention
    layer the model calls ``k_all, v_all = cache.update(layer_index, k, v)`` with its new keys
    and values (B, n, Hkv, D) and attends with its n queries to all of k_all, v_all
    (B, S, Hkv, D), masked by attention_mask (B, S) when given. The first call (start = 0, the
    whole sequence) allocates; later calls overwrite positions [start, start + n) in place.
    """

    def __init__(self) -> None:
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}
        self.start = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        n = k.shape[1]
        if layer not in self.keys or (self.start == 0 and n >= self.keys[layer].shape[1]):
            if self.start != 0:
                raise RuntimeError("KVCache: the first forward must cover the whole sequence")
            self.keys[layer], self.values[layer] = k, v
            return k, v
        kc, vc = self.keys[layer], self.values[layer]
        kc[:, self.start : self.start + n] = k
        vc[:, self.start : self.start + n] = v
        return kc, vc


class StaticKVCache(KVCache):
    """A KVCache whose buffers never move, for forwards replayed from CUDA graphs: a whole-
    sequence forward copies its keys and values into buffers allocated at its first call
    (outside any capture: the warm-up runs first), instead of keeping the forward's own
    tensors, which live in the graphs' memory pool. ``graph_key`` (a number never reused,
    and ``start``) is part of a graph's signature: a graph bakes in the buffers' addresses and
    the slice it writes. One per batch shape, device and autocast state, kept by the
    GraphedForward (``static_cache``)."""

    _uids = itertools.count()

    def __init__(self) -> None:
        super().__init__()
        self.uid = next(self._uids)  # never reused, unlike id()

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        kc = self.keys.get(layer)
        if self.start == 0 and (kc is None or k.shape[1] >= kc.shape[1]):
            if kc is None:
                if k.is_cuda and torch.cuda.is_current_stream_capturing():
                    raise RuntimeError("StaticKVCache: buffers must exist before a capture "
                                       "(run the forward once first)")  # fmt: skip
                with torch.inference_mode(False):  # ordinary tensors, writable in any mode
                    self.keys[layer] = torch.empty(k.shape, dtype=k.dtype, device=k.device)
                    self.values[layer] = torch.empty(v.shape, dtype=v.dtype, device=v.device)
            elif kc.shape != k.shape or kc.dtype != k.dtype:
                # Graphs may hold these buffers' addresses: never reallocate them.
                raise RuntimeError(f"StaticKVCache: layer {layer}'s keys are {tuple(kc.shape)} "
                                   f"{kc.dtype}, got {tuple(k.shape)} {k.dtype}; use one cache "
                                   "per batch shape and dtype")  # fmt: skip
            self.keys[layer].copy_(k)
            self.values[layer].copy_(v)
            return self.keys[layer], self.values[layer]
        return super().update(layer, k, v)

    def graph_key(self) -> tuple:
        return (self.uid, self.start)


def _accepts(model, name: str) -> bool:
    fn = model.forward if isinstance(model, torch.nn.Module) else model
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def time_input(model, time_of=None):
    """For a time-conditioned model, the map (masked fraction -> t) to feed it; else None.

    The fraction is over the row's real tokens (prompt included), as dlm train noises whole
    sequences. A model needs t when its forward takes ``t`` and it is time-conditioned
    (``model.cfg.time_conditioning``, as DiffusionLM) or carries a ``time_of`` map
    (dlm.trainer.load_model attaches its objective's ``time_of``: the inverse of the training
    schedule's masking probability). Without a map, the linear schedule's: t = fraction.
    """
    if not _accepts(model, "t"):
        return None
    time_of = time_of or getattr(model, "time_of", None)
    conditioned = bool(getattr(getattr(model, "cfg", None), "time_conditioning", False))
    if time_of is None and not conditioned:
        return None
    return time_of or (lambda f: f)


def call_model(model, input_ids: Tensor, **kwargs) -> Tensor:
    """model(input_ids, **kwargs) as float logits (B, n, V).

    The model may return the logits tensor, an object with ``.logits``, a mapping with a
    ``"logits"`` key (a Hugging Face ModelOutput is both) or a tuple / list whose first item is
    the logits. Anything else is a TypeError naming what came back.
    """
    out = model(input_ids, **kwargs)
    if isinstance(out, Mapping):
        logits = out.get("logits")
    else:
        logits = getattr(out, "logits", out)
    if isinstance(logits, (tuple, list)) and logits:
        logits = logits[0]
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        got = f"{logits.dtype} tensor" if isinstance(logits, Tensor) else type(out).__name__
        if isinstance(out, Mapping) and "logits" not in out:
            got += f" without a 'logits' key (keys {sorted(map(str, out))[:6]})"
        raise TypeError(f"the model returned {got}; expected float logits (B, S, V): a tensor, "
                        "an object with .logits, a dict with 'logits' or a tuple whose first "
                        "item is the logits")  # fmt: skip
    return logits


def model_vocab_size(model) -> int | None:
    """The number of token ids the model embeds, when it says so before any forward: its input
    embedding's rows (``get_input_embeddings()``, DiffusionLM's ``tok_emb``), else
    ``config.vocab_size`` / ``cfg.vocab_size``; None when it tells nothing (a plain callable)."""
    emb = None
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            emb = None
    if emb is None:
        emb = getattr(model, "tok_emb", None)
    if isinstance(emb, torch.nn.Embedding):
        return emb.num_embeddings
    for owner in (getattr(model, "config", None), getattr(model, "cfg", None)):
        v = getattr(owner, "vocab_size", None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def check_token_id(who: str, name: str, value: int, vocab: int | None) -> None:
    """ValueError unless 0 <= value < vocab (vocab None: only the sign can be checked)."""
    if value < 0:
        raise ValueError(f"{who}: {name} must be >= 0, got {value}")
    if vocab is not None and value >= vocab:
        raise ValueError(f"{who}: {name} {value} must be < the model's vocabulary size {vocab}")


def shift_logits(logits: Tensor) -> Tensor:
    """Dream's shift: position i is predicted by the output at i - 1 (position 0 keeps its own)."""
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def guide(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance as LLaDA: u + (w + 1) (c - u)."""
    return uncond + (scale + 1.0) * (cond - uncond)


# ---------------------------------------------------------------------------------------------
# Schedules: how many positions each row commits at each step
# ---------------------------------------------------------------------------------------------
def even_counts(n: Tensor, steps: int) -> Tensor:
    """LLaDA: n (B,) masked tokens split over ``steps``, the remainder to the first steps.

    Returns (B, steps) int64 summing to n per row.
    """
    n = n.to(torch.int64)[:, None]
    i = torch.arange(steps, device=n.device)[None, :]
    return n // steps + (i < n % steps).to(torch.int64)


def dream_timesteps(steps: int, eps: float, device) -> Tensor:
    """Dream's timesteps linspace(1, eps, steps + 1), float32 on ``device`` as Dream makes them."""
    return torch.linspace(1, eps, steps + 1, device=device)


def dream_count(n: Tensor, t: Tensor, s: Tensor, last: bool) -> Tensor:
    """Dream: k = floor(n (1 - s / t)) (all n at the last step), per row, float32 as Dream."""
    if last:
        return n.to(torch.int64)
    return (n.to(torch.float32) * (1 - s / t)).to(torch.int64)


def ancestral_theta(steps: int, i: int, schedule: str, eps: float) -> float:
    """P(a masked token commits at step i): 1 - s/t on the schedule's grid, 1 at the last step."""
    if i == steps - 1:
        return 1.0
    if schedule == "dream":
        ts = dream_timesteps(steps, eps, "cpu")
        return float(1 - ts[i + 1] / ts[i])
    return 1.0 / (steps - i)  # t = 1 - i/steps, s = 1 - (i+1)/steps


def eos_finished(x: Tensor, masked: Tensor, gen_start: int, eos_id: int) -> Tensor:
    """Rows whose first generated EOS has no mask before it: (B,) bool."""
    L = x.shape[1]
    pos = torch.arange(L, device=x.device)[None, :]
    is_eos = (x == eos_id) & (pos >= gen_start)
    before = is_eos.to(torch.int64).cumsum(1) == 0
    return is_eos.any(1) & ~(masked & before).any(1)


def fill_after_eos(x: Tensor, masked: Tensor, rows: Tensor, gen_start: int, eos_id: int) -> Tensor:
    """In ``rows`` (B,) bool, every mask after the first generated EOS becomes EOS."""
    pos = torch.arange(x.shape[1], device=x.device)[None, :]
    is_eos = (x == eos_id) & (pos >= gen_start)
    after = is_eos.to(torch.int64).cumsum(1) > 0
    return torch.where(rows[:, None] & masked & after, torch.full_like(x, eos_id), x)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
@dataclass
class _Step:
    """What one step asks of the op, per row (B,) tensors or scalars."""

    num_transfer: Tensor | None = None
    theta: float | None = None


CommitFn = Callable[..., tuple[Tensor, Tensor]]


def _as_int(v):
    """v as a Python int when it is an integer of another kind (numpy's, a 0-d int tensor, as
    tokenizers return them); anything else unchanged, for _check_args to name."""
    if (
        isinstance(v, Tensor)
        and v.dim() == 0
        and not v.is_floating_point()
        and v.dtype != torch.bool
    ):
        return int(v)
    n = dlm_kernels.dispatch.as_int(v)  # the ops' rule: numpy ints pass, bools do not
    return v if n is None else n


def _check_args(prompt, attention_mask, gen_length, steps, block_length, alg, schedule, kv_cache,
                mask_id, threshold, factor, stop_at_eos, eos_id, cfg_scale, alg_temp,
                eps):  # fmt: skip
    if not isinstance(prompt, Tensor) or prompt.dim() != 2 or prompt.dtype != torch.int64:
        got = f"{prompt.dtype} {tuple(prompt.shape)}" if isinstance(prompt, Tensor) else prompt
        raise TypeError(f"generate: prompt must be a (B, P) int64 tensor, got {got}")
    if attention_mask is not None and (
        not isinstance(attention_mask, Tensor) or attention_mask.shape != prompt.shape
    ):
        raise ValueError(f"generate: attention_mask must be a {tuple(prompt.shape)} tensor")
    if isinstance(mask_id, bool) or not isinstance(mask_id, int):
        raise TypeError(f"generate: mask_id must be an int, got {mask_id!r}")
    check_token_id("generate", "mask_id", mask_id, None)  # the vocabulary: in _loop
    if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, int)):
        raise TypeError(f"generate: eos_id must be an int or None, got {eos_id!r}")
    for name, v, lo in (("gen_length", gen_length, 0), ("steps", steps, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"generate: {name} must be an int >= {lo}, got {v!r}")
    if block_length is not None and (not isinstance(block_length, int) or block_length < 1):
        raise ValueError(f"generate: block_length must be an int >= 1, got {block_length!r}")
    if block_length is not None and gen_length % block_length:
        raise ValueError(f"generate: gen_length {gen_length} must be a multiple of block_length "
                         f"{block_length}")  # fmt: skip
    if alg not in ALGS:
        raise ValueError(f"generate: alg must be one of {tuple(ALGS)}, got {alg!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"generate: schedule must be one of {SCHEDULES}, got {schedule!r}")
    if kv_cache not in KV_CACHES:
        raise ValueError(f"generate: kv_cache must be one of {KV_CACHES}, got {kv_cache!r}")
    if threshold is not None and factor is not None:
        raise ValueError("generate: give threshold or factor, not both")
    if (threshold is not None or factor is not None) and ALGS[alg] is None:
        raise ValueError(f"generate: threshold / factor need a confidence alg, not {alg!r}")
    if alg_temp:
        # alg_temp changes *which* positions a fixed-count step commits (num_transfer of them
        # drawn from softmax(confidence / alg_temp) instead of the top ones); threshold and
        # factor commit every position past a cut and ancestral has no confidence to soften.
        if threshold is not None or factor is not None:
            rule = "threshold" if threshold is not None else "factor"
            raise ValueError(f"generate: alg_temp={alg_temp} has no effect with {rule}= (it "
                             "samples the positions of a fixed-count step; the rule commits "
                             "every position past its cut): drop one of them")  # fmt: skip
        if ALGS[alg] is None:
            raise ValueError(f"generate: alg_temp={alg_temp} has no effect with alg={alg!r} "
                             "(each mask commits independently with probability theta; "
                             "alg_temp needs a confidence alg)")  # fmt: skip
    if schedule == "dream" and not (isinstance(eps, (int, float)) and 0 <= eps < 1):
        raise ValueError(f"generate: eps (Dream's final time) must lie in [0, 1), got {eps!r}")
    if stop_at_eos and eos_id is None:
        raise ValueError("generate: stop_at_eos=True needs eos_id")
    if not cfg_scale >= 0:  # NaN too: it would turn guidance off without a word
        raise ValueError(f"generate: cfg_scale must be >= 0, got {cfg_scale}")


def generate(
    model,
    prompt: Tensor,
    attention_mask: Tensor | None = None,
    *,
    gen_length: int = 128,
    steps: int = 128,
    block_length: int | None = None,
    alg: str = "low_confidence",
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    alg_temp: float | None = None,
    threshold: float | None = None,
    factor: float | None = None,
    cfg_scale: float = 0.0,
    mask_id: int,
    eos_id: int | None = None,
    stop_at_eos: bool = False,
    logits_shift: bool = False,
    schedule: str = "even",
    eps: float = 1e-3,
    kv_cache: str | None = None,
    output_history: bool = False,
    generator: torch.Generator | None = None,
    seed: int | list[int] | None = None,
    fused_head: bool | None = None,
    cuda_graph: bool | GraphedForward = False,
) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Fill ``gen_length`` masks after each prompt (and any mask inside it) with the model.

    Args:
        model: ``model(input_ids (B, S) int64, attention_mask=None)`` returning float logits
            (B, S, V), an object with ``.logits``, a dict with ``"logits"`` or a tuple whose
            first item is the logits (DiffusionLM, a Hugging Face model, any callable).
            When its forward names ``position_ids`` it gets them for padded batches.
        prompt: (B, P) int64, left-padded when rows differ in length. Mask tokens inside it
            are generated too (infilling).
        attention_mask: (B, P) bool/int, True/1 at real tokens (left padding only). None: all real.
        gen_length: masks appended to each prompt (>= 0).
        steps: denoising steps in total, split evenly over the blocks (a multiple of their
            number). Ignored by threshold / factor, which run each block until it is filled.
        block_length: semi-autoregressive block size dividing gen_length (None: one block).
        alg: "low_confidence" / "random" (LLaDA), "maskgit_plus" / "topk_margin" / "entropy"
            (Dream), "ancestral" or its Dream name "origin" (each mask commits with prob theta).
        temperature, top_k, top_p, min_p: token filters and temperature (0: argmax).
        alg_temp: > 0 draws the committed positions from softmax(confidence / alg_temp)
            (a fixed-count step of a confidence alg: a ValueError with threshold, factor or
            ancestral / origin, where it would have no effect).
        threshold: Fast-dLLM: commit every candidate with confidence >= threshold (>= 1/step).
        factor: Fast-dLLM's factor rule (see dlm_kernels.unmask_step).
        cfg_scale: classifier-free guidance weight w (0: off); the unconditional pass masks the
            prompt; logits u + (w + 1)(c - u).
        mask_id: the mask token id, in [0, V): a ValueError otherwise, before the first
            forward when the model tells its vocabulary (input embedding or config), else at
            the first logits. eos_id: the end token (for stop_at_eos), also in [0, V).
        stop_at_eos: a row whose first generated EOS has no mask before it is finished: the
            masks after it become EOS and the row stops costing forwards.
        logits_shift: Dream's shifted logits (position i predicted by the output at i - 1,
            position 0 by its own). The shift runs on the padded rows, as in Dream: an infill
            mask at a left-padded row's first real token is predicted by the pad slot before
            it, whereas that prompt alone predicts it from its own output, so in that case
            the row differs from the prompt generated alone (Dream's code has the same quirk);
            so does the first generated token of a row whose prompt is empty in a padded
            batch (its first real position). Masks anywhere else, and rows without padding,
            are unaffected.
        schedule: "even" (LLaDA: each block's masked count split evenly over its steps) or
            "dream" (timesteps linspace(1, eps, steps + 1), k = floor(n (1 - s/t))).
        eps: Dream's final time, in [0, 1).
        kv_cache: None, "prefix" or "dual" (Fast-dLLM); needs a model taking ``kv_cache=``
            (DiffusionLM does); not with masks inside the prompt.
        output_history: also return the list of x after every step that ran (a step where
            no row has a masked candidate left is skipped, e.g. steps > gen_length).
        generator, seed: randomness; one Philox seed for the whole call, drawn from
            ``generator`` (CPU) or torch's global RNG when ``seed`` is None, or a list of B
            seeds, one per row. Rows with the same prompt and seed give the same output (that
            is what makes a row independent of its batch): give per-row seeds for distinct
            samples of one prompt.
        fused_head: run the LM head only for the positions a step draws (the current block's
            masks), through ``dlm_kernels.fused_head_unmask_step``, never building (B, L, V)
            logits. Needs a model with an ``lm_head`` linear layer whose forward takes
            ``return_hidden=True`` (DiffusionLM, hence Dream and LLaDA checkpoints loaded by
            dlm). None (default): whenever the model allows it and its vocabulary has at
            least 4096 tokens (below, the head costs less than the op's gathers: at V 67 on the
            CPU the logits path is the faster one); the compat wrappers, which call the model
            through their own forward, never use it. The tokens are those of the logits path up
            to rounding (a GEMM over fewer rows; guidance applied to the hidden states, the
            same map since the head is linear), which matters only at near-ties.
        cuda_graph: replay the model's forward from CUDA graphs, one captured per window shape
            (``dlm.cuda_graph``): a forward becomes one launch instead of a few hundred, for
            models small enough that launching kernels is what a step waits on. CUDA tensors,
            a model in eval mode. With kv_cache, the cache lives in fixed buffers kept with the
            graphs (``StaticKVCache``). The graphs are kept with the model for later
            calls of the same shapes; a signature whose capture fails warns and runs eagerly.
            Every forward then runs the whole batch (no rerun of only the rows that changed).
            A GraphedForward instance: use (and keep) those graphs. Off by default: not yet
            timed on a GPU.

    Returns:
        (B, P + gen_length) int64 sequences; with output_history, (sequences, [x after each step]).
        The loop runs under ``torch.inference_mode``; what it returns are ordinary tensors.

    Example:
        >>> x = generate(model, prompt, mask_id=mask, gen_length=64, steps=32, block_length=16)
        >>> x = generate(model, ids, am, mask_id=mask, alg="entropy", logits_shift=True,
        ...              schedule="dream", temperature=0.2, top_p=0.95, seed=0)
    """
    return _generate(**locals())


def _generate(*args, **kwargs):
    """The loop behind ``generate`` (see ``_loop`` for the hooks the compat wrappers use).

    It runs under inference mode, which skips autograd's per-tensor bookkeeping (version
    counters, views): on a small model the loop's own ops cost about as much as the forward,
    and that bookkeeping is a fair part of them. The results are cloned on the way out so that
    callers get ordinary tensors (an inference tensor cannot be edited in place, nor saved for
    backward, outside inference mode).
    """
    with torch.inference_mode():
        out = _loop(*args, **kwargs)
    if torch.is_inference_mode_enabled():  # the caller's own inference mode: nothing to undo
        return out
    if isinstance(out, tuple):  # output_history
        x, history = out
        return x.clone(), [h.clone() for h in history]
    return out.clone()


def _loop(
    model, prompt, attention_mask=None, *, gen_length=128, steps=128, block_length=None,
    alg="low_confidence", temperature=0.0, top_k=None, top_p=None, min_p=None, alg_temp=None,
    threshold=None, factor=None, cfg_scale=0.0, mask_id, eos_id=None, stop_at_eos=False,
    logits_shift=False, schedule="even", eps=1e-3, kv_cache=None, output_history=False,
    generator=None, seed=None, forward_fn=None, logits_hook=None, tokens_hook=None,
    commit_fn=None, position_ids=True, counter=None, ban_mask=True, block_counts_only=False,
    fused_head=None, ban_tokens=(), every_step=False, cuda_graph=False,
):  # fmt: skip
    """The loop behind ``generate``, with the hooks the compat wrappers need (run it through
    ``_generate``, which sets inference mode):
    forward_fn(x, attention_mask (B, S) bool | None, position_ids | None[, t=]) -> logits
    replaces the model call (t, a (B,) float tensor, is passed when the model is
    time-conditioned, see ``time_input``); logits_hook(step, x, logits) and tokens_hook(step, x,
    logits) edit the logits / x (Dream's generation_*_hook_func); commit_fn(x, logits, cand,
    step, rows) replaces the commit rule; position_ids=False never passes position ids; counter
    (a list) gets one entry per model forward (the number of rows run); ban_mask=False lets the
    mask token be drawn (LLaDA and Dream do not forbid it); block_counts_only=True counts only
    the block's own masks for the even schedule, as LLaDA does (ours counts every candidate, so
    masks left before the block - prompt masks, a drawn mask token - are filled too);
    ban_tokens: token ids whose logits are set to -inf after guidance and the shift (LLaDA's
    logits_eos_inf: banning them in the conditional and unconditional passes instead would give
    -inf - -inf = NaN; logits path only); every_step=True runs every one of the steps even when
    no row has a candidate left (commit_fn, hooks and history every step, as LLaDA and Dream do;
    the prediction is still reused when x did not change and there is no hook), where the
    default skips such steps.

    With a logits_hook or tokens_hook every step runs a fresh forward of that step's x for the
    whole batch (no reuse), as Dream does: a hook editing the logits in place never sees its
    own earlier edits, and the tokens hook gets that step's prediction of every row."""
    mask_id, eos_id, steps, gen_length, block_length = map(
        _as_int, (mask_id, eos_id, steps, gen_length, block_length)
    )
    _check_args(prompt, attention_mask, gen_length, steps, block_length, alg, schedule, kv_cache,
                mask_id, threshold, factor, stop_at_eos, eos_id, cfg_scale, alg_temp,
                eps)  # fmt: skip
    # The mask must be a token the model embeds: checked here when the model says its
    # vocabulary (embedding or config), else against the first logits' last dimension.
    vocab = model_vocab_size(model)
    for name, v in (("mask_id", mask_id), ("eos_id", eos_id)):
        if v is not None:
            check_token_id("generate", name, v, vocab)
    if vocab is not None and prompt.numel():  # else an IndexError deep in the embedding
        lo, hi = (int(v) for v in torch.aminmax(prompt))  # one read on a GPU, once per call
        if lo < 0 or hi >= vocab:
            raise ValueError(f"generate: prompt holds token id {lo if lo < 0 else hi}, outside "
                             f"the model's vocabulary [0, {vocab})")  # fmt: skip
    dev = prompt.device
    B, P = prompt.shape
    L = P + gen_length
    conf_mode = ALGS[alg]
    if seed is None:
        seed = int(torch.randint(0, 2**62, (), generator=generator, dtype=torch.int64))
    if isinstance(seed, Tensor) and seed.dim() == 0:
        seed = _as_int(seed)
    if isinstance(seed, (list, tuple, Tensor)):
        seeds = [_as_int(v) for v in (seed.tolist() if isinstance(seed, Tensor) else seed)]
    else:
        seeds = [_as_int(seed)] * B
    if any(isinstance(v, bool) or not isinstance(v, int) for v in seeds):
        raise TypeError(f"generate: seed must be an int or a list of {B} ints, got {seed!r}")
    if len(seeds) != B:
        raise ValueError(f"generate: seed must be an int or a list of {B} ints, got {len(seeds)}")
    if any(not 0 <= v < 2**63 for v in seeds):
        raise ValueError(f"generate: seeds must lie in [0, 2**63), got {seeds}")

    # Padding, positions and the per-row start of real tokens (one host read, before the loop).
    am = am_fwd = None
    pad = [0] * B
    if attention_mask is not None:
        real = attention_mask.to(dev).bool()
        n_pad = (~real).sum(1)
        if bool((real != (torch.arange(P, device=dev)[None, :] >= n_pad[:, None])).any()):
            raise ValueError("generate: attention_mask must be left padding (zeros, then ones)")
        pad = n_pad.tolist()
        if any(pad) or forward_fn is not None:
            # A mask with no padding is dropped for the model (the unmasked attention path is
            # faster); a forward_fn (the compat wrappers) sees it as its original caller would.
            am = torch.cat([real, torch.ones(B, gen_length, dtype=torch.bool, device=dev)], 1)
            if forward_fn is not None:
                src = attention_mask.to(dev)
                am_fwd = torch.cat([src, torch.ones(B, gen_length, dtype=src.dtype, device=dev)], 1)
    pos_ids = None
    if am is not None and position_ids and forward_fn is None and _accepts(model, "position_ids"):
        pos_ids = (am.to(torch.int64).cumsum(1) - 1).clamp_min(0)
    if pos_ids is None and kv_cache is not None and _accepts(model, "position_ids"):
        # A cached forward runs a slice of the sequence: tell the model where it sits.
        pos_ids = torch.arange(L, device=dev).expand(B, L)
    real_pos = am if am is not None else torch.ones(B, L, dtype=torch.bool, device=dev)

    x = torch.cat([prompt, torch.full((B, gen_length), mask_id, dtype=torch.int64, device=dev)], 1)
    if kv_cache is not None:
        if forward_fn is not None or not _accepts(model, "kv_cache"):
            raise ValueError("generate: kv_cache needs a model whose forward takes kv_cache= "
                             "(see dlm.sampler.KVCache)")  # fmt: skip
        if bool(((prompt == mask_id) & real_pos[:, :P]).any()):
            raise ValueError("generate: kv_cache cannot infill masks inside the prompt")
    t_of = time_input(model)
    if ban_tokens and fused_head:
        raise ValueError("generate: ban_tokens needs the logits path (fused_head=False)")
    head = _fused_head(model, False if ban_tokens else fused_head, forward_fn, logits_hook,
                       tokens_hook, commit_fn)  # fmt: skip
    graphs = _graphs(model, cuda_graph, forward_fn, dev)
    if t_of is not None:
        # A time-conditioned model sees t of the masked fraction of the row's real tokens,
        # prompt included: dlm train masks whole sequences (no SFT prompt mask), so that is
        # the fraction its t stood for.
        n_real = real_pos.sum(1).clamp_min(1).to(torch.float64)
    uncond_src = None
    if cfg_scale > 0:
        # LLaDA: the unconditional pass sees every prompt token (all that is not a mask at the
        # start) replaced by the mask.
        uncond_src = (x != mask_id) & (torch.arange(L, device=dev)[None, :] < P)
    if tokens_hook is not None:
        x = tokens_hook(None, x, None)

    checked: list[bool] = []  # the first logits' vocabulary was checked
    # A model taking output_range= (DiffusionLM) runs its last layer only for the positions
    # whose logits the step reads (the block), not the whole input.
    ranged = forward_fn is None and _accepts(model, "output_range")

    def forward(rows: list[int] | None, q0: int = 0, q1: int = L, cache=None,
                keep: tuple[int, int] | None = None) -> Tensor:  # fmt: skip
        """Logits (n_rows, k1 - k0, V) of x[rows] at positions keep = [k0, k1) (default the
        input [q0, q1)), guided and shifted, from a forward of the input positions [q0, q1)."""
        k0, k1 = (q0, q1) if keep is None else keep
        # Dream's shift reads position i from the output at i - 1 (position 0 its own).
        o0 = max(k0 - 1, q0) if logits_shift else k0
        out_range = None
        if ranged and (o0, k1) != (q0, q1):
            out_range = (o0 - q0, k1 - q0)
        base = o0 if out_range is not None else q0
        xs = x if rows is None else x[rows]
        t_in = None
        if t_of is not None:
            rp = real_pos if rows is None else real_pos[rows]
            nr = n_real if rows is None else n_real[rows]

            def t_in_of(inp):  # the t of an input's masked fraction (its real positions)
                return t_of(((inp == mask_id) & rp).sum(1).to(torch.float64) / nr).float()

            t_in = t_in_of(xs)
        am_ = am_fwd if forward_fn is not None else am
        ams = am_ if (am_ is None or rows is None) else am_[rows]
        ps = pos_ids if (pos_ids is None or rows is None) else pos_ids[rows]
        if uncond_src is not None:
            us = uncond_src if rows is None else uncond_src[rows]
            un = torch.where(us, torch.full_like(xs, mask_id), xs)
            # The unconditional input has its prompt masked too: its own, larger fraction.
            t_in = None if t_in is None else torch.cat([t_in, t_in_of(un)], 0)
            xs = torch.cat([xs, un], 0)
            ams = None if ams is None else torch.cat([ams, ams], 0)
            ps = None if ps is None else torch.cat([ps, ps], 0)
        if counter is not None:
            counter.append(xs.shape[0])
        if forward_fn is not None:
            logits = forward_fn(xs, ams, ps) if t_in is None else forward_fn(xs, ams, ps, t=t_in)
        else:
            kw = {"attention_mask": ams}
            if ps is not None:
                kw["position_ids"] = ps[:, q0:q1]
            if cache is not None:
                cache.start = q0
                kw["kv_cache"] = cache
            if t_in is not None:
                kw["t"] = t_in
            # With the fused head: hidden states, guided and shifted as logits would be (the
            # head is linear, so guiding h guides the logits); the op runs the head and the ban.
            if head is not None:
                kw["return_hidden"] = True
            if out_range is not None:
                kw["output_range"] = out_range
            if graphs is not None:
                logits = graphs.run(xs[:, q0:q1], **kw)  # parameters checked in _graphs
            else:
                logits = call_model(model, xs[:, q0:q1], **kw)
        if uncond_src is not None:
            c, u = logits.chunk(2, dim=0)
            logits = guide(c, u, cfg_scale)
        if logits_shift:
            logits = shift_logits(logits)
        if (k0, k1) != (base, base + logits.shape[1]):
            logits = logits[:, k0 - base : k1 - base]
        if head is None and not checked:  # shapes only: no host sync
            for name, v in (("mask_id", mask_id), ("eos_id", eos_id)):
                if v is not None and vocab is None:
                    check_token_id("generate", name, v, logits.shape[-1])
            for v in ban_tokens:
                check_token_id("generate", "banned token id", v, logits.shape[-1])
            checked.append(True)
        if head is None and ban_tokens:
            logits[..., list(ban_tokens)] = float("-inf")
        if head is None and ban_mask and 0 <= mask_id < logits.shape[-1]:
            # Never draw the mask itself: a committed mask would stay masked forever.
            logits[..., mask_id] = float("-inf")
        return logits

    # Blocks in padded coordinates. gen_length = 0: one block that only infills the prompt.
    bl = gen_length if block_length is None else block_length
    n_blocks = max(1, gen_length // bl) if bl else 1
    parallel = threshold is not None or factor is not None
    if not parallel and steps % n_blocks:
        raise ValueError(f"generate: steps {steps} must be a multiple of the number of blocks "
                         f"{n_blocks}")  # fmt: skip
    spb = steps // n_blocks
    random_draws = (
        (isinstance(temperature, Tensor) or temperature > 0)
        or conf_mode in (None, "random")
        or bool(alg_temp)
    )
    pos = torch.arange(L, device=dev)[None, :]
    history: list[Tensor] = []
    # Random draws are keyed per row (seed, the row's own step count, the position from its
    # first real token), so that one call of the op serves the whole batch.
    seeds_t = torch.tensor(seeds, dtype=torch.int64, device=dev)
    row_steps = torch.zeros(B, dtype=torch.int64, device=dev)  # the Philox offset of each row
    pad_t = torch.tensor(pad, dtype=torch.int64, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    logits_all: Tensor | None = None  # (B, w1 - w0, V) last prediction (no cache), for reuse
    # Without a cache, a model taking output_range computes the block's window only, unless a
    # hook wants the whole sequence's logits; logits_all covers the window logits_win.
    window = kv_cache is None and ranged and logits_hook is None and tokens_hook is None
    win = logits_win = (0, L)
    stale = [True] * B
    pending = None  # (B,) bool: rows the last step changed, read with the next step's flags
    step = 0
    op_kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    step_op = dlm_kernels.unmask_step
    if head is not None:
        W, bias = head
        if vocab is None:  # the head's rows are the vocabulary the op draws from
            for name, v in (("mask_id", mask_id), ("eos_id", eos_id)):
                if v is not None:
                    check_token_id("generate", name, v, W.shape[0])
        if ban_mask and 0 <= mask_id < W.shape[0]:  # the logits path's ban, as a -inf bias
            ban = torch.zeros(W.shape[0], dtype=W.dtype, device=W.device)
            ban[mask_id] = float("-inf")
            bias = ban if bias is None else bias + ban
        step_op = functools.partial(dlm_kernels.fused_head_unmask_step, lm_head_weight=W,
                                    bias=bias)  # fmt: skip
    # The even schedule's counts as a Python int when every row has the same number of masks
    # in the block (same-length prompts): the op then skips building and range-checking a
    # per-row tensor. The counts reach the host with the block's first read (no extra sync).
    host_counts = (
        schedule == "even" and not parallel and conf_mode is not None and commit_fn is None
    )
    thetas = (
        [ancestral_theta(spb, i, schedule, eps) for i in range(spb)] if conf_mode is None else []
    )

    for blk in range(n_blocks):
        # (min: gen_length 0 with a block_length infills the prompt's masks in one block)
        s_blk, e_blk = P + blk * bl, min(P + (blk + 1) * bl, L)
        in_reach = (pos < e_blk) & real_pos
        cand0 = (x == mask_id) & in_reach
        if block_counts_only:
            cand0 = cand0 & (pos >= s_blk)
        n0 = cand0.sum(1)
        counts = even_counts(n0, spb) if (schedule == "even" and not parallel) else None
        ts = dream_timesteps(spb, eps, dev) if schedule == "dream" else None
        cache = None
        if kv_cache is not None:
            # Under graphs, one cache per batch shape kept with them: its buffers' addresses
            # are baked into the graphs. Each block's first forward rewrites all of it.
            rows = B * (2 if uncond_src is not None else 1)
            cache = KVCache() if graphs is None else graphs.static_cache((rows, L), dev)
        # Where this block's candidates may be; recomputed only when rows finish (stop_at_eos).
        reach = in_reach & ~done[:, None] if stop_at_eos else in_reach
        n_host = None  # the block's per-row counts on the host when they are all equal
        i = 0
        while True:
            cand = (x == mask_id) & reach
            # One host read per step: which rows still have candidates, which rows the previous
            # step changed (their cached prediction is stale) and, at a block's first step, its
            # per-row mask counts.
            has_t = cand.any(1)
            parts = [has_t]
            if pending is not None:
                parts.append(pending)
            if host_counts and i == 0:
                parts.append(n0)
            if window and i == 0:
                parts.append(torch.where(cand, pos, L).amin().expand(B))
            flags = torch.stack(parts).tolist() if len(parts) > 1 else [parts[0].tolist()]
            has = flags[0]
            if pending is not None:
                pending = None
                for b in range(B):
                    if flags[1][b]:
                        stale[b] = True
            if window and i == 0:
                # The block's window: from its first candidate (masks left in the prompt come
                # before the block) to its end. Candidates only shrink within a block.
                win = (min(flags.pop()[0], s_blk), e_blk)
                if win[0] >= win[1]:  # an empty block (gen_length 0, nothing left to infill)
                    win = (0, L)
            if host_counts and i == 0:
                n_host = flags[-1][0] if all(n == flags[-1][0] for n in flags[-1]) else None
            if (
                (parallel and not any(has))
                or (not parallel and i >= spb)
                or (stop_at_eos and bool(done.all()))
            ):
                break
            if not any(has) and not every_step:
                i += 1
                continue
            # --- logits ---------------------------------------------------------------------
            if kv_cache is None:
                need = [b for b in range(B) if has[b] and stale[b]]
                if (
                    logits_all is None
                    or len(need) == B
                    or logits_hook is not None
                    or tokens_hook is not None
                    or win != logits_win
                    or (graphs is not None and need)  # a graph per window shape: whole batch
                ):
                    # A logits hook gets fresh logits of this step's x every step (it may edit
                    # them in place: reusing them would compound its edits), and so does a
                    # tokens hook (Dream passes it that step's prediction for every row, also
                    # for rows with nothing masked, which the reuse would leave stale).
                    logits_all, logits_win = forward(None, keep=win), win
                    need = list(range(B))
                elif need:
                    logits_all[need] = forward(need, keep=win).to(logits_all.dtype)
                for b in need:
                    stale[b] = False
                (w0, w1), logits = win, logits_all
                if head is not None and w1 > e_blk:
                    # Nothing past the block is a candidate: the fused op gets [w0, e_blk) only
                    # (on CUDA it walks every row it is given, in fixed chunks).
                    w1, logits = e_blk, logits_all[:, : e_blk - w0]
            else:
                first = i == 0
                # (max: with an empty prompt the first block starts at 0, shifted or not)
                q0 = 0 if first else (max(s_blk - 1, 0) if logits_shift else s_blk)
                q1 = L if (first or kv_cache == "prefix") else e_blk
                hooked = logits_hook is not None or tokens_hook is not None
                if first or hooked or any(stale[b] and has[b] for b in range(B)):
                    logits_all = forward(None, q0, q1, cache, keep=(s_blk, e_blk))
                    stale = [False] * B
                w0, w1, logits = s_blk, e_blk, logits_all
            if logits_hook is not None:
                logits = logits_hook(step, x, logits)
            # --- what this step commits -----------------------------------------------------
            rule = _Step()
            if conf_mode is None:
                rule.theta = thetas[i]
            elif not parallel:
                if n_host is not None:  # even_counts of one row, on the host
                    rule.num_transfer = n_host // spb + int(i < n_host % spb)
                elif schedule == "even":
                    rule.num_transfer = counts[:, i]
                else:
                    rule.num_transfer = dream_count(cand.sum(1), ts[i], ts[i + 1], i == spb - 1)
            full = (w0, w1) == (0, L)
            xw, cw, lw = (x, cand, logits) if full else (x[:, w0:w1], cand[:, w0:w1], logits)
            if commit_fn is not None:
                xw_new, committed = commit_fn(xw, lw, cw, step, rule)
            elif not random_draws:
                xw_new, committed = _commit(xw, lw, cw, rule, conf_mode, threshold, factor,
                                            alg_temp, mask_id, seeds[0], 0, op_kw,
                                            step_op)  # fmt: skip
            else:
                # Keyed as if each row were generated alone: its seed, its own step count and
                # the position from its first real token in the window.
                xw_new, committed = _commit(xw, lw, cw, rule, conf_mode, threshold, factor,
                                            alg_temp, mask_id, seeds_t, row_steps, op_kw,
                                            step_op,
                                            left_pad=pad_t - w0)  # fmt: skip
            x = xw_new if full else torch.cat([x[:, :w0], xw_new, x[:, w1:]], 1)
            pending = committed.any(1)  # read with the next step's flags
            row_steps += has_t
            if stop_at_eos:
                # real_pos: padding that holds the mask id is not a mask before the EOS.
                masked = (x == mask_id) & real_pos
                fin = eos_finished(x, masked, P, eos_id) & ~done
                if bool(fin.any()):
                    x = fill_after_eos(x, masked, fin, P, eos_id)
                    done |= fin
                    reach = in_reach & ~done[:, None]
            if tokens_hook is not None:
                x = tokens_hook(step, x, logits)
                stale = [True] * B  # the hook may have changed anything
                pending = None
            if output_history:
                history.append(x.clone())
            step += 1
            i += 1
        if stop_at_eos and bool(done.all()):
            break
    return (x, history) if output_history else x


def _commit(xw, lw, cw, rule: _Step, conf_mode, threshold, factor, alg_temp, mask_id, seed, offset,
            op_kw, op, left_pad=None):  # fmt: skip
    """One call of the fused op on a window: (new x window, committed). op: unmask_step
    (lw logits) or fused_head_unmask_step with the head bound (lw hidden states)."""
    kw = dict(op_kw, mask_id=mask_id, candidates=cw, seed=seed, offset=offset & 0xFFFFFFFF,
              left_pad=left_pad)  # fmt: skip
    if rule.theta is not None:
        return op(xw, lw, ancestral=True, theta=rule.theta, **kw)
    kw["confidence"] = conf_mode
    if threshold is not None:
        return op(xw, lw, threshold=threshold, **kw)
    if factor is not None:
        return op(xw, lw, factor=factor, **kw)
    return op(xw, lw, num_transfer=rule.num_transfer, alg_temp=alg_temp, **kw)


def _graphs(model, want, forward_fn, dev) -> GraphedForward | None:
    """The GraphedForward the loop calls the model through, or None (cuda_graph=False)."""
    if want is False or want is None:
        return None
    if want is not True and not isinstance(want, GraphedForward):
        raise TypeError("generate: cuda_graph must be True, False or a dlm.cuda_graph."
                        f"GraphedForward, got {want!r}")  # fmt: skip
    if forward_fn is not None:
        raise ValueError("generate: cuda_graph does not combine with forward_fn")
    if isinstance(model, torch.nn.Module) and model.training:
        raise ValueError("generate: cuda_graph needs the model in eval mode (model.eval()): a "
                         "graph would replay the same dropout masks at every step")  # fmt: skip
    if want is True:
        want = graphed_forward(model)
    elif want.model is not model:
        raise ValueError("generate: cuda_graph is a GraphedForward of another model")
    if isinstance(want.backend, CudaGraphBackend) and dev.type != "cuda":
        raise ValueError(f"generate: cuda_graph needs CUDA tensors, got the prompt on {dev}")
    want.check_parameters()
    return want


def _fused_head(model, want, forward_fn, logits_hook, tokens_hook, commit_fn, who="generate"):
    """(weight, bias) of the model's LM head when the loop may run it itself, else None."""
    if want is not None and not isinstance(want, bool):
        raise TypeError(f"{who}: fused_head must be None, True or False, got {want!r}")
    if want is False:
        return None
    lm = getattr(model, "lm_head", None)
    able = isinstance(lm, torch.nn.Linear) and _accepts(model, "return_hidden")
    blockers = [name for name, on in (
        ("forward_fn", forward_fn is not None), ("logits_hook", logits_hook is not None),
        ("tokens_hook", tokens_hook is not None), ("commit_fn", commit_fn is not None),
    ) if on]  # fmt: skip
    if want and not able:
        raise ValueError(f"{who}: fused_head=True needs a model with an lm_head nn.Linear "
                         "whose forward takes return_hidden=")  # fmt: skip
    if want and blockers:
        raise ValueError(f"{who}: fused_head=True does not combine with {blockers[0]}")
    if not able or blockers or (want is None and lm.weight.shape[0] < _FUSED_HEAD_MIN_VOCAB):
        return None
    return lm.weight, lm.bias


# generate's fused_head=None uses the fused head from this vocabulary size up.
_FUSED_HEAD_MIN_VOCAB = 4096
