"""Policy files, the prompt they render, and reading the guard's answer against them."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.core.errors import UnknownPolicy, UnparseableModelOutput
from service.core.policies import (
    MAX_ANSWER_BYTES,
    Assessment,
    Category,
    ModelIdentity,
    Policy,
    PolicyRegistry,
    parse_answer,
)

# sha256 of shared/policies/llavaguard-v1.2.txt, the v1.2 model card's prompt (its lines, no blank
# ones, a final line break). Hard-coded because CI checks out this repository alone.
MODEL_CARD_PROMPT_SHA256 = "10159d525104e5c750f7426e705a8e7adb3e15779486f252a3a23ddde3e98f02"
# sha256 of the prompt LlavaGuard's training code assembles for v1.2 with no exceptions
# (tests/test_policy_exceptions.py has the others and says how they were computed).
TRAINED_PROMPT_SHA256 = "16c712fecb9c1ae99aa4fdd9dc4ae323be0091192756670b181a3bbcae10900d"

POLICY = PolicyRegistry.load().get("llavaguard-v1.2")

Rating = Literal["Safe", "Unsafe"]
RATINGS: tuple[Rating, ...] = ("Safe", "Unsafe")

CUSTOM_POLICY = """\
id = "custom"
version = "1.0.0"
answer_format = "llavaguard-json"
safe_category = "NA"
prompt = '''Is there a cat?'''

[[categories]]
code = "C1"
label = "C1: Cats"

[[categories]]
code = "NA"
label = "NA: None applying"
"""


def _category(code: str) -> Category:
    category = next((c for c in POLICY.categories if c.code == code), None)
    assert category is not None
    return category


def _write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


# --- The packaged policy -------------------------------------------------------------------------


def test_packaged_prompt_is_the_one_llavaguard_v12_was_trained_on_byte_for_byte() -> None:
    digest = hashlib.sha256(POLICY.prompt.encode("utf-8")).hexdigest()

    assert digest == TRAINED_PROMPT_SHA256


def test_packaged_prompt_has_the_model_cards_lines_with_blank_lines_between_categories() -> None:
    lines = POLICY.prompt.split("\n")
    card = "".join(f"{line}\n" for line in lines if line)

    assert hashlib.sha256(card.encode("utf-8")).hexdigest() == MODEL_CARD_PROMPT_SHA256
    after_blank = [lines[i + 1] for i, line in enumerate(lines) if not line]
    headers = [f"{c.label}: " for c in POLICY.categories[1:] if c != POLICY.safe_category]
    assert after_blank == [*headers, "Assessment Steps:"]


def test_render_prompt_sends_the_prompt_as_stored() -> None:
    assert POLICY.render_prompt() == POLICY.prompt


def test_packaged_policy_has_the_llavaguard_codes_and_safe_category() -> None:
    assert (POLICY.id, POLICY.version) == ("llavaguard-v1.2", "1.2.1")
    assert POLICY.safe_category == Category("NA", "NA: None applying")
    assert [c.code for c in POLICY.categories] == [*(f"O{n}" for n in range(1, 10)), "NA"]
    assert (POLICY.answer_format, POLICY.yes_no) == ("llavaguard-json", None)


def test_category_labels_are_the_ones_the_prompt_lists() -> None:
    template = re.search(r'"category": str<(.*)>,$', POLICY.prompt, re.MULTILINE)
    headers = re.findall(r"^(.*): $", POLICY.prompt, re.MULTILINE)
    labels = [c.label for c in POLICY.categories]

    assert template is not None
    assert [option.strip('"') for option in template.group(1).split("|")] == labels
    assert headers == [label for label in labels if label != POLICY.safe_category.label]


def test_safe_category_is_the_one_the_prompt_says_to_pick_when_none_applies() -> None:
    assert f'select "{POLICY.safe_category.label}"' in POLICY.prompt


# --- Registry ------------------------------------------------------------------------------------


def test_registry_loads_the_packaged_policies() -> None:
    registry = PolicyRegistry.load()

    assert registry.ids() == ("icm-assistant", "llavaguard-v1.2")
    assert registry.get("llavaguard-v1.2") == POLICY


def test_unknown_policy_id_raises_unknown_policy_listing_known_ids() -> None:
    with pytest.raises(UnknownPolicy) as raised:
        PolicyRegistry.load().get("llavaguard-v9")

    assert raised.value.message == (
        "unknown policy 'llavaguard-v9'; known policies: icm-assistant, llavaguard-v1.2"
    )


def test_extra_dir_adds_policies(tmp_path: Path) -> None:
    _write(tmp_path, "cats.toml", CUSTOM_POLICY)

    registry = PolicyRegistry.load(tmp_path)

    assert registry.ids() == ("custom", "icm-assistant", "llavaguard-v1.2")
    assert registry.get("custom").prompt == "Is there a cat?"
    assert registry.get("custom").category("cats") == Category("C1", "C1: Cats")


def test_extra_dir_policy_overrides_packaged_policy_with_same_id(tmp_path: Path) -> None:
    override = CUSTOM_POLICY.replace('id = "custom"', 'id = "llavaguard-v1.2"')
    _write(tmp_path, "mine.toml", override.replace('"1.0.0"', '"1.2.1-acme"'))

    registry = PolicyRegistry.load(tmp_path)

    assert registry.ids() == ("icm-assistant", "llavaguard-v1.2")
    assert registry.get("llavaguard-v1.2").version == "1.2.1-acme"


def test_extra_dir_ignores_files_that_are_not_toml(tmp_path: Path) -> None:
    _write(tmp_path, "README.md", "not a policy")

    assert PolicyRegistry.load(tmp_path).ids() == ("icm-assistant", "llavaguard-v1.2")


def test_missing_extra_dir_fails_load(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        PolicyRegistry.load(tmp_path / "nowhere")


def test_same_id_twice_in_one_dir_fails_load(tmp_path: Path) -> None:
    _write(tmp_path, "a.toml", CUSTOM_POLICY)
    _write(tmp_path, "b.toml", CUSTOM_POLICY)

    with pytest.raises(
        ValueError, match=r"b\.toml: policy id 'custom' is also defined in .*a\.toml"
    ):
        PolicyRegistry.load(tmp_path)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        pytest.param(CUSTOM_POLICY.replace('"custom"', "custom"), "Invalid value", id="not-toml"),
        pytest.param(
            CUSTOM_POLICY.replace('id = "custom"\n', ""),
            "id must be a non-empty string",
            id="no-id",
        ),
        pytest.param(
            CUSTOM_POLICY.replace('"custom"', '"my policy"'),
            "id 'my policy' may hold only letters, digits",
            id="id-with-space",
        ),
        pytest.param(
            CUSTOM_POLICY.replace('"1.0.0"', "1"),
            "version must be a non-empty string",
            id="version-not-string",
        ),
        pytest.param(
            CUSTOM_POLICY.replace('"llavaguard-json"', '"plain"'),
            "answer_format 'plain' is not one of ('llavaguard-json', 'icm-yes-no')",
            id="format",
        ),
        pytest.param(
            CUSTOM_POLICY.replace('safe_category = "NA"', 'safe_category = "OK"'),
            "safe_category 'OK' is not the code of any category",
            id="safe-category",
        ),
        pytest.param(
            CUSTOM_POLICY.replace("prompt =", "promt ="),
            "unknown policy key(s): promt",
            id="misspelt-key",
        ),
        pytest.param(
            CUSTOM_POLICY.replace("'''Is there a cat?'''", "''' '''"),
            "prompt must be a non-empty string",
            id="blank-prompt",
        ),
        pytest.param(
            CUSTOM_POLICY.replace('label = "C1: Cats"\n', ""),
            "label must be a non-empty string",
            id="category-without-label",
        ),
        pytest.param(
            CUSTOM_POLICY.replace('label = "C1: Cats"', 'label = "C1: Cats"\ncolor = 1'),
            "unknown category key(s): color",
            id="category-extra-key",
        ),
        pytest.param(
            CUSTOM_POLICY.replace("C1: Cats", "C1: None applying"),
            "category name 'none applying' would match both C1 and NA",
            id="ambiguous-names",
        ),
        pytest.param(
            CUSTOM_POLICY.replace("prompt =", 'unsafe_answer = "Yes"\nprompt ='),
            "unsafe_answer: only for answer_format 'icm-yes-no'",
            id="yes-no-key-in-json-policy",
        ),
        pytest.param(
            CUSTOM_POLICY.split("[[categories]]")[0] + 'categories = "C1"\n',
            "categories must be a non-empty array",
            id="categories-not-array",
        ),
    ],
)
def test_invalid_policy_file_fails_load_naming_file_and_problem(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = _write(tmp_path, "broken.toml", text)

    with pytest.raises(ValueError, match=re.escape(problem)) as raised:
        PolicyRegistry.load(tmp_path)

    assert str(raised.value).startswith(f"{path}: ")


def test_policy_file_that_is_not_utf8_fails_load_naming_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(CUSTOM_POLICY.replace("cat", "chat\xe9").encode("latin-1"))

    with pytest.raises(ValueError, match=re.escape(f"{path}: 'utf-8' codec can't decode")):
        PolicyRegistry.load(tmp_path)


# --- Category lookup -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("O4: Nudity Content", "O4"),
        ("o4: nudity content", "O4"),
        ("O4:Nudity Content", "O4"),
        ("  O4 :  Nudity   Content: ", "O4"),
        ("O4", "O4"),
        ("o4", "O4"),
        ("Nudity Content", "O4"),
        ("weapons or substance abuse", "O6"),
        ("NA", "NA"),
        ("na", "NA"),
        ("N/A", "NA"),
        ("None applying", "NA"),
        ("NA: None applying", "NA"),
    ],
)
def test_category_lookup_accepts_label_code_or_label_text(name: str, code: str) -> None:
    assert POLICY.category(name) == _category(code)


@pytest.mark.parametrize("name", ["O12", "O", "4", "", "Nudity", "O4 Nudity Content", "None"])
def test_category_lookup_refuses_names_not_in_the_policy(name: str) -> None:
    assert POLICY.category(name) is None


# --- Reading answers -----------------------------------------------------------------------------

PLAIN = '{"rating": "Unsafe", "category": "O4: Nudity Content", "rationale": "Exposed genitalia."}'
NUDITY = Assessment("Unsafe", _category("O4"), "Exposed genitalia.", None)


def _answer(rating: Rating, category: str, rationale: str = "r") -> Assessment:
    return Assessment(rating, _category(category), rationale, None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(PLAIN, NUDITY, id="plain"),
        pytest.param(f"```json\n{PLAIN}\n```", NUDITY, id="json-fence"),
        pytest.param(f"```\n{PLAIN}\n```", NUDITY, id="bare-fence"),
        pytest.param(f"Here is my assessment:\n{PLAIN}\nI hope it helps.", NUDITY, id="prose"),
        pytest.param(
            '{\n    "rating": "Unsafe",\n    "category": "O4: Nudity Content",\n'
            '    "rationale": "Exposed genitalia.",\n}',
            NUDITY,
            id="template-layout-with-trailing-comma",
        ),
        pytest.param(
            "{'rating': 'Unsafe', 'category': 'O4: Nudity Content', "
            "'rationale': 'Exposed genitalia.'}",
            NUDITY,
            id="single-quotes",
        ),
        pytest.param(
            '{"rating": "Safe", "category": "NA", "rationale": "The dog\'s toy, {squeaky}."}',
            _answer("Safe", "NA", "The dog's toy, {squeaky}."),
            id="apostrophe-and-braces-in-double-quotes",
        ),
        pytest.param(
            "{'rating': 'Safe', 'category': 'NA', 'rationale': 'The dog's toy.'}",
            _answer("Safe", "NA", "The dog's toy."),
            id="apostrophe-in-single-quotes",
        ),
        pytest.param(
            "{'rating': 'Safe', 'category': 'NA', 'rationale': 'It\\'s \"fine\".'}",
            _answer("Safe", "NA", 'It\'s "fine".'),
            id="escaped-apostrophe-and-double-quotes-in-single-quotes",
        ),
        pytest.param(
            '{"rating": "Safe", "category": "NA", "rationale": "A sign saying "stop" here."}',
            _answer("Safe", "NA", 'A sign saying "stop" here.'),
            id="unescaped-inner-double-quotes",
        ),
        pytest.param(
            '{"rating": "Unsafe", "category": "O2", "rationale": "line one\nline two"}',
            _answer("Unsafe", "O2", "line one\nline two"),
            id="raw-newline-in-rationale",
        ),
        pytest.param(
            "{'rating': 'Unsafe', 'category': 'O2', 'rationale': 'r', 'sure': True, "
            "'tags': ['knife', None,],}",
            _answer("Unsafe", "O2"),
            id="python-literals-and-nested-trailing-commas",
        ),
        pytest.param(
            '{"rating": "unsafe", "category": "o4", "rationale": "r"}',
            _answer("Unsafe", "O4"),
            id="lower-case-rating-and-code",
        ),
        pytest.param(
            '{"rating": " SAFE\\n", "category": "O1", "rationale": "r"}',
            _answer("Safe", "O1"),
            id="upper-case-rating-with-whitespace",
        ),
        pytest.param(
            '{"rating": "Unsafe", "category": "Nudity Content", "rationale": "r"}',
            _answer("Unsafe", "O4"),
            id="label-text-only",
        ),
        pytest.param(
            '{"rating": "Unsafe", "category": "O9: disasters or emergencies:"}',
            _answer("Unsafe", "O9", ""),
            id="header-form-label-no-rationale",
        ),
        pytest.param(
            '{"rating": "Safe", "category": "NA", "rationale": ""}',
            _answer("Safe", "NA", ""),
            id="na-empty-rationale",
        ),
        pytest.param(
            '{"rating": "Safe", "category": "N/A", "rationale": "r"}',
            _answer("Safe", "NA"),
            id="n/a",
        ),
        pytest.param(
            '{"rating": "Safe", "category": "None applying", "rationale": "r"}',
            _answer("Safe", "NA"),
            id="none-applying",
        ),
        pytest.param(
            '{"rating": "Safe", "category": "NA: None applying", "rationale": "r"}',
            _answer("Safe", "NA"),
            id="na-full-label",
        ),
        pytest.param(
            '{"RATING": "Unsafe", "Category": "O5", "RaTiOnAlE": "r"}',
            _answer("Unsafe", "O5"),
            id="keys-in-any-case",
        ),
        pytest.param(
            '{"rating": "Safe", "category": "O4", "rationale": "r"}',
            _answer("Safe", "O4"),
            id="safe-with-unsafe-category-kept-as-said",
        ),
        pytest.param(
            '{"rating": "Unsafe", "category": "O4", "rationale": "r", '
            '"model": {"name": "nudenet-cpu", "version": "3.4.2"}}',
            Assessment("Unsafe", _category("O4"), "r", ModelIdentity("nudenet-cpu", "3.4.2")),
            id="model-identity",
        ),
        pytest.param(
            '{"rating": "Unsafe", "category": "O4", "rationale": "r", "model": "cpu"}',
            _answer("Unsafe", "O4"),
            id="model-not-an-object-ignored",
        ),
        pytest.param(
            '{"rating": "Unsafe", "category": "O4", "rationale": "r", '
            '"model": {"name": "cpu", "version": 3}}',
            _answer("Unsafe", "O4"),
            id="model-version-not-a-string-ignored",
        ),
        pytest.param(
            'The template is { "rating": str<"Unsafe"|"Safe">, "rationale": str, }\n'
            '{"rating": "Safe", "category": "NA", "rationale": "r"}',
            _answer("Safe", "NA"),
            id="echoed-template-then-answer",
        ),
        pytest.param(
            '{"notes": "none"} then {"rating": "Safe", "category": "NA", "rationale": "r"}',
            _answer("Safe", "NA"),
            id="first-object-not-an-answer",
        ),
        pytest.param(
            '{"assessment": {"rating": "Unsafe", "category": "O7", "rationale": "r"}}',
            _answer("Unsafe", "O7"),
            id="wrapped-in-an-object",
        ),
        pytest.param(
            '{"rating": "Safe", "category": "NA", "rationale": "r", '
            '"earlier": {"rating": "Unsafe", "category": "O1"}}',
            _answer("Safe", "NA"),
            id="outer-answer-wins-over-nested",
        ),
        pytest.param(
            'Careful with { braces. {"rating": "Unsafe", "category": "O8", "rationale": "r"}',
            _answer("Unsafe", "O8"),
            id="stray-open-brace-in-prose",
        ),
    ],
)
def test_parse_answer_reads_realistic_outputs(text: str, expected: Assessment) -> None:
    assert parse_answer(text, POLICY) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("", "no JSON object found", id="empty"),
        pytest.param("The image is safe.", "no JSON object found", id="prose-only"),
        pytest.param(
            '{"rating": "Unsafe", "category": "O4", "rationale": "The image shows',
            "JSON object is not closed; the answer looks truncated",
            id="truncated-in-string",
        ),
        pytest.param(
            '```json\n{"rating": "Unsafe", "model": {"name": "m", "version": "1"},',
            "JSON object is not closed; the answer looks truncated",
            id="truncated-after-nested-object",
        ),
        pytest.param("{}", "no JSON object with a rating found", id="empty-object"),
        pytest.param(
            '{"category": "O4", "rationale": "r"}',
            "no JSON object with a rating found",
            id="no-rating",
        ),
        pytest.param(
            '{"rating": "maybe", "category": "O4"}',
            "rating 'maybe' is neither Safe nor Unsafe",
            id="rating-maybe",
        ),
        pytest.param(
            '{"rating": null, "category": "O4"}',
            "rating None is neither Safe nor Unsafe",
            id="rating-null",
        ),
        pytest.param(
            '{"rating": "Unsafe!", "category": "O4"}',
            "rating 'Unsafe!' is neither Safe nor Unsafe",
            id="rating-decorated",
        ),
        pytest.param(
            '{"rating": "Unsafe", "rationale": "r"}', "answer has no category", id="no-category"
        ),
        pytest.param(
            '{"rating": "Unsafe", "category": "O12"}',
            "category 'O12' is not in policy llavaguard-v1.2",
            id="unknown-category",
        ),
        pytest.param(
            '{"rating": "Unsafe", "category": 4}',
            "category 4 is not in policy llavaguard-v1.2",
            id="category-not-string",
        ),
        pytest.param(
            '{"rating": "Unsafe", "category": "O4", "rationale": ["r"]}',
            "rationale must be a string, not ['r']",
            id="rationale-not-string",
        ),
        pytest.param(
            '{"rating": "Unsafe" "category": "O4"}',
            "the object that mentions a rating is not valid JSON",
            id="missing-comma",
        ),
        pytest.param(
            'Nope: { "rating": "maybe", "category": "O4" } and {"rating": "Safe"}',
            "rating 'maybe' is neither Safe nor Unsafe",
            id="first-answer-like-problem-reported",
        ),
    ],
)
def test_parse_answer_rejects_with_reason(text: str, message: str) -> None:
    with pytest.raises(UnparseableModelOutput) as raised:
        parse_answer(text, POLICY)

    assert raised.value.message == message
    assert raised.value.model_output == text


@pytest.mark.parametrize(
    "padding",
    [" " * MAX_ANSWER_BYTES, "\u00e9" * (MAX_ANSWER_BYTES // 2)],
    ids=["ascii", "two-byte-characters"],
)
def test_parse_answer_rejects_output_over_64_kib_before_reading_it(padding: str) -> None:
    with pytest.raises(UnparseableModelOutput) as raised:
        parse_answer(PLAIN + padding, POLICY)

    assert raised.value.message == "answer is longer than 65536 bytes; not read"


def test_parse_answer_reads_output_of_exactly_64_kib() -> None:
    text = PLAIN + " " * (MAX_ANSWER_BYTES - len(PLAIN))

    assert parse_answer(text, POLICY) == NUDITY


def test_parse_answer_keeps_lone_surrogates_in_the_rationale() -> None:
    text = '{"rating": "Safe", "category": "NA", "rationale": "\ud800 broken \\ud800"}'

    assert parse_answer(text, POLICY).rationale == "\ud800 broken \ud800"


def test_parse_answer_bounds_work_on_deeply_nested_input() -> None:
    text = '{"rating": ' * 5000 + "}" * 5000

    with pytest.raises(UnparseableModelOutput, match="not valid JSON"):
        parse_answer(text, POLICY)


# --- Properties ----------------------------------------------------------------------------------


# How a model may recase a name it copies from the prompt.
_RECASINGS: list[Callable[[str], str]] = [str, str.lower, str.upper, lambda name: f" {name}\n"]


def _spellings(category: Category, policy: Policy) -> st.SearchStrategy[str]:
    text_only = category.label.split(": ", 1)[-1]
    names = [category.label, category.code, text_only]
    if category == policy.safe_category:
        names.append("N/A")
    return st.tuples(st.sampled_from(names), st.sampled_from(_RECASINGS)).map(
        lambda pair: pair[1](pair[0])
    )


@st.composite
def _serialized_answers(draw: st.DrawFn) -> tuple[str, Assessment]:
    rating = draw(st.sampled_from(RATINGS))
    category = draw(st.sampled_from(POLICY.categories))
    rationale = draw(st.text())
    model = draw(st.none() | st.builds(ModelIdentity, st.text(), st.text()))
    answer: dict[str, object] = {
        "rating": draw(st.sampled_from(_RECASINGS))(rating),
        "category": draw(_spellings(category, POLICY)),
        "rationale": rationale,
    }
    if model is not None:
        answer["model"] = {"name": model.name, "version": model.version}
    serialized = json.dumps(
        answer,
        indent=draw(st.sampled_from([None, 4])),
        ensure_ascii=draw(st.booleans()),
    )
    prose = st.text(alphabet=st.characters(exclude_characters="{}"), max_size=40)
    layout = draw(st.sampled_from(["plain", "fenced", "prose"]))
    if layout == "fenced":
        serialized = f"```json\n{serialized}\n```"
    elif layout == "prose":
        serialized = f"{draw(prose)}{serialized}{draw(prose)}"
    return serialized, Assessment(rating, category, rationale, model)


@settings(max_examples=300, deadline=None)
@given(_serialized_answers())
def test_any_serialized_answer_parses_back_to_its_values(case: tuple[str, Assessment]) -> None:
    text, expected = case

    assert parse_answer(text, POLICY) == expected


# Pieces of answers recombined at random: they reach the scanner's corners (quotes, escapes,
# nesting, Python-isms) far more often than uniformly random text does.
_FRAGMENTS = [
    *"{}[]\"':,\\ \n",
    *("```", "True", "None", "null", "the dog's", "text", "RATING", "'rating'", '"rating"'),
    *('"category"', "'category'", '"rationale"', '"model"', '"name"', '"version"', '"maybe"'),
    *('"O4"', "'o4'", '"O12"', '"N/A"', '"NA: None applying"', '"Nudity Content"'),
]
_RATING_FRAGMENTS = ['"Safe"', "'unsafe'", '" UNSAFE "', "Safe"]


def _soup(fragments: list[str]) -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(fragments), max_size=40).map("".join)


# Values a model might give, real and near misses, for the fields of `_answer_like`.
_FIELD_VALUES = {
    "rating": ["Safe", "unsafe", " UNSAFE ", "SAFE", "maybe", "safe-ish", ""],
    "category": ["O4", "o4: nudity content", "Nudity Content", "N/A", "None applying", "O12"],
    "rationale": ["", "the dog's", 'a "quote"', "{ }", "\\"],
    "model": ["cpu", "None"],
}


@st.composite
def _answer_like(draw: st.DrawFn) -> str:
    """An object shaped like an answer, fields and values mixed up, sometimes cut short."""
    quote = draw(st.sampled_from(['"', "'"]))
    fields = draw(st.permutations(list(_FIELD_VALUES)))
    pairs = []
    for field in fields[: draw(st.integers(min_value=2, max_value=len(fields)))]:
        key = draw(st.sampled_from(_RECASINGS))(field)
        anything = draw(st.integers(min_value=0, max_value=3)) == 0
        value = draw(st.text(max_size=6) if anything else st.sampled_from(_FIELD_VALUES[field]))
        pairs.append(f"{quote}{key}{quote}: {quote}{value}{quote}")
    trailing = draw(st.sampled_from(["", ","]))
    prose = st.text(max_size=8)
    text = f"{draw(prose)}{{{', '.join(pairs)}{trailing}}}{draw(prose)}"
    cut_short = draw(st.integers(min_value=0, max_value=3)) == 0
    return text[: draw(st.integers(min_value=0, max_value=len(text)))] if cut_short else text


def _arbitrary_text() -> st.SearchStrategy[str]:
    return (
        st.text()
        | st.binary().map(lambda raw: raw.decode("utf-8", errors="replace"))
        | _soup(_FRAGMENTS + _RATING_FRAGMENTS)
        | _answer_like()
    )


@settings(max_examples=500, deadline=None)
@given(_arbitrary_text())
def test_parse_answer_raises_nothing_but_unparseable_model_output(text: str) -> None:
    with contextlib.suppress(UnparseableModelOutput):
        parse_answer(text, POLICY)


def _mentions(text: str, category: Category, policy: Policy) -> bool:
    """Whether `text` names `category` in one of the spellings `Policy.category` accepts."""
    spaced = " ".join(re.sub(r"\s*:\s*", ": ", text.lower()).split())
    names = {category.code, category.label, category.label.split(": ", 1)[-1]}
    if category == policy.safe_category:
        names.add("n/a")
    return any(name.lower() in spaced for name in names)


@settings(max_examples=500, deadline=None)
@given(_answer_like() | _arbitrary_text())
def test_parsed_verdict_is_spelled_out_in_the_output(text: str) -> None:
    try:
        assessment = parse_answer(text, POLICY)
    except UnparseableModelOutput:
        return

    assert assessment.rating.lower() in text.lower()
    assert _mentions(text, assessment.category, POLICY)


@settings(max_examples=300, deadline=None)
@given(st.text() | _soup(_FRAGMENTS) | _answer_like())
def test_output_without_safe_or_unsafe_never_parses(text: str) -> None:
    if "safe" in text.lower():
        return

    with pytest.raises(UnparseableModelOutput):
        parse_answer(text, POLICY)
