"""Generated from proto/cdc_proto: run `make proto`. Do not edit the *_pb2* files."""
