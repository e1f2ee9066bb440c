"""Golden files: exact expected outputs, rewritten with MDSERVER_UPDATE_GOLDEN=1."""

import os

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "golden")


def check(name: str, actual: str) -> None:
    path = os.path.join(GOLDEN_DIR, name)
    if os.environ.get("MDSERVER_UPDATE_GOLDEN") == "1":
        with open(path, "w") as f:
            f.write(actual)
    with open(path) as f:
        expected = f.read()
    assert actual == expected, f"output differs from golden file {name}"
