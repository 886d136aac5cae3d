"""`python -m service eval MANIFEST`: measure the guard on labelled images, as the service judges.

Every item goes through the service's own `Pipeline` (decode → guard → answer parsing →
decision), built by `service.app` from the same settings, as a raw-image record (the file's
bytes, `event-id` and `policy-id` headers) or, for a URL, an `image.url` event fetched by the
service's SSRF-safe fetcher. Known content (banks, reuse) is off: eval measures the guard and the
policy. Items with policy exceptions are judged under the derived policy LlavaGuard's
augmentations describe (`PolicyRegistry.with_exceptions`).

Each result is appended to OUT/results.jsonl as it comes, so a crash or Ctrl-C keeps what was
judged and the next run judges only the rest (OUT/run.json pins the manifest and the model: a
resumed run never mixes two). The metrics and reports are `service.core.evaluation` and
`service.reports`; ICM-Assistant's MQA rows are asked as `ask` asks.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import mimetypes
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import orjson
from tqdm import tqdm

from service import compare, reports
from service.adapters.rules_source import InvalidRules, RulesFiles
from service.adapters.triton import GuardClient
from service.app import batch_pipeline
from service.ask import AskLimits, Conversation, subject_for
from service.client import encode_event, image_event
from service.config import Settings
from service.core.errors import GuardstreamError
from service.core.evaluation import Judged, mqa_correct
from service.core.pipeline import Pipeline, Record
from service.core.verdicts import DeadLetter
from service.manifests import Format, Item, Manifest, Question, read_manifest

T = TypeVar("T", Judged, dict[str, Any])


class EvalRefused(ValueError):
    """The run cannot start as asked; the message says why, in one line."""


@dataclasses.dataclass(frozen=True)
class Options:
    fmt: Format = "auto"
    policy_id: str | None = None
    concurrency: int = 4
    restart: bool = False
    progress: bool = True


async def evaluate(
    settings: Settings, manifest_path: Path, out: Path, options: Options = Options()
) -> dict[str, Any]:
    """Judge every item of the manifest not yet in OUT/results.jsonl, then write and return the
    report document (`service.reports.report_document`)."""
    default_policy = options.policy_id or settings.default_policy
    rules = RulesFiles.from_settings(settings).load()
    manifest = read_manifest(manifest_path, rules.policies, default_policy, options.fmt)
    if not manifest.items and not manifest.questions:
        raise EvalRefused(f"{manifest_path}: no usable rows ({len(manifest.rejected)} rejected)")
    assert manifest.policies is not None
    rules = dataclasses.replace(rules, policies=manifest.policies)
    # An eval image is a file, not a Kafka record: only the image limits apply to it.
    settings = settings.model_copy(
        update={"max_event_bytes": max(settings.max_event_bytes, settings.max_image_bytes)}
    )
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (once, before any I/O waits)
    started_at = datetime.now(UTC)
    async with batch_pipeline(settings, rules) as batch:
        model = batch.model
        _pin_run(out, manifest_path, model, options.restart)
        results = out / "results.jsonl"
        done = {} if options.restart else _read_results(results, Judged)
        pending = [item for item in manifest.items if item.id not in done]
        clock = time.perf_counter()
        judged = await _each(
            pending,
            lambda item: _judge(batch.pipeline, item),
            results,
            options,
            restart=options.restart,
        )
        elapsed = time.perf_counter() - clock
        answers = await _ask_questions(settings, batch.guard, manifest, out / "mqa.jsonl", options)
    everything = {**done, **{j.id: j for j in judged}}
    items = [everything[item.id] for item in manifest.items if item.id in everything]
    meta = {
        "manifest": str(manifest_path),
        "manifest_sha256": _sha256(manifest_path),
        "rows": manifest.rows,
        "rejected": [{"line": line, "why": why} for line, why in manifest.rejected],
        "default_policy": default_policy,
        "model": f"{model[0]} {model[1]}",
        "triton_model": settings.guard_model,
        "triton_url": settings.triton_url,
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "judged_this_run": len(judged),
        "resumed": len(done),
        "items_per_s": round(len(judged) / elapsed, 3) if judged and elapsed > 0 else None,
        "concurrency": options.concurrency,
        "mqa": _mqa_summary(answers),
    }
    document = reports.report_document(items, meta)
    (out / "report.json").write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
    reports.write_html(document, out / "report.html")
    return document


async def _judge(pipeline: Pipeline, item: Item) -> Judged:
    started = time.perf_counter()
    outcome = await pipeline.judge(_record(item))
    latency_ms = round((time.perf_counter() - started) * 1000, 3)
    judged = Judged(
        id=item.id,
        line=item.line,
        expected_rating=item.expected_rating,
        expected_category=item.expected_category,
        policy=item.policy,
        exceptions=item.exceptions,
        tags=item.tags,
        rating=None,
        category=None,
        confidence=None,
        action=None,
        error=None,
        message=None,
        latency_ms=latency_ms,
    )
    if isinstance(outcome, DeadLetter):
        return dataclasses.replace(judged, error=outcome.error.code, message=outcome.error.message)
    return dataclasses.replace(
        judged,
        rating=outcome.rating,
        category=outcome.category_code,
        confidence=outcome.confidence,
        action=outcome.action,
        message=outcome.rationale,
    )


def _record(item: Item) -> Record:
    """The item as the consumer would have read it: raw image bytes, or a URL event."""
    if "://" in item.image:
        event = image_event(item.id, url=item.image, policy_id=item.policy)
        return Record("eval", 0, item.line, item.id.encode(), encode_event(event), ())
    content_type = mimetypes.guess_type(item.image)[0] or "image/unknown"
    headers = (
        ("content-type", content_type.encode()),
        ("event-id", item.id.encode()),
        ("policy-id", item.policy.encode()),
    )
    return Record("eval", 0, item.line, item.id.encode(), Path(item.image).read_bytes(), headers)


async def _ask_questions(
    settings: Settings, guard: GuardClient, manifest: Manifest, results: Path, options: Options
) -> list[dict[str, Any]]:
    """ICM-Assistant's MQA rows: each question asked on its own, as `ask` asks it."""
    done = {} if options.restart else _read_results(results, _fields)
    pending = [q for q in manifest.questions if q.id not in done]
    limits = AskLimits.from_settings(settings)

    async def ask(question: Question) -> dict[str, Any]:
        try:
            subject = await subject_for(question.image, settings, events=False)
            answer = await Conversation(guard, subject.image.pixels, limits).ask(question.question)
        except (GuardstreamError, OSError, ValueError) as exc:
            return {"id": question.id, "expected": question.expected, "error": str(exc)}
        correct = mqa_correct(answer.text, question.expected)
        return {"id": question.id, "expected": question.expected, "answer": answer.text} | {
            "correct": correct
        }

    asked = await _each(pending, ask, results, options, restart=options.restart)
    return [*done.values(), *asked]


def _fields(**values: Any) -> dict[str, Any]:
    return values


def _mqa_summary(answers: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not answers:
        return None
    correct = sum(1 for answer in answers if answer.get("correct"))
    return {"correct": correct, "total": len(answers), "accuracy": correct / len(answers)}


async def _each(
    items: list[Any],
    work: Callable[[Any], Awaitable[T]],
    results: Path,
    options: Options,
    *,
    restart: bool,
) -> list[T]:
    """`work` on every item, `concurrency` at a time, each result appended to `results` as it
    comes (one JSON line, flushed): an interrupted run keeps every finished item."""
    if not items and not restart:
        return []
    gate = asyncio.Semaphore(max(1, options.concurrency))
    finished: list[T] = []
    bar = tqdm(
        total=len(items), unit="item", file=sys.stderr, disable=not options.progress or not items
    )
    with results.open("wb" if restart else "ab") as sink, bar:

        async def one(item: Any) -> None:
            async with gate:
                result = await work(item)
            line = dataclasses.asdict(result) if isinstance(result, Judged) else result
            sink.write(orjson.dumps(line) + b"\n")
            sink.flush()
            finished.append(result)
            bar.update()

        async with asyncio.TaskGroup() as group:
            for item in items:
                group.create_task(one(item))
    return finished


def _read_results(path: Path, kind: Callable[..., T]) -> dict[str, T]:
    """What an earlier run judged, by id; a line cut short by a crash is judged again."""
    if not path.exists():
        return {}
    done: dict[str, T] = {}
    for line in path.read_bytes().splitlines():
        try:
            values = orjson.loads(line)
            if "exceptions" in values:
                values["exceptions"] = tuple(values["exceptions"])
            done[values["id"]] = kind(**values)
        except (orjson.JSONDecodeError, TypeError, KeyError):
            continue
    return done


def _pin_run(out: Path, manifest: Path, model: tuple[str, str], restart: bool) -> None:
    """Refuse to resume results judged on another manifest or by another model."""
    pin = {"manifest_sha256": _sha256(manifest), "model": list(model)}
    run = out / "run.json"
    if run.exists() and not restart:
        earlier = orjson.loads(run.read_bytes())
        if earlier != pin:
            raise EvalRefused(
                f"{out} holds results of another manifest or model ({earlier['model']}); "
                "give --restart or another --out"
            )
    run.write_bytes(orjson.dumps(pin))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def command(settings: Settings, args: argparse.Namespace) -> int:
    if args.write_samples is not None:
        from service.dev.samples import write_eval_samples

        print(f"wrote {write_eval_samples(args.write_samples)}")
        return 0
    if args.compare:
        return _compare_command(args)
    if args.manifest is None:
        print("eval: give a MANIFEST, or --compare A.json B.json", file=sys.stderr)
        return 2
    out = args.out or Path(".guardstream/eval") / args.manifest.stem
    options = Options(
        fmt=args.format,
        policy_id=args.policy,
        concurrency=args.concurrency,
        restart=args.restart,
        progress=not args.no_progress,
    )
    try:
        document = asyncio.run(evaluate(settings, args.manifest, out, options))
    except KeyboardInterrupt:
        print(f"eval: interrupted; what was judged is in {out}: run again to resume")
        return 130
    except (EvalRefused, ValueError, OSError, InvalidRules, GuardstreamError) as exc:
        print(f"eval: {exc}", file=sys.stderr)
        return 1
    _print_rejected(document["meta"]["rejected"])
    print("\n".join(reports.terminal_lines(document)))
    print(f"report        {out / 'report.html'} (and report.json, results.jsonl)")
    return 0


def _print_rejected(rejected: Iterable[dict[str, Any]]) -> None:
    for row in rejected:
        print(f"skipped line {row['line']}: {row['why']}", file=sys.stderr)


def _compare_command(args: argparse.Namespace) -> int:
    out = args.out or Path(".guardstream/eval/compare")
    try:
        a, b = (orjson.loads(path.read_bytes()) for path in args.compare)
        result = compare.compare(a, b, max(100, args.resamples))
    except (OSError, orjson.JSONDecodeError, KeyError, ValueError) as exc:
        print(f"eval --compare: {exc}", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    compare.write_compare_html(result, out / "compare.html")
    print("\n".join(compare.compare_lines(result)))
    print(f"report        {out / 'compare.html'} (and compare.json)")
    return 0
