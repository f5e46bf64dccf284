"""On start: the server secret's check, then the move of license keys stored in clear (an
earlier format) to keys at rest as digests (domain/keysecret.py).

The earlier format kept a license's key in its hash (field `key`), indexed it under
`meter:{key:<sha256(key)>}` (SHA-256(key) being also the AES key of its encrypted license
files) and kept the key a create generated in clear in its create record (`secret`, and in the
stored `answer`). `migrate` SCANs every primary and, per license still holding `key`: points
the new index entry (by digest) at it, then replaces `key` by `kd` and `kf` in one script, then
drops the old entry; then seals every create record's key and rewrites its answer; then drops
the old index entries left (their licenses are migrated or gone). Every step is idempotent, so
several replicas may run it at once, and a start cut short anywhere is completed by the next.
Once a migration completes, `meter:keys-migrated` is set and later starts skip it. Replicas of
the earlier version must be stopped before the first replica of this one starts.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from meter_grpc.domain import failpoints
from meter_grpc.domain.keysecret import CREATE_SECRET, KeySecret
from meter_grpc.storage import keys
from meter_grpc.storage.store import RedisStore, storage_call

log = logging.getLogger(__name__)

_LICENSE_NAME = re.compile(re.escape(keys.PREFIX) + r":\{lic:[^}]*\}")
# Records migrated at once (pipelined on the connection of their node).
BATCH = 256


class KeySecretMismatch(Exception):
    """The server secret differs from the one the data in Redis was written under."""


@storage_call
async def check_secret(store: RedisStore, secret: KeySecret) -> None:
    """Records the secret's check value in Redis (the first replica), or KeySecretMismatch
    when another replica wrote a different one: keys digested under one secret would not
    authenticate under the other."""
    name = keys.key_secret_check()
    await store.client.set(name, secret.check, nx=True)
    stored = await store.client.get(name)
    if stored != secret.check:
        raise KeySecretMismatch(
            "the license key secret differs from the one this Redis was written with "
            f"({name}): give every replica the same METER_KEY_SECRET_FILE"
        )


@dataclass
class Migrated:
    licenses: int = 0
    create_records: int = 0
    old_index_entries: int = 0


async def _license(store: RedisStore, secret: KeySecret, name: str, done: Migrated) -> None:
    license_id, key = await store.client.hmget(name, ["id", "key"])
    if license_id is None or key is None:
        return
    digest = secret.digest(key)
    holder = await store.claim_key(digest, license_id)
    if holder:
        log.warning("license %s: its key is also indexed for license %s", license_id, holder)
    await failpoints.hit("migrate_keys.claimed")
    changed = await store.scripts.key_migrate(
        keys=[name], args=["license", digest, secret.seal_file_key(license_id, key)]
    )
    done.licenses += int(changed)
    await failpoints.hit("migrate_keys.license")
    await store.scripts.cas(keys=[keys.license_by_key_sha256(key)], args=["del", license_id])


def _answer(secret: KeySecret, text: str) -> str | None:
    """A stored CreateLicense answer in the current format (None: it already is)."""
    d: dict[str, Any] = json.loads(text)
    h = d.get("license")
    if not isinstance(h, dict) or "key" not in h:
        return None
    key = h.pop("key")
    h["kd"] = secret.digest(key)
    h["kf"] = secret.seal_file_key(h["id"], key)
    return json.dumps(d)


async def _create_record(store: RedisStore, secret: KeySecret, name: str, done: Migrated) -> None:
    plain, answer = await store.client.hmget(name, ["secret", "answer"])
    sealed = secret.seal(plain.encode(), CREATE_SECRET) if plain else ""
    new_answer = _answer(secret, answer) if answer else None
    if not sealed and new_answer is None:
        if plain == "":
            await store.client.hdel(name, "secret")
        return
    read = hashlib.sha1(answer.encode()).hexdigest() if answer and new_answer else ""
    changed = await store.scripts.key_migrate(
        keys=[name], args=["create", sealed, read, new_answer or ""]
    )
    done.create_records += int(changed)


async def prepare(store: RedisStore, secret: KeySecret) -> None:
    """What a start does before serving: the secret's check, then the migration unless a
    completed one is recorded."""
    await check_secret(store, secret)
    if await _migrated(store):
        return
    done = await migrate(store, secret)
    await _mark_migrated(store)
    if done.licenses or done.create_records or done.old_index_entries:
        await _rewrite_append_only_files(store)


async def _rewrite_append_only_files(store: RedisStore) -> None:
    """BGREWRITEAOF on every primary: the append-only file still holds the commands that
    wrote keys in clear until it is rewritten. Best effort (a managed Redis may refuse it)."""
    for node in await store.client.router.primaries():
        try:
            await store.client.router.call(("BGREWRITEAOF",), node=node)
        except Exception as exc:  # logged: the migration itself is done
            log.warning("BGREWRITEAOF on %s: %s", node.name, exc)


@storage_call
async def _migrated(store: RedisStore) -> bool:
    return await store.client.get(keys.keys_migrated()) is not None


@storage_call
async def _mark_migrated(store: RedisStore) -> None:
    await store.client.set(keys.keys_migrated(), "1")


async def _batches(
    names: AsyncIterator[str], keep: Callable[[str], bool]
) -> AsyncIterator[list[str]]:
    batch: list[str] = []
    async for name in names:
        if keep(name):
            batch.append(name)
        if len(batch) >= BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


async def _each(names: list[str], step: Callable[[str], Awaitable[None]]) -> None:
    await asyncio.gather(*(step(name) for name in names))


async def migrate(store: RedisStore, secret: KeySecret) -> Migrated:
    """Moves every record of the earlier format; returns how many it changed."""
    done = Migrated()
    await _migrate(store, secret, done)
    if done.licenses or done.create_records or done.old_index_entries:
        log.info(
            "license keys now stored as digests: %d licenses, %d create records, "
            "%d old index entries",
            done.licenses,
            done.create_records,
            done.old_index_entries,
        )
    return done


@storage_call
async def _migrate(store: RedisStore, secret: KeySecret, done: Migrated) -> None:
    async def license_step(name: str) -> None:
        await _license(store, secret, name, done)

    async def record_step(name: str) -> None:
        await _create_record(store, secret, name, done)

    async def old_entry_step(name: str) -> None:
        license_id = await store.client.get(name)
        if license_id is not None:  # its license may still hold `key` (written meanwhile)
            await _license(store, secret, keys.license(license_id), done)
        done.old_index_entries += await store.client.delete(name)

    def a_license(name: str) -> bool:
        return _LICENSE_NAME.fullmatch(name) is not None

    def any_name(name: str) -> bool:
        return True

    for pattern, keep, step in (
        (keys.LICENSE_PATTERN, a_license, license_step),
        (keys.LICENSE_CREATE_PATTERN, any_name, record_step),
        (keys.OLD_KEY_INDEX_PATTERN, any_name, old_entry_step),
    ):
        async for batch in _batches(store.client.scan_iter(pattern), keep):
            await _each(batch, step)
