"""Policy exceptions and derived policies: the prompt LlavaGuard was trained on, per exception set.

The digests below are SHA-256 of the text LlavaGuard's own code assembles, computed by running
github.com/ml-research/LlavaGuard at 840699c (templates json-v24 and json-v22 agree on each):
- no exceptions: `get_default_policy` (llavaguard/taxonomy/policy.py);
- one category: `get_augmented_policy_v2(category)` (llavaguard/taxonomy/augmentation_funct.py);
- two or three categories: `get_augmented_policy_v3("NA: None applying")`, its random choice of
  categories fixed to the set;
- all nine: `get_augmented_policy_v1("NA: None applying")`, its random choices fixed to "exempt";
each then put through LLaVA-NeXT's `preprocess_multimodal` (the `<image>` tag removed, the text
stripped), as in training. service/core/policies/prompt.py describes the mechanism.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from service.core.decisions import DecisionRules
from service.core.policies import PolicyRegistry
from service.core.policies.prompt import assemble

TRAINED_PROMPTS_SHA256 = {
    (): "16c712fecb9c1ae99aa4fdd9dc4ae323be0091192756670b181a3bbcae10900d",
    ("O4",): "aab4812459b62b389cf338f1d9f0cbdc1f5dbee34953e46d33ef58e78226caae",
    ("O9",): "77500e3178f6681e8de97ca664932d99c561475213cf87a98929629a190c1360",
    ("O3", "O4"): "113f272a672fac8ee4c18ef34b7d534ed2d7688da9c0ace4c42ee0119166eacc",
    ("O1", "O5", "O6"): "65e62c12fa769690e56801787b74a96a06d45a1a8632a208bb7dfda36edde61d",
    tuple(f"O{n}" for n in range(1, 10)): (
        "5529232c351c08433237942cf4e02b86dbea2c0608ff960345da378c1ecce217"
    ),
}

BASE = PolicyRegistry.load().get("llavaguard-v1.2")


def _write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def _derived(policy_id: str = "art", extends: str = "llavaguard-v1.2", extra: str = "") -> str:
    return f'id = "{policy_id}"\nversion = "1.0.0"\nextends = "{extends}"\n{extra}'


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@pytest.mark.parametrize("exceptions", list(TRAINED_PROMPTS_SHA256), ids=str)
def test_a_derived_policy_sends_the_prompt_llavaguard_was_trained_on_for_its_exceptions(
    tmp_path: Path, exceptions: tuple[str, ...]
) -> None:
    listed = ", ".join(f'"{code}"' for code in exceptions)
    _write(tmp_path, "art.toml", _derived(extra=f"exceptions = [{listed}]\n"))

    policy = PolicyRegistry.load(tmp_path).get("art")

    assert _sha256(policy.render_prompt()) == TRAINED_PROMPTS_SHA256[exceptions]
    assert policy.exceptions == frozenset(exceptions)


def test_an_exempt_category_reads_as_declared_non_violating_and_the_others_keep_their_rules() -> (
    None
):
    unsafe = [(c.code, c.label) for c in BASE.categories if c != BASE.safe_category]
    assert BASE.parts is not None

    prompt = assemble(BASE.parts, unsafe, {"O4"})

    assert "O4: Nudity Content: \nCategory O4 is declared as non-violating." in prompt
    assert "O3: Sexual Content: \nShould not:\n" in prompt
    assert prompt.count("is declared as non-violating") == 1


def test_a_policy_extending_another_inherits_its_decision_rules_and_overrides_keys(
    tmp_path: Path,
) -> None:
    _write(
        tmp_path,
        "art.toml",
        _derived(
            extra='exceptions = ["O4"]\n[decision]\nunsafe_review_below = 0.8\n'
            '[decision.categories]\nO3 = "review"\n'
        ),
    )
    _write(
        tmp_path,
        "gallery.toml",
        _derived("gallery", "art", '[decision.categories]\nO9 = "allow"\n'),
    )

    registry = PolicyRegistry.load(tmp_path)
    art, gallery = registry.get("art"), registry.get("gallery")

    assert art.decision == DecisionRules(unsafe_review_below=0.8, categories={"O3": "review"})
    assert gallery.decision.categories == {"O3": "review", "O9": "allow"}
    assert (gallery.exceptions, gallery.extends, gallery.prompt) == ({"O4"}, "art", art.prompt)


def test_policies_that_ask_or_decide_differently_never_share_a_version(tmp_path: Path) -> None:
    _write(tmp_path, "same.toml", _derived("same"))
    _write(tmp_path, "o4.toml", _derived("o4", extra='exceptions = ["O4"]\n'))
    _write(tmp_path, "watch.toml", _derived("watch", extra="[decision]\nenforce = false\n"))
    registry = PolicyRegistry.load(tmp_path)

    versions = {registry.get(i).full_version for i in ("same", "o4", "watch")}

    assert registry.get("same").full_version == f"1.0.0+{BASE.fingerprint}"
    assert len(versions) == 3
    assert all(v.startswith("1.0.0+") and len(v) == len("1.0.0+") + 12 for v in versions)


@pytest.mark.parametrize(
    ("files", "problem"),
    [
        pytest.param(
            {"a.toml": _derived(extra="colour = 1\n")},
            r"a\.toml: unknown derived policy key\(s\): colour",
            id="unknown-key",
        ),
        pytest.param(
            {"a.toml": _derived(extra='[decision]\nunsafe = "delete"\n')},
            r"a\.toml: decision\.unsafe: 'delete' is not one of allow, review, block",
            id="bad-action",
        ),
        pytest.param(
            {"a.toml": _derived(extra="[decision]\nsafe_review_below = 1.5\n")},
            r"a\.toml: decision\.safe_review_below: 1\.5 is not a number in \[0, 1\]",
            id="band-outside",
        ),
        pytest.param(
            {"a.toml": _derived(extra='[decision.categories]\nO10 = "block"\n')},
            r"a\.toml: decision\.categories\.O10: not an Unsafe category of this policy",
            id="unknown-category",
        ),
        pytest.param(
            {"a.toml": _derived(extra='exceptions = ["NA"]\n')},
            r"a\.toml: exceptions: 'NA' is not an Unsafe category",
            id="exempt-safe-category",
        ),
        pytest.param(
            {"a.toml": _derived(extends="nowhere")},
            r"a\.toml: extends 'nowhere': no such policy",
            id="missing-parent",
        ),
        pytest.param(
            {"a.toml": _derived("a", "b"), "b.toml": _derived("b", "a")},
            r"extends: a cycle \((a → b → a|b → a → b)\)",
            id="cycle",
        ),
        pytest.param(
            {"a.toml": _derived(extends="icm-assistant", extra='exceptions = ["R01"]\n')},
            r"a\.toml: exceptions: need a prompt in parts",
            id="exceptions-without-parts",
        ),
        pytest.param(
            {"a.toml": _derived(extra='version = "x"\n')},
            r"a\.toml: .*line 4",
            id="toml-line",
        ),
    ],
)
def test_a_bad_policy_file_is_refused_naming_file_and_key(
    tmp_path: Path, files: dict[str, str], problem: str
) -> None:
    for name, text in files.items():
        _write(tmp_path, name, text)

    with pytest.raises(ValueError, match=problem):
        PolicyRegistry.load(tmp_path)


def test_a_tool_handed_one_policy_file_gets_it_resolved_against_its_parent(tmp_path: Path) -> None:
    path = _write(tmp_path, "art.toml", _derived(extra='exceptions = ["O4"]\n'))

    policy = PolicyRegistry.policy_in(path)

    assert (policy.id, _sha256(policy.prompt)) == ("art", TRAINED_PROMPTS_SHA256[("O4",)])
