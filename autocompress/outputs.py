"""The one policy for what a command writes (``--out``), applied by every command.

- ``--out`` is checked before any work: the wrong kind (a directory where a file goes, or the
  reverse), a place that cannot be written, or a path that is, holds or sits inside an input.
- A directory this tool wrote earlier carries a marker (``.autocompress.json``) listing the
  entries it wrote. It is replaced as a whole, atomically (the new one is built beside it, then
  swapped in), and the command says so. A non-empty directory without the marker, or with
  entries the marker does not list (a user's own files), is refused unless ``--force``; with
  ``--force`` the tool writes its own files into it and removes nothing else.
- A file output that exists and is not recognisably this tool's own kind of file is refused
  unless ``--force``.
- Temporary names are made with ``mkdtemp``/``mkstemp`` (unique, created exclusively), so they
  never collide with, or remove, a user's files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .errors import AutocompressError
from .io_utils import atomic_write_text, current_umask

MARKER = ".autocompress.json"
TMP_TAG = ".autocompress-"  # in every temporary directory name: .NAME.autocompress-XXXX


@dataclass(frozen=True)
class DirState:
    """What ``--out`` holds now: ``new`` (absent), ``empty``, ``ours`` (an earlier output of
    ``command``, nothing else in it) or ``foreign`` (anything else, allowed with --force)."""

    path: Path
    kind: str
    command: str | None = None  # the command that wrote an earlier output
    strangers: tuple[str, ...] = ()  # entries the tool did not write


def _writable_ancestor(path: Path) -> None:
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise AutocompressError(f"--out {str(path)!r}: {str(probe)!r} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise AutocompressError(f"--out {str(path)!r}: {str(probe)!r} is not writable; choose "
                                "another place")


def _check_inputs(path: Path, inputs: Iterable[str | Path | None]) -> None:
    target = path.resolve()
    for given in inputs:
        if not given:
            continue
        source = Path(given)
        if not source.exists():
            continue
        source = source.resolve()
        if target == source:
            raise AutocompressError(f"--out {str(path)!r} is an input of this command "
                                    f"({str(given)!r}); write somewhere else")
        if source.is_relative_to(target):
            raise AutocompressError(f"--out {str(path)!r} holds an input of this command "
                                    f"({str(given)!r}); replacing it would lose that input")
        if source.is_dir() and target.is_relative_to(source):
            raise AutocompressError(f"--out {str(path)!r} is inside the input directory "
                                    f"{str(given)!r}; write outside it")


def read_marker(directory: Path) -> dict | None:
    try:
        marker = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or not isinstance(marker.get("entries"), list):
        return None
    return marker


def _is_tool_temp(entry: str, names: set[str]) -> bool:
    """Leftovers of an interrupted atomic write of one of ``names`` (.NAME.XXXX.tmp), or of
    Optuna releasing a journal's lock file (it renames NAME.lock to NAME.lock<uuid>.rename,
    then unlinks that: a kill in between leaves it)."""
    if entry.endswith(".rename") and any(entry.startswith(name) for name in names
                                         if name.endswith(".lock")):
        return True
    return entry.startswith(".") and (entry.endswith(".tmp") or TMP_TAG in entry) and any(
        entry.startswith(f".{name}.") for name in names)


def dir_state(path: str | Path) -> DirState:
    path = Path(path)
    if not path.exists():
        return DirState(path, "new")
    # a half-written marker (killed mid-write) is the tool's own leftover, not a user's file
    entries = sorted(p.name for p in path.iterdir() if not _is_tool_temp(p.name, {MARKER}))
    marker = read_marker(path)
    if not entries or (marker is not None and entries == [MARKER]):
        return DirState(path, "empty")  # a marker alone: a run that stopped before writing
    if marker is None:
        return DirState(path, "foreign", strangers=tuple(entries))
    names = set(marker["entries"]) | {MARKER}
    strangers = tuple(e for e in entries if e not in names and not _is_tool_temp(e, names))
    return DirState(path, "foreign" if strangers else "ours", marker.get("command"), strangers)


def check_out_dir(path: str | Path, command: str, *, force: bool = False,
                  inputs: Iterable[str | Path | None] = ()) -> DirState:
    """Everything about a directory ``--out`` that can be known before the work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise AutocompressError(f"--out {str(path)!r} is a file; {command} writes a directory")
    _writable_ancestor(path)
    _check_inputs(path, inputs)
    state = dir_state(path)
    if state.kind == "foreign" and not force:
        shown = ", ".join(state.strangers[:3]) + (" ..." if len(state.strangers) > 3 else "")
        raise AutocompressError(
            f"--out {str(path)!r} is not empty and holds files autocompress did not write "
            f"({shown}); choose a new directory, or pass --force to write into it (nothing else "
            "in it is removed)")
    if state.kind == "ours" and state.command != command and not force:
        raise AutocompressError(
            f"--out {str(path)!r} holds the output of `autocompress {state.command}`; choose "
            f"another directory, or pass --force to replace it")
    return state


def check_out_file(path: str | Path, *, force: bool = False,
                   inputs: Iterable[str | Path | None] = (),
                   is_ours: Callable[[Path], bool] | None = None, what: str = "file") -> Path:
    """A file ``--out``: not a directory, writable, not an input, and not a user's own file
    (anything ``is_ours`` does not recognise) unless ``force``."""
    path = Path(path)
    if path.is_dir():
        raise AutocompressError(f"--out {str(path)!r} is a directory; give a file name, e.g. "
                                f"{str(path / ('plan.json' if what == 'plan' else 'out.json'))!r}")
    _writable_ancestor(path.parent if str(path.parent) else Path("."))
    _check_inputs(path, inputs)
    if path.exists() and not force and is_ours is not None and not is_ours(path):
        raise AutocompressError(f"--out {str(path)!r} exists and is not an autocompress {what}; "
                                "choose another name, or pass --force to overwrite it")
    return path


def json_with_keys(*keys: str) -> Callable[[Path], bool]:
    """``is_ours`` for JSON outputs: a JSON object carrying these keys."""
    def check(path: Path) -> bool:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            return False
        return isinstance(data, dict) and all(k in data for k in keys)
    return check


def yaml_with_keys(*keys: str) -> Callable[[Path], bool]:
    """``is_ours`` for YAML outputs (device profiles): a mapping carrying these keys."""
    def check(path: Path) -> bool:
        import yaml

        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return False
        return isinstance(data, dict) and all(k in data for k in keys)
    return check


def is_png(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(8) == b"\x89PNG\r\n\x1a\n"
    except OSError:
        return False


def _write_marker(directory: Path, command: str, entries: Iterable[str]) -> None:
    atomic_write_text(directory / MARKER, json.dumps(
        {"command": command, "entries": sorted(set(entries) - {MARKER})}, indent=2) + "\n")


def publish_dir(out: str | Path, command: str, fill: Callable[[Path], None], *,
                force: bool = False, log: Callable[[str], None] | None = None) -> Path:
    """Build the output in a fresh temporary directory beside ``out`` (``fill(tmp)``), then
    put it at ``out``: a new or empty ``out`` is renamed into place; an earlier output of the
    tool is swapped out as a whole and then removed; a foreign directory (``force`` only) gets
    the new files moved into it, one rename each, and keeps everything else."""
    out = Path(out)
    state = check_out_dir(out, command, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_TAG}", dir=out.parent))
    try:
        fill(tmp)
        entries = [p.name for p in tmp.iterdir()]
        _write_marker(tmp, command, entries)
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; outputs are for sharing
        if state.kind in ("new", "empty"):
            if state.kind == "empty":
                (out / MARKER).unlink(missing_ok=True)
                out.rmdir()
            os.rename(tmp, out)
        elif state.kind == "ours":
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_TAG}old-", dir=out.parent))
            os.rename(out, old / out.name)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
            if log:
                log(f"replaced the earlier `{state.command}` output in {out}")
        else:  # foreign, --force: our names only
            earlier = read_marker(out)
            ours_before = set(earlier["entries"]) if earlier else set()
            for entry in entries:  # every collision checked before anything moves
                if (out / entry).is_dir() and entry not in ours_before:
                    raise AutocompressError(f"--force: {str(out / entry)!r} is a directory "
                                            "autocompress did not write; it will not remove it")
            for entry in entries:
                if (out / entry).is_dir():
                    shutil.rmtree(out / entry)
                os.replace(tmp / entry, out / entry)
            _write_marker(out, command, entries)
            shutil.rmtree(tmp, ignore_errors=True)
            if log:
                log(f"--force: wrote {len(entries)} files into {out}, left its other files alone")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# -- a search's working directory --------------------------------------------------------------

SEARCH_ENTRIES = ("sensitivity.cache.json", "sensitivity.json", "sensitivity.png",
                  "study.journal", "study.journal.lock", "level3", "plan.json", "search.json",
                  "pareto.json", "pareto.csv", "pareto.png", "model.gguf", "statistics",
                  "timings.json", "recovered.safetensors", "recover.checkpoint.pt")


def check_search_dir(out: str | Path, *, resume: bool, force: bool,
                     inputs: Iterable[str | Path | None] = (), command: str = "search",
                     finished_file: str = "plan.json") -> DirState:
    """A search (or a study: ``command``) works in ``--out`` (its study, cache and Ray
    experiment are what ``--resume`` continues): an earlier run is continued with
    ``--resume`` or replaced with ``--force``, never silently reused or overwritten. Checks
    only; ``prepare_search_dir`` acts."""
    out = Path(out)
    state = check_out_dir(out, command, force=force, inputs=inputs)
    if state.kind == "ours" and not resume and not force:
        finished = (out / finished_file).is_file()
        raise AutocompressError(
            f"--out {str(out)!r} holds an earlier {'finished' if finished else 'unfinished'} "
            f"{command}; pass --resume to continue it, --force to replace it, or choose a new "
            "directory")
    return state


def prepare_search_dir(out: str | Path, state: DirState, *, resume: bool,
                       log: Callable[[str], None] = print, command: str = "search",
                       entries: Iterable[str] = SEARCH_ENTRIES) -> None:
    out = Path(out)
    entries = tuple(entries)
    earlier = read_marker(out) if out.is_dir() else None
    if state.kind in ("ours", "foreign") and not resume and earlier is not None:
        # --force (check_search_dir refused otherwise): the entries the marker lists go, the
        # user's own files beside them stay
        remove_search_files(out, entries)
        log(f"--force: removed the earlier {command}'s files from {out}; starting a new one")
    elif state.kind in ("new", "empty") and resume:
        log(f"nothing to resume in {out}; starting a new {command}")
    out.mkdir(parents=True, exist_ok=True)
    for entry in out.iterdir():  # a killed run's half-made temporaries of its own files
        if _is_tool_temp(entry.name, set(entries) | {MARKER}):
            _remove(entry)
    _write_marker(out, command, entries)


def _remove(entry: Path) -> None:
    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def remove_search_files(out: Path, entries: Iterable[str] = SEARCH_ENTRIES) -> None:
    marker = read_marker(out)
    names = set(marker["entries"]) if marker else set(entries)
    for entry in out.iterdir():
        if entry.name in names or _is_tool_temp(entry.name, names):
            _remove(entry)
