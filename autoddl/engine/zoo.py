"""Models people train, from their own libraries, and any model from a Python file.

Each spec builds the library's model from a configuration (no weights are downloaded) and wraps it
so that its forward returns the training loss, cross-entropy on the given targets:

* ``hf-gpt2``, ``hf-bert`` (masked-LM head), ``hf-llama`` — Hugging Face ``transformers``; the
  loss is taken over every position of ``targets`` (the caller shifts labels), dropout off so that
  a sharded run can be checked against one process;
* ``tv-resnet50``, ``tv-vgg16`` — ``torchvision.models``;
* ``timm-vit`` — ``timm``'s VisionTransformer.

These need the ``models`` extra (``pip install -e ".[models]"``). ``path/to/file.py:factory``
names a function of that file returning ``(model, example_inputs)``, where the model's forward
returns the loss: a tensor, a ``ModelOutput`` (or dict) with ``.loss``, or a tuple whose first
item is the loss (:func:`returning_loss`). ``hf:MODEL_TYPE:...`` models are built in
:mod:`autoddl.engine.hf_zoo`.

On the ``meta`` device (planning) the model is built under a fake-tensor mode instead: a CPU model
without memory, as some models (LLaMA's rotary embedding) cannot run on ``meta``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from autoddl.errors import UserError
from autoddl.model_specs import ZOO_DEFAULTS

_TORCHVISION_OPS: torch.library.Library | None = None


def ensure_torchvision_importable() -> None:
    """Let ``torchvision`` (imported by transformers and timm too) import where its compiled
    operators do not load beside this torch (a CUDA wheel beside a CPU torch): declare the schemas
    of the two operators it registers fakes for. Its models never call them."""
    global _TORCHVISION_OPS
    spec = importlib.util.find_spec("torchvision")
    if spec is None or _TORCHVISION_OPS is not None or not spec.submodule_search_locations:
        return
    lib_path = os.path.join(list(spec.submodule_search_locations)[0], "_C.so")
    try:
        torch.ops.load_library(lib_path)
        return
    except (OSError, ImportError):
        pass
    _TORCHVISION_OPS = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        _TORCHVISION_OPS.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def library(name: str):
    """Import an optional library, with the fix in the error when it is missing."""
    ensure_torchvision_importable()
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise UserError(f"this model needs {name!r} ({exc}); install the models extra: "
                        'pip install -e ".[models]"') from None


class TokenLoss(nn.Module):
    """A language model (``input_ids`` -> ``.logits``) with cross-entropy over every position."""

    def __init__(self, model: nn.Module, vocab: int) -> None:
        super().__init__()
        self.model, self.vocab = model, vocab

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=tokens).logits
        return F.cross_entropy(logits.reshape(-1, self.vocab), targets.reshape(-1))


class ClassLoss(nn.Module):
    """An image classifier with cross-entropy on the class targets."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(images), targets)


def _hf_gpt2(p: dict[str, int]) -> nn.Module:
    tf = library("transformers")
    cfg = tf.GPT2Config(n_layer=p["layers"], n_embd=p["hidden"], n_head=p["heads"],
                        n_positions=p["seq"], vocab_size=p["vocab"], resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa",
                        use_cache=False)
    return TokenLoss(tf.GPT2LMHeadModel(cfg), p["vocab"])


def _hf_bert(p: dict[str, int]) -> nn.Module:
    tf = library("transformers")
    cfg = tf.BertConfig(num_hidden_layers=p["layers"], hidden_size=p["hidden"],
                        num_attention_heads=p["heads"], intermediate_size=4 * p["hidden"],
                        max_position_embeddings=p["seq"], vocab_size=p["vocab"],
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        attn_implementation="sdpa")
    return TokenLoss(tf.BertForMaskedLM(cfg), p["vocab"])


def _hf_llama(p: dict[str, int]) -> nn.Module:
    tf = library("transformers")
    if p["heads"] % p["kv_heads"]:
        raise UserError(f"--model hf-llama: heads={p['heads']} is not a multiple of "
                        f"kv_heads={p['kv_heads']}")
    cfg = tf.LlamaConfig(num_hidden_layers=p["layers"], hidden_size=p["hidden"],
                         num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
                         intermediate_size=p["ffn"], max_position_embeddings=p["seq"],
                         vocab_size=p["vocab"], attn_implementation="sdpa", use_cache=False)
    return TokenLoss(tf.LlamaForCausalLM(cfg), p["vocab"])


def _tv_resnet50(p: dict[str, int]) -> nn.Module:
    return ClassLoss(library("torchvision.models").resnet50(num_classes=p["classes"]))


def _tv_vgg16(p: dict[str, int]) -> nn.Module:
    return ClassLoss(library("torchvision.models").vgg16(num_classes=p["classes"], dropout=0.0))


def _timm_vit(p: dict[str, int]) -> nn.Module:
    vit = library("timm.models.vision_transformer")
    return ClassLoss(vit.VisionTransformer(
        img_size=p["image"], patch_size=p["patch"], embed_dim=p["hidden"], depth=p["layers"],
        num_heads=p["heads"], num_classes=p["classes"]))


#: name -> (defaults, model builder, kind of inputs, description)
ZOO: dict[str, tuple[dict[str, int], Callable[[dict[str, int]], nn.Module], str, str]] = {
    "hf-gpt2": (ZOO_DEFAULTS["hf-gpt2"], _hf_gpt2, "tokens", "Hugging Face GPT2LMHeadModel"),
    "hf-bert": (ZOO_DEFAULTS["hf-bert"], _hf_bert, "tokens", "Hugging Face BertForMaskedLM"),
    "hf-llama": (ZOO_DEFAULTS["hf-llama"], _hf_llama, "tokens",
                 "Hugging Face LlamaForCausalLM (grouped-query attention: kv_heads)"),
    "tv-resnet50": (ZOO_DEFAULTS["tv-resnet50"], _tv_resnet50, "images", "torchvision ResNet-50"),
    "tv-vgg16": (ZOO_DEFAULTS["tv-vgg16"], _tv_vgg16, "images", "torchvision VGG-16"),
    "timm-vit": (ZOO_DEFAULTS["timm-vit"], _timm_vit, "images", "timm VisionTransformer"),
}


def _moved(model: nn.Module, where: torch.device) -> nn.Module:
    """The model on ``where`` (built on the CPU, or already on ``meta``)."""
    return model if where.type in ("cpu", "meta") else model.to(where)


def construct(make: Callable[[torch.device], tuple[nn.Module, tuple]],
               device: torch.device) -> tuple[nn.Module, tuple]:
    """``make(device)``; for ``meta``, under a fake-tensor mode as a CPU model (shapes only),
    or, where construction reads a value (``.item()``), on the ``meta`` device."""
    if device.type != "meta":
        return make(device)
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    from autoddl.engine.capture import quiet_fake_tensors
    try:
        with FakeTensorMode(), quiet_fake_tensors():
            return make(torch.device("cpu"))
    except DataDependentOutputException:
        with torch.device("meta"):
            return make(device)


def build_zoo(name: str, p: dict[str, int], device: torch.device,
              gen: torch.Generator | None) -> tuple[nn.Module, tuple]:
    """A library model and one global batch of inputs (random, from ``gen``)."""
    _, make_model, kind, _ = ZOO[name]

    def make(where: torch.device) -> tuple[nn.Module, tuple]:
        model = _moved(make_model(p), where)
        if kind == "tokens":
            shape = (p["batch"], p["seq"])
            inputs = tuple(torch.randint(0, p["vocab"], shape, generator=gen).to(where)
                           for _ in range(2))
        else:
            x = torch.randn((p["batch"], 3, p["image"], p["image"]), generator=gen).to(where)
            y = torch.randint(0, p["classes"], (p["batch"],), generator=gen).to(where)
            inputs = (x, y)
        return model, inputs

    return construct(make, device)


class KeywordInputs(nn.Module):
    """A model called with keyword inputs, as one taking them all positionally (the planner and
    runtime pass tuples of tensors): ``forward(*args, *kwargs.values())``."""

    def __init__(self, model: nn.Module, num_args: int, keys: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.num_args = num_args
        self.keys = keys

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The wrapped model's loss."""
        n = self.num_args
        return self.model(*inputs[:n], **dict(zip(self.keys, inputs[n:])))


def loss_of(out: object, where: str) -> object:
    """The loss in a forward's result: a tensor itself, ``.loss`` of a ``ModelOutput`` or dict,
    or the first item of a tuple or list (anything else is returned unchanged, for capture to
    refuse)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) or hasattr(out, "loss"):
        loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss")
        if loss is None:
            raise UserError(f"{where} returned {type(out).__name__} without a loss (loss is "
                            "None); pass the labels among the example inputs")
        return loss
    if isinstance(out, (tuple, list)) and out:
        return out[0]
    return out


def returning_loss(model: nn.Module, where: str) -> nn.Module:
    """``model``, its forward made to return only the loss (:func:`loss_of`); its parameter
    names stay as they are (the instance's ``forward`` is replaced, no wrapper module)."""
    inner = model.forward

    @functools.wraps(inner)
    def forward(*args: object, **kwargs: object) -> object:
        return loss_of(inner(*args, **kwargs), where)

    model.forward = forward  # type: ignore[method-assign]
    return model


def _file_result(result: object, where: str) -> tuple[nn.Module, tuple]:
    """A file factory's ``(model, args)``, ``(model, kwargs)`` or ``(model, args, kwargs)`` as
    a model taking positional tensors and its inputs (one line naming what is wrong)."""
    if not (isinstance(result, tuple) and len(result) in (2, 3)
            and isinstance(result[0], nn.Module)):
        raise UserError(f"{where} must return (model, example_inputs) or (model, args, "
                        f"kwargs), got {type(result).__name__}")
    model, args, kwargs = (*result, {}) if len(result) == 2 else result
    if isinstance(args, dict) and len(result) == 2:
        args, kwargs = (), args
    args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
    if not isinstance(kwargs, dict):
        raise UserError(f"{where} returned keyword inputs of type {type(kwargs).__name__}; "
                        "give them as a dict of tensors")
    for i, t in [*enumerate(args), *kwargs.items()]:
        if not isinstance(t, torch.Tensor):
            raise UserError(f"{where} returned example input {i!r} of type "
                            f"{type(t).__name__}; every example input must be a tensor")
    model = returning_loss(model, f"{where}'s model")
    if kwargs:
        model = KeywordInputs(model, len(args), tuple(kwargs))
    return model, (*args, *kwargs.values())


def build_from_file(text: str, device: torch.device) -> tuple[nn.Module, tuple]:
    """Call ``factory()`` of ``path/to/file.py:factory`` (on ``meta``: in a fake mode)."""
    path, _, factory = text.partition(":")
    if not Path(path).is_file():
        raise UserError(f"--model {text}: file {path!r} not found")
    module_spec = importlib.util.spec_from_file_location(f"autoddl_user_{Path(path).stem}", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    ensure_torchvision_importable()
    from autoddl.engine.capture import quiet_library_notes

    quiet_library_notes()
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise UserError(f"--model {text}: importing {path!r} failed: "
                        f"{type(exc).__name__}: {exc}".splitlines()[0]) from exc
    fn = getattr(module, factory.strip(), None)
    if not callable(fn):
        raise UserError(f"--model {text}: {path!r} has no function {factory.strip()!r}; give "
                        "path/to/file.py:FUNCTION returning (model, example_inputs)")

    def make(where: torch.device) -> tuple[nn.Module, tuple]:
        model, inputs = _file_result(fn(), f"--model {text}: {factory}()")
        return _moved(model, where), tuple(t.to(where) for t in inputs)

    return construct(make, device)
