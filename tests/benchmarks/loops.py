"""The programs guardstream is compared with, each run as a child process by the benchmark.

    python -m tests.benchmarks.loops kafka    # ceiling A: consume and produce, nothing else
    python -m tests.benchmarks.loops triton   # ceiling B: the pixel tensors to Triton, no Kafka
    python -m tests.benchmarks.loops naive    # baseline: one record at a time, start to finish
    python -m tests.benchmarks.loops essential  # ceiling C: only the work that cannot be skipped

They read the service's own GUARDSTREAM_* settings (addresses, topics, group, limits), so each
is pointed at the same broker, topics and Triton as the service it is compared with. `kafka`,
`naive` and `essential` run until SIGTERM, as the service does; `triton` runs its concurrency
levels and writes what it measured to --json.

- **kafka** consumes the input records and, for each, produces a verdict-sized record keyed
  like it, then commits: aiokafka at its best (whole fetched batches sent at once, their
  acknowledgements awaited together, one commit per batch), no decoding, no Triton.
- **triton** decodes the images once, builds their request tensors once (the service's own
  `request_tensors`, so the same tensor contract and bytes), then keeps `c` requests in flight
  with a bare `tritonclient.grpc.aio` client for a few seconds per level `c`.
- **naive** is what a framework handler does by default: take one record, judge it (the
  service's own `Pipeline`, so the same parsing, decoding, guard call and verdict), publish the
  outcome and wait for the acknowledgement, commit, take the next.
- **essential** does only the work no consumer of these events can skip, by hand and with
  GUARDSTREAM_MAX_IN_FLIGHT events in flight: consume; take `image.data` or `image.url` out of
  the JSON (orjson, no validation); fetch a URL with the service's own `Fetcher` and decode
  with the service's own `decode_inline` / `decode_image` on GUARDSTREAM_DECODE_WORKERS
  threads (the same decode, so a faster decode speeds both up); build the service's request
  tensors and send them with a bare `tritonclient.grpc.aio` client; produce a verdict-sized
  record (a dead letter where the image is refused); commit each partition's finished prefix.
  No tracing, metrics, rules, breaker, retries or verdict building: what guardstream does
  beyond this is its overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import resource
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import orjson
import tritonclient.grpc.aio as triton_aio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from tritonclient.grpc import InferInput, InferRequestedOutput

from service.adapters.kafka.consumer import record_from
from service.adapters.rules_source import RulesFiles
from service.adapters.triton import TEXT_OUTPUT, Tensor, request_tensors
from service.app import batch_pipeline, fetcher_from, limits_from, sampling_from
from service.config import Settings
from service.core.errors import GuardstreamError
from service.core.images import decode_image, decode_inline, use_pixel_limit
from service.core.policies import PolicyRegistry
from service.core.verdicts import DeadLetter, serialize
from service.ops.tracing import setup_tracing
from tests.benchmarks.harness import cpu_seconds, process_tree
from tests.benchmarks.report import percentiles

# As large as a verdict of the benchmark guard: what ceiling A publishes per record.
VERDICT_LIKE = orjson.dumps(
    {
        "schema_version": 1,
        "event_id": "bench-00000000-0000000",
        "rating": "Safe",
        "category": "NA: None applying",
        "category_code": "NA",
        "rationale": "Benchmark model: no inference was run; this answer is fixed so that only "
        "the service is measured.",
        "policy_id": "llavaguard-v1.2",
        "policy_version": "1.2.0",
        "model": {
            "name": "fixed-answer-benchmark",
            "version": "1",
            "triton_model": "guard",
            "triton_version": "1",
        },
        "image_sha256": "0" * 64,
        "frames_judged": 1,
        "frame": 0,
        "metadata": {"bench": "00000000"},
        "source": {"topic": "images", "partition": 0, "offset": 1234567},
        "trace_id": "0" * 32,
        "timings": {"fetch_ms": None, "decode_ms": 1.234, "guard_ms": 1.234, "total_ms": 2.345},
        "decided_at": "2026-11-22T10:00:00.123456Z",
    }
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.loops", description=__doc__)
    loops = parser.add_subparsers(dest="loop", required=True)
    loops.add_parser("kafka", help="ceiling A: consume and produce, no decoding, no Triton")
    loops.add_parser("naive", help="baseline: one record at a time, start to finish")
    loops.add_parser("essential", help="ceiling C: consume, decode, infer, produce, commit")
    triton = loops.add_parser("triton", help="ceiling B: the pixel tensors to Triton, no Kafka")
    triton.add_argument("--images", type=Path, nargs="+", required=True, help="encoded images")
    triton.add_argument(
        "--levels", type=int, nargs="+", default=[1, 4, 16, 64], help="requests in flight"
    )
    triton.add_argument("--seconds", type=float, default=3.0, help="per level")
    triton.add_argument(
        "--rate", type=float, help="instead of levels: requests started at this rate per second"
    )
    triton.add_argument("--triton-pid", type=int, help="to read Triton's CPU time per level")
    triton.add_argument("--json", type=Path, required=True, help="where the results go")
    args = parser.parse_args(argv)
    settings = Settings()
    if args.loop == "triton":
        results = asyncio.run(
            triton_ceiling(
                settings, args.images, args.levels, args.seconds, args.triton_pid, args.rate
            )
        )
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        return 0
    loop = {"kafka": kafka_ceiling, "naive": naive, "essential": essential}[args.loop]
    asyncio.run(_until_sigterm(loop(settings)))
    return 0


async def _until_sigterm(work: Awaitable[None]) -> None:
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _consumer(settings: Settings) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        settings.input_topic,
        **settings.kafka_connection(),
        group_id=settings.group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
    )


def _producer(settings: Settings) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        **settings.kafka_connection(),
        acks="all",
        enable_idempotence=settings.enable_idempotence,
        linger_ms=5,
    )


async def _with_clients(
    settings: Settings, work: Callable[[AIOKafkaConsumer, AIOKafkaProducer], Awaitable[None]]
) -> None:
    consumer, producer = _consumer(settings), _producer(settings)
    await producer.start()
    try:
        await consumer.start()
        try:
            await work(consumer, producer)
        finally:
            await consumer.stop()
    finally:
        await producer.stop()


async def kafka_ceiling(settings: Settings) -> None:
    async def work(consumer: AIOKafkaConsumer, producer: AIOKafkaProducer) -> None:
        while True:
            batches = await consumer.getmany(timeout_ms=100)
            deliveries = [
                await producer.send(settings.verdict_topic, value=VERDICT_LIKE, key=record.key)
                for records in batches.values()
                for record in records
            ]
            if deliveries:
                await asyncio.gather(*deliveries)
                await consumer.commit(
                    {tp: records[-1].offset + 1 for tp, records in batches.items() if records}
                )

    await _with_clients(settings, work)


async def naive(settings: Settings) -> None:
    provider = setup_tracing()  # spans are made as in the service (exported nowhere)
    rules = RulesFiles.from_settings(settings).load()
    try:
        async with batch_pipeline(settings, rules) as batch:

            async def work(consumer: AIOKafkaConsumer, producer: AIOKafkaProducer) -> None:
                while True:
                    message = await consumer.getone()
                    outcome = await batch.pipeline.judge(record_from(message))
                    topic = (
                        settings.dead_letter_topic
                        if isinstance(outcome, DeadLetter)
                        else settings.verdict_topic
                    )
                    await producer.send_and_wait(topic, value=serialize(outcome), key=message.key)
                    tp = TopicPartition(message.topic, message.partition)
                    await consumer.commit({tp: message.offset + 1})

            await _with_clients(settings, work)
    finally:
        provider.shutdown()


async def essential(settings: Settings) -> None:
    use_pixel_limit(settings.max_image_pixels)
    limits = limits_from(settings).image
    prompt = PolicyRegistry.load(settings.policy_dir).get(settings.default_policy).render_prompt()
    sampling = sampling_from(settings)
    fetcher = fetcher_from(settings)
    pool = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="decode")
    client = triton_aio.InferenceServerClient(settings.triton_url)
    outputs = [InferRequestedOutput(TEXT_OUTPUT)]
    in_flight = asyncio.Semaphore(settings.max_in_flight)
    dead_letter = orjson.dumps({"error": "refused", "detail": "x" * 200})

    async def handle(producer: AIOKafkaProducer, key: bytes | None, value: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            image = orjson.loads(value)["image"]
            if "data" in image:
                decoded = await loop.run_in_executor(pool, decode_inline, image["data"], limits)
            else:
                assert fetcher is not None, "GUARDSTREAM_FETCH_URLS is off"
                encoded = await fetcher.fetch(image["url"])
                decoded = await loop.run_in_executor(pool, decode_image, encoded, limits)
        except GuardstreamError:
            await (await producer.send(settings.dead_letter_topic, dead_letter, key=key))
            return
        inputs = _inputs(request_tensors(prompt, decoded.pixels, sampling))
        await client.infer(settings.guard_model, inputs, outputs=outputs)
        await (await producer.send(settings.verdict_topic, VERDICT_LIKE, key=key))

    async def work(consumer: AIOKafkaConsumer, producer: AIOKafkaProducer) -> None:
        pending: dict[TopicPartition, collections.deque[tuple[int, asyncio.Task[None]]]] = {}

        def started(task: asyncio.Task[None]) -> None:
            task.add_done_callback(lambda _: in_flight.release())

        while True:
            batches = await consumer.getmany(timeout_ms=20, max_records=settings.max_in_flight)
            for tp, records in batches.items():
                for record in records:
                    await in_flight.acquire()
                    task = asyncio.create_task(handle(producer, record.key, record.value))
                    started(task)
                    pending.setdefault(tp, collections.deque()).append((record.offset, task))
            in_progress = [task for queue in pending.values() for _, task in queue]
            if not batches and in_progress:
                # Nothing new: wait for something in flight to finish, then commit.
                await asyncio.wait(in_progress, return_when=asyncio.FIRST_COMPLETED)
            commits = {}
            for tp, queue in pending.items():
                while queue and queue[0][1].done():
                    offset, task = queue.popleft()
                    task.result()  # a failure (Triton down) ends the loop, loudly
                    commits[tp] = offset + 1
            if commits:
                await consumer.commit(commits)

    try:
        await _with_clients(settings, work)
    finally:
        await client.close()
        if fetcher is not None:
            await fetcher.close()
        pool.shutdown()


async def triton_ceiling(
    settings: Settings,
    images: list[Path],
    levels: list[int],
    seconds: float,
    triton_pid: int | None,
    rate: float | None = None,
) -> list[dict[str, float]]:
    """Requests per second, latency and CPU at each level of requests in flight, or (`rate`)
    with requests started at a fixed rate whatever is in flight."""
    limits = limits_from(settings).image
    prompt = PolicyRegistry.load(settings.policy_dir).get(settings.default_policy).render_prompt()
    sampling = sampling_from(settings)
    pixels = []
    for path in images:
        try:
            pixels.append(decode_image(path.read_bytes(), limits).pixels)
        except GuardstreamError as exc:  # refused by the service too: no request to measure
            print(f"{path.name}: {exc}", file=sys.stderr)
    if not pixels:
        return []
    requests = [_inputs(request_tensors(prompt, p, sampling)) for p in pixels]
    client = triton_aio.InferenceServerClient(settings.triton_url)
    outputs = [InferRequestedOutput(TEXT_OUTPUT)]
    latencies: list[float] = []

    async def infer(index: int) -> None:
        started = time.perf_counter()
        await client.infer(settings.guard_model, requests[index % len(requests)], outputs=outputs)
        latencies.append(time.perf_counter() - started)

    async def closed_loop(level: int) -> None:
        stop_at = time.perf_counter() + seconds

        async def worker(index: int) -> None:
            while time.perf_counter() < stop_at:
                await infer(index)
                index += level

        await asyncio.gather(*(worker(i) for i in range(level)))

    async def paced(rate: float) -> None:
        started, pending = time.perf_counter(), []
        for index in range(round(rate * seconds)):
            await asyncio.sleep(max(0.0, started + index / rate - time.perf_counter()))
            pending.append(asyncio.create_task(infer(index)))
        await asyncio.gather(*pending)

    results = []
    try:
        for index in range(len(requests) * 4):  # connection, Triton's first batches
            await infer(index)
        for level in [0] if rate is not None else levels:
            latencies.clear()
            cpu, triton = _own_cpu(), _triton_cpu(triton_pid)
            started = time.perf_counter()
            await (paced(rate) if rate is not None else closed_loop(level))
            wall = time.perf_counter() - started
            p50, p95, p99 = percentiles([1000 * s for s in latencies], (50, 95, 99))
            results.append(
                {
                    "in_flight": level,
                    "requests": len(latencies),
                    "seconds": wall,
                    "per_s": len(latencies) / wall,
                    "p50_ms": p50,
                    "p95_ms": p95,
                    "p99_ms": p99,
                    "cpu_s": _own_cpu() - cpu,
                    "triton_cpu_s": _triton_cpu(triton_pid) - triton,
                    "tensor_bytes": float(np.mean([p.nbytes for p in pixels])),
                    # Linux reports ru_maxrss in KiB.
                    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                }
            )
    finally:
        await client.close()
    return results


def _inputs(tensors: list[Tensor]) -> list[InferInput]:
    """The service's request tensors as tritonclient takes them (made once per image)."""
    inputs = []
    for tensor in tensors:
        infer_input = InferInput(tensor.name, list(tensor.array.shape), tensor.datatype)
        infer_input.set_data_from_numpy(tensor.array)
        inputs.append(infer_input)
    return inputs


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _triton_cpu(pid: int | None) -> float:
    return cpu_seconds(process_tree(pid)) if pid is not None else 0.0


if __name__ == "__main__":
    sys.exit(main())
