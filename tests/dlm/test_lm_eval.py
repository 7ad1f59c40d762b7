"""The lm-eval adapter (dlm.lm_eval), driven directly with lm-eval-shaped requests (objects with
``.args``, as lm_eval.api.instance.Instance), on a tiny random model and a character tokenizer.

lm_eval itself is not installed by the Makefile (it brings datasets, pyarrow, pandas, sklearn...),
so these tests call the adapter's methods the way the harness does and check the values against
exact computations.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from dlm.config import ModelConfig
from dlm.data import CharTokenizer
from dlm.likelihood import conditional_nll, elbo
from dlm.lm_eval import DiffusionLMEval
from dlm.model import DiffusionLM
from dlm.sampler import generate

TOK = CharTokenizer("abcdefghij ,.")


def _model(shift: bool = False) -> DiffusionLM:
    cfg = ModelConfig(vocab_size=TOK.vocab_size, d_model=40, n_layers=2, n_heads=2, d_ff=56,
                      mask_token_id=TOK.mask_token_id, logits_shift=shift)  # fmt: skip
    m = DiffusionLM(cfg)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5 * 2)
    return m.eval()


def _req(*args):
    return SimpleNamespace(args=args)


def _exact_one_token(model, context: str, token: str, shift: bool) -> float:
    """log p(token | context, one mask): the estimator is exact when the answer is one token."""
    ids = list(TOK.encode(context)) + [TOK.mask_token_id]
    with torch.no_grad():
        logits = model(torch.tensor([ids]))
    row = logits[0, -2 if shift else -1]
    return float(row.log_softmax(-1)[TOK.encode(token)[0]]), int(row.argmax())


@pytest.mark.parametrize("shift", [False, True], ids=["llada", "dream-shift"])
def test_loglikelihood_one_token_is_exact(shift):
    model = _model(shift)
    lm = DiffusionLMEval(model=model, tokenizer=TOK, mc_num=4, batch_size=8)
    reqs = [_req("abc", "d"), _req("ba ba", "j"), _req("c", ".")]
    out = lm.loglikelihood(reqs)
    for r, (ll, greedy) in zip(reqs, out):
        want, argmax = _exact_one_token(model, *r.args, shift)
        assert math.isclose(ll, want, rel_tol=1e-5, abs_tol=1e-6)
        assert greedy == (argmax == TOK.encode(r.args[1])[0])


def test_loglikelihood_matches_estimator_and_batching():
    model = _model()
    reqs = [_req("abc", "defg"), _req("a, b", " cde"), _req("hij. ", "abc")]
    lm = DiffusionLMEval(model=model, tokenizer=TOK, mc_num=16, batch_size=3, seed=5)
    out = lm.loglikelihood(reqs)
    one = DiffusionLMEval(model=model, tokenizer=TOK, mc_num=16, batch_size=1, seed=5)
    for (a, _), (b, _) in zip(out, one.loglikelihood(reqs)):
        assert math.isclose(a, b, rel_tol=1e-5)  # a value does not depend on the batching
    # Request 1 alone through the estimator (trailing space moved into the continuation).
    ctx, cont = lm._encode_pair("hij. ", "abc")
    assert TOK.decode(cont) == " abc"
    nll = conditional_nll(model, torch.tensor([ctx]), torch.tensor([cont]),
                          mask_id=TOK.mask_token_id, mc_num=16, seed=5 + 2)  # fmt: skip
    assert math.isclose(out[2][0], -float(nll[0]), rel_tol=1e-5)
    assert all(ll < 0 for ll, _ in out)


def test_loglikelihood_rolling_is_minus_elbo():
    model = _model()
    lm = DiffusionLMEval(model=model, tokenizer=TOK, mc_num=8, seed=3)
    [ll] = lm.loglikelihood_rolling([_req("abc def, ghij.")])
    x = torch.tensor([list(TOK.encode("abc def, ghij."))])
    assert math.isclose(ll, -float(elbo(model, x, mask_id=TOK.mask_token_id, mc_num=8, seed=3)[0]),
                        rel_tol=1e-6)  # fmt: skip


def test_generate_until_uses_the_sampler_and_cuts_at_stop():
    model = _model()
    lm = DiffusionLMEval(model=model, tokenizer=TOK, steps=4, alg="low_confidence", seed=0)
    [free] = lm.generate_until([_req("abc", {"max_gen_toks": 8, "until": []})])
    x = generate(model, torch.tensor([list(TOK.encode("abc"))]), gen_length=8, steps=4,
                 mask_id=TOK.mask_token_id, seed=0)  # fmt: skip
    assert free == TOK.decode(x[0, 3:].tolist()) and len(free) == 8
    stop = free[3]
    [cut] = lm.generate_until([_req("abc", {"max_gen_toks": 8, "until": [stop]})])
    assert cut == free[: free.index(stop)]


def test_from_a_checkpoint_directory(tmp_path):
    model = _model()
    model.save_pretrained(str(tmp_path), tokenizer=TOK)
    lm = DiffusionLMEval(pretrained=str(tmp_path), mc_num=4)
    want, _ = _exact_one_token(model, "abc", "d", False)
    [(ll, _)] = lm.loglikelihood([_req("abc", "d")])
    assert math.isclose(ll, want, rel_tol=1e-5)
    with pytest.raises(ValueError, match="needs pretrained"):
        DiffusionLMEval()


TASK_YAML = """\
task: dlm_tiny_{kind}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {kind}
doc_to_text: "{{{{question}}}}"
{extra}
"""


def test_lm_eval_harness_runs_a_local_task(tmp_path, monkeypatch):
    """The real harness (when installed, `pip install 'dlm-kernels[eval]'`): a local JSON task,
    multiple choice (loglikelihood) and generate_until, scored through the adapter."""
    lm_eval = pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import json

    from lm_eval.tasks import TaskManager

    rows = [{"question": q, "choices": [" abc", " bad", " cab"], "label": i % 3, "answer": "abc"}
            for i, q in enumerate(["ab", "ba ca", "ca, ab"])]  # fmt: skip
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    mc = 'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc'
    gen = ('doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["."]\n  max_gen_toks: 4\n'
           'metric_list:\n  - metric: exact_match')  # fmt: skip
    for kind, extra in (("multiple_choice", mc), ("generate_until", gen)):
        (tmp_path / f"{kind}.yaml").write_text(TASK_YAML.format(kind=kind, data=data, extra=extra))
    lm = DiffusionLMEval(model=_model(), tokenizer=TOK, mc_num=4, steps=4)
    calls = []
    for name in ("loglikelihood", "generate_until"):
        orig = getattr(lm, name)
        monkeypatch.setattr(lm, name, lambda reqs, _o=orig, _n=name: calls.append(_n) or _o(reqs))
    res = lm_eval.simple_evaluate(
        model=lm, tasks=["dlm_tiny_multiple_choice", "dlm_tiny_generate_until"],
        task_manager=TaskManager(include_path=str(tmp_path)), num_fewshot=0,
    )  # fmt: skip
    acc = res["results"]["dlm_tiny_multiple_choice"]["acc,none"]
    em = res["results"]["dlm_tiny_generate_until"]["exact_match,none"]
    assert 0.0 <= acc <= 1.0 and 0.0 <= em <= 1.0
    assert set(calls) == {"loglikelihood", "generate_until"}


def _llada_greedy(model, ctx: list[int], n: int) -> list[int]:
    """LLaDA's suffix_greedy_prediction, restated: n forwards, each committing the single most
    confident argmax among the masked positions."""
    seq = torch.tensor([ctx + [TOK.mask_token_id] * n])
    for _ in range(n):
        masked = seq[0] == TOK.mask_token_id
        with torch.no_grad():
            logits = model(seq)[0, masked]
        conf, tok = logits.softmax(-1).max(-1)
        where = masked.nonzero()[:, 0]
        seq[0, where[int(conf.argmax())]] = tok[int(conf.argmax())]
    return seq[0, len(ctx) :].tolist()


def test_is_greedy_is_llada_sequential_check():
    torch.manual_seed(0)
    model = _model()
    lm = DiffusionLMEval(model=model, tokenizer=TOK, mc_num=2, batch_size=4)
    reqs, want = [], []
    for ctx in ("jehha", "abc", "ba,", "hij.", "ggg", "fa.", "dcba", "e,j"):
        c = list(TOK.encode(ctx))
        ids = _llada_greedy(model, c, 3)
        if any(i in TOK.special_ids for i in ids):  # pad / mask decode to no character
            continue
        greedy = TOK.decode(ids)
        other = "".join("a" if ch != "a" else "b" for ch in greedy)
        reqs += [_req(ctx, greedy), _req(ctx, other)]
        want += [True, False]
    assert len(reqs) >= 4
    assert [g for _, g in lm.loglikelihood(reqs)] == want
    skip = DiffusionLMEval(model=model, tokenizer=TOK, mc_num=2, check_greedy="False")
    assert not any(g for _, g in skip.loglikelihood(reqs[:2]))


def test_time_conditioned_and_plain_callable_models():
    cfg = ModelConfig(vocab_size=TOK.vocab_size, d_model=40, n_layers=2, n_heads=2, d_ff=56,
                      mask_token_id=TOK.mask_token_id, time_conditioning=True)  # fmt: skip
    timed = DiffusionLM(cfg).eval()
    [(ll, _)] = DiffusionLMEval(model=timed, tokenizer=TOK, mc_num=2).loglikelihood(
        [_req("abc", "de")]
    )
    assert math.isfinite(ll)
    inner = _model()

    def plain(input_ids, attention_mask=None):  # no position_ids, no output_range
        return inner(input_ids, attention_mask=attention_mask)

    lm = DiffusionLMEval(model=plain, tokenizer=TOK, mc_num=4, seed=1)
    ref = DiffusionLMEval(model=inner, tokenizer=TOK, mc_num=4, seed=1)
    reqs = [_req("abc", "de"), _req("ba", " cab")]
    for (a, ga), (b, gb) in zip(lm.loglikelihood(reqs), ref.loglikelihood(reqs)):
        assert math.isclose(a, b, rel_tol=1e-5) and ga == gb


def test_misspelled_arguments_are_refused_not_ignored():
    # lm-eval passes its batch settings to every model (kept quiet); a typo in model_args would
    # otherwise run with the default (mc_num sets both the cost and the estimate).
    model = _model()
    lm = DiffusionLMEval(model=model, tokenizer=TOK, mc_num=4, max_batch_size=64)
    assert lm.mc_num == 4
    with pytest.raises(TypeError, match=r"mc_nmu \(did you mean mc_num\?\)"):
        DiffusionLMEval(model=model, tokenizer=TOK, mc_nmu=1000)
