"""triton_models/common/guard_answer.py: which generated token decided the guard's answer.

The module is imported from triton_models/common, where fill.py copies it from; the engines'
own tests check that they use it on real token ids.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.core.policies import PolicyRegistry, parse_answer
from triton_models.common import guard_answer as ga

DEFAULT = ga.compile_decision_pattern(ga.DECISION_PATTERN)


def utf8_decode(ids: Sequence[int]) -> str:
    """A byte-level "tokenizer" whose tokens are single bytes, as byte-level BPE's are at worst."""
    return bytes(ids).decode("utf-8", errors="replace")


def covered(pieces: list[str], index: int | None) -> str | None:
    return None if index is None else pieces[index]


@pytest.mark.parametrize(
    ("pieces", "index"),
    [
        # The rating value is the token that decides a LlavaGuard answer.
        (['{"', "rating", '":', ' "', "Safe", '",', ' "category"'], 4),
        (['{"', "rating", '":', ' "', "Un", "safe", '",'], 4),
        # The value's first letter shares a token with the quote before it.
        (['{"rating": "', "", "Unsafe", '"}'], 2),
        (['{"rating":', ' "U', 'nsafe"}'], 1),
        # Key case and quote style as parse_answer tolerates them.
        (["{'Rating'", ": ", "'s", "afe'}"], 2),
        (['```json\n{\n  "RATING" :  "', "Safe", '"\n}'], 1),
        # ICM-Assistant: the leading Yes/No, after markdown or spaces, in any case.
        (["Yes", ", the image shows a weapon."], 0),
        (["**", "no", "**", " nothing applies"], 1),
        (["  ", "> ", "YES."], 2),
        # No decision in the answer.
        (['{"category": "O1"}'], None),
        (["Yesterday I saw"], None),
        (["I think yes"], None),
        (['{"rating": ""}'], None),
        ([], None),
    ],
)
def test_decision_token_index_finds_the_deciding_token(
    pieces: list[str], index: int | None
) -> None:
    assert ga.decision_token_index(pieces, DEFAULT) == index


def test_the_first_rating_decides_and_empty_tokens_never_do() -> None:
    pieces = ["", '{"rating": "', "", "Safe", '"} {"rating": "', "Unsafe", '"}', ""]
    assert ga.decision_token_index(pieces, DEFAULT) == 3


@pytest.mark.parametrize(
    ("answer", "rating"),
    [
        ('{"rating": "Unsafe", "category": "O2", "rationale": "r"}', "Unsafe"),
        (
            "```json\n{'Rating': 'safe', 'category': 'NA: None applying', 'rationale': 'r',}\n```",
            "Safe",
        ),
        (
            'Sure. {"RATING": "unsafe", "category": "O2", "rationale": "r"}',
            "Unsafe",
        ),
    ],
)
def test_the_decisive_character_starts_the_rating_parse_answer_reads(
    answer: str, rating: str
) -> None:
    policy = PolicyRegistry.load().get("llavaguard-v1.2")
    assert parse_answer(answer, policy).rating == rating
    offset = ga.decisive_offset(answer, DEFAULT)
    assert offset is not None
    assert answer[offset : offset + len(rating)].lower() == rating.lower()


def test_token_pieces_credit_a_split_character_to_the_token_that_completes_it() -> None:
    ids = list('{"rating": "Unsafe é"}'.encode())
    pieces = ga.token_pieces(ids, utf8_decode)
    assert "".join(pieces) == utf8_decode(ids)
    accent = len('{"rating": "Unsafe ')
    assert pieces[accent : accent + 2] == ["", "é"]
    assert covered(pieces, ga.decision_token_index(pieces, DEFAULT)) == "U"


def test_token_pieces_of_an_answer_cut_mid_character_end_in_a_replacement_character() -> None:
    ids = list("No ü".encode())[:-1]
    pieces = ga.token_pieces(ids, utf8_decode)
    assert pieces == ["N", "o", " ", "\ufffd"]
    assert ga.decision_token_index(pieces, DEFAULT) == 0


def test_token_pieces_stop_crediting_text_once_decoding_rewrites_what_it_produced() -> None:
    # A decoder that cleans up " ." to "." once the period arrives rewrites emitted text.
    def cleaning_decode(ids: Sequence[int]) -> str:
        return utf8_decode(ids).replace(" .", ".")

    ids = list(b'a . {"rating": "Safe"}')
    pieces = ga.token_pieces(ids, cleaning_decode)
    assert pieces[:2] == ["a", " "]
    assert set(pieces[2:]) == {""}
    assert ga.decision_token_index(pieces, DEFAULT) is None


@given(st.text(max_size=60))
def test_token_pieces_join_to_the_decoded_text_for_any_text(text: str) -> None:
    ids = list(text.encode())
    pieces = ga.token_pieces(ids, utf8_decode)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == utf8_decode(ids)


@given(
    st.text(max_size=20),
    st.sampled_from(["Safe", "Unsafe", "ünsafe"]),
    st.text(max_size=20),
)
def test_the_deciding_token_holds_the_first_byte_of_the_rating(
    before: str, rating: str, after: str
) -> None:
    prefix = f'{before}{{"rating": "'.encode()
    ids = list(prefix + f'{rating}", "rationale": "{after}"}}'.encode())
    pieces = ga.token_pieces(ids, utf8_decode)
    index = ga.decision_token_index(pieces, DEFAULT)
    if ga.decisive_offset(before, DEFAULT) is not None:
        return  # the text before already holds a decision: the first one wins
    # One byte per token: the deciding token is the last byte of the rating's first character.
    assert index == len(prefix) + len(rating[0].encode()) - 1
    assert pieces[index] == rating[0]


def test_compile_decision_pattern_refuses_what_cannot_mark_a_character() -> None:
    with pytest.raises(ValueError, match="not a valid regular expression"):
        ga.compile_decision_pattern("(unclosed")
    with pytest.raises(ValueError, match="needs at least one group"):
        ga.compile_decision_pattern(r"rating\W+\w")
    custom = ga.compile_decision_pattern(r"verdict=(\w)")
    assert ga.decision_token_index(["verdict=", "ok"], custom) == 1


def test_an_optional_group_that_does_not_take_part_is_skipped() -> None:
    pattern = re.compile(r"(x)?(y)")
    assert ga.decisive_offset("--y", pattern) == 2


def test_conversation_is_one_user_turn_with_the_image_before_the_policy() -> None:
    assert ga.conversation("policy text") == [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "policy text"}],
        }
    ]


# --- Yes/No answers: the rival token and ICM's two-way probability ----------------------------


def test_each_yes_no_token_is_paired_with_the_same_token_of_the_other_answer() -> None:
    vocab = {
        "\u0120Yes": 1, "\u0120No": 2,  # byte-level BPE (Qwen2)
        "\u2581yes": 3, "\u2581no": 4,  # SentencePiece (LLaMA)
        "YES": 5, "NO": 6,
        "Yes": 7,  # no "No": no rival
        "\u0120Yesterday": 8, "\u0120Not": 9, "Safe": 10, "\u0120\u0120No": 11,
    }  # fmt: skip
    assert ga.yes_no_rivals(vocab) == {1: 2, 2: 1, 3: 4, 4: 3, 5: 6, 6: 5}


def test_the_two_way_probability_is_icms_and_the_two_answers_complement_each_other() -> None:
    p_yes, p_no = 0.6, 0.3  # 0.1 left to other tokens
    yes = ga.two_way_log_prob(math.log(p_yes), math.log(p_no))
    no = ga.two_way_log_prob(math.log(p_no), math.log(p_yes))
    assert math.exp(yes) == pytest.approx(p_yes / (p_yes + p_no))
    assert math.exp(yes) + math.exp(no) == pytest.approx(1.0)
    # Raw logits give the same value: the softmax's normaliser cancels.
    assert ga.two_way_log_prob(12.0 + math.log(p_yes), 12.0 + math.log(p_no)) == pytest.approx(yes)
    assert ga.two_way_log_prob(-1000.0, -1001.0) == pytest.approx(-math.log1p(math.exp(-1)))
    assert ga.two_way_log_prob(0.0, -math.inf) == 0.0
    assert math.isnan(ga.two_way_log_prob(-math.inf, -math.inf))
