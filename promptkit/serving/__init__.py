"""The parts of ``promptkit serve`` (:mod:`promptkit.server` builds the app from them).

``handlers`` (the endpoints), ``run`` (a request's generations from admission to the last
byte), ``limits`` (bounds and the queue), ``errors`` (OpenAI error bodies, whose fault an
exception is), ``format`` (response shapes), ``stats`` (``/stats`` without waiting on the engine).
"""
