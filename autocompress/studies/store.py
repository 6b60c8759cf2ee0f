"""A study's results file: its protocol and what it has finished, written after every step
(atomically), resumed only under the same protocol."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import AutocompressError
from ..io_utils import atomic_write_text


class StudyFile:
    """``data[section]`` holds the finished steps (a dict); ``save()`` after each."""

    def __init__(self, path: Path, protocol: dict, section: str, resume: bool):
        protocol = json.loads(json.dumps(protocol))  # as it is stored: tuples become lists
        self.path, self.section = path, section
        self.data = {"protocol": protocol, section: {}}
        if not (resume and path.is_file()):
            return
        try:
            old = json.loads(path.read_text())
            stored, done = old["protocol"], old[section]
            if not isinstance(stored, dict) or not isinstance(done, dict):
                raise TypeError("protocol and results must be objects")
        except (ValueError, KeyError, TypeError) as exc:
            raise AutocompressError(f"{path} cannot be resumed ({type(exc).__name__}: {exc}); "
                                    "run again with --force to start afresh") from None
        if stored != protocol:
            differs = sorted(k for k in {*stored, *protocol} if stored.get(k) != protocol.get(k))
            raise AutocompressError(f"{path} was made with other settings ({', '.join(differs)});"
                                    " resume with the same ones, or --force to start afresh")
        self.data[section] = done

    @property
    def done(self) -> dict:
        return self.data[self.section]

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=1) + "\n")
