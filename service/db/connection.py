"""The types the query functions take, so that a pool's connection and a plain one both fit.

`pool.acquire()` hands out a `PoolConnectionProxy`, which forwards every call to the connection
it wraps but is not a subclass of `asyncpg.Connection`: code that queries accepts either.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

Connection: TypeAlias = asyncpg.Connection | PoolConnectionProxy
# A row as read (`asyncpg.Record`) or built in memory with the same keys (fan-out of new rows).
Row: TypeAlias = asyncpg.Record | Mapping[str, Any]
