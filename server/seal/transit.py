"""The Transit seal: the KEK is a named key in a Vault / OpenBao Transit engine.

The key never leaves the engine (create it with ``exportable=false`` and
``allow_plaintext_backup=false``); the daemon sends a data key to ``encrypt`` and gets back a
``vault:vN:...`` ciphertext, which it stores behind a format byte. The associated data goes
along as Transit's ``associated_data`` (AEAD key types only, e.g. aes256-gcm96), so a wrapped
key copied to another keyring slot does not decrypt.

KEK rotation maps onto the engine's key versions: ``rotate`` adds a version, ``retire_previous``
raises ``min_decryption_version`` to the newest and trims every older version away, which is
what makes crypto-shredding reach old backups. The token's policy therefore needs, for key K on
mount M: ``update`` on ``M/encrypt/K`` and ``M/decrypt/K`` (serving), plus ``read`` on
``M/keys/K`` and ``update`` on ``M/keys/K/rotate``, ``M/keys/K/config`` and ``M/keys/K/trim``
(key retirement through the admin service). It never needs ``export`` or ``backup``.

Construction reads and checks the token file but does not contact the engine: a daemon whose
engine is down starts sealed and retries. Every call re-reads the token file, so a token
rotated by an agent (or a file fixed by an operator) is picked up by the next retry; every call
also uses its own HTTP session, which makes the seal thread-safe and leaves no pooled socket
pointing at an engine that has restarted. Seal calls are rare (start, rotation), so the extra
handshake is cheap.

Errors: no answer (refused, timeout, 5xx, 429) is ``SealUnreachable``; anything the engine
refuses (401/403, unknown key, bad ciphertext or associated data) is ``SealError``. Messages
carry neither the token nor key material.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from faceseal.server.config import TransitSealConfig
from faceseal.server.seal.base import SealError, SealUnreachable

try:
    import hvac  # type: ignore[import-untyped]
    import hvac.exceptions  # type: ignore[import-untyped]
    import requests
except ImportError:  # an optional extra; the constructor says how to install it
    _INSTALLED = False
else:
    _INSTALLED = True

_FORMAT = b"\x01"
_CIPHERTEXT = re.compile(rb"[a-z]+:v[0-9]+:[A-Za-z0-9+/]+={0,2}")
_TOKEN = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces: anything else is a broken file
_MAX_TOKEN_FILE = 64 * 1024
_Method = Literal["GET", "POST"]
# HTTP statuses by hvac exception, for messages; 429 and 5xx mean "cannot answer now" (sealed,
# standby, overloaded, uninitialised, proxy errors): retrying later may work.
_STATUS: tuple[tuple[type[Exception], int], ...] = ()
if _INSTALLED:
    _STATUS = (
        (hvac.exceptions.InvalidRequest, 400),
        (hvac.exceptions.Unauthorized, 401),
        (hvac.exceptions.Forbidden, 403),
        (hvac.exceptions.InvalidPath, 404),
        (hvac.exceptions.RateLimitExceeded, 429),
        (hvac.exceptions.InternalServerError, 500),
        (hvac.exceptions.VaultNotInitialized, 501),
        (hvac.exceptions.BadGateway, 502),
        (hvac.exceptions.VaultDown, 503),
    )


class TransitSeal:
    """Key wrapping with a Transit key that never leaves the engine."""

    def __init__(
        self,
        address: str,
        key_name: str,
        token_file: Path,
        *,
        mount: str = "transit",
        ca_cert: Path | None = None,
        timeout_seconds: float = 5.0,
    ) -> None:
        if not _INSTALLED:
            raise SealError("the transit seal needs hvac; install it with: pip install 'faceseal[transit]'")
        address = address.rstrip("/")
        mount = mount.strip("/")
        if not re.fullmatch(r"https?://[^\s/]+", address):
            raise SealError(f"the Transit address {address!r} must be http(s)://HOST:PORT")
        if not key_name or not mount or not _TOKEN.fullmatch(key_name) or not _TOKEN.fullmatch(mount):
            raise SealError("the Transit key name and mount must be non-empty and free of spaces")
        if not timeout_seconds > 0:
            raise SealError("the Transit timeout must be positive")
        self._address = address
        self._key_name = key_name
        self._mount = mount
        self._mount_path = quote(mount)
        self._key = quote(key_name, safe="")
        self._token_file = token_file
        self._timeout = timeout_seconds
        self._verify: bool | str = True
        if ca_cert is not None:
            if not address.startswith("https://"):
                raise SealError(
                    f"a CA certificate ({ca_cert}) is set but the Transit address is not https://; "
                    "the token would travel in clear"
                )
            if not os.access(ca_cert, os.R_OK) or not ca_cert.is_file():
                raise SealError(f"cannot read the Transit CA certificate {ca_cert}")
            self._verify = str(ca_cert)
        self._read_token()  # a missing or loose token file is a configuration error, found now

    @classmethod
    def from_config(cls, cfg: TransitSealConfig) -> TransitSeal:
        return cls(
            cfg.address,
            cfg.key_name,
            cfg.token_file,
            mount=cfg.mount,
            ca_cert=cfg.ca_cert,
            timeout_seconds=cfg.timeout_seconds,
        )

    def describe(self) -> str:
        return f"transit:{self._address}/{self._mount}/keys/{self._key_name}"

    def __repr__(self) -> str:
        return f"TransitSeal({self.describe()})"

    # -- the Seal protocol ---------------------------------------------------------------------

    def wrap(self, key: bytes, aad: bytes) -> bytes:
        response = self._call(
            "encrypt",
            "POST",
            f"encrypt/{self._key}",
            {
                "plaintext": base64.b64encode(key).decode("ascii"),
                "associated_data": base64.b64encode(aad).decode("ascii"),
            },
        )
        # An engine that predates associated_data ignores it with a warning: the binding to the
        # keyring slot would silently be lost, so refuse rather than wrap without it.
        if any("associated_data" in str(w) for w in response.get("warnings") or ()):
            raise SealError(f"{self.describe()} (encrypt): the engine does not support associated_data")
        ciphertext = _data(response).get("ciphertext")
        if not isinstance(ciphertext, str) or not _CIPHERTEXT.fullmatch(ciphertext.encode("ascii", "replace")):
            raise SealError(f"{self.describe()} (encrypt): the engine's answer holds no ciphertext")
        return _FORMAT + ciphertext.encode("ascii")

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        if wrapped[:1] != _FORMAT or not _CIPHERTEXT.fullmatch(wrapped[1:]):
            raise SealError("a wrapped key is malformed (not a Transit ciphertext)")
        response = self._call(
            "decrypt",
            "POST",
            f"decrypt/{self._key}",
            {
                "ciphertext": wrapped[1:].decode("ascii"),
                "associated_data": base64.b64encode(aad).decode("ascii"),
            },
        )
        plaintext = _data(response).get("plaintext")
        try:
            if not isinstance(plaintext, str):
                raise ValueError
            return base64.b64decode(plaintext, validate=True)
        except (ValueError, binascii.Error):
            raise SealError(f"{self.describe()} (decrypt): the engine's answer holds no plaintext") from None

    def rotate(self) -> None:
        """A new key version in the engine; ``wrap`` uses it from now on, old ones still decrypt."""
        self._call("rotate", "POST", f"keys/{self._key}/rotate", {})

    def retire_previous(self) -> None:
        """Make the newest version the minimum for decryption, then trim (delete) all older ones.

        Trim is what destroys key material: raising ``min_decryption_version`` alone can be
        undone by anyone allowed to configure the key. Not atomic: after a crash between the
        steps, calling it again finishes the job.
        """
        info = _data(self._call("retire", "GET", f"keys/{self._key}", None))
        latest = info.get("latest_version")
        if not isinstance(latest, int) or isinstance(latest, bool) or latest < 1:
            raise SealError(f"{self.describe()} (retire): the engine's key info names no latest version")
        # Trim requires both minimums; encryption uses the newest version either way.
        self._call(
            "retire",
            "POST",
            f"keys/{self._key}/config",
            {"min_decryption_version": latest, "min_encryption_version": latest},
        )
        self._call("retire", "POST", f"keys/{self._key}/trim", {"min_available_version": latest})

    # -- plumbing ------------------------------------------------------------------------------

    def _read_token(self) -> str:
        path = self._token_file
        try:
            fd = os.open(path, os.O_RDONLY)  # symlinks allowed: Kubernetes mounts secrets that way
        except OSError as exc:
            raise SealError(f"cannot open the Transit token file {path}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise SealError(f"the Transit token file {path} is not a regular file")
            if st.st_mode & 0o077:
                raise SealError(
                    f"the Transit token file {path} is readable by group or others "
                    f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
                )
            raw = os.read(fd, _MAX_TOKEN_FILE + 1)
        except OSError as exc:
            raise SealError(f"cannot read the Transit token file {path}: {exc.strerror}") from None
        finally:
            os.close(fd)
        try:
            token = raw.decode("ascii").removesuffix("\n").removesuffix("\r")
        except UnicodeDecodeError:
            token = ""
        if len(raw) > _MAX_TOKEN_FILE or not _TOKEN.fullmatch(token):
            # Never echo the content: it is (or is meant to be) a secret.
            raise SealError(f"the Transit token file {path} does not hold one token on one line")
        return token

    def _call(self, what: str, method: _Method, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        """One request to ``/v1/{mount}/{path}``; the JSON answer (``{}`` for 204), every failure
        translated into SealError / SealUnreachable."""
        where = f"{self.describe()} ({what})"
        token = self._read_token()
        url = f"/v1/{self._mount_path}/{path}"
        session = requests.Session()
        try:
            client = hvac.Client(
                url=self._address, token=token, verify=self._verify, timeout=self._timeout, session=session
            )
            response = client.adapter.get(url) if method == "GET" else client.adapter.post(url, json=body)
        except requests.exceptions.SSLError:
            raise SealError(f"{where}: TLS verification of the engine failed (check ca_cert)") from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout):
            raise SealUnreachable(
                f"{where}: cannot reach the engine (refused, or no answer within {self._timeout:g} s)"
            ) from None
        except requests.exceptions.RequestException as exc:
            raise SealUnreachable(f"{where}: the request failed ({type(exc).__name__})") from None
        except hvac.exceptions.VaultError as exc:
            status = _status(exc)
            if status in (401, 403):
                raise SealError(
                    f"{where}: permission denied (HTTP {status}): the token is invalid, expired, "
                    "or its policy does not allow this"
                ) from None
            said = f"HTTP {status or '?'}: {_said(exc, token)}"
            if status == 429 or status >= 500:
                raise SealUnreachable(f"{where}: the engine cannot answer now ({said})") from None
            raise SealError(f"{where}: the engine refused ({said})") from None
        finally:
            session.close()
        if isinstance(response, dict):
            return response
        if isinstance(response, requests.Response) and response.status_code == 204:
            return {}
        raise SealError(f"{where}: the engine's answer is not a Transit response")


def _data(response: dict[str, Any]) -> dict[str, Any]:
    data = response.get("data")
    return data if isinstance(data, dict) else {}


def _status(exc: Exception) -> int:
    """The HTTP status behind an hvac exception (0 when hvac did not map it)."""
    for kind, code in _STATUS:
        if isinstance(exc, kind):
            return code
    return 0


def _said(exc: Exception, token: str) -> str:
    """The engine's own error strings ("encryption key not found", "cipher: message
    authentication failed"), short and only when they cannot carry the token."""
    errors = getattr(exc, "errors", None)
    if isinstance(errors, str):
        errors = [errors]
    if not isinstance(errors, list) or not errors:
        return "no detail"
    text = "; ".join(str(e) for e in errors)
    text = " ".join(text.split())[:200]
    if token in text or not text.isprintable():
        return "detail withheld"
    return text
