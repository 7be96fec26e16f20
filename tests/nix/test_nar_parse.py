"""The strict NAR parser: literal archives, malformed in every way we know, must fail
with a FormatError naming the byte offset and the archive path, and restore must leave
nothing behind. Hypothesis checks that no input makes it fail any other way."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nixd.errors import FormatError
from nixd.nix import nar


def s(data: bytes) -> bytes:
    """A NAR string."""
    return len(data).to_bytes(8, "little") + data + bytes(-len(data) % 8)


def reg(data: bytes = b"", exe: bool = False) -> bytes:
    marker = s(b"executable") + s(b"") if exe else b""
    return s(b"(") + s(b"type") + s(b"regular") + marker + s(b"contents") + s(data) + s(b")")


def link(target: bytes) -> bytes:
    return s(b"(") + s(b"type") + s(b"symlink") + s(b"target") + s(target) + s(b")")


def entry(name: bytes, node: bytes) -> bytes:
    return s(b"entry") + s(b"(") + s(b"name") + s(name) + s(b"node") + node + s(b")")


def dir_(*entries: tuple[bytes, bytes]) -> bytes:
    body = b"".join(entry(n, node) for n, node in entries)
    return s(b"(") + s(b"type") + s(b"directory") + body + s(b")")


def archive(node: bytes) -> bytes:
    return s(b"nix-archive-1") + node


SAMPLE = archive(
    dir_(
        (b"bin", dir_((b"hello", reg(b"#!/bin/sh\necho hello\n", exe=True)))),
        (b"empty", reg()),
        (b"emptydir", dir_()),
        (b"lib", link(b"../lib64")),
        (b"share", dir_((b"doc", reg(b"x" * 13)), (b"man", dir_()))),
    )
)


def where_offset(exc: FormatError) -> int:
    assert exc.where is not None and exc.where.startswith("NAR byte "), exc.where
    return int(exc.where.removeprefix("NAR byte ").split(",")[0])


def test_builders_match_the_canonical_layout() -> None:
    assert nar.validate([SAMPLE])[1] == len(SAMPLE)
    assert [(e.path, e.type) for e in nar.list_entries([SAMPLE])] == [
        ("", "directory"),
        ("bin", "directory"),
        ("bin/hello", "regular"),
        ("empty", "regular"),
        ("emptydir", "directory"),
        ("lib", "symlink"),
        ("share", "directory"),
        ("share/doc", "regular"),
        ("share/man", "directory"),
    ]


def test_validate_returns_sha256_and_size() -> None:
    digest, size = nar.validate([SAMPLE])
    assert digest.algo == "sha256"
    assert digest.digest == hashlib.sha256(SAMPLE).digest()
    assert size == len(SAMPLE)


@pytest.mark.parametrize("piece", [1, 3, 8, 13, 64, 4096])
def test_any_split_gives_the_same_entries(piece: int) -> None:
    whole = nar.list_entries([SAMPLE])
    parts = [SAMPLE[i : i + piece] for i in range(0, len(SAMPLE), piece)]
    assert nar.list_entries(parts) == whole
    assert nar.list_entries([memoryview(p) for p in parts]) == whole


def test_contents_pass_through_in_slices_of_the_fed_buffers() -> None:
    big = bytes(range(256)) * 4096  # 1 MiB
    data = archive(reg(big))
    seen: list[int] = []

    class Sizes(nar.NarVisitor):
        def contents(self, chunk: memoryview) -> None:
            seen.append(len(chunk))

    parser = nar.NarParser(Sizes())
    parser.feed(data[:100])
    parser.feed(data[100:])
    parser.close()
    assert sum(seen) == len(big)
    assert seen[-1] > len(big) - 100  # the rest came as one slice, not byte by byte


def corrupt(data: bytes, at: int, value: bytes) -> bytes:
    return data[:at] + value + data[at + len(value) :]


ONE = archive(dir_((b"a", reg(b"abc")), (b"b", link(b"a"))))
_NAME_A = ONE.index(s(b"a"))  # the first entry's name string

# (id, archive, expected offset of the error, or None to just require a FormatError)
MALFORMED: list[tuple[str, bytes, int | None]] = [
    ("empty input", b"", 0),
    ("bad magic", archive(reg()).replace(b"archive-1", b"archive-2"), 20),
    ("magic length", s(b"nix-archive-10") + reg(), 0),
    ("not a nar", b"\x89PNG\r\n\x1a\n" + bytes(100), 0),
    ("unsorted", archive(dir_((b"b", reg()), (b"a", reg()))), None),
    ("duplicate", archive(dir_((b"a", reg()), (b"a", reg()))), None),
    ("unsorted by bytes", archive(dir_((b"\xc3\xa9", reg()), (b"z", reg()))), None),
    ("empty name", archive(dir_((b"", reg()))), None),
    ("dot", archive(dir_((b".", reg()))), None),
    ("dotdot", archive(dir_((b"..", reg()))), None),
    ("slash", archive(dir_((b"a/b", reg()))), None),
    ("nul in name", archive(dir_((b"a\0b", reg()))), None),
    ("name too long", archive(dir_((b"n" * 256, reg()))), None),
    ("name padding", corrupt(ONE, _NAME_A + 9, b"x"), _NAME_A + 9),
    ("contents padding", corrupt(ONE, ONE.index(b"abc") + 3, b"\x01"), ONE.index(b"abc") + 3),
    ("magic padding", corrupt(archive(reg()), 21, b"\x01"), 21),
    ("tag padding", corrupt(archive(reg()), 24 + 8 + 1, b"\x01"), 33),
    ("unknown tag", archive(reg()).replace(s(b"contents"), s(b"contentz")), 72),
    ("unknown type", archive(s(b"(") + s(b"type") + s(b"fifo") + s(b")")), 56),
    (
        "type with long length",
        archive(s(b"(") + s(b"type") + (1 << 60).to_bytes(8, "little") + bytes(64)),
        56,
    ),
    (
        "exec marker value",
        archive(reg(exe=True)).replace(s(b"executable") + s(b""), s(b"executable") + s(b"x")),
        None,
    ),
    ("exec after contents", archive(reg()[:-16] + s(b"executable") + s(b"") + s(b")")), None),
    ("empty symlink target", archive(link(b"")), None),
    ("nul in target", archive(link(b"a\0b")), None),
    ("target too long", archive(link(b"t" * 4096)), None),
    ("huge target length", archive(link(b"x")).replace(s(b"x"), b"\xff" * 8), None),
    (
        "huge contents",
        archive(reg()).replace(s(b"contents") + bytes(8), s(b"contents") + b"\xff" * 8),
        None,
    ),
    ("huge name length", corrupt(ONE, _NAME_A, (1 << 62).to_bytes(8, "little")), _NAME_A),
    ("trailing zero bytes", ONE + bytes(8), len(ONE)),
    ("trailing byte", ONE + b"x", len(ONE)),
    ("second root", ONE + reg(), len(ONE)),
    ("missing node tag", ONE.replace(s(b"node"), s(b"nodd"), 1), None),
    ("missing entry close", archive(dir_((b"a", reg()))).replace(s(b")") * 3, s(b")") * 2), None),
    ("extra close", archive(reg()) + s(b")"), len(archive(reg()))),
    ("entry in file", archive(reg()[:-16] + entry(b"x", reg()) + s(b")")), None),
    ("truncated contents", archive(reg(b"x" * 100))[:100], None),
]


def _deep(depth: int) -> bytes:
    node = reg()
    for _ in range(depth):
        node = dir_((b"d", node))
    return archive(node)


MALFORMED.append(("too deep", _deep(nar.MAX_DEPTH + 1), None))


@pytest.mark.parametrize(("data", "offset"), [pytest.param(d, o, id=i) for i, d, o in MALFORMED])
def test_malformed_archives_are_rejected(data: bytes, offset: int | None) -> None:
    with pytest.raises(FormatError) as info:
        nar.validate([data])
    got = where_offset(info.value)
    assert 0 <= got <= len(data)
    if offset is not None:
        assert got == offset, str(info.value)
    # The same error whatever the chunking.
    with pytest.raises(FormatError) as info2:
        nar.validate([data[i : i + 5] for i in range(0, len(data), 5)])
    assert str(info2.value) == str(info.value)


@pytest.mark.parametrize(
    ("data", "offset"),
    # "too deep" would be restored (and removed) 2048 levels deep, which is slow on some
    # file systems; test_nar.py covers deep restores and their cleanup.
    [pytest.param(d, o, id=i) for i, d, o in MALFORMED if i != "too deep"],
)
def test_restore_of_malformed_leaves_nothing(
    tmp_path: Path, data: bytes, offset: int | None
) -> None:
    dest = tmp_path / "out"
    with pytest.raises(FormatError):
        nar.restore([data], dest)
    assert list(tmp_path.iterdir()) == []


def test_error_names_the_archive_path() -> None:
    data = archive(dir_((b"sub", dir_((b"b", reg()), (b"a", reg())))))
    with pytest.raises(FormatError) as info:
        nar.validate([data])
    assert info.value.where is not None
    assert info.value.where.endswith("at /sub")
    assert "unsorted entry name b'a' after b'b'" in info.value.message


def test_every_prefix_is_truncated_and_says_so() -> None:
    for cut in range(len(SAMPLE)):
        parser = nar.NarParser()
        parser.feed(SAMPLE[:cut])
        with pytest.raises(FormatError, match="truncated") as info:
            parser.close()
        assert where_offset(info.value) == cut


def test_parser_stays_failed() -> None:
    parser = nar.NarParser()
    with pytest.raises(FormatError) as first:
        parser.feed(b"garbage!" * 4)
    with pytest.raises(FormatError) as again:
        parser.feed(SAMPLE)
    assert again.value is first.value
    with pytest.raises(FormatError):
        parser.close()


def test_done_and_offset() -> None:
    parser = nar.NarParser()
    parser.feed(SAMPLE[:50])
    assert not parser.done
    assert parser.offset == 50
    parser.feed(SAMPLE[50:])
    assert parser.done
    assert parser.offset == len(SAMPLE)
    parser.close()


def test_depth_limit_is_inclusive() -> None:
    nar.validate([_deep(nar.MAX_DEPTH)])


def test_visitor_sees_events_in_archive_order() -> None:
    log: list[object] = []

    class Log(nar.NarVisitor):
        def start_directory(self, name: bytes | None) -> None:
            log.append(("dir", name))

        def end_directory(self) -> None:
            log.append("end")

        def regular(self, name: bytes | None, executable: bool, size: int) -> None:
            log.append(("reg", name, executable, size))

        def contents(self, data: memoryview) -> None:
            log.append(bytes(data))

        def end_regular(self) -> None:
            log.append("eof")

        def symlink(self, name: bytes | None, target: bytes) -> None:
            log.append(("link", name, target))

    parser = nar.NarParser(Log())
    parser.feed(ONE)
    parser.close()
    assert log == [
        ("dir", None),
        ("reg", b"a", False, 3),
        b"abc",
        "eof",
        ("link", b"b", b"a"),
        "end",
    ]


# ------------------------------------------------------------------------------ hypothesis


def _validate_or_format_error(data: bytes, cuts: list[int]) -> None:
    points = sorted({min(c, len(data)) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    try:
        nar.validate(chunks)
    except FormatError as exc:
        assert 0 <= where_offset(exc) <= len(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=4))
def test_random_bytes_only_raise_format_error(data: bytes, cuts: list[int]) -> None:
    _validate_or_format_error(data, cuts)
    _validate_or_format_error(s(b"nix-archive-1") + data, cuts)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = draw(st.sampled_from([SAMPLE, ONE, archive(reg(b"hello", exe=True))]))
    for _ in range(draw(st.integers(1, 3))):
        if not data:
            break
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "cut", "len"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip":
            data = corrupt(data, at, bytes([data[at] ^ (1 << draw(st.integers(0, 7)))]))
        elif kind == "set":
            data = corrupt(data, at, bytes([draw(st.integers(0, 255))]))
        elif kind == "insert":
            data = data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at:]
        elif kind == "delete":
            data = data[:at] + data[at + draw(st.integers(1, 16)) :]
        elif kind == "cut":
            data = data[:at]
        else:  # rewrite a length field (every 8-aligned u64 may be one)
            at -= at % 8
            data = corrupt(data, at, draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little"))
    return data


@settings(max_examples=400, deadline=None)
@given(mutated(), st.lists(st.integers(0, 400), max_size=3))
def test_mutated_archives_only_raise_format_error(data: bytes, cuts: list[int]) -> None:
    _validate_or_format_error(data, cuts)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_restore_of_mutated_archives_stays_inside_dest(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        dest = os.path.join(tmp, "out")
        try:
            nar.restore([data], dest)
        except FormatError:
            assert os.listdir(tmp) == []
        else:
            assert os.listdir(tmp) == ["out"]
            assert b"".join(nar.dump(dest)) == data
