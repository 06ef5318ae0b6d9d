"""Small bf16 KV caches and per-layer K/V for the transport tests (test_kv_transports.py and each
transport's own file)."""
import torch

L, NB, BLOCK = 4, 32, (16, 3, 64)  # layers, cache blocks, [block_size, kv_heads, head_dim]
BLOCK_BYTES = 2 * 16 * 3 * 64 * 2  # K + V of one bf16 block
SECRET = "s3cret"


def new_caches(nb: int = NB, layers: int = L) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(K caches, V caches): `layers` zeroed bf16 tensors [nb, *BLOCK] each."""
    return ([torch.zeros(nb, *BLOCK, dtype=torch.bfloat16) for _ in range(layers)],
            [torch.zeros(nb, *BLOCK, dtype=torch.bfloat16) for _ in range(layers)])


def layers(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """L layers of random bf16 (K, V), each [n, *BLOCK]."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *BLOCK, generator=g).bfloat16(), torch.randn(n, *BLOCK, generator=g).bfloat16())
            for _ in range(L)]


def assert_landed(caches, ids, data) -> None:
    kc, vc = caches
    for layer, (k, v) in enumerate(data):
        assert torch.equal(kc[layer][ids], k) and torch.equal(vc[layer][ids], v)


def serving(server):
    """A fixture's body: `server` started, yielded, stopped (its streams still open fail)."""
    server.start_sync()
    yield server
    server.stop_sync()
