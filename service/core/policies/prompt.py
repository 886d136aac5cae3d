"""A LlavaGuard prompt from its parts, with some categories declared non-violating.

LlavaGuard v1.2 was trained on prompts assembled from parts, and on variants of them where a
category is declared non-violating ("policy exceptions"). This module assembles them the same
way, so that a policy with exceptions asks the model in words it was trained on.

The mechanism, read in github.com/ml-research/LlavaGuard at 840699c (no code copied):
- `llavaguard/taxonomy/policy.py` (get_default_policy) and `llavaguard/taxonomy/
  augmentation_funct.py` (get_augmented_policy_v1 ... v3): the prompt is the start sentence, then
  for each category of the policy dictionary in order its name, ": " and a line break, then the
  category's text, then a line break; then the response template. The text is the category's
  first text ("Should not: ... Can: ...") or, for a category declared non-violating, its second
  ("Category O4 is declared as non-violating. ..."). v2 declares the image's own category, v3
  one to three others, v1 any number.
- `llavaguard_config.py`: v1.2's templates json-v22 (7B models, scripts/train/LlavaGuard-v1.2/
  train-llavaguard-7b.sh) and json-v24 (0.5B-OV, train-llavaguard-ov-0.5b.sh) both use
  `policy_start_sentence_v16`, `custom_policy_dict_v2` (llavaguard/taxonomy/taxonomies.py) and
  `json_template_v20` (llavaguard/taxonomy/assessment.py), which ends with an `<image>` line.
- LLaVA-NeXT's training (`preprocess_multimodal` in llava/train/train.py) removes that `<image>`,
  strips the text and puts the image first. The text the model saw is therefore the assembled
  prompt without `<image>`, stripped; the image goes first by the chat template
  (`triton_models/common/guard_answer.py`).

tests/test_policy_exceptions.py pins the result for several exception sets against SHA-256
digests of that mechanism's output, computed from the repository at that commit.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class CategoryText:
    """What the prompt says of one category: its rules, and its text when declared exempt."""

    rules: str
    exempt: str | None = None


@dataclass(frozen=True)
class PromptParts:
    """A prompt in parts: `preamble`, one block per category (`texts`, by code), `closing`."""

    preamble: str
    closing: str
    texts: Mapping[str, CategoryText]


def assemble(
    parts: PromptParts, labels: Iterable[tuple[str, str]], exceptions: Collection[str]
) -> str:
    """The prompt for categories `labels` ((code, label) in prompt order) with `exceptions`
    (codes) declared non-violating. Every exception must have an exempt text."""
    blocks = []
    for code, label in labels:
        text = parts.texts[code]
        body = text.exempt if code in exceptions else text.rules
        if body is None:
            raise ValueError(f"category {code} has no exception_text to declare it non-violating")
        blocks.append(f"{label}: \n{body}\n")
    return (parts.preamble + "".join(blocks) + parts.closing).strip()
