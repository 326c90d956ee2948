"""A deterministic simulator of the storage layer (README: "Testing the commit protocol").

It runs the real ``storage`` code -- ObjectStore, tus UploadSessions, StoreLockManager leases,
repair, gc and fsck -- for several simulated gateways over one shared store, on a virtual clock,
and checks the invariants I1-I7 after every step. One seed fixes every interleaving, fault,
cancellation, crash and clock offset, so a failure replays exactly.

    python -m tests.sim --seeds 0:1000           # a soak over seeds 0..999
    python -m tests.sim --seed 17 --trace        # replay one seed and print its trace
"""
