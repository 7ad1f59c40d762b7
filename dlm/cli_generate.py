"""``dlm sample`` and ``dlm eval``: generate from a checkpoint, and bound its perplexity.

    dlm sample --checkpoint runs/demo/checkpoint.safetensors --prompt "ROMEO:" --length 128 \
        --steps 64 --block-length 32 --alg low_confidence --show-steps
    dlm eval --checkpoint runs/demo/checkpoint.safetensors                 # validation split
    dlm eval --checkpoint runs/demo/checkpoint.safetensors --data notes.txt --mc-num 64
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time

import torch

from dlm.sampler import ALGS, KV_CACHES, SCHEDULES, generate

DTYPES = ("float32", "bfloat16", "float16")


def _int_at_least(lo: int):
    """argparse type: an int >= lo."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {lo}, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        return value

    convert.__name__ = "int"
    return convert


def _float_in(lo: float, hi: float = math.inf, *, lo_open: bool = False):
    """argparse type: a float in [lo, hi] ((lo, hi] with lo_open)."""
    where = (
        f"{'(' if lo_open else '['}{lo}, {hi}]"
        if hi < math.inf
        else f"{'>' if lo_open else '>='} {lo}"
    )

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not ((lo < value if lo_open else lo <= value) and value <= hi):
            raise argparse.ArgumentTypeError(
                f"must be {'in ' if hi < math.inf else ''}{where}, got {text}"
            )
        return value

    convert.__name__ = "float"
    return convert


def _device_name(text: str) -> str:
    """argparse type for --device: auto, cpu, cuda or cuda:N."""
    if text in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", text):
        return text
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")


def register(subparsers) -> None:
    """Add the ``sample`` and ``eval`` subcommands to the ``dlm`` parser."""
    pos, nonneg = _int_at_least(1), _int_at_least(0)
    usage = "%(prog)s (--checkpoint FILE | --model DIR) [options]"
    p = subparsers.add_parser("sample", help="generate text from a checkpoint", usage=usage)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a checkpoint.safetensors from dlm train (or its "
                     "--out folder)")  # fmt: skip
    src.add_argument("--model", help="a Hugging Face-style directory (Dream, LLaDA or ours: "
                     "config.json + safetensors + tokenizer.json)")  # fmt: skip
    p.add_argument("--dtype", default=None, choices=DTYPES, help="weights' dtype (default: stored)")
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt text (repeat for a batch; default: unconditional)")  # fmt: skip
    p.add_argument("--num", type=pos, default=1, help="samples per prompt")
    p.add_argument("--length", type=pos, default=128, help="tokens to generate (gen_length)")
    p.add_argument("--steps", type=pos, default=64, help="denoising steps (default: 64)")
    p.add_argument("--block-length", type=pos, default=None,
                   help="semi-autoregressive blocks of this length (divides --length)")  # fmt: skip
    p.add_argument("--alg", choices=sorted(ALGS), default="low_confidence",
                   help="how a step picks positions (default: low_confidence)")  # fmt: skip
    p.add_argument("--schedule", choices=SCHEDULES, default="even",
                   help="tokens per step: even (LLaDA) or dream (default: even)")  # fmt: skip
    p.add_argument("--temperature", type=_float_in(0), default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=pos, default=None, help="keep the k likeliest tokens")
    p.add_argument("--top-p", type=_float_in(0, 1, lo_open=True), default=None,
                   help="nucleus: keep the likeliest tokens holding this much mass")  # fmt: skip
    p.add_argument("--min-p", type=_float_in(0, 1), default=None,
                   help="drop tokens below this fraction of the top probability")  # fmt: skip
    p.add_argument("--alg-temp", type=_float_in(0), default=None,
                   help="temperature of the confidence when choosing positions")  # fmt: skip
    p.add_argument("--threshold", type=_float_in(0, 1), default=None,
                   help="Fast-dLLM parallel decoding: commit every position above it")  # fmt: skip
    p.add_argument("--factor", type=_float_in(0, lo_open=True), default=None,
                   help="Fast-dLLM's factor rule")  # fmt: skip
    p.add_argument("--cfg-scale", type=_float_in(0), default=0.0,
                   help="classifier-free guidance (0: off)")  # fmt: skip
    p.add_argument("--logits-shift", action="store_true", help="Dream's shifted logits")
    p.add_argument("--kv-cache", choices=[c for c in KV_CACHES if c], default=None,
                   help="Fast-dLLM's block KV cache (default: none)")  # fmt: skip
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="replay the model's forward from CUDA graphs (CUDA only; not yet timed)",
    )
    p.add_argument("--seed", type=nonneg, default=0, help="sample b uses seed + b")
    p.add_argument("--show-steps", action="store_true", help="print every denoising step")
    p.add_argument("--device", type=_device_name, default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    p.set_defaults(func=cmd_sample)

    e = subparsers.add_parser("eval", help="ELBO / perplexity bound of a checkpoint", usage=usage)
    esrc = e.add_mutually_exclusive_group(required=True)
    esrc.add_argument("--checkpoint", help="a checkpoint.safetensors from dlm train (or its "
                      "--out folder)")  # fmt: skip
    esrc.add_argument("--model", help="a Hugging Face-style directory (needs --data)")
    e.add_argument("--dtype", default=None, choices=DTYPES, help="weights' dtype (default: stored)")
    e.add_argument("--data", default=None,
                   help="a text file (default: the checkpoint's validation split)")  # fmt: skip
    e.add_argument("--seq-len", type=pos, default=None, help="window length (default: training)")
    e.add_argument("--windows", type=pos, default=64, help="windows spread over the text")
    e.add_argument("--mc-num", type=pos, default=32, help="Monte-Carlo draws per window")
    e.add_argument("--batch-size", type=pos, default=64, help="sequences per forward")
    e.add_argument("--seed", type=nonneg, default=0, help="seed of the Monte-Carlo draws")
    e.add_argument("--device", type=_device_name, default="auto", help="auto | cpu | cuda[:N]")
    e.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    e.set_defaults(func=cmd_eval)


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch {torch.__version__} sees no CUDA device "
                         "(torch.cuda.is_available() is False); use --device cpu")  # fmt: skip
    return name


class _Banned(torch.nn.Module):
    """The model with the tokenizer's special tokens never predicted (pad; mask is banned by
    generate itself)."""

    def __init__(self, model, banned: list[int]):
        super().__init__()
        self.model = model
        # A tensor index on the model's device: a Python list would be copied to the GPU with
        # a blocking copy at every call, which a CUDA graph cannot capture (--cuda-graph).
        dev = next(model.parameters()).device
        self.banned = torch.tensor(banned, dtype=torch.long, device=dev) if banned else None
        self.cfg = getattr(model, "cfg", None)
        self.time_of = getattr(model, "time_of", None)

    def forward(self, input_ids, attention_mask=None, position_ids=None, kv_cache=None, t=None):
        kw = {"attention_mask": attention_mask, "position_ids": position_ids}
        if kv_cache is not None:
            kw["kv_cache"] = kv_cache
        if t is not None:
            kw["t"] = t
        logits = self.model(input_ids, **kw)
        if self.banned is not None:
            logits.index_fill_(-1, self.banned, float("-inf"))
        return logits


def _load(args):
    """(model, tokenizer, training config or None, device) from --checkpoint or --model."""
    dev = _device(args.device)
    if getattr(args, "model", None):
        from dlm.hf import load_pretrained

        if not os.path.isdir(args.model):
            raise NotADirectoryError(f"--model {args.model}: expected a checkpoint directory "
                                     "(config.json + safetensors)")  # fmt: skip
        model, tok = load_pretrained(args.model, dtype=args.dtype, device=dev)
        if tok is None:
            raise ValueError(f"--model {args.model} has no tokenizer.json (or dlm_tokenizer.json)")
        model.eval()
        return model, tok, None, dev
    from dlm.trainer import CHECKPOINT, load_model

    path = args.checkpoint
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, CHECKPOINT)):
        path = os.path.join(path, CHECKPOINT)  # a dlm train --out folder
    elif os.path.isdir(path):
        raise IsADirectoryError(f"--checkpoint {path} is a directory without {CHECKPOINT}; "
                                "expected a dlm train checkpoint (a Hugging Face-style "
                                "directory goes to --model)")  # fmt: skip
    elif not os.path.exists(path):
        raise FileNotFoundError(f"--checkpoint: no such file: {path}")
    model, tok, cfg = load_model(path, ema=not args.no_ema, device=dev)
    if args.dtype:
        model = model.to(getattr(torch, args.dtype))
    return model, tok, cfg, dev


def _prompts(tok, texts: list[str] | None, num: int, dev: str):
    """Left-padded (B, P) ids and attention mask (None when all rows have the same length)."""
    texts = texts or [""]
    vocab = getattr(tok, "stoi", None)  # a character tokenizer reads unknown characters as "?"
    if vocab is not None:
        unknown = sorted({c for t in texts for c in t if c not in vocab})
        if unknown:
            print(f"dlm sample: warning: the prompt's characters {', '.join(map(repr, unknown))} "
                  "are not in the model's vocabulary; each is read as "
                  f"{tok.decode([getattr(tok, '_unk', 0)])!r}", file=sys.stderr)  # fmt: skip
    rows = [torch.as_tensor(tok.encode(t), dtype=torch.long) for t in texts for _ in range(num)]
    P = max(len(r) for r in rows)
    if P == 0:
        return torch.zeros(len(rows), 0, dtype=torch.long, device=dev), None, rows
    ids = torch.full((len(rows), P), tok.pad_token_id, dtype=torch.long)
    am = torch.zeros(len(rows), P, dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, P - len(r) :] = r
        am[b, P - len(r) :] = True
    return ids.to(dev), (None if bool(am.all()) else am.to(dev)), rows


def _mask_id(model, tok) -> int:
    """The mask id the model was trained with (its config's), else the tokenizer's."""
    m = getattr(getattr(model, "cfg", None), "mask_token_id", -1)
    return m if isinstance(m, int) and m >= 0 else tok.mask_token_id


def cmd_sample(args) -> int:
    from dlm.sampler import _accepts

    if args.cuda_graph and torch.device(_device(args.device)).type != "cuda":
        raise ValueError(f"--cuda-graph needs a CUDA device, got --device {args.device}")
    model, tok, cfg, dev = _load(args)
    if args.kv_cache and not _accepts(model, "kv_cache"):
        raise ValueError("--kv-cache needs a model whose forward takes kv_cache=")
    mask = _mask_id(model, tok)
    ids, am, rows = _prompts(tok, args.prompt, args.num, dev)
    eos = getattr(model.cfg, "eos_token_id", None)
    # Dream's pad id is its eos id: banning "pad" there would ban the end of text too.
    wrapped = _Banned(model, [i for i in tok.special_ids if i not in (mask, eos)]).eval()
    logits_shift = args.logits_shift or bool(getattr(model.cfg, "logits_shift", False))
    t0 = time.perf_counter()
    out = generate(
        wrapped, ids, am, gen_length=args.length, steps=args.steps,
        block_length=args.block_length, alg=args.alg, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, alg_temp=args.alg_temp,
        threshold=args.threshold, factor=args.factor, cfg_scale=args.cfg_scale, mask_id=mask,
        logits_shift=logits_shift, schedule=args.schedule, kv_cache=args.kv_cache,
        output_history=args.show_steps, seed=[args.seed + b for b in range(ids.shape[0])],
        cuda_graph=args.cuda_graph,
    )  # fmt: skip
    dt = time.perf_counter() - t0
    x, history = out if args.show_steps else (out, [])
    P = ids.shape[1]
    if history:
        width = len(str(len(history)))
        for b in range(x.shape[0]):
            print(f"--- sample {b}: the answer after each step ('_' = still masked)")
            for i, h in enumerate(history):
                text = tok.decode(h[b, P:].tolist()).replace("\n", "\\n")
                left = int((h[b, P:] == mask).sum())
                print(f"step {i + 1:>{width}} | {left:>4} masked | {text}")
    for b in range(x.shape[0]):
        print(f"=== sample {b}")
        # Decoded whole: a word-level tokenizer puts its separator between prompt and answer.
        print(tok.decode(rows[b].tolist() + x[b, P:].tolist()))
    n_tok = x.shape[0] * args.length
    print(f"[{n_tok} tokens in {dt:.2f} s: {n_tok / max(dt, 1e-9):,.0f} tokens/s on {dev}]")
    if cfg is not None and cfg.data.data == "shakespeare":
        print(_word_report([tok.decode(x[b, P:].tolist()) for b in range(x.shape[0])]))
    return 0


def _word_report(texts: list[str]) -> str:
    """How word-like the samples are, against the embedded corpus's training works."""
    from dlm.data import lexicon, load_documents, real_word_fraction, words_of

    train, _ = load_documents("shakespeare")
    frac, n = real_word_fraction(texts, lexicon(train))
    distinct = len({w for t in texts for w in words_of(t)}) / max(n, 1)
    return (f"[words: {frac:.0%} of {n} occur in the training corpus; {distinct:.0%} of them "
            f"distinct (a low share means repetition)]")  # fmt: skip


def _eval_windows(args, tok, cfg, max_seq_len: int | None):
    from dlm.data import Document, TokenStream, load_documents

    seq_len = args.seq_len if args.seq_len is not None else (cfg.data.seq_len if cfg else 256)
    if max_seq_len is not None and seq_len > max_seq_len:
        # Allowed (RoPE runs past it: a length-extrapolation experiment), but not silently.
        print(f"dlm eval: warning: --seq-len {seq_len} exceeds the model's max_seq_len "
              f"{max_seq_len}; the bound measures extrapolation", file=sys.stderr)  # fmt: skip
    if args.data:
        with open(args.data, encoding="utf-8", errors="replace") as f:
            docs = [Document(args.data, f.read())]
    else:
        _, docs = load_documents(cfg.data.data, cfg.data.val_fraction)
    stream = TokenStream(docs, tok, seq_len, seed=args.seed)
    starts = stream.eval_windows(args.windows)
    x = stream.batch_at(starts).input_ids
    chars_per_token = stream.n_chars / len(stream.tokens)
    return x, chars_per_token


def cmd_eval(args) -> int:
    from dlm.likelihood import elbo

    if args.data and not os.path.isfile(args.data):
        raise FileNotFoundError(f"--data: no such file: {args.data}")
    model, tok, cfg, dev = _load(args)
    if cfg is None and not args.data:
        raise ValueError("--model needs --data FILE (there is no training split)")
    max_seq_len = getattr(getattr(model, "cfg", None), "max_seq_len", None)
    x, chars_per_token = _eval_windows(args, tok, cfg, max_seq_len)
    t0 = time.perf_counter()
    # Dream's checkpoints predict position i from the output at i - 1.
    shift = bool(getattr(getattr(model, "cfg", None), "logits_shift", False))
    nats, se = elbo(model, x.to(dev), mask_id=_mask_id(model, tok), mc_num=args.mc_num,
                    batch_size=args.batch_size, seed=args.seed, return_stderr=True,
                    logits_shift=shift)  # fmt: skip
    dt = time.perf_counter() - t0
    per_tok = float(nats.sum()) / x.numel()
    se_tok = float(se.pow(2).sum().sqrt()) / x.numel()
    # One draw per window has no spread to estimate the error from.
    err = f" +- {se_tok:.4f}" if args.mc_num > 1 else ""
    src = args.data or f"{cfg.data.data} validation split"  # cfg is set when --data is not
    print(f"{src}: {x.shape[0]} windows x {x.shape[1]} tokens, {args.mc_num} draws each "
          f"({dt:.1f} s)")  # fmt: skip
    print(f"ELBO bound: {per_tok:.4f}{err} nats/token, "
          f"{per_tok / math.log(2):.4f} bits/token, {per_tok / chars_per_token:.4f} nats/char, "
          f"perplexity <= {math.exp(per_tok):.3f}")  # fmt: skip
    if args.mc_num == 1:
        print("(no error bar: --mc-num 1 draws once per window)")
    return 0
