"""Shared settings of the fuzz tests: how many examples, and a counter that proves they ran.

``FUZZ_EXAMPLES`` sets hypothesis' ``max_examples`` for every fuzz test (default 50, so that ``make test`` stays
short: at 100 the fuzz tests took 700 s of the suite's 3200 s of test time on the loaded 2-core machine, the
method explorer's alone 210 s, about 2 s an example, 60% of it building a fresh explorer); the slower explorers of
test_explorer_fuzz.py run a tenth of it, at least 5. Each example runs the same steps and checks at any count:
fewer examples explore fewer states per run, and locally (no ``CI`` variable) each run draws new ones. The full
run is ``FUZZ_EXAMPLES=1000 pytest tests/fuzz -s``. Each test prints how many examples it ran and fails if
hypothesis ran fewer than it was asked for (a filter or an assumption that rejects most inputs would otherwise pass
while testing nothing).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, Phase, settings

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "50"))

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    # no example database: the run is the same on every machine, and a fresh clone replays nothing
    database=None,
    print_blob=True,
    phases=(Phase.explicit, Phase.generate, Phase.shrink),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                           HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


class Counter:
    """Counts the examples a hypothesis test body ran."""

    def __init__(self) -> None:
        self.n = 0
        self.events: dict[str, int] = {}

    def __call__(self) -> None:
        self.n += 1

    def event(self, name: str) -> None:
        """Tally what the examples did (valid states, one-line errors), for the printed summary."""
        self.events[name] = self.events.get(name, 0) + 1


def run_counted(name: str, test: Callable[[Counter], Any], examples: int = EXAMPLES) -> int:
    """Run ``test`` (a ``@given`` function taking the counter), print and check the number of examples
    (``examples``: what the test's settings ask for, ``FUZZ_EXAMPLES`` unless it asks for fewer)."""
    counter = Counter()
    test(counter)
    tally = ", ".join(f"{k} {v}" for k, v in sorted(counter.events.items()))
    print(f"[fuzz] {name}: {counter.n} examples (FUZZ_EXAMPLES={EXAMPLES}); {tally}")
    assert counter.n >= examples, f"{name}: hypothesis ran {counter.n} examples, fewer than {examples}"
    return counter.n
