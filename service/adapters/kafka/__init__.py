"""Kafka: consume → judge → deliver → commit.

`consumer` (the window, pausing, rebalances, shutdown), `delivery` (at least once, or exactly
once in transactions), `offsets` (what may be committed while records finish out of order) and
`clients` (the calls made of aiokafka, as protocols, and the one place its clients are built).
"""
