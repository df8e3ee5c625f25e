"""``python -m actorgrad``: the ``actorgrad`` command (see ``actorgrad.cli``)."""

from __future__ import annotations

from actorgrad.cli import entry

if __name__ == "__main__":
    raise SystemExit(entry())
