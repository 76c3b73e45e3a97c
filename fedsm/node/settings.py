"""Node settings: ``node.toml`` in the node directory, overridden by ``FEDSM_*`` variables.

The file is flat (one key per setting). Environment variables win over the file so that a
deployment can inject secrets (broker password, repository token) without writing them to
disk. A secret can also come from a file of its own (``broker_password_file``,
``repository_token_file``, or ``FEDSM_BROKER_PASSWORD_FILE`` / ``FEDSM_REPOSITORY_TOKEN_FILE``:
a mounted secret, mode 0600), so it never has to appear on a command line. Approval can only
be switched off with two keys (``approval_required = false`` *and* ``allow_unapproved =
true``): running unapproved code on hospital data must be a deliberate act, never one
mistyped line.

Limits that keep a node's own files small and its operator's commands responsive are settings
too: ``max_plan_bytes`` (the largest plan source the registry stores, 1 MiB),
``max_pending_plans`` (how many plans nobody decided on yet it keeps, 200) and
``registry_busy_timeout_s`` (how long a write waits for another process's lock on the
registry, 5 s). A ``node.toml`` without them gets these defaults.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from fedsm.errors import ConfigurationError
from fedsm.node.errors import NodeError, NodeNotInitialised

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "SETTINGS_FILE",
    "ENV_PREFIX",
    "SECRET_FILE_KEYS",
    "NodeSettings",
    "load_settings",
    "read_secret_file",
    "settings_toml",
    "write_settings",
    "init_node_dir",
    "NodeDirIOError",
    "DEFAULT_MAX_PLAN_BYTES",
    "DEFAULT_MAX_PENDING_PLANS",
    "DEFAULT_BUSY_TIMEOUT_S",
]

SETTINGS_FILE = "node.toml"
ENV_PREFIX = "FEDSM_"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_SECRETS = frozenset({"broker_password", "repository_token"})
#: Each secret and the setting naming a file to read it from.
SECRET_FILE_KEYS: dict[str, str] = {
    "broker_password": "broker_password_file",
    "repository_token": "repository_token_file",
}
_PATHS = frozenset(SECRET_FILE_KEYS.values())
#: The largest training-plan source the registry stores (a status request's plan, or one the
#: operator approves from its file): 1 MiB, far above any real plan.
DEFAULT_MAX_PLAN_BYTES = 1 << 20
#: How many plans nobody decided on yet the registry keeps; past it new plans are not recorded.
DEFAULT_MAX_PENDING_PLANS = 200
#: How long a registry write waits for another process's lock before it gives up.
DEFAULT_BUSY_TIMEOUT_S = 5.0
_INTS = ("max_plan_bytes", "max_pending_plans")
_SECONDS = ("training_time_limit_s", "broker_give_up_s", "registry_busy_timeout_s")
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
    broker_password_file
        The file the broker password was read from (by :func:`load_settings`), if any.
    broker_give_up_s
        How long ``fedsm node start`` keeps reconnecting to a lost broker before it exits
        non-zero (so a supervisor notices and restarts it); ``inf`` never gives up.
    repository_url, repository_token
        File repository (HTTP URL or local directory) and its bearer token.
    repository_token_file
        The file the repository token was read from, if any.
    max_plan_bytes
        The largest training-plan source (bytes) the node's registry stores; a larger plan
        is refused (:class:`~fedsm.node.registry.PlanTooLarge`) and nothing is stored.
    max_pending_plans
        How many plans awaiting the operator's decision the registry keeps; past it a new
        plan is not recorded (it stays ``unknown``) until the operator decides on some.
    registry_busy_timeout_s
        How long a write to the registry waits for a lock another process holds (an
        operator's command, a node's write) before it fails with
        :class:`~fedsm.node.errors.RegistryBusy`; finite.
    """

    node_id: str
    approval_required: bool = True
    allow_unapproved: bool = False
    training_time_limit_s: float = 3600.0
    broker_url: str | None = None
    broker_username: str | None = None
    broker_password: str | None = None
    broker_password_file: str | None = None
    broker_give_up_s: float = 300.0
    repository_url: str | None = None
    repository_token: str | None = None
    repository_token_file: str | None = None
    max_plan_bytes: int = DEFAULT_MAX_PLAN_BYTES
    max_pending_plans: int = DEFAULT_MAX_PENDING_PLANS
    registry_busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str) or not _ID_RE.match(self.node_id):
            raise ConfigurationError(
                f"node_id {self.node_id!r} is not a valid id: use 1-128 characters of "
                "letters, digits and _.:- starting with a letter or digit"
            )
        for name in ("approval_required", "allow_unapproved"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigurationError(f"{name} must be true or false")
        for name in _SECONDS:
            limit = getattr(self, name)
            if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0:
                raise ConfigurationError(f"{name} must be a number of seconds > 0, got {limit!r}")
            object.__setattr__(self, name, float(limit))
        if not math.isfinite(self.registry_busy_timeout_s):
            raise ConfigurationError("registry_busy_timeout_s must be a finite number of seconds")
        for name in _INTS:
            count = getattr(self, name)
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ConfigurationError(f"{name} must be a whole number >= 1, got {count!r}")
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
            if out["broker_url"] is not None:
                out["broker_url"] = _mask_url_password(out["broker_url"])
        return out


class NodeDirIOError(NodeError):
    """A file of the node directory (settings, registry, key, lock) could not be read or
    written: no space left, a read-only file system, no permission. A fault of the node's
    machine, which its operator fixes; the message names the file and the reason."""

    @classmethod
    def of(cls, exc: OSError, what: str) -> NodeDirIOError:
        """``what`` (e.g. "could not write PATH") and ``exc``'s reason, as one line."""
        reason = exc.strerror or str(exc) or type(exc).__name__
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) not in what else ""
        return cls(f"{what}{where}: {reason}")


def _mask_url_password(url: str) -> str:
    """``url`` with the password of its ``user:password@`` part, if any, as ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


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
    if name in _INTS:
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                pass
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigurationError(f"{name} in {source} must be a whole number, got {value!r}")
    if name in _SECONDS:
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


def read_secret_file(path: str | Path, what: str) -> str:
    """The secret in the file at ``path`` (one trailing newline dropped); ``what`` names it
    in errors. Raises :class:`ConfigurationError` for a missing, unreadable or empty file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigurationError(f"cannot read {what} from {path}: {reason}") from None
    secret = text[:-1] if text.endswith("\n") else text
    secret = secret[:-1] if secret.endswith("\r") else secret
    if not secret:
        raise ConfigurationError(f"{what} file {path} is empty")
    return secret


def load_settings(node_dir: str | Path, env: Mapping[str, str] | None = None) -> NodeSettings:
    """Read ``node_dir/node.toml`` and apply ``FEDSM_<KEY>`` overrides from ``env``.

    ``env`` defaults to ``os.environ``. A secret given in the environment (as itself or as
    ``FEDSM_<KEY>_FILE``) replaces the file's (itself or its ``_file``); a ``*_file`` setting is
    read here (relative paths in ``node.toml`` are relative to the node directory). Raises
    :class:`NodeNotInitialised` when the file is missing and :class:`ConfigurationError` for
    unknown keys, bad values, a secret given both inline and as a file, or an unreadable
    secret file.
    """
    node_dir = Path(node_dir)
    path = node_dir / SETTINGS_FILE
    if not path.is_file():
        raise NodeNotInitialised(
            f"{path} does not exist: run `fedsm node init --dir {node_dir}` first"
        )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise NodeDirIOError.of(exc, f"could not read {path}") from None
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ConfigurationError(
            f"{path}: unknown setting(s) {unknown}; valid keys are {sorted(_FIELDS)}"
        )
    values = {k: _coerce(k, v, str(path)) for k, v in data.items()}
    for key in _PATHS & set(values):
        values[key] = str((node_dir / Path(values[key]).expanduser()).absolute())
    env = os.environ if env is None else env
    from_env: dict[str, Any] = {}
    for name in _FIELDS:
        var = ENV_PREFIX + name.upper()
        if var in env:
            from_env[name] = _coerce(name, env[var], f"environment variable {var}")
    for key in _PATHS & set(from_env):
        from_env[key] = str(Path(from_env[key]).expanduser().absolute())
    for secret, file_key in SECRET_FILE_KEYS.items():
        if secret in from_env or file_key in from_env:  # the environment's choice wins whole
            values.pop(secret, None)
            values.pop(file_key, None)
    values.update(from_env)
    for secret, file_key in SECRET_FILE_KEYS.items():
        if file_key in values:
            if secret in values:
                raise ConfigurationError(
                    f"{secret} is set both inline and as {file_key} (in {path} or "
                    f"{ENV_PREFIX}{secret.upper()} / {ENV_PREFIX}{file_key.upper()}): keep one"
                )
            values[secret] = read_secret_file(values[file_key], secret.replace("_", " "))
    if "node_id" not in values:
        raise ConfigurationError(f"{path} has no node_id")
    return NodeSettings(**values)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # inf is TOML's inf; nan is refused by NodeSettings
    # JSON's escapes are TOML's, but for DEL, which TOML wants escaped too.
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


def settings_toml(settings: NodeSettings, *, show_secrets: bool = False) -> str:
    """``settings`` as the lines of a ``node.toml`` (valid TOML; unset values are left out).

    A secret read from a file is given by its ``*_file`` key only, so the text read back
    gives the same settings. Other secrets are ``"***"`` unless ``show_secrets``.
    """
    lines = []
    unset = []
    for name, value in settings.to_dict(show_secrets=show_secrets).items():
        if name in SECRET_FILE_KEYS and getattr(settings, SECRET_FILE_KEYS[name]) is not None:
            continue
        if value is None:
            unset.append(name)
        else:
            lines.append(f"{name} = {_toml_value(value)}")
    if unset:
        lines.append(f"# not set: {', '.join(unset)}")
    return "\n".join(lines) + "\n"


def write_settings(node_dir: str | Path, settings: NodeSettings) -> Path:
    """Write ``settings`` to ``node_dir/node.toml`` atomically (unset values are left out)."""
    path = Path(node_dir) / SETTINGS_FILE
    header = "# fedsm node settings; FEDSM_<KEY> environment variables override them.\n"
    tmp = path.with_suffix(".toml.tmp")
    try:
        tmp.write_text(header + settings_toml(settings, show_secrets=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise NodeDirIOError.of(exc, f"could not write {path}") from None
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
    try:
        node_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NodeDirIOError.of(exc, f"could not create the node directory {node_dir}") from None
    write_settings(node_dir, result)
    return result
