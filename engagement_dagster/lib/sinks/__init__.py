"""The three sinks of the change stream, one module each, behind one small interface (base.py).

A sink applies a batch at most once per LSN: it skips every change at or below its checkpoint.
"""
