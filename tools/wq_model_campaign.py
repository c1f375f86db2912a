"""Run the workqueue and LoadIndex model tests long, outside the suite.

    python tools/wq_model_campaign.py [examples] [steps] [seed ...]

tests/workqueue/test_wq_model.py and test_loadindex_model.py run bounded
and derandomized in the suite; this runs them with random seeds, many
examples and longer walks, and prints how many steps each seed took.
"""

from __future__ import annotations

import logging
import sys
import time
import unittest
from pathlib import Path

from hypothesis import HealthCheck, seed, settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "workqueue"))

import test_loadindex_model  # noqa: E402
import test_wq_model  # noqa: E402


def main() -> int:
    examples = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 50
    seeds = [int(s) for s in sys.argv[3:]] or [1]
    # Dropped delayed work is logged at ERROR on purpose: not news here.
    logging.disable(logging.CRITICAL)
    steps_run = [0]
    settle = test_wq_model.WqModel.settle

    def counting_settle(self: test_wq_model.WqModel) -> None:
        steps_run[0] += 1
        settle(self)

    test_wq_model.WqModel.settle = counting_settle
    failed = 0
    for s in seeds:
        for machine in (test_wq_model.WqModel, test_loadindex_model.LoadIndexModel):
            machine.TestCase.settings = settings(
                max_examples=examples, stateful_step_count=steps, deadline=None,
                database=None, suppress_health_check=list(HealthCheck))
            case = seed(s)(machine.TestCase)
            steps_run[0] = 0
            start = time.monotonic()
            result = unittest.TextTestRunner(verbosity=0).run(
                unittest.defaultTestLoader.loadTestsFromTestCase(case))
            failed += not result.wasSuccessful()
            print(f"{machine.__name__} seed {s}: {examples} examples of up to {steps} steps, "
                  f"{steps_run[0] or '-'} workqueue steps, "
                  f"{'ok' if result.wasSuccessful() else 'FAILED'} "
                  f"in {time.monotonic() - start:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
