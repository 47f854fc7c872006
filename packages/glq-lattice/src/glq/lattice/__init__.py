"""E8 lattice codebooks for GLQ.

``codec(bpw)`` (2 <= bpw <= 8) will return the code that maps 8-weight vectors to
``8 * bpw`` bits and back, with the small per-stage lookup tables a GPU kernel needs.
Needs only torch; nothing is built at import time.
"""
