"""The recurrence core: the structure (:class:`~ssdkit.Recurrence`), the chunked scan and its kernel, the
O(1) step, the sequential oracle, the short causal conv, gated norms, the cache, verify/commit rollback,
layer stacks, and the mesh forms of the scan and the conv. The public names are re-exported from
``ssdkit``; import these modules directly only for what ``ssdkit`` does not export."""
