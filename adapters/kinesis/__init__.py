"""Amazon Kinesis transport: the capture stage's publisher (an `Outlet`), the ingest's
`EventSource` with shard leases and checkpoints in DynamoDB, the provisioner and the lag
monitor. Every client honours `kinesis.endpoint_url` (an emulator). See docs/kinesis.md."""
