"""Where run files live: local paths or object storage (`gs://`), and the multi-host check that
every host sees the same workdir.

Checkpoints go through Orbax and TensorStore, which write GCS natively; everything else (metrics,
manifests, sweep collection) goes through `etils.epath`, whose paths work the same for local
files and `gs://` objects. Local paths are made absolute once, so a process that changes its
directory still writes to the same place.

An outage is never silent. Every client retries by itself (TensorStore, gcsfs, ArrayRecord's
GCS client), so a blocked call just hangs. The blocking storage calls of a run are made inside
`waiting(path, what)`: one watchdog thread asks the storage service itself whether it answers
once such a call has taken MDM_JAX_STORAGE_WAIT_S seconds (30), and prints a line every as many
seconds while it does not (a long save to a service that answers prints nothing). Whole files
that mdm_jax writes itself (metrics.jsonl) are written with `write_text`, which retries on its
own, one line per retry, while the service does not answer.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from etils import epath

from mdm_jax.errors import UserError, debug

WAIT_ENV = "MDM_JAX_STORAGE_WAIT_S"
GIVE_UP_S = 3600.0  # `write_text` retries this long, then stops the run with one line


class StorageError(UserError, ValueError):
    """A workdir that cannot work for this run; the message names the fix."""


def is_remote(path: str | os.PathLike) -> bool:
    """Object storage (gs://, s3://, ...) rather than a path on this host."""
    return "://" in str(path)


def resolve(path: str | os.PathLike) -> str:
    """A remote URI as given; a local path made absolute."""
    return str(path) if is_remote(path) else os.path.abspath(os.fspath(path))


def as_path(path: str | os.PathLike) -> epath.Path:
    if is_remote(path):
        _configure_object_storage()
    return epath.Path(resolve(path))


@functools.cache
def _configure_object_storage() -> None:
    try:
        import fsspec
    except ImportError:
        raise StorageError("gs:// paths need the gcs extra: pip install -e '.[gcs]'") from None
    # gcsfs caches directory listings; checkpoints are written by TensorStore behind its back,
    # so a cached listing would hide new steps.
    fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)
    logging.getLogger("gcsfs").addFilter(_GcsfsNoiseToDebug())


class _GcsfsNoiseToDebug(logging.Filter):
    """gcsfs logs a traceback for each request it gives up on, then raises the error to its
    caller, which reports it (or, for `retrying`, retries it with one line); and it logs a
    traceback and a warning per object when the server refuses its move request, then copies
    and deletes the object instead (setting a damaged checkpoint aside moves every object of
    the step: dozens of tracebacks around one line). Those records are kept at DEBUG unless
    MDM_JAX_DEBUG is set."""

    NOISE = ("out of retries", "non-retriable exception", "Falling back to copy/delete")

    def filter(self, record: logging.LogRecord) -> bool:
        if debug() or not any(n in record.getMessage() for n in self.NOISE):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger("gcsfs").isEnabledFor(logging.DEBUG)


def join(base: str | os.PathLike, *parts: str) -> str:
    return str(as_path(base).joinpath(*parts))


def check_shared_workdir(workdir: str) -> None:
    """With several processes, every one must see the same workdir: a relative path or a disk
    local to each host would split checkpoints and metrics across hosts.

    Process 0 writes a random token into the workdir; after a barrier every process reads it
    back, and all of them fail together if any could not.
    """
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return
    if not is_remote(workdir) and not os.path.isabs(workdir):
        raise StorageError(
            f"config.workdir={workdir!r} is relative, but this run has {jax.process_count()} "
            f"processes that may run on different hosts; use gs://BUCKET/PATH or an absolute "
            f"path on a filesystem every host mounts")
    probe = as_path(workdir) / ".mdm_jax_shared_check"
    token = int(multihost_utils.broadcast_one_to_all(
        np.int64(secrets.randbits(62) if jax.process_index() == 0 else 0)))
    if jax.process_index() == 0:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text(str(token))
    multihost_utils.sync_global_devices("mdm_jax.storage.write_probe")
    try:
        seen = probe.read_text().strip() == str(token)
    except OSError:
        seen = False
    everyone = multihost_utils.process_allgather(np.int32(seen))
    if not np.all(everyone):
        blind = [i for i, ok in enumerate(np.asarray(everyone).ravel()) if not ok]
        raise StorageError(
            f"config.workdir={workdir!r} is not shared: process(es) {blind} do not see what "
            f"process 0 wrote there (a disk local to each host?); use gs://BUCKET/PATH or a "
            f"filesystem every host mounts")


def _wait_s() -> float:
    try:
        return max(float(os.environ.get(WAIT_ENV, "30")), 0.1)
    except ValueError:
        raise StorageError(f"{WAIT_ENV}={os.environ[WAIT_ENV]!r} is not a number of "
                           f"seconds; unset it or give e.g. {WAIT_ENV}=30") from None


def _say(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"[mdm_jax] {line}", file=sys.stderr)  # above a progress bar, if one is drawn
    sys.stderr.flush()


def gcs_endpoint() -> str:
    """The GCS JSON API the clients talk to: an emulator's when one is set (gcsfs and
    google-cloud-storage read STORAGE_EMULATOR_HOST, TensorStore TENSORSTORE_GCS_HTTP_URL)."""
    url = (os.environ.get("STORAGE_EMULATOR_HOST") or os.environ.get("TENSORSTORE_GCS_HTTP_URL")
           or "https://storage.googleapis.com")
    return (url if "://" in url else f"http://{url}").rstrip("/")


def answers(path: str, timeout: float = 10.0) -> bool | None:
    """Whether the storage service behind `path` answers a request at all within `timeout`
    seconds: any HTTP reply below 500 counts (a refusal for lack of credentials too); no
    connection, no reply or a 5xx (service unavailable) does not. None: a scheme this cannot
    ask (only gs:// is asked)."""
    scheme, _, rest = str(path).partition("://")
    if scheme != "gs":
        return None
    bucket = rest.split("/", 1)[0]
    url = f"{gcs_endpoint()}/storage/v1/b/{urllib.parse.quote(bucket, '')}?fields=name"
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return True
    except urllib.error.HTTPError as e:
        return e.code < 500
    except (OSError, ValueError):  # refused, reset, timed out, no route, bad address
        return False


def _took(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


class _Call:
    """One blocking storage call in flight."""

    def __init__(self, path: str, what: str, wait_s: float):
        self.path, self.what = path, what
        self.start = time.monotonic()
        self.due = self.start + wait_s  # when the watchdog next looks at it
        self.reported = False  # a "no answer" line was printed for it


class _Watchdog:
    """One daemon thread per process: it sleeps until the oldest call in flight is due, asks
    that call's service whether it answers (once per bucket per round), and prints a line for
    each due call whose service does not."""

    def __init__(self):
        self._calls: list[_Call] = []
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, call: _Call) -> None:
        with self._changed:
            self._calls.append(call)
            if self._thread is None or not self._thread.is_alive():  # (none in a fork)
                self._thread = threading.Thread(target=self._run, name="mdm_jax-storage-watch",
                                                daemon=True)
                self._thread.start()
            if len(self._calls) == 1:  # else the thread already wakes before this one is due
                self._changed.notify()

    def remove(self, call: _Call) -> None:
        with self._changed:
            self._calls.remove(call)

    def _run(self) -> None:
        while True:
            with self._changed:
                now = time.monotonic()
                due = [c for c in self._calls if c.due <= now]
                if not due:
                    # until the oldest call is due, or a new call is added
                    self._changed.wait(min((c.due for c in self._calls), default=now + 3600)
                                       - now)
                    continue
            wait_s = _wait_s()
            verdicts: dict[str, bool | None] = {}
            for call in due:
                bucket = _service(call.path)
                if bucket not in verdicts:
                    verdicts[bucket] = answers(call.path, timeout=min(10.0, wait_s))
                waited = time.monotonic() - call.start
                with self._changed:  # (held while printing: the call's last line comes after)
                    if call not in self._calls:
                        continue  # it finished while the service was asked
                    call.due = time.monotonic() + wait_s
                    if verdicts[bucket] is True:
                        continue  # slow (a big save), not an outage
                    call.reported = True
                    said = (f"no answer for {_took(waited)} (retrying; storage outage?)"
                            if verdicts[bucket] is False  # else a service we cannot ask
                            else f"{_took(waited)} so far (storage outage?)")
                    _say(f"waiting for {call.path} ({call.what}): {said}")


_watchdog = _Watchdog()
_watched = threading.local()  # .services: those watched by this thread's calls in progress


def _service(path: str) -> str:
    """gs://BUCKET of gs://BUCKET/..."""
    scheme, _, rest = path.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


@contextmanager
def waiting(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Around a storage call that blocks: if it takes long and the service behind `path` does
    not answer, a line says so every MDM_JAX_STORAGE_WAIT_S seconds, and one more line when
    the call returns. Local paths are not watched, nor a call inside another on the same
    bucket (the outer one speaks for both)."""
    services = _watched.__dict__.setdefault("services", set())
    if not is_remote(path) or _service(str(path)) in services:
        yield
        return
    call = _Call(str(path), what, _wait_s())
    services.add(_service(call.path))
    _watchdog.add(call)
    try:
        yield
    finally:
        _watchdog.remove(call)
        services.discard(_service(call.path))
        if call.reported:
            _say(f"{call.path} answered again after {_took(time.monotonic() - call.start)} "
                 f"({what}); continuing")


def retrying(path: str | os.PathLike, what: str, fn: Callable[[], object]):
    """fn() (a storage call that may be repeated, such as rewriting a whole file), called
    again while it fails and the service behind `path` does not answer, with a line per retry
    saying how long it has waited; a failure while the service answers is raised as it is.
    After GIVE_UP_S a StorageError names the path and the outage."""
    start, delay = time.monotonic(), 1.0
    while True:
        try:
            with waiting(path, what):
                return fn()
        except Exception as e:  # noqa: BLE001  (whatever the client raises: asked below)
            if (isinstance(e, UserError) or not is_remote(path)
                    or answers(path, timeout=min(10.0, _wait_s())) is not False):
                raise
            waited = time.monotonic() - start
            cause = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            if waited >= GIVE_UP_S:
                raise StorageError(
                    f"{what} {path} failed: the storage service has not answered for "
                    f"{_took(waited)} ({cause}); rerun the same command to resume from the "
                    f"last checkpoint once it answers") from None
            _say(f"{what} {path} failed: no answer from storage ({cause}); retrying in "
                 f"{delay:.0f} s, waited {_took(waited)} so far (storage outage?)")
            time.sleep(delay)  # back-off between retries
            delay = min(2 * delay, 60.0)


def write_text(path: str | os.PathLike, text: str, what: str = "writing") -> None:
    """A whole file written, through an outage of its storage (`retrying`)."""
    target = as_path(path)
    retrying(str(target), what, lambda: target.write_text(text))
