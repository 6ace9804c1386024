"""Moving the keyring between the store (wrapped) and memory (unwrapped), through the seal.

The first start of an empty store creates the index key and data key v1, wraps both with the
seal and stores only the wrapped forms. Every later start unwraps them. The associated data of
each wrapped key names its purpose and version, so a wrapped key copied into another slot of
the store does not unwrap.
"""

from __future__ import annotations

import struct

from faceseal.server.crypto.keyring import Keyring, SecretKey
from faceseal.server.seal.base import Seal, SealError
from faceseal.server.store.base import Store, WrappedKey

INDEX = "index"
DATA = "data"
_CONTEXT = b"faceseal/keyring/v1"


def wrap_aad(purpose: str, version: int) -> bytes:
    return _CONTEXT + b"\0" + purpose.encode() + b"\0" + struct.pack(">I", version)


def load_or_create(store: Store, seal: Seal) -> Keyring:
    """Unwrap the stored keyring, creating it on an empty store. Raises SealError."""
    wrapped = store.wrapped_keys()
    if not wrapped:
        keyring = Keyring(SecretKey.generate(), {1: SecretKey.generate()})
        store.add_wrapped_keys(
            [
                WrappedKey(INDEX, 1, seal.wrap(keyring.index_key.reveal(), wrap_aad(INDEX, 1))),
                WrappedKey(DATA, 1, seal.wrap(keyring.data_keys[1].reveal(), wrap_aad(DATA, 1))),
            ]
        )
        return keyring
    index: SecretKey | None = None
    data: dict[int, SecretKey] = {}
    for item in wrapped:
        key = SecretKey(seal.unwrap(item.wrapped, wrap_aad(item.purpose, item.version)))
        if item.purpose == INDEX:
            index = key
        elif item.purpose == DATA:
            data[item.version] = key
    if index is None or not data:
        raise SealError("the stored keyring is incomplete (index key or data keys missing)")
    return Keyring(index, data)
