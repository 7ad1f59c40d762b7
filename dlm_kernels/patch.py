"""Our kernels inside Hugging Face transformers models, in the style of Liger-Kernel's
``apply_liger_kernel_to_*``.

    from dlm_kernels.patch import apply_dlm_kernels, register_attention
    register_attention()                       # attn_implementation="dlm" is now a valid choice
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="dlm")
    apply_dlm_kernels(model)                   # attention + fused loss on a loaded model

* Attention: ``bidirectional_attention`` is registered with transformers' ``AttentionInterface``
  under the name "dlm", together with a mask function under the same name in
  ``AttentionMaskInterface``. The mask function hands the attention the 2-D padding mask
  (B, S) bool, never a 4-D causal one: "dlm" attention is bidirectional whatever the model's
  ``is_causal``, which is what Dream- and LLaDA-style diffusion models need. A 4-D mask passed
  by the caller is reduced to the keys it lets any query see (a key padding mask).
* Loss: the causal-LM forward is replaced, when ``labels`` are given, by one that feeds the final
  hidden states and the LM head weight to ``masked_linear_cross_entropy``: same value as
  transformers' loss (mean over labels != -100, or sum / num_items_in_batch), no logits built.

transformers is imported lazily, inside the functions: dlm_kernels does not depend on it.
"""

from __future__ import annotations

import functools
import inspect
import types

import torch
from torch import Tensor

from dlm_kernels.ops.attention import bidirectional_attention
from dlm_kernels.ops.linear_cross_entropy import masked_linear_cross_entropy

NAME = "dlm"


def _key_padding(attention_mask: Tensor | None, B: int, Sk: int) -> Tensor | None:
    """(B, Sk) bool, True = real key, from what transformers passes: None, a 2-D padding mask
    (our mask function), or a 4-D bool / additive float mask (the caller's own)."""
    if attention_mask is None:
        return None
    m = attention_mask
    if m.dim() == 4:
        allowed = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
        m = allowed.any(dim=1).any(dim=1)  # a key is real if any query of any head may see it
    elif m.dim() != 2:
        raise ValueError(f"dlm attention: attention_mask must be 2-D (B, S) or 4-D, got shape "
                         f"{tuple(m.shape)}")  # fmt: skip
    m = m.to(torch.bool)[:, -Sk:]
    return m.expand(B, Sk) if m.shape[0] == 1 and B > 1 else m


def dlm_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention-function signature around ``bidirectional_attention``.

    Args:
        module: the calling attention module (unused; GQA is handled by the op itself).
        query: (B, Hq, Sq, D); key, value: (B, Hkv, Sk, D), the layout transformers uses.
        attention_mask: None, (B, Sk) bool (from the "dlm" mask function), or a 4-D mask.
        dropout: must be 0 (the op has no dropout). scaling: softmax scale (default 1/sqrt(D)).
        kwargs: softcap, and a sliding_window shorter than the keys, are refused; the rest
            is ignored.

    Returns:
        ((B, Sq, Hq, D) output, None): no attention weights.

    Example:
        >>> register_attention()
        >>> model = Qwen2ForCausalLM(config)              # config.attn_implementation = "dlm"
        >>> out = model(ids, attention_mask=am).logits    # bidirectional, padding respected
    """
    if dropout:
        raise ValueError(f"dlm attention has no dropout; got dropout={dropout} (set the model's "
                         "attention_dropout to 0 or call model.eval())")  # fmt: skip
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, S, H, D)
    window = kwargs.get("sliding_window")
    # A window at least as long as the keys cuts nothing (Mistral's default 4096 on a short
    # sequence); a shorter one would, and the op has none.
    if (window is not None and window < k.shape[1]) or kwargs.get("softcap") is not None:
        raise ValueError(f"dlm attention supports neither a sliding window shorter than the "
                         f"sequence ({window} < {k.shape[1]} keys) nor softcap "
                         f"({kwargs.get('softcap')})")  # fmt: skip
    mask = _key_padding(attention_mask, q.shape[0], k.shape[1])
    out = bidirectional_attention(q, k, v, attention_mask=mask, softmax_scale=scaling)
    return out, None


def dlm_attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0,
                       kv_offset: int = 0, mask_function=None, attention_mask=None,
                       **kwargs) -> Tensor | None:  # fmt: skip
    """transformers' mask-function signature: the (B, kv_length) bool padding mask, or None.

    The causal (or sliding, or packed) ``mask_function`` is ignored on purpose: "dlm" attention
    is bidirectional, and the op wants key padding only.
    """
    if attention_mask is None:
        return None
    return attention_mask.to(torch.bool)[:, -kv_length:]


def register_attention() -> None:
    """Make ``attn_implementation="dlm"`` valid in transformers (attention + its mask)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, dlm_attention_forward)
    AttentionMaskInterface.register(NAME, dlm_attention_mask)


def _loss_forward(original, shift: bool):
    """A causal-LM forward whose loss goes through masked_linear_cross_entropy.

    It keeps ``original``'s signature (functools.wraps; arguments bound by it), so positional
    calls mean what they meant and transformers' Trainer, which keeps the dataset columns the
    forward's signature names, still passes attention_mask and position_ids."""
    sig = inspect.signature(original)

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        bound = sig.bind(self, *args, **kwargs)
        named = {}
        for name, value in list(bound.arguments.items())[1:]:  # [0] is self
            kind = sig.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                named.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    raise TypeError("dlm_kernels.patch: unexpected extra positional arguments")
            else:
                named[name] = value
        labels = named.pop("labels", None)
        if labels is None:
            return original(self, *args, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        shifted = named.pop("shift_labels", None)  # labels already shifted by the caller
        return_dict = named.pop("return_dict", None)
        num_items = named.pop("num_items_in_batch", None)
        named.pop("logits_to_keep", None)
        out = self.model(**named)
        h = out.last_hidden_state
        if shifted is not None:
            target = shifted.to(h.device)
        else:
            target = labels.to(h.device)
            if shift:  # transformers' causal-LM loss: position i predicts token i + 1
                h, target = h[:, :-1], target[:, 1:]
        head = self.get_output_embeddings()
        loss = masked_linear_cross_entropy(
            h.contiguous(), head.weight, target.contiguous(), bias=getattr(head, "bias", None),
            reduction="mean" if num_items is None else "sum",
            softcap=getattr(self.config, "final_logit_softcapping", None),  # Gemma 2
        )  # fmt: skip
        if num_items is not None:  # gradient accumulation: sum / tokens of the whole step
            loss = loss / num_items
        result = CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=out.hidden_states,
                                        attentions=out.attentions)  # fmt: skip
        return result.to_tuple() if return_dict is False else result

    return forward


def apply_dlm_kernels(model, *, attention: bool = True, fused_linear_cross_entropy: bool = True,
                      shift_labels: bool = True):  # fmt: skip
    """Route a loaded transformers causal-LM's attention and training loss to our ops.

    Args:
        model: a ``PreTrainedModel`` with ``.model`` (the decoder, returning
            last_hidden_state) and an output embedding (Qwen2, Llama, Mistral, Dream-like ...).
        attention: switch the model to ``attn_implementation="dlm"`` (bidirectional).
        fused_linear_cross_entropy: when ``labels`` are given, compute the loss with
            ``masked_linear_cross_entropy`` from the hidden states; ``logits`` is then None.
        shift_labels: True (default): transformers' causal-LM loss (Dream's shifted logits).
            False: labels are aligned with the positions (LLaDA-style, -100 where unmasked).

    Returns:
        The same model, patched in place.

    Example:
        >>> model = Qwen2ForCausalLM.from_pretrained(path)
        >>> apply_dlm_kernels(model)
        >>> model(ids, attention_mask=am, labels=labels).loss.backward()
    """
    if attention:
        register_attention()
        model.set_attn_implementation(NAME)
    if fused_linear_cross_entropy:
        if not hasattr(model, "model") or model.get_output_embeddings() is None:
            raise TypeError(f"apply_dlm_kernels: {type(model).__name__} has no decoder `.model` "
                            "and output embedding; expected a *ForCausalLM model")  # fmt: skip
        original = type(model).forward
        model.forward = types.MethodType(_loss_forward(original, shift_labels), model)
    return model


def _apply_to(cls_path: str, model, **kwargs):
    import importlib

    module, name = cls_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    if model is not None:
        if not isinstance(model, cls):
            raise TypeError(f"expected a {name}, got {type(model).__name__}")
        return apply_dlm_kernels(model, **kwargs)
    # No model: patch the class, as Liger does, so that models created later get the loss; the
    # attention is chosen at creation with attn_implementation="dlm".
    register_attention()
    if kwargs.get("fused_linear_cross_entropy", True):
        cls.forward = _loss_forward(cls.forward, kwargs.get("shift_labels", True))
    return None


def apply_dlm_kernels_to_qwen2(model=None, **kwargs):
    """Qwen2 (and Dream, which uses Qwen2's layers): see :func:`apply_dlm_kernels`.

    Example:
        >>> apply_dlm_kernels_to_qwen2()                  # before creating the model
        >>> model = Qwen2ForCausalLM.from_pretrained(path, attn_implementation="dlm")
    """
    return _apply_to("transformers.models.qwen2.modeling_qwen2.Qwen2ForCausalLM", model, **kwargs)


def apply_dlm_kernels_to_llama(model=None, **kwargs):
    """Llama (LLaDA's architecture): see :func:`apply_dlm_kernels`.

    Example:
        >>> model = LlamaForCausalLM(config)
        >>> apply_dlm_kernels_to_llama(model)
    """
    return _apply_to("transformers.models.llama.modeling_llama.LlamaForCausalLM", model, **kwargs)
