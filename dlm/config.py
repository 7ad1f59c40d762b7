"""Configuration: one commented dataclass per concern (model, data, training) and named presets.

A preset fills all three; anything can then be overridden from a JSON/TOML file or CLI flags
(see ``dlm.cli``). ``vocab_size = 0`` means "take it from the tokenizer" (the CPU presets); the
real-model presets carry their published vocabulary sizes so that benchmarks can build them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from dlm.schedules import SCHEDULES, WEIGHTINGS


class ConfigError(ValueError):
    """A config field holds a value it cannot take. ``field`` is "section.name" (``train.steps``),
    ``expected`` says what it accepts; ``dlm.cli`` names the flag (``--steps``) instead."""

    def __init__(self, field: str, expected: str, got, message: str | None = None):
        self.field, self.expected, self.got = field, expected, got
        super().__init__(message or f"{field} must be {expected}, got {got!r}")


@dataclass
class ModelConfig:
    vocab_size: int = 0  # 0: set from the tokenizer (specials included) at train time
    d_model: int = 256  # residual width
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # query heads; head_dim = d_model // n_heads
    n_kv_heads: int = 0  # key/value heads for GQA; 0 means n_heads (plain multi-head)
    d_ff: int = 0  # SwiGLU hidden width; 0 means 8/3 d_model rounded up to a multiple of 64
    max_seq_len: int = 4096  # longest sequence the model is meant for (RoPE works beyond it)
    rope_theta: float = 10000.0  # RoPE base frequency
    norm_eps: float = 1e-5  # RMSNorm epsilon
    qkv_bias: bool = False  # Dream (Qwen2) has q/k/v biases; LLaDA (LLaMA-style) has none
    tie_embeddings: bool = False  # share the token embedding with the LM head
    time_conditioning: bool = False  # add an embedding of t to the input (off: MDLM/Dream/LLaDA)
    mask_token_id: int = -1  # -1: set from the tokenizer
    pad_token_id: int = -1  # -1: none known (set by dlm.hf.from_pretrained from the config)
    eos_token_id: int = -1  # -1: none known
    logits_shift: bool = False  # Dream: position i is predicted by the output at i - 1
    kernels: bool = True  # True: dlm_kernels ops; False: plain PyTorch (SDPA + full logits)
    gradient_checkpointing: bool = False  # recompute each block in backward to save memory
    init_std: float = 0.02  # std of the normal initialisation of the weights

    def __post_init__(self):
        _validate(self, "model")
        if self.n_kv_heads == 0:
            self.n_kv_heads = self.n_heads
        if self.d_ff == 0:
            self.d_ff = ((8 * self.d_model // 3) + 63) // 64 * 64
        if self.d_model % self.n_heads:
            raise ConfigError("model.d_model", f"divisible by n_heads {self.n_heads}", self.d_model)
        if (self.d_model // self.n_heads) % 2:  # RoPE rotates pairs of dimensions
            raise ConfigError("model.d_model", f"an even head size d_model / n_heads (n_heads "
                              f"{self.n_heads})", self.d_model)  # fmt: skip
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                "model.n_heads", f"a multiple of n_kv_heads {self.n_kv_heads}", self.n_heads
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass
class DataConfig:
    data: str = "shakespeare"  # "shakespeare" (embedded corpus) or a text file / directory
    tokenizer: str = "char"  # "char" or the path of a Hugging Face tokenizers .json file
    seq_len: int = 256  # tokens per training sequence
    packing: bool = False  # True: attention stays inside each document (varlen, cu_seqlens)
    val_fraction: float = 0.1  # user data only: share of the files (or text) held out

    def __post_init__(self):
        _validate(self, "data")


@dataclass
class TrainConfig:
    out: str = "runs/dlm"  # output folder: checkpoint, metrics.jsonl, loss.png
    steps: int = 1000  # optimizer steps
    batch_size: int = 32  # sequences per optimizer step, summed over processes and accumulation
    grad_accum: int = 1  # micro-batches per optimizer step (per process)
    lr: float = 1e-3  # peak learning rate (AdamW), reached after warmup_steps
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100  # linear warm-up from lr / warmup_steps to lr
    weight_decay: float = 0.1  # AdamW decoupled weight decay (matrices only)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    grad_clip: float = 1.0  # 0: no clipping
    ema_decay: float = 0.0  # 0: no EMA; else validation and samples use the EMA weights
    schedule: str = "linear"  # noise schedule, see dlm.schedules.SCHEDULES
    weighting: str = "elbo"  # elbo | uniform | min_snr
    objective: str = "mdlm"  # mdlm (schedule + weighting) | llada (p_mask = (1-eps) t + eps)
    sampling_eps: float = 1e-3  # t is drawn in [eps, 1] (LLaDA's eps for objective=llada)
    t_sampling: str = "antithetic"  # antithetic (stratified) | uniform
    random_length_prob: float = 0.0  # LLaDA cuts 1% of batches to a random length: 0.01
    eval_every: int = 200  # steps between validation runs (0: only at the end)
    eval_batches: int = 8  # validation batches per run (of batch_size sequences each)
    eval_t_samples: int = 1  # Monte Carlo draws of t per validation sequence
    save_every: int = 200  # steps between checkpoints (0: only at the end)
    log_every: int = 10  # steps between loss rows in metrics.jsonl
    seed: int = 1337  # data order, noise and initialisation
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # CPU threads for torch (0: torch's default, one per core)
    dtype: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | float32 | bfloat16
    distributed: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard), used under torchrun
    compile: bool = False  # torch.compile the model
    samples: int = 0  # passages to sample at the end of training
    sample_len: int = 256  # tokens per end-of-training sample
    sample_steps: int = 128  # denoising steps per end-of-training sample
    sample_temperature: float = 0.8  # < 1 trades diversity for more real words (tiny models)
    progress: bool = True  # tqdm progress bar

    def __post_init__(self):
        _validate(self, "train")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def check_new_run(self) -> None:
        """Combinations a new run refuses because one setting would do nothing (checked when a
        run starts, not when a stored config is read: older checkpoints keep loading)."""
        if self.train.random_length_prob > 0 and self.data.packing:
            # Packed rows hold whole documents end to end: there is no row length to cut.
            raise ConfigError("train.random_length_prob", "0 with data.packing",
                              self.train.random_length_prob)  # fmt: skip
        if self.train.objective == "llada" and self.train.weighting != "elbo":
            # LLaDA's loss divides by p_mask: there is no weighting to choose.
            raise ConfigError("train.weighting", "elbo with objective llada (its 1 / p_mask "
                              "weight is fixed)", self.train.weighting)  # fmt: skip

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        """From {"model": {...}, "data": {...}, "train": {...}}; ConfigError names a bad or
        unknown key."""
        sections = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
        parts = {}
        extra = sorted(set(d) - set(sections))
        if extra:
            raise ConfigError(
                extra[0],
                "one of the sections [model], [data], [train]",
                None,
                f"unknown section(s) {extra}; expected [model], [data], [train]",
            )
        for s, kind in sections.items():
            given = d.get(s, {})
            if not isinstance(given, dict):
                raise ConfigError(
                    s,
                    "a table of settings",
                    given,
                    f"[{s}] must be a table of settings, got {given!r}",
                )
            unknown = sorted(set(given) - {f.name for f in dataclasses.fields(kind)})
            if unknown:
                msg = f"unknown key(s) {unknown} in [{s}]; {kind.__name__} has no such field"
                raise ConfigError(f"{s}.{unknown[0]}", f"a field of {kind.__name__}", None, msg)
            parts[s] = kind(**given)
        return cls(**parts)


# What each field accepts beyond its type: (test, what the error says it expects). Checked when a
# config is built (files, presets, Trainer callers); dlm.cli turns the same rules into argparse
# types, so a bad flag fails before anything runs and names the flag.
def _at_least(lo):
    return lambda v: lo <= v < math.inf, f">= {lo} (finite)"


def _above(lo):
    return lambda v: lo < v < math.inf, f"> {lo} (finite)"


def _within(lo, hi, *, hi_open=False):
    if hi_open:
        return lambda v: lo <= v < hi, f"in [{lo}, {hi})"
    return lambda v: lo <= v <= hi, f"in [{lo}, {hi}]"


def _one_of(*names):
    return lambda v: v in names, "one of " + ", ".join(map(repr, names))


RULES: dict[str, dict[str, tuple]] = {
    "model": {
        "vocab_size": _at_least(0),
        "d_model": _at_least(1),
        "n_layers": _at_least(1),
        "n_heads": _at_least(1),
        "n_kv_heads": _at_least(0),
        "d_ff": _at_least(0),
        "max_seq_len": _at_least(1),
        "rope_theta": _above(0),
        "norm_eps": _above(0),
        "mask_token_id": _at_least(-1),
        "pad_token_id": _at_least(-1),
        "eos_token_id": _at_least(-1),
        "init_std": _at_least(0),
    },
    "data": {
        "seq_len": _at_least(1),
        "val_fraction": _within(0, 1, hi_open=True),  # 0 on user data: refused when loaded
    },
    "train": {
        "steps": _at_least(1),
        "batch_size": _at_least(1),
        "grad_accum": _at_least(1),
        "lr": _above(0),
        "min_lr_ratio": _within(0, 1),
        "warmup_steps": _at_least(0),
        "weight_decay": _at_least(0),
        "beta1": _within(0, 1, hi_open=True),
        "beta2": _within(0, 1, hi_open=True),
        "grad_clip": (lambda v: v >= 0, ">= 0 (0 or inf: no clipping)"),
        "ema_decay": _within(0, 1, hi_open=True),
        "schedule": _one_of(*SCHEDULES),
        "weighting": _one_of(*WEIGHTINGS),
        "objective": _one_of("mdlm", "llada"),
        "sampling_eps": _within(0, 1, hi_open=True),
        "t_sampling": _one_of("antithetic", "uniform"),
        "random_length_prob": _within(0, 1),
        "eval_every": _at_least(0),
        "eval_batches": _at_least(1),
        "eval_t_samples": _at_least(1),
        "save_every": _at_least(0),
        "log_every": _at_least(1),
        "seed": _within(-(2**63), 2**64, hi_open=True),  # what torch.manual_seed takes
        "device": _one_of("auto", "cpu", "cuda"),
        "threads": _at_least(0),
        "dtype": _one_of("auto", "float32", "bfloat16"),
        "distributed": _one_of("ddp", "fsdp"),
        "samples": _at_least(0),
        "sample_len": _at_least(1),
        "sample_steps": _at_least(1),
        "sample_temperature": _at_least(0),
    },
}
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
_TYPE_NAMES = {"int": "an int", "float": "a number", "str": "a string", "bool": "true or false"}


def check_value(section: str, name: str, kind: str, value):
    """``value`` for field ``section.name`` of type ``kind``, or ConfigError (ints are accepted
    for floats and converted)."""
    field_name = f"{section}.{name}"
    if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    # bool is an int subclass: True is no step count.
    if not isinstance(value, _TYPES[kind]) or (kind != "bool" and isinstance(value, bool)):
        raise ConfigError(field_name, _TYPE_NAMES[kind], value)
    rule = RULES[section].get(name)
    if rule is not None and not rule[0](value):
        raise ConfigError(field_name, rule[1], value)
    return value


def _validate(obj, section: str) -> None:
    for f in dataclasses.fields(obj):
        setattr(obj, f.name, check_value(section, f.name, str(f.type), getattr(obj, f.name)))


# Presets. The tiny one is tuned so that `make demo` finishes in under 10 minutes on a 2-core CPU
# (see README for the measured figures); the others are real-model shapes for benchmarks.
PRESETS: dict[str, dict] = {
    "shakespeare-tiny": {
        # 0.42M parameters, 2500 steps of 16 x 64 characters (2.6M tokens, 0.5 epoch). Chosen by
        # measurement on the 2-core CPU: at equal CPU time, small batches and this d_model=96
        # model beat d_model=128 (2.62 vs 2.80 nats/char after ~80 CPU-seconds) and batches of
        # 32 x 128 (3.18 after 0.4M tokens, against 2.85 here).
        "model": dict(d_model=96, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=64),
        "data": dict(data="shakespeare", tokenizer="char", seq_len=64),
        "train": dict(
            out="runs/demo",
            steps=2500,
            batch_size=16,
            lr=4e-3,
            warmup_steps=100,
            weight_decay=0.0,
            eval_every=500,
            eval_batches=16,
            eval_t_samples=2,
            save_every=500,
            log_every=50,
            samples=3,
            sample_len=256,
            sample_steps=256,
            # One thread: this model's ops are small, and with two threads every op waits at an
            # OpenMP barrier; on the 2-core box shared with other jobs that made a step 20x
            # slower (2 s instead of 0.1 s of CPU per step, measured), for ~1.3x at best idle.
            threads=1,
        ),
    },
    # LLaDA-8B (LLaMA-style, no GQA, vocabulary 126464).
    "llada-8b": {
        "model": dict(
            vocab_size=126464,
            d_model=4096,
            n_layers=32,
            n_heads=32,
            n_kv_heads=32,
            d_ff=12288,
            rope_theta=500000.0,
            mask_token_id=126336,
            max_seq_len=4096,
        ),
    },
    # Dream-v0-7B (Qwen2.5-7B shapes: GQA 28/4, q/k/v biases, vocabulary 152064).
    "dream-7b": {
        "model": dict(
            vocab_size=152064,
            d_model=3584,
            n_layers=28,
            n_heads=28,
            n_kv_heads=4,
            d_ff=18944,
            rope_theta=1000000.0,
            qkv_bias=True,
            mask_token_id=151666,
            max_seq_len=4096,
        ),
    },
    # A ~1.2B model with LLaDA's vocabulary, for single-GPU training benchmarks.
    "1b": {
        "model": dict(
            vocab_size=126464,
            d_model=2048,
            n_layers=16,
            n_heads=16,
            n_kv_heads=8,
            d_ff=5632,
            rope_theta=500000.0,
            mask_token_id=126336,
            tie_embeddings=True,
            max_seq_len=4096,
        ),
    },
}


def get_preset(name: str) -> Config:
    """The named preset as a fresh Config (``Config()`` defaults for what it leaves out)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return Config.from_dict(PRESETS[name])
