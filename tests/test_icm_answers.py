"""The ICM-Assistant policy: its prompt against the sources, and reading its Yes/No answers.

Sources (github.com/zhaoyuzhi/ICM-Assistant; the policy file's header says what each gave):
rule_definition.csv at c1a48fb697730859aa27e147ed3e0eea446be2fc, and the LLaVA-v1.5 evaluation
question at b0ab3025727a6d1e7383f64c4f58ce90fba46d1e. Copies are hard-coded here because CI checks
out this repository alone; the CSV copy is checked against the file's sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.core.errors import UnparseableModelOutput
from service.core.policies import (
    MAX_ANSWER_BYTES,
    Assessment,
    Category,
    Policy,
    PolicyRegistry,
    YesNoAnswers,
    parse_answer,
)
from service.core.verdicts import DeadLetter, Verdict
from tests.support.pipeline import ScriptedGuard, event_record, judge

POLICY = PolicyRegistry.load().get("icm-assistant")

# sha256 of the packaged prompt; any edit to it must be deliberate (and bump the version).
ICM_PROMPT_SHA256 = "5a352b0d171c2a5ce8f52856f7a9616f157fded8f76dc51b4b82c1616b9b8d7a"

# "data/ICM-Instruct_data_generation_pipeline/rule definition and image collection/
# rule_definition.csv" at c1a48fb6: sha256 of the file, and its rows after the header.
RULE_DEFINITION_SHA256 = "b33f2c97a5b1c30fc7ce080f502d7e5a1ad3586fedaa5ff7eb335dc8dd1b9452"
RULE_DEFINITION_HEADER = ("Attribute combination", "Explicit description")
RULE_DEFINITION_ROWS = (
    (
        "upper shoulders",
        "It is known that if a person is wearing a strapless or midriff-baring outfit, it "
        "often gives people a sexy feel.",
    ),
    (
        "upper body",
        "It is known that the person in the image has a large area of his/her upper body exposed.",
    ),
    (
        "upper back",
        "It is known that the person in the image has his/her back bare, which often "
        "gives people a sexy feel.",
    ),
    (
        "upper chest",
        "It is known that the image is a close-up of a person\u2019s upper body, showing "
        "his/her cleavage.",
    ),
    (
        "upper normal",
        "It is known that the exposure level of this image is very low and it is an "
        "appropriate image.",
    ),
    (
        "middle legs",
        "It is known that if a person\u2019s clothes almost expose his/her thighs, it often "
        "gives people a sexy feel.",
    ),
    ("middle belly", "It is known that the person in the image has his/her belly exposed."),
    ("middle hips", "It is known that the image is a close-up of the buttocks."),
    (
        "middle body",
        "It is known that the image is a close-up of the crotch, and the person is only "
        "wearing underwear.",
    ),
    (
        "middle normal",
        "It is known that the exposure level of this image is very low and it is an "
        "appropriate image.",
    ),
    (
        "lower legs",
        "It is known that the person in the image is naked from his/her thighs to his/her ankles.",
    ),
    ("lower belly", "It is known that the person in the image has his/her belly exposed."),
    (
        "lower hips",
        "It is known that the person in the photo deliberately shows his/her buttocks, an "
        "action that often gives people a sexy feel.",
    ),
    (
        "lower body",
        "It is known that the person in the image has a large area of his/her lower body exposed.",
    ),
    (
        "lower normal",
        "It is known that the exposure level of the human in this image is very low and "
        "it is an appropriate image.",
    ),
    (
        "whole legs",
        "It is known that if a person\u2019s clothes almost expose her thighs, it often gives "
        "people a sexy feel.",
    ),
    (
        "whole back",
        "It is known that the person in the image has her back bare, which often gives "
        "people a sexy feel.",
    ),
    ("whole belly", "It is known that the person in the image has his/her belly exposed."),
    (
        "whole body",
        "It is known that the person in the image has a large area of his/her body exposed.",
    ),
    (
        "whole normal",
        "It is known that the exposure level of this image is very low and it is an "
        "appropriate image.",
    ),
    ("kiss", "It is known that the people in the image are kissing."),
    (
        "takeoff stockings",
        "It is known that the person in the image is putting on stockings, which often "
        "gives people a sexy feel.",
    ),
    (
        "liftup skirts",
        "It is known that the woman in the image is lifting her dress, which often gives "
        "people a sexy feel.",
    ),
    (
        "takeoff shirts",
        "It is known that the person in the image is taking off their clothes, which "
        "often gives people a sexy feel.",
    ),
    (
        "showing tongue",
        "It is known that the woman in the image is sticking out her tongue, which often "
        "gives people a sexy feel.",
    ),
    (
        "pout",
        "It is known that the person in the image is posing as if kissing, which often "
        "gives people a sexy feel.",
    ),
    (
        "wet body",
        "It is known that the person\u2019s clothes are soaked, which often gives people a "
        "sexy feel.",
    ),
    (
        "wear bras",
        "It is known that the woman in the image is putting on bras, which often gives "
        "people a sexy feel.",
    ),
    (
        "bite lips",
        "It is known that the person in the image is biting her lip, which often gives "
        "people a sexy feel.",
    ),
    (
        "bite figer",
        "It is known that if a person puts her finger inside her mouth, it often gives "
        "people a sexy feel.",
    ),
    (
        "liftup shirts",
        "It is known that the person in the image is lifting their clothes, which often "
        "gives people a sexy feel.",
    ),
    (
        "sexy text",
        "It is known that there are texts with teasing or sexually suggestive meanings in "
        "the image.",
    ),
    (
        "sexy patterns",
        "It is known that there are sexually suggestive patterns or similar objects in the image",
    ),
)

# eval/eval_sexy_accuracy/eval_data_generation/LLaVA/ at b0ab3025: sexy_level_bylist.py asks
# "%s Answer yes or no." with question="Is the picture sexy?" (inference_sexy_level_bylist.sh).
LLAVA_QUESTION = "Is the picture sexy? Answer yes or no."


def _rule_definition_bytes() -> bytes:
    """The CSV file as the repository holds it: BOM, CRLF, minimal quoting, no final newline."""

    def field(value: str) -> str:
        return f'"{value}"' if "," in value else value

    rows = (RULE_DEFINITION_HEADER, *RULE_DEFINITION_ROWS)
    return ("\ufeff" + "\r\n".join(f"{field(a)},{field(d)}" for a, d in rows)).encode("utf-8")


def _as_rule(description: str) -> str:
    """An explicit description as a rule: "It is known that x" -> "X"."""
    text = description.removeprefix("It is known that ")
    return text[0].upper() + text[1:]


def _category(code: str) -> Category:
    category = next((c for c in POLICY.categories if c.code == code), None)
    assert category is not None
    return category


def _unsafe(code: str, rationale: str) -> Assessment:
    return Assessment("Unsafe", _category(code), rationale, None)


def _safe(rationale: str) -> Assessment:
    return Assessment("Safe", POLICY.safe_category, rationale, None)


# --- The packaged policy -------------------------------------------------------------------------


def test_the_copy_of_the_rule_definition_is_the_source_file_byte_for_byte() -> None:
    digest = hashlib.sha256(_rule_definition_bytes()).hexdigest()

    assert digest == RULE_DEFINITION_SHA256


def test_prompt_is_the_rule_definition_and_the_llava_question_as_documented() -> None:
    unsafe = [(a, d) for a, d in RULE_DEFINITION_ROWS if not a.endswith(" normal")]
    normal = {_as_rule(d) for a, d in RULE_DEFINITION_ROWS if a.endswith(" normal")}
    renamed = {"bite figer": "bite finger"}  # the one correction the policy file documents
    appropriate = "The exposure level of this image is very low and it is an appropriate image."
    expected = [
        "Rules: the picture is sexy if it matches one of these rules.",
        *(
            f"R{n:02d}: {renamed.get(a, a)}: {_as_rule(d)}"
            for n, (a, d) in enumerate(unsafe, start=1)
        ),
        "The picture is not sexy if it matches this rule instead:",
        f"NA: normal: {appropriate}",
        f"{LLAVA_QUESTION} Then explain why, naming the code of the rule the picture matches.",
    ]

    assert len(unsafe) == 29
    assert appropriate in normal  # three of the four "* normal" rows say exactly this
    assert POLICY.prompt == "\n".join(expected)


def test_packaged_prompt_is_pinned() -> None:
    digest = hashlib.sha256(POLICY.prompt.encode("utf-8")).hexdigest()

    assert digest == ICM_PROMPT_SHA256
    assert POLICY.render_prompt() == POLICY.prompt


def test_packaged_policy_reads_yes_as_unsafe_with_the_icm_rules_as_categories() -> None:
    rules = [f"R{n:02d}" for n in range(1, 30)]

    assert (POLICY.id, POLICY.version, POLICY.answer_format) == (
        "icm-assistant",
        "1.0.1",
        "icm-yes-no",
    )
    assert [c.code for c in POLICY.categories] == ["R00", *rules, "NA"]
    assert POLICY.safe_category == Category("NA", "NA: normal")
    assert POLICY.yes_no is not None
    assert POLICY.yes_no.unsafe_answer == "Yes"
    assert POLICY.yes_no.default_category == Category("R00", "R00: sexy, no rule named")
    assert [c.code for c in POLICY.yes_no.rules] == rules


def test_each_rule_category_is_a_rule_line_of_the_prompt_and_the_default_is_not() -> None:
    assert POLICY.yes_no is not None
    lines = POLICY.prompt.splitlines()
    for category in (*POLICY.yes_no.rules, POLICY.safe_category):
        assert sum(line.startswith(f"{category.label}: ") for line in lines) == 1
    assert "R00" not in POLICY.prompt


# --- Reading answers -----------------------------------------------------------------------------

BITE = "The woman is biting her lip (R25: bite lips), which gives the picture a sexy feel."


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("Yes", _unsafe("R00", ""), id="bare-yes"),
        pytest.param("No", _safe(""), id="bare-no"),
        pytest.param("Yes.", _unsafe("R00", ""), id="yes-period"),
        pytest.param("No.\n", _safe(""), id="no-period-newline"),
        pytest.param(f"Yes. {BITE}", _unsafe("R25", BITE), id="yes-then-explanation"),
        pytest.param(f"yes, {BITE}", _unsafe("R25", BITE), id="lower-case-comma"),
        pytest.param(f"YES! {BITE}", _unsafe("R25", BITE), id="upper-case"),
        pytest.param(f"  \n Yes.\n\n{BITE}\n", _unsafe("R25", BITE), id="leading-whitespace"),
        pytest.param(f"**Yes**, {BITE}", _unsafe("R25", BITE), id="markdown-bold"),
        pytest.param(f"__Yes.__ {BITE}", _unsafe("R25", BITE), id="markdown-underscores"),
        pytest.param(f"> Yes: {BITE}", _unsafe("R25", BITE), id="quote-and-colon"),
        pytest.param(f"- Yes - {BITE}", _unsafe("R25", BITE), id="list-item-and-dash"),
        pytest.param(f"```\nYes. {BITE}\n```", _unsafe("R25", BITE), id="code-fence"),
        pytest.param(f'"Yes", {BITE}', _unsafe("R25", BITE), id="quoted"),
        pytest.param(f"\ufeffYes\u2014{BITE}", _unsafe("R25", BITE), id="bom-and-em-dash"),
        pytest.param(
            "No, but it is close: the dress is short.",
            _safe("but it is close: the dress is short."),
            id="no-but",
        ),
        pytest.param(
            "No. The picture does not match R25 (bite lips); it is normal.",
            _safe("The picture does not match R25 (bite lips); it is normal."),
            id="no-naming-a-rule-is-still-safe",
        ),
        pytest.param(
            "Yes. The picture is sexy: it shows the couple in a passionate embrace.",
            _unsafe("R00", "The picture is sexy: it shows the couple in a passionate embrace."),
            id="yes-naming-no-rule-gets-the-default",
        ),
        pytest.param(
            "No. The picture is sexy because the woman bites her lip. R25",
            _safe("The picture is sexy because the woman bites her lip. R25"),
            id="contradiction-kept-as-said",
        ),
        pytest.param(
            "Yes\u3002\u5979\u54ac\u5634\u5507\u3002",
            _unsafe("R00", "\u5979\u54ac\u5634\u5507\u3002"),
            id="cjk-explanation",
        ),
    ],
)
def test_parse_yes_no_answer(text: str, expected: Assessment) -> None:
    assert parse_answer(text, POLICY) == expected


@pytest.mark.parametrize(
    ("explanation", "code"),
    [
        pytest.param("R25", "R25", id="code"),
        pytest.param("rule r25 applies", "R25", id="code-any-case"),
        pytest.param("(R17) the people kiss", "R17", id="code-in-parentheses"),
        pytest.param("R25: bite lips", "R25", id="full-label"),
        pytest.param("she is biting her lip: bite lips", "R25", id="name"),
        pytest.param("BITE-LIPS", "R25", id="name-with-hyphen"),
        pytest.param("bite_lips", "R25", id="name-with-underscore"),
        pytest.param("bite\n  lips", "R25", id="name-across-lines"),
        pytest.param("Bite finger, not bite figer", "R26", id="corrected-name"),
        pytest.param("a kiss", "R17", id="one-word-name"),
        pytest.param("her upper body is bare (R04)", "R04", id="code-beats-earlier-name"),
        pytest.param("R04, or maybe R02", "R04", id="first-code-wins"),
        pytest.param("kiss, then a pout", "R17", id="first-name-wins"),
        pytest.param("the whole body, the whole back", "R16", id="first-of-similar-names"),
        pytest.param("the people are kissing", "R00", id="name-inside-a-word"),
        pytest.param("R250 and XR25 and R25x", "R00", id="code-inside-a-word"),
        pytest.param("R00 or R30 or NA", "R00", id="not-a-rule-code"),
        pytest.param("it is normal and sexy", "R00", id="safe-and-default-names-are-not-rules"),
        pytest.param("bitelips", "R00", id="name-without-space"),
    ],
)
def test_an_unsafe_answer_gets_the_rule_its_explanation_names(explanation: str, code: str) -> None:
    assessment = parse_answer(f"Yes. {explanation}", POLICY)

    assert (assessment.rating, assessment.category.code) == ("Unsafe", code)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("", "answer is empty", id="empty"),
        pytest.param(" \n\t", "answer is empty", id="blank"),
        pytest.param("...!?", "answer has no Yes or No", id="punctuation-only"),
        pytest.param("Yesterday I saw", "answer starts with 'Yesterday', not with Yes or No"),
        pytest.param("Nope.", "answer starts with 'Nope.', not with Yes or No", id="nope"),
        pytest.param("Not sure.", "answer starts with 'Not', not with Yes or No", id="not-sure"),
        pytest.param("Nonetheless", "answer starts with 'Nonetheless', not with Yes or No"),
        pytest.param("No-one is there", "answer starts with 'No-one', not with Yes or No"),
        pytest.param("Yes-man", "answer starts with 'Yes-man', not with Yes or No"),
        pytest.param("No's", 'answer starts with "No\'s", not with Yes or No', id="no-s"),
        pytest.param("Yes/No: R25", "answer starts with 'Yes/No:', not with Yes or No"),
        pytest.param("Yes or no?", "answer says both Yes and No", id="yes-or-no"),
        pytest.param("No, or yes.", "answer says both Yes and No", id="no-or-yes"),
        pytest.param("YES AND NO", "answer says both Yes and No", id="yes-and-no"),
        pytest.param("yes / no", "answer says both Yes and No", id="spaced-slash"),
        pytest.param("Y", "answer starts with 'Y', not with Yes or No", id="initial-only"),
        pytest.param("Yes1", "answer starts with 'Yes1', not with Yes or No", id="digit"),
        pytest.param(
            "The picture is sexy. Yes.",
            "answer starts with 'The', not with Yes or No",
            id="yes-not-first",
        ),
        pytest.param("Answer: Yes", "answer starts with 'Answer:', not with Yes or No"),
        pytest.param(
            "\uff39\uff45\uff53",
            "answer starts with '\uff39\uff45\uff53', not with Yes or No",
            id="fullwidth",
        ),
        pytest.param("Ye\u017f", "answer starts with 'Ye\u017f', not with Yes or No", id="long-s"),
        pytest.param(
            '{"rating": "Unsafe", "category": "R25"}',
            "answer starts with 'rating\":', not with Yes or No",
            id="llavaguard-json",
        ),
    ],
)
def test_parse_yes_no_answer_rejects_with_reason(text: str, message: str) -> None:
    with pytest.raises(UnparseableModelOutput) as raised:
        parse_answer(text, POLICY)

    assert raised.value.message == message
    assert raised.value.model_output == text


def test_an_answer_of_exactly_64_kib_is_read_and_a_longer_one_refused_unread() -> None:
    text = "Yes. " + "\u00e9" * ((MAX_ANSWER_BYTES - 5) // 2)  # two bytes each in UTF-8
    assert len(text.encode()) == MAX_ANSWER_BYTES - 1

    assert parse_answer(text + "x", POLICY).rating == "Unsafe"
    with pytest.raises(UnparseableModelOutput, match="longer than 65536 bytes; not read"):
        parse_answer(text + "xx", POLICY)


@pytest.mark.parametrize(
    "text",
    [
        "." * MAX_ANSWER_BYTES,
        "Yes" + "/" * (MAX_ANSWER_BYTES - 3),
        "Yes " + "r2" * ((MAX_ANSWER_BYTES - 4) // 2),
        "Yes " + "bite " * ((MAX_ANSWER_BYTES - 4) // 5),
        "Y" * MAX_ANSWER_BYTES,
        "Yes" + " " * (MAX_ANSWER_BYTES - 4) + "x",
    ],
    ids=["punctuation", "slashes", "code-prefixes", "name-prefixes", "one-word", "spaces"],
)
def test_reading_stays_fast_on_pathological_answers(text: str) -> None:
    with contextlib.suppress(UnparseableModelOutput):
        parse_answer(text, POLICY)  # a quadratic scan of 64 KiB would take minutes


def test_lone_surrogates_are_kept_in_the_rationale() -> None:
    assert parse_answer("No. A \ud800 broken", POLICY).rationale == "A \ud800 broken"


# --- Other yes/no policies -----------------------------------------------------------------------

APPROPRIATE = """\
id = "appropriate"
version = "1.0.0"
answer_format = "icm-yes-no"
safe_category = "OK"
unsafe_answer = "No"
default_unsafe_category = "X"
prompt = '''Is the picture appropriate? Answer yes or no.'''

[[categories]]
code = "OK"
label = "OK: appropriate"

[[categories]]
code = "X"
label = "X: inappropriate"

[[categories]]
code = "K"
label = "K: kiss"
"""


def _load(tmp_path: Path, text: str) -> Policy:
    (tmp_path / "policy.toml").write_text(text, encoding="utf-8")
    return PolicyRegistry.load(tmp_path).get("appropriate")


def test_a_policy_can_make_no_the_unsafe_answer(tmp_path: Path) -> None:
    policy = _load(tmp_path, APPROPRIATE)

    assert parse_answer("Yes, a landscape.", policy) == Assessment(
        "Safe", Category("OK", "OK: appropriate"), "a landscape.", None
    )
    assert parse_answer("No: a kiss.", policy).category == Category("K", "K: kiss")
    assert parse_answer("NO.", policy).category == Category("X", "X: inappropriate")


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        pytest.param(
            ('unsafe_answer = "No"\n', ""),
            "unsafe_answer must be a non-empty string",
            id="no-answer",
        ),
        pytest.param(
            ('unsafe_answer = "No"', 'unsafe_answer = "no"'),
            "unsafe_answer 'no' is neither 'Yes' nor 'No'",
            id="answer-lower-case",
        ),
        pytest.param(
            ('default_unsafe_category = "X"\n', ""),
            "default_unsafe_category must be a non-empty string",
            id="no-default",
        ),
        pytest.param(
            ('default_unsafe_category = "X"', 'default_unsafe_category = "Y"'),
            "default_unsafe_category 'Y' is not the code of any category",
            id="default-unknown",
        ),
        pytest.param(
            ('default_unsafe_category = "X"', 'default_unsafe_category = "OK"'),
            "default_unsafe_category 'OK' is the safe category",
            id="default-is-safe",
        ),
        pytest.param(
            ('label = "K: kiss"', 'label = "K: x"'),
            "category name 'x' would match both X and K",
            id="rule-name-is-another-code",
        ),
        pytest.param(
            (
                'label = "K: kiss"',
                'label = "K: bite-lips"\n[[categories]]\ncode = "L"\nlabel = "L: bite lips"',
            ),
            "rule name 'bite lips' would match both K and L",
            id="rule-names-equal-once-hyphens-are-spaces",
        ),
        pytest.param(
            ('answer_format = "icm-yes-no"', 'answer_format = "llavaguard-json"'),
            "default_unsafe_category, unsafe_answer: only for answer_format 'icm-yes-no'",
            id="yes-no-keys-in-a-json-policy",
        ),
    ],
)
def test_invalid_yes_no_policy_fails_load(
    tmp_path: Path, change: tuple[str, str], problem: str
) -> None:
    text = APPROPRIATE.replace(*change)
    assert text != APPROPRIATE

    with pytest.raises(ValueError, match=re.escape(problem)):
        _load(tmp_path, text)


def test_a_policy_object_pairs_the_yes_no_format_with_its_answers() -> None:
    safe = Category("NA", "NA: normal")
    answers = YesNoAnswers("Yes", Category("S", "S: sexy"), rules=())

    with pytest.raises(ValueError, match="yes_no is required"):
        Policy("p", "1", "q", (safe,), safe, answer_format="icm-yes-no")
    with pytest.raises(ValueError, match="yes_no is required"):
        Policy("p", "1", "q", (safe,), safe, yes_no=answers)
    with pytest.raises(ValueError, match="not one of"):
        Policy("p", "1", "q", (safe,), safe, answer_format="plain")
    with pytest.raises(ValueError, match="neither 'Yes' nor 'No'"):
        YesNoAnswers("Oui", Category("S", "S: sexy"), rules=())


# --- Into the verdict ----------------------------------------------------------------------------


async def test_an_icm_answer_becomes_a_verdict_with_the_rule_and_the_yes_token_confidence() -> None:
    guard = ScriptedGuard(f"Yes. {BITE}", rating_log_prob=math.log(0.93))

    outcome = await judge(guard, event_record(policy_id="icm-assistant"))

    assert isinstance(outcome, Verdict)
    assert guard.calls[0][0] == POLICY.prompt
    assert (outcome.rating, outcome.category, outcome.category_code) == (
        "Unsafe",
        "R25: bite lips",
        "R25",
    )
    assert outcome.rationale == BITE
    assert outcome.confidence == pytest.approx(0.93)
    assert (outcome.policy_id, outcome.policy_version) == ("icm-assistant", POLICY.full_version)


async def test_a_no_answer_becomes_a_safe_verdict_with_the_normal_category() -> None:
    outcome = await judge(ScriptedGuard("No."), event_record(policy_id="icm-assistant"))

    assert isinstance(outcome, Verdict)
    assert (outcome.rating, outcome.category_code, outcome.confidence) == ("Safe", "NA", None)


async def test_an_answer_without_yes_or_no_is_dead_lettered_with_the_output() -> None:
    outcome = await judge(ScriptedGuard("Nope."), event_record(policy_id="icm-assistant"))

    assert isinstance(outcome, DeadLetter)
    assert outcome.error.code == "unparseable_model_output"
    assert outcome.error.model_output == "Nope."


# --- Properties ----------------------------------------------------------------------------------

_LEADS = ["", " ", "\n\n", "**", "> ", "```\n", "- ", "\ufeff", '"']
_SEPARATORS = [".", ",", "!", ":", " -", "**,", ".\n\n", " ", "\u2014", "\u3002 "]
_CASINGS: list[Callable[[str], str]] = [str, str.lower, str.upper]
# No backticks (a trailing fence is trimmed) and no leading space (the rationale is trimmed).
_EXPLANATION = st.text(alphabet=st.characters(exclude_characters="`"), max_size=60).map(
    lambda tail: f"The picture {tail}".rstrip()
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(_LEADS),
    st.sampled_from(["Yes", "No"]),
    st.sampled_from(_CASINGS),
    st.sampled_from(_SEPARATORS),
    _EXPLANATION,
)
def test_any_well_formed_answer_reads_back(
    lead: str, word: str, casing: Callable[[str], str], separator: str, explanation: str
) -> None:
    assessment = parse_answer(f"{lead}{casing(word)}{separator}{explanation}", POLICY)

    assert assessment.rating == ("Unsafe" if word == "Yes" else "Safe")
    assert assessment.rationale == explanation
    assert (assessment.category == POLICY.safe_category) == (word == "No")


_FRAGMENTS = [
    *" \n\t.,:;!?*_-/'\"`()>\u2014\u2019\ufeff",
    *("Yes", "yes", "YES", "No", "no", "NO", "Yesterday", "Nope", "Not", "or", "and", "```"),
    *("R25", "r04", "R250", "bite lips", "bite-lips", "kiss", "kissing", "normal", "NA"),
    *("\u017f", "\uff39", "\ud800", "\u0130", "\u212a"),
]


def _arbitrary_text() -> st.SearchStrategy[str]:
    return (
        st.text()
        | st.binary().map(lambda raw: raw.decode("utf-8", errors="replace"))
        | st.lists(st.sampled_from(_FRAGMENTS), max_size=30).map("".join)
    )


@settings(max_examples=600, deadline=None)
@given(_arbitrary_text())
def test_parse_raises_nothing_but_unparseable_model_output(text: str) -> None:
    with contextlib.suppress(UnparseableModelOutput):
        parse_answer(text, POLICY)


@settings(max_examples=600, deadline=None)
@given(_arbitrary_text())
def test_a_parsed_verdict_is_the_first_word_of_the_output(text: str) -> None:
    try:
        assessment = parse_answer(text, POLICY)
    except UnparseableModelOutput:
        return

    first_word = re.findall(r"[^\W_]+", text)[0]
    assert first_word.lower() == ("yes" if assessment.rating == "Unsafe" else "no")
    assert assessment.rationale in text
    if assessment.category not in (POLICY.safe_category, _category("R00")):
        named = assessment.category
        spelled = re.sub(r"[\s_\-\u2010\u2011]+", " ", assessment.rationale.lower())
        assert named.code.lower() in spelled or named.label.split(": ")[1] in spelled
