"""Merged weights: the base with the trained LoRA adapter folded in, loadable without PEFT.

``train.py --merge`` writes ``<output_dir>/merged/`` (safetensors, config, tokenizer), which
``AutoModelForCausalLM.from_pretrained`` loads alone: what inference servers and GGUF
converters expect.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ..config import Config
from ..errors import DataError
from ..models.loading import load_model, load_tokenizer

logger = logging.getLogger(__name__)


def trained_adapter_dir(run_dir: Path) -> Path:
    """``run_dir/adapter`` when it holds a saved adapter; a one-line DataError otherwise."""
    adapter = run_dir / "adapter"
    if not ((adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()):
        raise DataError(f"--merge: no trained adapter in '{adapter}'; run training first "
                        "(train.py without --stage, or --stage training)")
    return adapter


def merge_adapter(cfg: Config, run_dir: Path) -> Path:
    """Write ``run_dir/merged/``: base + adapter merged (PEFT ``merge_and_unload``), with the tokenizer.

    The base is loaded as ``cfg.model`` says (dtype, device), so the merged weights keep the
    precision the adapter was trained against. The folder is written beside and renamed
    into place, so a killed merge never leaves a half-written ``merged/``.
    """
    from peft import PeftModel

    adapter = trained_adapter_dir(run_dir)
    m = cfg.model
    base = load_model(m.name_or_path, dtype=m.dtype, device=m.device, trust_remote_code=m.trust_remote_code)
    tokenizer = load_tokenizer(m.name_or_path, trust_remote_code=m.trust_remote_code)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.eval()
    target, tmp = run_dir / "merged", run_dir / "merged.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    logger.info("merged %s into %s: %s", adapter, m.name_or_path, target)
    return target
