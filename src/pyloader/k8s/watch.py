"""Kubernetes API access with the official client: config, list-then-watch, gets.

ListWatch keeps one resource in step, in its own thread, the way client-go's
reflector does:
  list (paged, limit/continue) -> one "SYNC" with every object
  watch from the list's resourceVersion (allowWatchBookmarks, server-side
        timeoutSeconds) -> "ADDED"/"MODIFIED"/"DELETED" per event
  a stream that ends (timeout, dropped connection) -> watch again from the
        last resourceVersion seen (events or bookmarks): nothing is re-listed
  410 Gone (the version was compacted; as an ERROR event or HTTP status)
        -> a fresh list
  any other failure (connection refused, timeouts, 5xx, bad JSON)
        -> retry after an exponential backoff with jitter
Objects stay plain dicts (orjson): the client's model classes would cost a
deserialisation per object for nothing. Sinks are called from the thread.
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time
from dataclasses import dataclass

import orjson

from pyloader.errors import ConfigError

log = logging.getLogger("redtap.k8s")

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


@dataclass
class Timing:
    watch_timeout_s: int = 300      # server-side timeoutSeconds (randomised up to 2x)
    connect_timeout_s: float = 10.0
    list_timeout_s: float = 60.0    # read timeout of a list page or a get
    watch_slack_s: float = 30.0     # read timeout = timeoutSeconds + this (dead peers)
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    page_size: int = 500


def in_cluster(env=os.environ, sa_dir: str = SA_DIR) -> bool:
    return bool(env.get("KUBERNETES_SERVICE_HOST")) and os.path.isfile(f"{sa_dir}/token")


def load_client(kubeconfig: str | None = None, env=os.environ, sa_dir: str = SA_DIR):
    """An ApiClient from --kubeconfig, else in-cluster (service account), else the
    default kubeconfig ($KUBECONFIG, ~/.kube/config). Does not contact the API."""
    from kubernetes import client, config
    from kubernetes.config.incluster_config import InClusterConfigLoader
    cfg = client.Configuration()
    try:
        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        elif in_cluster(env, sa_dir):
            InClusterConfigLoader(token_filename=f"{sa_dir}/token",
                                  cert_filename=f"{sa_dir}/ca.crt",
                                  environ=env).load_and_set(cfg)
        else:
            config.load_kube_config(client_configuration=cfg)
    except Exception as e:  # the loaders raise ConfigException, OSError, yaml errors
        where = kubeconfig or ("in-cluster service account" if in_cluster(env, sa_dir)
                               else "the default kubeconfig")
        raise ConfigError(f"loading Kubernetes client config from {where}: {e}") from None
    cfg.retries = 0  # our own backoff decides when to try again
    return client.ApiClient(cfg)


class Gone(Exception):
    """410: the resourceVersion (or continue token) is too old: list afresh."""


class Backoff:
    def __init__(self, initial: float, maximum: float):
        self.initial, self.maximum, self.n = initial, maximum, 0

    def next(self) -> float:
        d = min(self.maximum, self.initial * (2 ** self.n))
        self.n = min(self.n + 1, 30)
        return d * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self.n = 0


def describe(e: BaseException) -> str:
    status = getattr(e, "status", None)
    if status is not None and getattr(e, "reason", None) is not None:
        return f"HTTP {status} {e.reason}".strip()
    errno = getattr(e, "errno", None)
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}{f' errno {errno}' if errno else ''}: {text}"[:300]


class ListWatch(threading.Thread):
    """List-then-watch one resource; sink(type, payload, wall_time) gets
    ("SYNC", [objects]) after each list and (event type, object) per event."""

    def __init__(self, name: str, call, sink, field_selector: str | None = None,
                 timing: Timing | None = None):
        super().__init__(name=f"redtap-k8s-{name}", daemon=True)
        self.what, self.call, self.sink = name, call, sink
        self.field_selector = field_selector
        self.timing = timing or Timing()
        self.backoff = Backoff(self.timing.backoff_initial_s, self.timing.backoff_max_s)
        self.rv: str | None = None
        self.synced = False       # at least one full list arrived
        self.connected = False    # a watch stream is open
        self.n = dict(lists=0, watches=0, events=0, bookmarks=0, gone=0, errors=0,
                      bad_events=0)
        self.last_error = ""
        self._stop = threading.Event()
        self._resp = None
        self._failing = False

    def _kw(self) -> dict:
        kw = {"_preload_content": False}
        if self.field_selector:
            kw["field_selector"] = self.field_selector
        return kw

    # -- one list --------------------------------------------------------------
    def list_all(self) -> None:
        t = self.timing
        items, token = [], None
        while True:
            kw = self._kw()
            if token:
                kw["_continue"] = token
            try:
                resp = self.call(limit=t.page_size, **kw,
                                 _request_timeout=(t.connect_timeout_s, t.list_timeout_s))
            except Exception as e:
                if getattr(e, "status", None) == 410:
                    raise Gone(describe(e)) from None
                raise
            try:
                body = orjson.loads(resp.data)
            finally:
                resp.release_conn()
            if not isinstance(body, dict) or not isinstance(body.get("items"), list):
                raise ValueError(f"list of {self.what}: not a list object")
            items += body["items"]
            md = body.get("metadata") or {}
            token = md.get("continue")
            if not token:
                break
        rv = md.get("resourceVersion")
        if not rv:
            raise ValueError(f"list of {self.what}: no resourceVersion")
        self.n["lists"] += 1
        self.sink("SYNC", items, time.time())
        self.rv, self.synced = str(rv), True

    # -- one watch ---------------------------------------------------------------
    def watch_once(self) -> int:
        """Follow one watch stream until it ends; returns events received."""
        from kubernetes.watch.watch import iter_resp_lines
        t = self.timing
        timeout = random.randint(t.watch_timeout_s, 2 * t.watch_timeout_s)
        try:
            resp = self.call(watch=True, resource_version=self.rv, allow_watch_bookmarks=True,
                             timeout_seconds=timeout, **self._kw(),
                             _request_timeout=(t.connect_timeout_s, timeout + t.watch_slack_s))
        except Exception as e:
            if getattr(e, "status", None) == 410:
                raise Gone(describe(e)) from None
            raise
        self._resp, self.connected, got = resp, True, 0
        self.n["watches"] += 1
        self._recovered()
        try:
            for line in iter_resp_lines(resp):
                if self._stop.is_set():
                    break
                if not line:
                    continue
                ev = orjson.loads(line)  # bad JSON: the stream is broken, resume
                typ = ev.get("type") if isinstance(ev, dict) else None
                obj = ev.get("object") if typ else None
                if not isinstance(obj, dict):
                    self.n["bad_events"] += 1
                    continue
                if typ == "ERROR":
                    if obj.get("code") == 410:
                        raise Gone(obj.get("message", "410"))
                    raise RuntimeError(f"watch error event: {obj.get('code')} "
                                       f"{obj.get('reason')}: {obj.get('message')}")
                rv = (obj.get("metadata") or {}).get("resourceVersion")
                if not rv:
                    self.n["bad_events"] += 1
                    continue
                if typ == "BOOKMARK":
                    self.n["bookmarks"] += 1
                elif typ in ("ADDED", "MODIFIED", "DELETED"):
                    self.sink(typ, obj, time.time())
                    self.n["events"] += 1
                    got += 1
                else:
                    self.n["bad_events"] += 1
                    continue
                self.rv = str(rv)
        finally:
            self.connected, self._resp = False, None
            resp.close()  # an unfinished stream must not go back to the pool open
            resp.release_conn()
        return got

    # -- the loop ------------------------------------------------------------------
    def run(self) -> None:
        while not self._stop.is_set():
            listing = self.rv is None
            try:
                if listing:
                    self.list_all()
                    self.backoff.reset()
                started = time.monotonic()
                got = self.watch_once()
                if got or time.monotonic() - started > 5:
                    self.backoff.reset()  # a healthy stream that ended: go on at once
                else:
                    self._stop.wait(self.backoff.next())
            except Gone as e:
                self.n["gone"] += 1
                log.info("k8s %s: %s: listing afresh", self.what, e)
                self.rv = None
                if listing:  # an expired continue token: do not spin
                    self._stop.wait(self.backoff.next())
            except Exception as e:
                if self._stop.is_set():
                    break
                self.n["errors"] += 1
                self.last_error = describe(e)
                delay = self.backoff.next()
                if not self._failing:
                    log.warning("k8s %s: %s (keeping the last known state; retrying, "
                                "backoff up to %.0fs)", self.what, self.last_error,
                                self.timing.backoff_max_s)
                self._failing = True
                self._stop.wait(delay)

    def _recovered(self) -> None:
        if self._failing:
            log.warning("k8s %s: API reachable again", self.what)
            self._failing = False

    def stop(self) -> None:
        self._stop.set()
        resp = self._resp
        if resp is not None:
            try:
                resp.shutdown()  # unblocks the read in the thread
            except Exception:
                pass

    def counters(self) -> dict:
        return {**self.n, "synced": self.synced, "connected": self.connected,
                **({"last_error": self.last_error} if self.last_error else {})}


class OwnerGetter(threading.Thread):
    """Resolves ReplicaSets to their controller (a Deployment) with GETs, on demand,
    retrying with backoff while the API is unreachable. results[(ns, name)] is
    (kind, name) of the workload, or absent while unknown."""

    def __init__(self, api_client, timing: Timing | None = None):
        super().__init__(name="redtap-k8s-owners", daemon=True)
        from kubernetes import client
        self.apps = client.AppsV1Api(api_client)
        self.timing = timing or Timing()
        self.results: dict[tuple[str, str], tuple[str, str] | None] = {}
        self.wanted: set[tuple[str, str]] = set()
        self.cv = threading.Condition()
        self.backoff = Backoff(self.timing.backoff_initial_s, self.timing.backoff_max_s)
        self.errors = 0
        self._stop = False

    def want(self, ns: str, name: str) -> None:
        key = (ns, name)
        if key not in self.results and key not in self.wanted:
            with self.cv:
                self.wanted.add(key)
                self.cv.notify()

    def resolve(self, ns: str, name: str) -> tuple[str, str] | None:
        t = self.timing
        try:
            resp = self.apps.read_namespaced_replica_set(
                name, ns, _preload_content=False,
                _request_timeout=(t.connect_timeout_s, t.list_timeout_s))
        except Exception as e:
            if getattr(e, "status", None) == 404:
                return None  # gone: the workload stays unknown
            raise
        try:
            rs = orjson.loads(resp.data)
        finally:
            resp.release_conn()
        for ref in (rs.get("metadata") or {}).get("ownerReferences") or []:
            if ref.get("controller") and ref.get("kind") and ref.get("name"):
                return (str(ref["kind"]), str(ref["name"]))
        return ("ReplicaSet", name)  # a ReplicaSet of its own

    def run(self) -> None:
        while True:
            with self.cv:
                while not self.wanted and not self._stop:
                    self.cv.wait()
                if self._stop:
                    return
                key = next(iter(self.wanted))
            try:
                self.results[key] = self.resolve(*key)
                self.backoff.reset()
                with self.cv:
                    self.wanted.discard(key)
            except Exception as e:
                self.errors += 1
                log.info("k8s: getting replicaset %s/%s: %s", *key, describe(e))
                with self.cv:
                    self.cv.wait(self.backoff.next())

    def stop(self) -> None:
        with self.cv:
            self._stop = True
            self.cv.notify()
