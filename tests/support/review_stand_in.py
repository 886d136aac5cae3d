"""`python -m tests.support.review_stand_in run`: the service, with a stand-in for the decision
rules, for the fault suite until the real rules land.

A verdict of the fault suite's review policy (`faults.REVIEW_POLICY_ID`) gets action review,
any other verdict allow; dead letters are left as they are. Everything else is the real
service, started as a pod starts it (`service.__main__.main`), so the review topic's delivery
is what the fault suite proves. When the decision rules land, the review policy's own rules do
this (`faults.review_policy`), `faults.SERVICE_MODULE` goes back to "service", and this module
is deleted.
"""

from __future__ import annotations

import sys

from service.__main__ import main
from service.core.pipeline import Outcome, Pipeline, Record
from service.core.verdicts import Verdict
from tests.support.faults import REVIEW_POLICY_ID

_judge = Pipeline.judge


async def _judge_and_decide(self: Pipeline, record: Record) -> Outcome:
    outcome = await _judge(self, record)
    if not isinstance(outcome, Verdict):
        return outcome
    action = "review" if outcome.policy_id == REVIEW_POLICY_ID else "allow"
    return outcome.model_copy(update={"action": action})


Pipeline.judge = _judge_and_decide  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main())
