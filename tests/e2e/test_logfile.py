"""The access log as a tail-based shipper sees it, with the real agent tracing real
nginx: real logrotate (create, copytruncate) while 20,000 requests are logged at full
speed, rsyslog's imfile forwarding the file; SIGHUP; size rotation; a full disk
(a small tmpfs); a reader that stalls."""
import collections
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from pyloader.lab.netnode import pod_ip

from support.agentproc import AgentProc

FULL = 20_000
ROTATE_AT = 600_000     # bytes in the live file: ~1,700 records (up to 6 rotations a run)


def need(*tools):
    missing = [t for t in tools if not any(os.access(os.path.join(d, t), os.X_OK)
                                           for d in os.environ["PATH"].split(":") + ["/usr/sbin"])]
    if missing:
        pytest.fail(f"missing {missing}: run `make deps` (scripts/install-deps.sh)")


def whole_lines(path) -> list[bytes]:
    """Complete lines of a file (a line being written is not counted yet)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    return data[:data.rfind(b"\n") + 1].splitlines()


def paths_of(lines) -> collections.Counter:
    out = collections.Counter()
    for line in lines:
        rec = json.loads(line)               # every line parses as JSON
        if "event" not in rec:
            out[rec["url.path"]] += 1
    return out


def log_files(log) -> list[str]:
    """The live file and its rotated siblings (log.1, log.2, ...), oldest first."""
    rotated = sorted(glob.glob(log + ".*"), key=lambda p: -int(p.rsplit(".", 1)[1]))
    return rotated + [log]


class Rsyslog:
    """rsyslogd with its own config, pid file and work directory: imfile tails the
    access log (inotify), omfile writes each line as it came to another file."""

    CONF = """\
global(workDirectory="{work}" maxMessageSize="64k")
module(load="imfile" mode="inotify")
template(name="line" type="string" string="%msg%\\n")
ruleset(name="fwd") {{
    action(type="omfile" file="{out}" template="line" flushOnTXEnd="on" asyncWriting="off")
}}
input(type="imfile" file="{log}" tag="redtap" ruleset="fwd" reopenOnTruncate="on"
      freshStartTail="off")
"""

    def __init__(self, folder: str, log: str):
        self.dir = folder
        self.out = os.path.join(folder, "forwarded.log")
        work = os.path.join(folder, "rsyslog-work")
        os.makedirs(work, exist_ok=True)
        self.conf = os.path.join(folder, "rsyslog.conf")
        with open(self.conf, "w") as f:
            f.write(self.CONF.format(work=work, out=self.out, log=log))
        self.err = open(os.path.join(folder, "rsyslog.stderr"), "w")
        self.proc = subprocess.Popen(["rsyslogd", "-n", "-f", self.conf,
                                      "-i", os.path.join(folder, "rsyslog.pid")],
                                     stdout=self.err, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def lines(self) -> list[bytes]:
        return whole_lines(self.out)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


LOGROTATE = """\
{log} {{
    rotate 50
    missingok
    nocompress
    {mode}
}}
"""


def wait_for(cond, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def rotate_while_logging(node, tmp, mode):
    """20,000 keepalive requests to nginx; logrotate (mode) every ROTATE_AT bytes,
    rsyslog forwarding. Returns (agent, rsyslog, rotations)."""
    agent = AgentProc(node, "--endpoint", f"{pod_ip(0)}:80", "--stats-interval", "2",
                      name=f"rot-{mode}")
    agent.wait_started()
    rs = Rsyslog(tmp, agent.log)
    conf, state = os.path.join(tmp, "logrotate.conf"), os.path.join(tmp, "logrotate.state")
    with open(conf, "w") as f:
        f.write(LOGROTATE.format(log=agent.log, mode=mode))
    errors = []

    def traffic():
        try:
            node.traffic(node.pods[2].ns, "keepalive", pod_ip(0), "80", str(FULL), "/r/{i}",
                         timeout=900)
        except Exception as e:  # reported by the test thread
            errors.append(e)

    t = threading.Thread(target=traffic)
    t.start()
    rotations = 0
    try:
        while t.is_alive():
            if rotations < 6 and os.path.exists(agent.log) and \
                    os.path.getsize(agent.log) >= ROTATE_AT:
                subprocess.run(["logrotate", "-f", "-s", state, conf], check=True,
                               capture_output=True, timeout=60)
                rotations += 1
            time.sleep(0.05)
    finally:
        t.join()
    assert not errors, errors

    def on_disk():
        return sum(paths_of(whole_lines(p)).total() for p in log_files(agent.log))
    wait_for(lambda: on_disk() >= FULL, 120, "every request in the log files")
    last = f"/r/{FULL - 1}"
    wait_for(lambda: glued_paths(rs.lines())[last] >= 1, 120, "rsyslog to forward the last")
    time.sleep(1)                          # anything extra would show up now
    assert agent.stop() == 0
    rs.stop()
    return agent, rs, rotations


def assert_each_request_once(lines):
    got = paths_of(lines)
    want = {f"/r/{i}" for i in range(FULL)}
    missing = sorted(want - set(got))
    twice = sorted(p for p, n in got.items() if n > 1)
    assert not missing and not twice, (f"{len(missing)} missing (e.g. {missing[:5]}), "
                                       f"{len(twice)} twice (e.g. {twice[:5]})")
    assert set(got) == want


@pytest.fixture
def tmp():
    d = tempfile.mkdtemp(prefix="redtap-logfile-")
    yield d
    subprocess.run(["rm", "-rf", d], check=False)


def test_logrotate_create_while_logging_20000_requests_ships_each_once(node, tmp):
    """logrotate `create` (rename, new file) several times at full speed: the agent
    notices each rename before its next write; imfile reads the renamed file to its
    end, then the new one: every request forwarded exactly once, every line JSON."""
    need("logrotate", "rsyslogd")
    agent, rs, rotations = rotate_while_logging(node, tmp, "create")
    assert rotations >= 3, f"only {rotations} rotations while logging"
    files = log_files(agent.log)
    assert len(files) == rotations + 1
    assert_each_request_once(rs.lines())                                # shipped
    assert_each_request_once([l for p in files for l in whole_lines(p)])  # on disk
    log = agent.counters()["log"]
    assert log["dropped_lines"] == 0 and log["write_errors"] == 0
    assert log["reopens"] >= rotations


def glued_paths(lines) -> collections.Counter:
    """paths_of() for imfile's output after copytruncate: a line that imfile was
    half-way through when the file was truncated is glued to the next line it reads
    (from the truncated file): such a line counts as its last, whole record."""
    out = collections.Counter()
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            rec = json.loads(b'{"time":' + line.rsplit(b'{"time":', 1)[1])
            out["(glued)"] += 1
        if "event" not in rec:
            out[rec["url.path"]] += 1
    return out


def test_logrotate_copytruncate_while_logging_20000_requests_keeps_each_once(node, tmp):
    """logrotate `copytruncate` several times at full speed: the lines written between
    logrotate's copy and its truncation are written again, so the copies and the
    live file hold every request exactly once. A tail shipper can only lose what it
    had not read when the file was truncated (it is in the copy): measured, bounded."""
    need("logrotate", "rsyslogd")
    agent, rs, rotations = rotate_while_logging(node, tmp, "copytruncate")
    assert rotations >= 3, f"only {rotations} rotations while logging"
    files = log_files(agent.log)
    assert len(files) == rotations + 1
    assert_each_request_once([l for p in files for l in whole_lines(p)])  # on disk
    log = agent.counters()["log"]
    assert log["dropped_lines"] == 0 and log["write_errors"] == 0
    assert log["truncations"] == rotations and log["unmatched_truncations"] == 0
    # the shipper: what it missed is only ever in the rotated copies; a line
    # forwarded twice can only be one that was written again after a truncation
    shipped = glued_paths(rs.lines())
    assert shipped.pop("(glued)", 0) <= rotations
    in_copies = set(paths_of([l for p in files[:-1] for l in whole_lines(p)]))
    missed = {f"/r/{i}" for i in range(FULL)} - set(shipped)
    assert missed <= in_copies
    assert sum(n - 1 for n in shipped.values()) <= log["rewritten_lines"]
    print(f"copytruncate: {len(missed)} of {FULL} requests not read by imfile before a "
          f"truncation, {log['rewritten_lines']} lines written again")


def test_sighup_reopens_the_log(node, tmp):
    agent = AgentProc(node, "--endpoint", f"{pod_ip(0)}:80", "--stats-interval", "0.5",
                      name="hup").wait_started()
    try:
        os.rename(agent.log, agent.log + ".old")
        os.killpg(agent.proc.pid, signal.SIGHUP)
        wait_for(lambda: os.path.exists(agent.log), 30, "the log reopened at its path")
        node.curl(node.pods[2].ns, f"http://{pod_ip(0)}/after-hup")
        wait_for(lambda: paths_of(whole_lines(agent.log))["/after-hup"] == 1, 30,
                 "the request in the new file")
    finally:
        assert agent.stop() == 0
    assert agent.counters()["log"]["reopens"] == 1
    assert "/after-hup" not in paths_of(whole_lines(agent.log + ".old"))


def test_size_rotation_keeps_the_newest_requests_in_whole_files(node, tmp):
    max_bytes, backups, n = 128 << 10, 3, 3000
    agent = AgentProc(node, "--endpoint", f"{pod_ip(0)}:80", "--log-max-bytes", "128k",
                      "--log-backups", str(backups), name="size").wait_started()
    try:
        node.traffic(node.pods[2].ns, "keepalive", pod_ip(0), "80", str(n), "/s/{i}")
        wait_for(lambda: paths_of(whole_lines(agent.log))[f"/s/{n - 1}"] == 1, 60,
                 "the last request")
    finally:
        assert agent.stop() == 0
    files = log_files(agent.log)
    assert [os.path.basename(p) for p in files] == \
        [os.path.basename(agent.log) + s for s in (".3", ".2", ".1", "")]
    for p in files:
        assert os.path.getsize(p) <= max_bytes
        data = open(p, "rb").read()
        assert data.endswith(b"\n")
    got = paths_of([l for p in files for l in whole_lines(p)])
    first = min(int(p.split("/")[2]) for p in got)
    assert first > 0                           # the oldest were rotated out
    assert got == collections.Counter(f"/s/{i}" for i in range(first, n))


@pytest.fixture
def small_disk(tmp):
    """A 512 kB tmpfs for the log (mounted before the agent's mount namespace exists)."""
    d = os.path.join(tmp, "disk")
    os.mkdir(d)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "redtap-enospc", d], check=True)
    yield d
    subprocess.run(["umount", "-l", d], check=False)


def fill(path):
    with open(path, "wb", buffering=0) as f:
        for size in (65536, 4096, 256, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                pass


def test_full_disk_counts_drops_and_logging_resumes_when_space_returns(node, small_disk):
    log = os.path.join(small_disk, "access.log")
    agent = AgentProc(node, "--endpoint", f"{pod_ip(0)}:80", "--log", log, "--log-queue",
                      "500", "--stats-interval", "3600", name="enospc")
    agent.log = log
    agent.wait_started()
    try:
        fill(os.path.join(small_disk, "filler"))
        node.traffic(node.pods[2].ns, "keepalive", pod_ip(0), "80", "2000", "/full/{i}")
        wait_for(lambda: "ENOSPC" in agent.stderr(), 30, "the agent to report ENOSPC")
        assert agent.proc.poll() is None       # still running
        os.unlink(os.path.join(small_disk, "filler"))
        wait_for(lambda: "resumed" in agent.stderr(), 30, "the agent to write again")
        node.traffic(node.pods[2].ns, "keepalive", pod_ip(0), "80", "300", "/after/{i}")
        wait_for(lambda: paths_of(whole_lines(log))["/after/299"] == 1, 60,
                 "logging to resume")
    finally:
        assert agent.stop() == 0
    data = open(log, "rb").read()
    assert data.endswith(b"\n")
    got = paths_of(data.splitlines())          # every line parses: no partial line
    assert all(got[f"/after/{i}"] == 1 for i in range(300))
    full = sum(n for p, n in got.items() if p.startswith("/full/"))
    c = agent.counters()
    assert c["kernel"]["ringbuf_full"] == 0 and c["agent"]["events"] == 2300
    # every request of the full disk is either in the file or counted as dropped
    assert c["log"]["dropped_lines"] > 0 and full + c["log"]["dropped_lines"] == 2000
    assert c["log"]["write_errors"] > 0 and "ENOSPC" in c["log"]["last_error"]


def scrape(node, port) -> dict:
    r = node.curl(node.node_ns, f"http://127.0.0.1:{port}/metrics", timeout=10)
    out = {}
    for line in r.stdout.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            k, _, v = line.rpartition(" ")
            out[k] = float(v)
    return out


def test_stalled_reader_never_blocks_the_ring_buffer_drain(node, tmp):
    """The log is a FIFO whose reader never reads: the writer blocks, the drain
    goes on (no ring buffer loss), lines beyond the queue are dropped and counted."""
    fifo = os.path.join(tmp, "fifo")
    os.mkfifo(fifo)
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    port = 9477
    proc = node.spawn(node.node_ns, sys.executable, "-m", "pyloader", "run", "--log", fifo,
                      "--endpoint", f"{pod_ip(0)}:80", "--log-queue", "1000",
                      "--stats-interval", "1", "--metrics-addr", f"127.0.0.1:{port}")
    try:
        wait_for(lambda: "redtap_agent_events_total" in scrape(node, port), 60, "the agent")
        node.traffic(node.pods[2].ns, "keepalive", pod_ip(0), "80", str(FULL), "/f/{i}",
                     timeout=900)
        wait_for(lambda: scrape(node, port).get("redtap_agent_events_total") == FULL, 120,
                 "every event drained")
        # all but what the queue (1000 lines) and the pipe (64 kB) hold were dropped
        least = FULL - 1000 - 64 * 1024 // 200
        wait_for(lambda: scrape(node, port).get("redtap_log_dropped_lines", 0) >= least, 60,
                 f"at least {least} lines counted as dropped")
        assert scrape(node, port)["redtap_kernel_ringbuf_full_total"] == 0
        proc.send_signal(signal.SIGTERM)       # exits although its writer is blocked
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(rfd)
