"""The atomic writers when the operating system refuses a write (ENOSPC, EACCES, ...): one WriteError
naming the file, the errno and the fix; the temp file removed; the previous file byte for byte as it
was. Tests run as root, where chmod cannot refuse anything, so the OSErrors are injected."""

from __future__ import annotations

import builtins
import errno
import os
import pickle
from pathlib import Path

import pytest

from stage1_core.infra import faults, storage
from stage1_core.infra.errors import WriteError

OLD = b'{"id": "r01-p000-i00", "instruction": "previous good row"}\n'
NEW_ROWS = [{"id": f"r01-p000-i{i:02d}", "instruction": "new row " * 200} for i in range(50)]


@pytest.fixture()
def previous(tmp_path: Path) -> Path:
    """A final file from an earlier run."""
    p = tmp_path / "out" / "pilot_data.jsonl"
    p.parent.mkdir()
    p.write_bytes(OLD)
    return p


def _oserror(code: int, filename: str | Path) -> OSError:
    return OSError(code, os.strerror(code), str(filename))


def _fail_temp_write(monkeypatch: pytest.MonkeyPatch, code: int, *, at_open: bool) -> None:
    """Make the temp file's open (EACCES: the folder refuses new files) or its writes (ENOSPC: half the
    data lands, then the device is full) fail, as the kernel would."""
    real_open = builtins.open

    class HalfFull:
        def __init__(self, f):
            self.f = f

        def write(self, data: bytes) -> int:
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise _oserror(code, self.f.name)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(file, mode="r", *args, **kwargs):
        if ".tmp-" not in str(file):
            return real_open(file, mode, *args, **kwargs)
        if at_open:
            raise _oserror(code, file)
        return HalfFull(real_open(file, mode, *args, **kwargs))

    monkeypatch.setattr(storage, "open", fake_open, raising=False)  # found before the builtin


def _fail_replace(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    def fake_replace(src, dst):
        assert Path(src).exists(), "the temp file should be complete when the rename fails"
        raise _oserror(code, src)

    monkeypatch.setattr(os, "replace", fake_replace)


def _assert_untouched(path: Path, before: os.stat_result) -> None:
    assert path.read_bytes() == OLD
    assert os.stat(path).st_ino == before.st_ino  # the same file, not a rewritten copy
    assert not [p.name for p in path.parent.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("code, name, text, fix, inject", [
    (errno.ENOSPC, "ENOSPC", "No space left on device", "free space on the device that holds", "write"),
    (errno.EACCES, "EACCES", "Permission denied", "fix the folder's permissions", "open"),
    (errno.ENOSPC, "ENOSPC", "No space left on device", "free space on the device that holds", "replace"),
    (errno.EACCES, "EACCES", "Permission denied", "fix the folder's permissions", "replace"),
])
def test_refused_write_is_one_clear_error_and_keeps_the_previous_file(monkeypatch, previous, code, name, text,
                                                                       fix, inject):
    before = os.stat(previous)
    if inject == "replace":
        _fail_replace(monkeypatch, code)
    else:
        _fail_temp_write(monkeypatch, code, at_open=inject == "open")
    with pytest.raises(WriteError) as info:
        storage.write_jsonl_atomic(previous, NEW_ROWS)
    e = info.value
    assert isinstance(e.__cause__, OSError) and e.__cause__.errno == code
    assert (e.path, e.errno, e.errno_name, e.existed, e.temp_left) == (str(previous), code, name, True, None)
    msg = e.render()
    assert msg.splitlines()[0].startswith(f"error: could not write {previous}: {name} ({text}) while ")
    step = "renaming the temp file onto it" if inject == "replace" else "writing the temp file"
    assert step in msg.splitlines()[0]
    assert f"{fix}" in msg and str(previous.parent) in msg.split("fix:")[1]
    assert "the previous version of pilot_data.jsonl is untouched" in msg and "no temp file is left" in msg
    assert "Traceback" not in msg and str(e) == msg
    _assert_untouched(previous, before)


def test_no_previous_file_says_so_and_creates_nothing(monkeypatch, tmp_path):
    target = tmp_path / "qc_summary.json"
    _fail_temp_write(monkeypatch, errno.ENOSPC, at_open=False)
    with pytest.raises(WriteError) as info:
        storage.write_json_atomic(target, {"gate": "scale"})
    assert "qc_summary.json did not exist before and was not created" in info.value.render()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("code, fix", [(errno.EROFS, "mounted read-only"), (errno.EDQUOT, "disk quota"),
                                       (errno.EIO, "I/O error"), (errno.ENAMETOOLONG, "is writable")])
def test_other_errnos_name_their_fix(monkeypatch, previous, code, fix):
    before = os.stat(previous)
    _fail_temp_write(monkeypatch, code, at_open=True)
    with pytest.raises(WriteError) as info:
        storage.write_text_atomic(previous, "new")
    assert errno.errorcode[code] in info.value.render() and fix in info.value.render()
    _assert_untouched(previous, before)


def test_a_folder_that_cannot_be_created_is_a_write_error(monkeypatch, tmp_path):
    def refuse(self, *args, **kwargs):
        raise _oserror(errno.EACCES, self)

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(WriteError) as info:
        storage.write_text_atomic(tmp_path / "instructions" / "round-01.kept.jsonl", "x\n")
    assert "EACCES" in str(info.value) and "while creating its folder" in str(info.value)


def test_a_temp_file_that_cannot_be_removed_is_named(monkeypatch, previous):
    _fail_replace(monkeypatch, errno.EROFS)
    real_unlink = Path.unlink

    def refuse(self, missing_ok=False):
        if ".tmp-" in self.name:
            raise _oserror(errno.EROFS, self)
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refuse)
    with pytest.raises(WriteError) as info:
        storage.write_text_atomic(previous, "new")
    tmp = previous.with_name(f"pilot_data.jsonl.tmp-{os.getpid()}")
    assert info.value.temp_left == str(tmp) and f"the temp file {tmp} could not be removed" in str(info.value)
    assert previous.read_bytes() == OLD


def test_write_error_survives_pickling():
    """Prefect may persist a failed task's exception."""
    e = pickle.loads(pickle.dumps(WriteError("/o/x.json", errno.ENOSPC, "No space left on device",
                                             "writing the temp file", None, True)))
    assert isinstance(e, WriteError) and "ENOSPC" in e.render() and e.existed


@pytest.fixture()
def fault(monkeypatch):
    faults._hits.clear()
    yield lambda spec: monkeypatch.setenv("STAGE1_FAULT", spec)
    faults._hits.clear()


def test_injected_errno_at_the_write_point(fault, previous):
    before = os.stat(previous)
    fault("write@pilot_data.jsonl:2:ENOSPC")
    storage.write_text_atomic(previous.with_name("rejected.jsonl"), "ok\n")  # another name: does not count
    storage.write_text_atomic(previous, OLD.decode())  # 1st hit
    with pytest.raises(WriteError) as info:
        storage.write_jsonl_atomic(previous, NEW_ROWS)  # 2nd hit
    assert "ENOSPC (No space left on device) while writing the temp file" in str(info.value)
    with pytest.raises(WriteError):  # a full disk stays full
        storage.write_jsonl_atomic(previous, NEW_ROWS)
    assert previous.read_bytes() == OLD and (previous.parent / "rejected.jsonl").read_text() == "ok\n"
    assert not [p for p in previous.parent.iterdir() if ".tmp-" in p.name]
    assert os.stat(previous).st_ino != before.st_ino  # the 1st hit did go through (same bytes)


def test_a_glob_with_a_slash_matches_the_whole_path(fault, tmp_path):
    fault("write@*/o/pilot_data.jsonl:1:EACCES")
    storage.write_text_atomic(tmp_path / "o" / "iterations" / "01" / "pilot_data.jsonl", "x\n")  # not this one
    with pytest.raises(WriteError, match="EACCES"):
        storage.write_text_atomic(tmp_path / "o" / "pilot_data.jsonl", "x\n")


def test_fault_specs_parse():
    assert faults.parse("write") == ("write", "", 1, None)
    assert faults.parse("write:3") == ("write", "", 3, None)
    assert faults.parse("write@shard-*.jsonl:2") == ("write", "shard-*.jsonl", 2, None)
    assert faults.parse("write@pilot_data.jsonl:1:ENOSPC") == ("write", "pilot_data.jsonl", 1, errno.ENOSPC)
    assert faults.parse("write:EACCES") == ("write", "", 1, errno.EACCES)
    assert faults.parse("write@*/o/pilot_data.jsonl:EROFS") == ("write", "*/o/pilot_data.jsonl", 1, errno.EROFS)
    with pytest.raises(ValueError, match="neither a count nor an errno name"):
        faults.parse("write:ENOSUCHTHING")


def test_a_remembered_interrupt_stops_the_next_phase_and_batch(tmp_path) -> None:
    """Ctrl-C is never lost (stage1_core/infra/interrupts.py): once requested, a phase does not start and a
    running one stops at its next progress step, even if the first KeyboardInterrupt was swallowed."""
    from stage1_core.infra import interrupts
    from stage1_core.phases import pipeline

    interrupts.request()
    try:
        with pytest.raises(KeyboardInterrupt):
            pipeline.run_phase({"phase": "qc", "out_dir": str(tmp_path / "qc"), "meta": {}})
        step = pipeline._counter(lambda done, total: None, 10)
        with pytest.raises(KeyboardInterrupt):
            step(1)
        assert not (tmp_path / "qc").exists()  # stopped before it made anything
    finally:
        interrupts.clear()
    pipeline._counter(lambda done, total: None, 10)(1)  # cleared: no interrupt


def test_run_files_are_read_by_the_one_hardened_reader(tmp_path) -> None:
    """Issue 21: a run's own files go through the JSONL reader of seeds and eval data: an empty file is
    valid (nothing kept), a line cut short by a full disk or a hand-edited repeated key is an
    InputError naming the file and line, never a silent wrong value."""
    from stage1_core.infra import jsonl
    from stage1_core.infra.errors import InputError

    assert not hasattr(storage, "read_jsonl")  # one reader
    empty = tmp_path / "pairs.rejected.jsonl"
    empty.write_text("")
    assert jsonl.read_rows(empty) == []
    good = tmp_path / "kept.jsonl"
    storage.write_jsonl_atomic(good, [{"id": "a", "x": 1}, {"id": "b", "x": 2}])
    assert jsonl.read_rows(good) == [{"id": "a", "x": 1}, {"id": "b", "x": 2}]
    cut = tmp_path / "cut.jsonl"
    cut.write_text('{"id": "a"}\n{"id": "b", "instr')
    with pytest.raises(InputError) as e:
        jsonl.read_rows(cut)
    assert e.value.file == str(cut) and e.value.line == 2 and "invalid JSON" in str(e.value)
    twice = tmp_path / "twice.jsonl"
    twice.write_text('{"id": "a", "id": "b"}\n')
    with pytest.raises(InputError) as e:
        jsonl.read_rows(twice)
    assert e.value.line == 1 and e.value.field == "id"
