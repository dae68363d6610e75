"""``--model hf:MODEL_TYPE:key=value,...`` specs, parsed without importing torch or transformers.

``MODEL_TYPE`` is any ``model_type`` of Hugging Face ``transformers`` with a causal-LM or a
masked-LM head (``gpt2``, ``llama``, ``opt``, ``bert``, ...). The model types are read from
``transformers/models/auto/modeling_auto.py`` as text (importing transformers imports torch,
seconds on a loaded machine), so a typo in a model type is reported at once; where that file
cannot be read, the check happens when the model is built
(:mod:`autoddl.engine.hf_zoo`).

Keys: autoddl's own (``layers``, ``hidden``, ``heads``, ``seq``, ``batch``, ``vocab``, and
``kv_heads``, ``ffn`` where the family has them), ``head=causal|masked`` (which LM head), and
any raw key of the family's config (``rotary_dim=8``, ``layerdrop=0.1``, ``alibi=true``),
whose names are checked when the config is built.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
from pathlib import Path
from typing import Union

from autoddl.errors import UserError
from autoddl.specs import as_int

#: the prefix of Hugging Face specs, and of their ModelSpec names (``hf:gpt2``)
HF_PREFIX = "hf:"

#: a value of a model spec's parameter: autoddl's keys are integers, raw config keys any literal
ParamValue = Union[int, float, bool, str, None]

#: the tiny defaults of every ``hf:`` model (the config's own values are full-size models)
HF_DEFAULTS: dict[str, int] = dict(layers=2, hidden=64, heads=4, seq=32, batch=8, vocab=256)

#: autoddl's integer keys without a default: key-value heads (default ``heads``) and the MLP's
#: inner width (default ``4 * hidden``), where the family's config has them
HF_OPTIONAL = ("kv_heads", "ffn")

#: the LM heads ``head=`` chooses between
HEADS = ("causal", "masked")

_EXTRA = "install the models extra: pip install -e \".[models]\""


def is_hf_spec(text: object) -> bool:
    """Whether a ``--model`` spec (or a ModelSpec name) is ``hf:...``."""
    return isinstance(text, str) and text.strip().startswith(HF_PREFIX)


def raw_value(text: str) -> ParamValue:
    """A raw config value: ``true``/``false``, ``none``/``null``, an integer, a number, or
    else the text itself."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@functools.lru_cache(maxsize=1)
def lm_model_types() -> tuple[dict[str, str], dict[str, str]] | None:
    """transformers' (causal-LM, masked-LM) model types, each to its class name, read from
    ``modeling_auto.py`` without importing it; None where transformers is installed but that
    file does not read as expected (the check then happens at build time)."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"--model hf:...: this needs the transformers library; {_EXTRA}")
    path = Path(list(spec.submodule_search_locations)[0], "models", "auto", "modeling_auto.py")
    wanted = {"MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": {}, "MODEL_FOR_MASKED_LM_MAPPING_NAMES": {}}
    try:
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and isinstance(node.targets[0], ast.Name) and node.targets[0].id in wanted
                    and isinstance(node.value, ast.Call) and node.value.args):
                wanted[node.targets[0].id] = dict(ast.literal_eval(node.value.args[0]))
    except (OSError, SyntaxError, ValueError, TypeError):
        return None
    causal, masked = wanted.values()
    return (causal, masked) if causal and masked else None


def unknown_type_message(model_type: str, causal: list[str], masked: list[str]) -> str:
    """The one line for a model type without an LM head: the closest names, then all."""
    close = difflib.get_close_matches(model_type, [*causal, *masked], n=3)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return (f"--model hf:{model_type}: transformers has no causal or masked LM of model type "
            f"{model_type!r}; {hint}causal LM types: {', '.join(sorted(causal))}; masked LM "
            f"types: {', '.join(sorted(masked))}")


def parse_hf_spec(text: str) -> tuple[str, dict[str, ParamValue]]:
    """``hf:MODEL_TYPE:key=value,...`` as (model type, parameters): autoddl's keys as checked
    integers (defaults filled in), ``head`` checked, raw config keys as literals
    (:class:`UserError` on a mistake)."""
    body = text.strip()[len(HF_PREFIX):]
    model_type, _, rest = body.partition(":")
    model_type = model_type.strip()
    if not model_type:
        raise UserError(f"--model {text.strip()}: no model type; write hf:MODEL_TYPE, e.g. "
                        "hf:llama:layers=4")
    what = f"--model hf:{model_type}"
    types = lm_model_types()
    if types is not None and model_type not in types[0] and model_type not in types[1]:
        raise UserError(unknown_type_message(model_type, list(types[0]), list(types[1])))
    raw: dict[str, str] = {}
    for item in (rest.split(",") if rest.strip() else []):
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or not key or not value:
            raise UserError(f"{what}: {item.strip()!r} is not key=value")
        if key in raw:
            raise UserError(f"{what}: key {key!r} given twice")
        if not key.isidentifier():
            raise UserError(f"{what}: {key!r} is not a key name (letters, digits, _)")
        raw[key] = value
    params: dict[str, ParamValue] = {k: as_int(raw, k, v, what) for k, v in HF_DEFAULTS.items()}
    for key in HF_OPTIONAL:
        if key in raw:
            params[key] = as_int(raw, key, 1, what)
    if "head" in raw:
        if raw["head"] not in HEADS:
            raise UserError(f"{what}: head={raw['head']!r}; choose causal or masked")
        params["head"] = raw["head"]
    for key, value in raw.items():
        if key not in params:
            params[key] = raw_value(value)
    _check_sizes(what, params)
    return model_type, params


def _check_sizes(what: str, p: dict[str, ParamValue]) -> None:
    """The checks between autoddl's keys (heads divide hidden, kv heads divide heads)."""
    hidden, heads = p["hidden"], p["heads"]
    assert isinstance(hidden, int) and isinstance(heads, int)
    if hidden % heads:
        raise UserError(f"{what}: hidden={hidden} is not divisible by heads={heads}")
    kv = p.get("kv_heads")
    if isinstance(kv, int) and heads % kv:
        raise UserError(f"{what}: heads={heads} is not a multiple of kv_heads={kv}")
