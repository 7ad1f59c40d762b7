"""The trainer: exact resume, 2-process DDP (and FSDP2) on gloo, the CLI end to end,
SIGINT / SIGTERM (save, then resume exactly), resuming with the checkpoint's config."""

import faulthandler
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open
from safetensors.torch import load_file

from dlm.cli import main
from dlm.config import Config, DataConfig, ModelConfig, TrainConfig
from dlm.trainer import CHECKPOINT, Trainer, TrainingInterrupted, load_model

quiet = lambda *a, **k: None  # noqa: E731


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
    # log_every 2 and a stop at step 3: the stop must not add a loss row of its own.
    full = Trainer(small_config(tmp_path / "full", log_every=2))
    full.fit()
    cut = Trainer(small_config(tmp_path / "cut", log_every=2))
    cut.fit(stop_at=3)
    assert cut.step == 3 and os.path.exists(tmp_path / "cut" / CHECKPOINT)
    resumed = Trainer(small_config(tmp_path / "cut", log_every=2), resume=True)
    assert resumed.step == 3
    resumed.fit()
    a = load_file(str(tmp_path / "full" / CHECKPOINT))
    b = load_file(str(tmp_path / "cut" / CHECKPOINT))
    assert a.keys() == b.keys() and any(k.startswith("optim.") for k in a)
    for k in a:  # weights, EMA, AdamW moments, RNG: bit for bit
        assert torch.equal(a[k], b[k]), k
    rows = lambda p: [json.loads(x) for x in open(p / "metrics.jsonl")]  # noqa: E731
    la = [(r["step"], r["loss"]) for r in rows(tmp_path / "full") if "loss" in r]
    lb = [(r["step"], r["loss"]) for r in rows(tmp_path / "cut") if "loss" in r]
    assert la == lb and [s for s, _ in la] == [2, 4, 6]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_env(rank, world, port):
    """The environment torch.distributed's env:// init reads, for one process of a local run.
    A worker still running after 150 s (a run takes seconds) prints every thread's stack and
    exits: a hang then fails its test, with where it hung in the captured stderr, instead of
    blocking mp.spawn forever or reaching the signal test's 240 s deadline with no trace."""
    faulthandler.dump_traceback_later(150, exit=True)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )


def _exit_without_teardown() -> None:
    """End a worker once its results are written and ``Trainer.close`` returned. Python's
    teardown of the DDP / gloo objects still alive can deadlock in torch's C++ destructors
    (a gloo worker thread waiting for the GIL that the thread joining it holds; pytorch#179291
    describes it): seen once in CI, where the test's subject, the trainer's protocol up to
    close(), had finished. Those destructors are torch's, not ours to test."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _worker(rank, world, port, cfg_dict, result_path):
    _dist_env(rank, world, port)
    torch.set_num_threads(1)
    import torch.distributed as dist

    tr = Trainer(Config.from_dict(cfg_dict), log=lambda *a, **k: None)
    losses = [tr.train_step()["loss"] for _ in range(3)]
    tr.save()  # collective (gathers FSDP shards); rank 0 writes
    tr.close()  # barrier, then the group the trainer started is destroyed
    if rank == 0:
        torch.save({"losses": losses, "closed": not dist.is_initialized()}, result_path)
    _exit_without_teardown()


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
    assert torch.load(result)["closed"]
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


# ---- interruption and resume -------------------------------------------------------------------
def signal_config(out, **train) -> Config:
    """8 steps of 2 micro-batches; checkpoints every 2 steps, validation every 3. One thread
    everywhere (also in subprocesses) so that runs compare bit for bit."""
    kw = dict(steps=8, grad_accum=2, eval_every=3, save_every=2, threads=1, device="cpu")
    return small_config(out, **{**kw, **train})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run that interrupted + resumed runs must equal."""
    out = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    try:
        Trainer(signal_config(out), log=quiet).fit()
    finally:
        torch.set_num_threads(threads)
    return out


def checkpoint_step(out) -> int:
    with safe_open(str(out / CHECKPOINT), "pt") as f:
        return json.loads(f.metadata()["state"])["step"]


def assert_same_run(a, b):
    """Weights, EMA, AdamW moments, RNG bit for bit; the same metric rows (timings aside)."""
    ta, tb = load_file(str(a / CHECKPOINT)), load_file(str(b / CHECKPOINT))
    assert ta.keys() == tb.keys() and any(k.startswith("optim.") for k in ta)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    rows = lambda p: [  # noqa: E731
        {k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in open(p)
    ]
    assert rows(a / "metrics.jsonl") == rows(b / "metrics.jsonl")


# Runs `dlm train --config FILE` and sends itself SIG during step AT (between the two
# micro-batches' work: the step must still finish), then SIG again while the checkpoint is being
# written (after the temp file, before its rename).
SIGNAL_DRIVER = r"""
import os, signal, sys
import safetensors.torch
import dlm.trainer as T
from dlm.cli import main

sig, at, config = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
# As in a terminal: a test run started in the background (CI) inherits SIGINT ignored, and the
# trainer leaves an ignored signal ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)
sent = []
micro_loss = T.Trainer._micro_loss
def micro_loss_then_signal(self, *args, **kwargs):
    if self.step == at - 1 and not sent:
        sent.append(sig)
        os.kill(os.getpid(), sig)
    return micro_loss(self, *args, **kwargs)
save_file = safetensors.torch.save_file
def save_file_then_signal(*args, **kwargs):
    save_file(*args, **kwargs)
    if sent:
        os.kill(os.getpid(), sig)
T.Trainer._micro_loss = micro_loss_then_signal
safetensors.torch.save_file = save_file_then_signal
sys.exit(main(["train", "--config", config]))
"""


def test_sigint_saves_the_current_step_and_resumes_exactly(tmp_path, reference, capsys):
    """dlm train in a subprocess: SIGINT in step 5 (the last checkpoint is at 4) and again during
    the save -> exit 130, one line saying how to resume, a checkpoint at step 5 and no temp file;
    `dlm train --out DIR --resume` alone then equals the uninterrupted run bit for bit."""
    out = tmp_path / "run"
    config = tmp_path / "run.json"
    config.write_text(signal_config(out).to_json())
    proc = subprocess.run(
        [sys.executable, "-c", SIGNAL_DRIVER, str(int(signal.SIGINT)), "5", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (
        f"dlm train: interrupted by SIGINT: step 5 saved to {out / CHECKPOINT}; "
        f"resume with: dlm train --out {out} --resume"
    )
    assert checkpoint_step(out) == 5
    assert sorted(os.listdir(out)) == [CHECKPOINT, "metrics.jsonl"]  # no temp file left
    assert main(["train", "--out", str(out), "--resume"]) == 0  # the config comes from the run
    assert "resumed from" in capsys.readouterr().out
    assert_same_run(reference, out)


def test_sigterm_stops_fit_restores_handlers_and_resumes_exactly(tmp_path, reference, monkeypatch):
    """The library path: SIGTERM during step 3 -> TrainingInterrupted (exit code 143) after a
    checkpoint at step 3; the caller's SIGTERM handler is back afterwards."""

    def callers_handler(signum, frame):
        raise AssertionError("SIGTERM reached the caller's handler during fit")

    micro_loss, sent = Trainer._micro_loss, []

    def micro_loss_then_signal(self, *args, **kwargs):
        if self.step == 2 and not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGTERM)
        return micro_loss(self, *args, **kwargs)

    sigint_before = signal.getsignal(signal.SIGINT)
    previous = signal.signal(signal.SIGTERM, callers_handler)
    try:
        trainer = Trainer(signal_config(tmp_path), log=quiet)
        monkeypatch.setattr(Trainer, "_micro_loss", micro_loss_then_signal)
        with pytest.raises(TrainingInterrupted) as info:
            trainer.fit()
        assert signal.getsignal(signal.SIGTERM) is callers_handler
        assert signal.getsignal(signal.SIGINT) is sigint_before
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert (info.value.signum, info.value.exit_code, info.value.step) == (signal.SIGTERM, 143, 3)
    assert checkpoint_step(tmp_path) == 3
    monkeypatch.undo()
    Trainer(signal_config(tmp_path), resume=True, log=quiet).fit()
    assert_same_run(reference, tmp_path)


def _signal_worker(rank, world, port, cfg_dict, result_dir):
    _dist_env(rank, world, port)
    import torch.distributed as dist

    trainer = Trainer(Config.from_dict(cfg_dict), log=quiet)
    if rank == 1:  # only rank 1 is signalled, during step 3
        micro_loss = trainer._micro_loss

        def micro_loss_then_signal(*args, **kwargs):
            if trainer.step == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return micro_loss(*args, **kwargs)

        trainer._micro_loss = micro_loss_then_signal
    try:
        trainer.fit()
        outcome = {"step": trainer.step, "signum": 0}
    except TrainingInterrupted as e:
        outcome = {"step": e.step, "signum": e.signum}
    trainer.close()
    outcome["closed"] = not dist.is_initialized()
    with open(os.path.join(result_dir, f"{rank}.json"), "w") as f:
        json.dump(outcome, f)
    _exit_without_teardown()


def test_signal_on_one_of_two_processes_stops_both_after_the_same_step(tmp_path):
    """DDP on gloo: SIGTERM reaches rank 1 only; both ranks agree at the step boundary, save
    together and stop at step 3 (no deadlock, no rank left training)."""
    cfg = small_config(tmp_path / "run", steps=6, eval_every=0, ema_decay=0.0, threads=1,
                       device="cpu")  # fmt: skip
    ctx = mp.start_processes(
        _signal_worker,
        args=(2, _free_port(), cfg.to_dict(), str(tmp_path)),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two processes did not finish: deadlock after the signal")
    outcomes = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert outcomes == [{"step": 3, "signum": int(signal.SIGTERM), "closed": True}] * 2
    assert checkpoint_step(tmp_path / "run") == 3


def _slow_sample_worker(rank, world, port, cfg_dict, result_dir):
    _dist_env(rank, world, port)
    torch.set_num_threads(1)
    import datetime
    import functools

    import torch.distributed as dist

    # The trainer's group with a 5 s collective timeout (NCCL's default is 10 minutes), and an
    # end-of-training sample that takes longer: a process that skipped sampling would wait at
    # close()'s barrier past the timeout.
    dist.init_process_group = functools.partial(
        dist.init_process_group, timeout=datetime.timedelta(seconds=5)
    )
    calls = []

    def slow_sample(self, n, *args, **kwargs):
        calls.append(n)
        time.sleep(8)
        return ["sample"] * n

    Trainer.sample = slow_sample
    trainer = Trainer(Config.from_dict(cfg_dict), log=quiet)
    summary = trainer.fit()
    trainer.close()
    outcome = {"sampled": calls, "closed": not dist.is_initialized(),
               "samples": summary.get("samples")}  # fmt: skip
    with open(os.path.join(result_dir, f"slow{rank}.json"), "w") as f:
        json.dump(outcome, f)
    _exit_without_teardown()


def test_end_of_training_samples_keep_every_process_in_step(tmp_path):
    """DDP on gloo: the end-of-training sample runs on every process (rank 0 alone returns
    and writes them), so no process waits at close()'s barrier while another samples."""
    cfg = small_config(tmp_path / "run", steps=2, eval_every=0, ema_decay=0.0, threads=1,
                       samples=2, device="cpu")  # fmt: skip
    mp.spawn(_slow_sample_worker, args=(2, _free_port(), cfg.to_dict(), str(tmp_path)),
             nprocs=2, join=True)  # fmt: skip
    outcomes = [json.loads((tmp_path / f"slow{r}.json").read_text()) for r in range(2)]
    assert outcomes[0] == {"sampled": [2], "closed": True, "samples": ["sample"] * 2}
    assert outcomes[1] == {"sampled": [2], "closed": True, "samples": None}
    assert (tmp_path / "run" / "samples.txt").read_text().count("--- sample") == 2


def _cli_worker(rank, world, port, argv, result_dir):
    _dist_env(rank, world, port)
    torch.set_num_threads(1)
    import torch.distributed as dist

    import dlm.cli

    code = main(argv)
    outcome = {"code": code, "closed": not dist.is_initialized(),
               "exit_without_teardown": dlm.cli._DISTRIBUTED_RUN_ENDED}  # fmt: skip
    with open(os.path.join(result_dir, f"cli{rank}.json"), "w") as f:
        json.dump(outcome, f)
    _exit_without_teardown()


def test_cli_under_two_processes_ends_the_process_group(tmp_path):
    """`dlm train` as torchrun starts it: both ranks train, the final evaluation runs on both,
    and each returns 0 with the process group it started ended (Trainer.close)."""
    out = tmp_path / "run"
    argv = ["train", "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--seq-len", "16",
            "--batch-size", "4", "--steps", "2", "--eval-every", "0", "--eval-batches", "1",
            "--no-progress", "--device", "cpu", "--out", str(out)]  # fmt: skip
    mp.spawn(_cli_worker, args=(2, _free_port(), argv, str(tmp_path)), nprocs=2, join=True)
    outcomes = [json.loads((tmp_path / f"cli{r}.json").read_text()) for r in range(2)]
    assert outcomes == [{"code": 0, "closed": True, "exit_without_teardown": True}] * 2
    assert checkpoint_step(out) == 2


def test_dlm_command_exits_without_teardown_after_a_distributed_run(monkeypatch):
    """run() (the console script): sys.exit(status) normally; os._exit(status), streams flushed,
    once a multi-process dlm train has ended its process group."""
    import dlm.cli

    class Exited(Exception):
        pass

    def fake_exit(code):
        raise Exited(code)

    monkeypatch.setattr(dlm.cli.os, "_exit", fake_exit)
    monkeypatch.setattr(dlm.cli, "main", lambda: 3)
    with pytest.raises(SystemExit) as info:
        dlm.cli.run()
    assert info.value.code == 3
    monkeypatch.setattr(dlm.cli, "_DISTRIBUTED_RUN_ENDED", True)
    with pytest.raises(Exited) as info:
        dlm.cli.run()
    assert info.value.args == (3,)


def test_resume_takes_the_checkpoint_config_and_refuses_inexact_changes(
    tmp_path, reference, capsys
):
    out = tmp_path / "run"
    shutil.copytree(reference, out)

    def fails(*argv) -> str:
        with pytest.raises(SystemExit) as info:
            main(["train", *argv])
        err = capsys.readouterr().err
        assert info.value.code == 2 and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1 and err.startswith("dlm train: error: ")
        return err

    tiny = ["--steps", "1", "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--seq-len",
            "16", "--batch-size", "2", "--eval-every", "0", "--eval-batches", "1"]  # fmt: skip
    err = fails("--out", str(tmp_path / "none"), "--resume", *tiny)
    assert "no checkpoint at" in err and not (tmp_path / "none").exists()
    err = fails("--out", str(out), "--resume", "--seq-len", "16", "--lr", "0.5", "--no-progress")
    assert "--seq-len" in err and "--lr" in err and "--override-config" in err
    assert "--no-progress" not in err and "--progress" not in err  # a free setting
    err = fails("--out", str(out), "--resume", "--d-model", "64", "--override-config")
    assert "--d-model" in err and "shapes" in err
    err = fails("--out", str(out), "--resume", "--steps", "7")
    assert "below the checkpoint's step 8" in err
    # The library checks the same: a changed config is refused, accepted with override_config.
    changed = signal_config(out, lr=0.5)
    with pytest.raises(ValueError, match="lr 0.003 -> 0.5"):
        Trainer(changed, resume=True, log=quiet)
    trainer = Trainer(changed, resume=True, override_config=True, log=quiet)
    assert trainer.step == 8 and trainer.cfg.train.lr == 0.5
    # --out and --resume alone: the run's own config (d_model 32, seq_len 32), one more step.
    assert main(["train", "--out", str(out), "--resume", "--steps", "9"]) == 0
    assert checkpoint_step(out) == 9
    assert "steps 8 -> 9" in capsys.readouterr().out


def test_resume_drops_a_torn_last_metrics_line_and_names_a_bad_one(tmp_path, reference):
    """A cut-off last line of metrics.jsonl (disk full or power cut mid-write) must not block a
    resume: it is dropped. A damaged line before the last is an error naming the file."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    rows = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text(rows + '{"step": 9, "lo')
    Trainer(signal_config(out), resume=True, log=quiet).fit()
    assert (out / "metrics.jsonl").read_text() == rows
    lines = rows.splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:1] + ['{"step": 2, "lo\n'] + lines[1:]))
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not a metrics row"):
        Trainer(signal_config(out), resume=True, log=quiet).fit()


def test_finished_run_resume_adds_no_row_and_stale_temp_files_go(tmp_path, reference, monkeypatch):
    """Resuming a finished run keeps metrics.jsonl as it is; a temp checkpoint whose writer died
    (kill -9 during a save) is deleted, one of a live process is kept; a save that fails leaves
    no temp file and the previous checkpoint."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    rows = (out / "metrics.jsonl").read_text()
    dead, dead2 = (subprocess.Popen([sys.executable, "-c", "pass"]) for _ in range(2))
    dead.wait()
    dead2.wait()
    (out / f"{CHECKPOINT}.tmp-{dead.pid}").write_bytes(b"partial")  # an older version's file
    # A save's staging folder, with the hidden temp file safetensors writes before its rename.
    (out / f"{CHECKPOINT}.tmp-{dead2.pid}").mkdir()
    (out / f"{CHECKPOINT}.tmp-{dead2.pid}" / ".tmpAb3xYz").write_bytes(b"partial")
    (out / f"{CHECKPOINT}.tmp-1").write_bytes(b"pid 1 is alive")
    trainer = Trainer(signal_config(out), resume=True, log=quiet)
    assert not (out / f"{CHECKPOINT}.tmp-{dead.pid}").exists()
    assert not (out / f"{CHECKPOINT}.tmp-{dead2.pid}").exists()
    assert (out / f"{CHECKPOINT}.tmp-1").exists()
    summary = trainer.fit()
    assert (out / "metrics.jsonl").read_text() == rows
    assert summary["val_nats_per_char"] == json.loads(rows.splitlines()[-1])["val_nats_per_char"]

    before = load_file(str(out / CHECKPOINT))
    trainer.step += 1  # a state the file does not hold yet

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        trainer.save()
    monkeypatch.undo()
    assert sorted(os.listdir(out)) == sorted(
        [CHECKPOINT, f"{CHECKPOINT}.tmp-1", "metrics.jsonl", "loss.png"]
    )
    after = load_file(str(out / CHECKPOINT))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_refuses_changed_data(tmp_path):
    """The checkpoint's data position refers to the token arrays it was trained on: resuming
    over edited data (or a changed split rule) is refused unless asked for."""
    text = tmp_path / "text.txt"
    text.write_text("".join(f"line {i} of a small corpus, with some words.\n" for i in range(400)))
    cfg = small_config(tmp_path / "run", steps=3)
    cfg.data = DataConfig(data=str(text), seq_len=32)
    Trainer(cfg, log=quiet).fit(stop_at=2)
    text.write_text(text.read_text().replace("words", "other words"))
    with pytest.raises(ValueError, match="training data .* differs from the checkpoint"):
        Trainer(cfg, resume=True, log=quiet)
    assert Trainer(cfg, resume=True, override_config=True, log=quiet).step == 2


def test_validation_elbo_does_not_depend_on_the_schedule(tmp_path):
    """The continuous-time ELBO is the same integral under every schedule: the same weights
    evaluated for a run trained with linear, log-linear or geometric report the same bound (the
    schedule's own weights left out the nearly all-masked states where alpha(1) > 0 and could
    report less than the NLL). A time-conditioned model gets the training objective's t."""
    cfgs = [small_config(tmp_path / s, eval_t_samples=2) for s in ("linear", "log-linear")]
    cfgs[1].train.schedule = "log-linear"
    a, b = (Trainer(c, log=quiet) for c in cfgs)
    b.raw_model.load_state_dict(a.raw_model.state_dict())
    for k in a.ema:
        b.ema[k].copy_(a.ema[k])
    assert a.evaluate() == b.evaluate()
    seen = []
    tc = small_config(tmp_path / "t", eval_t_samples=2).train
    tc.schedule = "geometric"
    c = Trainer(Config(ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                                   time_conditioning=True),
                       DataConfig(data="shakespeare", seq_len=32), tc), log=quiet)  # fmt: skip
    forward = c.model.forward

    def spy(*args, **kw):
        seen.append((kw["t"], kw["loss_mask"].float().mean(1)))
        return forward(*args, **kw)

    c.model.forward = spy
    c.evaluate()
    t, frac = (torch.cat(v).cpu() for v in zip(*seen))
    # The model's t is the geometric schedule's time of each drawn masked fraction p, and the
    # fractions are the stratified draws (one offset u from the evaluation seed).
    from dlm.trainer import _eval_times

    u = torch.rand(1, generator=torch.Generator().manual_seed(tc.seed + 2), dtype=torch.float64)
    p = torch.cat([_eval_times(8, r, 2, u, tc.sampling_eps) for r in range(2)])
    p_of_t = 1.0 - c.objective.schedule.alpha(t.double())
    torch.testing.assert_close(p_of_t.sort().values, p.sort().values, rtol=1e-5, atol=1e-6)
    assert (t.double() - p_of_t).abs().max() > 0.05  # t is not the fraction itself
    assert (frac.double() - p_of_t).abs().max() < 0.5  # and the masks follow p


def test_eval_times_stratify_all_passes_together():
    from dlm.trainer import _eval_times

    u = torch.tensor([0.3], dtype=torch.float64)
    t = torch.cat([_eval_times(4, r, 3, u, 0.0) for r in range(3)]).sort().values
    gaps = t.diff()
    torch.testing.assert_close(gaps, torch.full_like(gaps, 1 / 12))
