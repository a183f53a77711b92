"""Per-test seconds from a JUnit XML report, written to tests/durations.json: the order in which `make test` and
`make test-all` hand the test groups to pytest-xdist's workers (the longest first, so that no long group starts
last while the other workers idle). Only the order depends on it: a stale or missing file costs time, never a test.

    .venv/bin/python -m pytest -p no:randomly --junitxml=/tmp/junit.xml     # a serial run of everything
    .venv/bin/python -m tests.durations /tmp/junit.xml
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

FILE = Path(__file__).with_name("durations.json")
FLOOR_S = 0.5  # tests faster than this are counted at DEFAULT_S: the order of short tests does not matter
DEFAULT_S = 0.2


def load() -> dict[str, float]:
    """nodeid -> seconds (setup, call and teardown), as last measured; {} without the file."""
    return json.loads(FILE.read_text(encoding="utf-8")) if FILE.is_file() else {}


def nodeid(classname: str, name: str) -> str:
    """The pytest node id of a JUnit testcase: `tests.flows.test_cli` + `test_x` -> tests/flows/test_cli.py::test_x."""
    parts = classname.split(".")
    for cut in range(len(parts), 0, -1):  # a class inside the module leaves its name after the module path
        module = Path(*parts[:cut]).with_suffix(".py")
        if (Path(__file__).parents[1] / module).is_file():
            return "::".join([module.as_posix(), *parts[cut:], name])
    return f"{'/'.join(parts)}.py::{name}"


def main(argv: list[str]) -> None:
    seconds = {nodeid(tc.get("classname", ""), tc.get("name", "")): float(tc.get("time", 0))
               for tc in ET.parse(argv[0]).getroot().iter("testcase")}
    kept = {k: round(v, 1) for k, v in sorted(seconds.items()) if v >= FLOOR_S}
    FILE.write_text(json.dumps(kept, indent=0) + "\n", encoding="utf-8")
    print(f"{FILE}: {len(kept)} of {len(seconds)} tests at >= {FLOOR_S} s, {sum(seconds.values()):.0f} s in all")


if __name__ == "__main__":
    main(sys.argv[1:])
