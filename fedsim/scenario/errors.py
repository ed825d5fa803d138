"""The one error a bad scenario ends in: every problem at once, each with its YAML path or line."""

from __future__ import annotations

import reprlib
from typing import Any, Iterable

MAX_LISTED = 30            # problems written out in the message (``problems`` holds them all)


class ScenarioError(ValueError):
    """A scenario that cannot run; ``problems`` lists every ``path: message``."""

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, problems
        shown = [f"  - {clip(p, 500)}" for p in problems[:MAX_LISTED]]
        if len(problems) > MAX_LISTED:
            shown.append(f"  ... and {len(problems) - MAX_LISTED} more; fix these and validate again")
        super().__init__(f"{source}: {len(problems)} problem(s) in the scenario\n" + "\n".join(shown))


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlong, _REPR.maxlevel = 60, 60, 40, 3
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 6


def short(value: Any) -> str:
    """A repr that fits on a line, whatever the value (huge integers and strings included)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"<an integer of about {int(value.bit_length() * 0.30103) + 1} digits>"
    return _REPR.repr(value)


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def path_text(loc: Iterable) -> str:
    """``federation.local.lr`` from a location; long or odd keys are shortened."""
    parts = [p if isinstance(p, str) and p.isprintable() and len(p) <= 60 else
             (clip(repr(p), 60) if isinstance(p, str) else short(p)) for p in loc]
    return ".".join(parts) or "(top level)"
