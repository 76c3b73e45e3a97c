"""Node settings: ``node.toml`` in the node directory, overridden by ``FEDSM_*`` variables.

The file is flat (one key per setting). Environment variables win over the file so that a
deployment can inject secrets (broker password, repository token) without writing them to
disk. Approval can only be switched off with two keys (``approval_required = false`` *and*
``allow_unapproved = true``): running unapproved code on hospital data must be a deliberate
act, never one mistyped line.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsm.errors import ConfigurationError
from fedsm.node.errors import NodeNotInitialised

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "SETTINGS_FILE",
    "ENV_PREFIX",
    "NodeSettings",
    "load_settings",
    "write_settings",
    "init_node_dir",
]

SETTINGS_FILE = "node.toml"
ENV_PREFIX = "FEDSM_"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_SECRETS = frozenset({"broker_password", "repository_token"})
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True)
class NodeSettings:
    """Everything a node needs to know about itself, validated on construction.

    Parameters
    ----------
    node_id
        The node's id on the bus (1-128 of ``[A-Za-z0-9_.:-]``).
    approval_required
        Train only plans whose sha256 an operator approved (default). Turning it off also
        needs ``allow_unapproved``.
    allow_unapproved
        Second key to run plans nobody approved; ignored while approval is required.
    training_time_limit_s
        Wall-clock limit of one training in a worker process; the worker is killed past it.
    broker_url, broker_username, broker_password
        MQTT broker (``mqtt://host:port``) and credentials, for ``fedsm node start``.
    repository_url, repository_token
        File repository (HTTP URL or local directory) and its bearer token.
    """

    node_id: str
    approval_required: bool = True
    allow_unapproved: bool = False
    training_time_limit_s: float = 3600.0
    broker_url: str | None = None
    broker_username: str | None = None
    broker_password: str | None = None
    repository_url: str | None = None
    repository_token: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str) or not _ID_RE.match(self.node_id):
            raise ConfigurationError(
                f"node_id {self.node_id!r} is not a valid id: use 1-128 characters of "
                "letters, digits and _.:- starting with a letter or digit"
            )
        for name in ("approval_required", "allow_unapproved"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigurationError(f"{name} must be true or false")
        limit = self.training_time_limit_s
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0:
            raise ConfigurationError(
                f"training_time_limit_s must be a number of seconds > 0, got {limit!r}"
            )
        object.__setattr__(self, "training_time_limit_s", float(limit))
        if not self.approval_required and not self.allow_unapproved:
            raise ConfigurationError(
                "approval_required = false also needs allow_unapproved = true: running "
                "plans nobody approved on this node's data must be switched on deliberately"
            )

    @property
    def enforce_approval(self) -> bool:
        """Whether a plan must be approved before it may run on this node."""
        return self.approval_required or not self.allow_unapproved

    def to_dict(self, *, show_secrets: bool = False) -> dict[str, Any]:
        """The settings as a plain map; secrets are masked unless ``show_secrets``."""
        out = dataclasses.asdict(self)
        if not show_secrets:
            for key in _SECRETS:
                if out[key] is not None:
                    out[key] = "***"
        return out


_FIELDS = {f.name: f for f in dataclasses.fields(NodeSettings)}


def _coerce(name: str, value: Any, source: str) -> Any:
    """Convert a TOML value or an environment string to the field's type."""
    kind = _FIELDS[name].type
    if name in ("approval_required", "allow_unapproved"):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigurationError(f"{name} in {source} must be true or false, got {value!r}")
    if name == "training_time_limit_s":
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        raise ConfigurationError(f"{name} in {source} must be a number, got {value!r}")
    if not isinstance(value, str):  # pragma: no cover - kind is str for the rest
        raise ConfigurationError(f"{name} in {source} must be a string ({kind}), got {value!r}")
    return value


def load_settings(node_dir: str | Path, env: Mapping[str, str] | None = None) -> NodeSettings:
    """Read ``node_dir/node.toml`` and apply ``FEDSM_<KEY>`` overrides from ``env``.

    ``env`` defaults to ``os.environ``. Raises :class:`NodeNotInitialised` when the file is
    missing and :class:`ConfigurationError` for unknown keys or bad values.
    """
    path = Path(node_dir) / SETTINGS_FILE
    if not path.is_file():
        raise NodeNotInitialised(
            f"{path} does not exist: run `fedsm node init --dir {node_dir}` first"
        )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ConfigurationError(
            f"{path}: unknown setting(s) {unknown}; valid keys are {sorted(_FIELDS)}"
        )
    values = {k: _coerce(k, v, str(path)) for k, v in data.items()}
    env = os.environ if env is None else env
    for name in _FIELDS:
        var = ENV_PREFIX + name.upper()
        if var in env:
            values[name] = _coerce(name, env[var], f"environment variable {var}")
    if "node_id" not in values:
        raise ConfigurationError(f"{path} has no node_id")
    return NodeSettings(**values)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def write_settings(node_dir: str | Path, settings: NodeSettings) -> Path:
    """Write ``settings`` to ``node_dir/node.toml`` atomically (unset values are left out)."""
    path = Path(node_dir) / SETTINGS_FILE
    lines = ["# fedsm node settings; FEDSM_<KEY> environment variables override them."]
    for name, value in settings.to_dict(show_secrets=True).items():
        if value is not None:
            lines.append(f"{name} = {_toml_value(value)}")
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def init_node_dir(
    node_dir: str | Path, node_id: str | None = None, **settings: Any
) -> NodeSettings:
    """Create a node directory with its ``node.toml`` and return the settings written.

    Refuses (``ConfigurationError``) a directory that already holds a ``node.toml``, so an
    existing node's id and registry are never overwritten by mistake. Without ``node_id`` a
    random ``node-<hex>`` id is chosen.
    """
    node_dir = Path(node_dir)
    if (node_dir / SETTINGS_FILE).exists():
        raise ConfigurationError(f"{node_dir} already holds a node ({SETTINGS_FILE} exists)")
    if node_id is None:
        node_id = "node-" + os.urandom(6).hex()
    result = NodeSettings(node_id=node_id, **settings)
    node_dir.mkdir(parents=True, exist_ok=True)
    write_settings(node_dir, result)
    return result
