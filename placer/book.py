"""The persistent measurement book: every measurement of a run, saved to
DIR/measurements.json as soon as it is made, so that a run resumed after Ctrl-C or a
kill repeats none of them. The file keeps each *identity* (workload fingerprint,
devices, memory caps, protocol) apart: a run never reads, nor overwrites, another
identity's measurements. Candidates are keyed by `candidate_key`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from graphs.problem import Candidate
from placer.results import warn_stderr, write_json
from placer.runtime.timing import Measurement

__all__ = ["UNPLACED", "BOOK_FORMAT", "candidate_key", "key_candidate", "MeasurementBook"]

UNPLACED = "unplaced"  # the method name, and book key, of the model run without placer
BOOK_FORMAT = "placer.measurements/v2"  # v2: one book per identity, Measurement with ci_ms and runs


def candidate_key(candidate: Candidate | Sequence[int] | None) -> str:
    """A candidate's key in the book: "0,1,1" (one micro-batch), "0,1,1/m4", or
    "unplaced" for None (the model run without placer)."""
    if candidate is None:
        return UNPLACED
    if not isinstance(candidate, Candidate):
        candidate = Candidate(tuple(int(d) for d in candidate))
    key = ",".join(str(int(d)) for d in candidate.placement)
    return key if candidate.microbatches == 1 else f"{key}/m{candidate.microbatches}"


def key_candidate(key: str) -> Candidate | None:
    """The Candidate of a book key (inverse of candidate_key)."""
    if key == UNPLACED:
        return None
    placement, _, m = key.partition("/m")
    return Candidate(tuple(int(d) for d in placement.split(",") if d), int(m) if m else 1)


class MeasurementBook:
    """Every measurement of one identity, kept in memory and saved to `path` (JSON) as
    soon as it is recorded; measurements of other identities in the same file are kept
    untouched.

    Parameters
    ----------
    identity : what the measurements depend on (JSON values): workload fingerprint,
        devices, memory caps, protocol. Entries are reused only under an equal identity.
    path : the book's file; None keeps it in memory only.
    warn : told one line per problem with the file (damaged, unreadable, unwritable).
    """

    def __init__(self, identity: dict, path: Path | None = None, warn: Callable[[str], None] = warn_stderr):
        self.identity, self.path, self.warn = json.loads(json.dumps(identity)), path, warn
        self.entries: dict[str, Measurement] = {}
        self.others: list[dict] = []  # the other identities' books, as read
        self.write_failed = False
        if path is not None and path.exists():
            self._read(path)

    def _read(self, path: Path) -> None:
        try:
            saved = json.loads(path.read_text())
            if not isinstance(saved, dict):
                raise ValueError("not a JSON object")
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            self.warn(f"{path}: unreadable measurement book ({type(exc).__name__}: {exc}); measuring afresh")
            return
        books = saved.get("books") if saved.get("format") == BOOK_FORMAT else \
            [{"identity": saved.get("identity"), "entries": saved.get("entries")}]  # v1: one identity
        damaged = 0
        for book in books if isinstance(books, list) else []:
            if not isinstance(book, dict):
                continue
            if book.get("identity") != self.identity:
                self.others.append(book)
                continue
            for key, entry in (book.get("entries") or {}).items():
                try:
                    key_candidate(key)
                    self.entries[key] = Measurement.from_json(entry)
                except (ValueError, TypeError, AttributeError):
                    damaged += 1
        if damaged:
            self.warn(f"{path}: {damaged} damaged measurement(s) ignored (measured again)")

    @staticmethod
    def last_identity(path: Path) -> dict | None:
        """The identity of the book saved last in `path` (the run that wrote it last):
        what `--resume` must match. None when there is no readable book."""
        try:
            saved = json.loads(path.read_text())
            books = saved["books"] if saved.get("format") == BOOK_FORMAT else [saved]
            identity = books[-1]["identity"]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, IndexError, TypeError, AttributeError):
            return None
        return identity if isinstance(identity, dict) else None

    def get(self, candidate: Candidate | Sequence[int] | None) -> Measurement | None:
        """The recorded measurement of a candidate, if any."""
        return self.entries.get(candidate_key(candidate))

    def record(self, candidate: Candidate | Sequence[int] | None, measurement: Measurement) -> None:
        """Keep a measurement and save the book (a failed save is one warning, once)."""
        self.entries[candidate_key(candidate)] = measurement
        self.save()

    def save(self) -> None:
        """Write the file (this identity's book last); a failure is one warning, once."""
        if self.path is None:
            return
        books = [*self.others, {"identity": self.identity,
                                "entries": {k: m.to_json() for k, m in self.entries.items()}}]
        try:
            write_json(self.path, {"format": BOOK_FORMAT, "books": books})
        except OSError as exc:
            if not self.write_failed:
                self.warn(f"cannot save measurements to {self.path} ({exc.strerror or exc}); they are kept in "
                          f"memory, but a resumed run will measure them again")
            self.write_failed = True

    def feasible(self) -> list[tuple[Candidate, Measurement]]:
        """Every feasible measurement of a placement (not unplaced's), in the order recorded."""
        return [(key_candidate(k), m) for k, m in self.entries.items() if m.feasible and k != UNPLACED]
