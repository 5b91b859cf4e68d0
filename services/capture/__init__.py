"""The capture stage (`cdc capture`): the WAL reader -> the ingest pump -> a publisher Outlet."""
