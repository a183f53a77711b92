"""The in-training benchmark probe (lmcore.harness.probe): a fixed benchmark sample scored every N steps of pretraining
and instruction fine-tuning, logged per step, kept in bench_curve.csv, without changing a single weight.

Micro models with the GPT-2 vocabulary (the probe encodes real text) and small benchmark files written here; the
stage helper collects the real HellaSwag file from the offline mirror.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import lmcore.harness.probe as probe_module
from lmcore.checkpoint import list_checkpoints, save_model
from lmcore.config import BENCHMARK_SOURCES, CollectConfig, DpoConfig, InstructConfig, ModelConfig, ParamsError, params_from_dict
from lmcore.data.collect import collect
from lmcore.finetune.dpo import train_dpo
from lmcore.finetune.instruct import finetune_instruct
from lmcore.harness.benchmarks import Item, sample, task_items
from lmcore.harness.probe import PREFIX, TIME_KEY, BenchProbe, probe_items, probe_sources
from lmcore.harness.run import flat_metrics, run_benchmarks
from lmcore.harness.scoring import TooLongError
from lmcore.model import GPT
from lmcore.paths import BENCH_CURVE, MANIFEST, TRAIN_LOSS, VAL_LOSS, WEIGHTS, Layout
from lmcore.pretrain import pretrain
from lmcore.stages import StageContext
from lmcore.stages._probe import bench_sample
from lmcore.tokenizer import get_tokenizer
from lmcore.tracking import ListTracker
from tests.conftest import MICRO, SHARED
from tests.test_training import micro_cfg, run, write_pattern_tokens

pytestmark = pytest.mark.usefixtures("one_thread")

METRICS = {f"{PREFIX}{t}.{m}" for t in ("hellaswag", "arc_easy") for m in ("acc", "acc_norm")}
WORDS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple", "grey", "brown", "pink", "gold"]


def gpt2_cfg(context_length: int = 32, dropout: float = 0.0, **overrides):
    """test_training's micro pretraining with the GPT-2 vocabulary (its token stream uses the first 16 ids), on
    windows of 8 tokens, 2 at a time: the 50k-way head is what costs."""
    model = ModelConfig(vocab_size=50257, context_length=context_length, n_embd=32, n_layer=2, n_head=2, dropout=dropout)
    base = {"model": model, "seq_len": min(8, context_length), "batch_size": 2, "max_steps": 10, "eval_interval": 5, "peak_flops": 1e12}
    return micro_cfg(**{**base, **overrides})


def write_benchmarks(out: Path, n: int = 12) -> Path:
    """A collected-benchmark-like folder: n HellaSwag items (six lines each) and n ARC-Easy questions."""
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        lines += [f"Painting: A man paints the fence {w}.", str(i % 4), *(f"He paints it {WORDS[(i + j) % len(WORDS)]} again." for j in range(4))]
    (out / "hellaswag.txt").write_text("\n".join(lines) + "\n")
    arc = [
        {"question": {"stem": f"What colour is the {WORDS[i % len(WORDS)]} car?",
                      "choices": [{"text": WORDS[(i + j) % len(WORDS)], "label": "ABCD"[j]} for j in range(4)]},
         "answerKey": "A", "id": f"q{i}"}
        for i in range(n)
    ]
    (out / "arc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arc))
    manifest = {"sources": [{"name": "hellaswag", "file": "hellaswag.txt"}, {"name": "arc-easy", "file": "arc.jsonl"}]}
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def enc():
    return get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def bench_items(tmp_path_factory) -> list:
    return probe_items(write_benchmarks(tmp_path_factory.mktemp("bench")), ["hellaswag", "arc_easy"], limit=5, sample_seed=1234)


@pytest.fixture
def gpt2_tokens(tmp_path, enc) -> Path:
    """test_training's learnable token cycle, carrying the GPT-2 tokenizer the probe encodes with."""
    tokens = write_pattern_tokens(tmp_path / "tokens")
    enc.save(tokens)
    return tokens


def bench_rows(reports: Path) -> list[dict]:
    with open(reports / BENCH_CURVE, newline="") as f:
        return list(csv.DictReader(f))


def test_pretrain_logs_the_probe_at_step_0_every_n_and_the_last_step(tmp_path, gpt2_tokens, bench_items):
    tracker = ListTracker()
    summary, _, reports = run(tmp_path, gpt2_tokens, cfg=gpt2_cfg(eval_benchmarks_every=4), tracker=tracker, bench_items=bench_items)
    logged = [(step, m) for step, m in tracker.records if any(k.startswith(PREFIX) for k in m)]
    assert [step for step, _ in logged] == [0, 4, 8, 10]
    for _, m in logged:
        assert m.keys() == METRICS and all(0.0 <= v <= 1.0 for v in m.values())
    # kept with the run: the same numbers, one row per eval, one column per metric
    rows = bench_rows(reports)
    assert [int(r["step"]) for r in rows] == [0, 4, 8, 10] and set(rows[0]) == {"step"} | METRICS
    for r, (_, m) in zip(rows, logged):
        assert all(float(r[k]) == pytest.approx(v, abs=1e-6) for k, v in m.items())
    assert summary["eval_benchmarks_items"] == 10 and summary[TIME_KEY] > 0
    # the curve is not the final benchmark's: no un-prefixed benchmark metric is logged while training
    assert not any(k.startswith(("hellaswag.", "arc_easy.")) for _, m in tracker.records for k in m)


def test_the_probe_scores_the_same_items_every_eval_and_every_run(tmp_path, gpt2_tokens, bench_items, monkeypatch):
    scored = []
    real = probe_module.score_items

    def recording(model, enc, items, **kwargs):
        scored.append([(it.task, it.doc_id) for it in items])
        return real(model, enc, items, **kwargs)

    monkeypatch.setattr(probe_module, "score_items", recording)
    run(tmp_path, gpt2_tokens, cfg=gpt2_cfg(eval_benchmarks_every=5), bench_items=bench_items)
    assert len(scored) == 3 and scored[0] == scored[1] == scored[2]  # steps 0, 5, 10
    assert len({doc for task, doc in scored[0] if task == "hellaswag"}) == 5
    # the sample is a pure function of (folder, tasks, limit, seed): another run draws the same items
    again = probe_items(write_benchmarks(tmp_path / "bench2"), ["hellaswag", "arc_easy"], limit=5, sample_seed=1234)
    assert [(it.task, it.doc_id) for it in again] == scored[0]


def test_weights_are_identical_with_and_without_the_probe(tmp_path, gpt2_tokens, bench_items):
    """Dropout on: a probe that drew a random number or left the model in eval mode would change the weights."""
    _, plain, plain_reports = run(tmp_path, gpt2_tokens, "plain", cfg=gpt2_cfg(dropout=0.2))
    _, probed, probed_reports = run(tmp_path, gpt2_tokens, "probed", cfg=gpt2_cfg(dropout=0.2, eval_benchmarks_every=3),
                                    bench_items=bench_items)
    assert (plain / WEIGHTS).read_bytes() == (probed / WEIGHTS).read_bytes()
    for name in (TRAIN_LOSS, VAL_LOSS):
        assert (plain_reports / name).read_text() == (probed_reports / name).read_text()
    assert not (plain_reports / BENCH_CURVE).exists() and (probed_reports / BENCH_CURVE).is_file()


def test_a_resumed_run_keeps_the_curve_and_may_change_the_probe(tmp_path, gpt2_tokens, bench_items):
    ckpt = tmp_path / "ckpt"
    cfg = gpt2_cfg(eval_benchmarks_every=4, checkpoint_interval=4)
    _, full, full_reports = run(tmp_path, gpt2_tokens, "full", cfg=cfg, bench_items=bench_items, checkpoint_dir=ckpt)
    shutil.rmtree(list_checkpoints(ckpt)[-1][1])  # as if killed after step 4
    # the probe's settings do not change training: the checkpoint resumes under other ones
    assert cfg.resume_key() == gpt2_cfg().resume_key()
    _, again, again_reports = run(tmp_path, gpt2_tokens, "again", cfg=cfg.model_copy(update={"resume": True}),
                                  bench_items=bench_items, checkpoint_dir=ckpt)
    assert (full / WEIGHTS).read_bytes() == (again / WEIGHTS).read_bytes()
    assert bench_rows(again_reports) == bench_rows(full_reports)  # steps 0 and 4 from the checkpoint, 8 and 10 after


def test_the_probe_scores_what_the_benchmark_harness_scores(tmp_path, enc):
    """On the same items the probe's numbers are run_benchmarks' (the benchmark stage's, with limit = the probe's)."""
    bench = write_benchmarks(tmp_path / "bench")
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50257, context_length=32, n_embd=32, n_layer=2, n_head=2)).train()
    probe = BenchProbe(probe_items(bench, ["hellaswag", "arc_easy"], limit=5, sample_seed=7), enc, context_length=32, every=1)
    scores = probe.score(model)
    assert model.training  # put back in train mode
    results = run_benchmarks(model, enc, bench, tmp_path / "report", tasks=["hellaswag", "arc_easy"], limit=5, sample_seed=7, progress=False)
    reference = flat_metrics(results)
    assert scores == pytest.approx({k: reference[k.removeprefix(PREFIX)] for k in METRICS}, abs=1e-12)


def test_items_longer_than_the_context_are_reported_before_training(tmp_path, gpt2_tokens, bench_items, enc, caplog):
    tracker = ListTracker()
    cfg = gpt2_cfg(context_length=2, eval_benchmarks_every=4)  # no HellaSwag ending fits; ARC's one-word answers do
    with pytest.raises(TooLongError, match=r"pretrain\.eval_benchmarks: hellaswag: none of its 5 sampled items can be scored"):
        run(tmp_path, gpt2_tokens, cfg=cfg, tracker=tracker, bench_items=bench_items)
    assert tracker.records == [] and not (tmp_path / "run").exists()  # not one step trained, nothing written
    # some too long: left out with a warning and counted, the rest scored
    long_item = Item("hellaswag", 99, "A story.", ("word " * 40, "short"), 1)
    probe = BenchProbe([*bench_items, long_item], enc, context_length=32, every=1, key="dpo")
    assert len(probe.items) == len(bench_items) and probe.summary()["eval_benchmarks_too_long"] == 1
    assert "dpo.eval_benchmarks: hellaswag: 1 of 6 sampled items left out" in caplog.text


def test_probe_without_its_sample_is_an_error(tmp_path, gpt2_tokens):
    with pytest.raises(ValueError, match=r"pretrain\.eval_benchmarks_every is set, but no benchmark sample was given"):
        run(tmp_path, gpt2_tokens, cfg=gpt2_cfg(eval_benchmarks_every=4))


@pytest.mark.parametrize("section", ["pretrain", "finetune_instruct", "dpo"])
def test_params_name_the_key_of_an_unknown_task_or_a_missing_source(section):
    base = yaml.safe_load(MICRO.read_text())
    with pytest.raises(ParamsError, match=rf"key '{section}\.eval_benchmarks': .*unknown benchmark task 'helaswag' \(did you mean 'hellaswag'\?\)"):
        params_from_dict(base, overrides=[f"{section}.eval_benchmarks=[helaswag]"])
    with pytest.raises(ParamsError, match=rf"key '{section}\.eval_benchmarks_every'"):
        params_from_dict(base, overrides=[f"{section}.eval_benchmarks_every=0"])
    # a task whose source benchmark.sources lacks: named when the probe is on, not when it is off
    no_arc = [f"{section}.eval_benchmarks=[arc_easy]", "benchmark.tasks=[hellaswag]", "benchmark.primary_metric=null",
              "benchmark.sources=[{name: hellaswag, sha256: " + "a" * 64 + "}]", "train_tokenizer.eval_benchmarks=[]"]
    params_from_dict(base, overrides=no_arc)
    with pytest.raises(ParamsError, match=rf"{section}\.eval_benchmarks: tasks \['arc_easy'\] need benchmark sources \['arc-easy'\]"):
        params_from_dict(base, overrides=[*no_arc, f"{section}.eval_benchmarks_every=10"])
    defaults = params_from_dict(base)
    section_cfg = getattr(defaults, section)
    assert (section_cfg.eval_benchmarks_every, section_cfg.eval_benchmarks, section_cfg.eval_benchmarks_limit) == (None, ["hellaswag"], 50)


def test_stage_helper_collects_only_the_needed_sources_and_samples_the_benchmark_stages_items(tmp_path, tmp_path_factory):
    params = params_from_dict(yaml.safe_load(MICRO.read_text()), overrides=["pretrain.eval_benchmarks_every=5"])
    assert bench_sample(StageContext(root=tmp_path, params=params), "finetune_instruct") is None  # off there
    items = bench_sample(StageContext(root=tmp_path, params=params), "pretrain")
    assert probe_sources(["hellaswag", "mmlu_anatomy"]) == ["hellaswag", "mmlu"]
    assert list(tmp_path.iterdir()) == []  # a temporary folder, gone; nothing written under the project
    # the items the benchmark stage scores with benchmark.limit 50 and the same sample_seed
    assert len(items) == 50 and {it.task for it in items} == {"hellaswag"}
    bench = tmp_path_factory.mktemp("bench-reference")  # HellaSwag as the benchmark stage collects it
    collect(CollectConfig(sources=[s for s in BENCHMARK_SOURCES if s.name == "hellaswag"]), bench, mirror=SHARED / "data")
    assert items == sample(task_items("hellaswag", bench), 50, params.benchmark.sample_seed)


# --- instruction fine-tuning -----------------------------------------------------------------------------------------

FT = dict(max_length=32, batch_size=4, max_steps=4, lr=3e-3, min_lr=3e-4, warmup_steps=1, eval_interval=2, eval_batches=1,
          device="cpu", max_new_tokens=2, max_test_generations=1)


@pytest.fixture(scope="module")
def instruct_splits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("instruct-splits")
    rows = [{"instruction": f"Say the colour {w} twice.", "input": "", "output": f"{w} {w}"} for w in WORDS * 2]
    for name, part in (("val", rows[:4]), ("test", rows[4:6]), ("train", rows[6:])):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return out


@pytest.fixture(scope="module")
def dropout_base(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("base")
    save_model(GPT(ModelConfig(vocab_size=50257, context_length=32, n_embd=32, n_layer=2, n_head=2, dropout=0.2)), out,
               extra={"tokenizer": "gpt2"})
    return out


def test_instruction_fine_tuning_logs_the_probe_and_trains_the_same_weights(tmp_path, instruct_splits, dropout_base, enc, bench_items):
    tracker = ListTracker()
    probed = finetune_instruct(InstructConfig(**FT, eval_benchmarks_every=3), dropout_base, instruct_splits, tmp_path / "m1",
                               tmp_path / "r1", seed=0, enc=enc, tracker=tracker, bench_items=bench_items)
    logged = [(step, m) for step, m in tracker.records if any(k.startswith(PREFIX) for k in m)]
    assert [step for step, _ in logged] == [0, 3, 4]
    assert all(m.keys() == METRICS and all(0.0 <= v <= 1.0 for v in m.values()) for _, m in logged)
    assert [int(r["step"]) for r in bench_rows(tmp_path / "r1")] == [0, 3, 4]
    assert probed["eval_benchmarks_items"] == 10 and probed[TIME_KEY] > 0

    finetune_instruct(InstructConfig(**FT), dropout_base, instruct_splits, tmp_path / "m2", tmp_path / "r2", seed=0, enc=enc)
    assert (tmp_path / "m1" / WEIGHTS).read_bytes() == (tmp_path / "m2" / WEIGHTS).read_bytes()
    assert not (tmp_path / "r2" / BENCH_CURVE).exists()


def test_dpo_logs_the_probe(tmp_path, dropout_base, enc, bench_items):
    splits = tmp_path / "splits"
    splits.mkdir()
    rows = [{"instruction": f"Say the colour {w}.", "input": "", "chosen": w, "rejected": WORDS[(i + 1) % len(WORDS)]}
            for i, w in enumerate(WORDS * 2)]
    for name, part in (("val", rows[:4]), ("test", rows[4:6]), ("train", rows[6:])):
        (splits / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    tracker = ListTracker()
    summary = train_dpo(DpoConfig(**FT, eval_benchmarks_every=2, eval_benchmarks=["arc_easy"]), dropout_base, splits,
                        tmp_path / "m", tmp_path / "r", seed=0, enc=enc, tracker=tracker,
                        bench_items=[it for it in bench_items if it.task == "arc_easy"])
    logged = [step for step, m in tracker.records if f"{PREFIX}arc_easy.acc_norm" in m]
    assert logged == [0, 2, 4] and summary["eval_benchmarks_items"] == 5
    assert [int(r["step"]) for r in bench_rows(tmp_path / "r")] == [0, 2, 4]


# --- under torchrun --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_every_rank_scores_the_probe_and_rank_0_writes_it(tmp_path, enc, strategy):
    """2 CPU ranks (gloo), from the command line: the sample collected from the mirror (HellaSwag), every rank scoring
    it (under fsdp the parameters are gathered collectively), rank 0 writing the curve one process writes."""
    from tests.test_distributed import torchrun

    layout = Layout(tmp_path)
    enc.save(write_pattern_tokens(layout.tokens))
    params = yaml.safe_load(MICRO.read_text())
    cfg = gpt2_cfg(context_length=64, max_steps=6, eval_interval=3, eval_benchmarks_every=3, eval_benchmarks_limit=8)
    params["pretrain"] = cfg.model_dump(mode="json")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    torchrun(tmp_path, f"pretrain.distributed={strategy}")
    rows = bench_rows(layout.pretrain_reports)
    assert [int(r["step"]) for r in rows] == [0, 3, 6]
    # one process with the same global batch (2 micro-batches) and the same sample scores the same
    items = bench_sample(StageContext(root=tmp_path, params=params_from_dict(params)), "pretrain")
    reference = tmp_path / "single"
    pretrain(cfg.model_copy(update={"grad_accum_steps": 2}), layout.tokens, reference / "model", reference / "reports",
             seed=params["seed"], bench_items=items)
    assert rows == bench_rows(reference / "reports")
