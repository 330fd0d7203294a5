"""The queue protocol shared by the gateway and the worker (service/README.md).

`protocol` names every key and timing, `codec` maps protobuf ⇄ engine types,
`producer` is the gateway's (asyncio) side, `consumer` the worker's (sync)
side, `lag` what an autoscaler reads.
"""
