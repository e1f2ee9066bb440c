"""What the test labs (a libvirtd, an etcd) share: start on entry, close on exit, logs when a test failed."""

import sys
from typing import Tuple, Type


class LabContext:
    """Subclasses give start(), close(), diagnostics() and these two names."""

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

    def close(self) -> None:
        raise NotImplementedError

    def diagnostics(self) -> str:
        raise NotImplementedError
