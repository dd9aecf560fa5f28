"""Publishing alone: streaming copy, never replacing a file the job did not write, suffixes, races."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from trainer.jobs import publisher as publisher_module
from trainer.jobs.model import JobRecord
from trainer.jobs.publisher import Publisher, owned_by, place_new, stream_copy

RECORD = JobRecord(id="face", created="", seq=1, device="cpu")


def source(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "ckpt" / "concept.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_first_publish_takes_the_plain_name_and_records_the_file(tmp_path):
    pub = Publisher(tmp_path / "GCFG")
    result = pub.publish("face", source(tmp_path, b"v1"), 10, RECORD)
    target = tmp_path / "GCFG" / "face.safetensors"
    assert result.note is None and target.read_bytes() == b"v1"
    assert result.record.published == str(target) and result.record.published_step == 10
    st = target.stat()
    assert (result.record.published_size, result.record.published_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert oct(st.st_mode & 0o777) == oct(0o644)
    assert [p.name for p in target.parent.iterdir()] == ["face.safetensors"]  # no temporary file left


def test_the_same_step_is_not_copied_again(tmp_path):
    pub = Publisher(tmp_path / "GCFG")
    first = pub.publish("face", source(tmp_path, b"v1"), 10, RECORD).record
    again = pub.publish("face", source(tmp_path, b"changed"), 10, first)
    assert again.record == first and Path(first.published).read_bytes() == b"v1"


def test_its_own_file_is_replaced_by_a_newer_step(tmp_path):
    pub = Publisher(tmp_path / "GCFG")
    first = pub.publish("face", source(tmp_path, b"v1"), 10, RECORD).record
    second = pub.publish("face", source(tmp_path, b"v2-longer"), 20, first)
    assert second.note is None and second.record.published == first.published
    assert Path(first.published).read_bytes() == b"v2-longer" and second.record.published_size == 9


@pytest.mark.parametrize("foreign", ["face.safetensors", "face.safetensors face-2.safetensors"])
def test_files_of_others_are_skipped_with_a_note(tmp_path, foreign):
    folder = tmp_path / "GCFG"
    folder.mkdir()
    for name in foreign.split():
        (folder / name).write_bytes(b"someone else's")
    result = Publisher(folder).publish("face", source(tmp_path, b"mine"), 5, RECORD)
    expected = folder / f"face-{len(foreign.split()) + 1}.safetensors"
    assert result.record.published == str(expected) and expected.read_bytes() == b"mine"
    assert all((folder / name).read_bytes() == b"someone else's" for name in foreign.split())
    assert result.note.startswith(f"published as {expected.name}, because ") and "not from this job" in result.note


def test_a_record_that_names_a_changed_file_does_not_own_it(tmp_path):
    pub = Publisher(tmp_path / "GCFG")
    record = pub.publish("face", source(tmp_path, b"v1"), 1, RECORD).record
    path = Path(record.published)
    assert owned_by(record, path)
    path.write_bytes(b"v1 but edited")
    assert not owned_by(record, path)
    assert not owned_by(dataclasses.replace(record, published_size=None, published_mtime_ns=None), path)


def test_a_file_that_appears_between_the_check_and_the_move_is_kept(tmp_path, monkeypatch):
    folder = tmp_path / "GCFG"
    folder.mkdir()
    real_link = os.link

    def racing_link(src, dst):
        if Path(dst).name == "face.safetensors":
            Path(dst).write_bytes(b"arrived just now")
        return real_link(src, dst)

    monkeypatch.setattr(publisher_module.os, "link", racing_link)
    result = Publisher(folder).publish("face", source(tmp_path, b"mine"), 1, RECORD)
    assert (folder / "face.safetensors").read_bytes() == b"arrived just now"
    assert Path(result.record.published).name == "face-2.safetensors"


def test_without_hard_links_the_move_is_checked_first(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError("operation not supported")

    monkeypatch.setattr(publisher_module.os, "link", no_links)
    tmp = tmp_path / "tmp.bin"
    tmp.write_bytes(b"x")
    taken = tmp_path / "taken"
    taken.write_bytes(b"keep")
    assert not place_new(tmp, taken) and taken.read_bytes() == b"keep" and tmp.exists()
    assert place_new(tmp, tmp_path / "free") and (tmp_path / "free").read_bytes() == b"x" and not tmp.exists()


def test_stream_copy_reads_through_a_bounded_buffer(tmp_path, monkeypatch):
    data = os.urandom(1_000_003)
    src = source(tmp_path, data)
    reads = []
    real_copy = publisher_module.shutil.copyfileobj

    def spy(fsrc, fdst, length):
        class Reader:
            def read(self, n=-1):
                chunk = fsrc.read(n)
                reads.append((n, len(chunk)))
                return chunk

        return real_copy(Reader(), fdst, length)

    monkeypatch.setattr(publisher_module.shutil, "copyfileobj", spy)
    tmp = stream_copy(src, tmp_path, chunk_size=65536)
    assert tmp.read_bytes() == data and tmp.name.startswith(".publish-")
    assert reads and max(n for n, _ in reads) == 65536 and max(got for _, got in reads) <= 65536


def test_a_failed_copy_leaves_no_temporary_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        stream_copy(tmp_path / "missing", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_publishing_off(tmp_path):
    pub = Publisher(None)
    assert pub.target("x") is None and not pub.name_taken("x")
    assert pub.publish("x", source(tmp_path, b"v"), 1, RECORD).record == RECORD
