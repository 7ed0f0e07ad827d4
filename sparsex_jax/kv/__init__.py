"""Host-side KV bookkeeping (plain numpy, never traced): pool layout and slot arithmetic, the
page allocator, the prefix and segment caches, and the KV store that owns them."""

from sparsex_jax.kv.allocator import NULL_PAGE, PageAllocator, PoolExhausted
from sparsex_jax.kv.layout import PoolLayout, slot_of
from sparsex_jax.kv.store import KVStore, Lease, Leases

__all__ = ["KVStore", "Lease", "Leases", "NULL_PAGE", "PageAllocator", "PoolExhausted",
           "PoolLayout", "slot_of"]
