"""Board profiles (``profiles/*.yaml``): facts about a board and the budgets of a run.

Validated against ``profiles/schema.json`` by the small checker below (the subset of JSON
Schema that file uses), whose messages name the field and the board profile to fix.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ProfileError

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"
SCHEMA_PATH = PROFILES_DIR / "schema.json"

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _type_ok(value, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def schema_problems(value, schema: dict, where: str = "") -> list[str]:
    """Every way ``value`` breaks ``schema`` (type, required, properties, enum, bounds, pattern)."""
    here = where or "(top level)"
    types = schema.get("type")
    if types is not None:
        names = types if isinstance(types, list) else [types]
        if not any(_type_ok(value, n) for n in names):
            return [f"{here}: expected {' or '.join(names)}, got {type(value).__name__} {value!r}"]
    problems = []
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{here}: {value!r} is not one of {schema['enum']}")
    if _type_ok(value, "number"):
        if not math.isfinite(value):
            return [f"{here}: {value} is not a finite number"]
        if "minimum" in schema and value < schema["minimum"]:
            problems.append(f"{here}: {value} is below the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            problems.append(f"{here}: {value} is above the maximum {schema['maximum']}")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            problems.append(f"{here}: {value} must be greater than {schema['exclusiveMinimum']}")
    if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
        problems.append(f"{here}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            problems += schema_problems(item, schema["items"], f"{where}[{i}]")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                problems.append(f"{here}: missing required field '{key}'")
        known = schema.get("properties", {})
        for key, item in value.items():
            path = f"{where}.{key}" if where else key
            if key in known:
                problems += schema_problems(item, known[key], path)
            elif schema.get("additionalProperties") is False:
                problems.append(f"{path}: unknown field (known: {', '.join(sorted(known))})")
    return problems


@dataclass(frozen=True)
class Profile:
    """A validated profile with defaults filled in; ``raw`` is the YAML as written."""

    name: str
    path: str
    cores: int
    ram_mb: int
    idle_w: float
    busy_w: float
    sensor: str
    memory_mb: float
    energy_j: float | None
    threads: int
    max_batch_size: int
    headroom: float
    cache_location: str
    cache_dir: str | None
    cache_max_mb: float
    prefix_backend: str
    checkpoint_every_steps: int
    suffix_backend: str = "auto"
    cache_dtype: str = "float16"        # float32 | float16 | int8 (device_runner/cache.py)
    prefix_precision: str = "auto"      # auto | float32 | int8 (backends/frozen_segment.py)
    trusted_keys_dir: str | None = None  # trust.keys_dir, relative to the profile's folder
    raw: dict = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "raw"}


def resolve_path(spec: str) -> Path:
    """A path, or a bare board name looked up in ``profiles/``."""
    path = Path(spec)
    if path.is_file():
        return path
    named = PROFILES_DIR / f"{spec}.yaml"
    if named.is_file() and os.sep not in spec:
        return named
    known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
    raise ProfileError(f"profile {spec} not found; give a YAML path or one of: {known}")


def load_profile(spec: str, overrides: dict | None = None) -> Profile:
    """Read, validate and complete a profile; ``overrides`` patch ``budgets``/``cache`` keys."""
    path = resolve_path(spec)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ProfileError(f"profile {path} is not a text file (not UTF-8); give a YAML profile "
                           "like those in profiles/ (see profiles/README.md)") from None
    except yaml.YAMLError as exc:
        raise ProfileError(f"profile {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    except OSError as exc:
        raise ProfileError(f"profile {path} cannot be read ({exc.strerror}); check the path "
                           "and its permissions") from exc
    if not isinstance(raw, dict):
        raise ProfileError(f"profile {path} must be a YAML mapping (see profiles/README.md)")
    for section_key, value in (overrides or {}).items():
        if "." in section_key:
            section, key = section_key.split(".")
            raw.setdefault(section, {})[key] = value
        else:
            raw[section_key] = value
    schema = json.loads(SCHEMA_PATH.read_text())
    problems = schema_problems(raw, schema)
    if problems:
        raise ProfileError(f"profile {path} does not match profiles/schema.json: "
                           f"{'; '.join(problems[:4])}")
    board, power, budgets, cache = raw["board"], raw["power"], raw["budgets"], raw.get("cache", {})
    if power["busy_w"] < power["idle_w"]:
        raise ProfileError(f"profile {path}: power.busy_w ({power['busy_w']}) is below idle_w "
                           f"({power['idle_w']}); busy power includes idle power")
    if budgets["memory_mb"] > board["ram_mb"]:
        raise ProfileError(f"profile {path}: budgets.memory_mb ({budgets['memory_mb']}) exceeds "
                           f"the board's RAM ({board['ram_mb']} MB); lower it")
    return Profile(
        name=raw["name"], path=str(path), cores=board["cores"], ram_mb=board["ram_mb"],
        idle_w=float(power["idle_w"]), busy_w=float(power["busy_w"]),
        sensor=power.get("sensor", "auto"), memory_mb=float(budgets["memory_mb"]),
        energy_j=None if budgets.get("energy_j") is None else float(budgets["energy_j"]),
        threads=int(budgets.get("threads", board["cores"])),
        max_batch_size=int(budgets.get("max_batch_size", 128)),
        headroom=float(budgets.get("headroom", 0.1)),
        cache_location=cache.get("location", "memory"), cache_dir=cache.get("dir"),
        cache_max_mb=float(cache.get("max_mb", 256)), cache_dtype=cache.get("dtype", "float16"),
        prefix_backend=raw.get("prefix_backend", "auto"),
        prefix_precision=raw.get("prefix_precision", "auto"),
        checkpoint_every_steps=int(raw.get("checkpoint_every_steps", 200)),
        suffix_backend=raw.get("suffix_backend", "auto"),
        trusted_keys_dir=_keys_dir(path, raw.get("trust", {}).get("keys_dir")), raw=raw)


def _keys_dir(profile_path: Path, keys_dir: str | None) -> str | None:
    """``trust.keys_dir`` as an absolute path; a relative one is relative to the profile file."""
    if keys_dir is None:
        return None
    return str((Path(profile_path).resolve().parent / Path(keys_dir).expanduser()).resolve())
