"""Operations tooling for chunkgate (benchmarks; dashboards and alerts live beside it as files).

Nothing here is imported by ``gateway`` or ``storage``; it must never become a runtime dependency.
"""
