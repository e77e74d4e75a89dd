"""Across nodes, a process joins the world only if it holds the deployment's secret.

torch's TCPStore and gloo authenticate nobody: a process started with another
``--internal-secret`` (a second deployment's node, a stale one) would join the world and
its collectives, and only its zmq frames would be refused, leaving the head waiting for an
engine that never says ready. So before the process group forms, world rank 0 puts a fresh
nonce in the store, every other rank answers with a keyed BLAKE2b tag of it (and its rank),
and rank 0 checks each answer and publishes the verdict (waiting until the refused ranks
have read it): a rank whose tag is wrong stops with one line, on its node and on the head.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import secrets

from epplat.config import ConfigError

_NONCE, _VERDICT = "epplat/auth/nonce", "epplat/auth/verdict"


def _proof(secret: str, nonce: bytes, rank: int) -> bytes:
    return hashlib.blake2b(nonce + str(rank).encode(), key=hashlib.sha256(secret.encode()).digest(),
                           digest_size=16).digest()


def check_peers(store, secret: str, rank: int, world_size: int) -> None:
    """Every rank calls it after connecting to the store; ConfigError where a rank lacks the secret."""
    if rank == 0:
        nonce = secrets.token_bytes(16)
        store.set(_NONCE, nonce)
        bad = [r for r in range(1, world_size)
               if not hmac.compare_digest(store.get(f"epplat/auth/{r}"), _proof(secret, nonce, r))]
        store.set(_VERDICT, ",".join(map(str, bad)) or "ok")
        if bad:
            try:       # the refused ones read the verdict before this store goes away with this process
                store.wait([f"epplat/auth/read/{r}" for r in bad], datetime.timedelta(seconds=10))
            except Exception:
                pass
            raise ConfigError(f"world rank(s) {bad} do not have this deployment's --internal-secret "
                              "(EPPLAT_INTERNAL_SECRET): refused")
        return
    store.set(f"epplat/auth/{rank}", _proof(secret, store.get(_NONCE), rank))
    verdict = store.get(_VERDICT)
    store.set(f"epplat/auth/read/{rank}", b"1")
    if verdict != b"ok":
        raise ConfigError("the head refused this node: its --internal-secret (EPPLAT_INTERNAL_SECRET) is not the "
                          "deployment's")
