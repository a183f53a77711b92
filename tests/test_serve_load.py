"""`lmcore serve` under load (benchmarks.serve_load): 64 concurrent clients, streaming and not, on a real server.

The benchmark runs each phase for 60 s; here the phases are shorter (the suite's budget), with the same checks: no
failed or hung request, every greedy reply equal to the same request served alone, and aggregate tokens/s at 32
concurrent clients at least 3x the batch-1 rate of the same server in the same run (the benchmark alone shows 4x
and more; the suite runs beside another worker).
"""

from __future__ import annotations

import pytest

from benchmarks import serve_load

pytestmark = pytest.mark.slow


def check(numbers: dict, min_speedup: float) -> None:
    for name, phase in numbers.items():
        assert phase["failed"] == 0 and phase["hung"] == 0, (name, phase)
        assert phase["identical"] == phase["compared"] > 0, (name, phase)
    assert numbers["32 concurrent"]["vs_batch1"] >= min_speedup, numbers


@pytest.mark.parametrize(("model", "duration", "max_tokens"), [("small", 12.0, 32), ("smollm2", 12.0, 24)])
def test_64_clients_mixed_streams_every_reply_as_alone(model, duration, max_tokens, tmp_path, capsys):
    if model == "smollm2" and not serve_load.SMOLLM2.is_file():
        pytest.skip(f"{serve_load.SMOLLM2} is not here")
    folder = {"small": serve_load.small_model, "smollm2": serve_load.smollm2_model}[model](tmp_path / model)
    numbers = serve_load.run_model(model, folder, clients=64, duration=duration, solo_duration=3.0, max_tokens=max_tokens,
                                   timeout=120.0, threads=2, log_dir=tmp_path)
    print(capsys.readouterr().out)  # the table, in the log
    assert numbers["load, mixed"]["requests"] >= 64
    # batching, not a queue: the benchmark alone (README) shows >= 4x; beside the other xdist worker on two cores the
    # ratio runs lower, so the suite asks for 3x, far above the 1x of requests served one after another
    check(numbers, min_speedup=3.0)
