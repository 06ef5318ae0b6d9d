"""decode_worker/token_queue.py: a stream's items from the engine thread reach the event loop in order,
none lost or repeated; what is queued comes out as one item; a lone token never waits for company."""
import asyncio
import threading

import pytest

from pdcluster.decode_worker.token_queue import TokenQueue
from pdcluster.engine.sampling_params import TokenLogprobs
from pdcluster.messages import TokenItem


def item(tok: int, finished: bool = False, cached: int = 0) -> TokenItem:
    return TokenItem([tok], finished, "length" if finished else None, cached,
                     (TokenLogprobs(tok, -0.5 * tok, ((tok, -0.5 * tok),)),))


def test_concat_keeps_order_logprobs_and_the_last_finish():
    joined = TokenItem.concat([item(1, cached=32), item(2), item(3, finished=True)])
    assert joined.token_ids == [1, 2, 3] and joined.finished and joined.finish_reason == "length"
    assert [lp.token_id for lp in joined.logprobs] == [1, 2, 3] and joined.num_cached_tokens == 32
    assert TokenItem.concat([item(4)]) == item(4)
    with pytest.raises(ValueError, match="last"):
        TokenItem.concat([item(1, finished=True), item(2)])


def test_what_is_queued_comes_out_as_one_item_and_a_finish_ends_the_batch():
    async def go():
        q = TokenQueue(asyncio.get_running_loop())
        for t in range(5):
            q.put_threadsafe(item(t))
        q.put_threadsafe(item(5, finished=True))
        q.put_threadsafe(item(6))           # after a finish: never joined to it
        await asyncio.sleep(0)              # the loop runs the queued puts
        return await q.get(5.0), await q.get(5.0)
    first, second = asyncio.run(go())
    assert first.token_ids == [0, 1, 2, 3, 4, 5] and first.finished
    assert [lp.token_id for lp in first.logprobs] == first.token_ids
    assert second.token_ids == [6]


def test_a_lone_token_is_returned_without_waiting_for_the_next():
    """The engine thread sends token 1, then waits until the reader has it before sending token 2:
    a reader that held token 1 back for a batch would never finish."""
    got_first = threading.Event()

    async def go():
        q = TokenQueue(asyncio.get_running_loop())

        def engine():
            q.put_threadsafe(item(1))
            got_first.wait(10)
            q.put_threadsafe(item(2, finished=True))
        t = threading.Thread(target=engine)
        t.start()
        first = await q.get(10.0)
        got_first.set()
        second = await q.get(10.0)
        t.join()
        return first, second
    first, second = asyncio.run(go())
    assert (first.token_ids, second.token_ids, second.finished) == ([1], [2], True)


def test_a_busy_reader_gets_every_token_once_in_order():
    """An engine thread pushing 300 tokens as fast as it can against a reader that yields to the loop
    between reads: whatever the batching, the concatenation is exactly the sequence."""
    n = 300

    async def go():
        q = TokenQueue(asyncio.get_running_loop())
        t = threading.Thread(target=lambda: [q.put_threadsafe(item(i, finished=i == n - 1)) for i in range(n)])
        t.start()
        seen, batches = [], 0
        while not seen or seen[-1] != n - 1:
            got = await q.get(10.0)
            assert got is not None
            seen += got.token_ids
            batches += 1
            assert got.finished == (seen[-1] == n - 1)
        t.join()
        return seen, batches
    seen, batches = asyncio.run(go())
    assert seen == list(range(n)) and 1 <= batches <= n


def test_nothing_within_the_timeout_is_none():
    async def go():
        return await TokenQueue(asyncio.get_running_loop()).get(0.01)
    assert asyncio.run(go()) is None
