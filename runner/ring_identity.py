"""Who may join a pipeline ring: each runner process holds an nkeys key pair for its life,
registers the public key (`RunnerRegistered.ring_key`), and the planner puts the group's
keys in `ConnectToGroup` (`Group.keys[rank]`). A rank proves it is the rank it claims by
signing the challenge its neighbour sent; the seed never leaves the runner and its engine
child, so no secret is in the log.
"""

from __future__ import annotations

import base64
import binascii
import os

import nacl.exceptions
import nacl.signing
import nkeys

# What a rank signs: the group, the rank it claims and the verifier's fresh nonce, so a
# proof can be replayed neither in another group, nor as another rank, nor later.
_PROOF = "exojet-ring-proof {group_id} {rank} {nonce}"


class BadProof(Exception):
    """A peer's proof of identity does not verify (the message says why)."""


def new_seed() -> bytes:
    """A fresh nkeys seed (a user key pair)."""
    return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))


def public_key(seed: bytes) -> str:
    """The public key of `seed`, as `RunnerRegistered.ring_key` carries it."""
    return bytes(nkeys.from_seed(bytearray(seed)).public_key).decode()


def nonce() -> str:
    """A challenge no one can have signed before."""
    return os.urandom(16).hex()


def prove(seed: bytes, group_id: str, rank: int, challenge: str) -> str:
    """The proof that the holder of `seed` is `rank` of `group_id`, answering `challenge`."""
    payload = _PROOF.format(group_id=group_id, rank=rank, nonce=challenge).encode()
    return base64.b64encode(nkeys.from_seed(bytearray(seed)).sign(payload)).decode()


def check(key: str, group_id: str, rank: int, challenge: str, proof: str) -> None:
    """Raise `BadProof` unless `proof` is `rank`'s answer to `challenge`, signed by `key`."""
    try:
        signature = base64.b64decode(proof, validate=True)
    except (binascii.Error, ValueError):
        raise BadProof("its proof is not base64") from None
    payload = _PROOF.format(group_id=group_id, rank=rank, nonce=challenge).encode()
    try:
        _verify_key(key).verify(payload, signature)
    except (nacl.exceptions.BadSignatureError, ValueError):
        raise BadProof(f"its proof is not signed by rank {rank}'s key {key[:12]}...") from None


def _verify_key(key: str) -> nacl.signing.VerifyKey:
    """The Ed25519 key inside an nkeys public key (prefix byte, 32 bytes, CRC16)."""
    try:
        raw = base64.b32decode(key + "=" * (-len(key) % 8))
    except (binascii.Error, ValueError):
        raise BadProof(f"rank key {key!r} is not an nkeys public key") from None
    body, crc = raw[:-2], int.from_bytes(raw[-2:], "little")
    if len(body) != 33 or nkeys.crc16(bytearray(body)) != crc or body[0] != nkeys.PREFIX_BYTE_USER:
        raise BadProof(f"rank key {key!r} is not an nkeys user public key")
    return nacl.signing.VerifyKey(body[1:])


class GroupKeys:
    """One rank's view of its group's identities: its own seed and every rank's public key."""

    def __init__(self, group_id: str, rank: int, seed: bytes, keys: list[str]) -> None:
        self.group_id = group_id
        self.rank = rank
        self.seed = seed
        self.keys = keys

    def proof(self, challenge: str) -> str:
        """Our answer to a neighbour's challenge."""
        return prove(self.seed, self.group_id, self.rank, challenge)

    def check(self, rank: int, challenge: str, proof: str) -> None:
        """Raise `BadProof` unless `proof` answers our `challenge` as `rank` of the group."""
        check(self.keys[rank], self.group_id, rank, challenge, proof)
