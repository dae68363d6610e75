"""Built-in models, each a module whose forward returns the training loss.

Model specs on the command line: ``mlp:batch=64,hidden=256,layers=2`` or
``gpt:layers=2,hidden=64,heads=4,seq=32,batch=8,vocab=256``; ``moe-gpt`` (mixture-of-experts
blocks) lives in :mod:`autoddl.engine.moe`. A spec builds the module (on any
device, ``meta`` included) and the example inputs of one global batch. Library models
(``hf-gpt2``, ``tv-resnet50``, ...) and ``path/to/file.py:factory`` come from
:mod:`autoddl.engine.zoo`, ``hf:MODEL_TYPE:...`` from :mod:`autoddl.engine.hf_zoo`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from autoddl.engine.hf_zoo import build_hf
from autoddl.engine.moe import MoEGPT
from autoddl.engine.zoo import ZOO, build_from_file, build_zoo
from autoddl.model_specs import (BUILTIN_DEFAULTS, FILE_MODEL, GPT_PRESETS, ModelSpec,
                                 parse_model_spec, with_layers)

__all__ = ["FILE_MODEL", "GPT_PRESETS", "MODELS", "ModelSpec", "ZOO", "build_model",
           "parse_model_spec", "with_layers"]


class MLP(nn.Module):
    """``layers`` Linear+GELU blocks of width ``hidden`` on ``dim_in`` features, MSE loss."""

    def __init__(self, dim_in: int, hidden: int, layers: int, dim_out: int) -> None:
        super().__init__()
        dims = [dim_in] + [hidden] * layers
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(dims[-1], dim_out)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = F.gelu(layer(x))
        return ((self.head(x) - target) ** 2).mean()  # MSE, in ops that have sharding rules


class Block(nn.Module):
    """Pre-norm transformer block: causal multi-head attention and a GELU MLP, both residual."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)  # fused, laid out per head as Megatron-LM's
        self.proj = nn.Linear(hidden, hidden)
        self.ln2 = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, 4 * hidden)
        self.fc2 = nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        # (b, s, heads, 3, head dim): splitting the fused output by columns splits the heads
        qkv = self.qkv(self.ln1(x)).view(b, s, self.heads, 3, h // self.heads)
        qkv = qkv.permute(3, 0, 2, 1, 4)  # (3, b, heads, s, head dim)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, h))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    """GPT: token + learned position embedding, pre-norm blocks, final norm, LM head, CE loss."""

    def __init__(self, vocab: int, seq: int, hidden: int, heads: int, layers: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.tok_emb = nn.Embedding(vocab, hidden)
        self.pos_emb = nn.Parameter(torch.empty(seq, hidden))
        nn.init.normal_(self.pos_emb, std=0.02)
        self.blocks = nn.ModuleList(Block(hidden, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(tokens) + self.pos_emb
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, self.vocab), targets.view(-1))


#: convolution channels per stage ("M": 2x2 max pooling) of VGG-11/13/16/19 (Simonyan and
#: Zisserman 2015, configurations A, B, D, E), in units of the first stage's width (64)
VGG_CONFIGS: dict[int, list[int | str]] = {
    11: [1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M"],
    13: [1, 1, "M", 2, 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M"],
    16: [1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8, "M", 8, 8, 8, "M"],
    19: [1, 1, "M", 2, 2, "M", 4, 4, 4, 4, "M", 8, 8, 8, 8, "M", 8, 8, 8, 8, "M"],
}


class VGG(nn.Module):
    """VGG: 3x3 convolutions + ReLU in five pooled stages, then three fully connected layers
    (``fc`` wide) to ``classes``; cross-entropy loss. ``width`` is the first stage's channels
    (64 in the paper); no dropout (the plan is the same)."""

    def __init__(self, depth: int, width: int, image: int, fc: int, classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in VGG_CONFIGS[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, int(v) * width, 3, padding=1), nn.ReLU()]
                c = int(v) * width
        self.features = nn.Sequential(*layers)
        side = image // 32
        self.classifier = nn.Sequential(nn.Linear(c * side * side, fc), nn.ReLU(),
                                        nn.Linear(fc, fc), nn.ReLU(), nn.Linear(fc, classes))

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.classifier(self.features(x).flatten(1)), target)


Builder = Callable[[dict[str, int], torch.device, torch.Generator | None], tuple[nn.Module, tuple]]


def _build_mlp(p: dict[str, int], device: torch.device, gen: torch.Generator | None):
    with torch.device(device):
        model = MLP(p["dim_in"], p["hidden"], p["layers"], p["dim_out"])
    x = _randn((p["batch"], p["dim_in"]), device, gen)
    y = _randn((p["batch"], p["dim_out"]), device, gen)
    return model, (x, y)


def _build_gpt(p: dict[str, int], device: torch.device, gen: torch.Generator | None):
    with torch.device(device):
        model = GPT(p["vocab"], p["seq"], p["hidden"], p["heads"], p["layers"])
    shape = (p["batch"], p["seq"])
    tokens = _randint(p["vocab"], shape, device, gen)
    targets = _randint(p["vocab"], shape, device, gen)
    return model, (tokens, targets)


def _build_moe_gpt(p: dict[str, int], device: torch.device, gen: torch.Generator | None):
    with torch.device(device):
        model = MoEGPT(p)
    shape = (p["batch"], p["seq"])
    tokens = _randint(p["vocab"], shape, device, gen)
    targets = _randint(p["vocab"], shape, device, gen)
    return model, (tokens, targets)


def _build_vgg(p: dict[str, int], device: torch.device, gen: torch.Generator | None):
    with torch.device(device):
        model = VGG(p["depth"], p["width"], p["image"], p["fc"], p["classes"])
    x = _randn((p["batch"], 3, p["image"], p["image"]), device, gen)
    y = _randint(p["classes"], (p["batch"],), device, gen)
    return model, (x, y)


def _randn(shape: tuple[int, ...], device: torch.device, gen: torch.Generator | None):
    if device.type == "meta":
        return torch.empty(shape, device=device)
    return torch.randn(shape, generator=gen).to(device)


def _randint(high: int, shape: tuple[int, ...], device: torch.device, gen):
    if device.type == "meta":
        return torch.empty(shape, dtype=torch.long, device=device)
    return torch.randint(0, high, shape, generator=gen).to(device)


MODELS: dict[str, tuple[dict[str, int], Builder, str]] = {
    "mlp": (
        BUILTIN_DEFAULTS["mlp"],
        _build_mlp,
        "Linear+GELU stack with MSE loss",
    ),
    "gpt": (
        BUILTIN_DEFAULTS["gpt"],
        _build_gpt,
        "GPT decoder: embeddings, pre-norm attention+MLP blocks, LM head, cross-entropy",
    ),
    "moe-gpt": (
        BUILTIN_DEFAULTS["moe-gpt"],
        _build_moe_gpt,
        "GPT whose MLPs are top-k routed mixtures of experts with a capacity (GShard/Switch)",
    ),
    "vgg": (
        BUILTIN_DEFAULTS["vgg"],
        _build_vgg,
        "VGG-11/13/16/19 (depth=): 3x3 conv+ReLU stages with max pooling, 3 FC layers, CE loss",
    ),
}


def build_model(
    spec: ModelSpec, device: str | torch.device = "meta", seed: int | None = 0
) -> tuple[nn.Module, tuple]:
    """Build the model and one global batch of example inputs (weights and data from ``seed``)."""
    device = torch.device(device)
    gen = None
    if device.type != "meta" and seed is not None:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed + 1)
    if spec.name == FILE_MODEL:
        return build_from_file(spec.text, device)
    if spec.is_hf:
        return build_hf(spec.name.removeprefix("hf:"), dict(spec.params), device, gen)
    if spec.name in ZOO:
        return build_zoo(spec.name, dict(spec.params), device, gen)
    _, builder, _ = MODELS[spec.name]
    return builder(dict(spec.params), device, gen)
