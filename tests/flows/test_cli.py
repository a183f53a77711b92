"""The `lmcore` command line as a user meets it: validation errors name the key, exit code 2."""

from typer.testing import CliRunner

from flows.cli import app
from tests.conftest import ROOT, SCRATCH

runner = CliRunner()


def _all_output(result) -> str:
    return result.output + (getattr(result, "stderr", "") or "")


def test_params_prints_resolved_values():
    result = runner.invoke(app, ["params", "--root", str(ROOT), "--set", "pretrain.lr=3e-4"])
    assert result.exit_code == 0, _all_output(result)
    assert "lr: 0.0003" in result.output
    assert "registered_model: lmcore-base" in result.output


def test_unknown_param_key_is_an_error_naming_it():
    result = runner.invoke(app, ["params", "--root", str(ROOT), "--set", "pretrain.lrr=1"])
    assert result.exit_code == 2
    assert "unknown key 'pretrain.lrr' (did you mean 'pretrain.lr'?)" in _all_output(result)


def test_mistyped_value_is_an_error_naming_it():
    result = runner.invoke(app, ["run", "pretrain", "--root", str(ROOT), "--set", "pretrain.max_steps=lots"])
    assert result.exit_code == 2
    assert "key 'pretrain.max_steps'" in _all_output(result)


def test_unknown_stage_is_an_error():
    result = runner.invoke(app, ["run", "finetune", "--root", str(ROOT)])
    assert result.exit_code == 2
    assert "unknown stage 'finetune'" in _all_output(result)


def test_eval_scores_a_model_folder_and_collects_the_data(tmp_path, one_thread):
    import json

    import torch

    from lmcore.checkpoint import save_model
    from lmcore.config import ModelConfig
    from lmcore.model import GPT
    from lmcore.tokenizer import get_tokenizer

    torch.manual_seed(0)
    save_model(GPT(ModelConfig(vocab_size=50257, context_length=64, n_embd=16, n_layer=1, n_head=2)), tmp_path / "m")
    get_tokenizer("gpt2").save(tmp_path / "m")  # a model folder carries its tokenizer
    (tmp_path / "params.yaml").write_text(SCRATCH.read_text())  # its benchmark section: limit, no per-subject one
    out = tmp_path / "scores"
    args = ["benchmark", "--model", str(tmp_path / "m"), "--tasks", "arc_easy,mmlu_anatomy", "--limit", "3",
            "--num-fewshot", "1", "--output", str(out), "--root", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, _all_output(result)
    assert "| arc_easy | acc_norm |" in result.output and "6 items in" in result.output
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["limit"] == 3 and results["tasks"]["mmlu_anatomy"]["num_fewshot"] == 1
    manifest = json.loads((tmp_path / "data" / "benchmarks" / "manifest.json").read_text())
    assert {s["name"]: s["origin"] for s in manifest["sources"]}["mmlu"] == "mirror"

    # `lmcore eval`: the old name, kept for scripts
    unknown = runner.invoke(app, ["eval", "--model", str(tmp_path / "m"), "--tasks", "hellaswg", "--root", str(tmp_path)])
    assert unknown.exit_code == 2 and "unknown benchmark task 'hellaswg' (did you mean 'hellaswag'?)" in _all_output(unknown)


def test_eval_generates_and_scores_ifeval_and_gsm8k(tmp_path, one_thread, monkeypatch):
    import json

    import torch

    from lmcore.checkpoint import save_model
    from lmcore.config import ModelConfig
    from lmcore.model import GPT
    from lmcore.tokenizer import get_tokenizer

    monkeypatch.setenv("LMCORE_NLTK_DATA", str(tmp_path / "nltk_data"))
    torch.manual_seed(0)
    save_model(GPT(ModelConfig(vocab_size=50257, context_length=64, n_embd=16, n_layer=1, n_head=2)), tmp_path / "m")
    get_tokenizer("gpt2").save(tmp_path / "m")
    (tmp_path / "params.yaml").write_text(SCRATCH.read_text())  # its benchmark section: limit, no per-subject one
    out = tmp_path / "gen"
    args = ["benchmark", "--model", str(tmp_path / "m"), "--tasks", "ifeval,gsm8k", "--limit", "2", "--max-gen-toks", "4",
            "--output", str(out), "--root", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, _all_output(result)
    assert "ifeval\tprompt_level_loose_acc\t" in result.output and "gsm8k\texact_match_flexible_extract\t" in result.output
    assert "4 items in" in result.output and "plain prompts" in result.output  # GPT-2's tokenizer has no chat template
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"]["gsm8k"]["num_fewshot"] == 5 and results["tasks"]["ifeval"]["max_gen_toks"] == 4
    manifest = json.loads((tmp_path / "data" / "instruct_eval" / "manifest.json").read_text())
    assert {s["name"]: s["origin"] for s in manifest["sources"]} == {"ifeval": "mirror", "gsm8k-test": "mirror", "gsm8k-train": "mirror"}

    mixed = runner.invoke(app, ["eval", "--model", str(tmp_path / "m"), "--tasks", "ifeval,arc_easy", "--root", str(tmp_path)])
    assert mixed.exit_code == 2 and "score multiple-choice and generative tasks in separate runs" in _all_output(mixed)
