"""Error types. Every error offloadkit raises on purpose derives from `OffloadkitError`.

Messages follow one shape so people and tools can read them:
``<file>:<line>:<col> <dotted.path>: <what is wrong>. <what to do>.``
"""

from __future__ import annotations

import difflib
import re
import reprlib
from dataclasses import dataclass
from typing import Iterable, Sequence

# A message quotes at most this much of a value: a 200 KB string aliased 5,000 times must not print 1 GB.
MAX_QUOTED = 60
# Problems one error spells out; the rest are counted (all stay in `LocatedError.problems`).
MAX_LISTED = 50
# A last guard on one problem's line, whatever quoted it.
MAX_MESSAGE = 2_000

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = MAX_QUOTED
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 4
_REPR.maxlevel = 2


def quoted(value) -> str:
    """`repr(value)` for a message, shortened; never fails (not even on an int past Python's 4,300 digits)."""
    if isinstance(value, str) and len(value) > MAX_QUOTED:
        return f"{value[:MAX_QUOTED - 20]!r}... ({len(value):,} characters)"
    try:
        return _REPR.repr(value)
    except ValueError:  # str() of an int past sys.get_int_max_str_digits()
        if isinstance(value, int):
            return f"an integer of about {int(value.bit_length() * 0.30103):,} digits"
        return f"a {type(value).__name__}"


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_*-]+")
# Characters that would break a problem's one line apart (or hide part of it) on a terminal.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text: str) -> str:
    """The text with line breaks and other control characters written as escapes."""
    if not _UNPRINTABLE.search(text):
        return text
    return _UNPRINTABLE.sub(lambda m: repr(m.group())[1:-1], text)


class OffloadkitError(Exception):
    """Root of offloadkit's errors: catch this to catch them all."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a policy, located in its source file when known."""

    message: str
    source: str = "<policy>"
    path: tuple = ()
    line: int | None = None
    column: int | None = None

    @property
    def dotted_path(self) -> str:
        """`components.unet.strategy`; a part that is not a plain name is quoted (`components.'a\\nb'`)."""
        return ".".join(str(part) if isinstance(part, int) or (isinstance(part, str) and _PLAIN_KEY.fullmatch(part))
                        else quoted(part)
                        for part in self.path)

    def __str__(self) -> str:
        where = one_line(self.source)
        if self.line is not None:
            where += f":{self.line}:{self.column or 1}"
        if self.path:
            where += f" {self.dotted_path}"
        message = one_line(self.message)
        if len(message) > MAX_MESSAGE:
            message = message[:MAX_MESSAGE] + "... (cut)"
        return f"{where}: {message}"


class LocatedError(OffloadkitError, ValueError):
    """A YAML document is invalid; every problem found in one pass is kept in `problems`, located.

    The base of `PolicyError` and `HardwareError`: both documents are read by the same machinery.
    """

    def __init__(self, problems: Sequence[Problem] | Problem | str):
        if isinstance(problems, str):
            problems = [Problem(problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems: tuple[Problem, ...] = tuple(problems)
        lines = [str(p) for p in self.problems[:MAX_LISTED]]
        if len(self.problems) > MAX_LISTED:
            lines.append(f"... and {len(self.problems) - MAX_LISTED:,} more problems. Fix these and check again "
                         "to see the rest")
        super().__init__("\n".join(lines))


class PolicyError(LocatedError):
    """A policy is invalid: unreadable YAML, schema violations, or names that do not fit the pipeline."""


class HardwareError(LocatedError):
    """A hardware profile is invalid or could not be read, each problem located like a policy's."""


class PipelineError(OffloadkitError, ValueError):
    """The pipeline cannot take a policy as it is (device map, group offloading, foreign hooks, ...)."""


class UnknownComponentError(OffloadkitError, KeyError):
    """A plan or prediction was asked for a component (or stage) it does not have."""

    def __str__(self) -> str:  # KeyError would show the message quoted
        return str(self.args[0]) if self.args else ""


class ModelSourceError(OffloadkitError, ValueError):
    """A model folder, built-in architecture or model config cannot be read, built or estimated by the planner."""


class DtypeError(OffloadkitError, ValueError):
    """A dtype name offloadkit does not know (`fp16`, `bf16`, `fp32`, ... are known)."""


class CallSettingsError(OffloadkitError, ValueError):
    """The settings of a predicted call are impossible, or not a call the pipeline takes as asked: a size or batch
    that is not positive, a height that is not a multiple of the family's factor, frames for an image pipeline."""


class SynthesisError(OffloadkitError, ValueError):
    """No policy fits the memory limit, or the request cannot be planned."""


class BudgetExceededError(OffloadkitError, RuntimeError):
    """More bytes are resident on the device than the policy's `budget` allows (`on_exceed: error`)."""


class BudgetWarning(UserWarning):
    """More bytes are resident on the device than the policy's `budget` allows (`on_exceed: warn`)."""


class DeviceError(OffloadkitError, RuntimeError):
    """The requested device does not exist or no accelerator was found for `device: auto`."""


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The choice most similar to `name`, or None when nothing is close."""
    choices = [str(c) for c in choices]
    if len(str(name)) > 100:  # no name is that long; difflib would take seconds on a 200 KB one
        return None
    matches = difflib.get_close_matches(str(name), choices, n=1, cutoff=0.6)
    if matches:
        return matches[0]
    # an abbreviation: 'keep' for 'keep-on-device'
    prefixed = [c for c in choices if name and c.startswith(str(name))]
    return prefixed[0] if len(prefixed) == 1 else None


def did_you_mean(name: str, choices: Iterable[str], what: str = "names", max_listed: int = 20) -> str:
    """`Did you mean 'x'? Valid <what>: a, b, c.` for an unknown name (long lists are not spelled out)."""
    choices = [c for c in choices if c != name]
    hint = ""
    match = closest(name, choices)
    if match is not None:
        hint = f"Did you mean {match!r}? "
    if len(choices) > max_listed:
        return f"{hint}There are {len(choices)} valid {what}.".strip()
    listed = ", ".join(repr(c) for c in choices) if choices else "(none)"
    return f"{hint}Valid {what}: {listed}."
