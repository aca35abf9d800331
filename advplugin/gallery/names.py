"""Subject names and the other text the gallery stores: one canonical form for names
(`canonical_name`), bounds both databases enforce alike (`check_text`), and the renames an
older gallery's names need (`planned_renames`).

Why a module of its own: the service's request types, bulk migrations, the gallery's writes
and the upgrade to revision 0011 must apply the very same rule, or two spellings of one
name could become two subjects again through one of them.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any

from advplugin.gallery.models import Subject, Template

_DIGEST = re.compile(r"[0-9a-f]{16}")


def check_text(value: object, what: str, max_length: int) -> str:
    """`value` if it is a string that both databases store unchanged, else ValueError.

    Why here and not only in the service: PostgreSQL refuses NUL characters in text and
    strings longer than a VARCHAR(n) column (a DataError mid-transaction), while SQLite
    stores anything, however long. Checked before any SQL so both databases accept exactly
    the same strings and a caller of the gallery (service, bulk jobs) cannot grow rows
    without bound. The message never echoes the value.
    """
    if not isinstance(value, str) or not value.strip() or len(value) > max_length or "\x00" in value:
        raise ValueError(f"{what} must be a non-blank string of at most {max_length} characters without NUL")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: not storable as UTF-8 text
        raise ValueError(f"{what} must be valid Unicode text") from None
    return value


#: Longest strings the columns hold (PostgreSQL enforces them; `check_text` does on both).
SUBJECT_NAME_MAX = Subject.__table__.c.name.type.length
EXTRACTOR_NAME_MAX = Template.__table__.c.extractor_name.type.length
EXTRACTOR_VERSION_MAX = Template.__table__.c.extractor_version.type.length
#: Unicode categories refused in a subject name: control characters (newline, tab, NEL, ...)
#: and the line and paragraph separators. A name is a path segment and a log field: one
#: holding a newline enrolled, and then no route could address it.
_NAME_REFUSED = frozenset({"Cc", "Zl", "Zp"})


def canonical_name(value: object, what: str = "subject name") -> str:
    """The one form of a subject name that is stored and looked up: Unicode NFC, without
    leading or trailing white space. Names with control characters are refused (ValueError,
    the service's 422), as are those `check_text` refuses.

    Why: names that look the same must be the same subject. "é" typed as one code point and
    as "e" + combining accent were two subjects, so deleting one left the other; a padded
    name enrolled trimmed and then could not be found untrimmed. Every route (both APIs, the
    CLI, bulk migrations) passes names through here, and the gallery stores only names
    already in this form (`add_templates`, `add_subject` refuse others)."""
    text = check_text(value, what, SUBJECT_NAME_MAX)
    if any(unicodedata.category(c) in _NAME_REFUSED for c in text):
        raise ValueError(f"{what} must not contain control characters (newline, tab, ...)")
    name = unicodedata.normalize("NFC", text).strip()
    return check_text(name, what, SUBJECT_NAME_MAX)


def is_canonical_name(name: str) -> bool:
    try:
        return canonical_name(name) == name
    except ValueError:
        return False


def _repaired_name(name: str, subject_id: int) -> str:
    """The canonical form of a name stored before names had one: its control characters
    (refused since, but stored then) become spaces."""
    text = "".join(" " if unicodedata.category(c) in _NAME_REFUSED else c for c in name.replace("\x00", ""))
    try:
        return canonical_name(text[:SUBJECT_NAME_MAX])
    except ValueError:  # blank once repaired
        return f"subject {subject_id}"


def name_beside(name: str, subject_id: int, taken: Callable[[str], bool]) -> str:
    """`name` (canonical) when it is free, else "<name> (subject <id>)" (", 2", ... while
    that is taken too), cut to fit the column: how a rename to a canonical name avoids
    merging into another subject."""
    new, n = name, 0
    while taken(new):
        n += 1
        suffix = f" (subject {subject_id})" if n == 1 else f" (subject {subject_id}, {n})"
        new = canonical_name(name[: SUBJECT_NAME_MAX - len(suffix)] + suffix)
    return new


def planned_renames(subjects: Sequence[tuple[int, int, str]]) -> list[dict[str, Any]]:
    """For the stored (subject id, collection id, name) of a gallery: the subjects whose
    names are not canonical, each with the name it is to take (`SubjectRename`). Where the
    canonical form is another subject's name already (or another rename's), the later
    subject takes "<canonical> (subject <id>)" instead: two people are never merged."""
    taken = {(cid, name) for _, cid, name in subjects if is_canonical_name(name)}
    out = []
    for sid, cid, name in subjects:
        if is_canonical_name(name):
            continue
        repaired = _repaired_name(name, sid)
        new = name_beside(repaired, sid, lambda n, cid=cid: (cid, n) in taken)
        collision = new != repaired
        taken.add((cid, new))
        out.append({"subject_id": sid, "collection_id": cid, "old_name": name, "new_name": new, "collision": collision})
    return out


def check_canonical(name: object) -> None:
    if canonical_name(name, "subject names") != name:
        raise ValueError("subject names must be in canonical form (NFC, trimmed): pass them through canonical_name")


def check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ValueError(f"config_digest must be 16 lowercase hex digits, got {digest!r}")
    return digest
