from dexserve.client import stream_generate


def test_one_stream(make_gateway, workers, rclient):
    gw = make_gateway()
    workers.start()
    workers.wait_ready(rclient, 1)
    chunks = list(stream_generate(gw.address, "def add(a, b):", max_new_tokens=5, timeout=30))
    print(chunks)
    assert [c.position for c in chunks[:5]] == [0, 1, 2, 3, 4]
    assert chunks[-1].finish_reason
