"""Training: AdamW with warm-up + cosine, accumulation, clipping, EMA, validation ELBO,
checkpoints that resume exactly, and DDP / FSDP2 under torchrun.

    trainer = Trainer(get_preset("shakespeare-tiny"))
    summary = trainer.fit()         # writes checkpoint.safetensors, metrics.jsonl, loss.png

Exact resume: the checkpoint (one safetensors file, written to a temp file then renamed) holds
the weights, EMA, AdamW state, the step (the learning rate is a pure function of it), the noise
generator's state and the data stream's position. On CPU a run stopped at step k and resumed
gives bit-identical weights to one that never stopped (tests/dlm/test_trainer.py).

Resume takes the run's config from the checkpoint: settings that would change what a step
computes (data, batch, optimizer, objective, model) must equal the checkpoint's unless
``override_config=True``; shapes of the weights can never change (``RESUME_FREE`` lists what may).

Interruption: during ``fit`` SIGINT and SIGTERM finish the current optimizer step, write the
checkpoint and raise ``TrainingInterrupted`` (``dlm train`` prints where and how to resume and
exits 130 / 143). Further signals while it saves are ignored (SIGKILL still works, and leaves the
previous checkpoint intact: the write is atomic). The previous handlers come back when ``fit``
returns; a signal that is ignored when ``fit`` starts (SIG_IGN: nohup, background jobs) stays
ignored, and outside the main thread nothing is installed. After the final checkpoint of a
finished run (final evaluation, plot, samples) signals have their usual effect: nothing is lost.

Multi-process: every process walks the same data stream and noise generator and keeps its own
rows of each global batch, so N processes compute the loss of the same global batch as one
process (up to the order of the gradient all-reduce). A signal may reach one process only: at
every step boundary the processes all-reduce (max) their pending signal, so all stop after the
same step and write the checkpoint together (the save is collective under FSDP), whichever
process got it. torchrun forwards SIGINT / SIGTERM to every worker and kills them after
``--shutdown-timeout`` (30 s by default): leave the save that much time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shlex
import shutil
import signal
import threading
import time

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from dlm.ancestral import ancestral_sample
from dlm.config import Config
from dlm.data import TokenStream, build_tokenizer, load_documents, tokenizer_from_json
from dlm.loss import DiffusionObjective
from dlm.model import DiffusionLM
from dlm.schedules import Linear

CHECKPOINT = "checkpoint.safetensors"

# What a resumed run may change without override_config: where it writes, how often it logs,
# evaluates, saves and samples, how long it runs (the cosine schedule then follows the new
# length) and how it executes (device, threads, compile, recomputation: the same arithmetic up to
# rounding order, so bit-exact only on the same device and thread count; with dtype "auto" a
# move to CUDA also turns bf16 autocast on). Anything else changes what a step computes.
RESUME_FREE = {
    "model": {"gradient_checkpointing"},
    "data": set(),
    "train": {
        "out",
        "steps",
        "eval_every",
        "eval_batches",
        "eval_t_samples",
        "save_every",
        "log_every",
        "device",
        "threads",
        "compile",
        "progress",
        "samples",
        "sample_len",
        "sample_steps",
        "sample_temperature",
    },
}
# The shapes of the weights: a checkpoint cannot be loaded into a model with other values.
RESUME_FIXED = {
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "d_ff",
    "qkv_bias",
    "tie_embeddings",
    "time_conditioning",
}


class TrainingInterrupted(Exception):
    """``fit`` stopped on SIGINT / SIGTERM after saving a checkpoint at ``step``.

    signum: the signal; exit_code: 128 + signum (the shell's convention: 130, 143);
    checkpoint: the file written; str(): where and how to resume.
    """

    def __init__(self, signum: int, step: int, checkpoint: str, out: str):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(
            f"interrupted by {name}: step {step} saved to {checkpoint}; resume with: "
            f"dlm train --out {shlex.quote(out)} --resume"
        )


class _StopOnSignal:
    """Within ``with``: SIGINT / SIGTERM set ``signum`` instead of stopping the process; ``fit``
    reads it at step boundaries. Restores the previous handlers on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool):
        self.signum = 0
        self._announce = announce
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # signal.signal only works in the main thread
        for sig in self.SIGNALS:
            prev = signal.getsignal(sig)
            if prev is signal.SIG_IGN:
                continue  # nohup / a background job: the caller chose to ignore it
            self._previous[sig] = prev
            signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, prev in self._previous.items():
            # None: a handler not installed from Python; the default is the closest we can do.
            signal.signal(sig, signal.SIG_DFL if prev is None else prev)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if not self.signum:
            self.signum = signum
            return
        if self._announce:
            # os.write, not print: the handler may run in the middle of a print to the same
            # stream, and a reentrant print raises.
            with contextlib.suppress(OSError):
                os.write(
                    2,
                    b"dlm: already stopping: finishing the step and writing the checkpoint "
                    b"(kill -9 aborts it; the previous checkpoint stays intact)\n",
                )


def lr_at(step: int, cfg) -> float:
    """Linear warm-up to lr over warmup_steps, then cosine down to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    ratio = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * ratio


def _init_distributed(device: str) -> tuple[int, int, int, bool]:
    """(rank, world_size, local_rank, started): starts the process group under torchrun;
    started tells whether this call started it (the caller's own group is the caller's to end)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0, False
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    return rank, world, int(os.environ.get("LOCAL_RANK", "0")), started


class Trainer:
    """Builds data, tokenizer, model and optimizer from a Config; ``fit`` trains.

    resume: continue from ``<out>/checkpoint.safetensors`` (FileNotFoundError when there is
        none). ``cfg`` must then equal the checkpoint's config except for the RESUME_FREE
        fields (``read_checkpoint_config`` gives it; vocab_size 0 and mask_token_id -1 match
        the resolved values), else ValueError naming the differences.
    override_config: with resume, accept the differences (not the weight shapes, RESUME_FIXED):
        the run continues from the checkpoint's state with the new settings, no longer exactly.
    log: where rank 0 prints progress lines (print by default).
    """

    def __init__(
        self, cfg: Config, *, resume: bool = False, override_config: bool = False, log=print
    ):
        self.cfg = cfg = dataclasses.replace(cfg)
        tc = cfg.train
        if tc.device == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                "train.device is 'cuda' but torch sees no CUDA device "
                f"(torch {torch.__version__}, torch.cuda.is_available() is False); "
                "use device 'cpu' or 'auto'"
            )
        dev = tc.device if tc.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.rank, self.world, local_rank, self._owns_group = _init_distributed(dev)
        self.device = torch.device(f"cuda:{local_rank}" if dev == "cuda" else dev)
        if dev == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise RuntimeError(
                    f"LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} "
                    "CUDA device(s): start at most one process per GPU (torchrun "
                    "--nproc-per-node), or set train.device = 'cpu' for gloo"
                )
            torch.cuda.set_device(self.device)
        if tc.threads > 0 and self.device.type == "cpu":
            torch.set_num_threads(tc.threads)
        self.log = log if self.rank == 0 else (lambda *a, **k: None)
        self.out = tc.out
        ckpt_path = os.path.join(self.out, CHECKPOINT)
        ckpt, changes = None, []
        if resume:
            if not os.path.isfile(ckpt_path):
                raise FileNotFoundError(
                    f"resume: no checkpoint at {ckpt_path}; start without resume for a new run"
                )
            ckpt = _read_checkpoint(ckpt_path)
            changes = _check_resume_config(ckpt, cfg, override_config)
        else:
            cfg.check_new_run()

        # Data and tokenizer (a resumed run keeps the tokenizer it was trained with).
        train_docs, val_docs = load_documents(cfg.data.data, cfg.data.val_fraction)
        if ckpt is not None:
            self.tokenizer = tokenizer_from_json(ckpt[1]["tokenizer"])
        else:
            self.tokenizer = build_tokenizer(cfg.data.tokenizer, train_docs, val_docs)
        mc = dataclasses.replace(cfg.model)
        if mc.vocab_size <= 0:
            mc.vocab_size = self.tokenizer.vocab_size
        if mc.mask_token_id < 0:
            mc.mask_token_id = self.tokenizer.mask_token_id
        elif (
            mc.mask_token_id < self.tokenizer.vocab_size
            and mc.mask_token_id != self.tokenizer.mask_token_id
            and not self.tokenizer.is_special(mc.mask_token_id)
        ):
            # A real token as the mask: every occurrence of it in the data would read as masked.
            raise ValueError(
                f"mask_token_id {mc.mask_token_id} is one of the tokenizer's own ids; use its "
                f"mask ({self.tokenizer.mask_token_id}, the default -1) or an id past its "
                f"{self.tokenizer.vocab_size} ids (with vocab_size large enough)"
            )
        if mc.vocab_size < self.tokenizer.vocab_size or mc.mask_token_id >= mc.vocab_size:
            raise ValueError(
                f"model vocab_size {mc.vocab_size} / mask_token_id {mc.mask_token_id} do not fit "
                f"the tokenizer ({self.tokenizer.vocab_size} ids); use vocab_size 0 to take it "
                "from the tokenizer"
            )
        cfg.model = mc
        self.train_stream = TokenStream(train_docs, self.tokenizer, cfg.data.seq_len, tc.seed)
        self.val_stream = TokenStream(val_docs, self.tokenizer, cfg.data.seq_len, tc.seed)
        # What the data position in a checkpoint refers to: the token arrays themselves.
        self.data_fingerprint = _fingerprint(self.train_stream.tokens, self.val_stream.tokens)
        stored = json.loads(ckpt[1]["state"]).get("data_fingerprint") if ckpt else None
        if stored is not None and stored != self.data_fingerprint and not override_config:
            raise ValueError(
                "resume: the training data (or its split) differs from the checkpoint's: the "
                "stored data position would point elsewhere and the run would not continue "
                "exactly; restore the data, or pass --override-config to continue anyway"
            )

        # Batch geometry: batch_size sequences per step = world * grad_accum * micro.
        per = self.world * tc.grad_accum
        if tc.batch_size % per:
            raise ValueError(
                f"batch_size {tc.batch_size} must be divisible by world_size x grad_accum = {per}"
            )
        self.micro = tc.batch_size // per
        if self.rank == 0:  # after the checks above: bad input leaves no folder behind
            try:
                os.makedirs(self.out, exist_ok=True)
            except OSError as e:  # a read-only filesystem (EROFS) is not a PermissionError
                raise PermissionError(f"--out {self.out}: cannot create it ({e.strerror})") from e
            if not os.access(self.out, os.W_OK):  # fail now, not at the first metrics write
                raise PermissionError(f"--out {self.out}: not writable")
            for name in _clean_stale_tmp(ckpt_path):
                self.log(f"removed {name}: a partial checkpoint whose writer is gone")

        torch.manual_seed(tc.seed)
        model = DiffusionLM(mc).to(self.device)
        self.raw_model = model
        self.objective = DiffusionObjective(
            mc.mask_token_id,
            tc.schedule,
            tc.weighting,
            tc.objective,
            tc.sampling_eps,
            tc.t_sampling,
            tc.random_length_prob,
        )
        if mc.time_conditioning:
            attach_time_map(model, mc, tc)  # for the samplers and dlm.likelihood
        self.autocast_dtype = None
        if tc.dtype == "bfloat16" or (tc.dtype == "auto" and self.device.type == "cuda"):
            self.autocast_dtype = torch.bfloat16
        self.model = self._wrap(model)
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": tc.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=tc.lr,
            betas=(tc.beta1, tc.beta2),
            fused=self.device.type == "cuda",
        )
        self.ema = None
        if tc.ema_decay > 0:
            if tc.distributed == "fsdp" and self.world > 1:
                raise ValueError("ema_decay > 0 is not supported with FSDP")
            self.ema = {n: p.detach().float().clone() for n, p in model.named_parameters()}
        # The noise generator: t and the masks. Same seed on every process (see module doc).
        self.gen = torch.Generator().manual_seed(tc.seed + 1)
        self.step = 0
        self.tokens_seen = 0
        self.history: list[dict] = []
        self._saved_step = None  # the step the checkpoint on disk holds (None: unknown / stale)
        if ckpt is not None:
            self._load(ckpt)
            if tc.steps < self.step:
                raise ValueError(
                    f"resume: train.steps {tc.steps} is below the checkpoint's step {self.step}"
                )
            # Unchanged config: the file on disk is this state; rewriting it would add nothing.
            self._saved_step = None if changes else self.step
            self.log(f"resumed from {ckpt_path} at step {self.step}")
            if changes:
                self.log("resume: settings changed from the checkpoint's: " + _describe(changes))

    # -----------------------------------------------------------------------------------------
    def _wrap(self, model):
        tc = self.cfg.train
        if tc.compile:
            model = torch.compile(model)
        if self.world == 1:
            return model
        if tc.distributed == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            # fully_shard's default mesh takes CUDA whenever a GPU exists, even for a gloo run
            # on the CPU: name the trainer's device.
            mesh = init_device_mesh(self.device.type, (self.world,))
            for block in self.raw_model.blocks:
                fully_shard(block, mesh=mesh)
            return fully_shard(model, mesh=mesh)
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _rows(self) -> slice:
        return slice(self.rank * self.micro, (self.rank + 1) * self.micro)

    def _micro_loss(self, batch, rows: slice, global_batch: int):
        """Loss of this process's rows of a global micro-batch (see DiffusionObjective.noise)."""
        to = lambda x: None if x is None else x.to(self.device)  # noqa: E731
        with self._autocast():
            loss, _ = self.objective.loss(
                self.model,
                to(batch.input_ids),
                self.gen,
                rows=rows,
                global_batch=global_batch,
                position_ids=to(batch.position_ids),
                cu_seqlens=to(batch.cu_seqlens),
                max_seqlen=batch.max_seqlen,
            )
        return loss

    def train_step(self) -> dict:
        """One optimizer step over batch_size sequences; returns loss, lr, grad_norm."""
        tc = self.cfg.train
        self.model.train()
        lr = lr_at(self.step, tc)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        total = torch.zeros((), device=self.device)
        global_micro = self.micro * self.world
        for i in range(tc.grad_accum):
            batch = self.train_stream.next_batch(global_micro, self.cfg.data.packing, self._rows())
            sync = i == tc.grad_accum - 1 or self.world == 1
            ctx = contextlib.nullcontext()
            if not sync and hasattr(self.model, "no_sync"):
                ctx = self.model.no_sync()
            with ctx:
                loss = self._micro_loss(batch, self._rows(), global_micro)
                (loss / tc.grad_accum).backward()
            total += loss.detach() / tc.grad_accum
        if tc.grad_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        else:
            gnorm = torch.zeros(())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            with torch.no_grad():
                for n, p in self.raw_model.named_parameters():
                    self.ema[n].lerp_(p.detach().float(), 1.0 - tc.ema_decay)
        if self.world > 1:
            dist.all_reduce(total, op=dist.ReduceOp.AVG)
        self.step += 1
        self.tokens_seen += tc.batch_size * self.cfg.data.seq_len
        return {"loss": float(total), "lr": lr, "grad_norm": float(gnorm)}

    @contextlib.contextmanager
    def ema_weights(self):
        """Swap the EMA weights in (no-op without EMA)."""
        if self.ema is None:
            yield
            return
        saved = {n: p.detach().clone() for n, p in self.raw_model.named_parameters()}
        with torch.no_grad():
            for n, p in self.raw_model.named_parameters():
                p.copy_(self.ema[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.raw_model.named_parameters():
                    p.copy_(saved[n])

    @torch.no_grad()
    def evaluate(self, n_batches: int | None = None) -> dict:
        """Validation ELBO: nats and bits per token, nats per character.

        Fixed windows spread over the validation text and a fixed noise seed, so evaluations at
        different steps are comparable; ``eval_t_samples`` stratified draws per window of the
        masked fraction p in [eps, 1], weight 1 / p: the continuous-time ELBO, which does not
        depend on the schedule (an upper bound on the NLL). A time-conditioned model is given
        the training objective's t of p. The training schedule's own weights would leave out the
        nearly all-masked states where alpha(1) > 0 (log-linear, geometric, few discrete
        steps) and could report less than the NLL.
        """
        tc = self.cfg.train
        n_batches = n_batches or tc.eval_batches
        starts = self.val_stream.eval_windows(n_batches * tc.batch_size)
        self.model.eval()
        objective = DiffusionObjective(
            self.objective.mask_token_id, Linear(), "elbo", "mdlm", tc.sampling_eps
        )
        time_of = self.objective.time_of  # masked fraction -> the training objective's t
        gen = torch.Generator().manual_seed(tc.seed + 2)
        u = torch.rand(1, generator=gen, dtype=torch.float64)  # one offset for all passes
        nats = torch.zeros((), dtype=torch.float64)
        tokens = 0
        chunk = max(1, self.micro * tc.grad_accum)
        mine = starts[self.rank :: self.world]
        with self.ema_weights():
            for rep in range(tc.eval_t_samples):
                t_all = _eval_times(len(starts), rep, tc.eval_t_samples, u, tc.sampling_eps)
                t_mine = t_all[self.rank :: self.world]
                for i in range(0, len(mine), chunk):
                    batch = self.val_stream.batch_at(mine[i : i + chunk], self.cfg.data.packing)
                    x0 = batch.input_ids.to(self.device)
                    nz = objective.noise(x0, gen, t=t_mine[i : i + chunk])
                    to = lambda x: None if x is None else x.to(self.device)
                    with self._autocast():
                        s = self.model(
                            nz.x_t,
                            None,
                            to(batch.position_ids),
                            targets=x0,
                            loss_mask=nz.mask,
                            loss_weight=nz.weight,
                            normalizer=1.0,
                            t=time_of(nz.t),
                            cu_seqlens=to(batch.cu_seqlens),
                            max_seqlen=batch.max_seqlen,
                        )
                    nats += s.double().cpu()
                    tokens += x0.numel()
        stats = torch.tensor([float(nats), float(tokens)], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(stats)
        nats_per_token = float(stats[0] / stats[1])
        chars_per_token = self.val_stream.n_chars / len(self.val_stream.tokens)
        return {
            "val_nats_per_token": nats_per_token,
            "val_bits_per_token": nats_per_token / math.log(2),
            "val_nats_per_char": nats_per_token / chars_per_token,
        }

    def sample(
        self, n: int, length: int, steps: int, seed: int = 0, temperature: float = 1.0
    ) -> list[str]:
        """n passages from the ancestral sampler (EMA weights if any), decoded. Under FSDP
        every process must call it (the sharded model's forward is collective)."""
        fsdp = self.world > 1 and self.cfg.train.distributed == "fsdp"
        model = self.model if fsdp else self.raw_model
        model.eval()
        gen = torch.Generator().manual_seed(seed)
        with self.ema_weights(), self._autocast():
            ids = ancestral_sample(
                model,
                batch=n,
                length=length,
                steps=steps,
                mask_token_id=self.cfg.model.mask_token_id,
                schedule=self.objective.schedule,
                temperature=temperature,
                banned_ids=self.tokenizer.special_ids,
                generator=gen,
                device=self.device,
            )
        return [self.tokenizer.decode(row.tolist()) for row in ids.cpu()]

    # -----------------------------------------------------------------------------------------
    def close(self) -> None:
        """End the process group this trainer started (under torchrun), as torch's
        documentation asks before a process exits: every process waits at a barrier, then each
        destroys the group. Collective: call it on every process, after ``fit`` returned or
        raised ``TrainingInterrupted`` (never after another error: the others may not come).
        A group the caller started stays open; a second call does nothing. Freeing the DDP
        model and gloo group afterwards can still deadlock inside torch (pytorch#179291):
        ``dlm train`` exits without that teardown (``dlm.cli.run``)."""
        if not getattr(self, "_owns_group", False):
            return
        self._owns_group = False
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def fit(self, stop_at: int | None = None) -> dict:
        """Train to cfg.train.steps (or stop early at ``stop_at``, saving a checkpoint there).

        Returns a summary: final validation metrics, wall time, tokens/s, samples.
        """
        from tqdm.auto import tqdm

        tc = self.cfg.train
        end = tc.steps if stop_at is None else min(stop_at, tc.steps)
        metrics_path = os.path.join(self.out, "metrics.jsonl")
        if self.rank == 0:
            self._trim_metrics(metrics_path)
        n_params = self.raw_model.num_params()
        self.log(
            f"model: {n_params / 1e6:.2f}M parameters, vocab {self.cfg.model.vocab_size}, "
            f"{self.world} process(es) on {self.device}; train {len(self.train_stream.tokens):,} "
            f"tokens, validation {len(self.val_stream.tokens):,} tokens"
        )
        bar = tqdm(
            total=tc.steps,
            initial=self.step,
            disable=self.rank != 0 or not tc.progress,
            desc="train",
            dynamic_ncols=True,
        )
        t0, tok0 = time.perf_counter(), self.tokens_seen
        last_eval = None
        # SIGINT / SIGTERM: finish the step, save, raise TrainingInterrupted (module doc).
        with _StopOnSignal(announce=self.rank == 0) as stop:
            try:
                while self.step < end:
                    m = self.train_step()
                    tps = (self.tokens_seen - tok0) / max(1e-9, time.perf_counter() - t0)
                    bar.update(1)
                    bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{tps:,.0f}")
                    # The run's last step always logs; a stop_at step does not (a stopped and
                    # resumed run must write the rows of an uninterrupted one).
                    if self.step % tc.log_every == 0 or self.step == tc.steps:
                        self._record(metrics_path, {"step": self.step, **m, "tokens_per_s": tps})
                    if tc.eval_every and self.step % tc.eval_every == 0 and self.step < tc.steps:
                        last_eval = self.evaluate()
                        self._record(metrics_path, {"step": self.step, **last_eval})
                        val = last_eval["val_nats_per_char"]
                        bar.write(f"step {self.step}: val {val:.3f} nats/char")
                    if tc.save_every and self.step % tc.save_every == 0:
                        self.save()
                    if self._agree_on_signal(stop.signum):
                        break
            finally:
                bar.close()
            elapsed = time.perf_counter() - t0
            summary = {
                "step": self.step,
                "train_time_s": elapsed,
                "tokens_per_s": (self.tokens_seen - tok0) / max(elapsed, 1e-9),
            }
            if self._saved_step != self.step:
                self.save()
            # Asked again: a signal may have come during that save, and every process must
            # agree before the final evaluation (collective).
            signum = self._agree_on_signal(stop.signum)
        if signum:
            raise TrainingInterrupted(
                signum, self.step, os.path.join(self.out, CHECKPOINT), self.out
            )
        if self.step >= tc.steps:
            last_eval = self._final_row()
            if last_eval is None:
                last_eval = self.evaluate()
                self._record(metrics_path, {"step": self.step, **last_eval})
            summary.update(last_eval)
            self.log(
                f"validation ELBO at step {self.step}: {last_eval['val_nats_per_char']:.4f} "
                f"nats/char, {last_eval['val_bits_per_token']:.4f} bits/token"
            )
            if self.rank == 0:
                self.plot(os.path.join(self.out, "loss.png"))
            # Every process samples: under FSDP the forward is collective, and under DDP the
            # others would otherwise wait at close()'s barrier for as long as rank 0 samples,
            # past the collective timeout (NCCL's 10 minutes) for a long sample.
            if tc.samples:
                texts = self.sample(
                    tc.samples, tc.sample_len, tc.sample_steps, tc.seed, tc.sample_temperature
                )
            if tc.samples and self.rank == 0:
                summary["samples"] = texts
                with open(os.path.join(self.out, "samples.txt"), "w") as f:
                    for i, s in enumerate(texts):
                        f.write(f"--- sample {i} ---\n{s}\n")
                for i, s in enumerate(texts):
                    self.log(f"--- sample {i} ---\n{s}")
        return summary

    def _agree_on_signal(self, signum: int) -> int:
        """The pending signal of any process (max over processes; 0: none). Collective."""
        if self.world == 1:
            return signum
        flag = torch.tensor([signum], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag)

    def _final_row(self) -> dict | None:
        """The validation row already in metrics.jsonl for this step (resuming a finished run),
        or None. Rank 0 holds the file's rows; the others follow its answer (evaluate is
        collective)."""
        keys = ("val_nats_per_token", "val_bits_per_token", "val_nats_per_char")
        rows = [r for r in self.history if r["step"] == self.step and keys[0] in r]
        found = torch.tensor([len(rows) > 0], dtype=torch.int64, device=self.device)
        if self.world > 1:
            dist.broadcast(found, src=0)
        if not int(found):
            return None
        if not rows:  # not rank 0: the figures are rank 0's to print
            return {k: float("nan") for k in keys}
        return {k: rows[-1][k] for k in keys}

    def _record(self, path: str, row: dict) -> None:
        self.history.append(row)
        if self.rank == 0:
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def _trim_metrics(self, path: str) -> None:
        """Drop metric lines past the current step (a resumed run rewrites them)."""
        if not os.path.exists(path):
            return
        with open(path) as f:
            lines = [line for line in f if line.strip()]
        rows = []
        for i, line in enumerate(lines):
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                    raise ValueError("not a metrics row")
            except ValueError as e:
                if i == len(lines) - 1:  # a torn last line (disk full, power cut): drop it
                    self.log(f"{path}: dropped a cut-off last line (rewritten from step "
                             f"{self.step} on)")  # fmt: skip
                    break
                raise ValueError(f"resume: {path} line {i + 1} is not a metrics row ({e}); "
                                 "fix or delete the file to resume") from None  # fmt: skip
            rows.append(row)
        rows = [r for r in rows if r["step"] <= self.step]
        self.history = rows
        tmp = f"{path}.tmp-{os.getpid()}"  # rewritten whole: a crash keeps the old file
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(tmp, path)

    def plot(self, path: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [(r["step"], r["loss"]) for r in self.history if "loss" in r]
        val = [
            (r["step"], r["val_nats_per_token"]) for r in self.history if "val_nats_per_token" in r
        ]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train), label="train loss (nats/token)")
        if val:
            ax.plot(*zip(*val), "o-", label="validation ELBO (nats/token)")
        ax.set_xlabel("step")
        ax.set_ylabel("nats per token")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = path + ".tmp.png"
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, path)

    # -----------------------------------------------------------------------------------------
    def save(self, path: str | None = None) -> None:
        """Write the checkpoint atomically (temp file + rename); collective under FSDP."""
        from safetensors.torch import save_file

        path = path or os.path.join(self.out, CHECKPOINT)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        msd = get_model_state_dict(self.model, options=opts)
        osd = get_optimizer_state_dict(self.model, self.optimizer, options=opts)
        if self.rank != 0:
            self._saved_step = self.step
            return
        tensors = {}
        seen = set()
        for k, v in msd.items():
            # Tied weights share storage; safetensors refuses aliases, so store them once.
            if self.cfg.model.tie_embeddings and k == "lm_head.weight":
                continue
            tensors[f"model.{k}"] = v.detach().cpu().contiguous()
            seen.add(k)
        if self.ema is not None:
            for k, v in self.ema.items():
                if self.cfg.model.tie_embeddings and k == "lm_head.weight":
                    continue
                tensors[f"ema.{k}"] = v.cpu().contiguous()
        for pname, st in osd["state"].items():
            for k, v in st.items():
                tensors[f"optim.{pname}.{k}"] = torch.as_tensor(v).cpu().contiguous()
        tensors["rng.noise"] = self.gen.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        groups = [
            {k: v for k, v in g.items() if k != "params"} | {"params": list(g["params"])}
            for g in osd["param_groups"]
        ]
        meta = {
            "config": self.cfg.to_json(),
            "tokenizer": self.tokenizer.to_json(),
            "state": json.dumps(
                {
                    "step": self.step,
                    "tokens_seen": self.tokens_seen,
                    "train_stream": self.train_stream.state_dict(),
                    "data_fingerprint": self.data_fingerprint,
                    "param_groups": groups,
                }
            ),
        }
        for name in _clean_stale_tmp(path):
            self.log(f"removed {name}: a partial checkpoint whose writer is gone")
        # A staging folder of this process: safetensors writes its own hidden temp file beside
        # the name it is given, so a kill -9 mid-save leaves it inside the folder, which
        # _clean_stale_tmp removes whole.
        stage = f"{path}.tmp-{os.getpid()}"
        tmp = os.path.join(stage, os.path.basename(path))
        try:
            os.makedirs(stage, exist_ok=True)
            save_file(tensors, tmp, metadata=meta)
            os.chmod(tmp, 0o644)  # safetensors creates 0600 files
            # On disk before the rename: after a crash the name holds the old or the new file,
            # never a truncated one.
            _fsync(tmp)
            os.replace(tmp, path)
            # The rename itself, before "saved" is said (best effort: some FUSE / CIFS mounts
            # refuse a folder's fsync, and the new file is in place already).
            with contextlib.suppress(OSError):
                _fsync(os.path.dirname(path) or ".")
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        self._saved_step = self.step

    def _load(self, ckpt) -> None:
        tensors, meta = ckpt
        state = json.loads(meta["state"])
        msd = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        if self.cfg.model.tie_embeddings:
            msd["lm_head.weight"] = msd["tok_emb.weight"]
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
        set_model_state_dict(self.model, msd, options=opts)
        ostate: dict = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                pname, key = k[len("optim.") :].rsplit(".", 1)
                ostate.setdefault(pname, {})[key] = v
        groups = state["param_groups"]
        for g in groups:
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        set_optimizer_state_dict(
            self.model, self.optimizer, {"state": ostate, "param_groups": groups}, options=opts
        )
        # The config's hyper-parameters, not the saved groups' (equal unless override_config).
        tc = self.cfg.train
        for g, wd in zip(self.optimizer.param_groups, (tc.weight_decay, 0.0), strict=True):
            g["weight_decay"], g["betas"] = wd, (tc.beta1, tc.beta2)
        if self.ema is not None:
            params = dict(self.raw_model.named_parameters())
            for k in self.ema:
                src = tensors.get(f"ema.{k}")
                if src is None and k == "lm_head.weight":
                    src = tensors.get("ema.tok_emb.weight")
                # No EMA in the checkpoint (ema_decay was 0, override_config): start from the
                # loaded weights.
                self.ema[k].copy_(params[k].detach().float() if src is None else src)
        self.gen.set_state(tensors["rng.noise"])
        torch.set_rng_state(tensors["rng.torch"])
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.train_stream.load_state_dict(state["train_stream"])


def _eval_times(n: int, rep: int, reps: int, u: torch.Tensor, eps: float) -> torch.Tensor:
    """Times for n windows on evaluation pass ``rep`` of ``reps``, u (1,) the offset shared by
    all passes: together they stratify [eps, 1] into n * reps evenly spaced strata."""
    t = (u + (torch.arange(n, dtype=torch.float64) * reps + rep) / (n * reps)) % 1.0
    return eps + (1.0 - eps) * t


def _read_metadata(path: str) -> dict:
    """The metadata of a dlm train checkpoint; ValueError / FileNotFoundError naming the file."""
    from safetensors import SafetensorError, safe_open

    if os.path.isdir(path):
        raise IsADirectoryError(
            f"{path} is a directory; expected a checkpoint file such as "
            f"{os.path.join(path, CHECKPOINT)}"
        )
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None
    missing = [k for k in ("config", "tokenizer", "state") if k not in meta]
    if missing:
        raise ValueError(
            f"{path} is not a dlm train checkpoint (its metadata has no {', '.join(missing)}); "
            "Hugging Face-style weights load with dlm.hf.load_pretrained (dlm sample --model)"
        )
    return meta


def _read_checkpoint(path: str):
    from safetensors.torch import load_file

    meta = _read_metadata(path)
    return load_file(path), meta


def read_checkpoint_config(path: str) -> Config:
    """The Config a checkpoint was trained with (reads only the file's header)."""
    return Config.from_dict(json.loads(_read_metadata(path)["config"]))


def read_checkpoint_step(path: str) -> tuple[int, int]:
    """(steps done, the run's train.steps) of a checkpoint (reads only the file's header)."""
    meta = _read_metadata(path)
    return int(json.loads(meta["state"])["step"]), int(json.loads(meta["config"])["train"]["steps"])


def _config_changes(saved: Config, cfg: Config) -> list[tuple[str, str, object, object]]:
    """(section, field, saved, requested) for every field that differs; "take it from the
    tokenizer" (vocab_size 0, mask_token_id -1) matches any saved value."""
    out = []
    for section in ("model", "data", "train"):
        a, b = getattr(saved, section), getattr(cfg, section)
        for f in dataclasses.fields(a):
            old, new = getattr(a, f.name), getattr(b, f.name)
            auto = (section, f.name, new) in {
                ("model", "vocab_size", 0),
                ("model", "mask_token_id", -1),
            }
            if old != new and not auto:
                out.append((section, f.name, old, new))
    return out


def _describe(changes) -> str:
    return ", ".join(
        f"{name} {old!r} -> {new!r} (--{name.replace('_', '-')})" for _, name, old, new in changes
    )


def _check_resume_config(ckpt, cfg: Config, override: bool) -> list:
    """The differences between ``cfg`` and the checkpoint's config; ValueError for those a
    resume cannot take (see RESUME_FREE / RESUME_FIXED)."""
    saved = Config.from_dict(json.loads(ckpt[1]["config"]))
    changes = _config_changes(saved, cfg)
    fixed = [c for c in changes if c[0] == "model" and c[1] in RESUME_FIXED]
    if fixed:
        raise ValueError(
            f"resume: the checkpoint's weights have other shapes: {_describe(fixed)}; the "
            "checkpoint's config is used when these are not given (--out DIR --resume alone "
            "continues the run), or start a new run in another --out"
        )
    breaking = [c for c in changes if c[1] not in RESUME_FREE[c[0]]]
    if breaking and not override:
        raise ValueError(
            f"resume: settings differ from the checkpoint's: {_describe(breaking)}; the run "
            "would no longer continue exactly. Leave them out to keep the checkpoint's values, "
            "or pass --override-config (Trainer(override_config=True)) to apply them"
        )
    return changes


def _fingerprint(*tokens: torch.Tensor) -> str:
    """sha256 of token arrays (their lengths and contents): what a data position refers to."""
    import hashlib

    h = hashlib.sha256()
    for t in tokens:
        a = t.contiguous().numpy()
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _clean_stale_tmp(path: str) -> list[str]:
    """Delete the ``<path>.tmp-<pid>`` staging folders (files, from older versions) whose
    writer (pid, on this machine) is gone: what a kill -9 during a save leaves. Returns the
    names removed."""
    folder, base = os.path.split(path)
    removed = []
    try:
        names = os.listdir(folder or ".")
    except FileNotFoundError:
        return removed
    for name in names:
        pid = name[len(base) + len(".tmp-") :]
        if not name.startswith(base + ".tmp-") or not pid.isdigit():
            continue
        if int(pid) != os.getpid() and _alive(int(pid)):
            continue  # another process is writing it (a run sharing the folder)
        full = os.path.join(folder, name)
        with contextlib.suppress(FileNotFoundError):
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full)
            else:
                os.remove(full)
            removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    return True


def load_model(path: str, *, ema: bool = True, device: str = "cpu"):
    """(model, tokenizer, config) from a checkpoint; the EMA weights when present and ``ema``."""
    tensors, meta = _read_checkpoint(path)
    cfg = Config.from_dict(json.loads(meta["config"]))
    model = DiffusionLM(cfg.model)
    prefix = "ema." if ema and any(k.startswith("ema.") for k in tensors) else "model."
    sd = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    if cfg.model.tie_embeddings:
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    model.load_state_dict(sd)
    if cfg.model.time_conditioning:
        attach_time_map(model, cfg.model, cfg.train)
    return model.to(device).eval(), tokenizer_from_json(meta["tokenizer"]), cfg


def attach_time_map(model, mc, tc) -> None:
    """Give a time-conditioned model ``time_of`` (masked fraction -> the t it was trained on,
    by the training objective's schedule: the samplers only know the fraction) and
    ``time_schedule``, the settings that rebuild it (dlm.hf.save_pretrained writes them)."""
    spec = {"schedule": tc.schedule, "weighting": tc.weighting, "objective": tc.objective,
            "sampling_eps": tc.sampling_eps}  # fmt: skip
    model.time_schedule = spec
    model.time_of = time_map(mc.mask_token_id, spec)


def time_map(mask_token_id: int, spec: dict):
    """The ``time_of`` map of a ``time_schedule`` dict (see attach_time_map)."""
    return DiffusionObjective(mask_token_id, spec["schedule"], spec["weighting"],
                              spec["objective"], spec["sampling_eps"]).time_of  # fmt: skip
