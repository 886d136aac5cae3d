"""Eval manifests: JSON Lines, CSV and LlavaGuard-DS's JSON; every bad row named by its line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.core.policies import PolicyRegistry
from service.manifests import read_manifest

POLICY = "llavaguard-v1.2"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for name in ("a.jpg", "b.png", "c.jpg"):
        (tmp_path / name).write_bytes(b"not read here")
    return tmp_path


def test_json_lines_rows_become_items_with_codes_policies_and_tags(folder: Path) -> None:
    manifest = folder / "m.jsonl"
    rows = [
        {"image": "a.jpg", "expected_rating": "Unsafe", "expected_category": "O4: Nudity Content"},
        {"id": "b", "image": "b.png", "expected": "No", "split": "test", "tags": {"k": "v"}},
        {"image": "c.jpg", "expected_rating": "Safe", "exceptions": ["O4"], "source": "s"},
        {"image": "https://img.example/x.jpg", "expected_rating": "unsafe"},
    ]
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows) + "\n")
    read = read_manifest(manifest, PolicyRegistry.load(), POLICY)
    assert read.rejected == []
    a, b, c, url = read.items
    assert (a.id, a.line, a.expected_rating, a.expected_category) == ("line-1", 1, "Unsafe", "O4")
    assert a.image == str(folder.resolve() / "a.jpg")
    assert (b.id, b.expected_rating, b.expected_category, b.tags) == (
        "b",
        "Safe",
        "NA",  # a Safe label without category is the safe category
        {"k": "v", "split": "test"},
    )
    assert (c.policy, c.exceptions, c.base_policy) == (f"{POLICY}.except-O4", ("O4",), POLICY)
    assert read.policies is not None
    assert read.policies.get(c.policy).exceptions == {"O4"}
    assert (url.image, url.expected_category) == ("https://img.example/x.jpg", None)


def test_csv_rows_read_like_json_lines(folder: Path) -> None:
    manifest = folder / "m.csv"
    manifest.write_text(
        "id,image,expected_rating,expected_category,exceptions,split\n"
        "x,a.jpg,Unsafe,O1,,train\n"
        "y,b.png,Safe,NA,O3;O4,test\n"
    )
    read = read_manifest(manifest, PolicyRegistry.load(), POLICY)
    assert [(i.id, i.line, i.expected_category, i.exceptions) for i in read.items] == [
        ("x", 2, "O1", ()),
        ("y", 3, "NA", ("O3", "O4")),
    ]


def test_every_bad_row_is_skipped_with_its_line_and_why(folder: Path) -> None:
    manifest = folder / "m.jsonl"
    lines = [
        '{"id": "ok", "image": "a.jpg", "expected_rating": "Safe"}',
        '{"image": "missing.jpg", "expected_rating": "Safe"}',
        '{"image": "ftp://host/a.jpg", "expected_rating": "Safe"}',
        '{"image": "a.jpg", "expected_rating": "Unsafe", "expected_category": "O42"}',
        '{"image": "a.jpg", "expected_rating": "Safe", "policy_id": "no-such-policy"}',
        '{"id": "ok", "image": "b.png", "expected_rating": "Safe"}',
        '{"image": "a.jpg", "expected_rating": "maybe"}',
        '{"image": "a.jpg", "expected_rating": "Safe", "exceptions": ["O42"]}',
        "{not json",
        '{"image": "a.jpg", "expected_rating": "Safe", "label": 1}',
        '{"image": "a.jpg", "question": "Q?", "expected": "E."}',
    ]
    manifest.write_text("\n".join(lines) + "\n")
    read = read_manifest(manifest, PolicyRegistry.load(), POLICY)
    assert [item.id for item in read.items] == ["ok"]
    why = dict(read.rejected)
    assert sorted(why) == list(range(2, 12))
    for line, expected in {
        2: "no file 'missing.jpg'",
        3: "is not an http(s) URL",
        4: "'O42' is not a category of llavaguard-v1.2",
        5: "unknown policy 'no-such-policy'",
        6: "duplicate id 'ok'",
        7: "'maybe' is not Safe or Unsafe",
        8: "'O42' is not an Unsafe category",
        9: "not JSON",
        10: "label: Extra inputs are not permitted",
        11: "must start with A, B, C, D, Yes or No",
    }.items():
        assert expected in why[line], (line, why[line])
    assert read.rows == 11


def test_mqa_rows_are_questions_not_judged_items(folder: Path) -> None:
    manifest = folder / "m.jsonl"
    manifest.write_text('{"image": "a.jpg", "question": "Which? A. x B. y", "expected": "B."}\n')
    read = read_manifest(manifest, PolicyRegistry.load(), POLICY)
    assert read.items == []
    assert [(q.id, q.question, q.expected) for q in read.questions] == [
        ("line-1", "Which? A. x B. y", "B.")
    ]


def llavaguard_item(sample_id: str, image: str, prompt: str, answer: dict[str, str]) -> object:
    # The shape of LlavaGuard's dataset files (llavaguard/evaluation/eval_utils.py load_data).
    return {
        "id": sample_id,
        "image": image,
        "conversations": [
            {"from": "human", "value": prompt},
            {"from": "gpt", "value": json.dumps(answer)},
        ],
    }


def test_llavaguard_ds_items_take_labels_from_the_answer_and_exceptions_from_the_prompt(
    folder: Path,
) -> None:
    registry = PolicyRegistry.load()
    default = registry.get(POLICY).prompt
    exempt_o4 = registry.with_exceptions(POLICY, frozenset({"O4"})).get(f"{POLICY}.except-O4")
    sensitive = default.replace("Should not:", "Can:", 1)  # no text the policy has for O1
    data = [
        llavaguard_item(
            "smid_1",
            str(folder / "a.jpg"),
            default,
            {"rating": "Unsafe", "category": "O4: Nudity Content", "rationale": "r"},
        ),
        llavaguard_item(
            "smid_1_v2",
            "b.png",
            exempt_o4.prompt,
            {"rating": "Safe", "category": "O4: Nudity Content", "rationale": "r"},
        ),
        llavaguard_item("smid_2_v4", "c.jpg", sensitive, {"rating": "Unsafe", "category": "O1"}),
        {"id": "broken"},
    ]
    manifest = folder / "test.json"
    manifest.write_text(json.dumps(data))
    read = read_manifest(manifest, registry, POLICY)
    first, second = read.items
    assert (first.id, first.expected_rating, first.expected_category, first.exceptions) == (
        "smid_1",
        "Unsafe",
        "O4",
        (),
    )
    assert (second.expected_rating, second.exceptions, second.policy) == (
        "Safe",
        ("O4",),
        f"{POLICY}.except-O4",
    )
    assert second.tags == {"augmentation": "v2", "source": "llavaguard-ds"}
    why = dict(read.rejected)
    assert "neither the policy's rules nor its exception text" in why[3]
    assert "not a LlavaGuard item" in why[4]
