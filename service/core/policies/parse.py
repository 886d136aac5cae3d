"""`parse_answer`: the guard's answer, read in the answer format its policy names."""

from __future__ import annotations

from service.core.errors import UnparseableModelOutput
from service.core.policies.assessment import Assessment
from service.core.policies.icm_yes_no import read_yes_no_answer
from service.core.policies.llavaguard_json import read_json_answer
from service.core.policies.policy import Policy

MAX_ANSWER_BYTES = 64 * 1024
"""Longer guard output is rejected unread: the readers' scans must stay cheap on any input."""


def parse_answer(text: str, policy: Policy) -> Assessment:
    """Read the guard's answer to `policy`'s prompt, in the policy's answer format.

    Raises UnparseableModelOutput, saying what is wrong, when the answer states no verdict:
    nothing is ever filled in. Answers longer than MAX_ANSWER_BYTES are refused unread.
    """
    # The length test first spares encoding a huge text just to measure it.
    if len(text) > MAX_ANSWER_BYTES or len(_utf8(text)) > MAX_ANSWER_BYTES:
        raise UnparseableModelOutput(
            f"answer is longer than {MAX_ANSWER_BYTES} bytes; not read", model_output=text
        )
    if policy.yes_no is not None:  # answer_format "icm-yes-no" (Policy checks the pairing)
        return read_yes_no_answer(text, policy, policy.yes_no)
    return read_json_answer(text, policy)


def _utf8(text: str) -> bytes:
    # surrogatepass: a lone surrogate must count toward the limit, not raise.
    return text.encode("utf-8", "surrogatepass")
