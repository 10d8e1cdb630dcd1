"""Shared infrastructure of every area: `config` (the validated settings), `errors`, `storage` (the
atomic writer and hashing), `jsonl` (the hardened JSON Lines reader), `locks`, `provenance`, `faults`
(crash-test fault points), `interrupts` (Ctrl-C), `codehash` (cache keys from imports), `stats`
(intervals) and `schemas` (typed records that cross modules). Imports nothing else of stage1_core."""
