"""Input errors and transient errors, told apart at the library level.

Every failure a user can cause is an `InputError` whose message is one line naming the file, line, member
or key; every failure worth a retry is a `TransientError` (or classified as one by `is_transient`).
"""

from __future__ import annotations

import http.client
import io
import json
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lmcore.checkpoint import CheckpointError, load_model, save_model
from lmcore.config import CollectConfig, ModelConfig, ParamsError, PreprocessConfig, TokenizeConfig, load_params
from lmcore.data.archives import ArchiveError, extract
from lmcore.data.collect import CollectError, SourceUnavailable, collect
from lmcore.data.loader import TokenDataset
from lmcore.data.preprocess import PreprocessError, preprocess
from lmcore.data.shards import Shard, ShardError, write_shard
from lmcore.data.tokenize import TokenizeError, tokenize
from lmcore.errors import (
    InputError,
    MissingInputError,
    TransientError,
    is_input_error,
    is_transient,
    one_line,
    validation_summary,
)
from lmcore.finetune.data import DataError, read_instruction_json
from lmcore.harness.benchmarks import BenchmarkDataError, read_arc
from lmcore.harness.scoring import TooLongError
from lmcore.hf import HFError, read_hf_config
from lmcore.judge import JudgeError, JudgeUnavailable
from lmcore.model import GPT
from lmcore.paths import DOCUMENTS, MANIFEST, MODEL_CONFIG, WEIGHTS
from tests.conftest import MICRO as MICRO_PARAMS
from tests.data.test_collect import TEXT, TEXT_SHA, Server
from tests.data.test_preprocess import PLAIN, make_raw

MICRO = ModelConfig(vocab_size=64, context_length=16, n_embd=16, n_layer=1, n_head=2)


def input_error(exc: BaseException, *names: str) -> str:
    """Assert `exc` is bad input on one line naming each of `names`; returns the message."""
    message = str(exc)
    assert isinstance(exc, InputError) and is_input_error(exc) and not is_transient(exc), type(exc).__mro__
    assert "\n" not in message and "\r" not in message, message
    for name in names:
        assert name in message, (name, message)
    return message


# --------------------------------------------------------------------------- classification


def http_error(code: int) -> urllib.error.HTTPError:
    return urllib.error.HTTPError("http://127.0.0.1/x", code, "status", None, io.BytesIO(b""))


def caused(exc: BaseException, cause: BaseException) -> BaseException:
    """`exc` raised `from cause`, as the interpreter records it."""
    try:
        raise exc from cause
    except BaseException as err:
        return err


@pytest.mark.parametrize(
    ("exc", "transient", "input_"),
    [
        (InputError("params.yaml: unknown key 'x'"), False, True),
        (TransientError("busy"), True, False),
        (http_error(404), False, False),
        (http_error(403), False, False),
        (http_error(503), True, False),
        (http_error(500), True, False),
        (http_error(429), True, False),
        (urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")), True, False),
        (urllib.error.URLError("Name or service not known"), True, False),
        (ConnectionRefusedError(111, "Connection refused"), True, False),
        (ConnectionResetError(104, "Connection reset by peer"), True, False),
        (TimeoutError("timed out"), True, False),
        (http.client.RemoteDisconnected("closed"), True, False),
        (http.client.IncompleteRead(b"abc", 10), True, False),
        (FileNotFoundError(2, "No such file or directory", "x.txt"), False, False),
        (PermissionError(13, "Permission denied", "x.txt"), False, False),
        (OSError("disk trouble"), False, False),
        (ValueError("a bug"), False, False),
        (MissingInputError("models/base/config.json: no model config"), False, True),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None,
)
def test_classification(exc, transient, input_):
    assert is_transient(exc) is transient
    assert is_input_error(exc) is input_


def test_cause_chains():
    # A wrapper around a network failure is transient; around bad input it is bad input.
    assert is_transient(caused(RuntimeError("download failed"), TimeoutError()))
    assert is_transient(caused(RuntimeError("a"), caused(RuntimeError("b"), http_error(503))))
    assert not is_transient(caused(RuntimeError("download failed"), http_error(404)))
    assert is_input_error(caused(RuntimeError("stage failed"), CollectError("source 'x': file not found")))
    # Bad input wins over a network error further down the chain: running again cannot help.
    assert not is_transient(caused(InputError("bad reply"), ConnectionRefusedError()))
    assert not is_transient(caused(RuntimeError("stage"), caused(InputError("bad"), TimeoutError())))
    # An exception that is its own cause does not loop.
    loop = RuntimeError("loop")
    loop.__cause__ = loop
    assert not is_transient(loop) and not is_input_error(loop)


@pytest.mark.parametrize(
    "cls",
    [CollectError, ArchiveError, PreprocessError, TokenizeError, ShardError, DataError, HFError, BenchmarkDataError,
     TooLongError, JudgeError, CheckpointError, ParamsError],
)
def test_user_errors_are_input_errors_and_still_value_errors(cls):
    assert issubclass(cls, InputError) and issubclass(cls, ValueError) and not issubclass(cls, TransientError)


@pytest.mark.parametrize("cls", [SourceUnavailable, JudgeUnavailable])
def test_exhausted_retries_are_transient(cls):
    assert issubclass(cls, TransientError) and not issubclass(cls, InputError)
    assert is_transient(cls("down")) and not is_input_error(cls("down"))


def test_missing_input_is_both_an_input_error_and_a_file_not_found_error():
    err = MissingInputError("models/base/config.json: no model config")
    assert isinstance(err, FileNotFoundError) and isinstance(err, InputError)
    assert str(err) == "models/base/config.json: no model config"


def test_one_line_and_validation_summary():
    assert one_line("a\n  b\r\nc  ") == "a; b; c"
    with pytest.raises(Exception) as err:
        ModelConfig.model_validate({"vocab_size": "many", "bogus": 1})
    summary = validation_summary(err.value)
    assert "\n" not in summary
    assert "vocab_size: " in summary and "(got 'many')" in summary and "bogus: Extra inputs are not permitted" in summary


# --------------------------------------------------------------------------- collect


def test_zip_slip_archive_is_one_line_naming_source_archive_and_member(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("books/ok.txt", b"fine\n")
        zf.writestr("../../evil.txt", b"owned\n")
    (tmp_path / "books.zip").write_bytes(buf.getvalue())
    with pytest.raises(CollectError) as err:
        collect(CollectConfig(sources=[{"name": "lib", "path": "books.zip", "extract": True}]), tmp_path / "raw",
                base_dir=tmp_path)
    input_error(err.value, "source 'lib'", "books.zip", "'../../evil.txt'", "escapes")
    assert not (tmp_path / "raw").exists() and not (tmp_path.parent / "evil.txt").exists()
    with pytest.raises(ArchiveError) as err:
        extract(tmp_path / "books.zip", tmp_path / "direct")
    input_error(err.value, "books.zip", "'../../evil.txt'")


def test_missing_source_path_names_source_and_path(tmp_path):
    with pytest.raises(CollectError) as err:
        collect(CollectConfig(sources=[{"name": "ghost", "path": "nowhere.txt"}]), tmp_path / "raw", base_dir=tmp_path)
    input_error(err.value, "source 'ghost'", "not found", str(tmp_path / "nowhere.txt"))


def test_wrong_sha256_of_a_local_file_names_file_and_both_checksums(tmp_path):
    (tmp_path / "notes.txt").write_bytes(TEXT)
    wrong = "0" * 64
    with pytest.raises(CollectError) as err:
        collect(CollectConfig(sources=[{"name": "notes", "path": "notes.txt", "sha256": wrong}]), tmp_path / "raw",
                base_dir=tmp_path)
    input_error(err.value, "source 'notes'", "sha256 mismatch", str(tmp_path / "notes.txt"), wrong, TEXT_SHA)


def test_download_503_every_time_is_transient_and_404_is_input(tmp_path):
    with Server({"/t.txt": TEXT}, fail_first=10**6, status=503) as srv:
        url = srv.url("/t.txt")
        config = CollectConfig(sources=[{"name": "t", "url": url, "sha256": TEXT_SHA}], retries=2, timeout_s=5)
        with pytest.raises(SourceUnavailable) as err:
            collect(config, tmp_path / "raw", backoff_s=0.001)
        assert len(srv.requests) == 3
    assert is_transient(err.value) and not is_input_error(err.value)
    message = str(err.value)
    assert "\n" not in message and "source 't'" in message and url in message and "after 3 attempt(s)" in message
    assert "503" in message

    with Server({}) as srv:
        url = srv.url("/gone.txt")
        config = CollectConfig(sources=[{"name": "gone", "url": url, "sha256": TEXT_SHA}], retries=2, timeout_s=5)
        with pytest.raises(CollectError) as err:
            collect(config, tmp_path / "raw", backoff_s=0.001)
        assert len(srv.requests) == 1  # a 404 is not retried
    input_error(err.value, "source 'gone'", url, "HTTP 404")
    assert not (tmp_path / "raw").exists()


# --------------------------------------------------------------------------- preprocess, tokenize, shards


def test_non_utf8_file_names_file_byte_and_line(tmp_path):
    raw = make_raw(tmp_path / "raw", {"notes": b"a good line\n\xff\xfe not UTF-8\n"})
    with pytest.raises(PreprocessError) as err:
        preprocess(PreprocessConfig(decode_errors="error", min_chars=1, **PLAIN), raw, tmp_path / "clean")
    input_error(err.value, "raw/notes.txt", "invalid UTF-8", "byte offset 12", "(line 2)", "decode_errors")


def test_malformed_jsonl_line_names_file_line_and_column(tmp_path):
    raw = make_raw(tmp_path / "raw", {"web": {"web/part-0.jsonl": b'{"text": "one"}\n{"text": \n{"text": "three"}\n'}})
    with pytest.raises(PreprocessError) as err:
        preprocess(PreprocessConfig(min_chars=1, **PLAIN), raw, tmp_path / "clean")
    input_error(err.value, "raw/web/part-0.jsonl:2", "malformed JSON at column", "on_bad=skip")


def test_malformed_collect_manifest_names_the_file(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / MANIFEST).write_text('{"sources": [\n  {"name": "a",}\n]}\n')
    with pytest.raises(PreprocessError) as err:
        preprocess(PreprocessConfig(**PLAIN), raw, tmp_path / "clean")
    input_error(err.value, str(raw / MANIFEST), "malformed JSON at line 2 column")


def test_malformed_documents_line_names_file_and_line(tmp_path):
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / DOCUMENTS).write_text('{"id": "a/0", "source": "a", "text": "fine"}\n{broken\n', encoding="utf-8")
    with pytest.raises(TokenizeError) as err:
        tokenize(TokenizeConfig(shard_bytes=4096), clean, tmp_path / "tokens", seed=0, workers=1)
    input_error(err.value, f"{DOCUMENTS}:2", "not valid JSON")
    with pytest.raises(FileNotFoundError) as err:  # a missing stage output: still a FileNotFoundError
        tokenize(TokenizeConfig(), tmp_path / "nowhere", tmp_path / "tokens", seed=0, workers=1)
    input_error(err.value, DOCUMENTS, "run the preprocess stage first")


def test_corrupt_shard_and_manifest_name_the_file(tmp_path):
    write_shard(tmp_path / "train-00000.arrow", [np.arange(5, dtype=np.uint16)], np.dtype(np.uint16))
    data = (tmp_path / "train-00000.arrow").read_bytes()
    (tmp_path / "train-00000.arrow").write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError) as err:
        Shard(tmp_path / "train-00000.arrow")
    input_error(err.value, "train-00000.arrow", "not a token shard", "re-run the tokenize stage")
    (tmp_path / MANIFEST).write_text('{"vocab_size": 64, "shards": [}')
    with pytest.raises(ShardError) as err:
        TokenDataset(tmp_path, "train")
    input_error(err.value, str(tmp_path / MANIFEST), "malformed JSON at line 1 column")


# --------------------------------------------------------------------------- fine-tuning, benchmark and HF files


def test_malformed_instruction_json_names_file_line_and_column(tmp_path):
    path = tmp_path / "instructions.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": , "output": "d"}\n]\n')
    with pytest.raises(DataError) as err:
        read_instruction_json(path)
    input_error(err.value, str(path), "malformed JSON at line 3 column")


def test_malformed_benchmark_line_names_file_and_line(tmp_path):
    path = tmp_path / "arc.jsonl"
    path.write_text('{"question": {"stem": "q", "choices": [{"text": "x", "label": "A"}]}, "answerKey": "A"}\n{"question": \n')
    with pytest.raises(BenchmarkDataError) as err:
        read_arc(path)
    input_error(err.value, f"{path}:2", "malformed JSON")


def test_malformed_hf_config_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2",\n "n_embd": }')
    with pytest.raises(HFError) as err:
        read_hf_config(tmp_path)
    input_error(err.value, str(tmp_path / "config.json"), "not valid JSON", "line 2 column")


# --------------------------------------------------------------------------- params


def test_unknown_params_key_names_file_and_key(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(MICRO_PARAMS.read_text(encoding="utf-8").replace("pretrain:\n", "pretrain:\n  lrr: 0.001\n", 1))
    with pytest.raises(ParamsError) as err:
        load_params(path)
    input_error(err.value, str(path), "unknown key 'pretrain.lrr'", "did you mean 'pretrain.lr'")
    with pytest.raises(ParamsError) as err:
        load_params(MICRO_PARAMS, overrides=["pretrain.lrr=0.001"])
    input_error(err.value, str(MICRO_PARAMS), "unknown key 'pretrain.lrr'")


def test_several_params_errors_are_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("pretrain:\n  lrr: 0.001\n")  # and every other section missing
    with pytest.raises(ParamsError) as err:
        load_params(path)
    input_error(err.value, str(path), "unknown key 'pretrain.lrr'")


# --------------------------------------------------------------------------- model folders (generate, eval, serve)


@pytest.fixture
def model_dir(tmp_path) -> Path:
    torch.manual_seed(0)
    save_model(GPT(MICRO), tmp_path / "model", extra={"tokenizer": "gpt2"})
    return tmp_path / "model"


@pytest.mark.parametrize("keep", [0, 7, 100, "half"])
def test_truncated_weights_name_the_file(model_dir, keep):
    data = (model_dir / WEIGHTS).read_bytes()
    (model_dir / WEIGHTS).write_bytes(data[: len(data) // 2] if keep == "half" else data[:keep])
    with pytest.raises(CheckpointError) as err:
        load_model(model_dir)
    input_error(err.value, str(model_dir / WEIGHTS), "is truncated or not a safetensors file")


def test_hugging_face_config_says_to_import_it(model_dir):
    hf = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 16, "n_layer": 1, "n_head": 2}
    (model_dir / MODEL_CONFIG).write_text(json.dumps(hf))
    with pytest.raises(CheckpointError) as err:
        load_model(model_dir)
    input_error(err.value, str(model_dir / MODEL_CONFIG), "not an lmcore model folder", "'gpt2'", "lmcore import-hf")
    (model_dir / MODEL_CONFIG).write_text('{"something": "else"}')
    with pytest.raises(CheckpointError) as err:
        load_model(model_dir)
    message = input_error(err.value, str(model_dir / MODEL_CONFIG), "not an lmcore model folder")
    assert "import-hf" not in message


def test_malformed_model_config_names_file_line_and_column(model_dir):
    (model_dir / MODEL_CONFIG).write_text('{"format_version": 1,\n "model": {"vocab_size": 64,}\n}')
    with pytest.raises(CheckpointError) as err:
        load_model(model_dir)
    input_error(err.value, str(model_dir / MODEL_CONFIG), "malformed JSON at line 2 column")


def test_invalid_model_section_and_mismatched_weights_are_one_line(model_dir):
    meta = json.loads((model_dir / MODEL_CONFIG).read_text())
    (model_dir / MODEL_CONFIG).write_text(json.dumps({**meta, "model": {**meta["model"], "n_layer": "two", "bogus": 1}}))
    with pytest.raises(CheckpointError) as err:
        load_model(model_dir)
    input_error(err.value, str(model_dir / MODEL_CONFIG), "n_layer:", "bogus:")
    (model_dir / MODEL_CONFIG).write_text(json.dumps({**meta, "model": {**meta["model"], "n_embd": 32}}))
    with pytest.raises(CheckpointError) as err:
        load_model(model_dir)
    input_error(err.value, str(model_dir / WEIGHTS), "weights do not match config.json", "wte.weight", "more)")


def test_missing_model_folder_is_input_and_still_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_model(tmp_path / "models" / "typo")
    input_error(err.value, str(tmp_path / "models" / "typo" / MODEL_CONFIG))
