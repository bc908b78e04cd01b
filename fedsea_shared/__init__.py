"""Code both halves of the split share: model shards, the wire protocol and noise.

edge_runtime and server_runtime import this package; this package imports neither.
"""
