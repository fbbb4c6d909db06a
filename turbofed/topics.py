"""MQTT topic names for the federated protocol, built from one configurable root.

Every component builds and parses topics here so a typo cannot split the fleet into
two protocols, and so a received topic is checked before its site id is trusted.

Layout (root defaults to ``tfl/v1``, plant root to ``plant``)::

    <root>/round                      aggregator, retained: round announcement
    <root>/global                     aggregator, retained: global model (envelope)
    <root>/stats/request              aggregator, retained: federated statistics request
    <root>/sites/<site>/<kind>        site: update | metrics | predictions | status | stats | telemetry |
                                      evaluation | secagg_keys | secagg_shares | secagg_masked | secagg_unmask
    <root>/secagg/roster              aggregator: a secure sum's roster of keys (docs/privacy.md)
    <root>/secagg/unmask              aggregator: a secure sum's unmask request
    <root>/secagg/<site>/shares       aggregator: the encrypted shares addressed to one site
    <root>/regions/<region>/partial   regional aggregator: its sites' updates summed (aggregator/regional.py)
    <plant>/<site>/<engine>/<kind>    sensor gateway or replay: sensors | events
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple, get_args

from turbofed.errors import Refused
from turbofed.refusals import Refusal

DEFAULT_ROOT: Final = "tfl/v1"
DEFAULT_PLANT_ROOT: Final = "plant"
MAX_ID_LEN: Final = 128

SiteKind = Literal["update", "metrics", "predictions", "status", "stats", "telemetry", "evaluation",
                   "secagg_keys", "secagg_shares", "secagg_masked", "secagg_unmask"]
PlantKind = Literal["sensors", "events"]
SITE_KINDS: Final[tuple[str, ...]] = get_args(SiteKind)
PLANT_KINDS: Final[tuple[str, ...]] = get_args(PlantKind)

_FORBIDDEN = set("/+#\x00")


class TopicError(Refused):
    """A topic or an id in it is malformed; the message names the offending value."""

    reason = Refusal.BAD_TOPIC


def validate_id(value: object, what: str = "site id") -> str:
    """Return ``value`` if it can be one topic level: non-empty, no '/', '+', '#', NUL.

    Ids end up inside topic names and file names, so a wildcard or a slash in one would
    let a site publish on (or subscribe to) another site's topics.
    """
    if not isinstance(value, str):
        raise TopicError(f"{what} must be a string, got {type(value).__name__}")
    if not value:
        raise TopicError(f"{what} must not be empty")
    if len(value) > MAX_ID_LEN:
        raise TopicError(f"{what} is longer than {MAX_ID_LEN} characters: {value[:40]!r}...")
    bad = sorted(_FORBIDDEN.intersection(value))
    if bad or value.startswith("$") or not value.isprintable() or value != value.strip():
        raise TopicError(
            f"invalid {what} {value!r}: must be printable, without surrounding spaces, "
            "'/', '+', '#' or a leading '$'"
        )
    return value


def validate_site(site: object) -> str:
    """Validate a site id (see :func:`validate_id`)."""
    return validate_id(site, "site id")


def validate_engine(engine: object) -> str:
    """Validate an engine id; ints (C-MAPSS unit numbers) are accepted and stringified."""
    if isinstance(engine, int) and not isinstance(engine, bool):
        engine = str(engine)
    return validate_id(engine, "engine id")


def _validate_root(root: str, what: str) -> str:
    if not isinstance(root, str) or not root:
        raise TopicError(f"{what} must be a non-empty string")
    levels = root.split("/")
    if any(not level for level in levels):
        raise TopicError(f"{what} {root!r} has an empty level (leading, trailing or double '/')")
    for level in levels:
        validate_id(level, f"{what} level")
    return root


class SiteTopic(NamedTuple):
    """A parsed ``<root>/sites/<site>/<kind>`` topic; unpacks as ``(site, kind)``."""

    site: str
    kind: str


class PlantTopic(NamedTuple):
    """A parsed ``<plant>/<site>/<engine>/<kind>`` topic; unpacks as ``(site, engine, kind)``."""

    site: str
    engine: str
    kind: str


@dataclass(frozen=True)
class Topics:
    """Topic names under one root; build once from config and pass around."""

    root: str = DEFAULT_ROOT
    plant_root: str = DEFAULT_PLANT_ROOT

    def __post_init__(self) -> None:
        _validate_root(self.root, "topic root")
        _validate_root(self.plant_root, "plant topic root")

    # --- aggregator -> sites (retained) ---
    @property
    def round(self) -> str:
        """Retained round announcement."""
        return f"{self.root}/round"

    @property
    def global_model(self) -> str:
        """Retained global model (envelope + ONNX)."""
        return f"{self.root}/global"

    @property
    def stats_request(self) -> str:
        """Retained request for per-feature count/sum/sumsq (federated statistics)."""
        return f"{self.root}/stats/request"

    # --- site -> aggregator ---
    @property
    def secagg_roster(self) -> str:
        return f"{self.root}/secagg/roster"

    @property
    def secagg_unmask(self) -> str:
        return f"{self.root}/secagg/unmask"

    def secagg_inbox(self, site: str) -> str:
        """The shares the aggregator forwards to `site` (only that site may read them)."""
        return f"{self.root}/secagg/{validate_site(site)}/shares"

    def site(self, site: str, kind: SiteKind | str) -> str:
        """``<root>/sites/<site>/<kind>`` after validating both."""
        if kind not in SITE_KINDS:
            raise TopicError(f"unknown site topic kind {kind!r}; expected one of {SITE_KINDS}")
        return f"{self.root}/sites/{validate_site(site)}/{kind}"

    def update(self, site: str) -> str:
        return self.site(site, "update")

    def metrics(self, site: str) -> str:
        return self.site(site, "metrics")

    def predictions(self, site: str) -> str:
        return self.site(site, "predictions")

    def status(self, site: str) -> str:
        return self.site(site, "status")

    def stats(self, site: str) -> str:
        return self.site(site, "stats")

    def all_sites(self, kind: SiteKind | str) -> str:
        """Subscription filter for one kind from every site, e.g. ``tfl/v1/sites/+/update``."""
        if kind not in SITE_KINDS:
            raise TopicError(f"unknown site topic kind {kind!r}; expected one of {SITE_KINDS}")
        return f"{self.root}/sites/+/{kind}"

    # --- regional aggregator -> top aggregator ---
    def partial(self, region: str) -> str:
        """``<root>/regions/<region>/partial``: one region's sum of its sites' updates."""
        return f"{self.root}/regions/{validate_id(region, 'region id')}/partial"

    @property
    def all_partials(self) -> str:
        """Subscription filter for every region's partial."""
        return f"{self.root}/regions/+/partial"

    def parse_partial(self, topic: str) -> str:
        """The region of ``<root>/regions/<region>/partial``; raises TopicError for anything else."""
        prefix = f"{self.root}/regions/"
        rest = topic[len(prefix):].split("/") if isinstance(topic, str) and topic.startswith(prefix) else []
        if len(rest) != 2 or rest[1] != "partial":
            raise TopicError(f"topic {str(topic)[:200]!r}: expected {prefix}<region>/partial")
        try:
            return validate_id(rest[0], "region id")
        except TopicError as exc:
            raise TopicError(f"topic {topic!r}: {exc}") from None

    # --- plant (sensor traffic) ---
    def plant(self, site: str, engine: str | int, kind: PlantKind | str) -> str:
        """``<plant>/<site>/<engine>/<kind>`` after validating all three."""
        if kind not in PLANT_KINDS:
            raise TopicError(f"unknown plant topic kind {kind!r}; expected one of {PLANT_KINDS}")
        return f"{self.plant_root}/{validate_site(site)}/{validate_engine(engine)}/{kind}"

    def sensors(self, site: str, engine: str | int) -> str:
        return self.plant(site, engine, "sensors")

    def events(self, site: str, engine: str | int) -> str:
        return self.plant(site, engine, "events")

    def plant_filter(self, site: str | None = None, kind: PlantKind | str = "+") -> str:
        """Subscription filter for one site's engines (all sites if ``site`` is None)."""
        if kind != "+" and kind not in PLANT_KINDS:
            raise TopicError(f"unknown plant topic kind {kind!r}; expected one of {PLANT_KINDS}")
        s = "+" if site is None else validate_site(site)
        return f"{self.plant_root}/{s}/+/{kind}"

    # --- parsing received topics ---
    def parse_site(self, topic: str) -> SiteTopic:
        """Split ``<root>/sites/<site>/<kind>``; raises TopicError for anything else."""
        prefix = f"{self.root}/sites/"
        if not isinstance(topic, str) or not topic.startswith(prefix):
            raise TopicError(f"topic {topic!r} is not under {prefix!r}")
        rest = topic[len(prefix):].split("/")
        if len(rest) != 2:
            raise TopicError(f"topic {topic!r}: expected {prefix}<site>/<kind>")
        site, kind = rest
        if kind not in SITE_KINDS:
            raise TopicError(f"topic {topic!r}: unknown kind {kind!r}; expected one of {SITE_KINDS}")
        try:
            validate_site(site)
        except TopicError as exc:
            raise TopicError(f"topic {topic!r}: {exc}") from None
        return SiteTopic(site=site, kind=kind)

    def parse_plant(self, topic: str) -> PlantTopic:
        """Split ``<plant>/<site>/<engine>/<kind>``; raises TopicError for anything else."""
        prefix = f"{self.plant_root}/"
        if not isinstance(topic, str) or not topic.startswith(prefix):
            raise TopicError(f"topic {topic!r} is not under {prefix!r}")
        rest = topic[len(prefix):].split("/")
        if len(rest) != 3:
            raise TopicError(f"topic {topic!r}: expected {prefix}<site>/<engine>/<kind>")
        site, engine, kind = rest
        if kind not in PLANT_KINDS:
            raise TopicError(f"topic {topic!r}: unknown kind {kind!r}; expected one of {PLANT_KINDS}")
        try:
            validate_site(site)
            validate_engine(engine)
        except TopicError as exc:
            raise TopicError(f"topic {topic!r}: {exc}") from None
        return PlantTopic(site=site, engine=engine, kind=kind)


DEFAULT_TOPICS: Final = Topics()


def natural_key(text: Any) -> tuple[Any, ...]:
    """Sort key for site and engine names: \"engine-2\" before \"engine-10\"."""
    return tuple(int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", str(text))))
