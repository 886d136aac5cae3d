"""The command-line parsers of the tools beside the consumer: eval, replay and banks.

Only argparse here, so `python -m service --help` stays quick; each command's handler lives in
its own module (`service.evaluate`, `service.replay`, `service.banks`) and is imported when run.
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
    evaluate.add_argument(
        "--no-progress", action="store_true", help="no progress bar (e.g. in CI logs)"
    )
    evaluate.add_argument(
        "--write-samples",
        type=Path,
        metavar="DIR",
        default=None,
        help="write the sample photos and a labelled manifest of them to DIR, and exit (to try "
        "eval on the embedded stack)",
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
    replay.add_argument(
        "--since", default=None, help="first timestamp (ISO 8601, e.g. 2026-12-07T10:00Z)"
    )
    replay.add_argument(
        "--until", default=None, help="end timestamp, exclusive (ISO 8601) [the end of the topic]"
    )
    replay.add_argument(
        "--offsets",
        action="append",
        default=[],
        metavar="P:FIRST-END",
        help="a partition's offsets, END exclusive, e.g. 0:100-250 (repeatable; instead of "
        "--since/--until)",
    )
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
    replay.add_argument(
        "--rate",
        type=float,
        default=20.0,
        help="events judged per second at most; 0: no limit [%(default)s]",
    )
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
    replay.add_argument(
        "--no-progress", action="store_true", help="no progress bar (e.g. in CI logs)"
    )


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
