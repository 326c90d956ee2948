"""Benchmarks of chunkgate against peers measured in the same run (``python -m ops.bench``).

Every figure is a ratio to a peer run on the same machine, in the same run, alternating with
chunkgate, against the same SeaweedFS store; absolute numbers on a shared 2-core machine drift
too much to mean anything alone. This package must never be imported by ``gateway`` or
``storage``, and must never bind anything but 127.0.0.1.
"""
