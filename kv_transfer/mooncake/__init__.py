"""The Mooncake KV transport (pull: the decode side READs staged chunks): protocol.py (control
plane), server.py (decode side), transport.py + arena.py (prefill side), engine.py (the library)."""
