"""The banks file and its entry files: every format reads its good rows, counts and logs each
bad one as path:line, a malformed banks file stops the start, an entry file with rows but no
valid entry is a readiness problem."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from service.core.bank_files import FORMATS, load_banks, read_entries
from tests.support.photos import digests, jpeg, pdq_of_jpeg

PDQ = pdq_of_jpeg(jpeg("astronaut")).hex
PDQ2 = pdq_of_jpeg(jpeg("coffee")).hex
SHA256, MD5 = digests(jpeg("astronaut"))


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_our_csv_reads_kinds_ids_and_notes_and_counts_bad_rows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(
        tmp_path,
        "list.csv",
        f"# exported 2026-12-01\nnote,kind,value,entry_id\n"
        f"seen twice,pdq,{PDQ.upper()},case-1\n"
        f",sha256,{SHA256},\n"
        f'"a, quoted note",md5,{MD5},case-3\n'
        f"too short,md5,{MD5[:-1]},case-4\n"
        f"wrong kind,crc32,00000000,case-5\n"
        f"too,many,columns,here,x\n\n",
    )
    with caplog.at_level(logging.WARNING):
        read = read_entries(path, "known-bad", "csv")
    assert (read.rows, read.rejected) == (6, 3)
    assert [(e.kind, e.value, e.entry_id, e.note) for e in read.entries] == [
        ("pdq", PDQ, "case-1", "seen twice"),
        ("sha256", SHA256, "list.csv:4", None),
        ("md5", MD5, "case-3", "a, quoted note"),
    ]
    assert f"{path}:6: a md5 hash is 32" in caplog.text
    assert f"{path}:7: hash kind 'crc32'" in caplog.text
    assert f"{path}:8: 5 columns, the header has 4" in caplog.text


def test_a_csv_without_kind_and_value_columns_cannot_be_read(tmp_path: Path) -> None:
    path = write(tmp_path, "list.csv", f"hash,id\n{PDQ},1\n")
    with pytest.raises(ValueError, match=r"list.csv: line 1: the header lacks kind, value"):
        read_entries(path, "known-bad", "csv")


def test_pdq_hasher_output_and_bare_hash_lists_are_read_low_quality_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(
        tmp_path,
        "hashes.txt",
        f"{PDQ},100,/data/astronaut.jpg\n{PDQ2}\n{PDQ2},12,/data/flat.png\n"
        f"{PDQ[:60]},100,/data/cut.jpg\n",
    )
    with caplog.at_level(logging.WARNING):
        read = read_entries(path, "known-bad", "pdq-hasher")
    assert [(e.value, e.entry_id) for e in read.entries] == [
        (PDQ, "/data/astronaut.jpg"),
        (PDQ2, "hashes.txt:2"),
    ]
    assert (read.rows, read.rejected) == (4, 2)
    assert f"{path}:3: quality '12' is not 50-100" in caplog.text
    assert f"{path}:4: a pdq hash is 64" in caplog.text


def test_threatexchange_signal_files_keep_pdq_and_refuse_other_signal_types(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, "te.txt", f"pdq {PDQ}\nvideo_md5 {MD5}\npdq {PDQ2}\n{PDQ}\n")
    with caplog.at_level(logging.WARNING):
        read = read_entries(path, "known-bad", "te-signals")
    assert [e.value for e in read.entries] == [PDQ, PDQ2]
    assert read.rejected == 2
    assert f"{path}:2: signal type 'video_md5' is not pdq" in caplog.text


def test_threatexchange_dataset_csv_keeps_collab_category_and_tags_as_the_note(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path,
        "collab.csv",
        "collab,signal_type,signal_str,category,tags\n"
        f"Sample Data,pdq,{PDQ},POSITIVE_CLASS,media_type_photo\n"
        f"Sample Data,url,https://example.com,POSITIVE_CLASS,\n",
    )
    read = read_entries(path, "known-bad", "te-csv")
    assert [(e.value, e.note) for e in read.entries] == [
        (PDQ, "collab=Sample Data category=POSITIVE_CLASS tags=media_type_photo")
    ]
    assert read.rejected == 1


def test_every_format_skips_blank_and_comment_lines_and_refuses_undecodable_files(
    tmp_path: Path,
) -> None:
    for name in FORMATS:
        assert read_entries(write(tmp_path, "e.txt", "\n# nothing\n\n"), "b", name).rows == 0
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="cannot read the entry file"):
        read_entries(tmp_path / "bin", "b", "csv")
    with pytest.raises(ValueError, match="unknown format 'xml'"):
        read_entries(tmp_path / "e.txt", "b", "xml")


def banks_toml(files: str = "") -> str:
    return (
        '[[bank]]\nname = "known-bad"\naction = "block"\ncategory = "O2"\n'
        f'description = "partner list"\n{files}\n'
        '[[bank]]\nname = "harmless"\naction = "allow"\ncategory = "NA"\npdq_threshold = 10\n'
    )


def test_load_banks_reads_specs_and_their_files_relative_to_the_banks_file(
    tmp_path: Path,
) -> None:
    (tmp_path / "lists").mkdir()
    write(tmp_path / "lists", "bad.csv", f"kind,value\npdq,{PDQ}\nmd5,{MD5}\nmd5,nope\n")
    write(tmp_path / "lists", "bad.txt", f"{PDQ2},90,x.jpg\n")
    path = write(
        tmp_path,
        "banks.toml",
        banks_toml(
            'files = [{ path = "lists/bad.csv", format = "csv" },'
            ' { path = "lists/bad.txt", format = "pdq-hasher" }]'
        ),
    )
    banks, problems = load_banks(path)
    assert problems == []
    assert banks.counts() == {"known-bad": 3, "harmless": 0}
    assert banks.file_rows_rejected == 1
    bad, harmless = banks.specs["known-bad"], banks.specs["harmless"]
    assert (bad.action, bad.category_code, bad.pdq_threshold, bad.description) == (
        "block",
        "O2",
        31,
        "partner list",
    )
    assert (harmless.action, harmless.pdq_threshold) == ("allow", 10)
    found = banks.match(SHA256, MD5, None)
    assert found is not None
    assert found.entry.entry_id == "bad.csv:3"


def test_a_file_with_rows_but_no_valid_entry_or_missing_is_a_readiness_problem(
    tmp_path: Path,
) -> None:
    write(tmp_path, "bad.csv", "kind,value\npdq,xyz\nmd5,123\n")
    write(tmp_path, "empty.csv", "kind,value\n")
    path = write(
        tmp_path,
        "banks.toml",
        banks_toml(
            'files = [{ path = "bad.csv", format = "csv" }, { path = "empty.csv", format = "csv" },'
            ' { path = "gone.csv", format = "csv" }]'
        ),
    )
    banks, problems = load_banks(path)
    assert problems[0] == "bank known-bad: bad.csv had 2 rows, none valid"
    assert problems[1].startswith(f"bank known-bad: {tmp_path}/gone.csv: cannot read")
    assert len(problems) == 2  # an empty file is an empty bank, not a broken one
    assert banks.counts() == {"known-bad": 0, "harmless": 0}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[bank]\n", "not TOML"),
        ("[tenants]\nx = 1\n", "unknown key 'tenants'"),
        ('bank = "x"\n', "bank must be an array of tables"),
        ('[[bank]]\nname = "b"\naction = "block"\n', r"bank\[0\].category: required"),
        ('[[bank]]\nname = "B"\naction = "block"\ncategory = "O2"\n', r"bank\[0\]: bank name"),
        ('[[bank]]\nname = "b"\naction = "ban"\ncategory = "O2"\n', r"bank\[0\]: action"),
        (
            '[[bank]]\nname = "b"\naction = "block"\ncategory = "O2"\npdq_threshold = "31"\n',
            r"bank\[0\].pdq_threshold: must be an integer",
        ),
        (
            '[[bank]]\nname = "b"\naction = "block"\ncategory = "O2"\ntreshold = 3\n',
            r"bank\[0\].treshold: unknown key",
        ),
        (
            '[[bank]]\nname = "b"\naction = "block"\ncategory = "O2"\nfiles = ["a.csv"]\n',
            r"bank\[0\].files\[0\]: must be a table",
        ),
        (
            '[[bank]]\nname = "b"\naction = "block"\ncategory = "O2"\n'
            'files = [{ path = "a", format = "xml" }]\n',
            r"files\[0\].format: 'xml' is not one of",
        ),
        (banks_toml() + banks_toml(), r"bank\[2\]: bank 'known-bad' is named twice"),
    ],
)
def test_a_malformed_banks_file_stops_the_start_naming_file_and_key(
    tmp_path: Path, text: str, message: str
) -> None:
    path = write(tmp_path, "banks.toml", text)
    with pytest.raises(ValueError, match=message) as raised:
        load_banks(path)
    assert str(path) in str(raised.value)


def test_a_missing_banks_file_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read the banks file"):
        load_banks(tmp_path / "nope.toml")
