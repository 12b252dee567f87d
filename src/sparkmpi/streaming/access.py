"""Credentials for a stream on a shared network: librdkafka settings for every Kafka client of
the pipeline (``--kafka-config FILE``) and ZeroMQ CURVE keys (``--zmq-keys DIR``).

A keys directory made by ``spark-mpi stream keys DIR``::

    server.key          the driver's public key (every producer needs it)
    server.key_secret   the driver's secret key (driver only)
    client.key          a producer's public key
    client.key_secret   that producer's secret key (that producer only)
    authorized/         public keys of the producers the driver accepts (NAME.key)
    producers/NAME/     keys made with --producer NAME, to hand to that producer
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

from sparkmpi.streaming.kafka_transport import StreamError

RESERVED_KAFKA_KEYS = frozenset(
    {"bootstrap.servers", "metadata.broker.list", "group.id", "enable.auto.commit"}
)
_CALLBACK_KEYS = frozenset({"logger", "on_delivery", "on_commit"})


def _check_kafka_key(key: str, where: str) -> None:
    if key in RESERVED_KAFKA_KEYS:
        raise StreamError(f"{where}: {key} is set by the pipeline itself; remove it")
    if key in _CALLBACK_KEYS or key.endswith("_cb"):
        raise StreamError(f"{where}: {key} is a Python callback, not a setting; remove it")


def read_kafka_config(path: str | os.PathLike) -> dict[str, str]:
    """The ``key=value`` lines of ``path`` (``#`` comments and blank lines skipped, spaces
    around key and value dropped, a later key wins). Raises :class:`StreamError`, one line
    naming ``path:line``, for an unreadable file, a line that is not ``key=value`` or a key the
    pipeline sets itself (:data:`RESERVED_KAFKA_KEYS`)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise StreamError(f"{path}: cannot read the Kafka settings ({reason})") from None
    config: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or any(c.isspace() for c in key):
            raise StreamError(f"{path}:{number}: expected key=value, got {line!r}")
        _check_kafka_key(key, f"{path}:{number}")
        config[key] = value
    return config


def _check_private(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise StreamError(
            f"{path}: secret key is open to group or others (mode {mode:04o}); chmod 600 it"
        )


def _load_key(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    import zmq.auth

    if secret:
        _check_private(path)
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise StreamError(f"{path}: not a ZeroMQ key file ({exc})") from None
    if secret and secret_key is None:
        raise StreamError(f"{path}: holds no secret key")
    return public, secret_key


@dataclass(frozen=True)
class CurveKeys:
    """ZeroMQ CURVE keys (Z85) from a keys directory; a side has only the secrets it needs."""

    directory: Path
    server_public: bytes
    server_secret: bytes | None = field(default=None, repr=False)
    client_public: bytes | None = None
    client_secret: bytes | None = field(default=None, repr=False)

    @property
    def authorized(self) -> Path:
        """The directory of producer public keys (``*.key``) the driver accepts."""
        return self.directory / "authorized"

    def server_pair(self) -> tuple[bytes, bytes]:
        """(public, secret) of the driver; :class:`StreamError` if this directory lacks the
        secret or authorizes no producer."""
        if self.server_secret is None:
            raise StreamError(f"{self.directory}: no server.key_secret (the driver's key)")
        if not self.authorized.is_dir() or not any(self.authorized.glob("*.key")):
            raise StreamError(f"{self.authorized}: no producer keys (NAME.key) are authorized")
        return self.server_public, self.server_secret

    def client_pair(self) -> tuple[bytes, bytes]:
        """(public, secret) of a producer; :class:`StreamError` if this directory lacks them."""
        if self.client_public is None or self.client_secret is None:
            raise StreamError(f"{self.directory}: no client.key and client.key_secret")
        return self.client_public, self.client_secret


def load_curve_keys(directory: str | os.PathLike) -> CurveKeys:
    """The keys in ``directory``: ``server.key`` is required, secrets and client keys are
    taken when present. Raises :class:`StreamError` (one line) for a missing directory or
    server key, an unreadable key file, or a secret key file open to group or others."""
    root = Path(directory)
    if not (root / "server.key").is_file():
        raise StreamError(f"{root}: no server.key (make keys with: spark-mpi stream keys DIR)")
    server_public, _ = _load_key(root / "server.key", secret=False)
    server_secret = client_public = client_secret = None
    if (root / "server.key_secret").exists():
        _, server_secret = _load_key(root / "server.key_secret", secret=True)
    if (root / "client.key_secret").exists():
        client_public, client_secret = _load_key(root / "client.key_secret", secret=True)
    return CurveKeys(root, server_public, server_secret, client_public, client_secret)


@dataclass(frozen=True)
class StreamAccess:
    """How the pipeline's clients authenticate and encrypt: ``kafka_config`` goes to every
    confluent_kafka client it makes (producer, driver consumers, admin, results producer,
    the ranks' readers); ``curve`` makes ZeroMQ streams CURVE-encrypted and authenticated."""

    kafka_config: dict[str, str] = field(default_factory=dict)
    curve: CurveKeys | None = None
    data_roots: tuple[str, ...] = ()  # where files named by received documents may be read

    def __post_init__(self) -> None:
        for key in self.kafka_config:
            _check_kafka_key(key, "Kafka settings")

    @classmethod
    def load(
        cls,
        kafka_config: str | os.PathLike | None = None,
        zmq_keys: str | os.PathLike | None = None,
        data_roots=(),
    ) -> StreamAccess:
        """From the ``--kafka-config FILE``, ``--zmq-keys DIR`` and ``--data-root DIR``
        options (any may be absent); :class:`StreamError`, one line, if a file, a key or a
        directory is not usable."""
        roots = []
        for root in data_roots or ():
            if not Path(root).is_dir():
                raise StreamError(f"--data-root {root}: not a directory")
            roots.append(os.path.realpath(root))
        return cls(
            read_kafka_config(kafka_config) if kafka_config is not None else {},
            load_curve_keys(zmq_keys) if zmq_keys is not None else None,
            tuple(roots),
        )


def _write_pair(directory: Path, name: str) -> tuple[Path, Path]:
    import zmq.auth

    public, secret = (Path(p) for p in zmq.auth.create_certificates(directory, name))
    secret.chmod(0o600)
    return public, secret


def make_keys(directory: str | os.PathLike, producer: str | None = None) -> list[Path]:
    """Without ``producer``: creates ``directory`` (mode 0700) with a server pair, a client
    pair and the client's public key in ``authorized/client.key``. With ``producer``: adds a
    pair for that producer to an existing directory, as ``producers/NAME/`` (its client pair
    and a copy of ``server.key``) and ``authorized/NAME.key``. Secret files are mode 0600.
    Returns the files made; refuses (:class:`StreamError`) to overwrite any key."""
    root = Path(directory)
    if producer is None:
        if (root / "server.key").exists() or (root / "server.key_secret").exists():
            raise StreamError(f"{root}: already holds keys; remove them or choose another DIR")
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        (root / "authorized").mkdir(mode=0o700, exist_ok=True)
        made = [*_write_pair(root, "server"), *_write_pair(root, "client")]
        shutil.copyfile(root / "client.key", root / "authorized" / "client.key")
        return [*made, root / "authorized" / "client.key"]
    if not producer or not all(c.isalnum() or c in "._-" for c in producer) or producer[0] == ".":
        raise StreamError(f"{producer!r}: a producer name is letters, digits, . _ and -")
    if not (root / "server.key").is_file():
        raise StreamError(f"{root}: no server.key; make the keys first: spark-mpi stream keys DIR")
    own, authorized = root / "producers" / producer, root / "authorized" / f"{producer}.key"
    if own.exists() or authorized.exists():
        raise StreamError(f"{own}: producer {producer} already has keys")
    own.mkdir(mode=0o700, parents=True)
    (root / "authorized").mkdir(mode=0o700, exist_ok=True)
    made = list(_write_pair(own, "client"))
    shutil.copyfile(root / "server.key", own / "server.key")
    shutil.copyfile(own / "client.key", authorized)
    return [*made, own / "server.key", authorized]
