"""The in-training benchmark probe: a small fixed benchmark sample scored every N steps while a model trains, so the
HellaSwag curve (or any task's) shows during the run, not only at the end.

    items = probe_items(Path("data/benchmarks"), ["hellaswag"], limit=50, sample_seed=1234)
    probe = BenchProbe(items, enc, context_length=model.config.context_length, every=100, key="pretrain")
    if probe.due(step, last=step == max_steps):
        tracker.log_metrics(probe.score(model), step=step)  # {"train_bench.hellaswag.acc": .., "train_bench.hellaswag.acc_norm": ..}

The sample is the benchmark stage's: `limit` items per task drawn with `sample_seed` (lmcore.harness.benchmarks.sample
seeds by seed and task), zero-shot; so every eval of a run and every run score the same items, and with
`benchmark.limit` equal to the probe's limit the benchmark stage scores these very items too. The scoring is the
harness's own (score_items, item_result, task_scores, group_scores). Metric names carry the prefix `train_bench.`,
apart from the benchmark stage's "hellaswag.acc_norm": the reported tasks and groups as `run_benchmarks` reports them
(MMLU as mmlu and its categories, not its 57 subjects), acc and acc_norm without standard errors.

An item with a choice longer than the model's context cannot be scored: such items are left out when the probe is
built, before training starts, and counted; a task with none left is a TooLongError naming the params key.

`score` runs the model in eval mode without gradients and puts it back in its mode: dropout is off, no random number
is drawn, and a run with the probe ends with the weights of the run without it (bit for bit on CPU). Under torchrun
every rank scores every item (FSDP gathers parameters collectively); the caller logs on rank 0 only.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch

from lmcore import distributed
from lmcore.harness.benchmarks import ACC, ACC_NORM, GROUPS, SPECS, Item, expand, groups_of, sample, task_items
from lmcore.harness.metrics import group_scores, item_result, task_scores
from lmcore.harness.scoring import TooLongError, encode_choices, score_items

log = logging.getLogger(__name__)

PREFIX = "train_bench."  # metric names: train_bench.<task>.<metric>
TIME_KEY = "eval_benchmarks_time_s"  # summary: seconds spent scoring, all evals together
ITEMS_KEY = "eval_benchmarks_items"  # summary: items scored at each eval
REPORTED = (ACC, ACC_NORM)


def probe_sources(tasks: Iterable[str]) -> list[str]:
    """The benchmark source names (benchmark.sources) the tasks read, each once: ["hellaswag"] for hellaswag."""
    return list(dict.fromkeys(SPECS[t].source for t in expand(tasks)))


def probe_items(data_dir: Path, tasks: Iterable[str], *, limit: int, sample_seed: int) -> list[Item]:
    """`limit` items per leaf task (per subject for MMLU) of a collected benchmark folder, zero-shot, drawn with
    `sample_seed` as the benchmark stage draws them."""
    items: list[Item] = []
    for task in expand(tasks):
        items += sample(task_items(task, Path(data_dir), 0), limit, sample_seed)
    return items


class BenchProbe:
    """A fixed sample of benchmark items, scored on demand.

    Args:
        items: probe_items' sample.
        enc: the model's tokenizer.
        context_length: the model's; items with a longer choice are left out here, once (`too_long` counts them).
        every: score at step 0, every `every` steps and at the last step (`due`).
        key: the params section, named in errors ("pretrain" -> "pretrain.eval_benchmarks").
        batch_size: rows per forward pass.

    Raises: TooLongError when some task has no item that fits the context.
    """

    def __init__(self, items: list[Item], enc, *, context_length: int, every: int, key: str = "pretrain", batch_size: int = 16):
        if not items:
            raise ValueError(f"{key}.eval_benchmarks: the benchmark sample is empty")
        fits = [all(len(c) <= context_length for c in encode_choices(enc, it.context, it.continuations)[1]) for it in items]
        self.too_long = Counter(it.task for it, ok in zip(items, fits) if not ok)
        self.items = [it for it, ok in zip(items, fits) if ok]
        self.tasks = list(dict.fromkeys(it.task for it in items))
        left = Counter(it.task for it in self.items)
        for task in self.tasks:
            if not left[task]:
                raise TooLongError(
                    f"{key}.eval_benchmarks: {task}: none of its {self.too_long[task]} sampled items can be scored: a choice "
                    f"is longer than the model's context ({context_length} tokens); leave {task} out of {key}.eval_benchmarks"
                )
            if self.too_long[task]:
                log.warning("%s.eval_benchmarks: %s: %d of %d sampled items left out: a choice is longer than the context (%d tokens)",
                            key, task, self.too_long[task], self.too_long[task] + left[task], context_length)
        self.enc, self.every, self.batch_size = enc, every, batch_size
        self.time_s = 0.0  # spent in `score`, all calls together

    def due(self, step: int, *, last: bool) -> bool:
        """Score at this step: step 0, every `every` steps, and the last step (max_steps, or where training stopped)."""
        return step % self.every == 0 or last

    @torch.no_grad()
    def score(self, model: torch.nn.Module) -> dict[str, float]:
        """{"train_bench.<task>.<metric>": value} for the sample, each value in [0, 1]. Collective under fsdp."""
        start = time.perf_counter()
        with distributed.root_gathered(model):
            scores = score_items(model, self.enc, self.items, batch_size=self.batch_size, progress=False)
        rows: dict[str, list[dict]] = defaultdict(list)
        for item, sc in zip(self.items, scores):
            rows[item.task].append(item_result(item, sc))
        results = {t: task_scores(rows[t], SPECS[t].metrics) for t in self.tasks}
        results.update({g: group_scores([results[t] for t in members]) for g, members in groups_of(self.tasks).items()})
        self.time_s += time.perf_counter() - start
        return {
            f"{PREFIX}{name}.{m}": float(values[m])
            for name, values in results.items()
            if name in GROUPS or not name.startswith("mmlu_")  # the reported names: not the 57 subjects
            for m in REPORTED
            if m in values
        }

    def summary(self) -> dict[str, float | int]:
        """What the run summary records: items scored per eval, left-out items, seconds spent scoring."""
        return {ITEMS_KEY: len(self.items), "eval_benchmarks_too_long": sum(self.too_long.values()), TIME_KEY: round(self.time_s, 3)}


def section_probe(section, items: list[Item] | None, enc, context_length: int, *, key: str) -> BenchProbe | None:
    """The probe a params section asks for (pretrain, finetune_instruct, dpo: its eval_benchmarks_every), None when
    it is off; built before training, so a sample that cannot be scored stops the run before its first step.

    Raises: ValueError when the probe is on without a sample or a tokenizer; TooLongError (see BenchProbe).
    """
    if section.eval_benchmarks_every is None:
        return None
    if items is None:
        raise ValueError(f"{key}.eval_benchmarks_every is set, but no benchmark sample was given "
                         "(bench_items: lmcore.harness.probe.probe_items of a collected benchmark folder)")
    if enc is None:
        raise ValueError(f"{key}.eval_benchmarks_every is set, but there is no tokenizer to encode the benchmark items "
                         "with (the token shards carry none)")
    return BenchProbe(items, enc, context_length=context_length, every=section.eval_benchmarks_every, key=key)


__all__ = ["BenchProbe", "PREFIX", "TIME_KEY", "probe_items", "probe_sources", "section_probe"]
