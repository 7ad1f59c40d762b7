"""Real checkpoints: load Dream and LLaDA weights (and our own) into ``DiffusionLM``.

    model = DiffusionLM.from_pretrained("Dream-v0-Base-7B/", dtype=torch.bfloat16, device="cuda")
    tok = load_tokenizer("Dream-v0-Base-7B/", model.cfg)        # tokenizer.json, or None
    model.save_pretrained("out/", tokenizer=tok, max_shard_size=2 << 30)

A checkpoint is a local directory with ``config.json`` and safetensors weights, either one
``model.safetensors`` or shards listed by ``model.safetensors.index.json``. Three formats:

* Dream (``model_type: "Dream"``, Qwen2 names): ``model.embed_tokens``,
  ``model.layers.N.self_attn.{q,k,v,o}_proj`` (q/k/v with biases), ``model.layers.N.mlp.
  {gate,up,down}_proj``, ``input_layernorm``, ``post_attention_layernorm``, ``model.norm``,
  ``lm_head`` (absent when ``tie_word_embeddings``). Its logits are shifted: position i is
  predicted by the output at i - 1, so ``cfg.logits_shift`` is set.
* LLaDA (``model_type: "llada"``, OLMo names): ``model.transformer.wte``,
  ``model.transformer.blocks.N.{attn_norm,ff_norm}``, and either the LLaMA block
  (``block_type: "llama"``: ``q_proj``, ``k_proj``, ``v_proj``, ``attn_out``, ``ff_proj`` = gate,
  ``up_proj``, ``ff_out`` = down) or OLMo's sequential block (``att_proj`` = q, k, v stacked;
  ``ff_proj`` = [up; gate] for SwiGLU), ``model.transformer.ln_f``, ``model.transformer.ff_out``
  (absent when ``weight_tying``).
* dlm (``model_type: "dlm"``): what ``save_pretrained`` writes, our own names and ModelConfig.

Loading builds the model on the meta device (no memory, no init) and then replaces each parameter
by the tensor read from its shard, converted to the requested dtype on the requested device: one
shard open at a time, one tensor in flight, so the weights are never held twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from collections import defaultdict

import torch
from torch import nn

from dlm.config import ModelConfig
from dlm.model import DiffusionLM

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# The published mask tokens, used when a config does not carry mask_token_id.
DREAM_MASK_ID = 151666
LLADA_MASK_ID = 126336
# Checkpoint tensors that hold no weights of ours (older transformers saved RoPE's table).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ---------------------------------------------------------------------------------------------
# configs: published config.json -> ModelConfig
# ---------------------------------------------------------------------------------------------
def _unsupported(kind: str, what: str) -> ValueError:
    return ValueError(f"{kind} checkpoint: {what} is not supported by DiffusionLM")


def _id(v, default: int = -1) -> int:
    if isinstance(v, (list, tuple)):  # some configs list several eos ids: keep the first
        v = v[0] if v else None
    return default if v is None else int(v)


def _rope_theta(c: dict, default: float) -> float:
    if "rope_theta" in c:
        return float(c["rope_theta"])
    params = c.get("rope_parameters") or {}  # transformers 5 writes the RoPE settings here
    return float(params.get("rope_theta", default))


def _dream_config(c: dict) -> ModelConfig:
    kind = "Dream"
    if c.get("hidden_act", "silu") != "silu":
        raise _unsupported(kind, f"hidden_act={c['hidden_act']!r} (only 'silu')")
    scaling = c.get("rope_scaling") or (c.get("rope_parameters") or {})
    if scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise _unsupported(kind, f"rope scaling {scaling!r}")
    if scaling.get("factor") not in (None, 1, 1.0):  # a factor without a type still scales
        raise _unsupported(kind, f"rope scaling {scaling!r}")
    if c.get("use_sliding_window", False):
        raise _unsupported(kind, "use_sliding_window=true")
    d, h = int(c["hidden_size"]), int(c["num_attention_heads"])
    if c.get("head_dim") not in (None, d // h):
        raise _unsupported(kind, f"head_dim={c['head_dim']} != hidden_size / heads = {d // h}")
    return ModelConfig(
        vocab_size=int(c["vocab_size"]),
        d_model=d,
        n_layers=int(c["num_hidden_layers"]),
        n_heads=h,
        n_kv_heads=int(c.get("num_key_value_heads") or h),
        d_ff=int(c["intermediate_size"]),
        max_seq_len=int(c.get("max_position_embeddings", 4096)),
        rope_theta=_rope_theta(c, 10000.0),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        qkv_bias=True,  # Qwen2's q/k/v projections always have biases
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        mask_token_id=_id(c.get("mask_token_id"), DREAM_MASK_ID),
        pad_token_id=_id(c.get("pad_token_id")),
        eos_token_id=_id(c.get("eos_token_id")),
        logits_shift=True,
    )


def _llada_config(c: dict) -> ModelConfig:
    kind = "LLaDA"
    block = c.get("block_type", "llama")
    act = c.get("activation_type", "silu" if block == "llama" else "swiglu")
    if (block, act) not in (("llama", "silu"), ("sequential", "swiglu")):
        raise _unsupported(kind, f"block_type={block!r} with activation_type={act!r} (supported: "
                           "llama + silu, sequential + swiglu)")  # fmt: skip
    for key, want in (("alibi", False), ("rope", True), ("include_bias", False),
                      ("scale_logits", False), ("input_emb_norm", False),
                      ("attention_layer_norm", False), ("layer_norm_with_affine", True),
                      ("block_group_size", 1)):  # fmt: skip
        if key in c and c[key] != want:
            raise _unsupported(kind, f"{key}={c[key]!r} (needs {want!r})")
    if c.get("bias_for_layer_norm"):
        raise _unsupported(kind, "bias_for_layer_norm=true")
    if c.get("layer_norm_type", "rms") != "rms":
        raise _unsupported(kind, f"layer_norm_type={c['layer_norm_type']!r} (only 'rms')")
    if c.get("rope_scaling"):
        raise _unsupported(kind, f"rope_scaling {c['rope_scaling']!r}")
    if c.get("clip_qkv") is not None:  # OLMo's blocks clamp q, k, v to [-clip, clip]
        raise _unsupported(kind, f"clip_qkv={c['clip_qkv']!r}")
    d, h = int(c["d_model"]), int(c["n_heads"])
    kv = c.get("n_kv_heads")
    if kv is None:
        kv = 1 if c.get("multi_query_attention") else h
    hidden = c.get("mlp_hidden_size") or int(c.get("mlp_ratio", 4)) * d
    # OLMo's sequential block computes [up; gate] in one ff_proj and ff_out reads half of it.
    d_ff = int(hidden) if block == "llama" else int(hidden) // 2
    return ModelConfig(
        vocab_size=int(c.get("embedding_size") or c["vocab_size"]),
        d_model=d,
        n_layers=int(c["n_layers"]),
        n_heads=h,
        n_kv_heads=int(kv),
        d_ff=d_ff,
        max_seq_len=int(c.get("max_sequence_length", 4096)),
        rope_theta=_rope_theta(c, 10000.0),
        norm_eps=float(c.get("rms_norm_eps", 1e-5)),
        qkv_bias=bool(c.get("include_qkv_bias", False)),
        tie_embeddings=bool(c.get("weight_tying", False)),
        mask_token_id=_id(c.get("mask_token_id"), LLADA_MASK_ID),
        pad_token_id=_id(c.get("pad_token_id")),
        eos_token_id=_id(c.get("eos_token_id")),
        logits_shift=False,
    )


def _dlm_config(c: dict) -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    d = c.get("dlm_config", {})
    unknown = set(d) - fields
    if unknown:
        raise ValueError(f"dlm checkpoint: unknown ModelConfig keys {sorted(unknown)}")
    return ModelConfig(**d)


CONFIGS = {"Dream": _dream_config, "llada": _llada_config, "dlm": _dlm_config}


def config_from_dict(c: dict) -> tuple[str, ModelConfig]:
    """(format, ModelConfig) of a config.json dict; ValueError naming an unknown model_type."""
    mt = c.get("model_type")
    fmt = {k.lower(): k for k in CONFIGS}.get(str(mt).lower())
    if fmt is None:
        raise ValueError(f"unknown model_type {mt!r} in config.json; supported: "
                         f"{sorted(CONFIGS)} (Dream, LLaDA and dlm's own format)")  # fmt: skip
    return fmt, CONFIGS[fmt](c)


# ---------------------------------------------------------------------------------------------
# tensor names: checkpoint name -> [(our parameter, rows)] (rows: a slice of dim 0, or None)
# ---------------------------------------------------------------------------------------------
def _dream_names(cfg: ModelConfig) -> dict[str, list[tuple[str, slice | None]]]:
    m = {"model.embed_tokens.weight": [("tok_emb.weight", None)],
         "model.norm.weight": [("norm.weight", None)]}  # fmt: skip
    if not cfg.tie_embeddings:
        m["lm_head.weight"] = [("lm_head.weight", None)]
    for i in range(cfg.n_layers):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        pairs = [("input_layernorm.weight", "attn_norm.weight"),
                 ("post_attention_layernorm.weight", "mlp_norm.weight"),
                 ("self_attn.o_proj.weight", "attn.wo.weight"),
                 ("mlp.gate_proj.weight", "mlp.w1.weight"),
                 ("mlp.up_proj.weight", "mlp.w3.weight"),
                 ("mlp.down_proj.weight", "mlp.w2.weight")]  # fmt: skip
        for p, ours in (("q", "wq"), ("k", "wk"), ("v", "wv")):
            pairs.append((f"self_attn.{p}_proj.weight", f"attn.{ours}.weight"))
            pairs.append((f"self_attn.{p}_proj.bias", f"attn.{ours}.bias"))
        m.update({src + a: [(dst + b, None)] for a, b in pairs})
    return m


def _llada_names(cfg: ModelConfig, block: str) -> dict[str, list[tuple[str, slice | None]]]:
    t = "model.transformer."
    m = {t + "wte.weight": [("tok_emb.weight", None)], t + "ln_f.weight": [("norm.weight", None)]}
    if not cfg.tie_embeddings:
        m[t + "ff_out.weight"] = [("lm_head.weight", None)]
    d, kv = cfg.d_model, cfg.n_kv_heads * cfg.head_dim
    for i in range(cfg.n_layers):
        src, dst = f"{t}blocks.{i}.", f"blocks.{i}."
        pairs = [("attn_norm.weight", "attn_norm.weight"),
                 ("ff_norm.weight", "mlp_norm.weight"),
                 ("attn_out.weight", "attn.wo.weight"),
                 ("ff_out.weight", "mlp.w2.weight")]  # fmt: skip
        if block == "llama":
            pairs += [("ff_proj.weight", "mlp.w1.weight"), ("up_proj.weight", "mlp.w3.weight")]
            for p, ours in (("q", "wq"), ("k", "wk"), ("v", "wv")):
                pairs.append((f"{p}_proj.weight", f"attn.{ours}.weight"))
                if cfg.qkv_bias:
                    pairs.append((f"{p}_proj.bias", f"attn.{ours}.bias"))
            m.update({src + a: [(dst + b, None)] for a, b in pairs})
        else:
            m.update({src + a: [(dst + b, None)] for a, b in pairs})
            rows = [slice(0, d), slice(d, d + kv), slice(d + kv, d + 2 * kv)]
            m[src + "att_proj.weight"] = [(dst + f"attn.{w}.weight", r)
                                          for w, r in zip(("wq", "wk", "wv"), rows)]  # fmt: skip
            if cfg.qkv_bias:
                m[src + "att_proj.bias"] = [(dst + f"attn.{w}.bias", r)
                                            for w, r in zip(("wq", "wk", "wv"), rows)]  # fmt: skip
            # SwiGLU chunks ff_proj's output into (x, gate): silu(gate) * x.
            f = cfg.d_ff
            m[src + "ff_proj.weight"] = [(dst + "mlp.w3.weight", slice(0, f)),
                                         (dst + "mlp.w1.weight", slice(f, 2 * f))]  # fmt: skip
    return m


def _dlm_names(model: DiffusionLM) -> dict[str, list[tuple[str, slice | None]]]:
    names = [n for n, _ in model.named_parameters()]  # a tied head is listed once (tok_emb)
    return {n: [(n, None)] for n in names}


def tensor_names(fmt: str, raw: dict, model: DiffusionLM) -> dict:
    """The checkpoint-name -> [(our name, rows)] map of a format (see the module docstring)."""
    if fmt == "Dream":
        return _dream_names(model.cfg)
    if fmt == "llada":
        return _llada_names(model.cfg, raw.get("block_type", "llama"))
    return _dlm_names(model)


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def _weight_files(path: str) -> dict[str, list[str]]:
    """shard file -> the tensor names it holds."""
    index = os.path.join(path, INDEX)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        shards: dict[str, list[str]] = defaultdict(list)
        for name, file in weight_map.items():
            shards[os.path.join(path, file)].append(name)
        return dict(shards)
    single = os.path.join(path, SINGLE)
    if os.path.exists(single):
        with _safe_open(single) as f:
            return {single: list(f.keys())}
    raise FileNotFoundError(f"{path}: no {SINGLE} or {INDEX} (only safetensors are supported)")


def _safe_open(file: str, device: str = "cpu"):
    """safetensors' safe_open, with a broken file (truncated, not safetensors) named."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(file, framework="pt", device=device)
    except SafetensorError as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from e


def _dtype(dtype) -> torch.dtype | None:
    if dtype is None:
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        dtype = getattr(torch, dtype)
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:  # weights are parameters: a float dtype only
            raise TypeError(f"dtype must be a floating-point dtype for the weights, got {dtype}")
        return dtype
    raise TypeError(
        f"dtype must be None, a torch.dtype or its name (e.g. 'bfloat16'), got {dtype!r}"
    )


def _set_param(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner), leaf, nn.Parameter(value, requires_grad=True))


def read_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path) or not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{path!r} is not a checkpoint directory with a config.json")
    with open(cfg_path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: not valid JSON ({e})") from e


def from_pretrained(path: str, dtype=None, device="cpu", **overrides) -> DiffusionLM:
    """Load a Dream, LLaDA or dlm checkpoint directory into a ``DiffusionLM`` (eval mode).

    Args:
        path: local directory with config.json and model.safetensors (or shards listed in
            model.safetensors.index.json).
        dtype: torch.dtype or its name ("bfloat16"); None keeps the dtype stored in the files.
        device: where the weights go ("cpu", "cuda", torch.device); each tensor is read from its
            shard straight onto it.
        overrides: ModelConfig fields to change (e.g. kernels=False, max_seq_len=8192).

    Returns:
        The model, with cfg.mask_token_id, pad_token_id, eos_token_id and logits_shift set from
        the config (Dream: shifted logits, mask 151666; LLaDA: mask 126336).

    Raises:
        ValueError: unknown model_type, unsupported options (named), tensors missing from the
            checkpoint or not ours (named), or of the wrong shape.

    Example:
        >>> model = from_pretrained("LLaDA-8B-Base/", dtype="bfloat16", device="cuda")
        >>> logits = model(ids)                                   # (B, S, 126464)
        >>> mask_id = model.cfg.mask_token_id                     # 126336
    """
    raw = read_config(path)
    fmt, cfg = config_from_dict(raw)
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise ValueError(f"from_pretrained: unknown ModelConfig override(s) {unknown}")
    cfg = dataclasses.replace(cfg, **overrides)
    if cfg.mask_token_id >= cfg.vocab_size:  # -1: none known (a model that only scores)
        # Caught here rather than as an index error in the first generate (LLaDA's default
        # mask 126336 when a config with a smaller vocabulary does not name its own).
        raise ValueError(f"{path}: mask_token_id {cfg.mask_token_id} must be < vocab_size "
                         f"{cfg.vocab_size}; set mask_token_id in config.json or pass "
                         "mask_token_id= to from_pretrained")  # fmt: skip
    dtype, device = _dtype(dtype), torch.device(device)
    with torch.device("meta"):
        model = DiffusionLM(cfg)
    names = tensor_names(fmt, raw, model)
    files = _weight_files(path)
    stored = {n for ns in files.values() for n in ns}
    extra = sorted(n for n in stored - set(names) if not n.endswith(_IGNORED_SUFFIXES))
    if fmt == "Dream" and cfg.tie_embeddings:
        extra = [n for n in extra if n != "lm_head.weight"]  # a tied head saved anyway
    missing = sorted(set(names) - stored)
    if missing:
        raise ValueError(f"{path}: {len(missing)} tensor(s) missing from the checkpoint "
                         f"({fmt} format): {', '.join(missing[:8])}"
                         f"{' ...' if len(missing) > 8 else ''}")  # fmt: skip
    if extra:
        raise ValueError(f"{path}: {len(extra)} tensor(s) that a {fmt} DiffusionLM does not have:"
                         f" {', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''}")  # fmt: skip
    params = dict(model.named_parameters())
    # safetensors reads straight to CPU or to a CUDA device; anything else goes through CPU.
    read_dev = str(device) if device.type in ("cpu", "cuda") else "cpu"
    for file, in_file in files.items():
        with _safe_open(file, device=read_dev) as f:
            for src in in_file:
                if src not in names:
                    continue
                t = f.get_tensor(src)
                for dst, rows in names[src]:
                    piece = t if rows is None else t[rows]
                    want = params[dst].shape
                    if piece.shape != want:
                        raise ValueError(
                            f"{file}: tensor {src!r} has shape {tuple(t.shape)}, expected "
                            f"{tuple(want)} for {dst} from config.json"
                        )
                    piece = piece.to(device=device, dtype=dtype or piece.dtype)
                    if rows is not None and piece.untyped_storage().data_ptr() == (
                        t.untyped_storage().data_ptr()
                    ):
                        # A row slice of a fused tensor still views the whole: give it its own
                        # storage (safetensors refuses to save views); one tensor at a time.
                        piece = piece.clone()
                    _set_param(model, dst, piece)
                del t
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:  # cannot happen if the name maps cover the model: a bug, say so plainly
        raise ValueError(f"{path}: parameters left unloaded: {left[:8]}")
    spec = raw.get("dlm_time_schedule") if fmt == "dlm" else None
    if cfg.time_conditioning and isinstance(spec, dict):
        from dlm.trainer import time_map  # lazy: the training stack is not needed otherwise

        model.time_schedule = spec
        model.time_of = time_map(cfg.mask_token_id, spec)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# saving (our format)
# ---------------------------------------------------------------------------------------------
def save_pretrained(model: DiffusionLM, path: str, *, tokenizer=None,
                    max_shard_size: int | None = None) -> None:  # fmt: skip
    """Write config.json + safetensors (+ the tokenizer) that ``from_pretrained`` reloads.

    Args:
        model: a DiffusionLM (any dtype/device; weights are written as they are).
        path: the directory (created).
        tokenizer: optional; a ``tokenizers``-backed one is written as tokenizer.json, dlm's
            character tokenizer as dlm_tokenizer.json.
        max_shard_size: bytes per shard; None writes one model.safetensors, else shards and
            model.safetensors.index.json (the Hugging Face layout).

    Example:
        >>> save_pretrained(model, "out/", max_shard_size=1 << 30)
        >>> same = from_pretrained("out/")
    """
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    cfg = {"model_type": "dlm", "architectures": ["DiffusionLM"],
           "dlm_config": dataclasses.asdict(model.cfg)}  # fmt: skip
    spec = getattr(model, "time_schedule", None)
    if model.cfg.time_conditioning and spec is not None:
        # The map from masked fraction to the t the model was trained on (the samplers'
        # input): without it a reloaded model would be given t = the fraction.
        cfg["dlm_time_schedule"] = spec
    # Weight files of an earlier save in the other layout or with more shards: the loader
    # prefers an index, so a stale one would load the old weights.
    stale = {n for n in os.listdir(path) if n == SINGLE or _SHARD.fullmatch(n)}
    if max_shard_size is None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(path, INDEX))
    # A tied head is the embedding: named_parameters lists it once, as tok_emb.weight.
    tensors = [(n, p.detach()) for n, p in model.named_parameters()]
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for n, t in tensors:
        nbytes = t.numel() * t.element_size()
        if max_shard_size is not None and shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append((n, t))
        size += nbytes
    if max_shard_size is None:
        save_file({n: t.contiguous().cpu() for n, t in shards[0]}, os.path.join(path, SINGLE),
                  metadata={"format": "pt"})  # fmt: skip
        written = {SINGLE}
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({n: t.contiguous().cpu() for n, t in shard}, os.path.join(path, file),
                      metadata={"format": "pt"})  # fmt: skip
            for n, t in shard:
                weight_map[n] = file
                total += t.numel() * t.element_size()
        with open(os.path.join(path, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        written = set(weight_map.values())
    for name in stale - written:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(path, name))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if tokenizer is not None:
        if hasattr(tokenizer, "tok") and hasattr(tokenizer.tok, "save"):
            tokenizer.tok.save(os.path.join(path, "tokenizer.json"))
        else:
            with open(os.path.join(path, "dlm_tokenizer.json"), "w") as f:
                f.write(tokenizer.to_json())


# ---------------------------------------------------------------------------------------------
# tokenizers
# ---------------------------------------------------------------------------------------------
class PretrainedTokenizer:
    """A checkpoint's tokenizer.json (``tokenizers`` library) with the ids from its config.

    Same interface as dlm.data's tokenizers (encode, decode, mask_token_id, pad_token_id,
    special_ids, vocab_size), so the sampler and the CLI take it unchanged. Unlike
    ``dlm.data.HFTokenizer`` it never adds tokens: the mask id is the model's (LLaDA's mask
    126336 is not named like a mask token in its vocabulary).
    """

    kind = "hf"

    def __init__(self, file: str, cfg: ModelConfig):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ImportError("tokenizer.json needs the `tokenizers` package: pip install "
                              "tokenizers") from e  # fmt: skip
        self.path = file
        self.tok = Tokenizer.from_file(file)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.mask_token_id = cfg.mask_token_id
        self.eos_token_id = cfg.eos_token_id if cfg.eos_token_id >= 0 else None
        pad = cfg.pad_token_id if cfg.pad_token_id >= 0 else cfg.eos_token_id
        self.pad_token_id = pad if pad >= 0 else cfg.mask_token_id

    def encode(self, text: str):
        import numpy as np

        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    @property
    def special_ids(self) -> list[int]:
        return sorted({self.pad_token_id, self.mask_token_id})

    def to_json(self) -> str:
        return json.dumps({"kind": "hf", "path": os.path.abspath(self.path)})


def load_pretrained(path: str, dtype=None, device="cpu"):
    """(model, tokenizer or None) of a checkpoint directory: what a CLI needs.

    Example:
        >>> model, tok = load_pretrained("Dream-v0-Base-7B/", dtype="bfloat16", device="cuda")
        >>> x = generate(model, ids, mask_id=tok.mask_token_id, logits_shift=model.cfg.logits_shift)
    """
    model = from_pretrained(path, dtype=dtype, device=device)
    return model, load_tokenizer(path, model.cfg)


def load_tokenizer(path: str, cfg: ModelConfig | None = None):
    """The tokenizer of a checkpoint directory, or None when it has none.

    tokenizer.json -> PretrainedTokenizer (ids from ``cfg``, default: the directory's config);
    dlm_tokenizer.json (a character tokenizer saved by save_pretrained) -> dlm.data's.
    """
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        if cfg is None:
            cfg = config_from_dict(read_config(path))[1]
        return PretrainedTokenizer(os.path.join(path, "tokenizer.json"), cfg)
    if os.path.exists(os.path.join(path, "dlm_tokenizer.json")):
        from dlm.data import tokenizer_from_json

        with open(os.path.join(path, "dlm_tokenizer.json")) as f:
            return tokenizer_from_json(f.read())
    return None
