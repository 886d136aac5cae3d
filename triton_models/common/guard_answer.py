"""Where in a generated answer the guard decided, shared by every Triton model that generates one.

The consumer puts exp(`rating_log_prob`) in a verdict as its confidence: the probability the
model gave to the answer it chose at the token that decided it. This module finds that token
and says what it is compared with; the engines (the HF Python backend, the TensorRT-LLM BLS and
post-processing models) own the probabilities.

    conversation          earlier turns + the new question -> chat messages for the
                          checkpoint's chat template
    token_pieces          generated token ids + the tokenizer's decode -> text of each token
    decision_token_index  text of each token + DECISION_PATTERN -> index of the deciding token
    yes_no_rivals         the tokenizer's vocabulary -> each Yes/No token's counterpart
    two_way_log_prob      log-probs of the chosen Yes/No token and its rival -> log of
                          P(chosen) / (P(Yes) + P(No)), the confidence ICM-Assistant scores

Two definitions, told apart by the deciding token itself (no request input, no parameter):

- A Yes/No answer (ICM-Assistant): the deciding token is a Yes or No token of the vocabulary
  (`yes_no_rivals`). Its confidence is the two-way probability ICM's own evaluation scores,
  P(Yes) / (P(Yes) + P(No)) from the logits at that step, before sampling
  (zhaoyuzhi/ICM-Assistant, inference/vLLM_inference/vllm_inference_logits.py, thresholded at
  0.5 by eval_scripts/eval_icm_val/eval.py), or its complement when the answer is No. ICM reads
  the first generated token; this reads the deciding token, which is the first one unless the
  model writes a lead-in (whitespace, punctuation, markdown) before its Yes or No.
- Any other answer (LlavaGuard's JSON): the deciding token's probability over the whole
  vocabulary, as before.

Standard library only: Triton copies this file next to each `model.py` (triton_models/fill.py),
and the TensorRT-LLM image has no numpy-free guarantee about anything else we might import.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence

DECISION_PATTERN = r"""(?i)["']rating["']\s*:\s*["']\s*([^\s"'])|^[\W_]*(yes|no)(?![^\W_])"""
"""The decisive character is where the first non-None group of the first match starts.

- LlavaGuard JSON: the first character of the "rating" value, `S` of `"rating": "Safe"` or `U` of
  `"Unsafe"`. Key case and quote style are free, as `service.core.policies.parse_answer` reads them.
- ICM-Assistant: the leading Yes or No of the answer ("Yes, the image violates ..."), after
  the same lead-in `parse_answer` skips (whitespace, punctuation, markdown), in any case.

Operators can replace it per model (`decision_pattern` parameter): the first group that takes
part in the match marks the character, so any pattern with at least one group works.
"""

REPLACEMENT_CHARACTER = "\ufffd"

_YES_NO_TOKEN = re.compile(r"([\u0120\u2581 ]?)(yes|no)", re.IGNORECASE)
"""A vocabulary entry that is the word Yes or No, in any case, after at most one word-start
marker: byte-level BPE's `\u0120` (Qwen2, GPT-2), SentencePiece's `\u2581` (LLaMA), or a space."""


def compile_decision_pattern(pattern: str) -> re.Pattern[str]:
    """The compiled pattern, or ValueError saying why it cannot mark a decisive character."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"decision_pattern: not a valid regular expression: {exc}") from exc
    if compiled.groups == 0:
        raise ValueError(
            "decision_pattern: needs at least one group to mark the decisive character"
        )
    return compiled


def conversation(prompt: str, history: Sequence[tuple[str, str]] = ()) -> list[dict[str, object]]:
    """The chat messages for `processor.apply_chat_template(..., add_generation_prompt=True)`.

    `history` is the conversation so far as (role, text) pairs, user first and alternating
    (`guard_request.history_from_tensor` checks that), and `prompt` the user's newest turn.
    The image belongs to the first user turn, before its text, as LlavaGuard's model card and
    LLaVA's own conversations put it: LLaVA-OneVision's template renders the image placeholder
    before the text either way, but the order is kept so that templates which follow the list
    order agree.
    """
    turns = [*history, ("user", prompt)]
    messages: list[dict[str, object]] = []
    for index, (role, text) in enumerate(turns):
        content: list[dict[str, str]] = [{"type": "text", "text": text}]
        if index == 0:
            content.insert(0, {"type": "image"})
        messages.append({"role": role, "content": content})
    return messages


def decisive_offset(text: str, pattern: re.Pattern[str]) -> int | None:
    """Offset in `text` of the decisive character, or None when the pattern does not match."""
    match = pattern.search(text)
    if match is None:
        return None
    for group in range(1, pattern.groups + 1):
        start = match.start(group)
        if start >= 0:
            return start
    return None


def decision_token_index(pieces: Sequence[str], pattern: re.Pattern[str]) -> int | None:
    """Index of the token whose text covers the decisive character, None if there is none.

    `pieces` is the decoded text of each generated token in order, so that ''.join(pieces) is the
    answer. A token with empty text (a special token, or a partial UTF-8 character whose text
    arrives with the next token: see `token_pieces`) never covers a character.
    """
    offset = decisive_offset("".join(pieces), pattern)
    if offset is None:
        return None
    end = 0
    for index, piece in enumerate(pieces):
        end += len(piece)
        if offset < end:
            return index
    return None  # unreachable: the offset lies inside the joined text


def token_pieces(token_ids: Sequence[int], decode: Callable[[Sequence[int]], str]) -> list[str]:
    """The text each generated token adds to the answer, given the tokenizer's `decode`.

    Decoding token by token is wrong for byte-level BPE: one character may span several tokens,
    and a tokenizer may clean up spaces depending on what follows. So each token's text is what
    decoding the longer prefix adds to the shorter one. While a prefix ends in an incomplete
    character (decoded as U+FFFD) its tokens add nothing; the character is credited to the
    token that completes it. ''.join(result) == decode(token_ids) whenever the tokenizer's
    decoding of a prefix is a prefix of its decoding of the whole, which byte-level BPE
    tokenizers (Qwen2's included) guarantee for complete characters when decoding does not
    clean up spaces (pass `clean_up_tokenization_spaces=False`). Should a decoder rewrite text
    it already produced, the tokens after that point get empty pieces: the answer then has no
    deciding token rather than a wrong one.

    Costs one decode per token: fine for the few hundred tokens of a guard answer.
    """
    pieces: list[str] = []
    emitted = ""
    for end in range(1, len(token_ids) + 1):
        text = decode(token_ids[:end])
        if text.endswith(REPLACEMENT_CHARACTER) or not text.startswith(emitted):
            pieces.append("")
            continue
        pieces.append(text[len(emitted) :])
        emitted = text
    if pieces:
        # An answer cut off mid-character ends in U+FFFD: credit it to the last token.
        whole = decode(token_ids)
        if whole.startswith(emitted):
            pieces[-1] += whole[len(emitted) :]
    return pieces


def yes_no_rivals(vocab: Mapping[str, int]) -> dict[int, int]:
    """Each Yes/No token id of `vocab` -> the id of the same token of the other answer.

    `vocab` maps token strings to ids (`tokenizer.get_vocab()`). The other answer is the same
    string with the word swapped and its case kept: `\u0120Yes` <-> `\u0120No`, `\u2581yes` <->
    `\u2581no`, `YES` <-> `NO`. A Yes/No token whose counterpart is not in the vocabulary has no
    rival, so an answer it decides keeps the whole-vocabulary definition.
    """
    rivals: dict[int, int] = {}
    for token, token_id in vocab.items():
        match = _YES_NO_TOKEN.fullmatch(token)
        if match is None:
            continue
        marker, word = match.groups()
        rival_id = vocab.get(marker + _other_answer(word))
        if rival_id is not None and rival_id != token_id:
            rivals[token_id] = rival_id
    return rivals


def _other_answer(word: str) -> str:
    other = "no" if word.lower() == "yes" else "yes"
    if word.isupper():
        return other.upper()
    if word[0].isupper():
        return other.capitalize()
    return other


def two_way_log_prob(chosen: float, rival: float) -> float:
    """log(P(chosen) / (P(chosen) + P(rival))) from the two natural log-probs (or raw logits:
    the normaliser cancels); NaN when neither has any probability."""
    top = max(chosen, rival)
    if top == -math.inf or math.isnan(top):
        return math.nan
    return chosen - (top + math.log(math.exp(chosen - top) + math.exp(rival - top)))
