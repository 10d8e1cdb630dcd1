"""Scale runs: `plan` (settings, shard seeds, one shard's run), `shards` (shard files and their
manifests), `retry` (whether a lost shard run is started again), `merge` (cross-shard dedup, QC, the
final files) and `dataset_card`. Imports infra, the model facade and phases."""
