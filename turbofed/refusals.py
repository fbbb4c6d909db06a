"""Every reason turbofed refuses a message, as one enum: the codes logs, counters and stores use.

One list, so a reason is spelled once and a typo is an AttributeError at import time, not
a new counter nobody watches. Values are the strings stored in results stores and shown
on the dashboard; they never change spelling (add a member rather than rename one).
"""

from __future__ import annotations

from enum import StrEnum, unique


@unique
class Refusal(StrEnum):
    """Why a message was refused. `str(Refusal.X)` and f-strings give the stored value."""

    # envelope (turbofed/envelope.py), checked before anything is parsed
    BAD_ENVELOPE = "bad_envelope"
    TOO_LARGE = "too_large"
    BAD_MAGIC = "bad_magic"
    UNKNOWN_VERSION = "unknown_version"
    TRUNCATED = "truncated"
    BAD_HEADER = "bad_header"
    SIZE_MISMATCH = "size_mismatch"
    HASH_MISMATCH = "hash_mismatch"
    BAD_JSON = "bad_json"  # a site's JSON message is not a UTF-8 JSON object
    # ONNX weights (turbofed/codec.py)
    BAD_MODEL = "bad_model"
    NOT_ONNX = "not_onnx"
    MISMATCH = "mismatch"
    NON_FINITE = "non_finite"
    FOREIGN_GRAPH = "foreign_graph"  # not the reference graph: external data, extra nodes or initializers, subgraphs, ...
    # protocol state (aggregator/rounds.py, the services)
    UNKNOWN_SITE = "unknown_site"
    WRONG_SENDER = "wrong_sender"
    BAD_KIND = "bad_kind"
    STALE_ROUND = "stale_round"
    DUPLICATE = "duplicate"
    NO_SAMPLES = "no_samples"
    BAD_TOPIC = "bad_topic"
    UNKNOWN_KIND = "unknown_kind"  # a topic kind no handler is registered for
    # regional aggregation (aggregator/regional.py)
    UNKNOWN_REGION = "unknown_region"  # a partial from a region the fleet config does not name
    BAD_PARTIAL = "bad_partial"  # a partial whose content does not hold together (sites, weights, sizes)
    WRONG_ROUTE = "wrong_route"  # a site of a region sent its update to the top aggregator directly
    # message content (turbofed/messages/)
    NOT_JSON = "not_json"  # plant traffic that is not a UTF-8 JSON object
    WRONG_FIELDS = "wrong_fields"
    NOT_A_NUMBER = "not_a_number"
    NOT_FINITE = "not_finite"
    OUT_OF_RANGE = "out_of_range"
    TOO_MANY_ROWS = "too_many_rows"
    BAD_ID = "bad_id"
    BAD_CYCLE = "bad_cycle"
    BAD_EVENT = "bad_event"
    BAD_STATS = "bad_stats"
    BAD_STATS_REQUEST = "bad_stats_request"
    BAD_ROUND = "bad_round"
    # signatures (turbofed/signing.py, turbofed/messages/signed.py)
    UNSIGNED = "unsigned"  # no signature where one is required
    BAD_SIGNATURE = "bad_signature"  # not the signer's valid signature of this message
    UNKNOWN_SIGNER = "unknown_signer"  # no trusted key for the signer (unknown or revoked site)
    WRONG_FLEET = "wrong_fleet"  # signed for another fleet
    UNANNOUNCED_VERSION = "unannounced_version"  # a global model no signed round announcement named
    STALE_EPOCH = "stale_epoch"  # a round announcement from before the latest signed fleet reset
    # the edge agent's own checks against what it knows
    UNKNOWN_ENGINE = "unknown_engine"
    CYCLE_BACKWARDS = "cycle_backwards"
    BAD_GLOBAL = "bad_global"
    IMPLAUSIBLE = "implausible"  # a sensor or setting value beyond the site's sensor_abs_max
    TOO_MANY_ENGINES = "too_many_engines"  # a new engine while max_engines are tracked (none idle)
    NON_FINITE_OUTPUT = "non_finite_output"  # features or a prediction came out NaN/inf: not published
    # statistics requests a site refuses to answer (they would reveal more than aggregates)
    STATS_UNAFFORDABLE = "stats_unaffordable"  # window over the site's max_stats_window
    STATS_WRONG_WINDOW = "stats_wrong_window"  # not the window of the current feature spec
    STATS_REPEATED = "stats_repeated"  # already answered for this spec (or this request id)
    STATS_TOO_FEW_ENGINES = "stats_too_few_engines"  # fewer than min_stats_engines labelled (or changed) engines
    STATS_TOO_FEW_SAMPLES = "stats_too_few_samples"  # fewer labelled rows than the request's min_samples
    # not a refusal of the input: a bug while handling it, counted next to the refusals
    INTERNAL_ERROR = "internal_error"
    # nor this: a message dropped because the process's inbox stayed full (turbofed.mqtt.BoundedInbox)
    INBOX_FULL = "inbox_full"
