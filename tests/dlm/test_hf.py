"""Loading real checkpoints (dlm.hf): Dream and LLaDA formats against transformers' Qwen2 and Llama.

Each test writes a tiny random checkpoint in the published layout (config.json keys, tensor names
and shapes of Dream-org/Dream and GSAI-ML/LLaDA), loads it with ``DiffusionLM.from_pretrained``
and compares the logits with the transformers model that holds the same weights, run with a full
bidirectional 4-D mask, left padding and position ids. float32, 1e-5 relative.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from dlm.config import ModelConfig
from dlm.hf import from_pretrained, load_tokenizer
from dlm.model import DiffusionLM

transformers = pytest.importorskip("transformers")  # the Makefile's test deps install it

V, D, L, H, KV, F = 211, 48, 2, 4, 2, 72  # odd vocabulary, GQA 4/2, head_dim 12


def _randomize(model: torch.nn.Module) -> None:
    # Fresh random weights of a useful size (HF's init leaves biases 0 and norms 1).
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.dim() == 1:
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)


def _write(path, tensors: dict, config: dict, shards: int) -> None:
    """Hugging Face layout: model.safetensors, or n shards + model.safetensors.index.json."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    if shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"))
        return
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({n: tensors[n] for n in part}, os.path.join(path, file))
        weight_map.update({n: file for n in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def _batch():
    """Left-padded ids (B=3, S=13), the padding mask and positions restarting at each row."""
    B, S = 3, 13
    ids = torch.randint(0, V, (B, S))
    am = torch.arange(S)[None, :] >= torch.tensor([[0], [4], [9]])
    pos = (am.long().cumsum(1) - 1).clamp_min(0)
    return ids, am, pos


def _hf_logits(model, ids, am, pos):
    # Full bidirectional mask: every query sees every real key (additive float mask).
    allowed = am[:, None, None, :].expand(-1, 1, ids.shape[1], -1)
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def _check(ours, ref, am):
    # Padded query rows differ by design (ours: attention output 0); real rows must match.
    err = (ours[am] - ref[am]).abs().max() / ref[am].abs().max()
    assert err <= 1e-5, f"relative error {err:.2e}"


# ---------------------------------------------------------------------------------------------
# Dream (Qwen2 names, q/k/v biases, shifted logits)
# ---------------------------------------------------------------------------------------------
def _dream(tmp_path, tie: bool, shards: int):
    cfg = transformers.Qwen2Config(
        vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
        num_attention_heads=H, num_key_value_heads=KV, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=tie, attn_implementation="sdpa",
    )  # fmt: skip
    ref = transformers.Qwen2ForCausalLM(cfg).eval()
    _randomize(ref)
    sd = ref.state_dict()
    if tie:
        sd.pop("lm_head.weight")  # a tied checkpoint stores the embedding only
    config = {  # the keys of Dream-v0's config.json
        "architectures": ["DreamModel"], "model_type": "Dream", "vocab_size": V,
        "hidden_size": D, "intermediate_size": F, "num_hidden_layers": L,
        "num_attention_heads": H, "num_key_value_heads": KV, "hidden_act": "silu",
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
        "rope_scaling": None, "tie_word_embeddings": tie, "use_sliding_window": False,
        "sliding_window": None, "attention_dropout": 0.0, "torch_dtype": "float32",
        "mask_token_id": 210, "pad_token_id": 209, "bos_token_id": 208, "eos_token_id": 209,
    }  # fmt: skip
    path = tmp_path / "dream"
    _write(path, sd, config, shards)
    return ref, str(path)


@pytest.mark.parametrize(
    "tie,shards", [(False, 3), (True, 1)], ids=["untied-3shards", "tied-1file"]
)
def test_dream_matches_qwen2(tmp_path, tie, shards):
    ref, path = _dream(tmp_path, tie, shards)
    model = DiffusionLM.from_pretrained(path)
    c = model.cfg
    assert (c.mask_token_id, c.pad_token_id, c.eos_token_id) == (210, 209, 209)
    assert c.logits_shift and c.qkv_bias and c.tie_embeddings == tie and c.n_kv_heads == KV
    assert c.rope_theta == 1e6 and c.norm_eps == 1e-6
    ids, am, pos = _batch()
    with torch.no_grad():
        ours = model(ids, attention_mask=am, position_ids=pos)
    _check(ours, _hf_logits(ref, ids, am, pos), am)


# ---------------------------------------------------------------------------------------------
# LLaDA (OLMo names, LLaMA block or fused sequential block)
# ---------------------------------------------------------------------------------------------
def _llada_tensors(sd: dict, block: str, tie: bool) -> dict:
    """LlamaForCausalLM's state dict under LLaDA's names."""
    t = "model.transformer."
    out = {
        t + "wte.weight": sd["model.embed_tokens.weight"],
        t + "ln_f.weight": sd["model.norm.weight"],
    }
    if not tie:
        out[t + "ff_out.weight"] = sd["lm_head.weight"]
    for i in range(L):
        s, b = f"model.layers.{i}.", f"{t}blocks.{i}."
        q, k, v = (sd[s + f"self_attn.{p}_proj.weight"] for p in "qkv")
        gate, up = sd[s + "mlp.gate_proj.weight"], sd[s + "mlp.up_proj.weight"]
        out[b + "attn_norm.weight"] = sd[s + "input_layernorm.weight"]
        out[b + "ff_norm.weight"] = sd[s + "post_attention_layernorm.weight"]
        out[b + "attn_out.weight"] = sd[s + "self_attn.o_proj.weight"]
        out[b + "ff_out.weight"] = sd[s + "mlp.down_proj.weight"]
        if block == "llama":
            out.update({b + "q_proj.weight": q, b + "k_proj.weight": k, b + "v_proj.weight": v,
                        b + "ff_proj.weight": gate, b + "up_proj.weight": up})  # fmt: skip
        else:  # OLMo: fused q/k/v, and SwiGLU's ff_proj = [x; gate]
            out[b + "att_proj.weight"] = torch.cat([q, k, v])
            out[b + "ff_proj.weight"] = torch.cat([up, gate])
    return out


def _llada(tmp_path, block: str, tie: bool, shards: int):
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
        num_attention_heads=H, num_key_value_heads=KV, rope_theta=5e5, rms_norm_eps=1e-5,
        tie_word_embeddings=tie, attention_bias=False, mlp_bias=False, attn_implementation="sdpa",
    )  # fmt: skip
    ref = transformers.LlamaForCausalLM(cfg).eval()
    _randomize(ref)
    config = {  # the keys of LLaDA-8B's config.json (OLMo's ModelConfig)
        "architectures": ["LLaDAModelLM"], "model_type": "llada", "d_model": D, "n_heads": H,
        "n_kv_heads": KV, "n_layers": L, "mlp_ratio": 4,
        "mlp_hidden_size": F if block == "llama" else 2 * F,
        "activation_type": "silu" if block == "llama" else "swiglu", "block_type": block,
        "block_group_size": 1, "alibi": False, "alibi_bias_max": 8.0, "rope": True,
        "rope_full_precision": True, "rope_theta": 5e5, "flash_attention": False,
        "attention_dropout": 0.0, "multi_query_attention": None, "attention_layer_norm": False,
        "residual_dropout": 0.0, "embedding_dropout": 0.0, "input_emb_norm": False,
        "layer_norm_type": "rms", "layer_norm_with_affine": True, "rms_norm_eps": 1e-5,
        "attention_layer_norm_with_affine": True, "max_sequence_length": 4096,
        "include_bias": False, "include_qkv_bias": False, "bias_for_layer_norm": False,
        "scale_logits": False, "vocab_size": V, "embedding_size": V, "weight_tying": tie,
        "eos_token_id": 207, "pad_token_id": 207, "mask_token_id": 210, "init_device": "meta",
        "init_fn": "mitchell", "init_std": 0.02, "use_cache": False, "torch_dtype": "float32",
    }  # fmt: skip
    path = tmp_path / f"llada-{block}"
    _write(path, _llada_tensors(ref.state_dict(), block, tie), config, shards)
    return ref, str(path)


@pytest.mark.parametrize(
    "block,tie,shards",
    [("llama", False, 2), ("sequential", True, 1)],
    ids=["llama-untied-2shards", "sequential-tied-1file"],
)
def test_llada_matches_llama(tmp_path, block, tie, shards):
    ref, path = _llada(tmp_path, block, tie, shards)
    model = DiffusionLM.from_pretrained(path)
    c = model.cfg
    assert (c.mask_token_id, c.pad_token_id, c.eos_token_id) == (210, 207, 207)
    assert not c.logits_shift and not c.qkv_bias and c.d_ff == F and c.rope_theta == 5e5
    ids, am, pos = _batch()
    with torch.no_grad():
        ours = model(ids, attention_mask=am, position_ids=pos)
    _check(ours, _hf_logits(ref, ids, am, pos), am)
    # Converted to our format (the fused tensors' row slices must save as tensors of their own).
    model.save_pretrained(str(tmp_path / "ours"))
    again = DiffusionLM.from_pretrained(str(tmp_path / "ours"))
    with torch.no_grad():
        assert torch.equal(again(ids, attention_mask=am, position_ids=pos), ours)


def test_dtype_device_and_lazy_meta_build(tmp_path, monkeypatch):
    _, path = _llada(tmp_path, "llama", False, 2)
    built_on = []
    orig = DiffusionLM.__init__

    def spy(self, cfg):
        orig(self, cfg)
        built_on.append(self.tok_emb.weight.device.type)

    monkeypatch.setattr(DiffusionLM, "__init__", spy)
    model = DiffusionLM.from_pretrained(path, dtype="bfloat16", device="cpu")
    assert built_on == ["meta"]  # no random init of a full-size model before the weights
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())
    ids, am, pos = _batch()
    with torch.no_grad():
        assert torch.isfinite(model(ids, attention_mask=am, position_ids=pos).float()).all()


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def test_unknown_model_type(tmp_path):
    _, path = _dream(tmp_path, False, 1)
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["model_type"] = "gpt2"
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ValueError, match="unknown model_type 'gpt2'"):
        DiffusionLM.from_pretrained(path)


def test_missing_and_misshapen_tensors(tmp_path):
    ref, path = _dream(tmp_path / "a", False, 1)
    sd = dict(ref.state_dict())
    cfg = json.load(open(os.path.join(path, "config.json")))
    gone = sd.pop("model.layers.1.mlp.up_proj.weight")
    _write(tmp_path / "b", sd, cfg, 2)
    with pytest.raises(ValueError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
        DiffusionLM.from_pretrained(str(tmp_path / "b"))
    sd["model.layers.1.mlp.up_proj.weight"] = gone[:-1]
    _write(tmp_path / "c", sd, cfg, 1)
    with pytest.raises(ValueError, match=r"up_proj\.weight.*shape \(71, 48\)"):
        DiffusionLM.from_pretrained(str(tmp_path / "c"))
    cfg["use_sliding_window"] = True
    _write(tmp_path / "d", dict(ref.state_dict()), cfg, 1)
    with pytest.raises(ValueError, match="use_sliding_window"):
        DiffusionLM.from_pretrained(str(tmp_path / "d"))
    # A rope scaling factor without a type still scales: refused, not loaded unscaled.
    cfg["use_sliding_window"] = False
    cfg["rope_scaling"] = {"factor": 2.0}
    _write(tmp_path / "e", dict(ref.state_dict()), cfg, 1)
    with pytest.raises(ValueError, match="rope scaling"):
        DiffusionLM.from_pretrained(str(tmp_path / "e"))


def test_config_and_file_errors_are_named(tmp_path):
    _, path = _dream(tmp_path, False, 1)
    cfg_file = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_file))
    # A mask outside the vocabulary fails at load time, not as an index error in generate
    # (LLaDA's default mask 126336 when a small config names none).
    json.dump({**cfg, "mask_token_id": V}, open(cfg_file, "w"))
    with pytest.raises(ValueError, match=f"mask_token_id {V} must be < vocab_size {V}"):
        DiffusionLM.from_pretrained(path)
    assert from_pretrained(path, mask_token_id=V - 1).cfg.mask_token_id == V - 1
    json.dump(cfg, open(cfg_file, "w"))
    with pytest.raises(ValueError, match=r"unknown ModelConfig override\(s\) \['foo'\]"):
        from_pretrained(path, foo=1)
    with pytest.raises(TypeError, match="floating-point dtype"):
        from_pretrained(path, dtype="int8")
    weights = os.path.join(path, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        DiffusionLM.from_pretrained(path)
    with open(cfg_file, "w") as f:
        f.write("{broken")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        DiffusionLM.from_pretrained(path)


# ---------------------------------------------------------------------------------------------
# our own format, tokenizers, generation end to end
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tie,shard", [(False, 4000), (True, None)], ids=["sharded", "tied-1file"])
def test_save_pretrained_roundtrip(tmp_path, tie, shard):
    from dlm.data import CharTokenizer

    tok = CharTokenizer("abcdefgh ")
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=40, n_layers=2, n_heads=2, d_ff=56,
                      mask_token_id=tok.mask_token_id, tie_embeddings=tie,
                      qkv_bias=True)  # fmt: skip
    model = DiffusionLM(cfg).eval()
    _randomize(model)
    model.save_pretrained(str(tmp_path), tokenizer=tok, max_shard_size=shard)
    assert os.path.exists(
        tmp_path / ("model.safetensors.index.json" if shard else "model.safetensors")
    )
    again = DiffusionLM.from_pretrained(str(tmp_path))
    assert again.cfg == cfg
    if tie:
        assert again.lm_head.weight is again.tok_emb.weight
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
    tok2 = load_tokenizer(str(tmp_path))
    assert tok2.decode(tok2.encode("bad cafe")) == "bad cafe"


def test_save_pretrained_over_an_earlier_save_replaces_its_weights(tmp_path):
    """Saving into a folder that holds another layout's weights (shards + index, or one file)
    must leave only the new ones: the loader prefers an index, so a stale one loaded the old
    weights."""
    cfg = ModelConfig(vocab_size=11, d_model=40, n_layers=2, n_heads=2, d_ff=56,
                      mask_token_id=10)  # fmt: skip
    ids = torch.randint(0, 11, (2, 9))
    for first, second in ((4000, None), (None, 4000), (2000, 4000)):
        path = tmp_path / f"{first}-{second}"
        old, new = DiffusionLM(cfg).eval(), DiffusionLM(cfg).eval()
        _randomize(old)
        _randomize(new)
        old.save_pretrained(str(path), max_shard_size=first)
        new.save_pretrained(str(path), max_shard_size=second)
        with torch.no_grad():
            assert torch.equal(DiffusionLM.from_pretrained(str(path))(ids), new(ids))
        weights = sorted(n for n in os.listdir(path) if n.startswith("model"))
        if second is None:
            assert weights == ["model.safetensors"]
        else:
            index = json.loads((path / "model.safetensors.index.json").read_text())
            assert weights == sorted(
                {*index["weight_map"].values(), "model.safetensors.index.json"}
            )


def test_save_pretrained_keeps_a_time_conditioned_models_schedule(tmp_path):
    """A time-conditioned model from the trainer maps the samplers' masked fraction to the t it
    was trained on (its schedule's inverse); an export must keep that map."""
    from dlm.config import TrainConfig
    from dlm.sampler import time_input
    from dlm.trainer import attach_time_map

    cfg = ModelConfig(vocab_size=11, d_model=40, n_layers=2, n_heads=2, d_ff=56,
                      mask_token_id=10, time_conditioning=True)  # fmt: skip
    model = DiffusionLM(cfg).eval()
    attach_time_map(model, cfg, TrainConfig(schedule="cosine"))
    model.save_pretrained(str(tmp_path))
    again = DiffusionLM.from_pretrained(str(tmp_path))
    f = torch.tensor([0.25, 0.5, 0.75])
    want = time_input(model)(f)
    assert not torch.allclose(want, f)  # cosine: t is not the fraction
    assert torch.equal(time_input(again)(f), want)


def _tiny_tokenizer_json(path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"w{i}": i for i in range(vocab - 3)}
    words.update({"<|endoftext|>": vocab - 2, "<|mask|>": vocab - 1, "[UNK]": vocab - 3})
    tk = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(["<|endoftext|>", "<|mask|>"])
    tk.save(os.path.join(path, "tokenizer.json"))


def test_tokenizer_and_generate_end_to_end(tmp_path):
    """A Dream checkpoint with its tokenizer.json: the sampler (shifted logits, T=0) commits the
    same tokens with our model as with transformers' Qwen2 holding the same weights."""
    from dlm.sampler import generate

    ref, path = _dream(tmp_path, False, 2)
    _tiny_tokenizer_json(path, V)
    model = from_pretrained(path)
    tok = load_tokenizer(path, model.cfg)
    assert (tok.mask_token_id, tok.pad_token_id) == (210, 209)
    prompt = torch.as_tensor(tok.encode("w1 w2 w3 w4 w5"))[None]
    assert prompt.tolist() == [[1, 2, 3, 4, 5]]

    def hf(input_ids, attention_mask=None, position_ids=None):
        am = (
            torch.ones_like(input_ids, dtype=torch.bool)
            if attention_mask is None
            else attention_mask
        )
        pos = position_ids if position_ids is not None else torch.arange(input_ids.shape[1])[None]
        return _hf_logits(ref, input_ids, am, pos.expand_as(input_ids))

    kw = dict(gen_length=8, steps=4, mask_id=tok.mask_token_id, logits_shift=model.cfg.logits_shift,
              alg="entropy", temperature=0.0)  # fmt: skip
    ours = generate(model, prompt, None, **kw)
    theirs = generate(hf, prompt, None, **kw)
    assert torch.equal(ours, theirs)
    assert not (ours == tok.mask_token_id).any()
    assert isinstance(tok.decode(ours[0, 5:].tolist()), str)


def test_cli_sample_and_eval_from_a_model_directory(tmp_path, capsys, monkeypatch):
    """`dlm sample --model DIR` and `dlm eval --model DIR --data FILE` on a Dream checkpoint
    (the ELBO with Dream's shifted logits)."""
    import dlm.likelihood
    from dlm.cli import main

    seen = []
    real_elbo = dlm.likelihood.elbo

    def spy(*args, **kw):
        seen.append(kw.get("logits_shift"))
        return real_elbo(*args, **kw)

    monkeypatch.setattr(dlm.likelihood, "elbo", spy)

    _, path = _dream(tmp_path, False, 1)
    _tiny_tokenizer_json(path, V)
    rc = main(["sample", "--model", str(path), "--prompt", "w1 w2 w3", "--length", "6",
               "--steps", "3", "--alg", "entropy", "--show-steps"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert "=== sample 0" in out and "step 3" in out and "tokens/s" in out
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(f"w{i % 50}" for i in range(400)))
    rc = main(["eval", "--model", str(path), "--data", str(text), "--seq-len", "32",
               "--windows", "4", "--mc-num", "2"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "ELBO bound" in out and seen == [True]
    with pytest.raises(SystemExit, match="needs --data"):
        main(["eval", "--model", str(path)])


def test_llada_clip_qkv_is_refused(tmp_path):
    # OLMo's blocks clamp q, k and v to [-clip_qkv, clip_qkv]: loading without it would change
    # the model's outputs silently.
    ref, path = _llada(tmp_path, "llama", False, 1)
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["clip_qkv"] = 8.0
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="clip_qkv"):
        DiffusionLM.from_pretrained(path)
