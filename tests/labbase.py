"""What the test labs (a libvirtd, an etcd) share: start on entry, close on exit, logs when a test failed."""

import signal
import sys
import threading
from typing import Callable, List, Tuple, Type


Step = Callable[..., None]


class LabContext:
    """Subclasses give start(), teardown(step), diagnostics() and these two
    names; close() runs teardown once, every step even if one fails."""

    LAB_NAME = "lab"
    # close() failures of these are printed, not raised, when the test
    # already failed: the test's own exception is the one to see.
    LAB_ERRORS: Tuple[Type[BaseException], ...] = ()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not issubclass(exc_type, KeyboardInterrupt):
            # pytest shows captured stderr of a failing test
            print(f"--- {self.LAB_NAME} logs ---\n" + self.diagnostics(), file=sys.stderr)
        try:
            self.close()
        except self.LAB_ERRORS as e:
            if exc_type is None:
                raise
            print(e, file=sys.stderr)

    def start(self) -> None:
        raise NotImplementedError

    _closed = False

    def close(self) -> None:
        """Tear everything down; safe to call twice; the failed steps, if
        any, raise LAB_ERRORS[0] at the end, after every step has run."""
        if self._closed:
            return
        self._closed = True
        old_sigint = None
        if threading.current_thread() is threading.main_thread():
            # a Ctrl-C now would leave namespaces and processes behind
            old_sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
        errors: List[str] = []

        def step(what: str, fn: Callable[..., object], *args: object) -> None:
            try:
                fn(*args)
            except Exception as e:  # keep going: later steps must still run
                errors.append(f"{what}: {e}")

        try:
            self.teardown(step)
        finally:
            if old_sigint is not None:
                signal.signal(signal.SIGINT, old_sigint)
        if errors:
            raise self.LAB_ERRORS[0](f"{self.LAB_NAME} cleanup incomplete: " + "; ".join(errors))

    def teardown(self, step: Step) -> None:
        raise NotImplementedError

    def diagnostics(self) -> str:
        raise NotImplementedError
