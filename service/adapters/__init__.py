"""The outside world behind the narrow interfaces the core and the consumer use.

`kafka` (the consumer loop, delivery, offsets, and the one place aiokafka clients are built),
`triton` (the guard client: one gRPC channel, Triton's errors mapped to ours) and `fetch`
(image URLs without SSRF). Library errors are translated here, at the boundary.
"""
