"""The API client's threat against the real service: the app in process, on embedded
defaults (sealed SQLite, FAISS, `xnn`), spoken to through its routes with the attacker's own
identify-scoped key (issue 21; `advplugin.evaluation.score_oracle` holds the attacks).

Why here: the attacks live in `evaluation`, which may not import the service; the service
may not import evaluation. The CLI sits above both and composes them: `ServiceHandle` builds
the service and hands out `ServiceOracle`s (the `Oracle` protocol over
`POST /identify/templates`), one fresh key per policy and strategy.

Template mode, not images: the attacker's photos are already dlib embeddings (the harness's
caches). Protecting them with the gallery's key here is what the service would do to the
same photos uploaded to `/identify`. Every answer goes through the same answer policy,
budgets and SQL as an image request does (`advplugin.service.answers`). The image routes
only add extraction in front.
"""

from __future__ import annotations

import secrets
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from advplugin.evaluation.score_oracle import BudgetExhausted, OracleMatch
from advplugin.gallery import Gallery
from advplugin.gallery.apikeys import UNSET
from advplugin.keys import Key
from advplugin.protectors import Protector, create_protector
from advplugin.service.app import create_app
from advplugin.settings import Settings

#: The policies the threat is measured against: label -> (exact scores granted, budgets).
#: `decisions-unbudgeted` is the default policy with budgets lifted, to show what the
#: decisions alone leak and what the budget adds.
POLICIES: dict[str, tuple[bool, int | None]] = {
    "exact (granted)": (True, None),
    "decisions-unbudgeted": (False, 10**9),
    "default": (False, None),
}
DESCRIPTIONS = {
    "exact (granted)": "exact similarities, 100 subjects per answer: the old answers, granted explicitly",
    "decisions-unbudgeted": "the default decisions (top-1 above the operating point, bands) with the budgets lifted",
    "default": "the default policy: decisions, bands and the per-key budget",
}


class ServiceOracle:
    """`score_oracle.Oracle` over the service's `/identify/templates` with one API key.
    `per_request` probes per HTTP request (1 where a budget applies, so the key is stopped
    where the service stops it, not a batch later)."""

    def __init__(
        self,
        client: TestClient,
        api_key: str,
        protector: Protector,
        protection: dict,
        per_request: int = 1,
    ) -> None:
        self.client, self.api_key = client, api_key
        self.protector, self.protection = protector, protection
        self.per_request = per_request
        self.done = 0

    def query(self, probes: np.ndarray) -> list[list[OracleMatch]]:
        out: list[list[OracleMatch]] = []
        for i in range(0, len(probes), self.per_request):
            chunk = self.protector.protect(np.asarray(probes[i : i + self.per_request], np.float32))
            r = self.client.post(
                "/identify/templates",
                headers={"x-api-key": self.api_key},
                json={
                    "protection": self.protection,
                    "templates": chunk.tolist(),
                    "prediction_count": 100,
                },
            )
            if r.status_code == 429:
                raise BudgetExhausted(self.done)
            if r.status_code != 200:
                raise RuntimeError(f"the service answered {r.status_code}: {r.text[:300]}")
            out += [
                [OracleMatch(s["subject"], s["similarity"]) for s in res["subjects"]]
                for res in r.json()["result"]
            ]
            self.done += len(chunk)
        return out


@dataclass
class ServiceHandle:
    client: TestClient
    url: str
    protector: Protector
    protection: dict

    def key(self, exact: bool, budget: int | None) -> str:
        """A fresh identify-scoped key; exact scores granted or not; budgets lifted to
        `budget` (None: the service's defaults). Waits until the service sees it."""
        name = f"attacker-{secrets.token_hex(4)}"
        with Gallery.open(self.url) as g:
            api_key = g.create_api_key(name, scope="identify")
            if exact or budget is not None:
                g.configure_api_key(
                    name,
                    exact_scores=exact or None,
                    budget_unmatched=UNSET if budget is None else budget,
                    budget_lookalikes=UNSET if budget is None else budget,
                )
        for _ in range(100):
            if self.client.get("/status", headers={"x-api-key": api_key}).status_code != 401:
                return api_key
            time.sleep(0.05)
        raise RuntimeError("the service never saw the new API key")

    def oracle(self, policy: str) -> ServiceOracle:
        exact, budget = POLICIES[policy]
        # Unbudgeted keys may batch (nothing to stop them); budgeted ones ask one by one.
        per = 100 if exact or budget is not None else 1
        return ServiceOracle(
            self.client, self.key(exact, budget), self.protector, self.protection, per
        )

    # -- score_oracle.OracleService ------------------------------------------------------

    @property
    def exact_policies(self) -> list[str]:
        return [label for label, (exact, _) in POLICIES.items() if exact]

    @property
    def descriptions(self) -> dict[str, str]:
        return dict(DESCRIPTIONS)

    def factories(self) -> dict[str, Callable[[], ServiceOracle]]:
        """Policy label -> a fresh key's oracle under it (`score_oracle.OracleService`)."""
        return {label: partial(self.oracle, label) for label in POLICIES}

    def identified(self, policy: str, probes: np.ndarray, truth: np.ndarray) -> dict[str, object]:
        """The cameras' side: a fresh key of `policy` sends enrolled people's other photos;
        the share whose top subject is right, and whether its budget stopped it (the
        answers before the stop count; every probe after it counts as not identified)."""
        oracle = self.oracle(policy)
        named: list[str | None] = []
        stopped = None
        try:
            for i in range(0, len(probes), oracle.per_request):
                answers = oracle.query(probes[i : i + oracle.per_request])
                named += [(m[0].subject if m else None) for m in answers]
        except BudgetExhausted as e:
            stopped = e.queries_done
        right = sum(n == t for n, t in zip(named, truth, strict=False))
        return {"probes": len(probes), "identified": right / len(probes), "stopped_at": stopped}


@dataclass(frozen=True)
class InProcessApiClient:
    """`score_oracle.ApiClient` over `in_process_service`: what `advplugin evaluate
    --api-client` hands the harness (the evaluation layer may not import the service)."""

    key: Key | None = None
    work_dir: Path | None = None
    description: str = (
        "the service app in process on embedded defaults (sealed SQLite gallery, FAISS, `xnn`), "
        "asked through `POST /identify/templates` with a fresh identify-scoped key per policy "
        "and strategy (the same answer policy, budgets and SQL as `/identify` with images)"
    )

    def open(self, enrolled: Mapping[str, np.ndarray]) -> AbstractContextManager[ServiceHandle]:
        return in_process_service(enrolled, key=self.key, work_dir=self.work_dir)


@contextmanager
def in_process_service(
    enrolled: Mapping[str, np.ndarray],
    *,
    key: Key | None = None,
    work_dir: Path | None = None,
) -> Iterator[ServiceHandle]:
    """The service on embedded defaults in a temporary folder (sealed SQLite gallery, FAISS,
    `xnn` under `key`), in process, with `enrolled` (subject -> raw embedding) enrolled under
    an admin key."""
    key = key or Key.generate()
    dim = len(next(iter(enrolled.values())))
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        root = Path(tmp)
        admin = secrets.token_urlsafe(24)
        settings = Settings(
            data_dir=root / "data",
            mode="templates",
            scheme="xnn",
            template_key_id=key.key_id,
            template_dim=dim,
            api_key=admin,
            api_key_exact_scores=True,
        )
        protector = create_protector("xnn", key=key, dim=dim)
        m = protector.metadata
        protection = {
            "scheme": m.scheme,
            "scheme_version": m.scheme_version,
            "key_id": m.key_id,
            "extractor_name": "dlib",
            "extractor_version": "harness",
        }
        names = list(enrolled)
        with TestClient(create_app(settings)) as client:
            for i in range(0, len(names), 1000):
                part = names[i : i + 1000]
                t = protector.protect(np.stack([np.asarray(enrolled[n], np.float32) for n in part]))
                r = client.post(
                    "/enroll/templates",
                    headers={"x-api-key": admin},
                    json={
                        "protection": protection,
                        "items": [
                            {"subject": n, "template": v.tolist()}
                            for n, v in zip(part, t, strict=True)
                        ],
                    },
                )
                if r.status_code != 201:
                    raise RuntimeError(f"enrolment failed: {r.status_code} {r.text[:300]}")
            yield ServiceHandle(client, settings.resolved_database_url, protector, protection)
