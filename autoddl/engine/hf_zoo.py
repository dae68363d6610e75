"""``--model hf:MODEL_TYPE:key=value,...``: any Hugging Face causal or masked LM, from its config.

The family's config class (``AutoConfig.for_model``) is built with tiny sizes and autoddl's keys
mapped onto the family's own names (``hidden`` is ``n_embd`` in GPT-2, ``hidden_size`` in
LLaMA; ``ffn`` is ``n_inner``, ``intermediate_size``, ``ffn_dim`` or ``ffn_hidden_size``;
``kv_heads`` is ``num_key_value_heads`` or ``num_kv_heads``), every dropout (and OPT's
``layerdrop``) at 0 so that ``run --check`` can compare with one process, no KV cache, and
any raw config key on top. ``AutoModelForCausalLM`` or ``AutoModelForMaskedLM``
``.from_config`` then builds the model (no weights downloaded), in training mode, wrapped in
:class:`~autoddl.engine.zoo.TokenLoss`: cross-entropy of its logits over every position of the
targets. Attention is ``sdpa`` where the family supports it, else ``eager``.
"""

from __future__ import annotations

import difflib
import inspect
import sys
from typing import Any

import torch
import torch.nn as nn

from autoddl.errors import UserError, first_line
from autoddl.hf_specs import HF_OPTIONAL, HF_PREFIX, ParamValue, unknown_type_message
from autoddl.engine.zoo import TokenLoss, construct, library

#: autoddl's keys -> the config's standard attribute (``attribute_map`` renames it per family)
_STANDARD = {"layers": "num_hidden_layers", "hidden": "hidden_size",
             "heads": "num_attention_heads", "vocab": "vocab_size"}
#: the names families give the MLP's inner width and the key-value heads (first one present)
_FFN_NAMES = ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "dff")
_KV_NAMES = ("num_key_value_heads", "num_kv_heads")
#: the encoder's and decoder's own names of autoddl's keys in encoder-decoder configs (BART's
#: ``decoder_layers``: its ``...ForCausalLM`` is the decoder)
_TWINS = {"layers": ("encoder_layers", "decoder_layers"),
          "heads": ("encoder_attention_heads", "decoder_attention_heads"),
          "ffn": ("encoder_ffn_dim", "decoder_ffn_dim")}
#: widths that default to the hidden size at tiny sizes (ELECTRA's embeddings, OPT's projection)
_HIDDEN_WIDTHS = ("embedding_size", "word_embed_proj_dim")
#: keys of autoddl's own that are not config keys
_OWN = {"seq", "batch", "head", *_STANDARD, *HF_OPTIONAL}


def _auto(head: str) -> Any:
    """transformers' auto class of an LM head."""
    tf = library("transformers")
    return tf.AutoModelForCausalLM if head == "causal" else tf.AutoModelForMaskedLM


def _head_and_class(model_type: str, config_class: type, want: str | None) -> tuple[str, type]:
    """The LM head (``want``, else masked for an encoder with a ``...ForMaskedLM`` class, else
    causal) and the model class that builds it."""
    from transformers.models.auto import modeling_auto as ma

    causal, masked = ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    if model_type not in causal and model_type not in masked:
        raise UserError(unknown_type_message(model_type, list(causal), list(masked)))
    head = want or ("masked" if masked.get(model_type, "").endswith("ForMaskedLM")
                    or model_type not in causal else "causal")
    names = causal if head == "causal" else masked
    if model_type not in names:
        raise UserError(f"--model hf:{model_type}: transformers has no {head} LM of this type; "
                        f"give head={'masked' if head == 'causal' else 'causal'}")
    try:
        return head, _auto(head)._model_mapping[config_class]
    except Exception as exc:
        raise UserError(f"--model hf:{model_type}: transformers could not load its {head} LM "
                        f"class {names[model_type]} ({first_line(exc)})") from None


def _has(base: Any, name: str) -> bool:
    """Whether the config has attribute ``name`` (XLNet's ``max_position_embeddings`` is a
    property that raises NotImplementedError)."""
    try:
        getattr(base, name)
    except Exception:
        return False
    return True


def _first_present(base: Any, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in base.to_dict() or _has(base, n)), None)


def _settable(config_class: type, name: str) -> bool:
    """Whether ``name`` is a plain attribute of the config (Falcon's ``head_dim`` is a
    read-only property)."""
    return not isinstance(getattr(config_class, name, None), property)


def _check_raw_keys(model_type: str, base: Any, raw: dict[str, ParamValue],
                    taken: dict[str, str]) -> None:
    """Each raw key is a key of the family's config, and none is one autoddl's keys set."""
    known = set(base.to_dict()) | set(type(base).attribute_map) | {"attn_implementation"}
    known |= set(inspect.signature(type(base).__init__).parameters) - {"self", "kwargs"}
    for key in raw:
        if key in taken:
            raise UserError(f"--model hf:{model_type}: {key} is set by autoddl's key "
                            f"{taken[key]}=; give {taken[key]}= instead")
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known | _OWN), n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise UserError(f"--model hf:{model_type}: {key!r} is not a key of "
                            f"{type(base).__name__} nor one of autoddl's "
                            f"({', '.join(sorted(_OWN))}){hint}")


def _position_offset(model_class: type, base: Any) -> int:
    """Rows that position embeddings need beyond the sequence: RoBERTa-like families number
    positions from ``pad_token_id + 1``."""
    module = sys.modules.get(model_class.__module__)
    pad = getattr(base, "pad_token_id", None)
    try:
        uses_pad = module is not None and \
            "create_position_ids_from_input_ids" in inspect.getsource(module)
    except (OSError, TypeError):
        uses_pad = False
    return pad + 1 if uses_pad and isinstance(pad, int) else 0


def _sizes(p: dict[str, ParamValue]) -> dict[str, int]:
    """autoddl's integer keys of spec parameters ``p`` (checked integers when parsed)."""
    return {k: int(v) for k, v in p.items() if k in _OWN and k != "head"}  # type: ignore[arg-type]


def _config_kwargs(model_type: str, base: Any, model_class: type,
                   p: dict[str, int]) -> tuple[dict[str, Any], dict[str, str]]:
    """The config's keyword arguments for spec parameters ``p`` (autoddl's keys mapped onto the
    family's names, tiny-size fixes, dropout 0), and the config names autoddl's keys set (the
    tiny-size fixes, such as ``head_dim``, are defaults that raw keys may override)."""
    cls, amap = type(base), type(base).attribute_map
    kw: dict[str, Any] = {}
    taken: dict[str, str] = {}

    def put(own: str, name: str, value: Any) -> None:
        name = amap.get(name, name)
        kw[name], taken[name] = value, own
        taken.update({alias: own for alias, target in amap.items() if target == name})

    for own, std in _STANDARD.items():
        if own == "heads" and not _has(base, std):
            continue  # attention-free families (Mamba, RWKV)
        if not _has(base, std):
            raise UserError(f"--model hf:{model_type}: {cls.__name__} has no {std}; "
                            f"autoddl's {own}= cannot be set")
        put(own, std, p[own])
    hidden, heads = p["hidden"], p["heads"]
    if _has(base, "max_position_embeddings"):
        put("seq", "max_position_embeddings", p["seq"] + _position_offset(model_class, base))
    for own, names, default in (("ffn", _FFN_NAMES, 4 * hidden), ("kv_heads", _KV_NAMES, heads)):
        name = _first_present(base, names)
        if name is not None:
            value = p.get(own, default)  # one per layer where the family lists them (Gemma 3n)
            put(own, name, [value] * p["layers"] if isinstance(getattr(base, name), list)
                else value)
        elif own in p:
            raise UserError(f"--model hf:{model_type}: {cls.__name__} has none of "
                            f"{', '.join(names)}; remove {own}=")
    for own, names in _TWINS.items():
        for name in names:
            if name in base.to_dict():
                put(own, name, p.get(own, 4 * hidden) if own == "ffn" else p[own])
    kw.update(_tiny_defaults(base, hidden, hidden // heads, p["vocab"]))
    kw["use_cache"] = False
    return kw, taken


def _tiny_defaults(base: Any, hidden: int, head_dim: int, vocab: int) -> dict[str, Any]:
    """Config values that fit a tiny model: head width from hidden/heads, embedding widths
    the hidden size, rotary width within the head, dropout 0, token ids in the vocabulary."""
    cls, values = type(base), base.to_dict()
    kw: dict[str, Any] = {}
    if "head_dim" in values and _settable(cls, "head_dim"):
        kw["head_dim"] = head_dim
    for name in _HIDDEN_WIDTHS:
        if name in values:
            kw[name] = hidden
    if isinstance(values.get("rotary_dim"), int) and values["rotary_dim"] > head_dim:
        kw["rotary_dim"] = head_dim  # GPT-J's default 64 exceeds a tiny head
    for key, value in values.items():
        if "drop" in key and isinstance(value, float):
            kw[key] = 0.0
        if key.endswith("_token_id") and isinstance(value, int) and value >= vocab:
            kw[key] = vocab - 1  # an id past a tiny vocabulary (padding_idx) would not build
    return kw


def hf_config(model_type: str, p: dict[str, ParamValue]) -> tuple[Any, str, type]:
    """The config of ``hf:MODEL_TYPE`` with spec parameters ``p``, its LM head and the model
    class that builds it (:class:`UserError` on an unknown type or key, or a config the family
    refuses)."""
    tf = library("transformers")
    what = f"--model hf:{model_type}"
    if model_type not in tf.CONFIG_MAPPING:
        from transformers.models.auto import modeling_auto as ma
        raise UserError(unknown_type_message(model_type,
                                             list(ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
                                             list(ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES)))
    config_class = tf.CONFIG_MAPPING[model_type]
    want = p.get("head")
    head, model_class = _head_and_class(model_type, config_class,
                                        want if isinstance(want, str) else None)
    try:
        base = config_class()
    except Exception as exc:
        raise UserError(f"{what}: {config_class.__name__} cannot be built from keys alone: "
                        f"{type(exc).__name__}: {first_line(exc)}") from None
    kw, taken = _config_kwargs(model_type, base, model_class, _sizes(p))
    raw = {k: v for k, v in p.items() if k not in _OWN}
    _check_raw_keys(model_type, base, raw, taken)
    kw.update(raw)
    try:
        config = config_class(**kw)
    except Exception as exc:
        raise UserError(f"{what}: {config_class.__name__} refused the configuration: "
                        f"{type(exc).__name__}: {first_line(exc)}") from None
    for name, own in taken.items():
        if name in kw and getattr(config, name, kw[name]) != kw[name]:
            raise UserError(f"{what}: {config_class.__name__} did not take {name}={kw[name]} "
                            f"(from {own}=); it has {getattr(config, name)!r}")
    return config, head, model_class


def build_hf(model_type: str, p: dict[str, ParamValue], device: torch.device,
             gen: torch.Generator | None) -> tuple[nn.Module, tuple]:
    """The ``hf:MODEL_TYPE`` model (training mode, loss-returning) and one global batch of
    random tokens and targets (from ``gen``)."""
    config, head, model_class = hf_config(model_type, p)
    attn = getattr(config, "_attn_implementation_internal", None) or \
        ("sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager")
    sizes = _sizes(p)
    vocab, shape = int(config.vocab_size), (sizes["batch"], sizes["seq"])

    def make(where: torch.device) -> tuple[nn.Module, tuple]:
        try:
            lm = _auto(head).from_config(config, attn_implementation=attn)
        except Exception as exc:
            raise UserError(f"--model {HF_PREFIX}{model_type}: transformers could not build "
                            f"{model_class.__name__}: {type(exc).__name__}: "
                            f"{first_line(exc)}") from None
        model = TokenLoss(lm, vocab).train()
        model = model if where.type in ("cpu", "meta") else model.to(where)
        inputs = tuple(torch.randint(0, vocab, shape, generator=gen).to(where) for _ in range(2))
        return model, inputs

    return construct(make, device)
