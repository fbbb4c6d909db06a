"""The edge agent's state folder: its files, written atomically and read without trust.

docs/agent-state.md lists every file and its format. Writes go to a temporary file that
is fsynced and then renamed over the old one (`turbofed.files`), so a crash leaves the old
file or the new one, never half of one. Reads check everything (JSON types, keys, array
shapes, dtypes, finiteness) and raise `StateError`, one line naming the file and what is
wrong; the agent then stops at start-up and leaves the file where it is, so nothing
already stored is lost. Nothing is unpickled: .npz files are read with
allow_pickle=False, and the learners are saved as plain arrays plus a JSON header
(`save_learners`), which a scikit-learn upgrade on the device cannot make unreadable.
"""

from __future__ import annotations

import json
import logging
import math
import os
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from turbofed.config import ModelSettings
from turbofed.errors import ConfigError, TurbofedError
from turbofed.files import atomic_file
from turbofed.layout import N_SENSORS
from turbofed.spec import FeatureSpec

if TYPE_CHECKING:
    from turbofed.edge.inference import OnnxPredictor
    from turbofed.edge.learner import RulModel

log = logging.getLogger("turbofed.edge")

STATE_JSON = "state.json"
BUFFER_NPZ = "buffer.npz"
HOLDOUT_NPZ = "holdout.npz"  # failed engines held out of training: validation curve and interval calibration
ENGINES_NPZ = "engines.npz"
GLOBAL_ONNX = "global.onnx"
LEARNERS_NPZ = "learners.npz"
LEGACY_LEARNERS = "learners.pkl"  # before learners.npz: never read, renamed aside

STATE_VERSION = 1  # state.json's "format"; files without it were written before the tag, same layout
LEARNERS_FORMAT = "turbofed-learners"
LEARNERS_VERSION = 1
ROLES = ("federated", "local")


class StateError(TurbofedError):
    """A file in an edge agent's state folder cannot be used; the message names it."""


# --- writing ------------------------------------------------------------------------


@dataclass(frozen=True)
class Stacked:
    """Arrays saved as one, stacked along the first axis, but never joined in memory: saving
    every engine's history every few seconds must not double what the histories cost
    (the agent's peak memory, issue #17). `dtype` and `row` (the shape after the first axis)
    say what an empty stack is."""

    parts: Sequence[np.ndarray]
    dtype: str
    row: tuple[int, ...] = ()

    def write(self, out: BinaryIO) -> None:
        """One .npy stream: the header of the stacked array, then each part's rows."""
        rows = sum(len(p) for p in self.parts)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(self.dtype)), "fortran_order": False, "shape": (rows, *self.row)}
        np.lib.format.write_array_header_1_0(out, header)
        for part in self.parts:
            out.write(np.ascontiguousarray(part, dtype=self.dtype).reshape(len(part), *self.row).tobytes())


def write_npz_atomic(path: Path, arrays: Mapping[str, np.ndarray | Stacked]) -> None:
    """An uncompressed .npz of plain (non-object) arrays, written atomically; what
    `np.savez` writes, with `Stacked` values streamed part by part."""
    with atomic_file(path) as handle, zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, value in arrays.items():
            with archive.open(name + ".npy", "w", force_zip64=True) as out:
                if isinstance(value, Stacked):
                    value.write(out)
                else:
                    np.lib.format.write_array(out, np.asanyarray(value), allow_pickle=False)


# --- checked reading ----------------------------------------------------------------


def one_line(exc: BaseException | str) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_number(value: Any) -> bool:
    """A finite JSON number (not a bool, not an int too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StateError(f"{path}: cannot read it ({one_line(exc.strerror or exc)})") from None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def read_json_object(path: Path) -> dict[str, Any]:
    """A file holding one JSON object (NaN and Infinity refused)."""
    data = read_bytes(path)
    try:
        value = json.loads(data, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise StateError(f"{path}: not valid JSON ({one_line(exc)})") from None
    if not isinstance(value, dict):
        raise StateError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz file, loaded now, with allow_pickle=False (object arrays refused)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as exc:
        raise StateError(f"{path}: cannot read it ({one_line(exc.strerror or exc)})") from None
    if head != b"PK\x03\x04":
        raise StateError(f"{path}: not an .npz file ({'it is empty' if not head else 'it is not a zip archive'})")
    arrays: dict[str, np.ndarray] = {}
    key = None
    try:
        with np.load(path, allow_pickle=False) as npz:
            for key in npz.files:
                arrays[key] = npz[key]
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        where = f"array {key!r}: " if key is not None else ""
        raise StateError(f"{path}: not a readable .npz file ({where}{one_line(exc)})") from None
    return arrays


_KINDS: dict[str, tuple[tuple[type, ...], str]] = {
    "int": ((int,), "a whole number"),
    "number": ((int, float), "a finite number"),
    "str": ((str,), "a string"),
    "bool": ((bool,), "true or false"),
    "list": ((list,), "a list"),
    "object": ((dict,), "a JSON object"),
}


def take(d: dict[str, Any], key: str, kind: str, where: str, minimum: float | None = None) -> Any:
    """`d[key]`, checked to be of `kind` (a `_KINDS` name; a trailing '?' also allows null)."""
    nullable, kind = kind.endswith("?"), kind.rstrip("?")
    if key not in d:
        raise StateError(f"{where}: missing key {key!r}")
    value = d[key]
    if value is None and nullable:
        return None
    types, text = _KINDS[kind]
    bad = not isinstance(value, types) or (isinstance(value, bool) and kind != "bool")
    if not bad and kind == "number":
        bad = not is_number(value)
    if bad:
        raise StateError(f"{where}: key {key!r} must be {text}{' or null' if nullable else ''}, got {short(value)}")
    if minimum is not None and value < minimum:
        raise StateError(f"{where}: key {key!r} must be at least {minimum}, got {short(value)}")
    return value


_DTYPE_KINDS = {"i": "integers", "u": "unsigned integers", "f": "floats", "U": "strings", "b": "booleans"}


def take_array(arrays: dict[str, np.ndarray], key: str, where: str, kinds: str, shape: tuple[int | None, ...]) -> np.ndarray:
    """`arrays[key]`, checked: dtype kind one of `kinds` ("iu", "f", "U"), `shape` (None: any
    length), and finite if it holds floats."""
    if key not in arrays:
        raise StateError(f"{where}: missing array {key!r}")
    a = arrays[key]
    if a.dtype.kind not in kinds:
        expected = " or ".join(_DTYPE_KINDS[k] for k in kinds)
        raise StateError(f"{where}: array {key!r} holds {a.dtype}, expected {expected}")
    if a.ndim != len(shape) or any(want is not None and want != got for want, got in zip(shape, a.shape)):
        expected = "(" + ", ".join("n" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
        raise StateError(f"{where}: array {key!r} has shape {a.shape}, expected {expected}")
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        raise StateError(f"{where}: array {key!r} holds non-finite values")
    return a


def settings_from_dict(d: dict[str, Any], where: str) -> ModelSettings:
    """Saved model settings: every field present, each of its declared JSON type."""
    kinds = {"int": "int", "float": "number", "str": "str", "bool": "bool", "tuple[int, ...]": "list"}
    for f in fields(ModelSettings):
        take(d, f.name, kinds[str(f.type)], where)
    hidden = d["hidden"]
    if not all(isinstance(h, int) and not isinstance(h, bool) for h in hidden):
        raise StateError(f"{where}: key 'hidden' must be a list of whole numbers, got {short(hidden)}")
    try:
        return ModelSettings.from_dict(d, where)
    except ConfigError as exc:
        raise StateError(one_line(exc)) from None


def spec_from_dict(d: dict[str, Any], where: str) -> FeatureSpec:
    """A saved feature spec: sensors among the 21, a positive window, finite offsets, positive scales."""
    sensors, offset, scale = take(d, "sensors", "list", where), take(d, "offset", "list", where), take(d, "scale", "list", where)
    take(d, "window", "int", where, minimum=1)
    valid = all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < N_SENSORS for s in sensors)
    if not sensors or not valid or len(set(sensors)) != len(sensors):
        raise StateError(f"{where}: key 'sensors' must be distinct sensor indices 0..{N_SENSORS - 1}, got {short(sensors)}")
    for key, values in (("offset", offset), ("scale", scale)):
        if not all(is_number(v) for v in values):
            raise StateError(f"{where}: key {key!r} must hold finite numbers")
    if not all(v > 0 for v in scale):
        raise StateError(f"{where}: key 'scale' must hold positive numbers")
    try:
        return FeatureSpec.from_dict(d)
    except ValueError as exc:
        raise StateError(f"{where}: {one_line(exc)}") from None


# --- state.json -----------------------------------------------------------------------


@dataclass
class AgentState:
    """state.json: the agent's small state (labelled data and histories live in the .npz files)."""

    answered: list[str]
    global_version: int
    settings: ModelSettings | None
    fleet_spec: FeatureSpec | None
    scored: dict[str, list[float | None]]
    counters: dict[str, int]
    epoch: int = 0  # the fleet epoch of the latest signed round announcement (absent in older files: 0)
    # The last statistics answer: {"request_id", "spec" (the spec it answered for), "engines": [ids]} (edge/agent.py on_stats_request)
    stats_answer: dict[str, Any] | None = None

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format": STATE_VERSION,
                "answered": self.answered,
                "global_version": self.global_version,
                "settings": self.settings.to_dict() if self.settings else None,
                "fleet_spec": self.fleet_spec.to_dict() if self.fleet_spec else None,
                "scored": self.scored,
                "counters": self.counters,
                "epoch": self.epoch,
                "stats_answer": self.stats_answer,
            }
        ).encode()

    @classmethod
    def read(cls, path: Path) -> "AgentState":
        raw = read_json_object(path)
        where = str(path)
        version = raw.get("format", STATE_VERSION)
        if version != STATE_VERSION:
            raise StateError(f"{path}: format {short(version)} is not one this turbofed reads ({STATE_VERSION})")
        answered = take(raw, "answered", "list", where)
        if not all(isinstance(a, str) for a in answered):
            raise StateError(f"{path}: key 'answered' must be a list of strings, got {short(answered)}")
        settings = take(raw, "settings", "object?", where)
        spec = take(raw, "fleet_spec", "object?", where)
        scored = take(raw, "scored", "object", where)
        for engine, row in scored.items():
            ok = isinstance(row, list) and len(row) == 3 and all(
                (v is None and i > 0) or is_number(v) for i, v in enumerate(row)
            )
            if not ok:
                raise StateError(f"{path}: scored[{engine!r}] must be [true RUL, local or null, federated or null], got {short(row)}")
        counters = take(raw, "counters", "object", where)
        for name in counters:
            take(counters, name, "int", f"{path}: counters", minimum=0)
        stats_answer = take(raw, "stats_answer", "object?", where) if "stats_answer" in raw else None  # older files: absent
        if stats_answer is not None:
            for key in ("request_id", "spec"):
                take(stats_answer, key, "str", f"{path}: stats_answer")
            engines = take(stats_answer, "engines", "list", f"{path}: stats_answer")
            if not all(isinstance(e, str) for e in engines):
                raise StateError(f"{path}: stats_answer key 'engines' must be a list of engine ids, got {short(engines)}")
            if "survivors" in stats_answer:  # a secure sum's: the site ids it was unmasked with (edge/secure.py)
                survivors = take(stats_answer, "survivors", "list", f"{path}: stats_answer")
                if not all(isinstance(v, int) and not isinstance(v, bool) for v in survivors):
                    raise StateError(f"{path}: stats_answer key 'survivors' must be a list of site ids, got {short(survivors)}")
            phases = stats_answer.get("phases", ["regimes", "features"])  # older files: one answer, both phases spent
            if not isinstance(phases, list) or not all(p in ("regimes", "features") for p in phases):
                raise StateError(f"{path}: stats_answer key 'phases' must list 'regimes' and/or 'features', got {short(phases)}")
        return cls(
            answered=answered,
            global_version=take(raw, "global_version", "int", where, minimum=-1),
            settings=settings_from_dict(settings, f"{path}: settings") if settings is not None else None,
            fleet_spec=spec_from_dict(spec, f"{path}: fleet_spec") if spec is not None else None,
            scored=scored,
            counters=counters,
            epoch=take(raw, "epoch", "int", where, minimum=0) if "epoch" in raw else 0,
            stats_answer=stats_answer,
        )


# --- global.onnx ----------------------------------------------------------------------


def load_global(path: Path, cap: float | None = None) -> tuple[bytes, "OnnxPredictor"]:
    """The saved global model and its onnxruntime session (output clipped to [0, cap])."""
    from turbofed.edge.inference import OnnxPredictor

    model = read_bytes(path)
    try:
        return model, OnnxPredictor(model, cap=cap)
    except Exception as exc:  # onnxruntime's errors have no common base worth naming
        raise StateError(f"{path}: onnxruntime cannot load it ({one_line(exc)[:200]})") from None


# --- learners.npz ---------------------------------------------------------------------


def save_learners(path: Path, learners: dict[str, "RulModel | None"]) -> None:
    """Both learners in one .npz: a JSON header (uint8 array 'header') and per-role arrays
    named '<role>.<name>' (docs/agent-state.md)."""
    header: dict[str, Any] = {"format": LEARNERS_FORMAT, "version": LEARNERS_VERSION, "learners": {}}
    arrays: dict[str, np.ndarray] = {}
    for role in ROLES:
        model = learners.get(role)
        if model is None:
            header["learners"][role] = None
            continue
        own_header, own_arrays = model.state()
        header["learners"][role] = own_header
        arrays.update({f"{role}.{name}": a for name, a in own_arrays.items()})
    arrays["header"] = np.frombuffer(json.dumps(header, allow_nan=False, sort_keys=True).encode(), dtype=np.uint8)
    write_npz_atomic(path, arrays)


def load_learners(path: Path) -> dict[str, "RulModel | None"]:
    """What `save_learners` wrote, each learner ready to continue training exactly."""
    from turbofed.edge.learner import RulModel

    arrays = read_npz(path)
    raw = take_array(arrays, "header", str(path), "u", (None,))
    try:
        header = json.loads(raw.astype(np.uint8).tobytes(), parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise StateError(f"{path}: header is not valid JSON ({one_line(exc)})") from None
    if not isinstance(header, dict) or header.get("format") != LEARNERS_FORMAT:
        raise StateError(f"{path}: header does not say format {LEARNERS_FORMAT!r}")
    version = take(header, "version", "int", f"{path}: header")
    if version != LEARNERS_VERSION:
        raise StateError(f"{path}: learners format version {version}; this turbofed reads version {LEARNERS_VERSION}")
    saved = take(header, "learners", "object", f"{path}: header")
    out: dict[str, RulModel | None] = {}
    for role in ROLES:
        own = take(saved, role, "object?", f"{path}: header learners")
        prefix = role + "."
        own_arrays = {k[len(prefix) :]: a for k, a in arrays.items() if k.startswith(prefix)}
        out[role] = None if own is None else RulModel.from_state(own, own_arrays, f"{path}: {role} learner")
    return out


def retire_legacy_learners(state_dir: Path) -> None:
    """learners.pkl (written before learners.npz) is never unpickled: it is renamed to
    learners.pkl.ignored, once, with a warning; the learners restart from the global model
    and the training buffer at the next round."""
    old = state_dir / LEGACY_LEARNERS
    if not old.exists():
        return
    aside = old.with_name(old.name + ".ignored")
    try:
        os.replace(old, aside)
    except OSError as exc:
        log.warning("%s: ignored (pickled learners are no longer read) and could not be renamed: %s", old, one_line(exc))
        return
    log.warning(
        "%s: learners pickled by an older turbofed are not loaded (pickle is no longer read); renamed to %s. "
        "The learners restart from the global model and the training buffer at the next round.",
        old,
        aside.name,
    )
