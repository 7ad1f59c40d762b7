"""The ``dlm`` command.

    dlm train --preset shakespeare-tiny --out runs/demo      # the demo: embedded corpus, CPU
    dlm train --config my.toml --steps 5000 --lr 3e-4        # a config file, then flags on top
    dlm train --data my_texts/ --tokenizer tok.json --d-model 512 --n-layers 8
    dlm train --out runs/demo --resume                       # continue with the run's config
    torchrun --nproc_per_node 8 -m dlm.cli train --preset 1b --data corpus/ --distributed fsdp

Every field of ModelConfig, DataConfig and TrainConfig (dlm/config.py) is a flag
(``--d-model``, ``--seq-len``, ``--no-kernels``, ...); its help is the field's comment.
Precedence: defaults < preset < config file (JSON or TOML with [model], [data], [train] tables
and an optional top-level preset) < flags. With ``--resume`` the checkpoint's config takes the
place of the defaults (see ``resume_help``). A new run (no ``--resume``) where ``--out`` already
holds a checkpoint is refused unless ``--force``: re-running a command must not overwrite a model.

Errors: a bad flag is an argparse error; an expected user error (a missing file, a bad value, no
checkpoint, no CUDA) prints one line ``dlm <cmd>: error: ...`` and exits with status 2
(``main`` raises ``UsageError``, a SystemExit). Anything else is a bug and keeps its traceback;
``DLM_DEBUG=1`` shows the traceback of the user errors too. An interrupted ``dlm train`` saves a
checkpoint, prints how to resume and exits 128 + the signal (130 SIGINT, 143 SIGTERM).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import json
import os
import re
import sys
import tokenize

from dlm.config import (
    PRESETS,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    TrainConfig,
    check_value,
)

SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}

# Exceptions that the code raises on purpose for bad input (bad values, missing or unreadable
# files): one line, exit 2. Everything else is a bug and keeps its traceback.
USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)

resume_help = (
    "continue the run in --out from its checkpoint.safetensors, with the config stored in it: "
    "--out DIR --resume alone is enough. Flags, --preset and --config still apply on top, but "
    "only settings that keep the continuation exact may differ (steps, out, the eval / save / "
    "log / sample settings, device, threads, compile, progress, gradient checkpointing); "
    "others are an error unless --override-config. An error when there is no checkpoint"
)


class UsageError(SystemExit):
    """A user error already printed as ``dlm <cmd>: error: <message>``: exit status 2.
    ``str()`` is the message (SystemExit's own would be the status)."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _field_help(cls) -> dict[str, str]:
    """Each field's trailing comment in dlm/config.py: one source for the docs and --help."""
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):  # no source (a frozen build): flags without help
        return {}
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO("".join(lines)).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    out = {}
    for i, line in enumerate(lines, start=1):
        m = re.match(r"\s+(\w+): \w+ = ", line)
        if m and i in comments:
            out[m.group(1)] = comments[i]
    return out


def _flag_type(section: str, name: str, kind: str):
    """An argparse type for field ``section.name``: parses, then checks config.RULES."""
    parse = {"int": int, "float": float, "str": str}[kind]

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an' if kind == 'int' else 'a'} {kind}, got {text!r}"
            ) from None
        try:
            return check_value(section, name, kind, value)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(f"must be {e.expected}, got {text}") from None

    convert.__name__ = kind
    return convert


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    for section, cls in SECTIONS.items():
        group = p.add_argument_group(f"{section} config ({cls.__name__})")
        helps = _field_help(cls)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            kind = str(f.type)
            text = helps.get(f.name, "")
            text = (f"{text} " if text else "") + f"(default: {f.default})"
            text = text.replace("%", "%%")  # argparse %-formats help strings
            if kind == "bool":
                group.add_argument(
                    flag,
                    dest=f"{section}.{f.name}",
                    default=None,
                    action=argparse.BooleanOptionalAction,
                    help=text,
                )
            else:
                group.add_argument(
                    flag,
                    dest=f"{section}.{f.name}",
                    default=None,
                    type=_flag_type(section, f.name, kind),
                    metavar=kind.upper(),
                    help=text,
                )


def _load_file(path: str) -> dict:
    """The --config file as {"preset": ..., "model": {...}, "data": {...}, "train": {...}}."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config: no such file: {path}")
    try:
        if path.endswith(".toml"):
            import tomllib

            with open(path, "rb") as f:
                d = tomllib.load(f)
        else:
            with open(path) as f:
                d = json.load(f)
    except ValueError as e:  # JSONDecodeError, TOMLDecodeError, bad UTF-8
        raise ValueError(f"--config {path}: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"--config {path}: expected a table of [model], [data], [train]")
    unknown = sorted(set(d) - {"preset", *SECTIONS})
    if unknown:
        raise ValueError(
            f"--config {path}: unknown top-level key(s) {unknown}; expected preset, "
            "[model], [data], [train]"
        )
    return d


def build_config(args: argparse.Namespace, base: dict | None = None) -> Config:
    """Defaults (or ``base``: a resumed run's config) < preset < config file < flags."""
    file_cfg = _load_file(args.config) if args.config else {}
    preset = args.preset or file_cfg.get("preset")
    merged = {s: dict((base or {}).get(s, {})) for s in SECTIONS}
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        for s in SECTIONS:
            merged[s].update(PRESETS[preset].get(s, {}))
    for s in SECTIONS:
        section = file_cfg.get(s, {})
        unknown = set(section) - {f.name for f in dataclasses.fields(SECTIONS[s])}
        if unknown:
            raise ValueError(f"unknown keys in [{s}] of {args.config}: {sorted(unknown)}")
        merged[s].update(section)
    for key, value in vars(args).items():
        if "." in key and value is not None:
            s, name = key.split(".", 1)
            merged[s][name] = value
    return Config.from_dict(merged)


def _checkpoint_step(path: str) -> str:
    """ " (step N of M)" for a dlm train checkpoint, "" when its header cannot say."""
    from dlm.trainer import read_checkpoint_step

    try:
        step, total = read_checkpoint_step(path)
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    return f" (step {step} of {total})"


def cmd_train(args: argparse.Namespace) -> int:
    from dlm.trainer import CHECKPOINT, Trainer, TrainingInterrupted, read_checkpoint_config

    if args.override_config and not args.resume:
        raise ValueError("--override-config only applies with --resume")
    if args.force and args.resume:
        raise ValueError("--force starts a new run; it does not combine with --resume")
    cfg = build_config(args)
    path = os.path.join(cfg.train.out, CHECKPOINT)
    if args.resume:
        if not os.path.isfile(path):
            # An error, not a fresh start: a mistyped --out must not silently begin a new run.
            raise FileNotFoundError(
                f"--resume: no checkpoint at {path}; leave out --resume to start a new run there"
            )
        cfg = build_config(args, base=read_checkpoint_config(path).to_dict())
    elif not args.force and os.path.exists(path):
        # A new run would overwrite it: a trained model lost to a re-run command.
        raise FileExistsError(
            f"{path} already holds a checkpoint{_checkpoint_step(path)}: --resume continues "
            "that run, --force starts a new one that overwrites it, or choose another --out"
        )
    trainer = Trainer(cfg, resume=args.resume, override_config=args.override_config)
    global _DISTRIBUTED_RUN_ENDED
    try:
        summary = trainer.fit()
    except TrainingInterrupted as e:
        trainer.close()
        _DISTRIBUTED_RUN_ENDED = trainer.world > 1
        if trainer.rank == 0:
            print(f"dlm train: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    trainer.close()
    _DISTRIBUTED_RUN_ENDED = trainer.world > 1
    if trainer.rank == 0 and "val_nats_per_char" in summary:
        print(
            f"done: {summary['step']} steps in {summary['train_time_s']:.0f} s "
            f"({summary['tokens_per_s']:,.0f} tokens/s); validation ELBO "
            f"{summary['val_nats_per_char']:.3f} nats/char "
            f"({summary['val_bits_per_token']:.3f} bits/token); outputs in {cfg.train.out}/"
        )
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dlm",
        description="Masked diffusion language models.",
        epilog="DLM_DEBUG=1 shows the traceback of the one-line errors.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "train",
        help="train a model (see dlm/config.py for every option)",
        usage="%(prog)s [--preset NAME] [--config FILE] [--resume [--override-config]] "
        "[--FIELD VALUE ...]",
        description="Train a model. Precedence: defaults < --preset < --config < flags; with "
        "--resume the checkpoint's config replaces the defaults. SIGINT / SIGTERM save a "
        "checkpoint after the current step and exit 130 / 143.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from a named configuration")
    p.add_argument("--config", help="JSON or TOML file with [model], [data], [train] tables")
    p.add_argument("--resume", action="store_true", help=resume_help)
    p.add_argument(
        "--override-config",
        action="store_true",
        help="with --resume: apply settings that differ from the checkpoint's even though the "
        "run then no longer continues exactly (the weight shapes can never change)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="start a new run even where --out already holds a checkpoint, overwriting it "
        "(without it that is an error)",
    )
    _add_config_flags(p)
    p.set_defaults(func=cmd_train)
    from dlm import cli_generate  # dlm sample, dlm eval

    cli_generate.register(sub)
    return parser


def _message(e: BaseException) -> str:
    if isinstance(e, ConfigError) and e.got is not None:
        name = e.field.split(".", 1)[1]
        return f"--{name.replace('_', '-')} ({e.field}) must be {e.expected}, got {e.got!r}"
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.strerror}: {e.filename}"
    return str(e)


# Set by `dlm train` once a multi-process run has ended its process group (Trainer.close):
# run() then exits without Python's teardown of torch's distributed objects.
_DISTRIBUTED_RUN_ENDED = False


def run() -> None:
    """The ``dlm`` command (the console script and ``python -m dlm.cli``): ``main``, then exit
    with its status. After a multi-process ``dlm train`` has ended its process group, the exit
    skips Python's teardown: freeing the DDP model and gloo group can deadlock inside torch (a
    gloo worker thread that needs the GIL held by the thread joining it; pytorch#179291), which
    this project's CI saw once in a two-process test. Every file the run writes is closed by
    then (the checkpoint atomically), and stdout / stderr are flushed."""
    code = main()
    if _DISTRIBUTED_RUN_ENDED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    """Run ``dlm``; returns the exit status or raises SystemExit (argparse, UsageError)."""
    parser = make_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the subcommand's parser: its usage and "dlm <cmd>: error: ..."
        subparsers = next(a for a in parser._actions if isinstance(a.choices, dict))
        subparsers.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    debug = os.environ.get("DLM_DEBUG", "") not in ("", "0")
    try:
        return args.func(args)
    except USER_ERRORS as e:
        if debug:
            raise
        message = _message(e)
        print(f"dlm {args.command}: error: {message}", file=sys.stderr, flush=True)
        raise UsageError(message) from None
    except KeyboardInterrupt:
        # dlm train handles SIGINT itself while it trains; this is sample / eval / start-up.
        if debug:
            raise
        print(f"dlm {args.command}: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    run()
