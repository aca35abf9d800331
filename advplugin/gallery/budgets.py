"""`AnswerBudgets`: how much each API key has been told, and whether it may be told more.

Why budgets: an identify-scoped client that sends photos of people who are *not* enrolled
still learns something from every answer. A match names a look-alike of an enrolled person,
and the mean of a subject's look-alikes points at that person (docs/service.md, "What an
answer reveals"). The leak grows with the number of such answers, so each key gets a budget
per rolling window of `window_hours`:

* `unmatched`: faces that matched no one (or failed a verification);
* `lookalikes`: weak matches (below the strong band) that name a subject this key was not
  told about within the window. Weak matches are what strangers' photos produce. A camera at
  a door mostly sees enrolled people and produces strong matches; an attacker rarely can;
* credit: every distinct subject strongly matched in the window raises the look-alike budget
  by `credit_per_strong`. A camera that identifies its regulars earns room for their weak
  frames. An attacker without photos of enrolled people earns almost nothing.

Over budget, the key is refused until enough hours leave the window (the caller answers 429
with Retry-After). The refusal depends only on what was answered *before* a request, never on
the request's own faces, so a 429 says nothing about the probe that received it.

The counters live in the gallery's database (`key_usage`, `key_disclosures`), written in one
serialised write transaction per answer. Replicas therefore share them, and a restart keeps
them. That transaction does not wait for the disk (`transaction(durable=False)`), so only a
crash of the machine can undo its last counts. A key can overshoot by one request (at most `max_faces` faces), because a request is
admitted on the counts before it. Composed over the `Gallery`, not inherited: the first
refusal of each hour writes an audit event in the same transaction.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from advplugin.gallery.audit import Actor
from advplugin.gallery.models import Collection, KeyDisclosure, KeyUsage
from advplugin.gallery.store import Gallery

HOUR = 3600


@dataclass(frozen=True)
class BudgetLimits:
    """One key's budget over a rolling window of `window_hours` hours (the defaults live in
    `advplugin.settings.AnswerSettings`, one place)."""

    window_hours: int
    unmatched: int
    lookalikes: int
    credit_per_strong: float

    def __post_init__(self) -> None:
        if self.window_hours < 1 or self.unmatched < 0 or self.lookalikes < 0 or self.credit_per_strong < 0:
            raise ValueError("budget limits must be >= 0 (window_hours >= 1)")


class Outcome(NamedTuple):
    """What an answer told about one face: the subject it named (None: no match) and
    whether the match was strong."""

    subject: str | None
    strong: bool = False


@dataclass(frozen=True)
class Usage:
    """A key's counters within the window."""

    probes: int
    unmatched: int
    lookalikes: int
    strong_subjects: int

    def over(self, limits: BudgetLimits) -> list[str]:
        """Which budgets are used up (empty: the key may be answered)."""
        out = []
        if self.unmatched >= limits.unmatched:
            out.append("unmatched")
        if self.lookalikes >= limits.lookalikes + limits.credit_per_strong * self.strong_subjects:
            out.append("lookalikes")
        return out


@dataclass(frozen=True)
class Charge:
    """The result of `AnswerBudgets.charge`: refused (`over` names the budgets used up)
    or answered (the counters now include the request)."""

    over: list[str]
    retry_after: int = 0

    @property
    def refused(self) -> bool:
        return bool(self.over)


def _hour(now: float | None) -> int:
    return int((time.time() if now is None else now) // HOUR)


def _upsert(conn: Connection, table: Any, values: dict[str, Any], keys: Sequence[str], set_: dict[str, Any]) -> None:
    """INSERT ... ON CONFLICT (keys) DO UPDATE SET ...: SQLite and PostgreSQL both speak it."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(table).values(**values)
    conn.execute(stmt.on_conflict_do_update(index_elements=list(keys), set_=set_))


class AnswerBudgets:
    def __init__(self, gallery: Gallery) -> None:
        self.gallery = gallery

    # -- reading --------------------------------------------------------------------------------
    def _usage(self, conn: Connection, api_key_id: int, start: int) -> Usage:
        u = KeyUsage
        row = conn.execute(
            select(func.coalesce(func.sum(u.probes), 0), func.coalesce(func.sum(u.unmatched), 0),
                   func.coalesce(func.sum(u.lookalikes), 0))
            .where(u.api_key_id == api_key_id, u.hour >= start)
        ).one()
        strong = conn.scalar(
            select(func.count()).select_from(KeyDisclosure)
            .where(KeyDisclosure.api_key_id == api_key_id, KeyDisclosure.strong_hour >= start)
        )
        return Usage(int(row[0]), int(row[1]), int(row[2]), int(strong or 0))

    def usage(self, api_key_id: int, limits: BudgetLimits, *, now: float | None = None) -> Usage:
        """The key's counters within the window ending now (a read, no lock)."""
        start = _hour(now) - limits.window_hours + 1
        with self.gallery.db.read() as conn:
            return self._usage(conn, api_key_id, start)

    def _retry_after(self, conn: Connection, api_key_id: int, limits: BudgetLimits, usage: Usage,
                     over: list[str], now: float) -> int:
        """Seconds until enough hours leave the window for every used-up budget to have room
        again (credit leaving the window is ignored: a lower bound, at least one second)."""
        hour = _hour(now)
        start = hour - limits.window_hours + 1
        rows = conn.execute(
            select(KeyUsage.hour, KeyUsage.unmatched, KeyUsage.lookalikes)
            .where(KeyUsage.api_key_id == api_key_id, KeyUsage.hour >= start).order_by(KeyUsage.hour)
        ).all()
        need = {"unmatched": usage.unmatched - limits.unmatched + 1,
                "lookalikes": usage.lookalikes - int(limits.lookalikes + limits.credit_per_strong
                                                     * usage.strong_subjects) + 1}
        wait = 1
        for name in over:
            freed, column = 0, 1 if name == "unmatched" else 2
            for r in rows:
                freed += int(r[column])
                if freed >= need[name]:
                    wait = max(wait, int((int(r[0]) + limits.window_hours) * HOUR - now))
                    break
            else:
                wait = max(wait, int((hour + limits.window_hours) * HOUR - now))
        return wait

    # -- charging -------------------------------------------------------------------------------
    def charge(
        self, api_key_id: int, collection: str, outcomes: Sequence[Outcome], limits: BudgetLimits,
        *, now: float | None = None,
    ) -> Charge:
        """Admit and count one answer's faces, or refuse it, in one serialised transaction
        (replicas see each other's counts). Refused when a budget was used up *before* this
        request; then nothing is counted but the refusal, and the hour's first refusal
        writes a `budget_exceeded` audit event."""
        now = time.time() if now is None else now
        hour = _hour(now)
        start = hour - limits.window_hours + 1
        # Not durable: a crash of the machine may undo the last counts (a few probes' worth);
        # waiting for the disk doubled a template request's time (benchmarks/answer_policy.py).
        with self.gallery.transaction(durable=False) as g:
            conn = g.connection
            usage = self._usage(conn, api_key_id, start)
            over = usage.over(limits)
            base = {"api_key_id": api_key_id, "hour": hour}
            zero = {"probes": 0, "unmatched": 0, "lookalikes": 0, "refused": 0}
            if over:
                refused_before = conn.scalar(
                    select(KeyUsage.refused).where(KeyUsage.api_key_id == api_key_id, KeyUsage.hour == hour)
                )
                _upsert(conn, KeyUsage, {**base, **zero, "refused": 1}, ("api_key_id", "hour"),
                        {"refused": KeyUsage.refused + 1})
                if not refused_before:
                    g.record_audit(Actor.api_key(api_key_id), "budget_exceeded", collection=collection,
                                   subject=",".join(over))
                return Charge(over, self._retry_after(conn, api_key_id, limits, usage, over, now))

            cid = g.collection_id(collection)
            named = sorted({o.subject for o in outcomes if o.subject is not None})
            known: dict[str, int] = {}
            if named:
                d = KeyDisclosure
                known = {
                    s: int(last)
                    for s, last in conn.execute(
                        select(d.subject, d.last_hour).where(
                            d.api_key_id == api_key_id, d.collection_id == cid, d.subject.in_(named))
                    )
                }
            unmatched = sum(1 for o in outcomes if o.subject is None)
            lookalikes = 0
            for s in named:
                last = known.get(s, start - 1)
                strong = any(o.strong for o in outcomes if o.subject == s)
                if not strong and last < start:
                    lookalikes += 1  # a weak match naming someone new to this key: a look-alike
                _upsert(
                    conn, KeyDisclosure,
                    {"api_key_id": api_key_id, "collection_id": cid, "subject": s, "last_hour": hour,
                     "strong_hour": hour if strong else None},
                    ("api_key_id", "collection_id", "subject"),
                    {"last_hour": hour, **({"strong_hour": hour} if strong else {})},
                )
            _upsert(
                conn, KeyUsage,
                {**base, **zero, "probes": len(outcomes), "unmatched": unmatched, "lookalikes": lookalikes},
                ("api_key_id", "hour"),
                {"probes": KeyUsage.probes + len(outcomes), "unmatched": KeyUsage.unmatched + unmatched,
                 "lookalikes": KeyUsage.lookalikes + lookalikes},
            )
            # What has left the window is no longer needed (nor kept: it names people).
            conn.execute(delete(KeyUsage).where(KeyUsage.api_key_id == api_key_id, KeyUsage.hour < start))
            conn.execute(delete(KeyDisclosure).where(KeyDisclosure.api_key_id == api_key_id,
                                                     KeyDisclosure.last_hour < start))
            return Charge([])

    # -- subjects and keys ------------------------------------------------------------------------
    def forget_subject(self, collection: str, name: str) -> None:
        """Drop every key's record of a subject (call it in the subject's delete
        transaction: a deleted person's name must not outlive it here)."""
        with self.gallery.db.write() as conn:
            cid = self.gallery.collection_id(collection)
            conn.execute(delete(KeyDisclosure).where(KeyDisclosure.collection_id == cid, KeyDisclosure.subject == name))

    def reset(self, api_key_id: int) -> None:
        """Forget a key's counters (an admin's `advplugin db api-key set --reset-budget`)."""
        with self.gallery.db.write() as conn:
            conn.execute(delete(KeyUsage).where(KeyUsage.api_key_id == api_key_id))
            conn.execute(delete(KeyDisclosure).where(KeyDisclosure.api_key_id == api_key_id))




class OperatingPoints:
    """A collection's operating point: the FMR whose calibrated threshold decides a match
    (`collections.decision_fmr`; None: the service's default). Kept in the database so that
    every replica decides alike; changing it is audited."""

    def __init__(self, gallery: Gallery) -> None:
        self.gallery = gallery

    def get(self, collection: str) -> float | None:
        with self.gallery.db.read() as conn:
            value = conn.scalar(select(Collection.decision_fmr).where(Collection.name == collection))
        return None if value is None else float(value)

    def set(self, collection: str, fmr: float | None, *, actor: Actor) -> None:
        if fmr is not None and not 0.0 < fmr < 1.0:
            raise ValueError("an operating point is a false match rate between 0 and 1")
        with self.gallery.transaction() as g:
            cid = g.collection_id(collection)
            g.connection.execute(update(Collection).where(Collection.id == cid).values(decision_fmr=fmr))
            g.record_audit(actor, "operating_point", collection=collection,
                           subject="default" if fmr is None else f"fmr={fmr:g}")
