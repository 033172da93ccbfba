"""The input layer: every file a user hands the engine is read here, within limits a deployer can raise.

Policies and constitutions are written by many people and read by a process that may sit in front of production
traffic, so reading one must never hang, exhaust memory or run code:

- a policy, constitution or config file is read only from a regular file: a FIFO, a device (a symlink to
  ``/dev/zero``), a socket or a directory is refused before a byte is read (a FIFO is opened without waiting for a
  writer, so it cannot hang the reader);
- a file larger than ``CAI_LIMIT_DOCUMENT_BYTES`` (4 MB) is refused before it is read, and the read itself stops at
  the limit, so a file that grows while it is read cannot exhaust memory;
- YAML is parsed once, with libyaml where it is installed and with safe loaders only; the parse stops at a nesting
  depth of ``CAI_LIMIT_DEPTH`` (64), and a document whose aliases would expand to more than
  ``CAI_LIMIT_VALUES`` (200,000) values (an "alias bomb") is refused before anything is built from it;
- duplicate keys are refused in YAML and in JSON (both would silently keep the last value);
- ``extends`` chains stop at ``CAI_LIMIT_EXTENDS_DEPTH`` (16) levels and ``CAI_LIMIT_EXTENDS_FILES`` (64) files;
- a constitution or policy holds at most ``CAI_LIMIT_PRINCIPLES`` (10,000) principles and ``CAI_LIMIT_RULES``
  (10,000) rules, in each file (counted before anything is validated, so a huge file fails in a fraction of a
  second) and after ``extends`` has merged its parents;
- JSONL rows (guard input, prompt files) are streamed, each at most ``CAI_LIMIT_ROW_BYTES`` (1 MB), from a regular
  file or a pipe (never a device or a directory); other prompt files (CSV, JSON, text) are read whole up to
  ``CAI_LIMIT_DATA_BYTES`` (256 MB).

Loading is linear in the size of the file: line numbers for error messages are worked out only when there is an
error to report.

Each limit is an environment variable holding a positive integer; the error that a limit causes names it.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import stat
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

from cai_engine.errors import CaiError, ConstitutionError

_LOADER_BASE = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when PyYAML was built with it


@dataclass(frozen=True)
class Limits:
    document_bytes: int = 4 * 1024 * 1024
    depth: int = 64
    values: int = 200_000
    extends_depth: int = 16
    extends_files: int = 64
    principles: int = 10_000
    rules: int = 10_000
    row_bytes: int = 1024 * 1024
    data_bytes: int = 256 * 1024 * 1024


ENV = {
    "document_bytes": "CAI_LIMIT_DOCUMENT_BYTES",
    "depth": "CAI_LIMIT_DEPTH",
    "values": "CAI_LIMIT_VALUES",
    "extends_depth": "CAI_LIMIT_EXTENDS_DEPTH",
    "extends_files": "CAI_LIMIT_EXTENDS_FILES",
    "principles": "CAI_LIMIT_PRINCIPLES",
    "rules": "CAI_LIMIT_RULES",
    "row_bytes": "CAI_LIMIT_ROW_BYTES",
    "data_bytes": "CAI_LIMIT_DATA_BYTES",
}


def limits() -> Limits:
    """The limits in force: the defaults, each replaced by its environment variable when that is set."""
    values: dict[str, int] = {}
    for field, name in ENV.items():
        raw = os.environ.get(name, "").strip()
        if not raw:
            continue
        try:
            value = int(raw.replace("_", ""))
        except ValueError:
            value = 0
        if value <= 0:
            raise CaiError(f"{name}={raw!r} is not a positive integer")
        values[field] = value
    return Limits(**values)


def limit_hint(field: str) -> str:
    return f"raise the limit with {ENV[field]} if the file is genuine"


def _size(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MB" if n >= 1024 * 1024 else f"{n:,} bytes"


# -- reading -------------------------------------------------------------------------------------------------------


def _unreadable(path: Path, exc: OSError, wanted: str) -> ConstitutionError:
    if isinstance(exc, FileNotFoundError):
        return ConstitutionError("file not found; check the path", source=str(path))
    if isinstance(exc, IsADirectoryError):
        return ConstitutionError(f"is a directory; pass {wanted}", source=str(path))
    if exc.errno == errno.ELOOP:
        return ConstitutionError(f"is a symlink loop ({symlink_chain(path)}); point it at a file", source=str(path))
    return ConstitutionError(f"cannot read: {exc.strerror or exc}", source=str(path))


def symlink_chain(path: Path, hops: int = 40) -> str:
    """``a.yaml -> b.yaml -> a.yaml``: where a path's symlinks lead, for messages (stops at a loop or ``hops``)."""
    path = Path(path)
    chain, seen = [str(path)], set()
    current = Path(os.path.abspath(path))
    for _ in range(hops):
        if current in seen:
            break
        seen.add(current)
        try:
            target = os.readlink(current)
        except OSError:
            break
        current = Path(os.path.normpath(current.parent / target))
        chain.append(target)
    return " -> ".join(chain)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def _not_a_file(path: Path, mode: int, wanted: str) -> ConstitutionError:
    via = f" (through the symlink {symlink_chain(path)})" if path.is_symlink() else ""
    if stat.S_ISDIR(mode):
        return ConstitutionError(f"is a directory{via}; pass {wanted}", source=str(path))
    return ConstitutionError(f"is {_kind(mode)}{via}, not a regular file; pass {wanted}", source=str(path))


def open_document(path: Path, *, wanted: str = "a .yaml, .yml or .json file") -> tuple[IO[bytes], os.stat_result]:
    """Open a policy, constitution or config file for reading, refusing anything but a regular file.

    The file is opened without blocking (a FIFO has no writer to wait for) and checked on the open descriptor, so
    a path swapped for a device or a FIFO between a check and the open is still refused. Returns the handle and its
    ``fstat``."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise _unreadable(path, exc, wanted) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _not_a_file(path, info.st_mode, wanted)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb"), info


def read_document(path: Path, *, max_bytes: int | None = None) -> tuple[str, tuple[int, int]]:
    """:func:`read_text`, plus the file's identity (device, inode) as opened, which tells two paths to one file apart
    from two files (symlinks, ``..``) without a second look at the path."""
    path = Path(path)
    cap = limits().document_bytes if max_bytes is None else max_bytes
    field = "document_bytes" if max_bytes is None else "data_bytes"
    wanted = "a .yaml, .yml or .json file" if max_bytes is None else "a regular file"
    handle, info = open_document(path, wanted=wanted)
    with handle:
        if info.st_size > cap:
            raise ConstitutionError(
                f"the file is {_size(info.st_size)}, over the limit of {_size(cap)}; {limit_hint(field)}",
                source=str(path),
            )
        try:
            raw = handle.read(cap + 1)
        except OSError as exc:
            raise _unreadable(path, exc, wanted) from None
    if len(raw) > cap:  # grew while we read it
        raise ConstitutionError(f"the file is over the limit of {_size(cap)}; {limit_hint(field)}", source=str(path))
    try:
        return raw.decode("utf-8"), (info.st_dev, info.st_ino)
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConstitutionError(
            f"not UTF-8 text (byte {exc.start}); save the file as UTF-8", source=str(path), where=f"line {line}"
        ) from None


def read_text(path: Path, *, max_bytes: int | None = None) -> str:
    """Read a whole document from a regular file as UTF-8 (at most ``max_bytes``, default the document limit),
    naming the file and byte offset when it is not UTF-8. The limit holds while reading: at most ``max_bytes + 1``
    bytes are ever read, so a file that grows (or a device behind a swapped path) cannot exhaust memory."""
    return read_document(path, max_bytes=max_bytes)[0]


STDIN = "-"


def _stdin() -> IO[bytes]:
    """Standard input as bytes, refused when it is a terminal or a device (``cai guard --input -`` typed at a prompt
    would wait forever for a line)."""
    stream: IO[bytes] = sys.stdin.buffer
    try:
        mode = os.fstat(stream.fileno()).st_mode
    except (OSError, ValueError, io.UnsupportedOperation):  # replaced by a test runner: an in-memory stream
        return stream
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISDIR(mode):
        raise ConstitutionError(
            f"standard input is {_kind(mode)}; pipe the data in (cmd | cai ...) or give a file", source="<stdin>"
        )
    return stream


def open_stream(path: str | Path) -> IO[bytes]:
    """Open a data file to stream once: a regular file, a pipe (``--input <(cmd)``, ``/dev/stdin``), or ``-`` for
    standard input (not closed after). A device (``/dev/zero``, a terminal) or a directory is refused before
    anything is read."""
    if str(path) == STDIN:
        return _stdin()
    path = Path(path)
    try:
        before = os.stat(path)
    except OSError as exc:
        raise _unreadable(path, exc, "a file") from None
    allowed = (stat.S_ISREG, stat.S_ISFIFO, stat.S_ISSOCK)
    if not any(check(before.st_mode) for check in allowed):
        raise _not_a_file(path, before.st_mode, "a file or a pipe")
    try:
        handle = path.open("rb")  # a FIFO blocks here until its writer opens it, as `cat` would
    except OSError as exc:
        raise _unreadable(path, exc, "a file") from None
    mode = os.fstat(handle.fileno()).st_mode
    if not any(check(mode) for check in allowed):  # swapped after the check
        handle.close()
        raise _not_a_file(path, mode, "a file or a pipe")
    return handle


def iter_lines(
    path: str | Path, *, max_bytes: int | None = None, stream: IO[bytes] | None = None
) -> Iterator[tuple[int, str]]:
    """Stream ``(line number, text)`` from a UTF-8 file, a pipe or ``-`` (standard input) without reading it whole,
    reading it exactly once; a line over the row limit, bad UTF-8, a device or an unreadable file is a
    :class:`ConstitutionError` naming the file and line. ``stream``: read this handle instead (``path`` names it)."""
    label = "<stdin>" if str(path) == STDIN else str(path)
    cap = limits().row_bytes if max_bytes is None else max_bytes
    handle = stream if stream is not None else open_stream(path)
    owned = stream is None and str(path) != STDIN  # what we opened we close; standard input stays open
    with handle if owned else contextlib.nullcontext(handle):
        number = 0
        while True:
            try:
                raw = handle.readline(cap + 1)
            except OSError as exc:
                raise ConstitutionError(f"cannot read: {exc.strerror or exc}", source=label) from None
            if not raw:
                return
            number += 1
            if len(raw) > cap and not raw.endswith(b"\n"):
                raise ConstitutionError(
                    f"the line is longer than {_size(cap)}; {limit_hint('row_bytes')}",
                    source=label,
                    where=f"line {number}",
                )
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ConstitutionError(
                    f"not UTF-8 text (byte {exc.start} of the line); save the file as UTF-8",
                    source=label,
                    where=f"line {number}",
                ) from None
            yield number, text.rstrip("\r\n")


# -- parsing ---------------------------------------------------------------------------------------------------------


class _StrictLoader(_LOADER_BASE):  # type: ignore[misc, valid-type]
    """A safe loader that refuses duplicate mapping keys (PyYAML silently keeps the last one, losing data)."""


def _construct_mapping(loader: Any, node: yaml.MappingNode, deep: bool = False) -> dict:
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            seen = key in mapping
        except TypeError:  # an unhashable key (a list or mapping used as a key)
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be text or a number", key_node.start_mark
            ) from None
        if seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (a later value would silently replace the first)",
                key_node.start_mark,
            )
        mapping[key] = loader.construct_object(value_node, deep=deep)
    return mapping


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

LineMap = dict[tuple[Any, ...], int]


def _check_depth(text: str, source: str, cap: int) -> None:
    """Scan YAML events (in C with libyaml) and stop at the first collection nested deeper than ``cap``."""
    depth = 0
    loader = _LOADER_BASE(text)
    try:
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > cap:
                    line = event.start_mark.line + 1 if event.start_mark else None
                    raise ConstitutionError(
                        f"nested deeper than {cap} levels; {limit_hint('depth')}",
                        source=source,
                        where=f"line {line}" if line else None,
                    )
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
    finally:
        loader.dispose()


def _expanded_size(root: yaml.Node, source: str, lim: Limits) -> None:
    """Refuse a node graph whose aliases expand past the value or depth limit, without expanding it."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if key in size:
            continue
        children: list[yaml.Node] = []
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                children += [k, v]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        if not done:
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in size)
            continue
        size[key] = 1 + sum(size.get(id(c), 1) for c in children)
        depth[key] = 1 + max((depth.get(id(c), 1) for c in children), default=0)
        if size[key] > lim.values:
            line = node.start_mark.line + 1
            raise ConstitutionError(
                f"its aliases expand to more than {lim.values:,} values (an alias bomb?); {limit_hint('values')}",
                source=source,
                where=f"line {line}",
            )
        if depth[key] > lim.depth + 1:
            line = node.start_mark.line + 1
            raise ConstitutionError(
                f"its aliases nest deeper than {lim.depth} levels; {limit_hint('depth')}",
                source=source,
                where=f"line {line}",
            )


def _line_map(root: yaml.Node | None) -> LineMap:
    """Map each JSON path (as a tuple) to its 1-based line; an alias is mapped where it is used, never expanded."""
    lines: LineMap = {}
    if root is None:
        return lines
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, tuple[Any, ...]]] = [(root, ())]
    while stack:
        node, path = stack.pop()
        lines.setdefault(path, node.start_mark.line + 1)
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = path + (key_node.value,)  # noqa: RUF005 - mypy reads (*path, k) in a subscript as 3.11 syntax
                lines[key] = key_node.start_mark.line + 1
                stack.append((value_node, key))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                stack.append((item, (*path, index)))
    return lines


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r} (a later value would silently replace the first)")
        out[key] = value
    return out


def _json_depth(data: Any, source: str, cap: int) -> None:
    stack = [(data, 1)]
    while stack:
        value, level = stack.pop()
        if level > cap + 1:
            raise ConstitutionError(f"nested deeper than {cap} levels; {limit_hint('depth')}", source=source)
        if isinstance(value, dict):
            stack.extend((v, level + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, level + 1) for v in value)


def parse_json(text: str, source: str) -> Any:
    """Parse JSON text, refusing duplicate keys and nesting past the depth limit."""
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise ConstitutionError(
            f"invalid JSON: {exc.msg}", source=source, where=f"line {exc.lineno}, column {exc.colno}"
        ) from None
    except ValueError as exc:  # a duplicate key
        raise ConstitutionError(f"invalid JSON: {exc}", source=source) from None
    except RecursionError:
        raise ConstitutionError(
            f"nested deeper than {limits().depth} levels; {limit_hint('depth')}", source=source
        ) from None
    _json_depth(data, source, limits().depth)
    return data


class LazyLines(Mapping[tuple[Any, ...], int]):
    """A document's map from JSON paths to line numbers, worked out on first use: only error messages need it, so a
    valid document never pays for it (for a large JSON file it costs more than parsing)."""

    def __init__(self, text: str, *, json_only: bool) -> None:
        self._text: str | None = text
        self._json_only = json_only
        self._lines: LineMap | None = None

    def _map(self) -> LineMap:
        if self._lines is None:
            text, self._text = self._text or "", None
            try:
                if self._json_only:  # JSON is YAML; it has no aliases, so composing it is linear
                    _check_depth(text, "", limits().depth)
                loader = _LOADER_BASE(text)
                try:
                    root = loader.get_single_node()
                finally:
                    loader.dispose()
            except (yaml.YAMLError, ConstitutionError, RecursionError):
                root = None
            self._lines = _line_map(root)
        return self._lines

    def __getitem__(self, key: tuple[Any, ...]) -> int:
        return self._map()[key]

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(self._map())

    def __len__(self) -> int:
        return len(self._map())

    def __bool__(self) -> bool:  # "is there a line map?" must not build it
        return True


def parse_document(text: str, source: str, *, json_only: bool = False) -> tuple[Any, Mapping[tuple[Any, ...], int]]:
    """Parse a YAML (or, with ``json_only``, a strict JSON) document within the limits; returns the data and a map
    from JSON paths to line numbers for error messages (built only if an error message asks for it)."""
    if json_only:
        return parse_json(text, source), LazyLines(text, json_only=True)
    lim = limits()
    try:
        _check_depth(text, source, lim.depth)
        loader = _StrictLoader(text)
        try:
            root = loader.get_single_node()
            if root is None:
                return None, {}
            _expanded_size(root, source, lim)
            data = loader.construct_document(root)
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else None
        problem = exc.problem or exc.context or "syntax error"
        if "nesting depth" in problem:
            problem = f"nested too deeply ({problem}); the engine allows {lim.depth} levels"
        raise ConstitutionError(f"invalid YAML: {problem}", source=source, where=where) from None
    except yaml.YAMLError as exc:
        raise ConstitutionError(f"invalid YAML: {str(exc).splitlines()[0]}", source=source) from None
    except RecursionError:
        raise ConstitutionError(f"nested too deeply; {limit_hint('depth')}", source=source) from None
    return data, LazyLines(text, json_only=False)


YAML11_WORDS = {"yes", "no", "on", "off", "y", "n"}


def parse_scalar(text: str) -> Any:
    """A setting written as text, read as YAML 1.2 reads it where YAML 1.1 (PyYAML) differs: numbers first (YAML 1.1
    reads ``2e-5`` as text), the words yes/no/on/off/y/n stay text (``save_strategy=no`` is the string TRL expects),
    only true and false are booleans; then YAML for the rest (``null``, ``[a, b]``, ``{k: v}``)."""
    import yaml

    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text.strip().lower() in YAML11_WORDS:
        return text.strip()
    return yaml.safe_load(text)
