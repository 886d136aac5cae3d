"""Smoke-test a running guard: one image judged, the answer checked, latency and throughput.

    python deploy/trtllm/smoke_test.py --url http://localhost:8000 \\
        --policy service/policies/llavaguard-v1.2.toml --schema answer.json [--image photo.jpg]

Standard library plus numpy and Pillow (both in the Triton TensorRT-LLM image), so it runs where
tritonserver runs; it speaks Triton's HTTP/REST protocol with the binary tensor extension and
sends exactly the consumer's request (service/adapters/triton.py): the policy prompt, one
decoded RGB image of at most --max-side pixels, max_tokens and the consumer's default sampling.

Checks, each failing the run (exit 1):
- the model is ready and declares the consumer's contract; `rating_log_prob` when declared;
- every answer is one the consumer reads in the policy's answer format (`parse_answer`: a
  LlavaGuard JSON object, or ICM-Assistant's leading Yes/No), and, with --schema, JSON with the
  schema's required keys and allowed values;
- `rating_log_prob`, when declared, is a log-probability (finite, <= 0) for every answer.
Prints one JSON summary: the first answer, latencies of --sequential requests one at a time
(p50/p95/max) and the throughput of --burst requests --concurrency at a time.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:  # at run time imported once the repository is on sys.path (run)
    from service.core.policies import Policy

CONTRACT_INPUTS = {"text_input", "image_bytes_input", "max_tokens"}
RATING_LOG_PROB = "rating_log_prob"

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Result:
    text: str
    rating_log_prob: float | None
    seconds: float


def _bytes_tensor(value: bytes) -> bytes:
    return struct.pack("<I", len(value)) + value


def infer_body(
    prompt: str, image: NDArray[np.uint8], sampling: Mapping[str, Any], outputs: Sequence[str]
) -> tuple[bytes, int]:
    """The request body (JSON header + binary tensors) and the header's length."""
    tensors: list[tuple[str, str, list[int], bytes]] = [
        ("text_input", "BYTES", [1, 1], _bytes_tensor(prompt.encode())),
        ("image_bytes_input", "UINT8", [1, 1, *image.shape], np.ascontiguousarray(image).tobytes()),
        ("max_tokens", "INT32", [1, 1], np.int32(sampling["max_tokens"]).tobytes()),
        ("temperature", "FP32", [1, 1], np.float32(sampling["temperature"]).tobytes()),
        ("top_p", "FP32", [1, 1], np.float32(sampling["top_p"]).tobytes()),
        ("top_k", "INT32", [1, 1], np.int32(sampling["top_k"]).tobytes()),
    ]
    header = {
        "inputs": [
            {"name": n, "datatype": t, "shape": s, "parameters": {"binary_data_size": len(b)}}
            for n, t, s, b in tensors
        ],
        "outputs": [{"name": name, "parameters": {"binary_data": False}} for name in outputs],
    }
    encoded = json.dumps(header).encode()
    return encoded + b"".join(b for *_, b in tensors), len(encoded)


def read_outputs(body: Mapping[str, Any]) -> tuple[str, float | None]:
    outputs = {o["name"]: o["data"] for o in body["outputs"]}
    text = outputs["text_output"][0]
    log_prob = outputs.get(RATING_LOG_PROB)
    return text, None if log_prob is None else float(log_prob[0])


def check_answer(text: str, schema: Mapping[str, Any] | None) -> list[str]:
    """What is wrong with an answer: not JSON, a required key missing, a value not allowed."""
    try:
        answer = json.loads(text)
    except json.JSONDecodeError as exc:
        return [f"not JSON: {exc}"]
    if not isinstance(answer, dict):
        return ["not a JSON object"]
    if schema is None:
        return []
    problems = [f"{key!r} missing" for key in schema.get("required", []) if key not in answer]
    properties = schema.get("properties", {})
    for key, value in answer.items():
        rule = properties.get(key)
        if rule is None:
            if schema.get("additionalProperties") is False:
                problems.append(f"{key!r} not allowed")
            continue
        if "enum" in rule and value not in rule["enum"]:
            problems.append(f"{key!r}: {value!r} not one of the schema's values")
        if rule.get("type") == "string" and not isinstance(value, str):
            problems.append(f"{key!r}: not a string")
    return problems


def unreadable(text: str, policy: Policy) -> list[str]:
    """Why the consumer could not read `text` as an answer to `policy`, if it could not."""
    from service.core.errors import UnparseableModelOutput
    from service.core.policies import parse_answer

    try:
        parse_answer(text, policy)
    except UnparseableModelOutput as exc:
        return [f"unreadable as answer format {policy.answer_format}: {exc}"]
    return []


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1)]


def load_image(path: Path | None, max_side: int) -> NDArray[np.uint8]:
    """The image as the consumer sends it: RGB, EXIF-oriented, longer side <= max_side."""
    from PIL import Image, ImageOps

    if path is None:
        # A deterministic picture with structure (gradients and a disc), 768x1024.
        rows, columns = np.mgrid[0:768, 0:1024]
        disc = ((rows - 384) ** 2 + (columns - 512) ** 2) < 200**2
        image = np.stack(
            [columns * 255 // 1023, rows * 255 // 767, np.where(disc, 220, 40)], axis=-1
        ).astype(np.uint8)
        picture = Image.fromarray(image)
    else:
        picture = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    picture.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return np.asarray(picture, dtype=np.uint8)


class Guard:
    def __init__(self, url: str, model: str, timeout: float) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.timeout = timeout

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=self.timeout) as response:
            return json.loads(response.read() or b"null")

    def config(self) -> Any:
        return self._get(f"/v2/models/{self.model}/config")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"{self.url}/v2/models/{self.model}/ready", timeout=self.timeout
            ) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def infer(self, body: bytes, header_length: int) -> Result:
        request = urllib.request.Request(
            f"{self.url}/v2/models/{self.model}/infer",
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(header_length),
            },
        )
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            payload = json.loads(response.read())
        text, log_prob = read_outputs(payload)
        return Result(text, log_prob, time.perf_counter() - started)


def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    guard = Guard(args.url, args.model, args.timeout)
    problems: list[str] = []
    if not guard.ready():
        return {}, [f"{args.model} is not ready at {args.url}"]
    config = guard.config()
    declared_inputs = {i["name"] for i in config.get("input", [])}
    declared_outputs = {o["name"] for o in config.get("output", [])}
    if not declared_inputs >= CONTRACT_INPUTS or "text_output" not in declared_outputs:
        problems.append(
            f"{args.model} does not declare the guard contract: {sorted(declared_inputs)}"
        )
    outputs = ["text_output"] + ([RATING_LOG_PROB] if RATING_LOG_PROB in declared_outputs else [])
    parameters = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
    sys.path.insert(0, str(REPO))  # the consumer's policies, assembled as it sends them
    from service.core.policies import PolicyRegistry

    policy = PolicyRegistry.policy_in(args.policy)
    prompt = policy.render_prompt()
    schema = json.loads(args.schema.read_text()) if args.schema else None
    image = load_image(args.image, args.max_side)
    sampling = {"max_tokens": args.max_tokens, "temperature": 0.2, "top_p": 0.95, "top_k": 50}
    body, header_length = infer_body(prompt, image, sampling, outputs)

    sequential = [guard.infer(body, header_length) for _ in range(args.sequential)]
    started = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        burst = list(pool.map(lambda _: guard.infer(body, header_length), range(args.burst)))
    burst_seconds = time.perf_counter() - started

    for result in sequential + burst:
        found = unreadable(result.text, policy)
        if schema is not None:
            found += check_answer(result.text, schema)
        problems += [f"answer {result.text!r}: {p}" for p in found]
        if RATING_LOG_PROB in outputs:
            value = result.rating_log_prob
            if value is None or not (math.isfinite(value) and value <= 0.0):
                problems.append(f"rating_log_prob {value} is not a log-probability")
    latencies = [r.seconds for r in sequential]
    summary = {
        "model": {
            "name": parameters.get("guard_model_name"),
            "version": parameters.get("guard_model_version"),
        },
        "image": list(image.shape),
        "answer": sequential[0].text if sequential else None,
        "rating_log_prob": sequential[0].rating_log_prob if sequential else None,
        "confidence": (
            math.exp(sequential[0].rating_log_prob)
            if sequential
            and sequential[0].rating_log_prob is not None
            and math.isfinite(sequential[0].rating_log_prob)
            else None
        ),
        "latency_s": {
            "n": len(latencies),
            "p50": percentile(latencies, 0.5) if latencies else None,
            "p95": percentile(latencies, 0.95) if latencies else None,
            "max": max(latencies) if latencies else None,
        },
        "throughput": {
            "requests": args.burst,
            "concurrency": args.concurrency,
            "seconds": burst_seconds,
            "images_per_s": args.burst / burst_seconds if args.burst else None,
        },
    }
    return summary, problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://localhost:8000", help="Triton's HTTP endpoint")
    parser.add_argument("--model", default="guard")
    parser.add_argument("--policy", type=Path, required=True, help="a service/policies/*.toml")
    parser.add_argument("--schema", type=Path, help="the answer's JSON schema, to check answers")
    parser.add_argument("--image", type=Path, help="an image file (default: a synthetic one)")
    parser.add_argument("--max-side", type=int, default=1024, help="the consumer's resize side")
    parser.add_argument("--max-tokens", type=int, default=500)
    parser.add_argument("--sequential", type=int, default=3, help="requests one at a time")
    parser.add_argument("--burst", type=int, default=32, help="requests sent concurrently")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    args = parser.parse_args(argv)
    summary, problems = run(args)
    print(json.dumps(summary, indent=2))
    for problem in problems:
        print(f"smoke test: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
