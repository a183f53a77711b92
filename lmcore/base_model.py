"""The model a run starts from: random weights, or a pretrained model and its tokenizer taken from a source.

    manifest = prepare_base(params.base_model, Path("models/base_model"), root=Path("."), mirror=mirror_from_env(),
                            retries=3, timeout_s=60)
    lmcore run base_model                      # the same as a stage (lmcore/stages/base_model.py)

Sources (`base_model.source`):
    scratch      nothing to fetch: the folder holds base.json alone; pretraining starts from random weights.
    huggingface  the files of a Hugging Face repo, `<url>/<file>` for each file of `files`, each pinned by its
                 sha256: the offline mirror (LMCORE_MIRROR) is searched by checksum first, downloads are retried and
                 resumed from models/.cache/downloads (lmcore.data.collect). config.json and the tokenizer come
                 first and are checked before the weights are fetched: an unsupported architecture or a tokenizer
                 that does not fit the model is refused before gigabytes arrive. Converted by lmcore.hf.import_hf.
    gguf         one GGUF file, from `url` pinned by `sha256` (mirror first) or a local `path`; lmcore.gguf converts it.
    folder       a local Hugging Face folder (config.json + safetensors: converted) or an lmcore model folder
                 (copied as it is; it must carry its tokenizer).
    registry     a registered model (`models:/name@alias`), fetched by the `resolve_model` the orchestration layer
                 supplies (lmcore never talks to the registry itself).

The output folder is an lmcore model folder (model.safetensors, config.json, tokenizer files) with base.json, its
manifest (see `prepare_base`). It is written atomically: a failure leaves the previous folder as it was.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import urllib.parse
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from lmcore.checkpoint import HEAD_KEY, load_model, read_model_config
from lmcore.config import BaseModelConfig, CollectConfig, Source
from lmcore.data.collect import ORIGIN_LOCAL, collect
from lmcore.errors import InputError, MissingInputError, one_line
from lmcore.hf import GPT2, HF_CONFIG, HF_INDEX, HF_KEY, HFError, hf_model_type, import_hf, model_config_from_hf, read_hf_config
from lmcore.io import atomic_dir, read_json, sha256_file, write_json
from lmcore.paths import BASE_MANIFEST, MODEL_CONFIG, WEIGHTS
from lmcore.tokenizer import (
    HF_TOKENIZER_FILE,
    LMCORE_KEY,
    TOKENIZER_CONFIG,
    HFTokenizer,
    Tokenizer,
    template_text,
    token_text,
    check_vocab,
    get_tokenizer,
    has_tokenizer,
    load_tokenizer,
    read_tokenizer_config,
)

log = logging.getLogger(__name__)

SCRATCH, HUGGINGFACE, GGUF, FOLDER, REGISTRY = "scratch", "huggingface", "gguf", "folder", "registry"
ORIGIN_REGISTRY = "registry"  # a file of a registered model (the other origins are collect's: mirror, download, local)
WEIGHTS_SUFFIX = ".safetensors"  # fetched after config.json and the tokenizer have been checked
GGUF_SUFFIX = ".gguf"
# tokenizer_config.json keys HFTokenizer takes as arguments; the others are kept as they are.
_TOKENIZER_ARGS = {LMCORE_KEY, "chat_template", "bos_token", "eos_token", "eot_token_text", "tokenizer_class"}

ResolveModel = Callable[[str], Path]


class BaseModelError(InputError):
    """A base model source that cannot be used; the message names the params key or file and what is wrong."""


def prepare_base(
    cfg: BaseModelConfig,
    out_dir: str | Path,
    *,
    root: str | Path,
    mirror: Path | None,
    resolve_model: ResolveModel | None = None,
    retries: int = 3,
    timeout_s: float = 60.0,
    ranks_file: str | None = None,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Write the base model folder `out_dir` from the source `cfg` names, with its manifest base.json.

    Args:
        cfg: the `base_model` params section.
        out_dir: the folder to write (models/base_model); replaced whole on success, untouched on failure.
        root: what relative `path`s are resolved against (the project root).
        mirror: an offline mirror searched by sha256 before any download (LMCORE_MIRROR), or None.
        resolve_model: a registry URI -> the lmcore model folder it names, downloaded (source registry only).
        retries, timeout_s: per download (collect's).
        ranks_file: GPT-2's local tiktoken ranks, for a GPT-2 model that comes without a tokenizer.json
            (None: $LMCORE_TIKTOKEN_FILE, else tiktoken's own loader).
        cache_dir: where partial downloads wait to be resumed (default: <out_dir's parent>/.cache/downloads).

    Returns:
        The manifest written to base.json. From scratch: {"source": "scratch"}. Otherwise: source, name, license,
        where it came from (url, path or uri), files (each: file, url or path, sha256, bytes, origin: mirror,
        download, local or registry), architecture (gpt2 | llama | lmcore), parameters, model (the ModelConfig),
        tokenizer (its identity: kind, name, sha256, n_vocab) and weights_sha256 (of the folder's model.safetensors).

    Raises:
        InputError naming the key or file (a sha256 mismatch, pickled weights only, an unsupported architecture,
        a tokenizer larger than the model's vocabulary, a missing file); TransientError when a download still
        fails after its retries (what arrived is kept for the next run).
    """
    out_dir = Path(out_dir)
    fetch = _Fetch(root=Path(root).resolve(), mirror=mirror, retries=retries, timeout_s=timeout_s, license=cfg.license,
                   cache_dir=cache_dir if cache_dir is not None else out_dir.parent / ".cache" / "downloads")
    with atomic_dir(out_dir) as tmp:
        if cfg.source == SCRATCH:
            manifest: dict[str, Any] = {"source": SCRATCH}
        else:
            # Downloads and conversions happen beside the output, never inside it; removed whatever happens.
            with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.work-", dir=out_dir.parent) as work:
                name = base_name(cfg)
                build = {HUGGINGFACE: _huggingface, GGUF: _gguf, FOLDER: _folder, REGISTRY: _registry}[cfg.source]
                files = build(cfg, name, tmp, Path(work), fetch, ranks_file, resolve_model)
            manifest = _manifest(cfg, name, tmp, files)
        write_json(tmp / BASE_MANIFEST, manifest)
    return manifest


def base_name(cfg: BaseModelConfig) -> str:
    """`base_model.name`, else what the source calls the model: the repo of a Hugging Face URL, the GGUF file's
    stem, the folder's name, the registry URI's name@alias."""
    if cfg.name:
        return cfg.name
    if cfg.source == HUGGINGFACE:
        parts = [p for p in urllib.parse.urlparse(cfg.url).path.split("/") if p]
        if "resolve" in parts[1:]:
            return parts[parts.index("resolve", 1) - 1]
        return parts[-1] if parts else "model"
    if cfg.source == GGUF:
        file = PurePosixPath(urllib.parse.unquote(urllib.parse.urlparse(cfg.url).path)).name if cfg.url else Path(cfg.path).name
        return file.removesuffix(GGUF_SUFFIX) or "model"
    if cfg.source == FOLDER:
        return Path(cfg.path).expanduser().resolve().name or "model"
    if cfg.source == REGISTRY:
        return cfg.uri.removeprefix("models:/")
    return SCRATCH


# ---------------------------------------------------------------------------------------------------------------
# Fetching files: lmcore.data.collect (mirror by checksum, retries, resumed .part files)


class _Fetch:
    def __init__(self, *, root: Path, mirror: Path | None, retries: int, timeout_s: float, license: str, cache_dir: Path):
        self.root, self.mirror, self.retries, self.timeout_s = root, mirror, retries, timeout_s
        self.license, self.cache_dir = license, cache_dir

    def path(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.root / p

    def urls(self, files: dict[str, tuple[str, str]], dest: Path, incoming: Path, key: str) -> list[dict]:
        """Fetch {file name: (url, sha256)} into `dest` under their own names, through the folder `incoming`
        (collect's output); a record per file for the manifest. Bad input is named after the params `key`."""
        sources = [Source(name=name, url=url, sha256=sha, license=self.license) for name, (url, sha) in files.items()]
        try:
            manifest = collect(CollectConfig(sources=sources, retries=self.retries, timeout_s=self.timeout_s), incoming,
                               mirror=self.mirror, base_dir=self.root, cache_dir=self.cache_dir)
        except InputError as err:  # a sha256 mismatch, HTTP 404: say which params key pinned the file
            raise BaseModelError(f"{key}: {err}") from None
        dest.mkdir(parents=True, exist_ok=True)
        records = []
        for entry in manifest["sources"]:
            os.replace(incoming / entry["file"], dest / entry["name"])  # collect names a file <name><suffixes>
            record = {"file": entry["name"], "url": entry["source"], "sha256": entry["sha256"], "bytes": entry["bytes"],
                      "origin": entry["origin"]}
            if entry.get("mirror_path"):
                record["mirror_path"] = entry["mirror_path"]
            records.append(record)
            log.info("base model: %s from %s (%s, %d bytes)", entry["name"], entry.get("mirror_path") or entry["source"],
                     entry["origin"], entry["bytes"])
        shutil.rmtree(incoming, ignore_errors=True)
        return records


def _local_record(path: Path, file: str, origin: str = ORIGIN_LOCAL, sha256: str | None = None) -> dict:
    return {"file": file, "path": str(path), "sha256": sha256 or sha256_file(path), "bytes": path.stat().st_size,
            "origin": origin}


# ---------------------------------------------------------------------------------------------------------------
# Sources. Each writes the lmcore model folder `dst` (an empty folder) and returns the file records.


def _huggingface(cfg: BaseModelConfig, name: str, dst: Path, work: Path, fetch: _Fetch, ranks_file: str | None,
                 resolve_model: ResolveModel | None) -> list[dict]:
    base = cfg.url.rstrip("/")
    hf = work / "hf"
    pinned = {file: (f"{base}/{urllib.parse.quote(file)}", sha) for file, sha in cfg.files.items()}
    first = {f: v for f, v in pinned.items() if not f.endswith(WEIGHTS_SUFFIX)}
    records = fetch.urls(first, hf, work / "incoming-first", "base_model.files")
    # Check the architecture, the shards and the tokenizer before the weights are fetched.
    config = read_hf_config(hf)
    model_cfg = model_config_from_hf(config, origin=f"{base}/{HF_CONFIG}")
    if HF_INDEX in cfg.files:
        _check_shards(hf / HF_INDEX, cfg.files)
    tok = _hf_tokenizer(hf, config, model_cfg.vocab_size, name, ranks_file, where=base)
    weights = {f: v for f, v in pinned.items() if f.endswith(WEIGHTS_SUFFIX)}
    if weights:
        records += fetch.urls(weights, hf, work / "incoming-weights", "base_model.files")
    _import_hf(hf, dst, tok, location=base)
    return sorted(records, key=lambda r: r["file"])


def _check_shards(index: Path, files: dict[str, str]) -> None:
    try:
        weight_map = read_json(index).get("weight_map")
    except (ValueError, AttributeError) as err:
        raise HFError(f"{HF_INDEX}: not a JSON object: {one_line(err)}") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise HFError(f"{HF_INDEX}: no 'weight_map' of tensor name -> shard file")
    unpinned = sorted({str(s) for s in weight_map.values()} - files.keys())
    if unpinned:
        raise BaseModelError(f"base_model.files: {HF_INDEX} names shard(s) {', '.join(unpinned)}, which base_model.files "
                             f"does not pin: add each with its sha256")


def _hf_tokenizer(folder: Path, config: dict, vocab_size: int, name: str, ranks_file: str | None, where: str) -> Tokenizer:
    """The tokenizer of a Hugging Face folder: its tokenizer.json (with the special tokens and chat template of its
    tokenizer_config.json), or GPT-2's tiktoken for a GPT-2 model without one. Refused when it does not fit the model."""
    path = folder / HF_TOKENIZER_FILE
    if path.is_file():
        extra = read_tokenizer_config(folder / TOKENIZER_CONFIG)
        tok: Tokenizer = HFTokenizer(
            path, name=name, bos_token=token_text(extra.get("bos_token")), eos_token=token_text(extra.get("eos_token")),
            chat_template=template_text(extra.get("chat_template")),
            extra_config={k: v for k, v in extra.items() if k not in _TOKENIZER_ARGS},
        )
        where = f"{where}/{HF_TOKENIZER_FILE}"
    elif config.get("model_type") == GPT2:
        log.info("base model %s: no %s; a GPT-2 model: using GPT-2's tokenizer (tiktoken)", name, HF_TOKENIZER_FILE)
        tok = get_tokenizer("gpt2", ranks_file)
        where = f"{where}/{HF_CONFIG} (GPT-2's tokenizer)"
    else:
        raise BaseModelError(f"{where}: no {HF_TOKENIZER_FILE}: a {config.get('model_type')} model needs its own tokenizer "
                             f"(add {HF_TOKENIZER_FILE}, and tokenizer_config.json for its special tokens)")
    check_vocab(tok, vocab_size, where)
    return tok


def _import_hf(hf: Path, dst: Path, tok: Tokenizer, location: str) -> None:
    import_hf(hf, dst)
    # import_hf records the folder it read, here a temporary one: record where the files came from instead (the
    # same inputs then give the same config.json).
    config = read_json(dst / MODEL_CONFIG)
    config[HF_KEY]["source"] = location
    write_json(dst / MODEL_CONFIG, config)
    tok.save(dst)


def _gguf(cfg: BaseModelConfig, name: str, dst: Path, work: Path, fetch: _Fetch, ranks_file: str | None,
          resolve_model: ResolveModel | None) -> list[dict]:
    try:
        from lmcore.gguf import import_gguf
    except ImportError as err:
        raise BaseModelError(f"base_model.source 'gguf': this lmcore cannot read GGUF files ({one_line(err)})") from None
    if cfg.url:
        file = f"{_safe_stem(name)}{GGUF_SUFFIX}"
        records = fetch.urls({file: (cfg.url, cfg.sha256)}, work / "gguf", work / "incoming", "base_model.url")
        path = work / "gguf" / file
    else:
        path = fetch.path(cfg.path)
        if not path.is_file():
            raise MissingInputError(f"base_model.path {cfg.path!r}: no such file ({path})")
        digest = sha256_file(path)
        if cfg.sha256 and digest != cfg.sha256:
            raise BaseModelError(f"base_model.path {cfg.path!r}: sha256 mismatch: expected {cfg.sha256} (base_model.sha256), got {digest}")
        records = [_local_record(path, path.name, sha256=digest)]
    converted = work / "model"
    import_gguf(path, converted, name=name)
    _move_files(converted, dst)
    return records


def _safe_stem(name: str) -> str:
    """A file name for a downloaded GGUF (a source name: letters, digits, '.', '_', '-')."""
    stem = "".join(c if c.isalnum() or c in "._-" else "-" for c in name).lstrip("._-")
    return stem or "model"


def _folder(cfg: BaseModelConfig, name: str, dst: Path, work: Path, fetch: _Fetch, ranks_file: str | None,
            resolve_model: ResolveModel | None) -> list[dict]:
    src = fetch.path(cfg.path)
    if not src.is_dir():
        raise MissingInputError(f"base_model.path {cfg.path!r}: no such folder ({src})")
    if _is_lmcore_folder(src):
        return _copy_lmcore(src, dst, ORIGIN_LOCAL, ranks_file)
    if not (src / HF_CONFIG).is_file():
        raise BaseModelError(f"base_model.path {cfg.path!r}: {src} has no {HF_CONFIG}: not a Hugging Face or lmcore model folder")
    config = read_hf_config(src)
    model_cfg = model_config_from_hf(config, origin=str(src / HF_CONFIG))
    tok = _hf_tokenizer(src, config, model_cfg.vocab_size, name, ranks_file, where=str(src))
    _import_hf(src, dst, tok, location=str(src))
    used = [HF_CONFIG, HF_TOKENIZER_FILE, TOKENIZER_CONFIG, HF_INDEX]
    if (src / WEIGHTS).is_file():
        used.append(WEIGHTS)
    elif (src / HF_INDEX).is_file():
        used += sorted(set(read_json(src / HF_INDEX)["weight_map"].values()))
    return [_local_record(src / f, f) for f in dict.fromkeys(used) if (src / f).is_file()]


def _registry(cfg: BaseModelConfig, name: str, dst: Path, work: Path, fetch: _Fetch, ranks_file: str | None,
              resolve_model: ResolveModel | None) -> list[dict]:
    if resolve_model is None:
        raise BaseModelError(
            f"base_model.uri {cfg.uri!r}: no model registry to resolve it here; run the stage through the orchestration "
            f"layer (`lmcore run base_model`), which downloads registered models"
        )
    try:
        src = Path(resolve_model(cfg.uri))
    except InputError:
        raise
    except ValueError as err:  # tasks.registry.download_model_dir: no such model, alias or version
        raise BaseModelError(f"base_model.uri {cfg.uri!r}: {one_line(err)}") from None
    if not _is_lmcore_folder(src):
        raise BaseModelError(f"base_model.uri {cfg.uri!r}: {src} is not an lmcore model folder")
    records = _copy_lmcore(src, dst, ORIGIN_REGISTRY, ranks_file)
    for record in records:  # the downloaded copy is temporary: name the file inside the registered model
        record["path"] = f"{cfg.uri}/{record['file']}"
    return records


def _is_lmcore_folder(folder: Path) -> bool:
    try:
        return "format_version" in read_json(folder / MODEL_CONFIG)
    except (OSError, ValueError, TypeError):
        return False


def _copy_lmcore(src: Path, dst: Path, origin: str, ranks_file: str | None) -> list[dict]:
    """Copy an lmcore model folder's files as they are (not base.json, nor hidden files), then make sure it carries a
    tokenizer: one it names (an older folder's "tokenizer": "gpt2") is written beside the weights."""
    records = []
    for path in sorted(src.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.name != BASE_MANIFEST:
            shutil.copyfile(path, dst / path.name)
            records.append(_local_record(path, path.name, origin))
    if not has_tokenizer(dst):
        if (dst / HF_TOKENIZER_FILE).is_file():
            tok = load_tokenizer(dst)
        elif read_model_config(dst)[1].get("tokenizer") == "gpt2":
            log.warning("%s carries no tokenizer files; its config.json names GPT-2's, written beside the weights", src)
            tok = get_tokenizer("gpt2", ranks_file)
        else:
            raise MissingInputError(f"{src}: carries no tokenizer ({TOKENIZER_CONFIG} is missing): a base model needs the "
                                    f"tokenizer it was trained with")
        tok.save(dst)
    return records


def _move_files(src: Path, dst: Path) -> None:
    for path in src.iterdir():
        os.replace(path, dst / path.name)


# ---------------------------------------------------------------------------------------------------------------
# The manifest


def _manifest(cfg: BaseModelConfig, name: str, folder: Path, files: list[dict]) -> dict[str, Any]:
    """base.json of a converted or copied model folder, after checking that it loads with its tokenizer."""
    model_cfg, extra = read_model_config(folder)
    if extra.get(HEAD_KEY) is not None:
        raise BaseModelError(f"{name}: {MODEL_CONFIG} has a '{HEAD_KEY}' ({extra[HEAD_KEY]!r}): a classifier is no base "
                             f"for a language model")
    model = load_model(folder)
    tok = load_tokenizer(folder)
    check_vocab(tok, model_cfg.vocab_size, f"{name} ({TOKENIZER_CONFIG})")
    try:
        architecture = hf_model_type(model_cfg)
    except HFError:
        architecture = "lmcore"  # a combination of options only lmcore has
    location = {k: getattr(cfg, k) for k in ("url", "path", "uri") if getattr(cfg, k)}
    # Unless the params name it, the licence the model itself declares (a GGUF file's general.license).
    carried = extra.get("source", {}).get("license") if isinstance(extra.get("source"), dict) else None
    return {
        "source": cfg.source,
        "name": name,
        "license": cfg.license if cfg.license != "unknown" or not carried else carried,
        **location,
        "files": files,
        "architecture": architecture,
        "parameters": model.num_params(),
        "model": model_cfg.model_dump(mode="json"),
        "tokenizer": tok.identity,
        "weights_sha256": sha256_file(folder / WEIGHTS),
    }


def origins(manifest: dict[str, Any]) -> dict[str, int]:
    """How many of the manifest's files came from where: {"mirror": 3, "download": 1, ...}."""
    counts: dict[str, int] = {}
    for record in manifest.get("files", []):
        counts[record["origin"]] = counts.get(record["origin"], 0) + 1
    return counts

