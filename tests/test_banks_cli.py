"""`python -m service banks`: entries published to the banks topic are the entries every pod
reads back; bad input is refused before anything is published; an unreachable broker is one
line, not a traceback."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from service import banks
from service.__main__ import build_parser
from service.adapters.kafka.table import TableReader
from service.config import Settings
from service.core.bank_files import load_banks
from service.dev import stack
from tests.support.cli import cli
from tests.support.photos import digests, jpeg, pdq_of_jpeg
from tests.support.stack import free_port

ORIGINAL = jpeg("chelsea")
COPY = jpeg("chelsea", quality=50, scale=0.7)
PDQ = pdq_of_jpeg(ORIGINAL).hex
SHA256, MD5 = digests(ORIGINAL)
OTHER_PDQ = pdq_of_jpeg(jpeg("rocket")).hex


def banks_file(tmp_path: Path) -> Path:
    path = tmp_path / "banks.toml"
    path.write_text(
        '[[bank]]\nname = "known-bad"\naction = "block"\ncategory = "O2"\n\n'
        '[[bank]]\nname = "harmless"\naction = "allow"\ncategory = "NA"\n'
    )
    return path


def test_an_unreachable_broker_is_a_one_line_error(tmp_path: Path) -> None:
    env = {"GUARDSTREAM_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}
    result = cli("banks", "add", "known-bad", "md5", MD5, env=env, timeout=60)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith("banks: KafkaConnectionError")
    assert "Traceback" not in result.stderr


def test_bad_input_is_refused_before_the_broker_is_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {
        "GUARDSTREAM_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",  # never reached
        "GUARDSTREAM_BANKS_FILE": str(banks_file(tmp_path)),
    }
    # Once as a child process, as typed; the other refusals through the same handler in
    # process (a second each saved: the checks run before any broker is asked either way).
    result = cli("banks", "add", "known-bad", "md5", MD5[:-2], env=env, timeout=60)
    assert result.returncode == 1
    assert result.stderr == f"banks: a md5 hash is 32 lower-case hex digits, not {MD5[:-2]!r}\n"
    settings = Settings(**{k.removeprefix("GUARDSTREAM_").lower(): v for k, v in env.items()})
    refused = {
        ("add", "nope", "md5", MD5): "names no bank 'nope'",
        ("remove", "Bad/Bank", "md5", MD5): "bank name 'Bad/Bank'",
        ("import", "known-bad", str(tmp_path / "none-valid.csv")): "1 rows, none valid; nothing",
    }
    (tmp_path / "none-valid.csv").write_text("kind,value\npdq,123\n")
    for args, message in refused.items():
        assert banks.command(settings, build_parser().parse_args(["banks", *args])) == 1
        stderr = capsys.readouterr().err
        assert stderr.startswith("banks: ")
        assert stderr.count("\n") == 1  # one line
        assert message in stderr


def test_published_entries_are_read_back_by_the_table_as_every_pod_reads_it(
    embedded_stack: stack.StackState, tmp_path: Path
) -> None:
    topic = f"banks-{uuid.uuid4().hex[:8]}"
    specs = banks_file(tmp_path)
    env = {
        "GUARDSTREAM_BOOTSTRAP_SERVERS": embedded_stack.bootstrap_servers,
        "GUARDSTREAM_BANKS_TOPIC": topic,
        "GUARDSTREAM_BANKS_FILE": str(specs),
    }
    entries = tmp_path / "partner.txt"
    entries.write_text(f"{PDQ},100,chelsea.jpg\n{OTHER_PDQ},100,rocket.jpg\nnot-a-hash\n")

    added = cli("banks", "add", "harmless", "sha256", SHA256, "--id", "h1", "--by", "r-7", env=env)
    assert (added.returncode, added.stdout.strip()) == (0, "added h1"), added.stderr
    imported = cli("banks", "import", "known-bad", str(entries), "--format", "pdq-hasher", env=env)
    assert imported.returncode == 0, imported.stderr
    assert "2 entries published to bank known-bad (3 rows, 1 refused)" in imported.stdout
    assert f"{entries}:3: a pdq hash is 64" in imported.stderr
    removed = cli("banks", "remove", "known-bad", "pdq", OTHER_PDQ.upper(), env=env)
    assert removed.returncode == 0, removed.stderr
    listed = cli("banks", "list", "known-bad", env=env)
    assert listed.returncode == 0, listed.stderr
    assert f"known-bad/pdq/{PDQ}  chelsea.jpg" in listed.stdout
    assert OTHER_PDQ not in listed.stdout
    assert "bank known-bad: 1 entries" in listed.stdout

    banks, problems = load_banks(specs)
    reader = TableReader(
        Settings(bootstrap_servers=embedded_stack.bootstrap_servers), topic, banks.apply
    )

    async def read_whole() -> None:
        try:
            await reader.load(timeout_s=30)
        finally:
            await reader.stop()

    asyncio.run(read_whole())
    assert (problems, reader.records, reader.rejected) == ([], 4, 0)
    assert banks.counts() == {"known-bad": 1, "harmless": 1}
    near = banks.match(*digests(COPY), pdq_of_jpeg(COPY))
    assert near is not None
    assert (near.spec.name, near.entry.entry_id) == ("known-bad", "chelsea.jpg")
    exact = banks.match(SHA256, MD5, None)
    assert exact is not None
    assert (exact.spec.action, exact.entry.entry_id, exact.distance) == ("allow", "h1", 0)
