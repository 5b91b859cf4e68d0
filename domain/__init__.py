"""The pure core of cdc-platform: events, routing, commit tracking and the ports.

Nothing in this package performs I/O or imports anything outside the standard library.
"""
