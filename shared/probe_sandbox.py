"""FFmpeg's reading of a container header, in a child process held to CPU, memory and time.

What FFmpeg does to open a file can cost far more than the file's size, one format at a time:
MP4 sample tables (GBs), Matroska tags (cubic: 211 KB held a core over 30 min), ID3v2 frames
(quadratic), APE frame tables; and, measured for this module (tests/test_probe_sandbox.py),
an ``id3 `` chunk of a WAV (2.4 MB: 27 s of a core), an FLV's onMetaData and an APEv2 tag. It
does it in C with the GIL released, where no Python timeout reaches it. The per-format checks of
:mod:`shared.audio_limits` answer the known cases in milliseconds; this is the line behind them
for the ones nobody has measured yet.

Each header read (``av.open``: duration, sample rate, channels) runs in a short-lived child
forked from a fork server (multiprocessing's "forkserver": a single-threaded process started
once, with PyAV already imported, so a child costs a fork, not an interpreter and an import; the
API and the worker have threads, where a plain fork is unsafe). The child limits itself
(``RLIMIT_CPU``, ``RLIMIT_AS``, no core file) and the parent kills it past a wall-clock timeout.
A child that runs out of CPU, memory or time, or dies (a crash in FFmpeg), is a 415: the file's
header could not be read within the limits. What is not the file's doing is a 503 (retry later,
:class:`SandboxUnavailable`): a child that could not be started (the fork server's socket removed
by a tmp cleaner, a fork of the process after its server started: each is met by starting a new
server, once), a wall-clock timeout of a child that was given little CPU (a starved host), a
child killed from outside (SIGKILL, as a cgroup's OOM killer sends, before its CPU limit). The file is handed over as it is: a path, the
descriptor of the upload's temporary file (passed over the fork server's socket, the child
reopens it with its own offset), or, for an upload held in memory (at most the API's spool size,
1 MB), its bytes.
"""

from __future__ import annotations

import errno
import io
import multiprocessing
import os
import multiprocessing.context
import resource
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing import forkserver, popen_forkserver, reduction, spawn, util
from multiprocessing.context import set_spawning_popen
from multiprocessing.reduction import DupFd
from typing import Any

from shared.audio_limits import NotAudioError
from shared.errors import AudioDecodeError, ModelError

# an upload held in memory larger than this is not expected (the API spools past 1 MB); a file
# object without a descriptor is read whole only up to it, else its header goes unread here
_MAX_BYTES = 64 << 20


@dataclass(frozen=True)
class ProbeLimits:
    """What one header read may take (Settings: ``probe_cpu_s``, ``probe_memory_mb``,
    ``probe_timeout_s``). A normal probe of an m4a, webm, mp3 or mkv takes about 10 ms and fails
    to open at 128 MB of address space, opens at 160 MB (PyAV's and FFmpeg's libraries mapped,
    most of it)."""

    cpu_s: int = 3
    memory_bytes: int = 512 << 20
    timeout_s: float = 10.0

    def describe(self) -> str:
        return f"{self.cpu_s} s of CPU, {self.memory_bytes >> 20} MB of memory, {self.timeout_s:g} s"


class SandboxUnavailable(ModelError):
    """The header check could not run (503, the service's state; the API sends Retry-After)."""

    status_code = 503


_lock = threading.Lock()
_context: Any = None


def _forget_server(*, kill: bool) -> None:
    """Drop multiprocessing's record of its fork server, so that the next start launches a new
    one: close this process's end of the server's alive pipe (a server whose every holder closed
    it exits) and, where ``kill`` (the server is this process's child), kill and reap it."""
    server = forkserver._forkserver
    if not kill:
        server._lock = threading.Lock()  # a fork may have copied it held by another thread
    with server._lock:
        pid, alive, address = server._forkserver_pid, server._forkserver_alive_fd, server._forkserver_address
        server._forkserver_pid = server._forkserver_alive_fd = server._forkserver_address = None
    if alive is not None:
        try:
            os.close(alive)
        except OSError:
            pass
    if kill and pid is not None:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    if kill and address and not util.is_abstract_socket_namespace(address):
        try:
            os.unlink(address)
        except OSError:
            pass
    # a tmp cleaner that removed the listener's socket removed its directory, multiprocessing's
    # temporary directory of this process: made again (its exit handler removes it)
    tempdir = multiprocessing.process.current_process()._config.get("tempdir")
    if kill and tempdir and not os.path.isdir(tempdir):
        try:
            os.mkdir(tempdir, 0o700)
        except OSError:
            multiprocessing.process.current_process()._config.pop("tempdir", None)


def _after_fork_in_child() -> None:
    # the fork server is the parent's child: ensure_running() would waitpid() a process that is
    # not this one's (ChildProcessError on every probe); this process starts a server of its own
    global _lock
    _lock = threading.Lock()
    if forkserver._forkserver._forkserver_pid is not None:
        _forget_server(kill=False)


os.register_at_fork(after_in_child=_after_fork_in_child)


def _ctx() -> Any:
    global _context
    with _lock:
        if _context is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["av", "shared.audio_limits", __name__])
            _context = ctx
        return _context


class _Popen(popen_forkserver.Popen):
    """multiprocessing's forkserver start, less the parent's ``__main__``: a child would import
    the parent's main module again before it runs (its preparation data names it; 3.11's
    ``set_forkserver_preload(["__main__"])`` never loads it into the server), which costs every
    probe the import of uvicorn's or celery's command line, and runs a script's unguarded code.
    The child needs only this module. (``popen_forkserver.Popen._launch`` as of 3.11-3.13.)"""

    def _launch(self, process_obj: Any) -> None:
        prep_data = spawn.get_preparation_data(process_obj._name)
        prep_data.pop("init_main_from_name", None)
        prep_data.pop("init_main_from_path", None)
        # in a Celery pool process the key is billiard's AuthenticationString, which refuses
        # multiprocessing's pickler: both copies become multiprocessing's own, which it pickles
        prep_data["authkey"] = bytes(prep_data["authkey"])
        process_obj.authkey = bytes(process_obj.authkey)
        buf = io.BytesIO()
        set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            set_spawning_popen(None)
        self.sentinel, w = forkserver.connect_to_new_process(self._fds)
        parent_w = os.dup(w)  # the child's sentinel of this process, as the stdlib keeps it
        self.finalizer = util.Finalize(self, util.close_fds, (parent_w, self.sentinel))
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        self.pid = forkserver.read_signed(self.sentinel)


class _Process(multiprocessing.context.ForkServerProcess):
    @staticmethod
    def _Popen(process_obj: Any) -> _Popen:
        return _Popen(process_obj)

    def start(self) -> None:
        """``BaseProcess.start`` (3.11-3.13), less its refusal to start from a daemonic process.

        Celery's prefork pool runs every job in a daemonic process, which multiprocessing forbids
        children ("daemonic processes are not allowed to have children"), so in a deployed worker
        every upload whose header only FFmpeg reads (m4a, mp3, webm, ...) failed as an internal
        error. The rule keeps a daemon from leaving children behind when it is ended; this one is
        the fork server's child, not this process's, and ends by its own CPU limit."""
        self._check_closed()
        if self._popen is not None or self._parent_pid != os.getpid():
            raise RuntimeError("a header check's process is started once, by the process that made it")
        multiprocessing.process._cleanup()  # type: ignore[attr-defined]
        self._popen = self._Popen(self)
        self._sentinel = self._popen.sentinel
        del self._target, self._args, self._kwargs  # type: ignore[attr-defined]
        multiprocessing.process._children.add(self)  # type: ignore[attr-defined]


def warm() -> None:
    """Start the fork server now (about 0.3 s, once per process) rather than at the first upload."""
    _ctx()
    forkserver.ensure_running()


def _inherit(dup: Any) -> int:
    return dup.detach()


class _Fd:
    """A descriptor handed to the child: duplicated over the fork server's socket as the
    process is started (multiprocessing's own way of passing a socket or a pipe)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self):
        return _inherit, (DupFd(self.fd),)


def _payload(source: Any) -> tuple[str, Any]:
    if not hasattr(source, "read"):
        return "path", os.fspath(source)
    raw = getattr(source, "_file", source)  # a SpooledTemporaryFile's own file: in memory or on disk
    if isinstance(raw, io.BytesIO):
        return "bytes", raw.getvalue()
    try:
        raw.flush()
        return "fd", _Fd(raw.fileno())
    except (AttributeError, OSError, io.UnsupportedOperation):
        source.seek(0)
        data = source.read(_MAX_BYTES + 1)
        source.seek(0)
        return "bytes", data


def _child(conn: Any, kind: str, payload: Any, limits: ProbeLimits) -> None:
    """The header read, in the child: limits first, then FFmpeg."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # past the soft limit the kernel sends SIGXCPU (which ends the process), past the hard one SIGKILL
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    from shared.audio_limits import ffmpeg_header

    try:
        if kind == "fd":
            fd = int(payload)
            source: Any = f"/proc/self/fd/{fd}" if os.path.exists(f"/proc/self/fd/{fd}") else os.fdopen(fd, "rb")
        elif kind == "bytes":
            source = io.BytesIO(payload)
        else:
            source = payload
        conn.send(("ok", ffmpeg_header(source)))  # None: no audio stream
    except MemoryError:
        conn.send(("memory", None))
    except Exception as exc:  # noqa: BLE001 - told apart in the parent
        import av

        if isinstance(exc, av.error.MemoryError) or (isinstance(exc, OSError) and exc.errno == errno.ENOMEM):
            # ENOMEM outside FFmpeg too: under the address-space limit even PyAV's lazy import of
            # a module fails with it, which says nothing of whether the file is audio
            conn.send(("memory", None))
        elif isinstance(exc, (av.FFmpegError, ValueError, OSError)):
            # FFmpeg could not open it (after libsndfile could not): what the worker's decoder
            # refuses (415, "not a decodable audio file"), said at submit instead
            conn.send(("unreadable", type(exc).__name__))
        else:
            conn.send(("error", type(exc).__name__))  # PyAV's own trouble: unread, not refused
    conn.close()


def _refuse(why: str, limits: ProbeLimits) -> AudioDecodeError:
    return AudioDecodeError(
        f"the file's header could not be read within the limits of the header check ({limits.describe()}): "
        f"{why}; the file is refused"
    )


def _cpu_seconds(pid: int | None) -> float | None:
    """CPU time (user and system) of the live process ``pid`` so far, None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


# what a start of the child raises where the fork server cannot be reached or started: its socket
# gone (FileNotFoundError, ConnectionRefusedError), it died mid-start (EOFError, a broken pipe),
# it is another process's child (ChildProcessError), no process or descriptor left (OSError)
_START_ERRORS = (OSError, EOFError, ChildProcessError)


def _start(ctx: Any, kind: str, payload: Any, limits: ProbeLimits) -> tuple[Any, Any]:
    """The child, started (and the end of the pipe it answers on); the fork server started anew
    once where the start fails; SandboxUnavailable (503) where it fails again."""
    for attempt in (0, 1):
        recv, send = ctx.Pipe(duplex=False)
        proc = _Process(target=_child, args=(send, kind, payload, limits), daemon=True, name="probe-sandbox")
        try:
            proc.start()
            return proc, recv
        except _START_ERRORS as exc:
            recv.close()
            if attempt:
                raise SandboxUnavailable(f"the header check could not start its reader ({type(exc).__name__}: "
                                         f"{exc}); retry later") from exc
            _forget_server(kill=True)
        finally:
            send.close()
    raise AssertionError("unreachable")


def read_header(source: Any, limits: ProbeLimits) -> Any:
    """:func:`shared.audio_limits.ffmpeg_header` of ``source`` (a path, or a seekable binary file
    read from its start), read in a child held to ``limits``: its AudioInfo, or None where the
    header went unread (bytes past ``_MAX_BYTES``, an error of PyAV's own). Raises NotAudioError
    (415) where FFmpeg cannot open the file or finds no audio stream in it; AudioDecodeError (415)
    where the child ran out of CPU time, memory or time, or died; SandboxUnavailable (503) where
    it could not be started, was starved of CPU or was killed from outside."""
    ctx = _ctx()
    kind, payload = _payload(source)
    if kind == "bytes" and len(payload) > _MAX_BYTES:
        return None
    proc, recv = _start(ctx, kind, payload, limits)
    try:
        started = time.monotonic()
        outcome: tuple[str, Any] | None = None
        cpu: float | None = None
        if recv.poll(limits.timeout_s):
            try:
                outcome = recv.recv()
            except (EOFError, OSError):
                outcome = None  # it died before it answered
        else:
            outcome = ("timeout", None)
            cpu = _cpu_seconds(proc.pid)
        if outcome is None or outcome[0] == "timeout":
            proc.kill()
        proc.join(1.0)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
        if outcome is None:
            code = proc.exitcode or 0
            if code == -signal.SIGXCPU or (code == -signal.SIGKILL and time.monotonic() - started >= limits.cpu_s + 1):
                raise _refuse("it ran out of CPU time", limits)  # RLIMIT_CPU: its soft limit, or its hard one
            if code == -signal.SIGKILL:
                # before its CPU limit could have sent it: killed from outside (an OOM killer)
                raise SandboxUnavailable("the header check's reader was killed by the system (SIGKILL) before "
                                         "its limits were reached; retry later")
            raise _refuse(f"the reader died (exit status {code})", limits)
        if outcome[0] == "timeout":
            if cpu is not None and cpu < min(limits.cpu_s, limits.timeout_s) / 2:
                # the child was given under half the CPU its limit allows in that time: the host
                # is starved, not the file costly (one that is reaches its CPU limit first)
                raise SandboxUnavailable(f"the header check was given {cpu:.1f} s of CPU in "
                                         f"{limits.timeout_s:g} s (the host is overloaded); retry later")
            raise _refuse(f"it took longer than {limits.timeout_s:g} s", limits)
        if outcome[0] == "memory":
            raise _refuse("FFmpeg ran out of memory (or the file has more streams than it may open)", limits)
        if outcome[0] == "unreadable":
            raise NotAudioError.unreadable(str(outcome[1]))
        if outcome[0] == "error":
            return None
        if outcome[1] is None:
            raise NotAudioError.no_audio_stream()
        return outcome[1]
    finally:
        recv.close()
        if proc.exitcode is None and proc.pid is not None:
            proc.kill()
            proc.join()
        if proc.pid is not None:
            proc.close()


__all__ = ["ProbeLimits", "SandboxUnavailable", "read_header", "warm"]
