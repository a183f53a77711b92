"""The base_model stage: a tiny random Llama (and GPT-2) made with transformers, served like the Hugging Face hub
from a real HTTP server on 127.0.0.1, taken from a folder, the offline mirror or the registry; the stage's folder
gives transformers' logits and carries the tokenizer. Bad input fails on one line and leaves nothing behind."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from lmcore import pipeline
from lmcore.base_model import prepare_base
from lmcore.checkpoint import load_model
from lmcore.config import BaseModelConfig, ParamsError, load_params, params_from_dict
from lmcore.errors import InputError, is_input_error, is_transient
from lmcore.io import read_json, sha256_file
from lmcore.paths import BASE_MANIFEST, BASE_SOURCE, WEIGHTS
from lmcore.stages import BASE_MANIFEST_SHA, StageContext
from lmcore.stages.base_model import run
from lmcore.tokenizer import load_tokenizer
from tests.conftest import ROOT
from tests.data.test_collect import Server

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

REPO = "/tiny-org/tiny-llama/resolve/0123abcd"  # the hub's layout: /<org>/<repo>/resolve/<revision>/<file>
CORPUS = ["It had always been a beautiful thing.", "ROMEO: Why, Romeo, art thou mad?", "hello world, a tiny corpus"]
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}<|endoftext|>{% endfor %}"
PINNED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def bpe_tokenizer(path: Path) -> int:
    """A byte-level BPE tokenizer.json trained on a few lines; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 10, trainer)
    tok.save(str(path))
    return tok.get_vocab_size()


def hf_llama(folder: Path, vocab_size: int = 320, **save) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder, safe_serialization=True, **save)
    return model


def hf_folder(folder: Path, vocab_size: int = 320, **save) -> SimpleNamespace:
    """A Hugging Face folder: a random tiny Llama, its tokenizer.json and tokenizer_config.json."""
    folder.mkdir(parents=True)
    n_vocab = bpe_tokenizer(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": {"content": "<|endoftext|>"}, "chat_template": CHAT_TEMPLATE,
         "model_max_length": 64, "tokenizer_class": "PreTrainedTokenizerFast"}))
    model = hf_llama(folder, vocab_size, **save)
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "generation_config.json"}
    return SimpleNamespace(path=folder, model=model, files=files, n_vocab=n_vocab)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> SimpleNamespace:
    return hf_folder(tmp_path_factory.mktemp("hf") / "tiny-llama")


@pytest.fixture(autouse=True)
def no_mirror(tmp_path, monkeypatch):
    """An empty offline mirror: every file is downloaded unless a test fills it."""
    mirror = tmp_path / "empty-mirror"
    mirror.mkdir()
    monkeypatch.setenv("LMCORE_MIRROR", str(mirror))


def params(base_model: dict):
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["base_model"] = base_model
    data["collect"].update(retries=0, timeout_s=5)
    return params_from_dict(data)


def run_stage(root: Path, base_model: dict, **ctx):
    return run(StageContext(root=root, params=params(base_model), **ctx))


def hub(server: Server, files: dict[str, bytes], **extra) -> dict:
    return {"source": "huggingface", "url": server.url(REPO), "files": {n: sha(d) for n, d in files.items()}, **extra}


def same_logits(folder: Path, hf_model, text: str = "hello world, a tiny thing") -> None:
    tok = load_tokenizer(folder)
    ids = torch.tensor([tok.encode_ordinary(text)])
    with torch.no_grad():
        ours = load_model(folder)(ids)[0]
        theirs = hf_model(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def left_in(models: Path) -> list[str]:
    """What a run left beside the output folder: the download cache only, never a temporary folder."""
    return sorted(p.name for p in models.iterdir() if p.name != ".cache") if models.is_dir() else []


def one_line_input_error(exc_info) -> str:
    msg = str(exc_info.value)
    assert is_input_error(exc_info.value) and "\n" not in msg, msg
    return msg


# -- Hugging Face: download, then the mirror ------------------------------------------------------------------


def test_huggingface_download_then_mirror(tmp_path, llama, monkeypatch):
    files = {n: llama.files[n] for n in PINNED}
    out = tmp_path / BASE_SOURCE
    with Server({f"{REPO}/{n}": d for n, d in files.items()}) as server:
        result = run_stage(tmp_path, hub(server, files, license="apache-2.0"))
        assert sorted(server.requests) == sorted(f"{REPO}/{n}" for n in files)

        same_logits(out, llama.model)
        tok = load_tokenizer(out)
        reference = tokenizers.Tokenizer.from_file(str(llama.path / "tokenizer.json"))
        text = "It had always been a beautiful ROMEO."
        assert tok.encode_ordinary(text) == reference.encode(text, add_special_tokens=False).ids
        assert tok.decode(tok.encode_ordinary(text)) == text
        assert tok.name == "tiny-llama" and tok.chat_template == CHAT_TEMPLATE
        assert tok.eot_token == tok.bos_token == reference.token_to_id("<|endoftext|>")
        assert read_json(out / "tokenizer_config.json")["model_max_length"] == 64  # the HF keys are kept

        manifest = read_json(out / BASE_MANIFEST)
        assert manifest["source"] == "huggingface" and manifest["name"] == "tiny-llama"
        assert manifest["license"] == "apache-2.0" and manifest["url"] == server.url(REPO)
        assert [f["file"] for f in manifest["files"]] == sorted(files)
        for record in manifest["files"]:
            data = files[record["file"]]
            assert record == {"file": record["file"], "url": server.url(f"{REPO}/{record['file']}"), "sha256": sha(data),
                              "bytes": len(data), "origin": "download"}
        n_params = sum(p.numel() for p in llama.model.parameters())
        assert manifest["architecture"] == "llama" and manifest["parameters"] == n_params
        assert manifest["tokenizer"] == {"kind": "huggingface", "name": "tiny-llama", "sha256": sha(files["tokenizer.json"]),
                                         "n_vocab": llama.n_vocab}
        assert manifest["weights_sha256"] == sha256_file(out / WEIGHTS)
        assert read_json(out / "config.json")["hf"]["source"] == server.url(REPO)  # not the temporary folder

        digest = sha256_file(out / BASE_MANIFEST)
        assert result.summary == {"source": "huggingface", "name": "tiny-llama", "parameters": n_params,
                                  "base_manifest_sha256": digest}
        assert result.tags == {BASE_MANIFEST_SHA: digest}
        assert [a.path for a in result.artifacts] == [out / BASE_MANIFEST]
        assert result.metrics == {"parameters": n_params, "files": 4, "bytes": sum(map(len, files.values()))}
        assert "4 download" in result.log
        assert left_in(tmp_path / "models") == ["base_model"]
        first = {p.name: p.read_bytes() for p in out.iterdir() if p.name != BASE_MANIFEST}

        # The same files in the offline mirror, under other names: found by checksum, nothing requested.
        mirror = tmp_path / "mirror"
        mirror.mkdir()
        for n, d in files.items():
            (mirror / f"blob-{sha(d)[:8]}").write_bytes(d)
        monkeypatch.setenv("LMCORE_MIRROR", str(mirror))
        run_stage(tmp_path, hub(server, files, license="apache-2.0"))
        assert len(server.requests) == len(files)
    manifest = read_json(out / BASE_MANIFEST)
    assert {f["origin"] for f in manifest["files"]} == {"mirror"}
    assert all(Path(f["mirror_path"]).parent == mirror for f in manifest["files"])
    # the same inputs make the same folder, byte for byte
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != BASE_MANIFEST} == first


def test_sharded_repo_needs_every_shard_pinned(tmp_path):
    sharded = hf_folder(tmp_path / "sharded", max_shard_size="60KB")
    shards = sorted(n for n in sharded.files if n.endswith(".safetensors"))
    assert len(shards) > 1 and "model.safetensors.index.json" in sharded.files
    with Server({f"{REPO}/{n}": d for n, d in sharded.files.items()}) as server:
        cfg = hub(server, sharded.files)
        del cfg["files"][shards[-1]]
        with pytest.raises(InputError) as err:
            run_stage(tmp_path, cfg)
        assert shards[-1] in one_line_input_error(err) and "base_model.files" in str(err.value)
        assert not any(r.endswith(".safetensors") for r in server.requests)  # refused before any weights
        assert not (tmp_path / BASE_SOURCE).exists()

        run_stage(tmp_path, hub(server, sharded.files))
    same_logits(tmp_path / BASE_SOURCE, sharded.model)


# -- bad input: one line, nothing written ---------------------------------------------------------------------


def test_sha256_mismatch_names_the_file_and_leaves_the_previous_folder(tmp_path, llama):
    files = {n: llama.files[n] for n in PINNED}
    served = {**files, "model.safetensors": files["model.safetensors"][:-4] + b"\0\0\0\0"}
    with Server({f"{REPO}/{n}": d for n, d in served.items()}) as server:
        with pytest.raises(InputError) as err:
            run_stage(tmp_path, hub(server, files))
        msg = one_line_input_error(err)
        assert msg.startswith("base_model.files: source 'model.safetensors'") and "sha256 mismatch" in msg and sha(files["model.safetensors"]) in msg
        assert not (tmp_path / BASE_SOURCE).exists() and left_in(tmp_path / "models") == []

        run_stage(tmp_path, {"source": "scratch"})
        with pytest.raises(InputError):
            run_stage(tmp_path, hub(server, files))
    assert read_json(tmp_path / BASE_SOURCE / BASE_MANIFEST) == {"source": "scratch"}  # the previous folder, untouched
    assert left_in(tmp_path / "models") == ["base_model"]


def test_a_busy_server_is_transient_and_leaves_nothing(tmp_path, llama):
    files = {n: llama.files[n] for n in PINNED}
    with Server({f"{REPO}/{n}": d for n, d in files.items()}, fail_first=100, status=503) as server:
        with pytest.raises(Exception) as err:
            run_stage(tmp_path, hub(server, files))
    assert is_transient(err.value) and not is_input_error(err.value)  # the orchestration layer retries it
    assert "HTTP 503" in str(err.value) and left_in(tmp_path / "models") == []


def test_unsupported_architecture_is_refused_before_the_weights(tmp_path, llama):
    files = {n: llama.files[n] for n in PINNED}
    config = json.loads(files["config.json"])
    files["config.json"] = json.dumps({**config, "model_type": "mistral", "architectures": ["MistralForCausalLM"]}).encode()
    with Server({f"{REPO}/{n}": d for n, d in files.items()}) as server:
        with pytest.raises(InputError) as err:
            run_stage(tmp_path, hub(server, files))
        assert not any(r.endswith(".safetensors") for r in server.requests)
    msg = one_line_input_error(err)
    assert f"{server.url(REPO)}/config.json" in msg and "'mistral' is not supported" in msg
    assert left_in(tmp_path / "models") == []


def test_pickled_weights_only_are_refused(tmp_path, llama):
    folder = tmp_path / "pickled"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (folder / name).write_bytes(llama.files[name])
    (folder / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(InputError) as err:
        run_stage(tmp_path, {"source": "folder", "path": "pickled"})
    msg = one_line_input_error(err)
    assert "pytorch_model.bin" in msg and "only pickled weights" in msg and str(folder) in msg
    assert left_in(tmp_path / "models") == []


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    small = hf_folder(tmp_path / "small-vocab", vocab_size=64)
    with pytest.raises(InputError) as err:
        run_stage(tmp_path, {"source": "folder", "path": str(small.path)})
    msg = one_line_input_error(err)
    assert f"{small.path}/tokenizer.json" in msg and f"{small.n_vocab} tokens" in msg and "vocabulary is 64" in msg
    assert left_in(tmp_path / "models") == []


# -- folders, scratch, the registry ---------------------------------------------------------------------------


def test_folder_source_converts_a_hf_folder_and_copies_an_lmcore_one(tmp_path, llama):
    result = run_stage(tmp_path, {"source": "folder", "path": str(llama.path), "name": "mine"})
    out = tmp_path / BASE_SOURCE
    same_logits(out, llama.model)
    manifest = read_json(out / BASE_MANIFEST)
    assert manifest["name"] == "mine" and manifest["path"] == str(llama.path)
    assert {f["origin"] for f in manifest["files"]} == {"local"}
    assert {f["file"] for f in manifest["files"]} == set(PINNED)
    assert result.summary["parameters"] == manifest["parameters"]

    # an lmcore model folder is copied as it is, with its tokenizer
    lmcore_folder = tmp_path / "copy-of-base"
    lmcore_folder.mkdir()
    for p in out.iterdir():
        lmcore_folder.joinpath(p.name).write_bytes(p.read_bytes())
    run_stage(tmp_path, {"source": "folder", "path": "copy-of-base"})
    copied = read_json(out / BASE_MANIFEST)
    assert copied["name"] == "copy-of-base" and copied["weights_sha256"] == manifest["weights_sha256"]
    assert copied["tokenizer"] == manifest["tokenizer"]
    assert BASE_MANIFEST not in {f["file"] for f in copied["files"]}

    # one without any tokenizer is refused
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (lmcore_folder / name).unlink()
    with pytest.raises(InputError) as err:
        run_stage(tmp_path, {"source": "folder", "path": "copy-of-base"})
    assert "carries no tokenizer" in one_line_input_error(err)


def test_gpt2_folder_without_tokenizer_json_gets_gpt2s_tokenizer(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=32, n_embd=8, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(tmp_path / "gpt2-tiny", safe_serialization=True)
    run_stage(tmp_path, {"source": "folder", "path": "gpt2-tiny"})
    out = tmp_path / BASE_SOURCE
    tok = load_tokenizer(out)
    assert tok.kind == "tiktoken" and tok.name == "gpt2" and tok.encode_ordinary("Hello world") == [15496, 995]
    same_logits(out, model, "Every effort moves you")
    assert read_json(out / BASE_MANIFEST)["architecture"] == "gpt2"


def test_scratch_writes_base_json_only(tmp_path):
    result = run_stage(tmp_path, {"source": "scratch"})
    out = tmp_path / BASE_SOURCE
    assert [p.name for p in out.iterdir()] == [BASE_MANIFEST]
    assert read_json(out / BASE_MANIFEST) == {"source": "scratch"}
    assert result.summary == {"source": "scratch", "name": "scratch", "parameters": 0,
                              "base_manifest_sha256": sha256_file(out / BASE_MANIFEST)}
    assert pipeline.summary_rows({"base_model": result.summary}) == [("base model", "scratch (random weights)")]


def test_registry_source_uses_the_injected_resolver(tmp_path, llama):
    prepare_base(BaseModelConfig(source="folder", path=str(llama.path)), tmp_path / "registered", root=tmp_path, mirror=None)
    asked = []

    def resolve(uri: str) -> Path:
        asked.append(uri)
        return tmp_path / "registered"

    run_stage(tmp_path, {"source": "registry", "uri": "models:/lmcore-base@champion"}, resolve_model=resolve)
    assert asked == ["models:/lmcore-base@champion"]
    manifest = read_json(tmp_path / BASE_SOURCE / BASE_MANIFEST)
    assert manifest["name"] == "lmcore-base@champion" and manifest["uri"] == "models:/lmcore-base@champion"
    assert {f["origin"] for f in manifest["files"]} == {"registry"}
    assert all(f["path"] == f"models:/lmcore-base@champion/{f['file']}" for f in manifest["files"])
    same_logits(tmp_path / BASE_SOURCE, llama.model)

    with pytest.raises(InputError) as err:  # no orchestration layer, no registry
        run_stage(tmp_path, {"source": "registry", "uri": "models:/lmcore-base/3"})
    assert "models:/lmcore-base/3" in one_line_input_error(err) and "registry" in str(err.value)

    def missing(uri: str) -> Path:
        raise ValueError(f"{uri}: Registered Model with name=lmcore-base not found")

    with pytest.raises(InputError, match="base_model.uri 'models:/lmcore-base/3': .*not found"):
        run_stage(tmp_path, {"source": "registry", "uri": "models:/lmcore-base/3"}, resolve_model=missing)


@pytest.mark.slow
def test_registry_source_through_a_real_mlflow_store(tmp_path, llama):
    """The orchestration layer's resolver (tasks.runner) downloads a version registered in a SQLite MLflow store."""
    from mlflow.tracking import MlflowClient

    from tasks.context import RunContext
    from tasks.runner import stage_context

    prepare_base(BaseModelConfig(source="folder", path=str(llama.path)), tmp_path / "base", root=tmp_path, mirror=None)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    experiment = client.create_experiment("base", artifact_location=(tmp_path / "artifacts").as_uri())
    mlrun = client.create_run(experiment)
    client.log_artifacts(mlrun.info.run_id, str(tmp_path / "base"), "model/artifacts/base")  # the pyfunc layout
    client.set_terminated(mlrun.info.run_id)
    client.create_registered_model("tiny")
    version = client.create_model_version("tiny", f"runs:/{mlrun.info.run_id}/model", run_id=mlrun.info.run_id)
    client.set_registered_model_alias("tiny", "champion", version.version)

    p = params({"source": "registry", "uri": "models:/tiny@champion"})
    rc = RunContext(tmp_path, p, tracking=SimpleNamespace(uri=uri))
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    run(stage_context(rc, pipeline.get("base_model"), None, downloads))
    same_logits(tmp_path / BASE_SOURCE, llama.model)
    assert read_json(tmp_path / BASE_SOURCE / BASE_MANIFEST)["weights_sha256"] == sha256_file(tmp_path / "base" / WEIGHTS)


# -- GGUF -----------------------------------------------------------------------------------------------------


def test_gguf_source_over_http(tmp_path, llama):
    gguf = pytest.importorskip("lmcore.gguf")
    prepare_base(BaseModelConfig(source="folder", path=str(llama.path)), tmp_path / "src", root=tmp_path, mirror=None)
    gguf.export_gguf(tmp_path / "src", tmp_path / "tiny.gguf")
    data = (tmp_path / "tiny.gguf").read_bytes()
    with Server({"/files/tiny.gguf": data}) as server:
        run_stage(tmp_path, {"source": "gguf", "url": server.url("/files/tiny.gguf"), "sha256": sha(data)})
    out = tmp_path / BASE_SOURCE
    manifest = read_json(out / BASE_MANIFEST)
    assert manifest["source"] == "gguf" and manifest["name"] == "tiny"
    assert manifest["files"] == [{"file": "tiny.gguf", "url": server.url("/files/tiny.gguf"), "sha256": sha(data),
                                  "bytes": len(data), "origin": "download"}]
    assert load_tokenizer(out).encode_ordinary("hello world") == load_tokenizer(tmp_path / "src").encode_ordinary("hello world")
    same_logits(out, llama.model)


# -- params and declaration -----------------------------------------------------------------------------------


@pytest.mark.parametrize("section, message", [
    ({"source": "gguf"}, "needs base_model.url (with base_model.sha256) or a local base_model.path"),
    ({"source": "gguf", "url": "https://x/m.gguf"}, "base_model.url of a gguf source needs base_model.sha256"),
    ({"source": "gguf", "url": "https://x/m.gguf", "path": "m.gguf"}, "one of base_model.url or base_model.path, not both"),
    ({"source": "gguf", "path": "m.gguf", "sha256": "abc"}, "key 'base_model.sha256': String should match pattern"),
    ({"source": "huggingface", "files": {"config.json": "0" * 64}}, "'huggingface' needs base_model.url"),
    ({"source": "huggingface", "url": "https://x/resolve/main"}, "'huggingface' needs base_model.files"),
    ({"source": "huggingface", "url": "https://x/resolve/main", "files": {"config.json": "0" * 63}},
     f"base_model.files['config.json']: '{'0' * 63}' is not a sha256"),
    ({"source": "huggingface", "url": "https://x/resolve/main", "files": {"model.safetensors": "0" * 64}},
     "base_model.files has no 'config.json'"),
    ({"source": "huggingface", "url": "https://x/resolve/main", "files": {"config.json": "0" * 64, "pytorch_model.bin": "1" * 64}},
     "base_model.files names no weights"),
    ({"source": "huggingface", "url": "https://x/resolve/main", "files": {"config.json": "0" * 64, "sub/model.safetensors": "1" * 64}},
     "'sub/model.safetensors' is not a plain file name"),
    ({"source": "folder"}, "'folder' needs base_model.path"),
    ({"source": "registry"}, "'registry' needs base_model.uri"),
    ({"source": "registry", "uri": "runs:/abc/model"}, "base_model.uri 'runs:/abc/model' is not models:/<name>@<alias>"),
    ({"source": "scratch", "url": "https://x"}, "base_model.url is set, but source 'scratch' does not read it"),
    ({"source": "folder", "path": "p", "uri": "models:/a@b"}, "base_model.uri is set, but source 'folder' does not read it"),
    ({"source": "hub"}, "key 'base_model.source'"),
    ({"source": "folder", "path": "p", "revision": "main"}, "unknown key 'base_model.revision'"),
])
def test_params_errors_name_the_key(section, message):
    with pytest.raises(ParamsError) as err:
        params(section)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_default_starts_from_smollm2_and_scratch_is_a_profile():
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    base = params_from_dict(data).base_model
    assert (base.source, base.name) == ("gguf", "SmolLM2-135M-Instruct")
    assert base.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # the mirror's file (MANIFEST.md)
    data.pop("base_model")
    assert params_from_dict(data).base_model == BaseModelConfig() and BaseModelConfig().source == "scratch"
    assert load_params(ROOT / "profiles" / "scratch.yaml").base_model.source == "scratch"


def test_declared_before_what_starts_from_it():
    names = list(pipeline.NAMES)
    stage = pipeline.get("base_model")
    assert stage.outs == (BASE_SOURCE,) and stage.params == ("base_model",) and not stage.deps
    assert names.index("base_model") < names.index("tokenize")
    assert BASE_SOURCE in pipeline.get("tokenize").deps and BASE_SOURCE in pipeline.get("pretrain").deps
    assert pipeline.downstream("base_model")[:3] == ["base_model", "tokenize", "pretrain"]
    assert "lmcore/base_model.py" in stage.code_deps() and "lmcore/hf.py" in stage.code_deps()
