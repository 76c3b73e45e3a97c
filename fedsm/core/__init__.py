"""The pure core of fedsm: events and their codec, the job state and its lifecycle, the round
policy that decides what a researcher does next, and the researcher <-> node protocol.

Nothing here does I/O: no files, sockets, clocks, random numbers or garbage-collector
tricks. Time and ids are passed in; what to do is returned. ``tests/test_layers.py`` holds
these rules.
"""
