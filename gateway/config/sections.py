"""Reading one TOML table with errors that name the file, the line and the key."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from gateway.mail.errors import ConfigError

# ---------------------------------------------------------------- the loader


class _Section:
    """Typed access to one table, turning every problem into a ConfigError naming the key."""

    def __init__(self, loader: "_Loader", name: str, data: Any, known: set[str] | None = None, index: int = 0):
        self.loader, self.name, self.index = loader, name, index
        if data is None:
            data = {}
        if not isinstance(data, dict):
            loader.fail(name, None, "must be a table", index)
        self.data = data
        if known is not None:
            for key in data:
                if key not in known:
                    hint = _closest(key, known)
                    what = "unknown key"
                    if not name:  # the top level holds only sections
                        what = "unknown section" if isinstance(data[key], dict) else "unknown key"
                    loader.fail(name, key, what + (f" (did you mean {hint!r}?)" if hint else ""), index)

    def fail(self, key: str | None, msg: str):
        self.loader.fail(self.name, key, msg, self.index)

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None, required: bool = False) -> Any:
        if key not in self.data:
            if required:
                self.fail(key, "is required")
            return default
        value = self.data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            self.fail(key, f"expected {_kind_name(kind)}, got {value!r}")
        if not isinstance(value, kinds):
            self.fail(key, f"expected {_kind_name(kind)}, got {value!r}")
        return value

    def str_list(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self.get(key, (list, str), None)
        if value is None:
            return tuple(default)
        if isinstance(value, str):
            value = [value]
        for item in value:
            if not isinstance(item, str):
                self.fail(key, f"expected a list of strings, got {item!r}")
        return tuple(value)

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.get(key, str, default)
        if value not in choices:
            self.fail(key, f"must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
        return value

    def convert(self, key: str, fn, default: Any = None) -> Any:
        if key not in self.data:
            return default
        try:
            return fn(self.data[key])
        except ValueError as exc:
            self.fail(key, str(exc))

    def path(self, key: str, default: Path | None = None) -> Path | None:
        value = self.get(key, str, None)
        if value is None:
            return default
        p = Path(value).expanduser()
        if not p.is_absolute() and self.loader.base is not None:
            p = self.loader.base / p
        return p

    def port(self, key: str, default: int) -> int:
        value = self.get(key, int, default)
        if not 0 < value < 65536:
            self.fail(key, f"port {value} out of range 1-65535")
        return value

    def positive(self, key: str, default: int | None) -> int | None:
        value = self.get(key, int, default)
        if value is not None and value <= 0:
            self.fail(key, "must be a positive number")
        return value


def _kind_name(kind) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             list: "a list", dict: "a table"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _closest(key: str, known: set[str]) -> str | None:
    import difflib
    found = difflib.get_close_matches(key, sorted(known), n=1)
    return found[0] if found else None


class _Loader:
    def __init__(self, path: Path | None, text: str):
        self.path, self.text = path, text
        self.base = path.parent if path else None
        self._lines: dict[str, int] | None = None

    def where(self, section: str, key: str | None, index: int = 0) -> str:
        name = ".".join(part for part in (section, key) if part)
        if self._lines is None:
            self._lines = key_lines(self.text)
        line = find_line(self._lines, section, key, index)
        loc = str(self.path) if self.path else "<config>"
        return f"{loc}:{line}: {name}" if line else f"{loc}: {name}"

    def fail(self, section: str, key: str | None, msg: str, index: int = 0):
        raise ConfigError(f"{self.where(section, key, index)}: {msg}")


# tomllib keeps no line numbers, so the lines are found again in the text: every table
# header and every key, by its full dotted path ("groups.support.mode"; the n-th [[fetch]]
# is "fetch[n]").  Good enough for pointing an admin at a line; not a TOML parser.
_KEY_PART = r'(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|\'[^\']*\')'
_DOTTED = rf"{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*"
_HEADER = re.compile(rf"\s*(\[\[?)\s*({_DOTTED})\s*\]\]?\s*(?:#.*)?$")
_ASSIGN = re.compile(rf"\s*({_DOTTED})\s*=")


def _key_path(dotted: str) -> list[str]:
    return [p[1:-1] if p[:1] in "\"'" else p for p in re.findall(_KEY_PART, dotted)]


def key_lines(text: str) -> dict[str, int]:
    """Line number of every table header and key in ``text``, by full dotted path."""
    lines: dict[str, int] = {}
    table: list[str] = []
    arrays: dict[str, int] = {}
    in_string = None  # the quote of a multi-line string being skipped
    for no, line in enumerate(text.splitlines(), 1):
        if in_string:
            if line.count(in_string) % 2:
                in_string = None
            continue
        m = _HEADER.match(line)
        if m:
            path = _key_path(m.group(2))
            if m.group(1) == "[[":
                joined = ".".join(path)
                arrays[joined] = arrays.get(joined, -1) + 1
                path = path[:-1] + [f"{path[-1]}[{arrays[joined]}]"]
            else:  # [fetch.oauth] is the table of the latest [[fetch]]
                for i in range(len(path)):
                    joined = ".".join(path[:i + 1])
                    if joined in arrays:
                        path[i] = f"{path[i]}[{arrays[joined]}]"
            table = path
            lines.setdefault(".".join(table), no)
            continue
        m = _ASSIGN.match(line)
        if m:
            lines.setdefault(".".join(table + _key_path(m.group(1))), no)
            rest = line[m.end():]
            for quote in ('"""', "'''"):
                if rest.count(quote) % 2:
                    in_string = quote
    return lines


def find_line(lines: dict[str, int], section: str, key: str | None, index: int = 0) -> int | None:
    """The line of ``key`` in ``section``; else of the nearest enclosing table or inline table;
    else of the first line inside it.  ``index`` picks the n-th ``[[section]]``."""
    section = re.sub(r"^([^.\[]+)\[[^\]]*\]", rf"\g<1>[{index}]", section)
    target = ".".join(part for part in (section, key) if part)
    if target in lines:
        return lines[target]
    enclosing = [p for p in lines if target.startswith(p + ".")]
    if enclosing:
        return lines[max(enclosing, key=len)]
    inside = [no for p, no in lines.items() if p.startswith((target + ".", target + "["))]
    return min(inside) if inside else None
