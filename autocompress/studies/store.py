"""A study's results file: its protocol and what it has finished, written after every step
(atomically), resumed only under the same protocol (or one that only adds to a list the
study may grow, such as its models: the finished ones are kept, the new ones run)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import AutocompressError
from ..io_utils import atomic_write_text


class StudyFile:
    """``data[section]`` holds the finished steps (a dict); ``save()`` after each."""

    def __init__(self, path: Path, protocol: dict, section: str, resume: bool,
                 extendable: tuple[str, ...] = ()):
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
        differs = sorted(k for k in {*stored, *protocol} if stored.get(k) != protocol.get(k))
        dropped = {k: [v for v in stored.get(k) or [] if v not in (protocol.get(k) or [])]
                   for k in differs if k in extendable}
        if any(dropped.values()):
            key = next(k for k, v in dropped.items() if v)
            raise AutocompressError(f"{path} holds {key} {dropped[key]} that this run leaves "
                                    f"out: resume with them too, or --force to start afresh")
        differs = [k for k in differs if k not in extendable]
        if differs:
            raise AutocompressError(f"{path} was made with other settings ({', '.join(differs)});"
                                    " resume with the same ones, or --force to start afresh")
        self.data[section] = done

    @property
    def done(self) -> dict:
        return self.data[self.section]

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=1) + "\n")
