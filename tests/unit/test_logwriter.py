"""The log writer thread: whole lines, reopen, size rotation, copytruncate repair,
bounded queue with counted drops, ENOSPC (real files, a real FIFO, a real tmpfs)."""
import json
import os
import shutil
import subprocess
import threading
import time

import pytest

from pyloader.errors import ConfigError
from pyloader.output.logwriter import LogWriter, parse_size


def lines(n, start=0, pad=60):
    return b"".join(b'{"i":%d,"pad":"%s"}\n' % (i, b"x" * pad) for i in range(start, start + n))


def read_ids(*paths):
    out = []
    for p in paths:
        if os.path.exists(p):
            data = open(p, "rb").read()
            assert not data or data.endswith(b"\n"), f"{p} ends with a partial line"
            out += [json.loads(l)["i"] for l in data.splitlines()]
    return out


def wait_for(cond, timeout=20.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def written(w, n):
    wait_for(lambda: w.counters()["written_lines"] >= n, what=f"{n} lines written")


def test_lines_arrive_whole_and_in_order(tmp_path):
    p = str(tmp_path / "a.log")
    w = LogWriter(p)
    for k in range(50):
        assert w.submit(lines(20, k * 20), 20)
    w.close()
    assert read_ids(p) == list(range(1000))
    assert w.counters()["written_lines"] == 1000 and w.counters()["dropped_lines"] == 0


def test_appends_to_an_existing_file(tmp_path):
    p = str(tmp_path / "a.log")
    open(p, "wb").write(lines(3))
    w = LogWriter(p)
    w.submit(lines(2, 3), 2)
    w.close()
    assert read_ids(p) == [0, 1, 2, 3, 4]


def test_unwritable_path_is_a_clear_error_at_start(tmp_path):
    with pytest.raises(ConfigError, match=r"opening the access log .*/nodir/a.log: .*ENOENT"):
        LogWriter(str(tmp_path / "nodir" / "a.log"))


def test_reopen_after_rename_writes_to_a_new_file_at_the_path(tmp_path):
    p = str(tmp_path / "a.log")
    w = LogWriter(p)
    w.submit(lines(5), 5)
    written(w, 5)
    os.rename(p, p + ".1")          # logrotate `create` without telling us
    w.submit(lines(5, 5), 5)
    w.close()
    assert read_ids(p + ".1") == [0, 1, 2, 3, 4] and read_ids(p) == [5, 6, 7, 8, 9]
    assert w.counters()["reopens"] == 1


@pytest.mark.parametrize("how", ["rename", "unlink"])
def test_rename_between_the_check_and_the_write_still_writes_to_the_path(
        tmp_path, monkeypatch, how):
    """logrotate `create` renames the file after the writer looked at the path but
    before its write (the writer thread waiting for the GIL, on a busy node): the
    batch goes to the new file at the path, none into the rotated one, which a
    shipper may already have read to its end and closed (CI: 575 lines lost)."""
    p = str(tmp_path / "a.log")
    w = LogWriter(p)
    w.submit(lines(5), 5)
    written(w, 5)
    looked = LogWriter._follow

    def look_then_rotate(self, incoming):
        looked(self, incoming)
        if os.path.exists(p) and not os.path.exists(p + ".1"):
            os.rename(p, p + ".1") if how == "rename" else os.unlink(p)
    monkeypatch.setattr(LogWriter, "_follow", look_then_rotate)
    w.submit(lines(5, 5), 5)
    w.close()
    assert read_ids(p + ".1") == ([0, 1, 2, 3, 4] if how == "rename" else [])
    assert read_ids(p) == [5, 6, 7, 8, 9]
    assert w.counters()["reopens"] == 1 and w.counters()["written_lines"] == 10


def test_deleted_file_is_created_again(tmp_path):
    p = str(tmp_path / "a.log")
    w = LogWriter(p)
    w.submit(lines(2), 2)
    written(w, 2)
    os.unlink(p)
    w.submit(lines(2, 2), 2)
    w.close()
    assert read_ids(p) == [2, 3]


def test_reopen_request_reopens_the_same_path(tmp_path):
    """SIGHUP: reopen() sets a flag; the writer reopens within a second even when idle."""
    p = str(tmp_path / "a.log")
    w = LogWriter(p)
    w.reopen()
    wait_for(lambda: w.counters()["reopens"] == 1, what="reopen while idle")
    w.submit(lines(1), 1)
    w.close()
    assert read_ids(p) == [0]


def test_size_rotation_keeps_backups_and_whole_lines(tmp_path):
    p = str(tmp_path / "a.log")
    w = LogWriter(p, max_bytes=2000, backups=2)
    for i in range(100):                       # ~80 bytes a line, one batch each
        w.submit(lines(1, i), 1)
        written(w, i + 1)
    w.close()
    assert sorted(os.listdir(tmp_path)) == ["a.log", "a.log.1", "a.log.2"]
    for f in ("a.log", "a.log.1", "a.log.2"):
        assert os.path.getsize(tmp_path / f) <= 2000
    ids = read_ids(p + ".2", p + ".1", p)
    assert ids == list(range(100 - len(ids), 100))   # the newest lines, contiguous, once
    assert w.counters()["rotations"] >= 3


def test_size_rotation_needs_a_backup_count(tmp_path):
    with pytest.raises(ConfigError, match="--log-backups"):
        LogWriter(str(tmp_path / "a.log"), max_bytes=1000, backups=0)


def test_copytruncate_lines_written_after_the_copy_are_written_again(tmp_path):
    """logrotate copytruncate: copy, (we write more), truncate. The lines the copy
    missed are written again after the truncation: copy + file hold each once."""
    p = str(tmp_path / "a.log")
    w = LogWriter(p)
    w.submit(lines(10), 10)
    written(w, 10)
    shutil.copyfile(p, p + ".1")               # the copy
    w.submit(lines(5, 10), 5)                  # written between copy and truncate
    written(w, 15)
    os.truncate(p, 0)                          # the truncate
    w.submit(lines(5, 15), 5)
    w.close()
    assert read_ids(p + ".1") == list(range(10))
    assert sorted(read_ids(p)) == list(range(10, 20))
    c = w.counters()
    assert c["truncations"] == 1 and c["rewritten_lines"] == 5


def test_copytruncate_without_a_matching_copy_is_counted(tmp_path):
    p = str(tmp_path / "a.log")
    w = LogWriter(p)
    w.submit(lines(3), 3)
    written(w, 3)
    os.truncate(p, 0)                          # truncated, no copy anywhere
    w.submit(lines(2, 3), 2)
    w.close()
    assert read_ids(p) == [3, 4]
    assert w.counters()["unmatched_truncations"] == 1


@pytest.fixture
def stalled_fifo(tmp_path):
    """A FIFO whose reader opened it and never reads: writes block once the pipe is full."""
    p = str(tmp_path / "fifo")
    os.mkfifo(p)
    rfd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
    yield p, rfd
    os.close(rfd)


def test_full_queue_drops_and_counts_without_blocking(stalled_fifo):
    p, rfd = stalled_fifo
    w = LogWriter(p, queue_lines=1000)
    accepted = dropped = 0
    t0 = time.monotonic()
    for k in range(200):                       # 4000 lines, ~350 kB: the pipe holds 64 kB
        if w.submit(lines(20, k * 20), 20):
            accepted += 20
        else:
            dropped += 20
    assert time.monotonic() - t0 < 10          # (generous: never blocked on the pipe)
    assert dropped > 0 and w.counters()["dropped_lines"] == dropped
    got = b""                                  # the reader wakes up: everything accepted arrives
    while len(got.splitlines()) < accepted:
        try:
            chunk = os.read(rfd, 1 << 16)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        got += chunk
    w.close()
    ids = [json.loads(l)["i"] for l in got.splitlines()]
    assert len(ids) == accepted == len(set(ids)) and ids == sorted(ids)


def test_close_gives_up_on_a_writer_blocked_forever(stalled_fifo):
    p, _ = stalled_fifo
    w = LogWriter(p, queue_lines=100000)
    for k in range(100):
        w.submit(lines(20, k * 20), 20)
    t0 = time.monotonic()
    w.close(timeout=1.0)
    assert time.monotonic() - t0 < 30          # returns; the daemon thread stays blocked


def test_parse_size():
    assert parse_size("100M") == 100 << 20 and parse_size("512k") == 512 << 10
    assert parse_size("2GiB") == 2 << 30 and parse_size("123") == 123
    with pytest.raises(ConfigError):
        parse_size("lots")


@pytest.fixture
def small_tmpfs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    d = tmp_path / "mnt"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "redtap-test", str(d)], check=True)
    yield str(d)
    subprocess.run(["umount", "-l", str(d)], check=False)


def fill(path):
    """Fill the filesystem of @path's directory: a file grown until ENOSPC."""
    with open(path, "wb", buffering=0) as f:
        for size in (4096, 512, 64, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                pass


def test_enospc_keeps_lines_queued_and_resumes_when_space_returns(small_tmpfs):
    p = os.path.join(small_tmpfs, "a.log")
    w = LogWriter(p, queue_lines=500)
    w.submit(lines(1), 1)
    written(w, 1)
    fill(os.path.join(small_tmpfs, "filler"))
    sent = 1
    for k in range(20):                        # 400 lines, ~32 kB: cannot fit
        w.submit(lines(20, sent), 20)
        sent += 20
    wait_for(lambda: w.counters()["write_errors"] > 0, what="ENOSPC")
    assert "ENOSPC" in w.counters()["last_error"]
    data = open(p, "rb").read()
    assert data.endswith(b"\n")                # no partial line while the disk is full
    for _ in range(10):                        # the queue fills up: drops are counted
        if not w.submit(lines(20, sent), 20):
            break
        sent += 20
    assert w.counters()["dropped_lines"] == 20
    os.unlink(os.path.join(small_tmpfs, "filler"))
    w.close()
    assert read_ids(p) == list(range(sent))    # everything accepted, in order, once
    assert w.counters()["written_lines"] == sent


def test_lines_from_many_threads_are_never_interleaved(tmp_path):
    p = str(tmp_path / "a.log")
    w = LogWriter(p)

    def worker(base):
        for k in range(50):
            w.submit(lines(10, base + k * 10, pad=500), 10)

    ts = [threading.Thread(target=worker, args=(i * 1000,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    w.close()
    assert sorted(read_ids(p)) == sorted(i * 1000 + j for i in range(4) for j in range(500))
