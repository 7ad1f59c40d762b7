"""The ``dlm`` command.

    dlm train --preset shakespeare-tiny --out runs/demo      # the demo: embedded corpus, CPU
    dlm train --config my.toml --steps 5000 --lr 3e-4        # a config file, then flags on top
    dlm train --data my_texts/ --tokenizer tok.json --d-model 512 --n-layers 8
    torchrun --nproc_per_node 8 -m dlm.cli train --preset 1b --data corpus/ --distributed fsdp

Every field of ModelConfig, DataConfig and TrainConfig (dlm/config.py) is a flag
(``--d-model``, ``--seq-len``, ``--no-kernels``, ...). Precedence: defaults < preset < config
file (JSON or TOML with [model], [data], [train] tables and an optional top-level preset) <
flags. ``--resume`` continues from ``<out>/checkpoint.safetensors``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from dlm.config import PRESETS, Config, DataConfig, ModelConfig, TrainConfig

SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    for section, cls in SECTIONS.items():
        group = p.add_argument_group(f"{section} config ({cls.__name__})")
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            kind = {"int": int, "float": float, "str": str, "bool": bool}[str(f.type)]
            if kind is bool:
                group.add_argument(
                    flag,
                    dest=f"{section}.{f.name}",
                    default=None,
                    action=argparse.BooleanOptionalAction,
                )
            else:
                group.add_argument(
                    flag,
                    dest=f"{section}.{f.name}",
                    default=None,
                    type=kind,
                    metavar=kind.__name__.upper(),
                )


def _load_file(path: str) -> dict:
    if path.endswith(".toml"):
        import tomllib

        with open(path, "rb") as f:
            return tomllib.load(f)
    with open(path) as f:
        return json.load(f)


def build_config(args: argparse.Namespace) -> Config:
    """Defaults < preset < config file < flags."""
    file_cfg = _load_file(args.config) if args.config else {}
    preset = args.preset or file_cfg.get("preset")
    merged = {s: {} for s in SECTIONS}
    if preset:
        if preset not in PRESETS:
            raise SystemExit(f"dlm: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        for s in SECTIONS:
            merged[s].update(PRESETS[preset].get(s, {}))
    for s in SECTIONS:
        unknown = set(file_cfg.get(s, {})) - {f.name for f in dataclasses.fields(SECTIONS[s])}
        if unknown:
            raise SystemExit(f"dlm: unknown keys in [{s}] of {args.config}: {sorted(unknown)}")
        merged[s].update(file_cfg.get(s, {}))
    for key, value in vars(args).items():
        if "." in key and value is not None:
            s, name = key.split(".", 1)
            merged[s][name] = value
    return Config.from_dict(merged)


def cmd_train(args: argparse.Namespace) -> int:
    from dlm.trainer import Trainer

    cfg = build_config(args)
    trainer = Trainer(cfg, resume=args.resume)
    summary = trainer.fit()
    if trainer.rank == 0 and "val_nats_per_char" in summary:
        print(
            f"done: {summary['step']} steps in {summary['train_time_s']:.0f} s "
            f"({summary['tokens_per_s']:,.0f} tokens/s); validation ELBO "
            f"{summary['val_nats_per_char']:.3f} nats/char "
            f"({summary['val_bits_per_token']:.3f} bits/token); outputs in {cfg.train.out}/"
        )
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlm", description="Masked diffusion language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a model (see dlm/config.py for every option)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from a named configuration")
    p.add_argument("--config", help="JSON or TOML file with [model], [data], [train] tables")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint")
    _add_config_flags(p)
    p.set_defaults(func=cmd_train)
    from dlm import cli_generate  # dlm sample, dlm eval

    cli_generate.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
