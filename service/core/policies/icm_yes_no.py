"""Reading an "icm-yes-no" answer (ICM-Assistant): "Yes" or "No" first, then an explanation."""

from __future__ import annotations

import re

from service.core.errors import UnparseableModelOutput
from service.core.policies.assessment import Assessment, quoted
from service.core.policies.policy import Policy, YesNoAnswers

# ICM-Assistant answers "Yes." or "No." and may go on to explain. Its own evaluations read the
# first token's Yes/No logits, or the first character; here the first word must be Yes or No.
# Every pattern below is anchored at one place and bounded, so the work stays linear in the text.

_LEAD = re.compile(r"[\W_]*")  # whitespace, punctuation, markdown before the answer word
_FIRST_WORD = re.compile(r"[^\W_]+")  # letters and digits
_SHOWN_WORD = re.compile(r"\S{1,40}")
# "No-one", "Yes-man", "Yes/No", "No's": the word goes on, so it is not the answer Yes or No.
_COMPOUND = re.compile(r"[-/'\u2010\u2011\u2019][^\W_]")
# "Yes or no", "No, and yes", "yes / no": both answers, which is none.
_BOTH = re.compile(r"[\W_]{0,8}?(?:\b(?:or|and|nor)\b|/)[\W_]{0,8}(?:yes|no)(?![^\W_])", re.I)
# Between the answer word and the explanation: anything but letters, digits and opening brackets.
_EXPLANATION_START = re.compile(r"(?:[^\w(\[{<\u00ab\u2018\u201c]|_)*")


def read_yes_no_answer(text: str, policy: Policy, yes_no: YesNoAnswers) -> Assessment:
    """Read an "icm-yes-no" answer: Yes or No first, then (optionally) the explanation.

    Lenient about form: any case ("YES", "yes"), and anything but letters and digits before the
    word or right after it (whitespace, "**Yes**", "> No", "Yes.", "No, but ..."). Strict about
    substance: the first word must be exactly Yes or No ("Yesterday", "Nope", "Not sure",
    "No-one", "Yes/No", "Yes or no" are refused). The rationale is the explanation after the
    word, trimmed; an Unsafe answer's category is the rule it names (`YesNoAnswers.named_rule`),
    else the policy's default; the other answer's category is the safe one.
    """
    start = _LEAD.match(text)
    word = _FIRST_WORD.match(text, start.end() if start else 0)
    if word is None:
        reason = "answer is empty" if not text.strip() else "answer has no Yes or No"
        raise UnparseableModelOutput(reason, model_output=text)
    said = word.group()
    if said.lower() not in ("yes", "no") or not said.isascii() or _COMPOUND.match(text, word.end()):
        shown = _SHOWN_WORD.match(text, word.start())
        first = shown.group() if shown else said
        raise UnparseableModelOutput(
            f"answer starts with {quoted(first)}, not with Yes or No", model_output=text
        )
    if _BOTH.match(text, word.end()):
        raise UnparseableModelOutput("answer says both Yes and No", model_output=text)
    rest = text[word.end() :]
    skipped = _EXPLANATION_START.match(rest)
    rationale = _trim_explanation(rest[skipped.end() if skipped else 0 :])
    if said.lower() != yes_no.unsafe_answer.lower():
        return Assessment("Safe", policy.safe_category, rationale, None)
    category = yes_no.named_rule(rationale) or yes_no.default_category
    return Assessment("Unsafe", category, rationale, None)


def _trim_explanation(text: str) -> str:
    trimmed = text.rstrip()
    if trimmed.endswith("```"):  # the answer sat in a code fence
        trimmed = trimmed[:-3].rstrip()
    return trimmed
