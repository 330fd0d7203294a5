"""The request contract both sides of the queue share, with no torch in it.

Request and sampling types, the serving limits and the one validation of a
request, the model card (a checkpoint read without its weights), the text side
of a stream (detokenizing, stop strings, the finish decision), the round
records the engine emits, and the `Engine` and `WorkerObserver` interfaces the
worker loop and telemetry program against. The gateway imports this package;
the engine (in worker/) implements it.
"""
