"""The Apache Iceberg sink: typed rows from the columnar batches, append or upsert (positional
deletes, so a commit costs O(batch) and not O(table)), applied positions per lane in the
snapshot summary of the same commit, schema evolution, maintenance (docs/lakehouse.md)."""
