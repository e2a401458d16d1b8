"""The log writer's checked append (src/native/appendlog.c through filecalls)."""
import errno
import os

import pytest

from pyloader.output import filecalls

pytestmark = pytest.mark.skipif(filecalls.append_if_current is None,
                                reason="the agent's helper is not built (make bpf)")


def test_appends_while_the_path_names_the_open_file(tmp_path):
    p = tmp_path / "a.log"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        assert filecalls.append_if_current(fd, os.fsencode(p), b"one\n") == 4
        assert filecalls.append_if_current(fd, os.fsencode(p), b"two\n") == 4
    finally:
        os.close(fd)
    assert p.read_bytes() == b"one\ntwo\n"


@pytest.mark.parametrize("how", ["renamed", "deleted", "replaced"])
def test_writes_nothing_once_the_path_names_another_file_or_none(tmp_path, how):
    p = tmp_path / "a.log"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.rename(p, tmp_path / "a.log.1") if how != "deleted" else os.unlink(p)
        if how == "replaced":
            p.write_bytes(b"")
        assert filecalls.append_if_current(fd, os.fsencode(p), b"one\n") == filecalls.MOVED
    finally:
        os.close(fd)
    assert not (tmp_path / "a.log.1").exists() or (tmp_path / "a.log.1").read_bytes() == b""
    assert not p.exists() or p.read_bytes() == b""


def test_an_error_carries_the_errno_and_the_bytes_written(tmp_path):
    p = tmp_path / "a.log"
    p.write_bytes(b"")
    fd = os.open(p, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as e:
            filecalls.append_if_current(fd, os.fsencode(p), b"one\n")
    finally:
        os.close(fd)
    assert e.value.errno == errno.EBADF and e.value.written == 0
    assert str(p) in str(e.value)


def test_an_unreadable_path_is_an_error_not_a_move(tmp_path):
    p = tmp_path / "a.log"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        with pytest.raises(OSError) as e:
            filecalls.append_if_current(fd, os.fsencode(p) + b"/x", b"one\n")
    finally:
        os.close(fd)
    assert e.value.errno == errno.ENOTDIR
