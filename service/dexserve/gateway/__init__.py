"""The gateway: validate once, enqueue, stream each committed token, through two doors.

`core` admits a request (the contract's validation, chat rendering, the workers'
capabilities, backpressure) and follows its token stream; `servicer` is the gRPC
door (maps messages and status codes), `http_api` the OpenAI-compatible HTTP door
(Starlette on uvicorn, in the same event loop) with `openai_compat` converting
OpenAI's JSON to the same internal request and back; `wire` decodes gRPC requests
leniently (invalid UTF-8 → INVALID_ARGUMENT), `auth` checks the bearer token for
both doors, `server` assembles them with health and reflection, `config` holds
the settings.
"""
