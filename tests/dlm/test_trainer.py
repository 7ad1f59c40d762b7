"""The trainer: exact resume, 2-process DDP (and FSDP2) on gloo, the CLI end to end."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from dlm.cli import main
from dlm.config import Config, DataConfig, ModelConfig, TrainConfig
from dlm.trainer import CHECKPOINT, Trainer, load_model


def small_config(out, **train) -> Config:
    tc = dict(
        out=str(out),
        steps=6,
        batch_size=8,
        lr=3e-3,
        warmup_steps=2,
        eval_every=3,
        eval_batches=1,
        save_every=0,
        log_every=1,
        ema_decay=0.9,
        progress=False,
        seed=7,
    )
    tc.update(train)
    return Config(
        model=ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1),
        data=DataConfig(data="shakespeare", seq_len=32),
        train=TrainConfig(**tc),
    )


def test_resume_equals_uninterrupted(tmp_path):
    full = Trainer(small_config(tmp_path / "full"))
    full.fit()
    cut = Trainer(small_config(tmp_path / "cut"))
    cut.fit(stop_at=3)
    assert cut.step == 3 and os.path.exists(tmp_path / "cut" / CHECKPOINT)
    resumed = Trainer(small_config(tmp_path / "cut"), resume=True)
    assert resumed.step == 3
    resumed.fit()
    a = load_file(str(tmp_path / "full" / CHECKPOINT))
    b = load_file(str(tmp_path / "cut" / CHECKPOINT))
    assert a.keys() == b.keys() and any(k.startswith("optim.") for k in a)
    for k in a:  # weights, EMA, AdamW moments, RNG: bit for bit
        assert torch.equal(a[k], b[k]), k
    rows = lambda p: [json.loads(x) for x in open(p / "metrics.jsonl")]  # noqa: E731
    la = [r["loss"] for r in rows(tmp_path / "full") if "loss" in r]
    lb = [r["loss"] for r in rows(tmp_path / "cut") if "loss" in r]
    assert la == lb and len(la) == 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, cfg_dict, result_path):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    tr = Trainer(Config.from_dict(cfg_dict), log=lambda *a, **k: None)
    losses = [tr.train_step()["loss"] for _ in range(3)]
    tr.save()  # collective (gathers FSDP shards); rank 0 writes
    if rank == 0:
        torch.save({"losses": losses}, result_path)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_gloo_equal_one_process(tmp_path, mode):
    """2 processes x 4 sequences == 1 process x 8 sequences: same noise, same data rows."""
    # gloo: CPU processes, also on a machine with one GPU (two ranks cannot share cuda:0 here).
    cfg = small_config(tmp_path / "one", ema_decay=0.0, grad_clip=0.5, device="cpu")
    one = Trainer(cfg)
    ref_losses = [one.train_step()["loss"] for _ in range(3)]
    one.save()
    cfg2 = small_config(
        tmp_path / "two", ema_decay=0.0, grad_clip=0.5, distributed=mode, device="cpu"
    )
    result = str(tmp_path / "result.pt")
    mp.spawn(_worker, args=(2, _free_port(), cfg2.to_dict(), result), nprocs=2, join=True)
    losses = torch.load(result)["losses"]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    a = load_file(str(tmp_path / "one" / CHECKPOINT))
    b = load_file(str(tmp_path / "two" / CHECKPOINT))
    for k in a:
        if k.startswith(("model.", "optim.")):
            # Equal up to the order of the gradient all-reduce.
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)


def test_cli_end_to_end(tmp_path, capsys):
    data = tmp_path / "texts"
    data.mkdir()
    for i in range(3):
        (data / f"{i}.txt").write_text("To be, or not to be, that is the question.\n" * 40)
    out = tmp_path / "run"
    toml = tmp_path / "cfg.toml"
    toml.write_text("[model]\nd_model = 32\nn_layers = 1\nn_heads = 2\n[train]\nwarmup_steps = 1\n")
    args = [
        "train",
        "--config",
        str(toml),
        "--data",
        str(data),
        "--seq-len",
        "24",
        "--batch-size",
        "4",
        "--steps",
        "4",
        "--out",
        str(out),
        "--eval-every",
        "2",
        "--eval-batches",
        "1",
        "--samples",
        "2",
        "--sample-len",
        "20",
        "--sample-steps",
        "5",
        "--no-progress",
        "--packing",
        "--no-kernels",
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "validation ELBO" in text and "nats/char" in text and "--- sample 1 ---" in text
    for f in (CHECKPOINT, "metrics.jsonl", "loss.png", "samples.txt"):
        assert (out / f).stat().st_size > 0, f
    # --resume continues from step 4 to 6 (and the config from the file still applies).
    assert (
        main(
            [
                *args[: args.index("--steps")],
                "--steps",
                "6",
                *args[args.index("--steps") + 2 :],
                "--resume",
            ]
        )
        == 0
    )
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [4, 6]  # log_every 10: the last steps
    assert [r["step"] for r in rows if "val_nats_per_char" in r] == [2, 4, 6]
    model, tok, cfg = load_model(str(out / CHECKPOINT))
    assert cfg.model.n_layers == 1 and cfg.data.packing
    logits = model(torch.from_numpy(tok.encode("To be"))[None])
    assert logits.shape == (1, 5, tok.vocab_size)
    with pytest.raises(SystemExit):
        main(["train", "--preset", "no-such-preset"])


@pytest.mark.slow
def test_compile_matches_eager(tmp_path):
    """--compile (torch.compile of the model; the kernels are custom ops) trains the same."""
    losses = {}
    for compiled in (False, True):
        # CPU: float32 on both sides (on a GPU, bf16 autocast and the compiled graph's fused
        # casts would differ in the last bits).
        cfg = small_config(tmp_path / str(compiled), steps=2, eval_every=0, compile=compiled,
                           device="cpu")  # fmt: skip
        tr = Trainer(cfg, log=lambda *a, **k: None)
        losses[compiled] = [tr.train_step()["loss"] for _ in range(2)]
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]),
                               rtol=1e-5, atol=0)  # fmt: skip
