"""Region kinds: what mstfx chunks, one module per kind, listed once in :mod:`.registry`.

See :mod:`.base` for what a kind brings (finder, default M, rewrite, cost terms, report fields) and
``docs/architecture.md`` for how to add one.  Import :data:`Kind` and :data:`REGION_KINDS` from
:mod:`mstfx.regions.registry`; this package's own import stays light (the planner reads :mod:`.rules`
without torch).
"""
