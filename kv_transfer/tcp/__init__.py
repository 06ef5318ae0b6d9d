"""The plain-TCP KV transport: protocol.py (the socket protocol), server.py (decode side),
transport.py + connection.py (prefill side)."""
