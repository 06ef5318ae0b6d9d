"""The gRPC KV transport: server.py (decode side, one Push RPC per request), transport.py
(prefill side); base.py holds the grpc.aio plumbing the mooncake transport shares."""
