"""Annotator accounts: creating them, credentials (stored as scrypt hashes), signing in, deactivating."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from contextlib import suppress

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from rlhf.store.schema import NAME_MAX, Annotator, StoreError


def _hash_credential(credential: str, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(credential.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)
    return f"scrypt$16384$8$1${salt.hex()}${digest.hex()}"


def _check_credential(credential: str, stored: str) -> bool:
    try:
        _, n, r, p, salt, digest = stored.split("$")
        got = hashlib.scrypt(credential.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p), dklen=32)
    except ValueError:  # "" (no credential set) or a malformed hash: nobody signs in with it
        return False
    return hmac.compare_digest(got.hex(), digest)


# Checked when the name is unknown, inactive or simulated, so a refusal costs one scrypt whatever the reason and its
# timing does not tell which names exist.
_DUMMY_HASH = _hash_credential(secrets.token_urlsafe(12))


class Accounts:
    """Store's annotator methods; each is one transaction (`self.session()`, from Store)."""

    def add_annotator(self, name: str, role: str = "annotator", simulated: bool = False) -> str:
        """Create an annotator; returns the credential (shown once: only its scrypt hash is stored)."""
        name = name.strip()
        if not name or len(name) > NAME_MAX:
            raise StoreError(f"an annotator needs a name of 1 to {NAME_MAX} characters")
        if role not in ("annotator", "admin"):
            raise StoreError(f"role must be annotator or admin, not {role!r}")
        credential = secrets.token_urlsafe(12)
        try:
            with self.session() as s:
                s.add(Annotator(name=name, role=role, simulated=simulated,
                                credential_hash=_hash_credential(credential)))
        except IntegrityError:
            raise StoreError(f"an annotator named {name!r} exists already") from None
        return credential

    def reset_credential(self, name: str) -> str:
        """A new credential for an existing annotator (a lost one, or an account brought in by an import)."""
        credential = secrets.token_urlsafe(12)
        with self.session() as s:
            changed = s.execute(update(Annotator).where(Annotator.name == name)
                                .values(credential_hash=_hash_credential(credential))).rowcount
        if not changed:
            raise StoreError(f"no annotator named {name!r}")
        return credential

    def annotator(self, name: str, create_simulated: bool = False) -> Annotator:
        with self.session(write=False) as s:
            row = s.scalar(select(Annotator).where(Annotator.name == name))
        if row is None and create_simulated:
            with suppress(StoreError):  # created meanwhile by a concurrent caller
                self.add_annotator(name, simulated=True)
            return self.annotator(name)
        if row is None:
            raise StoreError(f"no annotator named {name!r}")
        return row

    def authenticate(self, name: str, credential: str) -> Annotator | None:
        """The active, non-simulated annotator with this name and credential, else None (constant-time compare; one
        scrypt in every case)."""
        with self.session(write=False) as s:
            row = s.scalar(select(Annotator).where(Annotator.name == name))
        usable = row is not None and row.active and not row.simulated and row.credential_hash
        if not _check_credential(credential, row.credential_hash if usable else _DUMMY_HASH) or not usable:
            return None
        return row

    def list_annotators(self) -> list[Annotator]:
        with self.session(write=False) as s:
            return list(s.scalars(select(Annotator).order_by(Annotator.name)))

    def set_active(self, name: str, active: bool) -> None:
        with self.session() as s:
            if s.execute(update(Annotator).where(Annotator.name == name).values(active=active)).rowcount == 0:
                raise StoreError(f"no annotator named {name!r}")

