"""The bad-input report: every problem with the source data counted and named, never a silent hole.

Categories: `list` (a list file missing, a malformed or repeated line), `missing` (a frame
named by a list is not on storage), `unreadable` (not a decodable image), `not_rgb`.
"""

from __future__ import annotations

from collections.abc import Iterable

CATEGORIES = ("list", "missing", "unreadable", "not_rgb")
ON_BAD = ("skip", "fail")
_DESCRIPTIONS = {
    "list": "list problems",
    "missing": "missing frames",
    "unreadable": "unreadable frames",
    "not_rgb": "non-RGB frames",
}


class BadInputError(RuntimeError):
    """The source data has problems and the caller asked to fail on them (or they are fatal)."""


class BadInputReport:
    """Problems found while reading a source, by category; each item is (name, detail)."""

    def __init__(self) -> None:
        self.items: dict[str, list[tuple[str, str]]] = {c: [] for c in CATEGORIES}

    def add(self, category: str, name: str, detail: str = "") -> None:
        if category not in self.items:
            raise ValueError(f"unknown bad-input category {category!r}; known: {', '.join(CATEGORIES)}")
        self.items[category].append((name, detail))

    def extend(self, entries: Iterable[tuple[str, str, str]]) -> None:
        for category, name, detail in entries:
            self.add(category, name, detail)

    def count(self, category: str | None = None) -> int:
        if category is None:
            return sum(len(v) for v in self.items.values())
        return len(self.items[category])

    def __bool__(self) -> bool:
        return self.count() > 0

    def names(self, category: str) -> list[str]:
        return [name for name, _ in self.items[category]]

    def to_json(self, max_items: int = 1000) -> dict:
        """Counts are exact; the named items are sorted and capped at `max_items` per category."""
        out = {}
        for category, entries in self.items.items():
            listed = sorted(entries)[:max_items]
            out[category] = {"count": len(entries), "items": [[n, d] for n, d in listed]}
        return out

    @classmethod
    def from_json(cls, data: dict) -> BadInputReport:
        report = cls()
        for category, block in data.items():
            for name, detail in block.get("items", []):
                report.add(category, name, detail)
        return report

    def summary(self, max_names: int = 5) -> str:
        """A few lines for people: one per category that has problems, with example names."""
        if not self:
            return "bad input: none"
        lines = [f"bad input: {self.count()} problem(s)"]
        for category, entries in self.items.items():
            if not entries:
                continue
            shown = "; ".join(f"{n} ({d})" if d else n for n, d in sorted(entries)[:max_names])
            more = f"; ... {len(entries) - max_names} more" if len(entries) > max_names else ""
            lines.append(f"  {len(entries)} {_DESCRIPTIONS[category]}: {shown}{more}")
        return "\n".join(lines)

    def check(self, on_bad: str, *, fix: str = "") -> None:
        """Raise BadInputError if there are problems and on_bad == 'fail'."""
        if on_bad not in ON_BAD:
            raise ValueError(f"on_bad={on_bad!r}; expected one of {', '.join(ON_BAD)}")
        if self and on_bad == "fail":
            hint = f"\n{fix}" if fix else "\nrerun with --on-bad skip to leave these out (they are listed in the manifest)"
            raise BadInputError(self.summary() + hint)
