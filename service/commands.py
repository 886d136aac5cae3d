"""The command-line parsers of the tools beside the consumer: eval, replay, banks and dlq.

Only argparse here, so `python -m service --help` stays quick; each command's handler lives in
its own module (`service.evaluate`, `service.replay`, `service.banks`, `service.dlq`) and is
imported when run.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from service.core.bank_files import FORMATS
from service.core.banks import HASH_KINDS

if TYPE_CHECKING:  # subscriptable only to type checkers
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]


def add_eval_parser(commands: Commands) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="measure the guard on a labelled manifest (LlavaGuard's and ICM-Assistant's "
        "metrics), or compare two reports",
        description="Judge every image of a labelled manifest through the service's own "
        "decode → guard → answer path against GUARDSTREAM_TRITON_URL, then print LlavaGuard's "
        "metrics (balanced accuracy, precision, recall, specificity, F1, policy-exception "
        "recall, per-category recall), ICM-Assistant's accuracy, the unparseable-answer rate, "
        "latency percentiles and, when the guard reports confidence, calibration. Writes "
        "OUT/results.jsonl (kept as items finish: a second run resumes), OUT/report.json and "
        "OUT/report.html. Manifests: JSON Lines or CSV (image, expected_rating, "
        "expected_category, policy_id, exceptions, split, source, id), or LlavaGuard-DS's own "
        "JSON. With --compare A.json B.json: which metrics and categories moved, with "
        "bootstrap confidence intervals.",
    )
    evaluate.add_argument(
        "manifest", type=Path, nargs="?", help="the labelled manifest (.jsonl, .csv or .json)"
    )
    evaluate.add_argument(
        "--compare",
        nargs=2,
        type=Path,
        metavar=("A.json", "B.json"),
        help="compare two eval reports instead of running one (B against A)",
    )
    evaluate.add_argument(
        "--format",
        choices=["auto", "jsonl", "csv", "llavaguard"],
        default="auto",
        help="manifest format; auto goes by the file's extension [%(default)s]",
    )
    evaluate.add_argument(
        "--policy",
        default=None,
        help="policy of items that name none (default: GUARDSTREAM_DEFAULT_POLICY)",
    )
    evaluate.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where results.jsonl, report.json and report.html go "
        "[.guardstream/eval/<manifest name>, or .guardstream/eval/compare]",
    )
    evaluate.add_argument(
        "--concurrency", type=int, default=4, help="images judged at a time [%(default)s]"
    )
    evaluate.add_argument(
        "--restart",
        action="store_true",
        help="judge every item again instead of resuming from OUT/results.jsonl",
    )
    evaluate.add_argument(
        "--resamples",
        type=int,
        default=2000,
        help="bootstrap resamples of --compare's confidence intervals [%(default)s]",
    )
    _add_progress_option(evaluate)
    evaluate.add_argument(
        "--write-samples",
        type=Path,
        metavar="DIR",
        default=None,
        help="write the sample photos and a labelled manifest of them to DIR, and exit (to try "
        "eval on the embedded stack)",
    )


def _add_rate_option(parser: argparse.ArgumentParser, what: str, default: float) -> None:
    parser.add_argument(
        "--rate",
        type=float,
        default=default,
        help=f"{what} per second at most; 0: no limit [%(default)s]",
    )


def _add_progress_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (e.g. in CI logs)"
    )


def _add_range_options(parser: argparse.ArgumentParser, whose: str) -> None:
    """--since/--until/--offsets as replay and dlq take them; `whose` names the timestamps."""
    parser.add_argument(
        "--since", default=None, help=f"first timestamp{whose} (ISO 8601, e.g. 2026-12-07T10:00Z)"
    )
    parser.add_argument(
        "--until",
        default=None,
        help=f"end timestamp{whose}, exclusive (ISO 8601) [the end of the topic]",
    )
    parser.add_argument(
        "--offsets",
        action="append",
        default=[],
        metavar="P:FIRST-END",
        help="a partition's offsets, END exclusive, e.g. 0:100-250 (repeatable; instead of "
        "--since/--until)",
    )


def add_replay_parser(commands: Commands) -> None:
    replay = commands.add_parser(
        "replay",
        help="judge a range of the input topic again under a chosen policy or model, into "
        "verdicts.replay, with a diff report against the original verdicts",
        description="Read a range of GUARDSTREAM_INPUT_TOPIC (by timestamps, or offsets per "
        "partition) without joining the consumer group, judge each event again through the "
        "service's pipeline, publish the verdicts (marked as replays, naming the verdict they "
        "supersede) to --topic, rate-limited so live consumers are not starved, and stop at "
        "the end of the range. Resumable: the same --run-id continues where it stopped. Then "
        "a diff report against the verdicts originally published on "
        "GUARDSTREAM_VERDICT_TOPIC: how many changed rating, category or action, per "
        "category, with event ids (terminal, JSON and HTML).",
    )
    _add_range_options(replay, "")
    replay.add_argument(
        "--policy", default=None, help="judge every event under this policy [the event's own]"
    )
    replay.add_argument(
        "--model", default=None, help="Triton model to ask [GUARDSTREAM_GUARD_MODEL]"
    )
    replay.add_argument(
        "--topic",
        default=None,
        help="topic of the replay verdicts; dead letters go to TOPIC.dlq [verdicts.replay]",
    )
    _add_rate_option(replay, "events judged", 20.0)
    replay.add_argument(
        "--concurrency", type=int, default=4, help="events judged at a time [%(default)s]"
    )
    replay.add_argument(
        "--run-id", default=None, help="resume this run (default: a new run id is printed)"
    )
    replay.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the run's progress and diff report [.guardstream/replay/<run id>]",
    )
    _add_progress_option(replay)


def add_banks_parser(commands: Commands) -> None:
    banks = commands.add_parser(
        "banks",
        help="add, remove, import or list hash-bank entries on the banks topic (uses the Kafka "
        "settings, GUARDSTREAM_BANKS_TOPIC and GUARDSTREAM_BANKS_FILE)",
        description="Publish hash-bank entries to the compacted banks topic, which every pod "
        "reads whole and follows: an entry added or removed here reaches every pod within a "
        "poll. The topic is created (compacted) if missing. With GUARDSTREAM_BANKS_FILE set, "
        "the bank must be one it names.",
    )
    actions = banks.add_subparsers(dest="banks_action", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="add (or replace) one entry")
    remove = actions.add_parser("remove", help="remove one entry (publishes a tombstone)")
    for parser in (add, remove):
        parser.add_argument("bank", help="bank name, e.g. known-bad")
        parser.add_argument("kind", choices=HASH_KINDS, help="hash kind")
        parser.add_argument("value", help="the hash, hex: 64 digits for pdq, sha256; 32 for md5")
    add.add_argument("--id", default=None, help="entry id (default: cli-<random>)")
    add.add_argument("--note", default=None, help="why the entry is there")
    add.add_argument("--by", default=None, help="who adds it, recorded with the entry")
    imported = actions.add_parser(
        "import", help="publish every valid row of an entry file; bad rows are listed"
    )
    imported.add_argument("bank", help="bank the entries go to")
    imported.add_argument("file", type=Path, help="the entry file")
    imported.add_argument(
        "--format",
        choices=list(FORMATS),
        default="csv",
        help="csv (kind,value[,entry_id][,note]), pdq-hasher (hash[,quality[,filename]]), "
        "te-signals (ThreatExchange '<signal_type> <hash>' lines), te-csv (threatexchange "
        "dataset --csv) [%(default)s]",
    )
    imported.add_argument("--by", default=None, help="who imports them, recorded with each")
    listed = actions.add_parser("list", help="read the banks topic whole and print its entries")
    listed.add_argument("bank", nargs="?", default=None, help="only this bank's entries")


_WRITTEN = " a dead letter was written at"


def _add_code_option(parser: argparse.ArgumentParser, which: str) -> None:
    parser.add_argument(
        "--code",
        action="append",
        default=[],
        metavar="CODE",
        help=f"{which} with this error code, e.g. unknown_policy (repeatable)",
    )


def add_dlq_parser(commands: Commands) -> None:
    dlq = commands.add_parser(
        "dlq",
        help="list, show and redrive dead letters (uses the Kafka settings and "
        "GUARDSTREAM_DEAD_LETTER_TOPIC)",
        description="Tools for the dead-letter topic: `list` counts what failed, `show` prints "
        "one dead letter with its original record decoded, `redrive` publishes the original "
        "records of chosen dead letters again (once the cause is fixed), each recorded in a "
        "ledger topic so that a second redrive does not publish an event twice. The "
        "dead-letter topic is read without a consumer group, to the end it has when the "
        "command starts.",
    )
    actions = dlq.add_subparsers(dest="dlq_action", required=True, metavar="ACTION")
    listed = actions.add_parser(
        "list",
        help="count the dead letters by code and by hour, with examples",
        description="Read the dead-letter topic (or a range of it) and print the dead letters "
        "by code (with the error's class, how many were already redriven and example event "
        "ids with their place P@offset), by hour of failure, and the first and last failure. "
        "Exit 0, also when there are none.",
    )
    _add_range_options(listed, _WRITTEN)
    _add_code_option(listed, "only dead letters")
    listed.add_argument(
        "--examples", type=int, default=3, help="example event ids per code [%(default)s]"
    )
    listed.add_argument("--json", action="store_true", help="print one JSON object instead")
    shown = actions.add_parser(
        "show",
        help="print one dead letter in full: error, source, trace id, original record decoded",
        description="Print the dead letters of one event (every one, newest last) or the record "
        "at one place of the dead-letter topic: code, message, the model's output, event id, "
        "the input record it came from, when it failed, its trace id, the original value "
        "(JSON pretty-printed, long base64 elided) and headers decoded, and its redrives from "
        "the ledger. Exit 1 when there is none.",
    )
    shown.add_argument(
        "target",
        metavar="EVENT_ID | P:OFFSET",
        help="an event id, or a partition and offset of the dead-letter topic (e.g. 0:17)",
    )
    redrive = actions.add_parser(
        "redrive",
        help="publish the original records of chosen dead letters again, once each",
        description="Restore each selected dead letter's original record (value, key, headers: "
        "the event id and traceparent are the original's), add a guardstream-redrive header "
        "naming the dead letter and the run, and publish it to the topic it came from (or "
        "--to), at most --rate a second, each acknowledged by all replicas; then record it in "
        "the ledger topic (created, compacted, if missing). Dead letters already in the ledger "
        "are skipped unless --again; those that cannot be restored (original truncated or "
        "missing, not a dead letter, damaged base64, target topic missing) are refused with "
        "the reason. Selectors combine: a dead letter must match one --code (if given), one "
        "--event-id (if given) and the range. Exit 0 when anything was redriven (or a dry run "
        "selected anything), 1 when nothing was, 2 for bad arguments, 130 when interrupted "
        "(what was in flight is finished and recorded first).",
    )
    _add_code_option(redrive, "dead letters")
    redrive.add_argument(
        "--event-id",
        action="append",
        default=[],
        metavar="ID",
        help="dead letters of this event (repeatable)",
    )
    _add_range_options(redrive, _WRITTEN)
    redrive.add_argument(
        "--all", action="store_true", help="every dead letter of the topic (instead of selectors)"
    )
    redrive.add_argument(
        "--to",
        default=None,
        metavar="TOPIC",
        help="publish to this topic [each dead letter's source topic: the input it came from]",
    )
    _add_rate_option(redrive, "records published", 10.0)
    redrive.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would be redriven and what refused; publish nothing, create nothing",
    )
    redrive.add_argument(
        "--again",
        action="store_true",
        help="redrive dead letters the ledger says were redriven already",
    )
    _add_progress_option(redrive)
    for parser in (listed, shown, redrive):
        parser.add_argument(
            "--topic",
            default=None,
            metavar="DLQ",
            help="the dead-letter topic [GUARDSTREAM_DEAD_LETTER_TOPIC]",
        )
        parser.add_argument(
            "--ledger-topic",
            default=None,
            metavar="TOPIC",
            help="the ledger of redrives, a compacted topic [DLQ.redriven]",
        )
