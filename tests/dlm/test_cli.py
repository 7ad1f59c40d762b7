"""The dlm command's errors: a bad argument or an expected user error is one line
`dlm <cmd>: error: ...` (after argparse's one-line usage) and exit status 2; bugs keep their
traceback; every `dlm train` flag has help."""

import argparse

import pytest
import torch

from dlm import cli_generate
from dlm.cli import main, make_parser

# (argv, what the error line must say); {tmp} is the test's folder. None of these needs a model.
CASES = {
    "checkpoint-is-a-folder": (["sample", "--checkpoint", "{tmp}"], "is a directory"),
    "checkpoint-missing": (["sample", "--checkpoint", "{tmp}/no.safetensors"], "no such file"),
    "checkpoint-not-safetensors": (["eval", "--checkpoint", "{tmp}/text.txt"], "not a readable"),
    "num-0": (["sample", "--checkpoint", "x", "--num", "0"], "--num: must be >= 1, got 0"),
    "steps-negative": (["sample", "--checkpoint", "x", "--steps", "-1"], "--steps: must be >= 1"),
    "top-p-above-1": (["sample", "--checkpoint", "x", "--top-p", "1.5"], "--top-p: must be in"),
    "device-typo": (["sample", "--checkpoint", "x", "--device", "gpu"], "--device: expected"),
    "cuda-graph-on-cpu": (
        ["sample", "--checkpoint", "x", "--device", "cpu", "--cuda-graph"],
        "--cuda-graph needs a CUDA device, got --device cpu",
    ),
    "windows-0": (["eval", "--checkpoint", "x", "--windows", "0"], "--windows: must be >= 1"),
    # Reported by the subcommand's own parser, not the top-level one.
    "train-unknown-flag": (["train", "--bogus", "--out", "{tmp}/out"], "unrecognized arguments"),
    "sample-unknown-flag": (
        ["sample", "--checkpoint", "x", "--tempreature", "0.5"],
        "unrecognized arguments: --tempreature 0.5",
    ),
    "seq-len-0": (["eval", "--checkpoint", "x", "--seq-len", "0"], "--seq-len: must be >= 1"),
    "eval-data-missing": (["eval", "--checkpoint", "x", "--data", "{tmp}/no.txt"], "--data: no"),
    "train-steps-negative": (["train", "--steps", "-5", "--out", "{tmp}/out"], "must be >= 1"),
    "train-lr-text": (["train", "--lr", "fast", "--out", "{tmp}/out"], "expected a float"),
    "train-schedule": (["train", "--schedule", "cosin", "--out", "{tmp}/out"], "one of 'linear'"),
    "train-config-missing": (["train", "--config", "{tmp}/no.toml"], "--config: no such file"),
    "train-config-broken": (["train", "--config", "{tmp}/broken.toml"], "--config {tmp}/broken"),
    "train-config-bad-value": (["train", "--config", "{tmp}/neg.toml"], "--batch-size (train."),
    "train-data-missing": (["train", "--data", "{tmp}/no", "--out", "{tmp}/out"], "--data"),
    "train-tokenizer-missing": (
        ["train", "--tokenizer", "{tmp}/tok.json", "--out", "{tmp}/out"],
        "--tokenizer",
    ),
    "train-override-alone": (["train", "--override-config", "--out", "{tmp}/out"], "--resume"),
    "train-resume-nothing": (["train", "--resume", "--out", "{tmp}/out"], "no checkpoint at"),
    "train-force-resume": (["train", "--resume", "--force", "--out", "{tmp}/out"], "--force"),
    # Id 5 is a character of the corpus: every one of them would read as masked.
    "train-mask-id-is-a-token": (
        ["train", "--mask-token-id", "5", "--out", "{tmp}/out"],
        "mask_token_id 5 is one of the tokenizer's own ids",
    ),
}
# Train cases also get a tiny model: code that accepted a case would train for a second, not
# for the default config's hour.
TINY = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--seq-len", "16", "--batch-size",
        "2", "--eval-every", "0", "--eval-batches", "1", "--no-progress"]  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_user_errors_are_one_line_and_exit_2(case, tmp_path, capsys):
    (tmp_path / "text.txt").write_text("not a checkpoint")
    (tmp_path / "broken.toml").write_text("[train\nsteps = 3\n")
    (tmp_path / "neg.toml").write_text("[train]\nbatch_size = -1\n")
    argv, expected = CASES[case]
    argv = [a.format(tmp=tmp_path) for a in argv]
    if argv[0] == "train" and "--config" not in argv:
        argv += TINY + ([] if "--steps" in argv else ["--steps", "2"])
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert info.value.code == 2, err
    assert "Traceback" not in err
    assert len(lines) <= 2 and (len(lines) == 1 or lines[0].startswith("usage: ")), err
    assert lines[-1].startswith(f"dlm {argv[0]}: error: "), err
    assert expected.format(tmp=tmp_path) in lines[-1], err
    assert not (tmp_path / "out").exists()  # a refused run writes nothing


def test_cuda_without_cuda_is_a_user_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as info:
        main(["sample", "--checkpoint", "x", "--device", "cuda"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("dlm sample: error: --device cuda:") and "use --device cpu" in err


def test_debug_switch_and_bugs_keep_the_traceback(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("DLM_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(["sample", "--checkpoint", str(tmp_path / "no.safetensors")])
    monkeypatch.delenv("DLM_DEBUG")

    def bug(args):
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr(cli_generate, "_load", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["sample", "--checkpoint", "x"])

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_generate, "_load", interrupted)
    try:
        rc = main(["sample", "--checkpoint", "x"])
    except KeyboardInterrupt:  # would stop the whole pytest session: turn it into a failure
        pytest.fail("KeyboardInterrupt escaped dlm's main")
    assert rc == 130
    assert capsys.readouterr().err == "dlm sample: interrupted\n"


def test_every_flag_has_help():
    parser = make_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("train", "sample", "eval"):
        p = sub.choices[command]
        missing = [a.option_strings[0] for a in p._actions if a.option_strings and not a.help]
        assert not missing, (command, missing)
    train = sub.choices["train"].format_help()
    assert "--seq-len INT" in train and "tokens per training sequence (default: 256)" in train
    assert "--lr FLOAT" in train and "peak learning rate" in train


def test_new_run_never_overwrites_a_checkpoint_unasked(tmp_path, capsys):
    """A second `dlm train --out DIR` without --resume would overwrite the first run's model: it
    is a one-line error naming the checkpoint and its step, the file is left untouched, and
    --force starts the new run over it."""
    out = tmp_path / "out"
    argv = ["train", "--out", str(out), "--steps", "2", "--no-kernels", *TINY]
    assert main(argv) == 0
    ckpt = out / "checkpoint.safetensors"
    before = ckpt.read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv[:4] + ["3"] + argv[5:])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1, err
    assert f"{ckpt} already holds a checkpoint (step 2 of 2): --resume continues" in err
    assert "--force starts a new one" in err
    assert ckpt.read_bytes() == before
    assert main(argv[:4] + ["3"] + argv[5:] + ["--force"]) == 0
    from dlm.trainer import read_checkpoint_step

    assert read_checkpoint_step(str(ckpt)) == (3, 3)


def test_sample_bans_the_special_tokens_in_place():
    # dlm sample never draws the tokenizer's special tokens (besides mask and EOS): their
    # logits are -inf, through a tensor index that a CUDA graph can capture (a Python list
    # index would be copied to the GPU with a blocking copy at every call).
    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(7))

        def forward(self, input_ids, **kw):
            return self.w.expand(*input_ids.shape, 7).clone()

    inner = Fixed()
    ids = torch.zeros(2, 3, dtype=torch.long)
    out = cli_generate._Banned(inner, [1, 4])(ids)
    ref = inner(ids)
    assert torch.isinf(out[..., [1, 4]]).all() and (out[..., [1, 4]] < 0).all()
    keep = [0, 2, 3, 5, 6]
    assert torch.equal(out[..., keep], ref[..., keep])
    assert isinstance(cli_generate._Banned(inner, [1, 4]).banned, torch.Tensor)
    assert torch.equal(cli_generate._Banned(inner, [])(ids), ref)


def test_sample_and_eval_use_the_mask_id_the_model_was_trained_with(tmp_path, monkeypatch):
    """A model trained with its own mask id (one past the tokenizer's ids) must be sampled and
    scored with that id, not the tokenizer's mask."""
    out = tmp_path / "out"
    assert main(["train", "--out", str(out), "--steps", "1", "--no-kernels", *TINY,
                 "--vocab-size", "200", "--mask-token-id", "199"]) == 0  # fmt: skip
    seen = {}

    def fake_generate(model, ids, am, **kw):
        seen["sample"] = kw["mask_id"]
        tail = torch.ones(ids.shape[0], kw["gen_length"], dtype=ids.dtype, device=ids.device)
        return torch.cat([ids, tail], 1)

    def fake_elbo(model, x, **kw):
        seen["eval"] = kw["mask_id"]
        return torch.ones(x.shape[0], device=x.device), torch.ones(x.shape[0], device=x.device)

    monkeypatch.setattr(cli_generate, "generate", fake_generate)
    monkeypatch.setattr("dlm.likelihood.elbo", fake_elbo)
    ckpt = str(out / "checkpoint.safetensors")
    assert main(["sample", "--checkpoint", ckpt, "--length", "4", "--steps", "2"]) == 0
    assert main(["eval", "--checkpoint", ckpt, "--windows", "1", "--mc-num", "2"]) == 0
    assert seen == {"sample": 199, "eval": 199}


def test_unwritable_out_is_a_user_error_before_training(tmp_path, monkeypatch, capsys):
    """A read-only --out (EROFS is an OSError, not a PermissionError) is a one-line error at
    start, not a traceback at the first metrics write."""
    import errno
    import os

    real = os.makedirs

    def read_only(path, *a, **k):
        if str(path).startswith(str(tmp_path)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "makedirs", read_only)
    argv = ["train", "--out", str(tmp_path / "out"), "--steps", "2", "--no-kernels", *TINY]
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert "cannot create it (Read-only file system)" in err
    monkeypatch.setattr(os, "makedirs", real)
    monkeypatch.setattr(os, "access", lambda p, mode: not str(p).startswith(str(tmp_path)))
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and "not writable" in capsys.readouterr().err


def test_sample_warns_of_prompt_characters_outside_the_vocabulary(capsys):
    from dlm.data import CharTokenizer

    tok = CharTokenizer("ROMEO: ?")
    ids, _, _ = cli_generate._prompts(tok, ["ROMEO: ñ€", "ROMEO:"], 1, "cpu")
    err = capsys.readouterr().err
    assert "'ñ', '€'" in err and "read as '?'" in err, err
    assert tok.decode(ids[0, -2:].tolist()) == "??"
    cli_generate._prompts(tok, ["ROMEO:"], 1, "cpu")
    assert capsys.readouterr().err == ""
