"""Run ``python SCRIPT ARGS`` (or ``python -m MODULE ARGS``) in a worker thread, faithfully.

The script gets a fresh ``__main__`` module in ``sys.modules`` (absolute ``__file__``, a
``SourceFileLoader``, classes picklable for spawn workers), ``sys.argv`` as typed and
``sys.path[0]`` = its real directory. ``SystemExit`` and uncaught exceptions are turned into the
exit status CPython would give, and the traceback is printed through ``sys.excepthook``.
"""

from __future__ import annotations

import builtins
import ctypes
import dataclasses
import importlib.machinery
import importlib.util
import marshal
import os
import sys
import threading
import types
import zipfile
from typing import Any, Callable

from .events import ScriptEnded

_OWN_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
MAIN_THREAD = threading.main_thread()  # the process's, whatever the script is shown (see _script_main_thread)


class UsageError(Exception):
    """Bad command line or unusable script: one line, exit status 2."""


class PackageError(Exception):
    """``-m pkg.mod``: importing its package raised (the script's own code): exit status 1."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(type(exc).__name__)
        self.exc = exc


def _script_main_thread(training: threading.Thread) -> Callable[[], threading.Thread]:
    """``threading.main_thread()`` for the script: its own thread, as under plain Python, where it
    runs in the main thread. Lightning registers its SIGTERM handler (checkpoint on preemption, a
    graceful stop) only when ``current_thread() is main_thread()``: it never did here, and a SIGTERM
    killed the run. tui_debug's own threads (the real main thread, ``tui_debug-*``) see the real one."""
    real = threading.main_thread
    pid = os.getpid()

    def main_thread() -> threading.Thread:
        if os.getpid() != pid:  # a forked child: its main thread is the one that forked, as Python says
            return real()
        me = threading.current_thread()
        if me is MAIN_THREAD or (me.name.startswith("tui_debug-") and me is not training):
            return MAIN_THREAD
        return training

    main_thread.__wrapped__ = real  # type: ignore[attr-defined]
    main_thread.__doc__ = real.__doc__
    return main_thread


@dataclasses.dataclass
class Target:
    kind: str  # "script" | "module" | "callable" (API: a function run under the monitor)
    name: str  # what the user typed
    argv: list[str]
    code: types.CodeType
    path: str | None  # absolute path of the file to run
    spec: Any = None
    sys_path0: str = ""
    fn: Callable[[], Any] | None = None

    @property
    def display(self) -> str:
        return os.path.basename(self.name) if self.kind == "script" else self.name


def prepare_script(script: str, args: list[str]) -> Target:
    """Check and compile; raises UsageError (exit 2) or SyntaxError (exit 1, Python's message)."""
    path = os.path.abspath(script)
    if os.path.isdir(path):
        main = os.path.join(path, "__main__.py")
        if not os.path.isfile(main):
            raise UsageError(f"can't find '__main__' module in {script!r}")
        sys_path0, path = path, main
    elif zipfile.is_zipfile(path):
        return _prepare_zip(script, path, args)
    else:
        sys_path0 = os.path.dirname(os.path.realpath(path))
    try:
        with open(path, "rb") as fh:
            source = fh.read()
    except FileNotFoundError:
        raise UsageError(f"can't open file {script!r}: no such file") from None
    except PermissionError:
        raise UsageError(f"can't open file {script!r}: permission denied") from None
    except OSError as exc:
        raise UsageError(f"can't open file {script!r}: {exc.strerror or exc}") from None
    if path.endswith(".pyc") or source[:4] == importlib.util.MAGIC_NUMBER:  # as Python, compiled code runs
        if source[:4] != importlib.util.MAGIC_NUMBER:
            raise UsageError(f"can't run {script!r}: bad magic number in .pyc file (another Python's?)")
        code = marshal.loads(source[16:])
    else:
        _check_utf8(source, path)
        code = compile(source, path, "exec", dont_inherit=True)
    return Target(kind="script", name=script, argv=[script, *args], code=code, path=path, sys_path0=sys_path0)


def _check_utf8(source: bytes, path: str) -> None:
    """Python's own message for a source that is not UTF-8 and declares no encoding (PEP 263);
    compile() of the bytes says "(unicode error) 'utf-8' codec can't decode" instead."""
    head = source.split(b"\n", 2)[:2]
    if any(b"coding" in line for line in head):
        return  # a declared encoding: compile() reads it, and says what Python says
    try:
        source.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = source[:exc.start].count(b"\n") + 1
        raise SyntaxError(f"Non-UTF-8 code starting with '\\x{source[exc.start]:02x}' in file {path} on line "
                          f"{line}, but no encoding declared; see https://peps.python.org/pep-0263/ for details") \
            from None


def _prepare_zip(script: str, path: str, args: list[str]) -> Target:
    """A zip application: its ``__main__`` imported from the archive, which is sys.path[0]."""
    import zipimport

    try:
        importer = zipimport.zipimporter(path)
        spec = importer.find_spec("__main__")
        if spec is None:
            raise UsageError(f"can't find '__main__' module in {script!r}")
        code = importer.get_code("__main__")
    except (zipimport.ZipImportError, OSError) as exc:
        raise UsageError(f"can't run {script!r}: {exc}") from None
    return Target(kind="script", name=script, argv=[script, *args], code=code, path=spec.origin, spec=spec,
                  sys_path0=path)


def prepare_module(module: str, args: list[str]) -> Target:
    import runpy

    sys.path.insert(0, os.getcwd())
    saved_argv = sys.argv[:]
    sys.argv[:] = ["-m", *args]  # what Python's argv is while it imports the module's packages
    try:
        mod_name, spec, code = runpy._get_module_details(module)  # type: ignore[attr-defined]
    except ImportError as exc:
        raise UsageError(str(exc).replace("Error while finding module specification for", "can't find module")) from None
    except SyntaxError:
        raise
    except Exception as exc:  # the package's own code failed: Python's traceback, exit 1
        trim_exception(exc)
        raise PackageError(exc) from None
    finally:
        sys.path.pop(0)
        sys.argv[:] = saved_argv
    return Target(kind="module", name=module, argv=[spec.origin or module, *args], code=code,
                  path=spec.origin, spec=spec, sys_path0=os.getcwd())


def _trim_traceback(tb: types.TracebackType | None) -> types.TracebackType | None:
    """Drop tui_debug's own frames (the runner, the backward patch) so the script sees Python's traceback."""
    kept: list[types.TracebackType] = []
    while tb is not None:
        if not tb.tb_frame.f_code.co_filename.startswith(_OWN_DIR):
            kept.append(tb)
        tb = tb.tb_next
    for a, b in zip(kept, kept[1:]):
        a.tb_next = b
    if kept:
        kept[-1].tb_next = None
        return kept[0]
    return None


def trim_exception(exc: BaseException) -> None:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc.__traceback__ = _trim_traceback(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]


def exit_code_of(exc: SystemExit) -> tuple[int, str | None]:
    """CPython's mapping: None -> 0, int -> n, anything else -> 1 with it printed."""
    code = exc.code
    if code is None:
        return 0, None
    if isinstance(code, bool):
        return int(code), None
    if isinstance(code, int):
        return code & 0xFF if code >= 0 else code & 0xFF, None
    return 1, str(code)


def async_exception(exc: BaseException) -> type[BaseException]:
    """A class that, raised with no arguments, raises ``exc`` itself (async exceptions take a type):
    the script catches the very object its signal handler raised, with its class, arguments and
    attributes (rebuilt from its arguments, a keyword-only ``__init__`` raised TypeError instead)."""
    cls = type(exc)

    def __new__(klass: type, *args: Any, **kwargs: Any) -> BaseException:
        return exc  # not an instance of klass: __init__ is not called, and CPython raises it as it is

    try:
        return type(cls.__name__, (cls,), {"__new__": __new__, "__module__": cls.__module__,
                                           "__qualname__": cls.__qualname__})
    except TypeError:  # a class that cannot be subclassed: its kind, at least
        return cls


def append_traceback(exc: BaseException, tb: types.TracebackType | None) -> None:
    """``tb`` (where a signal handler raised ``exc``, in the monitor's thread) after the frames it
    crossed in the training thread, as Python shows a handler's frame below the interrupted line."""
    if tb is None:
        return
    last = exc.__traceback__
    if last is None:
        exc.__traceback__ = tb
        return
    while last.tb_next is not None:
        last = last.tb_next
    try:
        last.tb_next = tb
    except ValueError:  # a loop
        pass


class ScriptRunner:
    """Owns the worker thread that executes the target."""

    def __init__(self, target: Target, on_end: Callable[[ScriptEnded], None],
                 before_exit: Callable[[], None] | None = None,
                 failing_modules: Callable[[BaseException], list[str] | None] | None = None,
                 in_evaluation: Callable[[BaseException], bool] | None = None,
                 step: Callable[[], int] | None = None) -> None:
        self.target = target
        self._on_end = on_end
        self._before_exit = before_exit
        self._failing_modules = failing_modules
        self._in_evaluation = in_evaluation
        self._step = step
        self.thread: threading.Thread | None = None
        self.result: ScriptEnded | None = None
        self.interrupted = False
        self.value: Any = None  # what a callable target returned
        self.exception: BaseException | None = None
        self.on_thread_start: Callable[[], None] | None = None
        self.os_exit: int | None = None  # the status the script gave os._exit (see _os_exit)
        self.real_os_exit: Callable[[int], Any] = os._exit
        self._pid = os.getpid()
        self._started_threads: set[int] = set()
        # the exception a signal handler raised, and its traceback then (see inject)
        self._injected: tuple[BaseException, types.TracebackType | None] | None = None

    def start(self) -> None:
        t = self.target
        if t.kind == "callable":  # API use: the caller's process, argv and __main__ stay as they are
            self.thread = threading.Thread(target=self._run, name="tui_debug-training", daemon=True)
            self.thread.start()
            return
        main = types.ModuleType("__main__")
        main.__dict__["__builtins__"] = builtins  # the module, as in a real __main__
        if t.kind == "script" and t.spec is None:
            main.__file__ = t.path
            main.__loader__ = importlib.machinery.SourceFileLoader("__main__", t.path or "")
            main.__spec__ = None
            main.__package__ = None
            main.__cached__ = None
        else:
            spec = t.spec
            main.__file__ = spec.origin
            main.__loader__ = spec.loader
            main.__spec__ = spec
            main.__package__ = spec.parent
            main.__cached__ = spec.cached
        self.main_module = main
        self._started_threads = {t.ident or 0 for t in threading.enumerate()}
        os._exit = self._os_exit  # type: ignore[assignment]  # restored by restore_os_exit
        sys.modules["__main__"] = main
        sys.argv[:] = t.argv
        if sys.path:
            sys.path[0] = t.sys_path0
        else:
            sys.path.insert(0, t.sys_path0)
        self.thread = threading.Thread(target=self._run, name="tui_debug-training", daemon=True)
        self._real_main_thread = threading.main_thread
        threading.main_thread = _script_main_thread(self.thread)  # restored by restore_os_exit
        self.thread.start()

    def _run(self) -> None:
        status, code, exc_kept = "finished", 0, None
        if self.target.fn is None:
            # As the main thread it stands in for: not a daemon, so that the threads the script starts
            # are not daemons either (Python would wait for them at exit). Started as one: the process
            # itself never waits for this thread.
            try:
                threading.current_thread()._daemonic = False  # type: ignore[attr-defined]
            except Exception:  # pragma: no cover - CPython has it
                pass
        if self.on_thread_start is not None:
            self.on_thread_start()
        try:
            if self.target.fn is not None:
                self.value = self.target.fn()
            else:
                exec(self.target.code, self.main_module.__dict__)
        except SystemExit as exc:
            code, message = exit_code_of(exc)
            if message is not None:
                try:
                    print(message, file=sys.stderr, flush=True)
                except Exception:
                    pass
            status = "finished" if code == 0 else "exited"
            if self.interrupted:
                status = "interrupted"
        except BaseException as exc:  # noqa: BLE001 - we are the top of the thread
            injected, self._injected = self._injected, None
            if injected is not None and injected[0] is exc:
                append_traceback(exc, injected[1])
            trim_exception(exc)
            try:
                sys.excepthook(type(exc), exc, exc.__traceback__)
            except Exception:
                pass
            self.exception = exc
            if isinstance(exc, KeyboardInterrupt):
                status, code = "interrupted", 130
            else:
                status, code = "crashed", 1
            exc_kept = exc
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except Exception:
                pass
        if self.target.fn is None:
            try:
                self._wait_for_threads()
            except KeyboardInterrupt:
                self.interrupted = True
                status, code = "interrupted", 130
            except BaseException:
                pass
        if self.os_exit is None:  # (another thread's os._exit ended the run already)
            self._end(status, code, exc_kept)

    def _wait_for_threads(self) -> None:
        """As Python does at exit, the script's non-daemon threads (a checkpoint being saved) finish
        before the run ends. Thread pools' idle workers are not waited for: Python tells them to stop
        at exit, and a pool the script still uses would otherwise never end."""
        me, main = threading.current_thread(), MAIN_THREAD
        try:
            from concurrent.futures import thread as futures_thread
            pool_worker: Any = futures_thread._worker
        except Exception:  # pragma: no cover - always there in CPython
            pool_worker = None
        while True:
            alive = [t for t in threading.enumerate()
                     if t is not me and t is not main and not t.daemon and t.is_alive()
                     and (t.ident or 0) not in self._started_threads and not t.name.startswith("tui_debug")
                     and getattr(t, "_target", None) is not pool_worker]
            if not alive:
                return
            for t in alive:
                while t.is_alive():
                    t.join(0.1)  # in slices: a Ctrl+C (an exception injected here) gets through

    def _os_exit(self, code: int) -> None:
        """``os._exit`` from the script: the process still ends at once with ``code``, skipping the
        script's cleanup (finally blocks, atexit) as it asked, but after the monitor wrote the
        report and the script's output was flushed. A forked child (a DataLoader worker) and the
        monitor's own thread exit as ever."""
        if os.getpid() != self._pid or threading.current_thread() is MAIN_THREAD \
                or self.os_exit is not None:
            self.real_os_exit(code)
        self.os_exit = code = int(code)
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            ctypes.CDLL(None).fflush(None)
        except Exception:
            pass
        self._end("finished" if code == 0 else "exited", code, None,
                  before_exit=threading.current_thread() is self.thread)
        threading.Event().wait(30)  # the main thread writes the report and ends the process
        self.real_os_exit(code)

    def restore_os_exit(self) -> None:
        """os._exit and threading.main_thread as they were (the run is over)."""
        if os._exit == self._os_exit:
            os._exit = self.real_os_exit  # type: ignore[assignment]
        real = getattr(self, "_real_main_thread", None)
        if real is not None and getattr(threading.main_thread, "__wrapped__", None) is real:
            threading.main_thread = real

    def _end(self, status: str, code: int, exc_kept: BaseException | None, before_exit: bool = True) -> None:
        if self._before_exit is not None and before_exit:
            try:
                self._before_exit()
            except Exception:
                pass
        failing = None
        evaluating = False
        if exc_kept is not None and self._failing_modules is not None:
            failing = self._failing_modules(exc_kept)
            try:
                evaluating = bool(failing) and self._in_evaluation is not None and self._in_evaluation(exc_kept)
            except Exception:
                evaluating = False
        self.result = ScriptEnded(status=status, exit_code=code, exception=exc_kept, failing_modules=failing,
                                  evaluating=evaluating,
                                  step=self._step() if self._step else 0)
        self._on_end(self.result)

    def inject(self, exc: BaseException | type[BaseException]) -> bool:
        """Raise ``exc`` in the training thread at its next bytecode."""
        thread = self.thread
        if thread is None or not thread.is_alive() or thread.ident is None:
            return False
        exc_type = exc if isinstance(exc, type) else async_exception(exc)
        if not isinstance(exc, type):
            self._injected = (exc, exc.__traceback__)  # the handler's frames, which the raise replaces
        n = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exc_type))
        return n == 1

    def script_frame(self) -> types.FrameType | None:
        """The training thread's innermost frame outside tui_debug: the ``frame`` a script's signal
        handler gets (Python passes the frame the main thread was running, and the script is ours)."""
        thread = self.thread
        if thread is None or thread.ident is None:
            return None
        frame = sys._current_frames().get(thread.ident)
        while frame is not None and frame.f_code.co_filename.startswith(_OWN_DIR):
            frame = frame.f_back
        return frame

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()
