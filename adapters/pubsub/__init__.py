"""Google Pub/Sub transport: provisioner, publisher (the capture stage's broker), event source
(the ingest stage's), monitor. See docs/pubsub.md."""
