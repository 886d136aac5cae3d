"""Moderation policies: policy files → the prompt sent to the guard → the guard's answer, read.

A policy file is TOML (``service/policies/*.toml``, plus an operator's own directory)::

    id = "llavaguard-v1.2"          # what events name in `policy_id`; the file name is free
    version = "1.2.1"               # bumped whenever the prompt, categories or decisions change
    answer_format = "llavaguard-json"
    safe_category = "NA"            # code of the category that means "nothing applies"
    prompt = '''...'''              # literal string: sent to the model exactly as written,
                                    # or the prompt in parts (`prompt.py`): preamble, closing
                                    # and each category's text and exception_text
    exceptions = ["O4"]             # categories declared non-violating (needs the parts)
    [decision]                      # allow / review / block: `service.core.decisions`
    unsafe = "block"
    [[categories]]
    code = "O1"
    label = "O1: Hate, Humiliation, Harassment"

A derived policy names its parent and changes only its exceptions and decision keys::

    id = "art-platform"
    version = "1.0.0"
    extends = "llavaguard-v1.2"
    exceptions = ["O4"]

Two answer formats: "llavaguard-json" (a JSON object with rating, category and rationale) and
"icm-yes-no" (ICM-Assistant: "Yes" or "No" first, then an explanation). A yes/no policy also
says which answer means Unsafe and which category an Unsafe answer gets when its explanation
names none of the policy's rules::

    answer_format = "icm-yes-no"
    unsafe_answer = "Yes"            # "Yes" or "No"; the other answer is Safe (safe_category)
    default_unsafe_category = "R00"  # a category code, not the safe one

Policies are read at start-up and on every reload; a bad file stops the service at start-up
(`ValueError`, naming file and key) and is kept out at a reload, rather than failing events one
by one. Reading an answer (`parse_answer`) is lenient about form and strict
about substance: the verdict must be written in the answer, never guessed.

Modules: `policy` (the Policy), `registry` (files, checks, extends), `prompt` (a prompt from
its parts), `parse` (`parse_answer`, which hands an answer to
the reader of its policy's format: `llavaguard_json` or `icm_yes_no`), `assessment` (what a
reader returns).
"""

from service.core.policies.assessment import Assessment, ModelIdentity
from service.core.policies.parse import MAX_ANSWER_BYTES, parse_answer
from service.core.policies.policy import ANSWER_FORMATS, Category, Policy, YesNoAnswers
from service.core.policies.registry import PolicyRegistry, exceptions_id

__all__ = [
    "ANSWER_FORMATS",
    "MAX_ANSWER_BYTES",
    "Assessment",
    "Category",
    "ModelIdentity",
    "Policy",
    "PolicyRegistry",
    "YesNoAnswers",
    "exceptions_id",
    "parse_answer",
]
