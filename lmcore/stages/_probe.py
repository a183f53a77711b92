"""What the training stages (pretrain, finetune_instruct, dpo) share for the in-training benchmark probe: its sample,
from the benchmark sources its tasks read, collected as the benchmark stage collects them (train_tokenizer reads
its benchmark texts the same way)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from lmcore.data.collect import collect, mirror_from_env
from lmcore.harness.benchmarks import Item
from lmcore.harness.probe import ITEMS_KEY, TIME_KEY, probe_items, probe_sources
from lmcore.stages import StageContext

PROBE_SUMMARY_KEYS = (ITEMS_KEY, TIME_KEY)  # what a fine-tune stage's summary shows of the probe, when it ran


def bench_sample(ctx: StageContext, section: str) -> list[Item] | None:
    """The probe's sample for the params section `section`; None when its `eval_benchmarks_every` is null."""
    cfg = getattr(ctx.params, section)
    if cfg.eval_benchmarks_every is None:
        return None
    return benchmark_items(ctx, cfg.eval_benchmarks, cfg.eval_benchmarks_limit)


def benchmark_items(ctx: StageContext, tasks: list[str], limit: int) -> list[Item]:
    """`limit` items of each of `tasks`, drawn with `benchmark.sample_seed` as the benchmark stage draws its own.

    Only the sources the tasks read are collected from `benchmark.sources` (mirror first, downloads resumed from the
    benchmark stage's cache), into a temporary folder that is gone once the items are read.
    """
    wanted = set(probe_sources(tasks))
    sources = [s for s in ctx.params.benchmark.sources if s.name in wanted]  # all there: lmcore.config checks it
    with tempfile.TemporaryDirectory(prefix="lmcore-bench-items-") as tmp:
        data_dir = Path(tmp) / "benchmarks"
        collect(ctx.collect_config(sources), data_dir, mirror=mirror_from_env(), base_dir=ctx.root,
                cache_dir=ctx.layout.benchmark_data.parent / ".cache" / "downloads")
        return probe_items(data_dir, tasks, limit=limit, sample_seed=ctx.params.benchmark.sample_seed)
