"""``--bound-addresses FILE``: where this proxy really listens, for scripts and tests.

Owns: the document (pid, configuration generation, each pool's bound
address, the stats and HTTP ports) and writing it atomically, so a reader
never sees half a file.  A pool may listen on ``host:0`` (the system picks
the port); this file, written after start-up and after every applied
reload, is how the port is found without a race.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict

from twisted.application.service import Service


def write_atomically(path: str, document: Dict[str, Any]) -> None:
    """Write ``document`` as JSON to ``path`` through a temporary file and a rename."""
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as out:
        json.dump(document, out, sort_keys=True)
        out.write("\n")
    os.replace(temporary, path)


class BoundAddressesService(Service):
    """Writes ``document()`` to ``path`` once everything listens, and again on ``write()``."""

    def __init__(self, path: str, document: Callable[[], Dict[str, Any]]) -> None:
        self.setName("bound-addresses")
        self.path = path
        self._document = document

    def startService(self) -> None:
        super().startService()
        self.write()

    def write(self) -> None:
        if self.running:
            write_atomically(self.path, self._document())

    def stopService(self) -> None:
        super().stopService()
        try:
            os.unlink(self.path)
        except OSError:
            pass
