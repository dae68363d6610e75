"""``--model`` specs parsed and checked without importing torch, so that a typo in a spec is
reported at once (importing torch alone takes seconds on a loaded machine).

The model builders live in :mod:`autoddl.engine.models` (built-in models),
:mod:`autoddl.engine.zoo` (library models, ``path/to/file.py:factory``) and
:mod:`autoddl.engine.hf_zoo` (``hf:MODEL_TYPE:...``, parsed in :mod:`autoddl.hf_specs`); the
names and default parameters of every model are here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from autoddl.errors import UserError
from autoddl.hf_specs import HF_PREFIX, ParamValue, is_hf_spec, parse_hf_spec
from autoddl.specs import as_int, check_keys, parse_spec

#: the ModelSpec name of ``path/to/file.py:factory`` models
FILE_MODEL = "file"

#: the built-in models' default parameters
BUILTIN_DEFAULTS: dict[str, dict[str, int]] = {
    "mlp": dict(batch=64, dim_in=64, hidden=256, layers=2, dim_out=64),
    "gpt": dict(layers=2, hidden=64, heads=4, seq=32, batch=8, vocab=256),
    "vgg": dict(depth=16, batch=32, image=224, width=64, fc=4096, classes=1000),
    # groups=0: one routing group per sequence (groups = batch)
    "moe-gpt": dict(layers=2, hidden=64, heads=4, kv_heads=4, ffn=128, experts=4, top_k=2,
                    capacity=125, groups=0, glu=0, seq=32, batch=8, vocab=256),
}

#: mixture-of-experts shapes: ``moe-gpt`` with these defaults. Mixtral-8x7B (Jiang et al.
#: 2024): 32 layers, hidden 4096, 32 heads with 8 key/value heads, SwiGLU experts of 14336, 8
#: experts, top-2, vocabulary 32000, sequence 4096 (batch: 256 sequences, 1M tokens, our choice)
MOE_PRESETS: dict[str, dict[str, int]] = {
    "mixtral-8x7b": dict(layers=32, hidden=4096, heads=32, kv_heads=8, ffn=14336, experts=8,
                         top_k=2, capacity=125, groups=0, glu=1, seq=4096, batch=256,
                         vocab=32000),
}

_TEXT = dict(layers=2, hidden=64, heads=4, seq=32, batch=8, vocab=256)
_IMAGE = dict(batch=8, image=64, classes=10)

#: the library models' default parameters (:data:`autoddl.engine.zoo.ZOO` builds them)
ZOO_DEFAULTS: dict[str, dict[str, int]] = {
    "hf-gpt2": _TEXT,
    "hf-bert": _TEXT,
    "hf-llama": dict(_TEXT, kv_heads=2, ffn=176),
    "tv-resnet50": _IMAGE,
    "tv-vgg16": dict(_IMAGE, image=32),
    "timm-vit": dict(batch=8, image=32, patch=8, hidden=64, heads=4, layers=2, classes=10),
}

#: GPT configurations of the Megatron-LM SC'21 table (heads, hidden, layers, global batch;
#: sequence 2048, vocabulary 51200), and GPT-3 175B. Each is ``gpt`` with these defaults.
GPT_PRESETS: dict[str, dict[str, int]] = {
    name: dict(heads=h, hidden=d, layers=L, batch=b, seq=2048, vocab=51200)
    for name, h, d, L, b in [
        ("gpt-1.7b", 24, 2304, 24, 512), ("gpt-3.6b", 32, 3072, 30, 512),
        ("gpt-7.5b", 32, 4096, 36, 512), ("gpt-18.4b", 48, 6144, 40, 1024),
        ("gpt-39.1b", 64, 8192, 48, 1536), ("gpt-76.1b", 80, 10240, 60, 1792),
        ("gpt-145.6b", 96, 12288, 80, 2304), ("gpt-310.1b", 128, 16384, 96, 2160),
        ("gpt-529.6b", 128, 20480, 105, 2520), ("gpt-1t", 160, 25600, 128, 3072),
        ("gpt3-175b", 96, 12288, 96, 1536),
    ]
}

#: keys whose value may be 0 (``glu``: off; ``groups``: one per sequence)
_ZERO_OK = frozenset({"glu", "groups"})

#: the depths of VGG (:data:`autoddl.engine.models.VGG_CONFIGS`)
VGG_DEPTHS = (11, 13, 16, 19)


@dataclass(frozen=True)
class ModelSpec:
    """A parsed ``--model`` spec: the name (``hf:MODEL_TYPE`` for Hugging Face specs), its
    parameters (integers; an ``hf:`` spec's raw config keys may be any literal), and the
    original text."""

    name: str
    params: tuple[tuple[str, ParamValue], ...]
    text: str

    def get(self, key: str) -> ParamValue:
        """The value of parameter ``key``."""
        return dict(self.params)[key]

    @property
    def is_hf(self) -> bool:
        """Whether the spec is ``hf:MODEL_TYPE:...``."""
        return self.name.startswith(HF_PREFIX)


def is_file_spec(text: str) -> bool:
    """Whether a ``--model`` spec names ``path/to/file.py:factory``."""
    head, sep, tail = text.partition(":")
    return head.endswith(".py") and bool(sep)


def _check_values(name: str, p: dict[str, int]) -> None:
    """The checks between a model's parameters (:class:`UserError` on the first that fails)."""
    what = f"--model {name}"
    if "heads" in p and p["hidden"] % p["heads"]:
        raise UserError(f"{what}: hidden={p['hidden']} is not divisible by heads={p['heads']}")
    if "patch" in p and p["image"] % p["patch"]:
        raise UserError(f"{what}: image={p['image']} is not a multiple of patch={p['patch']}")
    if name == "vgg" and p["depth"] not in VGG_DEPTHS:
        raise UserError(f"{what}: depth={p['depth']}; choose one of "
                        f"{', '.join(map(str, VGG_DEPTHS))}")
    if "experts" in p:
        _check_moe(what, p)
    if name == "vgg" and p["image"] % 32:
        raise UserError(f"{what}: image={p['image']} must be a multiple of 32 (five poolings)")


def _check_moe(what: str, p: dict[str, int]) -> None:
    """The checks of a mixture-of-experts spec (``groups`` already resolved)."""
    if p["heads"] % p["kv_heads"]:
        raise UserError(f"{what}: heads={p['heads']} is not a multiple of "
                        f"kv_heads={p['kv_heads']}")
    if p["top_k"] > p["experts"]:
        raise UserError(f"{what}: top_k={p['top_k']} exceeds experts={p['experts']}; "
                        "route each token to at most every expert")
    if (p["batch"] * p["seq"]) % p["groups"]:
        raise UserError(f"{what}: groups={p['groups']} does not divide the "
                        f"{p['batch'] * p['seq']} tokens of a batch; choose a divisor")
    if p["glu"] not in (0, 1):
        raise UserError(f"{what}: glu={p['glu']}; choose 0 (GELU experts) or 1 (SwiGLU)")


def parse_model_spec(text: str) -> ModelSpec:
    """Parse ``--model NAME[:key=value,...]`` against the built-in models' parameters,
    ``path/to/file.py:factory`` (its file must exist), or ``hf:MODEL_TYPE:key=value,...``
    (:func:`autoddl.hf_specs.parse_hf_spec`); :class:`UserError` on a mistake."""
    if isinstance(text, str) and is_file_spec(text.strip()):
        path = text.strip().partition(":")[0]
        if not Path(path).is_file():
            raise UserError(f"--model {text.strip()}: file {path!r} not found")
        return ModelSpec(FILE_MODEL, (), text.strip())
    if is_hf_spec(text):
        model_type, hf_params = parse_hf_spec(text)
        return ModelSpec(HF_PREFIX + model_type, tuple(sorted(hf_params.items())), text.strip())
    name, raw = parse_spec(text, "--model")
    if name in GPT_PRESETS:
        defaults, built = GPT_PRESETS[name], "gpt"
    elif name in MOE_PRESETS:
        defaults, built = MOE_PRESETS[name], "moe-gpt"
    elif name in BUILTIN_DEFAULTS or name in ZOO_DEFAULTS:
        defaults, built = BUILTIN_DEFAULTS.get(name) or ZOO_DEFAULTS[name], name
    else:
        known = ", ".join([*BUILTIN_DEFAULTS, *GPT_PRESETS, *MOE_PRESETS, *ZOO_DEFAULTS])
        raise UserError(f"--model: unknown model {name!r}; built-in models: {known}; "
                        "or hf:MODEL_TYPE[:key=value,...] (any Hugging Face causal or masked "
                        "LM) or path/to/file.py:factory")
    check_keys(raw, defaults, f"--model {name}")
    params = {k: as_int(raw, k, v, f"--model {name}", minimum=0 if k in _ZERO_OK else 1)
              for k, v in defaults.items()}
    if params.get("groups") == 0:  # one routing group per sequence
        params["groups"] = params["batch"]
    _check_values(name, params)
    return ModelSpec(built, tuple(sorted(params.items())), text)


def with_layers(spec: ModelSpec, layers: int) -> ModelSpec:
    """The same model with ``layers`` layers (to capture a repeated-layer model fast)."""
    params = dict(spec.params)
    assert "layers" in params
    params["layers"] = layers
    return ModelSpec(spec.name, tuple(sorted(params.items())), spec.text)
