"""Command line: `python -m service <command>`; `--help` documents every command and setting."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, get_args

from pydantic import ValidationError
from pydantic_settings import BaseSettings

from service import contract
from service.adapters.kafka.delivery import PublishFailed
from service.adapters.rules_source import InvalidRules
from service.commands import (
    add_banks_parser,
    add_dlq_parser,
    add_eval_parser,
    add_replay_parser,
)
from service.config import ENV_PREFIX, Settings
from service.core.errors import GuardstreamError
from service.dev import stack
from service.ops.logs import setup_logging
from service.shadow import SHADOW_PREFIX, ShadowSettings

log = logging.getLogger("service")

_OTEL_HELP = """\
OpenTelemetry (standard variables, read by the SDK):
  OTEL_SERVICE_NAME              service.name of the spans (default: guardstream)
  OTEL_TRACES_EXPORTER           otlp | console | none (default: otlp when an OTLP endpoint is
                                 set, else none)
  OTEL_EXPORTER_OTLP_ENDPOINT    collector address, e.g. http://otel-collector:4317
  OTEL_EXPORTER_OTLP_PROTOCOL    grpc (default) | http/protobuf
  OTEL_TRACES_SAMPLER[_ARG]      e.g. parentbased_traceidratio with 0.1
  OTEL_RESOURCE_ATTRIBUTES       extra resource attributes, k=v,k=v
"""


def settings_help() -> str:
    """Every GUARDSTREAM_* setting with its default and meaning, from the settings models."""
    lines = ["Settings (environment variables; defaults in brackets):"]
    groups: list[tuple[str, type[BaseSettings]]] = [
        (ENV_PREFIX, Settings),
        (SHADOW_PREFIX, ShadowSettings),
    ]
    for prefix, model in groups:
        for name, field in model.model_fields.items():
            default = field.default
            shown = "unset" if default is None else default
            lines.append(f"  {prefix}{name.upper()}  [{shown}]")
            lines += textwrap.wrap(
                field.description or "", width=92, initial_indent=" " * 6, subsequent_indent=" " * 6
            )
    return "\n".join(lines) + "\n\n" + _OTEL_HELP


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="guardstream: judge image events from Kafka with a guard model in Triton "
        "and publish verdicts.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=settings_help(),
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser(
        "run",
        help="consume image events and publish verdicts until SIGTERM/SIGINT",
        description="Consume image events, judge each with the guard model, publish verdicts "
        "and dead letters, commit offsets. Stops cleanly on SIGTERM or SIGINT: fetching stops, "
        "in-flight events finish within GUARDSTREAM_DRAIN_TIMEOUT_S, offsets are committed. "
        "SIGHUP reloads the policy files and the tenant file.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=settings_help(),
    )

    stack_parser = commands.add_parser(
        "stack",
        help="start, inspect or stop the embedded broker + Triton (development)",
        description="The embedded development stack: a Kafka-protocol broker (noida-db) and a "
        "CPU tritonserver serving triton_models/cpu, both from PyPI wheels, run in the "
        "background. `up` prints the addresses to point the service at.",
    )
    stack_parser.add_argument("action", choices=["up", "status", "down"])
    _add_stack_options(stack_parser)

    demo = commands.add_parser(
        "demo",
        help="run the whole flow on the embedded stack with sample images, showing outcomes",
        description="Start the embedded stack (unless one runs), start `run` as a child "
        "process, publish sample photos, generated images and bad events, print each verdict "
        "or dead letter as it arrives, then stop everything it started.",
    )
    _add_stack_options(demo)
    demo.add_argument(
        "--keep-stack", action="store_true", help="leave the stack running afterwards"
    )

    schemas = commands.add_parser(
        "schemas",
        help="write the JSON Schema files of the event contract (service/schemas/)",
    )
    schemas.add_argument(
        "--check", action="store_true", help="exit 1 if the committed files are stale"
    )

    produce = commands.add_parser(
        "produce",
        help="publish image files as events (uses GUARDSTREAM_BOOTSTRAP_SERVERS/INPUT_TOPIC)",
    )
    produce.add_argument("files", nargs="+", type=Path, help="image files to publish")
    produce.add_argument("--policy-id", default=None, help="policy to judge against")
    produce.add_argument("--tenant", default=None, help="tenant the uploads belong to")

    ask = commands.add_parser(
        "ask",
        help="a conversation with the guard about one image (uses GUARDSTREAM_TRITON_URL, "
        "GUARDSTREAM_GUARD_MODEL and, for an event id, the Kafka settings)",
        description="Ask the guard model questions about one image, each answer kept in the "
        "conversation: e.g. the policy's verdict, then 'Which rule?', then 'Why?'. The CPU "
        "guard is a detector: it answers follow-ups with its judgement and says it cannot "
        "answer more. Caps: GUARDSTREAM_ASK_MAX_QUESTIONS, GUARDSTREAM_ASK_MAX_QUESTION_CHARS, "
        "GUARDSTREAM_ASK_MAX_TOKENS, and the image limits of the service.",
    )
    ask.add_argument(
        "source",
        help="an image file, an http(s) URL (fetched with the service's SSRF checks), or the "
        "event_id of an event in the input topic",
    )
    ask.add_argument(
        "questions",
        nargs="*",
        help="questions, asked in order; '-' reads one question per line from stdin",
    )
    ask.add_argument(
        "--policy",
        default=None,
        help="policy whose prompt is the first question (default: the event's policy, or the "
        "default policy for a file or URL)",
    )
    ask.add_argument(
        "--no-policy",
        action="store_true",
        help="do not ask the policy prompt first: the first question is yours",
    )

    add_eval_parser(commands)
    add_replay_parser(commands)
    add_banks_parser(commands)
    add_dlq_parser(commands)
    return parser


class _StackOption(NamedTuple):
    """A `stack.StackConfig` field as a command-line option: `--kafka-port` sets kafka_port."""

    field: str
    type: Callable[[str], object]
    help: str
    choices: tuple[str, ...] | None = None


_STACK_OPTIONS = (
    _StackOption("state_dir", Path, "where pids, logs and broker data live"),
    _StackOption("kafka_port", int, "broker port"),
    _StackOption("triton_http_port", int, "Triton HTTP port"),
    _StackOption("triton_grpc_port", int, "Triton gRPC port"),
    _StackOption("triton_metrics_port", int, "Triton metrics port"),
    _StackOption("model_repository", Path, "Triton model repository"),
    _StackOption("partitions", int, "partitions of the topics it creates"),
    _StackOption(
        "broker",
        str,
        "noida-db (transactions, keeps its data) or tansu (in memory, refuses idempotent "
        "producers: run the service with GUARDSTREAM_ENABLE_IDEMPOTENCE=false)",
        choices=get_args(stack.Broker),
    ),
)


def _add_stack_options(parser: argparse.ArgumentParser) -> None:
    defaults = stack.StackConfig()
    for option in _STACK_OPTIONS:
        parser.add_argument(
            f"--{option.field.replace('_', '-')}",
            type=option.type,
            choices=option.choices,
            default=getattr(defaults, option.field),
            help=f"{option.help} [%(default)s]",
        )


def stack_config(args: argparse.Namespace) -> stack.StackConfig:
    return stack.StackConfig(
        **{option.field: getattr(args, option.field) for option in _STACK_OPTIONS}
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"invalid settings:\n{exc}", file=sys.stderr)
        return 2
    setup_logging(
        settings.log_level, json_format=args.command == "run" and settings.log_format == "json"
    )
    if args.command == "run":
        return run(settings)
    if args.command == "stack":
        return stack_command(args)
    if args.command == "demo":
        from service.dev.demo import run_demo

        return run_demo(stack_config(args), keep_stack=args.keep_stack)
    if args.command == "schemas":
        return schemas_command(check=args.check)
    if args.command == "ask":
        return ask_command(settings, args)
    if args.command == "eval":
        from service import evaluate

        return evaluate.command(settings, args)
    if args.command == "replay":
        from service import replay

        return replay.command(settings, args)
    if args.command == "banks":
        from service import banks

        return banks.command(settings, args)
    if args.command == "dlq":
        from service import dlq

        return dlq.command(settings, args)
    return produce_command(settings, args.files, args.policy_id, args.tenant)


def run(settings: Settings) -> int:
    from service.app import serve
    from service.ops.tracing import setup_tracing

    provider = setup_tracing()

    async def serve_until_signalled() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop)

    try:
        asyncio.run(serve_until_signalled())
    except (GuardstreamError, PublishFailed) as exc:
        log.error("stopped: %s", exc)
        return 1
    except InvalidRules as exc:
        log.error("refusing to start: %s", exc)
        return 1
    finally:
        provider.shutdown()
    log.info("stopped cleanly")
    return 0


def stack_command(args: argparse.Namespace) -> int:
    config = stack_config(args)
    if args.action == "up":
        try:
            state = stack.up(config)
        except stack.StackError as exc:
            print(f"stack did not start: {exc}", file=sys.stderr)
            return 1
        print(state.describe())
        print(f"logs              {config.state_dir}/kafka.log, {config.state_dir}/triton.log")
        return 0
    if args.action == "status":
        recorded, checks = stack.status(config.state_dir)
        if recorded is not None:
            print(recorded.describe())
        print("\n".join(checks))
        return 0 if recorded is not None and all(c.endswith("ok") for c in checks) else 1
    stopped = stack.down(config.state_dir)
    print("stack stopped" if stopped else f"no stack recorded in {config.state_dir}")
    return 0


def schemas_command(*, check: bool) -> int:
    if check:
        stale = contract.stale()
        for name in stale:
            print(f"stale: service/schemas/{name} (run: python -m service schemas)")
        return 1 if stale else 0
    for path in contract.write():
        print(f"wrote {path}")
    return 0


def produce_command(
    settings: Settings, files: list[Path], policy_id: str | None, tenant: str | None = None
) -> int:
    from service.client import ImageEventProducer, image_event

    async def publish() -> None:
        connection = settings.kafka_connection()
        bootstrap = connection.pop("bootstrap_servers")
        async with ImageEventProducer(bootstrap, settings.input_topic, **connection) as out:
            for path in files:
                event_id = f"{path.stem}-{uuid.uuid4().hex[:12]}"
                event = image_event(
                    event_id, image=path.read_bytes(), policy_id=policy_id, tenant=tenant
                )
                sent = await out.send(event)
                print(f"{path}: event {event_id} at {sent.topic}[{sent.partition}]@{sent.offset}")

    asyncio.run(publish())
    return 0


def ask_command(settings: Settings, args: argparse.Namespace) -> int:
    from aiokafka.errors import KafkaError

    from service.adapters.kafka.lookup import EventNotFound
    from service.ask import QuestionRefused, converse

    questions: list[str] = []
    for question in args.questions:
        if question == "-":
            questions += [line for line in sys.stdin.read().splitlines() if line.strip()]
        else:
            questions.append(question)
    if args.no_policy and not questions:
        print("ask: no question to ask (give one, or leave out --no-policy)", file=sys.stderr)
        return 2
    try:
        asyncio.run(
            converse(
                settings,
                args.source,
                questions,
                policy_id=args.policy,
                policy=not args.no_policy,
            )
        )
    except (QuestionRefused, EventNotFound, InvalidRules, GuardstreamError, KafkaError) as exc:
        # KafkaError: the broker, asked for an event id, cannot be reached or refuses.
        print(f"ask: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, QuestionRefused) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
