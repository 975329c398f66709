"""The unit of memory in mstfx's planning: GiB, with MiB for figures below 1 GiB."""

#: The unit of every memory budget and figure in mstfx: GiB (2**30 bytes), MiB below 1 GiB.  Arguments
#: keep the ``budget_gb`` spelling; they mean GiB, as ``mstfx simulate --gpu-gb`` does.
GiB = float(1 << 30)
MiB = float(1 << 20)
GB = GiB  # the unit of ``budget_gb`` (kept under this name for callers that convert with it)
