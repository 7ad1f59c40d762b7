"""An lm-evaluation-harness model for masked diffusion LMs, evaluated as LLaDA and Dream do.

    import dlm.lm_eval, lm_eval                       # importing registers the model "dlm"
    lm_eval.simple_evaluate(model="dlm", tasks=["hellaswag"],   # pip install 'dlm-kernels[eval]'
                            model_args="pretrained=LLaDA-8B-Base/,mc_num=128,dtype=bfloat16")

    lm = DiffusionLMEval(model=model, tokenizer=tok, mc_num=32)      # or in Python
    lm.loglikelihood(requests)     # objects with .args = (context, continuation)

* loglikelihood: LLaDA's conditional estimate (dlm.likelihood.conditional_nll): the
  continuation's tokens are masked m at a time, m ~ U{1..n}, weight n/m, ``mc_num`` draws; the
  value returned is minus that estimate (a lower bound on log p in expectation). ``is_greedy``
  as LLaDA: decoding the masked continuation one most-confident token per forward (with the
  guidance) reproduces it (``check_greedy=False`` skips those n forwards per request).
* loglikelihood_rolling: minus the Monte-Carlo ELBO of the text (dlm.likelihood.elbo).
* generate_until: dlm.sampler.generate (gen_length = max_gen_toks, the sampler's algorithms),
  cut at the first stop string.

Dream's shifted logits (``cfg.logits_shift``) are passed to the estimators and the sampler
(``logits_shift=``, so that they keep the fused head and the answer window). The lm_eval
package is optional: without it the class is a plain object with the same methods (what
tests/dlm/test_lm_eval.py drives); with it, it subclasses ``lm_eval.api.model.LM`` and is
registered as "dlm".
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dlm.likelihood import conditional_nll, elbo
from dlm.sampler import generate

try:  # optional: dlm-kernels[eval]
    from lm_eval.api.model import LM as _Base
    from lm_eval.api.registry import register_model as _register
except ImportError:  # pragma: no cover - exercised where lm_eval is not installed
    _Base = object

    def _register(*names):
        return lambda cls: cls


# Arguments lm-eval may pass to any model that this one has no use for.
_HARNESS_KEYS = frozenset({"max_batch_size", "trust_remote_code"})


@_register("dlm")
class DiffusionLMEval(_Base):
    """lm-eval's LM interface over a DiffusionLM (or any model with the same call).

    Args:
        pretrained: a checkpoint directory for dlm.hf.from_pretrained (Dream, LLaDA, dlm), or
            None with ``model`` and ``tokenizer`` given.
        model, tokenizer: an already built model and a tokenizer with encode / decode /
            mask_token_id (dlm.hf.PretrainedTokenizer, dlm.data's tokenizers).
        device, dtype: where / how to load ``pretrained``.
        mc_num: Monte-Carlo draws per likelihood (LLaDA uses 128). batch_size: sequences per
            forward. cfg_scale: LLaDA's guidance (likelihood, greedy check, generation).
            seed: fixed randomness. check_greedy: run LLaDA's greedy check (False: skip it).
        gen_length, steps, block_length, alg, temperature, schedule: sampler defaults;
            ``max_gen_toks`` of a request overrides gen_length (steps scale with it).

    Example:
        >>> lm = DiffusionLMEval(pretrained="LLaDA-8B-Base/", dtype="bfloat16", device="cuda")
        >>> [(ll, greedy)] = lm.loglikelihood([Req(("Paris is the capital of", " France"))])
    """

    def __init__(self, pretrained: str | None = None, *, model=None, tokenizer=None,
                 device: str = "cpu", dtype=None, mc_num: int = 128, batch_size: int | str = 32,
                 cfg_scale: float = 0.0, seed: int = 0, gen_length: int = 256,
                 steps: int | None = None, block_length: int | None = None,
                 alg: str = "low_confidence", temperature: float = 0.0, schedule: str = "even",
                 check_greedy: bool = True, **harness):  # fmt: skip
        # lm-eval hands every model its batch settings (max_batch_size) and may add
        # trust_remote_code from model_args; anything else is a misspelled argument, which
        # would otherwise run silently with a default (mc_num sets the cost and the result).
        unknown = sorted(set(harness) - _HARNESS_KEYS)
        if unknown:
            import difflib
            import inspect

            names = list(inspect.signature(DiffusionLMEval.__init__).parameters)[1:-1]
            hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, names, 1))
                     else k for k in unknown]  # fmt: skip
            raise TypeError(f"DiffusionLMEval: unknown argument(s): {', '.join(hints)}")
        if _Base is not object:
            super().__init__()
        if model is None:
            if pretrained is None:
                raise ValueError("DiffusionLMEval needs pretrained=<checkpoint dir> or model=")
            from dlm.hf import from_pretrained, load_tokenizer

            model = from_pretrained(pretrained, dtype=dtype, device=device)
            tokenizer = tokenizer or load_tokenizer(pretrained, model.cfg)
        if tokenizer is None:
            raise ValueError("DiffusionLMEval needs a tokenizer (tokenizer.json in the checkpoint)")
        cfg = getattr(model, "cfg", None)
        self.model = model.eval() if isinstance(model, nn.Module) else model
        self.tok = tokenizer
        self.mask_id = tokenizer.mask_token_id
        self.logits_shift = bool(getattr(cfg, "logits_shift", False))
        eos = getattr(cfg, "eos_token_id", -1)
        self.eos_id = eos if eos is not None and eos >= 0 else None
        self._device = torch.device(device)  # lm_eval.api.model.LM exposes it as .device
        # The harness may pass batch_size="auto": keep the default then.
        batch_size = int(batch_size) if str(batch_size).isdigit() else 32
        self.mc_num, self.batch, self.cfg_scale, self.seed = int(mc_num), batch_size, \
            float(cfg_scale), int(seed)  # fmt: skip
        self.check_greedy = str(check_greedy).lower() not in ("false", "0", "no")
        self.gen = dict(gen_length=int(gen_length), steps=steps, block_length=block_length,
                        alg=alg, temperature=float(temperature), schedule=schedule)  # fmt: skip

    # -- tokenization --------------------------------------------------------------------------
    def _enc(self, text: str) -> list[int]:
        return [int(i) for i in self.tok.encode(text)]

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # As lm-eval's HF model: trailing spaces of the context belong to the continuation, and
        # the pair is encoded whole then split, so the boundary tokenizes as in the full text.
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole, ctx = self._enc(context + continuation), self._enc(context)
        if whole[: len(ctx)] != ctx:  # the boundary merged: fall back to separate encodings
            return ctx, self._enc(continuation)
        return ctx, whole[len(ctx) :]

    @staticmethod
    def _pad(rows: list[list[int]], pad: int, left: bool) -> tuple[Tensor, Tensor]:
        n = max(1, max(len(r) for r in rows))
        ids = torch.full((len(rows), n), pad, dtype=torch.long)
        real = torch.zeros(len(rows), n, dtype=torch.bool)
        for b, r in enumerate(rows):
            sl = slice(n - len(r), n) if left else slice(0, len(r))
            ids[b, sl] = torch.tensor(r, dtype=torch.long)
            real[b, sl] = True
        return ids, real

    # -- the LM interface ----------------------------------------------------------------------
    @torch.no_grad()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """[(log-likelihood estimate, is_greedy)] for requests with .args = (context, cont)."""
        pairs = [self._encode_pair(*r.args) for r in requests]
        out: list[tuple[float, bool]] = []
        pad = getattr(self.tok, "pad_token_id", self.mask_id)
        for lo in range(0, len(pairs), self.batch):
            chunk = pairs[lo : lo + self.batch]
            if any(not a for _, a in chunk):
                raise ValueError("loglikelihood: a continuation encodes to no tokens")
            prompt, pm = self._pad([c for c, _ in chunk], pad, left=True)
            answer, amask = self._pad([a for _, a in chunk], pad, left=False)
            prompt, pm, answer, amask = (t.to(self._device) for t in (prompt, pm, answer, amask))
            # Row b of this call draws from seed + lo + b (dlm.likelihood seeds each row by
            # seed + its index): a request's value does not depend on the batching.
            nll = conditional_nll(self.model, prompt, answer, pm, amask, mask_id=self.mask_id,
                                  mc_num=self.mc_num, batch_size=self.batch,
                                  cfg_scale=self.cfg_scale, seed=self.seed + lo,
                                  logits_shift=self.logits_shift)  # fmt: skip
            greedy = self._greedy(prompt, pm, answer, amask)
            out += [(-float(n), bool(g)) for n, g in zip(nll, greedy)]
        return out

    def _greedy(self, prompt, pm, answer, amask) -> Tensor:
        """LLaDA's is_greedy (suffix_greedy_prediction): decode the masked continuation one
        token per forward, each time committing the single most confident argmax (with the
        likelihood's cfg_scale), and compare with the continuation. n forwards for n tokens,
        as LLaDA; ``check_greedy=False`` skips it (every answer then reports False)."""
        B = prompt.shape[0]
        if not self.check_greedy:
            return torch.zeros(B, dtype=torch.bool)
        out = torch.zeros(B, dtype=torch.bool)
        for b in range(B):  # answers differ in length: one sampler call each
            p = prompt[b, pm[b]][None]
            a = answer[b, amask[b]]
            n = a.numel()
            x = generate(self.model, p, None, gen_length=n, steps=n, block_length=n,
                         alg="low_confidence", temperature=0.0, cfg_scale=self.cfg_scale,
                         mask_id=self.mask_id, logits_shift=self.logits_shift,
                         seed=0)  # fmt: skip
            out[b] = bool(torch.equal(x[0, p.shape[1] :], a))
        return out

    @torch.no_grad()
    def loglikelihood_rolling(self, requests) -> list[float]:
        """Minus the ELBO of each whole text (.args = (text,)), in nats."""
        out = []
        for i, r in enumerate(requests):
            x = torch.tensor([self._enc(r.args[0])], dtype=torch.long, device=self._device)
            nats = elbo(self.model, x, mask_id=self.mask_id, mc_num=self.mc_num,
                        batch_size=self.batch, seed=self.seed + i,
                        logits_shift=self.logits_shift)  # fmt: skip
            out.append(-float(nats[0]))
        return out

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        """Text generated after each context (.args = (context, gen_kwargs)), cut at `until`."""
        out = []
        for i, r in enumerate(requests):
            context, kw = r.args[0], dict(r.args[1] if len(r.args) > 1 else {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(kw.pop("max_gen_toks", self.gen["gen_length"]))
            block = self.gen["block_length"]
            if block is None or n % block:
                block = n
            steps = self.gen["steps"] or n
            steps = max(n // block, steps - steps % (n // block))  # a multiple of the blocks
            temperature = float(kw.pop("temperature", self.gen["temperature"]))
            prompt = torch.tensor([self._enc(context)], dtype=torch.long, device=self._device)
            x = generate(self.model, prompt, None, gen_length=n, steps=steps,
                         block_length=block, alg=self.gen["alg"], temperature=temperature,
                         mask_id=self.mask_id, logits_shift=self.logits_shift,
                         schedule=self.gen["schedule"], eos_id=self.eos_id,
                         stop_at_eos=self.eos_id is not None, cfg_scale=self.cfg_scale,
                         seed=self.seed + i)  # fmt: skip
            ids = [t for t in x[0, prompt.shape[1] :].tolist() if t != self.mask_id]
            if self.eos_id is not None and self.eos_id in ids:
                ids = ids[: ids.index(self.eos_id)]
            text = self.tok.decode(ids)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
        return out
