"""Template id -> subject, in memory, beside a collection's index.

Why: turning search hits into names with one SQL query per identification cost more than the
search itself (a 10k flat search is ~0.3 ms; a round trip to SQL is about as much again, and
more on a loaded machine). A template's subject never changes after enrolment (no API moves a
template to another subject; a key rotation replaces the vector only), and template ids are
never reused, so the map only needs what the index follower already sees: the subjects of
the templates it adds, and the ids it removes.

The map is a cache like the index: after a snapshot load it starts empty and is filled from
SQL for the ids a search returns that it does not know yet (`TemplateIndex.subjects`).
Storage: one int32 subject code per template id (ids are dense: allocated in increasing
order) and one string per distinct subject name.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_ABSENT = -1


class SubjectMap:
    def __init__(self) -> None:
        self._codes = np.full(0, _ABSENT, np.int32)
        self._names: list[str] = []
        self._code_of: dict[str, int] = {}

    def clear(self) -> None:
        self.__init__()  # type: ignore[misc]

    def _grow(self, max_id: int) -> None:
        # One slot more than the largest id: the last slot is always ABSENT, so the -1 ids of
        # a short result read it and `codes` needs no mask in the common case.
        if max_id + 1 >= len(self._codes):
            grown = np.full(max(max_id + 2, 2 * len(self._codes), 1024), _ABSENT, np.int32)
            grown[: len(self._codes)] = self._codes
            self._codes = grown

    def _code(self, name: str) -> int:
        code = self._code_of.get(name)
        if code is None:
            code = self._code_of[name] = len(self._names)
            self._names.append(name)
        return code

    def set(self, ids: Sequence[int] | np.ndarray, subjects: Sequence[str]) -> None:
        ids = np.asarray(ids, np.int64)
        if len(ids) != len(subjects):
            raise ValueError(f"{len(ids)} ids for {len(subjects)} subjects")
        if not len(ids):
            return
        self._grow(int(ids.max()))
        self._codes[ids] = [self._code(s) for s in subjects]

    def remove(self, ids: Sequence[int] | np.ndarray) -> None:
        ids = np.asarray(ids, np.int64)
        ids = ids[(ids >= 0) & (ids < len(self._codes))]
        self._codes[ids] = _ABSENT

    def codes(self, ids: np.ndarray) -> np.ndarray:
        """Subject codes of `ids` (any shape), -1 for ids it does not know (or -1 ids)."""
        try:  # the common case: one gather (an id of -1 reads the last slot, always ABSENT)
            return self._codes[ids]
        except IndexError:  # an id beyond the map (not known yet)
            pass
        ids = np.asarray(ids, np.int64)
        known = (ids >= 0) & (ids < len(self._codes))
        out = np.full(ids.shape, _ABSENT, np.int32)
        out[known] = self._codes[ids[known]]
        return out

    def code(self, template_id: int) -> int:
        """One id's code (-1 unknown): a scalar read, no array made."""
        return self._codes.item(template_id) if 0 <= template_id < len(self._codes) else _ABSENT

    def name(self, code: int) -> str:
        return self._names[code]
