"""Seals: where the key-encryption key lives. ``seal_from_config`` picks one by ``seal.type``."""

from __future__ import annotations

from pathlib import Path

from faceseal.server.config import FileSealConfig, Pkcs11SealConfig, SealConfig, TransitSealConfig
from faceseal.server.errors import ConfigError
from faceseal.server.seal.base import Seal, SealError


def seal_from_config(config: SealConfig, source: Path) -> Seal:
    """Build the configured seal. A misconfiguration (unreadable key file, PIN file) is a
    ConfigError naming the file; an unreachable HSM or KMS is not: the daemon starts sealed."""
    try:
        if isinstance(config, FileSealConfig):
            from faceseal.server.seal.file import FileSeal

            return FileSeal(config.key_file)
        if isinstance(config, Pkcs11SealConfig):
            from faceseal.server.seal.pkcs11 import Pkcs11Seal

            return Pkcs11Seal.from_config(config)
        if isinstance(config, TransitSealConfig):
            from faceseal.server.seal.transit import TransitSeal

            return TransitSeal.from_config(config)
    except SealError as exc:
        raise ConfigError(f"{source}: section [seal]: {exc}") from None
    raise ConfigError(f"{source}: section [seal]: unsupported seal type")
