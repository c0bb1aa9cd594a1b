"""Shared state of several fastgate instances: the key store engines and the live state in Redis.

I/O behind small interfaces: the policy (gate, limits, trust) asks them questions without knowing which
engine answers, and without [state] none of this is imported at all.
"""
