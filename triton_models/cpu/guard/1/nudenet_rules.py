"""NudeNet's 320n nudity detector turned into a LlavaGuard-style answer by configurable rules.

Nothing here imports Triton: `model.py` is the glue, this module is the model, so the tests run
it without a server. One step per function, in the order the data flows:

    parse_settings      config.pbtxt parameters -> Settings, or InvalidSettingsError
    letterbox           RGB image -> the network's input planes, exactly as NudeNet builds them
    Detector.detect     several images -> ONE onnxruntime run -> detections per image
    decode_detections   one image's raw output -> detections, exactly as NudeNet post-processes
    exempt_categories   the policy prompt -> the categories it declares non-violating
    judge               detections + Policy -> Answer (rating, category, rationale)
    answer_json         Answer -> the LlavaGuard JSON text, with the model's own identity
    follow_up_answer    Answer + a follow-up question -> plain text saying what it can say

Reproduced from nudenet 3.4.2 (`nudenet/nudenet.py`), so that the scores are NudeNet's own:
pad bottom/right to a black square, resize to 320x320 with cv2 INTER_LINEAR, scale by 1/255,
keep rows whose best class score is >= 0.2, then `cv2.dnn.NMSBoxes(..., 0.25, 0.45)`.

A request's image comes from `guard_request.image_from_tensor`, the image contract's one check
for every guard; `max_image_side` bounds it here because the letterbox pads to a square of the
longer side, so a long thin strip would otherwise cost side * side * 3 bytes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import nudenet
import numpy as np
import onnxruntime
from model_parameters import InvalidSettingsError, ModelParameters
from numpy.typing import NDArray

RGBImage = NDArray[np.uint8]

# nudenet.nudenet.__labels, in the order of the network's class outputs. A test checks that
# this copy still equals NudeNet's list: the list is private to that module.
LABELS: tuple[str, ...] = (
    "FEMALE_GENITALIA_COVERED",
    "FACE_FEMALE",
    "BUTTOCKS_EXPOSED",
    "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_BREAST_EXPOSED",
    "ANUS_EXPOSED",
    "FEET_EXPOSED",
    "BELLY_COVERED",
    "FEET_COVERED",
    "ARMPITS_COVERED",
    "ARMPITS_EXPOSED",
    "FACE_MALE",
    "BELLY_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "ANUS_COVERED",
    "FEMALE_BREAST_COVERED",
    "BUTTOCKS_COVERED",
)

WEIGHTS_PATH = os.path.join(os.path.dirname(nudenet.__file__), "320n.onnx")
INPUT_SIDE = 320

# NudeNet's own post-processing constants. They are part of reproducing the detector, not
# policy: changing them changes which boxes exist at all. What counts as a violation is decided
# by the `rules` parameter instead. NMS drops every box under 0.25, so no rule or report
# threshold below 0.25 can ever see one.
CANDIDATE_MIN_SCORE = 0.2
NMS_MIN_SCORE = 0.25
NMS_MAX_OVERLAP = 0.45

MODEL_NAME = "nudenet-320n-rules"
SAFE_CATEGORY = "NA: None applying"
SAFE, UNSAFE = "Safe", "Unsafe"
# LlavaGuard's policy categories; the rationale names the ones this detector does not assess.
LLAVAGUARD_CODES: tuple[str, ...] = tuple(f"O{number}" for number in range(1, 10))
PARAMETERS = ("rules", "categories", "report_min_score", "intra_op_num_threads", "max_image_side")


@dataclass(frozen=True)
class Rule:
    category: str
    min_score: float


@dataclass(frozen=True)
class Policy:
    """What makes an image Unsafe, and how the rationale reports detections."""

    rules: Mapping[str, Rule]
    categories: Mapping[str, str]
    report_min_score: float

    def fingerprint(self) -> str:
        """First 8 hex digits of the sha256 of the rules and categories, canonically encoded,
        so a verdict says which rules produced it."""
        canonical = {
            "categories": dict(self.categories),
            "rules": {
                label: {"category": rule.category, "min_score": rule.min_score}
                for label, rule in self.rules.items()
            },
        }
        text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


@dataclass(frozen=True)
class Settings:
    policy: Policy
    intra_op_num_threads: int
    max_image_side: int


@dataclass(frozen=True)
class Detection:
    label: str
    score: float
    box: tuple[int, int, int, int]  # x, y, width, height in the image's pixels


@dataclass(frozen=True)
class Answer:
    rating: str
    category: str
    rationale: str


def parse_settings(parameters: Mapping[str, str]) -> Settings:
    """Settings from the `parameters` of config.pbtxt, every one of them required, so that
    config.pbtxt is the one place their values live."""
    read = ModelParameters(parameters, required=PARAMETERS)
    categories = parse_categories(read.json_object("categories"))
    return Settings(
        policy=Policy(
            rules=parse_rules(read.json_object("rules"), categories),
            categories=categories,
            report_min_score=read.number("report_min_score", minimum=0, maximum=1),
        ),
        intra_op_num_threads=read.integer("intra_op_num_threads", minimum=1),
        max_image_side=read.integer("max_image_side", minimum=1),
    )


def parse_categories(categories: Mapping[str, Any]) -> dict[str, str]:
    """`{"O4": "O4: Nudity Content"}`: category code -> the label answers carry."""
    if not categories:
        raise InvalidSettingsError("categories: must name at least one category")
    for code, label in categories.items():
        if not code or not isinstance(label, str) or not label:
            raise InvalidSettingsError(
                f"categories[{code!r}]: must be a non-empty label, got {label!r}"
            )
        if label == SAFE_CATEGORY:
            raise InvalidSettingsError(
                f"categories[{code!r}]: {SAFE_CATEGORY!r} is the safe answer"
            )
    return dict(categories)


def parse_rules(raw: Mapping[str, Any], categories: Mapping[str, str]) -> dict[str, Rule]:
    """`{"BUTTOCKS_EXPOSED": {"category": "O4", "min_score": 0.5}, ...}`: a detection of that
    label scoring at least min_score makes the image Unsafe in that category."""
    if not raw:
        raise InvalidSettingsError("rules: empty, so every image would be Safe")
    rules = {}
    for label, spec in raw.items():
        where = f"rules[{label!r}]"
        if label not in LABELS:
            raise InvalidSettingsError(
                f"{where}: unknown label; NudeNet's labels are {list(LABELS)}"
            )
        if not isinstance(spec, dict) or set(spec) != {"category", "min_score"}:
            raise InvalidSettingsError(f'{where}: must be {{"category": ..., "min_score": ...}}')
        if spec["category"] not in categories:
            raise InvalidSettingsError(
                f"{where}: unknown category {spec['category']!r}; categories are {list(categories)}"
            )
        rules[label] = Rule(spec["category"], _check_score(f"{where}.min_score", spec["min_score"]))
    return rules


def _check_score(name: str, value: object) -> float:
    # bool is an int to Python, but `true` as a threshold is a mistake in the config.
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise InvalidSettingsError(f"{name}: must be a number in 0..1, got {value!r}")
    return float(value)


def letterbox(image: RGBImage) -> NDArray[np.float32]:
    """The network's 3x320x320 input for one image, bit for bit what NudeNet 3.4.2 feeds it."""
    height, width = image.shape[:2]
    side = max(height, width)
    square = np.zeros((side, side, 3), dtype=np.uint8)
    square[:height, :width] = image
    resized = cv2.resize(square, (INPUT_SIDE, INPUT_SIDE), interpolation=cv2.INTER_LINEAR)
    # NudeNet reads BGR with cv2.imread, applies COLOR_RGBA2BGR (on 3 channels: a red/blue
    # swap) and then blobFromImage(swapRB=True) (a second swap), so its network is fed B, G, R
    # planes. Our image is RGB, so the planes are reversed to get NudeNet's scores.
    planes = resized[:, :, ::-1].transpose(2, 0, 1)
    # blobFromImage multiplies by the float32 scale factor; dividing by 255 differs in the
    # last bit for some pixel values.
    return planes.astype(np.float32) * np.float32(1 / 255.0)


def decode_detections(output: NDArray[np.float32], width: int, height: int) -> list[Detection]:
    """Detections of one image from its [22, 2100] output, as NudeNet's `_postprocess`."""
    rows = output.T
    class_scores = rows[:, 4:]
    best = class_scores.max(axis=1)
    keep = best >= CANDIDATE_MIN_SCORE
    if not keep.any():
        return []
    scores = best[keep]
    class_ids = class_scores[keep].argmax(axis=1)
    # float64 from here, as NudeNet's scalar arithmetic promotes to it under numpy 1.x.
    center_x, center_y, box_w, box_h = rows[keep, :4].astype(np.float64).T
    side = max(width, height)
    x = np.clip((center_x - box_w / 2) * side / INPUT_SIDE, 0, width)
    y = np.clip((center_y - box_h / 2) * side / INPUT_SIDE, 0, height)
    # NudeNet clips the far edge only (w = min(w, width - x)); kept so that NMS sees its boxes.
    w = np.minimum(box_w * side / INPUT_SIDE, width - x)
    h = np.minimum(box_h * side / INPUT_SIDE, height - y)
    boxes = np.stack([x, y, w, h], axis=1)
    kept = cv2.dnn.NMSBoxes(boxes.tolist(), scores.tolist(), NMS_MIN_SCORE, NMS_MAX_OVERLAP)
    return [
        Detection(
            label=LABELS[int(class_ids[index])],
            score=float(scores[index]),
            box=(int(x[index]), int(y[index]), int(w[index]), int(h[index])),
        )
        for index in np.asarray(kept, dtype=np.int64).reshape(-1)
    ]


class Detector:
    """NudeNet's 320n network, run once per batch of images."""

    def __init__(self, intra_op_num_threads: int, weights_path: str = WEIGHTS_PATH) -> None:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = intra_op_num_threads
        self._session = onnxruntime.InferenceSession(
            weights_path, sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._input_name: str = self._session.get_inputs()[0].name
        channels = self._session.get_outputs()[0].shape[1]
        if channels != 4 + len(LABELS):
            raise InvalidSettingsError(
                f"{weights_path}: outputs {channels} channels per box, expected 4 box "
                f"coordinates + {len(LABELS)} NudeNet labels"
            )

    def detect(self, images: Sequence[RGBImage]) -> list[list[Detection]]:
        if not images:
            return []
        batch = np.stack([letterbox(image) for image in images])
        outputs = np.asarray(
            self._session.run(None, {self._input_name: batch})[0], dtype=np.float32
        )
        return [
            decode_detections(output, width=image.shape[1], height=image.shape[0])
            for output, image in zip(outputs, images, strict=True)
        ]


_EXEMPT = re.compile(r"^Category (\S+) is declared as non-violating\.", re.MULTILINE)


def exempt_categories(prompt: str) -> frozenset[str]:
    """The codes a LlavaGuard prompt declares non-violating ("Category O4 is declared as
    non-violating. ..."), the sentence LlavaGuard's policy exceptions were trained on."""
    return frozenset(_EXEMPT.findall(prompt))


def judge(
    detections: Sequence[Detection], policy: Policy, exempt: frozenset[str] = frozenset()
) -> Answer:
    """Unsafe in the category of the best-scoring detection that meets its rule; else Safe.

    A category the prompt declares non-violating (`exempt`) makes no image Unsafe: an image that
    only fires its rules is Safe in that category, as LlavaGuard answers such an image.
    """
    ranked = sorted(detections, key=lambda detection: detection.score, reverse=True)
    fired = [d for d in ranked if d.label in policy.rules and _meets_rule(d, policy.rules)]
    violating = [d for d in fired if policy.rules[d.label].category not in exempt]
    reported = [d for d in ranked if d.score >= policy.report_min_score]
    parts = [
        _describe_detections(reported, policy.report_min_score),
        _describe_rules(fired, reported, policy),
        _describe_scope(policy),
    ]
    if fired and not violating:
        label = policy.categories[policy.rules[fired[0].label].category]
        parts.insert(2, f"The policy declares {label} non-violating, so the image complies.")
        return Answer(SAFE, label, " ".join(parts))
    if not violating:
        return Answer(SAFE, SAFE_CATEGORY, " ".join(parts))
    return Answer(
        UNSAFE, policy.categories[policy.rules[violating[0].label].category], " ".join(parts)
    )


def _meets_rule(detection: Detection, rules: Mapping[str, Rule]) -> bool:
    return detection.score >= rules[detection.label].min_score


def _describe_detections(reported: Sequence[Detection], report_min_score: float) -> str:
    if not reported:
        return f"NudeNet detected no body part scoring {report_min_score:g} or more."
    return "NudeNet detected " + ", ".join(f"{d.label} {d.score:.2f}" for d in reported) + "."


def _describe_rules(
    fired: Sequence[Detection], reported: Sequence[Detection], policy: Policy
) -> str:
    def threshold(detection: Detection) -> str:
        rule = policy.rules[detection.label]
        return f"{rule.min_score:g} ({policy.categories[rule.category]})"

    if fired:
        return (
            "Rule fired: "
            + "; ".join(f"{d.label} {d.score:.2f} >= {threshold(d)}" for d in fired)
            + "."
        )
    below = [d for d in reported if d.label in policy.rules]
    if not below:
        return "No rule fired."
    return (
        "No rule fired: "
        + "; ".join(f"{d.label} {d.score:.2f} is below its threshold {threshold(d)}" for d in below)
        + "."
    )


def _describe_scope(policy: Policy) -> str:
    assessed = sorted({rule.category for rule in policy.rules.values()})
    not_assessed = [code for code in LLAVAGUARD_CODES if code not in assessed]
    scope = f"This detector assesses only exposed nudity ({', '.join(assessed)})"
    if not not_assessed:
        return scope + "."
    return f"{scope} and did not assess {_code_ranges(not_assessed)}."


def _code_ranges(codes: Sequence[str]) -> str:
    """Runs of consecutive LlavaGuard codes, as people write them: O1\u2013O3 and O5\u2013O9."""
    runs = [
        list(run)
        for listed, run in itertools.groupby(LLAVAGUARD_CODES, key=lambda code: code in codes)
        if listed
    ]
    names = [run[0] if len(run) == 1 else f"{run[0]}\u2013{run[-1]}" for run in runs]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def model_version(policy: Policy, nudenet_version: str) -> str:
    """`3.4.2+rules.1a2b3c4d`: the detector's release and the rules that judged."""
    return f"{nudenet_version}+rules.{policy.fingerprint()}"


def answer_json(answer: Answer, version: str) -> str:
    """LlavaGuard's answer format, plus `model` saying honestly which model answered."""
    return json.dumps(
        {
            "rating": answer.rating,
            "category": answer.category,
            "rationale": answer.rationale,
            "model": {"name": MODEL_NAME, "version": version},
        },
        ensure_ascii=False,
    )


def follow_up_answer(answer: Answer, question: str) -> str:
    """What the detector can say to a follow-up question about an image it judged: its judgement
    and the detections behind it, and that it cannot answer the question itself. A detector
    with rules has no language model to converse with; pretending otherwise would put words in
    a reviewer's hands that no model produced."""
    asked = question if len(question) <= 200 else question[:199] + "\u2026"
    return (
        f"This guard is the NudeNet nudity detector with fixed rules, not a language model: it "
        f'cannot answer "{asked}". All it can say about this image is its judgement, '
        f"{answer.rating} ({answer.category}): {answer.rationale}"
    )
