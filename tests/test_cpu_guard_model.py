"""The CPU guard's model logic (triton_models/cpu/guard/1/nudenet_rules.py), without Triton.

NudeNet's real weights run on scikit-image's sample photos: the detections must be NudeNet's own,
and the shipped config.pbtxt must turn them into the answers pinned here. The modules are
imported from the repository as fill.py renders it for Triton (triton_models/common's modules
beside them), as the embedded stack and the image serve it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
from importlib.metadata import version
from pathlib import Path
from types import ModuleType
from typing import Any

import cv2
import nudenet
import numpy as np
import pytest
import skimage
from google.protobuf import text_format
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from tritonclient.grpc import model_config_pb2

from service.core.policies import PolicyRegistry
from service.core.policies.prompt import assemble
from triton_models import fill

MODEL_DIR = Path(__file__).resolve().parents[1] / "triton_models" / "cpu" / "guard"
SAMPLES = Path(skimage.__file__).parent / "data"
SCOPE = (
    "This detector assesses only exposed nudity (O4) and did not assess O1\u2013O3 and O5\u2013O9."
)
DEFAULT_RULES = {
    label: {"category": "O4", "min_score": 0.5}
    for label in (
        "FEMALE_GENITALIA_EXPOSED",
        "MALE_GENITALIA_EXPOSED",
        "FEMALE_BREAST_EXPOSED",
        "BUTTOCKS_EXPOSED",
        "ANUS_EXPOSED",
    )
}
DEFAULT_CATEGORIES = {"O4": "O4: Nudity Content"}


@pytest.fixture(scope="module")
def version_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The guard's version directory in triton_models/cpu rendered by fill.py."""
    out = tmp_path_factory.mktemp("cpu") / "models"
    fill.fill(MODEL_DIR.parent, out, {})
    return out / MODEL_DIR.name / "1"


def served_module(version_dir: Path, name: str) -> ModuleType:
    """A module of the version directory, imported as Triton's stub does (its siblings on
    sys.path)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(version_dir))
        return importlib.import_module(name)


@pytest.fixture(scope="module")
def nr(version_dir: Path) -> ModuleType:
    return served_module(version_dir, "nudenet_rules")


@pytest.fixture(scope="module")
def gr(version_dir: Path) -> ModuleType:
    """guard_request, the image check the CPU guard shares with the LlavaGuard engines."""
    return served_module(version_dir, "guard_request")


@pytest.fixture(scope="module")
def shipped_parameters() -> dict[str, str]:
    config = text_format.Parse(
        (MODEL_DIR / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    return {name: value.string_value for name, value in config.parameters.items()}


@pytest.fixture(scope="module")
def policy(nr: ModuleType, shipped_parameters: dict[str, str]) -> Any:
    return nr.parse_settings(shipped_parameters).policy


@pytest.fixture(scope="module")
def detector(nr: ModuleType) -> Any:
    return nr.Detector(intra_op_num_threads=1)


@pytest.fixture(scope="module")
def reference() -> Any:
    return nudenet.NudeDetector()


def sample_path(name: str) -> str:
    return str(SAMPLES / name)


def read_rgb(name: str) -> np.ndarray:
    """The pixels NudeDetector reads from the same file (cv2 decodes BGR), as RGB."""
    return np.ascontiguousarray(cv2.imread(sample_path(name))[:, :, ::-1])


def parameters(**overrides: Any) -> dict[str, str]:
    values: dict[str, Any] = {
        "rules": DEFAULT_RULES,
        "categories": DEFAULT_CATEGORIES,
        "report_min_score": 0.25,
        "intra_op_num_threads": 1,
        "max_image_side": 8192,
    }
    values.update(overrides)
    return {
        name: value if isinstance(value, str) else json.dumps(value)
        for name, value in values.items()
    }


def test_labels_are_nudenets_in_its_order(nr: ModuleType) -> None:
    # A module-level double-underscore name is not mangled; vars() reads it as it is.
    assert list(nr.LABELS) == vars(nudenet.nudenet)["__labels"]


def test_shipped_config_holds_the_documented_defaults(
    nr: ModuleType, shipped_parameters: dict[str, str]
) -> None:
    settings = nr.parse_settings(shipped_parameters)
    assert {
        label: {"category": rule.category, "min_score": rule.min_score}
        for label, rule in settings.policy.rules.items()
    } == DEFAULT_RULES
    assert dict(settings.policy.categories) == DEFAULT_CATEGORIES
    assert settings.policy.report_min_score == 0.25
    assert settings.intra_op_num_threads == 1
    assert settings.max_image_side == 8192


@pytest.mark.parametrize("name", ["astronaut.png", "color.png", "rocket.jpg", "coffee.png"])
def test_letterbox_is_nudenets_network_input_bit_for_bit(nr: ModuleType, name: str) -> None:
    expected = nudenet.nudenet._read_image(sample_path(name))[0][0]
    assert np.array_equal(nr.letterbox(read_rgb(name)), expected)


@settings(max_examples=25, deadline=None)
@given(
    arrays(
        np.uint8,
        st.tuples(st.integers(1, 400), st.integers(1, 400), st.just(3)),
        elements=st.integers(0, 255),
    )
)
def test_letterbox_matches_nudenet_for_any_size(nr: ModuleType, rgb: np.ndarray) -> None:
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    assert np.array_equal(nr.letterbox(rgb), nudenet.nudenet._read_image(bgr)[0][0])


@pytest.mark.parametrize(
    "name",
    [
        "astronaut.png",
        "color.png",
        "camera.png",
        "moon.png",
        "phantom.png",
        "chelsea.png",
        "coffee.png",
        "rocket.jpg",
    ],
)
def test_detections_are_nudenets(detector: Any, reference: Any, name: str) -> None:
    # Same input planes, same weights, same post-processing: only onnxruntime's arithmetic
    # could differ between the two sessions, hence a tolerance far below the 0.01 we report.
    (found,) = detector.detect([read_rgb(name)])
    expected = reference.detect(sample_path(name))
    assert [(d.label, list(d.box)) for d in found] == [(e["class"], e["box"]) for e in expected]
    assert [d.score for d in found] == pytest.approx([e["score"] for e in expected], abs=1e-4)


def test_known_scores(detector: Any) -> None:
    astronaut, colour_wheel = detector.detect([read_rgb("astronaut.png"), read_rgb("color.png")])
    assert [(d.label, round(d.score, 3)) for d in astronaut] == [("FACE_FEMALE", 0.720)]
    assert [(d.label, round(d.score, 3)) for d in colour_wheel] == [("BUTTOCKS_EXPOSED", 0.835)]


@pytest.mark.parametrize(
    ("name", "rating", "category", "named"),
    [
        # The colour wheel is a real false positive of the detector, kept as a pin of it.
        (
            "color.png",
            "Unsafe",
            "O4: Nudity Content",
            "NudeNet detected BUTTOCKS_EXPOSED 0.83. "
            "Rule fired: BUTTOCKS_EXPOSED 0.83 >= 0.5 (O4: Nudity Content).",
        ),
        (
            "astronaut.png",
            "Safe",
            "NA: None applying",
            "NudeNet detected FACE_FEMALE 0.72. No rule fired.",
        ),
        ("chelsea.png", "Safe", "NA: None applying", "detected no body part scoring 0.25 or more"),
        ("coffee.png", "Safe", "NA: None applying", "detected no body part scoring 0.25 or more"),
        ("rocket.jpg", "Safe", "NA: None applying", "detected no body part scoring 0.25 or more"),
    ],
)
def test_shipped_rules_answer_sample_photos(
    nr: ModuleType, detector: Any, policy: Any, name: str, rating: str, category: str, named: str
) -> None:
    (found,) = detector.detect([read_rgb(name)])
    answer = json.loads(nr.answer_json(nr.judge(found, policy), "3.4.2+rules.00000000"))
    assert (answer["rating"], answer["category"]) == (rating, category)
    assert named in answer["rationale"]
    assert answer["rationale"].endswith(SCOPE)


def test_raised_threshold_makes_the_colour_wheel_safe(nr: ModuleType, detector: Any) -> None:
    rules = {**DEFAULT_RULES, "BUTTOCKS_EXPOSED": {"category": "O4", "min_score": 0.9}}
    raised = nr.parse_settings(parameters(rules=rules)).policy
    (found,) = detector.detect([read_rgb("color.png")])
    answer = nr.judge(found, raised)
    assert (answer.rating, answer.category) == ("Safe", "NA: None applying")
    assert answer.rationale == (
        "NudeNet detected BUTTOCKS_EXPOSED 0.83. "
        "No rule fired: BUTTOCKS_EXPOSED 0.83 is below its threshold 0.9 (O4: Nudity Content). "
        + SCOPE
    )


def test_one_batch_of_different_sizes_detects_as_one_at_a_time(detector: Any) -> None:
    images = [
        read_rgb("color.png"),  # 370 x 371
        read_rgb("rocket.jpg"),  # 427 x 640
        read_rgb("astronaut.png")[:300, 40:],  # 300 x 472, the face kept
        read_rgb("camera.png"),
        np.zeros((1, 1, 3), np.uint8),
    ]
    batched = detector.detect(images)
    alone = [detector.detect([image])[0] for image in images]
    assert [[(d.label, d.box) for d in found] for found in batched] == [
        [(d.label, d.box) for d in found] for found in alone
    ]
    assert [[d.score for d in found] for found in batched] == [
        pytest.approx([d.score for d in found], abs=1e-5) for found in alone
    ]
    assert [len(found) for found in batched] == [1, 0, 1, 1, 0]


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 5000, 3), (5000, 1, 3), (2, 3, 3)])
def test_degenerate_images_are_judged_safe(
    nr: ModuleType, detector: Any, policy: Any, shape: tuple[int, int, int]
) -> None:
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    (found,) = detector.detect([image])
    assert found == []
    assert nr.judge(found, policy).rating == "Safe"


def test_no_images_is_no_run(detector: Any) -> None:
    assert detector.detect([]) == []


def test_image_from_tensor_takes_the_one_image(gr: ModuleType) -> None:
    tensor = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(1, 1, 2, 3, 3)
    image = gr.image_from_tensor(tensor, 8192)
    assert image.shape == (2, 3, 3)
    assert np.array_equal(image, tensor[0, 0])


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (np.zeros((1, 4, 4, 3), np.uint8), r"expected \[1, 1, H, W, 3\], got \[1, 4, 4, 3\]"),
        (np.zeros((1, 1, 4, 4, 4), np.uint8), r"expected \[1, 1, H, W, 3\]"),
        (np.zeros((2, 1, 4, 4, 3), np.uint8), r"got \[2, 1, 4, 4, 3\]"),
        (np.zeros((1, 2, 4, 4, 3), np.uint8), r"got \[1, 2, 4, 4, 3\]"),
        (np.zeros((1, 0, 4, 4, 3), np.uint8), r"got \[1, 0, 4, 4, 3\]"),
        (np.zeros((1, 1, 0, 4, 3), np.uint8), "empty image of 4x0 pixels"),
        (np.zeros((1, 1, 4, 0, 3), np.uint8), "empty image of 0x4 pixels"),
        (np.zeros((1, 1, 4, 4, 3), np.float32), "expected UINT8, got float32"),
        (
            np.zeros((1, 1, 1, 101, 3), np.uint8),
            "101x1 pixels; the longer side exceeds max_image_side 100",
        ),
    ],
)
def test_bad_image_tensors_are_refused(gr: ModuleType, tensor: np.ndarray, message: str) -> None:
    with pytest.raises(gr.InvalidRequestError, match=message):
        gr.image_from_tensor(tensor, 100)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rules": "{"}, "rules: not valid JSON"),
        ({"rules": "[]"}, "rules: must be a JSON object, got list"),
        ({"rules": {}}, "rules: empty"),
        (
            {"rules": {"NIPPLE": {"category": "O4", "min_score": 0.5}}},
            r"rules\['NIPPLE'\]: unknown label",
        ),
        (
            {"rules": {"ANUS_EXPOSED": {"category": "O4", "min_score": 1.5}}},
            r"rules\['ANUS_EXPOSED'\].min_score: must be a number in 0..1, got 1.5",
        ),
        (
            {"rules": {"ANUS_EXPOSED": {"category": "O4", "min_score": -0.1}}},
            "min_score: must be a number in 0..1",
        ),
        (
            {"rules": {"ANUS_EXPOSED": {"category": "O4", "min_score": True}}},
            "min_score: must be a number in 0..1, got True",
        ),
        (
            {"rules": {"ANUS_EXPOSED": {"category": "O4", "min_score": "0.5"}}},
            "min_score: must be a number in 0..1, got '0.5'",
        ),
        (
            {"rules": {"ANUS_EXPOSED": {"category": "O7", "min_score": 0.5}}},
            r"unknown category 'O7'; categories are \['O4'\]",
        ),
        ({"rules": {"ANUS_EXPOSED": {"category": "O4"}}}, 'must be {"category"'),
        (
            {"rules": {"ANUS_EXPOSED": {"category": "O4", "min_score": 0.5, "score": 1}}},
            'must be {"category"',
        ),
        ({"categories": {}}, "categories: must name at least one"),
        ({"categories": {"O4": ""}}, r"categories\['O4'\]: must be a non-empty label"),
        ({"categories": {"O4": "NA: None applying"}}, "is the safe answer"),
        ({"report_min_score": "high"}, "report_min_score: must be a number in 0..1, got 'high'"),
        ({"report_min_score": "nan"}, "report_min_score: must be a number in 0..1"),
        ({"intra_op_num_threads": "0"}, "intra_op_num_threads: must be an integer of at least 1"),
        ({"max_image_side": "big"}, "max_image_side: must be an integer of at least 1, got 'big'"),
    ],
)
def test_invalid_settings_are_refused_with_the_reason(
    nr: ModuleType, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(nr.InvalidSettingsError, match=message):
        nr.parse_settings(parameters(**overrides))


def test_missing_parameters_are_named(nr: ModuleType) -> None:
    incomplete = parameters()
    del incomplete["report_min_score"], incomplete["max_image_side"]
    with pytest.raises(
        nr.InvalidSettingsError, match="parameters missing: report_min_score, max_image_side"
    ):
        nr.parse_settings(incomplete)


def test_best_scoring_firing_rule_names_the_category(nr: ModuleType) -> None:
    rules = {
        "BUTTOCKS_EXPOSED": {"category": "O4", "min_score": 0.5},
        "FEMALE_BREAST_EXPOSED": {"category": "O3", "min_score": 0.5},
    }
    categories = {"O3": "O3: Sexual Content", "O4": "O4: Nudity Content"}
    policy = nr.parse_settings(
        parameters(rules=rules, categories=categories, report_min_score=0.5)
    ).policy
    found = [
        nr.Detection("BUTTOCKS_EXPOSED", 0.6, (0, 0, 1, 1)),
        nr.Detection("FACE_FEMALE", 0.45, (0, 0, 1, 1)),
        nr.Detection("FEMALE_BREAST_EXPOSED", 0.8, (0, 0, 1, 1)),
    ]
    answer = nr.judge(found, policy)
    assert (answer.rating, answer.category) == ("Unsafe", "O3: Sexual Content")
    assert answer.rationale == (
        "NudeNet detected FEMALE_BREAST_EXPOSED 0.80, BUTTOCKS_EXPOSED 0.60. "
        "Rule fired: FEMALE_BREAST_EXPOSED 0.80 >= 0.5 (O3: Sexual Content); "
        "BUTTOCKS_EXPOSED 0.60 >= 0.5 (O4: Nudity Content). "
        "This detector assesses only exposed nudity (O3, O4) and did not assess "
        "O1\u2013O2 and O5\u2013O9."
    )


def test_a_category_the_prompt_declares_non_violating_makes_no_image_unsafe(
    nr: ModuleType,
) -> None:
    rules = {
        "BUTTOCKS_EXPOSED": {"category": "O4", "min_score": 0.5},
        "FEMALE_BREAST_EXPOSED": {"category": "O3", "min_score": 0.5},
    }
    categories = {"O3": "O3: Sexual Content", "O4": "O4: Nudity Content"}
    policy = nr.parse_settings(parameters(rules=rules, categories=categories)).policy
    buttocks = nr.Detection("BUTTOCKS_EXPOSED", 0.6, (0, 0, 1, 1))
    breast = nr.Detection("FEMALE_BREAST_EXPOSED", 0.8, (0, 0, 1, 1))
    registry = PolicyRegistry.load()
    base = registry.get("llavaguard-v1.2")
    assert base.parts is not None
    unsafe = [(c.code, c.label) for c in base.categories if c != base.safe_category]
    exempt = nr.exempt_categories(assemble(base.parts, unsafe, {"O4", "O9"}))

    only_exempt = nr.judge([buttocks], policy, exempt)
    both = nr.judge([breast, buttocks], policy, exempt)

    assert exempt == {"O4", "O9"}
    assert nr.exempt_categories(base.prompt) == frozenset()
    assert (only_exempt.rating, only_exempt.category) == ("Safe", "O4: Nudity Content")
    assert "The policy declares O4: Nudity Content non-violating" in only_exempt.rationale
    assert (both.rating, both.category) == ("Unsafe", "O3: Sexual Content")
    assert nr.judge([buttocks], policy).rating == "Unsafe"


def test_answer_is_llavaguard_json_naming_this_model(nr: ModuleType, policy: Any) -> None:
    answer = nr.Answer("Safe", "NA: None applying", "Nothing found.")
    text = nr.answer_json(answer, nr.model_version(policy, version("nudenet")))
    assert json.loads(text) == {
        "rating": "Safe",
        "category": "NA: None applying",
        "rationale": "Nothing found.",
        "model": {
            "name": "nudenet-320n-rules",
            "version": f"{version('nudenet')}+rules.{policy.fingerprint()}",
        },
    }
    assert re.fullmatch(r"3\.4\.2\+rules\.[0-9a-f]{8}", json.loads(text)["model"]["version"])


def test_a_follow_up_gets_the_judgement_and_is_told_the_detector_cannot_answer_it(
    nr: ModuleType,
) -> None:
    answer = nr.Answer("Unsafe", "O4: Nudity Content", "NudeNet detected FEMALE_BREAST_EXPOSED.")
    text = nr.follow_up_answer(answer, "Why is it unsafe?")
    assert text == (
        "This guard is the NudeNet nudity detector with fixed rules, not a language model: it "
        'cannot answer "Why is it unsafe?". All it can say about this image is its judgement, '
        "Unsafe (O4: Nudity Content): NudeNet detected FEMALE_BREAST_EXPOSED."
    )
    long = nr.follow_up_answer(answer, "x" * 500)
    assert '"' + "x" * 199 + '\u2026"' in long


def test_rules_fingerprint_is_the_canonical_hash(nr: ModuleType, policy: Any) -> None:
    canonical = json.dumps(
        {"categories": DEFAULT_CATEGORIES, "rules": DEFAULT_RULES},
        sort_keys=True,
        separators=(",", ":"),
    )
    assert policy.fingerprint() == hashlib.sha256(canonical.encode()).hexdigest()[:8]
    reordered = dict(reversed(list(DEFAULT_RULES.items())))
    same = nr.parse_settings(parameters(rules=json.dumps(reordered, indent=2))).policy
    assert same.fingerprint() == policy.fingerprint()
    raised = {**DEFAULT_RULES, "ANUS_EXPOSED": {"category": "O4", "min_score": 0.6}}
    assert nr.parse_settings(parameters(rules=raised)).policy.fingerprint() != policy.fingerprint()
