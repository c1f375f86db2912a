"""Run the workqueue and LoadIndex model tests long, outside the suite.

    python tools/wq_model_campaign.py [examples] [steps] [seed ...]

tests/workqueue/test_wq_model.py and test_loadindex_model.py run bounded
and derandomized in the suite; this runs them with the seeds given (1 by
default), each for many examples of longer walks, and prints how many steps
each seed took.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import unittest
from pathlib import Path

from hypothesis import HealthCheck, seed, settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "workqueue"))

import test_loadindex_model  # noqa: E402
import test_wq_model  # noqa: E402
from toolargs import whole  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("examples", nargs="?", type=whole(1), default=1000,
                   help="hypothesis examples per seed and model (default 1000)")
    p.add_argument("steps", nargs="?", type=whole(1), default=50,
                   help="most steps of one example (default 50)")
    p.add_argument("seeds", nargs="*", type=int, default=[1], metavar="seed",
                   help="hypothesis seeds, each run in turn (default 1)")
    args = p.parse_args()
    examples, steps, seeds = args.examples, args.steps, args.seeds
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
            # Only the workqueue's model counts its steps (settle() runs after each).
            counted = f"{steps_run[0]} steps run, " if machine is test_wq_model.WqModel else ""
            print(f"{machine.__name__} seed {s}: {examples} examples of up to {steps} steps, "
                  f"{counted}{'ok' if result.wasSuccessful() else 'FAILED'} "
                  f"in {time.monotonic() - start:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
