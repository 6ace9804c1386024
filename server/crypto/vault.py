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
from faceseal.server.store.base import Store, StoreError, WrappedKey

INDEX = "index"
DATA = "data"
_CONTEXT = b"faceseal/keyring/v1"


def wrap_aad(purpose: str, version: int) -> bytes:
    return _CONTEXT + b"\0" + purpose.encode() + b"\0" + struct.pack(">I", version)


def load(store: Store, seal: Seal) -> Keyring:
    """Unwrap the stored keyring; SealError if there is none (tools must never create one)."""
    if not store.wrapped_keys():
        raise SealError("the store holds no keyring")
    return load_or_create(store, seal)


def load_or_create(store: Store, seal: Seal) -> Keyring:
    """Unwrap the stored keyring, creating it on an empty store. Raises SealError."""
    wrapped = store.wrapped_keys()
    if not wrapped:
        keyring = Keyring(SecretKey.generate(), {1: SecretKey.generate()})
        try:
            store.add_wrapped_keys(
                [
                    WrappedKey(INDEX, 1, seal.wrap(keyring.index_key.reveal(), wrap_aad(INDEX, 1))),
                    WrappedKey(DATA, 1, seal.wrap(keyring.data_keys[1].reveal(), wrap_aad(DATA, 1))),
                ]
            )
            return keyring
        except StoreError:
            # Another replica sharing this store created the keyring first: use theirs.
            wrapped = store.wrapped_keys()
            if not wrapped:
                raise
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


def add_version(store: Store, seal: Seal, keyring: Keyring) -> Keyring:
    """Create the next data-key version, store it wrapped, and return the keyring holding it."""
    version = keyring.active + 1
    key = SecretKey.generate()
    store.add_wrapped_keys([WrappedKey(DATA, version, seal.wrap(key.reveal(), wrap_aad(DATA, version)))])
    return keyring.with_version(version, key)


def wrap_all(seal: Seal, keyring: Keyring) -> list[WrappedKey]:
    """The whole keyring wrapped by ``seal``'s newest KEK."""
    keys = [WrappedKey(INDEX, 1, seal.wrap(keyring.index_key.reveal(), wrap_aad(INDEX, 1)))]
    for version in keyring.versions():
        key = keyring.data_keys[version]
        keys.append(WrappedKey(DATA, version, seal.wrap(key.reveal(), wrap_aad(DATA, version))))
    return keys


def retire_version(store: Store, seal: Seal, keyring: Keyring, version: int) -> Keyring:
    """Destroy a data-key version everywhere it can be recovered from.

    Deleting its wrapped copy from the store is not enough: every backup still holds that copy,
    wrapped under the same KEK. So the KEK is rotated too: the remaining keyring is re-wrapped
    under a new KEK version in one transaction, then the seal destroys the old KEK version.
    After that no backup's keyring unwraps, which is what crypto-shredding promises.
    """
    remaining = keyring.without_version(version)
    seal.rotate()
    store.replace_wrapped_keys(wrap_all(seal, remaining))
    seal.retire_previous()
    return remaining


def migrate(store: Store, old: Seal, new: Seal) -> int:
    """Re-wrap the stored keyring from ``old`` to ``new`` without touching a template blob.

    A store without a keyring is refused (SealError), not given a new one: there is nothing to
    migrate, and a config pointing at the wrong store must not look like a success."""
    keyring = load(store, old)
    keys = wrap_all(new, keyring)
    for item in keys:  # prove the new seal opens what it wrapped before the old copy is replaced
        new.unwrap(item.wrapped, wrap_aad(item.purpose, item.version))
    store.replace_wrapped_keys(keys)
    return len(keys)
